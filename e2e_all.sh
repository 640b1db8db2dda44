#!/usr/bin/env bash
# E2E NLG sweep: per method and seed, gpt2_ft.py -> gpt2_beam.py -> gpt2_decode.py -> scoring (e2e_eval.py), then
# one table of BLEU, NIST, METEOR, ROUGE_L and CIDEr, mean ± std over seeds (parse_results.py), and a chart.
#
#   bash e2e_all.sh smoke     # CPU: a small GPT-2 built from config, the real E2E files, 2 seeds: the whole chain
#   bash e2e_all.sh scale     # CPU, about 35 min: a 16M-parameter GPT-2 trained from scratch on 6,000 rows for
#                             # 3 epochs, all 630 test MRs decoded with microsoft/LoRA's beam settings
#   bash e2e_all.sh lora      # LoRA paper Table 3, GPT-2 medium: LoRA r4 alpha 32 on q,v; lr 2e-4, 5 epochs, batch 8
#   bash e2e_all.sh vera      # VeRA paper Table 3, GPT-2 medium: VeRA r1024 on c_attn, lr 1e-1
#   bash e2e_all.sh randlora  # RandLoRA's NLG set-up, GPT-2 medium: RandLoRA r20 alpha 40 (its alpha/r/sqrt(n)
#                             # scale), lr 2e-4, on c_attn and the MLP
#
# Same conventions as train_all.sh (sweep_lib.sh): --jobs N | JOBS=N (one run per GPU, or cores/N threads each on
# CPU; auto), --dry-run | DRY_RUN=1, one console line per finished run and a progress bar, each run's output in
# <run>/log.txt. A run is RESULTS_DIR/<method><rank>/<seed>/; each of its steps is skipped when its output exists
# (train_results.json, predict.jsonl, e2e_scores.json), training resumes from its last checkpoint, and a step that
# runs again removes the outputs of the steps after it, so nothing stale is ever scored.
# Environment variables override the preset: MODEL TOKENIZER TRAIN_DATA VALID_DATA TEST_DATA METHODS (method:rank:lr
# [:alpha] items; method none is full fine-tuning, in RESULTS_DIR/full) SEEDS EPOCHS BATCH WARMUP LORA_DROPOUT
# WEIGHT_DECAY SEQ_LEN BEAM EVAL_LEN BEAM_BATCH MAX_TRAIN_EXAMPLES MAX_TEST_EXAMPLES RESULTS_DIR. Arguments after the preset go to every gpt2_ft.py call.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
export TOKENIZERS_PARALLELISM=false OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
source ./sweep_lib.sh

sweep_options "$@"  # --jobs N, --dry-run: set JOBS / DRY_RUN; the rest stays in SWEEP_REST
set -- "${SWEEP_REST[@]+"${SWEEP_REST[@]}"}"
preset=${1:-}
shift || true

data=${PEFT_DATA_DIR:-../shared/data}
: "${TRAIN_DATA:=$data/e2e/original/trainset.csv}" "${VALID_DATA:=$data/e2e/original/devset.csv}"
: "${TEST_DATA:=$data/e2e/original/testset_w_refs.csv}"
# microsoft/LoRA's E2E recipe, shared by the three papers' GPT-2-medium runs (LoRA paper Table 11).
: "${EPOCHS:=5}" "${BATCH:=8}" "${WARMUP:=500}" "${LORA_DROPOUT:=0.1}" "${WEIGHT_DECAY:=0.01}" "${SEQ_LEN:=512}"
: "${LABEL_SMOOTH:=0.1}" "${BEAM:=10}" "${EVAL_LEN:=64}" "${BEAM_BATCH:=8}" "${SEEDS:=1 2 3}"
: "${MAX_TRAIN_EXAMPLES:=}" "${MAX_VALID_EXAMPLES:=${MAX_TRAIN_EXAMPLES:-}}" "${MAX_TEST_EXAMPLES:=}"
: "${SAVE_INTERVAL:=1000}"
case "$preset" in
  smoke)
    # The whole chain in about a minute on 2 CPU cores: a 2-layer GPT-2 (64 wide) built from config with the real
    # GPT-2 vocabulary, 200 training rows, 1 epoch, 20 test MRs decoded with beam 2. It checks the plumbing on real
    # files, not quality (the scores are those of a model that saw 200 sentences).
    : "${RESULTS_DIR:=e2e_results/smoke}" "${MODEL:=$RESULTS_DIR/tiny-gpt2}" "${TOKENIZER:=$data/gpt2_vocab}"
    : "${METHODS:=lora:4:2e-3:32}"
    EPOCHS=1 BATCH=8 WARMUP=5 SEQ_LEN=128 BEAM=2 EVAL_LEN=16 BEAM_BATCH=10 SEEDS=${SMOKE_SEEDS:-1 2}
    MAX_TRAIN_EXAMPLES=${SMOKE_TRAIN:-200} MAX_VALID_EXAMPLES=50 SMOKE_MRS=${SMOKE_TEST:-20}
    SMOKE_TEST_FILE=$RESULTS_DIR/test_first_${SMOKE_MRS}_mrs.jsonl  # those MRs with all their references
    PAPER=() ;;
  scale)
    # The chain at a scale that learns the task on a CPU: a 16.1M-parameter GPT-2 (256 wide, 4 blocks) built from
    # config and fully trained from scratch (no pretrained GPT-2 here), then the whole test set. A yardstick for the
    # chain on real data, not a paper number (TGen, the challenge baseline: BLEU 65.9, NIST 8.61, METEOR 44.8,
    # ROUGE_L 68.5, CIDEr 2.23).
    : "${RESULTS_DIR:=e2e_results/scale}" "${MODEL:=$RESULTS_DIR/gpt2-16m}" "${TOKENIZER:=$data/gpt2_vocab}"
    : "${METHODS:=none:0:1e-3}"
    MODEL_DIMS="256 4 4" EPOCHS=3 WARMUP=100 SEQ_LEN=256 SEEDS=${SCALE_SEEDS:-1}
    MAX_TRAIN_EXAMPLES=6000 MAX_VALID_EXAMPLES=500
    PAPER=() ;;
  lora)
    : "${RESULTS_DIR:=e2e_results/lora_paper}" "${MODEL:=gpt2-medium}" "${TOKENIZER:=$MODEL}"
    : "${METHODS:=lora:4:2e-4:32}"
    PAPER=(--paper lora) ;;
  vera)
    : "${RESULTS_DIR:=e2e_results/vera_paper}" "${MODEL:=gpt2-medium}" "${TOKENIZER:=$MODEL}"
    : "${METHODS:=vera:1024:1e-1}"
    PAPER=(--paper vera) ;;
  randlora)
    : "${RESULTS_DIR:=e2e_results/randlora_nlg}" "${MODEL:=gpt2-medium}" "${TOKENIZER:=$MODEL}"
    : "${METHODS:=randlora:20:2e-4:40}"
    echo "note: RandLoRA publishes no E2E scores (its repository's NLG/train.sh logs them uncommitted), so the" \
         "table has no paper row; the set-up follows its NLG code (c_attn + MLP, scale alpha/r/sqrt(n))" >&2
    PAPER=() ;;
  *) echo "usage: bash e2e_all.sh smoke|scale|lora|vera|randlora [--jobs N] [--dry-run] [gpt2_ft.py args...]" >&2; exit 2 ;;
esac

smoke_test_subset() {  # the first SMOKE_MRS distinct MRs of the test file, each with all its references
  [ -f "$SMOKE_TEST_FILE" ] && return 0
  "$PY" - "$SMOKE_SOURCE" "$SMOKE_TEST_FILE" "$SMOKE_MRS" <<'EOF'
import sys

from e2e_data import load_e2e, write_jsonl

rows, keep = load_e2e(sys.argv[1]), []
for row in rows:
    if row["context"] not in keep:
        keep.append(row["context"])
keep = set(keep[: int(sys.argv[3])])
write_jsonl([row for row in rows if row["context"] in keep], sys.argv[2])
EOF
}

build_model() {  # a GPT-2 of MODEL_DIMS (width, blocks, heads) built from config with the real vocabulary
  [ -f "$MODEL/config.json" ] && return 0
  "$PY" - "$MODEL" "$TOKENIZER" ${MODEL_DIMS:-64 2 4} <<'EOF'
import sys

import torch
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

torch.manual_seed(0)
width, blocks, heads = map(int, sys.argv[3:6])
model = GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_embd=width, n_layer=blocks, n_head=heads, n_positions=256))
model.save_pretrained(sys.argv[1])
AutoTokenizer.from_pretrained(sys.argv[2]).save_pretrained(sys.argv[1])
EOF
}

check_model() {
  [ -d "$MODEL" ] && return 0
  if ! HF_HUB_ETAG_TIMEOUT=10 timeout 120 "$PY" -c \
       "import sys; from transformers import AutoConfig; AutoConfig.from_pretrained(sys.argv[1])" "$MODEL" > /dev/null 2>&1
  then
    echo "error: $MODEL cannot be loaded on this machine (no local copy and no Hub access); pass MODEL=<folder>," \
         "or run the CPU version of the chain: bash e2e_all.sh smoke" >&2
    exit 2
  fi
}

run_name() { if [ "$1" = none ]; then echo full; else echo "$1$2"; fi; }

add_run() {  # add_run SPEC SEED [gpt2_ft.py args...]: the four steps as one command
  local spec=$1 seed=$2 method rank lr alpha run train beam decode
  shift 2
  IFS=: read -r method rank lr alpha <<< "$spec"
  [ -n "${alpha:-}" ] || alpha=$((2 * rank))
  run="$RESULTS_DIR/$(run_name "$method" "$rank")/$seed"
  # full fine-tuning (method none) saves the whole model in final/, which the beam search then loads
  local -a adapter_flags=(--adapter_name "$method" --lora_dim "$rank" --lora_alpha "$alpha")
  local -a beam_model=(--model_name_or_path "$MODEL" --init_checkpoint "$run/final")
  [ "$method" != none ] || adapter_flags=(--adapter_name none) beam_model=(--model_name_or_path "$run/final")
  local -a caps=() test_caps=()
  [ -z "$MAX_TRAIN_EXAMPLES" ] || caps=(--max_train_examples "$MAX_TRAIN_EXAMPLES" --max_valid_examples "$MAX_VALID_EXAMPLES")
  [ -z "$MAX_TEST_EXAMPLES" ] || test_caps=(--max_examples "$MAX_TEST_EXAMPLES")
  local -a train_cmd=("$PY" gpt2_ft.py --train_data "$TRAIN_DATA" --valid_data "$VALID_DATA"
    --model_name_or_path "$MODEL" --tokenizer_name "$TOKENIZER" "${adapter_flags[@]}" --lora_dropout "$LORA_DROPOUT" --lr "$lr" --weight_decay "$WEIGHT_DECAY"
    --train_batch_size "$BATCH" --seq_len "$SEQ_LEN" --max_epoch "$EPOCHS" --warmup_step "$WARMUP"
    --label_smooth "$LABEL_SMOOTH" --save_interval "$SAVE_INTERVAL" --random_seed "$seed" --work_dir "$run"
    --resume "${caps[@]}" "$@")
  local -a beam_cmd=("$PY" gpt2_beam.py --data "$TEST_DATA" "${beam_model[@]}"
    --tokenizer_name "$TOKENIZER" --work_dir "$run" --output_file predict.jsonl
    --batch_size "$BEAM_BATCH" --seq_len "$SEQ_LEN" --eval_len "$EVAL_LEN" --beam "$BEAM" --length_penalty 0.8
    --no_repeat_ngram_size 4 --repetition_penalty 1.0 --eos_token_id 628 "${test_caps[@]}")
  local -a decode_cmd=("$PY" gpt2_decode.py --input_file "$TEST_DATA" --sample_file "$run/predict.jsonl"
    --output_ref_file "$run/e2e_ref.txt" --output_pred_file "$run/e2e_pred.txt" --score
    --score_json "$run/e2e_scores.json")
  train=$(sweep_quote "${train_cmd[@]}") beam=$(sweep_quote "${beam_cmd[@]}") decode=$(sweep_quote "${decode_cmd[@]}")
  # A step that runs removes what the later steps made from its old output.
  sweep_add "$run" "e2e $method$rank seed $seed" "" \
    "set -e; r=$(printf '%q' "$run")
     if [ ! -f \"\$r/train_results.json\" ]; then rm -f \"\$r/predict.jsonl\" \"\$r\"/e2e_*; $train; fi
     if [ ! -f \"\$r/predict.jsonl\" ]; then rm -f \"\$r\"/e2e_*; $beam; fi
     $decode"
}

if [ "$preset" = smoke ]; then SMOKE_SOURCE=$TEST_DATA TEST_DATA=$SMOKE_TEST_FILE; fi
for spec in $METHODS; do
  for seed in $SEEDS; do add_run "$spec" "$seed" "$@"; done
done
if [ "${DRY_RUN:-0}" = 1 ]; then
  printf '%s\n\n' "${SWEEP_CMD[@]}"
  echo "${#SWEEP_CMD[@]} runs (preset $preset; dry run: nothing started)" >&2
  exit 0
fi
case "$preset" in
  smoke) mkdir -p "$RESULTS_DIR"; build_model; smoke_test_subset ;;
  scale) mkdir -p "$RESULTS_DIR"; build_model ;;
  *) check_model ;;
esac
sweep_execute

table_status=0
roots=() nseeds=$(printf '%s\n' $SEEDS | sort -n | tail -1)
for spec in $METHODS; do IFS=: read -r method rank _ <<< "$spec"; roots+=("$RESULTS_DIR/$(run_name "$method" "$rank")"); done
echo "results in $RESULTS_DIR (E2E test set: $TEST_DATA)"
"$PY" parse_results.py "${roots[@]}" "$nseeds" "${PAPER[@]}" --plot "$RESULTS_DIR/summary.png" || table_status=$?
if [ ${#SWEEP_FAILED[@]} -gt 0 ]; then
  echo "error: ${#SWEEP_FAILED[@]} runs failed: ${SWEEP_FAILED[*]}" >&2
  exit 1
fi
exit "$table_status"
