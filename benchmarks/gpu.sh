#!/usr/bin/env bash
# One short GPU benchmark run (under 8 minutes on one H100): ViT-B/16 D²MAE pre-training images/s (bf16, in-memory
# data path on the GPU, synthetic images), model FLOP utilisation against the dense bf16 peak (H200 790, H100 989
# TFLOP/s), peak GPU memory, OBS images/s, and the paper's thyroid schedule (10,675 images × 8,000 epochs) in wall time.
#
#   benchmarks/gpu.sh [OUT_DIR] [extra gpu_bench.py options]     # OUT_DIR default: $OUT, else benchmarks/gpu_results
#   benchmarks/gpu.sh --dry-run [OUT_DIR]                         # every pass on the CPU at toy size (tested)
#
# Needs only the repository and a Python with torch, timm, torchvision, numpy, PyYAML, safetensors (d2mae's
# dependencies; the GPU machine's image has them): src/ goes on PYTHONPATH, nothing is installed.
# Environment: PYTHON (default python3), COMPILE=0 to skip the torch.compile pass, BUDGET_S (default 450) for the
# whole script; each pass runs under `timeout` and writes its table as it goes.
set -uo pipefail

cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-python3}
DRY=0
if [[ ${1:-} == --dry-run ]]; then  # the same passes on the CPU with the tiny model: a test of the script itself
  DRY=1
  shift
fi
if [[ $# -gt 0 && $1 != -* ]]; then
  OUT_DIR=$1
  shift
else
  OUT_DIR=${OUT:-benchmarks/gpu_results}
fi
BUDGET_S=${BUDGET_S:-450}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT_DIR"

if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "gpu.sh: '$PY' has no torch; set PYTHON to the Python that has it" >&2
  exit 3
fi
if ! "$PY" -c "import timm" 2>/dev/null; then
  echo "gpu.sh: timm is not installed in '$PY' (d2mae's models are built from timm blocks): pip install timm," \
       "or carry a timm wheel to an offline machine" >&2
  exit 3
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, 'cuda', torch.version.cuda)"

TINY=()
COMPILED=(--batch-sizes 256 --warmup 12)
if [[ $DRY == 1 ]]; then
  TINY=(--device cpu --tiny)
  COMPILED=(--batch-sizes 8 --warmup 1 --steps 1)
fi
start=$(date +%s)
# pass 1: eager, two batch sizes (the default per-process batch of d2mae pretrain, and a larger one)
timeout $((BUDGET_S * 45 / 100)) "$PY" benchmarks/gpu_bench.py --out "$OUT_DIR/eager" "${TINY[@]}" "$@"
rc=$?
[[ $rc -ne 0 ]] && echo "gpu.sh: eager pass ended with status $rc (a table of what finished is in $OUT_DIR/eager)" >&2

# pass 2: torch.compile at the larger batch (compilation takes a minute or two, and the blur's data-dependent
# Python loop recompiles for a few steps, hence the longer warm-up; skipped with COMPILE=0)
left=$((BUDGET_S - ($(date +%s) - start)))
if [[ ${COMPILE:-1} != 0 && $left -gt 60 ]]; then
  timeout "$left" "$PY" benchmarks/gpu_bench.py --out "$OUT_DIR/compiled" --compile-modes compiled "${COMPILED[@]}" \
    "${TINY[@]}" "$@"
  rc2=$?
  [[ $rc2 -ne 0 ]] && echo "gpu.sh: compiled pass ended with status $rc2 (timeout: 124)" >&2
fi
echo "gpu.sh: done in $(($(date +%s) - start)) s; tables: $OUT_DIR/*/gpu_bench.md"
[[ ${rc2:-0} -ne 0 ]] && exit "$rc2"
exit $rc
