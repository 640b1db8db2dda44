"""Beam-search decoding of the E2E (or any context/completion) test set with a GPT-2 and its trained adapter.

    python gpt2_beam.py --data ../shared/data/e2e/original/testset_w_refs.csv \
        --model_name_or_path gpt2-medium --init_checkpoint outputs/e2e/final \
        --beam 10 --length_penalty 0.8 --no_repeat_ngram_size 4 --eos_token_id 628 50256 \
        --work_dir outputs/e2e --output_file predict.jsonl
    accelerate launch --num_processes 4 gpt2_beam.py ...     # each process decodes a shard

The story: read the data -> keep each distinct meaning representation once (the E2E test set has 4,693 lines
but 630 of them) -> load the base model, load the adapter and merge it into the weights (no adapter cost at
decode time) -> batched, left-padded Hugging Face `generate` with beam search and KV cache, shortest prompts
together -> every process decodes its shard -> process 0 gathers and writes one JSONL in input order:
{"id", "context", "token_ids", "text"}, one line per distinct context. gpt2_decode.py turns it into the
scorer's files. Flags keep microsoft/LoRA's gpt2_beam.py names.
"""
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from accelerate import Accelerator, InitProcessGroupKwargs
from accelerate.utils import gather_object
from tqdm.auto import tqdm
from transformers import HfArgumentParser, set_seed

import peft_layers
from common import UsageError, atomic_write_text, run_main
from e2e_data import group_references, load_causal_lm, load_e2e, load_tokenizer, prompt_ids

logger = logging.getLogger("gpt2_beam")


@dataclass
class BeamArguments:
    data: str = field(metadata={"help": "data to decode: .jsonl (context/completion), official E2E .csv or LoRA .txt"})
    model_name_or_path: str = field(default="gpt2-medium", metadata={"help": "base causal LM: Hub name or folder"})
    tokenizer_name: Optional[str] = field(default=None, metadata={
        "help": "tokenizer folder or name (default: --model_name_or_path)"})
    init_checkpoint: Optional[str] = field(default=None, metadata={
        "help": "adapter to merge: a gpt2_ft.py checkpoint folder, a PEFT folder, or a loralib .pt (with --lora_dim "
                "and --lora_alpha); none decodes the base model"})
    lora_dim: int = field(default=4, metadata={"help": "loralib .pt checkpoints only: their LoRA rank"})
    lora_alpha: float = field(default=32, metadata={"help": "loralib .pt checkpoints only: their LoRA alpha"})
    work_dir: str = field(default="outputs/e2e", metadata={"help": "folder for the output file"})
    output_file: str = field(default="predict.jsonl", metadata={"help": "output JSONL name inside --work_dir"})
    batch_size: int = field(default=16, metadata={"help": "distinct contexts per generate call (per process)"})
    seq_len: int = field(default=512, metadata={"help": "longest prompt + generation, in tokens"})
    eval_len: int = field(default=64, metadata={"help": "most tokens to generate"})
    min_length: int = field(default=0, metadata={"help": "fewest tokens to generate before an end token may end it"})
    beam: int = field(default=10, metadata={"help": "beam size"})
    length_penalty: float = field(default=0.8, metadata={"help": "beam score = log-prob / length**length_penalty"})
    no_repeat_ngram_size: int = field(default=4, metadata={"help": "never repeat an n-gram of this size (0: off)"})
    repetition_penalty: float = field(default=1.0, metadata={"help": "CTRL repetition penalty (1.0: off)"})
    eos_token_id: list[int] = field(default_factory=lambda: [628, 50256], metadata={
        "help": "tokens that end a generation (GPT-2: 628 = blank line, 50256 = <|endoftext|>)"})
    mr_format: str = field(default="lora", metadata={
        "help": "CSV inputs: meaning-representation layout (as for training)", "choices": ["lora", "original"]})
    max_examples: Optional[int] = field(default=None, metadata={"help": "decode only the first N distinct contexts"})
    bf16: bool = field(default=False, metadata={"help": "decode in bfloat16"})
    fp16: bool = field(default=False, metadata={"help": "decode in float16"})
    random_seed: int = field(default=10, metadata={"help": "seed (beam search itself is deterministic)"})


def load_model(args, device):
    dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32
    tokenizer = load_tokenizer(args.tokenizer_name or args.model_name_or_path)
    model = load_causal_lm(args.model_name_or_path, dtype=dtype)
    if args.init_checkpoint:
        if not os.path.exists(args.init_checkpoint):
            raise UsageError(f"--init_checkpoint {args.init_checkpoint} does not exist")
        if Path(args.init_checkpoint).suffix in (".pt", ".bin", ".pth"):  # loralib: no config inside
            peft_layers.apply_adapter(model, "lora", args.lora_dim, args.lora_alpha)
        peft_layers.load_adapter(model, args.init_checkpoint)
    model.eval()  # merges the adapter into the weights
    return tokenizer, model.to(device)


@torch.no_grad()
def generate_batch(model, tokenizer, prompts, args, device):
    """Left-padded beam search for a list of prompt token lists; returns each one's generated tokens, cut at the
    first end token."""
    longest = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.full((len(prompts), longest), pad, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, p in enumerate(prompts):
        input_ids[row, longest - len(p):] = torch.tensor(p)
        attention_mask[row, longest - len(p):] = 1
    out = model.generate(
        input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
        max_new_tokens=min(args.eval_len, args.seq_len - longest), min_new_tokens=args.min_length,
        num_beams=args.beam, length_penalty=args.length_penalty, no_repeat_ngram_size=args.no_repeat_ngram_size,
        repetition_penalty=args.repetition_penalty, eos_token_id=args.eos_token_id, pad_token_id=pad,
        do_sample=False, use_cache=True)
    generated = []
    for row in out[:, longest:].tolist():
        end = next((i for i, t in enumerate(row) if t in args.eos_token_id), len(row))
        generated.append(row[:end])
    return generated


def decode_contexts(model, tokenizer, contexts, args, device, show_progress=True):
    """(context index, token ids) for every context, decoding similar lengths together."""
    prompts = [prompt_ids(tokenizer, c) for c in contexts]
    too_long = [i for i, p in enumerate(prompts) if len(p) >= args.seq_len]
    if too_long:
        raise UsageError(f"{len(too_long)} prompts are --seq_len {args.seq_len} tokens or longer; raise --seq_len")
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
    results = []
    batches = [order[i:i + args.batch_size] for i in range(0, len(order), args.batch_size)]
    for batch in tqdm(batches, desc="beam search", disable=not show_progress):
        generated = generate_batch(model, tokenizer, [prompts[i] for i in batch], args, device)
        for i, tokens in zip(batch, generated, strict=True):
            results.append((i, tokens))
    return results


def main():
    (args,) = HfArgumentParser(BeamArguments).parse_args_into_dataclasses()
    if args.beam < 1 or args.batch_size < 1:
        raise UsageError("--beam and --batch_size must be at least 1")
    if args.bf16 and args.fp16:
        raise UsageError("choose one of --bf16 and --fp16")
    # Several CPU processes gather their shards over gloo; GPUs keep NCCL.
    distributed_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    handlers = [InitProcessGroupKwargs(backend="gloo")] if distributed_cpu else []
    accelerator = Accelerator(kwargs_handlers=handlers)
    logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.WARNING)
    set_seed(args.random_seed)

    rows = load_e2e(args.data, args.mr_format)
    contexts, _ = group_references(rows)
    if args.max_examples:
        contexts = contexts[:args.max_examples]
    logger.info("%d lines, %d distinct contexts to decode on %d process(es)", len(rows), len(contexts),
                accelerator.num_processes)
    tokenizer, model = load_model(args, accelerator.device)

    with accelerator.split_between_processes(list(range(len(contexts)))) as shard:
        local = decode_contexts(model, tokenizer, [contexts[i] for i in shard], args, accelerator.device,
                                accelerator.is_local_main_process)
        local = [(shard[i], tokens) for i, tokens in local]
    results = sorted(gather_object(local)) if accelerator.num_processes > 1 else sorted(local)

    if accelerator.is_main_process:
        lines = [{"id": i, "context": contexts[i], "token_ids": tokens, "text": tokenizer.decode(tokens)}
                 for i, tokens in results]
        out_path = Path(args.work_dir) / args.output_file
        atomic_write_text(out_path, "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines))
        logger.info("wrote %d generations to %s", len(lines), out_path)
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    run_main(main)
