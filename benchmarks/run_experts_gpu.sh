#!/bin/bash
# One GPU session for the experts kernels: GPU tests of the Triton backend, tuning of the four presets
# (BF16 and FP8 block), then the experts benchmark with the fresh table. Results land in $OUT (or
# benchmarks/results when OUT is unset).
# Usage: benchmarks/run_experts_gpu.sh [tests] [tune|refine|persistent] [bench] [gpu] [pytest]
#   refine: only the table's configuration per T against its TMA twin, tail tiles and (FP8) 16 warps;
#   persistent: only the table's configuration per T against the same tiles as persistent kernels;
#   gpu: every @pytest.mark.gpu test. Env: TESTS_K (pytest -k), TUNE_TOKENS, TUNE_FORMATS (refine), BENCH_SUFFIX,
#   BENCH_ARGS, *_S (time limits)
set -o pipefail
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONPATH=.:$PYTHONPATH PYTHONUNBUFFERED=1
STEPS=${*:-tests tune bench}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
for step in $STEPS; do
  case $step in
    tests)  timeout ${TESTS_S:-200} python3 -m pytest tests/test_triton_gpu.py -q -x -p no:cacheprovider ${TESTS_K:+-k "$TESTS_K"} 2>&1 | tee "$OUT/pytest_triton_gpu.txt" ;;
    tune)   timeout ${TUNE_S:-280} python3 -m epmoe tune --preset mixtral-8x7b --preset qwen3-30b-a3b \
              --preset deepseek-v3 --preset gpt-oss-120b --format bf16 --format fp8_block --reps 8 2>&1 | tee "$OUT/tune.log"
            cp epmoe/kernels/configs/*.json "$OUT/" ;;
    refine) timeout ${TUNE_S:-150} python3 -m epmoe tune --preset mixtral-8x7b --preset qwen3-30b-a3b \
              --preset deepseek-v3 --preset gpt-oss-120b ${TUNE_FORMATS:---format bf16 --format fp8_block} --reps 8 --jobs 16 \
              --tokens ${TUNE_TOKENS:-1,16,128,1024,8192} --refine 2>&1 | tee "$OUT/tune.log"
            cp epmoe/kernels/configs/*.json "$OUT/" ;;
    persistent) timeout ${TUNE_S:-150} python3 -m epmoe tune --preset mixtral-8x7b --preset qwen3-30b-a3b \
              --preset deepseek-v3 --preset gpt-oss-120b --format bf16 --format fp8_block --reps 10 --jobs 16 \
              --tokens ${TUNE_TOKENS:-1024,8192} --persistent 2>&1 | tee "$OUT/tune.log"
            cp epmoe/kernels/configs/*.json "$OUT/" ;;
    gpu)    timeout ${GPU_S:-200} python3 -m pytest tests -m gpu -q -p no:cacheprovider 2>&1 | tee "$OUT/pytest_gpu_marked.txt" ;;
    bench)  timeout ${BENCH_S:-400} python3 -m epmoe bench experts --reps ${BENCH_REPS:-15} --warmup 3 \
              --output "$OUT/experts_NVIDIA_H200_$(date -u +%Y-%m-%d)${BENCH_SUFFIX}.json" ${BENCH_ARGS} 2>&1 | tee "$OUT/bench.log" ;;
    pytest) timeout ${PYTEST_S:-400} python3 -m pytest tests -m "not multigpu" -q -x -p no:cacheprovider 2>&1 | tee "$OUT/pytest_gpu.txt" ;;
  esac
done
