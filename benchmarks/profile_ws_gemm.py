"""The warp-specialized Gluon GEMM (`epmoe.kernels.ws_grouped_gemm`) under Nsight Compute: block-FP8
gate+up (silu and the block quantization in its epilogue) and down of a preset's shard, rows in layout
order as `triton_ws` runs them, each launched once inside an NVTX range named `profiled` (compiled and
warmed up outside it), on a random top-k routing laid out in tiles of 128:

    ncu --clock-control none --nvtx --nvtx-include "profiled/" --section SpeedOfLight \\
        --section ComputeWorkloadAnalysis --section WarpStateStats --section MemoryWorkloadAnalysis \\
        python3 benchmarks/profile_ws_gemm.py --shape "deepseek-v3 shard 32" --tokens 8192

Without ncu it prints each launch's time (`triton.testing.do_bench` median) and checks two tiles of
each against the kernel's PyTorch statement; `--group-m 8,16,32 --formats fp8,bf16` times each value
of the walk's grouping in each format (BF16: 64-wide K blocks; `fp8_channel`: weight scales per output row and
A's per row, the gate+up's output BF16 as `fp8_channel`'s experts run it). The gate+up tile is 256 wide (gate and up
of 128 outputs); the down GEMM's width is the kernel's own choice where no `--down-block-n` names others
(`auto,256`: the backends' width, then 256 columns, each launched and profiled in turn); `--wide-mma off,on`
times each BF16 tile of 256 columns both ways (one 64 x 256 product per K block, or one per weight box);
`--gather off,on` times the gate+up both ways the kernel reads its A rows (on: the tokens where they are,
`a_rows`, by the four-warp cp.async loader; off: rows copied into layout order first, loaded by TMA) and
prints the copy (`rows_to_layout`, the backend's own) beside it, so the two forms' sums can be compared;
`--walk fixed,experts` each launch with the walk in groups of GROUP_M m-tiles and in groups cut at expert
edges (`expert_walk_groups(tile_expert, GROUP_M)`; the default, `auto`, as the experts launch it: cut for BF16
with short experts); `--diagnostic none,no_loads,no_math,no_promote` each launch also in the kernel's diagnostic
forms (`ws_grouped_gemm.DIAGNOSTICS`: without the loads after the ring's first round, without the math, without
FP8's promotion; no_loads not with --gather on, no_promote not in BF16), whose outputs are not the GEMM's and are not
checked; every line prints the operand bytes the tiles stream from L2 into shared memory and their rate (no_loads:
only its first round's); `--anchor` (BF16) also launches `torch._grouped_mm` on the same layout rows (padding
included, no activation), timed and profiled the same way. A launch whose checked tiles (the first and the last)
disagree with the statement (rel. error > 1e-2) is marked so, and the script exits 1 after the rest.
"""
from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)


def shapes() -> dict:
    """name: (local experts, H, I, top_k): the probe's, and the presets with ~256 rows per expert at T = 8192
    (gpt-oss-120b at its FP8 padded sizes, which the BF16 GEMMs take as well)."""
    import ws_probe
    return dict(ws_probe.SHAPES, **{"deepseek-v3": (256, 7168, 2048, 8), "gpt-oss-120b": (128, 2944, 2944, 4)})


# --formats: the name each is printed with
FORMAT_NAMES = {"fp8": "fp8_block", "fp8_channel": "fp8_channel", "bf16": "bf16"}


def operand_bytes(shape, tile_expert: list) -> int:
    """The operand bytes a launch's tiles stream from L2 into shared memory: one ring slot (A tile and weight
    boxes, `ws_grouped_gemm._slot_bytes` without the FP8 A scales' 512 bytes) per K block of every used tile."""
    from epmoe.kernels.ws_grouped_gemm import _slot_bytes
    n_tiles = -(-shape.N // (shape.sub_n if shape.gated else shape.sub_n * shape.split))
    used = sum(e >= 0 for e in tile_expert) * n_tiles
    return used * -(-shape.K // shape.block_k) * _slot_bytes(shape, False)


def off_on(parser, flag: str, value: str) -> list[bool]:
    """The values of an off / on / off,on option, in order (anything else: the parser's error)."""
    values = [{"off": False, "on": True}.get(v) for v in value.split(",")]
    if None in values:
        parser.error(f"{flag} takes off, on, or both comma-separated, not {value!r}")
    return values


def time_row_copy(tokens, H, k, fmt, aligned, rows_to_layout, gen, dev) -> float:
    """The backend's copy of the token rows (and FP8 scales) into layout order: `do_bench` median, ms."""
    import torch
    import triton
    x = torch.randn(tokens, H, generator=gen, device=dev)
    scales = None
    if fmt != "bf16":
        from epmoe.quant.fp8 import fp8_quantize
        x, scales = fp8_quantize(x, None if fmt == "fp8_channel" else 128)
    else:
        x = x.bfloat16()
    return triton.testing.do_bench(lambda: rows_to_layout(x, scales, aligned, k), warmup=10, rep=50,
                                   return_mode="median")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="deepseek-v3 shard 32", choices=sorted(shapes()))
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--stages", type=int, default=None,
                   help="ring slots (default: the kernel's own choice, as the experts launch it)")
    p.add_argument("--bias", action="store_true",
                   help="add a bias, as gpt-oss's experts have (default: none, as deepseek-v3's and mixtral's); "
                        "the gated FP8 tile's epilogue then needs registers the K loop gives up to the stack")
    p.add_argument("--global-scales", action="store_true",
                   help="FP8: the A scales from global memory (scale_tma=False) instead of by TMA (the default)")
    p.add_argument("--group-m", default="8", help="m-tiles walked side by side, comma-separated values to time "
                                                  "each (default %(default)s)")
    p.add_argument("--formats", default="fp8", help="fp8 (block), fp8_channel, bf16, comma-separated (default "
                                                    "%(default)s)")
    p.add_argument("--down-block-n", default="auto",
                   help="output columns of a down GEMM tile, comma-separated values to time each: 64, 128, 256 or "
                        "auto (the kernel's default, as the experts launch it) (default %(default)s)")
    p.add_argument("--walk", default="auto",
                   help="auto, fixed, experts, comma-separated: the persistent walk in groups of --group-m m-tiles "
                        "(fixed), in groups cut at expert edges (experts), or as the experts launch it (auto: "
                        "`walk_group`'s walk and group size, in place of --group-m) (default %(default)s)")
    p.add_argument("--anchor", action="store_true",
                   help="BF16: also torch._grouped_mm on the same layout rows (the CUTLASS grouped GEMM)")
    p.add_argument("--wide-mma", default="off",
                   help="off, on, or off,on: BF16 tiles of 256 columns with one 64 x 256 product per K block (on) "
                        "or one per weight box (off) (default %(default)s; tiles it cannot apply to run off only)")
    p.add_argument("--gather", default="off",
                   help="off, on, or off,on: the gate+up's A rows copied into layout order and loaded by TMA (off, "
                        "as the backends run it; the copy is timed too) or read where the tokens are (on) "
                        "(default %(default)s)")
    p.add_argument("--diagnostic", default="none",
                   help="none, no_loads, no_math, no_promote, comma-separated: the kernel as the experts run it "
                        "(none) and its diagnostic forms, each launched in turn (default %(default)s)")
    args = p.parse_args(argv)
    gathers = off_on(p, "--gather", args.gather)
    group_ms = [int(v) for v in args.group_m.split(",")]
    formats = args.formats.split(",")
    down_widths = [None if v == "auto" else int(v) if v.isdigit() else -1 for v in args.down_block_n.split(",")]
    if not group_ms or min(group_ms) < 1 or not set(formats) <= set(FORMAT_NAMES):
        p.error("--group-m takes positive integers, --formats fp8, fp8_channel and/or bf16")
    if not set(down_widths) <= {None, 64, 128, 256}:
        p.error("--down-block-n takes auto, 64, 128 or 256, comma-separated")
    wides = off_on(p, "--wide-mma", args.wide_mma)
    diagnostics = args.diagnostic.split(",")
    try:
        from epmoe.kernels.ws_grouped_gemm import DIAGNOSTICS
    except ImportError:         # a Triton without Gluon: the GPU check below says what is missing
        DIAGNOSTICS = {d: None for d in diagnostics}
    if not diagnostics or not set(diagnostics) <= set(DIAGNOSTICS):
        p.error(f"--diagnostic takes {', '.join(DIAGNOSTICS)}, comma-separated, not {args.diagnostic!r}")
    walks = args.walk.split(",")
    if not walks or not set(walks) <= {"auto", "fixed", "experts"}:
        p.error(f"--walk takes auto, fixed or experts, comma-separated, not {args.walk!r}")
    import torch
    if not torch.cuda.is_available():
        print("profile_ws_gemm: needs a CUDA GPU", file=sys.stderr)
        return 2
    import triton
    from gluon_gemm_probe import Problem
    from epmoe.experts.triton_ws import TILE, walk_group
    from epmoe.kernels.layout_copy import layout_tokens, rows_to_layout
    from epmoe.kernels.moe_align import align_pairs
    from epmoe.kernels.walk_groups import expert_walk_groups
    from epmoe.kernels.ws_grouped_gemm import check_operands, grouped_gemm_ws, wide_mma_applies
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    L, H, I, k = shapes()[args.shape]
    ids = torch.randn(args.tokens, L, generator=gen, device=dev).topk(k, dim=1).indices.to(torch.int32)
    aligned = align_pairs(ids, L, TILE)
    tile_expert = aligned.block_expert[:aligned.max_blocks].tolist()      # as the probe and the backend lay it out
    failed = 0
    for fmt in formats:
        if False in gathers:
            copy_ms = time_row_copy(args.tokens, H, k, fmt, aligned, rows_to_layout, gen, dev)
            print(f"{args.shape} T={args.tokens} {FORMAT_NAMES[fmt]} row copy into the "
                  f"layout (rows_to_layout, with the scales): {copy_ms:.3f} ms", flush=True)
        launches = [("gate_up", 2 * I, H, 256, g) for g in gathers] + [("down", H, I, bn, False) for bn in down_widths]
        for gemm, w_rows, K, block_n, gather in launches:
            a_rows = layout_tokens(aligned, k)[:TILE * len(tile_expert)].contiguous() if gather else None
            prob = Problem(fmt != "bf16", gemm == "gate_up", tile_expert, L, w_rows, K, gen, dev,
                           a_std=1.0 if gemm == "gate_up" else 0.1,
                           tokens=args.tokens if gather else None, a_rows=a_rows, channel=fmt == "fp8_channel")
            prob.use_bias = args.bias
            launched = check_operands(*prob.args(), block_n=block_n, a_rows=prob.a_rows)
            width = f"block_n={'' if block_n else 'auto: '}{launched.sub_n * launched.split}"
            applies = wide_mma_applies(launched.fp8, launched.split)
            first_values = {}           # per wide_mma form, the first walk's outputs
            streamed = operand_bytes(launched, tile_expert)
            # no_loads with --gather on: refused by the kernel; no_promote in BF16: the kernel as it is
            for group_m, wide, walk, diag in [(g, w, x, d) for g in group_ms for w in wides for x in walks
                                              for d in diagnostics if (applies or not w)
                                              and not (gather and d == "no_loads")
                                              and not (fmt == "bf16" and d == "no_promote")]:
                if walk == "auto":          # as the experts launch it: its own group size
                    auto = walk_group("none" if fmt == "bf16" else FORMAT_NAMES[fmt], args.tokens * k, L)
                    walk, group_m = ("fixed", 8) if auto is None else ("experts", auto)
                groups = expert_walk_groups(prob.tile_expert, group_m) if walk == "experts" else None

                def run():
                    grouped_gemm_ws(*prob.args(), block_n=block_n, stages=args.stages, group_m=group_m,
                                    scale_tma=False if args.global_scales or gather else None, wide_mma=wide,
                                    walk_groups=groups, a_rows=prob.a_rows, diagnostic=diag)

                for t in prob.out:          # a tile the walk skipped keeps zeros, not an earlier walk's values
                    if t is not None:
                        t.zero_()
                run()
                torch.cuda.synchronize()
                used = [t for t, e in enumerate(tile_expert) if e >= 0]
                err = prob.rel_err([used[0], used[-1]])
                ms = triton.testing.do_bench(run, warmup=10, rep=50, return_mode="median")
                torch.cuda.nvtx.range_push("profiled")
                run()
                torch.cuda.synchronize()
                torch.cuda.nvtx.range_pop()
                flops = 2.0 * args.tokens * k * K * w_rows
                checked = diag == "none"        # a diagnostic form's outputs are not the GEMM's
                supply = ("operands: the ring's first round only" if diag == "no_loads" else
                          f"operands {streamed / 1e9:.2f} GB {streamed / ms / 1e9:.2f} TB/s")
                bad = checked and not err <= 1e-2
                failed += bad
                # every tile of every walk: the walk changes which program computes a tile, not its values
                values = prob.values()
                differs = checked and not torch.equal(values, first_values.setdefault(wide, values))
                failed += differs
                print(f"{args.shape} T={args.tokens} {FORMAT_NAMES[fmt]} {gemm} {width} "
                      f"group_m={group_m} walk={walk}{' wide_mma' if wide else ''}"
                      f"{' gathered' if gather else ''}{'' if checked else f' diagnostic={diag}'}: {ms:.3f} ms "
                      f"{flops / ms / 1e9:.0f} TFLOP/s (routed rows) "
                      f"{supply} "
                      f"{f'rel_err {err:.2e}' if checked else '(outputs not checked)'}"
                      f"{'  DISAGREES WITH THE STATEMENT' if bad else ''}"
                      f"{'  DIFFERS FROM THE FIRST WALK' if differs else ''}", flush=True)
            if args.anchor and fmt == "bf16":
                laid_out = prob.tile_expert[prob.tile_expert >= 0]          # experts in order, a tile each
                offsets = (torch.bincount(laid_out, minlength=L) * TILE).cumsum(0).to(torch.int32)
                a = prob.a[:int(offsets[-1])]
                wt = prob.w.transpose(1, 2)

                def anchor():
                    torch._grouped_mm(a, wt, offs=offsets)

                ms = triton.testing.do_bench(anchor, warmup=10, rep=50, return_mode="median")
                torch.cuda.nvtx.range_push("profiled")
                anchor()
                torch.cuda.synchronize()
                torch.cuda.nvtx.range_pop()
                print(f"{args.shape} T={args.tokens} bf16 {gemm} torch._grouped_mm (same rows, no activation): "
                      f"{ms:.3f} ms {2.0 * args.tokens * k * K * w_rows / ms / 1e9:.0f} TFLOP/s (routed rows)",
                      flush=True)
            del prob
            torch.cuda.empty_cache()        # deepseek-v3's 256 experts: the next format's weights need the room
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
