#!/usr/bin/env bash
# One GPU, SD1.5 size, random weights: the CTRL update at micro-batch 4 and 8 per device (50 DDIM
# steps, CFG 7.5 in both models, random truncation, bf16 policy / fp32 reference, remat per call
# and per layer, reward remat per image, attention "auto" = cuDNN flash where it applies), then
# the memory plan of the same step as XLA compiles it for this GPU. ≤ 8 minutes end to end.
#   bash bench/gpu_sd.sh [PEAK_TFLOPS]      # default 989: H100/H200 SXM dense bf16
# Writes bench/results/sd_update_gpu_b{4,8}.json.
set -euo pipefail
cd "$(dirname "$0")/.."
PEAK="${1:-989}"
PY="${PYTHON:-python}"
for B in 4 8; do
  timeout 200 "$PY" bench/sd_update.py --per_device_batch "$B" --steps 50 --repeats 2 \
    --attention auto --peak_tflops "$PEAK" --out "bench/results/sd_update_gpu_b${B}.json" \
    || echo "micro-batch $B: failed or timed out (exit $?)"
done
