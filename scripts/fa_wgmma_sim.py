#!/usr/bin/env python3
"""Thread-by-thread emulation of attention_prefill_wg_128 (src/backend/cuda/kernels/attention_prefill.cu,
head_dim 128 on Hopper's wgmma), no GPU needed; wgmma from wgmma_emu.py (the PTX definitions), the
batches, tiles and f64 reference from fa_prefill_sim.py. The kernel's index math is transcribed
statement by statement (same names). Shared memory starts as NaN and the slot tables as garbage, so a
read of anything not written shows up; the output must equal causal softmax attention within the
rounding of P and of the output.

Usage: python3 scripts/fa_wgmma_sim.py [--quick]
"""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import wgmma_emu as wg  # noqa: E402
from fa_prefill_sim import round_to, run_case  # noqa: E402

BQ, BK, HD, PAD, THREADS = 64, 64, 128, 8, 128
T, WARP, G, T4 = wg.T, wg.WARP, wg.G, wg.T4


# ---- the kernel, transcribed ----

def kernel_block(hd, dtype, bx, by, grid_y, out, q, kc, vc, row_ctx, row_table, tables, tiles, nh, nkv, block_size, kv_dim, scale):
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
    dq = wg.desc(qs)
    dv = wg.desc(vs, lbo=8192, sbo=1024)

    o = np.zeros((THREADS, 64))
    m = [np.full(THREADS, -np.inf), np.full(THREADS, -np.inf)]
    l = [np.zeros(THREADS), np.zeros(THREADS)]

    for kt in range(n_kt):
        k0 = kt * BK
        if kt + 1 < n_kt:
            load_kv(kt + 1)
        s = np.zeros((THREADS, 32))
        dk = wg.desc(ks + (kt & 1) * 16 * 1024)
        for kk in range(HD // 16):
            step = (kk >> 2) * (8192 >> 4) + (kk & 3) * 2
            s = wg.mma_ss(SMEM, s, 64, dq + step, dk + step)
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
            o = wg.mma_rs(SMEM, o, 128, pa[kk], dvk + kk * (2048 >> 4))
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
