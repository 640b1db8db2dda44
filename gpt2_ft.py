"""Fine-tune a GPT-2 (or any Hugging Face causal LM) with a LoRA, VeRA or RandLoRA adapter on E2E NLG.

    python gpt2_ft.py --train_data ../shared/data/e2e/original/trainset.csv \
        --valid_data ../shared/data/e2e/original/devset.csv --model_name_or_path gpt2-medium \
        --work_dir outputs/e2e --report_to tensorboard
    accelerate launch --num_processes 4 gpt2_ft.py ...        # data parallel (or a DeepSpeed accelerate config)

Defaults are microsoft/LoRA's E2E recipe: LoRA r=4, alpha=32, dropout 0.1 on the q and v slices of c_attn,
label smoothing 0.1, AdamW (lr 2e-4, betas 0.9/0.999, weight decay 0.01), linear schedule with 500 warmup steps,
5 epochs, batch 8, sequences up to 512 tokens. `--adapter_name vera|randlora` adapt c_attn, c_fc and c_proj as
the RandLoRA NLG scripts do; `--adapter_name none` fine-tunes every weight. Flags keep microsoft/LoRA's names.

The story: read context/completion pairs -> tokenise as `context <|endoftext|> completion<|endoftext|>` ->
load the model, add the adapter -> train with the loss on completion tokens only (label-smoothed) ->
validation loss and perplexity every --eval_interval steps and at the end -> adapter-only checkpoints
(work_dir/checkpoint-STEP, with optimizer, scheduler and RNG state for --resume) every --save_interval steps and
at the end; the final adapter also goes to work_dir/final for gpt2_beam.py --init_checkpoint.
train_results.json also records the training throughput (non-padding tokens per second, all processes, validation
and checkpoints not counted) and the peak memory while training (GPU: the largest allocation peak of any process;
CPU: peak RSS).
"""
import contextlib
import logging
import math
import os
import re
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from accelerate import Accelerator, DataLoaderConfiguration, DistributedType, InitProcessGroupKwargs
from safetensors.torch import load_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import HfArgumentParser, get_scheduler, set_seed

import peft_layers
from common import UsageError, atomic_write_json, run_main
from e2e_data import completion_ids, load_causal_lm, load_e2e, load_tokenizer, prompt_ids

logger = logging.getLogger("gpt2_ft")
# The RandLoRA NLG scripts adapt every projection of GPT-2's blocks for VeRA and RandLoRA.
ALL_PROJECTIONS = ["c_attn", "c_fc", "c_proj"]
STATE_FILE = "training_state.pt"


@dataclass
class TrainArguments:
    train_data: str = field(metadata={"help": "training data: .jsonl (context/completion), official E2E .csv or "
                                              "LoRA-format .txt"})
    valid_data: Optional[str] = field(default=None, metadata={"help": "validation data, same formats"})
    model_name_or_path: str = field(default="gpt2-medium", metadata={"help": "causal LM: Hub name or folder"})
    tokenizer_name: Optional[str] = field(default=None, metadata={"help": "default: --model_name_or_path"})
    adapter_name: str = field(default="lora", metadata={
        "help": "adapter to train; 'none' fine-tunes every weight", "choices": ["lora", "vera", "randlora", "none"]})
    target_modules: Optional[list[str]] = field(default=None, metadata={
        "help": "layer-name suffixes to adapt (default: c_attn for LoRA -- its q and v slices --, "
                "c_attn c_fc c_proj for VeRA/RandLoRA)"})
    lora_dim: int = field(default=4, metadata={"help": "adapter rank r"})
    lora_alpha: Optional[float] = field(default=None, metadata={
        "help": "scale numerator (scale = alpha / r); default 32 for LoRA (the E2E recipe), peft_layers' 640 for "
                "RandLoRA; VeRA ignores it"})
    lora_dropout: float = field(default=0.1, metadata={"help": "dropout on the adapter's input"})
    label_smooth: float = field(default=0.1, metadata={"help": "label smoothing of the completion loss"})
    train_batch_size: int = field(default=8, metadata={"help": "sequences per step and process"})
    valid_batch_size: int = field(default=4, metadata={"help": "sequences per validation step and process"})
    grad_acc: int = field(default=1, metadata={"help": "gradient accumulation steps"})
    clip: float = field(default=0.0, metadata={"help": "gradient-norm clipping (0: off)"})
    seq_len: int = field(default=512, metadata={"help": "longest training sequence in tokens (longer ones cut)"})
    lr: float = field(default=2e-4, metadata={"help": "peak learning rate"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1"})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2"})
    adam_epislon: float = field(default=1e-6, metadata={"help": "AdamW epsilon (microsoft/LoRA's spelling)"})
    scheduler: str = field(default="linear", metadata={
        "help": "learning-rate schedule after warm-up", "choices": ["linear", "cosine", "constant_with_warmup"]})
    warmup_step: int = field(default=500, metadata={"help": "linear warm-up steps"})
    max_epoch: int = field(default=5, metadata={"help": "epochs"})
    max_step: Optional[int] = field(default=None, metadata={"help": "stop after this many optimizer steps"})
    log_interval: int = field(default=100, metadata={"help": "log the training loss every N steps"})
    eval_interval: int = field(default=2000, metadata={"help": "validate every N steps"})
    save_interval: int = field(default=1000, metadata={"help": "checkpoint every N steps"})
    work_dir: str = field(default="outputs/e2e", metadata={"help": "checkpoints, logs and results go here"})
    resume: bool = field(default=False, metadata={"help": "continue from the newest checkpoint in --work_dir"})
    random_seed: int = field(default=110, metadata={"help": "seed for initialisation, data order and dropout"})
    mr_format: str = field(default="lora", metadata={
        "help": "CSV inputs: meaning-representation layout", "choices": ["lora", "original"]})
    max_train_examples: Optional[int] = field(default=None, metadata={"help": "use only the first N training rows"})
    max_valid_examples: Optional[int] = field(default=None, metadata={"help": "use only the first N validation rows"})
    bf16: bool = field(default=False, metadata={"help": "bfloat16 mixed precision"})
    fp16: bool = field(default=False, metadata={"help": "float16 mixed precision"})
    report_to: str = field(default="none", metadata={"help": "log to TensorBoard in work_dir/runs",
                                                     "choices": ["none", "tensorboard"]})


# ---------------------------------------------------------------------------------------------------------------
# Data: `context <|endoftext|> completion <|endoftext|>`, with labels on the completion part only.

def encode(rows, tokenizer, seq_len, limit=None):
    examples = []
    for row in rows[:limit]:
        prompt, target = prompt_ids(tokenizer, row["context"]), completion_ids(tokenizer, row["completion"])
        input_ids = (prompt + target)[:seq_len]
        labels = ([-100] * len(prompt) + target)[:seq_len]
        if any(t != -100 for t in labels[1:]):  # something left to predict after the cut
            examples.append({"input_ids": input_ids, "labels": labels})
    return examples


def make_collate(pad_id):
    def collate(batch):
        longest = max(len(b["input_ids"]) for b in batch)
        input_ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), longest), -100, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), longest), dtype=torch.long)
        for i, b in enumerate(batch):
            n = len(b["input_ids"])
            input_ids[i, :n], labels[i, :n], attention_mask[i, :n] = (
                torch.tensor(b["input_ids"]), torch.tensor(b["labels"]), 1)
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
    return collate


def completion_loss(model, batch, label_smoothing):
    """Mean next-token cross-entropy over completion tokens; also the token count."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits, labels = logits[:, :-1].float(), batch["labels"][:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100,
                           label_smoothing=label_smoothing)
    return loss, (labels != -100).sum()


@torch.no_grad()
def evaluate(model, loader, accelerator):
    """Validation loss (no smoothing) averaged over all completion tokens of all processes, and perplexity."""
    model.eval()
    total, count = torch.zeros((), device=accelerator.device), torch.zeros((), device=accelerator.device)
    for batch in loader:
        loss, n = completion_loss(model, batch, 0.0)
        total += loss.float() * n
        count += n
    total, count = accelerator.reduce(total, "sum"), accelerator.reduce(count, "sum")
    model.train()
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


def peak_memory_gib(accelerator):
    """Peak memory of the busiest process since reset_peak_memory(): CUDA's allocation peak on a GPU, else the
    peak resident set size."""
    if torch.cuda.is_available():
        peak, kind = torch.cuda.max_memory_allocated(accelerator.device), "cuda_max_memory_allocated"
    else:
        peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "cpu_peak_rss"  # KiB on Linux
    peak = accelerator.gather(torch.tensor([peak], dtype=torch.float64, device=accelerator.device)).max().item()
    return round(peak / 2**30, 3), kind


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints: adapter (or full weights) as safetensors, small training state through torch.save and
# torch.load(weights_only=True).

def save_checkpoint(path, model, optimizer, scheduler, state, adapter):
    path.mkdir(parents=True, exist_ok=True)
    if adapter:
        peft_layers.save_adapter(model, path)
    else:
        model.save_pretrained(path)
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    tmp = path / f"{STATE_FILE}.tmp"
    # Under DeepSpeed ZeRO each process holds only a slice of the optimizer state: it is not saved.
    optim_state = optimizer.state_dict() if optimizer is not None else None
    torch.save({"optimizer": optim_state, "scheduler": scheduler.state_dict(), "rng": rng, **state}, tmp)
    os.replace(tmp, path / STATE_FILE)


def latest_checkpoint(work_dir):
    found = [(int(m.group(1)), p) for p in Path(work_dir).glob("checkpoint-*")
             if (m := re.fullmatch(r"checkpoint-(\d+)", p.name)) and (p / STATE_FILE).exists()]
    return max(found)[1] if found else None


def load_checkpoint(path, model, optimizer, scheduler, adapter):
    if adapter:
        peft_layers.load_adapter(model, path)
    else:
        model.load_state_dict(load_file(str(path / "model.safetensors")), strict=False)
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    if state["optimizer"] is not None and optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    else:
        logger.warning("%s holds no optimizer state (DeepSpeed run): AdamW moments restart", path)
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["rng"]["cuda"])
    return state


def main():
    (args,) = HfArgumentParser(TrainArguments).parse_args_into_dataclasses()
    if args.bf16 and args.fp16:
        raise UsageError("choose one of --bf16 and --fp16")
    if min(args.train_batch_size, args.valid_batch_size, args.grad_acc, args.lora_dim) < 1:
        raise UsageError("--train_batch_size, --valid_batch_size, --grad_acc and --lora_dim must be at least 1")
    work_dir = Path(args.work_dir)
    # DeepSpeed and DDP on CPU need gloo; GPUs keep NCCL.
    distributed_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    accelerator = Accelerator(
        gradient_accumulation_steps=args.grad_acc,
        mixed_precision="bf16" if args.bf16 else "fp16" if args.fp16 else "no",
        log_with="tensorboard" if args.report_to == "tensorboard" else None, project_dir=str(work_dir),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")] if distributed_cpu else [])
    logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")
    set_seed(args.random_seed)

    # ---- data
    tokenizer = load_tokenizer(args.tokenizer_name or args.model_name_or_path)
    train_set = encode(load_e2e(args.train_data, args.mr_format), tokenizer, args.seq_len, args.max_train_examples)
    valid_set = (encode(load_e2e(args.valid_data, args.mr_format), tokenizer, args.seq_len, args.max_valid_examples)
                 if args.valid_data else [])
    if not train_set:
        raise UsageError(f"no training example fits in --seq_len {args.seq_len}")
    collate = make_collate(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    train_loader = DataLoader(train_set, batch_size=args.train_batch_size, shuffle=True, collate_fn=collate,
                              generator=torch.Generator().manual_seed(args.random_seed))
    # Its own generator keeps validation from drawing on the global RNG, so --resume continues exactly.
    valid_loader = (DataLoader(valid_set, batch_size=args.valid_batch_size, collate_fn=collate,
                               generator=torch.Generator()) if valid_set else None)

    # ---- model and adapter
    model = load_causal_lm(args.model_name_or_path)
    adapter = args.adapter_name != "none"
    if adapter:
        targets = args.target_modules or (None if args.adapter_name == "lora" else ALL_PROJECTIONS)
        alpha = args.lora_alpha if args.lora_alpha is not None else 32 if args.adapter_name == "lora" else None
        peft_layers.apply_adapter(model, args.adapter_name, args.lora_dim, alpha, targets, args.lora_dropout,
                                  seed=args.random_seed)
    trainable, total = peft_layers.trainable_parameters(model)
    logger.info("%s: %d trainable of %d parameters (%.3f%%)", args.adapter_name, trainable, total,
                100 * trainable / total)
    model.train()

    # ---- optimizer and schedule (microsoft/LoRA: AdamW with decoupled weight decay on every trainable tensor)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr,
                                  betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epislon,
                                  weight_decay=args.weight_decay)
    steps_per_epoch = math.ceil(len(train_loader) / accelerator.num_processes / args.grad_acc)
    max_step = min(args.max_step or math.inf, steps_per_epoch * args.max_epoch)
    # accelerate steps a prepared scheduler once per process at every optimizer step, hence the factor.
    scheduler = get_scheduler(args.scheduler, optimizer, num_warmup_steps=args.warmup_step * accelerator.num_processes,
                              num_training_steps=max_step * accelerator.num_processes)
    model, optimizer, train_loader, valid_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, valid_loader, scheduler)

    step, epoch, batches_done = 0, 0, 0
    history = []
    full_optimizer = optimizer if accelerator.distributed_type != DistributedType.DEEPSPEED else None
    if args.resume:
        ckpt = latest_checkpoint(work_dir)
        if ckpt is None:
            logger.info("--resume: no checkpoint in %s, starting from scratch", work_dir)
        else:
            state = load_checkpoint(ckpt, accelerator.unwrap_model(model), full_optimizer, scheduler, adapter)
            step, epoch, batches_done, history = state["step"], state["epoch"], state["batches_done"], state["history"]
            logger.info("resumed from %s at step %d (epoch %d)", ckpt, step, epoch)
    if args.report_to == "tensorboard":
        accelerator.init_trackers("gpt2_ft", {k: v for k, v in asdict(args).items() if v is not None
                                              and not isinstance(v, list)})

    # Both run while the training timer (started before the loop) is paused.
    def checkpoint():
        with timer.paused():
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                state = {"step": step, "epoch": epoch, "batches_done": batches_done, "history": history}
                save_checkpoint(work_dir / f"checkpoint-{step}", accelerator.unwrap_model(model), full_optimizer,
                                scheduler, state, adapter)
            accelerator.wait_for_everyone()

    def validate():
        if valid_loader is None:
            return
        with timer.paused():
            metrics = evaluate(model, valid_loader, accelerator)
            history.append({"step": step, **metrics})
            logger.info("step %d: valid loss %.4f, ppl %.2f", step, metrics["valid_loss"], metrics["valid_ppl"])
            accelerator.log(metrics, step=step)

    # ---- train
    progress = tqdm(total=max_step, initial=step, desc="train", disable=not accelerator.is_local_main_process)
    running, running_n = 0.0, 0
    train_tokens = torch.zeros((), dtype=torch.long, device=accelerator.device)
    reset_peak_memory()
    timer = TrainTimer()
    while step < max_step and epoch < args.max_epoch:
        train_loader.set_epoch(epoch)  # same shuffle per epoch on every run, so --resume sees the same order
        loader = accelerator.skip_first_batches(train_loader, batches_done) if batches_done else train_loader
        for batch in loader:
            with accelerator.accumulate(model):
                loss, _ = completion_loss(model, batch, args.label_smooth)
                accelerator.backward(loss)
                if args.clip > 0 and accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), args.clip)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            batches_done += 1
            train_tokens += batch["attention_mask"].sum()
            running, running_n = running + loss.item(), running_n + 1
            if not accelerator.sync_gradients:
                continue
            step += 1
            progress.update(1)
            if step % args.log_interval == 0 or step == max_step:
                train_loss = running / running_n
                progress.set_postfix(loss=f"{train_loss:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
                accelerator.log({"train_loss": train_loss, "lr": scheduler.get_last_lr()[0]}, step=step)
                running, running_n = 0.0, 0
            if step % args.eval_interval == 0 and step < max_step:
                validate()
            if step % args.save_interval == 0 and step < max_step:
                checkpoint()
            if step >= max_step:
                break
        else:
            epoch, batches_done = epoch + 1, 0
    train_s = timer.seconds()
    progress.close()
    train_tokens = accelerator.reduce(train_tokens, "sum").item()
    throughput = {"train_tokens": train_tokens, "train_seconds": round(train_s, 3),
                  "tokens_per_second": round(train_tokens / train_s, 1) if train_s > 0 else None}
    throughput["peak_memory_gib"], throughput["peak_memory_kind"] = peak_memory_gib(accelerator)
    logger.info("trained %d tokens in %.1f s (%s tokens/s); peak memory %.2f GiB (%s)", train_tokens, train_s,
                throughput["tokens_per_second"], throughput["peak_memory_gib"], throughput["peak_memory_kind"])

    # ---- end: validate, checkpoint, final adapter
    validate()
    checkpoint()
    if accelerator.is_main_process:
        final = work_dir / "final"
        unwrapped = accelerator.unwrap_model(model)
        peft_layers.save_adapter(unwrapped, final) if adapter else unwrapped.save_pretrained(final)
        atomic_write_json(work_dir / "train_results.json", {
            "step": step, "epoch": epoch, "trainable_params": trainable, "total_params": total,
            "final": str(final), **throughput, **(history[-1] if history else {}), "history": history,
            "args": asdict(args)})
        logger.info("done: %d steps; adapter in %s", step, final)
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    run_main(main)
