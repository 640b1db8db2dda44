"""Summarize GLUE or E2E runs: mean +- std over seeds per task (or E2E metric), and the average over tasks.

    python parse_results.py ROOT NSEEDS                  # RandLoRA's call; ± is numpy's std (ddof 0), as its parser
    python parse_results.py finetuned_results/lora4 finetuned_results/vera256 5 --format markdown --plot glue.png
    python parse_results.py finetuned_results/randlora64 finetuned_results/lora4 5 --format randlora
    python parse_results.py finetuned_results/vera_paper/vera1024 5 --paper vera   # beside the published numbers
    python parse_results.py e2e_results/lora4 3                                   # E2E: ROOT/<seed>/e2e_scores.json

GLUE: reads ROOT/<seed>/<task>/eval_results.json for seeds 1..NSEEDS (the layout train_all.sh writes, as in
RandLoRA). Reported metric per task: accuracy for sst2 mrpc qnli rte wnli, Matthews correlation for cola, the
Pearson/Spearman mean (combined_score) for stsb, matched and mismatched accuracy for mnli, accuracy and F1 for qqp;
all x100. The average gives every task one vote (a task with two metrics counts their mean).
E2E: reads ROOT/<seed>/e2e_scores.json (e2e_eval.py --output_json, as e2e_all.sh writes it) and reports BLEU, NIST,
METEOR, ROUGE_L and CIDEr in the LoRA paper's style (BLEU, METEOR, ROUGE_L x100).
Runs that are missing or unusable (invalid JSON, a metric that is null, not a number, NaN or infinite) are listed by
path on stderr (unusable ones as a WARNING) and left out; a cell from fewer seeds says how many it has; --strict
makes any of them an error.
"""
import argparse
import json
import math
import sys
from pathlib import Path

from common import UsageError, read_json, run_main
from glue_data import TASKS

# Row labels of two-metric tasks: "mnli m", "mnli mm", "qqp acc", "qqp f1".
ROW_LABELS = {("mnli", "accuracy"): "mnli m", ("mnli", "accuracy_mm"): "mnli mm",
              ("qqp", "accuracy"): "qqp acc", ("qqp", "f1"): "qqp f1"}
RANDLORA_ORDER = ["sst2", "mrpc", "cola", "qnli", "rte", "stsb"]  # the task order of RandLoRA's parse_results.py
E2E_FILE = "e2e_scores.json"
E2E_METRICS = {"BLEU": 100, "NIST": 1, "METEOR": 100, "ROUGE_L": 100, "CIDEr": 1}  # metric -> factor (paper style)
STD_NOTES = {"population": "numpy std, ddof 0, as RandLoRA's parse_results.py", "sample": "sample std, ddof 1"}

# Published numbers (x100) and how each paper reports them. Rows are matched to result folders by method and model
# size (a folder name like randlora64, lora4_large, vera1024).
PAPERS = {
    "randlora": {
        "source": "RandLoRA paper Table 4", "stat": "mean", "best": False, "stsb": "combined_score",
        "how": "mean of 5 seeds, last epoch, STS-B = Pearson/Spearman mean",
        "tasks": RANDLORA_ORDER,
        "rows": {("vera", "base"): ("VeRA-1024", [91.9, 88.4, 59.9, 90.5, 74.9, 90.4, 82.7]),
                 ("lora", "base"): ("LoRA-4", [94.4, 87.3, 58.4, 92.7, 71.5, 90.5, 82.4]),
                 ("randlora", "base"): ("RandLoRA-64", [92.2, 88.0, 59.4, 91.3, 74.7, 90.3, 82.6]),
                 ("vera", "large"): ("VeRA-256", [95.8, 89.3, 65.3, 94.1, 81.6, 91.8, 86.3]),
                 ("lora", "large"): ("LoRA-4", [95.5, 87.2, 64.7, 94.5, 83.6, 91.8, 86.2]),
                 ("randlora", "large"): ("RandLoRA-100", [95.5, 90.1, 67.4, 94.1, 84.5, 91.4, 87.2])}},
    "vera": {
        "source": "VeRA paper Table 2", "stat": "median", "best": True, "stsb": "pearson",
        "how": "median of 5 seeds, best epoch, STS-B = Pearson",
        "tasks": RANDLORA_ORDER,
        "rows": {("lora", "base"): ("LoRA", [95.1, 89.7, 63.4, 93.3, 86.6, 91.5, 86.6]),
                 ("vera", "base"): ("VeRA", [94.6, 89.5, 65.6, 91.8, 78.7, 90.7, 85.2]),
                 ("lora", "large"): ("LoRA", [96.2, 90.2, 68.2, 94.8, 85.2, 92.3, 87.8]),
                 ("vera", "large"): ("VeRA", [96.1, 90.9, 68.0, 94.4, 85.9, 91.7, 87.8])}},
    "lora": {
        "source": "LoRA paper Table 2 (RoBERTa-base)", "stat": "median", "best": True, "stsb": "pearson",
        "how": "median of 5 seeds, best epoch, MNLI matched, QQP accuracy, STS-B = Pearson",
        "tasks": ["mnli", "sst2", "mrpc", "cola", "qnli", "qqp", "rte", "stsb"],
        "rows": {("lora", "base"): ("LoRA", [87.5, 95.1, 89.7, 63.4, 93.3, 90.8, 86.6, 91.5, 87.2]),
                 ("full", "base"): ("FT (avg only)", [None] * 8 + [86.4])}},
}
# E2E test set, GPT-2 medium (BLEU NIST METEOR ROUGE_L CIDEr, paper style); matched by method.
PAPERS_E2E = {
    "lora": {"source": "LoRA paper Table 3 (GPT-2 M)", "how": "mean of 3 seeds",
             "rows": {("lora", "base"): ("LoRA r4", [70.4, 8.85, 46.8, 71.8, 2.53])}},
    "vera": {"source": "VeRA paper Table 3 (GPT-2 M)", "how": "as published",
             "rows": {("vera", "base"): ("VeRA r1024", [70.1, 8.81, 46.6, 71.5, 2.50]),
                      ("lora", "base"): ("LoRA r4", [68.9, 8.69, 46.4, 71.3, 2.51])}},
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("roots", nargs="+", help="result folders (ROOT/<seed>/<task>/eval_results.json, or "
                                                 f"ROOT/<seed>/{E2E_FILE}); several give a side-by-side table")
    parser.add_argument("nseeds", type=int, help="read seeds 1..NSEEDS")
    parser.add_argument("--format", choices=["text", "markdown", "latex", "csv", "json", "randlora"], default="text",
                        help="randlora: RandLoRA's layout, one row per method, one decimal, as LaTeX rows")
    parser.add_argument("--stat", choices=["mean", "median"], default="mean", help="centre of the seeds' values")
    parser.add_argument("--std", choices=["population", "sample"], default="population",
                        help="the ± : population (numpy's default, ddof 0, as RandLoRA's parser) or sample (ddof 1)")
    parser.add_argument("--best", action="store_true", help="report the best epoch (best_*) instead of the last")
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS), help="tasks to report (default: those found)")
    parser.add_argument("--strict", action="store_true", help="exit with an error when any run is missing or unusable")
    parser.add_argument("--plot", metavar="FILE.png", help="also draw a grouped bar chart with std error bars")
    parser.add_argument("--paper", choices=list(PAPERS), help="report as that paper does (its centre, epoch and "
                        "STS-B metric) and print its published numbers beside ours, with the difference per task")
    parser.add_argument("--baseline", action="store_true", help="also print each task's trivial baseline: "
                        "majority-class accuracy on the evaluated dev rows (needs GLUE_DIR), 0 for correlations")
    args = parser.parse_args(argv)
    if args.nseeds < 1:
        raise UsageError(f"NSEEDS must be at least 1, got {args.nseeds}")
    for root in args.roots:
        if not Path(root).is_dir():
            raise UsageError(f"result folder not found: {root}")
    return args


# ------------------------------------------------------------------------------------------------ reading


def metric_value(results, key, path):
    """results[key] x1 as a finite float; None with the reason when it is missing or unusable."""
    if key not in results:
        return None, f"{path} (no key {key})"
    value = results[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None, f"{path} (WARNING: {key} is {json.dumps(value)}, not a number; the run is not usable)"
    if not math.isfinite(value):
        return None, f"{path} (WARNING: {key} is {json.dumps(value)}; the run produced no valid score)"
    return float(value), None


def read_results(path):
    """The JSON object in a results file, or None and the reason it cannot be used."""
    if not path.is_file():
        return None, f"{path} (no such file)"
    try:
        results = read_json(path, "results file")
    except UsageError as e:
        return None, f"{path} (WARNING: {str(e).removeprefix(str(path) + ': ')})"
    if not isinstance(results, dict):
        return None, f"{path} (WARNING: expected a JSON object, got {type(results).__name__})"
    return results, None


def is_e2e(roots, nseeds):
    return any(Path(root, str(seed), E2E_FILE).is_file() for root in roots for seed in range(1, nseeds + 1))


def found_tasks(roots, nseeds):
    """Tasks that have a folder under any root and seed, in the usual GLUE order."""
    present = {p.name for root in roots for seed in range(1, nseeds + 1)
               for p in Path(root, str(seed)).glob("*") if p.is_dir()}
    return [t for t in TASKS if t in present]


def task_set_note(tasks):
    """RandLoRA's parser always averages its six tasks; an average over the task folders found is another number."""
    missing = [t for t in RANDLORA_ORDER if t not in tasks]
    extra = [t for t in tasks if t not in RANDLORA_ORDER]
    parts = ([f"without {' '.join(missing)}"] if missing else []) + ([f"with {' '.join(extra)}"] if extra else [])
    return (f"note: avg is over the {len(tasks)} task(s) found ({' '.join(tasks)}), {' and '.join(parts)}: not the "
            f"average RandLoRA's parser gives over {' '.join(RANDLORA_ORDER)}; --tasks chooses the set")


def report_metrics(task, stsb_metric="combined_score"):
    return (stsb_metric,) if task == "stsb" else TASKS[task].report


def collect(root, nseeds, rows, best):
    """{row key: {seed: value}} for the seeds found, and the list of missing/unusable runs, for one root.

    rows: (row key, file relative to ROOT/<seed>, JSON key, factor) for every reported number."""
    values, missing = {key: {} for key, *_ in rows}, []
    by_file = {}
    for key, rel, json_key, factor in rows:
        by_file.setdefault(rel, []).append((key, json_key, factor))
    for seed in range(1, nseeds + 1):
        for rel, wanted in by_file.items():
            path = Path(root, str(seed), rel)
            results, problem = read_results(path)
            if not problem and "eval_loss" in results:  # a diverged run: its other numbers mean nothing either
                problem = metric_value(results, "eval_loss", path)[1]
            if problem:
                missing.append(problem)
                continue
            for key, json_key, factor in wanted:
                value, problem = metric_value(results, ("best_" if best else "eval_") + json_key
                                              if factor is None else json_key, path)
                if problem:
                    missing.append(problem)
                else:
                    values[key][seed] = value * (100 if factor is None else factor)
    return values, missing


def glue_rows(tasks, stsb_metric):
    """(row key, file, metric, None = GLUE x100 with the eval_/best_ prefix) per reported number."""
    return [((task, metric), f"{task}/eval_results.json", metric, None)
            for task in tasks for metric in report_metrics(task, stsb_metric)]


def e2e_rows():
    return [(("e2e", metric), E2E_FILE, metric, factor) for metric, factor in E2E_METRICS.items()]


# ------------------------------------------------------------------------------------------------ statistics


def summarize(values, stat, std="population"):
    """(centre, std, n) of a list of values; std with ddof 0 (population) or 1 (sample; 0 for one seed)."""
    import numpy as np

    if not values:
        return None
    centre = float(np.median(values) if stat == "median" else np.mean(values))
    ddof = 1 if std == "sample" else 0
    spread = float(np.std(values, ddof=ddof)) if len(values) > ddof else 0.0
    return centre, spread, len(values)


def row_label(key):
    task, metric = key
    if task == "e2e":
        return metric
    if task == "stsb" and metric != "combined_score":
        return f"stsb {metric}"
    return ROW_LABELS.get(key, task)


def build_table(roots, nseeds, row_specs, stat, std, best):
    """Rows of (label, {root: (centre, std, n) or None}) plus, for GLUE, the average row; the values per root;
    and all missing or unusable runs."""
    rows, missing, per_root = [], [], {}
    for root in roots:
        per_root[root], root_missing = collect(root, nseeds, row_specs, best)
        missing += root_missing
    keys = [key for key, *_ in row_specs]
    for key in keys:
        cells = {root: summarize(list(per_root[root][key].values()), stat, std) for root in roots}
        rows.append((row_label(key), cells))
    if keys and keys[0][0] != "e2e":
        rows.append(("avg", {root: task_average(per_root[root], keys, stat, std) for root in roots}))
    return rows, missing, per_root


def seed_task_averages(values, keys):
    """RandLoRA's per-seed averages: for every seed that has all `keys`, the mean over tasks of that seed's values
    (a task's metrics averaged first); returns (those seeds, their averages)."""
    import numpy as np

    tasks = list(dict.fromkeys(task for task, _ in keys))
    seeds = sorted(set.intersection(*(set(values[key]) for key in keys)))
    return seeds, [float(np.mean([np.mean([values[key][s] for key in keys if key[0] == task]) for task in tasks]))
                   for s in seeds]


def task_average(values, keys, stat, std):
    """Average over the tasks that have results: a task's metrics are averaged first, so each task is one vote.
    Its ± is RandLoRA's: the std over seeds of each seed's task average, from the seeds every task has (None when
    no seed has them all); returns (centre, std, n tasks, n seeds behind the std)."""
    import numpy as np

    tasks = list(dict.fromkeys(task for task, _ in keys))
    scores = []
    for task in tasks:
        cells = [summarize(list(values[key].values()), stat, std) for key in keys if key[0] == task]
        if cells and all(cells):
            scores.append(sum(c[0] for c in cells) / len(cells))
    if not scores:
        return None
    _, per_seed = seed_task_averages(values, keys)
    ddof = 1 if std == "sample" else 0
    # A spread of per-seed means belongs beside a mean (a median's average gets none), from enough seeds.
    spread = float(np.std(per_seed, ddof=ddof)) if stat == "mean" and len(per_seed) > ddof and per_seed else None
    return sum(scores) / len(scores), spread, len(scores), len(per_seed)


# ------------------------------------------------------------------------------------------------ formats


def format_cell(cell, nseeds, ntasks, is_average, fmt, digits=2):
    if cell is None:
        return "-"
    centre, std, n = cell[:3]
    pm = " $\\pm$ " if fmt == "latex" else " ± "
    text = f"{centre:.{digits}f}" if std is None else f"{centre:.{digits}f}{pm}{std:.{digits}f}"
    total = ntasks if is_average else nseeds
    if n < total:  # partial: say how much is behind the number
        text += f" ({n}/{total}{' tasks' if is_average else ''})"
    if is_average and std is not None and cell[3] < nseeds:
        text += f" (± over {cell[3]} complete seed{'s' if cell[3] > 1 else ''})"
    return text


def column_names(roots):
    """Short column headers: the folder names when they are distinct, else the paths as given."""
    names = [Path(r).name or str(r) for r in roots]
    return names if len(set(names)) == len(names) else [str(r) for r in roots]


def how_reported(args, e2e):
    scale = "E2E scores (BLEU, METEOR, ROUGE_L x100)" if e2e else "dev-set scores x100"
    epoch = "" if e2e else ", best epoch" if args.best else ", final epoch"
    return f"{scale}; {args.stat} ± std over seeds 1..{args.nseeds} ({STD_NOTES[args.std]}){epoch}"


def render(rows, roots, nseeds, ntasks, fmt, stat, note):
    names = column_names(roots)
    header = ["task"] + names
    body = [[label] + [format_cell(cells[r], nseeds, ntasks, label == "avg", fmt) for r in roots]
            for label, cells in rows]
    if fmt == "csv":
        return render_csv(rows, roots, stat)
    if fmt == "markdown":
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * len(names)) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in body]
        print(f"({note})", file=sys.stderr)
        return "\n".join(lines)
    if fmt == "latex":
        escape = lambda s: s.replace("_", "\\_").replace("%", "\\%")  # noqa: E731
        lines = ["\\begin{tabular}{l" + "r" * len(names) + "}", "\\toprule",
                 " & ".join(escape(h) for h in header) + " \\\\", "\\midrule"]
        for r in body:
            if r[0] == "avg":
                lines.append("\\midrule")
            lines.append(" & ".join(escape(c) if i == 0 else c for i, c in enumerate(r)) + " \\\\")
        lines += ["\\bottomrule", "\\end{tabular}", f"% {note}"]
        return "\n".join(lines)
    widths = [max(len(row[i]) for row in [header] + body) for i in range(len(header))]
    fmt_row = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))  # noqa: E731,E501
    rule = "  ".join("-" * w for w in widths)
    lines = [fmt_row(header), f"{rule}  {note}"]  # the header says how the numbers were made
    for r in body:
        if r[0] == "avg":
            lines.append(rule)
        lines.append(fmt_row(r))
    return "\n".join(lines)


def render_csv(rows, roots, stat):
    import csv
    import io

    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["task", "root", stat, "std", "n"])
    for label, cells in rows:
        for root in roots:
            c = cells[root]
            writer.writerow([label, root] + (["", "", 0] if c is None else
                                             [f"{c[0]:.4f}", "" if c[1] is None else f"{c[1]:.4f}", c[2]]))
    return out.getvalue().rstrip("\n")


def render_randlora(per_root, roots, tasks, nseeds, std):
    """RandLoRA's parse_results.py layout: a task header, then one LaTeX row per method with one decimal; the
    average is the mean of every value, ± the std over seeds of each seed's task average. Its separators fixed:
    `&` between cells (it printed `|`, and nothing after the method name), `$\\pm$` for ±."""
    import numpy as np

    ddof = 1 if std == "sample" else 0
    order = [t for t in RANDLORA_ORDER if t in tasks] + [t for t in tasks if t not in RANDLORA_ORDER]
    lines = [" ".join(order) + " avg"]
    for root, name in zip(roots, column_names(roots), strict=True):
        values = per_root[root]
        cells = []
        for task in order:  # its parser stops at a missing run; here a partial cell says how many seeds it has
            cell = summarize(list(values[(task, report_metrics(task)[0])].values()), "mean", std)
            cells.append("-" if cell is None else f"{cell[0]:.1f} $\\pm$ {cell[1]:.1f}"
                         + (f" ({cell[2]}/{nseeds})" if cell[2] < nseeds else ""))
        complete, per_seed = seed_task_averages(values, [(t, report_metrics(t)[0]) for t in order])
        if complete:
            spread = float(np.std(per_seed, ddof=ddof)) if len(per_seed) > ddof else 0.0
            cells.append(f"{np.mean(per_seed):.1f} $\\pm$ {spread:.1f}"
                         + (f" (seeds {' '.join(map(str, complete))})" if len(complete) < nseeds else ""))
        else:
            cells.append("-")
        lines.append(" & ".join([name.replace("_", "\\_")] + cells) + " \\\\")
    return "\n".join(lines)


def to_json(rows, roots, missing, args, note):
    table = {str(root): {} for root in roots}
    for label, cells in rows:
        for root in roots:
            c = cells[root]
            table[str(root)][label] = None if c is None else {args.stat: c[0], "std": c[1], "n": c[2]}
    return json.dumps({"stat": args.stat, "std": args.std, "best_epoch": args.best, "how": note,
                       "results": table, "missing": missing}, indent=2)


def plot(rows, roots, path, stat, baselines=None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from common import atomic_output

    labels = [label for label, _ in rows]
    names = column_names(roots)
    width = 0.8 / len(roots)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(labels) * max(1, len(roots) / 2)), 4))
    x = np.arange(len(labels))
    for i, root in enumerate(roots):
        centres = [cells[root][0] if cells[root] else np.nan for _, cells in rows]
        errors = [(cells[root][1] or 0) if cells[root] else 0 for _, cells in rows]
        ax.bar(x + (i - (len(roots) - 1) / 2) * width, centres, width, yerr=errors, capsize=3, label=names[i])
    for i, label in enumerate(labels):  # each task's trivial baseline as a dashed line across its bars
        score = (baselines or {}).get(label, (None,))[0]
        if score is not None:
            ax.hlines(score, i - 0.45, i + 0.45, colors="black", linestyles="dashed",
                      label="trivial baseline" if not ax.get_legend_handles_labels()[1].count("trivial baseline")
                      else None)
    ax.set_xticks(x, labels)
    ax.set_ylabel(f"{stat} score, error bars: std over seeds")
    ax.legend(fontsize="small")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ beside a paper


def paper_key(root):
    """(method, size) of a result folder named like randlora64, lora4_large, peft-vera256, full_large."""
    import re

    match = re.match(r"^(?:peft-)?(full|lora|vera|randlora)\d*(_large)?", Path(root).name)
    return (match.group(1), "large" if match.group(2) else "base") if match else None


def render_paper(name, per_root, roots, stat, std, e2e=False):
    paper = PAPERS_E2E[name] if e2e else PAPERS[name]
    tasks = list(E2E_METRICS) if e2e else paper["tasks"]
    header = ["", ""] + tasks + ([] if e2e else ["avg"])
    body = []
    for root, column in zip(roots, column_names(roots), strict=True):
        published = paper["rows"].get(paper_key(root))
        if published is None:
            continue
        ours = []
        for task in tasks:
            key = ("e2e", task) if e2e else (task, report_metrics(task, paper["stsb"])[0])
            cell = summarize(list(per_root[root].get(key, {}).values()), stat, std)
            ours.append(None if cell is None else cell[0])
        found = [v for v in ours if v is not None]
        if not e2e:
            ours.append(sum(found) / len(found) if len(found) == len(tasks) else None)
        show = lambda v: "-" if v is None else f"{v:.{2 if e2e else 1}f}"  # noqa: E731
        body.append([column, "ours"] + [show(v) for v in ours])
        body.append(["", published[0]] + [show(v) for v in published[1]])
        body.append(["", "diff"] + ["-" if o is None or p is None else f"{o - p:+.{2 if e2e else 1}f}"
                                    for o, p in zip(ours, published[1], strict=True)])
    if not body:
        return f"(no result folder matches a row of {paper['source']}: name them like lora4, vera256_large)"
    widths = [max(len(r[i]) for r in [header] + body) for i in range(len(header))]
    lines = [f"beside {paper['source']} ({paper['how']}; ours reported the same way):"]
    for r in [header] + body:
        cells = zip(r, widths, strict=True)
        lines.append("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(cells)))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ baselines


def trivial_baselines(roots, nseeds, tasks):
    """{task: (score x100, how)}: always predicting the evaluated dev rows' majority class; 0 for correlations."""
    from collections import Counter

    from glue_data import load_glue, subsample

    out = {}
    for task in tasks:
        if TASKS[task].labels is None or task == "cola":
            out[task] = (0.0, "correlation of a constant prediction")
            continue
        rows = None
        for root in roots:
            for seed in range(1, nseeds + 1):
                results, _ = read_results(Path(root, str(seed), task, "eval_results.json"))
                if results and isinstance(results.get("eval_samples"), int):
                    rows = results["eval_samples"]
        try:
            split = next(iter(load_glue(task, ["validation"]).values()))
        except Exception as e:  # the data may not be on this machine: the baseline is a courtesy, not the result
            out[task] = (None, f"dev set not readable here ({str(e)[:80]})")
            continue
        split = subsample(split, rows)
        label, count = Counter(split["label"]).most_common(1)[0]
        out[task] = (100 * count / len(split), f'always "{TASKS[task].labels[label]}", {len(split)} dev rows')
    return out


def render_baselines(baselines):
    lines = ["trivial baselines (x100; a score must be clearly above these to show learning):"]
    for task, (score, how) in baselines.items():
        lines.append(f"  {task:<5} {'-' if score is None else f'{score:6.2f}'}  ({how})")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ one run


def run_score(run_dir):
    """The headline score of one finished run (GLUE run folder, or E2E seed folder), for the sweep's console.

    Exits with an error (so the sweep does not count the run as done) when a metric is missing or unusable."""
    run_dir = Path(run_dir)
    if run_dir.name in TASKS:
        path = run_dir / "eval_results.json"
        keys = [("eval_" + m, "accuracy" if m == "accuracy" else m, 100) for m in TASKS[run_dir.name].report]
        keys += [("eval_loss", None, None)]
    else:
        path = run_dir / E2E_FILE
        keys = [(m, m, factor) for m, factor in E2E_METRICS.items()]
    results, problem = read_results(path)
    if problem:
        raise UsageError(problem)
    shown = []
    for key, label, factor in keys:
        if key == "eval_loss" and key not in results:
            continue
        value, problem = metric_value(results, key, path)
        if problem:
            raise UsageError(problem)
        if label:
            shown.append(f"{label} {value * factor:.2f}")
    return " ".join(shown)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--score"]:
        if len(argv) != 2:
            raise UsageError("usage: parse_results.py --score RUN_FOLDER")
        print(run_score(argv[1]))
        return
    args = parse_args(argv)
    e2e = is_e2e(args.roots, args.nseeds)
    if args.paper and not e2e:  # report as the paper does
        args.stat, args.best = PAPERS[args.paper]["stat"], PAPERS[args.paper]["best"]
    stsb = PAPERS[args.paper]["stsb"] if args.paper and not e2e else "combined_score"
    if e2e:
        row_specs = e2e_rows()
    else:
        tasks = args.tasks or found_tasks(args.roots, args.nseeds)
        if not tasks:
            raise UsageError(f"no GLUE task folders or {E2E_FILE} under {' '.join(args.roots)} for seeds "
                             f"1..{args.nseeds} (expected ROOT/<seed>/<task>/eval_results.json)")
        if not args.tasks and set(tasks) != set(RANDLORA_ORDER):
            print(task_set_note(tasks), file=sys.stderr)
        row_specs = glue_rows(tasks, stsb)
    rows, missing, per_root = build_table(args.roots, args.nseeds, row_specs, args.stat, args.std, args.best)
    report_missing(missing, args.strict)
    note = how_reported(args, e2e)
    if args.format == "json":
        print(to_json(rows, args.roots, missing, args, note))
    elif args.format == "randlora":
        if e2e:
            raise UsageError("--format randlora is RandLoRA's GLUE table; use text/markdown/latex/csv/json for E2E")
        print(render_randlora(per_root, args.roots, tasks, args.nseeds, args.std))
    else:
        ntasks = len({key[0] for key, *_ in row_specs})
        print(render(rows, args.roots, args.nseeds, ntasks, args.format, args.stat, note))
    if args.paper and args.format == "text":
        if e2e and args.paper not in PAPERS_E2E:
            raise UsageError(f"no published E2E numbers for --paper {args.paper}; choose {' or '.join(PAPERS_E2E)}")
        print("\n" + render_paper(args.paper, per_root, args.roots, args.stat, args.std, e2e))
    baselines = trivial_baselines(args.roots, args.nseeds, tasks) if args.baseline and not e2e else None
    if baselines and args.format == "text":
        print("\n" + render_baselines(baselines))
    if args.plot:
        plot(rows, args.roots, args.plot, args.stat, baselines)
        print(f"chart: {args.plot}", file=sys.stderr)


def report_missing(missing, strict):
    if not missing:
        return
    warnings = sum("WARNING" in m for m in missing)
    print(f"missing runs ({len(missing)}" + (f", {warnings} UNUSABLE: see WARNING" if warnings else "") + "):",
          file=sys.stderr)
    for m in missing:
        print(f"  {m}", file=sys.stderr)
    if strict:
        raise UsageError(f"{len(missing)} runs missing or unusable (listed above); finish them or drop --strict")


if __name__ == "__main__":
    run_main(main)
