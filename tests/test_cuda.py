"""The adapters on a CUDA GPU, against the same model on the CPU: same initialisation for a seed, same loss and
gradients, the same bytes kept for backward (the memory plan holds there), merging, bf16 autocast and
torch.compile. CI has no GPU, so these are skipped there; bench/gpu_check.sh runs this file first on a GPU machine
(bench/device_run.sh on a lent one)."""
import copy

import pytest
import torch
from conftest import tiny_gpt2_config

import peft_layers
from common import count_saved_for_backward

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
METHODS = [("lora", 4), ("vera", 16), ("randlora", 4)]


@pytest.fixture(autouse=True)
def exact_fp32_matmuls():
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # TF32 would differ from the CPU by far more than rounding
    yield
    torch.backends.cuda.matmul.allow_tf32 = previous


def gpt2(device):
    from transformers import GPT2LMHeadModel
    torch.manual_seed(0)
    # the model's own dropout off: the two devices draw different masks (the adapters' dropout is a parameter)
    return GPT2LMHeadModel(tiny_gpt2_config(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).to(device)


def adapt(model, method, rank, dropout=0.0):
    targets = ["c_attn"] if method == "lora" else ["c_attn", "c_fc", "c_proj"]
    return peft_layers.apply_adapter(model, method, rank, target_modules=targets, dropout=dropout, seed=3)


def randomised(model):
    """Random values in every trainable tensor (B and lambda_b start at zero, which would hide half the gradients)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def batch(device):
    ids = torch.randint(0, 50257, (2, 24), generator=torch.Generator().manual_seed(2))
    return ids.to(device)


def step(model, ids, bf16=False):
    """One training step's loss, the trainable gradients, and the bytes autograd kept for backward."""
    model.zero_grad(set_to_none=True)
    with count_saved_for_backward(model) as kept:
        with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach().cpu(), grads, sum(kept.values())


@pytest.mark.parametrize("method,rank", METHODS)
def test_an_adapter_applied_on_the_gpu_is_the_one_applied_on_the_cpu(method, rank):
    def tensors(model):  # the state dict and the shared bases, which are buffers kept out of it
        return {**model.state_dict(), **{n: b for n, b in model.named_buffers() if "bases" in n}}

    on_cpu = tensors(adapt(gpt2("cpu"), method, rank))
    on_gpu = tensors(adapt(gpt2("cuda"), method, rank))
    assert on_cpu.keys() == on_gpu.keys()
    for name, tensor in on_cpu.items():
        assert on_gpu[name].device.type == "cuda", name
        torch.testing.assert_close(on_gpu[name].cpu(), tensor, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("method,rank", METHODS)
def test_a_training_step_on_the_gpu_matches_the_cpu_and_keeps_the_same_bytes(method, rank):
    cpu_model = randomised(adapt(gpt2("cpu"), method, rank)).train()
    gpu_model = copy.deepcopy(cpu_model).to("cuda")
    loss_cpu, grads_cpu, kept_cpu = step(cpu_model, batch("cpu"))
    loss_gpu, grads_gpu, kept_gpu = step(gpu_model, batch("cuda"))
    torch.testing.assert_close(loss_gpu, loss_cpu, rtol=1e-5, atol=1e-5)
    assert grads_gpu.keys() == grads_cpu.keys() and grads_cpu
    for name, grad in grads_cpu.items():
        torch.testing.assert_close(grads_gpu[name], grad, rtol=1e-4, atol=1e-5, msg=name)
    assert kept_gpu == kept_cpu  # the per-call plan depends on shapes and dtype, not on the device


@pytest.mark.parametrize("method,rank", METHODS)
def test_bf16_autocast_and_dropout_train_on_the_gpu(method, rank):
    model = randomised(adapt(gpt2("cuda"), method, rank, dropout=0.1)).train()
    ids = batch("cuda")
    loss_fp32, _, _ = step(model, ids)  # with dropout: two steps see different masks, so only close
    loss_bf16, grads, _ = step(model, ids, bf16=True)
    assert torch.isfinite(loss_bf16) and abs(loss_bf16 - loss_fp32) < 0.05 * loss_fp32
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads.values())


@pytest.mark.parametrize("method,rank", METHODS)
def test_eval_merges_on_the_gpu_with_the_unmerged_output(method, rank):
    model = randomised(adapt(gpt2("cuda"), method, rank)).train()
    ids = batch("cuda")
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits
        model.eval()  # merges
        assert all(layer.merged for _, layer in peft_layers.adapter_layers(model))
        merged = model(input_ids=ids).logits
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method,rank", METHODS)
def test_a_model_merged_on_the_cpu_trains_on_the_gpu(method, rank):
    """run_glue.py's order: from_pretrained (eval mode), apply_adapter (merges), then the Trainer moves the model
    and calls train(), which unmerges on the GPU."""
    reference = randomised(adapt(gpt2("cpu"), method, rank)).train()
    model = copy.deepcopy(reference).eval()  # merged on the CPU
    model.to("cuda").train()
    assert not any(layer.merged for _, layer in peft_layers.adapter_layers(model))
    loss_cpu, grads_cpu, _ = step(reference, batch("cpu"))
    loss_gpu, grads_gpu, _ = step(model, batch("cuda"))
    torch.testing.assert_close(loss_gpu, loss_cpu, rtol=1e-5, atol=1e-5)
    for name, grad in grads_cpu.items():
        torch.testing.assert_close(grads_gpu[name], grad, rtol=1e-4, atol=1e-5, msg=name)


def test_a_compiled_lora_step_on_the_gpu_matches_eager():
    model = randomised(adapt(gpt2("cuda"), "lora", 4)).train()
    ids = batch("cuda")
    loss_eager, grads_eager, _ = step(model, ids)
    compiled = torch.compile(model)
    compiled.zero_grad(set_to_none=True)
    loss = compiled(input_ids=ids, labels=ids).loss
    loss.backward()
    torch.testing.assert_close(loss.detach().cpu(), loss_eager, rtol=1e-4, atol=1e-4)
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad.cpu(), grads_eager[name], rtol=1e-3, atol=1e-5, msg=name)
