"""LoRA, VeRA and RandLoRA for Hugging Face models, in one small module.

Every method writes its weight update the same way, delta_W = scale * up @ down, with `up` (out x R) and
`down` (R x in) built on the fly from the method's few trainable tensors:

    LoRA      down = lora_A                         up = lora_B                          scale = alpha / r
    VeRA      down = lambda_d[:, None] * A[:, :in]  up = lambda_b[:, None] * B[:out]     scale = 1
    RandLoRA  down, up = shared frozen bases scaled by lambda (r x n) and gamma (n x min(in, out)),
              laid out exactly as HF PEFT does                                           scale = alpha / r

Each call then picks, by its cost in multiply-adds and the bytes it keeps for backward, one exact way to
compute y = x W^T + b + x_drop delta_W^T (autograd functions `_AdaptedLinear`, `_VeraThin`, `_VeraDense`):
the factored form (x_drop down^T) up^T; the dense form through delta_W (one matmul with W + delta_W, or
x_drop delta_W^T as a second matmul in half precision and with dropout), whose backward forms the (out x in)
gradient once and projects it onto the factors; or, for VeRA, whose only trainable tensors are two scaling
vectors, the thin form, whose vectors' gradients come from one (out x r) product of (tokens x r) ones (in
fp32 without dropout, y and grad_x may go through W + delta_W instead). The fastest path wins among those that
keep no more than both the layer's input and the plain two-matmul formulation (PEFT's) would keep. Kept for
backward: the input in the compute dtype (shared with any neighbour that keeps the same tensor), dropout as a
one-byte mask (x_drop is rebuilt), and an R-wide (tokens x R) projection only where it is smaller than the input and
needed (RandLoRA's trainable `up`, VeRA's h1 when r is narrower than the input); the merged weight is
rebuilt in backward, never kept, as is a fused q/v LoRA's assembled (out x R) `up` (its B blocks are kept);
the frozen weight, the shared bases and the parameters are kept as the tensors they are, without copies.
Dropout's 1 / (1 - p), the LoRA scale and VeRA's lambdas are folded into the small factors, an R-wide product or
a matmul's alpha, not applied to a (tokens x in) or (tokens x out) tensor, and the adapter's product is
accumulated into the frozen matmul's output. The frozen bases never get gradient state. The adapted layer keeps
the base layer's own `weight`/`bias` parameters, so the model's state-dict keys do not change and merging is a
plain in-place add.

Loading never fails silently: every bad argument or unreadable, inconsistent file raises AdapterError (one
line naming the problem and the fix); a checkpoint's alpha must match the model's (a model whose alpha was a
default takes the checkpoint's, and says so).

Layout: `AdapterLayer` holds the shared mechanism (path choice, merge/unmerge with its snapshot, state dict,
train/eval); each method is one subclass (LoraLayer, VeraLayer, RandLoraLayer: its parameters and init, its
factors, width, frozen bases, PEFT type and config keys) registered in METHOD_CLASSES. Adding a method is one
subclass and one registry line; nothing outside the method classes tests a method's name.
The file formats (ours, HF PEFT's, loralib's) live in adapter_formats; this module re-exports their public
functions (save_adapter, load_adapter, save_peft, load_peft, peft_config).

Public API (`__all__`): apply_adapter, merge_adapter, unmerge_adapter, merge_and_unload, save_adapter,
load_adapter, save_peft, load_peft, peft_config, trainable_parameters, adapter_state_dict, adapter_layers,
default_alpha, randlora_fork_alpha, method_class, AdapterLayer, LoraLayer, VeraLayer, RandLoraLayer,
SharedBases, AdapterError, METHODS, METHOD_CLASSES, DEFAULT_TARGETS, FUSED_QKV_LORA, BASES_ATTR.
"""
import logging
import math
import os
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

try:  # GPT-2's fused projections
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = ()

__all__ = ["apply_adapter", "merge_adapter", "unmerge_adapter", "merge_and_unload", "save_adapter", "load_adapter",
           "save_peft", "load_peft", "peft_config", "trainable_parameters", "adapter_state_dict", "adapter_layers",
           "default_alpha", "randlora_fork_alpha", "method_class", "AdapterLayer", "LoraLayer", "VeraLayer",
           "RandLoraLayer", "SharedBases", "AdapterError", "METHODS", "METHOD_CLASSES", "DEFAULT_TARGETS",
           "FUSED_QKV_LORA", "BASES_ATTR"]

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike
Names = Sequence[str] | str | None  # module-name suffixes: a list, or one comma-separated string
ADAPTER_FILE, CONFIG_FILE = "adapter.safetensors", "adapter.json"
PEFT_WEIGHTS, PEFT_CONFIG = "adapter_model.safetensors", "adapter_config.json"
BASES_ATTR = "peft_bases"  # submodule holding VeRA/RandLoRA's shared frozen projections

# Default targets per architecture: the attention query/value projections, as the LoRA paper adapts them.
DEFAULT_TARGETS = {
    "bert": ["query", "value"], "roberta": ["query", "value"], "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"], "camembert": ["query", "value"],
    "deberta": ["in_proj"], "deberta-v2": ["query_proj", "value_proj"],
    "gpt2": ["c_attn"], "bart": ["q_proj", "v_proj"], "mbart": ["q_proj", "v_proj"],
    "marian": ["q_proj", "v_proj"], "t5": ["q", "v"], "mt5": ["q", "v"],
    "llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"], "opt": ["q_proj", "v_proj"],
}
# GPT-2's c_attn packs q, k, v: LoRA adapts the q and v slices (loralib's MergedLinear(enable_lora=[T, F, T])).
FUSED_QKV_LORA = {"c_attn": (True, False, True)}


class AdapterError(ValueError):
    """An adapter argument or file is wrong: bad value, unreadable file, or a checkpoint that does not fit the model
    (targets, ranks, alpha, keys, shapes). One line naming the problem and the fix."""


# ----------------------------------------------------------------------------------------------------------
# The autograd functions and the per-call choice between them
#
# What each path keeps for backward is decided per call, in forward, from which inputs need a gradient. The
# frozen weight, the frozen bases and the parameters are kept as the tensors they are (no copies); the input is
# kept in the compute dtype; dropout is kept as a one-byte mask and x_drop is rebuilt in backward; the merged
# weight and any R-wide projection are recomputed instead of kept unless they are needed and smaller.


_FROZEN_WEIGHT = "peft_layers: the base weight of an adapted layer is frozen; do not set requires_grad on it"


def _dropout_mask(x, p):
    """Which elements dropout keeps, as bools: each with probability 1 - p (uniform draws compared with p, a third
    faster on CPU than bernoulli_ and than the RNG of nn.Dropout). Under torch.compile on CPU the draw is one
    opaque op: inductor's own generated RNG is several times slower there than ATen's."""
    if x.device.type == "cpu" and torch.compiler.is_compiling():
        mask = torch.empty(x.shape, dtype=torch.bool, device=x.device)
        _draw_dropout_mask(mask, p)
        return mask
    return torch.rand(x.shape, device=x.device) >= p


# Mutates a fresh mask instead of returning one, so the compiler never merges two layers' draws on the same input.
@torch.library.custom_op("peft_layers::draw_dropout_mask", mutates_args=("mask",), device_types="cpu")
def _draw_dropout_mask(mask: torch.Tensor, p: float) -> None:
    torch.ge(torch.rand(mask.shape, device=mask.device), p, out=mask)


def _masked(x2, mask2):
    """x with dropout's zeros from a kept boolean mask, not yet scaled: the 1 / (1 - p) of nn.Dropout is folded
    into a small factor or a matmul's alpha instead, which saves a pass over the (tokens x in) input."""
    return x2 if mask2 is None else x2 * mask2


def _cast(t, dtype):
    return t if t is None or t.dtype == dtype else t.to(dtype)


def _plus_product(w, a, b, alpha=1.0):
    """w + alpha * a @ b, laid out in memory as w is: a GPT-2 Conv1D weight arrives as a transposed view, and
    copying it into row-major order first is a slow strided pass over the whole (out x in) matrix."""
    if w.dim() == 2 and not w.is_contiguous() and w.t().is_contiguous():
        return torch.addmm(w.t(), b.t(), a.t(), alpha=alpha).t()
    return torch.addmm(w, a, b, alpha=alpha)


def _place_slices(blocks, slices, r):
    """A fused q/k/v layer's `up` (out x r * n_on) from the adapted slices' B blocks (n_on * d x r), stacked
    in order: each block on its slice's rows and its own r columns, zeros elsewhere (loralib's MergedLinear)."""
    n_on = sum(slices)
    d = blocks.shape[0] // n_on
    up = blocks.new_zeros(d * len(slices), r * n_on)
    j = 0
    for i, on in enumerate(slices):
        if on:
            up[i * d:(i + 1) * d, j * r:(j + 1) * r] = blocks[j * d:(j + 1) * d]
            j += 1
    return up


def _take_slices(full, slices, r):
    """The inverse of _place_slices for a gradient: the adapted slices' blocks of an (out x r * n_on) matrix."""
    d = full.shape[0] // len(slices)
    rows = [i for i, on in enumerate(slices) if on]
    return torch.cat([full[i * d:(i + 1) * d, j * r:(j + 1) * r] for j, i in enumerate(rows)], 0)


def _backward_start(ctx, grad_out, weight, mask):
    """What every adapted layer's backward starts with: refuse a base weight that was made trainable, and view
    grad_out and the dropout mask as (tokens x features). Returns g2, mask2, out_f, in_f."""
    if ctx.needs_input_grad[1]:
        raise RuntimeError(_FROZEN_WEIGHT)
    out_f, in_f = weight.shape
    return grad_out.reshape(-1, out_f), None if mask is None else mask.reshape(-1, in_f), out_f, in_f


def _grad_x(adapter_gx, mask2, g2, w):
    """grad_x from the adapter's share (before dropout's mask) and the frozen weight's: the share is masked in
    place and g W is accumulated into it, with no second (tokens x in) temporary."""
    return (adapter_gx if mask2 is None else adapter_gx.mul_(mask2)).addmm_(g2, w)


class _AdaptedLinear(torch.autograd.Function):
    """y = x W^T + b + scale * x_drop (up @ down)^T, with W frozen; x_drop = x when there is no dropout mask.

    dense=True: through delta_W = scale * up @ down (one matmul with W + delta_W in fp32 without dropout; in
    half precision or with dropout x_drop delta_W^T is a second matmul, so a small update is not rounded away
    against W). The backward forms the (out x in) gradient of delta_W once and projects it onto the factors; the
    merged weight for grad_x is rebuilt, not kept. dense=False: the factored form (x_drop down^T) up^T; the
    (tokens x R) projection h is kept only when keep_h (the caller's memory plan), else rebuilt from x.
    down and up arrive in fp32 and are cast here: a frozen factor (a view of the shared bases) is kept as is.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, down, up, scale, mask, p, dense, keep_h, slices=None):
        need_x, _, _, need_down, need_up = ctx.needs_input_grad[:5]
        dt = x.dtype
        out_f, in_f = weight.shape
        x2 = x.reshape(-1, in_f)
        mask2 = None if mask is None else mask.reshape(-1, in_f)
        w, dn = _cast(weight, dt), _cast(down, dt)
        # slices: `up` holds only the adapted q/k/v blocks of a fused layer; placed here, rebuilt in backward
        upc = _cast(up, dt) if slices is None else _cast(_place_slices(up, *slices), dt)
        xm2, s = _masked(x2, mask2), 1.0 / (1.0 - p)  # x_drop = s * xm2
        half = dt not in (torch.float32, torch.float64)
        h = None
        if dense:
            if mask is None and not half:
                y = F.linear(x2, _plus_product(w, upc, dn, alpha=scale), bias)
            else:
                y = F.linear(x2, w, bias).addmm_(xm2, torch.mm(upc, dn).t(), alpha=scale * s)
            keep_x = need_down or need_up
        else:
            h = torch.mm(xm2, dn.t())  # x_drop down^T / s
            y = F.linear(x2, w, bias).addmm_(h, upc.t(), alpha=scale * s)
            keep_h = keep_h and need_up
            keep_x = need_down or (need_up and not keep_h)
        keep_mask = mask is not None and (keep_x or need_x)
        # a factor is kept only if backward uses it (without grad_x, dense needs only the other factor)
        use_down = need_x or (need_up and (dense or not keep_h))
        use_up = need_x or need_down
        ctx.save_for_backward(x if keep_x else None, weight, (dn if need_down else down) if use_down else None,
                              (upc if need_up and slices is None else up) if use_up else None,
                              mask if keep_mask else None,
                              h if (not dense and keep_h) else None)
        ctx.scale, ctx.s, ctx.dense, ctx.half, ctx.slices = scale, s, dense, half, slices
        ctx.bias_grad = bias is not None and bias.requires_grad
        return y.view(*x.shape[:-1], out_f)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, down, up, mask, h = ctx.saved_tensors
        need_x, _, _, need_down, need_up = ctx.needs_input_grad[:5]
        g2, mask2, out_f, in_f = _backward_start(ctx, grad_out, weight, mask)
        scale, s, dt = ctx.scale, ctx.s, grad_out.dtype  # x_drop = s * xm2
        if up is not None and ctx.slices is not None:
            up = _place_slices(up, *ctx.slices)
        w, down, up = _cast(weight, dt), _cast(down, dt), _cast(up, dt)  # None where backward does not use it
        xm2 = None if x is None else _masked(x.reshape(-1, in_f), mask2)
        grad_x = grad_down = grad_up = grad_bias = None
        adapter_gx = None  # the adapter's share of grad_x, before dropout's mask
        if ctx.dense:
            if need_down or need_up:
                gw = torch.mm(g2.t(), xm2).mul_(scale * s)  # gradient of delta_W: (out x in), never per token
                grad_up = torch.mm(gw, down.t()) if need_up else None
                grad_down = torch.mm(up.t(), gw) if need_down else None
            if need_x:
                tokens, width = g2.shape[0], up.shape[1]
                if mask is None and not ctx.half:
                    grad_x = torch.mm(g2, _plus_product(w, up, down, alpha=scale))
                elif tokens * width * (in_f + out_f) < (tokens + width) * in_f * out_f:
                    adapter_gx = torch.mm(torch.mm(g2, up).mul_(scale * s), down)
                else:
                    adapter_gx = torch.mm(g2, torch.mm(up, down).mul_(scale * s))
        else:
            gh = torch.mm(g2, up).mul_(scale * s) if (need_down or need_x) else None  # (tokens x R)
            if need_up:
                h = h if h is not None else torch.mm(xm2, down.t())
                grad_up = torch.mm(g2.t(), h).mul_(scale * s)
            if need_down:
                grad_down = torch.mm(gh.t(), xm2)
            if need_x:
                if mask is None:
                    grad_x = torch.mm(g2, w).addmm_(gh, down)
                else:
                    adapter_gx = torch.mm(gh, down)
        if adapter_gx is not None:
            grad_x = _grad_x(adapter_gx, mask2, g2, w)
        if grad_x is not None:
            grad_x = grad_x.view(grad_out.shape[:-1] + (in_f,))
        if ctx.bias_grad:
            grad_bias = g2.sum(0)
        if grad_up is not None and ctx.slices is not None:
            grad_up = _take_slices(grad_up, *ctx.slices)
        return grad_x, None, grad_bias, grad_down, grad_up, None, None, None, None, None, None


class _VeraThin(torch.autograd.Function):
    """VeRA through (tokens x r) products: y = x W^T + b + lambda_b * ((x_drop A^T) * lambda_d) B^T, A, B frozen.

    Only the two scaling vectors train, so no factor-sized gradient is formed: both come from one (out x r)
    product M = g^T h1 of the output's gradient and the projection h1 = x_drop A^T. Kept for backward: h1 (or x,
    when r is wider than the input, and h1 is rebuilt), and the (tokens x out) product h3 only when keep_h3 (the
    caller's memory plan; lambda_b's gradient is then g * h3 summed, without M).
    merged=True (fp32 without dropout): y and grad_x go through W + delta_W, delta_W = (lambda_b * B)(lambda_d * A)
    formed in forward and again in backward (never kept), instead of through (tokens x r) products; h1 is then
    formed only to be kept. h1 is formed from the masked input without dropout's 1 / (1 - p), which is folded into
    the vectors' uses.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, lambda_d, lambda_b, mask, p, keep_h3, merged):
        need_x, _, _, _, _, need_d, need_b = ctx.needs_input_grad[:7]
        dt = x.dtype
        out_f, in_f = weight.shape
        x2 = x.reshape(-1, in_f)
        mask2 = None if mask is None else mask.reshape(-1, in_f)
        s = 1.0 / (1.0 - p)  # x_drop = s * xm2; s and lambda_d are folded into B (out x r), not applied per token
        merged = merged and mask is None  # the merged weight cannot carry a dropped input
        keep_h3 = keep_h3 and need_b and not merged
        keep_h1 = need_d or (need_b and not keep_h3)  # with h3 kept, only lambda_d's gradient reads h1
        keep_x = keep_h1 and A.shape[0] > in_f  # rebuilding h1 from x keeps less than h1 itself
        bs = None if keep_h3 else _cast(lambda_b[:, None] * B * (lambda_d * s), dt)  # (out x r)
        a = _cast(A, dt)
        h3 = None
        # h1 = x_drop A^T / s: the thin form's forward uses it; the merged one forms it only to keep it
        h1 = torch.mm(_masked(x2, mask2), a.t()) if not merged or (keep_h1 and not keep_x) else None
        if merged:
            y = F.linear(x2, _plus_product(_cast(weight, dt), bs, a), bias)
        else:
            y = F.linear(x2, _cast(weight, dt), bias)
            if keep_h3:
                h3 = torch.mm(h1, _cast(B * (lambda_d * s), dt).t())  # ((x_drop A^T) * lambda_d) B^T
                y.addcmul_(h3, _cast(lambda_b, dt))
            else:
                y.addmm_(h1, bs.t())
        keep_mask = mask is not None and (keep_x or need_x)
        ctx.save_for_backward(x if keep_x else None, weight, A, B, lambda_d, lambda_b,
                              mask if keep_mask else None, h1 if (keep_h1 and not keep_x) else None, h3)
        ctx.s, ctx.merged = s, merged
        ctx.bias_grad = bias is not None and bias.requires_grad
        return y.view(*x.shape[:-1], out_f)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, A, B, lambda_d, lambda_b, mask, h1, h3 = ctx.saved_tensors
        need_x, _, _, _, _, need_d, need_b = ctx.needs_input_grad[:7]
        g2, mask2, _, in_f = _backward_start(ctx, grad_out, weight, mask)
        s, dt = ctx.s, grad_out.dtype  # h1 is x_drop A^T / s, as kept
        A, B = _cast(A, dt), _cast(B, dt)
        if h1 is None and x is not None:
            h1 = torch.mm(_masked(x.reshape(-1, in_f), mask2), A.t())
        grad_x = grad_d = grad_b = grad_bias = None
        # u = g (lambda_b * B), the gradient at lambda_d * h1 (tokens x r): for the factored grad_x, and for
        # lambda_d's gradient where M is not formed (h3 kept, or lambda_b frozen)
        u = None
        if (need_x and not ctx.merged) or (need_d and h3 is not None):
            u = torch.mm(g2, _cast(lambda_b[:, None], dt) * B)
        if h3 is not None:
            grad_b = (g2 * h3).sum(0) if need_b else None
        elif need_b or (need_d and u is None):  # both from (g^T h1) * B, without forming h3
            mb = torch.mm(g2.t(), h1).mul_(B)
            grad_b = torch.mv(mb, _cast(lambda_d * s, dt)) if need_b else None
            if need_d:
                grad_d = torch.mv(mb.t(), _cast(lambda_b, dt)).mul_(s)
        if need_d and grad_d is None:
            grad_d = (u * h1).sum(0).mul_(s)
        if need_x:
            if ctx.merged:
                bs = _cast(lambda_b[:, None] * B * lambda_d, dt)
                grad_x = torch.mm(g2, _plus_product(_cast(weight, dt), bs, A))
            else:
                grad_x = _grad_x(torch.mm(u, A * _cast(lambda_d * s, dt)[:, None]), mask2, g2, _cast(weight, dt))
            grad_x = grad_x.view(grad_out.shape[:-1] + (in_f,))
        if ctx.bias_grad:
            grad_bias = g2.sum(0)
        return grad_x, None, grad_bias, None, None, grad_d, grad_b, None, None, None, None


class _VeraDense(torch.autograd.Function):
    """VeRA through delta_W = (lambda_b * B) @ (lambda_d * A), for many tokens: the dense path of _AdaptedLinear,
    with the scaled factors rebuilt in backward from the frozen bases and the two vectors instead of kept (at
    r = 1024 on a GPT-2 layer they outweigh every per-token tensor). Both vectors' gradients come from one
    (out x r) product, (g^T x_drop) A^T, not one projection each."""

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, lambda_d, lambda_b, mask, p):
        need_x, _, _, _, _, need_d, need_b = ctx.needs_input_grad[:7]
        dt = x.dtype
        out_f, in_f = weight.shape
        x2 = x.reshape(-1, in_f)
        mask2 = None if mask is None else mask.reshape(-1, in_f)
        up, down = _cast(lambda_b[:, None] * B, dt), _cast(lambda_d[:, None] * A, dt)
        half, s = dt not in (torch.float32, torch.float64), 1.0 / (1.0 - p)  # x_drop = s * masked x
        if mask is None and not half:
            y = F.linear(x2, _plus_product(_cast(weight, dt), up, down), bias)
        else:
            y = F.linear(x2, _cast(weight, dt), bias).addmm_(_masked(x2, mask2), torch.mm(up, down).t(), alpha=s)
        keep_x = need_d or need_b
        ctx.save_for_backward(x if keep_x else None, weight, A, B, lambda_d, lambda_b,
                              mask if mask is not None and (keep_x or need_x) else None)
        ctx.s, ctx.half = s, half
        ctx.bias_grad = bias is not None and bias.requires_grad
        return y.view(*x.shape[:-1], out_f)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, A, B, lambda_d, lambda_b, mask = ctx.saved_tensors
        need_x, _, _, _, _, need_d, need_b = ctx.needs_input_grad[:7]
        g2, mask2, _, in_f = _backward_start(ctx, grad_out, weight, mask)
        s, dt = ctx.s, grad_out.dtype  # x_drop = s * masked x
        A, B, ld, lb = _cast(A, dt), _cast(B, dt), _cast(lambda_d, dt), _cast(lambda_b, dt)
        grad_x = grad_d = grad_b = grad_bias = None
        if need_d or need_b:  # both from C = gw A^T, gw = g^T x_drop (out x in), never per token:
            # grad_b[o] = sum_j B[o, j] lambda_d[j] C[o, j], grad_d[j] = sum_o lambda_b[o] B[o, j] C[o, j]
            gw = torch.mm(g2.t(), _masked(x.reshape(-1, in_f), mask2)).mul_(s)
            cb = torch.mm(gw, A.t()).mul_(B)
            grad_b = torch.mv(cb, ld) if need_b else None
            grad_d = torch.mv(cb.t(), lb) if need_d else None
        if need_x:
            up, down = B * lb[:, None], A * ld[:, None]
            if mask is None and not ctx.half:
                grad_x = torch.mm(g2, _plus_product(_cast(weight, dt), up, down))
            else:
                grad_x = _grad_x(torch.mm(g2, torch.mm(up, down).mul_(s)), mask2, g2, _cast(weight, dt))
            grad_x = grad_x.view(grad_out.shape[:-1] + (in_f,))
        if ctx.bias_grad:
            grad_bias = g2.sum(0)
        return grad_x, None, grad_bias, None, None, grad_d, grad_b, None, None


class _ScaledBases(torch.autograd.Function):
    """RandLoRA's lambda[:, :, None] * A * gamma[None], keeping only its inputs (not the R x min(in, out) product)."""

    @staticmethod
    def forward(ctx, A, lam, gamma):
        ctx.save_for_backward(A, lam, gamma)
        return lam[:, :, None] * A * gamma[None]

    @staticmethod
    def backward(ctx, grad):
        A, lam, gamma = ctx.saved_tensors
        ga = grad * A  # (r, n, small)
        grad_lam = (ga * gamma[None]).sum(2) if ctx.needs_input_grad[1] else None
        grad_gamma = (ga * lam[:, :, None]).sum(0) if ctx.needs_input_grad[2] else None
        return None, grad_lam, grad_gamma


# ---- the plan: which path, and what to keep


class _Plan(NamedTuple):
    path: str  # "dense" | "factored" | VeRA's "thin" (factored) and "merged_thin" (merged weight, thin gradients)
    keep: bool  # factored: keep h; thin: keep h3
    cost: int  # multiply-adds beyond the frozen matmul
    kept: int  # bytes kept for backward per call, beyond the frozen tensors


def _candidates(tokens, in_f, out_f, width, grads, half, drop, diagonal):
    """Every exact way to compute one call, with its cost in multiply-adds and the bytes it keeps."""
    T, n_in, n_out, R = tokens, in_f, out_f, width
    need_x, need_down, need_up = grads
    e = 2 if half else 4
    x_b = T * n_in * e
    mask_b = T * n_in if drop else 0
    delta = R * n_in * n_out  # forming delta_W
    dense_fwd = delta + (T * n_in * n_out if (half or drop) else 0)
    if not (need_x or need_down or need_up):  # no backward: only the forward counts, nothing is kept
        factored = _Plan("thin" if diagonal else "factored", False, T * R * (n_in + n_out), 0)
        return [_Plan("dense", False, dense_fwd, 0), factored]
    out = []
    if need_down or need_up:
        if not need_x:
            gx = 0
        elif mask_b or half:  # x_drop delta_W^T apart from W (VeRA's dense path has no factored grad_x)
            gx = T * n_in * n_out + delta if diagonal else min(T * n_in * n_out + delta, T * R * (n_in + n_out))
        else:
            gx = delta
        # the (out x in) gradient, projected onto the factors (VeRA's two vectors: one projection serves both)
        projections = 1 if diagonal else need_up + need_down
        out.append(_Plan("dense", False, dense_fwd + T * n_in * n_out + delta * projections + gx, x_b + mask_b))
    fwd = T * R * (n_in + n_out)
    if diagonal:  # VeRA: h1 (tokens x r), or x when r is wider than the input; h3 (tokens x out) optional
        lam = need_down or need_up
        rebuild = T * R * n_in if (lam and R > n_in) else 0
        h1_b = (x_b + mask_b if R > n_in else T * R * e + (mask_b if need_x else 0)) if lam else 0
        u = T * n_out * R  # g (lambda_b * B), or M = g^T h1: one (tokens x out x r) contraction
        gx = (u + T * R * n_in) * need_x
        m = u if (need_up or (need_down and not need_x)) else 0
        out.append(_Plan("thin", False, fwd + rebuild + m + gx, h1_b + (mask_b if need_x and not lam else 0)))
        if need_up:  # h3 gives lambda_b's gradient; h1 (or x) is then kept only for lambda_d's
            h1_d = h1_b if need_down else (mask_b if need_x else 0)
            rebuild_d = rebuild if need_down else 0
            out.append(_Plan("thin", True, fwd + rebuild_d + u * (need_x or need_down) + T * R * n_in * need_x,
                             h1_d + T * n_out * e))
        if not (drop or half):  # y and grad_x through W + delta_W, the vectors' gradients through M
            keep_h1 = T * R * n_in if (lam and R <= n_in) else 0
            out.append(_Plan("merged_thin", False, delta + keep_h1 + rebuild + u * lam + delta * need_x, h1_b))
        return out
    bwd = T * n_out * R * ((need_down or need_x) + need_up) + T * R * n_in * (need_down + need_x)
    masked = mask_b if (need_down or need_x) else 0
    out.append(_Plan("factored", True, fwd + bwd, x_b * need_down + T * R * e * need_up + masked))
    if need_up:
        out.append(_Plan("factored", False, fwd + bwd + T * R * n_in, x_b + mask_b))
    return out


def _plan(tokens, in_f, out_f, width, grads, half, drop, diagonal=False):
    """The fastest exact path among those that keep no more for backward than both (a) the layer's input and
    dropout mask, what a trainable linear layer keeps, and (b) the plain two-matmul formulation (the factored
    form keeping h, VeRA's keeping h3), what autograd over `dropout(x) @ down.T @ up.T` keeps. When none does,
    the one that keeps least.
    """
    cands = _candidates(tokens, in_f, out_f, width, grads, half, drop, diagonal)
    plain = [c for c in cands if c.path != "dense"]
    plain = next((c for c in plain if c.keep), plain[0])
    bound = min(tokens * in_f * (2 if half else 4) + (tokens * in_f if drop else 0), plain.kept)
    fits = [c for c in cands if c.kept <= bound]
    if fits:
        return min(fits, key=lambda c: (c.cost, c.kept))
    return min(cands, key=lambda c: (c.kept, c.cost))


def _merged_path_is_cheaper(tokens, in_f, out_f, width, needs_grad, half, diagonal=False):
    """Whether a merged-weight path (dense, or VeRA's merged thin) costs fewer multiply-adds than the factored one
    for this call.

    width: R, the inner width of up @ down (not the rank). diagonal: only scaling vectors train (VeRA).
    """
    grads = (needs_grad, needs_grad, needs_grad)
    cands = _candidates(tokens, in_f, out_f, width, grads, half, False, diagonal)
    merged = min(c.cost for c in cands if c.path in ("dense", "merged_thin"))
    return merged < min(c.cost for c in cands if c.path not in ("dense", "merged_thin"))


# ----------------------------------------------------------------------------------------------------------
# The adapted layer


class AdapterLayer(nn.Module):
    """Replaces an nn.Linear or a GPT-2 Conv1D; owns the base weight/bias (same Parameter objects).

    The shared mechanism: path choice per call, merge/unmerge with its snapshot and version check, state-dict
    handling, train/eval. Each method is a subclass (LoraLayer, VeraLayer, RandLoraLayer) registered in
    METHOD_CLASSES; `AdapterLayer(base, "vera", ...)` builds the registered class for the method.
    """

    method = ""  # the registry key, set by each method class
    peft_type = ""  # HF PEFT's peft_type
    uses_bases = False  # needs the model's SharedBases (frozen random projections)
    base_names: tuple[str, ...] = ()  # names of those projections
    has_alpha = True  # False: the update has no alpha scale (VeRA)
    diagonal = False  # only scaling vectors train: the plan may pick the thin path
    fused_qkv = False  # can adapt chosen slices of GPT-2's fused c_attn
    rank_params: dict[str, int] = {}  # parameter name -> the dimension holding the rank (checkpoint checks)
    peft_repeats_bases = False  # PEFT's files repeat the shared bases under every layer
    peft_rank_pattern = False  # PEFT's rank_pattern/alpha_pattern apply (uniform overrides only)

    def __new__(cls, *args, **kwargs):
        if cls is AdapterLayer:  # built by method name: the registered class
            method = args[1] if len(args) > 1 else kwargs.get("method")
            cls = method_class(method)
        return super().__new__(cls)

    def __init__(self, base, method, rank, alpha, dropout, bases=None, fused_slices=None, generator=None):
        super().__init__()
        if method != self.method:
            raise AdapterError(f"{type(self).__name__} is the {self.method} adapter, not {method!r}")
        self.fan_in_fan_out = isinstance(base, Conv1D) if Conv1D else False
        self.weight, self.bias = base.weight, base.bias
        # nn.Linear stores (out, in); Conv1D stores (in, out)
        self.in_features, self.out_features = self.weight.shape if self.fan_in_fan_out else self.weight.shape[::-1]
        self.r, self.alpha = rank, alpha
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        self._merged_params = None  # snapshot of the adapter tensors folded into the weight, when merged
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.fused_slices = tuple(fused_slices) if fused_slices else None  # which of q, k, v a fused layer adapts
        object.__setattr__(self, "_bases", bases)  # shared, owned by the model: not a child of every layer
        self._init_adapter(rank, alpha, generator, dict(device=self.weight.device, dtype=torch.float32))

    # ---- what each method defines

    def _init_adapter(self, rank, alpha, generator, kw):
        """Set self.scale and create the method's trainable parameters."""
        raise NotImplementedError

    def factors(self, params=None):
        """(down, up) with delta_W = scale * up @ down, from the current parameters or a snapshot of them."""
        raise NotImplementedError

    def _factor_grads(self):
        """(down needs grad, up needs grad): which side of delta_W = up @ down carries the trainable tensors."""
        raise NotImplementedError

    @property
    def width(self):
        """R, the inner width of up @ down."""
        raise NotImplementedError

    @staticmethod
    def default_alpha(rank):
        raise NotImplementedError

    @classmethod
    def init_bases(cls, bases, rank, out_max, in_max, generator, device):
        """Register the method's frozen random projections on `bases` (a SharedBases), drawn from `generator`."""

    @classmethod
    def peft_config(cls, peft, alpha, dropout, seed, shared):
        """The peft.*Config for these settings."""
        raise NotImplementedError

    @classmethod
    def peft_export_config(cls, config, cfg, rank_pattern, alpha_pattern):
        """Add the method's own keys to PEFT's adapter_config.json (in place)."""
        raise NotImplementedError

    @classmethod
    def peft_alpha(cls, pc):
        """alpha from a PEFT adapter_config.json."""
        raise NotImplementedError

    def peft_tensors(self, name, prefix, sd, rank_pattern, alpha_pattern, alpha):
        """Put this layer's tensors into a PEFT state dict `sd` under PEFT's names."""
        for pn in self.adapter_names():
            sd[f"{prefix}{name}.{pn}"] = getattr(self, pn)

    def checkpoint_rank(self, pn, tensor):
        """The rank a checkpoint tensor for parameter `pn` was saved with; None where `pn` does not hold it."""
        dim = self.rank_params.get(pn)
        return None if dim is None else tensor.shape[dim]

    # ---- the shared mechanism

    @property
    def enable(self):
        """Former name of fused_slices (loralib's enable_lora): the mask of fused q/k/v slices adapted."""
        return self.fused_slices

    def adapter_names(self):
        if "_adapter_names" not in self.__dict__:  # fixed once the parameters exist; asked on every forward
            names = (n for n, _ in self.named_parameters(recurse=False) if n not in ("weight", "bias"))
            self._adapter_names = tuple(names)
        return self._adapter_names

    def _params(self, params):
        return params if params is not None else {n: getattr(self, n) for n in self.adapter_names()}

    def delta_weight(self, params=None):
        down, up = self.factors(params)
        return torch.mm(up, down) * self.scale  # (out x in)

    def _weight_out_in(self):
        return self.weight.t() if self.fan_in_fan_out else self.weight

    def merge(self):
        if self._merged_params is None:
            with torch.no_grad():
                # Keep the (small) adapter tensors that were merged, so unmerge removes exactly this delta even
                # if the parameters are changed while merged.
                snapshot = {n: getattr(self, n).detach().clone() for n in self.adapter_names()}
                self._weight_out_in().add_(self.delta_weight(snapshot).to(self.weight.dtype))
            self._merged_params = snapshot
            self._merged_versions = self._param_versions()

    def _apply(self, fn, recurse=True):
        # .to(device) / .cuda() / .half(): the merge snapshot goes where the weights go. A model from
        # from_pretrained is in eval mode, so apply_adapter merges it before a Trainer moves it to the GPU, and its
        # train() then unmerges there.
        super()._apply(fn, recurse)
        if self._merged_params is not None:
            self._merged_params = {n: fn(t) for n, t in self._merged_params.items()}
        return self

    def _param_versions(self):
        return tuple(getattr(self, n)._version for n in self.adapter_names())

    def unmerge(self):
        if self._merged_params is not None:
            with torch.no_grad():
                self._weight_out_in().sub_(self.delta_weight(self._merged_params).to(self.weight.dtype))
            self._merged_params = None

    @property
    def merged(self):
        return self._merged_params is not None

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # Checkpoints always hold the base weight, whether or not the adapter is merged right now.
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.merged:
            with torch.no_grad():
                base = self._weight_out_in() - self.delta_weight(self._merged_params).to(self.weight.dtype)
            destination[prefix + "weight"] = base.t() if self.fan_in_fan_out else base

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        remerge = self.merged
        self.unmerge()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if remerge:
            self.merge()

    def train(self, mode=True):
        super().train(mode)
        # eval() merges for zero-latency inference, train() unmerges. DeepSpeed ZeRO-3 shards weights
        # outside forward, so there the layer stays unmerged and runs the adapter path.
        if not hasattr(self.weight, "ds_id") and self.weight.numel() > 0:
            self.unmerge() if mode else self.merge()
        return self

    def forward(self, x):
        needs_grad = torch.is_grad_enabled() and (
            x.requires_grad or any(getattr(self, n).requires_grad for n in self.adapter_names()))
        if self.merged:
            if not needs_grad:
                if self._param_versions() != self._merged_versions:  # changed in place since merging
                    self.unmerge()
                    self.merge()
                return F.linear(x, self._weight_out_in(), self.bias)
            self.unmerge()  # a step that needs adapter gradients must not run on merged weights
        weight, bias = self._weight_out_in(), self.bias
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        x = _cast(x, dtype)
        if bias is not None and bias.dtype != dtype:
            bias = bias.to(dtype)
        p = self.dropout.p if (self.dropout is not None and self.training) else 0.0
        mask = _dropout_mask(x, p) if p > 0 else None
        grads = (needs_grad and x.requires_grad,) + (self._factor_grads() if needs_grad else (False, False))
        plan = _plan(x.numel() // self.in_features, self.in_features, self.out_features, self.width, grads,
                     dtype not in (torch.float32, torch.float64), mask is not None, diagonal=self.diagonal)
        return self._apply_plan(x, weight, bias, mask, p, plan)

    def _apply_plan(self, x, weight, bias, mask, p, plan):
        down, up = self.factors()
        return _AdaptedLinear.apply(x, weight, bias, down, up, self.scale, mask, p, plan.path == "dense", plan.keep)

    def extra_repr(self):
        return (f"{self.method}: in={self.in_features}, out={self.out_features}, r={self.r}, scale={self.scale:g}"
                + (f", slices={self.fused_slices}" if self.fused_slices else "") + (", merged" if self.merged else ""))


class LoraLayer(AdapterLayer):
    """LoRA: delta_W = (alpha / r) B A; on GPT-2's fused c_attn, one (A, B) pair per adapted q/k/v slice."""

    method, peft_type, fused_qkv, peft_rank_pattern = "lora", "LORA", True, True
    rank_params = {"lora_A": 0, "lora_B": 1}

    def _init_adapter(self, rank, alpha, generator, kw):
        self.scale = alpha / rank
        n_groups = len(self.fused_slices) if self.fused_slices else 1
        n_on = sum(self.fused_slices) if self.fused_slices else 1
        if self.out_features % n_groups:
            raise AdapterError(f"cannot split {self.out_features} outputs into {n_groups} fused projections")
        # A is drawn on the CPU from the seeded CPU generator, then moved: a model already on a GPU gets the same
        # A for a seed (a CPU generator cannot draw into a CUDA tensor)
        down = torch.empty(rank * n_on, self.in_features, dtype=kw["dtype"])
        nn.init.kaiming_uniform_(down, a=math.sqrt(5), generator=generator)
        self.lora_A = nn.Parameter(down.to(kw["device"]))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features // n_groups * n_on, rank, **kw))

    def factors(self, params=None):
        P = self._params(params)
        if not self.fused_slices:
            return P["lora_A"], P["lora_B"]
        return P["lora_A"], _place_slices(P["lora_B"], self.fused_slices, self.r)

    def _apply_plan(self, x, weight, bias, mask, p, plan):
        if not self.fused_slices:
            return super()._apply_plan(x, weight, bias, mask, p, plan)
        # the B blocks go in as they are, so backward keeps the parameter, not an assembled (out x R) copy
        return _AdaptedLinear.apply(x, weight, bias, self.lora_A, self.lora_B, self.scale, mask, p,
                                    plan.path == "dense", plan.keep, (self.fused_slices, self.r))

    def _factor_grads(self):
        return self.lora_A.requires_grad, self.lora_B.requires_grad

    @property
    def width(self):
        return self.r * (sum(self.fused_slices) if self.fused_slices else 1)

    def checkpoint_rank(self, pn, tensor):
        rank = super().checkpoint_rank(pn, tensor)
        if pn == "lora_A" and self.fused_slices:
            rank //= sum(self.fused_slices)
        return rank

    @staticmethod
    def default_alpha(rank):
        return rank

    @classmethod
    def peft_config(cls, peft, alpha, dropout, seed, shared):
        return peft.LoraConfig(lora_alpha=alpha, lora_dropout=dropout, **shared)

    def peft_tensors(self, name, prefix, sd, rank_pattern, alpha_pattern, alpha):
        down, up = self.factors()
        sd[f"{prefix}{name}.lora_A.weight"] = down
        sd[f"{prefix}{name}.lora_B.weight"] = up
        if self.fused_slices:  # fused q/v slices = one LoRA of rank r * slices with a block-diagonal B
            rank_pattern[name] = down.shape[0]
            alpha_pattern[name] = alpha * down.shape[0] / self.r

    @classmethod
    def peft_export_config(cls, config, cfg, rank_pattern, alpha_pattern):
        config.update(lora_alpha=cfg["alpha"], lora_dropout=cfg["dropout"], init_lora_weights=True,
                      rank_pattern=rank_pattern, alpha_pattern=alpha_pattern, use_rslora=False, use_dora=False)
        del config["init_weights"]

    @classmethod
    def peft_alpha(cls, pc):
        return pc.get("lora_alpha", 8)


class VeraLayer(AdapterLayer):
    """VeRA: delta_W = (lambda_b * B) (lambda_d * A), with A, B the model's shared frozen projections; no scale."""

    method, peft_type, uses_bases, has_alpha, diagonal = "vera", "VERA", True, False, True
    base_names = ("vera_A", "vera_B")
    rank_params = {"vera_lambda_d": 0}

    def _init_adapter(self, rank, alpha, generator, kw):
        self.scale = 1.0
        self.vera_lambda_b = nn.Parameter(torch.zeros(self.out_features, **kw))
        self.vera_lambda_d = nn.Parameter(torch.full((rank,), 0.1, **kw))

    def factors(self, params=None):
        P = self._params(params)
        A, B = self._bases.vera_A, self._bases.vera_B
        down = P["vera_lambda_d"][:, None] * A[:, : self.in_features]
        up = P["vera_lambda_b"][:, None] * B[: self.out_features]
        return down, up

    def _factor_grads(self):
        return self.vera_lambda_d.requires_grad, self.vera_lambda_b.requires_grad

    @property
    def width(self):
        return self.r

    def _apply_plan(self, x, weight, bias, mask, p, plan):
        # its own functions: the scaled factors are never kept
        A = self._bases.vera_A[:, : self.in_features]
        B = self._bases.vera_B[: self.out_features]
        if plan.path == "dense":
            return _VeraDense.apply(x, weight, bias, A, B, self.vera_lambda_d, self.vera_lambda_b, mask, p)
        return _VeraThin.apply(x, weight, bias, A, B, self.vera_lambda_d, self.vera_lambda_b, mask, p, plan.keep,
                               plan.path == "merged_thin")

    @staticmethod
    def default_alpha(rank):
        return 1

    @classmethod
    def init_bases(cls, bases, rank, out_max, in_max, generator, device):
        # Kaiming-uniform with fan_in, drawn in this order from one generator, as PEFT does.
        g = generator
        A = torch.empty(rank, in_max).uniform_(-math.sqrt(6 / in_max), math.sqrt(6 / in_max), generator=g)
        B = torch.empty(out_max, rank).uniform_(-math.sqrt(6 / rank), math.sqrt(6 / rank), generator=g)
        bases.register_buffer("vera_A", A.to(device), persistent=False)
        bases.register_buffer("vera_B", B.to(device), persistent=False)

    @classmethod
    def peft_config(cls, peft, alpha, dropout, seed, shared):
        return peft.VeraConfig(vera_dropout=dropout, projection_prng_key=seed, save_projection=True, **shared)

    @classmethod
    def peft_export_config(cls, config, cfg, rank_pattern, alpha_pattern):
        config.update(vera_dropout=cfg["dropout"], projection_prng_key=cfg["seed"], save_projection=True,
                      d_initial=0.1)

    @classmethod
    def peft_alpha(cls, pc):
        return 1.0


class RandLoraLayer(AdapterLayer):
    """RandLoRA: shared frozen bases scaled by trainable lambda (r x n) and gamma (n x min(in, out)), PEFT's layout."""

    method, peft_type, uses_bases = "randlora", "RANDLORA", True
    base_names = ("randlora_A", "randlora_B")
    rank_params = {"randlora_lambda": 0}
    peft_repeats_bases = True  # PEFT's RandLoRA files also repeat the bases under every layer

    def _init_adapter(self, rank, alpha, generator, kw):
        self.scale = alpha / rank
        self.n_bases = math.ceil(min(self.in_features, self.out_features) / rank)
        small = min(self.in_features, self.out_features)
        self.randlora_lambda = nn.Parameter(torch.zeros(rank, self.n_bases, **kw))
        # PEFT's (and RandLoRA's GLUE fork's) starting value: its reset sets 1 / max(gamma's shape) = 1 / min(in, out)
        init = 1 / max(self.n_bases, small)
        self.randlora_gamma = nn.Parameter(torch.full((self.n_bases, small), init, **kw))

    def factors(self, params=None):
        # PEFT's layout: A rows are indexed (k, b) -> k * n + b, B columns (b, k) -> b * r + k.
        P = self._params(params)
        small, large = sorted((self.in_features, self.out_features))
        A = self._bases.randlora_A[:, : self.n_bases, :small]
        B = self._bases.randlora_B[:large, : self.n_bases, :]
        a_flat = _ScaledBases.apply(A, P["randlora_lambda"], P["randlora_gamma"]).flatten(0, 1)
        b_flat = B.flatten(1)
        if small == self.in_features:
            return a_flat, b_flat  # delta_W = B A: (out=large x in=small)
        return b_flat.t(), a_flat.t()  # delta_W = (B A)^T

    def _factor_grads(self):
        trainable = self.randlora_lambda.requires_grad or self.randlora_gamma.requires_grad
        return (trainable, False) if self.in_features <= self.out_features else (False, trainable)

    @property
    def width(self):
        return self.r * self.n_bases

    @staticmethod
    def default_alpha(rank):
        return 640

    @classmethod
    def init_bases(cls, bases, rank, out_max, in_max, generator, device):
        # PEFT draws these in bfloat16, then normalises to unit std; we do the same so seeds match.
        g = generator
        large, small = max(out_max, in_max), min(out_max, in_max)
        n = math.ceil(small / rank)
        A = nn.init.kaiming_uniform_(torch.empty(rank, 1, small, dtype=torch.bfloat16), a=math.sqrt(5), generator=g)
        B = torch.cat([nn.init.kaiming_uniform_(torch.empty(large, 1, rank, dtype=torch.bfloat16),
                                                a=math.sqrt(5), generator=g) for _ in range(n)], dim=1)
        bases.register_buffer("randlora_A", (A / A.std()).float().to(device), persistent=False)
        bases.register_buffer("randlora_B", (B / B.std()).float().to(device), persistent=False)

    @classmethod
    def peft_config(cls, peft, alpha, dropout, seed, shared):
        return peft.RandLoraConfig(randlora_alpha=alpha, randlora_dropout=dropout, projection_prng_key=seed,
                                   save_projection=True, **shared)

    @classmethod
    def peft_export_config(cls, config, cfg, rank_pattern, alpha_pattern):
        config.update(randlora_alpha=cfg["alpha"], randlora_dropout=cfg["dropout"],
                      projection_prng_key=cfg["seed"], save_projection=True, sparse=False, very_sparse=False)

    @classmethod
    def peft_alpha(cls, pc):
        return pc.get("randlora_alpha", 640)


# The registry: adding a method is one AdapterLayer subclass and one line here.
METHOD_CLASSES: dict[str, type[AdapterLayer]] = {"lora": LoraLayer, "vera": VeraLayer, "randlora": RandLoraLayer}
METHODS = tuple(METHOD_CLASSES)
_PEFT_TYPE = {m: c.peft_type for m, c in METHOD_CLASSES.items()}


def method_class(method: str) -> type[AdapterLayer]:
    """The AdapterLayer subclass registered for `method`; AdapterError for an unknown one."""
    cls = METHOD_CLASSES.get(method) if isinstance(method, str) else None
    if cls is None:
        raise AdapterError(f"unknown adapter method {method!r}; choose one of {', '.join(METHODS)}")
    return cls


class SharedBases(nn.Module):
    """VeRA's / RandLoRA's frozen random projections, one pair per model, seeded (PEFT's projection_prng_key)."""

    def __init__(self, method, rank, layer_shapes, seed, device=None):
        super().__init__()
        out_max = max(o for o, _ in layer_shapes)
        in_max = max(i for _, i in layer_shapes)
        g = torch.Generator(device="cpu").manual_seed(seed)
        method_class(method).init_bases(self, rank, out_max, in_max, g, device)




# ----------------------------------------------------------------------------------------------------------
# Injection


def _matches(name, targets):
    return any(name == t or name.endswith("." + t) for t in targets)


def _target_layers(model, targets, required=True):
    """The (name, module) pairs of the layers `targets` name: nn.Linear, GPT-2's Conv1D, or an adapter layer in
    their place. None found is an AdapterError naming the model's linear layers, unless not `required`."""
    found = [(n, m) for n, m in model.named_modules()
             if _matches(n, targets) and isinstance(m, (nn.Linear, Conv1D, AdapterLayer))]
    if not found and required:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))})
        raise AdapterError(f"no linear layer matches target_modules {targets}; this model's linear layers are "
                           f"named {linear}")
    return found


def adapter_layers(model: nn.Module) -> list[tuple[str, AdapterLayer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, AdapterLayer)]


def _set_child(model, name, new):
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def default_alpha(method: str, rank: int) -> float:
    """alpha when none is given: LoRA's scale 1 (alpha = rank), PEFT's RandLoRA default 640; VeRA has no scale."""
    return method_class(method).default_alpha(rank)


def randlora_fork_alpha(model: nn.Module, rank: int, alpha: float, targets: Names) -> tuple[float, int]:
    """The alpha that gives the scale of RandLoRA's PEFT fork (its GLUE results), alpha / r / sqrt(n), under ours
    and PEFT >= 0.16's alpha / r: (alpha / sqrt(n), n), n = ceil(min(in, out) / r) bases, which must be one number
    in every targeted layer (nn.Linear or GPT-2's Conv1D). (Its NLG code counts n its own way: gpt2_ft.py.)"""
    widths = {min(m.weight.shape) for _, m in _target_layers(model, list(_names(targets, "target_modules")))}
    n_bases = {math.ceil(w / rank) for w in widths}
    if len(n_bases) != 1:
        raise AdapterError(f"RandLoRA's scale alpha/r/sqrt(n) needs one number of bases n in every adapted layer, "
                           f"found {sorted(n_bases)}; pass --randlora_scaling peft or --target_modules of one width")
    n = n_bases.pop()
    return alpha / math.sqrt(n), n


def _check_method(method):
    return method_class(method.lower() if isinstance(method, str) else method).method


def _check_rank(rank):
    if isinstance(rank, bool) or not isinstance(rank, (int, float)) or rank != rank or rank <= 0 \
            or (isinstance(rank, float) and not rank.is_integer()):
        raise AdapterError(f"adapter rank must be a positive integer, got {rank!r}")
    return int(rank)


def _check_alpha(alpha):
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise AdapterError(f"adapter alpha must be a positive finite number (scale = alpha / rank), got {alpha!r}")
    return float(alpha)


def _check_dropout(dropout):
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise AdapterError(f"adapter dropout must be a probability in [0, 1), got {dropout!r}")
    return float(dropout)


def _names(names, what):
    """A list of module names from a list, or a comma-separated string (a bare string is not split into letters)."""
    if names is None:
        return None
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    if not all(isinstance(n, str) and n for n in names):
        raise AdapterError(f"{what} must be module names, got {names!r}")
    return list(names)


def apply_adapter(model: nn.Module, method: str, rank: int, alpha: float | None = None,
                  target_modules: Names = None, dropout: float = 0.0, seed: int | None = None,
                  modules_to_save: Names = None, fused_qkv_lora: bool = True) -> nn.Module:
    """Adapt `model` in place and freeze everything but the adapter and `modules_to_save`; returns the model.

    target_modules: module-name suffixes (default: the architecture's query/value projections).
    seed: VeRA's / RandLoRA's projection key (None: 0, PEFT's projection_prng_key default) and the seed of LoRA's
      lora_A draw (None: drawn from torch's global RNG, so torch.manual_seed decides it, as in loralib and PEFT).
      The seed used is stored in the adapter's config.
    fused_qkv_lora: with LoRA, adapt only the q and v slices of GPT-2's fused c_attn (as loralib's MergedLinear).
    """
    method, rank, alpha_given = _check_method(method), _check_rank(rank), alpha is not None
    alpha = default_alpha(method, rank) if alpha is None else _check_alpha(alpha)
    dropout = _check_dropout(dropout)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise AdapterError(f"adapter seed must be an integer, got {seed!r}")
    target_modules = _names(target_modules, "target_modules")
    modules_to_save = _names(modules_to_save, "modules_to_save")
    if adapter_layers(model):
        raise AdapterError("model already has an adapter; load a fresh base model to apply another")
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    targets = list(target_modules) if target_modules else DEFAULT_TARGETS.get(model_type)
    if not targets:
        raise AdapterError(f"no default target modules for model type {model_type!r}; pass target_modules")
    found = _target_layers(model, targets)
    shapes = [(m.weight.shape[::-1] if (Conv1D and isinstance(m, Conv1D)) else m.weight.shape) for _, m in found]
    layer_class = method_class(method)
    if seed is None:
        seed = 0 if layer_class.uses_bases else int(torch.randint(0, 2**62, (1,)).item())
    bases = None
    if layer_class.uses_bases:
        bases = SharedBases(method, rank, shapes, seed, device=found[0][1].weight.device)
        model.add_module(BASES_ATTR, bases)
    for p in model.parameters():
        p.requires_grad_(False)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    layer_info = {}
    for name, module in found:
        short = name.rsplit(".", 1)[-1]
        slices = FUSED_QKV_LORA.get(short) if (layer_class.fused_qkv and fused_qkv_lora and Conv1D
                                               and isinstance(module, Conv1D)) else None
        layer = layer_class(module, method, rank, float(alpha), dropout, bases, slices, generator)
        layer.train(model.training)
        _set_child(model, name, layer)
        layer_info[name] = {"in": layer.in_features, "out": layer.out_features,
                            "fan_in_fan_out": layer.fan_in_fan_out, "enable": list(slices) if slices else None}
    saved_modules = []
    for name, module in model.named_modules():
        if modules_to_save and _matches(name, modules_to_save) and not isinstance(module, AdapterLayer):
            module.requires_grad_(True)
            saved_modules.append(name)
    if modules_to_save and not saved_modules:
        raise AdapterError(f"no module matches modules_to_save {list(modules_to_save)}")
    model.peft_layers_config = {
        "method": method, "rank": rank, "alpha": float(alpha), "alpha_given": alpha_given, "dropout": dropout,
        "seed": seed,
        "target_modules": targets, "modules_to_save": list(modules_to_save or []), "fused_qkv_lora": fused_qkv_lora,
        "layers": layer_info, "model_type": model_type,
    }
    return model


def merge_adapter(model: nn.Module) -> nn.Module:
    for _, layer in adapter_layers(model):
        layer.merge()
    return model


def unmerge_adapter(model: nn.Module) -> nn.Module:
    for _, layer in adapter_layers(model):
        layer.unmerge()
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold the adapter into the weights and put plain nn.Linear / Conv1D layers back: a plain HF model."""
    for name, layer in adapter_layers(model):
        layer.merge()
        if layer.fan_in_fan_out:
            plain = Conv1D(layer.out_features, layer.in_features)
        else:
            plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                              device="meta")
        plain.weight, plain.bias = layer.weight, layer.bias
        _set_child(model, name, plain)
    if hasattr(model, BASES_ATTR):
        delattr(model, BASES_ATTR)
    model.__dict__.pop("peft_layers_config", None)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------------------------
# Saving and loading


def _config_of(model):
    cfg = getattr(model, "peft_layers_config", None)
    if cfg is None:
        raise AdapterError("model has no adapter; call apply_adapter first")
    return cfg


def _saved_module_tensors(model, cfg):
    out = {}
    for name in cfg["modules_to_save"]:
        for mod_name, module in model.named_modules():
            if _matches(mod_name, [name]):
                for pn, p in module.named_parameters():
                    out[f"{mod_name}.{pn}"] = p
    return out


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter tensors (+ modules_to_save and the shared projections), keyed by their names in the model."""
    cfg = _config_of(model)
    sd = {}
    for name, layer in adapter_layers(model):
        for pn in layer.adapter_names():
            sd[f"{name}.{pn}"] = getattr(layer, pn)
    sd.update(_saved_module_tensors(model, cfg))
    bases = getattr(model, BASES_ATTR, None)
    if bases is not None:
        for bn, b in bases.named_buffers():
            sd[f"{BASES_ATTR}.{bn}"] = b
    return sd


# ----------------------------------------------------------------------------------------------------------
# File formats (ours, HF PEFT, loralib) live in adapter_formats; their public functions are part of this API.
from adapter_formats import load_adapter, load_peft, peft_config, save_adapter, save_peft  # noqa: E402
