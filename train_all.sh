#!/usr/bin/env bash
# Sweep run_glue.py over models x adapters x seeds x tasks, then print the parse_results.py table.
#
#   bash train_all.sh demo      # MiniLM, LoRA/VeRA/RandLoRA on rte mrpc stsb, 2 seeds, capped: < 20 min on 2 cores
#   bash train_all.sh quality   # MiniLM on rte mrpc stsb cola, full data, 3 seeds, full FT + ours + HF PEFT: hours
#   bash train_all.sh paper     # RandLoRA's grid: roberta-base/large, 6 tasks, 5 seeds (needs GPUs)
#
# Runs land in $RESULTS_DIR/<adapter><rank>[_large]/<seed>/<task>/. A run whose eval_results.json exists is
# skipped and an interrupted one continues from its last checkpoint, so a killed sweep restarts where it stopped.
# Environment variables override the preset (space-separated lists):
#   MODELS TASKS SEEDS (1..N)  ADAPTERS (method:rank:lr[:head_lr]; method = full|lora|vera|randlora|peft-<method>)
#   EPOCHS BATCH MAX_SEQ_LENGTH RESULTS_DIR GLUE_DIR
#   MAX_TRAIN_SAMPLES MAX_EVAL_SAMPLES (a number, and/or task=number items: "800 rte=300")
#   NUM_PROCESSES (>1: accelerate launch --multi_gpu)  LAUNCHER (the whole launch command)  DEEPSPEED (config file)
#   KEEP_CHECKPOINTS=1 (keep checkpoint-* after a finished run)
# Arguments after the preset go to every run_glue.py call (e.g. --bf16, --report_to tensorboard).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
export TOKENIZERS_PARALLELISM=false
# On a busy CPU, OpenMP threads that spin while they wait cost several times the work; let them sleep.
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}

preset=${1:-}
shift || true
case "$preset" in
  demo)
    # 800 training rows (a fixed subset; 300 for RTE, whose rows are long and which stays near chance at this
    # size anyway), 2 epochs, 500 STS-B dev rows, no checkpoints (each run takes about a minute): the 18 runs fit
    # in 20 minutes on 2 CPU cores. Learning rates are high for the short schedule (picked in pilot runs on MRPC
    # and STS-B); the classifier head (pooler + classifier) gets its own 5e-3.
    : "${MODELS:=minilm}" "${TASKS:=rte mrpc stsb}" "${SEEDS:=1 2}"
    : "${ADAPTERS:=lora:8:3e-3:5e-3 vera:256:3e-2:5e-3 randlora:32:3e-4:5e-3}"
    : "${EPOCHS:=2}" "${BATCH:=8}" "${MAX_SEQ_LENGTH:=128}" "${MAX_TRAIN_SAMPLES:=800 rte=300}" "${MAX_EVAL_SAMPLES:=500}"
    : "${RESULTS_DIR:=finetuned_results/demo}" "${GLUE_DIR:=../shared/data/glue}"
    export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
    [ -d "$GLUE_DIR" ] || { echo "error: the demo reads GLUE from GLUE_DIR=$GLUE_DIR, which does not exist; set GLUE_DIR" >&2; exit 2; }
    EXTRA=(--train_sampling_strategy group_by_length --per_device_eval_batch_size 64 --warmup_steps 0.06
           --save_strategy no) ;;
  quality)
    # Full data, 3 epochs: full fine-tuning vs our LoRA vs HF PEFT's LoRA (+ VeRA, RandLoRA). Hours on a CPU.
    : "${MODELS:=minilm}" "${TASKS:=rte mrpc stsb cola}" "${SEEDS:=1 2 3}"
    : "${ADAPTERS:=full:0:1e-4 lora:8:2e-3:5e-3 peft-lora:8:2e-3:5e-3 vera:256:2e-2:5e-3 randlora:32:3e-4:5e-3}"
    : "${EPOCHS:=3}" "${BATCH:=16}" "${MAX_SEQ_LENGTH:=128}" "${MAX_TRAIN_SAMPLES:=}" "${MAX_EVAL_SAMPLES:=}"
    : "${RESULTS_DIR:=finetuned_results/quality}"
    # This machine's local GLUE copy when there is one (as in the demo); otherwise GLUE_DIR, else the Hub.
    if [ -z "${GLUE_DIR:-}" ] && [ -d ../shared/data/glue ]; then GLUE_DIR=../shared/data/glue; fi
    EXTRA=(--train_sampling_strategy group_by_length --per_device_eval_batch_size 64 --warmup_steps 0.06) ;;
  paper)
    # RandLoRA's GLUE grid (LoRA r4, VeRA r256 lr 1e-2, RandLoRA r64 base / r100 large lr 1e-4; 10 epochs, batch 64).
    # The VeRA head learning rate 4e-3 follows the VeRA paper.
    : "${MODELS:=FacebookAI/roberta-base FacebookAI/roberta-large}" "${TASKS:=sst2 mrpc cola qnli rte stsb}"
    : "${SEEDS:=1 2 3 4 5}" "${ADAPTERS:=}"
    : "${EPOCHS:=10}" "${BATCH:=64}" "${MAX_SEQ_LENGTH:=128}" "${MAX_TRAIN_SAMPLES:=}" "${MAX_EVAL_SAMPLES:=}"
    : "${RESULTS_DIR:=finetuned_results}"
    EXTRA=(--warmup_steps 0.06) ;;
  *) echo "usage: bash train_all.sh demo|quality|paper [run_glue.py args...]  (see the header of this file)" >&2; exit 2 ;;
esac

NUM_PROCESSES=${NUM_PROCESSES:-1}
if [ -n "${LAUNCHER:-}" ]; then read -r -a launch <<< "$LAUNCHER"
elif [ "$NUM_PROCESSES" -gt 1 ]; then launch=("$PY" -m accelerate.commands.launch --multi_gpu --num_processes "$NUM_PROCESSES")
else launch=("$PY"); fi
run_args=()
if [ -n "${DEEPSPEED:-}" ]; then run_args+=(--deepspeed "$DEEPSPEED"); fi
if [ -n "${GLUE_DIR:-}" ]; then export GLUE_DIR; fi

cap_for() {  # cap_for TASK "800 rte=300" -> 300 for rte, 800 for the others; empty: no cap
  local default="" item
  for item in $2; do
    case "$item" in "$1"=*) echo "${item#*=}"; return ;; *=*) ;; *) default=$item ;; esac
  done
  echo "$default"
}

model_tag() {  # roberta-large -> _large (RandLoRA's layout); base models and the MiniLM -> no suffix
  case "$1" in *large*) echo _large ;; *base*|minilm) echo "" ;; *) echo "_$(basename "$1")" ;; esac
}
adapters_for() {  # the paper preset's RandLoRA rank depends on the model size
  if [ -n "$ADAPTERS" ]; then echo "$ADAPTERS"
  elif [[ "$1" == *large* ]]; then echo "lora:4:4e-4 vera:256:1e-2:4e-3 randlora:100:1e-4"
  else echo "lora:4:4e-4 vera:256:1e-2:4e-3 randlora:64:1e-4"; fi
}

read -r -a seeds <<< "$SEEDS"
nseeds=$(printf '%s\n' "${seeds[@]}" | sort -n | tail -1)
total=0
for model in $MODELS; do for spec in $(adapters_for "$model"); do for _ in "${seeds[@]}"; do for _ in $TASKS; do
  total=$((total + 1)); done; done; done; done

roots=() failed=() n=0 start=$SECONDS
for model in $MODELS; do
  for spec in $(adapters_for "$model"); do
    IFS=: read -r method rank lr head_lr <<< "$spec"
    impl=ours name=""
    if [[ "$method" == peft-* ]]; then impl=peft name=peft- method=${method#peft-}; fi
    if [ "$method" = full ]; then name=full adapter_args=(--adapter_name none)
    else name="$name$method$rank" adapter_args=(--adapter_name "$method" --rank "$rank" --adapter_impl "$impl"); fi
    if [ -n "${head_lr:-}" ]; then adapter_args+=(--head_lr "$head_lr"); fi
    root="$RESULTS_DIR/$name$(model_tag "$model")"
    roots+=("$root")
    for seed in "${seeds[@]}"; do
      for task in $TASKS; do
        n=$((n + 1))
        out="$root/$seed/$task"
        if [ -f "$out/eval_results.json" ]; then echo "[$n/$total] $out: done, skipped"; continue; fi
        echo "[$n/$total] $out  ($model, $spec, seed $seed; $((SECONDS - start))s elapsed)"
        mkdir -p "$out"
        caps=()
        cap=$(cap_for "$task" "${MAX_TRAIN_SAMPLES:-}"); if [ -n "$cap" ]; then caps+=(--max_train_samples "$cap"); fi
        cap=$(cap_for "$task" "${MAX_EVAL_SAMPLES:-}"); if [ -n "$cap" ]; then caps+=(--max_eval_samples "$cap"); fi
        if "${launch[@]}" run_glue.py --model_name_or_path "$model" --task_name "$task" "${adapter_args[@]}" \
             --learning_rate "$lr" --num_train_epochs "$EPOCHS" --per_device_train_batch_size "$BATCH" \
             --max_seq_length "$MAX_SEQ_LENGTH" --seed "$seed" --output_dir "$out" --do_train --do_eval --resume \
             --logging_steps 25 "${caps[@]}" "${run_args[@]}" "${EXTRA[@]}" "$@" 2>&1 | tee "$out/log.txt"; then
          [ "${KEEP_CHECKPOINTS:-0}" = 1 ] || rm -rf "$out"/checkpoint-*  # only needed to resume this run
        else
          failed+=("$out")
          echo "[$n/$total] $out FAILED (see $out/log.txt)" >&2
        fi
      done
    done
  done
done

echo "sweep finished in $((SECONDS - start))s; results in $RESULTS_DIR (dev-set scores x100, mean ± std over seeds)"
"$PY" parse_results.py "${roots[@]}" "$nseeds"
# Written whole or not at all (a temp file renamed into place), like every other result file.
summary="$RESULTS_DIR/summary.md"
if "$PY" parse_results.py "${roots[@]}" "$nseeds" --format markdown > "$summary.tmp" 2>/dev/null; then
  mv "$summary.tmp" "$summary"
else
  rm -f "$summary.tmp"
fi
if [ ${#failed[@]} -gt 0 ]; then
  echo "error: ${#failed[@]} runs failed: ${failed[*]}" >&2
  exit 1
fi
