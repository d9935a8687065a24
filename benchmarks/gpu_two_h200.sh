#!/usr/bin/env bash
# The regression on a machine with two H200s (device kind nvidia-h200-x2), in two calls of under 10 minutes:
#   PARTS="symm soak alltoall mismatch" (340 s on 2026-11-29), then PARTS="tests models" (about 8 minutes;
#   "tests" needs one GPU only). PARTS defaults to symm.
#   symm:     benchmarks/gpu_symm_check.py: the GPU-initiated dispatchers (every pairing, BF16/FP8
#             dispatch, edge token counts, a missing peer), CUDA graphs, the multi-rank suite of
#             tests/test_ep_layer.py for every EP dispatcher on NCCL, the high-throughput kernels'
#             launch variants and profile, dispatch + combine vs NCCL (BF16, FP8), the whole layer on 2
#             GPUs vs one;
#   soak:     1000 forwards in a row of a high-throughput and a low-latency layer alternating;
#   alltoall: benchmarks/gpu_alltoall_check.py: the NCCL alltoall dispatcher's kernels vs its PyTorch
#             path and vs NCCL's own all-to-all;
#   mismatch: benchmarks/gpu_mismatch_check.py: ranks calling different EP layers (every pair of kinds,
#             the symm ones included) raise on every rank, and the next forward is correct;
#   tests:    every single-GPU test (pytest -m "gpu and not multigpu"): kernels at real sizes, float16 range;
#   models:   benchmarks/gpu_models_check.py: real-size transformers blocks with EP vs the oracle.
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
case " $PARTS " in *" symm "*)         # about 4 minutes
    OUT="$RES" timeout "${SYMM_SECONDS:-450}" python3 benchmarks/gpu_symm_check.py \
        --parts smoke_ll,smoke_ht,graph,suite,variants,timing,layer \
        --timing-args "--timeout 120 --reps 10 --warmup 3" --layer-args "--timeout 150 --reps 10 --warmup 3" \
        > "$RES/symm_check.log" 2>&1
    echo "gpu_symm_check rc=$?";; esac
case " $PARTS " in *" soak "*)         # 1000 forwards in a row, two layers alternating: about 30 s
    mkdir -p "$RES/soak"
    OUT="$RES/soak" timeout "${SOAK_SECONDS:-200}" python3 benchmarks/gpu_symm_check.py --parts soak --forwards 500 \
        > "$RES/soak.log" 2>&1
    echo "soak rc=$?";; esac
case " $PARTS " in *" alltoall "*)     # the NCCL alltoall fast path against its PyTorch path and NCCL
    timeout "${ALLTOALL_SECONDS:-200}" python3 benchmarks/gpu_alltoall_check.py --out "$RES/alltoall" \
        > "$RES/alltoall_check.log" 2>&1
    echo "gpu_alltoall_check rc=$?";; esac
case " $PARTS " in *" mismatch "*)     # ranks calling different layers, every pair of kinds, on NCCL
    timeout "${MISMATCH_SECONDS:-200}" python3 benchmarks/gpu_mismatch_check.py --out "$RES/mismatch" \
        > "$RES/mismatch_check.log" 2>&1
    echo "gpu_mismatch_check rc=$?";; esac
case " $PARTS " in *" tests "*)       # about 240 s on an H200 (90 tests, Triton compiles at real sizes)
    timeout "${PYTEST_SECONDS:-260}" python3 -m pytest tests -q -p no:cacheprovider -m "gpu and not multigpu" \
        > "$RES/pytest_gpu.txt" 2>&1
    echo "pytest -m gpu rc=$?";; esac
case " $PARTS " in *" models "*)      # real-size blocks ~100 s, tiny models after them
    timeout "${MODELS_SECONDS:-400}" python3 benchmarks/gpu_models_check.py --skip-tests --out "$RES/models" \
        > "$RES/models_check.log" 2>&1
    echo "gpu_models_check rc=$?";; esac
tar -czf "$OUT/results.tar.gz" -C "$OUT" results
for f in symm_check soak; do [ -f "$RES/$f.log" ] && sed -n '/===== summary =====/,$p' "$RES/$f.log" | cut -c1-400; done
for f in alltoall_check mismatch_check; do [ -f "$RES/$f.log" ] && tail -25 "$RES/$f.log"; done
[ -f "$RES/pytest_gpu.txt" ] && tail -3 "$RES/pytest_gpu.txt"
[ -f "$RES/models_check.log" ] && tail -12 "$RES/models_check.log"
exit 0
