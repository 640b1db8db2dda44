"""Bad result files in front of parse_results.py: one case per row.

Every unusable eval_results.json (NaN, null, a string, invalid JSON, bytes that are not UTF-8, ...) is left out of the
table with a loud WARNING naming the file, never averaged into `nan`; --strict makes it an error; the sweep's
per-run check (--score) refuses it in one line, so train_all.sh does not count that run as done."""
import json

import pytest

import parse_results
from common import run_main

GOOD = b'{"eval_accuracy": 0.7, "eval_loss": 0.5}'
CASES = [  # (case, bytes of seed 2's eval_results.json, loud warning expected)
    ("nan", b'{"eval_accuracy": NaN}', True),
    ("infinity", b'{"eval_accuracy": Infinity}', True),
    ("minus-infinity", b'{"eval_accuracy": -Infinity}', True),
    ("overflow-to-inf", b'{"eval_accuracy": 1e999}', True),
    ("null", b'{"eval_accuracy": null}', True),
    ("string-number", b'{"eval_accuracy": "0.8"}', True),
    ("string-nan", b'{"eval_accuracy": "nan"}', True),
    ("boolean", b'{"eval_accuracy": true}', True),
    ("list", b'{"eval_accuracy": [0.8]}', True),
    ("object", b'{"eval_accuracy": {"value": 0.8}}', True),
    ("nan-loss", b'{"eval_accuracy": 0.8, "eval_loss": NaN}', True),
    ("invalid-json", b"{not json", True),
    ("truncated-json", b'{"eval_accuracy": 0.8', True),
    ("empty-file", b"", True),
    ("not-utf8", b'{"eval_accuracy": 0.8, "note": "\xff\xfe"}', True),
    ("top-level-list", b"[0.8]", True),
    ("top-level-number", b"0.8", True),
    ("missing-key", b'{"eval_loss": 0.5}', False),
    ("folder-not-file", None, False),
]


def run(argv, capsys):
    run_main(lambda: parse_results.main([str(a) for a in argv]))
    captured = capsys.readouterr()
    return captured.out, captured.err


@pytest.fixture(params=CASES, ids=[c[0] for c in CASES])
def bad_tree(request, tmp_path):
    case, content, loud = request.param
    root = tmp_path / "lora8"
    good, bad = root / "1" / "rte" / "eval_results.json", root / "2" / "rte" / "eval_results.json"
    good.parent.mkdir(parents=True)
    good.write_bytes(GOOD)
    bad.parent.mkdir(parents=True)
    if content is None:
        bad.mkdir()
    else:
        bad.write_bytes(content)
    return root, bad, loud


def test_an_unusable_run_is_a_loud_warning_never_a_nan_average(bad_tree, capsys):
    root, bad, loud = bad_tree
    out, err = run([root, 2], capsys)
    row = next(line for line in out.splitlines() if line.startswith("rte"))
    assert row.split()[1:] == ["70.00", "±", "0.00", "(1/2)"]  # seed 1 only, and the table says so
    assert "nan" not in out.lower() and "inf" not in out.lower()
    assert str(bad) in err
    assert ("WARNING" in err) == loud
    assert "Traceback" not in err and len([line for line in err.splitlines() if str(bad) in line]) == 1


def test_strict_and_the_sweep_check_refuse_it_in_one_line(bad_tree, capsys):
    root, bad, _ = bad_tree
    with pytest.raises(SystemExit) as exit_info:
        run([root, 2, "--strict"], capsys)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: 1 runs missing or unusable")
    with pytest.raises(SystemExit) as exit_info:
        run(["--score", bad.parent], capsys)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error: ")
    assert run(["--score", root / "1" / "rte"], capsys)[0].strip() == "accuracy 70.00"


def test_an_unusable_e2e_score_file_is_refused_too(tmp_path, capsys):
    for seed, bleu in ((1, 0.7), (2, float("nan"))):
        (tmp_path / "lora4" / str(seed)).mkdir(parents=True)
        (tmp_path / "lora4" / str(seed) / "e2e_scores.json").write_text(json.dumps(
            {"BLEU": bleu, "NIST": 8.0, "METEOR": 0.4, "ROUGE_L": 0.7, "CIDEr": 2.0}))
    out, err = run([tmp_path / "lora4", 2], capsys)
    assert next(line for line in out.splitlines() if line.startswith("BLEU")).split()[1:] == [
        "70.00", "±", "0.00", "(1/2)"]
    assert "WARNING: BLEU is NaN" in err
    with pytest.raises(SystemExit):
        run(["--score", tmp_path / "lora4" / "2"], capsys)
