"""Fine-tune a GPT-2 (or any Hugging Face causal LM) with a LoRA, VeRA or RandLoRA adapter on E2E NLG.

    python gpt2_ft.py --train_data ../shared/data/e2e/original/trainset.csv \
        --valid_data ../shared/data/e2e/original/devset.csv --model_name_or_path gpt2-medium \
        --work_dir outputs/e2e --report_to tensorboard
    accelerate launch --num_processes 4 gpt2_ft.py ...        # data parallel (or a DeepSpeed accelerate config)
    python -m torch.distributed.launch --nproc_per_node=1 gpt2_ft.py --train_data ./data/e2e/train.jsonl \
        --model_card gpt2.md --init_checkpoint ./pretrained_checkpoints/gpt2-medium-pytorch_model.bin ...
                                                              # microsoft/LoRA's command, as written

Defaults are microsoft/LoRA's E2E recipe: LoRA r=4, alpha=32, dropout 0.1 on the q and v slices of c_attn,
label smoothing 0.1, its AdamW (lr 2e-4, betas 0.9/0.999, weight decay 0.01, bias correction), linear schedule
with 500 warm-up steps, 5 epochs, batch 8, sequences up to 512 tokens. `--adapter_name vera` adapts c_attn (the
VeRA paper's E2E set-up: 98,304 trainable parameters on GPT-2 medium); `--adapter_name randlora` adapts c_attn and
the MLP's c_fc and c_proj with RandLoRA's scale alpha / r / sqrt(n bases), as RandLoRA's NLG code does. Both take
all of c_attn where those codes adapt its q and v slices (said at start). `--adapter_name none` fine-tunes every
weight. microsoft/LoRA's
flags and files work as in its gpt2_ft.py: token-id JSONL data (gpt2_encode.py output), --model_card,
--init_checkpoint (the original GPT-2 pytorch_model.bin), --platform, --correct_bias, --local_rank, and
model.<step>.pt checkpoints in loralib's layout (see gpt2_checkpoint.py).

The story: parse and check everything (data readable, work dir writable) -> read context/completion pairs
(text, tokenised as `context <|endoftext|> completion<|endoftext|>`, or token ids as given) -> build the model and
add the adapter; print the effective set-up in one line -> train with the loss on completion tokens only
(label-smoothed; the LM head runs only where a label is) -> validation loss and perplexity every --eval_interval
steps and at the end -> every --save_interval steps a resumable checkpoint (work_dir/checkpoint-STEP: adapter,
optimizer, scheduler, RNG; written to a temporary folder and renamed, so --resume always finds a complete one) and
a loralib-layout model.STEP.pt (adapter only; the whole model at the end of each epoch) -> the final adapter in
work_dir/final and train_results.json (set-up, validation history, tokens/s, peak memory).
"""
import contextlib
import logging
import math
import os
import re
import resource
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator, DataLoaderConfiguration, DistributedType, InitProcessGroupKwargs
from accelerate.utils import GradientAccumulationPlugin
from safetensors.torch import load_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import HfArgumentParser, get_scheduler, set_seed

import gpt2_checkpoint
import peft_layers
from common import (
    RUN_SETTINGS,
    UsageError,
    atomic_write_json,
    check_output_dir,
    dtype_from_flags,
    flags_given,
    process_group_backend,
    recipe_defaults_note,
    run_main,
    settings_changed,
    write_run_settings,
)
from e2e_data import check_limit, completion_ids, is_token_data, load_causal_lm, load_e2e, load_tokenizer, prompt_ids
from legacy_adamw import LegacyAdamW

logger = logging.getLogger("gpt2_ft")
# Default layers per method, from each paper's E2E code: LoRA the q and v slices of c_attn (microsoft/LoRA), VeRA
# c_attn, RandLoRA c_attn and the MLP (RandLoRA's NLG model.py; the attention's c_proj stays plain).
# (LoRA: None, peft_layers' default for the architecture, so other causal LMs get their q/v projections.)
DEFAULT_TARGETS = {"lora": None, "vera": ["c_attn"], "randlora": ["c_attn", "mlp.c_fc", "mlp.c_proj"]}
RECIPE_ALPHA = {"lora": 32}  # microsoft/LoRA's E2E alpha; the others take peft_layers' default
STATE_FILE = "training_state.pt"
GPT2_EOS = 50256


@dataclass
class TrainArguments:
    train_data: str = field(metadata={"help": "training data: .jsonl (text or gpt2_encode.py token ids), official "
                                              "E2E .csv or LoRA-format .txt"})
    valid_data: str | None = field(default=None, metadata={"help": "validation data, same formats"})
    model_name_or_path: str | None = field(default=None, metadata={
        "help": "causal LM: Hub name or folder (default: the --model_card's GPT-2, unless --init_checkpoint holds "
                "the whole model)"})
    model_card: str | None = field(default=None, metadata={
        "help": "microsoft/LoRA's GPT-2 size: gpt2.sm, gpt2.md (default when nothing else names the model), gpt2.lg",
        "choices": list(gpt2_checkpoint.MODEL_CARDS)})
    init_checkpoint: str | None = field(default=None, metadata={
        "help": "torch checkpoint to start from: the original GPT-2 pytorch_model.bin or a model.<step>.pt"})
    tokenizer_name: str | None = field(default=None, metadata={"help": "default: the model's folder or name"})
    adapter_name: str = field(default="lora", metadata={
        "help": "adapter to train; 'none' fine-tunes every weight", "choices": ["lora", "vera", "randlora", "none"]})
    target_modules: list[str] | None = field(default=None, metadata={
        "help": "layer-name suffixes to adapt (default: c_attn for LoRA -- its q and v slices -- and VeRA, "
                "c_attn mlp.c_fc mlp.c_proj for RandLoRA)"})
    rank: int = field(default=4, metadata={"aliases": ["--lora_dim"], "help": "adapter rank r (alias --lora_dim)"})
    lora_alpha: float | None = field(default=None, metadata={
        "help": "scale numerator (scale = alpha / r); default 32 for LoRA (the E2E recipe), peft_layers' 640 for "
                "RandLoRA; VeRA ignores it"})
    randlora_scaling: str = field(default="fork", metadata={
        "help": "RandLoRA's scale: 'fork' = alpha / r / sqrt(n bases), as RandLoRA's NLG code; 'peft' = alpha / r, "
                "as HF PEFT >= 0.16", "choices": ["fork", "peft"]})
    lora_dropout: float = field(default=0.1, metadata={"help": "dropout on the adapter's input"})
    model_dropout: float = field(default=0.0, metadata={
        "help": "dropout inside the base model while training (GPT-2's attn_pdrop, embd_pdrop, resid_pdrop): 0 as "
                "in microsoft/LoRA's GPT-2, which has no dropout but the adapter's; Hugging Face's GPT-2 configs "
                "say 0.1"})
    label_smooth: float = field(default=0.1, metadata={"help": "label smoothing of the completion loss"})
    train_batch_size: int = field(default=8, metadata={"help": "sequences per step and process"})
    valid_batch_size: int = field(default=4, metadata={"help": "sequences per validation step and process"})
    grad_acc: int = field(default=1, metadata={
        "help": "gradient accumulation: an optimizer update every N steps (steps count batches, as microsoft/LoRA)"})
    clip: float = field(default=0.0, metadata={"help": "gradient-norm clipping (0: off)"})
    seq_len: int = field(default=512, metadata={"help": "longest training sequence in tokens (longer ones cut)"})
    lr: float = field(default=2e-4, metadata={"help": "peak learning rate"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay (decoupled)"})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1"})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2"})
    adam_epislon: float = field(default=1e-6, metadata={"help": "AdamW epsilon (microsoft/LoRA's spelling)"})
    correct_bias: bool = field(default=True, metadata={
        "help": "AdamW bias correction (microsoft/LoRA's flag; on in its E2E recipe; --no_correct_bias turns it off)"})
    scheduler: str = field(default="linear", metadata={
        "help": "learning-rate schedule after warm-up, microsoft/LoRA's: linear, cosine (its formula), constant "
                "(= constant_with_warmup)", "choices": ["linear", "cosine", "constant", "constant_with_warmup"]})
    warmup_step: int = field(default=500, metadata={"help": "linear warm-up steps"})
    max_epoch: int = field(default=5, metadata={"help": "epochs"})
    max_step: int | None = field(default=None, metadata={
        "help": "stop after this many steps (batches per process) and end the schedule there, even past --max_epoch "
                "(default: --max_epoch epochs)"})
    log_interval: int = field(default=100, metadata={"help": "log the training loss every N steps"})
    eval_interval: int = field(default=2000, metadata={"help": "validate every N steps"})
    save_interval: int = field(default=1000, metadata={"help": "checkpoint every N steps"})
    work_dir: str = field(default="outputs/e2e", metadata={"help": "checkpoints, logs and results go here"})
    resume: bool = field(default=False, metadata={"help": "continue from the newest complete checkpoint"})
    seed: int = field(default=110, metadata={"aliases": ["--random_seed"],
                                             "help": "seed for initialisation, data order and dropout"})
    mr_format: str = field(default="lora", metadata={
        "help": "CSV inputs: meaning-representation layout", "choices": ["lora", "original"]})
    max_train_examples: int | None = field(default=None, metadata={"help": "use only the first N training rows"})
    max_valid_examples: int | None = field(default=None, metadata={"help": "use only the first N validation rows"})
    bf16: bool = field(default=False, metadata={"help": "bfloat16 mixed precision"})
    fp16: bool = field(default=False, metadata={"help": "float16 mixed precision (needs a GPU)"})
    report_to: str = field(default="none", metadata={"help": "log to TensorBoard in work_dir/runs",
                                                     "choices": ["none", "tensorboard"]})
    platform: str = field(default="local", metadata={
        "help": "microsoft/LoRA's launcher name; here the processes always come from the launcher's environment "
                "(torch.distributed.launch, torchrun, accelerate)", "choices": ["local", "k8s", "philly", "azure"]})
    local_rank: int = field(default=-1, metadata={
                                                  "help": "set by torch.distributed.launch; read from LOCAL_RANK"})


# microsoft/LoRA gpt2_ft.py's argparse defaults where this script follows its E2E recipe instead (said at start).
LORA_ARGPARSE_DEFAULTS = {"rank": 0, "lora_alpha": 128, "lora_dropout": 0.0, "label_smooth": 0.0, "lr": 1e-5,
                          "adam_beta2": 0.98, "correct_bias": False, "warmup_step": 0, "save_interval": 500,
                          "seed": 10}


@dataclass
class TrainState:
    """Where training stands; saved in every checkpoint."""
    step: int = 0
    epoch: int = 0
    batches_done: int = 0
    history: list = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------------------
# Data: `context <|endoftext|> completion <|endoftext|>`, with labels on the completion part only.

def encode(rows, tokenizer, seq_len, limit=None):
    examples = []
    for row in rows[:limit]:
        if isinstance(row["context"], list):  # gpt2_encode.py --add_bos --add_eos output: separators included
            prompt, target = row["context"], row["completion"]
        else:
            prompt, target = prompt_ids(tokenizer, row["context"]), completion_ids(tokenizer, row["completion"])
        input_ids = (prompt + target)[:seq_len]
        labels = ([-100] * len(prompt) + target)[:seq_len]
        if any(t != -100 for t in labels[1:]):  # something left to predict after the cut
            examples.append({"input_ids": input_ids, "labels": labels})
    return examples


def make_collate(pad_id):
    """Pads to the batch's longest sequence, and lists on the host which positions predict a label (so the step
    needs no device-to-host sync to find them)."""
    def collate(batch):
        longest = max(len(b["input_ids"]) for b in batch)
        input_ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), longest), -100, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), longest), dtype=torch.long)
        for i, b in enumerate(batch):
            n = len(b["input_ids"])
            input_ids[i, :n], labels[i, :n], attention_mask[i, :n] = (
                torch.tensor(b["input_ids"]), torch.tensor(b["labels"]), 1)
        # Hidden state at (i, t) predicts token t + 1: keep the flat positions whose next token has a label.
        next_labels = F.pad(labels[:, 1:], (0, 1), value=-100).reshape(-1)
        label_index = (next_labels != -100).nonzero().squeeze(1)
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
                "label_index": label_index, "targets": next_labels[label_index], "tokens": attention_mask.sum()}
    return collate


class _LabelPositions:
    """Forward pre-hook on the LM head: only the hidden states that predict a label reach it. The logits (and
    their float copy for the loss) are then (labelled tokens x vocab) instead of (all tokens x vocab)."""

    def __init__(self):
        self.index = None

    def __call__(self, module, args):
        if self.index is None:
            return None
        hidden = args[0]
        return (hidden.reshape(-1, hidden.size(-1)).index_select(0, self.index), *args[1:])


def _label_hook(model):
    head = getattr(model, "module", model).get_output_embeddings()
    if not hasattr(head, "_label_positions"):
        head._label_positions = _LabelPositions()
        head.register_forward_pre_hook(head._label_positions)
    return head._label_positions


def label_logits(model, batch):
    """The logits at the positions that predict a label only (labelled tokens x vocab), in batch["targets"] order."""
    hook = _label_hook(model)
    hook.index = batch["label_index"]
    try:
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    finally:
        hook.index = None


def completion_loss(model, batch, label_smoothing):
    """Mean next-token cross-entropy over completion tokens (the LM head computed at those positions only); also
    the token count."""
    loss = F.cross_entropy(label_logits(model, batch).float(), batch["targets"], label_smoothing=label_smoothing)
    return loss, batch["targets"].numel()


def full_completion_loss(model, batch, label_smoothing):
    """The same loss from logits at every position (the reference completion_loss is tested against)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits, labels = logits[:, :-1].float(), batch["labels"][:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100,
                           label_smoothing=label_smoothing)
    return loss, (labels != -100).sum()


@contextlib.contextmanager
def eval_mode_unmerged(model):
    """Dropout off without model.eval(): eval() merges the adapter into the base weights and train() subtracts it
    again, which is not exact in floating point, so every validation would shift the frozen weights by rounding
    and a resumed run (which reloads them untouched) would drift from an uninterrupted one."""
    modes = [(m, m.training) for m in model.modules()]
    for m, _ in modes:
        m.training = False
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


@torch.no_grad()
def evaluate(model, loader, accelerator):
    """Validation loss (no smoothing) averaged over every completion token of the validation set, each row counted
    once whatever the number of processes (accelerate repeats rows to even out the processes' batches:
    gather_for_metrics drops them), and perplexity."""
    total, count = torch.zeros((), device=accelerator.device), torch.zeros((), device=accelerator.device)
    with eval_mode_unmerged(model):
        for batch in loader:
            token_loss = F.cross_entropy(label_logits(model, batch).float(), batch["targets"], reduction="none")
            rows, n = batch["label_index"] // batch["input_ids"].size(1), batch["input_ids"].size(0)
            row_loss = torch.zeros(n, device=token_loss.device).index_add_(0, rows, token_loss)
            row_loss, row_tokens = accelerator.gather_for_metrics((row_loss, torch.bincount(rows, minlength=n)))
            total += row_loss.sum()
            count += row_tokens.sum()
    avg = (total / count.clamp(min=1)).item()
    return {"valid_loss": avg, "valid_ppl": math.exp(min(avg, 50))}


def synchronize():
    """Wait for queued GPU work, so that wall-clock times include it."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class TrainTimer:
    """Wall time of the training steps alone: whatever runs inside `paused()` (validation, checkpoints) is left out."""

    def __init__(self):
        self.paused_s = 0.0
        synchronize()
        self.start = time.perf_counter()

    @contextlib.contextmanager
    def paused(self):
        synchronize()
        start = time.perf_counter()
        yield
        self.paused_s += time.perf_counter() - start

    def seconds(self):
        synchronize()
        return time.perf_counter() - self.start - self.paused_s


def reset_peak_memory():
    """Start counting peak memory afresh, so that it measures training rather than model loading."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    else:
        try:  # Linux: "5" resets the peak resident set size (VmHWM, which getrusage's ru_maxrss reads)
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass  # elsewhere the peak includes loading


def peak_memory(accelerator):
    """(peak GiB of the busiest process since reset_peak_memory(), what was measured): CUDA's allocation peak on a
    GPU, else the peak resident set size."""
    if torch.cuda.is_available():
        peak, kind = torch.cuda.max_memory_allocated(accelerator.device), "cuda_max_memory_allocated"
    else:
        peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "cpu_peak_rss"  # KiB on Linux
    peak = accelerator.gather(torch.tensor([peak], dtype=torch.float64, device=accelerator.device)).max().item()
    return round(peak / 2**30, 3), kind


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints: adapter (or full weights) as safetensors, small training state through torch.save and
# torch.load(weights_only=True). Each is written into a temporary folder and renamed when complete.

def save_checkpoint(path, model, optimizer, scheduler, state, adapter):
    partial = path.with_name(f".{path.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        if adapter:
            peft_layers.save_adapter(model, partial)
        else:
            model.save_pretrained(partial)
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        # Under DeepSpeed ZeRO each process holds only a slice of the optimizer state: it is not saved.
        optim_state = optimizer.state_dict() if optimizer is not None else None
        torch.save({"optimizer": optim_state, "scheduler": scheduler.state_dict(), "rng": rng, **asdict(state)},
                   partial / STATE_FILE)
    except Exception:  # a failed write (full disk...) leaves nothing behind; a kill leaves the .partial folder
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if path.exists():  # a rerun reaching the same step: the old one goes only once the new one is complete
        stale = path.with_name(f".{path.name}.stale")
        shutil.rmtree(stale, ignore_errors=True)
        path.rename(stale)
        partial.rename(path)
        shutil.rmtree(stale)
    else:
        partial.rename(path)


def latest_checkpoint(work_dir):
    """The newest complete checkpoint (folders still being written carry a `.partial` name)."""
    found = [(int(m.group(1)), p) for p in Path(work_dir).glob("checkpoint-*")
             if (m := re.fullmatch(r"checkpoint-(\d+)", p.name)) and (p / STATE_FILE).exists()]
    return max(found)[1] if found else None


def load_checkpoint(path, model, optimizer, scheduler, adapter):
    if adapter:
        peft_layers.load_adapter(model, path)
    else:
        model.load_state_dict(load_file(str(path / "model.safetensors")), strict=False)
    saved = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    if saved["optimizer"] is not None and optimizer is not None:
        optimizer.load_state_dict(saved["optimizer"])
    else:
        logger.warning("%s holds no optimizer state (DeepSpeed run): AdamW moments restart", path)
    scheduler.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["rng"]["torch"])
    if "cuda" in saved["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(saved["rng"]["cuda"])
    return TrainState(**{f.name: saved[f.name] for f in fields(TrainState)})


# ---------------------------------------------------------------------------------------------------------------
# Phases

def parse_args(argv=None):
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    parser = HfArgumentParser(TrainArguments, description=__doc__)
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    dtype_from_flags(args.bf16, args.fp16)  # both at once, or --fp16 without a GPU: one clear line
    if min(args.train_batch_size, args.valid_batch_size, args.grad_acc, args.rank, args.seq_len, args.max_epoch,
           args.log_interval, args.eval_interval, args.save_interval) < 1:
        raise UsageError("--train_batch_size, --valid_batch_size, --grad_acc, --rank/--lora_dim, --seq_len, "
                         "--max_epoch and the --*_interval flags must be at least 1")
    if args.max_step is not None and args.max_step < 1:
        raise UsageError(f"--max_step {args.max_step}: give a positive number of steps, or leave it out")
    if args.warmup_step < 0 or not all(0 <= v < 1 for v in (args.lora_dropout, args.model_dropout, args.label_smooth)):
        raise UsageError("--warmup_step must be >= 0, --lora_dropout, --model_dropout and --label_smooth in [0, 1)")
    check_limit(args.max_train_examples, "--max_train_examples")
    check_limit(args.max_valid_examples, "--max_valid_examples")
    spelled = flags_given(argv)
    spelled |= {"rank"} if "lora_dim" in spelled else set()
    spelled |= {"seed"} if "random_seed" in spelled else set()
    spelled |= {"correct_bias"} if "no_correct_bias" in spelled else set()
    return args, spelled


def make_accelerator(args):
    # DeepSpeed and DDP on CPU need gloo; GPUs keep NCCL.
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    handlers = [InitProcessGroupKwargs(backend=process_group_backend())] if distributed else []
    accelerator = Accelerator(
        # microsoft/LoRA's accumulation: an update every --grad_acc batches counted over the whole run (a window may
        # span an epoch's end), while the schedule advances every batch (Trainer.step)
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=args.grad_acc, sync_with_dataloader=False),
        step_scheduler_with_optimizer=False,
        mixed_precision="bf16" if args.bf16 else "fp16" if args.fp16 else "no",
        log_with="tensorboard" if args.report_to == "tensorboard" else None, project_dir=args.work_dir,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True), kwargs_handlers=handlers)
    logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s", force=True)
    return accelerator


def load_data(args):
    """(train rows, valid rows): read and checked before any model is loaded."""
    train_rows = load_e2e(args.train_data, args.mr_format)
    valid_rows = load_e2e(args.valid_data, args.mr_format) if args.valid_data else []
    if valid_rows and is_token_data(valid_rows) != is_token_data(train_rows):
        raise UsageError("--train_data and --valid_data must both be text or both token ids")
    return train_rows, valid_rows


def model_source(args):
    """Where the model (and by default the tokenizer) comes from, before anything heavy is loaded."""
    if args.init_checkpoint:
        folder = Path(args.init_checkpoint).parent
        return args.model_name_or_path or (str(folder) if (folder / "tokenizer.json").exists() else "gpt2")
    return args.model_name_or_path or gpt2_checkpoint.card_hub_name(args.model_card or "gpt2.md")


def set_base_dropout(config, p):
    """Sets every dropout rate in a model config (its float entries named *pdrop or *dropout*) to p before the
    model is built; returns {name: old value} for those that changed."""
    changed = {k: v for k, v in config.to_dict().items()
               if isinstance(v, float) and (k.endswith("pdrop") or "dropout" in k) and v != p}
    for key in changed:
        setattr(config, key, p)
    return changed


def load_model(args):
    """(model, LoRA tensors from --init_checkpoint to load once the adapter exists, notes for the start line)."""
    lora, base, changed = {}, {}, {}
    if args.init_checkpoint:
        base, lora = gpt2_checkpoint.split_state_dict(gpt2_checkpoint.read_state_dict(args.init_checkpoint))
    if not base:
        model = load_causal_lm(model_source(args),
                               edit_config=lambda c: changed.update(set_base_dropout(c, args.model_dropout)))
    elif args.model_name_or_path:
        raise UsageError(f"--init_checkpoint {args.init_checkpoint} holds a whole model: leave out "
                         "--model_name_or_path, or give an adapter-only checkpoint")
    else:
        config = gpt2_checkpoint.gpt2_config(args.init_checkpoint, base, args.model_card)
        changed = set_base_dropout(config, args.model_dropout)
        model = gpt2_checkpoint.build_gpt2(config, base, args.init_checkpoint)
    was = ", ".join(f"{k} {v:g}" for k, v in sorted(changed.items()))
    note = (f"the base model's own dropout is {args.model_dropout:g} while training (its config: {was}), as in "
            "microsoft/LoRA's GPT-2, which has no dropout but the adapter's; --model_dropout sets it")
    return model, lora, [note] if changed else []


def add_adapter(args, model, lora, notes):
    """Apply the adapter (and load --init_checkpoint's LoRA tensors); returns the set-up as a dict, with `notes`
    (the model's) and the adapter's own."""
    notes = list(notes)
    if args.adapter_name == "none":
        if lora:
            raise UsageError("--init_checkpoint holds LoRA tensors but --adapter_name is none")
        trainable, total = peft_layers.trainable_parameters(model)
        return {"method": "none", "rank": None, "alpha": None, "scaling": None, "targets": ["all weights"],
                "dropout": None, "model_dropout": args.model_dropout, "trainable_params": trainable,
                "total_params": total, "notes": notes}
    layer_class = peft_layers.method_class(args.adapter_name)
    targets = args.target_modules or DEFAULT_TARGETS[args.adapter_name]
    alpha = args.lora_alpha if args.lora_alpha is not None else RECIPE_ALPHA.get(args.adapter_name)
    if targets and "c_attn" in targets and not layer_class.fused_qkv:
        notes.append(f"{args.adapter_name} adapts all of c_attn (q, k and v): this suite's {args.adapter_name} has no "
                     "per-slice form, where the paper's code adapts the q and v slices")
    fork = layer_class is peft_layers.RandLoraLayer and args.randlora_scaling == "fork"
    given = alpha if alpha is not None else layer_class.default_alpha(args.rank)
    if fork and model.config.model_type == "gpt2":
        # RandLoRA's NLG code draws n = n_ctx // r + 1 bases for every layer (n_ctx: the context length, 1024 for
        # every GPT-2) and scales the update by alpha / r / sqrt(n).
        n = model.config.n_positions // args.rank + 1
        alpha = given / math.sqrt(n)
        notes.append(f"RandLoRA's NLG scale alpha/r/sqrt(n), n = n_ctx // r + 1 = {n}: alpha stored as "
                     f"{given:g}/sqrt({n})")
    elif fork:  # another causal LM (RandLoRA's NLG code is GPT-2's): its PEFT fork's per-layer n
        alpha, n = peft_layers.randlora_fork_alpha(model, args.rank, given, targets)
        notes.append(f"RandLoRA's scale alpha/r/sqrt(n), n = {n} bases: alpha stored as {given:g}/sqrt({n})")
    peft_layers.apply_adapter(model, args.adapter_name, args.rank, alpha, targets, args.lora_dropout, seed=args.seed)
    if fork:
        per_layer = sorted({m.n_bases for _, m in peft_layers.adapter_layers(model)})
        if per_layer != [n]:
            notes.append(f"its NLG code gives every layer those {n} bases; here each layer has PEFT's "
                         f"ceil(min(in, out) / r) = {'/'.join(map(str, per_layer))} (GPT-2-medium at r 20: 52 both)")
    alpha = model.peft_layers_config["alpha"]
    shown = [t + " (q,v slices)" if layer_class.fused_qkv and t in peft_layers.FUSED_QKV_LORA else t
             for t in model.peft_layers_config["target_modules"]]
    if lora:
        if layer_class is not peft_layers.LoraLayer:
            raise UsageError(f"--init_checkpoint holds LoRA tensors but --adapter_name is {args.adapter_name}")
        gpt2_checkpoint.load_lora_tensors(model, lora, args.init_checkpoint)
    trainable, total = peft_layers.trainable_parameters(model)
    return {"method": args.adapter_name, "rank": args.rank, "alpha": alpha,
            "scaling": alpha / args.rank if layer_class.has_alpha else 1.0, "targets": shown,
            "dropout": args.lora_dropout, "model_dropout": args.model_dropout, "trainable_params": trainable,
            "total_params": total, "notes": notes}


def build_training(args, accelerator, model, train_set, valid_set, pad_id):
    collate = make_collate(pad_id)
    train_loader = DataLoader(train_set, batch_size=args.train_batch_size, shuffle=True, collate_fn=collate,
                              generator=torch.Generator().manual_seed(args.seed))
    # Its own generator keeps validation from drawing on the global RNG, so --resume continues exactly.
    valid_loader = (DataLoader(valid_set, batch_size=args.valid_batch_size, collate_fn=collate,
                               generator=torch.Generator()) if valid_set else None)
    # microsoft/LoRA's AdamW (decoupled weight decay on every trainable tensor, optional bias correction).
    optimizer = LegacyAdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr,
                            betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epislon,
                            weight_decay=args.weight_decay, correct_bias=args.correct_bias)
    # Steps count each process's batches, as microsoft/LoRA's train_step does (an update every --grad_acc of them).
    epochs_steps = math.ceil(len(train_loader) / accelerator.num_processes) * args.max_epoch
    max_step = min(args.max_step or math.inf, epochs_steps)
    scheduler = make_scheduler(args, optimizer, horizon=args.max_step or epochs_steps)
    return (*accelerator.prepare(model, optimizer, train_loader, valid_loader, scheduler), max_step)


def make_scheduler(args, optimizer, horizon):
    """microsoft/LoRA's schedules over `horizon` steps: linear warm-up, then linear decay, constant (its `constant`
    is Hugging Face's constant_with_warmup) or its cosine, which decays from step 0 (not from the warm-up's end) and
    gives the first update lr 0 even without warm-up (its init_lr runs after the scheduler's first step)."""
    # With --grad_acc > 1 the schedule's first step comes before the first update, as in microsoft/LoRA: not an error
    warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before `optimizer.step\(\)`")
    if args.scheduler != "cosine":
        name = "constant_with_warmup" if args.scheduler == "constant" else args.scheduler
        return get_scheduler(name, optimizer, num_warmup_steps=args.warmup_step, num_training_steps=horizon)

    def cosine(step):
        if step == 0 or step < args.warmup_step:
            return step / max(1, args.warmup_step)
        return 0.5 * (1 + math.cos(math.pi * min(step, horizon) / horizon))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, cosine)


def describe(args, setup, max_step, accelerator, spelled):
    """The one start line (and the note about defaults that differ from microsoft/LoRA's gpt2_ft.py)."""
    setup.update(warmup_steps=args.warmup_step, schedule=args.scheduler, max_step=max_step, lr=args.lr,
                 optimizer=f"AdamW betas ({args.adam_beta1}, {args.adam_beta2}) eps {args.adam_epislon} weight "
                           f"decay {args.weight_decay} bias correction {'on' if args.correct_bias else 'off'}",
                 label_smooth=args.label_smooth, batch=f"{args.train_batch_size} x grad_acc {args.grad_acc} x "
                                                       f"{accelerator.num_processes} process(es)", seed=args.seed)
    line = ("setup: " + (f"{setup['method']} r={setup['rank']} alpha={setup['alpha']:g} scaling={setup['scaling']:g} "
                         if setup["rank"] and setup["scaling"] is not None else f"{setup['method']} ")
            + f"targets={','.join(setup['targets'])} dropout={setup['dropout']} trainable="
              f"{setup['trainable_params']:,}/{setup['total_params']:,} model_dropout={args.model_dropout:g} "
              f"warm-up={args.warmup_step} steps "
              f"({args.scheduler}, {max_step} steps) lr={args.lr:g} {setup['optimizer']} "
              f"label_smooth={args.label_smooth} batch={setup['batch']} seed={args.seed}")
    if accelerator.is_main_process:
        print(line, flush=True)
        for note in setup["notes"]:
            print(f"note: {note}", flush=True)
        used = {k: setup["alpha"] if k == "lora_alpha" else getattr(args, k) for k in LORA_ARGPARSE_DEFAULTS}
        if setup["rank"] is None:  # full fine-tuning: no adapter flags apply
            used.update(rank=None, lora_alpha=None, lora_dropout=None)
        note = recipe_defaults_note("gpt2_ft.py", LORA_ARGPARSE_DEFAULTS, used, spelled)
        if note:
            print(note, flush=True)
    return setup


class Trainer:
    """The loop, with the state and the two pauses (validation, checkpoint) it needs."""

    def __init__(self, args, accelerator, model, optimizer, scheduler, train_loader, valid_loader, adapter,
                 max_step):
        self.args, self.acc, self.model, self.optimizer, self.scheduler = args, accelerator, model, optimizer, scheduler
        self.train_loader, self.valid_loader = train_loader, valid_loader
        self.adapter, self.max_step = adapter, max_step
        self.work_dir = Path(args.work_dir)
        self.state = TrainState()
        self.full_optimizer = optimizer if accelerator.distributed_type != DistributedType.DEEPSPEED else None
        self.timer = None

    def resume(self):
        ckpt = latest_checkpoint(self.work_dir)
        if ckpt is None:
            logger.info("--resume: no complete checkpoint in %s, starting from scratch", self.work_dir)
            return
        self.state = load_checkpoint(ckpt, self.acc.unwrap_model(self.model), self.full_optimizer, self.scheduler,
                                     self.adapter)
        self.acc.step = self.state.step  # accelerate's batch count, which places the --grad_acc windows
        logger.info("resumed from %s at step %d (epoch %d)", ckpt, self.state.step, self.state.epoch)
        if self.state.step % self.args.grad_acc:
            logger.warning("%s ends inside a --grad_acc %d window, whose gradients a checkpoint does not hold: the "
                           "first update after resuming sums only the window's remaining batches", ckpt,
                           self.args.grad_acc)

    def paused(self):
        return self.timer.paused() if self.timer else contextlib.nullcontext()

    def checkpoint(self, whole_model=False):
        with self.paused():
            self.acc.wait_for_everyone()
            if self.acc.is_main_process:
                unwrapped, step = self.acc.unwrap_model(self.model), self.state.step
                save_checkpoint(self.work_dir / f"checkpoint-{step}", unwrapped, self.full_optimizer,
                                self.scheduler, self.state, self.adapter)
                gpt2_checkpoint.save_loralib_checkpoint(unwrapped, self.work_dir / f"model.{step}.pt",
                                                        whole=whole_model or not self.adapter)
            self.acc.wait_for_everyone()

    def validate(self):
        if self.valid_loader is None:
            return
        with self.paused():
            metrics = evaluate(self.model, self.valid_loader, self.acc)
            self.state.history.append({"step": self.state.step, **metrics})
            logger.info("step %d: valid loss %.4f, ppl %.2f", self.state.step, metrics["valid_loss"],
                        metrics["valid_ppl"])
            self.acc.log(metrics, step=self.state.step)

    def log(self, running, count):
        """Reads the loss back from the device only here, every --log_interval steps."""
        train_loss = (running / count).item()
        lr = self.scheduler.get_last_lr()[0]
        self.progress.set_postfix(loss=f"{train_loss:.4f}", lr=f"{lr:.2e}")
        self.acc.log({"train_loss": train_loss, "lr": lr}, step=self.state.step)

    def step(self, batch):
        with self.acc.accumulate(self.model):
            loss, _ = completion_loss(self.model, batch, self.args.label_smooth)
            self.acc.backward(loss)
            if self.args.clip > 0 and self.acc.sync_gradients:
                self.acc.clip_grad_norm_(self.model.parameters(), self.args.clip)
            self.optimizer.step()  # prepared: acts only at the end of a --grad_acc window
            self.optimizer.zero_grad()
        self.scheduler.step()  # every batch, as microsoft/LoRA's optimizer_step
        return loss.detach()

    def fit(self):
        self.progress = tqdm(total=self.max_step, initial=self.state.step, desc="train",
                             disable=not self.acc.is_local_main_process)
        with self.progress:  # closed on an error too, so the error line starts a line of its own
            tokens = self.loop()
            train_s = self.timer.seconds()
        return self.throughput(self.acc.reduce(tokens, "sum").item(), train_s)

    def loop(self):
        args, state = self.args, self.state
        running, count = torch.zeros((), device=self.acc.device), 0
        tokens = torch.zeros((), dtype=torch.long, device=self.acc.device)
        reset_peak_memory()
        self.timer = TrainTimer()
        while state.step < self.max_step and state.epoch < args.max_epoch:
            self.train_loader.set_epoch(state.epoch)  # same shuffle per epoch on every run, for --resume
            loader = (self.acc.skip_first_batches(self.train_loader, state.batches_done) if state.batches_done
                      else self.train_loader)
            for batch in loader:
                running += self.step(batch)
                count += 1
                tokens += batch["tokens"]
                state.batches_done += 1
                state.step += 1
                self.progress.update(1)
                if state.step % args.log_interval == 0 or state.step == self.max_step:
                    self.log(running, count)
                    running, count = torch.zeros((), device=self.acc.device), 0
                if state.step % args.eval_interval == 0 and state.step < self.max_step:
                    self.validate()
                if state.step % args.save_interval == 0 and state.step < self.max_step:
                    self.checkpoint()
                if state.step >= self.max_step:
                    break
            else:
                state.epoch, state.batches_done = state.epoch + 1, 0
                if state.step < self.max_step and state.epoch < args.max_epoch:
                    self.checkpoint(whole_model=True)  # microsoft/LoRA: the whole model at each epoch's end
        return tokens

    def throughput(self, train_tokens, train_s):
        out = {"train_tokens": train_tokens, "train_seconds": round(train_s, 3),
               "tokens_per_second": round(train_tokens / train_s, 1) if train_s > 0 else None}
        out["peak_memory_gib"], out["peak_memory_kind"] = peak_memory(self.acc)
        logger.info("trained %d tokens in %.1f s (%s tokens/s); peak memory %.2f GiB (%s)", train_tokens, train_s,
                    out["tokens_per_second"], out["peak_memory_gib"], out["peak_memory_kind"])
        return out

    def finish(self, throughput, setup):
        self.timer = None
        self.validate()
        self.checkpoint(whole_model=True)
        if self.acc.is_main_process:
            final = self.work_dir / "final"
            unwrapped = self.acc.unwrap_model(self.model)
            peft_layers.save_adapter(unwrapped, final) if self.adapter else unwrapped.save_pretrained(final)
            history = self.state.history
            atomic_write_json(self.work_dir / "train_results.json", {
                "step": self.state.step, "epoch": self.state.epoch, "trainable_params": setup["trainable_params"],
                "total_params": setup["total_params"], "final": str(final), **throughput,
                **(history[-1] if history else {}), "history": history, "setup": setup, "args": asdict(self.args)})
            logger.info("done: %d steps; adapter in %s", self.state.step, final)
        self.acc.wait_for_everyone()
        self.acc.end_training()


# Flags that may change when a run is resumed: they steer validation, logging and saving, not what is trained.
RESUME_FREE_FLAGS = {"valid_data", "valid_batch_size", "max_valid_examples", "log_interval", "eval_interval",
                     "save_interval", "work_dir", "resume", "report_to", "platform", "local_rank"}


def check_or_record_settings(args, accelerator):
    """--resume continues only the run these flags describe: checkpoints trained with other settings (another
    --lr, --max_epoch, data, ...) are refused in one line, before anything in --work_dir changes. A fresh run
    records its settings for a later --resume and removes what an earlier run left there: its resume checkpoints
    (which --resume would take for this run's), its model.<step>.pt files, final/ and train_results.json (which
    would make a fresh run that is stopped early look finished)."""
    settings = {**{k: v for k, v in asdict(args).items() if k not in RESUME_FREE_FLAGS},
                "processes": accelerator.num_processes}
    work_dir = Path(args.work_dir)
    if args.resume and latest_checkpoint(work_dir) is not None:
        changed = settings_changed(work_dir, settings)
        if changed is None:
            logger.warning("note: %s has no readable %s (written by an older version?): cannot check that its "
                           "checkpoints were trained with these settings", work_dir, RUN_SETTINGS)
        elif changed:
            raise UsageError(f"--resume: the checkpoints in {work_dir} were trained with other settings ({changed}); "
                             "choose another --work_dir, or drop --resume to train afresh there")
        return
    accelerator.wait_for_everyone()  # every process has looked for checkpoints before any is removed
    if accelerator.is_main_process:
        inputs = [Path(f).resolve() for f in (args.init_checkpoint, args.train_data, args.valid_data) if f]
        earlier = [p for p in (*work_dir.glob("checkpoint-*"), *work_dir.glob("model.*.pt"), work_dir / "final",
                               work_dir / "train_results.json")
                   if p.exists() and not any(f == p.resolve() or p.resolve() in f.parents for f in inputs)]
        for path in earlier:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        if earlier:
            logger.info("a fresh run: removed what an earlier run left in %s (%s)", work_dir,
                        ", ".join(sorted(p.name for p in earlier)[:6]) + (", ..." if len(earlier) > 6 else ""))
        write_run_settings(work_dir, settings)
    accelerator.wait_for_everyone()


def prepare_work_dir(args, accelerator, model):
    """Writable now (not after hours of training), no half-written checkpoint left from a killed run, and the
    model's config.json beside its model.<step>.pt files."""
    work_dir = Path(args.work_dir)
    if accelerator.is_main_process:
        for leftover in [*work_dir.glob(".checkpoint-*.partial"), *work_dir.glob(".checkpoint-*.stale")]:
            shutil.rmtree(leftover, ignore_errors=True)
        gpt2_checkpoint.write_config(model, work_dir)
    accelerator.wait_for_everyone()


def main(argv=None):
    args, spelled = parse_args(argv)
    check_output_dir(args.work_dir, [args.train_data, args.valid_data, args.init_checkpoint])
    accelerator = make_accelerator(args)
    set_seed(args.seed)
    train_rows, valid_rows = load_data(args)
    tokenizer = None if is_token_data(train_rows) else load_tokenizer(args.tokenizer_name or model_source(args))
    model, lora, notes = load_model(args)
    train_set = encode(train_rows, tokenizer, args.seq_len, args.max_train_examples)
    valid_set = encode(valid_rows, tokenizer, args.seq_len, args.max_valid_examples)
    if not train_set:
        raise UsageError(f"no training example fits in --seq_len {args.seq_len}")
    pad_id = GPT2_EOS if tokenizer is None else (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    check_or_record_settings(args, accelerator)  # before prepare_work_dir writes config.json
    prepare_work_dir(args, accelerator, model)
    setup = add_adapter(args, model, lora, notes)
    model.train()
    model, optimizer, train_loader, valid_loader, scheduler, max_step = build_training(
        args, accelerator, model, train_set, valid_set, pad_id)
    setup = describe(args, setup, max_step, accelerator, spelled)
    trainer = Trainer(args, accelerator, model, optimizer, scheduler, train_loader, valid_loader,
                      args.adapter_name != "none", max_step)
    if args.resume:
        trainer.resume()
    if args.report_to == "tensorboard":
        accelerator.init_trackers("gpt2_ft", {k: v for k, v in asdict(args).items() if v is not None
                                              and not isinstance(v, list)})
    throughput = trainer.fit()
    trainer.finish(throughput, setup)


if __name__ == "__main__":
    run_main(main)
