"""The adapted layers alone, forward + backward: ours vs HF PEFT, side by side.

The whole-model benchmark (bench_adapters.py) spends most of its time in the frozen model, which both sides
share, so its ratios move by a few percent from run to run on a busy machine. This one times only the adapted
layers of one block, interleaved over many repetitions, in CPU seconds of a single-threaded process:
--shape minilm: MiniLM's query and value (384 x 384), LoRA r8, VeRA r256, RandLoRA r32;
--shape gpt2-small / gpt2-medium: one GPT-2 block's projections as bench_adapters.py adapts them (LoRA r4 on the q
and v slices of c_attn against PEFT's rank-8 LoRA of c_attn; VeRA r256, r1024 and RandLoRA r20 on c_attn,
attn.c_proj, mlp.c_fc and mlp.c_proj).

    python bench/bench_layer.py                                  # MiniLM, 4096 tokens = batch 32 x seq 128
    python bench/bench_layer.py --shape gpt2-small --dropout 0.1 --bf16   # 1024 tokens = batch 8 x seq 128
    python bench/bench_layer.py --dropout 0.1 --compile           # both sides under torch.compile
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import peft_layers  # noqa: E402

# shape -> (width, [(method, ours rank, ours alpha, PEFT rank, PEFT alpha, targets)])
GPT2_ALL = ["c_attn", "c_proj", "c_fc"]
SHAPES = {
    "minilm": (384, [("lora", 8, 16, 8, 16, ["query", "value"]), ("vera", 256, None, 256, None, ["query", "value"]),
                     ("randlora", 32, 640, 32, 640, ["query", "value"])]),
    "gpt2-small": (768, []), "gpt2-medium": (1024, []),
}
GPT2_SETTINGS = [("lora", 4, 32, 8, 64, ["c_attn"]), ("vera", 256, None, 256, None, GPT2_ALL),
                 ("vera", 1024, None, 1024, None, GPT2_ALL), ("randlora", 20, 640, 20, 640, GPT2_ALL)]


class MiniLMLayers(torch.nn.Module):
    def __init__(self, width):
        super().__init__()
        self.query, self.value = torch.nn.Linear(width, width), torch.nn.Linear(width, width)

    def forward(self, x):
        return self.query(x).sum() + self.value(x).sum()


class GPT2Block(torch.nn.Module):
    """The four projections of a GPT-2 block (Conv1D, weight stored in x out), each on its own input."""

    def __init__(self, width):
        super().__init__()
        from transformers.pytorch_utils import Conv1D
        self.attn, self.mlp = torch.nn.Module(), torch.nn.Module()
        self.attn.c_attn, self.attn.c_proj = Conv1D(3 * width, width), Conv1D(width, width)
        self.mlp.c_fc, self.mlp.c_proj = Conv1D(4 * width, width), Conv1D(width, 4 * width)

    def forward(self, x):
        x_wide = x.repeat(1, 4)
        return (self.attn.c_attn(x).sum() + self.attn.c_proj(x).sum() + self.mlp.c_fc(x).sum()
                + self.mlp.c_proj(x_wide).sum())


def build(impl, setting, args, width):
    method, rank, alpha, peft_rank, peft_alpha, targets = setting
    torch.manual_seed(0)
    model = MiniLMLayers(width) if args.shape == "minilm" else GPT2Block(width)
    if impl == "ours":
        peft_layers.apply_adapter(model, method, rank, alpha, targets, args.dropout)
    else:
        import peft
        model = peft.get_peft_model(model, peft_layers.peft_config(
            method, peft_rank, peft_alpha, targets, args.dropout, fan_in_fan_out=args.shape != "minilm"))
    with torch.no_grad():  # a trained adapter: non-zero everywhere
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.01)
    return torch.compile(model.train()) if args.compile else model.train()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=list(SHAPES), default="minilm")
    p.add_argument("--tokens", type=int, default=None, help="default: 4096 (MiniLM), 1024 (GPT-2)")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast")
    p.add_argument("--reps", type=int, default=25)
    p.add_argument("--compile", action="store_true", help="torch.compile both sides (3 warm-up repetitions)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    width, settings = SHAPES[args.shape]
    settings = settings or GPT2_SETTINGS
    tokens = args.tokens or (4096 if args.shape == "minilm" else 1024)
    x = torch.randn(tokens, width, requires_grad=True)
    names = [f"{s[0]}{s[1]}" for s in settings]
    cases = {(impl, n): build(impl, s, args, width) for s, n in zip(settings, names, strict=True)
             for impl in ("ours", "peft")}
    times = {k: [] for k in cases}
    warmup = 3 if args.compile else 1  # compiling the forward and the backward takes the first calls
    for rep in range(args.reps + warmup):
        for key, model in cases.items():
            # an activation, as every adapted layer's input is in a model: autocast caches its bf16 copy of a leaf
            # that requires grad, which would hand PEFT's three linear calls one shared cast no model gives them
            activation = x * 1.0
            t0 = time.process_time()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
                y = model(activation)
            y.float().backward()
            if rep >= warmup:
                times[key].append(time.process_time() - t0)
    print(f"shape={args.shape} tokens={tokens} dropout={args.dropout} bf16={args.bf16} compile={args.compile} "
          f"reps={args.reps} (median CPU ms per forward+backward of the adapted layers, 1 thread)")
    for n in names:
        ours, theirs = (statistics.median(times[(impl, n)]) for impl in ("ours", "peft"))
        print(f"{n:<12} ours {ours * 1e3:8.2f} ms   PEFT {theirs * 1e3:8.2f} ms   ours/PEFT speed {theirs / ours:.3f}")


if __name__ == "__main__":
    main()
