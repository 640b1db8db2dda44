"""LoRA, VeRA and RandLoRA for Hugging Face models, in one small module.

Every method writes its weight update the same way, delta_W = scale * up @ down, with `up` (out x R) and
`down` (R x in) built on the fly from the method's few trainable tensors:

    LoRA      down = lora_A                         up = lora_B                          scale = alpha / r
    VeRA      down = lambda_d[:, None] * A[:, :in]  up = lambda_b[:, None] * B[:out]     scale = 1
    RandLoRA  down, up = shared frozen bases scaled by lambda (r x n) and gamma (n x min(in, out)),
              laid out exactly as HF PEFT does                                           scale = alpha / r

One autograd function (`_AdaptedLinear`) then computes y = x W^T + b + x delta_W^T. Per call it picks the
cheaper exact way: the factored form (x down^T) up^T, or, when a batch holds more tokens than the adapter is
wide, one matmul with W + delta_W. Neither path keeps per-token activations of the R-wide projection, and the
frozen bases never get gradient state. The adapted layer keeps the base layer's own `weight`/`bias`
parameters, so the model's state-dict keys do not change and merging is a plain in-place add.

Public API: apply_adapter, merge_adapter, unmerge_adapter, merge_and_unload, save_adapter, load_adapter,
save_peft, load_peft, trainable_parameters, adapter_state_dict.
"""
import json
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

try:  # GPT-2's fused projections
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = ()

METHODS = ("lora", "vera", "randlora")
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
    """An adapter does not fit the model (wrong targets, ranks, keys or shapes)."""


# ----------------------------------------------------------------------------------------------------------
# The one autograd function


class _AdaptedLinear(torch.autograd.Function):
    """y = x W^T + b + scale * x (up @ down)^T, with W frozen.

    merged=True: one matmul with W + delta_W (in half precision the update is added as a second matmul, so a
    small delta_W is not rounded away against W). merged=False: the factored form, with the adapter fed
    `x_drop` (dropout applied) while the frozen path sees `x`.
    Saved for backward: x (shared with the neighbouring q/k/v layers), the small factors, and either the merged
    weight or, for LoRA, the (tokens x r) projection that lora_B's gradient needs. Nothing R-wide per token is
    kept, and W gets no gradient.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, down, up, scale, x_drop, merged):
        out_f, in_f = weight.shape
        x2 = x.reshape(-1, in_f)
        if merged:
            delta = torch.mm(up, down).mul_(scale)
            w_eff = None
            if x.dtype in (torch.float32, torch.float64):
                w_eff = weight + delta
                y = F.linear(x2, w_eff, bias)
            else:
                y = F.linear(x2, weight, bias).addmm_(x2, delta.t())
            # The merged weight (out x in) is smaller than anything per token here: keep it for grad_x.
            keep = w_eff if ctx.needs_input_grad[0] else None
            ctx.save_for_backward(x, weight, down, up, None, keep)
        else:
            xa2 = x2 if x_drop is None else x_drop.reshape(-1, in_f)
            h = torch.mm(xa2, down.t())
            y = F.linear(x2, weight, bias).addmm_(h, up.t(), alpha=scale)
            keep = h if up.requires_grad else None
            ctx.save_for_backward(x if x_drop is None else None, weight, down, up, x_drop, keep)
        ctx.scale, ctx.merged, ctx.has_drop = scale, merged, x_drop is not None
        ctx.bias_grad = bias is not None and bias.requires_grad
        return y.view(*x.shape[:-1], out_f)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, down, up, x_drop, kept = ctx.saved_tensors  # kept: merged weight, or LoRA's x @ down^T
        need_x, need_w, _, need_down, need_up = ctx.needs_input_grad[:5]
        need_xdrop = ctx.needs_input_grad[6]
        if need_w:
            raise RuntimeError("peft_layers: the base weight of an adapted layer is frozen; do not set requires_grad on it")
        out_f, in_f = weight.shape
        scale = ctx.scale
        g2 = grad_out.reshape(-1, out_f)
        grad_x = grad_down = grad_up = grad_xdrop = grad_bias = None
        if ctx.merged:
            x2 = x.reshape(-1, in_f)
            if need_down or need_up:
                gw = torch.mm(g2.t(), x2)  # gradient of the merged weight: (out x in), never per token
                if need_up:
                    grad_up = torch.mm(gw, down.t()).mul_(scale)
                if need_down:
                    grad_down = torch.mm(up.t(), gw).mul_(scale)
            if need_x:
                w_eff = kept if kept is not None else torch.addmm(weight, up, down, alpha=scale)
                grad_x = torch.mm(g2, w_eff).view(grad_out.shape[:-1] + (in_f,))
        else:
            xa2 = (x if x_drop is None else x_drop).reshape(-1, in_f)
            gh = torch.mm(g2, up).mul_(scale)  # (tokens x R): the adapter's share of the gradient
            if need_up:
                grad_up = torch.mm(g2.t(), kept).mul_(scale)
            if need_down:
                grad_down = torch.mm(gh.t(), xa2)
            if need_x or need_xdrop:
                shape = grad_out.shape[:-1] + (in_f,)
                if ctx.has_drop:
                    grad_x = torch.mm(g2, weight).view(shape) if need_x else None
                    grad_xdrop = torch.mm(gh, down).view(shape) if need_xdrop else None
                else:
                    grad_x = torch.mm(g2, weight).addmm_(gh, down).view(shape)
        if ctx.bias_grad:
            grad_bias = g2.sum(0)
        return grad_x, None, grad_bias, grad_down, grad_up, None, grad_xdrop, None


def _merged_path_is_cheaper(tokens, in_f, out_f, rank, needs_grad, half, diagonal=False):
    """Compare multiply-adds of the two exact paths (beyond the frozen matmul both pay).

    diagonal: only scaling vectors train (VeRA), so the factored backward needs no factor-sized gradients.
    """
    if needs_grad:
        factored = (2 if diagonal else 3) * tokens * rank * (in_f + out_f)
        merged = tokens * in_f * out_f + 3 * rank * in_f * out_f
    else:
        factored = tokens * rank * (in_f + out_f)
        merged = rank * in_f * out_f
    if half:
        merged += tokens * in_f * out_f
    return merged < factored


# ----------------------------------------------------------------------------------------------------------
# The adapted layer


class AdapterLayer(nn.Module):
    """Replaces an nn.Linear or a GPT-2 Conv1D; owns the base weight/bias (same Parameter objects)."""

    def __init__(self, base, method, rank, alpha, dropout, bases=None, enable=None, generator=None):
        super().__init__()
        self.fan_in_fan_out = isinstance(base, Conv1D) if Conv1D else False
        self.weight, self.bias = base.weight, base.bias
        # nn.Linear stores (out, in); Conv1D stores (in, out)
        self.in_features, self.out_features = self.weight.shape if self.fan_in_fan_out else self.weight.shape[::-1]
        self.method, self.r, self.alpha = method, rank, alpha
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        self._merged_params = None  # snapshot of the adapter tensors folded into the weight, when merged
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.enable = tuple(enable) if enable else None
        object.__setattr__(self, "_bases", bases)  # shared, owned by the model: not a child of every layer
        kw = dict(device=self.weight.device, dtype=torch.float32)
        if method == "lora":
            self.scale = alpha / rank
            n_groups = len(self.enable) if self.enable else 1
            n_on = sum(self.enable) if self.enable else 1
            if self.out_features % n_groups:
                raise AdapterError(f"cannot split {self.out_features} outputs into {n_groups} fused projections")
            self.lora_A = nn.Parameter(torch.empty(rank * n_on, self.in_features, **kw))
            self.lora_B = nn.Parameter(torch.zeros(self.out_features // n_groups * n_on, rank, **kw))
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5), generator=generator)
        elif method == "vera":
            self.scale = 1.0
            self.vera_lambda_b = nn.Parameter(torch.zeros(self.out_features, **kw))
            self.vera_lambda_d = nn.Parameter(torch.full((rank,), 0.1, **kw))
        elif method == "randlora":
            self.scale = alpha / rank
            self.n_bases = math.ceil(min(self.in_features, self.out_features) / rank)
            small = min(self.in_features, self.out_features)
            self.randlora_lambda = nn.Parameter(torch.zeros(rank, self.n_bases, **kw))
            self.randlora_gamma = nn.Parameter(torch.full((self.n_bases, small), 1 / max(self.in_features, self.out_features), **kw))
        else:
            raise AdapterError(f"unknown adapter method {method!r}; choose one of {', '.join(METHODS)}")

    def adapter_names(self):
        if "_adapter_names" not in self.__dict__:  # fixed once the parameters exist; asked on every forward
            self._adapter_names = tuple(n for n, _ in self.named_parameters(recurse=False) if n not in ("weight", "bias"))
        return self._adapter_names

    def factors(self, params=None):
        """(down, up) with delta_W = scale * up @ down, from the current parameters or a snapshot of them."""
        P = params if params is not None else {n: getattr(self, n) for n in self.adapter_names()}
        if self.method == "lora":
            if not self.enable:
                return P["lora_A"], P["lora_B"]
            # Place each enabled slice's B block on its rows of the fused output, block-diagonally.
            d, r = self.out_features // len(self.enable), self.r
            blocks = torch.block_diag(*P["lora_B"].split(d, dim=0))
            rows = torch.cat([torch.arange(i * d, (i + 1) * d) for i, on in enumerate(self.enable) if on])
            up = blocks.new_zeros(self.out_features, r * sum(self.enable)).index_copy(0, rows.to(blocks.device), blocks)
            return P["lora_A"], up
        if self.method == "vera":
            A, B = self._bases.vera_A, self._bases.vera_B
            down = P["vera_lambda_d"][:, None] * A[:, : self.in_features]
            up = P["vera_lambda_b"][:, None] * B[: self.out_features]
            return down, up
        # RandLoRA, in PEFT's layout: A rows are indexed (k, b) -> k * n + b, B columns (b, k) -> b * r + k.
        small, large = sorted((self.in_features, self.out_features))
        A = self._bases.randlora_A[:, : self.n_bases, :small]
        B = self._bases.randlora_B[:large, : self.n_bases, :]
        a_flat = (P["randlora_lambda"][:, :, None] * A * P["randlora_gamma"][None]).flatten(0, 1)
        b_flat = B.flatten(1)
        if small == self.in_features:
            return a_flat, b_flat  # delta_W = B A: (out=large x in=small)
        return b_flat.t(), a_flat.t()  # delta_W = (B A)^T

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
        x, weight = (t if t.dtype == dtype else t.to(dtype) for t in (x, weight))
        if bias is not None and bias.dtype != dtype:
            bias = bias.to(dtype)
        x_drop = self.dropout(x) if (self.dropout is not None and self.training) else None
        merged = x_drop is None and _merged_path_is_cheaper(
            x.numel() // self.in_features, self.in_features, self.out_features, self.width, needs_grad,
            dtype not in (torch.float32, torch.float64), diagonal=self.method == "vera")
        if self.method == "vera" and not merged:
            # Few tokens: VeRA trains only two scaling vectors, so plain autograd over the thin (tokens x r)
            # products is cheapest here (PEFT's formulation); their activations are small at this size.
            A = self._bases.vera_A[:, : self.in_features].to(dtype)
            B = self._bases.vera_B[: self.out_features].to(dtype)
            h = F.linear(x if x_drop is None else x_drop, A) * self.vera_lambda_d.to(dtype)
            return F.linear(x, weight, bias) + F.linear(h, B) * self.vera_lambda_b.to(dtype)
        down, up = (t if t.dtype == dtype else t.to(dtype) for t in self.factors())
        return _AdaptedLinear.apply(x, weight, bias, down, up, self.scale, x_drop, merged)

    @property
    def width(self):
        """R, the inner width of up @ down."""
        if self.method == "lora":
            return self.r * (sum(self.enable) if self.enable else 1)
        return self.r if self.method == "vera" else self.r * self.n_bases

    def extra_repr(self):
        return (f"{self.method}: in={self.in_features}, out={self.out_features}, r={self.r}, scale={self.scale:g}"
                + (f", slices={self.enable}" if self.enable else "") + (", merged" if self.merged else ""))


class SharedBases(nn.Module):
    """VeRA's / RandLoRA's frozen random projections, one pair per model, seeded (PEFT's projection_prng_key)."""

    def __init__(self, method, rank, layer_shapes, seed, device=None):
        super().__init__()
        out_max = max(o for o, _ in layer_shapes)
        in_max = max(i for _, i in layer_shapes)
        g = torch.Generator(device="cpu").manual_seed(seed)
        if method == "vera":
            # Kaiming-uniform with fan_in, drawn in this order from one generator, as PEFT does.
            A = torch.empty(rank, in_max).uniform_(-math.sqrt(6 / in_max), math.sqrt(6 / in_max), generator=g)
            B = torch.empty(out_max, rank).uniform_(-math.sqrt(6 / rank), math.sqrt(6 / rank), generator=g)
            self.register_buffer("vera_A", A.to(device), persistent=False)
            self.register_buffer("vera_B", B.to(device), persistent=False)
        else:
            # PEFT draws these in bfloat16, then normalises to unit std; we do the same so seeds match.
            large, small = max(out_max, in_max), min(out_max, in_max)
            n = math.ceil(small / rank)
            A = nn.init.kaiming_uniform_(torch.empty(rank, 1, small, dtype=torch.bfloat16), a=math.sqrt(5), generator=g)
            B = torch.cat([nn.init.kaiming_uniform_(torch.empty(large, 1, rank, dtype=torch.bfloat16),
                                                    a=math.sqrt(5), generator=g) for _ in range(n)], dim=1)
            self.register_buffer("randlora_A", (A / A.std()).float().to(device), persistent=False)
            self.register_buffer("randlora_B", (B / B.std()).float().to(device), persistent=False)


# ----------------------------------------------------------------------------------------------------------
# Injection


def _matches(name, targets):
    return any(name == t or name.endswith("." + t) for t in targets)


def adapter_layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, AdapterLayer)]


def _set_child(model, name, new):
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def default_alpha(method, rank):
    """alpha when none is given: LoRA's scale 1 (alpha = rank), PEFT's RandLoRA default 640; VeRA has no scale."""
    return {"lora": rank, "randlora": 640, "vera": 1}[method]


def apply_adapter(model, method, rank, alpha=None, target_modules=None, dropout=0.0, seed=0, modules_to_save=None,
                  fused_qkv_lora=True):
    """Adapt `model` in place and freeze everything but the adapter and `modules_to_save`; returns the model.

    target_modules: module-name suffixes (default: the architecture's query/value projections).
    fused_qkv_lora: with LoRA, adapt only the q and v slices of GPT-2's fused c_attn (as loralib's MergedLinear).
    """
    method = method.lower()
    if method not in METHODS:
        raise AdapterError(f"unknown adapter method {method!r}; choose one of {', '.join(METHODS)}")
    if rank is None or int(rank) <= 0:
        raise AdapterError(f"adapter rank must be a positive integer, got {rank!r}")
    rank = int(rank)
    if adapter_layers(model):
        raise AdapterError("model already has an adapter; load a fresh base model to apply another")
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    targets = list(target_modules) if target_modules else DEFAULT_TARGETS.get(model_type)
    if not targets:
        raise AdapterError(f"no default target modules for model type {model_type!r}; pass target_modules")
    found = [(n, m) for n, m in model.named_modules()
             if _matches(n, targets) and (isinstance(m, nn.Linear) or (Conv1D and isinstance(m, Conv1D)))]
    if not found:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise AdapterError(f"no linear layer matches target_modules {targets}; this model's linear layers are "
                           f"named {linear}")
    if alpha is None:
        alpha = default_alpha(method, rank)
    shapes = [(m.weight.shape[::-1] if (Conv1D and isinstance(m, Conv1D)) else m.weight.shape) for _, m in found]
    bases = None
    if method in ("vera", "randlora"):
        bases = SharedBases(method, rank, shapes, seed, device=found[0][1].weight.device)
        model.add_module(BASES_ATTR, bases)
    for p in model.parameters():
        p.requires_grad_(False)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    layer_info = {}
    for name, module in found:
        short = name.rsplit(".", 1)[-1]
        enable = FUSED_QKV_LORA.get(short) if (method == "lora" and fused_qkv_lora and Conv1D
                                               and isinstance(module, Conv1D)) else None
        layer = AdapterLayer(module, method, rank, float(alpha), dropout, bases, enable, generator)
        layer.train(model.training)
        _set_child(model, name, layer)
        layer_info[name] = {"in": layer.in_features, "out": layer.out_features,
                            "fan_in_fan_out": layer.fan_in_fan_out, "enable": list(enable) if enable else None}
    saved_modules = []
    for name, module in model.named_modules():
        if modules_to_save and _matches(name, modules_to_save) and not isinstance(module, AdapterLayer):
            module.requires_grad_(True)
            saved_modules.append(name)
    if modules_to_save and not saved_modules:
        raise AdapterError(f"no module matches modules_to_save {list(modules_to_save)}")
    model.peft_layers_config = {
        "method": method, "rank": rank, "alpha": float(alpha), "dropout": dropout, "seed": seed,
        "target_modules": targets, "modules_to_save": list(modules_to_save or []), "fused_qkv_lora": fused_qkv_lora,
        "layers": layer_info, "model_type": model_type,
    }
    return model


def merge_adapter(model):
    for _, layer in adapter_layers(model):
        layer.merge()
    return model


def unmerge_adapter(model):
    for _, layer in adapter_layers(model):
        layer.unmerge()
    return model


def merge_and_unload(model):
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


def trainable_parameters(model):
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


def adapter_state_dict(model):
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


def _to_saveable(sd):
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}


def save_adapter(model, path):
    """Write `path/adapter.safetensors` (adapter + modules_to_save + projections) and `path/adapter.json`."""
    cfg = _config_of(model)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    sd = _to_saveable(adapter_state_dict(model))
    meta = dict(cfg, format="peft_layers/1", shapes={k: list(v.shape) for k, v in sd.items()})
    _atomic(path / ADAPTER_FILE, lambda tmp: save_file(sd, tmp))
    _atomic(path / CONFIG_FILE, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2) + "\n"))
    return path


def _atomic(path, write):
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _strip_prefixes(sd, model):
    """Map checkpoint keys onto model names: drop DDP's `module.` and PEFT's `base_model.model.`."""
    names = set(dict(model.named_parameters())) | set(dict(model.named_buffers()))
    out = {}
    for k, v in sd.items():
        key = k
        for prefix in ("module.", "base_model.model.", "base_model."):
            if key not in names and key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = v
    return out


def _load_tensors(model, sd, source):
    """Copy every tensor of `sd` into the model; any key, rank or shape that does not fit raises AdapterError."""
    layers = dict(adapter_layers(model))
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    problems = []
    for key, tensor in sd.items():
        layer_name, _, pn = key.rpartition(".")
        target = params.get(key, buffers.get(key))
        if target is None:
            problems.append(f"checkpoint tensor {key} has no place in the model")
            continue
        if tuple(target.shape) != tuple(tensor.shape):
            layer = layers.get(layer_name)
            if layer is not None and pn in ("lora_A", "lora_B", "vera_lambda_d", "randlora_lambda"):
                ck_rank = tensor.shape[1] if pn == "lora_B" else tensor.shape[0]
                if pn == "lora_A" and layer.enable:
                    ck_rank //= sum(layer.enable)
                if ck_rank != layer.r:
                    problems.append(f"checkpoint has rank {ck_rank} for {layer_name}, model has rank {layer.r}")
                    continue
            problems.append(f"shape mismatch for {key}: checkpoint {tuple(tensor.shape)}, model {tuple(target.shape)}")
    expected = {f"{n}.{pn}" for n, layer in layers.items() for pn in layer.adapter_names()}
    missing = sorted(expected - set(sd))
    if missing:
        problems.append(f"{len(missing)} adapter tensors of the model are not in the checkpoint, e.g. {missing[0]}")
    if problems:
        raise AdapterError(f"{source} does not fit this model: " + "; ".join(problems[:3])
                           + (f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""))
    # Weights merged under the old adapter values are unmerged first, and merged again with the new ones.
    remerge = any(layer.merged for layer in layers.values()) or not model.training
    unmerge_adapter(model)
    with torch.no_grad():
        for key, tensor in sd.items():
            target = params.get(key, buffers.get(key))
            target.copy_(tensor.to(target.dtype))
    if remerge:
        merge_adapter(model)
    return model


def load_adapter(model, path):
    """Load an adapter saved by save_adapter (dir or .safetensors), a PEFT dir, or a loralib .pt/.bin state dict.

    A model without an adapter gets one applied from the saved config first (ours or PEFT's). Every checkpoint
    tensor must land in the model and every adapter tensor of the model must be in the checkpoint.
    """
    path = Path(path)
    if path.is_dir() and not (path / ADAPTER_FILE).exists() and (path / PEFT_CONFIG).exists():
        return load_peft(model, path)
    if path.is_dir():
        weights, meta_file = path / ADAPTER_FILE, path / CONFIG_FILE
    elif path.suffix == ".safetensors":
        weights, meta_file = path, path.with_name(CONFIG_FILE)
    elif path.suffix in (".pt", ".bin", ".pth"):
        return _load_loralib(model, path)
    else:
        raise AdapterError(f"adapter path {path} is neither a folder nor a .safetensors/.pt file")
    if not weights.exists():
        raise AdapterError(f"adapter weights not found: {weights}")
    if not adapter_layers(model):
        if not meta_file.exists():
            raise AdapterError(f"{meta_file} not found: cannot tell which adapter to build")
        meta = json.loads(meta_file.read_text())
        apply_adapter(model, meta["method"], meta["rank"], meta["alpha"], meta["target_modules"],
                      meta.get("dropout", 0.0), meta.get("seed", 0), meta.get("modules_to_save") or None,
                      meta.get("fused_qkv_lora", True))
    elif meta_file.exists():
        meta = json.loads(meta_file.read_text())
        cfg = _config_of(model)
        if meta["method"] != cfg["method"]:
            raise AdapterError(f"checkpoint holds a {meta['method']} adapter, model has {cfg['method']}")
    return _load_tensors(model, _strip_prefixes(load_file(str(weights)), model), str(path))


def _load_loralib(model, path):
    """microsoft/LoRA checkpoints: a state dict from loralib.lora_state_dict (keys `...query.lora_A`)."""
    if not adapter_layers(model):
        raise AdapterError(f"{path} is a loralib checkpoint, which holds no rank or alpha: apply a LoRA adapter "
                           "with the checkpoint's rank and alpha first (run_glue.py: --apply_lora --lora_r R --lora_alpha A)")
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(sd, dict):
        raise AdapterError(f"{path} does not hold a state dict")
    sd = sd.get("model_state_dict", sd.get("state_dict", sd))
    return _load_tensors(model, _strip_prefixes(sd, model), str(path))


# ---- Hugging Face PEFT format

_PEFT_TYPE = {"lora": "LORA", "vera": "VERA", "randlora": "RANDLORA"}


def peft_config(method, rank, alpha, target_modules, dropout=0.0, seed=0, modules_to_save=None, **extra):
    """The HF PEFT config equivalent to apply_adapter's arguments (same defaults), for side-by-side runs.

    target_modules is required (PEFT would pick its own defaults); extra keys go to the config (task_type...).
    """
    import peft
    if method not in METHODS:
        raise AdapterError(f"unknown adapter method {method!r}; choose one of {', '.join(METHODS)}")
    common = dict(r=rank, target_modules=list(target_modules), modules_to_save=modules_to_save, **extra)
    alpha = default_alpha(method, rank) if alpha is None else alpha
    if method == "lora":
        return peft.LoraConfig(lora_alpha=alpha, lora_dropout=dropout, **common)
    if method == "vera":
        return peft.VeraConfig(vera_dropout=dropout, projection_prng_key=seed, save_projection=True, **common)
    return peft.RandLoraConfig(randlora_alpha=alpha, randlora_dropout=dropout, projection_prng_key=seed,
                               save_projection=True, **common)


def save_peft(model, path, base_model_name_or_path=None):
    """Write `adapter_config.json` + `adapter_model.safetensors` that `peft.PeftModel.from_pretrained` reads."""
    cfg = _config_of(model)
    method, prefix = cfg["method"], "base_model.model."
    fan_in_fan_out = any(layer.fan_in_fan_out for _, layer in adapter_layers(model))
    sd, rank_pattern, alpha_pattern = {}, {}, {}
    for name, layer in adapter_layers(model):
        if method == "lora":
            down, up = layer.factors()
            sd[f"{prefix}{name}.lora_A.weight"] = down
            sd[f"{prefix}{name}.lora_B.weight"] = up
            if layer.enable:  # fused q/v slices = one LoRA of rank r * slices with a block-diagonal B
                rank_pattern[name] = down.shape[0]
                alpha_pattern[name] = cfg["alpha"] * down.shape[0] / layer.r
        else:
            for pn in layer.adapter_names():
                sd[f"{prefix}{name}.{pn}"] = getattr(layer, pn)
    for key, t in _saved_module_tensors(model, cfg).items():
        sd[prefix + key] = t
    bases = getattr(model, BASES_ATTR, None)
    if bases is not None:
        for bn, b in bases.named_buffers():
            sd[f"base_model.{bn}"] = b
            if method == "randlora":  # PEFT's RandLoRA files also repeat the bases under every layer
                for name, _ in adapter_layers(model):
                    sd[f"{prefix}{name}.{bn}"] = b
    common = {"peft_type": _PEFT_TYPE[method], "target_modules": cfg["target_modules"], "r": cfg["rank"],
              "modules_to_save": cfg["modules_to_save"] or None, "fan_in_fan_out": fan_in_fan_out,
              "bias": "none", "task_type": None, "inference_mode": True, "init_weights": True,
              "base_model_name_or_path": base_model_name_or_path, "layers_to_transform": None,
              "layers_pattern": None, "revision": None}
    if method == "lora":
        common.update(lora_alpha=cfg["alpha"], lora_dropout=cfg["dropout"], init_lora_weights=True,
                      rank_pattern=rank_pattern, alpha_pattern=alpha_pattern, use_rslora=False, use_dora=False)
        del common["init_weights"]
    elif method == "vera":
        common.update(vera_dropout=cfg["dropout"], projection_prng_key=cfg["seed"], save_projection=True,
                      d_initial=0.1)
    else:
        common.update(randlora_alpha=cfg["alpha"], randlora_dropout=cfg["dropout"],
                      projection_prng_key=cfg["seed"], save_projection=True, sparse=False, very_sparse=False)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    saveable = _to_saveable(sd)
    _atomic(path / PEFT_WEIGHTS, lambda tmp: save_file(saveable, tmp, metadata={"format": "pt"}))
    _atomic(path / PEFT_CONFIG, lambda tmp: Path(tmp).write_text(json.dumps(common, indent=2) + "\n"))
    return path


def load_peft(model, path):
    """Load a Hugging Face PEFT adapter folder (LoRA, VeRA or RandLoRA) into `model`, applying it if needed."""
    path = Path(path)
    cfg_file, weights = path / PEFT_CONFIG, path / PEFT_WEIGHTS
    if not cfg_file.exists() or not weights.exists():
        raise AdapterError(f"{path} is not a PEFT adapter folder (needs {PEFT_CONFIG} and {PEFT_WEIGHTS})")
    pc = json.loads(cfg_file.read_text())
    method = {v: k for k, v in _PEFT_TYPE.items()}.get(pc.get("peft_type"))
    if method is None:
        raise AdapterError(f"unsupported PEFT adapter type {pc.get('peft_type')!r}; supported: LORA, VERA, RANDLORA")
    if pc.get("use_dora") or pc.get("rank_pattern") and method == "lora" and len(set(pc["rank_pattern"].values())) > 1:
        raise AdapterError(f"{path}: DoRA and mixed per-layer ranks are not supported")
    targets = pc["target_modules"]
    if isinstance(targets, str):
        raise AdapterError(f"{path}: regex target_modules ({targets!r}) are not supported; list module names")
    rank = pc["r"]
    alpha = {"lora": pc.get("lora_alpha"), "vera": 1.0, "randlora": pc.get("randlora_alpha")}[method]
    if method == "lora" and pc.get("rank_pattern"):
        # only the uniform case: every layer got the same override
        new_rank = next(iter(pc["rank_pattern"].values()))
        alpha = pc.get("alpha_pattern", {}).get(next(iter(pc["rank_pattern"])), alpha * new_rank / rank)
        rank = new_rank
    sd = _strip_prefixes(load_file(str(weights)), model)
    if not adapter_layers(model):
        dropout = pc.get("lora_dropout", pc.get("vera_dropout", pc.get("randlora_dropout", 0.0))) or 0.0
        apply_adapter(model, method, rank, alpha, targets, dropout, pc.get("projection_prng_key", 0),
                      pc.get("modules_to_save"), fused_qkv_lora=False)
    elif _config_of(model)["method"] != method:
        raise AdapterError(f"{path} holds a {method} adapter, model has {_config_of(model)['method']}")
    # PEFT names: `<layer>.lora_A.weight`; its RandLoRA files also repeat the shared bases under every layer.
    ours = {}
    for k, v in sd.items():
        if k.endswith(".lora_A.weight") or k.endswith(".lora_B.weight"):
            k = k[: -len(".weight")]
        elif k.rsplit(".", 1)[-1] in ("randlora_A", "randlora_B", "vera_A", "vera_B") and "." in k:
            continue
        if k in ("vera_A", "vera_B", "randlora_A", "randlora_B"):
            k = f"{BASES_ATTR}.{k}"
        ours[k] = v
    return _load_tensors(model, ours, str(path))
