#!/usr/bin/env python3
"""Lane-by-lane emulation of src/backend/cuda/kernels/attention_prefill.cu (no GPU needed).

The tensor-core instructions are emulated from their PTX ISA definitions, independently of the
kernel's own reading of them:
  ldmatrix.m8n8.x4[.trans].b16: lanes 8i..8i+7 address rows 0..7 of matrix i (16 bytes each);
    register i of lane l = row l/4, columns 2(l%4), 2(l%4)+1 of matrix i ([.trans]: rows 2(l%4),
    2(l%4)+1 of column l/4).
  mma.m16n8k16.row.col (16-bit inputs, f32 accumulators), g = lane/4, t = lane%4, e in {0,1}:
    A[g][2t+e] = a0.e, A[g+8][2t+e] = a1.e, A[g][2t+8+e] = a2.e, A[g+8][2t+8+e] = a3.e
    B[2t+e][g] = b0.e, B[2t+8+e][g] = b1.e
    C[g][2t+e] = c_e, C[g+8][2t+e] = c_{2+e}
The kernel's control flow and index math are transcribed statement by statement (same names), with
every thread of a block emulated; cp.async copies land when issued, and a hazard check by shared
region (Q, K, V, the two slot tables) makes sure nothing is read before a wait and a barrier have
published it, and that no barrier interval both writes and reads a region. Shared memory starts as
NaN (and the slot tables as garbage), so a read of anything not written shows up. Checks: ldmatrix phases are bank-conflict free;
every fragment element is defined exactly once; the output equals a plain causal softmax attention
(f64) within the rounding of P and of the output to bf16 / f16.

Usage: python3 scripts/fa_prefill_sim.py [--quick]
"""
import sys
import numpy as np

BQ, BK, WARPS, PAD = 64, 64, 4, 8
THREADS = WARPS * 32
LANE = np.arange(32)
G, T4 = LANE >> 2, LANE & 3


def round_to(x, dtype):
    x = np.asarray(x, dtype=np.float32)
    if dtype == "f16":
        return x.astype(np.float16).astype(np.float32)
    u = x.view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000  # round to nearest even
    return u.astype(np.uint32).view(np.float32)


# ---- instruction emulation (from the PTX definitions) ----

def ldsm_x4(smem, addr, trans):
    """addr: byte addresses [32]. Returns 4 registers, each [32, 2] (low, high half)."""
    assert addr.shape == (32,) and (addr % 16 == 0).all(), "ldmatrix rows must be 16-byte aligned"
    regs = []
    for i in range(4):
        rows_addr = addr[8 * i:8 * i + 8]
        # Bank conflicts: one phase reads 8 rows of 16 bytes; conflict-free iff the 8 rows fall in
        # 8 different 16-byte bank groups of the 128-byte bank window.
        assert len(set(((rows_addr // 16) % 8).tolist())) == 8, f"bank conflict in ldmatrix matrix {i}: {rows_addr}"
        mat = np.stack([smem[a // 2:a // 2 + 8] for a in rows_addr])  # [8 rows][8 cols]
        if trans:
            reg = np.stack([mat[2 * T4, G], mat[2 * T4 + 1, G]], axis=1)
        else:
            reg = np.stack([mat[G, 2 * T4], mat[G, 2 * T4 + 1]], axis=1)
        regs.append(reg)
    return regs


# Where each fragment element goes, per the definitions above: (register, half) -> (rows, cols) over lanes.
A_POS = {(0, e): (G, 2 * T4 + e) for e in (0, 1)} | {(1, e): (G + 8, 2 * T4 + e) for e in (0, 1)} \
    | {(2, e): (G, 2 * T4 + 8 + e) for e in (0, 1)} | {(3, e): (G + 8, 2 * T4 + 8 + e) for e in (0, 1)}
B_POS = {(0, e): (2 * T4 + e, G) for e in (0, 1)} | {(1, e): (2 * T4 + 8 + e, G) for e in (0, 1)}
C_POS = {e: (G, 2 * T4 + e) for e in (0, 1)} | {2 + e: (G + 8, 2 * T4 + e) for e in (0, 1)}
for pos, shape in ((A_POS, (16, 16)), (B_POS, (16, 8)), (C_POS, (16, 8))):
    n = np.zeros(shape, int)
    for r, c in pos.values():
        np.add.at(n, (r, c), 1)
    assert (n == 1).all(), "a fragment layout does not cover its matrix exactly once"


def mma(d, a, b0, b1):
    """d [32, 4] f64 accumulators; a: 4 registers [32, 2]; b0, b1 [32, 2]. Returns d + A·B."""
    A, B, C = np.empty((16, 16)), np.empty((16, 8)), np.empty((16, 8))
    for (k, e), (r, c) in A_POS.items():
        A[r, c] = a[k][:, e]
    for (k, e), (r, c) in B_POS.items():
        B[r, c] = (b0, b1)[k][:, e]
    for k, (r, c) in C_POS.items():
        C[r, c] = d[:, k]
    D = A @ B + C
    out = np.empty((32, 4))
    for k, (r, c) in C_POS.items():
        out[:, k] = D[r, c]
    return out


class Hazards:
    """Shared-memory ordering, by region: a cp.async is in flight until the issuing threads wait for
    it, then unpublished until the next barrier (so is an ordinary store); reading a region in
    flight or unpublished is a race, and so is writing a region that is read in the same barrier
    interval (another warp may still be reading it)."""

    def __init__(self):
        self.inflight, self.unpublished, self.written, self.read = set(), set(), set(), set()

    def write(self, region):
        self.inflight.add(region)
        self.written.add(region)

    def write_plain(self, region):
        self.unpublished.add(region)
        self.written.add(region)

    def rd(self, region):
        assert region not in self.inflight | self.unpublished, f"read of {region} before its writes are published"
        self.read.add(region)

    def wait_all(self):
        self.unpublished |= self.inflight
        self.inflight.clear()

    def barrier(self):
        assert not (self.written & self.read), f"region(s) {self.written & self.read} written and read in one interval"
        self.unpublished.clear()
        self.written, self.read = set(self.inflight), set()


# ---- the kernel, transcribed ----

def kernel_block(HD, dtype, bx, by, grid_y, out, q, kc, vc, row_ctx, row_table, tables, tiles, nh, nkv, block_size, kv_dim, scale):
    SROW = HD + PAD
    CH = HD // 8
    LOADS = BK * CH // THREADS
    KSTEPS, NB, ND = HD // 16, BK // 8, HD // 8
    smem = np.full((BQ + 2 * BK) * SROW, np.nan, dtype=np.float32)  # act_t elements
    slots = np.full((2, BK), -12345, dtype=np.int64)                 # static __shared__ slots[2][FP_BK] (garbage)
    QS, KS, VS = 0, BQ * SROW, BQ * SROW + BK * SROW                  # element offsets
    region = lambda off: "Q" if off < KS else ("K" if off < VS else "V")
    hz = Hazards()

    h = bx
    tile = grid_y - 1 - by
    row0, nrows = tiles[2 * tile], tiles[2 * tile + 1]
    kv_off = (h // (nh // nkv)) * HD
    table = row_table[row0]  # offset into tables
    ctx_last = int(row_ctx[row0 + nrows - 1])
    n_kt = (ctx_last + BK - 1) // BK

    def cp_async16(dst_elem, src_arr, src_elem, valid):
        hz.write(region(dst_elem))
        assert dst_elem % 8 == 0 and (not valid or src_elem % 8 == 0)
        smem[dst_elem:dst_elem + 8] = src_arr[src_elem:src_elem + 8] if valid else 0.0

    for tid in range(THREADS):
        for it in range(BQ * CH // THREADS):
            i = tid + it * THREADS
            r, c = i // CH, i % CH
            ok = r < nrows
            src = ((row0 + (r if ok else 0)) * nh + h) * HD + c * 8
            cp_async16(QS + r * SROW + c * 8, q, src, ok)

    NONE = 0xFFFFFFFF

    def find_slots(k0):
        hz.write_plain(f"S{(k0 // BK) & 1}")
        for tid in range(min(BK, THREADS)):
            key = k0 + tid
            slots[(k0 // BK) & 1][tid] = int(tables[table + key // block_size]) * block_size + key % block_size if key < ctx_last else NONE

    def load_kv(dst, cache, kt):
        hz.rd(f"S{kt & 1}")
        for tid in range(THREADS):
            for it in range(LOADS):
                i = tid + it * THREADS
                r, c = i // CH, i % CH
                slot = int(slots[kt & 1][r])
                assert slot != -12345, "slot read before it was written"
                ok = slot != NONE
                cp_async16(dst + r * SROW + c * 8, cache, (slot if ok else 0) * kv_dim + kv_off + c * 8, ok)

    find_slots(0)
    hz.barrier()
    load_kv(KS, kc, 0)
    # per-warp register state
    W = []
    for warp in range(WARPS):
        ra = warp * 16 + G
        rb = ra + 8
        ctx_a = np.where(ra < nrows, row_ctx[np.minimum(row0 + ra, len(row_ctx) - 1)], ctx_last).astype(int)
        ctx_b = np.where(rb < nrows, row_ctx[np.minimum(row0 + rb, len(row_ctx) - 1)], ctx_last).astype(int)
        warp_hi = int(np.max(np.maximum(np.where(ra < nrows, ctx_a, 0), np.where(rb < nrows, ctx_b, 0))))
        warp_lo = int(np.min(np.minimum(ctx_a, ctx_b)))
        W.append(dict(ra=ra, rb=rb, ctx_a=ctx_a, ctx_b=ctx_b, warp_hi=warp_hi, warp_lo=warp_lo))
    sl2 = np.float32(scale) * np.float32(1.4426950408889634)

    hz.wait_all()
    hz.barrier()
    for warp, w in enumerate(W):
        qa = (QS + (warp * 16 + (LANE & 15)) * SROW + (LANE >> 4) * 8) * 2
        hz.rd("Q")
        w["qf"] = [ldsm_x4(smem, qa + kk * 16 * 2, False) for kk in range(KSTEPS)]
        w["ka"] = (KS + ((LANE >> 4) * 8 + (LANE & 7)) * SROW + ((LANE >> 3) & 1) * 8) * 2
        w["va"] = (VS + (((LANE >> 3) & 1) * 8 + (LANE & 7)) * SROW + (LANE >> 4) * 8) * 2
        w["o"] = [np.zeros((32, 4)) for _ in range(ND)]
        w["m"] = [np.full(32, -np.inf), np.full(32, -np.inf)]
        w["l"] = [np.zeros(32), np.zeros(32)]

    quad_sum = lambda x: (x + x[LANE ^ 1]) + (x + x[LANE ^ 1])[LANE ^ 2]

    for kt in range(n_kt):
        k0 = kt * BK
        load_kv(VS, vc, kt)
        if kt + 1 < n_kt:
            find_slots(k0 + BK)
        for warp, w in enumerate(W):
            w["active"] = k0 < w["warp_hi"]
            if not w["active"]:
                continue
            s = [np.zeros((32, 4)) for _ in range(NB)]
            for kk in range(KSTEPS):
                for nb in range(0, NB, 2):
                    hz.rd("K")
                    b = ldsm_x4(smem, w["ka"] + (nb * 8 * SROW + kk * 16) * 2, False)
                    s[nb] = mma(s[nb], w["qf"][kk], b[0], b[1])
                    s[nb + 1] = mma(s[nb + 1], w["qf"][kk], b[2], b[3])
            s = [x.astype(np.float32).astype(np.float64) for x in s]  # f32 accumulators
            if k0 + BK > w["warp_lo"]:
                for nb in range(NB):
                    for c in range(4):
                        key = k0 + nb * 8 + T4 * 2 + (c & 1)
                        s[nb][:, c] = np.where(key >= (w["ctx_a"] if c < 2 else w["ctx_b"]), -np.inf, s[nb][:, c])
            for i in range(2):
                mx = np.full(32, -np.inf)
                for nb in range(NB):
                    mx = np.maximum(mx, np.maximum(s[nb][:, 2 * i], s[nb][:, 2 * i + 1]))
                mx = np.maximum(mx, mx[LANE ^ 1])
                mx = np.maximum(mx, mx[LANE ^ 2])
                mx = np.maximum(w["m"][i], mx * sl2)
                with np.errstate(invalid="raise"):
                    corr = np.exp2(w["m"][i] - mx)
                w["m"][i] = mx
                ssum = np.zeros(32)
                for nb in range(NB):
                    with np.errstate(invalid="raise"):
                        s[nb][:, 2 * i] = np.exp2(s[nb][:, 2 * i] * sl2 - mx)
                        s[nb][:, 2 * i + 1] = np.exp2(s[nb][:, 2 * i + 1] * sl2 - mx)
                    ssum += s[nb][:, 2 * i] + s[nb][:, 2 * i + 1]
                w["l"][i] = w["l"][i] * corr + ssum
                for n in range(ND):
                    w["o"][n][:, 2 * i] *= corr
                    w["o"][n][:, 2 * i + 1] *= corr
            w["s"] = s
        hz.wait_all()
        hz.barrier()
        if kt + 1 < n_kt:
            load_kv(KS, kc, kt + 1)
        for warp, w in enumerate(W):
            if not w["active"]:
                continue
            s = w["s"]
            pk = lambda lo, hi: np.stack([round_to(lo, dtype), round_to(hi, dtype)], axis=1)
            for j in range(BK // 16):
                a = [pk(s[2 * j][:, 0], s[2 * j][:, 1]), pk(s[2 * j][:, 2], s[2 * j][:, 3]),
                     pk(s[2 * j + 1][:, 0], s[2 * j + 1][:, 1]), pk(s[2 * j + 1][:, 2], s[2 * j + 1][:, 3])]
                for nd in range(0, ND, 2):
                    hz.rd("V")
                    b = ldsm_x4(smem, w["va"] + (j * 16 * SROW + nd * 8) * 2, True)
                    w["o"][nd] = mma(w["o"][nd], a, b[0], b[1])
                    w["o"][nd + 1] = mma(w["o"][nd + 1], a, b[2], b[3])
        hz.wait_all()
        hz.barrier()
    assert not hz.inflight

    for warp, w in enumerate(W):
        if w["warp_hi"] == 0:
            continue
        l = [1.0 / quad_sum(w["l"][i]) for i in range(2)]
        ra, rb = w["ra"], w["rb"]
        for n in range(ND):
            for e in (0, 1):
                smem[QS + ra * SROW + n * 8 + T4 * 2 + e] = round_to(w["o"][n][:, e] * l[0], dtype)
                smem[QS + rb * SROW + n * 8 + T4 * 2 + e] = round_to(w["o"][n][:, 2 + e] * l[1], dtype)
        for it in range(16 * CH // 32):
            i = LANE + it * 32
            r, c = warp * 16 + i // CH, i % CH
            for lane in range(32):
                if r[lane] < nrows:
                    dst = ((row0 + r[lane]) * nh + h) * HD + c[lane] * 8
                    assert np.isnan(out[dst:dst + 8]).all(), "output element written twice"
                    out[dst:dst + 8] = smem[QS + r[lane] * SROW + c[lane] * 8:QS + r[lane] * SROW + c[lane] * 8 + 8]


# ---- a batch as the host builds it (batch_meta and the tiles list of `fn attention`) ----

def run_case(HD, nh, nkv, seqs, dtype, rng, block_size=16, kernel=None):
    """seqs: list of (start_pos, n_new). Returns relative error vs. f64 causal attention. `kernel`:
    the block emulation (kernel_block's arguments; fa_wgmma_sim.py passes its own)."""
    kernel = kernel or kernel_block
    kv_dim = nkv * HD
    # Paged cache with blocks handed out shuffled.
    n_blocks = sum((sp + n + block_size - 1) // block_size for sp, n in seqs) + 3
    perm = rng.permutation(n_blocks)
    tables, row_ctx, row_table, tiles, tabs = [], [], [], [], []
    kc = round_to(rng.uniform(-1, 1, n_blocks * block_size * kv_dim), dtype)
    vc = round_to(rng.uniform(-1, 1, n_blocks * block_size * kv_dim), dtype)
    T = sum(n for _, n in seqs)
    q = round_to(rng.uniform(-3, 3, T * nh * HD), dtype)
    row = 0
    for sp, n in seqs:
        nb = (sp + n + block_size - 1) // block_size
        blocks, perm = perm[:nb], perm[nb:]
        at = len(tables)
        tables.extend(int(b) for b in blocks)
        tabs.append(blocks)
        for i in range(n):
            row_ctx.append(sp + i + 1)
            row_table.append(at)
        for r0 in range(row, row + n, BQ):
            tiles += [r0, min(BQ, row + n - r0)]
        row += n
    row_ctx, row_table, tables, tiles = map(lambda v: np.array(v, dtype=np.int64), (row_ctx, row_table, tables, tiles))
    out = np.full(T * nh * HD, np.nan, dtype=np.float32)
    scale = 1.0 / np.sqrt(HD)
    grid_y = len(tiles) // 2
    for by in range(grid_y):
        for bx in range(nh):
            kernel(HD, dtype, bx, by, grid_y, out, q, kc, vc, row_ctx, row_table, tables, tiles, nh, nkv, block_size, kv_dim, scale)
    assert not np.isnan(out).any(), "output rows missing or NaN"
    # Reference: f64 softmax(q·k * scale) · v per row over its sequence's keys.
    ref = np.empty(T * nh * HD)
    K = kc.reshape(-1, kv_dim).astype(np.float64)
    V = vc.reshape(-1, kv_dim).astype(np.float64)
    row = 0
    for (sp, n), blocks in zip(seqs, tabs):
        slots = np.array([blocks[j // block_size] * block_size + j % block_size for j in range(sp + n)])
        for i in range(n):
            ctx = sp + i + 1
            for hh in range(nh):
                kh = hh // (nh // nkv)
                qv = q[((row + i) * nh + hh) * HD:((row + i) * nh + hh + 1) * HD].astype(np.float64)
                k = K[slots[:ctx], kh * HD:(kh + 1) * HD]
                v = V[slots[:ctx], kh * HD:(kh + 1) * HD]
                sc = k @ qv * scale
                p = np.exp(sc - sc.max())
                ref[((row + i) * nh + hh) * HD:((row + i) * nh + hh + 1) * HD] = (p / p.sum()) @ v
        row += n
    return float(np.sqrt(((out - ref) ** 2).sum() / (ref ** 2).sum()))


def main():
    quick = "--quick" in sys.argv
    rng = np.random.default_rng(1)
    cases = [
        # (hd, nh, nkv, sequences (start_pos, new rows), cache block size)
        (64, 2, 2, [(0, 1), (0, 17), (40, 70)], 16),
        (128, 4, 2, [(0, 65), (5, 1), (100, 33)], 16),
        (64, 4, 1, [(0, 200), (17, 64)], 16),
        (128, 8, 1, [(3, 64), (0, 9)], 16),
        (32, 4, 2, [(0, 70), (9, 12)], 16),
        (16, 4, 2, [(0, 130), (2, 9)], 16),
    ]
    if not quick:
        cases += [
            (128, 2, 1, [(0, 1000)], 16),
            (64, 8, 2, [(130, 129), (0, 1), (63, 2)], 16),
            (64, 2, 1, [(21, 90), (0, 40)], 8),
            (128, 2, 2, [(50, 77)], 32),
        ]
    for dtype in ("bf16", "f16"):
        for hd, nh, nkv, seqs, bs in cases:
            err = run_case(hd, nh, nkv, seqs, dtype, rng, bs)
            # P and the output are rounded to 16 bits (bf16: 2^-9 relative, f16: 2^-12): the error
            # must be of that order; an index mistake gives O(1).
            bar = 8e-3 if dtype == "bf16" else 1e-3
            status = "ok" if err < bar else "FAIL"
            print(f"{dtype} hd={hd} nh={nh} nkv={nkv} bs={bs} seqs={seqs}: rel err {err:.2e} (bar {bar:.0e}) {status}", flush=True)
            assert err < bar
    print("all cases match")


if __name__ == "__main__":
    main()
