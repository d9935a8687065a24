#!/usr/bin/env bash
# The regression on a machine with two H200s (device kind nvidia-h200-x2), in two calls of under 10
# minutes each: PARTS=symm (the default, about 5 minutes), then PARTS="tests models" (about 8):
#   1. benchmarks/gpu_symm_check.py: the GPU-initiated dispatchers (every pairing, BF16/FP8 dispatch, edge
#      token counts, a missing peer), CUDA graphs, the multi-rank suite of tests/test_ep_layer.py for every
#      EP dispatcher on NCCL, dispatch + combine vs NCCL (BF16, FP8), the whole layer on 2 GPUs vs one,
#      1000 forwards in a row of a high-throughput and a low-latency layer alternating;
#   2. every single-GPU test (pytest -m "gpu and not multigpu"): kernels at real sizes, float16 range, ...;
#   3. benchmarks/gpu_models_check.py: real-size transformers blocks with EP vs the oracle, tiny models.
# Each part under its own time cap; NVLink multicast off. Results: $OUT/results.tar.gz.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 PYTHONPATH=.
OUT=${OUT:-./out}
RES="$OUT/results"
mkdir -p "$RES"
{ nvidia-smi -L; python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; date -u; } \
    > "$RES/env.txt" 2>&1
cat "$RES/env.txt"
PARTS=${PARTS:-symm}
case " $PARTS " in *" symm "*)
    OUT="$RES" timeout "${SYMM_SECONDS:-420}" python3 benchmarks/gpu_symm_check.py \
        --parts smoke_ll,smoke_ht,graph,suite,timing,layer,soak --forwards 500 \
        --timing-args "--timeout 120 --reps 10 --warmup 3" --layer-args "--timeout 150 --reps 10 --warmup 3" \
        > "$RES/symm_check.log" 2>&1
    echo "gpu_symm_check rc=$?";; esac
case " $PARTS " in *" tests "*)       # about 240 s on an H200 (90 tests, Triton compiles at real sizes)
    timeout "${PYTEST_SECONDS:-260}" python3 -m pytest tests -q -p no:cacheprovider -m "gpu and not multigpu" \
        > "$RES/pytest_gpu.txt" 2>&1
    echo "pytest -m gpu rc=$?";; esac
case " $PARTS " in *" models "*)      # real-size blocks ~100 s, tiny models after them
    timeout "${MODELS_SECONDS:-400}" python3 benchmarks/gpu_models_check.py --skip-tests --out "$RES/models" \
        > "$RES/models_check.log" 2>&1
    echo "gpu_models_check rc=$?";; esac
tar -czf "$OUT/results.tar.gz" -C "$OUT" results
[ -f "$RES/symm_check.log" ] && sed -n '/===== summary =====/,$p' "$RES/symm_check.log"
[ -f "$RES/pytest_gpu.txt" ] && tail -3 "$RES/pytest_gpu.txt"
[ -f "$RES/models_check.log" ] && tail -12 "$RES/models_check.log"
exit 0
