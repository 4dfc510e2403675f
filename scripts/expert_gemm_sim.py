#!/usr/bin/env python3
"""Thread-by-thread emulation of expert_gemm (src/backend/cuda/kernels/expert_gemm.cu), no GPU needed.

wgmma comes from wgmma_emu.py (the PTX definitions); the kernel's index math (its swizzled copies,
descriptor steps, pieces of 64 and 32 tile rows, the staged epilogue and its SwiGLU) is transcribed
statement by statement with the kernel's names, for every thread of both warpgroups. The stages run
in program order; a load into a stage that a wgmma may still read (the current one or, with a group
left pending, the one before) fails an assertion. Shared memory starts as NaN, so a wgmma reading
anything nobody wrote fails too. Checked against the MoE experts in f64 (gate, up and SwiGLU, then
down) as moe_sort tiles them, rounded where the kernel rounds.

Usage: python3 scripts/expert_gemm_sim.py [--quick]
"""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import wgmma_emu as wg  # noqa: E402
from fa_prefill_sim import round_to  # noqa: E402

EG_BK, EG_A_BYTES = 64, 128 * 64 * 2
EG_SMEM = {256: 227 * 1024, 128: 112 * 1024}  # by the build's most rows a tile (expert_gemm_256 / _128)


def silu(x):
    return x / (1.0 + np.exp(-x))


def kernel_block(maxr, bx, tile, out, x, src, w0, w1, tile_e, tile_row0, tile_rows, N, K, dtype, max_stages=8, pending=1):
    e = int(tile_e[tile])
    if e < 0:
        return
    row0, rows = int(tile_row0[tile]), int(tile_rows[tile])
    swiglu = w1 is not None
    n0 = bx * (64 if swiglu else 128)
    nt = (rows + 31) & ~31
    assert rows <= maxr
    ACC = maxr // 2
    smem = np.full((EG_SMEM[maxr] - 1024) // 2, np.nan)
    base = 0
    wstride = N * K

    # Each thread's copies: chunk c of shared rows tid / 8 + 32 q.
    def sources(tid):
        c, r0 = tid & 7, tid >> 3
        sw = r0 * 128 + ((c ^ (r0 & 7)) << 4)
        a_src = []
        for q in range(4):
            r = r0 + 32 * q
            a_src.append((w1, e * wstride + (n0 + r - 64) * K + c * 8) if swiglu and r >= 64 else (w0, e * wstride + (n0 + r) * K + c * 8))
        b_src = []
        for q in range(maxr // 32):
            r = min(r0 + 32 * q, rows - 1)
            xr = int(src[row0 + r]) if src is not None else row0 + r
            b_src.append(xr * K + c * 8)
        return sw, a_src, b_src

    threads = [sources(tid) for tid in range(256)]
    stage_bytes = EG_A_BYTES + nt * 128
    stages = max(2 + pending, min(max_stages, (EG_SMEM[maxr] - 1024) // stage_bytes))
    ahead = stages - 1 - pending
    assert ahead >= 1

    def load(slot, kt):
        a = base + slot * stage_bytes
        b = a + EG_A_BYTES
        k0 = kt * EG_BK
        for sw, a_src, b_src in threads:
            for q in range(4):
                arr, off = a_src[q]
                dst = (a + sw + q * 32 * 128) // 2
                smem[dst:dst + 8] = arr[off + k0:off + k0 + 8]
            for q in range(maxr // 32):
                if 32 * q < nt:
                    dst = (b + sw + q * 32 * 128) // 2
                    smem[dst:dst + 8] = x[b_src[q] + k0:b_src[q] + k0 + 8]

    acc = [np.zeros((128, ACC)), np.zeros((128, ACC))]
    KT = K // EG_BK
    desc0 = wg.desc(base)
    for s in range(ahead):
        if s < KT:
            load(s, s)
    slot = 0
    for kt in range(KT):
        if kt + ahead < KT:
            target = (kt + ahead) % stages
            busy = {(kt - p) % stages for p in range(pending + 1)}
            assert target not in busy, f"stage {target} loaded while a wgmma may read it"
            load(target, kt + ahead)
        NP = nt >> 5
        for g in range(2):
            da = desc0 + ((slot * stage_bytes + g * 64 * 128) >> 4)
            db = desc0 + ((slot * stage_bytes + EG_A_BYTES) >> 4)
            for ks in range(EG_BK // 16):
                for j in range(NP // 2):
                    acc[g][:, 32 * j:32 * j + 32] = wg.mma_ss(smem, acc[g][:, 32 * j:32 * j + 32], 64, da + 2 * ks, db + 2 * ks + 512 * j)
                if NP & 1:
                    j = NP // 2
                    acc[g][:, 32 * j:32 * j + 16] = wg.mma_ss(smem, acc[g][:, 32 * j:32 * j + 16], 32, da + 2 * ks, db + 2 * ks + 512 * j)
        slot = 0 if slot + 1 == stages else slot + 1
    acc = [a.astype(np.float32).astype(np.float64) for a in acc]

    pitch = 128 + 8
    st = np.full(smem.shape, np.nan)
    for g in range(2):
        mine = 2 * (wg.LANE & 3) * pitch + 64 * g + 16 * wg.WARP + (wg.LANE >> 2)
        for i in range(ACC):
            st[mine + (64 * (i >> 5) + 8 * ((i & 31) >> 2) + (i & 1)) * pitch + 8 * ((i >> 1) & 1)] = round_to(acc[g][:, i], dtype)
    chunks = 8 if swiglu else 16
    for i in range(rows * chunks):
        r, ch = i // chunks, i % chunks
        v = st[r * pitch + ch * 8:r * pitch + ch * 8 + 8]
        if swiglu:
            u = st[r * pitch + 64 + ch * 8:r * pitch + 64 + ch * 8 + 8]
            v = round_to(round_to(silu(v), dtype) * u, dtype)
        assert not np.isnan(v).any(), "output from an unwritten staging element"
        dst = (row0 + r) * N + n0 + ch * 8
        assert np.isnan(out[dst:dst + 8]).all(), "output element written twice"
        out[dst:dst + 8] = v


def moe_sort(ids, E, tm):
    """moe.cu's moe_sort (order within an expert: pair order), tiles of at most tm rows."""
    order = sorted(range(len(ids)), key=lambda p: (ids[p], p))
    tile_e, tile_row0, tile_rows = [], [], []
    run = 0
    for e in range(E):
        c = int(np.sum(ids == e))
        for s in range(0, c, tm):
            tile_e.append(e)
            tile_row0.append(run + s)
            tile_rows.append(min(tm, c - s))
        run += c
    return np.array(order), np.array(tile_e), np.array(tile_row0), np.array(tile_rows)


def run_case(maxr, E, k, H, I, T, dtype, rng, skew=False, max_stages=8, pending=1):
    w = lambda *s: round_to(rng.uniform(-0.2, 0.2, s), dtype)
    gate, up, down = w(E, I, H), w(E, I, H), w(E, H, I)
    x = round_to(rng.uniform(-1, 1, (T, H)), dtype)
    # Each row's k distinct experts; with skew, expert 0 for most rows (several 256-row tiles).
    ids = np.array([rng.permutation(E)[:k] for _ in range(T)])
    if skew:
        ids[: T * 9 // 10, 0] = 0
        ids[: T * 9 // 10, 1:] = np.array([rng.permutation(np.arange(1, E))[:k - 1] for _ in range(T * 9 // 10)])
    ids = ids.reshape(-1)
    P = T * k
    sorted_src, tile_e, tile_row0, tile_rows = moe_sort(ids, E, maxr)
    src = sorted_src // k  # the pair's token row
    act = np.full(P * I, np.nan)
    for tile in range(len(tile_e)):
        for bx in range(I // 64):
            kernel_block(maxr, bx, tile, act, x.reshape(-1), src, gate.reshape(-1), up.reshape(-1), tile_e, tile_row0, tile_rows, I, H, dtype,
                         max_stages, pending)
    y = np.full(P * H, np.nan)
    for tile in range(len(tile_e)):
        for bx in range(H // 128):
            kernel_block(maxr, bx, tile, y, act, None, down.reshape(-1), None, tile_e, tile_row0, tile_rows, H, I, dtype, max_stages, pending)
    assert not np.isnan(act).any() and not np.isnan(y).any(), "rows left unwritten"
    # Reference, pair by pair in sorted order.
    e_of = ids[sorted_src]
    f32 = lambda v: v.astype(np.float32).astype(np.float64)
    g_ref = round_to(f32(np.einsum("ph,pih->pi", x[src], gate[e_of])), dtype)
    u_ref = round_to(f32(np.einsum("ph,pih->pi", x[src], up[e_of])), dtype)
    a_ref = round_to(round_to(silu(g_ref), dtype) * u_ref, dtype)
    y_ref = round_to(f32(np.einsum("pi,phi->ph", a_ref, down[e_of])), dtype)
    rel = lambda got, want: float(np.sqrt(((got - want) ** 2).sum() / (want ** 2).sum()))
    return rel(act.reshape(P, I), a_ref), rel(y.reshape(P, H), y_ref), int(np.bincount(ids).max())


def main():
    quick = "--quick" in sys.argv
    rng = np.random.default_rng(3)
    # (E, k, H, I, T, skew): tiles of a few rows (a 32-row piece only); of ~150 rows (64-row pieces
    # and a 32-row one) with K of 512 and 256 (8 and 4 stages of K); one expert with most rows
    # (a 256-row tile and a short last one).
    cases = [(8, 2, 128, 64, 9, False), (2, 1, 512, 256, 300, False), (4, 2, 128, 64, 300, True)]
    if not quick:
        cases += [(8, 3, 256, 192, 200, False), (2, 2, 128, 64, 560, True)]
    for dtype, maxr in (("bf16", 128), ("f16", 128), ("bf16", 256)):
        for E, k, H, I, T, skew in cases:
            for stages, pending in ([(8, 1), (4, 0)] if not quick else [(8, 1)]):
                ea, ey, most = run_case(maxr, E, k, H, I, T, dtype, rng, skew, stages, pending)
                # Both sides round at the same points; they differ only where f32 sums land on a
                # rounding boundary differently (summation order): far below one ulp on average.
                bar = 2e-3 if dtype == "bf16" else 3e-4
                ok = ea < bar and ey < bar
                print(f"expert_gemm_{maxr} {dtype} E={E} k={k} H={H} I={I} T={T} (largest expert {most} rows) stages<={stages} pending={pending}: "
                      f"act {ea:.1e}, y {ey:.1e} (bar {bar:.0e}) {'ok' if ok else 'FAIL'}", flush=True)
                assert ok
    print("all cases match")


if __name__ == "__main__":
    main()
