// matmul.cu: the matrix products cuBLAS doesn't do for us. `gemv_*`: out [T, N] = x [T, K] · w [N, K]ᵀ
// for T <= GEMV_MAX_ROWS (decode), one warp per weight row reading it once with 16-byte loads for all
// T rows (plus fused q/k/v, gate·up·SwiGLU and MoE-expert forms). `router_logits`: the same product
// with f32 output (MoE routing is f32). `grouped_gemm`: per-expert tiles of a sorted row list (MoE
// experts, no host sync).

#define GEMV_MAX_ROWS 8

// The decode GEMVs (T <= GEMV_MAX_ROWS rows of x, K % VEC == 0), bandwidth-bound: each weight row is
// read once, by one warp. Persistent grid: the host launches a few blocks per SM (fewer when there are
// few rows) and warp g of G takes rows g, g + G, ... A lane issues GV_UNROLL 16-byte weight loads before
// using any: written as conditional loads consumed under a branch, because with clamped unconditional
// loads ptxas interleaved each load with its use (one load in flight; 0.6-0.7x the bandwidth,
// benches/gemv_variants.py, RESULTS.md run 10). The x rows a block needs are staged once in shared
// memory (XS) when they fit in GV_SMEM_X bytes, else read through L1.
#ifndef GV_UNROLL  // tunable: QWEN3RS_CUDA_DEFINES (compile.rs)
#define GV_UNROLL 8                     // 16-byte weight loads in flight per lane
#endif
// Least blocks of 256 threads per SM the decode GEMV kernels are compiled for (__launch_bounds__):
// above 1 ptxas caps their registers (65,536 / (256 × GV_MIN_BLOCKS)) for more warps an SM.
// Unset: plain __launch_bounds__(256) (ptxas's own choice; an explicit 1 gives other register counts).
#ifdef GV_MIN_BLOCKS  // tunable: QWEN3RS_CUDA_DEFINES (compile.rs)
#define GV_BOUNDS __launch_bounds__(256, GV_MIN_BLOCKS)
#else
#define GV_BOUNDS __launch_bounds__(256)
#endif

template <bool XS>
__device__ __forceinline__ uint4 ld_x(const uint4* p) { return XS ? *p : __ldg(p); }

// A 16-byte weight load that bypasses L1 (read once: caching it there only costs; 1.06-1.37x the
// bandwidth of __ldg on the Qwen3 decode shapes, benches/gemv_variants.py `vp_ld1_*`, RESULTS.md run 15),
// not through the read-only path, so that the loads issued before the wait are served (common.cuh ld_early).
__device__ __forceinline__ uint4 ld_weight(const uint4* p) { return ld_early(p); }

// Sum over the VEC products of two unpacked vectors, in two chains (half the FMA latency).
__device__ __forceinline__ float dot_f(const float (&wf)[VEC], const float (&xf)[VEC]) {
    float s0 = 0.f, s1 = 0.f;
#pragma unroll
    for (int j = 0; j < VEC; j += 2) {
        s0 += wf[j] * xf[j];
        s1 += wf[j + 1] * xf[j + 1];
    }
    return s0 + s1;
}

// Sum over the VEC products of a 16-byte weight vector and a 16-byte x vector.
__device__ __forceinline__ float dot_vec(const uint4& w, const uint4& x) {
    float wf[VEC], xf[VEC];
    unpack_vec(w, wf);
    unpack_vec(x, xf);
    return dot_f(wf, xf);
}

// A lane's batch of a weight row: its GV_UNROLL 16-byte loads from vector i0 on (zeros past kv).
// The decode products issue their warp's first batch (of its first row) before grid_dependency():
// weights are not written by the kernel ahead, so those loads are in flight through the wait and the
// input's staging instead of starting after them (0.6B decode +3.8 %, 8B and 32B +1.4-1.8 %, RESULTS.md
// run 20.2); row_dot / row_dot_pair take it as `loaded`.
__device__ __forceinline__ void load_batch(uint4 (&v)[GV_UNROLL], const act_t* wrow, int i0, int kv) {
    const uint4* wr = reinterpret_cast<const uint4*>(wrow);
#pragma unroll
    for (int u = 0; u < GV_UNROLL; u++) {
        int i = i0 + u * 32;
        v[u] = i < kv ? ld_weight(wr + i) : make_uint4(0u, 0u, 0u, 0u);
    }
}

// x vector xv normed: each element rnd(w * (x * inv)), w the norm weight vector (stage_input).
__device__ __forceinline__ uint4 norm_vec(uint4 xv, uint4 w, float inv) {
    act_t* xe = reinterpret_cast<act_t*>(&xv);
    const act_t* we = reinterpret_cast<const act_t*>(&w);
#pragma unroll
    for (int j = 0; j < VEC; j++) xe[j] = from_f(to_f(we[j]) * (to_f(xe[j]) * inv));
    return xv;
}

// step(u, i) for each vector i = i0 + 32 u (u < GV_UNROLL) of a lane's batch in the row (i < kv). Where
// the warp's whole batch lies in the row (every batch but a row's last partial one) the calls come
// without a bounds branch each.
template <class F>
__device__ __forceinline__ void batch_vectors(int i0, int kv, F step) {
    if ((i0 & ~31) + 32 * GV_UNROLL <= kv) {
#pragma unroll
        for (int u = 0; u < GV_UNROLL; u++) step(u, i0 + u * 32);
    } else {
#pragma unroll
        for (int u = 0; u < GV_UNROLL; u++)
            if (i0 + u * 32 < kv) step(u, i0 + u * 32);
    }
}

// Lane partial sums acc[t] += x row t · weight row (t < T <= TMAX; K = kv * VEC; x rows kv apart).
// wv: with `loaded`, the row's first batch, already issued (load_batch); else scratch.
template <int TMAX, bool XS>
__device__ __forceinline__ void row_dot(float* acc, const act_t* wrow, const act_t* x, int T, int kv, uint4 (&wv)[GV_UNROLL], bool loaded) {
    const uint4* xr = reinterpret_cast<const uint4*>(x);
    for (int i0 = threadIdx.x & 31; i0 < kv; i0 += 32 * GV_UNROLL, loaded = false) {
        if (!loaded) load_batch(wv, wrow, i0, kv);
        batch_vectors(i0, kv, [&](int u, int i) {
            float wf[VEC];
            unpack_vec(wv[u], wf);
#pragma unroll
            for (int t = 0; t < TMAX; t++) {
                if (t < T) {
                    float xf[VEC];
                    unpack_vec(ld_x<XS>(xr + (size_t)t * kv + i), xf);
                    acc[t] += dot_f(wf, xf);
                }
            }
        });
    }
}

// row_dot for two weight rows at once (gate and up): both rows' GV_UNROLL loads are in flight
// together, one memory round trip where two row_dot calls take two. Each row's sums add the same
// products in the same order as row_dot: the same bits. GV_PAIR_ROWS 1 makes it two row_dot calls, one
// row's loads after the other's (fewer registers: 62 against 90 for gemv_swiglu_t1_xs, 63 against 93
// for moe_gemv_swiglu_xs, benches/profiles/ptxas_report.py: more blocks an SM), for sweeps.
#ifndef GV_PAIR_ROWS  // tunable: QWEN3RS_CUDA_DEFINES (compile.rs)
#define GV_PAIR_ROWS 2
#endif
// av, bv: with `loaded`, the rows' first batches, already issued (load_batch, a's then b's).
template <int TMAX, bool XS>
__device__ __forceinline__ void row_dot_pair(float* a, float* b, const act_t* arow, const act_t* brow, const act_t* x, int T, int kv,
    uint4 (&av)[GV_UNROLL], uint4 (&bv)[GV_UNROLL], bool loaded) {
    if (GV_PAIR_ROWS == 1) {
        row_dot<TMAX, XS>(a, arow, x, T, kv, av, loaded);
        row_dot<TMAX, XS>(b, brow, x, T, kv, bv, loaded);
        return;
    }
    const uint4* xr = reinterpret_cast<const uint4*>(x);
    for (int i0 = threadIdx.x & 31; i0 < kv; i0 += 32 * GV_UNROLL, loaded = false) {
        if (!loaded) {
            load_batch(av, arow, i0, kv);
            load_batch(bv, brow, i0, kv);
        }
        batch_vectors(i0, kv, [&](int u, int i) {
#pragma unroll
            for (int t = 0; t < TMAX; t++) {
                if (t < T) {
                    const uint4 xv = ld_x<XS>(xr + (size_t)t * kv + i);
                    a[t] += dot_vec(av[u], xv);
                    b[t] += dot_vec(bv[u], xv);
                }
            }
        });
    }
}

// Lane partial sums a[r] += x[r] · w[r] for NR rows of K = kv * VEC from anywhere (row r skipped where
// w[r] is null), the next RD_UNROLL 16-byte loads of every row issued before any is used: for short rows
// (the MoE down projection, K = 768 on Qwen3-30B-A3B), where one row at a time gives a lane too few
// loads in flight (two rows: 1.39x, gemv_variants.py `vp_ld1_r2_u4` against one, RESULTS.md run 15).
// RD_UNROLL 3: Qwen3's expert rows (768, 1536) are 3 or 6 loads a lane in bf16, none predicated off.
// A row's lane sum adds its vectors in row_dot's order: the same bits.
#ifndef RD_UNROLL  // tunable: QWEN3RS_CUDA_DEFINES (compile.rs)
#define RD_UNROLL 3
#endif
template <int NR, bool XS>
__device__ __forceinline__ void rows_dot(float* a, const act_t* const* w, const act_t* const* x, int kv) {
    for (int i0 = threadIdx.x & 31; i0 < kv; i0 += 32 * RD_UNROLL) {
        uint4 v[NR][RD_UNROLL];
#pragma unroll
        for (int r = 0; r < NR; r++) {
#pragma unroll
            for (int u = 0; u < RD_UNROLL; u++) {
                int i = i0 + u * 32;
                v[r][u] = w[r] && i < kv ? ld_weight(reinterpret_cast<const uint4*>(w[r]) + i) : make_uint4(0u, 0u, 0u, 0u);
            }
        }
#pragma unroll
        for (int r = 0; r < NR; r++) {
#pragma unroll
            for (int u = 0; u < RD_UNROLL; u++) {
                int i = i0 + u * 32;
                if (w[r] && i < kv) a[r] += dot_vec(v[r][u], ld_x<XS>(reinterpret_cast<const uint4*>(x[r]) + i));
            }
        }
    }
}

// A thread's share of an RMSNorm weight [K] for stage_input: vectors threadIdx.x + c * blockDim.x for
// c < NW_REGS (with 256 threads all of them up to K = 4,096 in bf16, 2,048 in f32), loaded before
// grid_dependency() (a weight), so that the norm's second pass needs no memory round trip after its
// reduction (0.6B decode +3.1 %, RESULTS.md run 20.2); stage_input loads any further vectors itself.
// Zeros without nw. (3 a thread made gemv3_t1_xs spill 16 bytes at ptxas's 64-register choice.)
#define NW_REGS 2
struct NormW {
    uint4 v[NW_REGS];
};
__device__ __forceinline__ NormW load_norm_weight(const act_t* nw, int K) {
    NormW r;
#pragma unroll
    for (int c = 0; c < NW_REGS; c++) {
        int i = threadIdx.x + c * blockDim.x;
        r.v[c] = nw && i < K / VEC ? ld_early(reinterpret_cast<const uint4*>(nw) + i) : make_uint4(0u, 0u, 0u, 0u);
    }
    return r;
}

// Vector i of round(x + delta), the residual stream after the add (delta null: x's own vector).
__device__ __forceinline__ uint4 residual_vec(const act_t* x, const act_t* delta, int i) {
    uint4 a = __ldg(reinterpret_cast<const uint4*>(x) + i);
    if (delta) {
        act_t* ae = reinterpret_cast<act_t*>(&a);
        uint4 d = __ldg(reinterpret_cast<const uint4*>(delta) + i);
        const act_t* de = reinterpret_cast<const act_t*>(&d);
#pragma unroll
        for (int j = 0; j < VEC; j++) ae[j] = from_f(to_f(ae[j]) + to_f(de[j]));
    }
    return a;
}

// The sum of the squares of a vector's elements.
__device__ __forceinline__ float sum_sq(const uint4& a) {
    const act_t* ae = reinterpret_cast<const act_t*>(&a);
    float sq = 0.f;
#pragma unroll
    for (int j = 0; j < VEC; j++) sq += to_f(ae[j]) * to_f(ae[j]);
    return sq;
}

// The first half of a fused input norm (stage_input): the T rows round(x + delta) into shared memory
// (block 0 also stores them to x_out, unless null) and inv[t] = 1 / rms of row t. A thread takes columns
// c = threadIdx.x, + blockDim.x, ... of every row. Visible to the block on return (block_sum's barriers).
template <int TMAX>
__device__ __forceinline__ void stage_unscaled(const act_t* x, int T, int K, const act_t* delta, act_t* x_out, float eps,
    float (&inv)[TMAX]) {
    extern __shared__ uint4 x_shared[];
    const int kv = K / VEC;
    float ss[TMAX];
#pragma unroll
    for (int t = 0; t < TMAX; t++) ss[t] = 0.f;
    for (int c = threadIdx.x; c < kv; c += blockDim.x) {
#pragma unroll
        for (int t = 0; t < TMAX; t++) {
            if (t < T) {
                const int i = t * kv + c;
                const uint4 a = residual_vec(x, delta, i);
                if (x_out && blockIdx.x == 0) reinterpret_cast<uint4*>(x_out)[i] = a;
                x_shared[i] = a;
                ss[t] += sum_sq(a);
            }
        }
    }
#pragma unroll
    for (int t = 0; t < TMAX; t++) inv[t] = t < T ? 1.f / sqrtf(block_sum(ss[t]) / (float)K + eps) : 0.f;
}

// The second half of a fused input norm (stage_input): the thread's columns c (threadIdx.x, +
// blockDim.x, ...) of the T rows staged in shared memory times their norm weight and inv[t].
template <int TMAX>
__device__ __forceinline__ void scale_columns(int T, int kv, const float* inv, const act_t* nw, const NormW& nwr) {
    extern __shared__ uint4 x_shared[];
    auto scale_column = [&](int c, uint4 w) {
#pragma unroll
        for (int t = 0; t < TMAX; t++) {
            if (t < T) x_shared[t * kv + c] = norm_vec(x_shared[t * kv + c], w, inv[t]);
        }
    };
    const uint4* nwv = reinterpret_cast<const uint4*>(nw);
#pragma unroll
    for (int r = 0; r < NW_REGS; r++) {
        const int c = threadIdx.x + r * blockDim.x;
        if (c < kv) scale_column(c, nwr.v[r]);
    }
    for (int c = threadIdx.x + NW_REGS * blockDim.x; c < kv; c += blockDim.x) scale_column(c, __ldg(nwv + c));
}

// The rows of x a product reads: T rows of K, staged in shared memory (XS) or read from global memory.
// With a norm (nw non-null; XS only) the block's input norm is fused in front of the product: the rows
// are rms_norm(round(x + delta)) * nw rounded exactly as add_rms_norm (norm.cu) rounds them (delta may
// be null), and block 0 also stores round(x + delta) to x_out (null: not stored), the residual stream
// after the add. x_out is never x or delta: every block reads those. nwr: load_norm_weight(nw, K).
// Visible to the block on return.
template <int TMAX, bool XS>
__device__ __forceinline__ const act_t* stage_input(const act_t* x, int T, int K, const act_t* delta, act_t* x_out,
    const act_t* nw, float eps, const NormW& nwr) {
    extern __shared__ uint4 x_shared[];
    if (!XS) return x;
    const uint4* src = reinterpret_cast<const uint4*>(x);
    const int kv = K / VEC;
    if (!nw) {
        for (int i = threadIdx.x; i < T * kv; i += blockDim.x) x_shared[i] = __ldg(src + i);
        __syncthreads();
        TL_MARK(0, 0.f);
        return reinterpret_cast<const act_t*>(x_shared);
    }
    float inv[TMAX];
    stage_unscaled<TMAX>(x, T, K, delta, x_out, eps, inv);
    scale_columns<TMAX>(T, kv, inv, nw, nwr);
    __syncthreads();
    TL_MARK(0, 0.f);
    return reinterpret_cast<const act_t*>(x_shared);
}

// stage_input without a norm.
template <int TMAX, bool XS>
__device__ __forceinline__ const act_t* stage_input(const act_t* x, int T, int K) {
    return stage_input<TMAX, XS>(x, T, K, nullptr, nullptr, nullptr, 0.f, NormW{});
}

// out[t * N + n] = x row t · weight row `wrow` for t < T, by the calling warp (wv, loaded: row_dot's).
template <int TMAX, bool XS>
__device__ __forceinline__ void gemv_one(act_t* out, const act_t* wrow, const act_t* xs, int T, int N, int n, int K,
    uint4 (&wv)[GV_UNROLL], bool loaded) {
    float acc[TMAX];
#pragma unroll
    for (int t = 0; t < TMAX; t++) acc[t] = 0.f;
    row_dot<TMAX, XS>(acc, wrow, xs, T, K / VEC, wv, loaded);
#pragma unroll
    for (int t = 0; t < TMAX; t++) {
        if (t < T) {
            float s = warp_sum(acc[t]);
            if (t == 0) TL_MARK(1, s);  // timeline builds: thread 0's row summed (its weights arrived)
            if ((threadIdx.x & 31) == 0) out[(size_t)t * N + n] = from_f(s);
        }
    }
}

// out [T, N] = x [T, K] · w [N, K]ᵀ.
template <int TMAX, bool XS>
__device__ __forceinline__ void gemv_rows(act_t* out, const act_t* x, const act_t* w, int T, int N, int K) {
    const int n0 = warp_id_global();
    uint4 wv[GV_UNROLL];
    const bool early = n0 < N;
    if (early) load_batch(wv, w + (size_t)n0 * K, threadIdx.x & 31, K / VEC);
    grid_dependency();
    const act_t* xs = stage_input<TMAX, XS>(x, T, K);
    for (int n = n0; n < N; n += warps_global()) gemv_one<TMAX, XS>(out, w + (size_t)n * K, xs, T, N, n, K, wv, early && n == n0);
}

// Three products of one input in one launch (the q, k, v projections): outI [T, NI] = x · wIᵀ, rows
// numbered through the three; with nw, of the normed input (stage_input).
template <int TMAX, bool XS>
__device__ __forceinline__ void gemv3_rows(act_t* o0, const act_t* w0, int N0, act_t* o1, const act_t* w1, int N1,
    act_t* o2, const act_t* w2, int N2, const act_t* x, int T, int K, const act_t* delta, act_t* x_out, const act_t* nw, float eps) {
    // Row r of the three: (output, weight matrix, its rows, row within it).
    auto pick = [&](int r, act_t*& o, const act_t*& w, int& N) {
        o = o0; w = w0; N = N0;
        if (r >= N0 + N1) { r -= N0 + N1; o = o2; w = w2; N = N2; }
        else if (r >= N0) { r -= N0; o = o1; w = w1; N = N1; }
        return r;
    };
    const int r0 = warp_id_global();
    uint4 wv[GV_UNROLL];
    const bool early = r0 < N0 + N1 + N2;
    if (early) {
        act_t* o; const act_t* w; int N;
        int n = pick(r0, o, w, N);
        load_batch(wv, w + (size_t)n * K, threadIdx.x & 31, K / VEC);
    }
    const NormW nwr = load_norm_weight(nw, K);
    grid_dependency();
    const act_t* xs = stage_input<TMAX, XS>(x, T, K, delta, x_out, nw, eps, nwr);
    for (int r = r0; r < N0 + N1 + N2; r += warps_global()) {
        act_t* o; const act_t* w; int N;
        int n = pick(r, o, w, N);
        gemv_one<TMAX, XS>(o, w + (size_t)n * K, xs, T, N, n, K, wv, early && r == r0);
    }
}

// The dense MLP's first half: out [T, N] = round(round(silu(round(x·gateᵀ))) * round(x·upᵀ)), rounding
// exactly where matmul, matmul, swiglu would; with nw, of the normed input (stage_input).
template <int TMAX, bool XS>
__device__ __forceinline__ void gemv_swiglu_rows(act_t* out, const act_t* x, const act_t* gate, const act_t* up,
    int T, int N, int K, const act_t* delta, act_t* x_out, const act_t* nw, float eps) {
    const int lane = threadIdx.x & 31, n0 = warp_id_global();
    uint4 gv[GV_UNROLL], uv[GV_UNROLL];
    const bool early = n0 < N;
    if (early) {
        load_batch(gv, gate + (size_t)n0 * K, lane, K / VEC);
        load_batch(uv, up + (size_t)n0 * K, lane, K / VEC);
    }
    const NormW nwr = load_norm_weight(nw, K);
    grid_dependency();
    const act_t* xs = stage_input<TMAX, XS>(x, T, K, delta, x_out, nw, eps, nwr);
    for (int n = n0; n < N; n += warps_global()) {
        float g[TMAX], u[TMAX];
#pragma unroll
        for (int t = 0; t < TMAX; t++) g[t] = u[t] = 0.f;
        row_dot_pair<TMAX, XS>(g, u, gate + (size_t)n * K, up + (size_t)n * K, xs, T, K / VEC, gv, uv, early && n == n0);
#pragma unroll
        for (int t = 0; t < TMAX; t++) {
            if (t < T) {
                float gs = warp_sum(g[t]), us = warp_sum(u[t]);
                if (lane == 0) out[(size_t)t * N + n] = from_f(rnd(silu(rnd(gs))) * rnd(us));
            }
        }
    }
}

// Kernel names: <family>_t1 / _t8 (TMAX 1 or GEMV_MAX_ROWS) and _xs (x in shared memory). 256 threads.
// gemv3 and gemv_swiglu take the norm arguments of stage_input (nw null: none; non-null only with _xs).
#define GEMV_FAMILY(SUF, TMAX, XS)                                                                           \
    extern "C" __global__ void GV_BOUNDS gemv##SUF(act_t* out, const act_t* x, const act_t* w,     \
        int T, int N, int K) { TIMELINE("gemv" #SUF); gemv_rows<TMAX, XS>(out, x, w, T, N, K); }                                       \
    extern "C" __global__ void GV_BOUNDS gemv3##SUF(act_t* o0, const act_t* w0, int N0,           \
        act_t* o1, const act_t* w1, int N1, act_t* o2, const act_t* w2, int N2, const act_t* x, int T, int K,    \
        const act_t* delta, act_t* x_out, const act_t* nw, float eps) {                                         \
        TIMELINE("gemv3" #SUF); gemv3_rows<TMAX, XS>(o0, w0, N0, o1, w1, N1, o2, w2, N2, x, T, K, delta, x_out, nw, eps); }              \
    extern "C" __global__ void GV_BOUNDS gemv_swiglu##SUF(act_t* out, const act_t* x,             \
        const act_t* gate, const act_t* up, int T, int N, int K, const act_t* delta, act_t* x_out,               \
        const act_t* nw, float eps) { TIMELINE("gemv_swiglu" #SUF); gemv_swiglu_rows<TMAX, XS>(out, x, gate, up, T, N, K, delta, x_out, nw, eps); }

GEMV_FAMILY(_t1, 1, false)
GEMV_FAMILY(_t1_xs, 1, true)
GEMV_FAMILY(_t8, GEMV_MAX_ROWS, false)
GEMV_FAMILY(_t8_xs, GEMV_MAX_ROWS, true)

#define GEMV_WARPS 8

// Any K (element loads). grid ceil(N / GEMV_WARPS).
extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32) gemv_scalar(act_t* out, const act_t* x, const act_t* w, int T, int N, int K) {
    grid_dependency();
    int lane = threadIdx.x & 31;
    int n = blockIdx.x * GEMV_WARPS + (threadIdx.x >> 5);
    if (n >= N) return;
    const act_t* wr = w + (size_t)n * K;
    float acc[GEMV_MAX_ROWS];
#pragma unroll
    for (int t = 0; t < GEMV_MAX_ROWS; t++) acc[t] = 0.f;
    for (int k = lane; k < K; k += 32) {
        float wk = to_f(wr[k]);
#pragma unroll
        for (int t = 0; t < GEMV_MAX_ROWS; t++)
            if (t < T) acc[t] += wk * to_f(x[(size_t)t * K + k]);
    }
#pragma unroll
    for (int t = 0; t < GEMV_MAX_ROWS; t++) {
        if (t < T) {
            float s = warp_sum(acc[t]);
            if (lane == 0) out[(size_t)t * N + n] = from_f(s);
        }
    }
}

// logits [T, E] (f32) = x [T, H] · router [E, H]ᵀ; one warp per output, 16-byte loads when H allows.
// With nw (H % VEC == 0, H elements in dynamic shared memory) x is first normed as stage_input does it
// for row t (delta, x_out: row t of them; blocks with blockIdx.x 0 store x_out), so the MoE block's
// input norm needs no launch of its own; those blocks also store the normed rows to xn_out (null: not
// stored), which the experts' gate/up then read as they are instead of norming x_out again (each of
// their blocks would: 1.7 µs of the Qwen3-30B-A3B decode gate/up kernel, RESULTS.md run 22.1).
// grid (ceil(E / W), T), W warps (host: router_warps).
extern "C" __global__ void router_logits(float* logits, const act_t* x, const act_t* router, int E, int H,
    const act_t* delta, act_t* x_out, const act_t* nw, float eps, act_t* xn_out) {
    TIMELINE("router_logits");
    int lane = threadIdx.x & 31;
    int e = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    int t = blockIdx.y;
    // The warp's router row: its first batch in registers before the wait (16-byte loads), the rest (or
    // a row of element loads) into L2.
    const bool early = e < E && H % VEC == 0;
    const int first = early ? min(H, 32 * GV_UNROLL * VEC) : 0;  // elements in that batch
    uint4 wv[GV_UNROLL];
    if (early) load_batch(wv, router + (size_t)e * H, lane, H / VEC);
    if (e < E) prefetch_lines(router + (size_t)e * H + first, (H - first) * (int)sizeof(act_t));
    const NormW nwr = load_norm_weight(nw, H);
    grid_dependency();
    size_t row = (size_t)t * H;
    const act_t* xr = nw ? stage_input<1, true>(x + row, 1, H, delta ? delta + row : nullptr, x_out ? x_out + row : nullptr, nw, eps, nwr)
                         : x + row;
    if (nw && xn_out && blockIdx.x == 0) {
        for (int c = threadIdx.x; c < H / VEC; c += blockDim.x)
            reinterpret_cast<uint4*>(xn_out + row)[c] = reinterpret_cast<const uint4*>(xr)[c];
    }
    if (e >= E) return;
    const act_t* wr = router + (size_t)e * H;
    float s = 0.f;
    if (H % VEC == 0) {
        float acc[1] = {0.f};
        if (nw) row_dot<1, true>(acc, wr, xr, 1, H / VEC, wv, true);
        else row_dot<1, false>(acc, wr, xr, 1, H / VEC, wv, true);
        s = acc[0];
    } else {
        for (int k = lane; k < H; k += 32) s += to_f(xr[k]) * to_f(wr[k]);
    }
    s = warp_sum(s);
    TL_MARK(1, s);  // timeline builds: thread 0's logit summed
    if (lane == 0) logits[(size_t)t * E + e] = s;
}

// The MoE block's o projection with its router folded in (decode, one row; N % 8 == 0, E <= 256):
// x_out [N] = round(x + round(a · wᵀ)), the residual after the attention's add (what stage_input makes
// of x and the product, bit for bit), and acc[e] += Σ_n router[e, n] · nw[n] · x_out[n] over the block's
// rows n, in fixed point (units of 2^-32 in an int64: integer sums are the same bits in any order, so
// the result does not depend on which block adds first). The post-attention RMSNorm is linear in
// x_out up to the scale 1 / rms(x_out), so logit e is acc[e] · 2^-32 / rms(x_out): the gate/up expert
// kernel takes it from there (moe_gemv_swiglu_rows) and no router kernel runs. acc is zero on entry
// (moe_down_combine_rows clears it once the gate/up kernel has read it). Rows as in gemv_rows (the
// warps of block b take rows 8b .. 8b + 7, then 8 (b + grid) ..), so in each round a block's threads
// e < E read 8 adjacent columns of router row e (the first round's before the wait: a weight).
// A block's share of a sum must stay under 2^31 in magnitude (the int64's range; real hidden states
// and routers are orders of magnitude below it). 256 threads; grid as for gemv (gemv_plan).
#define OR_UNIT 4294967296.f  // 2^32: acc counts units of 2^-32
// acc's sums lie OR_STRIDE int64 apart (16: a 128-byte line each; the host allocates for 16). In one
// line the 256 blocks' 32,768 adds queue at the few L2 slices holding them.
#ifndef OR_STRIDE  // tunable: QWEN3RS_CUDA_DEFINES (compile.rs), 1..=16
#define OR_STRIDE 16
#endif
#if OR_STRIDE > 16
#error "OR_STRIDE: at most 16 (CudaMoe::route_acc holds 16 words an expert)"
#endif
template <bool XS>
__device__ __forceinline__ void gemv_router_rows(act_t* x_out, const act_t* a, const act_t* w, int N, int K, const act_t* x,
    const act_t* nw, const act_t* router, int E, unsigned long long* acc) {
    __shared__ float xw[2][8];  // by round parity, warp j: x_out[n] · nw[n] of the round's row n = base + j
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, e = threadIdx.x;
    const int n0 = warp_id_global();
    uint4 wv[GV_UNROLL];
    const bool early = n0 < N;
    if (early) load_batch(wv, w + (size_t)n0 * K, lane, K / VEC);
    RawND<8> cols;  // router[e, base .. base + 7]
    if (e < E && early) cols = load_raw<8>(router + (size_t)e * N + 8 * blockIdx.x);
    grid_dependency();
    const act_t* xs = stage_input<1, XS>(a, 1, K);
    float part = 0.f;  // thread e's sum
    int parity = 0;
    for (int base = 8 * blockIdx.x; base < N; base += 8 * gridDim.x, parity ^= 1) {  // block-uniform
        const int n = base + warp;
        if (base != 8 * blockIdx.x && e < E) cols = load_raw<8>(router + (size_t)e * N + base);
        const float xn = to_f(x[n]), wn = to_f(nw[n]);  // in flight through the row
        float acc_n[1] = {0.f};
        row_dot<1, XS>(acc_n, w + (size_t)n * K, xs, 1, K / VEC, wv, early && base == 8 * blockIdx.x);
        const act_t h = from_f(xn + rnd(warp_sum(acc_n[0])));
        TL_MARK(1, to_f(h));
        if (lane == 0) {
            x_out[n] = h;
            xw[parity][warp] = to_f(h) * wn;
        }
        __syncthreads();
        if (e < E) {
            float c[8];
            unpack_raw(cols, c);
#pragma unroll
            for (int j = 0; j < 8; j++) part += c[j] * xw[parity][j];
        }
    }
    if (e < E) atomicAdd(acc + e * OR_STRIDE, (unsigned long long)__float2ll_rn(part * OR_UNIT));
}

extern "C" __global__ void GV_BOUNDS gemv_router(act_t* x_out, const act_t* a, const act_t* w, int N, int K, const act_t* x,
    const act_t* nw, const act_t* router, int E, unsigned long long* acc) {
    TIMELINE("gemv_router"); gemv_router_rows<false>(x_out, a, w, N, K, x, nw, router, E, acc); }
extern "C" __global__ void GV_BOUNDS gemv_router_xs(act_t* x_out, const act_t* a, const act_t* w, int N, int K, const act_t* x,
    const act_t* nw, const act_t* router, int E, unsigned long long* acc) {
    TIMELINE("gemv_router_xs"); gemv_router_rows<true>(x_out, a, w, N, K, x, nw, router, E, acc); }

#define GG_TM 16
#define GG_TN 64
#define GG_TK 32

// out [P, N] rows of expert segments: for tile b (tile_e[b] = expert, or -1 past the last tile),
// rows tile_row0[b] .. + tile_rows[b] of `out` get x[src[row]] · w[e]ᵀ (src null: x[row]).
// w is [E, N, K]. grid (ceil(N / GG_TN), max_tiles), 256 threads; f32 accumulation in shared tiles.
extern "C" __global__ void __launch_bounds__(256) grouped_gemm(act_t* out, const act_t* x, const act_t* w,
    const int* src, const int* tile_e, const int* tile_row0, const int* tile_rows, int N, int K) {
    __shared__ float xs[GG_TM][GG_TK + 1];
    __shared__ float ws[GG_TN][GG_TK + 1];
    grid_dependency();
    int tile = blockIdx.y;
    int e = tile_e[tile];
    if (e < 0) return;
    int row0 = tile_row0[tile], nrows = tile_rows[tile];
    int n0 = blockIdx.x * GG_TN;
    const act_t* we = w + (size_t)e * N * K;
    int tid = threadIdx.x, r = tid / 16, cb = tid % 16;
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    for (int k0 = 0; k0 < K; k0 += GG_TK) {
        for (int i = tid; i < GG_TM * GG_TK; i += 256) {
            int rr = i / GG_TK, kk = i % GG_TK;
            float v = 0.f;
            if (rr < nrows && k0 + kk < K) {
                int p = row0 + rr;
                int s = src ? src[p] : p;
                v = to_f(x[(size_t)s * K + k0 + kk]);
            }
            xs[rr][kk] = v;
        }
        for (int i = tid; i < GG_TN * GG_TK; i += 256) {
            int cc = i / GG_TK, kk = i % GG_TK;
            int n = n0 + cc;
            ws[cc][kk] = (n < N && k0 + kk < K) ? to_f(we[(size_t)n * K + k0 + kk]) : 0.f;
        }
        __syncthreads();
#pragma unroll 8
        for (int kk = 0; kk < GG_TK; kk++) {
            float xv = xs[r][kk];
#pragma unroll
            for (int j = 0; j < 4; j++) acc[j] += xv * ws[cb + 16 * j][kk];
        }
        __syncthreads();
    }
    if (r < nrows) {
#pragma unroll
        for (int j = 0; j < 4; j++) {
            int n = n0 + cb + 16 * j;
            if (n < N) out[(size_t)(row0 + r) * N + n] = from_f(acc[j]);
        }
    }
}

// MoE decode: only the chosen experts' weights are read, with expert ids from device memory (no host
// sync, no sorting). Pair p = t*k + s (moe_route's order); ids [P] local expert ids, -1 for other ranks'
// experts (expert parallelism), skipped. Weights are [E, N, K].

// moe_gemv_swiglu_rows' products: the warps' (pair, row) in turn, x's rows staged as xs.
template <bool XS>
__device__ __forceinline__ void moe_gemv_swiglu_loop(act_t* act, const act_t* xs, const act_t* gate, const act_t* up,
    const int* chosen, int k, int P, int N, int K) {
    const int lane = threadIdx.x & 31;
    for (int r = warp_id_global(); r < P * N; r += warps_global()) {
        int p = r / N, n = r % N;
        if (chosen[p] < 0) continue;  // another rank's expert (expert parallelism)
        size_t off = ((size_t)chosen[p] * N + n) * K;
        const act_t* xr = xs + (size_t)(p / k) * K;
        float g[1] = {0.f}, u[1] = {0.f};
        uint4 gv[GV_UNROLL], uv[GV_UNROLL];
        row_dot_pair<1, XS>(g, u, gate + off, up + off, xr, 1, K / VEC, gv, uv, false);
        float gs = warp_sum(g[0]), us = warp_sum(u[0]);
        if (lane == 0) act[(size_t)p * N + n] = from_f(rnd(silu(rnd(gs))) * rnd(us));
    }
}

// The experts' first half for decode: act [P, N] = swiglu(x[p / k] · gate[e]ᵀ, x[p / k] · up[e]ᵀ)
// rounded as grouped_gemm, grouped_gemm, swiglu. x is [T, K] with T = P / k: the rows router_logits
// normed (its x_normed), or with `acc` below the row before its norm.
// Routing: with `logits` (router_logits' [T, E] f32, E <= ROUTE_MAX_E) every block routes the T rows
// itself (route_rows, into shared memory: no moe_route launch) and block 0 also stores ids / weights
// [P] for moe_down_combine; without, ids come from moe_route. With `acc` instead (one row, XS, E <= 256:
// gemv_router_rows' sums) x is the residual after the attention's add, which every block norms with
// nw itself (nw null without acc), and logit e is acc[e] · 2^-32 / rms(x).
template <bool XS>
__device__ __forceinline__ void moe_gemv_swiglu_rows(act_t* act, const act_t* x, const act_t* gate, const act_t* up,
    int* ids, float* weights, const float* logits, const unsigned long long* acc, const act_t* nw, float eps, int E,
    int norm_topk, int e0, int held, int k, int P, int N, int K) {
    __shared__ __align__(16) float route_p[GEMV_MAX_ROWS][ROUTE_MAX_E];
    __shared__ int route_sel[GEMV_MAX_ROWS * MAX_TOP_K], route_ids[GEMV_MAX_ROWS * MAX_TOP_K];
    const NormW nwr = load_norm_weight(nw, K);  // (nw null unless acc)
    grid_dependency();
    const int* chosen = ids;
    const bool store = blockIdx.x == 0;
    if (XS && acc) {  // (the host passes acc to the _xs kernel only)
        // stage_input's norm in two halves: the sum of squares before the routing, the scaling while
        // warp 0 takes the softmax (route_rows' side job), off the routing's path.
        extern __shared__ uint4 x_shared[];
        const long long sum = threadIdx.x < E ? (long long)acc[threadIdx.x * OR_STRIDE] : 0;
        float inv[1];
        stage_unscaled<1>(x, 1, K, nullptr, nullptr, eps, inv);
        float* lg = &route_p[1][0];  // row 0 holds route_rows' probabilities
        if (threadIdx.x < E) lg[threadIdx.x] = (float)((double)sum * 0x1p-32) * inv[0];
        __syncthreads();
        route_rows(lg, 1, &route_p[0][0], ROUTE_MAX_E, route_sel, route_ids, nullptr, store ? ids : nullptr,
            store ? weights : nullptr, E, k, norm_topk, e0, held, [&] { scale_columns<1>(1, K / VEC, inv, nw, nwr); });
        __syncthreads();  // route_ids and x_shared to every warp
        TL_MARK(1, 0.f);
        moe_gemv_swiglu_loop<XS>(act, reinterpret_cast<const act_t*>(x_shared), gate, up, route_ids, k, P, N, K);
        return;
    }
    if (logits) {
        // x's rows into L1 while the block routes (stage_input reads them next).
        const int x_bytes = P / k * K * (int)sizeof(act_t);
        for (int off = threadIdx.x * 128; off < x_bytes; off += blockDim.x * 128)
            asm volatile("prefetch.global.L1 [%0];" :: "l"(reinterpret_cast<const char*>(x) + off));
        route_rows(logits, P / k, &route_p[0][0], ROUTE_MAX_E, route_sel, route_ids, nullptr, store ? ids : nullptr,
            store ? weights : nullptr, E, k, norm_topk, e0, held);
        chosen = route_ids;  // stage_input's barrier below makes it visible to every warp
        TL_MARK(1, 0.f);
    }
    const act_t* xs = stage_input<GEMV_MAX_ROWS, XS>(x, P / k, K);
    if (!XS && logits) __syncthreads();  // (stage_input without staging has no barrier)
    moe_gemv_swiglu_loop<XS>(act, xs, gate, up, chosen, k, P, N, K);
}

// The experts' second half and the weighted combine for decode: out [T, N], out[t, n] = Σ_s round(weight[t,s]
// * round(act[t*k + s] · w[ids[t*k + s]] row n)) accumulated and rounded in slot order, slots of weight 0
// skipped (other ranks' experts, id -1, have weight 0): what a GEMV into y [P, N] and moe_combine (moe.cu)
// compute, bit for bit, in one launch. MD_WPO warps own an output (t, n): warp j takes slots j, j + MD_WPO,
// ..., MD_SLOTS at a time with all their loads in flight (on Qwen3-30B-A3B the 8 rows are 1.5 KB each, in
// 8 experts); the rounded products meet in shared memory, where the output's first warp adds them up.
// act is [T*k, K] (staged with XS). Persistent grid: a pass of the block takes MD_OUTS outputs; 256 threads.
#ifndef MD_WPO  // tunable: QWEN3RS_CUDA_DEFINES (compile.rs)
#define MD_WPO 2
#endif
// MD_SLOTS 2 (58 registers: 4 blocks an SM, on Qwen3-30B-A3B one pass of the grid over the 2,048 outputs,
// two rounds of loads a warp) decoded 30B-A3B 2.8 % faster than 4 (96 registers, 2 blocks an SM, two
// passes of one round each); MD_WPO 1 with 8 slots (158 registers, one block an SM) 6.5 % slower (RESULTS.md
// run 29.6). The slots' sums are the same bits for any MD_WPO and MD_SLOTS.
#ifndef MD_SLOTS  // tunable: QWEN3RS_CUDA_DEFINES (compile.rs)
#define MD_SLOTS 2
#endif
#define MD_OUTS (256 / 32 / MD_WPO)
// acc_clear (non-null): gemv_router_rows' sums of E experts (OR_STRIDE apart), which the gate/up
// kernel ahead has read, cleared for the next layer's.
template <bool XS>
__device__ __forceinline__ void moe_down_combine_rows(act_t* out, const act_t* act, const act_t* w, const int* ids,
    const float* weights, int T, int k, int N, int K, unsigned long long* acc_clear, int E) {
    __shared__ float ys[2][MD_OUTS][MAX_TOP_K];  // by pass parity: one barrier a pass keeps reads and writes apart
    grid_dependency();  // the expert ids come from the kernels ahead: nothing to prefetch
    if (acc_clear && blockIdx.x == 0) {
        for (int i = threadIdx.x; i < E; i += blockDim.x) acc_clear[i * OR_STRIDE] = 0ull;
    }
    const act_t* xs = stage_input<1, XS>(act, T * k, K);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, j = warp % MD_WPO, mine = warp / MD_WPO;
    int pass = 0;
    for (int o0 = blockIdx.x * MD_OUTS; o0 < T * N; o0 += gridDim.x * MD_OUTS, pass ^= 1) {  // block-uniform
        const int o = o0 + mine, t = o / N, n = o % N;
        const bool live = o < T * N;
        int id = -1;  // lane s: slot s's expert and weight
        float wt = 0.f;
        if (live && lane < k) { id = ids[t * k + lane]; wt = weights[t * k + lane]; }
        for (int s0 = j; live && s0 < k; s0 += MD_WPO * MD_SLOTS) {
            const act_t* wr[MD_SLOTS];
            const act_t* xr[MD_SLOTS];
            float a[MD_SLOTS];
#pragma unroll
            for (int r = 0; r < MD_SLOTS; r++) {
                int s = s0 + r * MD_WPO;
                int e = __shfl_sync(0xffffffffu, id, s & 31);
                bool used = s < k && __shfl_sync(0xffffffffu, wt, s & 31) != 0.f;
                wr[r] = used ? w + ((size_t)e * N + n) * K : nullptr;
                xr[r] = used ? xs + (size_t)(t * k + s) * K : xs;
                a[r] = 0.f;
            }
            rows_dot<MD_SLOTS, XS>(a, wr, xr, K / VEC);
            TL_MARK(s0 == j ? 1 : 2, a[0]);  // timeline builds: thread 0's first round of rows summed, then its last
#pragma unroll
            for (int r = 0; r < MD_SLOTS; r++) {
                if (!wr[r]) continue;  // warp-uniform
                float y = rnd(warp_sum(a[r]));
                if (lane == 0) ys[pass][mine][s0 + r * MD_WPO] = y;
            }
        }
        __syncthreads();
        TL_MARK(3, 0.f);  // timeline builds: past the pass's barrier
        if (live && j == 0) {
            float acc = 0.f;
            for (int s = 0; s < k; s++) {
                float ws = __shfl_sync(0xffffffffu, wt, s);
                if (ws != 0.f) acc = rnd(acc + rnd(ys[pass][mine][s] * ws));
            }
            if (lane == 0) out[(size_t)t * N + n] = from_f(acc);
        }
    }
}

#define MOE_GEMV_FAMILY(SUF, XS)                                                                                 \
    extern "C" __global__ void GV_BOUNDS moe_down_combine##SUF(act_t* out, const act_t* act,           \
        const act_t* w, const int* ids, const float* weights, int T, int k, int N, int K,                          \
        unsigned long long* acc_clear, int E) {                                                                      \
        TIMELINE("moe_down_combine" #SUF); moe_down_combine_rows<XS>(out, act, w, ids, weights, T, k, N, K, acc_clear, E); } \
    extern "C" __global__ void GV_BOUNDS moe_gemv_swiglu##SUF(act_t* act, const act_t* x,             \
        const act_t* gate, const act_t* up, int* ids, float* weights, const float* logits,                        \
        const unsigned long long* acc, const act_t* nw, float eps, int E, int norm_topk,                            \
        int e0, int held, int k, int P, int N, int K) {                                                               \
        TIMELINE("moe_gemv_swiglu" #SUF);                                                                             \
        moe_gemv_swiglu_rows<XS>(act, x, gate, up, ids, weights, logits, acc, nw, eps, E, norm_topk, e0, held, k, P, N, K); }

MOE_GEMV_FAMILY(, false)
MOE_GEMV_FAMILY(_xs, true)
