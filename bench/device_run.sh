#!/usr/bin/env bash
# bench/gpu_check.sh on a lent GPU machine, in one command that ends inside the device tool's 10 minutes.
# First, here: bash bench/device_bundle.sh. Then the device tool's run:
#
#   command: bash bench/device_run.sh        carry: [".device"]        timeout_s: 600
#
# It installs the bundled PEFT wheel beside the machine's Python packages, points the scripts at the bundled
# data and MiniLM config, runs gpu_check.sh within --budget seconds (default 540) and leaves in $OUT (or
# bench/results/gpu_check when $OUT is unset) gpu_check.md, the report, and gpu_check.tgz, every step's
# JSON and log.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ ! -d .device/whl ]; then
  echo "error: no .device/ bundle here; run bash bench/device_bundle.sh first and carry .device" >&2
  exit 2
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/device_site \
  .device/whl/*.whl || { echo "error: installing the bundled wheels failed" >&2; exit 2; }
export PYTHONPATH=/tmp/device_site${PYTHONPATH:+:$PYTHONPATH} PYTHON=${PYTHON:-python3} PYTHONUNBUFFERED=1
export PEFT_DATA_DIR=$PWD/.device/data MINILM_CONFIG=$PWD/.device/minilm
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
bash bench/gpu_check.sh --out "$work" --budget "${BUDGET:-540}" "$@"
rc=$?
dest=${OUT:-bench/results/gpu_check}
mkdir -p "$dest"
cp "$work/gpu_check.md" "$dest/" 2> /dev/null
tar czf "$dest/gpu_check.tgz" -C "$work" .
echo "[device_run] exit $rc; report in $dest/gpu_check.md, every step's files in $dest/gpu_check.tgz" >&2
exit $rc
