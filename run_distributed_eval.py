#!/usr/bin/env python
r"""Generate with any seq2seq model on N processes, then score the whole set (BLEU or ROUGE) on rank 0.

A modern successor of the Hugging Face legacy `examples/legacy/seq2seq/run_distributed_eval.py`; its commands
run here as written (`python -m torch.distributed.launch --nproc_per_node=2 run_distributed_eval.py ...`) and
write the same files (`{type_path}_bleu.json` or `_rouge.json` with `n_gpus`, `{type_path}_generations.txt`):

    python run_distributed_eval.py --model_name facebook/bart-large-cnn --data_dir cnn_dm --save_dir out \
        --type_path test --task summarization --bs 16 --num_beams=4            # one process
    torchrun --nproc_per_node 8 run_distributed_eval.py ...same flags...         # 8 processes (NCCL or gloo)

The story: check the flags, the data and the output folder (never an input; results of an earlier run there are
set aside as *.previous so a failed run leaves none that look like its own) -> agree on a run id -> load the model
(and merge an adapter) -> every rank sorts the data by length, takes every N-th example, generates its share and
writes `rank_<r>_output.json` atomically into a folder private to this run -> rank 0 waits for those files
(sleeping, never spinning), puts the generations back in order, scores them and writes the results, the metrics
file last. A rank that never delivers makes rank 0 stop after --sync_timeout with an error naming it; the
generations that did arrive are kept. Details: docs/distributed_eval.md; several machines: docs/multinode.md.

Flags this script does not know (`--num_beams=4 --length_penalty 0.6`) are passed to `model.generate`, typed as
int, float or bool; they must be GenerationConfig fields, so a typo fails fast instead of being ignored.
"""
import argparse
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

import numpy as np
import torch
import torch.distributed as dist
from rouge_score import rouge_scorer, scoring
from sacrebleu.metrics import BLEU
from tqdm.auto import tqdm
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, GenerationConfig, HfArgumentParser

from common import (
    DataError,
    UsageError,
    atomic_write_json,
    atomic_write_text,
    check_not_input,
    check_output_dir,
    dtype_from_flags,
    one_line,
    process_group_backend,
    read_json,
    read_json_lines,
    read_text,
    run_main,
)

logger = logging.getLogger("run_distributed_eval")


@dataclass
class EvalArguments:
    data_dir: str = field(metadata={"help": "folder with {type_path}.source/.target or {type_path}.json(l)"})
    model_name: str = field(default="sshleifer/distilbart-xsum-12-3", metadata={
        "help": "AutoModelForSeq2SeqLM path or hub id, e.g. facebook/bart-large-cnn (default: the legacy script's)"})
    save_dir: str = field(default="tmp_gen", metadata={"help": "where metrics and generations are written"})
    type_path: str = field(default="test", metadata={"help": "which split: train, val, test, ..."})
    task: str = field(default="summarization", metadata={
        "help": "a task name containing 'translation' (e.g. translation_xx_to_yy) is scored with BLEU, any other "
                "(summarization) with ROUGE; also picks the model's task_specific_params"})
    bs: int = field(default=8, metadata={"help": "batch size per process"})
    max_source_length: int | None = field(default=None, metadata={
        "help": "truncate sources to this many tokens (default: what the tokenizer and model allow)"})
    n_obs: int | None = field(default=None, metadata={"help": "use only the first n_obs examples"})
    fp16: bool = field(default=False, metadata={
        "help": "generate in float16 on CUDA; without a GPU one warning line and float32 (legacy commands run)"})
    bf16: bool = field(default=False, metadata={"help": "generate in bfloat16"})
    num_return_sequences: int = field(default=1, metadata={
        "help": "candidates per example; >1 writes pseudolabel_results.json instead of metrics"})
    sync_timeout: int = field(default=600, metadata={
        "help": "seconds rank 0 waits for the other ranks after its own share (also the process-group timeout)"})
    src_lang: str | None = field(default=None, metadata={
        "help": "source language: set on multilingual tokenizers (mBART: en_XX) and the key of JSON 'translation' "
                "records (default there: xx of --task translation_xx_to_yy)"})
    tgt_lang: str | None = field(default=None, metadata={"help": "target language, as --src_lang"})
    source_key: str = field(default="document", metadata={"help": "source field of non-translation JSON lines"})
    target_key: str = field(default="summary", metadata={"help": "target field of non-translation JSON lines"})
    prefix: str | None = field(default=None, metadata={
        "help": "text put before every source (default: the model's task prefix, e.g. T5's)"})
    adapter_path: str | None = field(default=None, metadata={
        "help": "adapter saved by peft_layers (ours, HF PEFT or loralib); merged into the model before generation"})
    debug: bool = field(default=False, metadata={
        "help": "keep the per-rank files and also write {type_path}.target aligned with the generations"})
    local_rank: int = field(default=-1, metadata={
        "help": "accepted for torch.distributed.launch; the rank is read from the launcher's environment"})


@dataclass
class Job:
    """What the flags and the launcher decide once, before any work: who this process is and what it writes."""
    rank: int
    world_size: int
    device: torch.device
    dtype: torch.dtype
    src_lang: str | None
    tgt_lang: str | None
    scoring: bool  # one candidate per example is scored; several are pseudolabels, written unscored
    metric: str  # "bleu" or "rouge"
    outputs: dict  # name -> path of every result file this run may write in --save_dir


# ----------------------------------------------------------------------------------------------------------------
# Command line: dataclass flags + free-form generate kwargs


GENERATE_KEYS = {k for k in GenerationConfig().to_dict() if not k.startswith("_")}
# Counts that generate() does not check itself (--num_beams=0 dies in a division by zero deep inside it).
COUNT_KEYS = {"num_beams", "num_beam_groups", "max_length", "max_new_tokens"}


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
                    raise UsageError(f"--{key}={value}: generate options must be an int, a float, true or "
                                     "false") from None
        if key in COUNT_KEYS and (type(kwargs[key]) is not int or kwargs[key] < 1):
            raise UsageError(f"--{key}={value}: must be a whole number of at least 1")
    return kwargs


def parse_args(argv=None):
    parser = HfArgumentParser(EvalArguments, description=__doc__, allow_abbrev=False,  # --max_len is not ours
                              epilog="Unknown --key=value flags go to model.generate, e.g. --num_beams=4")
    parser.formatter_class = argparse.RawDescriptionHelpFormatter  # keep the story's line breaks in --help
    args, extra = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True,
                                                     look_for_args_file=False)
    return args, parse_generate_kwargs(extra)


def plan_job(args):
    """Check the flags and read the launcher's environment: the global rank and world size (torchrun, accelerate
    launch and torch.distributed.launch all export them), the device and the precision."""
    if min(args.bs, args.num_return_sequences, args.sync_timeout) < 1 or (args.n_obs is not None and args.n_obs < 1):
        raise UsageError("--bs, --num_return_sequences, --sync_timeout and --n_obs must be positive")
    if Path(args.type_path).name != args.type_path or args.type_path in ("", ".", ".."):
        raise UsageError(f"--type_path {args.type_path!r} is a split name such as val or test, not a path")
    if args.adapter_path and not Path(args.adapter_path).exists():
        raise UsageError(f"--adapter_path {args.adapter_path} does not exist; give the folder save_adapter or "
                         "save_peft wrote")
    use_cuda = torch.cuda.is_available()
    fp16_on_cpu = args.fp16 and not args.bf16 and not use_cuda  # a legacy GPU command run here: fp32, said once
    dtype = dtype_from_flags(bf16=args.bf16, fp16=args.fp16 and not fp16_on_cpu, cuda=use_cuda)
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", max(args.local_rank, 0)))
    logging.basicConfig(format=f"[rank {rank}] %(message)s", level=logging.INFO if rank == 0 else logging.WARNING)
    metric = "bleu" if "translation" in args.task else "rouge"  # the legacy script's rule
    if metric == "rouge" and args.num_return_sequences == 1 and rank == 0:
        logger.info("note: rougeLsum splits sentences with a rule-based splitter, not NLTK punkt as the legacy script "
                    "(punkt needs a download); the ROUGE bootstrap is seeded, so a rerun gives the same numbers "
                    "(the legacy script's vary in the last digits). docs/distributed_eval.md#metrics")
    if fp16_on_cpu and rank == 0:
        logger.warning("warning: --fp16 needs a CUDA GPU and none is visible: generating in float32 instead "
                       "(scores may differ from an fp16 GPU run in the last digits); drop --fp16 to silence this")
    if use_cuda:
        torch.cuda.set_device(local_rank)
    elif world_size > 1:  # share this machine's cores between its processes instead of oversubscribing them
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        torch.set_num_threads(max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", world_size))))
    languages = re.fullmatch(r"translation_(\w+)_to_(\w+)", args.task)
    scoring_run = args.num_return_sequences == 1
    return Job(rank=rank, world_size=world_size, dtype=dtype,
               device=torch.device("cuda", local_rank) if use_cuda else torch.device("cpu"),
               src_lang=args.src_lang or (languages and languages.group(1)),
               tgt_lang=args.tgt_lang or (languages and languages.group(2)),
               scoring=scoring_run, metric=metric, outputs=output_paths(args, scoring_run, metric))


def output_paths(args, scoring_run, metric):
    save_dir, split = Path(args.save_dir), args.type_path
    paths = {"partial": save_dir / f"{split}_partial_generations.json"}
    if not scoring_run:
        return {**paths, "pseudolabels": save_dir / "pseudolabel_results.json"}
    paths.update(generations=save_dir / f"{split}_generations.txt", metrics=save_dir / f"{split}_{metric}.json")
    if args.debug:
        paths["targets"] = save_dir / f"{split}.target"
    return paths


# ----------------------------------------------------------------------------------------------------------------
# Data


def split_files(data_dir, type_path, need_targets):
    """The files of one split: [source, target] line files (target only when needed), or [one JSON-lines file]."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise UsageError(f"--data_dir {data_dir} is not a folder; point it at the folder holding "
                         f"{type_path}.source/{type_path}.target or {type_path}.json")
    source_file, target_file = data_dir / f"{type_path}.source", data_dir / f"{type_path}.target"
    if source_file.exists():
        if need_targets and not target_file.exists():
            raise UsageError(f"{target_file} is missing; metrics need the references beside {source_file.name}")
        return [source_file, target_file] if need_targets else [source_file]
    for json_file in (data_dir / f"{type_path}.json", data_dir / f"{type_path}.jsonl"):
        if json_file.exists():
            return [json_file]
    splits = sorted({p.stem for p in data_dir.iterdir() if p.suffix in (".source", ".json", ".jsonl")})
    raise UsageError(f"no {type_path}.source or {type_path}.json in {data_dir}; "
                     f"--type_path should be one of: {', '.join(splits) or '(no data files there)'}")


def _read_lines(path, what, strip):
    """The lines of a text file, read as Python's text mode reads them (the legacy script's linecache): \r\n and
    \r end lines too and a leading byte-order mark is dropped. `strip` removes trailing whitespace (the legacy
    script strips its targets but keeps a source's trailing blanks, which BPE tokenizers encode as tokens)."""
    text = read_text(path, what).removeprefix("\ufeff")
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final newline ends the last line, it does not start a new one
    return [line.rstrip() for line in lines] if strip else lines


def read_examples(files, *, src_lang=None, tgt_lang=None, source_key="document", target_key="summary",
                  need_targets=True):
    """Sources and targets (None when not needed) from split_files' line files or JSON lines."""
    if files[0].suffix == ".source":
        sources = _read_lines(files[0], "source file", strip=False)
        if not need_targets:
            return sources, None
        targets = _read_lines(files[1], "target file", strip=True)
        if len(targets) < len(sources):
            raise UsageError(f"{files[0]} has {len(sources)} lines but {files[1]} has {len(targets)}; they must "
                             "be line-aligned (one example per line)")
        if len(targets) > len(sources):  # the legacy script scores against the first len(sources) lines
            extra = targets[len(sources):]
            logger.info(f"note: {files[1]} has {len(extra)} line(s) more than {files[0].name} "
                        f"({'all blank' if not any(extra) else 'not all blank'}); they are ignored, as the "
                        "legacy script ignores them")
        return sources, targets[: len(sources)]
    return _read_json_examples(files[0], (source_key, target_key), (src_lang, tgt_lang), need_targets)


def _read_json_examples(json_file, fields, languages, need_targets):
    """{"translation": {"en": ..., "ro": ...}} lines (keys: the languages) or {"document": ..., "summary": ...}
    lines (keys: --source_key/--target_key); every value must be text."""
    sources, targets = [], []
    for line_no, record in read_json_lines(json_file, "data file"):
        keys = fields
        if "translation" in record:
            record, keys = record["translation"], languages
            if not isinstance(record, dict):
                raise DataError(json_file, "'translation' must be an object such as {\"en\": ..., \"ro\": ...}",
                                line_no)
            if keys[0] is None or (need_targets and keys[1] is None):
                raise DataError(json_file, f"holds translation pairs {sorted(record)}; pass --src_lang and "
                                           "--tgt_lang (or --task translation_xx_to_yy)", line_no)
        for key in keys[: 2 if need_targets else 1]:
            if key not in record:
                raise DataError(json_file, f"has no {key!r} (it has {sorted(record)}); set --source_key/"
                                           "--target_key or --src_lang/--tgt_lang", line_no)
            if not isinstance(record[key], str):
                raise DataError(json_file, f"{key!r} is {type(record[key]).__name__}, expected text", line_no)
        sources.append(record[keys[0]])
        targets.append(record[keys[1]] if need_targets else None)
    return sources, targets if need_targets else None


def load_split(args, job):
    """This run's examples (every rank reads them all) and the files they came from."""
    files = split_files(args.data_dir, args.type_path, need_targets=job.scoring)
    sources, targets = read_examples(files, src_lang=job.src_lang, tgt_lang=job.tgt_lang,
                                     source_key=args.source_key, target_key=args.target_key,
                                     need_targets=job.scoring)
    sources, targets = sources[: args.n_obs], (targets[: args.n_obs] if targets else None)
    if not sources:
        raise UsageError(f"{args.data_dir} has no {args.type_path} examples ({files[0].name} is empty)")
    return sources, targets, files


def shard_by_length(lengths, rank, world_size):
    """Example ids for one rank: longest first, dealt round-robin, so every id lands on exactly one rank, ranks
    get similar work, and each rank's batches hold similar lengths (little padding)."""
    longest_first = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return longest_first[rank::world_size]


# ----------------------------------------------------------------------------------------------------------------
# The output folder: writable, never over an input, no earlier result left looking like this run's

PREVIOUS = ".previous"


def prepare_save_dir(args, job, input_files):
    """Fail now, not after generating: the folder must be writable and no result may land on an input (the legacy
    script's --debug cut {type_path}.target when --save_dir was the data folder). Rank 0 then renames the results
    an earlier run left here to *.previous, so a run that fails leaves nothing a reader could take for its own."""
    save_dir = check_output_dir(args.save_dir)
    inputs = [*input_files, args.adapter_path]
    targets = job.outputs.get("targets")
    if targets is not None and any(_same_file(targets, item) for item in input_files):
        raise UsageError(f"--debug writes {targets.name} into --save_dir {save_dir}, which holds this run's "
                         f"references {targets}; choose another --save_dir")
    for path in job.outputs.values():
        check_not_input(path, *inputs)
    if job.rank == 0:
        earlier = [path for path in job.outputs.values() if path.exists()]
        for path in earlier:
            os.replace(path, path.with_name(path.name + PREVIOUS))
        if earlier:
            logger.info(f"set aside the previous results {', '.join(p.name for p in earlier)} in {save_dir} as "
                        f"*{PREVIOUS} (deleted when this run succeeds)")
    return save_dir


def _same_file(a, b):
    return Path(a).exists() and Path(b).exists() and os.path.samefile(a, b)


def new_run_id():
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"


def agree_on_run_id(job, timeout):
    """One process group, used once: rank 0 picks a fresh run id so no file of an earlier run can be read as
    ours. Then the group is destroyed: from here on ranks talk through files only, so a dead rank can't hang
    anyone in a collective."""
    if job.world_size == 1:
        return new_run_id()
    try:
        dist.init_process_group(process_group_backend(), timeout=timedelta(seconds=timeout))
        run_id = [new_run_id() if job.rank == 0 else None]
        dist.broadcast_object_list(run_id, src=0)
    except RuntimeError as e:  # torch.distributed.DistError and friends
        sys.exit(f"error: rank {job.rank} could not reach all {job.world_size} ranks within --sync_timeout="
                 f"{timeout}s (did one fail to start?): {str(e).splitlines()[0]}")
    dist.destroy_process_group()
    return run_id[0]


# ----------------------------------------------------------------------------------------------------------------
# Model and generation


def load_model(args, job):
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model_name)
        model = AutoModelForSeq2SeqLM.from_pretrained(args.model_name)
    except (OSError, ValueError) as e:  # missing folder or files, unreadable config, unknown architecture
        raise UsageError(f"cannot load --model_name {args.model_name}: {one_line(e)[:300]}") from None
    if args.adapter_path:
        import peft_layers
        peft_layers.load_adapter(model, args.adapter_path)
        model = peft_layers.merge_and_unload(model)  # merged: generation runs at the plain model's speed
    model.to(device=job.device, dtype=job.dtype).eval()
    # mBART / M2M / NLLB tokenizers tag the source language. Only from the flags, as the legacy script: the codes
    # in a task name (translation_en_to_ro) are not theirs (mBART's is en_XX; "en" would become a subword).
    if args.src_lang and hasattr(tokenizer, "src_lang"):
        tokenizer.src_lang = args.src_lang
    if args.tgt_lang and hasattr(tokenizer, "tgt_lang"):
        tokenizer.tgt_lang = args.tgt_lang
    return model, tokenizer


@dataclass
class Generation:
    prefix: str
    kwargs: dict  # for model.generate
    n_return: int
    max_source_length: int


def generation_settings(args, model, tokenizer, generate_kwargs):
    """The model's task_specific_params (as the legacy script used them), overridden by the command line."""
    task_params = (getattr(model.config, "task_specific_params", None) or {}).get(args.task, {})
    kwargs = {**{k: v for k, v in task_params.items() if k in GENERATE_KEYS}, **generate_kwargs}
    n_return = args.num_return_sequences
    if n_return > 1:
        # As the legacy script, also when sampling (then generate samples within beams): at least n beams.
        kwargs["num_return_sequences"] = n_return
        defaults = model.generation_config  # the model's own settings, where neither the task nor the flags say
        kwargs["num_beams"] = max(n_return, kwargs.get("num_beams", defaults.num_beams or 1))
    if kwargs:
        logger.info(f"generate kwargs: {kwargs}")
    # As the legacy script: --prefix (also an empty one), else the task's, else the model config's own (BART
    # configs: " "), else none.
    if args.prefix is not None:
        prefix = args.prefix
    else:
        prefix = task_params.get("prefix", getattr(model.config, "prefix", None)) or ""
    return Generation(prefix=prefix,
                      kwargs=kwargs, n_return=n_return,
                      max_source_length=args.max_source_length or min(
                          tokenizer.model_max_length, getattr(model.config, "max_position_embeddings", None) or 10**9))


def generate_share(model, tokenizer, sources, settings, job, batch_size):
    """Generate this rank's share, longest first; returns [{"id", "pred"}] and the seconds it took."""
    input_ids = tokenizer([settings.prefix + s for s in sources], truncation=True,
                          max_length=settings.max_source_length)["input_ids"]
    my_ids = shard_by_length([len(x) for x in input_ids], job.rank, job.world_size)
    results, n = [], settings.n_return
    start = time.perf_counter()
    progress = tqdm(total=len(my_ids), desc=f"generating (rank 0 of {job.world_size})", disable=job.rank != 0)
    with progress, torch.inference_mode():  # the bar is closed on errors too: an error line starts a line
        for batch_start in range(0, len(my_ids), batch_size):
            ids = my_ids[batch_start: batch_start + batch_size]
            batch = tokenizer.pad({"input_ids": [input_ids[i] for i in ids]}, return_tensors="pt").to(job.device)
            try:
                outputs = model.generate(**batch, **settings.kwargs)
            except ValueError as e:  # generate validates its options: e.g. --do_sample=true --temperature=-1
                raise UsageError(f"model.generate refused the generate options {settings.kwargs}: "
                                 f"{one_line(e)[:300]}") from None
            texts = tokenizer.batch_decode(outputs, skip_special_tokens=True, clean_up_tokenization_spaces=False)
            for j, example_id in enumerate(ids):
                candidates = texts[j * n: (j + 1) * n]
                results.append({"id": example_id, "pred": candidates if n > 1 else candidates[0]})
            progress.update(len(ids))
    return results, time.perf_counter() - start


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
    for prediction, reference in zip(predictions, references, strict=True):
        aggregator.add_scores(scorer.score("\n".join(split_sentences(reference)),
                                           "\n".join(split_sentences(prediction))))
    np.random.seed(seed)  # the bootstrap resamples with np.random: seeded, the same run gives the same numbers
    # float(): numpy's rounding as the legacy script, printed as a plain number
    return {key: float(round(value.mid.fmeasure * 100, 4)) for key, value in aggregator.aggregate().items()}


# ----------------------------------------------------------------------------------------------------------------
# Gathering the ranks' files (rank 0)


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


def gather(run_dir, job, timeout, n_expected):
    """Every rank's generations in the original order, plus the timing facts for the metrics file. A rank that
    never delivers stops the run (exit 1) with its generations so far saved to the partial file."""
    stale = [p.name for p in run_dir.parent.glob(".tmp_*") if p != run_dir]
    if stale:
        logger.info(f"ignoring {len(stale)} folder(s) left by earlier runs in {run_dir.parent}: {', '.join(stale)}")
    if job.world_size > 1:
        logger.info(f"waiting up to {timeout}s for ranks 1..{job.world_size - 1} to write to {run_dir}")
    wait_start, wait_cpu_start = time.perf_counter(), time.process_time()  # process_time: this process's CPU
    missing = wait_for_rank_files(run_dir, job.world_size, timeout)
    timing = {"rank0_wait_seconds": round(time.perf_counter() - wait_start, 3),
              "rank0_wait_cpu_seconds": round(time.process_time() - wait_cpu_start, 4)}
    outputs = [read_json(rank_file(run_dir, r), "rank file") for r in range(job.world_size) if r not in missing]
    predictions = {}
    for output in outputs:
        for record in output["results"]:
            if record["id"] in predictions:
                sys.exit(f"error: example {record['id']} was generated twice (rank {output['rank']} too); "
                         "were all ranks started with the same flags and data?")
            predictions[record["id"]] = record["pred"]
    if missing:
        atomic_write_json(job.outputs["partial"], {
            "missing_ranks": missing, "world_size": job.world_size, "n_expected": n_expected,
            "generations": {str(i): predictions[i] for i in sorted(predictions)}})
        sys.exit(f"error: rank(s) {', '.join(map(str, missing))} of {job.world_size} wrote nothing to {run_dir} "
                 f"within --sync_timeout={timeout}s; check those ranks' logs or raise --sync_timeout. "
                 f"The {len(predictions)} generations that arrived are in {job.outputs['partial']}")
    if sorted(predictions) != list(range(n_expected)):
        sys.exit(f"error: the ranks returned {len(predictions)} of {n_expected} examples; "
                 "were all ranks started with the same flags and data?")
    timing["generation_seconds_per_sample"] = round(
        max(output["generation_seconds"] for output in outputs) / n_expected, 4)  # the slowest rank's
    return [predictions[i] for i in range(n_expected)], timing


# ----------------------------------------------------------------------------------------------------------------
# Results (rank 0), written atomically: the metrics file appears last and only when everything else is in place


def as_line(text):
    """A generation as one line of a line-per-example file. Only line breaks change: unlike common.one_line, which
    also collapses and strips spaces, the text stays as decoded (BPE decodes often start with a space), as the
    legacy script wrote it, so the file holds exactly what was scored."""
    return " ".join(text.splitlines())


def write_results(args, job, predictions, targets, timing, start_time):
    paths = job.outputs
    if not job.scoring:
        atomic_write_json(paths["pseudolabels"], predictions)
        logger.info(f"wrote {len(predictions)} x {args.num_return_sequences} candidates to {paths['pseudolabels']}")
        return
    atomic_write_text(paths["generations"], "".join(as_line(p) + "\n" for p in predictions))
    if args.debug:
        atomic_write_text(paths["targets"], "".join(as_line(t) + "\n" for t in targets))
    metrics = compute_bleu(predictions, targets) if job.metric == "bleu" else compute_rouge(predictions, targets)
    metrics.update({
        "n_obs": len(predictions),
        "seconds_per_sample": round((time.perf_counter() - start_time) / len(predictions), 4),
        "n_gpus": job.world_size,  # the legacy script's name for the number of processes; old readers use it
        "num_processes": job.world_size,
        "dtype": str(job.dtype).removeprefix("torch."),
        **timing,
    })
    atomic_write_json(paths["metrics"], metrics)
    logger.info(f"wrote {paths['metrics']}")
    print(metrics, flush=True)  # on stdout, as the legacy script prints it


def clean_up(run_dir, job, keep_run_dir):
    """After success: the previous results this run replaced, and (unless --debug) the rank files."""
    for path in job.outputs.values():
        path.with_name(path.name + PREVIOUS).unlink(missing_ok=True)
    if not keep_run_dir:
        shutil.rmtree(run_dir)


# ----------------------------------------------------------------------------------------------------------------


def main(argv=None):
    start_time = time.perf_counter()
    args, generate_kwargs = parse_args(argv)
    job = plan_job(args)
    sources, targets, data_files = load_split(args, job)
    save_dir = prepare_save_dir(args, job, data_files)
    run_dir = save_dir / f".tmp_{agree_on_run_id(job, args.sync_timeout)}"

    model, tokenizer = load_model(args, job)
    settings = generation_settings(args, model, tokenizer, generate_kwargs)
    results, seconds = generate_share(model, tokenizer, sources, settings, job, args.bs)
    atomic_write_json(rank_file(run_dir, job.rank), {"rank": job.rank, "world_size": job.world_size,
                                                     "generation_seconds": seconds, "results": results})
    if job.rank != 0:
        return

    predictions, timing = gather(run_dir, job, args.sync_timeout, n_expected=len(sources))
    timing["rank0_generation_seconds"] = round(seconds, 3)
    write_results(args, job, predictions, targets, timing, start_time)
    clean_up(run_dir, job, keep_run_dir=args.debug)


if __name__ == "__main__":
    run_main(main)
