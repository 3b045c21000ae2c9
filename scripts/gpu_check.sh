#!/usr/bin/env bash
# The GPU checks of issue 8, as one short script for a lent GPU machine (one device, about 2 minutes):
#   1. the digits example on CUDA with bf16-mixed and torch.compile reaches > 0.9 accuracy;
#   2. no per-step host synchronisation from the engine (torch.cuda.set_sync_debug_mode("error")).
# nccl needs one GPU per rank (NCCL refuses two ranks on one device), so multi-rank nccl runs need
# a machine with several GPUs: torchrun --nproc-per-node <gpus> examples/digits/train.py --device cuda
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/gpu_check}
mkdir -p "$out"
python -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))"
python examples/digits/train.py --device cuda --precision bf16-mixed --compile true --max-epochs 10 \
    --output-dir "$out/single" 2>&1 | tee "$out/single.log" | tail -3
python scripts/gpu_sync_check.py --device cuda --precision bf16-mixed --compile true \
    --output-dir "$out/sync" 2>&1 | tee "$out/sync.log" | tail -3
grep -q "no host synchronisation" "$out/sync.log"
echo "gpu checks passed"
