#!/usr/bin/env bash
# One device call (one H200): tune the block-FP8 (and BF16) kernels of the deepseek-v3 32-expert shard
# and mixtral-8x7b with the promotion variants among the candidates, profile the variants with Nsight
# Compute, benchmark both against the library anchors with the tuned table, and run the GPU tests of
# the changed files. Every step has its own time limit and log; what ran comes back under $OUT.
# The calls of 2026-12-04 ran when the tuner still timed "rescale" by default; it now needs
# --allow-rescale (less precise), so these tune steps time "sync" candidates only.
#
#   OUT=/some/dir bash benchmarks/gpu_fp8_prefill.sh [steps]  # tune,refine,profile,bench,tests,gputests
#   (default tune,profile,bench,tests; the first call ran those, the second refine,bench,profile,gputests)
# The commit of a copy without .git: EPMOE_COMMIT (the bench records it). Everything is written to a
# work folder and packed into $OUT/all.tgz after every step (the device call returns at most 8 files).
set -u
OUT=${OUT:?set OUT to the output folder}
STEPS=${1:-tune,profile,bench,tests}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
TABLE=epmoe/kernels/configs/NVIDIA_H200.json
W=$(mktemp -d)
has() { [[ ",$STEPS," == *",$1,"* ]]; }
step() {   # step NAME LIMIT_S COMMAND...: run with a time limit, log to NAME.log, say how it ended
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$W/$name.log" 2>&1
  echo "== $name: rc $? in $((SECONDS - t0)) s" | tee -a "$W/steps.txt"
  tar czf "$OUT/all.tgz" -C "$W" .
}
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv > "$W/gpu.txt" 2>&1
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name(0))" \
    >> "$W/gpu.txt"
echo "commit ${EPMOE_COMMIT:-unknown}" >> "$W/gpu.txt"
cp "$TABLE" "$W/NVIDIA_H200.json"
if has tune; then
  step tune_ds32 110 python3 -m epmoe tune -v --local-experts 32 --hidden 7168 --inter 2048 --top-k 8 \
      --formats fp8_block,bf16 --tokens 4096,8192 --output "$W/NVIDIA_H200.json"
  step tune_mixtral 60 python3 -m epmoe tune -v --presets mixtral-8x7b --formats fp8_block --tokens 8192 \
      --output "$W/NVIDIA_H200.json"
  cp "$W/NVIDIA_H200.json" "$TABLE"
fi
if has refine; then       # the table's entries against their promotion twins (after a full tune)
  step refine_ds32 60 python3 -m epmoe tune -v --refine --local-experts 32 --hidden 7168 --inter 2048 --top-k 8 \
      --formats fp8_block --tokens 4096,8192 --output "$W/NVIDIA_H200.json"
  step refine_mixtral 50 python3 -m epmoe tune -v --refine --presets mixtral-8x7b --formats fp8_block \
      --tokens 8192 --output "$W/NVIDIA_H200.json"
  cp "$W/NVIDIA_H200.json" "$TABLE"
fi
if has profile; then
  step ncu 40 ncu --clock-control none --nvtx --nvtx-include "profiled/" --section SpeedOfLight \
      --section ComputeWorkloadAnalysis --section WarpStateStats --section Occupancy \
      python3 benchmarks/profile_fp8_kernels.py --preset deepseek-v3 --experts 32 --tokens 8192
fi
if has bench; then
  step bench_ds32 70 python3 -m epmoe bench experts --presets deepseek-v3 --experts 32 --tokens 4096,8192 \
      --routings balanced --formats bf16,fp8_block --backends triton --no-plot --output "$W/experts_ds32.json"
  step bench_mixtral 55 python3 -m epmoe bench experts --presets mixtral-8x7b --tokens 8192 \
      --routings balanced --formats bf16,fp8_block --backends triton --no-plot --output "$W/experts_mixtral.json"
fi
if has tests; then
  step tests_new 80 python3 -m pytest -q -x tests/test_triton_gpu.py -k promote tests/test_bench_experts.py
fi
if has gputests; then
  step tests_gpu 230 python3 -m pytest -q tests/test_triton_gpu.py tests/test_bench_experts.py tests/test_gpu_experts.py
fi
for f in "$W"/*.log; do echo "---- $(basename "$f")"; grep -v "^\s*$" "$f" | tail -n 14 | cut -c1-220; done
