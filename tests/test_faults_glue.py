"""GLUE faults matrix: hostile-but-realistic input and interruptions, one parametrized case per row.

Every bad input must give one `error:` line naming the problem (and the file:line where there is one), exit 2, no
traceback and no result file; problems a run can see before loading the model are found before it. A run killed
at any moment and started again ends with the metrics of an uninterrupted run."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import GLUE_DIR, REPO, tiny_bert_config, tiny_roberta_config
from test_glue import save_tiny, write_tsv
from transformers import Trainer, TrainerState

import glue_data
import run_glue
from common import DataError, UsageError, run_main

PY = sys.executable
RTE = ["index", "sentence1", "sentence2", "label"]
STSB = ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2", "score"]


def stsb_row(i, score):
    return [i, "main-captions", "MSRvid", "2012test", i, "none", "none", f"A man plays {i}.", "A man plays.", score]


def raw(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


# ------------------------------------------------------------------------------------------------ data files
# (case, task, kind, writer(folder) -> explicit file or None for the GLUE folder, expected message)
LOADER_CASES = [
    ("stsb label nan", "stsb", "train", lambda d: write_tsv(d / "STS-B" / "train.tsv", STSB, [stsb_row(0, "nan")]),
     r"STS-B/train.tsv:2: label 'nan' is outside \[0, 5\]"),
    ("stsb label inf", "stsb", "train", lambda d: write_tsv(d / "STS-B" / "train.tsv", STSB, [stsb_row(0, "inf")]),
     r"train.tsv:2: label 'inf' is outside \[0, 5\]"),
    ("stsb label above 5", "stsb", "train", lambda d: write_tsv(
        d / "STS-B" / "train.tsv", STSB, [stsb_row(0, 4.5), stsb_row(1, 5.5)]), r"train.tsv:3: label '5.5' is outside"),
    ("stsb label below 0", "stsb", "validation", lambda d: write_tsv(
        d / "STS-B" / "dev.tsv", STSB, [stsb_row(0, -0.5)]), r"STS-B/dev.tsv:2: label '-0.5' is outside \[0, 5\]"),
    ("stsb label not a number", "stsb", "train", lambda d: write_tsv(
        d / "STS-B" / "train.tsv", STSB, [stsb_row(0, "high")]), r"train.tsv:2: label 'high' is not a number"),
    ("stsb empty training label", "stsb", "train", lambda d: write_tsv(
        d / "STS-B" / "train.tsv", STSB, [stsb_row(0, 1.0), stsb_row(1, "")]), r"train.tsv:3: empty label"),
    ("rte empty dev label", "rte", "validation", lambda d: write_tsv(
        d / "RTE" / "dev.tsv", RTE, [[0, "a", "b", ""]]), r"RTE/dev.tsv:2: empty label"),
    ("rte label outside the set", "rte", "train", lambda d: write_tsv(
        d / "RTE" / "train.tsv", RTE, [[0, "a", "b", "maybe"]]), r"train.tsv:2: label 'maybe' is outside the task"),
    ("cola id outside, no header", "cola", "train", lambda d: write_tsv(
        d / "CoLA" / "train.tsv", None, [["src", 3, "", "A sentence."]]), r"CoLA/train.tsv:1: label '3' is outside"),
    ("non-UTF-8 byte in a tsv", "rte", "train", lambda d: raw(
        d / "RTE" / "train.tsv", b"index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n"
                                 b"1\tcaf\xe9\tb\tentailment\n"),
     r"RTE/train.tsv:3: byte 0xe9 is not UTF-8 text"),
    ("empty tsv file", "rte", "train", lambda d: raw(d / "RTE" / "train.tsv", b""),
     r"RTE/train.tsv: the file is empty"),
    ("header only", "rte", "train", lambda d: write_tsv(d / "RTE" / "train.tsv", RTE, []),
     r"the rte train split is empty"),
    ("short row", "rte", "train", lambda d: write_tsv(
        d / "RTE" / "train.tsv", RTE, [[0, "a", "b", "entailment"], [1, "a", "entailment"]]),
     r"train.tsv:3: 3 tab-separated fields, expected 4"),
    ("wrong header", "rte", "train", lambda d: write_tsv(d / "RTE" / "train.tsv", ["id", "text", "label"],
                                                         [[0, "a", "entailment"]]),
     r"train.tsv:1: no column 'sentence1' in the header"),
    ("row id not an integer", "rte", "train", lambda d: write_tsv(
        d / "RTE" / "train.tsv", RTE, [["x", "a", "b", "entailment"]]), r"train.tsv:2: row id 'x' is not an integer"),
    ("missing GLUE file", "rte", "train", lambda d: None, r"GLUE file not found: .*RTE/train.tsv"),
    ("non-UTF-8 byte in a csv", "rte", "train", lambda d: raw(
        d / "train.csv", b"sentence1,sentence2,label\na,b,0\n\xff,b,1\n") or d / "train.csv",
     r"train.csv:3: byte 0xff is not UTF-8"),
    ("malformed csv", "rte", "train", lambda d: raw(
        d / "train.csv", b'sentence1,sentence2,label\n"a,b,0\nc,d,1\n') or d / "train.csv",
     r"train.csv: not a valid csv file"),
    ("csv without text columns", "rte", "train",
     lambda d: raw(d / "train.csv", b"text,label\na,0\n") or d / "train.csv",
     r"train.csv: needs text columns \['sentence1', 'sentence2'\]"),
    ("invalid JSON line", "rte", "train", lambda d: raw(
        d / "train.jsonl", b'{"sentence1": "a", "sentence2": "b", "label": 0}\n{"sentence1": "a",\n')
     or d / "train.jsonl",
     r"train.jsonl:2: not a JSON line"),
    ("invalid JSON array", "rte", "train", lambda d: raw(d / "train.json", b'[{"sentence1": "a",]') or d / "train.json",
     r"train.json:1: not a valid JSON array of rows"),
    ("csv STS-B score outside", "stsb", "train", lambda d: raw(
        d / "train.csv", b"sentence1,sentence2,label\na,b,7\n") or d / "train.csv",
     r"train.csv: row 1: label '7' is outside \[0, 5\]"),
    ("csv empty training label", "rte", "train", lambda d: raw(
        d / "train.csv", b"sentence1,sentence2,label\na,b,0\nc,d,\n") or d / "train.csv",
     r"train.csv: row 2: empty label"),
    ("unsupported file type", "rte", "train", lambda d: raw(d / "train.txt", b"a b 0\n") or d / "train.txt",
     r"train.txt: unsupported file type '.txt'"),
    ("empty csv file", "rte", "train", lambda d: raw(d / "train.csv", b"\n") or d / "train.csv",
     r"train.csv: the file is empty"),
]


@pytest.mark.parametrize("case, task, kind, writer, message", LOADER_CASES, ids=[c[0] for c in LOADER_CASES])
def test_bad_data_file_is_one_error_naming_file_and_line(case, task, kind, writer, message, tmp_path):
    explicit = writer(tmp_path)
    files = {f"{kind}_file": explicit} if explicit else {}
    with pytest.raises(UsageError, match=message) as info:
        glue_data.load_glue(task, [kind], glue_dir=tmp_path, **files)
    assert "\n" not in str(info.value)
    if re.search(r":\d+: ", message):  # a problem at a line of a data file
        assert isinstance(info.value, DataError)


# ------------------------------------------------------------------------------------------------ before the model


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    return save_tiny(tmp_path_factory.mktemp("models") / "bert", BertForSequenceClassification(tiny_bert_config()))


def error_line(capsys):
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and err.strip().endswith(lines[0]), err[-2000:]
    return lines[0]


def rte_folder(root):
    write_tsv(root / "RTE" / "train.tsv", RTE, [[i, f"A cat {i}.", "A cat.", ["entailment", "not_entailment"][i % 2]]
                                                 for i in range(16)])
    write_tsv(root / "RTE" / "dev.tsv", RTE, [[i, f"A dog {i}.", "A dog.", "entailment"] for i in range(8)])
    return root


# (case, extra flags with OUT / TMP placeholders, expected message, prepare(tmp) -> None)
EARLY_CASES = [
    ("output folder under a file", ["--output_dir", "TMP/file/out"],
     r"error: output folder .*/file/out is not writable",
     lambda t: (t / "file").write_text("x")),
    ("output folder is a file", ["--output_dir", "TMP/file"], r"error: output folder .*/file is not writable",
     lambda t: (t / "file").write_text("x")),
    ("output folder is the data folder", ["--output_dir", "TMP/glue"], r"error: .*/glue is an input of this run",
     None),
    ("missing --lora_path", ["--apply_lora", "--lora_r", 4, "--lora_path", "TMP/nope.pt"],
     r"error: adapter checkpoint .*/nope.pt \(--lora_path / --adapter_path\) does not exist", None),
    ("missing --adapter_path", ["--adapter_path", "TMP/nope"], r"error: adapter checkpoint .*/nope .*does not exist",
     None),
    ("--fp16 and --bf16", ["--fp16", "--bf16"], r"error: .*bf16", None),
    ("rank 0", ["--rank", 0], r"error: --rank must be a positive integer, got 0", None),
    ("alpha nan", ["--adapter_alpha", "nan"], r"error: --adapter_alpha is nan, not a finite number", None),
    ("zero training rows", ["--max_train_samples", 0], r"error: --max_train_samples must be a positive number", None),
    ("unknown task", ["--task_name", "rte2"], r"error: unknown task 'rte2'", None),
    ("a Hub dataset other than GLUE", ["--dataset_name", "imdb"],
     r"error: --dataset_name imdb: only GLUE loads by name here; .*--train_file/--validation_file", None),
    ("two tasks named", ["--dataset_name", "glue", "--dataset_config_name", "mrpc"],
     r"error: --task_name rte and --dataset_config_name mrpc name two tasks", None),
    ("nothing to do", ["--do_train", "false", "--do_eval", "false"], r"error: nothing to do", None),
    ("finished run, no --overwrite_output_dir", [], r"error: .*/out holds a finished run \(eval_results.json\)",
     lambda t: (t / "out").mkdir() or (t / "out" / "eval_results.json").write_text("{}")),
    ("partial --resume_from_checkpoint", ["--resume_from_checkpoint", "TMP/out/checkpoint-3"],
     r"error: --resume_from_checkpoint .*checkpoint-3 is not a complete checkpoint",
     lambda t: partial_checkpoint_dir(t / "out", 3)),
    ("bad STS-B label in the validation file", ["--task_name", "stsb", "--glue_dir", GLUE_DIR, "--validation_file",
                                                "TMP/dev.csv"],
     r"error: .*dev.csv: row 2: label '9' is outside \[0, 5\]",
     lambda t: (t / "dev.csv").write_text("sentence1,sentence2,label\na,b,1\nc,d,9\n")),
]


@pytest.mark.parametrize("case, flags, message, prepare", EARLY_CASES, ids=[c[0] for c in EARLY_CASES])
def test_bad_run_fails_in_seconds_before_the_model_loads(case, flags, message, prepare, bert_dir, tmp_path,
                                                         monkeypatch, capsys):
    def no_model(*a, **kw):
        raise AssertionError("the model was loaded before the problem was found")

    monkeypatch.setattr(run_glue.AutoModelForSequenceClassification, "from_pretrained", no_model)
    rte_folder(tmp_path / "glue")
    if prepare:
        prepare(tmp_path)
    argv = ["--model_name_or_path", bert_dir, "--task_name", "rte", "--glue_dir", tmp_path / "glue", "--output_dir",
            tmp_path / "out", "--do_train", "--do_eval", "--report_to", "none"]
    argv += [str(f).replace("TMP", str(tmp_path)) for f in flags]
    with pytest.raises(SystemExit) as info:
        run_main(lambda: run_glue.main([str(a) for a in argv]))
    assert info.value.code == 2
    assert re.match(message, error_line(capsys)), message
    assert not list(tmp_path.glob("**/eval_results.json")) or case.startswith("finished run")


def test_nan_metric_is_an_error_and_leaves_no_result(tmp_path, capsys):
    """A constant STS-B validation set has no Pearson correlation: no eval_results.json (an old one is removed)."""
    from transformers import RobertaForSequenceClassification

    torch.manual_seed(0)
    model_dir = save_tiny(tmp_path / "roberta", RobertaForSequenceClassification(tiny_roberta_config(num_labels=1)))
    (tmp_path / "dev.csv").write_text("sentence1,sentence2,label\n" + "".join(f"a {i},b,2.5\n" for i in range(6)))
    out = tmp_path / "out"
    out.mkdir()
    (out / "eval_results.json").write_text('{"eval_pearson": 0.9}')  # an earlier run's, not this one's
    with pytest.raises(SystemExit) as info:
        run_main(lambda: run_glue.main(["--model_name_or_path", model_dir, "--task_name", "stsb", "--do_eval",
                                        "--validation_file", str(tmp_path / "dev.csv"), "--output_dir", str(out),
                                        "--report_to", "none"]))
    assert info.value.code == 2
    assert "error: evaluation gave no usable result: eval_pearson is nan" in error_line(capsys)
    assert not (out / "eval_results.json").exists()


# ------------------------------------------------------------------------------------------------ kill and resume

RESUME_ARGS = ["--adapter_name", "lora", "--rank", 4, "--learning_rate", 5e-3, "--num_train_epochs", 2,
               "--max_train_samples", 24, "--max_eval_samples", 24, "--adapter_dropout", 0.1, "--do_train",
               "--do_eval", "--per_device_train_batch_size", 8, "--disable_tqdm", "true", "--report_to", "none"]


def resume_argv(bert_dir, out, *extra):
    return [str(a) for a in ["--model_name_or_path", bert_dir, "--task_name", "rte", "--glue_dir", GLUE_DIR,
                             "--output_dir", out, *RESUME_ARGS, *extra]]


@pytest.fixture(scope="module")
def uninterrupted(bert_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole")
    run_main(lambda: run_glue.main(resume_argv(bert_dir, out)))
    return json.loads((out / "eval_results.json").read_text())


class Killed(BaseException):
    """Stands for a kill: not an Exception, so nothing on the way catches it."""


def kill_on_call(monkeypatch, owner, name, call=1, before=None):
    original, calls = getattr(owner, name), []

    def wrapper(*a, **kw):
        calls.append(1)
        if len(calls) == call:
            if before:
                before(*a, **kw)
            raise Killed
        return original(*a, **kw)

    monkeypatch.setattr(owner, name, wrapper)


def half_written_state(state, path):
    with open(path, "w") as f:
        f.write('{\n  "best_global_step": null,\n  "epoch": 1.0,\n  "glo')  # killed while writing trainer_state.json


def partial_checkpoint_dir(out, step):
    (out / f"checkpoint-{step}").mkdir(parents=True)
    (out / f"checkpoint-{step}" / "config.json").write_text("{}")


# (case, install the kill, checkpoints complete after the kill, what the kill left besides, extra flags on the rerun)
KILL_CASES = [
    ("before the first checkpoint", lambda m: kill_on_call(m, Trainer, "training_step", call=2), [], None, []),
    ("inside the first checkpoint, after the weights", lambda m: kill_on_call(
        m, Trainer, "_save_optimizer_and_scheduler"), [], None, ["--resume"]),
    ("inside trainer_state.json of the first checkpoint", lambda m: kill_on_call(
        m, TrainerState, "save_to_json", before=half_written_state), [], None, []),
    ("right after the first checkpoint", lambda m: kill_on_call(m, Trainer, "training_step", call=4),
     ["checkpoint-3"], None, ["--resume"]),
    ("second checkpoint folder holding only config.json", lambda m: kill_on_call(m, Trainer, "training_step", call=4),
     ["checkpoint-3"], lambda out: partial_checkpoint_dir(out, 6), []),
    ("inside the second checkpoint, after the weights", lambda m: kill_on_call(
        m, Trainer, "_save_optimizer_and_scheduler", call=2), ["checkpoint-3"], None, []),
    ("inside the second checkpoint, at the RNG state", lambda m: kill_on_call(m, Trainer, "_save_rng_state", call=2),
     ["checkpoint-3"], None, ["--resume"]),
    ("after training, before evaluation", lambda m: kill_on_call(m, Trainer, "evaluate"), ["checkpoint-6"], None, []),
]


@pytest.mark.parametrize("case, install, complete, left, rerun_flags", KILL_CASES, ids=[c[0] for c in KILL_CASES])
def test_kill_at_any_point_then_rerun_ends_like_an_uninterrupted_run(case, install, complete, left, rerun_flags,
                                                                      bert_dir, uninterrupted, tmp_path, monkeypatch,
                                                                      caplog):
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        install(m)
        with pytest.raises(Killed):
            run_glue.main(resume_argv(bert_dir, out))
    if left:
        left(out)
    assert not (out / "eval_results.json").exists()
    assert [p.name for p in run_glue.checkpoints(out) if run_glue.checkpoint_is_complete(p)] == complete
    partial = [p for p in run_glue.checkpoints(out) if not run_glue.checkpoint_is_complete(p)]
    run_main(lambda: run_glue.main(resume_argv(bert_dir, out, *rerun_flags)))
    resumed = json.loads((out / "eval_results.json").read_text())
    for key in ("eval_loss", "eval_accuracy", "best_loss", "epoch"):
        assert resumed[key] == pytest.approx(uninterrupted[key], abs=1e-6), key
    if complete:
        assert f"resuming from {out / complete[-1]}" in caplog.text
    for p in partial:
        assert f"skipping incomplete checkpoint {p}" in caplog.text


def test_sigkill_of_a_real_process_then_rerun_ends_like_an_uninterrupted_run(bert_dir, uninterrupted, tmp_path):
    """kill -9 of run_glue.py the moment its first checkpoint folder appears (so mostly inside the write)."""
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONPATH=str(REPO))
    proc = subprocess.Popen([PY, str(REPO / "run_glue.py"), *resume_argv(bert_dir, out)], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while proc.poll() is None and not (out / "checkpoint-3").exists() and time.time() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (out / "eval_results.json").exists()
    run_main(lambda: run_glue.main(resume_argv(bert_dir, out)))
    resumed = json.loads((out / "eval_results.json").read_text())
    for key in ("eval_loss", "eval_accuracy", "epoch"):
        assert resumed[key] == pytest.approx(uninterrupted[key], abs=1e-5), key


def test_overwrite_output_dir_trains_afresh_over_a_finished_run(bert_dir, uninterrupted, tmp_path):
    out = tmp_path / "out"
    run_main(lambda: run_glue.main(resume_argv(bert_dir, out, "--num_train_epochs", 1)))
    run_main(lambda: run_glue.main(resume_argv(bert_dir, out, "--overwrite_output_dir")))
    again = json.loads((out / "eval_results.json").read_text())
    assert again["eval_loss"] == pytest.approx(uninterrupted["eval_loss"], abs=1e-6) and again["epoch"] == 2.0
