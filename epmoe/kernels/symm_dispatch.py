"""Triton kernels of the GPU-initiated dispatchers: rows stored straight into the peers' symmetric buffers.

Every rank of the group owns one buffer of the same layout (`epmoe.dispatch.symm_workspace`); a kernel
reaches a peer's copy of a region through the byte distance between the two buffers (`deltas [ep]`
int64: peer base minus own base, a multiple of 16), so one typed pointer to the local region and a
table of distances address every rank. A store through such a pointer crosses NVLink (or PCIe peer
access) with no host involvement.

Synchronisation is by epochs: every forward phase has a device counter; a sender stores its epoch into
the receiver's flag slot with release semantics at system scope after its data, and a receiver spins on
its flags with acquire semantics until all equal the epoch, for at most `timeout_ns` (then it sets a bit
in its status word, marks its published header failed, and returns instead of spinning forever). Flags
never need resetting in step: an old epoch simply does not match. After a timeout the ranks' epochs may
differ (a rank that skipped a forward did not advance); `SymmWorkspace.reset` (every rank, through
`resync()`) zeroes the counters, flags and headers so that they agree again.

The kernels also run under the Triton interpreter on CPU tensors (`TRITON_INTERPRET=1`), with the
"peers" being other CPU buffers of the same process: that is how the offset and layout logic is tested
without GPUs (the wait then counts spins instead of reading the GPU's clock).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .fp8_quant import fp8_quantize_groups
from .token_rows import pow2, programs  # noqa: F401  (programs: the dispatchers launch through it)
from .jit_keys import key_callees_first

# status word bits (int32, one per rank, sticky until the host reads and clears it)
TIMEOUT = tl.constexpr(1)          # a peer's flag did not arrive within the timeout
MISMATCH = tl.constexpr(2)         # a peer's header names another layer, layer kind or forward
OVERFLOW = tl.constexpr(4)         # a peer passed more tokens than the fixed capacity
FAILED = tl.constexpr(8)           # a peer could not compute this forward (its own error is raised there)
SLOT_OVERFLOW = tl.constexpr(16)   # more rows arrived for one expert than its capacity (dispatch without combine)
COLLECTIVE_PEER = tl.constexpr(32) # a peer is in a collective dispatcher's forward of this forward number
# set by the host, not the kernels, when this rank (or a peer it heard from) gave a forward up on a timeout;
# kept until `SymmWorkspace.reset` (every rank's resync()): the forwards that still run, CUDA graph replays
# the host cannot refuse, send no row and no count, publish their headers failed and output NaN
RESET_PENDING = tl.constexpr(64)
REFUSED = tl.constexpr(128)        # this rank ran a forward (a replay) while RESET_PENDING was set
PEER_GAVE_UP = tl.constexpr(256)   # a peer's header says it gave this forward up on a timeout (FAILED too)
# the bits after which a rank stops this forward: no more waits, no row to the peers
STOPS_FORWARD = tl.constexpr(TIMEOUT.value | MISMATCH.value | FAILED.value | COLLECTIVE_PEER.value
                             | RESET_PENDING.value)
# a header's `failed` column: 1 this rank could not compute the forward (its input), GAVE_UP it gave the
# forward up on a timeout or waits for resync() (every rank then needs resync())
GAVE_UP = tl.constexpr(2)

# header columns (int32); the high-throughput dispatcher appends its per-destination row counts
H_FINGERPRINT, H_LAYER, H_FORWARD, H_TOKENS, H_FAILED = (tl.constexpr(i) for i in range(5))
HEADER_BASE = tl.constexpr(5)    # len(epmoe.dispatch.header.FIELDS): the row counts follow


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _clock_ns():
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False,
                                     pack=1)


@triton.jit
def exchange_flags_kernel(flags_ptr, heads_ptr, counts_ptr, deltas_ptr, counter_ptr, epoch_ptr, status_ptr, zero_ptr,
                          coll_ptr, poison_ptr,
                          rank, fingerprint, layer, forward, tokens, failed, max_tokens, timeout_ns, n_zero,
                          n_poison, poison_value,
                          EP: tl.constexpr, EP_P2: tl.constexpr, HW: tl.constexpr, HW_P2: tl.constexpr,
                          HAS_COUNTS: tl.constexpr, PUBLISH: tl.constexpr, WAIT: tl.constexpr,
                          ADVANCE: tl.constexpr, CHECK_HEADS: tl.constexpr, TIMED: tl.constexpr,
                          MAX_SPINS: tl.constexpr, ZERO_BLOCK: tl.constexpr):
    """One program: publish this rank's header and epoch to every rank (PUBLISH), then wait for
    everyone's (WAIT); on the GPU both in one launch, in a simulation in two.

    flags_ptr [EP] int32 and heads_ptr [EP, HW] int32 are this rank's slots of one phase (row r is
    written by rank r). The header is (fingerprint, layer, forward, tokens, failed) followed by this
    rank's row count per destination (counts_ptr [EP], HAS_COUNTS) or zeros. A forward's epoch: the
    first exchange of a forward (ADVANCE) increments the counter at counter_ptr (so a graph replay
    advances it too) and writes the new value at epoch_ptr, the forward's slot; its later exchanges read
    it there. A wait ends early when this rank's status word already holds an error (a peer of another
    layer, a failed peer, a timeout): the forward is lost anyway, and every rank reaches the end fast. Before publishing, `n_zero` int32 at zero_ptr are cleared (the
    low-latency combine resets its expert counters there, after the data kernel has read them and
    before any peer may count into them again).

    coll_ptr [EP] int32: the collective markers (`mark_collective`): a peer whose marker equals this
    forward's number waits in a collective dispatcher's header exchange, not on these flags; the wait
    ends at once with COLLECTIVE_PEER (the host then joins that exchange: `SymmDispatcher`).

    A rank whose wait times out publishes its row of that phase again with `failed` = GAVE_UP (and its
    later phases carry it too), so a peer that comes late raises FAILED at once, in whichever phase it
    reads it, instead of pairing with a forward this rank has left (PEER_GAVE_UP tells it that every rank
    now needs resync()); `failed` is checked in every phase. A rank whose status word holds RESET_PENDING
    (a CUDA graph replayed while it waits for resync()) publishes GAVE_UP in every phase, waits for no
    one and sets REFUSED.

    After the wait, if this rank's status word holds any bit, `n_poison` int32 at poison_ptr are set to
    `poison_value`: the routing the experts are about to read (the high-throughput batch's ids: -1, the
    low-latency counts: 0) may come from another layer's layout or a forward that never happened, and
    must not make the experts index out of range; the forward's output is NaN anyway.
    """
    r = tl.arange(0, EP_P2)
    rm = r < EP
    c = tl.arange(0, HW_P2)
    cm = c < HW
    mine = tl.where(c == H_FINGERPRINT, fingerprint, 0)
    mine = tl.where(c == H_LAYER, layer, mine)
    mine = tl.where(c == H_FORWARD, forward, mine)
    mine = tl.where(c == H_TOKENS, tokens, mine)
    # a rank that timed out earlier in this forward says so in its later phases (and one that waits for
    # resync() in all of them): a peer that comes late then fails at once instead of taking this forward
    # for complete
    pending = (tl.load(status_ptr) & RESET_PENDING) != 0
    gave_up = (tl.load(status_ptr) & (TIMEOUT | RESET_PENDING)) != 0
    mine = tl.where(c == H_FAILED, tl.where(gave_up, GAVE_UP, failed), mine)
    if HAS_COUNTS:
        cnt = tl.load(counts_ptr + (c - HEADER_BASE), mask=cm & (c >= HEADER_BASE), other=0)
        mine = tl.where(c >= HEADER_BASE, cnt, mine)
    if PUBLISH:
        if ADVANCE:
            e = tl.load(counter_ptr) + 1
            tl.store(counter_ptr, e)
            tl.store(epoch_ptr, e)
        else:
            e = tl.load(epoch_ptr)
        for start in range(0, n_zero, ZERO_BLOCK):
            z = start + tl.arange(0, ZERO_BLOCK)
            tl.store(zero_ptr + z, tl.zeros([ZERO_BLOCK], dtype=tl.int32), mask=z < n_zero)
        delta = tl.multiple_of(tl.load(deltas_ptr + r, mask=rm, other=0), 16) // 4   # int32 elements
        dst = heads_ptr + delta[:, None] + rank * HW + c[None, :]
        tl.store(dst, tl.broadcast_to(mine[None, :], [EP_P2, HW_P2]), mask=rm[:, None] & cm[None, :])
        tl.debug_barrier()
        tl.atomic_xchg(flags_ptr + delta + rank, tl.broadcast_to(e, [EP_P2]), mask=rm, sem="release",
                       scope="sys")
    if WAIT:
        e = tl.load(epoch_ptr)
        seen = tl.atomic_add(flags_ptr + r, 0, mask=rm, sem="acquire", scope="sys")
        missing = tl.sum(tl.where(rm & (seen != e), 1, 0), 0)
        early = (tl.load(status_ptr) & STOPS_FORWARD != 0).to(tl.int32)
        late = early
        mark = tl.atomic_add(coll_ptr + r, 0, mask=rm, sem="acquire", scope="sys")
        coll = tl.sum(tl.where(rm & (r != rank) & (mark == forward), 1, 0), 0)
        if TIMED:
            t0 = _clock_ns()
        spins = 0
        while (missing > 0) & (late == 0) & (coll == 0):
            seen = tl.atomic_add(flags_ptr + r, 0, mask=rm, sem="acquire", scope="sys")
            missing = tl.sum(tl.where(rm & (seen != e), 1, 0), 0)
            mark = tl.atomic_add(coll_ptr + r, 0, mask=rm, sem="acquire", scope="sys")
            coll = tl.sum(tl.where(rm & (r != rank) & (mark == forward), 1, 0), 0)
            if TIMED:
                late = (_clock_ns() - t0 > timeout_ns).to(tl.int32)
            else:
                spins += 1
                late = (spins > MAX_SPINS).to(tl.int32)
        tl.debug_barrier()
        bits = tl.where((missing > 0) & (early == 0) & (coll == 0), TIMEOUT, 0)
        bits = bits | tl.where((missing > 0) & (early == 0) & (coll > 0), COLLECTIVE_PEER, 0)
        heads = tl.load(heads_ptr + r[:, None] * HW + c[None, :], mask=rm[:, None] & cm[None, :], other=0)
        col = tl.broadcast_to(c[None, :], [EP_P2, HW_P2])
        arrived = tl.broadcast_to(((seen == e) & rm)[:, None], [EP_P2, HW_P2])
        failed_any = arrived & (col == H_FAILED) & (heads != 0)       # every phase: a peer that gave up
        bits = bits | tl.where(tl.sum(tl.sum(failed_any.to(tl.int32), 1), 0) > 0, FAILED, 0)
        gone_any = arrived & (col == H_FAILED) & (heads == GAVE_UP)
        bits = bits | tl.where(tl.sum(tl.sum(gone_any.to(tl.int32), 1), 0) > 0, PEER_GAVE_UP, 0)
        bits = bits | tl.where(pending, REFUSED, 0)
        if CHECK_HEADS:
            differs = arrived & (col < H_TOKENS) & (heads != mine[None, :])
            over = arrived & (col == H_TOKENS) & (heads > max_tokens)
            bits = bits | tl.where(tl.sum(tl.sum(differs.to(tl.int32), 1), 0) > 0, MISMATCH, 0)
            bits = bits | tl.where(tl.sum(tl.sum(over.to(tl.int32), 1), 0) > 0, OVERFLOW, 0)
        if (bits & TIMEOUT) != 0:
            # this rank gives the forward up: its row of this phase, published before the wait, is
            # published again marked failed, so a peer that comes late raises at once instead of pairing
            # with a forward this rank left (and later phases say failed too: gave_up above)
            delta = tl.multiple_of(tl.load(deltas_ptr + r, mask=rm, other=0), 16) // 4
            gone = tl.where(c == H_FAILED, GAVE_UP, mine)
            tl.store(heads_ptr + delta[:, None] + rank * HW + c[None, :],
                     tl.broadcast_to(gone[None, :], [EP_P2, HW_P2]), mask=rm[:, None] & cm[None, :])
            tl.debug_barrier()
            tl.atomic_xchg(flags_ptr + delta + rank, tl.broadcast_to(e, [EP_P2]), mask=rm, sem="release",
                           scope="sys")
        old = tl.atomic_or(status_ptr, bits)
        if (old | bits) != 0:
            for start in range(0, n_poison, ZERO_BLOCK):
                z = start + tl.arange(0, ZERO_BLOCK)
                tl.store(poison_ptr + z, tl.full([ZERO_BLOCK], 0, tl.int32) + poison_value, mask=z < n_poison)


def exchange_flags(ws, phase: str, slot: int, header: list[int], timeout_s: float,
                   counts: torch.Tensor | None = None, max_tokens: int = 2 ** 30, check_heads: bool = True,
                   zero: torch.Tensor | None = None, publish: bool = True, wait: bool = True,
                   poison: tuple[torch.Tensor, int] | None = None) -> None:
    """Publish the header (fingerprint, layer, forward, tokens, failed [+ `counts` [ep] int32]) and the
    next epoch of phase `phase` in slot `slot` of workspace `ws` to every rank (`publish`), and wait for
    every rank's (`wait`), checking their headers against this one.

    ws.epochs: [1 + slots] int32 on the device: the forward counter, then each slot's current epoch (the
    "count" phase, every forward's first exchange, advances it; the later phases use it). Waiting ends
    after `timeout_s` at the latest, with the TIMEOUT bit set in `ws.status`; header checks set MISMATCH
    (fingerprint, layer or forward differ), OVERFLOW (tokens > max_tokens) or FAILED. `zero`: int32
    cleared before publishing; `poison` (int32 tensor, value): filled with value after the wait when the
    status word holds any bit.
    """
    epochs, status = ws.epochs, ws.status
    flags, heads = ws.control_view(slot, f"flags.{phase}"), ws.control_view(slot, f"heads.{phase}")
    coll = ws.control_view(0, "collective")
    hw = heads.shape[1]
    n_zero = 0 if zero is None else zero.numel()
    poison_t, poison_value = (status, 0) if poison is None else poison
    n_poison = 0 if poison is None else poison_t.numel()
    timed = not interpreted()
    fp, layer, forward, tokens, failed = (int(v) for v in header)
    exchange_flags_kernel[(1,)](
        flags, heads, status if counts is None else counts, ws.deltas, epochs[0:], epochs[1 + slot:], status,
        status if zero is None else zero, coll, poison_t, ws.rank, fp, layer, forward, tokens, failed, max_tokens,
        int(timeout_s * 1e9), n_zero, n_poison, int(poison_value),
        EP=ws.ep, EP_P2=triton.next_power_of_2(ws.ep), HW=hw, HW_P2=triton.next_power_of_2(hw),
        HAS_COUNTS=counts is not None, PUBLISH=publish, WAIT=wait, ADVANCE=phase == "count",
        CHECK_HEADS=check_heads, TIMED=timed,
        MAX_SPINS=0 if timed else 64, ZERO_BLOCK=256, num_warps=1)


@triton.jit
def mark_collective_kernel(coll_ptr, deltas_ptr, rank, forward, EP: tl.constexpr, EP_P2: tl.constexpr):
    """Store `forward` at collective[rank] in every rank's control block (release, system scope)."""
    r = tl.arange(0, EP_P2)
    rm = r < EP
    delta = tl.multiple_of(tl.load(deltas_ptr + r, mask=rm, other=0), 16) // 4
    tl.atomic_xchg(coll_ptr + delta + rank, tl.full([EP_P2], 0, tl.int32) + forward, mask=rm, sem="release",
                   scope="sys")


def mark_collective(ws, forward: int) -> None:
    """This rank enters the collective header exchange of forward `forward` (int32): tell every peer's
    symmetric-memory waits (`exchange_flags_kernel`, coll_ptr)."""
    mark_collective_kernel[(1,)](ws.control_view(0, "collective"), ws.deltas, ws.rank, int(forward) % 2 ** 31,
                                 EP=ws.ep, EP_P2=triton.next_power_of_2(ws.ep), num_warps=1)


# ------------------------------------------------------------------------------------ high throughput
@triton.jit
def ht_dispatch_kernel(x_ptr, xs_ptr, ids_ptr, owner_ptr, index_ptr, w_ptr, j_ptr, mtx_ptr, back_ptr,
                       rx_ptr, rxs_ptr, rids_ptr, rw_ptr, deltas_ptr, status_ptr, rank, T, H, G, rows, n_items,
                       EP: tl.constexpr, HW: tl.constexpr, K: tl.constexpr, X_ITEM: tl.constexpr,
                       BLOCK_H: tl.constexpr, K_P2: tl.constexpr, G_P2: tl.constexpr, HAS_SCALES: tl.constexpr,
                       PAD_BLOCK: tl.constexpr, QUANT: tl.constexpr, GROUP: tl.constexpr, PULL: tl.constexpr):
    """Item (t < T, s) stores columns s * BLOCK_H, s * BLOCK_H + SPLIT * BLOCK_H, ... (SPLIT =
    programs along axis 1) of token t's row into the receive buffer of every rank it goes to, program
    (t, 0) its routing too; programs (t >= T, 0) mark this rank's receive rows past those that arrive as
    routed nowhere (ids -1).

    x [T, H] (wire dtype), xs [T, G] float32 scales (FP8), or with QUANT x in high precision, quantized
    here to the wire's FP8 with one scale per GROUP columns (the formula of `epmoe.kernels.fp8_quant`,
    bit for bit; BLOCK_H a multiple of GROUP), ids [T, K] global expert ids, owner/index [E]
    int32 (rank of each expert, its index there), w [T, K] float32, j [EP, T] int64 (the token's index
    among this rank's rows for that destination, -1: not there). mtx [EP, HW] int32: every rank's header,
    whose columns HEADER_BASE.. hold its row count per destination: this rank's rows start in rank d's
    buffer after those of lower ranks. back [T, EP] int64 (-1: not sent there, or past the region): with
    PULL the token's row on rank d (where the pull combine reads d's result for it), else its row in this
    rank's own combine region (its rows for d after its rows for lower d: where d's push combine stores
    the result). rx/rxs/rids/rw: this rank's receive regions of `rows` rows (the peers' are at the same
    offsets from their bases); a row past them sets OVERFLOW instead of landing.

    Items t < n_items (T tokens, then the padding blocks) go to the programs along axis 0 in turn, so a grid
    of fewer programs than items (`programs`: the plan's comm_sms) moves them all on that many SMs.
    """
    part = tl.program_id(1)
    for t in range(tl.program_id(0), n_items, tl.num_programs(0)):
        if t >= T:
            if part == 0:
                received = 0
                for s in tl.static_range(EP):
                    received += tl.load(mtx_ptr + s * HW + HEADER_BASE + rank)
                r = received + (t - T) * PAD_BLOCK + tl.arange(0, PAD_BLOCK)
                kk = tl.arange(0, K_P2)
                rr = r.to(tl.int64)[:, None] * K + kk[None, :]
                tl.store(rids_ptr + rr, tl.full([PAD_BLOCK, K_P2], -1, tl.int32),
                         mask=(r < rows)[:, None] & (kk < K)[None, :])
        else:
            _ht_store_token(x_ptr, xs_ptr, ids_ptr, owner_ptr, index_ptr, w_ptr, j_ptr, mtx_ptr, back_ptr, rx_ptr,
                            rxs_ptr, rids_ptr, rw_ptr, deltas_ptr, status_ptr, rank, tl.cast(t, tl.int64), part,
                            tl.num_programs(1), T, H, G, rows, EP, HW, K, X_ITEM, BLOCK_H, K_P2, G_P2, HAS_SCALES,
                            QUANT, GROUP, PULL)


@triton.jit
def _row_on(j_ptr, mtx_ptr, row, T, rank, d: tl.constexpr, EP: tl.constexpr, HW: tl.constexpr):
    """(the token's index among this rank's rows for rank d or -1, its row in rank d's receive buffer):
    this rank's rows land after those of lower ranks (their counts: mtx[s, HEADER_BASE + d])."""
    jd = tl.load(j_ptr + d * T + row)
    start = jd * 0
    for s in tl.static_range(EP):
        start += tl.where(s < rank, tl.load(mtx_ptr + s * HW + HEADER_BASE + d), 0)
    return jd, start + jd


@triton.jit
def _ht_store_token(x_ptr, xs_ptr, ids_ptr, owner_ptr, index_ptr, w_ptr, j_ptr, mtx_ptr, back_ptr, rx_ptr,
                    rxs_ptr, rids_ptr, rw_ptr, deltas_ptr, status_ptr, rank, row, part, parts, T, H, G, rows,
                    EP: tl.constexpr, HW: tl.constexpr, K: tl.constexpr, X_ITEM: tl.constexpr,
                    BLOCK_H: tl.constexpr, K_P2: tl.constexpr, G_P2: tl.constexpr, HAS_SCALES: tl.constexpr,
                    QUANT: tl.constexpr, GROUP: tl.constexpr, PULL: tl.constexpr):
    # nothing goes to the peers once this rank knows the forward failed (another layer's layout there)
    ok = (tl.load(status_ptr) & STOPS_FORWARD) == 0
    for h0 in range(part * BLOCK_H, H, parts * BLOCK_H):
        offs = h0 + tl.arange(0, BLOCK_H)
        hm = offs < H
        v = tl.load(x_ptr + row * H + offs, mask=hm, other=0.0)
        if QUANT:        # zeros past the row's end change no group's amax
            q, scale = fp8_quantize_groups(tl.reshape(v.to(tl.float32), [BLOCK_H // GROUP, GROUP]))
            v = tl.reshape(q, [BLOCK_H]).to(rx_ptr.dtype.element_ty)
            gi = h0 // GROUP + tl.arange(0, BLOCK_H // GROUP)
        for d in tl.static_range(EP):
            jd, p = _row_on(j_ptr, mtx_ptr, row, T, rank, d, EP, HW)
            if (jd >= 0) & (p < rows) & ok:
                delta = tl.multiple_of(tl.load(deltas_ptr + d), 16) // X_ITEM
                tl.store(rx_ptr + delta + p * H + offs, v, mask=hm)
                if QUANT:
                    delta4 = tl.multiple_of(tl.load(deltas_ptr + d), 16) // 4
                    tl.store(rxs_ptr + delta4 + p * G + gi, scale, mask=gi < G)
    if part > 0:
        return
    k = tl.arange(0, K_P2)
    km = k < K
    wv = tl.load(w_ptr + row * K + k, mask=km)
    e = tl.load(ids_ptr + row * K + k, mask=km, other=0)
    own = tl.load(owner_ptr + e, mask=km, other=-1)
    idx = tl.load(index_ptr + e, mask=km, other=-1)
    if HAS_SCALES:
        g = tl.arange(0, G_P2)
        gm = g < G
        sv = tl.load(xs_ptr + row * G + g, mask=gm)
    send_off = row * 0
    for d in tl.static_range(EP):
        jd, p = _row_on(j_ptr, mtx_ptr, row, T, rank, d, EP, HW)
        if PULL:     # the row on rank d, where the pull combine reads the token's result from
            tl.store(back_ptr + row * EP + d, tl.where((jd >= 0) & (p < rows), p, -1))
        else:        # the row in this rank's own combine region, where rank d stores the result
            tl.store(back_ptr + row * EP + d, tl.where(jd >= 0, send_off + jd, -1))
            send_off += tl.load(mtx_ptr + rank * HW + HEADER_BASE + d)
        if (jd >= 0) & (p < rows) & ok:
            delta4 = tl.multiple_of(tl.load(deltas_ptr + d), 16) // 4
            tl.store(rids_ptr + delta4 + p * K + k, tl.where(own == d, idx, -1), mask=km)
            tl.store(rw_ptr + delta4 + p * K + k, wv, mask=km)
            if HAS_SCALES:
                tl.store(rxs_ptr + delta4 + p * G + g, sv, mask=gm)
        if (jd >= 0) & (p >= rows):
            tl.atomic_or(status_ptr, OVERFLOW)


@triton.jit
def ht_combine_kernel(y_ptr, mtx_ptr, out_ptr, deltas_ptr, status_ptr, rank, H, rows, N,
                      EP: tl.constexpr, HW: tl.constexpr, ITEM: tl.constexpr, BLOCK_H: tl.constexpr):
    """The push combine (`HTLaunch(combine_pull=False)`; the default pull combine is `gather_sum` over the
    peers' buffers). Programs along axis 0 take the received rows q < N in turn (`programs`); program
    (q, s) stores columns s * BLOCK_H, s * BLOCK_H + SPLIT * BLOCK_H, ... of received row q of y [N, H] back
    into its source's combine region `out`, at the row the source's send order gives it (destination-major:
    after its rows for lower ranks); the source sums them afterwards.

    mtx [EP, HW] int32: every rank's header with its per-destination row counts (HEADER_BASE..). Nothing
    is stored past the `rows` rows of the region, nor at all once this rank's status word says the
    forward failed (the counts may then be another layer's).
    """
    for q in range(tl.program_id(0), N, tl.num_programs(0)):
        _ht_combine_row(y_ptr, mtx_ptr, out_ptr, deltas_ptr, status_ptr, rank, H, rows, tl.cast(q, tl.int64), EP, HW, ITEM,
                        BLOCK_H)


@triton.jit
def _ht_combine_row(y_ptr, mtx_ptr, out_ptr, deltas_ptr, status_ptr, rank, H, rows, q, EP: tl.constexpr,
                    HW: tl.constexpr, ITEM: tl.constexpr, BLOCK_H: tl.constexpr):
    acc = q * 0
    src = q * 0
    first = q * 0
    for s in tl.static_range(EP):
        n_s = tl.load(mtx_ptr + s * HW + HEADER_BASE + rank).to(tl.int64)
        hit = (q >= acc) & (q < acc + n_s)
        src = tl.where(hit, s, src)
        first = tl.where(hit, acc, first)
        acc += n_s
    base = q * 0
    for d in tl.static_range(EP):
        base += tl.where(d < rank, tl.load(mtx_ptr + src * HW + HEADER_BASE + d), 0)
    dst = base + (q - first)
    delta = tl.multiple_of(tl.load(deltas_ptr + src), 16) // ITEM
    ok = (tl.load(status_ptr) & STOPS_FORWARD) == 0
    if (q < acc) & (dst < rows) & ok:      # rows past what arrived (a whole-capacity batch) go nowhere
        for h0 in range(tl.program_id(1) * BLOCK_H, H, tl.num_programs(1) * BLOCK_H):
            offs = h0 + tl.arange(0, BLOCK_H)
            hm = offs < H
            v = tl.load(y_ptr + q * H + offs, mask=hm)
            tl.store(out_ptr + delta + dst * H + offs, v, mask=hm)


# --------------------------------------------------------------------------------------- low latency
@triton.jit
def ll_dispatch_kernel(x_ptr, xs_ptr, ids_ptr, owner_ptr, index_ptr, rx_ptr, rxs_ptr, counts_ptr, meta_ptr,
                       deltas_ptr, status_ptr, rank, M, C, H, G, K, n_items,
                       X_ITEM: tl.constexpr, BLOCK_H: tl.constexpr, G_P2: tl.constexpr,
                       HAS_SCALES: tl.constexpr):
    """Item i = (token t, slot k) < n_items, taken by the programs in turn (`programs`): claim a row of
    expert ids[t, k] on its owner (an atomic on the owner's counter) and store the token there, with its
    origin (rank, t, k) beside it.

    Receive regions (same offsets on every rank): rx [L, C, H], rxs [L, C, G], counts [L] int32,
    meta [L, C] int32 = (source rank * M + t) * K + k.
    """
    # nothing, not even a counter claim, from a rank that waits for resync() (a replay: out of step)
    n_items = tl.where((tl.load(status_ptr) & RESET_PENDING) == 0, n_items, 0)
    for i in range(tl.program_id(0), n_items, tl.num_programs(0)):
        _ll_dispatch_item(x_ptr, xs_ptr, ids_ptr, owner_ptr, index_ptr, rx_ptr, rxs_ptr, counts_ptr, meta_ptr,
                          deltas_ptr, status_ptr, rank, M, C, H, G, K, i, X_ITEM, BLOCK_H, G_P2, HAS_SCALES)


@triton.jit
def _ll_dispatch_item(x_ptr, xs_ptr, ids_ptr, owner_ptr, index_ptr, rx_ptr, rxs_ptr, counts_ptr, meta_ptr,
                      deltas_ptr, status_ptr, rank, M, C, H, G, K, i, X_ITEM: tl.constexpr, BLOCK_H: tl.constexpr,
                      G_P2: tl.constexpr, HAS_SCALES: tl.constexpr):
    t = i // K
    k = i % K
    e = tl.load(ids_ptr + i)
    d = tl.load(owner_ptr + e)
    le = tl.load(index_ptr + e)
    delta4 = tl.multiple_of(tl.load(deltas_ptr + d), 16) // 4
    slot = tl.atomic_add(counts_ptr + delta4 + le, 1, sem="relaxed", scope="sys")
    if slot < C:
        dest = le.to(tl.int64) * C + slot
        tl.store(meta_ptr + delta4 + dest, (rank * M + t) * K + k)
        delta = tl.multiple_of(tl.load(deltas_ptr + d), 16) // X_ITEM
        for h0 in range(0, H, BLOCK_H):
            offs = h0 + tl.arange(0, BLOCK_H)
            hm = offs < H
            v = tl.load(x_ptr + tl.cast(t, tl.int64) * H + offs, mask=hm)
            tl.store(rx_ptr + delta + dest * H + offs, v, mask=hm)
        if HAS_SCALES:
            g = tl.arange(0, G_P2)
            gm = g < G
            sv = tl.load(xs_ptr + tl.cast(t, tl.int64) * G + g, mask=gm)
            tl.store(rxs_ptr + delta4 + dest * G + g, sv, mask=gm)
    else:
        tl.atomic_or(status_ptr, SLOT_OVERFLOW)


@triton.jit
def ll_combine_kernel(y_ptr, counts_ptr, meta_ptr, out_ptr, deltas_ptr, status_ptr, M, C, H, K, L,
                      ITEM: tl.constexpr, BLOCK_H: tl.constexpr, SPLIT: tl.constexpr):
    """Program (expert le, j) sends rows c = j, j + SPLIT, ... < counts[le] of y [L, C, H] back to their
    origin: row (t, k) of the source rank's region out [M, K, H] (programs along axis 0 take the L experts
    in turn: `programs`). Nothing once this rank's status word says the forward failed (the origins may
    then be another layer's)."""
    for le in range(tl.program_id(0), L, tl.num_programs(0)):
        _ll_combine_expert(y_ptr, counts_ptr, meta_ptr, out_ptr, deltas_ptr, status_ptr, M, C, H, K,
                           tl.cast(le, tl.int64), tl.program_id(1), ITEM, BLOCK_H, SPLIT)


@triton.jit
def _ll_combine_expert(y_ptr, counts_ptr, meta_ptr, out_ptr, deltas_ptr, status_ptr, M, C, H, K, le, j,
                       ITEM: tl.constexpr, BLOCK_H: tl.constexpr, SPLIT: tl.constexpr):
    ok = (tl.load(status_ptr) & STOPS_FORWARD) == 0
    n = tl.where(ok, tl.minimum(tl.load(counts_ptr + le), C), 0)
    for c in range(j, n, SPLIT):
        m = tl.load(meta_ptr + le * C + c)
        s = m // (M * K)
        tk = (m % (M * K)).to(tl.int64)
        delta = tl.multiple_of(tl.load(deltas_ptr + s), 16) // ITEM
        for h0 in range(0, H, BLOCK_H):
            offs = h0 + tl.arange(0, BLOCK_H)
            hm = offs < H
            v = tl.load(y_ptr + (le * C + c) * H + offs, mask=hm)
            tl.store(out_ptr + delta + tk * H + offs, v, mask=hm)


PAD_BLOCK = 256          # receive rows one program of the high-throughput dispatch marks as routed nowhere


def row_block(H: int) -> int:
    """Columns one program moves per step: whole rows up to 8192 elements."""
    return min(triton.next_power_of_2(max(H, 16)), 8192)


key_callees_first(globals())     # each Triton function keyed after those it calls: one key in every process
