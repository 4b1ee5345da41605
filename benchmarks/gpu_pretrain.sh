#!/usr/bin/env bash
# One-shot GPU pretraining of the `base` backbone (H100/H200), fixed step counts, ~6-7 min of GPU time.
# Needs a CUDA build of torch plus this package's dependencies; installs nothing.
#
#   OUT=/some/dir bash benchmarks/gpu_pretrain.sh
#
# Data: GLAS (default shared/data/he-unlabeled/glas, 0.62 µm/px PNGs) and CMU (default
# examples/CMU-1-Small-Region.svs). Missing GLAS is skipped with a note (CMU alone is enough for the
# throughput figures, not for a useful backbone). Never gbm40: that is the evaluation set.
# Outputs: $OUT/throughput.json (samples/s per stage), $OUT/record.json, PNGs, and $OUT/base/ with the
# backbone's safetensors split into <=15 MiB parts (NO_WEIGHTS=1 skips them). BUDGET_S caps the run
# (default 480 s); on timeout the resumable state stays in $OUT/base.pretrain-state.
set -euo pipefail
OUT="${OUT:-$(pwd)/gpu-pretrain-out}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
cd "$(dirname "$0")/.."
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
GLAS="${GLAS:-shared/data/he-unlabeled/glas}"
CMU="${CMU:-examples/CMU-1-Small-Region.svs}"
SOURCES=("$CMU")
if [ -d "$GLAS" ]; then SOURCES+=("$GLAS"); else echo "note: $GLAS not found; pretraining on CMU only" | tee "$OUT/note.txt"; fi
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
  "$PY" -c "import torch, diffusers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'diffusers', diffusers.__version__)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
EXTRA=()
[ "${NO_WEIGHTS:-0}" = "1" ] && EXTRA+=(--no-weights)
timeout "${BUDGET_S:-480}" "$PY" benchmarks/gpu_pretrain.py "${SOURCES[@]}" --out "$OUT" \
  --config "${CONFIG:-base}" --steps-ae "${STEPS_AE:-1500}" --steps-unet "${STEPS_UNET:-1500}" \
  --batch-size "${BATCH:-32}" ${EXTRA[@]+"${EXTRA[@]}"} 2>&1 | tee "$OUT/log.txt"
