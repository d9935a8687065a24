"""Triton kernels of the `alltoall` dispatcher on CUDA: the wire rows written in one launch, the received
rows unpacked into dense fields in one launch.

Two layouts of the send buffer: packed (destination d's rows right after those for lower ranks: the sizes
come from the counts read on the host) and, with a capacity M (`max_tokens_per_rank`), fixed regions of M
rows per destination (rows [d * M, (d + 1) * M)): its first rows are the tokens for d, the rest are marked
routed nowhere (ids -1, weights 0), so the count travels in the data and nothing is read back to size
anything. The bounded layout sends the hidden vectors apart from the small fields (a dense `[ep * M, Hp]`
buffer the experts read in place after the exchange, next to the rows of ids, weights and scales).

`pack_rows`: program (t, column block) reads token t's block of `x` once and stores it into the wire row
of every destination rank the token goes to, at the row the destination-major order gives it (rank d's
rows start after those of lower ranks; within a destination, token order: the order `pack_tokens` gets
from `nonzero` over the [ep, T] mask). FP8 formats quantize the block in the kernel with the formula of
`epmoe.kernels.fp8_quant` (the one formula, bit for bit: amax per group, `max(amax, 1e-12) * (1/448)`,
`div_rn`, rounding to e4m3 before the cast), so there is no intermediate copy of `x` or of its FP8 rows.
The program of column block 0 also writes the routing restricted to that destination (local ids there,
-1 elsewhere; the k weights) and the token's row per destination for the combine (`back [T, ep]`, -1
where it was not sent). Where a token goes and its position among the rows for each destination come
from `token_rows.route_to_ranks` (shared with `symm_high_throughput`), before the forward header.

`unpack_rows`: received `uint8` rows -> dense `x`, `ids`, `weights` (and `scales`), one launch; for the
experts kernels that index rows as a dense array.

Typed fields are addressed through views of the `uint8` rows in each field's dtype (row stride and field
offset in elements: every field is 16-byte aligned, see `epmoe.dispatch._comm.WireFormat`). The kernels
also run under the Triton interpreter on CPU tensors (`TRITON_INTERPRET=1`): that is how they are tested
without a GPU.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..sizes import ceil_div, scale_groups
from .fp8_quant import fp8_quantize_groups
from .token_rows import pow2, route_to_ranks
from .jit_keys import key_callees_first

COPY_BLOCK = 1024          # columns one program moves when nothing is quantized
PAD_BLOCK = 256            # rows of the fixed regions one program checks for padding


@triton.jit
def a2a_pack_kernel(x_ptr, ids_ptr, w_ptr, owner_ptr, index_ptr, j_ptr, counts_ptr, back_ptr,
                    sx_ptr, sids_ptr, sw_ptr, ss_ptr, T, HP, x_stride, n_groups, region,
                    X_ROW, X_OFF, I_ROW, I_OFF, W_ROW, W_OFF, S_ROW, S_OFF,
                    EP: tl.constexpr, K: tl.constexpr, K_P2: tl.constexpr, QUANT: tl.constexpr,
                    GROUP: tl.constexpr, BLOCK: tl.constexpr, GROUPS: tl.constexpr, PAD_BLOCK: tl.constexpr):
    """Program (t < T, b): columns of groups [b * GROUPS, (b + 1) * GROUPS) of token t (a group: GROUP
    columns, the FP8 scale group when QUANT, else just a block), stored into each destination's row.
    Programs (t >= T, 0), with a capacity (`region` = M > 0): PAD_BLOCK rows each of the fixed regions,
    those past their destination's count marked routed nowhere.

    x [T, >= HP] (row stride x_stride), ids [T, K] int32 global expert ids, w [T, K] float32, owner/index
    [E] int32, j [EP, T] int64 (the token's position among the rows for rank d, -1: not sent there),
    counts [EP] int32 rows per destination -> the send rows' fields (typed views of uint8 rows, or a dense
    buffer for x: *_ROW elements per row, field at *_OFF), back [T, EP] int64. Rank d's rows start at
    d * region (region > 0) or after those of lower ranks (region = 0).
    """
    t = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1)
    if t >= T:
        if b == 0:
            _mark_padding(counts_ptr, sids_ptr, sw_ptr, (t - T) * PAD_BLOCK, region, I_ROW, I_OFF, W_ROW, W_OFF,
                          EP, K, K_P2, PAD_BLOCK)
        return
    groups = b * GROUPS + tl.arange(0, GROUPS)                   # [GROUPS]
    inner = tl.arange(0, BLOCK)                                  # [BLOCK]
    cols = groups[:, None] * GROUP + inner[None, :]              # [GROUPS, BLOCK]
    mask = (inner[None, :] < GROUP) & (cols < HP) & (groups[:, None] < n_groups)
    v = tl.load(x_ptr + t * x_stride + cols, mask=mask, other=0.0)
    if QUANT:                                                    # the one formula
        y, scale = fp8_quantize_groups(v.to(tl.float32))         # [GROUPS, BLOCK], [GROUPS]
        v = y.to(sx_ptr.dtype.element_ty)
    first = b == 0
    kk = tl.arange(0, K_P2)
    km = kk < K
    e = tl.load(ids_ptr + t * K + kk, mask=km, other=0)
    own = tl.load(owner_ptr + e, mask=km, other=-1)
    idx = tl.load(index_ptr + e, mask=km, other=-1)
    wv = tl.load(w_ptr + t * K + kk, mask=km, other=0.0)
    start = t * 0                                                # first row of destination d
    for d in tl.static_range(EP):
        jd = tl.load(j_ptr + d * T + t)
        row = start + jd
        if region > 0:      # a token past the capacity is never sent (the forward header refused it before)
            jd = tl.where(jd < region, jd, -1)
        if jd >= 0:
            tl.store(sx_ptr + row * X_ROW + X_OFF + cols, v, mask=mask)
            if QUANT:
                tl.store(ss_ptr + row * S_ROW + S_OFF + groups, scale, mask=groups < n_groups)
            if first:
                tl.store(sids_ptr + row * I_ROW + I_OFF + kk, tl.where(own == d, idx, -1), mask=km)
                tl.store(sw_ptr + row * W_ROW + W_OFF + kk, wv, mask=km)
        if first:
            tl.store(back_ptr + t * EP + d, tl.where(jd >= 0, row, -1))
        start += tl.where(region > 0, region, tl.load(counts_ptr + d).to(tl.int64))


@triton.jit
def _mark_padding(counts_ptr, sids_ptr, sw_ptr, first, region, I_ROW, I_OFF, W_ROW, W_OFF,
                  EP: tl.constexpr, K: tl.constexpr, K_P2: tl.constexpr, PAD_BLOCK: tl.constexpr):
    """Rows [first, first + PAD_BLOCK) of the EP regions of `region` rows: ids -1 and weights 0 for those
    past their destination's count (rows that carry no token)."""
    r = first + tl.arange(0, PAD_BLOCK)
    d = r // region
    n = tl.load(counts_ptr + d, mask=d < EP, other=0)
    pad = (d < EP) & (r - d * region >= n)
    kk = tl.arange(0, K_P2)
    m = pad[:, None] & (kk < K)[None, :]
    tl.store(sids_ptr + r[:, None] * I_ROW + I_OFF + kk[None, :], tl.full([PAD_BLOCK, K_P2], -1, tl.int32), mask=m)
    tl.store(sw_ptr + r[:, None] * W_ROW + W_OFF + kk[None, :], tl.zeros([PAD_BLOCK, K_P2], tl.float32), mask=m)


@triton.jit
def a2a_unpack_kernel(rx_ptr, rids_ptr, rw_ptr, rs_ptr, x_ptr, ids_ptr, w_ptr, s_ptr, HP, G,
                      X_ROW, X_OFF, I_ROW, I_OFF, W_ROW, W_OFF, S_ROW, S_OFF,
                      K: tl.constexpr, K_P2: tl.constexpr, G_P2: tl.constexpr, HAS_SCALES: tl.constexpr,
                      HAS_X: tl.constexpr, BLOCK_H: tl.constexpr):
    """Program (r, b): columns [b * BLOCK_H, ...) of received row r into dense x [N, HP] (HAS_X); block 0
    also copies the row's ids [N, K], weights [N, K] and scales [N, G]."""
    r = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1)
    if HAS_X:
        offs = b * BLOCK_H + tl.arange(0, BLOCK_H)
        hm = offs < HP
        tl.store(x_ptr + r * HP + offs, tl.load(rx_ptr + r * X_ROW + X_OFF + offs, mask=hm), mask=hm)
    if b == 0:
        kk = tl.arange(0, K_P2)
        km = kk < K
        tl.store(ids_ptr + r * K + kk, tl.load(rids_ptr + r * I_ROW + I_OFF + kk, mask=km), mask=km)
        tl.store(w_ptr + r * K + kk, tl.load(rw_ptr + r * W_ROW + W_OFF + kk, mask=km), mask=km)
        if HAS_SCALES:
            g = tl.arange(0, G_P2)
            gm = g < G
            tl.store(s_ptr + r * G + g, tl.load(rs_ptr + r * S_ROW + S_OFF + g, mask=gm), mask=gm)


def _field(fmt, buf: torch.Tensor, name: str) -> tuple[torch.Tensor, int, int]:
    """(the rows `buf [N, row_bytes]` viewed in field `name`'s dtype, elements per row, field offset in
    elements)."""
    f = fmt.fields[name]
    size = f.dtype.itemsize
    return buf.view(f.dtype), fmt.row_bytes // size, f.offset // size


def route_rows(topk_ids: torch.Tensor, owner: torch.Tensor, ep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each token goes: (j [ep, T] int64, the token's position among the rows for rank d, -1: not
    sent there; counts [ep] int32 rows per destination). `route_to_ranks`'s two launches, no host sync."""
    return route_to_ranks(topk_ids.to(torch.int32).contiguous(), owner, ep)


def pack_rows(fmt, send: torch.Tensor, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
              owner: torch.Tensor, index: torch.Tensor, j: torch.Tensor, counts: torch.Tensor,
              group_size: int | None = None, *, x_send: torch.Tensor | None = None,
              region: int | None = None) -> torch.Tensor:
    """Write every wire row of this rank into `send [rows, row_bytes]` (one launch) and return back [T, ep]
    int64: the row of (token, rank) in the send order (= in the combine buffer), -1 where the token was not
    sent there.

    x [T, Hp] (the `x` field's width; rows may be strided), topk ids/weights [T, k], owner/index [E] the
    placement's tables, (j, counts) from `route_rows`. FP8 formats (`fmt.quantize` set) quantize with
    `group_size` columns per scale (None: one per row), as `quantize_activations` does.
    Packed (`region` None): rows = sum(counts), destination-major. With `region` = M: ep fixed regions of M
    rows (rows past a destination's count marked routed nowhere), and the hidden vectors go to `x_send`
    [ep * M, Hp] in the wire dtype (`fmt` then has no `x` field).
    """
    T, K = topk_ids.shape
    ep = j.shape[0]
    back = torch.empty(T, ep, dtype=torch.int64, device=x.device)
    M = region or 0
    n_pad = triton.cdiv(ep * M, PAD_BLOCK)
    if T + n_pad == 0:
        return back
    HP = x_send.shape[1] if x_send is not None else fmt.fields["x"].width
    if x.dim() != 2 or x.shape[1] != HP:
        raise ValueError(f"pack_rows: x must be [T, {HP}] (the wire's x width), got {list(x.shape)}")
    if (x_send is not None) != bool(M) or (x_send is not None and tuple(x_send.shape) != (ep * M, HP)):
        raise ValueError(f"pack_rows: a capacity (region={region}) goes with x_send [{ep * M}, {HP}]")
    if x.stride(-1) != 1:
        x = x.contiguous()
    quant = fmt.quantize is not None
    if quant:
        g = HP if group_size is None else group_size
        n_groups = scale_groups(HP, group_size)
        if n_groups != fmt.fields["scales"].width:
            raise ValueError(f"pack_rows: {n_groups} scales per row for group_size={group_size}, but the wire "
                             f"carries {fmt.fields['scales'].width}")
        block = triton.next_power_of_2(g)
        groups = max(1, min(triton.next_power_of_2(n_groups), 4096 // block))
    else:
        g = block = min(pow2(HP), COPY_BLOCK)
        n_groups = ceil_div(HP, g)
        groups = 1
    sx, x_row, x_off = _field(fmt, send, "x") if x_send is None else (x_send, HP, 0)
    sids, i_row, i_off = _field(fmt, send, "ids")
    sw, w_row, w_off = _field(fmt, send, "weights")
    ss, s_row, s_off = _field(fmt, send, "scales") if quant else (sw, 0, 0)
    grid = (T + n_pad, triton.cdiv(n_groups, groups))
    a2a_pack_kernel[grid](
        x, topk_ids.to(torch.int32).contiguous(), topk_weights.float().contiguous(), owner, index, j, counts, back,
        sx, sids, sw, ss, T, HP, x.stride(0), n_groups, M, x_row, x_off, i_row, i_off, w_row, w_off, s_row, s_off,
        EP=ep, K=K, K_P2=pow2(K), QUANT=quant, GROUP=g, BLOCK=block, GROUPS=groups, PAD_BLOCK=PAD_BLOCK,
        num_warps=8 if block * groups >= 4096 else 4)
    return back


def unpack_rows(fmt, recv: torch.Tensor):
    """Received rows `recv [N, row_bytes]` -> dense fields (x, ids, weights, scales; None for a field the
    format lacks), one launch: what `unpack_tokens(fmt, recv, contiguous=True)` gives, without a copy per
    field."""
    N = recv.shape[0]
    fx, fi, fw = fmt.fields.get("x"), fmt.fields["ids"], fmt.fields["weights"]
    fs = fmt.fields.get("scales")
    dev = recv.device
    x = None if fx is None else torch.empty(N, fx.width, dtype=fx.dtype, device=dev)
    ids = torch.empty(N, fi.width, dtype=fi.dtype, device=dev)
    w = torch.empty(N, fw.width, dtype=fw.dtype, device=dev)
    s = None if fs is None else torch.empty(N, fs.width, dtype=fs.dtype, device=dev)
    if N:
        rids, i_row, i_off = _field(fmt, recv, "ids")
        rx, x_row, x_off = _field(fmt, recv, "x") if fx is not None else (rids, 0, 0)
        rw, w_row, w_off = _field(fmt, recv, "weights")
        rs, s_row, s_off = _field(fmt, recv, "scales") if fs is not None else (rw, 0, 0)
        HP = fx.width if fx is not None else 1
        block = min(pow2(HP), COPY_BLOCK)
        G = fs.width if fs is not None else 1
        a2a_unpack_kernel[(N, triton.cdiv(HP, block))](
            rx, rids, rw, rs, ids if x is None else x, ids, w, w if s is None else s, HP, G,
            x_row, x_off, i_row, i_off, w_row, w_off, s_row, s_off,
            K=fi.width, K_P2=pow2(fi.width), G_P2=pow2(G), HAS_SCALES=fs is not None, HAS_X=fx is not None,
            BLOCK_H=block, num_warps=4)
    return x, ids, w, s


key_callees_first(globals())     # each Triton function keyed after those it calls: one key in every process
