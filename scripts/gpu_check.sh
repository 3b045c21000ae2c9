#!/usr/bin/env bash
# The GPU checks of issues 8 and 13, as one short script for a lent GPU machine (about 3 minutes):
#   1. the digits example on CUDA with bf16-mixed and torch.compile reaches > 0.9 accuracy;
#   2. no per-step host synchronisation from the engine (torch.cuda.set_sync_debug_mode("error")),
#      with bf16-mixed and torch.compile, and in full precision (the loop's plain path, issue 17);
#   3. the same check under --strategy fsdp with bf16-mixed, with each rank's peak memory, and the
#      GPT example (built on the meta device) under fsdp and bf16-mixed.
# nccl needs one GPU per rank (NCCL refuses two ranks on one device), so fsdp is sharded only on a
# machine with several GPUs; on one GPU it runs unsharded in one process, as it does on any one rank.
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
# Full precision takes the loop's plain path (no autocast, no context around the step): check it too.
python scripts/gpu_sync_check.py --device cuda --precision 32 \
    --output-dir "$out/sync32" 2>&1 | tee "$out/sync32.log" | tail -3
grep -q "no host synchronisation" "$out/sync32.log"

gpus=$(python -c "import torch; print(torch.cuda.device_count())")
if [ "$gpus" -ge 2 ]; then
    launch=(torchrun --standalone --nproc-per-node "$gpus")
else
    launch=(python)
    echo "one GPU: fsdp runs unsharded in one process; sharding needs two GPUs or more"
fi
"${launch[@]}" scripts/gpu_sync_check.py --device cuda --precision bf16-mixed --strategy fsdp \
    --output-dir "$out/fsdp-sync" 2>&1 | tee "$out/fsdp-sync.log" | tail -"$((gpus + 2))"
[ "$(grep -c "no host synchronisation" "$out/fsdp-sync.log")" -eq "$(( gpus >= 2 ? gpus : 1 ))" ]
grep "peak memory" "$out/fsdp-sync.log"
"${launch[@]}" examples/gpt/train.py --device cuda --precision bf16-mixed --strategy fsdp --max-epochs 1 \
    --output-dir "$out/gpt" 2>&1 | tee "$out/gpt.log" | tail -2
grep -q "final eval loss" "$out/gpt.log"
echo "gpu checks passed"
