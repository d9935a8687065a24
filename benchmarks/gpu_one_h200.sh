#!/usr/bin/env bash
# One device call on one H100 or H200 (the file names say which), under 10 minutes, in parts (PARTS, in this order):
#   tests     every single-GPU test (pytest -m "gpu and not multigpu"; TESTS: fewer, files and words split on spaces;
#             TESTS_K: a pytest -k expression, passed whole, e.g. "not real_size"; TESTS_SECONDS: its limit, default
#             540: the 160 tests of 9847dd5 took 413 s, past the 300 it had; the 181 of 302e423 did not finish in 570 s
#             on a fresh H100, 180 done: split them, TESTS=tests/test_triton_gpu.py in one call and the other files in
#             the next), each test named as it ends (-v), so a run cut by its limit says which passed (the order and
#             count on a GPU differ from a CPU's collection); a run that ends lists its 30 slowest tests
#   crossover where `triton_ws` crosses `triton` in block FP8 below the prefill targets (deepseek-v3 32-expert
#             shard T = 512-4096, mixtral T = 256-4096; epmoe bench experts, the two backends only)
#   ws        the block-FP8 experts at the prefill targets (deepseek-v3 32-expert shard T = 4096, 8192;
#             mixtral T = 8192), `triton` beside `triton_ws` only, oracle-checked (epmoe bench experts);
#             WS_FORMATS (e.g. bf16,fp8_block) and WS_ANCHORS (e.g. grouped_mm) name others
#   tune      epmoe tune of TUNE_ARGS (default: the deepseek-v3 32-expert shard in BF16 at T = 4096 and 8192,
#             the shape the table has no BF16 entry for; "shadowed": the batch sizes `epmoe tune --audit` says
#             this GPU's table hides from the family's other tables, a set a shape; several argument sets
#             separated by ';' run one after
#             the other into one log) into this GPU's table in the package, so the parts after it run with
#             the new entries; the table before and after are kept (the new entries live in this call's copy only:
#             a later call runs the table of the checkout it is sent from, so merge table_*_after_tune.json first,
#             or send several calls from one commit and merge their tables after them with
#             benchmarks/merge_tune_tables.py, which refuses an entry two calls changed; the tuner writes each T
#             as it is decided, so a part cut by its limit keeps the batch sizes it finished); until the commit
#             that added epmoe/kernels/jit_keys.py the timing process compiled every candidate again (Triton 3.6 keyed
#             the GEMM otherwise there); on an H200 then: the deepseek-v3 shard at T = 512, 16 and 1, 322 compiles
#             in 21 s and 444 candidates timed in 3 min 32 s (4 min 05 s the whole set); mixtral at T = 1, 16, 128 and
#             1024, 450 in 26 s and 674 in 4 min 21 s; the qwen3 16-expert shard at T = 1, 126 in 9 s and 126 in
#             48 s, at T = 128, 264 in 17 s and 230 in 2 min 22 s; since: on an H100 at 8812baf, the
#             qwen3 shard at T = 1, 126 in 10 s and 126 in 3 s (every GEMM of the timing process from the cache);
#             TUNE_PROFILE=1: each set under cProfile, its 25 costliest functions by own time and 40 by time with
#             what they called in the log, and the profile kept; TUNE_COMPILE_LOG=1: every Triton compile of the
#             workers and the timing process, with its cache key's parts, in tune_compile_log_*.jsonl (--compile-log)
#   gluon_tune  epmoe tune --gluon: the table's block-FP8 and BF16 entries of the deepseek-v3 32-expert shard
#             (T = 4096, 8192), mixtral (T = 1024, 8192) and deepseek-v3, gpt-oss-120b and qwen3-30b-a3b (T = 8192)
#             timed end to end against `triton_ws`'s pipeline, as
#             the `triton` experts run both; entries where the Gluon GEMMs win by more than 2% say `gluon`
#             (GLUON_TUNE_FORMATS: the formats, default fp8_block,bf16; GLUON_TUNE_SETS: which of the three
#             lines, default "shard mixtral wide", and "audit": each shape with entries `epmoe tune --audit` names on
#             this GPU's table, at those T and in their format, whatever GLUON_TUNE_FORMATS says; GLUON_TUNE_EXTRA:
#             more arguments of every one of those tunes, e.g. --follow);
#             into this GPU's table in the package (before and after kept, as for tune)
#   probe     benchmarks/ws_probe.py: a persistent grouped GEMM with TMA-loaded operands, warp
#             specialization off and on, beside the library's kernels
#   gluon     benchmarks/gluon_gemm_probe.py: the warp-specialized Gluon grouped GEMM
#             (epmoe/kernels/ws_grouped_gemm.py) checked on awkward shapes in a child process with a time
#             limit (a hang costs that limit, not the call), then timed beside the library's kernels (a call
#             of its own: 540 s by default; GLUON_ARGS: more arguments, e.g. --only scale_tma)
#   ncu       where the Gluon GEMM's warps stall, per SASS instruction: ncu's source counters of the
#             block-FP8 gate+up and down of the deepseek-v3 shard at T = 8192 as its experts launch them (no
#             bias, the kernel's own ring size; benchmarks/profile_ws_gemm.py),
#             the source page as CSV and its summary (benchmarks/ncu_source_summary.py), and the throughput
#             sections (speed of light, compute and memory workload); NCU_ARGS: more arguments of the script,
#             e.g. --formats bf16 --down-block-n auto,256
#   widths    the Gluon GEMMs alone at each down-GEMM width (benchmarks/profile_ws_gemm.py without ncu: the deepseek-v3
#             32-expert shard and mixtral at T = 8192, BF16 and block FP8, gate+up, down 128 and 256 columns wide
#             (the experts launch BF16 128, FP8 256), BF16 tiles of 256 with and without the wide product;
#             do_bench medians, two tiles of each checked)
#   diagnostics  what bounds the Gluon GEMMs: each in its diagnostic forms (benchmarks/profile_ws_gemm.py
#             --diagnostic none,no_loads,no_math,no_promote: the kernel as the experts run it; without the loads after
#             the ring's first round; without the math; FP8 without its promotion), gate+up and down, BF16 and block
#             FP8, T = 8192: do_bench at the deepseek-v3 32-expert shard and mixtral, then ncu's throughput, compute,
#             memory and warp-state sections at the shard (DIAG_ARGS: more arguments of that run, e.g. --walk
#             fixed,experts) and the table of its kernels (benchmarks/ncu_details_table.py), appended to its log
#   groups    the Gluon GEMMs with the persistent walk in groups of 4 and 8 m-tiles and in groups cut at expert
#             edges of up to 4 and 8 (as the experts launch them: 8) (benchmarks/profile_ws_gemm.py --group-m 4,8
#             --walk fixed,experts), gate+up and down, BF16 and block FP8, T = 8192: deepseek-v3 (256 experts),
#             gpt-oss-120b and the deepseek-v3 32-expert shard (GROUPS_ARGS: other arguments of the script)
#   gather    the Gluon gate+up reading the token rows where they are (the cp.async row gather, `a_rows`) beside the
#             copy into layout order plus the TMA-loaded gate+up the backends run (benchmarks/profile_ws_gemm.py
#             --gather off,on, the copy timed too), BF16 and block FP8, T = 8192: the deepseek-v3 32-expert shard,
#             mixtral-8x7b and deepseek-v3 (GATHER_ARGS: other arguments of the script)
#   walk      the walk's groups cut at expert edges built by one Triton program beside the PyTorch form
#             (benchmarks/walk_groups_probe.py: deepseek-v3 and gpt-oss-120b tiles at T = 4096, 8192; timed, compared)
#   steps     where a whole experts forward spends its GPU time, kernel by kernel (the GEMMs against the
#             layout, row copy, quantization and slot sum around them): benchmarks/profile_experts_steps.py,
#             `triton` and `triton_ws`, block FP8 and BF16, the deepseek-v3 32-expert shard T = 4096, 8192 and
#             mixtral T = 8192, each forward oracle-checked (STEPS_ARGS: more arguments, e.g. --formats fp8_block)
#   decode    the `triton` experts at decode beside the time to read the same weight bytes (benchmarks/decode_probe.py:
#             block FP8, mixtral-8x7b, deepseek-v3, gpt-oss-120b at T = 1 and 16; DECODE_ARGS: its arguments, e.g.
#             --configs benchmarks/decode_fp8_variants.json; DECODE_TAG: a suffix of its file names), then, where
#             DECODE_NCU_SHAPE names one (e.g. mixtral-8x7b:1), ncu's throughput, occupancy and warp-state sections
#             of the two GEMM launches of one forward there (DECODE_NCU_LAUNCHES: more launches, e.g. 6 for two shapes: the
#             first forward of the first shape is skipped)
#   experts   the experts side by side at the prefill targets and the decode points (epmoe bench experts:
#             triton beside torch._grouped_mm, _scaled_grouped_mm and dense block-FP8 scaled_mm, oracle-checked;
#             each entry at T >= 1024 settled for 1 s first, the benchmark's default on a GPU; EXPERTS_ARGS: more
#             arguments, e.g. --settle-ms 0 to time unsettled)
#   vllm      our block-FP8 expert GEMMs beside vLLM's fused-MoE Triton kernel at the same rows and weights, kernel
#             time against kernel time (benchmarks/vllm_gemms.py; vLLM's fused-MoE folder unpacked from its wheel
#             under VLLM_DIR, default .anchors/vllm-0.34.0/..., sent with the call by the device tool's carry;
#             VLLM_ARGS: more arguments, e.g. --shapes); where VLLM_NCU_SHAPE names one point (e.g.
#             qwen3-30b-a3b:16:128), then ncu's throughput, occupancy and warp-state sections of both sides' GEMM
#             launches there (vllm_gemms.py --once: the Gluon GEMM's self-check first where the table has a
#             Gluon entry for the shape, then our forward's, then vLLM's two; with it give VLLM_ARGS a few
#             --shapes: VLLM_SECONDS and VLLM_NCU_SECONDS at their defaults pass a call's 600 s; VLLM_NCU_ARGS:
#             more ncu arguments, e.g. --section MemoryWorkloadAnalysis_Tables)
#   batched   the `batched` experts (the low_latency dispatcher's layout) at decode, T = 1, 16, 128, BF16 and block FP8:
#             the deepseek-v3 32-expert shard and mixtral-8x7b, on the tightest layout (the largest count, `triton`
#             beside it) and on the capacities low_latency gives (C = ranks x max_tokens_per_rank; BATCHED_DS32_C,
#             default 128,1024: 8 ranks at M = 128 give 1024, and 128 is one rank at M = 128 or 8 at M = 16 (there
#             T <= 16 only); BATCHED_MIXTRAL_C, default 128: one rank at M = 128),
#             padding rows NaN, every row oracle-checked (epmoe bench experts --batched-capacity)
#   wide      the ratio targets at T = 8192 the experts part leaves out: deepseek-v3 (all 256 experts) and gpt-oss-120b,
#             BF16 and block FP8, beside torch._grouped_mm (epmoe bench experts; WIDE_FORMATS, WIDE_BACKENDS: fewer)
#   layout    the copy of the token rows into the Gluon GEMMs' layout in both orders (by pairs, the default, and
#             by layout rows): benchmarks/layout_copy_probe.py times and checks them, then ncu counts each
#             kernel's DRAM bytes read and written
#   ab        one kernel file before and after a change, timed in the same call: the tree is copied, AB_FILE in the
#             copy replaced by AB_OLD (a copy of the old file sent with the tree, untracked; or AB_OLD a folder of old
#             files at their paths in the tree, each copied over the copy, no AB_FILE), then AB_CMD runs
#             in the copy, in the tree sent, and in the copy again (before, after, before: drift shows), with
#             AB_SIDE (before, after, before_again) and AB_OUT (this folder) set for the files it writes; the before
#             sides' EPMOE_COMMIT says the commit with old files (their results' `commit`; the log names the files)
#   rebalance what an EPLB rebalance costs on one GPU (benchmarks/gpu_rebalance_cost.py)
#   overlap   shared experts under the dispatch and two micro-batches, eager and graph
#             (benchmarks/gpu_overlap_check.py, where it exists)
#   memory    torch.cuda.memory_allocated over 1000 forwards of random sizes, every dispatcher that runs on
#             one GPU (benchmarks/gpu_memory_check.py)
#   deepgemm  DeepGEMM's grouped contiguous GEMMs beside ours (benchmarks/deepgemm_probe.py), from wheels sent with
#             the call by the device tool's carry (DEEPGEMM_WHEELS, default .anchors/sgl_deep_gemm-0.1.7-*.whl and
#             .anchors/apache_tvm_ffi-0.1.11-*.whl, the tvm-ffi 0.1.7 asks for; PyPI's sgl-deep-gemm 0.2.x needs a
#             c10 symbol torch 2.11 lacks) installed without their dependencies into a folder of this call only,
#             CUDA_HOME defaulting to /usr/local/cuda for its kernels' compiles; DEEPGEMM_SRC (a folder of DeepGEMM's
#             sources, e.g. .anchors/deepgemm_src: deep_gemm/, csrc/, third-party/fmt/include and SOURCE naming their
#             commits) first replaces the wheel's package with them, keeping its CUTLASS headers, and compiles the
#             module against this torch (benchmarks/deepgemm_build.py): the wheel's own module fails its own
#             dimension check on 2-D and 3-D tensors under torch 2.11; DEEPGEMM_STEPS (shapes as
#             profile_experts_steps.py takes them, e.g. deepseek-v3:32:8192,mixtral-8x7b::8192): then the
#             experts forward with DeepGEMM's GEMMs (benchmarks/deepgemm_experts.py) beside triton_ws, kernel by
#             kernel, each oracle-checked (the build takes 77 s on an H100: give DEEPGEMM_SECONDS=560 with steps);
#             DEEPGEMM_NCU (deepgemm_probe.py's shape names, e.g. "ds32 T=8192 gate_up"): instead of the probe and
#             the steps, ncu's throughput, compute, memory, warp-state, occupancy and launch sections of those
#             DeepGEMM calls, then of ours (profile_ws_gemm.py with DEEPGEMM_NCU_OURS, shell words run through eval:
#             quote a shape with spaces; default --shape "deepseek-v3 shard 32" --tokens 8192, its gate+up and down
#             launches), into deepgemm_ncu_<GPU>_<day>.log; with DEEPGEMM_NO_MULTICAST=1 (and DEEPGEMM_SRC) then
#             the same DeepGEMM calls again from a second build of the sources whose SM90 heuristic is patched to
#             disable multicast (clusters of one: what DeepGEMM's kernel does without TMA multicast; two builds,
#             give DEEPGEMM_SECONDS=560)
# Each log is written whole, headed by the command, the commit, the GPU, the torch/triton versions and the
# date, with the JSON results beside it in $OUT/gpu_one_h200/; after every part that folder is bundled
# into $OUT/gpu_one_h200.tar.gz (a device call brings back at most 8 files; a call cut off keeps the
# parts that finished).
#   COMMIT=<sha of the tree sent> PARTS="tests experts" bash benchmarks/gpu_one_h200.sh
# Each part's time limit: <PART>_SECONDS; TESTS: the test files (default: all of tests/); ONLY_ON=H200 (or H100): the
# parts run only on that GPU, elsewhere nothing runs (exit 3).
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 PYTHONPATH=.
BUNDLE=${OUT:-./out}
export OUT=$BUNDLE/gpu_one_h200     # the scripts the parts start write there too
mkdir -p "$OUT"
# what another call left here, found on a reused machine (H100 logs of an earlier session came back from a fresh
# H200 call on 2026-12-06): files older than a call can last (10 minutes) are dropped, each named, so nothing
# another call measured comes back as this call's
find "$BUNDLE" -maxdepth 1 -name gpu_one_h200.tar.gz -mmin +10 -printf 'dropped from an earlier call: %p\n' -delete
[ -d "$OUT" ] && find "$OUT" -type f -mmin +10 -printf 'dropped from an earlier call: %p\n' -delete
# a bundle an earlier run of this script left in the same call: its files go on in this one (each run removes
# its folder at the end, keeping only the bundle)
if [ -f "$BUNDLE/gpu_one_h200.tar.gz" ]; then tar -C "$BUNDLE" -xzf "$BUNDLE/gpu_one_h200.tar.gz"; fi
# the commit: give it as a literal (COMMIT=<sha> in the command as sent: a $(git rev-parse HEAD) there runs on the
# device, whose copy of .git may be older than the tree it was sent); where git's HEAD is used and tracked files
# differ from it, the header says so, and the source digest beside it names the code that ran either way
if [ -z "${COMMIT:-}" ]; then
    COMMIT=$(git rev-parse HEAD 2>/dev/null || echo unknown)
    if [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]; then
        COMMIT="$COMMIT (tracked files differ from it: see source_sha256)"
    fi
fi
export EPMOE_COMMIT=$COMMIT
DAY=$(date -u +%F)
# the GPU in the file names (a call for one GPU may land on an H100 or an H200; the logs' headers name it whole)
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | grep -o 'H[0-9]00' || echo GPU)
PARTS=${PARTS:-"tests experts rebalance overlap memory"}
# ONLY_ON=H200 (or H100): run the parts only on that GPU; on another the script says so and stops (exit 3) before
# any part runs (a call for one GPU may land on an H100 or an H200, and work for one GPU's table is no use on the
# other: the call then costs its machine's start only)
if [ -n "${ONLY_ON:-}" ] && [ "$GPU" != "$ONLY_ON" ]; then
    echo "ONLY_ON=$ONLY_ON, and this GPU is $(nvidia-smi --query-gpu=name --format=csv,noheader 2>&1 | head -1): no part run"
    rm -rf "$OUT"
    exit 3
fi

# header COMMAND...: the lines that head every file this script writes (what made it, from which code, where)
header() {
    echo "# command: $(printf '%q ' "$@")"
    echo "# commit: $COMMIT"
    echo "# source_sha256: $(python3 -c 'from epmoe.bench.run_env import source_digest; print(source_digest())' 2>&1)"
    echo "# gpu: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>&1 | head -1)"
    echo "# $(python3 -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)' 2>&1)"
    echo "# date: $(date -u +%FT%TZ)"
}

# run LOG TIMEOUT_S COMMAND...: the command's output, whole, under a header saying what made it
run() {
    local log=$1 limit=$2; shift 2
    {
        header "$@"
        timeout "$limit" "$@" 2>&1
        echo "# exit code: $?"
    } > "$log"
    tail -4 "$log"
}
# profile_shapes LOG LIMIT "SHAPE|SHAPE..." ARGS...: benchmarks/profile_ws_gemm.py at T = 8192 for each shape with
# ARGS, under one header; fails if any shape does
profile_shapes() {
    local log=$1 limit=$2 shapes=$3; shift 3
    run "$log" "$limit" bash -c '
        status=0; IFS="|"
        for shape in $0; do
            python3 benchmarks/profile_ws_gemm.py --shape "$shape" --tokens 8192 "$@" || status=1
        done
        exit $status' "$shapes" "$@"
}

for part in $PARTS; do
    echo "== $part"
    case $part in
    tests)
        select=(); [ -n "${TESTS_K:-}" ] && select=(-k "$TESTS_K")     # one expression, spaces and all
        run "$OUT/pytest_gpu_${GPU}_$DAY.txt" "${TESTS_SECONDS:-540}" \
            python3 -m pytest ${TESTS:-tests} ${select[@]+"${select[@]}"} -v -p no:cacheprovider --durations=30 -m "gpu and not multigpu" ;;
    experts)
        run "$OUT/experts_${GPU}_$DAY.log" "${EXPERTS_SECONDS:-300}" bash -c "
            python3 -m epmoe bench experts -q --no-plot --presets deepseek-v3 --experts 32 --tokens 4096,8192 \
                --routings balanced --formats bf16,fp8_block ${EXPERTS_ARGS:-} --output $OUT/experts_ds32_${GPU}_$DAY.json &&
            python3 -m epmoe bench experts -q --no-plot --presets mixtral-8x7b --tokens 1,16,8192 --routings balanced \
                --formats bf16,fp8_block,fp8_channel ${EXPERTS_ARGS:-} --output $OUT/experts_mixtral_${GPU}_$DAY.json &&
            python3 -m epmoe bench experts -q --no-plot --presets deepseek-v3,gpt-oss-120b --tokens 1,16 \
                --routings balanced --formats bf16,fp8_block --anchors none ${EXPERTS_ARGS:-} --output $OUT/experts_decode_${GPU}_$DAY.json" ;;
    batched)
        run "$OUT/experts_batched_${GPU}_$DAY.log" "${BATCHED_SECONDS:-300}" bash -c "
            python3 -m epmoe bench experts -q --no-plot --tokens 1,16,128 --routings balanced --formats bf16,fp8_block \
                --anchors none --presets deepseek-v3 --experts 32 --backends batched,triton \
                --batched-capacity tight,${BATCHED_DS32_C:-128,1024} --output $OUT/experts_batched_ds32_${GPU}_$DAY.json &&
            python3 -m epmoe bench experts -q --no-plot --tokens 1,16,128 --routings balanced --formats bf16,fp8_block \
                --anchors none --presets mixtral-8x7b --backends batched,triton \
                --batched-capacity tight,${BATCHED_MIXTRAL_C:-128} --output $OUT/experts_batched_mixtral_${GPU}_$DAY.json" ;;
    wide)
        run "$OUT/experts_wide_${GPU}_$DAY.log" "${WIDE_SECONDS:-200}" \
            python3 -m epmoe bench experts -q --no-plot --presets deepseek-v3,gpt-oss-120b --tokens 8192 \
                --routings balanced --formats ${WIDE_FORMATS:-bf16,fp8_block} --anchors grouped_mm \
                ${WIDE_BACKENDS:+--backends $WIDE_BACKENDS} --output "$OUT/experts_wide_${GPU}_$DAY.json" ;;
    decode)
        run "$OUT/decode_${GPU}_$DAY${DECODE_TAG:-}.log" "${DECODE_SECONDS:-240}" bash -c "
            python3 benchmarks/decode_probe.py ${DECODE_ARGS:-} --output $OUT/decode_${GPU}_$DAY${DECODE_TAG:-}.json
            if [ -n '${DECODE_NCU_SHAPE:-}' ]; then
                ncu --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
                    --section MemoryWorkloadAnalysis -k regex:'^(moe_gemm_kernel|gemv_gate_up_kernel|gemv_down_sum_kernel)$' --launch-skip 2 --launch-count ${DECODE_NCU_LAUNCHES:-2} \
                    python3 benchmarks/decode_probe.py --once --shapes ${DECODE_NCU_SHAPE:-} ${DECODE_NCU_ARGS:-}
            fi" ;;
    layout)
        run "$OUT/layout_copy_${GPU}_$DAY.log" "${LAYOUT_SECONDS:-150}" bash -c "
            python3 benchmarks/layout_copy_probe.py --output $OUT/layout_copy_${GPU}_$DAY.json
            ncu --metrics dram__bytes_read.sum,dram__bytes_write.sum,gpu__time_duration.sum,lts__t_sector_hit_rate.pct \
                -k regex:to_layout python3 benchmarks/layout_copy_probe.py --once" ;;
    crossover)
        run "$OUT/experts_crossover_${GPU}_$DAY.log" "${CROSSOVER_SECONDS:-220}" bash -c "
            python3 -m epmoe bench experts -q --no-plot --presets deepseek-v3 --experts 32 --tokens 512,1024,2048,4096 \
                --routings balanced --formats fp8_block --anchors none --backends triton,triton_ws \
                --output $OUT/experts_crossover_ds32_${GPU}_$DAY.json &&
            python3 -m epmoe bench experts -q --no-plot --presets mixtral-8x7b --tokens 256,1024,2048,4096 \
                --routings balanced --formats fp8_block --anchors none --backends triton,triton_ws \
                --output $OUT/experts_crossover_mixtral_${GPU}_$DAY.json" ;;
    ws)
        run "$OUT/experts_ws_${GPU}_$DAY.log" "${WS_SECONDS:-170}" bash -c "
            python3 -m epmoe bench experts -q --no-plot --presets deepseek-v3 --experts 32 --tokens 4096,8192 \
                --routings balanced --formats ${WS_FORMATS:-fp8_block} --anchors ${WS_ANCHORS:-none} \
                --backends triton,triton_ws --output $OUT/experts_ws_ds32_${GPU}_$DAY.json &&
            python3 -m epmoe bench experts -q --no-plot --presets mixtral-8x7b --tokens 8192 \
                --routings balanced --formats ${WS_FORMATS:-fp8_block} --anchors ${WS_ANCHORS:-none} \
                --backends triton,triton_ws --output $OUT/experts_ws_mixtral_${GPU}_$DAY.json" ;;
    widths)
        profile_shapes "$OUT/gemm_widths_${GPU}_$DAY.log" "${WIDTHS_SECONDS:-240}" "deepseek-v3 shard 32|mixtral-8x7b" \
            --formats bf16,fp8 --down-block-n 128,256 --wide-mma off,on ;;
    diagnostics)
        profile_shapes "$OUT/gemm_diagnostics_${GPU}_$DAY.log" "${DIAG_SECONDS:-300}" "deepseek-v3 shard 32|mixtral-8x7b" \
            --formats fp8,bf16 --diagnostic none,no_loads,no_math,no_promote
        log="$OUT/ncu_diagnostics_${GPU}_$DAY.log"
        run "$log" "${DIAG_NCU_SECONDS:-240}" bash -c "
            ncu --clock-control none --nvtx --nvtx-include profiled/ --section SpeedOfLight \
                --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis --section WarpStateStats \
                python3 benchmarks/profile_ws_gemm.py --shape 'deepseek-v3 shard 32' --tokens 8192 --formats fp8,bf16 \
                --diagnostic none,no_loads,no_math,no_promote ${DIAG_ARGS:-}"
        { echo "## the profiled kernels (benchmarks/ncu_details_table.py)"; python3 benchmarks/ncu_details_table.py "$log"; } \
            >> "$log" 2>&1 ;;
    groups)
        profile_shapes "$OUT/walk_groups_${GPU}_$DAY.log" "${GROUPS_SECONDS:-240}" \
            "deepseek-v3|gpt-oss-120b|deepseek-v3 shard 32" --formats bf16,fp8 ${GROUPS_ARGS:---group-m 4,8 --walk fixed,experts} ;;
    gather)
        profile_shapes "$OUT/gather_${GPU}_$DAY.log" "${GATHER_SECONDS:-240}" \
            "deepseek-v3 shard 32|mixtral-8x7b|deepseek-v3" --formats bf16,fp8 --gather off,on ${GATHER_ARGS:-} ;;
    walk)
        run "$OUT/walk_groups_build_${GPU}_$DAY.log" "${WALK_SECONDS:-120}" \
            python3 benchmarks/walk_groups_probe.py --output "$OUT/walk_groups_build_${GPU}_$DAY.json" ;;
    vllm)
        run "$OUT/vllm_gemms_${GPU}_$DAY.log" "${VLLM_SECONDS:-420}" \
            python3 benchmarks/vllm_gemms.py --vllm "${VLLM_DIR:-.anchors/vllm-0.34.0/vllm/model_executor/layers/fused_moe}" \
            ${VLLM_ARGS:-} --output "$OUT/vllm_gemms_${GPU}_$DAY.json"
        if [ -n "${VLLM_NCU_SHAPE:-}" ]; then
            run "$OUT/vllm_gemms_ncu_${GPU}_$DAY.log" "${VLLM_NCU_SECONDS:-180}" \
                ncu --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
                    --section MemoryWorkloadAnalysis ${VLLM_NCU_ARGS:-} \
                    -k regex:'^(moe_gemm|ws_grouped_gemm|gemv_gate_up|gemv_down_sum|fused_moe)_kernel$' \
                    python3 benchmarks/vllm_gemms.py --vllm "${VLLM_DIR:-.anchors/vllm-0.34.0/vllm/model_executor/layers/fused_moe}" \
                    --once --vllm-tables this --shapes "$VLLM_NCU_SHAPE"
        fi ;;
    steps)
        run "$OUT/experts_steps_${GPU}_$DAY.log" "${STEPS_SECONDS:-150}" \
            python3 benchmarks/profile_experts_steps.py ${STEPS_ARGS:-} --output "$OUT/experts_steps_${GPU}_$DAY.json" ;;
    tune)
        table=epmoe/kernels/configs/$(python3 -c 'import torch; from epmoe.kernels.tuning_table import device_table_name; print(device_table_name(torch.cuda.get_device_name()))').json
        if [ -f "$table" ]; then cp "$table" "$OUT/table_${GPU}_before_tune.json"; fi
        tune_sets=${TUNE_ARGS:---local-experts 32 --hidden 7168 --inter 2048 --top-k 8 --formats bf16 --tokens 4096,8192}
        if [ "$tune_sets" = shadowed ]; then             # the batch sizes this table hides from the family's others
            if lines=$(python3 -m epmoe.bench.tune_audit --shadowed "$table"); then
                tune_sets=$(printf '%s\n' "$lines" | paste -sd ';')
                echo "TUNE_ARGS=shadowed: ${tune_sets:-none (epmoe tune --audit names no hidden batch size)}"
            else
                tune_sets=""; echo "TUNE_ARGS=shadowed: the audit of $table failed; no tune run"
            fi
        fi
        run "$OUT/tune_${GPU}_$DAY.log" "${TUNE_SECONDS:-300}" bash -c '
            set -f; status=0; n=0; IFS=";"
            for set in $0; do
                unset IFS                                         # words split as usual inside a set
                [ -z "${set//[[:space:]]/}" ] && continue       # an empty set (a trailing ";") is no tune
                n=$((n + 1)); prof=()
                [ -n "$1" ] && prof=(-m cProfile -o "$1/tune_profile_$n.prof")
                clog=(); [ -n "$2" ] && clog=(--compile-log "$2")
                echo "## epmoe tune $set"; python3 "${prof[@]}" -m epmoe tune $set "${clog[@]}" || status=1
                if [ -n "$1" ]; then                           # where the timing process spent its time
                    echo "## its profile (the compile workers not included), by own time, then with what it called"
                    python3 -c "import pstats, sys; s = pstats.Stats(sys.argv[1]); s.sort_stats(\"tottime\").print_stats(25)
s.sort_stats(\"cumulative\").print_stats(40)" "$1/tune_profile_$n.prof" | grep -v "^$"
                fi
            done
            exit $status' "$tune_sets" \
            "${TUNE_PROFILE:+$OUT}" "${TUNE_COMPILE_LOG:+$OUT/tune_compile_log_${GPU}_$DAY.jsonl}"
        cp "$table" "$OUT/table_${GPU}_after_tune.json" ;;
    gluon_tune)
        table=epmoe/kernels/configs/$(python3 -c 'import torch; from epmoe.kernels.tuning_table import device_table_name; print(device_table_name(torch.cuda.get_device_name()))').json
        if [ -f "$table" ]; then cp "$table" "$OUT/table_${GPU}_before_gluon_tune.json"; fi
        sets=" ${GLUON_TUNE_SETS:-shard mixtral wide} "
        formats=${GLUON_TUNE_FORMATS:-fp8_block,bf16}
        extra=${GLUON_TUNE_EXTRA:-}
        run "$OUT/gluon_tune_${GPU}_$DAY.log" "${GLUON_TUNE_SECONDS:-420}" bash -c "
            if [[ '$sets' == *' shard '* ]]; then python3 -m epmoe tune --gluon --local-experts 32 --hidden 7168 \
                --inter 2048 --top-k 8 --formats $formats --tokens 4096,8192 $extra || exit 1; fi
            if [[ '$sets' == *' mixtral '* ]]; then python3 -m epmoe tune --gluon --presets mixtral-8x7b \
                --formats $formats --tokens 1024,8192 $extra || exit 1; fi
            if [[ '$sets' == *' wide '* ]]; then python3 -m epmoe tune --gluon \
                --presets deepseek-v3,gpt-oss-120b,qwen3-30b-a3b --formats $formats --tokens 8192 $extra || exit 1; fi
            if [[ '$sets' == *' audit '* ]]; then
                args=\$(python3 -m epmoe.bench.tune_audit '$table') || exit 1
                [ -z \"\$args\" ] && echo '## epmoe tune --audit names no entry to race on this GPU'
                while read -r line; do
                    [ -z \"\$line\" ] && continue
                    echo \"## epmoe tune --gluon \$line $extra\"; python3 -m epmoe tune --gluon \$line $extra || exit 1
                done <<< \"\$args\"
            fi"
        if [ -f "$table" ]; then cp "$table" "$OUT/table_${GPU}_after_gluon_tune.json"; fi ;;
    probe)
        run "$OUT/ws_probe_${GPU}_$DAY.log" "${PROBE_SECONDS:-120}" \
            python3 benchmarks/ws_probe.py --output "$OUT/ws_probe_${GPU}_$DAY.json" --budget-s "$(( ${PROBE_SECONDS:-120} * 4 / 5 ))" ;;
    gluon)
        run "$OUT/gluon_gemm_probe_${GPU}_$DAY.log" "${GLUON_SECONDS:-540}" \
            python3 benchmarks/gluon_gemm_probe.py --output "$OUT/gluon_gemm_probe_${GPU}_$DAY.json" \
            --budget-s "$(( ${GLUON_SECONDS:-540} - 260 ))" ${GLUON_ARGS:-} ;;
    ncu)
        # the source page is ncu's CSV: it gets the same header lines as the logs (the summary skips them)
        header ncu -i ws_gemm.ncu-rep --page source --csv --print-source sass > "$OUT/ws_gemm_source.header"
        run "$OUT/ncu_source_ws_gemm_${GPU}_$DAY.log" "${NCU_SECONDS:-200}" bash -c "
            ncu --clock-control none --nvtx --nvtx-include profiled/ --section SourceCounters \
                --section WarpStateStats --section SpeedOfLight --section ComputeWorkloadAnalysis \
                --section MemoryWorkloadAnalysis --import-source no -f -o $OUT/ws_gemm \
                python3 benchmarks/profile_ws_gemm.py --shape 'deepseek-v3 shard 32' --tokens 8192 ${NCU_ARGS:-}
            ncu -i $OUT/ws_gemm.ncu-rep --page source --csv --print-source sass > $OUT/ws_gemm_source.body ||
                ncu -i $OUT/ws_gemm.ncu-rep --page source --csv > $OUT/ws_gemm_source.body
            cat $OUT/ws_gemm_source.header $OUT/ws_gemm_source.body > $OUT/ws_gemm_source.csv
            rm -f $OUT/ws_gemm_source.header $OUT/ws_gemm_source.body
            ncu -i $OUT/ws_gemm.ncu-rep --page details
            rm -f $OUT/ws_gemm.ncu-rep
            python3 benchmarks/ncu_source_summary.py $OUT/ws_gemm_source.csv --top 40" ;;
    ab)
        if [ -d "${AB_OLD:-}" ] && [ -n "${AB_CMD:-}" ]; then      # a folder of old files at their paths in the tree
            what="the files of $AB_OLD over the tree: $(cd "$AB_OLD" && find . -type f | sort | xargs sha256sum | cut -c1-16,66- | tr '\n' ' ')"
        elif [ -n "${AB_FILE:-}" ] && [ -f "${AB_OLD:-}" ] && [ -n "${AB_CMD:-}" ]; then
            what="$AB_OLD (sha256 $(sha256sum < "$AB_OLD" | cut -c1-16)) as $AB_FILE"
        else
            echo "part ab needs AB_CMD and either AB_FILE (a path in the tree) with AB_OLD (the old file, sent), or AB_OLD a folder of old files at their paths"; exit 2
        fi
        before=$(mktemp -d)/tree
        export AB_OUT=$OUT
        cp -r . "$before"
        if [ -d "$AB_OLD" ]; then cp -r "$AB_OLD/." "$before/"; else cp "$AB_OLD" "$before/$AB_FILE"; fi
        run "$OUT/ab_${GPU}_$DAY.log" "${AB_SECONDS:-300}" bash -c "
            echo '## before: $what'
            (cd $before && export AB_SIDE=before EPMOE_COMMIT='$COMMIT with the old files named in its log' && $AB_CMD)
            echo '## after: the tree sent'; (export AB_SIDE=after && $AB_CMD)
            echo '## before, again'; (cd $before && export AB_SIDE=before_again EPMOE_COMMIT='$COMMIT with the old files named in its log' && $AB_CMD)" ;;
    rebalance)
        run "$OUT/rebalance_cost_${GPU}_$DAY.log" "${REBALANCE_SECONDS:-60}" \
            python3 benchmarks/gpu_rebalance_cost.py --out "$OUT/rebalance_cost_${GPU}_1x_$DAY.json" ;;
    overlap)
        if [ -f benchmarks/gpu_overlap_check.py ]; then
            run "$OUT/overlap_${GPU}_$DAY.log" "${OVERLAP_SECONDS:-90}" \
                python3 benchmarks/gpu_overlap_check.py --ranks 1 --out "$OUT"
        else
            echo "no benchmarks/gpu_overlap_check.py in this checkout: part skipped"
        fi ;;
    memory)
        run "$OUT/gpu_memory_${GPU}_$DAY.log" "${MEMORY_SECONDS:-90}" \
            python3 benchmarks/gpu_memory_check.py --ranks 1 --output "$OUT/gpu_memory_${GPU}_$DAY.json" ;;
    deepgemm)
        no_mc=""
        if [ "${DEEPGEMM_NO_MULTICAST:-0}" != 0 ]; then
            [ -n "${DEEPGEMM_NCU:-}" ] || { echo "DEEPGEMM_NO_MULTICAST takes DEEPGEMM_NCU (the calls to profile)"; exit 2; }
            no_mc=1
        fi
        dg=$(mktemp -d)
        # the folder is $0, the wheels (each a glob, expanded here) the arguments
        DG_SRC=${DEEPGEMM_SRC:-} DG_STEPS=${DEEPGEMM_STEPS:-} DG_NCU=${DEEPGEMM_NCU:-} DG_NO_MC=$no_mc \
        DG_NCU_OURS=${DEEPGEMM_NCU_OURS:---shape \"deepseek-v3 shard 32\" --tokens 8192} \
        run "$OUT/deepgemm_$(if [ -n "${DEEPGEMM_NCU:-}" ]; then echo ncu; else echo probe; fi)_${GPU}_$DAY.log" \
            "${DEEPGEMM_SECONDS:-300}" bash -c '
            python3 -m pip install -q --no-deps --no-index --target "$0" $@ || exit 1
            if [ -n "$DG_SRC" ]; then python3 benchmarks/deepgemm_build.py "$0" "$DG_SRC" || exit 1; fi
            export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} PYTHONPATH="$0:$PYTHONPATH"
            if [ -n "$DG_NCU" ]; then       # ncu of the named DeepGEMM calls, then of ours, on this one lease
                sections="--section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis"
                sections="$sections --section WarpStateStats --section Occupancy --section LaunchStats"
                echo "## ncu: DeepGEMM (deepgemm_probe.py --profile $DG_NCU)"
                ncu --clock-control none --nvtx --nvtx-include profiled/ $sections \
                    python3 benchmarks/deepgemm_probe.py --profile "$DG_NCU" || exit 1
                echo "## ncu: ours (profile_ws_gemm.py $DG_NCU_OURS)"
                eval "ncu --clock-control none --nvtx --nvtx-include profiled/ $sections \
                    python3 benchmarks/profile_ws_gemm.py $DG_NCU_OURS" || exit 1
                if [ -n "$DG_NO_MC" ]; then     # the same DeepGEMM calls again, built with multicast off
                    [ -n "$DG_SRC" ] || { echo "DEEPGEMM_NO_MULTICAST takes DEEPGEMM_SRC (sources to patch)"; exit 1; }
                    nomc=$(mktemp -d)
                    cp -r "$DG_SRC" "$nomc/src"
                    h="$nomc/src/csrc/jit_kernels/heuristics/sm90.hpp"
                    grep -q "const bool disable_multicast =" "$h" || { echo "no multicast switch in $h"; exit 1; }
                    sed -i "s/const bool disable_multicast =/const bool disable_multicast = true or/" "$h"
                    python3 -m pip install -q --no-deps --no-index --target "$nomc/pkg" $@ || exit 1
                    python3 benchmarks/deepgemm_build.py "$nomc/pkg" "$nomc/src" || exit 1
                    echo "## ncu: DeepGEMM with multicast off ($h: disable_multicast = true or ...)"
                    PYTHONPATH="$nomc/pkg:$PYTHONPATH" ncu --clock-control none --nvtx --nvtx-include profiled/ \
                        $sections python3 benchmarks/deepgemm_probe.py --profile "$DG_NCU" || exit 1
                    rm -rf "$nomc"
                fi
                exit 0
            fi
            python3 benchmarks/deepgemm_probe.py || exit 1
            if [ -n "$DG_STEPS" ]; then
                echo "## the experts forward with DeepGEMM GEMMs beside triton_ws (profile_experts_steps.py)"
                python3 benchmarks/profile_experts_steps.py --backends triton_ws,deepgemm,deepgemm_down \
                    --formats fp8_block --shapes "$DG_STEPS" --output "$OUT/dg_steps.json"
            fi' \
            "$dg" ${DEEPGEMM_WHEELS:-.anchors/sgl_deep_gemm-0.1.7-*.whl .anchors/apache_tvm_ffi-0.1.11-*.whl}
        if [ -f "$OUT/dg_probe.json" ]; then mv "$OUT/dg_probe.json" "$OUT/deepgemm_probe_${GPU}_$DAY.json"; fi
        if [ -f "$OUT/dg_steps.json" ]; then mv "$OUT/dg_steps.json" "$OUT/experts_steps_deepgemm_${GPU}_$DAY.json"; fi
        rm -rf "$dg" ;;
    *) echo "unknown part $part (tests crossover ws widths diagnostics groups gather walk steps decode tune gluon_tune probe gluon ncu experts batched wide layout ab rebalance overlap memory deepgemm)"; exit 2 ;;
    esac
    tar -C "$BUNDLE" -czf "$BUNDLE/gpu_one_h200.tar.gz" gpu_one_h200
done
rm -rf "$OUT"
exit 0
