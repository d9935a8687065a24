#!/usr/bin/env bash
# One call on a machine with two H200s (device kind nvidia-h200-x2) for issues 3 and 6:
#   EP: low_latency in CUDA graphs, dispatch + combine timing vs NCCL, the NCCL correctness suite;
#   models: a real-size layer of each family with EP over NCCL vs the oracle, tiny models with and without EP.
# Results under $OUT (at most 8 files come back from the device tool).
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 PYTHONPATH=.
OUT=${OUT:-./out}
mkdir -p "$OUT"
{ nvidia-smi -L; python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; date -u; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
timeout "${EP_SECONDS:-300}" python3 benchmarks/gpu_ep_check.py --parts graph,timing,correctness \
    --skip-experts "${EP_SKIP_EXPERTS:-triton}" > "$OUT/ep_check.log" 2>&1
echo "gpu_ep_check rc=$?"
timeout "${MODELS_SECONDS:-200}" python3 benchmarks/gpu_models_check.py --skip-tests --out "$OUT" > "$OUT/models_check.log" 2>&1
echo "gpu_models_check rc=$?"
sed -n '/===== summary =====/,$p' "$OUT/ep_check.log"
tail -25 "$OUT/models_check.log"
