"""Beam-search decoding of the E2E (or any context/completion) test set with a GPT-2 and its trained adapter.

    python gpt2_beam.py --data ../shared/data/e2e/original/testset_w_refs.csv \
        --model_name_or_path gpt2-medium --init_checkpoint outputs/e2e/final \
        --beam 10 --length_penalty 0.8 --no_repeat_ngram_size 4 --eos_token_id 628 \
        --work_dir outputs/e2e --output_file predict.jsonl
    accelerate launch --num_processes 4 gpt2_beam.py ...     # each process decodes a shard
    python -m torch.distributed.launch --nproc_per_node=1 gpt2_beam.py --data ./data/e2e/test.jsonl \
        --model_card gpt2.md --init_checkpoint ./trained_models/GPT2_M/e2e/model.5258.pt --lora_dim 4 ...
                                                             # microsoft/LoRA's command, as written

The story: read the data -> keep each distinct meaning representation once (the E2E test set has 4,693 lines
but 630 of them) -> build the model: a base model plus an adapter (a gpt2_ft.py folder, a PEFT folder, or a
loralib .pt), or microsoft/LoRA's whole-model model.<step>.pt with its --model_card (see gpt2_checkpoint.py);
the adapter is merged into the weights (no adapter cost at decode time); one start line states the set-up ->
batched, left-padded Hugging Face `generate` with beam search and KV cache, shortest prompts together -> every
process decodes its shard -> process 0 gathers and writes one JSONL in input order.

Output (--output_format): `grouped` (text data): {"id", "context", "token_ids", "text"}, one line per distinct
context. `lora` (token-id data, microsoft/LoRA's gpt2_encode.py output): microsoft/LoRA's format, one
{"id": input line, "predict": [token ids]} per input line, the end token included; repeated contexts get the
same (once decoded) prediction. gpt2_decode.py reads both. End tokens: --eos_token_id values are added to
end-of-text (50256), as microsoft/LoRA's `action='append'` flag does, so `--eos_token_id 628` stops at 628 and
at 50256.
"""
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator, InitProcessGroupKwargs
from accelerate.utils import gather_object
from tqdm.auto import tqdm
from transformers import HfArgumentParser, set_seed

import gpt2_checkpoint
import peft_layers
from common import (
    UsageError,
    atomic_write_json,
    atomic_write_text,
    check_not_input,
    check_output_dir,
    dtype_from_flags,
    flags_given,
    process_group_backend,
    recipe_defaults_note,
    run_main,
)
from e2e_data import check_limit, group_references, is_token_data, load_causal_lm, load_e2e, load_tokenizer, prompt_ids

logger = logging.getLogger("gpt2_beam")
END_OF_TEXT = 50256


@dataclass
class BeamArguments:
    data: str = field(metadata={"help": "data to decode: .jsonl (text or token ids), official E2E .csv or LoRA .txt"})
    model_name_or_path: str | None = field(default=None, metadata={
        "help": "base causal LM: Hub name or folder (default: the --model_card's GPT-2, gpt2-medium)"})
    model_card: str | None = field(default=None, metadata={
        "help": "microsoft/LoRA's GPT-2 size for a whole-model --init_checkpoint: gpt2.sm, gpt2.md, gpt2.lg",
        "choices": list(gpt2_checkpoint.MODEL_CARDS)})
    tokenizer_name: str | None = field(default=None, metadata={
        "help": "tokenizer folder or name (default: the model's); not needed for token-id data"})
    init_checkpoint: str | None = field(default=None, metadata={
        "help": "adapter to merge (a gpt2_ft.py checkpoint folder, a PEFT folder, a loralib .pt with --rank and "
                "--lora_alpha), or a whole-model model.<step>.pt; none decodes the base model"})
    rank: int = field(default=4, metadata={"aliases": ["--lora_dim"],
                                           "help": "loralib .pt checkpoints: their LoRA rank (alias --lora_dim)"})
    lora_alpha: float = field(default=32, metadata={"help": "loralib .pt checkpoints: their LoRA alpha"})
    work_dir: str = field(default="outputs/e2e", metadata={"help": "folder for the output file"})
    output_file: str = field(default="predict.jsonl", metadata={"help": "output JSONL name inside --work_dir"})
    output_format: str = field(default="auto", metadata={
        "help": "auto: lora for token-id data, grouped for text", "choices": ["auto", "lora", "grouped"]})
    batch_size: int = field(default=16, metadata={"help": "distinct contexts per generate call (per process)"})
    seq_len: int = field(default=512, metadata={"help": "longest prompt + generation, in tokens"})
    eval_len: int = field(default=64, metadata={"help": "most tokens to generate"})
    min_length: int = field(default=0, metadata={"help": "fewest tokens to generate before an end token may end it"})
    beam: int = field(default=10, metadata={"help": "beam size"})
    length_penalty: float = field(default=0.8, metadata={"help": "beam score = log-prob / length**length_penalty"})
    no_repeat_ngram_size: int = field(default=4, metadata={"help": "never repeat an n-gram of this size (0: off)"})
    repetition_penalty: float = field(default=1.0, metadata={"help": "CTRL repetition penalty (1.0: off)"})
    eos_token_id: list[int] = field(default_factory=list, metadata={
        "help": "more tokens that end a generation, added to end-of-text (GPT-2: 628 = blank line); may be repeated"})
    mr_format: str = field(default="lora", metadata={
        "help": "CSV inputs: meaning-representation layout (as for training)", "choices": ["lora", "original"]})
    max_examples: int | None = field(default=None, metadata={"help": "decode only the first N distinct contexts"})
    bf16: bool = field(default=False, metadata={"help": "decode in bfloat16"})
    fp16: bool = field(default=False, metadata={"help": "decode in float16 (needs a GPU)"})
    seed: int = field(default=10, metadata={"aliases": ["--random_seed"],
                                            "help": "seed (beam search itself is deterministic)"})
    platform: str = field(default="local", metadata={
        "help": "microsoft/LoRA's launcher name; processes come from the launcher's environment",
        "choices": ["local", "k8s", "philly", "azure"]})
    local_rank: int = field(default=-1, metadata={
                                                  "help": "set by torch.distributed.launch; read from LOCAL_RANK"})


# microsoft/LoRA gpt2_beam.py's argparse defaults where this script follows the E2E recipe's decoding command
# instead (said at start when left out).
LORA_ARGPARSE_DEFAULTS = {"beam": 1, "length_penalty": 1.0, "eval_len": 256, "work_dir": "gpt2_model",
                          "output_file": "beam_prediction.jsonl"}


def merge_repeated(argv, flag):
    """`--flag 1 --flag 2` -> `--flag 1 2`: microsoft/LoRA's --eos_token_id is an argparse 'append' flag."""
    rest, values, first = [], [], None
    i = 0
    while i < len(argv):
        if argv[i] != flag and not argv[i].startswith(flag + "="):
            rest.append(argv[i])
            i += 1
            continue
        if first is None:
            first = len(rest)
        if "=" in argv[i]:
            values.append(argv[i].split("=", 1)[1])
            i += 1
            continue
        i += 1
        while i < len(argv) and not argv[i].startswith("--"):
            values.append(argv[i])
            i += 1
    return rest if first is None else [*rest[:first], flag, *values, *rest[first:]]


def parse_args(argv=None):
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    (args,) = HfArgumentParser(BeamArguments, description=__doc__).parse_args_into_dataclasses(
        args=merge_repeated(argv, "--eos_token_id"))
    spelled = flags_given(argv)
    dtype_from_flags(args.bf16, args.fp16)
    if min(args.beam, args.batch_size, args.eval_len, args.seq_len) < 1:
        raise UsageError(f"--beam, --batch_size, --eval_len and --seq_len must be at least 1 (got --beam {args.beam}, "
                         f"--batch_size {args.batch_size}, --eval_len {args.eval_len}, --seq_len {args.seq_len})")
    if args.min_length < 0 or args.min_length > args.eval_len:
        raise UsageError(f"--min_length {args.min_length} must lie between 0 and --eval_len {args.eval_len}")
    if args.no_repeat_ngram_size < 0 or args.repetition_penalty <= 0:
        raise UsageError("--no_repeat_ngram_size must be >= 0 and --repetition_penalty > 0")
    check_limit(args.max_examples, "--max_examples")
    if Path(args.output_file).name != args.output_file:
        raise UsageError(f"--output_file {args.output_file!r} is a file name inside --work_dir, not a path")
    return args, spelled


def load_model(args, device, token_data=False):
    """(tokenizer or None, model with the adapter merged, set-up dict)."""
    dtype = dtype_from_flags(args.bf16, args.fp16)
    setup = {"init_checkpoint": args.init_checkpoint, "adapter": None}
    ckpt = args.init_checkpoint
    if ckpt and not os.path.exists(ckpt):
        raise UsageError(f"--init_checkpoint {ckpt} does not exist")
    base, lora = {}, {}
    if ckpt and Path(ckpt).suffix in (".pt", ".bin", ".pth") and Path(ckpt).is_file():
        base, lora = gpt2_checkpoint.split_state_dict(gpt2_checkpoint.read_state_dict(ckpt))
    if base:  # microsoft/LoRA's whole-model model.<step>.pt: the model itself, shaped by --model_card
        if args.model_name_or_path:
            raise UsageError(f"--init_checkpoint {ckpt} holds a whole model: leave out --model_name_or_path")
        model = gpt2_checkpoint.build_gpt2(gpt2_checkpoint.gpt2_config(ckpt, base, args.model_card), base, ckpt)
        source = str(Path(ckpt).parent) if (Path(ckpt).parent / "tokenizer.json").exists() else "gpt2"
    else:
        source = args.model_name_or_path or gpt2_checkpoint.card_hub_name(args.model_card or "gpt2.md")
        model = load_causal_lm(source)
    if lora:
        rank = gpt2_checkpoint.lora_rank(lora)
        if rank != args.rank:
            raise UsageError(f"{ckpt} holds LoRA tensors of rank {rank}, but --rank/--lora_dim is {args.rank}: "
                             f"pass --lora_dim {rank}")
        peft_layers.apply_adapter(model, "lora", rank, args.lora_alpha, seed=0)  # its tensors are loaded next
        gpt2_checkpoint.load_lora_tensors(model, lora, ckpt)
        setup["adapter"] = {"method": "lora", "rank": rank, "alpha": args.lora_alpha,
                            "scaling": args.lora_alpha / rank, "alpha_from": "--lora_alpha (loralib files hold none)"}
    elif ckpt and not base:
        if Path(ckpt).suffix in (".pt", ".bin", ".pth"):  # loralib: no config inside
            peft_layers.apply_adapter(model, "lora", args.rank, args.lora_alpha, seed=0)
        peft_layers.load_adapter(model, ckpt)
    cfg = getattr(model, "peft_layers_config", None)
    if cfg and setup["adapter"] is None:
        setup["adapter"] = {"method": cfg["method"], "rank": cfg["rank"], "alpha": cfg["alpha"],
                            "scaling": cfg["alpha"] / cfg["rank"] if cfg["method"] != "vera" else 1.0,
                            "targets": cfg["target_modules"]}
    model.eval()  # merges the adapter into the weights
    tokenizer = None
    if not token_data:
        tokenizer = load_tokenizer(args.tokenizer_name or source)
    return tokenizer, model.to(device=device, dtype=dtype), setup


class GeneratedNoRepeatNGram:
    """microsoft/LoRA's no-repeat rule: an n-gram may not occur twice *in the generated text*. Hugging Face's
    `no_repeat_ngram_size` also counts the prompt, so a name the meaning representation spells in 4+ tokens
    (`near : Café Adriatic` is ` Café`, ` Ad`, `ri`, `atic`) could never be copied whole into the sentence."""

    def __init__(self, size, prompt_len):
        self.size, self.prompt_len = size, prompt_len

    def __call__(self, input_ids, scores):
        generated = input_ids[:, self.prompt_len:]
        n = self.size
        if generated.shape[1] + 1 < n:
            return scores
        for row, tokens in enumerate(generated.tolist()):
            prefix = tuple(tokens[len(tokens) - n + 1:]) if n > 1 else ()
            banned = {tokens[i + n - 1] for i in range(len(tokens) - n + 1) if tuple(tokens[i:i + n - 1]) == prefix}
            if banned:
                scores[row, list(banned)] = -float("inf")
        return scores


@torch.no_grad()
def generate_batch(model, pad, prompts, args, device, eos_ids):
    """Left-padded beam search for a list of prompt token lists; returns each one's generated tokens up to its
    first end token, and whether it ended on one."""
    longest = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), longest), pad, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, p in enumerate(prompts):
        input_ids[row, longest - len(p):] = torch.tensor(p)
        attention_mask[row, longest - len(p):] = 1
    from transformers import LogitsProcessorList
    no_repeat = [GeneratedNoRepeatNGram(args.no_repeat_ngram_size, longest)] if args.no_repeat_ngram_size else []
    out = model.generate(
        input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
        max_new_tokens=min(args.eval_len, args.seq_len - longest), min_new_tokens=args.min_length,
        num_beams=args.beam, length_penalty=args.length_penalty, logits_processor=LogitsProcessorList(no_repeat),
        repetition_penalty=args.repetition_penalty, eos_token_id=eos_ids, pad_token_id=pad,
        # generate bans tokens (no-repeat, min length) in log-probabilities; microsoft/LoRA bans them in the logits
        # and takes the softmax after, so the rest of the beam's tokens share the banned probability
        renormalize_logits=True, do_sample=False, use_cache=True)
    generated = []
    for row in out[:, longest:].tolist():
        end = next((i for i, t in enumerate(row) if t in eos_ids), None)
        generated.append((row, False) if end is None else (row[:end + 1], True))
    return generated


def decode_contexts(model, tokenizer, contexts, args, device, show_progress=True, eos_ids=None):
    """(context index, token ids without the end token, end token or None) for every context, decoding similar
    lengths together. Contexts are text or (token-id data) tuples of ids that already end with the separator."""
    eos_ids = eos_ids or end_tokens(args, tokenizer)
    prompts = [list(c) if isinstance(c, tuple) else prompt_ids(tokenizer, c) for c in contexts]
    too_long = [i for i, p in enumerate(prompts) if len(p) >= args.seq_len]
    if too_long:
        raise UsageError(f"{len(too_long)} prompts are --seq_len {args.seq_len} tokens or longer; raise --seq_len")
    pad = END_OF_TEXT if tokenizer is None else (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
    results = []
    batches = [order[i:i + args.batch_size] for i in range(0, len(order), args.batch_size)]
    for batch in tqdm(batches, desc="beam search", disable=not show_progress):
        generated = generate_batch(model, pad, [prompts[i] for i in batch], args, device, eos_ids)
        for i, (tokens, ended) in zip(batch, generated, strict=True):
            results.append((i, tokens[:-1] if ended else tokens, tokens[-1] if ended else None))
    return results


def end_tokens(args, tokenizer):
    """End-of-text plus every --eos_token_id (microsoft/LoRA: default [50256], the flag appends)."""
    base = tokenizer.eos_token_id if tokenizer is not None and tokenizer.eos_token_id is not None else END_OF_TEXT
    return list(dict.fromkeys([base, *args.eos_token_id]))


def output_lines(rows, contexts, results, tokenizer, output_format):
    by_context = {i: (tokens, end) for i, tokens, end in results}
    if output_format == "grouped":
        return [{"id": i, "context": contexts[i], "token_ids": by_context[i][0],
                 "text": tokenizer.decode(by_context[i][0]) if tokenizer else None} for i in sorted(by_context)]
    index = {c: i for i, c in enumerate(contexts)}
    lines = []
    for line_no, row in enumerate(rows):
        key = tuple(row["context"]) if isinstance(row["context"], list) else row["context"]
        if key in index and index[key] in by_context:
            tokens, end = by_context[index[key]]
            lines.append({"id": line_no, "predict": tokens + ([end] if end is not None else [])})
    return lines


def main(argv=None):
    args, spelled = parse_args(argv)
    out_path = Path(args.work_dir) / args.output_file
    check_output_dir(args.work_dir)
    check_not_input(out_path, args.data, args.init_checkpoint)
    handlers = [InitProcessGroupKwargs(backend=process_group_backend())] \
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 else []
    accelerator = Accelerator(kwargs_handlers=handlers)
    logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.WARNING, force=True)
    set_seed(args.seed)

    rows = load_e2e(args.data, args.mr_format)
    contexts, _ = group_references(rows)
    if args.max_examples:
        contexts = contexts[:args.max_examples]
    output_format = args.output_format if args.output_format != "auto" else (
        "lora" if is_token_data(rows) else "grouped")
    tokenizer, model, setup = load_model(args, accelerator.device, is_token_data(rows))
    eos_ids = end_tokens(args, tokenizer)
    setup.update(end_tokens=eos_ids, beam=args.beam, length_penalty=args.length_penalty,
                 no_repeat_ngram_size=args.no_repeat_ngram_size, eval_len=args.eval_len, output_format=output_format)
    if accelerator.is_main_process:
        print("setup: " + json.dumps(setup), flush=True)
        used = {k: getattr(args, k) for k in LORA_ARGPARSE_DEFAULTS}
        note = recipe_defaults_note("gpt2_beam.py", LORA_ARGPARSE_DEFAULTS, used, spelled)
        if note:
            print(note, flush=True)
        if args.repetition_penalty != 1.0:
            print(f"note: --repetition_penalty {args.repetition_penalty:g} is Hugging Face's (it counts the prompt's "
                  "tokens and scales log-probabilities); microsoft/LoRA's scales the raw logits of generated tokens "
                  "only, so the two differ", flush=True)
    logger.info("%d lines, %d distinct contexts to decode on %d process(es)", len(rows), len(contexts),
                accelerator.num_processes)

    with accelerator.split_between_processes(list(range(len(contexts)))) as shard:
        local = decode_contexts(model, tokenizer, [contexts[i] for i in shard], args, accelerator.device,
                                accelerator.is_local_main_process, eos_ids)
        local = [(shard[i], tokens, end) for i, tokens, end in local]
    results = sorted(gather_object(local)) if accelerator.num_processes > 1 else sorted(local)

    if accelerator.is_main_process:
        lines = output_lines(rows, contexts, results, tokenizer, output_format)
        atomic_write_text(out_path, "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines))
        atomic_write_json(out_path.with_name(out_path.name + ".setup.json"), setup)
        logger.info("wrote %d generations to %s", len(lines), out_path)
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    run_main(main)
