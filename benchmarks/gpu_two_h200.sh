#!/usr/bin/env bash
# The regression on a machine with two H200s (device kind nvidia-h200-x2), in calls of under 10 minutes:
#   PARTS="fair" (its layer steps measure two micro-batches beside one and the EPLB step time, so it takes
#   a call of its own), then PARTS="symm soak alltoall mismatch", then PARTS="tests models" ("tests" needs
#   one GPU only), then PARTS="overlap". PARTS defaults to "fair".
#   fair:     the fair benchmarks, each result a JSON with its command, commit and environment:
#             `epmoe bench dispatch` (alltoall, low_latency and both symm dispatchers, T = 128 and 4096,
#             BF16 rows, then FP8 rows): each dispatcher with its capacity and graph replays where it can
#             (best) and `dispatcher="auto"` without capacity, eager (default), against NCCL
#             all_to_all_single of the same bytes timed the same way, every rank sleeping the same time
#             before each repeat, each rank's time and the slower one; `epmoe bench layer --ranks 2`
#             (deepseek-v3, qwen3-30b-a3b, BF16, T = 128 and 4096, balanced routing: alltoall and both symm
#             dispatchers, each with one micro-batch and with two (--micro-batches 1,2), against one GPU
#             doing both ranks' tokens; effective TFLOP/s per GPU); the DeepSeek-V3 FP8 block layer at
#             T = 8192 on symm_high_throughput (TFLOP/s per GPU); and EPLB: deepseek-v3 BF16 on
#             symm_high_throughput, T = 128 and 4096, skewed routing (Zipf 1.2) with 8 redundant experts,
#             the step time before and after the rebalance, set beside the balanced routing's step time of
#             the layer run above (`python -m epmoe.bench.eplb`, in summary.txt);
#   symm:     benchmarks/gpu_symm_check.py: the GPU-initiated dispatchers (every pairing, BF16/FP8
#             dispatch, edge token counts, a missing peer), CUDA graphs, the multi-rank suite of
#             tests/test_ep_layer.py for every EP dispatcher on NCCL, the high-throughput kernels'
#             launch variants and profile, the pull combine (in place, and with the output copied in)
#             against the push combine (its timing and layer parts are the fair part now);
#   soak:     1000 forwards in a row of a high-throughput and a low-latency layer alternating;
#   alltoall: benchmarks/gpu_alltoall_check.py: the NCCL alltoall dispatcher's kernels vs its PyTorch
#             path and vs NCCL's own all-to-all, without a capacity and bounded (max_tokens_per_rank = T:
#             graph replays against NCCL replayed alike, a graph replay equal to eager bit for bit);
#   mismatch: benchmarks/gpu_mismatch_check.py: ranks calling different EP layers (every pair of kinds,
#             the symm ones included) raise on every rank, and the next forward is correct; on each symm
#             kind a live peer's timeout (skipped forward, late peer) then resync(), an experts failure;
#   tests:    every single-GPU test (pytest -m "gpu and not multigpu"): kernels at real sizes, float16 range;
#   models:   benchmarks/gpu_models_check.py: real-size transformers blocks with EP vs the oracle;
#   overlap:  benchmarks/gpu_overlap_check.py --ranks 2: every NCCL and symm dispatcher (deepseek-v3, T = 128
#             and 4096) with a shared expert: step time with the exchanges on the communication stream and
#             in order (overlap on / off), one micro-batch and two, eager and CUDA graphs; two micro-batches
#             against one and the oracle, graph replays bit-equal to eager (about 4 minutes).
# PARTS="overlap" alone in one call.
# Each step under its own time cap and all of them inside BUDGET_S (570 s: the device tool stops a command
# at 600); NVLink multicast off. Everything goes to $WORK/results (default /tmp/epmoe_two_h200: logs,
# JSONs, commands.txt, env.txt, summary.txt), bundled into $OUT/results.tar.gz after every step (a call cut
# off keeps what finished); the fair part's JSONs and summary.txt are also copied to $OUT (the device tool
# returns at most 8 files). Where the tree has no git metadata (a copy), pass EPMOE_COMMIT=<commit> so the
# JSONs name it; they always carry a digest of the library's sources.
#
#   bash benchmarks/gpu_two_h200.sh --cpu-smoke [OUT=dir, PARTS=...]
# runs the parts that have a CPU path on two Gloo ranks with tiny shapes (fair; alltoall through its own
# --cpu-smoke when PARTS names it) and lists the CUDA-only ones as skipped: it checks the script, its
# commands and what they write; the numbers are not results.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
SMOKE=0
for arg in "$@"; do
  case "$arg" in
    --cpu-smoke) SMOKE=1 ;;
    *) echo "gpu_two_h200.sh: unknown argument $arg (the only one is --cpu-smoke; parts go in PARTS=...)" >&2; exit 2 ;;
  esac
done
cd "$(dirname "$0")/.."
OUT=${OUT:-./out}
WORK=${WORK:-/tmp/epmoe_two_h200}
RES="$WORK/results"
rm -rf "$RES"
mkdir -p "$RES" "$OUT"
PY=${PYTHON:-python3}
{ if [ "$SMOKE" = 1 ]; then echo "cpu smoke run (Gloo, tiny shapes): not results"; else nvidia-smi -L; fi
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  echo "commit ${EPMOE_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo 'unknown (no git metadata; set EPMOE_COMMIT)')}"
  date -u; } > "$RES/env.txt" 2>&1
cat "$RES/env.txt"
PARTS=${PARTS:-fair}
FAILED=0
START=$(date +%s)
BUDGET_S=${BUDGET_S:-570}

summarize() {
  for f in "$RES"/fair_*.log; do [ -f "$f" ] && { echo "== $(basename "$f")"; tail -40 "$f" | cut -c1-260; }; done
  [ -f "$RES/fair/layer_2x_eplb_skewed.json" ] && [ -f "$RES/fair/layer_2x_bf16.json" ] && \
      $PY -m epmoe.bench.eplb "$RES/fair/layer_2x_eplb_skewed.json" "$RES/fair/layer_2x_bf16.json" 2>&1 | cut -c1-300
  for f in symm_check soak; do [ -f "$RES/$f.log" ] && sed -n '/===== summary =====/,$p' "$RES/$f.log" | cut -c1-400; done
  for f in alltoall_check mismatch_check; do [ -f "$RES/$f.log" ] && tail -25 "$RES/$f.log"; done
  [ -f "$RES/pytest_gpu.log" ] && tail -3 "$RES/pytest_gpu.log"
  [ -f "$RES/models_check.log" ] && tail -12 "$RES/models_check.log"
  [ -f "$RES/overlap_check.log" ] && sed -n '/===== summary/,$p' "$RES/overlap_check.log" | cut -c1-400
  echo "steps failed: $FAILED"
}

bundle() {   # what exists so far -> $OUT (results.tar.gz, summary.txt, the fair JSONs)
  summarize > "$RES/summary.txt"
  tar -czf "$OUT/results.tar.gz.tmp" -C "$WORK" results && mv "$OUT/results.tar.gz.tmp" "$OUT/results.tar.gz"
  cp "$RES/summary.txt" "$OUT/"
  for f in "$RES"/fair/*.json "$RES"/overlap/*.json; do [ -f "$f" ] && cp "$f" "$OUT/"; done
  true
}

# step NAME SECONDS COMMAND...: one command under min(SECONDS, what is left of BUDGET_S), its output in
# $RES/<NAME>.log, the command line in $RES/commands.txt, its exit code said and counted; then bundled
step() {
  local name=$1 cap=$2 left
  shift 2
  left=$(( BUDGET_S - ($(date +%s) - START) - 10 ))
  if [ "$left" -lt 20 ]; then
    echo "$name: not run, the call's time budget is spent" | tee "$RES/$name.log"
    FAILED=$((FAILED + 1))
    return
  fi
  [ "$cap" -gt "$left" ] && cap=$left
  echo "$*" >> "$RES/commands.txt"
  timeout "$cap" "$@" > "$RES/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc (${cap} s cap)"
  [ "$rc" = 0 ] || FAILED=$((FAILED + 1))
  bundle
}

cuda_only() {
  if [ "$SMOKE" = 1 ]; then echo "$1: skipped in --cpu-smoke (CUDA only)"; return 1; fi
  return 0
}

case " $PARTS " in *" fair "*)         # a call of its own on two H200s
  mkdir -p "$RES/fair"
  if [ "$SMOKE" = 1 ]; then
    D_ARGS=(--comm gloo --hidden 64 --experts 8 --top-k 2 --tokens 4 --reps 2 --warmup 1)   # CPU dispatchers
    L_ARGS=(--device cpu --experts 16 --shrink 64 --tokens 4 --reps 2 --warmup 1 --presets qwen3-30b-a3b
            --dispatchers alltoall)
    F_ARGS=(--device cpu --experts 16 --shrink 64 --tokens 8 --reps 2 --warmup 1 --dispatchers alltoall)
    E_ARGS=("${L_ARGS[@]}" --redundant-experts 2)
  else
    D_ARGS=(--dispatchers alltoall,low_latency,symm_high_throughput,symm_low_latency --tokens 128,4096
            --reps 10 --warmup 3 --timeout 150)
    L_ARGS=(--dispatchers alltoall,symm_high_throughput,symm_low_latency --tokens 128,4096 --reps 10 --warmup 3
            --timeout 170)
    F_ARGS=(--dispatchers symm_high_throughput --tokens 8192 --reps 10 --warmup 3 --timeout 170)
    E_ARGS=(--presets deepseek-v3 --dispatchers symm_high_throughput --tokens 128,4096 --reps 10 --warmup 3
            --redundant-experts 8 --timeout 110)
  fi
  step fair_dispatch_bf16 "${FAIR_DISPATCH_SECONDS:-170}" $PY -m epmoe bench dispatch --ranks 2 "${D_ARGS[@]}" \
      --output "$RES/fair/dispatch_bf16.json"
  step fair_dispatch_fp8 "${FAIR_DISPATCH_SECONDS:-170}" $PY -m epmoe bench dispatch --ranks 2 "${D_ARGS[@]}" --fp8 \
      --output "$RES/fair/dispatch_fp8.json"
  step fair_layer_bf16 "${FAIR_LAYER_SECONDS:-200}" $PY -m epmoe bench layer --ranks 2 --routing balanced \
      --micro-batches 1,2 "${L_ARGS[@]}" --output "$RES/fair/layer_2x_bf16.json"
  step fair_layer_fp8_deepseek "${FAIR_LAYER_SECONDS:-200}" $PY -m epmoe bench layer --ranks 2 --routing balanced \
      --presets deepseek-v3 --formats fp8-dispatch "${F_ARGS[@]}" --output "$RES/fair/layer_2x_fp8_deepseek.json"
  step fair_layer_eplb "${FAIR_EPLB_SECONDS:-120}" $PY -m epmoe bench layer --ranks 2 --routing skewed --no-local \
      "${E_ARGS[@]}" --output "$RES/fair/layer_2x_eplb_skewed.json";;
esac
case " $PARTS " in *" symm "*)         # about 3 minutes
  if cuda_only symm; then
    step symm_check "${SYMM_SECONDS:-400}" env OUT="$RES" $PY benchmarks/gpu_symm_check.py \
        --parts smoke_ll,smoke_ht,graph,suite,variants
  fi;;
esac
case " $PARTS " in *" soak "*)         # 1000 forwards in a row, two layers alternating: about 30 s
  if cuda_only soak; then
    mkdir -p "$RES/soak"
    step soak "${SOAK_SECONDS:-200}" env OUT="$RES/soak" $PY benchmarks/gpu_symm_check.py --parts soak --forwards 500
  fi;;
esac
case " $PARTS " in *" alltoall "*)     # the NCCL alltoall fast path against its PyTorch path and NCCL
  if [ "$SMOKE" = 1 ]; then
    step alltoall_check "${ALLTOALL_SECONDS:-200}" $PY benchmarks/gpu_alltoall_check.py --cpu-smoke --out "$RES/alltoall" \
        --presets qwen3-30b-a3b --formats bf16 --tokens 4 --reps 10 --warmup 1 --no-profile --no-layer
  else
    step alltoall_check "${ALLTOALL_SECONDS:-200}" $PY benchmarks/gpu_alltoall_check.py --out "$RES/alltoall"
  fi;;
esac
case " $PARTS " in *" mismatch "*)     # ranks calling different layers, every pair of kinds, on NCCL
  if cuda_only mismatch; then
    step mismatch_check "${MISMATCH_SECONDS:-330}" $PY benchmarks/gpu_mismatch_check.py --out "$RES/mismatch" --timeout 300
  fi;;
esac
case " $PARTS " in *" tests "*)       # about 240 s on an H200 (90 tests, Triton compiles at real sizes)
  if cuda_only tests; then
    step pytest_gpu "${PYTEST_SECONDS:-260}" $PY -m pytest tests -q -p no:cacheprovider -m "gpu and not multigpu"
  fi;;
esac
case " $PARTS " in *" models "*)      # real-size blocks ~100 s, tiny models after them
  if cuda_only models; then
    step models_check "${MODELS_SECONDS:-400}" $PY benchmarks/gpu_models_check.py --skip-tests --out "$RES/models"
  fi;;
esac
case " $PARTS " in *" overlap "*)     # shared experts under the dispatch, two micro-batches, their graphs
  if [ "$SMOKE" = 1 ]; then
    step overlap_check "${OVERLAP_SECONDS:-200}" $PY benchmarks/gpu_overlap_check.py --cpu-smoke --ranks 2 \
        --tokens 1,5 --reps 2 --warmup 1 --out "$RES/overlap"
  else
    step overlap_check "${OVERLAP_SECONDS:-500}" $PY benchmarks/gpu_overlap_check.py --ranks 2 --timeout 480 \
        --out "$RES/overlap"
  fi;;
esac
bundle
cat "$RES/summary.txt"
[ "$SMOKE" = 1 ] && exit $(( FAILED > 0 ))
exit 0
