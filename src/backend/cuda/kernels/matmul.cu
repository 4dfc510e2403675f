// matmul.cu: the matrix products cuBLAS doesn't do for us. `gemv`: out [T, N] = x [T, K] · w [N, K]ᵀ
// for T <= GEMV_MAX_ROWS (decode), one warp per output column reading the weight row once with
// 16-byte loads for all T rows. `router_logits`: the same product with f32 output (MoE routing
// is f32). `grouped_gemm`: per-expert tiles of a sorted row list (MoE experts, no host sync).

#define GEMV_MAX_ROWS 8
#define GEMV_WARPS 8
#define VEC (16 / (int)sizeof(act_t))  // elements per 16-byte load

// Requires K % VEC == 0 (the host checks; `gemv_scalar` otherwise). grid ceil(N / GEMV_WARPS).
extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32) gemv(act_t* out, const act_t* x, const act_t* w, int T, int N, int K) {
    int lane = threadIdx.x & 31;
    int n = blockIdx.x * GEMV_WARPS + (threadIdx.x >> 5);
    if (n >= N) return;
    const act_t* wr = w + (size_t)n * K;
    float acc[GEMV_MAX_ROWS];
#pragma unroll
    for (int t = 0; t < GEMV_MAX_ROWS; t++) acc[t] = 0.f;
    for (int k0 = lane * VEC; k0 < K; k0 += 32 * VEC) {
        uint4 wv = *reinterpret_cast<const uint4*>(wr + k0);
        const act_t* we = reinterpret_cast<const act_t*>(&wv);
        float wf[VEC];
#pragma unroll
        for (int i = 0; i < VEC; i++) wf[i] = to_f(we[i]);
#pragma unroll
        for (int t = 0; t < GEMV_MAX_ROWS; t++) {
            if (t < T) {
                uint4 xv = *reinterpret_cast<const uint4*>(x + (size_t)t * K + k0);
                const act_t* xe = reinterpret_cast<const act_t*>(&xv);
#pragma unroll
                for (int i = 0; i < VEC; i++) acc[t] += wf[i] * to_f(xe[i]);
            }
        }
    }
#pragma unroll
    for (int t = 0; t < GEMV_MAX_ROWS; t++) {
        if (t < T) {
            float s = warp_sum(acc[t]);
            if (lane == 0) out[(size_t)t * N + n] = from_f(s);
        }
    }
}

// The decode GEMV, bandwidth-bound: out [T, N] = x [T, K] · w [N, K]ᵀ for T <= GEMV_MAX_ROWS and
// K % VEC == 0. Each weight row is read once, by `wpr` warps (split-K inside the block, so a small N
// still gives enough blocks to fill the GPU: the host picks wpr), each lane keeping GV_UNROLL
// independent 16-byte loads in flight (8: measured +4 % on 8B decode over 4, RESULTS.md run 8). The wpr partial sums of a row meet in shared memory in a
// fixed order (deterministic). A block covers GV_WARPS / wpr consecutive rows.
#define GV_WARPS 8
#define GV_UNROLL 8

// f32 sums of rows n0 .. n0 + GV_WARPS/wpr of x · wᵀ into res[row - n0][t], visible to the whole
// block on return (every thread of the block must call it).
__device__ __forceinline__ void gemv_block(float (*res)[GEMV_MAX_ROWS], const act_t* x, const act_t* w,
    int T, int N, int K, int wpr, int n0) {
    __shared__ float part[GV_WARPS][GEMV_MAX_ROWS];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int r_local = warp / wpr, ws = warp % wpr;
    int n = n0 + r_local;
    bool active = n < N;  // no early return: the block meets at the barriers below
    const uint4* wr = reinterpret_cast<const uint4*>(w + (size_t)(active ? n : 0) * K);
    int kv = K / VEC, stride = 32 * wpr;
    float acc[GEMV_MAX_ROWS];
#pragma unroll
    for (int t = 0; t < GEMV_MAX_ROWS; t++) acc[t] = 0.f;
    for (int i0 = ws * 32 + lane; i0 < kv; i0 += stride * GV_UNROLL) {
        uint4 wv[GV_UNROLL];
#pragma unroll
        for (int u = 0; u < GV_UNROLL; u++) {
            int i = i0 + u * stride;
            wv[u] = (active && i < kv) ? __ldg(wr + i) : make_uint4(0u, 0u, 0u, 0u);
        }
#pragma unroll
        for (int u = 0; u < GV_UNROLL; u++) {
            int i = i0 + u * stride;
            if (i < kv) {
                const act_t* we = reinterpret_cast<const act_t*>(&wv[u]);
                float wf[VEC];
#pragma unroll
                for (int j = 0; j < VEC; j++) wf[j] = to_f(we[j]);
#pragma unroll
                for (int t = 0; t < GEMV_MAX_ROWS; t++) {
                    if (t < T) {
                        uint4 xv = __ldg(reinterpret_cast<const uint4*>(x + (size_t)t * K) + i);
                        const act_t* xe = reinterpret_cast<const act_t*>(&xv);
#pragma unroll
                        for (int j = 0; j < VEC; j++) acc[t] += wf[j] * to_f(xe[j]);
                    }
                }
            }
        }
    }
#pragma unroll
    for (int t = 0; t < GEMV_MAX_ROWS; t++) {
        float s = warp_sum(acc[t]);
        if (lane == 0) part[warp][t] = s;
    }
    __syncthreads();
    if (ws == 0 && lane < T) {
        float s = 0.f;
        for (int j = 0; j < wpr; j++) s += part[r_local * wpr + j][lane];
        res[r_local][lane] = s;
    }
    __syncthreads();
}

__device__ __forceinline__ void gemv_store(act_t* out, float (*res)[GEMV_MAX_ROWS], int T, int N, int rows, int n0) {
    for (int i = threadIdx.x; i < rows * T; i += blockDim.x) {
        int r = i / T, t = i % T, n = n0 + r;
        if (n < N) out[(size_t)t * N + n] = from_f(res[r][t]);
    }
}

// grid ceil(N / (GV_WARPS / wpr)), GV_WARPS * 32 threads.
extern "C" __global__ void __launch_bounds__(GV_WARPS * 32) gemv_wide(act_t* out, const act_t* x, const act_t* w,
    int T, int N, int K, int wpr) {
    __shared__ float res[GV_WARPS][GEMV_MAX_ROWS];
    int rows = GV_WARPS / wpr, n0 = blockIdx.x * rows;
    gemv_block(res, x, w, T, N, K, wpr, n0);
    gemv_store(out, res, T, N, rows, n0);
}

// Three products of one input in one launch (the q, k, v projections): outI [T, NI] = x · wIᵀ.
// Blocks [0, b0) do the first, [b0, b0 + b1) the second, the rest the third (bI = ceil(NI / rows)).
extern "C" __global__ void __launch_bounds__(GV_WARPS * 32) gemv3(act_t* o0, const act_t* w0, int N0,
    act_t* o1, const act_t* w1, int N1, act_t* o2, const act_t* w2, int N2, const act_t* x, int T, int K, int wpr) {
    __shared__ float res[GV_WARPS][GEMV_MAX_ROWS];
    int rows = GV_WARPS / wpr;
    int b0 = (N0 + rows - 1) / rows, b1 = (N1 + rows - 1) / rows;
    int b = blockIdx.x;
    act_t* o = o0; const act_t* w = w0; int N = N0;
    if (b >= b0 + b1) { b -= b0 + b1; o = o2; w = w2; N = N2; }
    else if (b >= b0) { b -= b0; o = o1; w = w1; N = N1; }
    int n0 = b * rows;
    gemv_block(res, x, w, T, N, K, wpr, n0);
    gemv_store(o, res, T, N, rows, n0);
}

// The dense MLP's first half: out [T, N] = round(round(silu(round(x·gateᵀ))) * round(x·upᵀ)), rounding
// exactly where matmul, matmul, swiglu would. grid ceil(N / (GV_WARPS / wpr)).
extern "C" __global__ void __launch_bounds__(GV_WARPS * 32) gemv_swiglu(act_t* out, const act_t* x,
    const act_t* gate, const act_t* up, int T, int N, int K, int wpr) {
    __shared__ float rg[GV_WARPS][GEMV_MAX_ROWS];
    __shared__ float ru[GV_WARPS][GEMV_MAX_ROWS];
    int rows = GV_WARPS / wpr, n0 = blockIdx.x * rows;
    gemv_block(rg, x, gate, T, N, K, wpr, n0);
    gemv_block(ru, x, up, T, N, K, wpr, n0);
    for (int i = threadIdx.x; i < rows * T; i += blockDim.x) {
        int r = i / T, t = i % T, n = n0 + r;
        if (n < N) out[(size_t)t * N + n] = from_f(rnd(silu(rnd(rg[r][t]))) * rnd(ru[r][t]));
    }
}

// Any K (element loads). grid ceil(N / GEMV_WARPS).
extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32) gemv_scalar(act_t* out, const act_t* x, const act_t* w, int T, int N, int K) {
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

// logits [T, E] (f32) = x [T, H] · router [E, H]ᵀ; one warp per output. grid (ceil(E / 8), T).
extern "C" __global__ void router_logits(float* logits, const act_t* x, const act_t* router, int E, int H) {
    int lane = threadIdx.x & 31;
    int e = blockIdx.x * 8 + (threadIdx.x >> 5);
    int t = blockIdx.y;
    if (e >= E) return;
    const act_t* xr = x + (size_t)t * H;
    const act_t* wr = router + (size_t)e * H;
    float s = 0.f;
    for (int k = lane; k < H; k += 32) s += to_f(xr[k]) * to_f(wr[k]);
    s = warp_sum(s);
    if (lane == 0) logits[(size_t)t * E + e] = s;
}

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

// MoE decode: only the chosen experts' weights are read, with expert ids from device memory (no
// host sync, no sorting). Pair p = t*k + s (moe_route's order). grid (ceil(N / rows), P).
// out [P, N] = x[p / src_div] · w[ids[p]]ᵀ with w [E, N, K]: src_div = k for the gate/up input
// (row t of x), 1 for down (row p of the activations).
extern "C" __global__ void __launch_bounds__(GV_WARPS * 32) moe_gemv(act_t* out, const act_t* x, const act_t* w,
    const int* ids, int src_div, int N, int K, int wpr) {
    __shared__ float res[GV_WARPS][GEMV_MAX_ROWS];
    int p = blockIdx.y, rows = GV_WARPS / wpr, n0 = blockIdx.x * rows;
    const act_t* we = w + (size_t)ids[p] * N * K;
    gemv_block(res, x + (size_t)(p / src_div) * K, we, 1, N, K, wpr, n0);
    gemv_store(out + (size_t)p * N, res, 1, N, rows, n0);
}

// The experts' first half for decode: act [P, N] = swiglu(x[p / k] · gate[e]ᵀ, x[p / k] · up[e]ᵀ)
// rounded as grouped_gemm, grouped_gemm, swiglu. grid (ceil(N / rows), P).
extern "C" __global__ void __launch_bounds__(GV_WARPS * 32) moe_gemv_swiglu(act_t* act, const act_t* x,
    const act_t* gate, const act_t* up, const int* ids, int k, int N, int K, int wpr) {
    __shared__ float rg[GV_WARPS][GEMV_MAX_ROWS];
    __shared__ float ru[GV_WARPS][GEMV_MAX_ROWS];
    int p = blockIdx.y, rows = GV_WARPS / wpr, n0 = blockIdx.x * rows;
    size_t eoff = (size_t)ids[p] * N * K;
    const act_t* xr = x + (size_t)(p / k) * K;
    gemv_block(rg, xr, gate + eoff, 1, N, K, wpr, n0);
    gemv_block(ru, xr, up + eoff, 1, N, K, wpr, n0);
    for (int r = threadIdx.x; r < rows; r += blockDim.x) {
        int n = n0 + r;
        if (n < N) act[(size_t)p * N + n] = from_f(rnd(silu(rnd(rg[r][0]))) * rnd(ru[r][0]));
    }
}
