"""Hostile input and faults for the E2E scripts, one case per row: every failure is one `error:` line, exit code
2, no traceback, and no result file written (nor an input overwritten). Then interruptions: gpt2_ft.py killed at
several moments -- between checkpoints, inside a checkpoint write, inside a model.<step>.pt write, and by a real
SIGKILL -- and resumed ends bit for bit where an uninterrupted run ends, with the same validation history."""
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import DATA_DIR, REPO, reset_accelerate, tiny_gpt2_config
from safetensors.torch import load_file

import e2e_data
import e2e_eval
import gpt2_beam
import gpt2_decode
import gpt2_ft
from common import run_main

DEVSET = DATA_DIR / "e2e" / "original" / "devset.csv"


@pytest.fixture(scope="module")
def env(tmp_path_factory, gpt2_tokenizer):
    """Small real inputs: a tiny GPT-2 folder, text and token-id data, a loralib adapter file, beam outputs."""
    from transformers import GPT2LMHeadModel

    import peft_layers
    root = tmp_path_factory.mktemp("faults")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(tiny_gpt2_config())
    model.save_pretrained(root / "tiny")
    gpt2_tokenizer.save_pretrained(root / "tiny")
    rows = e2e_data.load_e2e(DEVSET)[:24]
    (root / "text.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tokens = [{"context": gpt2_tokenizer.encode(r["context"]) + [50256],
               "completion": gpt2_tokenizer.encode(" " + r["completion"]) + [50256]} for r in rows]
    (root / "tokens.jsonl").write_text("".join(json.dumps(r) + "\n" for r in tokens))
    whole = {k[len("transformer."):]: v for k, v in model.state_dict().items() if k.startswith("transformer.")}
    torch.save(whole, root / "tiny.bin")  # no config.json beside it
    peft_layers.apply_adapter(model, "lora", 4, 32)
    torch.save({"model_state_dict": {f"module.{k}": v.detach() for k, v in
                                     peft_layers.adapter_state_dict(model).items()}}, root / "model.3.pt")
    contexts, _ = e2e_data.group_references(rows)
    (root / "samples.jsonl").write_text("".join(json.dumps({"id": i, "context": c, "text": "A place."}) + "\n"
                                                for i, c in enumerate(contexts)))
    return root


def write(path, data):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def ft(env, tmp, *extra, data="text.jsonl"):
    return [gpt2_ft, ["--train_data", env / data, "--model_name_or_path", env / "tiny", "--work_dir", tmp / "out",
                      "--max_step", 1, *extra]]


def beam(env, tmp, *extra, data="tokens.jsonl"):
    return [gpt2_beam, ["--data", env / data, "--model_name_or_path", env / "tiny", "--work_dir", tmp / "out",
                        "--beam", 1, "--eval_len", 2, *extra]]


def decode(env, tmp, *extra, input_file=None, samples=None):
    return [gpt2_decode, ["--input_file", input_file or env / "text.jsonl", "--sample_file",
                          samples or env / "samples.jsonl", "--output_ref_file", tmp / "out" / "ref.txt",
                          "--output_pred_file", tmp / "out" / "pred.txt", *extra]]


def converter(tmp, content, name):
    src = write(tmp / name, content)
    return [e2e_data, ["--input", src, "--output", tmp / "out" / "rows.jsonl"]]


def scorer(tmp, refs, preds, *extra):
    return [e2e_eval, [write(tmp / "refs.txt", refs), write(tmp / "preds.txt", preds), *extra]]


def duplicate_samples(env, tmp):
    first = json.loads((env / "samples.jsonl").read_text().splitlines()[0])
    lines = [first, {**first, "text": "Something else."}]
    return write(tmp / "dup.jsonl", "".join(json.dumps(x) + "\n" for x in lines))


def pickled_object(tmp):
    import argparse
    torch.save({"model_state_dict": {"w": torch.zeros(1)}, "args": argparse.Namespace(lr=1)}, tmp / "pickle.pt")
    return tmp / "pickle.pt"


def error_lines(capsys):
    """stderr without progress bars (model loading shows one) and log lines: what is left must be one line."""
    lines = [line.strip() for line in re.split(r"[\r\n]+", capsys.readouterr().err)]
    return [line for line in lines if line and "%|" not in line and not re.match(r"\d{4}-\d\d-\d\d |INFO:", line)]


# (id, build(env, tmp) -> [module, argv], what the one line must say)
CASES = [
    # e2e_data.py: the readers every script uses
    ("csv-truncated-quote", lambda e, t: converter(t, 'mr,ref\n"name[X], eatType[pub]","A short ref\n', "t.csv"),
     r"t\.csv:\d+: malformed CSV .*quoted field is not closed"),
    ("csv-field-count", lambda e, t: converter(t, "mr,ref\nname[X],a,b\n", "f.csv"),
     r"f\.csv:2: 3 fields where the header has 2"),
    ("csv-non-utf8", lambda e, t: converter(t, b"mr,ref\nname[X],caf\xe9\n", "u.csv"),
     r"u\.csv:2: byte 0xe9 is not UTF-8"),
    ("txt-non-utf8", lambda e, t: converter(t, b"name : X||ok\nname : Y||caf\xe9\n", "u.txt"),
     r"u\.txt:2: byte 0xe9 is not UTF-8"),
    ("txt-no-separator", lambda e, t: converter(t, "name : X | Type : pub\n", "n.txt"), r"n\.txt:1: no `\|\|`"),
    ("jsonl-bad-json", lambda e, t: converter(t, '{"context": "a"}\n{"context": \n', "b.jsonl"),
     r"b\.jsonl:2: not a JSON line"),
    ("jsonl-mixed-kinds", lambda e, t: converter(
        t, '{"context": "a", "completion": "b"}\n{"context": [1], "completion": [2]}\n', "m.jsonl"),
     r"m\.jsonl:2: tokens row in a file of text rows"),
    ("jsonl-bad-token-ids", lambda e, t: converter(t, '{"context": [1, "x"], "completion": [2]}\n', "k.jsonl"),
     r"k\.jsonl:1: `context` and `completion` must both be text or both lists of token ids"),
    ("converter-over-its-input", lambda e, t: [e2e_data, ["--input", e / "text.jsonl", "--output", e / "text.jsonl"]],
     r"is an input of this run"),
    # gpt2_ft.py: checked before any model is loaded or step taken
    ("ft-max-examples-negative", lambda e, t: ft(e, t, "--max_train_examples", -1),
     r"--max_train_examples -1: give a positive number"),
    ("ft-max-valid-zero", lambda e, t: ft(e, t, "--max_valid_examples", 0), r"--max_valid_examples 0"),
    ("ft-fp16-on-cpu", lambda e, t: ft(e, t, "--fp16"), r"--fp16 needs a CUDA GPU"),
    ("ft-rank-zero", lambda e, t: ft(e, t, "--lora_dim", 0), r"--rank/--lora_dim.*must be at least 1"),
    ("ft-work-dir-not-writable", lambda e, t: ft(e, t, "--work_dir", write(t / "file", "x") / "sub"),
     r"output folder .*file/sub is not writable"),
    ("ft-train-data-missing", lambda e, t: ft(e, t, data="nope.jsonl"), r"data file not found"),
    ("ft-train-data-non-utf8", lambda e, t: ft(e, t, "--train_data", write(t / "u.jsonl", b'{"context": "\xff"}\n')),
     r"u\.jsonl:1: byte 0xff is not UTF-8"),
    ("ft-text-train-token-valid", lambda e, t: ft(e, t, "--valid_data", e / "tokens.jsonl"),
     r"must both be text or both token ids"),
    ("ft-checkpoint-garbage", lambda e, t: ft(e, t, "--init_checkpoint", write(t / "g.bin", b"not a checkpoint")),
     r"g\.bin is not a usable torch checkpoint \(unreadable, truncated or not a torch file\)"),
    ("ft-checkpoint-pickle-refused", lambda e, t: ft(e, t, "--init_checkpoint", pickled_object(t)),
     r"pickled Python objects besides tensors, which are refused for safety"),
    ("ft-card-does-not-fit", lambda e, t: [gpt2_ft, ["--train_data", e / "tokens.jsonl", "--init_checkpoint",
                                                      e / "tiny.bin", "--model_card", "gpt2.sm", "--work_dir", t]],
     r"--model_card gpt2.sm is GPT-2 with n_embd 768 and 12 layers, but .*n_embd 32 and 2 layers"),
    ("ft-whole-checkpoint-and-model", lambda e, t: ft(e, t, "--init_checkpoint", e / "tiny.bin", data="tokens.jsonl"),
     r"holds a whole model: leave out --model_name_or_path"),
    ("ft-nothing-fits-seq-len", lambda e, t: ft(e, t, "--seq_len", 2), r"no training example fits in --seq_len 2"),
    # gpt2_beam.py
    ("beam-eval-len-zero", lambda e, t: beam(e, t, "--eval_len", 0), r"--eval_len 0"),
    ("beam-max-examples-negative", lambda e, t: beam(e, t, "--max_examples", -1), r"--max_examples -1"),
    ("beam-beam-zero", lambda e, t: beam(e, t, "--beam", 0), r"--beam 0"),
    ("beam-min-length-above-eval-len", lambda e, t: beam(e, t, "--min_length", 5), r"--min_length 5 must lie"),
    ("beam-output-file-is-a-path", lambda e, t: beam(e, t, "--output_file", "../x.jsonl"), r"not a path"),
    ("beam-output-over-its-data", lambda e, t: [gpt2_beam, ["--data", e / "tokens.jsonl", "--work_dir", e,
                                                            "--output_file", "tokens.jsonl"]],
     r"tokens\.jsonl is an input of this run"),
    ("beam-checkpoint-missing", lambda e, t: beam(e, t, "--init_checkpoint", t / "none.pt"), r"does not exist"),
    ("beam-lora-rank-mismatch", lambda e, t: beam(e, t, "--init_checkpoint", e / "model.3.pt", "--lora_dim", 8),
     r"rank 4, but --rank/--lora_dim is 8: pass --lora_dim 4"),
    # gpt2_decode.py: everything read and checked before the first file is written
    ("decode-two-predictions-one-context", lambda e, t: decode(e, t, samples=duplicate_samples(e, t)),
     r"a second, different prediction for context"),
    ("decode-no-references", lambda e, t: decode(
        e, t, input_file=write(t / "mr_only.csv", 'MR\n"name[X], eatType[pub]"\n'),
        samples=write(t / "s.jsonl", json.dumps({"context": "name : X | Type : pub", "text": "x"}) + "\n")),
     r"only empty references"),
    ("decode-token-samples-without-vocab", lambda e, t: decode(e, t, samples=write(
        t / "p.jsonl", json.dumps({"id": 0, "predict": [464, 50256]}) + "\n")), r"pass --vocab"),
    ("decode-sample-id-out-of-range", lambda e, t: decode(e, t, "--vocab", DATA_DIR / "gpt2_vocab", samples=write(
        t / "p.jsonl", json.dumps({"id": 99, "predict": [464]}) + "\n")), r"id 99 is not a line of the input file"),
    ("decode-samples-non-utf8", lambda e, t: decode(e, t, samples=write(t / "u.jsonl", b'{"text": "\xfe"}\n')),
     r"u\.jsonl:1: byte 0xfe is not UTF-8"),
    ("decode-ref-file-over-input", lambda e, t: [gpt2_decode, [
        "--input_file", e / "text.jsonl", "--sample_file", e / "samples.jsonl", "--output_ref_file", e / "text.jsonl",
        "--output_pred_file", t / "out" / "pred.txt"]], r"text\.jsonl is an input of this run"),
    ("decode-token-id-input", lambda e, t: decode(e, t, input_file=e / "tokens.jsonl"),
     r"holds token ids: pass the text"),
    # e2e_eval.py
    ("eval-three-files", lambda e, t: [e2e_eval, [write(t / "a", "x\n"), write(t / "b", "x\n"), write(t / "c", "x")]],
     r"expected two files"),
    ("eval-refs-non-utf8", lambda e, t: scorer(t, b"ok\n\xff\n", "ok\n"), r"refs\.txt:2: byte 0xff is not UTF-8"),
    ("eval-output-over-input", lambda e, t: scorer(t, "a b\n", "a b\n", "--output_json", t / "refs.txt"),
     r"refs\.txt is an input of this run"),
    ("eval-count-mismatch", lambda e, t: scorer(t, "a\n\nb\n", "a\n"), r"2 reference groups but 1 predictions"),
]


@pytest.mark.parametrize("build,message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line(build, message, env, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(e2e_eval.shutil, "which", lambda name: None)  # no JVM for the file checks
    module, argv = build(env, tmp_path)
    before = {p: p.stat().st_mtime_ns for p in env.iterdir()}
    reset_accelerate()
    with pytest.raises(SystemExit) as exit_info:
        run_main(module.main, [str(a) for a in argv])
    err = error_lines(capsys)
    assert exit_info.value.code == 2, err
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert re.search(message, err[0]), err[0]
    assert "weights_only=False" not in err[0]
    out = tmp_path / "out"
    assert not out.exists() or not [p for p in out.rglob("*") if p.is_file()]  # no result, no half file
    assert {p: p.stat().st_mtime_ns for p in env.iterdir()} == before  # inputs untouched


def test_java_that_fails_is_one_clear_line(tmp_path, monkeypatch, capsys):
    fake = write(tmp_path / "bin" / "java", "#!/bin/sh\necho 'Error: could not create the Java VM' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    refs, preds = write(tmp_path / "r.txt", "a b\n"), write(tmp_path / "p.txt", "a b\n")
    with pytest.raises(SystemExit) as exit_info:
        run_main(e2e_eval.main, [str(refs), str(preds), "--output_json", str(tmp_path / "s.json")])
    err = error_lines(capsys)
    assert exit_info.value.code == 2 and len(err) == 1, err
    assert "could not create the Java VM" in err[0] and "java -version" in err[0]
    assert not (tmp_path / "s.json").exists()


def test_failed_checkpoint_write_leaves_nothing(env, tmp_path, monkeypatch, capsys):
    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device", str(args[1]))
    monkeypatch.setattr(gpt2_ft.torch, "save", full_disk)
    reset_accelerate()
    with pytest.raises(SystemExit) as exit_info:
        run_main(gpt2_ft.main, [str(a) for a in ft(env, tmp_path, "--save_interval", 1, "--max_step", 2)[1]])
    err = error_lines(capsys)
    assert exit_info.value.code == 2 and len(err) == 1 and "No space left on device" in err[0], err
    # config.json and run_settings.json describe the run from its start; no checkpoint or result is left
    leftovers = [p.name for p in (tmp_path / "out").rglob("*") if p.name not in ("config.json", "run_settings.json")]
    assert leftovers == [], leftovers


# ------------------------------------------------------------------------------------------------------------
# Kill at any moment, then --resume

class Killed(BaseException):
    """Stands for SIGKILL: nothing in the scripts catches it, so no cleanup code runs for it."""


def train(env, work_dir, *extra):
    reset_accelerate()
    gpt2_ft.main([str(a) for a in ["--train_data", DEVSET, "--valid_data", DEVSET, "--model_name_or_path",
                                   env / "tiny", "--max_train_examples", 40, "--max_valid_examples", 8,
                                   "--train_batch_size", 8, "--lr", 5e-2, "--warmup_step", 2, "--max_step", 9,
                                   "--eval_interval", 2, "--save_interval", 3, "--work_dir", work_dir, *extra]])


def final_state(work_dir):
    results = json.loads((work_dir / "train_results.json").read_text())
    return load_file(work_dir / "final" / "adapter.safetensors"), results["history"]


@pytest.fixture(scope="module")
def uninterrupted(env, tmp_path_factory):
    work_dir = tmp_path_factory.mktemp("uninterrupted")
    train(env, work_dir)
    return final_state(work_dir)


def assert_same_run(work_dir, uninterrupted):
    adapter, history = final_state(work_dir)
    want_adapter, want_history = uninterrupted
    assert adapter.keys() == want_adapter.keys()
    for key in adapter:
        torch.testing.assert_close(adapter[key], want_adapter[key], rtol=0, atol=0)
    assert history == want_history  # same validation losses, to the last bit, at the same steps
    assert [h["step"] for h in history] == [2, 4, 6, 8, 9]


def test_kills_between_and_inside_checkpoint_writes_then_resume(env, tmp_path, monkeypatch, uninterrupted):
    work_dir = tmp_path / "run"
    real_step, real_save = gpt2_ft.Trainer.step, gpt2_ft.torch.save

    # 1. Killed during step 5 (the last batch of epoch 0), between checkpoints.
    def step_then_die(self, batch):
        if self.state.step == 4:
            raise Killed
        return real_step(self, batch)
    monkeypatch.setattr(gpt2_ft.Trainer, "step", step_then_die)
    with pytest.raises(Killed):
        train(env, work_dir)
    assert gpt2_ft.latest_checkpoint(work_dir).name == "checkpoint-3"
    monkeypatch.setattr(gpt2_ft.Trainer, "step", real_step)

    # 2. Resumed, then killed inside the write of checkpoint-6: half a training-state file, folder not renamed.
    def save_half_then_die(obj, path, *args, **kwargs):
        if Path(path).name == gpt2_ft.STATE_FILE and obj.get("step") == 6:
            Path(path).write_bytes(b"PK\x03\x04 half a zip")
            raise Killed
        return real_save(obj, path, *args, **kwargs)
    monkeypatch.setattr(gpt2_ft.torch, "save", save_half_then_die)
    with pytest.raises(Killed):
        train(env, work_dir, "--resume")
    assert (work_dir / ".checkpoint-6.partial" / "adapter.safetensors").exists()
    assert gpt2_ft.latest_checkpoint(work_dir).name == "checkpoint-5"  # the newest complete one (epoch 0's end)

    # 3. Resumed again, killed while model.6.pt is written (after checkpoint-6 is complete).
    def save_model_pt_then_die(obj, path, *args, **kwargs):
        if "model_state_dict" in obj and str(path).endswith(".tmp") and ".model.6.pt" in str(path):
            Path(path).write_bytes(b"PK\x03\x04")
            raise Killed
        return real_save(obj, path, *args, **kwargs)
    monkeypatch.setattr(gpt2_ft.torch, "save", real_save)
    monkeypatch.setattr(gpt2_ft.gpt2_checkpoint.torch, "save", save_model_pt_then_die)
    with pytest.raises(Killed):
        train(env, work_dir, "--resume")
    assert gpt2_ft.latest_checkpoint(work_dir).name == "checkpoint-6"
    assert not (work_dir / "model.6.pt").exists() and not (work_dir / ".checkpoint-6.partial").exists()
    monkeypatch.setattr(gpt2_ft.gpt2_checkpoint.torch, "save", real_save)

    # 4. Resumed to the end: the same adapter and validation history as the run nobody interrupted.
    train(env, work_dir, "--resume")
    assert_same_run(work_dir, uninterrupted)
    assert not list(work_dir.glob(".checkpoint-*"))


KILL_DRIVER = """
import os, signal, sys
from pathlib import Path
sys.path.insert(0, {repo!r})
import gpt2_ft
real_save = gpt2_ft.torch.save
def save_then_sigkill(obj, path, *args, **kwargs):
    if Path(path).name == gpt2_ft.STATE_FILE and obj["step"] == 6:
        real_save(obj, path, *args, **kwargs)  # the state file complete, the folder not yet renamed
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, path, *args, **kwargs)
gpt2_ft.torch.save = save_then_sigkill
gpt2_ft.main(sys.argv[1:])
"""


def test_real_sigkill_inside_a_checkpoint_write_then_resume(env, tmp_path, uninterrupted):
    work_dir = tmp_path / "run"
    argv = ["--train_data", DEVSET, "--valid_data", DEVSET, "--model_name_or_path", env / "tiny",
            "--max_train_examples", 40, "--max_valid_examples", 8, "--train_batch_size", 8, "--lr", 5e-2,
            "--warmup_step", 2, "--max_step", 9, "--eval_interval", 2, "--save_interval", 3, "--work_dir", work_dir]
    threads = str(torch.get_num_threads())  # as in this process: another thread count sums in another order
    proc = subprocess.run([sys.executable, "-c", KILL_DRIVER.format(repo=str(REPO)), *map(str, argv)],
                          capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS=threads), timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert (work_dir / ".checkpoint-6.partial" / gpt2_ft.STATE_FILE).exists()
    assert gpt2_ft.latest_checkpoint(work_dir).name == "checkpoint-5"
    train(env, work_dir, "--resume")
    assert_same_run(work_dir, uninterrupted)
