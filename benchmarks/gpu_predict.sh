#!/usr/bin/env bash
# One-shot GPU measurement of cohort prediction with the paper's backbone (random weights), H100/H200.
# Needs a CUDA build of torch plus this package's dependencies; nothing is downloaded.
#
#   OUT=/some/dir bash benchmarks/gpu_predict.sh
#
# Writes $OUT/env.txt and $OUT/predict_bs<B>_io<N>.json: end-to-end tiles/s (JPEG tiles read and decoded by
# reader threads, pinned batches, head, stitching, vectorizing) vs features-only tiles/s on the same
# device and tiles; their ratio is the goal figure (>= 0.85). io0 is the no-overlap reference.
# Budget: ~1 min model build + ~1-2 min per setting at 235 tiles/s; BUDGET_S stops starting new ones.
set -euo pipefail
OUT="${OUT:-$(pwd)/gpu-predict-out}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
cd "$(dirname "$0")/.."
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
  nproc
  "$PY" -c "import torch, diffusers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'diffusers', diffusers.__version__)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
BACKBONE="${BACKBONE:-random:pathsegdiff-brca-20x}"
TILES="${TILES:-2048}"
START=$(date +%s)
for setting in "128 4" "128 0" "64 4"; do
  set -- $setting
  if (( $(date +%s) - START > ${BUDGET_S:-420} )); then echo "budget spent; skipping bs=$1 io=$2"; continue; fi
  "$PY" -m pdseg_qupath.cli bench predict --backbone "$BACKBONE" --device cuda --batch-size "$1" \
      --tiles "$TILES" --io-threads "$2" > "$OUT/predict_bs$1_io$2.json" 2> "$OUT/predict_bs$1_io$2.err" || true
  cat "$OUT/predict_bs$1_io$2.json"
done
