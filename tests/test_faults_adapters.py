"""Hostile input to the adapter API: every bad argument or file is one AdapterError, one line, naming the fix.

One row per case (issue 11): apply_adapter's arguments, then files in our format, PEFT's and loralib's, each
broken in one way. Every row must raise exactly peft_layers.AdapterError (which the scripts turn into one
`error:` line and exit code 2) with a message matching the row, on one line, never advising
`weights_only=False` (which would run code from an untrusted file).
"""
import argparse
import json

import pytest
import torch
from conftest import tiny_bert_config
from safetensors.torch import load_file, save_file
from transformers import BertForSequenceClassification

import peft_layers as pl


def bert():
    torch.manual_seed(0)
    return BertForSequenceClassification(tiny_bert_config(hidden_dropout_prob=0.0)).eval()


def ours(tmp_path, method="lora", rank=4, alpha=8.0):
    return pl.save_adapter(pl.apply_adapter(bert(), method, rank, alpha), tmp_path / "ours")


def peft_dir(tmp_path, alpha=8.0):
    return pl.save_peft(pl.apply_adapter(bert(), "lora", 4, alpha), tmp_path / "peft")


def loralib_pt(tmp_path):
    sd = {k: v for k, v in pl.adapter_state_dict(pl.apply_adapter(bert(), "lora", 4, 8.0)).items()}
    torch.save(sd, tmp_path / "lora.pt")
    return tmp_path / "lora.pt"


def edit_json(path, edit):
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def cut(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def with_file(path, data):
    path.write_bytes(data) if isinstance(data, bytes) else path.write_text(data)
    return path.parent


def with_tensors(tmp_path, change):
    d = ours(tmp_path)
    sd = load_file(str(d / "adapter.safetensors"))
    change(sd)
    save_file(sd, str(d / "adapter.safetensors"))
    return d


def load_into_fresh(path_of):
    return lambda tmp: pl.load_adapter(bert(), path_of(tmp))


def load_into(apply_args, path_of):
    return lambda tmp: pl.load_adapter(pl.apply_adapter(bert(), *apply_args), path_of(tmp))


def apply(*args, **kw):
    return lambda tmp: pl.apply_adapter(bert(), *args, **kw)


def ours_json(tmp, edit):
    d = ours(tmp)
    edit_json(d / "adapter.json", edit)
    return d


def peft_json(tmp, edit):
    d = peft_dir(tmp)
    edit_json(d / "adapter_config.json", edit)
    return d


def pickled(tmp, obj):
    torch.save(obj, tmp / "bad.pt")
    return tmp / "bad.pt"


CASES = [
    # ---- apply_adapter arguments
    ("alpha-nan", apply("lora", 4, float("nan")), "alpha must be a positive finite number"),
    ("alpha-inf", apply("lora", 4, float("inf")), "alpha must be a positive finite number"),
    ("alpha-negative", apply("randlora", 4, -16.0), "alpha must be a positive finite number"),
    ("alpha-zero", apply("lora", 4, 0), "alpha must be a positive finite number"),
    ("alpha-string", apply("lora", 4, "16"), "alpha must be a positive finite number"),
    ("rank-zero", apply("lora", 0), "rank must be a positive integer"),
    ("rank-negative", apply("vera", -2), "rank must be a positive integer"),
    ("rank-fraction", apply("lora", 2.5), "rank must be a positive integer"),
    ("rank-string", apply("lora", "4"), "rank must be a positive integer"),
    ("rank-bool", apply("lora", True), "rank must be a positive integer"),
    ("rank-nan", apply("lora", float("nan")), "rank must be a positive integer"),
    ("dropout-negative", apply("lora", 4, dropout=-0.1), r"dropout must be a probability in \[0, 1\)"),
    ("dropout-one", apply("lora", 4, dropout=1.0), r"dropout must be a probability in \[0, 1\)"),
    ("dropout-nan", apply("lora", 4, dropout=float("nan")), r"dropout must be a probability in \[0, 1\)"),
    ("method-none", apply(None, 4), "unknown adapter method None"),
    ("method-unknown", apply("dora", 4), "unknown adapter method 'dora'"),
    ("targets-none-match", apply("lora", 4, target_modules=["nope"]), r"no linear layer matches target_modules"),
    ("targets-not-names", apply("lora", 4, target_modules=[3]), "target_modules must be module names"),
    ("save-none-match", apply("lora", 4, modules_to_save=["nope"]), r"no module matches modules_to_save"),
    ("seed-string", apply("lora", 4, seed="x"), "seed must be an integer"),
    ("applied-twice", lambda tmp: pl.apply_adapter(pl.apply_adapter(bert(), "lora", 4), "lora", 4),
     "already has an adapter"),
    # ---- paths
    ("path-missing", lambda tmp: pl.load_adapter(bert(), tmp / "nope"), "adapter path .*nope does not exist"),
    ("peft-path-missing", lambda tmp: pl.load_peft(bert(), tmp / "nope"), "adapter path .*nope does not exist"),
    ("dir-empty", load_into_fresh(lambda tmp: tmp), "holds no adapter: neither adapter.safetensors"),
    ("suffix-unknown", load_into_fresh(lambda tmp: with_file(tmp / "a.txt", "x") / "a.txt"),
     "neither a folder nor a .safetensors/.pt/.bin file"),
    # ---- our format
    ("ours-weights-truncated", load_into_fresh(lambda tmp: (cut(ours(tmp) / "adapter.safetensors"), tmp / "ours")[1]),
     "not a readable safetensors file"),
    ("ours-weights-garbage", load_into_fresh(lambda tmp: with_file(ours(tmp) / "adapter.safetensors", b"\x00" * 64)),
     "not a readable safetensors file"),
    ("ours-weights-empty", load_into_fresh(lambda tmp: with_file(ours(tmp) / "adapter.safetensors", b"")),
     "not a readable safetensors file"),
    ("ours-config-invalid-json", load_into_fresh(lambda tmp: with_file(ours(tmp) / "adapter.json", "{not json")),
     "is not valid JSON"),
    ("ours-config-not-utf8", load_into_fresh(lambda tmp: with_file(ours(tmp) / "adapter.json", b'{"m": "\xff\xfe"}')),
     "is not UTF-8 text"),
    ("ours-config-a-list", load_into_fresh(lambda tmp: with_file(ours(tmp) / "adapter.json", "[1, 2]")),
     "holds a JSON list, not an object"),
    ("ours-config-lacks-method", load_into_fresh(lambda tmp: ours_json(tmp, lambda d: d.pop("method"))),
     "lacks 'method'"),
    ("ours-config-rank-zero", load_into_fresh(lambda tmp: ours_json(tmp, lambda d: d.update(rank=0))),
     "rank must be a positive integer"),
    ("ours-config-alpha-nan", load_into_fresh(lambda tmp: ours_json(tmp, lambda d: d.update(alpha=float("nan")))),
     "alpha must be a positive finite number"),
    ("ours-config-missing", load_into_fresh(lambda tmp: (ours(tmp) / "adapter.json").unlink() or tmp / "ours"),
     "cannot tell which adapter to build"),
    ("ours-alpha-mismatch", load_into(("lora", 4, 16.0), lambda tmp: ours(tmp, alpha=8.0)),
     r"trained with alpha=8, but the model's adapter has alpha=16; apply the adapter with alpha=8"),
    ("ours-rank-mismatch", load_into(("lora", 8, 8.0), lambda tmp: ours(tmp)), "checkpoint has rank 4 for .* rank 8"),
    ("ours-method-mismatch", load_into(("vera", 4), lambda tmp: ours(tmp)), "holds a lora adapter, model has vera"),
    ("ours-tensor-nan", load_into_fresh(
        lambda tmp: with_tensors(tmp, lambda sd: sd[next(iter(sd))].fill_(float("nan")))),
     "holds NaN or infinite values"),
    ("ours-tensor-int", load_into_fresh(lambda tmp: with_tensors(
        tmp, lambda sd: sd.update({k: v.to(torch.int32) for k, v in list(sd.items())[:1]}))), "not floating point"),
    ("ours-tensor-extra", load_into_fresh(lambda tmp: with_tensors(tmp, lambda sd: sd.update(stray=torch.zeros(2)))),
     "stray has no place in the model"),
    # ---- Hugging Face PEFT format
    ("peft-config-invalid-json", load_into_fresh(lambda tmp: with_file(peft_dir(tmp) / "adapter_config.json", "{")),
     "is not valid JSON"),
    ("peft-config-not-utf8", load_into_fresh(lambda tmp: with_file(peft_dir(tmp) / "adapter_config.json", b"\xc3\x28")),
     "is not UTF-8 text"),
    ("peft-weights-truncated", load_into_fresh(
        lambda tmp: (cut(peft_dir(tmp) / "adapter_model.safetensors", 0.3), tmp / "peft")[1]),
     "not a readable safetensors file"),
    ("peft-weights-missing", load_into_fresh(
        lambda tmp: (peft_dir(tmp) / "adapter_model.safetensors").unlink() or tmp / "peft"),
     "is not a PEFT adapter folder"),
    ("peft-type-missing", load_into_fresh(lambda tmp: peft_json(tmp, lambda d: d.pop("peft_type"))),
     "unsupported PEFT adapter type None"),
    ("peft-type-ia3", load_into_fresh(lambda tmp: peft_json(tmp, lambda d: d.update(peft_type="IA3"))),
     "unsupported PEFT adapter type 'IA3'"),
    ("peft-lacks-r", load_into_fresh(lambda tmp: peft_json(tmp, lambda d: d.pop("r"))), "lacks 'r'"),
    ("peft-r-negative", load_into_fresh(lambda tmp: peft_json(tmp, lambda d: d.update(r=-4))),
     "rank must be a positive integer"),
    ("peft-targets-regex", load_into_fresh(lambda tmp: peft_json(tmp, lambda d: d.update(target_modules=".*query"))),
     "regex target_modules"),
    ("peft-alpha-inf", load_into_fresh(lambda tmp: peft_json(tmp, lambda d: d.update(lora_alpha=float("inf")))),
     "alpha must be a positive finite number"),
    ("peft-alpha-mismatch", load_into(("lora", 4, 32.0), lambda tmp: peft_dir(tmp, alpha=8.0)),
     r"trained with alpha=8, but the model's adapter has alpha=32"),
    # ---- loralib / PyTorch .pt
    ("pt-missing", load_into(("lora", 4, 8.0), lambda tmp: tmp / "nope.pt"), "does not exist"),
    ("pt-pickled-object", load_into(("lora", 4, 8.0), lambda tmp: pickled(tmp, argparse.Namespace(a=1))),
     "holds objects other than tensors and plain containers"),
    ("pt-truncated", load_into(("lora", 4, 8.0), lambda tmp: (cut(loralib_pt(tmp)), tmp / "lora.pt")[1]),
     "not a readable PyTorch checkpoint"),
    ("pt-garbage", load_into(("lora", 4, 8.0), lambda tmp: with_file(tmp / "g.pt", b"garbage!" * 8) / "g.pt"),
     "not a readable PyTorch checkpoint"),
    ("pt-a-list", load_into(("lora", 4, 8.0), lambda tmp: pickled(tmp, [torch.zeros(1)])),
     "holds a list, not a state dict"),
    ("pt-non-tensor-values", load_into(("lora", 4, 8.0), lambda tmp: pickled(tmp, {"a.lora_A": 3})),
     "not a state dict of named tensors"),
    ("pt-no-adapter-yet", load_into_fresh(loralib_pt), "apply a LoRA adapter with the checkpoint's rank and alpha"),
    ("pt-rank-mismatch", load_into(("lora", 2, 8.0), loralib_pt), "checkpoint has rank 4 for .* rank 2"),
]


@pytest.mark.parametrize("trigger,message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_adapter_error(tmp_path, trigger, message):
    with pytest.raises(pl.AdapterError, match=message) as caught:
        trigger(tmp_path)
    text = str(caught.value)
    assert type(caught.value) is pl.AdapterError
    assert "\n" not in text, text
    assert "weights_only=False" not in text


def test_default_alpha_takes_the_checkpoints_and_says_so(tmp_path, caplog):
    """A model built without an explicit alpha takes the one the checkpoint records: same logits as the trained
    model, never a silent rescale."""
    trained = pl.apply_adapter(bert(), "lora", 4, 32.0)
    with torch.no_grad():
        for p in trained.parameters():
            if p.requires_grad:
                p.normal_(0, 0.2)
    x = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(1))
    expect = trained.eval()(x).logits
    pl.save_adapter(trained, tmp_path)
    model = pl.apply_adapter(bert(), "lora", 4)  # alpha left to its default (4)
    with caplog.at_level("INFO", logger="peft_layers"):
        pl.load_adapter(model, tmp_path)
    assert "using the checkpoint's alpha=32" in caplog.text
    assert model.peft_layers_config["alpha"] == 32.0
    torch.testing.assert_close(model.eval()(x).logits, expect, atol=1e-5, rtol=0)


def test_loralib_checkpoint_logs_the_alpha_used(tmp_path, caplog):
    path = loralib_pt(tmp_path)
    with caplog.at_level("WARNING", logger="peft_layers"):
        pl.load_adapter(pl.apply_adapter(bert(), "lora", 4, 8.0), path)
    assert "records no alpha: using the model's alpha=8 (scale alpha/r = 2)" in caplog.text
