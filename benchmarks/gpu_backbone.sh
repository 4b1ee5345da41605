#!/usr/bin/env bash
# One-shot GPU benchmark of the PathSegDiff backbone features (H100/H200). Installs nothing unusual:
# it needs a CUDA build of torch plus this package's own dependencies (diffusers, safetensors, ...).
#
#   OUT=/some/dir bash benchmarks/gpu_backbone.sh
#
# Writes $OUT/gpu_backbone.json (one row per setting: eager vs compiled, bf16, batch 128) and
# $OUT/env.txt. The inductor cache goes to $OUT/inductor-cache so a rerun shows the warm compile time.
set -euo pipefail
OUT="${OUT:-$(pwd)/gpu-bench-out}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
cd "$(dirname "$0")/.."
export TORCHINDUCTOR_CACHE_DIR="$OUT/inductor-cache"
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
  "$PY" -c "import torch, diffusers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'diffusers', diffusers.__version__)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
# pytest on GPU for the CUDA-only test, quick
"$PY" -m pytest -q tests/test_backbone_features.py -k cuda 2>&1 | tail -3 | tee "$OUT/pytest_cuda.txt" || true
# Settings 0-1 eager (~1 min), 2 compile cold (~100 s + run), then the rest while time remains.
"$PY" benchmarks/bench_backbone.py --device cuda --gpu --out "$OUT/gpu_backbone.json" --budget-s "${BUDGET_S:-420}"
