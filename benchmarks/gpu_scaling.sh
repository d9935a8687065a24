#!/usr/bin/env bash
# Issue 7: expert parallelism on 2, 4 and 8 GPUs of one host (nvidia-h200-x8; on -x4 the counts up to 4).
#
#   bash benchmarks/gpu_scaling.sh [steps...]        default steps: env nccl dispatch layer scaling
#
# steps
#   env       nvidia-smi, torch/triton/NCCL versions, NVLink topology
#   nccl      the EP correctness suite with NCCL (pytest -m multigpu), one pytest per rank count:
#               2: pytest tests -m multigpu (test_ep_layer's 2-GPU suite + FP8 dispatch + CUDA graph)
#               4, 8: tests/test_ep_eight_ranks.py -m multigpu (every dispatcher x experts backend, FP8
#                     dispatch block/channel, low_latency in CUDA graphs, capacity error on every rank, ...)
#   nccl2 / nccl4 / nccl8   one rank count only
#   dispatch  epmoe bench dispatch (dispatch + combine vs NCCL all_to_all_single) at each rank count
#   layer     epmoe bench layer (whole layer, deepseek-v3 + qwen3-30b-a3b at real sizes, T = 128 and 4096
#             per rank, vs the one-GPU local layer) at each rank count: BF16 first, then FP8 dispatch
#   scaling   python -m epmoe.bench.scaling over every JSON so far -> table (md) + plot (png)
#
# Environment: RANKS ("2 4 8": those above the GPU count are dropped), BUDGET_S (570: the whole call
# stops its steps before this many seconds, under the device tool's 600 s per command), per-step caps
# NCCL2_S NCCL4_S NCCL8_S DISPATCH_S LAYER_S (seconds; a step gets min(cap, what is left)), REPS (10),
# WARMUP (3), LAYER_FORMATS ("bf16 fp8-dispatch"), LAYER_ARGS / DISPATCH_ARGS (extra arguments),
# NCCL_SKIP_EXPERTS (e.g. "triton": left out of the 4/8-GPU suites; its kernels have their own GPU tests).
#
# CPU_DRY=1: the same steps on this machine's CPUs (Gloo ranks, tiny shapes, the Gloo twins of the NCCL
# suites) to check the script itself; those times are not results.
#
# Output, in $OUT (at most 8 files come back from the device tool): summary.txt (steps, exit codes,
# times, pytest summaries, the benchmark tables), results.tar.gz (every JSON, the partial JSONL of a
# benchmark cut off by a timeout, every log; rebuilt after each step, so a call killed at its time
# limit still returns what finished), scaling_*.md and scaling_*.png when the scaling step ran.
# Raw files are kept in $WORK (default /tmp/epmoe_scaling) across calls on a warm machine, so a later
# call's scaling step sees the JSONs of earlier calls of the same code (same source digest; others are dropped).
#
# Suggested calls on nvidia-h200-x8 (30 min of device time in all, 10 min per call):
#   1. bash benchmarks/gpu_scaling.sh env nccl                  (correctness at 2, 4, 8)
#   2. bash benchmarks/gpu_scaling.sh dispatch layer scaling    (timing at 2, 4, 8 + table + plot)
# then unpack results.tar.gz into benchmarks/results/ (JSONs) and rerun the scaling step there if needed:
#   python -m epmoe.bench.scaling benchmarks/results --out-dir benchmarks/results
set -u
set -o pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1   # NVLink multicast off
export PYTHONUNBUFFERED=1 PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-./out}
WORK=${WORK:-/tmp/epmoe_scaling}
# raw files of another code's calls (a machine reused by a later session keeps /tmp) would join this code's scaling
# table: $WORK is kept across calls only while the source digest stays the same; otherwise its files are dropped
SOURCE=$(python3 -c 'from epmoe.bench.run_env import source_digest; print(source_digest())' 2>/dev/null || echo unknown)
if [ -d "$WORK/json" ] && [ "$(cat "$WORK/source_sha256" 2>/dev/null)" != "$SOURCE" ]; then
  echo "dropped $WORK's files: they came from other code (source_sha256 $(cat "$WORK/source_sha256" 2>/dev/null || echo unrecorded))"
  rm -rf "$WORK/logs" "$WORK/json" "$WORK"/summary.txt "$WORK"/scaling_*
fi
mkdir -p "$OUT" "$WORK/logs" "$WORK/json"
echo "$SOURCE" > "$WORK/source_sha256"
SUMMARY="$WORK/summary.txt"
START=$(date +%s)
BUDGET_S=${BUDGET_S:-570}
REPS=${REPS:-10}
WARMUP=${WARMUP:-3}
STEPS=${*:-env nccl dispatch layer scaling}

GPUS=$(python3 -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
DRY=${CPU_DRY:-0}
DRY_DISPATCH="" DRY_LAYER=""
if [ "$DRY" = 1 ]; then   # the plumbing on CPUs: Gloo ranks, tiny shapes, the Gloo twins of the NCCL suites
  GPUS=64
  DRY_DISPATCH="--comm gloo --hidden 64 --experts 16 --top-k 4 --tokens 4,16"
  DRY_LAYER="--device cpu --experts 16 --shrink 64 --tokens 4,16"
fi
RANK_COUNTS=""
for n in ${RANKS:-2 4 8}; do
  if [ "$n" -le "$GPUS" ]; then RANK_COUNTS="$RANK_COUNTS $n"; fi
done
RANK_COUNTS=${RANK_COUNTS# }

note() { echo "$*" | tee -a "$SUMMARY"; }

bundle() {   # everything raw -> one tar in $OUT, plus the summary and the scaling table/plot
  tar -czf "$OUT/results.tar.gz.tmp" -C "$WORK" . 2>/dev/null && mv "$OUT/results.tar.gz.tmp" "$OUT/results.tar.gz"
  cp "$SUMMARY" "$OUT/summary.txt"
  for f in "$WORK"/scaling_*.md "$WORK"/scaling_*.png; do
    [ -e "$f" ] && cp "$f" "$OUT/"
  done
  true
}

RESERVE=0   # seconds kept back for the scaling step (cheap, and what the call is for) when it is asked for
case " $STEPS " in *" scaling "*) RESERVE=30 ;; esac
left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }
limit() { local b=$(( $(left) - 10 - RESERVE )); [ "$1" -lt "$b" ] && b=$1; echo "$b"; }   # a step's cap
inner() { local b; b=$(limit "$1"); echo $(( b > 50 ? b - 20 : 30 )); }         # its ranks' own timeout

# run NAME CAP COMMAND...: the command under `timeout` (its whole process group, ranks included) for
# min(CAP, what is left of the budget - 10 s), output to logs/NAME.log; exit code and time to the summary
run() {
  local name=$1 cap=$2
  shift 2
  local budget
  budget=$(limit "$cap")
  if [ "$budget" -lt 30 ]; then
    note "[$name] not run: ${budget}s left of BUDGET_S=$BUDGET_S"
    return 0
  fi
  local t0=$(date +%s)
  note "[$name] start (limit ${budget}s): $*"
  timeout -k 15 "$budget" "$@" > "$WORK/logs/$name.log" 2>&1
  local rc=$?
  local what="rc=$rc"
  [ $rc -eq 124 ] || [ $rc -eq 137 ] && what="rc=$rc (TIMED OUT after ${budget}s)"
  note "[$name] $what in $(( $(date +%s) - t0 ))s"
  bundle
  return 0
}

pytest_tail() { grep -E "passed|failed|error|FAILED|ERROR" "$WORK/logs/$1.log" | tail -n "${2:-15}" | tee -a "$SUMMARY"; }

WHAT="$GPUS GPUs"
[ "$DRY" = 1 ] && WHAT="CPU dry run (Gloo ranks, tiny shapes: not results)"
note "== gpu_scaling.sh $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname): $WHAT, rank counts: ${RANK_COUNTS:-none}; steps: $STEPS"
if [ -z "$RANK_COUNTS" ]; then
  note "no rank count fits $GPUS GPUs (RANKS=${RANKS:-2 4 8}); nothing to run"
  bundle
  exit 2
fi

has() { case " $RANK_COUNTS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

nccl_step() {   # nccl_step N CAP
  local n=$1 cap=$2
  has "$n" || { note "[nccl$n] skipped: needs $n GPUs"; return 0; }
  if [ "$DRY" = 1 ]; then
    local sel=(tests/test_ep_eight_ranks.py)
    [ "$n" -eq 2 ] && sel=(tests/test_ep_layer.py -k two_ranks)
    [ "$n" -eq 4 ] && sel=(tests/test_ep_layer.py -k four_ranks)
    run "nccl$n" "$cap" python3 -m pytest "${sel[@]}" -q -rfE -p no:cacheprovider
  elif [ "$n" -eq 2 ]; then
    run nccl2 "$cap" env EPMOE_NCCL_RANKS=2 EPMOE_NCCL_SKIP_EXPERTS="${NCCL_SKIP_EXPERTS:-}" \
      python3 -m pytest tests -m multigpu -q -rfE -p no:cacheprovider
  else
    # the ranks' own timeout stays under the step's, so a hang is reported as such, not killed silently
    run "nccl$n" "$cap" env EPMOE_NCCL_RANKS="$n" EPMOE_NCCL_SKIP_EXPERTS="${NCCL_SKIP_EXPERTS:-}" \
      EPMOE_NCCL_TIMEOUT="$(inner "$cap")" \
      python3 -m pytest tests/test_ep_eight_ranks.py -m multigpu -q -rfE -p no:cacheprovider
  fi
  pytest_tail "nccl$n" 12
}

for step in $STEPS; do
  case $step in
    env)
      { nvidia-smi -L; nvidia-smi topo -m; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
        python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'nccl', torch.cuda.nccl.version())"
        env | grep -E "NCCL_NVLS_ENABLE|TORCH_SYMM_MEM_DISABLE_MULTICAST|NVSHMEM_DISABLE_NVLS"
      } > "$WORK/logs/env.log" 2>&1
      head -n 12 "$WORK/logs/env.log" | tee -a "$SUMMARY"
      bundle ;;
    nccl)   nccl_step 2 "${NCCL2_S:-200}"; nccl_step 4 "${NCCL4_S:-200}"; nccl_step 8 "${NCCL8_S:-300}" ;;
    nccl2)  nccl_step 2 "${NCCL2_S:-200}" ;;
    nccl4)  nccl_step 4 "${NCCL4_S:-200}" ;;
    nccl8)  nccl_step 8 "${NCCL8_S:-300}" ;;
    dispatch)
      for n in $RANK_COUNTS; do
        run "dispatch_${n}x" "${DISPATCH_S:-120}" python3 -m epmoe bench dispatch --ranks "$n" --reps "$REPS" \
          --warmup "$WARMUP" --timeout "$(inner "${DISPATCH_S:-120}")" --output "$WORK/json/dispatch_${n}x_$(date -u +%Y%m%d-%H%M%S).json" $DRY_DISPATCH ${DISPATCH_ARGS:-}
        sed -n '/^dispatcher /,$p' "$WORK/logs/dispatch_${n}x.log" | tee -a "$SUMMARY"
      done ;;
    layer)
      # BF16 at every rank count first (the scaling result), then FP8 dispatch; one JSON per count and format
      for fmt in ${LAYER_FORMATS:-bf16 fp8-dispatch}; do
        for n in $RANK_COUNTS; do
          run "layer_${fmt}_${n}x" "${LAYER_S:-240}" python3 -m epmoe bench layer --ranks "$n" --formats "$fmt" \
            --reps "$REPS" --warmup "$WARMUP" --timeout "$(inner "${LAYER_S:-240}")" \
            --output "$WORK/json/layer_${fmt}_${n}x_$(date -u +%Y%m%d-%H%M%S).json" $DRY_LAYER ${LAYER_ARGS:-}
          sed -n '/^# whole-layer forward/,$p' "$WORK/logs/layer_${fmt}_${n}x.log" | tee -a "$SUMMARY"
          grep -E "^FAILED|ERROR|Traceback" "$WORK/logs/layer_${fmt}_${n}x.log" | head -n 20 | tee -a "$SUMMARY"
        done
      done ;;
    scaling)
      RESERVE=0
      run scaling 120 python3 -m epmoe.bench.scaling "$WORK/json" --out-dir "$WORK" \
        --stem "scaling_$(echo "$RANK_COUNTS" | tr ' ' '-')gpus"
      cat "$WORK/logs/scaling.log" | tee -a "$SUMMARY"
      bundle ;;
    *) note "unknown step $step (env nccl nccl2 nccl4 nccl8 dispatch layer scaling)" ;;
  esac
done
note "== done in $(( $(date +%s) - START ))s; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
bundle
