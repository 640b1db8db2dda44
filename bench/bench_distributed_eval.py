#!/usr/bin/env python
"""One process vs N processes for run_distributed_eval.py on this machine, and what rank 0's waiting costs.

    python bench/bench_distributed_eval.py                 # 256 WMT en-ro lines, random 2+2-layer BART, 2 processes

Builds a random BART (d_model 256, the real 50k BART BPE vocab) so that generation dominates the run, repeats
the WMT en-ro val+test sources to --n_lines lines, then times the same evaluation launched as `python ...`
(torch's default threads: all cores), as `OMP_NUM_THREADS=1 python ...`, and as `torchrun --nproc_per_node N ...`
(the script gives each of the N processes cores/N threads: 1 on a 2-core machine). Generation is forced to
exactly --gen_length tokens (min_length = max_length) so every run does the same work.
It also times rank 0 waiting --idle_wait seconds for a rank that never comes, to show the wait costs no CPU.
Prints a table and the speed-up; writes bench/results/distributed_eval.json.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from transformers import AutoTokenizer, BartConfig, BartForConditionalGeneration, HfArgumentParser  # noqa: E402

import run_distributed_eval as rde  # noqa: E402
from common import DATA_DIR, atomic_write_json  # noqa: E402


@dataclass
class BenchArguments:
    n_lines: int = field(default=256, metadata={"help": "WMT sources repeated to this many lines"})
    num_processes: int = field(default=2, metadata={"help": "processes of the distributed run"})
    d_model: int = field(default=256, metadata={"help": "width of the random BART"})
    layers: int = field(default=2, metadata={"help": "encoder and decoder layers of the random BART"})
    gen_length: int = field(default=32, metadata={"help": "tokens generated per example (min = max)"})
    bs: int = field(default=8, metadata={"help": "batch size per process"})
    idle_wait: float = field(default=10.0, metadata={"help": "seconds of the idle-wait measurement"})
    output: str = field(default=str(REPO / "bench" / "results" / "distributed_eval.json"))


def save_random_bart(path, d_model, layers, init_std=0.02):
    """A random BART with the real BART BPE (the GPT-2 vocab + <s> </s> <unk> <pad> <mask>), saved with its
    tokenizer to `path`, loadable by run_distributed_eval.py. The tests use it too."""
    path = Path(path)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(DATA_DIR / "gpt2_vocab" / name, path)
    (path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BartTokenizer",
                                                            "model_max_length": 1024}))
    tokenizer = AutoTokenizer.from_pretrained(path)
    if len(tokenizer) != 50257 + 5:
        raise RuntimeError(f"the BART tokenizer built from {DATA_DIR / 'gpt2_vocab'} has {len(tokenizer)} tokens")
    torch.manual_seed(0)
    heads = max(1, d_model // 64)
    config = BartConfig(vocab_size=len(tokenizer), d_model=d_model, encoder_layers=layers, decoder_layers=layers,
                        encoder_attention_heads=heads, decoder_attention_heads=heads, encoder_ffn_dim=4 * d_model,
                        decoder_ffn_dim=4 * d_model, max_position_embeddings=1024, init_std=init_std,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id, decoder_start_token_id=tokenizer.eos_token_id,
                        forced_eos_token_id=None)
    BartForConditionalGeneration(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def build_data(path, n_lines):
    wmt = DATA_DIR / "seq2seq" / "wmt_en_ro"
    sources, targets = [], []
    for split in ("val", "test"):
        sources += (wmt / f"{split}.source").read_text(encoding="utf-8").splitlines()
        targets += (wmt / f"{split}.target").read_text(encoding="utf-8").splitlines()
    repeat = -(-n_lines // len(sources))
    (path / "bench.source").write_text("\n".join((sources * repeat)[:n_lines]) + "\n", encoding="utf-8")
    (path / "bench.target").write_text("\n".join((targets * repeat)[:n_lines]) + "\n", encoding="utf-8")


def timed_run(launcher, flags, save_dir, **env_extra):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **env_extra)
    start = time.perf_counter()
    subprocess.run([*launcher, str(REPO / "run_distributed_eval.py"), *flags, "--save_dir", str(save_dir)],
                   cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    metrics = json.loads((save_dir / "bench_bleu.json").read_text())
    n = metrics["n_obs"]
    return {"wall_seconds": round(wall, 2),
            "generation_seconds": round(metrics["generation_seconds_per_sample"] * n, 2),
            "rank0_generation_seconds": metrics["rank0_generation_seconds"],
            "rank0_wait_seconds": metrics["rank0_wait_seconds"],
            "rank0_wait_cpu_seconds": metrics["rank0_wait_cpu_seconds"],
            "bleu": metrics["bleu"]}


def idle_wait_cost(seconds):
    """CPU time rank 0 spends waiting `seconds` for a rank that never writes its file."""
    with tempfile.TemporaryDirectory() as empty:
        cpu_start, wall_start = time.process_time(), time.perf_counter()
        missing = rde.wait_for_rank_files(empty, world_size=2, timeout=seconds)
        wall, cpu = time.perf_counter() - wall_start, time.process_time() - cpu_start
    assert missing == [0, 1]
    return {"wall_seconds": round(wall, 2), "cpu_seconds": round(cpu, 4)}


def main():
    (args,) = HfArgumentParser(BenchArguments).parse_args_into_dataclasses()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "model").mkdir()
        (tmp / "data").mkdir()
        save_random_bart(tmp / "model", args.d_model, args.layers)
        build_data(tmp / "data", args.n_lines)
        flags = ["--model_name", str(tmp / "model"), "--data_dir", str(tmp / "data"), "--type_path", "bench",
                 "--task", "translation", "--bs", str(args.bs), f"--min_length={args.gen_length}",
                 f"--max_length={args.gen_length}"]
        print(f"[bench] {args.n_lines} lines, BART d_model={args.d_model} layers={args.layers}, "
              f"{args.gen_length} tokens each, bs={args.bs}, {os.cpu_count()} CPUs, torch threads "
              f"{torch.get_num_threads()}", file=sys.stderr)
        load_before = os.getloadavg()
        one = timed_run([sys.executable], flags, tmp / "one")
        one_thread = timed_run([sys.executable], flags, tmp / "one_thread", OMP_NUM_THREADS="1")
        many = timed_run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node", str(args.num_processes)], flags, tmp / "many")
        generations = {(tmp / run / "bench_generations.txt").read_text() for run in ("one", "one_thread", "many")}
        same = len(generations) == 1
    idle = idle_wait_cost(args.idle_wait)

    result = {"config": vars(args), "cpus": os.cpu_count(),
              "load_average_1min_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
              "one_process": one, "one_process_one_thread": one_thread, f"{args.num_processes}_processes": many,
              "identical_generations": same,
              "speedup_wall": round(one["wall_seconds"] / many["wall_seconds"], 2),
              "speedup_generation": round(one["generation_seconds"] / many["generation_seconds"], 2),
              "speedup_wall_vs_one_thread": round(one_thread["wall_seconds"] / many["wall_seconds"], 2),
              "speedup_generation_vs_one_thread": round(
                  one_thread["generation_seconds"] / many["generation_seconds"], 2),
              "idle_wait": idle}
    atomic_write_json(args.output, result)
    print(f"{'':26}{'wall s':>9}{'generation s':>14}{'rank0 wait s':>14}{'wait CPU s':>12}")
    rows = (("1 process", one), ("1 process, 1 thread", one_thread),
            (f"{args.num_processes} processes x {max(1, os.cpu_count() // args.num_processes)} thread", many))
    for name, run in rows:
        print(f"{name:26}{run['wall_seconds']:9.2f}{run['generation_seconds']:14.2f}"
              f"{run['rank0_wait_seconds']:14.3f}{run['rank0_wait_cpu_seconds']:12.4f}")
    print(f"speed-up: {result['speedup_wall']}x wall, {result['speedup_generation']}x generation "
          f"({result['speedup_wall_vs_one_thread']}x / {result['speedup_generation_vs_one_thread']}x against one "
          f"single-threaded process); identical generations: {same}; load average before/after: "
          f"{result['load_average_1min_before_after']}")
    print(f"rank 0 waiting {idle['wall_seconds']} s for a missing rank used {idle['cpu_seconds']} CPU s")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
