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
