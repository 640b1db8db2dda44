"""E2E benchmarks: gpt2_beam.py decoding throughput, e2e_eval.py against the official E2E scorer, and gpt2_ft.py's
training throughput and peak memory with LoRA against full fine-tuning.

    python bench/bench_e2e.py --what decode --num_mrs 32          # CPU, GPT-2-small-shaped random model
    python bench/bench_e2e.py --what score --official_dir /tmp/e2e-metrics
    python bench/bench_e2e.py --what train                        # GPU: one epoch of E2E, GPT-2-medium shape
    python bench/bench_e2e.py --what train --train_steps 10       # CPU: 10 steps

decode: MRs per second of gpt2_beam.decode_contexts (batched, left-padded beam search with KV cache) against a
plain loop that calls `generate` on one MR at a time (on the first --plain_mrs of them, as it is slow), both
with the same settings (beam 10, no-repeat 4, length
penalty 0.8, a fixed number of generated tokens so that both do the same work), on a random GPT-2 small
(n_embd 768, 12 layers, real 50257-token vocabulary). It also counts the MRs whose outputs agree.

score: wall and CPU time of `python e2e_eval.py` and of the official `python measure_scores.py` (a checkout of
tuetschek/e2e-metrics, given by --official_dir; it needs perl and Java) on the E2E dev set (547 MRs, 4,672
references), with the first reference of each MR as the "prediction" and the others as its references, and
the largest difference between their five scores. Each scorer runs --repeats times, alternating which goes
first; the times are medians.

train: gpt2_ft.py with its E2E recipe (LoRA r=4 on the q and v slices, batch 8) and with `--adapter_name none`
(full fine-tuning, same data and settings) on a random model of GPT-2 medium's shape (n_embd 1024, 24 layers,
real vocabulary; --shape small for GPT-2 small), each in its own process, over one epoch of the E2E training set
(or its first --train_steps batches). It reports each run's training tokens per second and peak memory (GPU:
CUDA's allocation peak; CPU: peak RSS), as gpt2_ft.py writes them to train_results.json, and LoRA's ratios to
full fine-tuning. On a GPU both runs use --bf16, as docs/e2e.md recommends.

Results go to bench/results/e2e_<what>.json.
"""
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common import DATA_DIR, UsageError, atomic_write_json, run_main  # noqa: E402


@dataclass
class BenchArguments:
    what: str = field(default="decode", metadata={"choices": ["decode", "score", "train", "step", "both"],
                                                  "help": "both = decode and score"})
    num_mrs: int = field(default=32, metadata={"help": "decode: distinct MRs of the E2E test set for gpt2_beam"})
    plain_mrs: int = field(default=8, metadata={"help": "decode: how many of them the (slow) plain loop decodes"})
    beam: int = field(default=10)
    batch_size: int = field(default=16)
    gen_tokens: int = field(default=32, metadata={"help": "decode: tokens generated per MR (min = max)"})
    threads: int = field(default=2, metadata={"help": "torch CPU threads"})
    official_dir: str | None = field(default=None, metadata={"help": "score: folder with measure_scores.py"})
    repeats: int = field(default=3, metadata={"help": "score: runs of each scorer, alternating which goes first; "
                                                      "medians are reported"})
    shape: str = field(default="medium", metadata={"help": "train: GPT-2 shape", "choices": ["small", "medium"]})
    train_steps: int | None = field(default=None, metadata={
        "help": "train: optimizer steps per run (default: one epoch of the E2E training set, 5,258 steps)"})
    step_batches: int = field(default=3, metadata={"help": "step: E2E training batches of 8 (each --repeats times)"})
    output_dir: str = field(default=str(REPO / "bench" / "results"))


def load_average():
    return os.getloadavg()[0]


def bench_decode(args):
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, LogitsProcessorList

    import gpt2_beam
    from e2e_data import group_references, load_e2e, prompt_ids

    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(DATA_DIR / "gpt2_vocab")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_embd=768, n_layer=12, n_head=12, n_positions=1024)).eval()
    contexts, _ = group_references(load_e2e(DATA_DIR / "e2e" / "original" / "testset_w_refs.csv"))
    contexts = contexts[:args.num_mrs]
    beam_args = gpt2_beam.BeamArguments(data="", beam=args.beam, batch_size=args.batch_size,
                                        eval_len=args.gen_tokens, min_length=args.gen_tokens, eos_token_id=[628])
    eos_ids = gpt2_beam.end_tokens(beam_args, tokenizer)
    load_before = load_average()

    start = time.perf_counter()
    batched = {i: tokens for i, tokens, _ in gpt2_beam.decode_contexts(model, tokenizer, contexts, beam_args, "cpu")}
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
                                 logits_processor=LogitsProcessorList([gpt2_beam.GeneratedNoRepeatNGram(
                                     beam_args.no_repeat_ngram_size, ids.shape[1])]),
                                 eos_token_id=eos_ids, pad_token_id=tokenizer.eos_token_id,
                                 do_sample=False)
            row = out[0, ids.shape[1]:].tolist()
            end = next((j for j, t in enumerate(row) if t in eos_ids), len(row))
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


GPT2_SHAPES = {"small": dict(n_embd=768, n_layer=12, n_head=12), "medium": dict(n_embd=1024, n_layer=24, n_head=16)}


def bench_train(args):
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    cuda = torch.cuda.is_available()
    runs = {"lora_r4": [], "full": ["--adapter_name", "none"]}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        torch.manual_seed(0)
        GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_positions=1024, **GPT2_SHAPES[args.shape])).save_pretrained(
            model_dir)
        AutoTokenizer.from_pretrained(DATA_DIR / "gpt2_vocab").save_pretrained(model_dir)
        common = [sys.executable, REPO / "gpt2_ft.py", "--train_data", DATA_DIR / "e2e" / "original" / "trainset.csv",
                  "--model_name_or_path", model_dir, "--max_epoch", 1, "--log_interval", 10,
                  "--eval_interval", 10**9, "--save_interval", 10**9, *(["--bf16"] if cuda else [])]
        if args.train_steps:  # the first batches of a shuffled epoch: tokenise only the rows they can draw from
            common += ["--max_step", args.train_steps, "--max_train_examples", 8 * args.train_steps]
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        results = {}
        for name, extra in runs.items():
            work_dir = Path(tmp) / name
            proc = subprocess.run([str(c) for c in common + ["--work_dir", work_dir, *extra]], cwd=REPO, env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"gpt2_ft.py ({name}) failed:\n{proc.stderr[-2000:]}")
            out = json.loads((work_dir / "train_results.json").read_text())
            results[name] = {k: out[k] for k in ("step", "trainable_params", "total_params", "train_tokens",
                                                 "train_seconds", "tokens_per_second", "peak_memory_gib",
                                                 "peak_memory_kind")}
            shutil.rmtree(work_dir)  # full fine-tuning leaves GiBs of checkpoints
            print(f"{name}: {json.dumps(results[name])}", file=sys.stderr)
    lora, full = results["lora_r4"], results["full"]
    return {
        "model": f"random GPT-2 {args.shape} shape ({GPT2_SHAPES[args.shape]}, vocab 50257)",
        "device": torch.cuda.get_device_name() if cuda else f"cpu, {args.threads} threads",
        "precision": "bf16" if cuda else "fp32", "data": "E2E trainset.csv, batch 8, one epoch" +
        (f", first {args.train_steps} steps" if args.train_steps else ""),
        **results,
        "lora_over_full_tokens_per_second": round(lora["tokens_per_second"] / full["tokens_per_second"], 3),
        "lora_over_full_peak_memory": round(lora["peak_memory_gib"] / full["peak_memory_gib"], 3),
    }


def bench_step(args):
    """One LoRA training step (forward, loss, backward, AdamW) with the LM head at every position against the
    head at the labelled positions only (gpt2_ft.py's step), and that step with the base model's own dropout at
    Hugging Face's 0.1 (gpt2_ft.py's before --model_dropout: microsoft/LoRA's GPT-2 has none); same model and
    batches, interleaved; CPU time."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    import gpt2_ft
    import peft_layers
    from common import count_saved_for_backward
    from e2e_data import load_e2e
    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(DATA_DIR / "gpt2_vocab")
    rows = load_e2e(DATA_DIR / "e2e" / "original" / "trainset.csv")[:8 * args.step_batches]
    examples = gpt2_ft.encode(rows, tokenizer, 512)
    collate = gpt2_ft.make_collate(tokenizer.eos_token_id)
    batches = [collate(examples[i:i + 8]) for i in range(0, len(examples), 8)]
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_positions=1024, **GPT2_SHAPES[args.shape]))
    peft_layers.apply_adapter(model, "lora", 4, 32, dropout=0.1)
    model.train()
    adapters = {id(layer.dropout) for _, layer in peft_layers.adapter_layers(model)}
    model_dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout) and id(m) not in adapters]

    def set_model_dropout(p):
        for m in model_dropouts:
            m.p = p
    optimizer = gpt2_ft.LegacyAdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    # name -> (loss, the base model's own dropout)
    ways = {"full_logits": (gpt2_ft.full_completion_loss, 0.0), "label_positions": (gpt2_ft.completion_loss, 0.0),
            "label_positions_model_dropout": (gpt2_ft.completion_loss, 0.1)}
    cpu = {name: 0.0 for name in ways}
    peak_logits = {name: 0 for name in ways}
    for repeat in range(args.repeats):
        for batch in batches:
            for name in (list(ways) if repeat % 2 == 0 else list(ways)[::-1]):  # alternate which goes first
                loss_fn, dropout = ways[name]
                set_model_dropout(dropout)
                start = time.process_time()
                loss, _ = loss_fn(model, batch, 0.1)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                cpu[name] += time.process_time() - start
    saved = {}  # bytes autograd keeps for backward of the first batch's step, each way (exact, repeatable)
    for name, (loss_fn, dropout) in ways.items():
        set_model_dropout(dropout)
        with count_saved_for_backward(model) as kept:
            loss, _ = loss_fn(model, batches[0], 0.1)
        loss.backward()
        optimizer.zero_grad()
        saved[name] = sum(kept.values())
    for batch in batches:  # rows of vocabulary-wide logits each way computes (and keeps for backward)
        for name, (loss_fn, _) in ways.items():
            full = loss_fn is gpt2_ft.full_completion_loss
            peak_logits[name] += batch["input_ids"].numel() if full else batch["targets"].numel()
    tokens = sum(int(b["attention_mask"].sum()) for b in batches) * args.repeats
    labelled = sum(b["targets"].numel() for b in batches) / sum(int(b["attention_mask"].sum()) for b in batches)
    return {
        "model": f"random GPT-2 {args.shape} shape ({GPT2_SHAPES[args.shape]}, vocab 50257), LoRA r4 on c_attn q,v",
        "device": f"cpu, {args.threads} threads", "batches": len(batches), "repeats": args.repeats,
        "labelled_token_fraction": round(labelled, 3),
        **{f"{name}_cpu_tokens_per_second": round(tokens / cpu[name], 1) for name in ways},
        "speedup_cpu_time": round(cpu["full_logits"] / cpu["label_positions"], 3),
        "model_dropout_off_speedup_cpu_time": round(cpu["label_positions_model_dropout"] / cpu["label_positions"], 3),
        **{f"{name}_lm_head_rows": peak_logits[name] for name in ways},
        **{f"{name}_saved_for_backward_mb": round(saved[name] / 1e6, 1) for name in ways},
        "load_average_1min": round(load_average(), 2),
    }


def main():
    from transformers import HfArgumentParser
    (args,) = HfArgumentParser(BenchArguments, description=__doc__).parse_args_into_dataclasses()
    for what, bench in (("decode", bench_decode), ("score", bench_score), ("train", bench_train),
                        ("step", bench_step)):
        if args.what == what or (args.what == "both" and what in ("decode", "score")):
            result = bench(args)
            atomic_write_json(Path(args.output_dir) / f"e2e_{what}.json", result)
            print(json.dumps(result, indent=2))


if __name__ == "__main__":
    run_main(main)
