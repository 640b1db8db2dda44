#!/usr/bin/env python
"""Generate with any seq2seq model on N processes, then score the whole set (BLEU or ROUGE) on rank 0.

A modern successor of the Hugging Face legacy `examples/legacy/seq2seq/run_distributed_eval.py`:

    python run_distributed_eval.py --model_name facebook/bart-large-cnn --data_dir cnn_dm --save_dir out \
        --type_path test --task summarization --bs 16 --num_beams=4            # one process
    torchrun --nproc_per_node 8 run_distributed_eval.py ...same flags...         # 8 processes (NCCL or gloo)

The story: every rank reads the same data, sorts it by length and takes every N-th example (so each example goes
to exactly one rank and all ranks get a similar load), generates its share and writes `rank_<r>_output.json`
atomically into a folder private to this run. Rank 0 then waits for those files (sleeping, never spinning), puts
the generations back in the original order and writes the metrics and generations. A rank that never delivers
makes rank 0 stop after --sync_timeout with an error naming it; the generations that did arrive are kept.

Flags this script does not know (`--num_beams=4 --length_penalty 0.6`) are passed to `model.generate`, typed as
int, float or bool; they must be GenerationConfig fields, so a typo fails fast instead of being ignored.
"""
import json
import logging
import os
import re
import shutil
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from rouge_score import rouge_scorer, scoring
from sacrebleu.metrics import BLEU
from tqdm.auto import tqdm
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, GenerationConfig, HfArgumentParser

from common import UsageError, atomic_write_json, atomic_write_text, run_main

logger = logging.getLogger("run_distributed_eval")


@dataclass
class EvalArguments:
    model_name: str = field(metadata={"help": "AutoModelForSeq2SeqLM path or hub id, e.g. facebook/bart-large-cnn"})
    data_dir: str = field(metadata={"help": "folder with {type_path}.source/.target or {type_path}.json(l)"})
    save_dir: str = field(default="tmp_gen", metadata={"help": "where metrics and generations are written"})
    type_path: str = field(default="test", metadata={"help": "which split: train, val, test, ..."})
    task: str = field(default="summarization", metadata={
        "help": "summarization (ROUGE) or translation / translation_xx_to_yy (BLEU); also picks the model's "
                "task_specific_params"})
    bs: int = field(default=8, metadata={"help": "batch size per process"})
    max_source_length: Optional[int] = field(default=None, metadata={
        "help": "truncate sources to this many tokens (default: what the tokenizer and model allow)"})
    n_obs: Optional[int] = field(default=None, metadata={"help": "use only the first n_obs examples"})
    fp16: bool = field(default=False, metadata={"help": "generate in float16 (CUDA only)"})
    bf16: bool = field(default=False, metadata={"help": "generate in bfloat16"})
    num_return_sequences: int = field(default=1, metadata={
        "help": "candidates per example; >1 writes pseudolabel_results.json instead of metrics"})
    sync_timeout: int = field(default=600, metadata={
        "help": "seconds rank 0 waits for the other ranks after its own share (also the process-group timeout)"})
    src_lang: Optional[str] = field(default=None, metadata={
        "help": "source language: key in JSON 'translation' records; set on multilingual tokenizers"})
    tgt_lang: Optional[str] = field(default=None, metadata={"help": "target language, as --src_lang"})
    source_key: str = field(default="document", metadata={"help": "source field of non-translation JSON lines"})
    target_key: str = field(default="summary", metadata={"help": "target field of non-translation JSON lines"})
    prefix: Optional[str] = field(default=None, metadata={
        "help": "text put before every source (default: the model's task prefix, e.g. T5's)"})
    adapter_path: Optional[str] = field(default=None, metadata={
        "help": "adapter saved by peft_layers (ours, HF PEFT or loralib); merged into the model before generation"})
    debug: bool = field(default=False, metadata={
        "help": "keep the per-rank files and also write {type_path}.target aligned with the generations"})
    local_rank: int = field(default=-1, metadata={
        "help": "accepted for torch.distributed.launch; the rank is read from the launcher's environment"})


# ----------------------------------------------------------------------------------------------------------------
# Command line: dataclass flags + free-form generate kwargs


GENERATE_KEYS = {k for k in GenerationConfig().to_dict() if not k.startswith("_")}


def parse_generate_kwargs(strings):
    """['--num_beams=4', '--length_penalty', '0.6', '--early_stopping=true'] -> {'num_beams': 4, ...}."""
    kwargs, i = {}, 0
    while i < len(strings):
        flag = strings[i]
        if not flag.startswith("--"):
            raise UsageError(f"unexpected argument {flag!r}; extra generate options look like --num_beams=4")
        if "=" in flag:
            key, value = flag[2:].split("=", 1)
            i += 1
        elif i + 1 < len(strings) and not strings[i + 1].startswith("--"):
            key, value = flag[2:], strings[i + 1]
            i += 2
        else:
            raise UsageError(f"{flag} needs a value, e.g. {flag}=4")
        key = key.replace("-", "_")
        if key not in GENERATE_KEYS:
            raise UsageError(f"unknown flag --{key}: neither a flag of this script (see --help) "
                             "nor a transformers GenerationConfig field")
        if value.lower() in ("true", "false"):
            kwargs[key] = value.lower() == "true"
        else:
            try:
                kwargs[key] = int(value)
            except ValueError:
                try:
                    kwargs[key] = float(value)
                except ValueError:
                    raise UsageError(f"--{key}={value}: generate options must be an int, a float, true or false")
    return kwargs


# ----------------------------------------------------------------------------------------------------------------
# Data


def _read_lines(path):
    lines = path.read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final newline ends the last line, it does not start a new one
    return [line.rstrip() for line in lines]


def read_examples(data_dir, type_path, *, src_lang=None, tgt_lang=None, source_key="document",
                  target_key="summary", need_targets=True):
    """Sources and targets (None when not needed) of one split, from line files or JSON lines."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise UsageError(f"--data_dir {data_dir} is not a folder; point it at the folder holding "
                         f"{type_path}.source/{type_path}.target or {type_path}.json")
    source_file = data_dir / f"{type_path}.source"
    json_file = next((p for p in (data_dir / f"{type_path}.json", data_dir / f"{type_path}.jsonl") if p.exists()),
                     None)
    if source_file.exists():
        sources = _read_lines(source_file)
        if not need_targets:
            return sources, None
        target_file = data_dir / f"{type_path}.target"
        if not target_file.exists():
            raise UsageError(f"{target_file} is missing; metrics need the references beside {source_file.name}")
        targets = _read_lines(target_file)
        if len(targets) != len(sources):
            raise UsageError(f"{source_file} has {len(sources)} lines but {target_file} has {len(targets)}; "
                             "they must be line-aligned")
        return sources, targets
    if json_file is None:
        splits = sorted({p.stem for p in data_dir.iterdir() if p.suffix in (".source", ".json", ".jsonl")})
        raise UsageError(f"no {type_path}.source or {type_path}.json in {data_dir}; "
                         f"--type_path should be one of: {', '.join(splits) or '(no data files there)'}")

    sources, targets = [], []
    for line_no, line in enumerate(json_file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{json_file} line {line_no} is not JSON ({e.msg}); expected one object per line")
        if "translation" in record:  # {"translation": {"en": ..., "ro": ...}}
            record, keys = record["translation"], (src_lang, tgt_lang)
            if src_lang is None or (need_targets and tgt_lang is None):
                raise UsageError(f"{json_file} holds translation pairs {sorted(record)}; "
                                 "pass --src_lang and --tgt_lang (or --task translation_xx_to_yy)")
        else:
            keys = (source_key, target_key)
        for key in keys[: 2 if need_targets else 1]:
            if key not in record:
                raise UsageError(f"{json_file} line {line_no} has no {key!r} (it has {sorted(record)}); "
                                 "set --source_key/--target_key or --src_lang/--tgt_lang")
        sources.append(record[keys[0]])
        targets.append(record[keys[1]] if need_targets else None)
    return sources, targets if need_targets else None


def shard_by_length(lengths, rank, world_size):
    """Example ids for one rank: longest first, dealt round-robin, so every id lands on exactly one rank, ranks
    get similar work, and each rank's batches hold similar lengths (little padding)."""
    longest_first = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return longest_first[rank::world_size]


# ----------------------------------------------------------------------------------------------------------------
# Metrics


_SENTENCE_END = re.compile(r"""[.!?]+["'”’»)\]]*\s+""")
_OPENERS = "\"'“‘„‚«(["
# Words that end in a period without ending the sentence ("Mr. Smith", "Jan. 5"); deliberately short.
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof sr jr st mt vs etc inc ltd co corp dept gen gov sen rep rev capt col lt sgt fig approx "
    "jan feb mar apr jun jul aug sep sept oct nov dec".split())


def split_sentences(text):
    """Rule-based sentence splitter (no downloaded data, unlike NLTK punkt): a sentence ends at . ! or ? (plus
    closing quotes/brackets) followed by whitespace and an upper-case letter or digit, unless the period ends
    a known abbreviation, a single initial ("J. Smith") or a dotted acronym ("U.S. Army")."""
    sentences, start = [], 0
    for end in _SENTENCE_END.finditer(text):
        following = text[end.end():].lstrip(_OPENERS)
        if not following or not (following[0].isupper() or following[0].isdigit()):
            continue
        before = text[start:end.start()].split()
        word = before[-1].lstrip(_OPENERS) if before else ""
        if end.group().startswith(".") and (word.lower() in _ABBREVIATIONS or re.fullmatch(r"[^\W\d_]", word)
                                            or re.fullmatch(r"(?:[^\W\d_]\.)+[^\W\d_]", word)):
            continue
        sentences.append(text[start:end.end()].strip())
        start = end.end()
    if text[start:].strip():
        sentences.append(text[start:].strip())
    return sentences


def compute_bleu(predictions, references):
    bleu = BLEU()
    score = bleu.corpus_score(predictions, [references])
    return {"bleu": round(score.score, 4), "sacrebleu_signature": str(bleu.get_signature())}


ROUGE_KEYS = ("rouge1", "rouge2", "rougeL", "rougeLsum")


def compute_rouge(predictions, references, seed=0):
    """Bootstrap mid F-measure x100, as the HF seq2seq examples report it. rougeLsum scores the summary-level LCS
    over newline-separated sentences, so every text gets one sentence per line (rouge1/2/L ignore newlines)."""
    scorer = rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=True)
    aggregator = scoring.BootstrapAggregator()
    for prediction, reference in zip(predictions, references):
        aggregator.add_scores(scorer.score("\n".join(split_sentences(reference)),
                                           "\n".join(split_sentences(prediction))))
    np.random.seed(seed)  # the bootstrap resamples with np.random: seeded, the same run gives the same numbers
    return {key: round(value.mid.fmeasure * 100, 4) for key, value in aggregator.aggregate().items()}


# ----------------------------------------------------------------------------------------------------------------
# Gathering the ranks' files


def rank_file(run_dir, rank):
    return Path(run_dir) / f"rank_{rank}_output.json"


def wait_for_rank_files(run_dir, world_size, timeout):
    """Wait until every rank's file exists or `timeout` seconds pass; return the ranks still missing.

    Sleeps between looks (0.05 s doubling to 1 s), so a long wait costs a few hundred stat() calls, not a core.
    Files rather than a collective: a dead rank cannot hang or crash the wait, the missing ranks are known by
    name, and the files are the results anyway (rank files are written atomically, so existing means complete)."""
    deadline = time.monotonic() + timeout
    delay = 0.05
    while True:
        missing = [r for r in range(world_size) if not rank_file(run_dir, r).exists()]
        remaining = deadline - time.monotonic()
        if not missing or remaining <= 0:
            return missing
        time.sleep(min(delay, remaining))
        delay = min(delay * 2, 1.0)


def one_line(text):
    return " ".join(text.splitlines())


# ----------------------------------------------------------------------------------------------------------------


def main():
    start_time = time.perf_counter()
    parser = HfArgumentParser(EvalArguments, allow_abbrev=False,  # no prefix guessing: --max_len is not ours
                              epilog="Unknown --key=value flags go to model.generate, e.g. --num_beams=4")
    args, extra = parser.parse_args_into_dataclasses(return_remaining_strings=True, look_for_args_file=False)
    generate_kwargs = parse_generate_kwargs(extra)

    # The launcher (torchrun, accelerate launch, torch.distributed.launch) exports the *global* rank and world size.
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", max(args.local_rank, 0)))
    use_cuda = torch.cuda.is_available()
    logging.basicConfig(format=f"[rank {rank}] %(message)s", level=logging.INFO if rank == 0 else logging.WARNING)

    if not args.task.startswith(("summarization", "translation")):
        raise UsageError(f"--task {args.task}: use summarization (ROUGE) or translation[_xx_to_yy] (BLEU)")
    if min(args.bs, args.num_return_sequences, args.sync_timeout) < 1 or (args.n_obs is not None and args.n_obs < 1):
        raise UsageError("--bs, --num_return_sequences, --sync_timeout and --n_obs must be positive")
    if args.fp16 and args.bf16:
        raise UsageError("pick one of --fp16 and --bf16")
    if args.fp16 and not use_cuda:
        raise UsageError("--fp16 needs a CUDA GPU; on CPU use --bf16 or full precision")
    if args.adapter_path and not Path(args.adapter_path).exists():
        raise UsageError(f"--adapter_path {args.adapter_path} does not exist; give the folder save_adapter or "
                         "save_peft wrote")
    languages = re.fullmatch(r"translation_(\w+)_to_(\w+)", args.task)
    src_lang = args.src_lang or (languages and languages.group(1))
    tgt_lang = args.tgt_lang or (languages and languages.group(2))
    scoring_run = args.num_return_sequences == 1  # several candidates per example are pseudolabels, not scored
    sources, targets = read_examples(args.data_dir, args.type_path, src_lang=src_lang, tgt_lang=tgt_lang,
                                     source_key=args.source_key, target_key=args.target_key,
                                     need_targets=scoring_run)
    if args.n_obs:
        sources = sources[: args.n_obs]
        targets = targets[: args.n_obs] if targets else None
    if not sources:
        raise UsageError(f"{args.data_dir} has no {args.type_path} examples")

    # One process group, used once: rank 0 picks a fresh run id so no file of an earlier run can be read as ours.
    if use_cuda:
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if world_size > 1:
        if not use_cuda:  # share the cores of this machine between its processes instead of oversubscribing
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
            torch.set_num_threads(max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", world_size))))
        try:
            dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(seconds=args.sync_timeout))
            run_id = [f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}" if rank == 0 else None]
            dist.broadcast_object_list(run_id, src=0)
        except RuntimeError as e:  # torch.distributed.DistError and friends
            sys.exit(f"error: rank {rank} could not reach all {world_size} ranks within --sync_timeout="
                     f"{args.sync_timeout}s (did one fail to start?): {str(e).splitlines()[0]}")
        run_id = run_id[0]
        dist.destroy_process_group()  # from here on ranks talk through files only: a dead rank can't hang anyone
    else:
        run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
    save_dir = Path(args.save_dir)
    run_dir = save_dir / f".tmp_{run_id}"

    # Model, tokenizer, generation settings.
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model_name)
        model = AutoModelForSeq2SeqLM.from_pretrained(args.model_name)
    except OSError as e:
        raise UsageError(f"cannot load --model_name {args.model_name}: {str(e).splitlines()[0]}")
    if args.adapter_path:
        import peft_layers
        peft_layers.load_adapter(model, args.adapter_path)
        model = peft_layers.merge_and_unload(model)  # merged: generation runs at the plain model's speed
    dtype = torch.float16 if args.fp16 else torch.bfloat16 if args.bf16 else torch.float32
    model.to(device=device, dtype=dtype).eval()
    task_params = (getattr(model.config, "task_specific_params", None) or {}).get(args.task, {})
    prefix = args.prefix if args.prefix is not None else task_params.get("prefix", "")
    generate_kwargs = {**{k: v for k, v in task_params.items() if k in GENERATE_KEYS}, **generate_kwargs}
    n_return = args.num_return_sequences
    if n_return > 1:
        generate_kwargs["num_return_sequences"] = n_return
        if not generate_kwargs.get("do_sample"):  # beam search returns at most num_beams sequences
            generate_kwargs["num_beams"] = max(n_return, generate_kwargs.get("num_beams", 1))
    if src_lang and hasattr(tokenizer, "src_lang"):  # mBART / M2M / NLLB tokenizers tag the source language
        tokenizer.src_lang = src_lang
    if tgt_lang and hasattr(tokenizer, "tgt_lang"):
        tokenizer.tgt_lang = tgt_lang
    max_source_length = args.max_source_length or min(
        tokenizer.model_max_length, getattr(model.config, "max_position_embeddings", None) or 10**9)
    if generate_kwargs and rank == 0:
        logger.info(f"generate kwargs: {generate_kwargs}")

    # This rank's share, longest first.
    input_ids = tokenizer([prefix + s for s in sources], truncation=True, max_length=max_source_length)["input_ids"]
    my_ids = shard_by_length([len(x) for x in input_ids], rank, world_size)
    results = []
    generation_start = time.perf_counter()
    progress = tqdm(total=len(my_ids), desc=f"generating (rank 0 of {world_size})", disable=rank != 0)
    with torch.inference_mode():
        for batch_start in range(0, len(my_ids), args.bs):
            ids = my_ids[batch_start: batch_start + args.bs]
            batch = tokenizer.pad({"input_ids": [input_ids[i] for i in ids]}, return_tensors="pt").to(device)
            outputs = model.generate(**batch, **generate_kwargs)
            texts = tokenizer.batch_decode(outputs, skip_special_tokens=True, clean_up_tokenization_spaces=False)
            for j, example_id in enumerate(ids):
                candidates = texts[j * n_return: (j + 1) * n_return]
                results.append({"id": example_id, "pred": candidates if n_return > 1 else candidates[0]})
            progress.update(len(ids))
    progress.close()
    generation_seconds = time.perf_counter() - generation_start
    atomic_write_json(rank_file(run_dir, rank), {"run_id": run_id, "rank": rank, "world_size": world_size,
                                                 "generation_seconds": generation_seconds, "results": results})
    if rank != 0:
        return

    # Rank 0: gather every rank's file, sleeping in between looks.
    stale = [p.name for p in save_dir.glob(".tmp_*") if p != run_dir]
    if stale:
        logger.info(f"ignoring {len(stale)} folder(s) left by earlier runs in {save_dir}: {', '.join(stale)}")
    if world_size > 1:
        logger.info(f"waiting up to {args.sync_timeout}s for ranks 1..{world_size - 1} to write to {run_dir}")
    wait_start, wait_cpu_start = time.perf_counter(), time.process_time()  # process_time: this process's CPU
    missing = wait_for_rank_files(run_dir, world_size, args.sync_timeout)
    wait_seconds, wait_cpu_seconds = time.perf_counter() - wait_start, time.process_time() - wait_cpu_start
    rank_outputs = [json.loads(rank_file(run_dir, r).read_text(encoding="utf-8"))
                    for r in range(world_size) if r not in missing]
    predictions = {}
    for output in rank_outputs:
        for record in output["results"]:
            if record["id"] in predictions:
                sys.exit(f"error: example {record['id']} was generated twice (rank {output['rank']} too); "
                         "were all ranks started with the same flags and data?")
            predictions[record["id"]] = record["pred"]
    if missing:
        partial_path = save_dir / f"{args.type_path}_partial_generations.json"
        atomic_write_json(partial_path, {
            "missing_ranks": missing, "world_size": world_size, "n_expected": len(sources),
            "generations": {str(i): predictions[i] for i in sorted(predictions)}})
        sys.exit(f"error: rank(s) {', '.join(map(str, missing))} of {world_size} wrote nothing to {run_dir} within "
                 f"--sync_timeout={args.sync_timeout}s; check those ranks' logs or raise --sync_timeout. "
                 f"The {len(predictions)} generations that arrived are in {partial_path}")
    if sorted(predictions) != list(range(len(sources))):
        sys.exit(f"error: the ranks returned {len(predictions)} of {len(sources)} examples; "
                 "were all ranks started with the same flags and data?")
    predictions = [predictions[i] for i in range(len(sources))]
    (save_dir / f"{args.type_path}_partial_generations.json").unlink(missing_ok=True)  # an earlier failure's

    # Results, written atomically: the metrics file appears last and only when everything else is in place.
    if n_return > 1:
        atomic_write_json(save_dir / "pseudolabel_results.json", predictions)
        logger.info(f"wrote {len(predictions)} x {n_return} candidates to {save_dir / 'pseudolabel_results.json'}")
    else:
        atomic_write_text(save_dir / f"{args.type_path}_generations.txt",
                          "".join(one_line(p) + "\n" for p in predictions))
        if args.debug:
            atomic_write_text(save_dir / f"{args.type_path}.target", "".join(one_line(t) + "\n" for t in targets))
        is_translation = args.task.startswith("translation")
        metrics = compute_bleu(predictions, targets) if is_translation else compute_rouge(predictions, targets)
        slowest_rank_seconds = max(output["generation_seconds"] for output in rank_outputs)
        metrics.update({
            "n_obs": len(predictions),
            "seconds_per_sample": round((time.perf_counter() - start_time) / len(predictions), 4),
            "generation_seconds_per_sample": round(slowest_rank_seconds / len(predictions), 4),
            "num_processes": world_size,
            "rank0_generation_seconds": round(generation_seconds, 3),
            "rank0_wait_seconds": round(wait_seconds, 3),
            "rank0_wait_cpu_seconds": round(wait_cpu_seconds, 4),
        })
        metrics_path = save_dir / f"{args.type_path}_{'bleu' if is_translation else 'rouge'}.json"
        atomic_write_json(metrics_path, metrics)
        logger.info(f"{metrics_path}: {json.dumps(metrics)}")
    if not args.debug:
        shutil.rmtree(run_dir)


if __name__ == "__main__":
    run_main(main)
