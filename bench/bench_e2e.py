"""E2E benchmarks: gpt2_beam.py decoding throughput, and e2e_eval.py against the official E2E scorer.

    python bench/bench_e2e.py --what decode --num_mrs 32          # CPU, GPT-2-small-shaped random model
    python bench/bench_e2e.py --what score --official_dir /tmp/e2e-metrics

decode: MRs per second of gpt2_beam.decode_contexts (batched, left-padded beam search with KV cache) against a
plain loop that calls `generate` on one MR at a time (on the first --plain_mrs of them, as it is slow), both
with the same settings (beam 10, no-repeat 4, length
penalty 0.8, a fixed number of generated tokens so that both do the same work), on a random GPT-2 small
(n_embd 768, 12 layers, real 50257-token vocabulary). It also counts the MRs whose outputs agree.

score: wall and CPU time of `python e2e_eval.py` and of the official `python measure_scores.py` (a checkout of
tuetschek/e2e-metrics, given by --official_dir; it needs perl and Java) on the E2E dev set (547 MRs, 4,672
references), with the first reference of each MR as the "prediction" and the others as its references, and
the largest difference between their five scores. Each scorer runs --repeats times, alternating which goes
first; the times are medians. Results go to bench/results/e2e_<what>.json.
"""
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common import DATA_DIR, UsageError, atomic_write_json, run_main  # noqa: E402


@dataclass
class BenchArguments:
    what: str = field(default="decode", metadata={"choices": ["decode", "score", "both"]})
    num_mrs: int = field(default=32, metadata={"help": "decode: distinct MRs of the E2E test set for gpt2_beam"})
    plain_mrs: int = field(default=8, metadata={"help": "decode: how many of them the (slow) plain loop decodes"})
    beam: int = field(default=10)
    batch_size: int = field(default=16)
    gen_tokens: int = field(default=32, metadata={"help": "decode: tokens generated per MR (min = max)"})
    threads: int = field(default=2, metadata={"help": "torch CPU threads"})
    official_dir: Optional[str] = field(default=None, metadata={"help": "score: folder with measure_scores.py"})
    repeats: int = field(default=3, metadata={"help": "score: runs of each scorer, alternating which goes first; "
                                                      "medians are reported"})
    output_dir: str = field(default=str(REPO / "bench" / "results"))


def load_average():
    return os.getloadavg()[0]


def bench_decode(args):
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel
    import gpt2_beam
    from e2e_data import group_references, load_e2e, prompt_ids

    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(DATA_DIR / "gpt2_vocab")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_embd=768, n_layer=12, n_head=12, n_positions=1024)).eval()
    contexts, _ = group_references(load_e2e(DATA_DIR / "e2e" / "original" / "testset_w_refs.csv"))
    contexts = contexts[:args.num_mrs]
    beam_args = gpt2_beam.BeamArguments(data="", beam=args.beam, batch_size=args.batch_size,
                                        eval_len=args.gen_tokens, min_length=args.gen_tokens)
    load_before = load_average()

    start = time.perf_counter()
    batched = dict(gpt2_beam.decode_contexts(model, tokenizer, contexts, beam_args, "cpu"))
    batched_s = time.perf_counter() - start

    start = time.perf_counter()
    plain = {}
    with torch.no_grad():
        # The baseline: one MR per generate call, no padding.
        for i, context in enumerate(tqdm(contexts[:args.plain_mrs], desc="plain loop")):
            ids = torch.tensor([prompt_ids(tokenizer, context)])
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.gen_tokens,
                                 min_new_tokens=args.gen_tokens, num_beams=args.beam,
                                 length_penalty=beam_args.length_penalty,
                                 no_repeat_ngram_size=beam_args.no_repeat_ngram_size,
                                 eos_token_id=beam_args.eos_token_id, pad_token_id=tokenizer.eos_token_id,
                                 do_sample=False)
            row = out[0, ids.shape[1]:].tolist()
            end = next((j for j, t in enumerate(row) if t in beam_args.eos_token_id), len(row))
            plain[i] = row[:end]
    plain_s = time.perf_counter() - start
    return {
        "model": "random GPT-2 small shape (n_embd 768, 12 layers, vocab 50257)", "device": "cpu",
        "threads": args.threads, "mrs": len(contexts), "beam": args.beam, "batch_size": args.batch_size,
        "generated_tokens_per_mr": args.gen_tokens,
        "gpt2_beam_s": round(batched_s, 2), "gpt2_beam_mrs_per_s": round(len(contexts) / batched_s, 3),
        "plain_loop_mrs": len(plain), "plain_loop_s": round(plain_s, 2),
        "plain_loop_mrs_per_s": round(len(plain) / plain_s, 3),
        "speedup": round((len(contexts) / batched_s) / (len(plain) / plain_s), 2),
        "identical_outputs": sum(batched[i] == plain[i] for i in plain),
        "load_average_1min": [round(load_before, 2), round(load_average(), 2)],
    }


def timed(cmd, cwd):
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed:\n{proc.stderr[-2000:]}")
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return proc.stdout, round(wall, 2), round(cpu, 2)


def parse_scores(stdout):
    return {m: float(v) for m, v in re.findall(r"^(BLEU|NIST|METEOR|ROUGE_L|CIDEr): ([0-9.]+)$", stdout, re.M)}


def bench_score(args):
    from e2e_data import group_references, load_e2e
    if not args.official_dir or not (Path(args.official_dir) / "measure_scores.py").exists():
        raise UsageError("--what score needs --official_dir: a folder with the official measure_scores.py "
                         "(tuetschek/e2e-metrics)")
    contexts, refs = group_references(load_e2e(DATA_DIR / "e2e" / "original" / "devset.csv", "original"))
    with tempfile.TemporaryDirectory() as tmp:
        ref_file, pred_file = Path(tmp) / "refs.txt", Path(tmp) / "preds.txt"
        ref_file.write_text("\n".join("".join(r + "\n" for r in refs[c][1:]) for c in contexts), encoding="utf-8")
        pred_file.write_text("".join(refs[c][0] + "\n" for c in contexts), encoding="utf-8")
        load_before = load_average()
        official_cmd = ([sys.executable, "measure_scores.py", ref_file, pred_file], args.official_dir)
        ours_cmd = ([sys.executable, REPO / "e2e_eval.py", "--ref_file", ref_file, "--pred_file", pred_file], REPO)
        runs = {"official": [], "ours": []}
        for i in range(args.repeats):
            order = ["official", "ours"] if i % 2 == 0 else ["ours", "official"]
            for name in order:
                runs[name].append(timed(*(official_cmd if name == "official" else ours_cmd)))
    official_out, ours_out = runs["official"][0][0], runs["ours"][0][0]
    official_wall, official_cpu = (statistics.median(r[k] for r in runs["official"]) for k in (1, 2))
    ours_wall, ours_cpu = (statistics.median(r[k] for r in runs["ours"]) for k in (1, 2))
    official, ours = parse_scores(official_out), parse_scores(ours_out)
    if set(official) != set(ours) or len(ours) != 5:
        raise RuntimeError(f"could not read the five scores: official {official}, ours {ours}")
    return {
        "data": "E2E dev set: 547 MRs; prediction = first reference, references = the other 4,125",
        "official_scores": official, "e2e_eval_scores": ours,
        "max_abs_difference": max(abs(official[m] - ours[m]) for m in ours),
        "official_wall_s": official_wall, "official_cpu_s": official_cpu,
        "e2e_eval_wall_s": ours_wall, "e2e_eval_cpu_s": ours_cpu,
        "repeats": args.repeats, "official_wall_s_each": [r[1] for r in runs["official"]],
        "e2e_eval_wall_s_each": [r[1] for r in runs["ours"]],
        "wall_ratio": round(ours_wall / official_wall, 3), "cpu_ratio": round(ours_cpu / official_cpu, 3),
        "load_average_1min": [round(load_before, 2), round(load_average(), 2)],
    }


def main():
    from transformers import HfArgumentParser
    (args,) = HfArgumentParser(BenchArguments).parse_args_into_dataclasses()
    for what, bench in (("decode", bench_decode), ("score", bench_score)):
        if args.what in (what, "both"):
            result = bench(args)
            atomic_write_json(Path(args.output_dir) / f"e2e_{what}.json", result)
            print(json.dumps(result, indent=2))


if __name__ == "__main__":
    run_main(main)
