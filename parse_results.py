"""Summarize GLUE runs: mean +- std over seeds per task, and the average over tasks.

    python parse_results.py ROOT NSEEDS
    python parse_results.py finetuned_results/lora4 finetuned_results/vera256 5 --format markdown --plot glue.png

Reads ROOT/<seed>/<task>/eval_results.json for seeds 1..NSEEDS (the layout train_all.sh writes, as in RandLoRA).
Reported metric per task: accuracy for sst2 mrpc qnli rte wnli, Matthews correlation for cola, the Pearson/Spearman
mean (combined_score) for stsb, matched and mismatched accuracy for mnli, accuracy and F1 for qqp; all x100.
The average gives every task one vote (a task with two metrics counts their mean). Runs that are missing are
listed by path on stderr and marked in the table with the number of seeds found; --strict makes them an error.
"""
import argparse
import json
import sys
from pathlib import Path

from common import UsageError, run_main
from glue_data import TASKS


# Row labels of two-metric tasks: "mnli m", "mnli mm", "qqp acc", "qqp f1".
ROW_LABELS = {("mnli", "accuracy"): "mnli m", ("mnli", "accuracy_mm"): "mnli mm",
              ("qqp", "accuracy"): "qqp acc", ("qqp", "f1"): "qqp f1"}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("roots", nargs="+", help="result folders (ROOT/<seed>/<task>/eval_results.json); "
                                                 "several give a side-by-side table")
    parser.add_argument("nseeds", type=int, help="read seeds 1..NSEEDS")
    parser.add_argument("--format", choices=["text", "markdown", "latex", "csv", "json"], default="text")
    parser.add_argument("--stat", choices=["mean", "median"], default="mean",
                        help="centre of the seeds' values; the spread is always the standard deviation")
    parser.add_argument("--best", action="store_true", help="report the best epoch (best_*) instead of the last")
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS), help="tasks to report (default: those found)")
    parser.add_argument("--strict", action="store_true", help="exit with an error when any run is missing")
    parser.add_argument("--plot", metavar="FILE.png", help="also draw a grouped bar chart with std error bars")
    args = parser.parse_args(argv)
    if args.nseeds < 1:
        raise UsageError(f"NSEEDS must be at least 1, got {args.nseeds}")
    for root in args.roots:
        if not Path(root).is_dir():
            raise UsageError(f"result folder not found: {root}")
    return args


def found_tasks(roots, nseeds):
    """Tasks that have a folder under any root and seed, in the usual GLUE order."""
    present = {p.name for root in roots for seed in range(1, nseeds + 1)
               for p in Path(root, str(seed)).glob("*") if p.is_dir()}
    return [t for t in TASKS if t in present]


def collect(root, nseeds, tasks, best):
    """{(task, metric): [x100 values of the seeds found]} and the list of missing runs for one root."""
    prefix = "best_" if best else "eval_"
    values, missing = {}, []
    for task in tasks:
        for metric in TASKS[task].report:
            values[(task, metric)] = []
        for seed in range(1, nseeds + 1):
            path = Path(root, str(seed), task, "eval_results.json")
            if not path.is_file():
                missing.append(f"{path} (no such file)")
                continue
            try:
                results = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                missing.append(f"{path} (not valid JSON: {e})")
                continue
            for metric in TASKS[task].report:
                if prefix + metric in results:
                    values[(task, metric)].append(100 * float(results[prefix + metric]))
                else:
                    missing.append(f"{path} (no key {prefix + metric})")
    return values, missing


def summarize(values, stat):
    """(centre, std, n) of a list of values; std is the sample standard deviation (0 for one seed)."""
    import numpy as np

    if not values:
        return None
    centre = float(np.median(values) if stat == "median" else np.mean(values))
    std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return centre, std, len(values)


def build_table(roots, nseeds, tasks, stat, best):
    """Rows of (label, {root: (centre, std, n) or None}) plus the average row, and all missing runs."""
    rows, missing, per_root = [], [], {}
    for root in roots:
        values, root_missing = collect(root, nseeds, tasks, best)
        per_root[root] = values
        missing += root_missing
    for task in tasks:
        for metric in TASKS[task].report:
            label = ROW_LABELS.get((task, metric), task)
            rows.append((label, {root: summarize(per_root[root][(task, metric)], stat) for root in roots}))
    # Average over the tasks that have results: a task's metrics are averaged first, so each task is one vote.
    average = {}
    for root in roots:
        task_scores = []
        for task in tasks:
            cells = [summarize(per_root[root][(task, m)], stat) for m in TASKS[task].report]
            if all(cells):
                task_scores.append(sum(c[0] for c in cells) / len(cells))
        average[root] = (sum(task_scores) / len(task_scores), None, len(task_scores)) if task_scores else None
    rows.append(("avg", average))
    return rows, missing


def format_cell(cell, nseeds, ntasks, is_average, fmt):
    if cell is None:
        return "-"
    centre, std, n = cell
    pm = " $\\pm$ " if fmt == "latex" else " ± "
    text = f"{centre:.2f}" if is_average else f"{centre:.2f}{pm}{std:.2f}"
    total = ntasks if is_average else nseeds
    if n < total:  # partial: say how much is behind the number
        text += f" ({n}/{total}{' tasks' if is_average else ''})"
    return text


def column_names(roots):
    """Short column headers: the folder names when they are distinct, else the paths as given."""
    names = [Path(r).name or str(r) for r in roots]
    return names if len(set(names)) == len(names) else [str(r) for r in roots]


def render(rows, roots, nseeds, ntasks, fmt, stat):
    names = column_names(roots)
    header = ["task"] + names
    body = [[label] + [format_cell(cells[r], nseeds, ntasks, label == "avg", fmt) for r in roots]
            for label, cells in rows]
    if fmt == "csv":
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
    if fmt == "markdown":
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * len(names)) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in body]
        return "\n".join(lines)
    if fmt == "latex":
        escape = lambda s: s.replace("_", "\\_").replace("%", "\\%")  # noqa: E731
        lines = ["\\begin{tabular}{l" + "r" * len(names) + "}", "\\toprule",
                 " & ".join(escape(h) for h in header) + " \\\\", "\\midrule"]
        for r in body:
            if r[0] == "avg":
                lines.append("\\midrule")
            lines.append(" & ".join(escape(c) if i == 0 else c for i, c in enumerate(r)) + " \\\\")
        lines += ["\\bottomrule", "\\end{tabular}"]
        return "\n".join(lines)
    widths = [max(len(row[i]) for row in [header] + body) for i in range(len(header))]
    fmt_row = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731,E501
    lines = [fmt_row(header), "  ".join("-" * w for w in widths)]
    for r in body:
        if r[0] == "avg":
            lines.append("  ".join("-" * w for w in widths))
        lines.append(fmt_row(r))
    return "\n".join(lines)


def to_json(rows, roots, missing, stat):
    table = {str(root): {} for root in roots}
    for label, cells in rows:
        for root in roots:
            c = cells[root]
            table[str(root)][label] = None if c is None else {stat: c[0], "std": c[1], "n": c[2]}
    return json.dumps({"stat": stat, "results": table, "missing": missing}, indent=2)


def plot(rows, roots, path, stat):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labels = [label for label, _ in rows]
    names = column_names(roots)
    width = 0.8 / len(roots)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(labels) * max(1, len(roots) / 2)), 4))
    x = np.arange(len(labels))
    for i, root in enumerate(roots):
        centres = [cells[root][0] if cells[root] else np.nan for _, cells in rows]
        errors = [(cells[root][1] or 0) if cells[root] else 0 for _, cells in rows]
        ax.bar(x + (i - (len(roots) - 1) / 2) * width, centres, width, yerr=errors, capsize=3, label=names[i])
    ax.set_xticks(x, labels)
    ax.set_ylabel(f"{stat} score (x100), error bars: std over seeds")
    ax.legend(fontsize="small")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    tasks = args.tasks or found_tasks(args.roots, args.nseeds)
    if not tasks:
        raise UsageError(f"no GLUE task folders under {' '.join(args.roots)} for seeds 1..{args.nseeds} "
                         "(expected ROOT/<seed>/<task>/eval_results.json)")
    rows, missing = build_table(args.roots, args.nseeds, tasks, args.stat, args.best)
    if missing:
        print(f"missing runs ({len(missing)}):", file=sys.stderr)
        for m in missing:
            print(f"  {m}", file=sys.stderr)
        if args.strict:
            raise UsageError(f"{len(missing)} runs missing (listed above); finish them or drop --strict")
    if args.format == "json":
        print(to_json(rows, args.roots, missing, args.stat))
    else:
        print(render(rows, args.roots, args.nseeds, len(tasks), args.format, args.stat))
    if args.plot:
        plot(rows, args.roots, args.plot, args.stat)
        print(f"plot written to {args.plot}", file=sys.stderr)


if __name__ == "__main__":
    run_main(main)
