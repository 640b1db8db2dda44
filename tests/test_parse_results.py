"""parse_results.py on a made-up results tree (ROOT/<seed>/<task>/eval_results.json) with a missing seed."""
import csv
import io
import json

import pytest

import parse_results
from common import run_main

# seed -> eval values (x100 in the table); best_* values are these + 0.01
LORA = {
    "rte": {"eval_accuracy": [0.60, 0.62, 0.64]},
    "mrpc": {"eval_accuracy": [0.80, 0.84, None]},  # seed 3 missing
    "stsb": {"eval_combined_score": [0.85, 0.86, 0.90]},
    "mnli": {"eval_accuracy": [0.80, 0.80, 0.80], "eval_accuracy_mm": [0.82, 0.82, 0.82]},
}


@pytest.fixture
def tree(tmp_path):
    def make(root, tasks):
        for task, metrics in tasks.items():
            for seed in (1, 2, 3):
                values = {k: v[seed - 1] for k, v in metrics.items()}
                if None in values.values():
                    continue
                path = tmp_path / root / str(seed) / task / "eval_results.json"
                path.parent.mkdir(parents=True)
                best = {"best_" + k[len("eval_"):]: v + 0.01 for k, v in values.items()}
                path.write_text(json.dumps({**values, **best, "eval_loss": 0.5, "best_epoch": 2.0}))
        return str(tmp_path / root)
    return make("lora8", LORA), make("vera256", {"rte": {"eval_accuracy": [0.5, 0.5, 0.5]}})


def run(argv, capsys):
    run_main(lambda: parse_results.main([str(a) for a in argv]))
    captured = capsys.readouterr()
    return captured.out, captured.err


def test_text_table_mean_std_and_missing_runs(tree, capsys):
    lora, _ = tree
    out, err = run([lora, 3], capsys)
    rows = {line.split()[0] + ("" if line.split()[1][0].isdigit() else " " + line.split()[1]): line
            for line in out.splitlines()[2:] if not line.startswith("-")}
    assert rows["rte"].split()[-3:] == ["62.00", "±", "2.00"]  # mean of 60, 62, 64; sample std 2
    assert rows["mrpc"].split()[-4:] == ["82.00", "±", "2.83", "(2/3)"]  # the missing seed is shown
    assert rows["stsb"].split()[-3:] == ["87.00", "±", "2.65"]
    assert rows["mnli m"].split()[-3:] == ["80.00", "±", "0.00"] and rows["mnli mm"].split()[-3] == "82.00"
    # the average gives each task one vote: (82 + 81 [mnli: (80 + 82) / 2] + 87 + 62) / 4
    assert rows["avg"].split()[-1] == f"{(82 + 81 + 87 + 62) / 4:.2f}"
    assert [line.split()[0] for line in out.splitlines()[2:] if not line.startswith("-")] == [
        "mrpc", "stsb", "mnli", "mnli", "rte", "avg"]  # GLUE order
    assert "missing runs (1):" in err and f"{lora}/3/mrpc/eval_results.json (no such file)" in err


def test_strict_makes_missing_runs_an_error(tree, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run([tree[0], 3, "--strict"], capsys)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: 1 runs missing")


def test_json_best_and_median(tree, capsys):
    lora, _ = tree
    data = json.loads(run([lora, 3, "--format", "json", "--best"], capsys)[0])
    rte = data["results"][lora]["rte"]
    assert rte["mean"] == pytest.approx(63.0) and rte["std"] == pytest.approx(2.0) and rte["n"] == 3
    assert data["missing"] == [f"{lora}/3/mrpc/eval_results.json (no such file)"]
    median = json.loads(run([lora, 3, "--format", "json", "--stat", "median"], capsys)[0])
    assert median["results"][lora]["stsb"]["median"] == pytest.approx(86.0)


def test_side_by_side_roots_in_every_format(tree, capsys):
    lora, vera = tree
    out, _ = run([lora, vera, 3, "--format", "markdown"], capsys)
    lines = out.splitlines()
    assert lines[0] == "| task | lora8 | vera256 |" and lines[1] == "|---|---:|---:|"
    assert "| rte | 62.00 ± 2.00 | 50.00 ± 0.00 |" in lines
    assert "| mrpc | 82.00 ± 2.83 (2/3) | - |" in lines
    assert lines[-1] == "| avg | 78.00 | 50.00 (1/4 tasks) |"

    table = list(csv.DictReader(io.StringIO(run([lora, vera, 3, "--format", "csv"], capsys)[0])))
    row = next(r for r in table if r["task"] == "rte" and r["root"] == vera)
    assert (float(row["mean"]), float(row["std"]), int(row["n"])) == (50.0, 0.0, 3)

    latex, _ = run([lora, vera, 3, "--format", "latex"], capsys)
    assert latex.startswith("\\begin{tabular}{lrr}") and "rte & 62.00 $\\pm$ 2.00 & 50.00 $\\pm$ 0.00 \\\\" in latex


def test_plot_writes_a_png(tree, tmp_path, capsys):
    run([*tree, 3, "--plot", tmp_path / "plots" / "glue.png"], capsys)
    assert (tmp_path / "plots" / "glue.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_roots_and_unreadable_files(tmp_path, capsys):
    with pytest.raises(SystemExit):
        run([tmp_path / "nope", 3], capsys)
    assert "error: result folder not found" in capsys.readouterr().err
    (tmp_path / "r" / "1" / "rte").mkdir(parents=True)
    (tmp_path / "r" / "1" / "rte" / "eval_results.json").write_text("{not json")
    (tmp_path / "r" / "2" / "rte").mkdir(parents=True)
    (tmp_path / "r" / "2" / "rte" / "eval_results.json").write_text('{"eval_loss": 1.0}')
    out, err = run([tmp_path / "r", 2], capsys)
    assert "not valid JSON" in err and "(no key eval_accuracy)" in err
    assert out.splitlines()[2].split() == ["rte", "-"]
