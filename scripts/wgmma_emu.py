"""Hopper's warpgroup MMA (wgmma.mma_async, 16-bit inputs, f32 accumulators) emulated from the PTX
ISA's definitions, for the kernels' lane-by-lane emulations (expert_gemm_sim.py, ...). Independent of
any kernel's reading of them:
  Accumulator D of m64nNk16 (thread T of the warpgroup, w = T / 32, g = lane / 4, t = lane % 4):
    d[4 j + c] = D[16 w + g + 8 (c >> 1)][8 j + 2 t + (c & 1)].
  A from registers: per warp w the rows 16 w .. 16 w + 15 as mma.m16n8k16's A fragment:
    a0 = A[g][2t, 2t+1], a1 = A[g+8][2t, 2t+1], a2 = A[g][2t+8, +9], a3 = A[g+8][2t+8, +9].
  Shared-memory operands through their 64-bit descriptor (start address, leading and stride byte
  offsets, 128-byte swizzle; CUTLASS's canonical GMMA layouts): element (row i, k j) of a K-major
  operand at start + (i / 8) SBO + (i % 8) 128 + 2 j; element (k j, column n) of an N-major one
  (imm-trans-b) at start + (n / 64) LBO + (j / 8) SBO + (j % 8) 128 + 2 (n % 64); then the swizzle,
  address bits 4-6 XOR bits 7-9.
Shared memory is a float array of 16-bit elements (index = byte address / 2), NaN where unwritten."""
import numpy as np

T = np.arange(128)
WARP, LANE = T >> 5, T & 31
G, T4 = LANE >> 2, LANE & 3


def desc(addr, lbo=16, sbo=1024):
    """A descriptor as the kernels build it (wg_desc in common.cuh: K-major, LBO unused)."""
    return ((addr & 0x3FFFF) >> 4) | ((lbo >> 4) << 16) | ((sbo >> 4) << 32) | (1 << 62)


def decode(d):
    assert d >> 62 == 1, "128-byte swizzle expected"
    return (d & 0x3FFF) << 4, ((d >> 16) & 0x3FFF) << 4, ((d >> 32) & 0x3FFF) << 4


def swizzle(addr):
    return addr ^ (((addr >> 7) & 7) << 4)


def read_k_major(smem, d, rows):
    """[rows][16] of a K-major operand."""
    start, _, sbo = decode(d)
    i, j = np.arange(rows)[:, None], np.arange(16)[None, :]
    return smem[swizzle(start + (i // 8) * sbo + (i % 8) * 128 + 2 * j) // 2]


def read_n_major(smem, d, cols):
    """[16][cols] of an N-major operand."""
    start, lbo, sbo = decode(d)
    j, n = np.arange(16)[:, None], np.arange(cols)[None, :]
    return smem[swizzle(start + (n // 64) * lbo + (j // 8) * sbo + (j % 8) * 128 + 2 * (n % 64)) // 2]


def d_index(n):
    """(row, column) of each thread's n / 2 accumulators: arrays [128][n / 2]."""
    i = np.arange(n // 2)[None, :]
    return 16 * WARP[:, None] + G[:, None] + 8 * ((i & 3) >> 1), 8 * (i >> 2) + 2 * T4[:, None] + (i & 1)


def _matrix(d, n):
    r, c = d_index(n)
    m = np.full((64, n), np.nan)
    m[r, c] = d
    assert not np.isnan(m).any(), "an accumulator position left undefined"
    return m


def _fragments(D, n):
    r, c = d_index(n)
    return D[r, c]


def mma_ss(smem, d, n, da, db):
    """d [128][n / 2] += A (K-major, 64 rows) · B (K-major, n rows); inputs must all be written."""
    a, b = read_k_major(smem, da, 64), read_k_major(smem, db, n)
    assert not np.isnan(a).any() and not np.isnan(b).any(), "wgmma read shared memory nobody wrote"
    return _fragments(_matrix(d, n) + a @ b.T, n)


def mma_rs(smem, d, n, a, db):
    """d += A (registers a [128][4][2]) · B (N-major, n columns)."""
    A = np.full((64, 16), np.nan)
    for k, (dr, dc) in enumerate([(0, 0), (8, 0), (0, 8), (8, 8)]):
        for e in (0, 1):
            A[16 * WARP + G + dr, 2 * T4 + dc + e] = a[:, k, e]
    b = read_n_major(smem, db, n)
    assert not np.isnan(A).any() and not np.isnan(b).any(), "wgmma read an undefined operand"
    return _fragments(_matrix(d, n) + A @ b, n)
