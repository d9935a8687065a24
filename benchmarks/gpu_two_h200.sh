#!/usr/bin/env bash
# The one-call regression on a machine with two H200s (device kind nvidia-h200-x2), under 10 minutes:
#   1. benchmarks/gpu_symm_check.py: the GPU-initiated dispatchers (every pairing, BF16/FP8 dispatch, edge
#      token counts, a missing peer), CUDA graphs, the multi-rank suite of tests/test_ep_layer.py for every
#      EP dispatcher on NCCL, dispatch + combine vs NCCL (BF16, FP8), the whole layer on 2 GPUs vs one;
#   2. every single-GPU test (pytest -m "gpu and not multigpu"): kernels at real sizes, float16 range, ...;
#   3. benchmarks/gpu_models_check.py: real-size transformers blocks with EP vs the oracle, tiny models.
# Each part under its own time cap; NVLink multicast off. Results: $OUT/results.tar.gz and $OUT/log.txt.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 PYTHONPATH=.
OUT=${OUT:-./out}
RES="$OUT/results"
mkdir -p "$RES"
{ nvidia-smi -L; python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; date -u; } \
    > "$RES/env.txt" 2>&1
cat "$RES/env.txt"
OUT="$RES" timeout "${SYMM_SECONDS:-270}" python3 benchmarks/gpu_symm_check.py \
    --parts smoke_ll,smoke_ht,graph,suite,timing,layer \
    --timing-args "--timeout 120 --reps 10 --warmup 3" --layer-args "--timeout 150 --reps 10 --warmup 3" \
    > "$RES/symm_check.log" 2>&1
echo "gpu_symm_check rc=$?"
timeout "${PYTEST_SECONDS:-150}" python3 -m pytest tests -q -p no:cacheprovider -m "gpu and not multigpu" \
    > "$RES/pytest_gpu.txt" 2>&1
echo "pytest -m gpu rc=$?"
timeout "${MODELS_SECONDS:-100}" python3 benchmarks/gpu_models_check.py --skip-tests --out "$RES/models" \
    > "$RES/models_check.log" 2>&1
echo "gpu_models_check rc=$?"
tar -czf "$OUT/results.tar.gz" -C "$OUT" results
sed -n '/===== summary =====/,$p' "$RES/symm_check.log"
tail -3 "$RES/pytest_gpu.txt"
grep -E "passed|failed|error" "$RES/pytest_gpu.txt" | tail -3
tail -12 "$RES/models_check.log"
