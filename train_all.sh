#!/usr/bin/env bash
# Sweep run_glue.py over models x adapters x seeds x tasks, then print the parse_results.py table and chart.
#
#   bash train_all.sh            # RandLoRA's train_all.sh grid, as that script runs it (= the `randlora` preset)
#   bash train_all.sh demo       # MiniLM; LoRA, VeRA, RandLoRA (+ full FT) on SST-2 and STS-B subsets; 2 seeds; ~5 min
#   bash train_all.sh quality    # MiniLM on rte mrpc stsb cola, full data, 3 seeds, full FT + ours + HF PEFT: hours
#   bash train_all.sh randlora   # RandLoRA paper Table 4: roberta-base/large, 6 tasks, 5 seeds (paper = alias)
#   bash train_all.sh vera       # VeRA paper Table 2 (hyper-parameters of its Table 8)
#   bash train_all.sh lora       # LoRA paper Table 2, RoBERTa-base (hyper-parameters of its Table 9)
#
# Options (anywhere on the line; the rest goes to every run_glue.py call, e.g. --bf16 or --report_to tensorboard):
#   --jobs N | JOBS=N     N runs at once: one per GPU (CUDA_VISIBLE_DEVICES), or on CPU cores/N threads each;
#                         auto = one per GPU, on CPU one single-threaded run per core (up to 4 cores). Default 1.
#   --dry-run | DRY_RUN=1 list the runs (one run_glue.py command line each) and stop.
# Runs land in $RESULTS_DIR/<adapter><rank>[_large]/<seed>/<task>/ with their log.txt; the console shows one line
# per finished run and a progress bar. A run whose eval_results.json holds valid metrics is skipped; an interrupted
# one continues from its last checkpoint (--resume), so a killed sweep restarts where it stopped. A failed run does
# not stop the others; they are listed at the end (exit 1). See docs/sweeps.md.
#
# Environment variables override the preset (space-separated lists; "X task=Y" values differ per task):
#   MODELS TASKS SEEDS (1..N)
#   ADAPTERS  method:rank:lr[:head_lr[:alpha]] items; method = full|lora|vera|randlora|peft-<method>; lr and head_lr
#             may be per task, comma-separated: "vera:1024:sst2=4e-3,1e-2:4e-3"
#   ALPHA (2r | r | a number, when a spec gives none)  TARGET_MODULES  ADAPTER_DROPOUT  WARMUP (ratio; empty:
#   run_glue.py's RandLoRA schedule)  RANDLORA_SCALING (fork | peft)  WEIGHT_DECAY  ADAM_EPSILON
#   EPOCHS BATCH MAX_SEQ_LENGTH (per task allowed)  PAD_TO_MAX_LENGTH (1 | 0)
#   MAX_TRAIN_SAMPLES MAX_EVAL_SAMPLES (a number, and/or task=number items: "800 rte=300")
#   RESULTS_DIR GLUE_DIR  NUM_PROCESSES (>1: accelerate launch --multi_gpu)  LAUNCHER  DEEPSPEED  KEEP_CHECKPOINTS=1
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
export TOKENIZERS_PARALLELISM=false
# On a busy CPU, OpenMP threads that spin while they wait cost several times the work; let them sleep.
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
source ./sweep_lib.sh

# ------------------------------------------------------------------------------------------------ command line
sweep_options "$@"  # --jobs N, --dry-run: set JOBS / DRY_RUN; the rest stays in SWEEP_REST
set -- "${SWEEP_REST[@]+"${SWEEP_REST[@]}"}"
preset=randlora
case "${1:-}" in ''|-*) ;; *) preset=$1; shift ;; esac
gpus=$(sweep_gpus | wc -l)

# ------------------------------------------------------------------------------------------------ presets
# Every adapter setting is passed to run_glue.py explicitly (never left to its defaults), so a preset means the same
# experiment whatever run_glue.py's defaults are.
case "$preset" in
  demo)
    # Two tasks the MiniLM learns within seconds: SST-2 (majority class 50.9%) and STS-B (correlation; chance 0).
    # A fixed subset of the training rows, 1 epoch, a fixed subset of the dev rows, batch 8, no checkpoints:
    # 16 runs in about 5 minutes on 2 CPU cores with JOBS=auto (measured: docs/sweeps.md). Learning rates are high
    # for the short schedule (picked in pilot runs); the head (pooler + classifier) gets its own.
    : "${MODELS:=minilm}" "${TASKS:=sst2 stsb}" "${SEEDS:=1 2}"
    : "${ADAPTERS:=lora:8:2e-3:3e-3:16 vera:256:5e-2:1e-2 randlora:32:5e-4:5e-3:640}"
    : "${ALPHA:=2r}" "${TARGET_MODULES:=query value}" "${ADAPTER_DROPOUT:=0}" "${WARMUP:=0.06}"
    : "${PAD_TO_MAX_LENGTH:=0}" "${RANDLORA_SCALING:=peft}"  # dynamic padding; scale alpha / r (20 for r32)
    : "${WEIGHT_DECAY:=0}" "${ADAM_EPSILON:=1e-8}"  # 1e-6 damps VeRA's small-gradient vectors (STS-B 0.36 vs 0.59)
    : "${EPOCHS:=1}" "${BATCH:=4}" "${MAX_SEQ_LENGTH:=64}" "${MAX_TRAIN_SAMPLES:=800}" "${MAX_EVAL_SAMPLES:=300}"
    : "${RESULTS_DIR:=finetuned_results/demo}" "${GLUE_DIR:=../shared/data/glue}" "${JOBS:=auto}"
    export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
    [ -d "$GLUE_DIR" ] || { echo "error: the demo reads GLUE from GLUE_DIR=$GLUE_DIR, which does not exist; set GLUE_DIR" >&2; exit 2; }
    EXTRA=(--train_sampling_strategy group_by_length --per_device_eval_batch_size 16 --save_strategy no
           --logging_steps 25)
    PARSE=(--baseline) ;;
  quality)
    # Full data, 3 epochs: full fine-tuning vs our LoRA vs HF PEFT's LoRA (+ VeRA, RandLoRA). Hours on a CPU.
    : "${MODELS:=minilm}" "${TASKS:=rte mrpc stsb cola}" "${SEEDS:=1 2 3}"
    : "${ADAPTERS:=full:0:1e-4 lora:8:2e-3:5e-3:8 peft-lora:8:2e-3:5e-3:8 vera:256:2e-2:5e-3 randlora:32:3e-4:5e-3:640}"
    : "${ALPHA:=r}" "${TARGET_MODULES:=query value}" "${ADAPTER_DROPOUT:=0}" "${WARMUP:=0.06}"
    : "${PAD_TO_MAX_LENGTH:=0}" "${RANDLORA_SCALING:=peft}"
    : "${WEIGHT_DECAY:=0}" "${ADAM_EPSILON:=1e-8}"
    : "${EPOCHS:=3}" "${BATCH:=16}" "${MAX_SEQ_LENGTH:=128}" "${MAX_TRAIN_SAMPLES:=}" "${MAX_EVAL_SAMPLES:=}"
    : "${RESULTS_DIR:=finetuned_results/quality}"
    # This machine's local GLUE copy when there is one (as in the demo); otherwise GLUE_DIR, else the Hub.
    if [ -z "${GLUE_DIR:-}" ] && [ -d ../shared/data/glue ]; then GLUE_DIR=../shared/data/glue; fi
    EXTRA=(--train_sampling_strategy group_by_length --per_device_eval_batch_size 64 --logging_steps 50)
    PARSE=(--baseline) ;;
  randlora|paper)
    # RandLoRA's GLUE/train_all.sh, run for run: roberta-base then roberta-large, seeds 1-5, tasks in its order,
    # RandLoRA r64 (base) / r100 (large) lr 1e-4, LoRA r4 lr 1e-4, VeRA r256 lr 1e-2; seq 128, batch 64, 10 epochs,
    # --fp16 (on a GPU). Its run_glue.py's fixed settings made explicit: alpha 2r, targets query key value dense,
    # dropout 0, the head trained at the adapter's lr, AdamW eps 1e-6 without weight decay, inputs padded to 128,
    # RandLoRA's scale of its PEFT fork (alpha / r / sqrt(bases)); no warm-up flag, so run_glue.py builds RandLoRA's
    # own schedule (linear, 6% warm-up over its step count); resume from a checkpoint in the output folder.
    # Reported as in its parse_results.py: mean over 5 seeds of the last epoch, numpy std (ddof 0). Paper:
    # RandLoRA Table 4.
    preset=randlora
    : "${MODELS:=FacebookAI/roberta-base FacebookAI/roberta-large}" "${TASKS:=sst2 mrpc cola qnli rte stsb}"
    : "${SEEDS:=1 2 3 4 5}" "${ADAPTERS:=}"
    : "${ALPHA:=2r}" "${TARGET_MODULES:=query key value dense}" "${ADAPTER_DROPOUT:=0}" "${WARMUP=}"
    : "${WEIGHT_DECAY:=0}" "${ADAM_EPSILON:=1e-6}" "${PAD_TO_MAX_LENGTH:=1}" "${RANDLORA_SCALING:=fork}"
    : "${EPOCHS:=10}" "${BATCH:=64}" "${MAX_SEQ_LENGTH:=128}" "${MAX_TRAIN_SAMPLES:=}" "${MAX_EVAL_SAMPLES:=}"
    : "${RESULTS_DIR:=finetuned_results}"
    EXTRA=()
    PARSE=(--paper randlora) ;;
  vera)
    # VeRA paper Table 2 (hyper-parameters: its Table 8): VeRA on query and value, r 1024 (base) / 256 (large),
    # per-task epochs and learning rates for the VeRA vectors and the head, batch 64 / 32, seq 512 / 128, 6% linear
    # warm-up; reported as the median of 5 seeds, each at its best epoch.
    : "${MODELS:=FacebookAI/roberta-base FacebookAI/roberta-large}" "${TASKS:=sst2 mrpc cola qnli rte stsb}"
    : "${SEEDS:=1 2 3 4 5}" "${ADAPTERS:=}"
    : "${ALPHA:=r}" "${TARGET_MODULES:=query value}" "${ADAPTER_DROPOUT:=0}" "${WARMUP:=0.06}"
    : "${WEIGHT_DECAY:=0}" "${ADAM_EPSILON:=1e-8}" "${MAX_TRAIN_SAMPLES:=}" "${MAX_EVAL_SAMPLES:=}"
    : "${PAD_TO_MAX_LENGTH:=1}" "${RESULTS_DIR:=finetuned_results/vera_paper}"
    EXTRA=(--lr_scheduler_type linear --eval_strategy epoch)  # every epoch evaluated: the paper takes the best
    PARSE=(--paper vera) ;;
  lora)
    # LoRA paper Table 2, RoBERTa-base (hyper-parameters: its Table 9 and microsoft/LoRA's roberta_base_*.sh):
    # LoRA r 8, alpha 16 on query and value, batch 16, seq 512, per-task epochs and learning rates, 6% linear
    # warm-up, weight decay 0.1; MRPC, RTE and STS-B start from the same seed's MNLI adapter. Median of 5 seeds,
    # each at its best epoch.
    : "${MODELS:=FacebookAI/roberta-base}" "${TASKS:=mnli sst2 mrpc cola qnli qqp rte stsb}" "${SEEDS:=1 2 3 4 5}"
    : "${ADAPTERS:=lora:8:mnli=5e-4,sst2=5e-4,qqp=5e-4,rte=5e-4,4e-4::16}"
    : "${ALPHA:=r}" "${TARGET_MODULES:=query value}" "${ADAPTER_DROPOUT:=0}" "${WARMUP:=0.06}"
    : "${WEIGHT_DECAY:=0.1}" "${ADAM_EPSILON:=1e-8}"
    : "${EPOCHS:=30 sst2=60 cola=80 qnli=25 qqp=25 rte=80 stsb=40}" "${BATCH:=16}" "${MAX_SEQ_LENGTH:=512}"
    : "${MAX_TRAIN_SAMPLES:=}" "${MAX_EVAL_SAMPLES:=}" "${RESULTS_DIR:=finetuned_results/lora_paper}"
    : "${FROM_MNLI:=mrpc rte stsb}" "${PAD_TO_MAX_LENGTH:=1}"
    EXTRA=(--lr_scheduler_type linear --eval_strategy epoch)  # every epoch evaluated: the paper takes the best
    PARSE=(--paper lora) ;;
  *) echo "usage: bash train_all.sh [demo|quality|randlora|vera|lora] [--jobs N] [--dry-run] [run_glue.py args...]" \
          "(see the header of this file)" >&2; exit 2 ;;
esac

per_task() {  # per_task TASK "800 rte=300" -> 300 for rte, 800 for the others; empty: none
  local default="" item
  for item in ${2//,/ }; do
    case "$item" in "$1"=*) echo "${item#*=}"; return ;; *=*) ;; *) default=$item ;; esac
  done
  echo "$default"
}

model_tag() {  # roberta-large -> _large (RandLoRA's layout); base models and the MiniLM -> no suffix
  case "$1" in *large*) echo _large ;; *base*|minilm) echo "" ;; *) echo "_$(basename "$1")" ;; esac
}

adapters_for() {  # the paper presets' ranks and rates depend on the model size
  if [ -n "$ADAPTERS" ]; then echo "$ADAPTERS"; return; fi
  case "$preset:$1" in
    randlora:*large*) echo "randlora:100:1e-4 lora:4:1e-4 vera:256:1e-2" ;;
    randlora:*) echo "randlora:64:1e-4 lora:4:1e-4 vera:256:1e-2" ;;
    vera:*large*) echo "vera:256:sst2=1e-2,mrpc=3e-2,cola=1e-2,qnli=1e-2,rte=2e-2,stsb=2e-2:sst2=6e-3,mrpc=3e-3,cola=6e-3,qnli=2e-4,rte=2e-3,stsb=2e-3" ;;
    vera:*) echo "vera:1024:sst2=4e-3,mrpc=1e-2,cola=1e-2,qnli=1e-2,rte=4e-3,stsb=1e-2:sst2=4e-3,mrpc=4e-3,cola=1e-2,qnli=4e-3,rte=1e-2,stsb=1e-2" ;;
  esac
}

schedule_for() {  # the VeRA preset's epochs, batch and sequence length depend on the model size
  if [ "$preset" != vera ]; then return; fi
  if [[ "$1" == *large* ]]; then
    EPOCHS=${VERA_EPOCHS:-"10 mrpc=40 cola=40 qnli=20 rte=40 stsb=20"} BATCH=${VERA_BATCH:-32} MAX_SEQ_LENGTH=${VERA_SEQ:-128}
  else
    EPOCHS=${VERA_EPOCHS:-"60 mrpc=30 cola=80 qnli=25 rte=160 stsb=80"} BATCH=${VERA_BATCH:-64} MAX_SEQ_LENGTH=${VERA_SEQ:-512}
  fi
}

alpha_for() {  # alpha_for RANK SPEC-ALPHA -> the alpha passed to run_glue.py
  if [ -n "$2" ]; then echo "$2"; return; fi
  case "$ALPHA" in 2r) echo $((2 * $1)) ;; r) echo "$1" ;; *) echo "$ALPHA" ;; esac
}

check_model() {  # stop at once, in one line, when a model cannot be loaded here
  local model=$1
  [ "$model" = minilm ] || [ -d "$model" ] && return 0
  if ! HF_HUB_ETAG_TIMEOUT=10 HF_HUB_DOWNLOAD_TIMEOUT=10 timeout 120 "$PY" -c \
       "import sys; from transformers import AutoConfig; AutoConfig.from_pretrained(sys.argv[1])" "$model" > /dev/null 2>&1
  then
    echo "error: $model cannot be loaded on this machine (no local copy and no Hub access), and this sweep needs it." \
         "Pass a local folder in MODELS=..., or try the small version that runs here: bash train_all.sh demo" >&2
    exit 2
  fi
}

# ------------------------------------------------------------------------------------------------ the runs
NUM_PROCESSES=${NUM_PROCESSES:-1}
if [ -n "${LAUNCHER:-}" ]; then read -r -a launch <<< "$LAUNCHER"
elif [ "$NUM_PROCESSES" -gt 1 ]; then launch=("$PY" -m accelerate.commands.launch --multi_gpu --num_processes "$NUM_PROCESSES")
else launch=("$PY"); fi
if [ -n "${GLUE_DIR:-}" ]; then export GLUE_DIR; fi
common=(--do_train --do_eval --resume)
if [ -n "${DEEPSPEED:-}" ]; then common+=(--deepspeed "$DEEPSPEED"); fi
if [ "${PAD_TO_MAX_LENGTH:-0}" = 1 ]; then common+=(--pad_to_max_length true); else common+=(--pad_to_max_length false); fi
if [ "$preset" != demo ] && [ "$preset" != quality ] && [ "$gpus" -gt 0 ]; then common+=(--fp16); fi

read -r -a seeds <<< "$SEEDS"
nseeds=$(printf '%s\n' "${seeds[@]}" | sort -n | tail -1)
declare -A root_seen=()
roots=() nmodels=$(wc -w <<< "$MODELS")
add_run() {  # add_run MODEL SPEC SEED TASK
  local model=$1 spec=$2 seed=$3 task=$4 method rank lr head_lr alpha impl=ours name="" root out cap label need=""
  local -a run targets
  shift 4  # the rest: extra run_glue.py arguments from the command line
  IFS=: read -r method rank lr head_lr alpha <<< "$spec"
  if [[ "$method" == peft-* ]]; then impl=peft name=peft- method=${method#peft-}; fi
  lr=$(per_task "$task" "$lr") head_lr=$(per_task "$task" "${head_lr:-}")
  [ -n "$head_lr" ] || head_lr=$lr  # one learning rate for adapter and head unless the spec gives two
  schedule_for "$model"
  if [ "$method" = full ]; then
    name=full
    run=(--adapter_name none)
  else
    name="$name$method$rank"
    run=(--adapter_name "$method" --adapter_impl "$impl" --rank "$rank" --adapter_alpha "$(alpha_for "$rank" "${alpha:-}")")
    read -r -a targets <<< "$TARGET_MODULES"
    run+=(--target_modules "${targets[@]}" --adapter_dropout "$ADAPTER_DROPOUT")
    if [ "$method" = randlora ]; then run+=(--randlora_scaling "${RANDLORA_SCALING:-fork}"); fi
  fi
  root="$RESULTS_DIR/$name$(model_tag "$model")"
  out="$root/$seed/$task"
  if [ -z "${root_seen[$root]:-}" ]; then root_seen[$root]=1; roots+=("$root"); fi
  run=(--model_name_or_path "$model" --task_name "$task" "${run[@]}" --learning_rate "$lr" --head_lr "$head_lr"
       --num_train_epochs "$(per_task "$task" "$EPOCHS")" --per_device_train_batch_size "$(per_task "$task" "$BATCH")"
       --max_seq_length "$(per_task "$task" "$MAX_SEQ_LENGTH")"
       --weight_decay "$WEIGHT_DECAY" --adam_epsilon "$ADAM_EPSILON" --seed "$seed" --output_dir "$out"
       "${common[@]}")
  if [ -n "${WARMUP:-}" ]; then run+=(--warmup_steps "$WARMUP"); fi  # empty: the script's own schedule
  cap=$(per_task "$task" "${MAX_TRAIN_SAMPLES:-}"); if [ -n "$cap" ]; then run+=(--max_train_samples "$cap"); fi
  cap=$(per_task "$task" "${MAX_EVAL_SAMPLES:-}"); if [ -n "$cap" ]; then run+=(--max_eval_samples "$cap"); fi
  if [[ " ${FROM_MNLI:-} " == *" $task "* ]] && [ "$method" != full ]; then
    need="$root/$seed/mnli"  # the LoRA paper starts these tasks from the MNLI adapter (a new head)
    run+=(--lora_path "$need" --new_head)
  fi
  label="$task $name seed $seed"
  [ "$nmodels" -eq 1 ] || label="$(basename "$model") $label"
  sweep_add "$out" "$label" "$need" "$(sweep_quote "${launch[@]}" run_glue.py "${run[@]}" "${EXTRA[@]}" "$@")"
}

for model in $MODELS; do
  # RandLoRA's loop order: model, seed, task, adapter.
  for seed in "${seeds[@]}"; do for task in $TASKS; do for spec in $(adapters_for "$model"); do
    add_run "$model" "$spec" "$seed" "$task" "$@"
  done; done; done
done

if [ "${DRY_RUN:-0}" = 1 ]; then
  printf '%s\n' "${SWEEP_CMD[@]}"
  echo "${#SWEEP_CMD[@]} runs (preset $preset; dry run: nothing started)" >&2
  exit 0
fi
for model in $MODELS; do check_model "$model"; done

keep_or_clean() {  # after a finished run: its checkpoints were only needed to resume it
  [ "${KEEP_CHECKPOINTS:-0}" = 1 ] || rm -rf "$1"/checkpoint-*
}
set_aside_unusable() {  # a result that is not usable (NaN, unreadable): kept for a look, out of the run's way
  if [ -f "$1/eval_results.json" ]; then
    mv "$1/eval_results.json" "$1/eval_results.unusable.json"
    echo "=== $1/eval_results.json was not usable; moved to eval_results.unusable.json and the run started again"
  fi
}
SWEEP_BEFORE_RUN=set_aside_unusable SWEEP_AFTER_RUN=keep_or_clean
sweep_execute

# ------------------------------------------------------------------------------------------------ the table
# The failure summary prints whatever happens to the table (set -e must not skip it).
table_status=0
echo "results in $RESULTS_DIR (dev-set scores x100)"
"$PY" parse_results.py "${roots[@]}" "$nseeds" "${PARSE[@]}" --plot "$RESULTS_DIR/summary.png" || table_status=$?
# Written whole or not at all (a temp file renamed into place), like every other result file.
summary="$RESULTS_DIR/summary.md"
if "$PY" parse_results.py "${roots[@]}" "$nseeds" "${PARSE[@]}" --format markdown > "$summary.tmp" 2> /dev/null; then
  mv "$summary.tmp" "$summary"
else
  rm -f "$summary.tmp"
fi
if [ ${#SWEEP_FAILED[@]} -gt 0 ]; then
  echo "error: ${#SWEEP_FAILED[@]} runs failed: ${SWEEP_FAILED[*]}" >&2
  exit 1
fi
if [ "$table_status" -ne 0 ]; then
  echo "error: the runs finished but parse_results.py could not make the table (exit $table_status, above)" >&2
  exit "$table_status"
fi
