"""parse_results.py on a made-up results tree (ROOT/<seed>/<task>/eval_results.json) with a missing seed."""
import csv
import io
import json

import numpy as np
import pytest

import parse_results
from common import run_main
from parse_results import RANDLORA_ORDER

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
    out, err = run([lora, 3, "--std", "sample"], capsys)
    rows = {line.split()[0] + ("" if line.split()[1][0].isdigit() else " " + line.split()[1]): line
            for line in out.splitlines()[2:] if not line.startswith("-")}
    assert rows["rte"].split()[-3:] == ["62.00", "±", "2.00"]  # mean of 60, 62, 64; sample std 2
    assert rows["mrpc"].split()[-4:] == ["82.00", "±", "2.83", "(2/3)"]  # the missing seed is shown
    assert rows["stsb"].split()[-3:] == ["87.00", "±", "2.65"]
    assert rows["mnli m"].split()[-3:] == ["80.00", "±", "0.00"] and rows["mnli mm"].split()[-3] == "82.00"
    # the average gives each task one vote: (82 + 81 [mnli: (80 + 82) / 2] + 87 + 62) / 4; its ± is RandLoRA's, the
    # std of each seed's task average, over the seeds that have every task (1 and 2: mrpc has no seed 3)
    per_seed = [(80 + 85 + 81 + 60) / 4, (84 + 86 + 81 + 62) / 4]
    assert rows["avg"].split()[-8:] == [f"{(82 + 81 + 87 + 62) / 4:.2f}", "±", f"{np.std(per_seed, ddof=1):.2f}",
                                        "(±", "over", "2", "complete", "seeds)"]
    median = run([lora, 3, "--stat", "median"], capsys)[0].splitlines()[-1]
    assert median.split() == ["avg", f"{(82 + 81 + 86 + 62) / 4:.2f}"]  # no ± of per-seed means beside medians
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
    data = json.loads(run([lora, 3, "--format", "json", "--best", "--std", "sample"], capsys)[0])
    rte = data["results"][lora]["rte"]
    assert rte["mean"] == pytest.approx(63.0) and rte["std"] == pytest.approx(2.0) and rte["n"] == 3
    assert data["missing"] == [f"{lora}/3/mrpc/eval_results.json (no such file)"]
    median = json.loads(run([lora, 3, "--format", "json", "--stat", "median"], capsys)[0])
    assert median["results"][lora]["stsb"]["median"] == pytest.approx(86.0)


def test_side_by_side_roots_in_every_format(tree, capsys):
    lora, vera = tree
    out, _ = run([lora, vera, 3, "--format", "markdown", "--std", "sample"], capsys)
    lines = out.splitlines()
    assert lines[0] == "| task | lora8 | vera256 |" and lines[1] == "|---|---:|---:|"
    assert "| rte | 62.00 ± 2.00 | 50.00 ± 0.00 |" in lines
    assert "| mrpc | 82.00 ± 2.83 (2/3) | - |" in lines
    per_seed = [(80 + 85 + 81 + 60) / 4, (84 + 86 + 81 + 62) / 4]  # no ± without a seed that has every task
    spread = np.std(per_seed, ddof=1)
    assert lines[-1] == f"| avg | 78.00 ± {spread:.2f} (± over 2 complete seeds) | 50.00 (1/4 tasks) |"

    table = list(csv.DictReader(io.StringIO(run([lora, vera, 3, "--format", "csv"], capsys)[0])))
    row = next(r for r in table if r["task"] == "rte" and r["root"] == vera)
    assert (float(row["mean"]), float(row["std"]), int(row["n"])) == (50.0, 0.0, 3)

    latex, _ = run([lora, vera, 3, "--format", "latex", "--std", "sample"], capsys)
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


# ------------------------------------------------------------------------------------------------ RandLoRA fidelity

RANDLORA_TREE = {"sst2": [0.90, 0.92], "mrpc": [0.85, 0.87], "cola": [0.60, 0.58], "qnli": [0.91, 0.91],
                 "rte": [0.70, 0.74], "stsb": [0.90, 0.90]}
METRIC = {"cola": "matthews_correlation", "stsb": "combined_score"}


def write_tree(root, values, extra=None):
    for task, per_seed in values.items():
        for seed, value in enumerate(per_seed, 1):
            path = root / str(seed) / task / "eval_results.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            key = METRIC.get(task, "accuracy")
            path.write_text(json.dumps({f"eval_{key}": value, f"best_{key}": value + 0.01, **(extra or {})}))
    return root


def randlora_parser_numbers(root, nseeds):
    """RandLoRA's GLUE/parse_results.py arithmetic (numpy, ddof 0), restated as the oracle."""
    import numpy as np

    tasks = ["sst2", "mrpc", "cola", "qnli", "rte", "stsb"]
    avg = np.array([[100 * json.loads((root / str(s) / t / "eval_results.json").read_text())[
        "eval_" + METRIC.get(t, "accuracy")] for s in range(1, nseeds + 1)] for t in tasks])
    return avg.mean(axis=1), avg.std(axis=1), avg.mean(), avg.mean(axis=0).std()


def test_default_std_is_numpys_population_std_and_the_header_says_so(tree, capsys):
    out, _ = run([tree[0], 3], capsys)
    lines = out.splitlines()
    assert "ddof 0" in lines[1] and "final epoch" in lines[1]
    rte = next(line for line in lines if line.startswith("rte"))
    assert rte.split()[-3:] == ["62.00", "±", "1.63"]  # numpy std of 60, 62, 64 (the sample std would be 2.00)


def test_randlora_layout_matches_its_parser(tmp_path, capsys):
    root = write_tree(tmp_path / "randlora64", RANDLORA_TREE)
    means, stds, avg, avg_std = randlora_parser_numbers(root, 2)
    out, _ = run([root, 2, "--format", "randlora"], capsys)
    header, row = out.splitlines()
    assert header == "sst2 mrpc cola qnli rte stsb avg"
    cells = [f"{m:.1f} $\\pm$ {s:.1f}" for m, s in zip(means, stds, strict=True)] + [f"{avg:.1f} $\\pm$ {avg_std:.1f}"]
    assert row == "randlora64 & " + " & ".join(cells) + " \\\\"
    assert row == ("randlora64 & 91.0 $\\pm$ 1.0 & 86.0 $\\pm$ 1.0 & 59.0 $\\pm$ 1.0 & 91.0 $\\pm$ 0.0 & "
                   "72.0 $\\pm$ 2.0 & 90.0 $\\pm$ 0.0 & 81.5 $\\pm$ 0.5 \\\\")


def test_a_task_set_other_than_randloras_is_said_and_partial_cells_are_marked(tmp_path, capsys):
    """RandLoRA's parser averages exactly its six tasks and stops at a missing run. Here an average over another
    set of task folders (one never run, one extra) says so, and in its layout a cell or an average from fewer seeds
    says which."""
    root = write_tree(tmp_path / "randlora64", {**RANDLORA_TREE, "rte": [0.70], "wnli": [0.40, 0.40]})
    (root / "1" / "rte").rename(root / "1" / "skipped")  # rte never ran; mrpc lacks seed 2 below
    (root / "2" / "mrpc" / "eval_results.json").unlink()
    out, err = run([root, 2, "--format", "randlora"], capsys)
    assert ("note: avg is over the 6 task(s) found (cola sst2 mrpc stsb qnli wnli), without rte and with wnli: not "
            "the average RandLoRA's parser gives") in err
    header, row = out.splitlines()
    assert header == "sst2 mrpc cola qnli stsb wnli avg"
    assert "& 85.0 $\\pm$ 0.0 (1/2) &" in row and row.endswith("(seeds 1) \\\\")
    _, err = run([root, 2, "--tasks", *RANDLORA_ORDER], capsys)  # the set chosen: no note, rte reported missing
    assert "note: avg" not in err and f"{root}/1/rte/eval_results.json (no such file)" in err


def test_paper_randlora_prints_the_published_numbers_and_the_difference(tmp_path, capsys):
    root = write_tree(tmp_path / "randlora64", RANDLORA_TREE)
    out, _ = run([root, 2, "--paper", "randlora"], capsys)
    block = out[out.index("beside RandLoRA paper Table 4"):].splitlines()
    assert block[1].split() == ["sst2", "mrpc", "cola", "qnli", "rte", "stsb", "avg"]
    assert block[2].split() == ["randlora64", "ours", "91.0", "86.0", "59.0", "91.0", "72.0", "90.0", "81.5"]
    assert block[3].split() == ["RandLoRA-64", "92.2", "88.0", "59.4", "91.3", "74.7", "90.3", "82.6"]
    assert block[4].split() == ["diff", "-1.2", "-2.0", "-0.4", "-0.3", "-2.7", "-0.3", "-1.1"]


def test_paper_vera_reports_median_of_best_epochs_and_stsb_pearson(tmp_path, capsys):
    root = tmp_path / "vera1024"
    for seed, (acc, pearson) in enumerate([(0.90, 0.80), (0.94, 0.90), (0.91, 0.85)], 1):
        for task, values in {"sst2": {"accuracy": acc}, "stsb": {"pearson": pearson, "combined_score": 0.1}}.items():
            path = root / str(seed) / task / "eval_results.json"
            path.parent.mkdir(parents=True)
            path.write_text(json.dumps({**{f"eval_{k}": 0.5 for k in values},
                                        **{f"best_{k}": v for k, v in values.items()}}))
    out, _ = run([root, 3, "--paper", "vera", "--tasks", "sst2", "stsb"], capsys)
    lines = out.splitlines()
    assert "median" in lines[1] and "best epoch" in lines[1]
    assert next(line for line in lines if line.startswith("stsb pearson")).split()[2] == "85.00"
    ours = next(line.split() for line in lines if line.split()[1:2] == ["ours"])
    assert ours[:4] == ["vera1024", "ours", "91.0", "-"] and ours[-2] == "85.0"  # median, best epoch, Pearson


def test_e2e_scores_table_and_paper(tmp_path, capsys):
    root = tmp_path / "lora4"
    for seed, bleu in ((1, 0.70), (2, 0.72)):
        (root / str(seed)).mkdir(parents=True)
        (root / str(seed) / "e2e_scores.json").write_text(json.dumps(
            {"BLEU": bleu, "NIST": 8.8, "METEOR": 0.46, "ROUGE_L": 0.71, "CIDEr": 2.5}))
    out, _ = run([root, 2, "--paper", "lora"], capsys)
    table, paper = out.split("beside ")
    rows = {line.split()[0]: line.split()[1:] for line in table.splitlines() if line.strip()}
    assert rows["BLEU"] == ["71.00", "±", "1.00"] and rows["NIST"] == ["8.80", "±", "0.00"]
    assert rows["METEOR"][0] == "46.00" and rows["CIDEr"][0] == "2.50"
    rows = {line.split()[0]: line.split()[1:] for line in paper.splitlines()[2:]}
    assert rows["lora4"] == ["ours", "71.00", "8.80", "46.00", "71.00", "2.50"]
    assert rows["LoRA"] == ["r4", "70.40", "8.85", "46.80", "71.80", "2.53"]
    assert rows["diff"] == ["+0.60", "-0.05", "-0.80", "-0.80", "-0.03"]


def test_score_of_one_run_for_the_sweep_console(tree, tmp_path, capsys):
    lora, _ = tree
    out, _ = run(["--score", f"{lora}/1/rte"], capsys)
    assert out.strip() == "accuracy 60.00"
    bad = tmp_path / "x" / "1" / "rte"
    bad.mkdir(parents=True)
    (bad / "eval_results.json").write_text('{"eval_accuracy": NaN}')
    with pytest.raises(SystemExit) as exit_info:
        run(["--score", bad], capsys)
    assert exit_info.value.code == 2 and "NaN" in capsys.readouterr().err


def test_trivial_baseline_is_the_majority_class_of_the_evaluated_rows(tree, glue_dir, capsys, monkeypatch):
    monkeypatch.setenv("GLUE_DIR", str(glue_dir))
    lora, _ = tree
    for seed in (1, 2, 3):  # the whole RTE dev set: 146 of 277 rows are entailment
        path = __import__("pathlib").Path(lora, str(seed), "rte", "eval_results.json")
        path.write_text(json.dumps({**json.loads(path.read_text()), "eval_samples": 277}))
    out, _ = run([lora, 3, "--tasks", "rte", "stsb", "--baseline"], capsys)
    baselines = out[out.index("trivial baselines"):].splitlines()
    assert baselines[1].split()[:2] == ["rte", f"{100 * 146 / 277:.2f}"] and "\"entailment\"" in baselines[1]
    assert baselines[2].split()[:2] == ["stsb", "0.00"]
