"""Every benchmark shape of bench_adapters.py in one command, and the README's table from its results.

Runs bench_adapters.py for each shape (MiniLM, GPT-2-small, GPT-2-medium) in fp32 and in bf16 autocast, each
without dropout and with dropout 0.1, plus each shape compiled (fp32, dropout 0.1; timed beside the same
models eager, so compiled / eager is measured side by side too), each cell in its own process writing
bench/results/adapters_<cell>.json; then prints one markdown table of ours / PEFT (saved for backward, peak RSS,
speed) from whatever JSON files exist. Cells whose JSON exists are skipped (delete it to measure again).

    python bench/adapter_matrix.py                 # all cells, two at a time, one thread each, CPU clock
    python bench/adapter_matrix.py --rss_only      # then the peak-RSS column again, pairs only (no idle machine needed)
    python bench/adapter_matrix.py --table_only    # just the table from bench/results/
    python bench/adapter_matrix.py --table_only --compact   # the README's form: 'saved for backward / speed'
    python bench/adapter_matrix.py --device cuda --parallel 1   # on a GPU (bf16 cells at batch 64 / 8 x 512)
    python bench/adapter_matrix.py --results DIR --model_path M --random_weights   # elsewhere; MiniLM from M's config
"""
import argparse
import json
import os
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")  # --results overrides
SHAPES = ["minilm", "gpt2-small", "gpt2-medium"]
SETTINGS = [("fp32", 0.0), ("fp32", 0.1), ("bf16", 0.0), ("bf16", 0.1)]
METHODS = [("lora", "LoRA"), ("vera", "VeRA r256"), ("vera1024", "VeRA r1024"), ("randlora", "RandLoRA")]
PAIRS = "ours-lora,peft-lora,ours-vera,peft-vera,ours-randlora,peft-randlora"
GPT2_PAIRS = PAIRS + ",ours-vera1024,peft-vera1024"
SHAPE_PAIRS = {"minilm": PAIRS, "gpt2-small": GPT2_PAIRS, "gpt2-medium": GPT2_PAIRS}
SHAPE_NAMES = {"minilm": "MiniLM", "gpt2-small": "GPT-2-small", "gpt2-medium": "GPT-2-medium"}


def cells(args):
    out = []
    for shape in SHAPES:
        for precision, dropout in SETTINGS:
            name = f"{args.device}_{shape}_{precision}_{dropout:g}"
            flags = ["--shape", shape, "--adapter_dropout", str(dropout)] + (["--bf16"] if precision == "bf16" else [])
            if args.device == "cuda" and precision == "bf16":  # the sizes users train at on a GPU
                flags += ["--batch_size", "64"] if shape == "minilm" else ["--seq_len", "512"]
            out.append((name, flags))
    for shape in SHAPES:  # compiled, with the same models eager in the same rounds; compiling runs past one step
        out.append((f"{args.device}_{shape}_compiled_fp32_0.1", ["--shape", shape, "--adapter_dropout", "0.1",
                                                                "--compile", "--with_eager", "--skip_saved",
                                                                "--skip_rss", "--warmup", "3"]))
    return out


def run_cell(name, flags, args):
    if args.rss_only:  # a later pass for the peak-RSS column alone (memory needs no idle machine)
        if "--compile" in flags:
            return f"{name}: no RSS pass for compiled cells", True
        name, flags = f"rss_{name}", [*flags, "--skip_saved", "--skip_speed", "--configs", SHAPE_PAIRS[flags[1]]]
    path = os.path.join(args.results, f"adapters_{name}.json")
    if os.path.exists(path):
        return f"{name}: kept (exists)", True
    cmd = [sys.executable, os.path.join(HERE, "bench_adapters.py"), *flags, "--device", args.device,
           "--json_out", path, "--skip_inference", "--rounds", str(args.rounds)]
    if flags[1] == "minilm" and args.model_path:
        cmd += ["--model_path", args.model_path] + (["--random_weights"] if args.random_weights else [])
    cmd += ["--clock", "cpu", "--threads", "1"] if args.device == "cpu" else []
    cmd += ["--configs", SHAPE_PAIRS[flags[1]]] if "--compile" in flags else []
    cmd += shlex.split(args.bench_args)  # last, so they override the cell's own
    log = os.path.join(args.results, f"adapters_{name}.log")
    with open(log, "w") as f:
        status = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    return f"{name}: {'done' if status == 0 else f'FAILED ({status}), see {log}'}", status == 0


def table(results, device, compact=False):
    measure = "" if compact else " measure |"  # compact: one row per cell, 'saved / speed'
    rows = ["| shape | precision, dropout |" + measure + " " + " | ".join(m for _, m in METHODS) + " |",
            "|---|---|" + ("---|" if measure else "") + "---:|" * len(METHODS)]
    for shape in SHAPES:
        for precision, dropout in [*SETTINGS, ("compiled fp32", 0.1)]:
            tag = precision.replace(" ", "_")
            path = os.path.join(results, f"adapters_{device}_{shape}_{tag}_{dropout:g}.json")
            if not os.path.exists(path):
                continue
            with open(path) as f:
                ratios = json.load(f)["ours_over_peft"]
            rss_path = os.path.join(results, f"adapters_rss_{device}_{shape}_{tag}_{dropout:g}.json")
            if os.path.exists(rss_path):  # the separate peak-RSS pass replaces the first pass's column
                with open(rss_path) as f:
                    for method, row in json.load(f)["ours_over_peft"].items():
                        ratios.setdefault(method, {})["peak"] = row["peak"]
            if compact:  # one row per cell: saved for backward / speed
                cells_ = " | ".join(" / ".join("–" if ratios.get(m, {}).get(k) is None else f"{ratios[m][k]:.3f}"
                                               for k in ("saved", "speed")) if m in ratios else "–" for m, _ in METHODS)
                rows.append(f"| {SHAPE_NAMES[shape]} | {precision}, {dropout:g} | {cells_} |")
                continue
            peak = "peak RSS" if device == "cpu" else "peak allocated"
            for key, label in (("saved", "saved for backward"), ("peak", peak), ("speed", "speed")):
                vals = [ratios.get(m, {}).get(key) for m, _ in METHODS]
                if all(v is None for v in vals):
                    continue
                cells_ = " | ".join("–" if v is None else f"{v:.3f}" for v in vals)
                rows.append(f"| {SHAPE_NAMES[shape]} | {precision}, {dropout:g} | {label} | {cells_} |")
    return "\n".join(rows)


def compiled_vs_eager(results, device):
    """One line per compiled cell: each configuration's compiled / eager speed, measured in the same rounds."""
    lines = []
    for shape in SHAPES:
        path = os.path.join(results, f"adapters_{device}_{shape}_compiled_fp32_0.1.json")
        if os.path.exists(path):
            with open(path) as f:
                gain = json.load(f).get("compiled_over_eager")
            if gain:
                lines.append(f"{SHAPE_NAMES[shape]} compiled / eager (fp32, 0.1): "
                             + ", ".join(f"{n} {r:.3f}" for n, r in gain.items()))
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--parallel", type=int, default=2, help="cells at once (CPU: one thread each)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--only", default=None, help="comma-separated substrings: run only the cells whose name has one")
    p.add_argument("--table_only", action="store_true")
    p.add_argument("--rss_only", action="store_true", help="a pass measuring only peak RSS (ours and PEFT pairs)")
    p.add_argument("--compact", action="store_true", help="table cells 'saved for backward / speed'")
    p.add_argument("--results", default=RESULTS, help="where each cell's JSON and log go (and the table is read)")
    p.add_argument("--model_path", default=None, help="the MiniLM cells' model (default: bench_adapters.py's)")
    p.add_argument("--random_weights", action="store_true", help="the MiniLM cells: --model_path's shape alone")
    p.add_argument("--bench_args", default="", help="more bench_adapters.py flags for every cell, e.g. a tiny "
                                                    "smoke run: '--batch_size 2 --seq_len 16 --steps 1'")
    args = p.parse_args(argv)
    os.makedirs(args.results, exist_ok=True)
    failed = 0
    if not args.table_only:
        todo = [c for c in cells(args) if not args.only or any(s in c[0] for s in args.only.split(","))]
        with ThreadPoolExecutor(args.parallel) as pool:
            for line, ok in pool.map(lambda c: run_cell(*c, args), todo):
                print(line, flush=True)
                failed += not ok
    print(f"ours / PEFT 0.21.2 ({args.device}; below 1 = ours keeps less; speed above 1 = ours is faster)")
    print(table(args.results, args.device, args.compact))
    print(compiled_vs_eager(args.results, args.device))
    if failed:  # the table shows what did run; the exit status says that not everything did
        sys.exit(f"error: {failed} cell(s) failed; each one's log is named above")


if __name__ == "__main__":
    main()
