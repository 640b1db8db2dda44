#!/usr/bin/env bash
# The measurements that only mean something on a GPU, in one command, within 10 minutes, into one report.
#
#   bash bench/gpu_check.sh                 # on a CUDA machine
#   bash bench/gpu_check.sh --smoke         # the same code paths on CPU in tiny form (a test in the suite)
#   bash bench/gpu_check.sh --out DIR       # report folder (default bench/results/gpu_check)
#   bash bench/gpu_check.sh --budget 540    # seconds for all steps (default 570); each step's limit is cut to fit
#   On a lent machine without this repo's data: bench/device_run.sh (after bench/device_bundle.sh here).
#
# 0. tests/test_cuda.py: the adapters on the GPU against the CPU (skipped where there is no GPU, so in --smoke).
# 1. Adapters against HF PEFT: bench/adapter_matrix.py's bf16 cells (dropout 0.1) at the sizes users train on a
#    GPU: MiniLM batch 64 x 128, GPT-2-small and GPT-2-medium shapes 8 x 512 (saved for backward, peak allocation,
#    speed). MINILM_CONFIG=DIR builds the MiniLM from DIR/config.json with random weights (no package needed).
# 2. GPT-2-medium E2E training: bench/bench_e2e.py --what train (LoRA r4 and full fine-tuning, bf16) on the first
#    TRAIN_STEPS batches; the epoch time is extrapolated to the 5,258 batches of an E2E epoch (batch 8).
# 3. bf16 throughput: dense matmul TFLOP/s in bf16 against fp32 (TF32 off), and their ratio.
# 4. Decoding throughput: bench/bench_e2e.py --what decode (batched beam search against a one-MR-at-a-time loop).
# 5. Multi-GPU speed-up: gpt2_ft.py on all GPUs (accelerate launch, data parallel) against one GPU, training tokens/s.
# Every step has its own time limit and a failure in one does not stop the others; the report says what ran.
# Writes DIR/gpu_check.json and DIR/gpu_check.md.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
smoke=0 out=bench/results/gpu_check budget=570
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) smoke=1; shift ;;
    --out) out=${2:?--out needs a folder}; shift 2 ;;
    --budget) budget=${2:?--budget needs seconds}; shift 2 ;;
    *) echo "usage: bash bench/gpu_check.sh [--smoke] [--out DIR] [--budget SECONDS]" >&2; exit 2 ;;
  esac
done
case "$budget" in
  ''|*[!0-9]*) echo "error: --budget must be a whole number of seconds, not '$budget'" >&2; exit 2 ;;
esac
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
mkdir -p "$out/steps"
rm -rf "$out"/steps/* "$out/adapters" "$out/gpu_check.json" "$out/gpu_check.md"  # nothing stale from an earlier check
ngpu=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2> /dev/null || echo 0)
if [ "$smoke" = 0 ] && [ "$ngpu" -eq 0 ]; then
  echo "error: no CUDA GPU visible; run with --smoke for the CPU version of these checks" >&2
  exit 2
fi
minilm=()
[ -n "${MINILM_CONFIG:-}" ] && minilm=(--model_path "$MINILM_CONFIG" --random_weights)
if [ "$smoke" = 1 ]; then
  ADAPTER_DEVICE=cpu ADAPTERS=(--only cpu_minilm_bf16_0.1,cpu_gpt2-small_bf16_0.1 --rounds 1
    "--bench_args=--batch_size 2 --seq_len 16 --steps 1 --memory_steps 1 --configs ours-lora,peft-lora")
  MATMUL=256 TRAIN_SHAPE=small TRAIN_STEPS=1 DECODE=(--num_mrs 2 --plain_mrs 1 --beam 2 --gen_tokens 4 --batch_size 2)
  DP_ROWS=16 DP_PROCS=2 DP_LAUNCH="env ACCELERATE_USE_CPU=1 $PY -m accelerate.commands.launch --multi_gpu"
else
  # a GPU step takes milliseconds: 20 timed steps per round, after 3 that warm the libraries' kernel choices
  ADAPTER_DEVICE=cuda ADAPTERS=(--only cuda_minilm_bf16_0.1,cuda_gpt2-medium_bf16_0.1,cuda_gpt2-small_bf16_0.1
    "--bench_args=--steps 20 --warmup 3")
  MATMUL=8192 TRAIN_SHAPE=medium TRAIN_STEPS=${TRAIN_STEPS:-300} DECODE=(--num_mrs 128 --plain_mrs 8)
  DP_ROWS=${DP_ROWS:-4000} DP_PROCS=$ngpu DP_LAUNCH="$PY -m accelerate.commands.launch --multi_gpu"
fi
start=$SECONDS

step() {  # step NAME LIMIT-SECONDS COMMAND...: run one measurement, its output in steps/NAME.log
  local name=$1 limit=$2 rc=0 t0=$SECONDS
  shift 2
  local left=$((budget - (SECONDS - start) - 15))  # 15 s kept for the report
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 10 ]; then
    echo "[gpu_check] $name skipped: the --budget of $budget s is spent" >&2
    printf '{"step": "%s", "exit": -1, "seconds": 0, "skipped": true}\n' "$name" > "$out/steps/$name.status.json"
    return
  fi
  echo "[gpu_check] $name (at most $limit s) ..." >&2
  timeout "$limit" "$@" > "$out/steps/$name.log" 2>&1 || rc=$?
  printf '{"step": "%s", "exit": %d, "seconds": %d}\n' "$name" "$rc" $((SECONDS - t0)) > "$out/steps/$name.status.json"
  [ "$rc" -eq 0 ] || echo "[gpu_check] $name failed (exit $rc; see $out/steps/$name.log)" >&2
}

# 0. the adapters on the GPU against the CPU: initialisation, gradients, bytes kept, merging, bf16, compile
step cuda_tests 180 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py

# 1. adapters against PEFT, bf16 at GPU batch sizes; the table (saved / peak / speed rows) for the report
step adapters 300 "$PY" bench/adapter_matrix.py --device "$ADAPTER_DEVICE" --parallel 1 --results "$out/adapters" \
  "${minilm[@]}" "${ADAPTERS[@]}"
"$PY" bench/adapter_matrix.py --table_only --device "$ADAPTER_DEVICE" --results "$out/adapters" \
  > "$out/steps/adapters_table.md" 2> /dev/null

# 2. GPT-2-medium E2E training: LoRA r4 against full fine-tuning. The smoke run gives bench_e2e's "small" shape
# 2 layers of width 64 (its train code path unchanged), so that it takes seconds, not a minute.
if [ "$smoke" = 1 ]; then
  BENCH_E2E=("$PY" -c 'import sys; sys.path.insert(0, "bench"); import bench_e2e
bench_e2e.GPT2_SHAPES["small"] = dict(n_embd=64, n_layer=2, n_head=4); bench_e2e.run_main(bench_e2e.main)')
else
  BENCH_E2E=("$PY" bench/bench_e2e.py)
fi
step e2e_train 300 "${BENCH_E2E[@]}" --what train --shape "$TRAIN_SHAPE" --train_steps "$TRAIN_STEPS" \
  --output_dir "$out/steps"

# 3. bf16 against fp32 matmul throughput
step matmul 120 "$PY" - "$MATMUL" "$out/steps/matmul.json" <<'EOF'
import json
import sys
import time

import torch

n, path = int(sys.argv[1]), sys.argv[2]
device = "cuda" if torch.cuda.is_available() else "cpu"
torch.backends.cuda.matmul.allow_tf32 = False
result = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "n": n}
for dtype in (torch.float32, torch.bfloat16):
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    reps = 20 if device == "cuda" else 3
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    result[f"{str(dtype).split('.')[-1]}_tflops"] = round(2 * n**3 * reps / (time.perf_counter() - t0) / 1e12, 3)
result["bf16_over_fp32"] = round(result["bfloat16_tflops"] / result["float32_tflops"], 2)
json.dump(result, open(path, "w"))
EOF

# 4. decoding throughput
step e2e_decode 150 "${BENCH_E2E[@]}" --what decode "${DECODE[@]}" --output_dir "$out/steps"

# 5. data-parallel speed-up of gpt2_ft.py: all GPUs against one (nothing to do, not even the model, on one GPU)
if [ "$DP_PROCS" -gt 1 ]; then
dp_dir=$(mktemp -d)
trap 'rm -rf "$dp_dir"' EXIT
step dp_model 60 "$PY" - "$TRAIN_SHAPE" "$dp_dir/model" "${PEFT_DATA_DIR:-../shared/data}/gpt2_vocab" <<'EOF'
import sys

import torch
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

shapes = {"small": dict(n_embd=64, n_layer=2, n_head=4), "medium": dict(n_embd=1024, n_layer=24, n_head=16)}
torch.manual_seed(0)
GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_positions=1024, **shapes[sys.argv[1]])).save_pretrained(sys.argv[2])
AutoTokenizer.from_pretrained(sys.argv[3]).save_pretrained(sys.argv[2])
EOF
dp_run() {  # dp_run PROCESSES: one epoch over DP_ROWS rows, tokens/s in train_results.json
  local procs=$1 launch
  if [ "$procs" -eq 1 ]; then launch=("$PY"); else read -r -a launch <<< "$DP_LAUNCH --num_processes $procs"; fi
  "${launch[@]}" gpt2_ft.py --train_data "${PEFT_DATA_DIR:-../shared/data}/e2e/original/trainset.csv" \
    --model_name_or_path "$dp_dir/model" --max_train_examples "$DP_ROWS" --max_epoch 1 --eval_interval 1000000000 \
    --save_interval 1000000000 --log_interval 1000 --warmup_step 0 --work_dir "$dp_dir/p$procs" \
    $( [ "$smoke" = 0 ] && echo --bf16 ) && cp "$dp_dir/p$procs/train_results.json" "$out/steps/dp_$procs.json"
}
export -f dp_run
export PY DP_LAUNCH DP_ROWS dp_dir smoke out
# timeout runs programs, not shell functions: through bash -c
step dp_1 200 bash -c 'dp_run 1'
step "dp_$DP_PROCS" 200 bash -c "dp_run $DP_PROCS"
fi

# The report: every step's numbers, or why they are missing.
"$PY" - "$out" "$smoke" "$DP_PROCS" $((SECONDS - start)) <<'EOF'
import json
import sys
from pathlib import Path

out, smoke, procs, seconds = Path(sys.argv[1]), sys.argv[2] == "1", int(sys.argv[3]), int(sys.argv[4])
steps = {p.name.removesuffix(".status.json"): json.loads(p.read_text()) for p in sorted(out.glob("steps/*.status.json"))}


def load(name):
    path = out / "steps" / name
    return json.loads(path.read_text()) if path.is_file() else None


adapters = {p.stem.removeprefix("adapters_"): json.loads(p.read_text())["ours_over_peft"]
            for p in sorted(out.glob("adapters/adapters_*.json"))}  # per cell: ours / PEFT per method
report = {"smoke": smoke, "wall_seconds": seconds, "steps": steps, "adapters": adapters,
          "matmul": load("matmul.json"), "e2e_train": load("e2e_train.json"), "e2e_decode": load("e2e_decode.json")}
train = report["e2e_train"]
if train:  # an E2E epoch is 42,061 rows / batch 8 = 5,258 batches
    for run in ("lora_r4", "full"):
        r = train[run]
        train[run]["epoch_seconds_estimate"] = round(r["train_seconds"] / r["step"] * 5258, 1)
one, many = load("dp_1.json"), load(f"dp_{procs}.json")
report["data_parallel"] = None if procs < 2 else {
    "processes": procs, "tokens_per_second_1": one and one["tokens_per_second"],
    f"tokens_per_second_{procs}": many and many["tokens_per_second"],
    "speedup": round(many["tokens_per_second"] / one["tokens_per_second"], 2) if one and many else None}
(out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")

state = {True: "skipped (budget spent)", False: "FAILED"}
lines = [f"# GPU check{' (smoke run on CPU: tiny sizes, the numbers mean nothing)' if smoke else ''}", "",
         f"{seconds} s wall. Steps: " + ", ".join(
             f"{k} {'ok' if v['exit'] == 0 else state[v.get('skipped', False)]} ({v['seconds']} s)"
             for k, v in steps.items()), ""]
tests = out / "steps" / "cuda_tests.log"
tests_log = tests.read_text().strip() if tests.is_file() else ""
if tests_log:  # pytest's summary line
    lines += [f"tests/test_cuda.py: {tests_log.splitlines()[-1]}", ""]
table = out / "steps" / "adapters_table.md"
if adapters and table.is_file():  # adapter_matrix's table: saved for backward, peak allocation, speed
    lines += ["Adapters, ours / PEFT (below 1 = ours keeps less; speed above 1 = ours is faster):", "",
              *table.read_text().splitlines()[1:], ""]
m = report["matmul"]
if m:
    lines.append(f"- matmul {m['n']}x{m['n']} on {m['device']}: fp32 {m['float32_tflops']} TFLOP/s, bf16 "
                 f"{m['bfloat16_tflops']} TFLOP/s ({m['bf16_over_fp32']}x)")
if train:
    for run in ("lora_r4", "full"):
        r = train[run]
        lines.append(f"- E2E training, {train['model']}, {run}: {r['tokens_per_second']:.0f} tokens/s, peak "
                     f"{r['peak_memory_gib']} GiB ({r['peak_memory_kind']}), epoch ~{r['epoch_seconds_estimate']} s")
d = report["e2e_decode"]
if d:
    lines.append("- decoding: " + ", ".join(f"{k} {v}" for k, v in d.items() if not isinstance(v, (dict, list))))
dp = report["data_parallel"]
if dp:
    lines.append(f"- data parallel gpt2_ft.py, {procs} processes against 1: speed-up {dp['speedup']}")
elif procs < 2:
    lines.append("- data parallel: one GPU only, not measured")
(out / "gpu_check.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
print(f"report: {out / 'gpu_check.json'} and {out / 'gpu_check.md'}", file=sys.stderr)
failed = [k for k, v in steps.items() if v["exit"] != 0]
sys.exit(1 if failed else 0)
EOF
