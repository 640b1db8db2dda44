"""One adapted layer, forward + backward: ours vs HF PEFT, side by side.

The whole-model benchmark (bench_adapters.py) spends most of its time in the frozen model, which both sides
share, so its ratios move by a few percent from run to run on a busy machine. This one times only what differs:
a single adapted Linear (default 384 x 384, MiniLM's query) on `tokens` rows, interleaved over many repetitions,
in CPU seconds of a single-threaded process.

    python bench/bench_layer.py                    # 4096 tokens = batch 32 x seq 128
    python bench/bench_layer.py --tokens 256 --width 1024
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import peft_layers  # noqa: E402

SETTINGS = [("lora", 8, 16), ("vera", 256, None), ("randlora", 32, 640)]


class OneLayer(torch.nn.Module):
    def __init__(self, width):
        super().__init__()
        self.q = torch.nn.Linear(width, width)

    def forward(self, x):
        return self.q(x)


def build(impl, method, rank, alpha, width):
    torch.manual_seed(0)
    model = OneLayer(width)
    if impl == "ours":
        peft_layers.apply_adapter(model, method, rank, alpha, ["q"])
    else:
        import peft
        model = peft.get_peft_model(model, peft_layers.peft_config(method, rank, alpha, ["q"]))
    with torch.no_grad():  # a trained adapter: non-zero everywhere
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.01)
    return model.train()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--width", type=int, default=384)
    p.add_argument("--reps", type=int, default=25)
    args = p.parse_args()
    torch.set_num_threads(1)
    x = torch.randn(args.tokens, args.width, requires_grad=True)
    cases = {f"{impl}-{m}": build(impl, m, r, a, args.width) for m, r, a in SETTINGS for impl in ("ours", "peft")}
    times = {k: [] for k in cases}
    for _ in range(args.reps):
        for name, model in cases.items():
            t0 = time.process_time()
            y = model(x)
            y.backward(torch.ones_like(y))
            times[name].append(time.process_time() - t0)
    print(f"tokens={args.tokens} width={args.width} reps={args.reps} (median CPU ms per forward+backward, 1 thread)")
    for method, _, _ in SETTINGS:
        ours, theirs = (statistics.median(times[f"{i}-{method}"]) for i in ("ours", "peft"))
        print(f"{method:<9} ours {ours * 1e3:7.2f} ms   PEFT {theirs * 1e3:7.2f} ms   "
              f"ours is {theirs / ours:.2f}x faster")


if __name__ == "__main__":
    main()
