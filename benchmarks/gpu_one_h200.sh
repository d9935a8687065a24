#!/usr/bin/env bash
# One device call on one H200 (kind nvidia-h200), under 10 minutes: every single-GPU test
# (pytest -m "gpu and not multigpu", about 4 minutes) and the GPU memory check on one GPU
# (benchmarks/gpu_memory_check.py: torch.cuda.memory_allocated over 1000 forwards of random sizes, every
# dispatcher that runs on one GPU). Each log is written whole to $OUT, headed by the command, the commit,
# the GPU, the torch/triton versions and the date; the memory check also writes its JSON there.
#   COMMIT=$(git rev-parse HEAD) bash benchmarks/gpu_one_h200.sh     # COMMIT: where the copy has no .git
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 PYTHONPATH=.
OUT=${OUT:-./out}
mkdir -p "$OUT"
COMMIT=${COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
DAY=$(date -u +%F)

# run LOG TIMEOUT_S COMMAND...: the command's output, whole, under a header saying what made it
run() {
    local log=$1 limit=$2; shift 2
    {
        echo "# command: $(printf '%q ' "$@")"
        echo "# commit: $COMMIT"
        echo "# gpu: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>&1 | head -1)"
        echo "# $(python3 -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)' 2>&1)"
        echo "# date: $(date -u +%FT%TZ)"
        timeout "$limit" "$@" 2>&1
        echo "# exit code: $?"
    } > "$log"
    tail -4 "$log"
}

run "$OUT/pytest_gpu_H200_$DAY.txt" "${PYTEST_SECONDS:-330}" \
    python3 -m pytest tests -q -p no:cacheprovider -m "gpu and not multigpu"
run "$OUT/gpu_memory_H200_$DAY.log" "${MEMORY_SECONDS:-200}" \
    python3 benchmarks/gpu_memory_check.py --ranks 1 --output "$OUT/gpu_memory_H200_$DAY.json"
exit 0
