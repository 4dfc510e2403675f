"""Decode-GEMV variants on the GPU (issue 6): bandwidth of matmul.cu's shipped decode GEMV (`gemv`: gemv_t1
with x staged in shared memory up to 56 KB, as the host picks) against the candidates in
benches/gemv_variants.cu, on the weight shapes of Qwen3-0.6B / 8B / 32B, batch 1, bf16. (Run 10 compared
the candidates with the earlier block-per-8-rows `gemv_wide`; the winner became `gemv_t1*`.)

    python3 benches/gemv_variants.py [VARIANTS]  # on the GPU machine (CuPy compiles the kernels)
    GEMV_SHAPES=0.6B,30B python3 benches/gemv_variants.py   # only those shapes

Each (kernel, shape) is checked against a float32 product of the same bf16 values, then timed as a
CUDA graph of launches cycling over enough weight copies to defeat the 60 MB L2 (median of 7 replays).
GB/s counts weight bytes read; `read_probe` gives the read ceiling of the card in the same run.
"""

import os
import sys

import cupy as cp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KDIR = os.path.join(ROOT, "src/backend/cuda/kernels")


def source():
    parts = [open(os.path.join(KDIR, "common.cuh")).read(), open(os.path.join(KDIR, "matmul.cu")).read(),
             open(os.path.join(ROOT, "benches/gemv_variants.cu")).read()]
    return "\n".join(parts)


MOD = cp.RawModule(code=source(), options=("-DQ_DTYPE=1", "--std=c++17", "-arch=sm_90"))
SMS = cp.cuda.Device().attributes["MultiProcessorCount"]

SHAPES = {  # (N, K) per decode step product
    "0.6B qkv": (4096, 1024), "0.6B o": (1024, 2048), "0.6B gate": (3072, 1024), "0.6B down": (1024, 3072),
    "0.6B lm_head": (151936, 1024),
    "8B qkv": (6144, 4096), "8B o": (4096, 4096), "8B gate": (12288, 4096), "8B down": (4096, 12288),
    "8B lm_head": (151936, 4096),
    "32B gate": (25600, 5120), "32B down": (5120, 25600),
    # Qwen3-30B-A3B decode, the 8 chosen experts' rows as one matrix: gate (or up) and down.
    "30B-A3B experts gate": (6144, 2048), "30B-A3B experts down": (16384, 768),
}


def bf16_bits(a):
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def bf16_value(bits):
    return (bits.astype(np.uint32) << 16).view(np.float32)


def wpr_of(n, k):  # warps per row of the block-style candidates (as the old gemv_wide's host picked)
    wpr = 1
    while wpr < 8 and n * wpr // 8 < 528 and k // 8 >= 32 * wpr * 2:
        wpr *= 2
    return wpr


def launcher(name, n, k):
    """(kernel, grid, block, args builder, smem) of one variant."""
    if name == "gemv":  # as CudaBackend::gemv_plan: persistent grid, x in shared memory when it fits
        name = "gemv_t1_xs" if k * 2 <= 56 * 1024 else "gemv_t1"
        kern = MOD.get_function(name)
        smem = k * 2 if name.endswith("_xs") else 0
        if smem > 48 * 1024:
            kern.max_dynamic_shared_size_bytes = smem
        grid = min(SMS * 4, -(-n // 8))
        return kern, grid, smem, lambda out, x, w: (out, x, w, np.int32(1), np.int32(n), np.int32(k))
    kern = MOD.get_function(name.split("@")[0])
    smem = 0
    if name.startswith(("vp_", "vh_")) or "_xs" in name:
        smem = k * 2
        if smem > 48 * 1024:
            kern.max_dynamic_shared_size_bytes = smem
    if name.startswith("vb_"):
        wpr = int(name.split("@")[1]) if "@" in name else wpr_of(n, k)
        grid = (n + 8 // wpr - 1) // (8 // wpr)
        return kern, grid, smem, lambda out, x, w: (out, x, w, np.int32(n), np.int32(k), np.int32(wpr))
    per_sm = int(name.split("@")[1])
    return kern, SMS * per_sm, smem, lambda out, x, w: (out, x, w, np.int32(n), np.int32(k))


def run_shape(label, n, k, variants, rows):
    rng = np.random.default_rng(n * 31 + k)
    bytes_ = n * k * 2
    copies = max(1, -(-(512 << 20) // bytes_))
    wbits = bf16_bits(rng.uniform(-0.05, 0.05, size=(n, k)).astype(np.float32))
    xbits = bf16_bits(rng.uniform(-1, 1, size=k).astype(np.float32))
    ref = bf16_value(wbits).astype(np.float64) @ bf16_value(xbits).astype(np.float64)
    ws = [cp.asarray(wbits) for _ in range(copies)]
    x = cp.asarray(xbits)
    out = cp.zeros(n, dtype=cp.uint16)
    for name in variants:
        kern, grid, smem, args = launcher(name, n, k)
        out.fill(0xFFFF)  # NaN poison
        kern((grid,), (256,), args(out, x, ws[0]), shared_mem=smem)
        got = bf16_value(cp.asnumpy(out)).astype(np.float64)
        err = np.linalg.norm(got - ref) / np.linalg.norm(ref)
        stream = cp.cuda.Stream(non_blocking=True)
        with stream:
            stream.begin_capture()
            for w in ws:
                kern((grid,), (256,), args(out, x, w), shared_mem=smem)
            graph = stream.end_capture()
            graph.launch(stream)
            times = []
            for _ in range(7):
                a, b = cp.cuda.Event(), cp.cuda.Event()
                a.record(stream)
                graph.launch(stream)
                b.record(stream)
                b.synchronize()
                times.append(cp.cuda.get_elapsed_time(a, b) / 1e3 / copies)
        t = float(np.median(times))
        rows.append((label, name, t * 1e6, bytes_ / t / 1e9, err))
        print(f"{label:14} {name:18} {t * 1e6:8.1f} us {bytes_ / t / 1e9:7.0f} GB/s  err {err:.1e}", flush=True)
    del ws


def read_ceiling():
    buf = cp.random.randint(0, 1 << 30, size=(1 << 30) // 4, dtype=cp.int32)
    out = cp.zeros(1, dtype=cp.float32)
    kern = MOD.get_function("read_probe")
    best = 0
    for per_sm in (4, 8, 16):
        for _ in range(2):
            a, b = cp.cuda.Event(), cp.cuda.Event()
            a.record()
            kern((SMS * per_sm,), (256,), (out, buf, np.int64(buf.nbytes // 16)))
            b.record()
            b.synchronize()
            best = max(best, buf.nbytes / (cp.cuda.get_elapsed_time(a, b) / 1e3) / 1e9)
    return best


def main():
    variants = sys.argv[1].split(",") if len(sys.argv) > 1 else [
        "gemv", "vb_ld0_u8", "vb_ld1_u8", "vb_ld2_u8", "vb_ld1_u8_xs", "vb_ld2_u8_xs", "vb_ld1_u16_xs",
        "vb_ld1_u4_xs", "vb_ld1_u8_xs@1", "vp_ld1_r1_u8@2", "vp_ld1_r1_u8@4", "vp_ld1_r2_u4@2", "vp_ld1_r2_u4@4",
        "vp_ld1_r4_u2@2", "vp_ld2_r2_u4@4", "vp_ld1_r2_u8@2", "vh_u8@4", "vh_u4@4"]
    ceiling = read_ceiling()
    print(f"read ceiling (read_probe): {ceiling:.0f} GB/s, {SMS} SMs", flush=True)
    rows = []
    # GEMV_SHAPES="0.6B,30B": only the shapes whose label contains one of these.
    only = [x for x in os.environ.get("GEMV_SHAPES", "").split(",") if x]
    shapes = {label: nk for label, nk in SHAPES.items() if not only or any(o in label for o in only)}
    for label, (n, k) in shapes.items():
        run_shape(label, n, k, variants, rows)
    print("\n| shape | best variant | GB/s | of read ceiling | shipped gemv GB/s |\n|---|---|---|---|---|")
    for label in shapes:
        mine = [r for r in rows if r[0] == label and r[4] < 1e-2]
        best = max(mine, key=lambda r: r[3])
        base = next(r for r in rows if r[0] == label and r[1] == "gemv")
        print(f"| {label} | {best[1]} | {best[3]:.0f} | {best[3] / ceiling:.2f} | {base[3]:.0f} |")
    print("\nmean GB/s over shapes per variant:")
    for v in variants:
        vals = [r[3] for r in rows if r[1] == v]
        print(f"  {v:18} {np.mean(vals):7.0f}  (max err {max(r[4] for r in rows if r[1] == v):.1e})")


if __name__ == "__main__":
    main()
