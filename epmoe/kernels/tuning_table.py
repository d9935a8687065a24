"""Kernel configurations (tile sizes, warps, pipeline stages) per problem shape, from tuned tables.

Tables live in `epmoe/kernels/configs/<GPU name>.json` (written by `epmoe tune`). A table maps a shape
key (local experts, H, I, top-k, weight format) to configurations for a few token counts T; a lookup
takes the table of this GPU (or, failing that, one of another GPU of the same compute capability), the
shape's entry, and the T nearest on a log scale. Shapes no table covers get `heuristic_config`, which
picks tiles from the expected rows per expert (T * k / L).
"""
from __future__ import annotations

import functools
import json
import math
import os
import re
from dataclasses import asdict, dataclass, replace

import torch

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
SMEM_LIMIT = 227 * 1024   # per-block shared memory on Hopper (H100/H200)
SM_SHARED_MEMORY = 228 * 1024     # shared memory per SM on Hopper, of which each resident program also takes
SMEM_RESERVED_PER_PROGRAM = 1024  # this much beside its own


@dataclass(frozen=True)
class GemmConfig:
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int
    tma: bool = False      # weight tiles through a tensor descriptor (the TMA engine) where the layout allows
    persistent: bool = False   # one program per SM walks the tiles in a flattened, pipelined loop (flat layout)
    promote: str = "sync"  # FP8 block weights: "sync" (each K block's product to float32) or "rescale" (fused_moe)
    tma_a: bool = False    # down GEMM, flat layout: its activation rows through a tensor descriptor as well
    # down GEMM, flat layout, one program per tile: the K range cut in this many pieces, each a program
    # writing float32 partial rows that the slot sum adds (more programs streaming weights at decode)
    split_k: int = 1
    # each product computed transposed (weights x rows^T): with few rows per tile the weight rows fill the
    # tensor cores' wide side (fused_moe, SWAP_AB); not with promote "rescale"
    swap_ab: bool = False
    # registers a thread may use (the compiler's `maxnreg`; 0: as many as it takes): a cap at 65536 / (n x
    # threads) lets n programs share an SM where the compiler's own count is just above it
    max_registers: int = 0
    # gate+up, block FP8 promoting "sync", weights through pointers: the gate and up weight rows loaded as one
    # operand, so a K block is one product (and one wait for it) of twice the rows (fused_moe, STACK_GU)
    stack_gate_up: bool = False

    def __post_init__(self):
        # a table's "false" string is no False
        for name in ("tma", "persistent", "tma_a", "swap_ab", "stack_gate_up"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if isinstance(self.max_registers, bool) or not isinstance(self.max_registers, int) or not (
                self.max_registers == 0 or 32 <= self.max_registers <= 255):
            raise ValueError(f"max_registers must be 0 (the compiler's count) or 32..255, got {self.max_registers!r}")
        if self.stack_gate_up and (self.tma or self.promote == "rescale"):
            raise ValueError(f"stack_gate_up loads gate and up rows through one pointer tile and promotes \"sync\": "
                             f"not with tma={self.tma}, promote={self.promote!r} (BN{self.block_n} BK{self.block_k})")
        if self.swap_ab and self.promote == "rescale":
            raise ValueError(f"swap_ab with promote \"rescale\": its accumulators stay [rows, columns] "
                             f"(BN{self.block_n} BK{self.block_k})")

    def describe(self) -> str:
        return (f"BN{self.block_n} BK{self.block_k} G{self.group_m} w{self.num_warps} s{self.num_stages}"
                + (" tma" if self.tma else "") + (" tma_a" if self.tma_a else "")
                + (" persistent" if self.persistent else "")
                + ("" if self.promote == "sync" else f" {self.promote}")
                + (f" split{self.split_k}" if self.split_k > 1 else "")
                + (" swap" if self.swap_ab else "")
                + (f" r{self.max_registers}" if self.max_registers else "")
                + (" stack" if self.stack_gate_up else ""))


@dataclass(frozen=True)
class GemvConfig:
    """The decode path (`decode_gemv`): N / K tiles, warps and load pipeline depth (1: plain loads) of its
    two weight-streaming kernels; pdl: the down kernel starts early and prefetches its weights (Hopper+)."""
    gate_up_n: int
    gate_up_k: int
    down_n: int
    down_k: int
    gate_up_warps: int = 4
    down_warps: int = 4
    gate_up_stages: int = 1
    down_stages: int = 1
    pdl: bool = False

    def describe(self) -> str:
        return (f"gemv gate_up[BN{self.gate_up_n} BK{self.gate_up_k} w{self.gate_up_warps} s{self.gate_up_stages}] "
                f"down[BN{self.down_n} BK{self.down_k} w{self.down_warps} s{self.down_stages}]"
                + (" pdl" if self.pdl else ""))


@dataclass(frozen=True)
class MoEKernelConfig:
    """One configuration of the two fused GEMMs; BLOCK_M is shared (it sets the padding of the layout).

    tail_m > 0: the split layout (moe_align): each expert's rows are padded to tail_m only, and what is
    left after its BLOCK_M tiles runs in tiles of tail_m rows (a second launch of each GEMM, same N/K
    tiles, warps and stages).

    gemv set: batches of this size take the decode path instead (two matrix-vector kernels, no
    alignment, no tiles: `decode_gemv`); the tile fields stay for the formats that path does not take.

    gluon set (written by `epmoe tune` where it measured it faster, end to end): batches of this size run
    the warp-specialized Gluon GEMMs instead (`triton_ws`'s pipeline: Hopper, BF16, 128x128 block and
    per-channel FP8), where they can run and passed their self-check; the tile fields stay for where they
    cannot."""
    block_m: int
    gate_up: GemmConfig
    down: GemmConfig
    tail_m: int = 0
    gemv: GemvConfig | None = None
    gluon: bool = False

    def __post_init__(self):
        if self.down.stack_gate_up:
            raise ValueError(f"stack_gate_up stacks the gate and up products: the down GEMM has none "
                             f"(down {self.down.describe()})")

    def to_dict(self) -> dict:
        def gemm(g: GemmConfig) -> dict:
            out = asdict(g)
            if not g.tma_a:          # written only where set (tables made before it stay as they are)
                del out["tma_a"]
            if g.split_k == 1:
                del out["split_k"]
            if not g.swap_ab:
                del out["swap_ab"]
            if not g.max_registers:
                del out["max_registers"]
            if not g.stack_gate_up:
                del out["stack_gate_up"]
            return out
        d = {"block_m": self.block_m, "gate_up": gemm(self.gate_up), "down": gemm(self.down)}
        if self.tail_m:
            d["tail_m"] = self.tail_m
        if self.gemv is not None:
            d["gemv"] = asdict(self.gemv)
        if self.gluon:
            d["gluon"] = True
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "MoEKernelConfig":
        try:
            gluon = d.get("gluon", False)
            if not isinstance(gluon, bool):
                raise TypeError(f"gluon must be true or false, got {gluon!r}")
            return cls(int(d["block_m"]), GemmConfig(**d["gate_up"]), GemmConfig(**d["down"]),
                       int(d.get("tail_m", 0)), GemvConfig(**d["gemv"]) if d.get("gemv") else None, gluon)
        except (KeyError, TypeError) as exc:
            raise ValueError(f"bad kernel config {d!r}: needs block_m, gate_up and down "
                             f"(block_n, block_k, group_m, num_warps, num_stages): {exc}") from exc

    def describe(self) -> str:
        tail = f"+{self.tail_m}" if self.tail_m else ""
        gemv = f" | {self.gemv.describe()}" if self.gemv is not None else ""
        gluon = " | gluon" if self.gluon else ""
        return (f"BM{self.block_m}{tail} gate_up[{self.gate_up.describe()}] down[{self.down.describe()}]"
                f"{gemv}{gluon}")


def shape_key(num_experts: int, hidden: int, inter: int, top_k: int, fmt: str) -> str:
    """fmt: the weight format, "bfloat16" / "float16" / "float32" / "fp8_block" / "fp8_channel" / ..."""
    return f"L={num_experts},H={hidden},I={inter},k={top_k},fmt={fmt}"


def device_table_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")


def smem_bytes(block_m: int, g: GemmConfig, elem_bytes: int, b_tiles: int) -> int:
    """Shared memory a GEMM's pipeline holds: stages x (A tile + b_tiles B tiles)."""
    return g.num_stages * (block_m * g.block_k + b_tiles * g.block_n * g.block_k) * elem_bytes


def element_bytes(fmt: str) -> int:
    """Bytes per operand element of a weight format name."""
    return 1 if fmt.startswith("fp8") else 4 if fmt == "float32" else 2


def heuristic_config(num_tokens: int, num_experts: int, hidden: int, inter: int, top_k: int,
                     fp8: bool = False, elem_bytes: int | None = None) -> MoEKernelConfig:
    """A sane configuration for any shape, from the expected rows per expert."""
    rows = num_tokens * top_k / max(num_experts, 1)
    bk = 128 if fp8 else 64
    if rows <= 8:      # decode: stream the weights, tiles of few rows
        cfg = MoEKernelConfig(16, GemmConfig(64, 128, 1, 4, 4), GemmConfig(64, 128, 1, 4, 4))
    elif rows <= 24:
        cfg = MoEKernelConfig(32, GemmConfig(64, 128, 1, 4, 4), GemmConfig(64, 128, 1, 4, 4))
    elif rows <= 96:
        cfg = MoEKernelConfig(64, GemmConfig(64, bk, 8, 4, 4), GemmConfig(128, bk, 8, 4, 4))
    else:
        cfg = MoEKernelConfig(128, GemmConfig(128, bk, 8, 8, 3), GemmConfig(128, bk, 8, 8, 4))
    return _clamp_to_problem(cfg, hidden, inter, fp8, elem_bytes or (1 if fp8 else 2))


def can_stack_gate_up(fmt: str, inter: int) -> bool:
    """Whether a gate+up GEMM of this weight format and intermediate size can stack its gate and up products
    (`GemmConfig.stack_gate_up`): 128x128 block FP8 whose gate and up halves start on a scale block."""
    return fmt == "fp8_block" and inter % 128 == 0


def _clamp_to_problem(cfg: MoEKernelConfig, hidden: int, inter: int, fp8: bool,
                      elem_bytes: int, can_stack: bool = False) -> MoEKernelConfig:
    """Shrink tiles that exceed a small problem, pin FP8's K tile (and the gate+up N tile) to the scale
    group of 128, drop stages (then halve the K tile) until shared memory fits, and keep the gate+up's
    stacked products (`stack_gate_up`) only where they can run (`can_stack`: `can_stack_gate_up`)."""
    def clamp(g: GemmConfig, n: int, k: int, b_tiles: int, pin_n: bool) -> GemmConfig:
        bn = 128 if pin_n else min(g.block_n, max(16, _pow2_ceil(n)))
        bk = 128 if fp8 else min(g.block_k, max(16, _pow2_ceil(k)))
        out = replace(g, block_n=bn, block_k=bk)
        while smem_bytes(cfg.block_m, out, elem_bytes, b_tiles) > SMEM_LIMIT:
            if out.num_stages > 2:
                out = replace(out, num_stages=out.num_stages - 1)
            elif out.block_k > 32 and not fp8:
                out = replace(out, block_k=out.block_k // 2)
            else:
                break
        return out
    gate_up = clamp(cfg.gate_up, inter, hidden, 2, fp8)
    if gate_up.stack_gate_up and not can_stack:
        gate_up = replace(gate_up, stack_gate_up=False)
    return replace(cfg, gate_up=gate_up, down=clamp(cfg.down, hidden, inter, 1, False))


def _pow2_ceil(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


class TableEntries(dict):
    """A table's entries, {key: {T: config}}, with `copied`: {(key, T): the table it was copied from} for the
    entries a quick tune seeded from another GPU's table (`copied_from`), never timed on the GPU the table is for."""

    def __init__(self, entries: dict, copied: dict[tuple[str, int], str]):
        super().__init__(entries)
        self.copied = copied


@functools.lru_cache(maxsize=None)
def _load_table(path: str) -> TableEntries:
    with open(path) as f:
        data = json.load(f)
    entries = data.get("entries")
    if not isinstance(entries, dict):
        raise ValueError(f"{path}: a kernel config table needs an 'entries' object")
    return TableEntries({key: {int(t): MoEKernelConfig.from_dict(c) for t, c in by_t.items()}
                         for key, by_t in entries.items()},
                        {(key, int(t)): c["copied_from"] for key, by_t in entries.items() for t, c in by_t.items()
                         if c.get("copied_from")})


# the package tables of GPUs of one compute capability, in the order a GPU of it reads them after its own
TABLE_FAMILIES = {(9, 0): ("NVIDIA_H200", "NVIDIA_H100_80GB_HBM3", "NVIDIA_H100")}


def table_paths_for_device(device: torch.device | None = None) -> list[str]:
    """This GPU's table first, then those of other GPUs with the same compute capability."""
    if not torch.cuda.is_available():
        return []
    name = torch.cuda.get_device_name(device)
    cap = torch.cuda.get_device_capability(device)
    own = os.path.join(CONFIG_DIR, device_table_name(name) + ".json")
    paths = [own] if os.path.exists(own) else []
    for other in TABLE_FAMILIES.get(tuple(cap), ()):
        p = os.path.join(CONFIG_DIR, other + ".json")
        if os.path.exists(p) and p not in paths:
            paths.append(p)
    return paths


def sibling_tables(path: str) -> list[str]:
    """The package tables that the lookup reads after the table at `path` on a GPU whose own table has that file
    name: the other tables of its family, in lookup order; [] for a file name in no family."""
    name = os.path.splitext(os.path.basename(path))[0]
    family = next((f for f in TABLE_FAMILIES.values() if name in f), ())
    return [p for p in (os.path.join(CONFIG_DIR, other + ".json") for other in family if other != name)
            if os.path.exists(p)]


# an entry's `gluon` serves batches within a factor GLUON_REACH of its T that have at least GLUON_MIN_ROWS rows
# per expert (T * k / L: the Gluon GEMMs' tiles hold 128 rows); `epmoe tune` times it from there only
GLUON_MIN_ROWS = 128
GLUON_REACH = 2
# a tuned entry serves batches within a factor TABLE_REACH of its T; farther away (decode sizes against a shape
# tuned only at prefill, say) the tiles it measured say nothing, and the heuristic, sized by rows per expert,
# serves instead
TABLE_REACH = 8


def nearest_tuned(tokens, n: int) -> int:
    """The tuned T nearest a batch of n tokens (by ratio; the smaller of two as near): the entry the lookup
    takes, if within TABLE_REACH of n."""
    return min(tokens, key=lambda x: (abs(math.log2(max(x, 1)) - math.log2(max(n, 1))), x))


def within_reach(t: int, n: int, factor: int = TABLE_REACH) -> bool:
    """Whether a batch of n tokens lies within a factor of T = t, either way."""
    n = max(n, 1)
    return n <= t * factor and t <= n * factor


def lookup_config(num_tokens: int, num_experts: int, hidden: int, inter: int, top_k: int, fmt: str,
                  device: torch.device | None = None, paths: list[str] | None = None
                  ) -> tuple[MoEKernelConfig, str]:
    """(config, where it came from: the entry, and whether it is a copy of another GPU's entry never timed on
    this table's GPU). Nearest tuned T for this shape within a factor TABLE_REACH, else the heuristic. An
    entry's `gluon` is kept only for batches it serves (within GLUON_REACH of its T, at least GLUON_MIN_ROWS rows
    per expert); other batches that come to that entry get its tiles."""
    key = shape_key(num_experts, hidden, inter, top_k, fmt)
    fp8, elem = _format_bytes(fmt)
    n = max(num_tokens, 1)
    for path in (table_paths_for_device(device) if paths is None else paths):
        table = _load_table(path)
        by_t = table.get(key)
        if by_t:
            t = nearest_tuned(by_t, n)
            if not within_reach(t, n):
                cfg = heuristic_config(num_tokens, num_experts, hidden, inter, top_k, fp8, elem)
                return cfg, f"heuristic (the nearest tuned T in {os.path.basename(path)}[{key}] is {t})"
            cfg = _clamp_to_problem(by_t[t], hidden, inter, fp8, elem, can_stack_gate_up(fmt, inter))
            if cfg.gluon and not (num_tokens * top_k >= GLUON_MIN_ROWS * num_experts
                                  and within_reach(t, n, GLUON_REACH)):
                cfg = replace(cfg, gluon=False)
            origin = table.copied.get((key, t))
            said = f", copied from {origin}: not timed on this table's GPU" if origin else ""
            if by_t[t].gate_up.stack_gate_up and not cfg.gate_up.stack_gate_up:
                said += ", its gate+up unstacked (stack_gate_up cannot run at this I and format)"
            return cfg, f"{os.path.basename(path)}[{key}][T={t}]{said}"
    return heuristic_config(num_tokens, num_experts, hidden, inter, top_k, fp8, elem), "heuristic"


def tables_pick_gluon(hidden: int, inter: int, top_k: int, fmt: str, device: torch.device | None = None,
                      paths: list[str] | None = None) -> bool:
    """Whether a table this device reads runs the Gluon GEMMs for this shape (any number of local experts)
    and weight format: where none does, the `triton` experts do not set them up (nor run their
    self-check)."""
    tail = shape_key(0, hidden, inter, top_k, fmt).split(",", 1)[1]
    return any(cfg.gluon for path in (table_paths_for_device(device) if paths is None else paths)
               for key, by_t in _load_table(path).items() if key.split(",", 1)[1] == tail for cfg in by_t.values())


def _format_bytes(fmt: str) -> tuple[bool, int]:
    """(FP8, bytes per element the GEMMs stream) of a table's weight format name."""
    # float16: the down GEMM streams a float32 intermediate (fused_moe.intermediate_dtype)
    return fmt.startswith("fp8"), 4 if fmt == "float16" else element_bytes(fmt)


def fit_to_problem(cfg: MoEKernelConfig, hidden: int, inter: int, fmt: str) -> MoEKernelConfig:
    """`cfg` as every table or heuristic configuration is used: tiles shrunk to a small problem, FP8's K
    tile (and gate+up N tile) pinned to the scale group of 128, stages dropped until shared memory fits, the
    gate+up's stacked products dropped where they cannot run (`can_stack_gate_up`)."""
    fp8, elem = _format_bytes(fmt)
    return _clamp_to_problem(cfg, hidden, inter, fp8, elem, can_stack_gate_up(fmt, inter))
