#!/usr/bin/env python3
"""Thread-by-thread emulation of attention_prefill_wg_128 (src/backend/cuda/kernels/attention_prefill.cu,
head_dim 128 on Hopper's wgmma), no GPU needed; the batches, tiles and f64 reference are
fa_prefill_sim.py's.

wgmma is emulated from the PTX ISA's definitions, independently of the kernel's reading of them:
  Accumulator D of m64nNk16 (thread T of the warpgroup, w = T / 32, g = lane / 4, t = lane % 4):
    d[4 j + c] = D[16 w + g + 8 (c >> 1)][8 j + 2 t + (c & 1)].
  A from registers (RS): per warp w the rows 16 w .. 16 w + 15 as mma.m16n8k16's A fragment.
  Shared-memory operands through their descriptor (start address, leading / stride byte offsets,
  128-byte swizzle; CUTLASS's canonical GMMA layouts): element (row i, k j) of a K-major operand at
  start + (i / 8) SBO + (i % 8) 128 + 2 j; element (k j, column n) of an N-major one at
  start + (n / 64) LBO + (j / 8) SBO + (j % 8) 128 + 2 (n % 64); then the swizzle: address bits 4-6
  XOR bits 7-9.
The kernel's index math is transcribed statement by statement (same names). Shared memory starts as
NaN and the slot tables as garbage, so a read of anything not written shows up; the output must equal
causal softmax attention within the rounding of P and of the output.

Usage: python3 scripts/fa_wgmma_sim.py [--quick]
"""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fa_prefill_sim import round_to, run_case  # noqa: E402

BQ, BK, HD, PAD, THREADS = 64, 64, 128, 8, 128
T = np.arange(THREADS)
WARP, LANE = T >> 5, T & 31
G, T4 = LANE >> 2, LANE & 3


# ---- wgmma, from the PTX definitions ----

def decode(desc):
    start = (desc & 0x3FFF) << 4
    lbo = ((desc >> 16) & 0x3FFF) << 4
    sbo = ((desc >> 32) & 0x3FFF) << 4
    assert desc >> 62 == 1, "128-byte swizzle expected"
    return start, lbo, sbo


def swizzle(addr):
    return addr ^ (((addr >> 7) & 7) << 4)


def read_k_major(smem, desc, rows):
    """[rows][16] of a K-major operand."""
    start, _, sbo = decode(desc)
    i, j = np.arange(rows)[:, None], np.arange(16)[None, :]
    addr = swizzle(start + (i // 8) * sbo + (i % 8) * 128 + 2 * j)
    return smem[addr // 2]


def read_n_major(smem, desc, cols):
    """[16][cols] of an N-major operand (imm-trans-b)."""
    start, lbo, sbo = decode(desc)
    j, n = np.arange(16)[:, None], np.arange(cols)[None, :]
    addr = swizzle(start + (n // 64) * lbo + (j // 8) * sbo + (j % 8) * 128 + 2 * (n % 64))
    return smem[addr // 2]


def d_index(n):
    """(row, column) of every thread's accumulators [THREADS][n / 2]."""
    i = np.arange(n // 2)[None, :]
    return 16 * WARP[:, None] + G[:, None] + 8 * ((i & 3) >> 1), 8 * (i >> 2) + 2 * T4[:, None] + (i & 1)


def to_matrix(d, n):
    r, c = d_index(n)
    m = np.full((64, n), np.nan)
    m[r, c] = d
    assert not np.isnan(m).any()
    return m


def wgmma_ss(d, n, da, db):
    """d [THREADS][n / 2] += A (K-major, 64 rows) · B (K-major, n rows), k16."""
    D = to_matrix(d, n) + read_k_major(SMEM, da, 64) @ read_k_major(SMEM, db, n).T
    r, c = d_index(n)
    return D[r, c]


def wgmma_rs(d, n, a, db):
    """d += A (registers a [THREADS][4][2]) · B (N-major, n columns), k16."""
    A = np.full((64, 16), np.nan)
    for k, (dr, dc) in enumerate([(0, 0), (8, 0), (0, 8), (8, 8)]):
        for e in (0, 1):
            A[16 * WARP + G + dr, 2 * T4 + dc + e] = a[:, k, e]
    assert not np.isnan(A).any()
    D = to_matrix(d, n) + A @ read_n_major(SMEM, db, n)
    r, c = d_index(n)
    return D[r, c]


def wg_desc(addr):
    return ((addr & 0x3FFFF) >> 4) | (1 << 16) | ((1024 >> 4) << 32) | (1 << 62)


# ---- the kernel, transcribed ----

SMEM = None


def kernel_block(hd, dtype, bx, by, grid_y, out, q, kc, vc, row_ctx, row_table, tables, tiles, nh, nkv, block_size, kv_dim, scale):
    global SMEM
    assert hd == HD
    SMEM = np.full(80 * 1024 // 2, np.nan)  # act_t elements from the aligned base
    slots = np.full((2, BK), -12345, dtype=np.int64)
    qs, ks, vs = 0, 16 * 1024, 48 * 1024
    h = bx
    tile = grid_y - 1 - by
    row0, nrows = int(tiles[2 * tile]), int(tiles[2 * tile + 1])
    kv_off = (h // (nh // nkv)) * HD
    table = int(row_table[row0])
    ctx_last = int(row_ctx[row0 + nrows - 1])
    ctx_first = int(row_ctx[row0])
    n_kt = (ctx_last + BK - 1) // BK
    NONE = 0xFFFFFFFF

    def find_slots(kt):
        for tid in range(BK):
            key = kt * BK + tid
            slots[kt & 1][tid] = int(tables[table + key // block_size]) * block_size + key % block_size if key < ctx_last else NONE

    def load_tile(dst, arr, row_src):
        for tid in range(THREADS):
            c = tid & 15
            half, cc = c >> 3, c & 7
            for i in range(8):
                r = (tid >> 4) + 8 * i
                src = row_src(r)
                byte = dst + half * 8192 + r * 128 + ((cc ^ (r & 7)) << 4)
                SMEM[byte // 2:byte // 2 + 8] = arr[src + c * 8:src + c * 8 + 8] if src is not None else 0.0

    def load_kv(kt):
        sl = slots[kt & 1]
        buf = (kt & 1) * 16 * 1024
        for r in range(BK):
            assert sl[r] != -12345, "slot read before it was written"
        load_tile(ks + buf, kc, lambda r: None if sl[r] == NONE else int(sl[r]) * kv_dim + kv_off)
        load_tile(vs + buf, vc, lambda r: None if sl[r] == NONE else int(sl[r]) * kv_dim + kv_off)

    load_tile(qs, q, lambda r: ((row0 + r) * nh + h) * HD if r < nrows else None)
    find_slots(0)
    load_kv(0)
    if n_kt > 1:
        find_slots(1)

    ra, rb = WARP * 16 + G, WARP * 16 + G + 8
    ctx_a = np.where(ra < nrows, row_ctx[np.minimum(row0 + ra, len(row_ctx) - 1)], ctx_last).astype(int)
    ctx_b = np.where(rb < nrows, row_ctx[np.minimum(row0 + rb, len(row_ctx) - 1)], ctx_last).astype(int)
    sl2 = np.float32(scale) * np.float32(1.4426950408889634)
    dq = wg_desc(qs)
    dv = ((vs & 0x3FFFF) >> 4) | ((8192 >> 4) << 16) | ((1024 >> 4) << 32) | (1 << 62)

    o = np.zeros((THREADS, 64))
    m = [np.full(THREADS, -np.inf), np.full(THREADS, -np.inf)]
    l = [np.zeros(THREADS), np.zeros(THREADS)]

    for kt in range(n_kt):
        k0 = kt * BK
        if kt + 1 < n_kt:
            load_kv(kt + 1)
        s = np.zeros((THREADS, 32))
        dk = wg_desc(ks + (kt & 1) * 16 * 1024)
        for kk in range(HD // 16):
            step = (kk >> 2) * (8192 >> 4) + (kk & 3) * 2
            s = wgmma_ss(s, 64, dq + step, dk + step)
        s = s.astype(np.float32).astype(np.float64)
        if kt + 2 < n_kt:
            find_slots(kt + 2)
        if k0 + BK > ctx_first:
            for i in range(32):
                key = k0 + (i >> 2) * 8 + T4 * 2 + (i & 1)
                s[:, i] = np.where(key >= (ctx_b if i & 2 else ctx_a), -np.inf, s[:, i])
        for r in range(2):
            cols = [4 * j + 2 * r + e for j in range(8) for e in (0, 1)]
            mx = s[:, cols].max(axis=1)
            mx = np.maximum(mx, mx[T ^ 1])
            mx = np.maximum(mx, mx[T ^ 2])
            mx = np.maximum(m[r], mx * sl2)
            with np.errstate(invalid="raise"):
                corr = np.exp2(m[r] - mx)
                s[:, cols] = np.exp2(s[:, cols] * sl2 - mx[:, None])
            m[r] = mx
            l[r] = l[r] * corr + s[:, cols].sum(axis=1)
            ocols = [4 * j + 2 * r + e for j in range(16) for e in (0, 1)]
            o[:, ocols] *= corr[:, None]
        pa = np.empty((BK // 16, THREADS, 4, 2))
        for kk in range(BK // 16):
            for k in range(4):
                pa[kk, :, k, 0] = round_to(s[:, 8 * kk + 2 * k], dtype)
                pa[kk, :, k, 1] = round_to(s[:, 8 * kk + 2 * k + 1], dtype)
        dvk = dv + (((kt & 1) * 16 * 1024) >> 4)
        for kk in range(BK // 16):
            o = wgmma_rs(o, 128, pa[kk], dvk + kk * (2048 >> 4))
        o = o.astype(np.float32).astype(np.float64)

    for r in range(2):
        l[r] = l[r] + l[r][T ^ 1]
        l[r] = l[r] + l[r][T ^ 2]
        l[r] = 1.0 / l[r]
    SROW = HD + PAD
    st = ks // 2
    for j in range(16):
        for e in (0, 1):
            SMEM[st + ra * SROW + j * 8 + T4 * 2 + e] = round_to(o[:, 4 * j + e] * l[0], dtype)
            SMEM[st + rb * SROW + j * 8 + T4 * 2 + e] = round_to(o[:, 4 * j + 2 + e] * l[1], dtype)
    for i in range(nrows * (HD // 8)):
        r, c = i // (HD // 8), i % (HD // 8)
        dst = ((row0 + r) * nh + h) * HD + c * 8
        assert np.isnan(out[dst:dst + 8]).all(), "output element written twice"
        out[dst:dst + 8] = SMEM[st + r * SROW + c * 8:st + r * SROW + c * 8 + 8]


def main():
    quick = "--quick" in sys.argv
    rng = np.random.default_rng(2)
    cases = [(4, 2, [(0, 65), (5, 1), (100, 33)], 16), (8, 1, [(3, 64), (0, 9)], 16)]
    if not quick:
        cases += [(2, 1, [(0, 300)], 16), (2, 2, [(50, 77), (0, 2)], 32)]
    for dtype in ("bf16", "f16"):
        for nh, nkv, seqs, bs in cases:
            err = run_case(HD, nh, nkv, seqs, dtype, rng, bs, kernel=kernel_block)
            bar = 8e-3 if dtype == "bf16" else 1e-3
            status = "ok" if err < bar else "FAIL"
            print(f"{dtype} hd=128 nh={nh} nkv={nkv} bs={bs} seqs={seqs}: rel err {err:.2e} (bar {bar:.0e}) {status}", flush=True)
            assert err < bar
    print("all cases match")


if __name__ == "__main__":
    main()
