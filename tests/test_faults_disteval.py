"""run_distributed_eval.py under hostile input and faults (issue 11): one row per case.

Every row must end with a non-zero exit, one `error:` line naming the problem (last on stderr, no traceback),
every input file byte-for-byte as it was, and no result in --save_dir that a reader could take for this run's.
Most rows fail before the model loads; the rows that need a model use a tiny random BART.
"""
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import pytest
from conftest import DATA_DIR

import run_distributed_eval as rde
from bench.bench_distributed_eval import save_random_bart
from common import run_main

WMT_DIR = DATA_DIR / "seq2seq" / "wmt_en_ro"
RESULT_NAMES = ("val_bleu.json", "val_rouge.json", "val_generations.txt", "pseudolabel_results.json")


@pytest.fixture(scope="module")
def bart_dir(tmp_path_factory):
    return save_random_bart(tmp_path_factory.mktemp("tiny_bart"), d_model=16, layers=1, init_std=0.5)


def wmt_pair(data, n=4):
    """The first n WMT en-ro val pairs as val.source / val.target."""
    data.mkdir(exist_ok=True)
    for ext in ("source", "target"):
        lines = (WMT_DIR / f"val.{ext}").read_text(encoding="utf-8").splitlines()[:n]
        (data / f"val.{ext}").write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def write(path, content):
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)


def json_lines(*records):
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)


def previous_results(save_dir):
    """What an earlier, successful run left in --save_dir."""
    write(save_dir / "val_bleu.json", json.dumps({"bleu": 99.9, "n_obs": 4, "n_gpus": 1}))
    write(save_dir / "val_generations.txt", "OLD\n" * 4)


# Each row: id, setup(tmp, data, out) -> extra command-line flags, error pattern. The base command is
# --model_name <tiny BART> --data_dir data --save_dir out --type_path val --task translation --n_obs 4 --bs 2.
CASES = [
    # Worst first: an input overwritten (the legacy --debug cut the references to --n_obs lines and exited 0).
    ("debug-save-dir-is-data-dir", lambda t, d, o: (wmt_pair(d), ["--save_dir", d, "--debug"])[1],
     r"--debug writes val.target into --save_dir .* which holds this run's references"),
    ("debug-save-dir-links-to-data-dir", lambda t, d, o: (wmt_pair(d), os.symlink(d, t / "link"),
                                                          ["--save_dir", t / "link", "--debug"])[2],
     r"--debug writes val.target into --save_dir .* which holds this run's references"),
    # Stale results: the run fails after it started; the earlier run's files must not pass for this one's.
    ("stale-results-model-missing", lambda t, d, o: (wmt_pair(d), previous_results(o),
                                                     ["--model_name", t / "no_model"])[2],
     r"cannot load --model_name .*no_model"),
    ("stale-results-model-config-not-json", lambda t, d, o: (wmt_pair(d), previous_results(o),
                                                             write(t / "m" / "config.json", "{"),
                                                             ["--model_name", t / "m"])[3],
     r"cannot load --model_name .*not a valid JSON"),
    ("stale-results-generate-refuses", lambda t, d, o: (wmt_pair(d), previous_results(o),
                                                        ["--do_sample=true", "--temperature=-1.0"])[2],
     r"model.generate refused the generate options"),
    # Text that is not UTF-8, JSON that is not JSON or not the expected shape.
    ("source-not-utf8", lambda t, d, o: (wmt_pair(d), write(d / "val.source", b"ok\n\xff\xfe bad\nx\ny\n"), [])[2],
     r"val.source:2: byte 0xff is not UTF-8 text"),
    ("target-not-utf8", lambda t, d, o: (wmt_pair(d), write(d / "val.target", b"\xe9t\xe9\nb\nc\nd\n"), [])[2],
     r"val.target:1: byte 0xe9 is not UTF-8 text"),
    ("json-not-utf8", lambda t, d, o: (write(d / "val.json", b'{"document": "caf\xe9", "summary": "x"}\n'),
                                       ["--task", "summarization"])[1],
     r"val.json:1: byte 0xe9 is not UTF-8"),
    ("json-line-invalid", lambda t, d, o: (write(d / "val.json", json_lines(
        {"translation": {"en": "a", "ro": "b"}}, '{"translation": {"en": "c"')), ["--task", "translation_en_to_ro"])[1],
     r"val.json:2: not a JSON line"),
    ("json-line-not-object", lambda t, d, o: (write(d / "val.json", json_lines(["a", "b"])), [])[1],
     r"val.json:1: expected a JSON object, got list"),
    ("json-text-is-null", lambda t, d, o: (write(d / "val.json", json_lines({"document": None, "summary": "s"})),
                                           ["--task", "summarization"])[1],
     r"val.json:1: 'document' is NoneType, expected text"),
    ("json-translation-not-object", lambda t, d, o: (write(d / "val.json", json_lines({"translation": "en ro"})),
                                                     ["--task", "translation_en_to_ro"])[1],
     r"val.json:1: 'translation' must be an object"),
    ("json-key-missing", lambda t, d, o: (write(d / "val.json", json_lines({"text": "a", "summary": "s"})),
                                          ["--task", "summarization"])[1],
     r"val.json:1: has no 'document' \(it has \['summary', 'text'\]\); set --source_key"),
    # Empty or misshapen files.
    ("source-and-target-empty", lambda t, d, o: (write(d / "val.source", ""), write(d / "val.target", ""), [])[2],
     r"has no val examples \(val.source is empty\)"),
    ("json-empty", lambda t, d, o: (write(d / "val.json", ""), [])[1], r"has no val examples \(val.json is empty\)"),
    ("json-blank-lines-only", lambda t, d, o: (write(d / "val.jsonl", "\n \n"), [])[1],
     r"has no val examples \(val.jsonl is empty\)"),
    ("target-has-fewer-lines", lambda t, d, o: (wmt_pair(d), write(d / "val.target", "a\nb\nc\n"), [])[2],
     r"val.source has 4 lines but .*val.target has 3; they must be line-aligned"),
    ("source-is-a-folder", lambda t, d, o: ((d / "val.source").mkdir(parents=True), write(d / "val.target", "a\n"),
                                            [])[2],
     r"source file .*val.source is a folder"),
    # Output folder and flags that cannot work.
    ("save-dir-is-a-file", lambda t, d, o: (wmt_pair(d), write(t / "file", "x"), ["--save_dir", t / "file"])[2],
     r"output folder .*file is not writable"),
    ("save-dir-unwritable", lambda t, d, o: (wmt_pair(d), ["--save_dir", "/proc/no_such_dir/out"])[1],
     r"output folder /proc/no_such_dir/out is not writable"),
    ("type-path-is-a-path", lambda t, d, o: (wmt_pair(d), ["--type_path", "../val"])[1],
     r"--type_path '../val' is a split name"),
    ("n-obs-zero", lambda t, d, o: (wmt_pair(d), ["--n_obs", "0"])[1], r"--n_obs must be positive"),
    ("num-beams-zero", lambda t, d, o: (wmt_pair(d), ["--num_beams=0"])[1],
     r"--num_beams=0: must be a whole number of at least 1"),
    ("max-length-fraction", lambda t, d, o: (wmt_pair(d), ["--max_length=2.5"])[1],
     r"--max_length=2.5: must be a whole number"),
    ("adapter-not-an-adapter", lambda t, d, o: (wmt_pair(d), write(t / "adapter" / "x.txt", "x"),
                                                ["--adapter_path", t / "adapter"])[2],
     r"adapter"),
]


def fingerprint(folder):
    """Every file under `folder` with its SHA-256: inputs must come out of a failed run untouched."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


@pytest.mark.parametrize("setup, pattern", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_fault_gives_one_error_line_and_leaves_nothing_stale(setup, pattern, tmp_path, bart_dir, monkeypatch,
                                                             capsys):
    data, out = tmp_path / "data", tmp_path / "out"
    data.mkdir()
    extra = [str(x) for x in setup(tmp_path, data, out)]
    inputs_before = fingerprint(data)
    had_previous = (out / "val_bleu.json").exists()
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    argv = ["--model_name", str(bart_dir), "--data_dir", str(data), "--save_dir", str(out), "--type_path", "val",
            "--task", "translation", "--n_obs", "4", "--bs", "2", "--max_length=8", *extra]
    with pytest.raises(SystemExit) as exit_info:
        run_main(rde.main, argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert "Traceback" not in err
    assert [line for line in lines if line.startswith("error: ")] == [lines[-1]], err[-2000:]
    assert len(lines[-1]) < 400
    assert re.search(pattern, lines[-1]), lines[-1]
    assert fingerprint(data) == inputs_before  # inputs untouched
    save_dirs = {out, data} | ({Path(extra[extra.index("--save_dir") + 1])} if "--save_dir" in extra else set())
    for folder in save_dirs:
        if folder.is_dir():  # no result file of this (failed) run under a result name
            assert not [p.name for p in folder.iterdir() if p.name in RESULT_NAMES], list(folder.iterdir())
    if had_previous:  # the earlier run's results are kept, under names no reader takes for this run's
        assert json.loads((out / "val_bleu.json.previous").read_text())["bleu"] == 99.9
        assert (out / "val_generations.txt.previous").read_text() == "OLD\n" * 4


def test_matrix_has_one_row_per_case():
    assert len(CASES) >= 15 and len({c[0] for c in CASES}) == len(CASES)


def test_save_dir_equal_to_data_dir_without_debug_keeps_the_references(tmp_path, bart_dir, monkeypatch):
    """Results may go into the data folder; the references stay byte for byte, and the next run's success
    replaces the previous results and deletes the set-aside copies."""
    data = tmp_path / "data"
    wmt_pair(data)
    previous_results(data)
    before = (data / "val.target").read_bytes()
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    run_main(rde.main, ["--model_name", str(bart_dir), "--data_dir", str(data), "--save_dir", str(data),
                        "--type_path", "val", "--task", "translation", "--bs", "2", "--max_length=8"])
    assert (data / "val.target").read_bytes() == before
    metrics = json.loads((data / "val_bleu.json").read_text())
    assert metrics["n_obs"] == 4 and metrics["bleu"] != 99.9
    assert len((data / "val_generations.txt").read_text().splitlines()) == 4
    assert not list(data.glob("*.previous")) and not list(data.glob(".tmp_*"))
    shutil.rmtree(data)
