// gemv_variants.cu: candidate decode GEMV kernels (T = 1, bf16) timed against matmul.cu's gemv_wide by
// benches/gemv_variants.py on the GPU (CuPy compiles common.cuh + matmul.cu + this file). Not shipped:
// a winner moves into src/backend/cuda/kernels/matmul.cu with its tests.
//
// Axes: LD = how weights are loaded (0 __ldg, 1 L1::no_allocate, 2 no_allocate + L2::256B prefetch);
// U = 16-byte loads per lane in flight; XS = x staged once per block in shared memory (else __ldg);
// persistent = grid of a few blocks per SM looping over rows (no block scheduling per 8 rows).

template <int LD>
__device__ __forceinline__ uint4 ldw(const uint4* p) {
    uint4 r;
    if (LD == 0) {
        asm volatile("ld.global.nc.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
    } else if (LD == 1) {
        asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
            : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
    } else {
        asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0,%1,%2,%3}, [%4];"
            : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
    }
    return r;
}

__device__ __forceinline__ float dot8(uint4 a, uint4 b) {
    const __nv_bfloat162* a2 = reinterpret_cast<const __nv_bfloat162*>(&a);
    const __nv_bfloat162* b2 = reinterpret_cast<const __nv_bfloat162*>(&b);
    float s0 = 0.f, s1 = 0.f;
#pragma unroll
    for (int j = 0; j < 4; j++) {
        float2 fa = __bfloat1622float2(a2[j]), fb = __bfloat1622float2(b2[j]);
        s0 += fa.x * fb.x;
        s1 += fa.y * fb.y;
    }
    return s0 + s1;
}

// Block style (as gemv_wide): 8 warps, wpr warps per row, grid ceil(N / (8 / wpr)). Dynamic smem K*2 if XS.
template <int LD, int U, bool XS>
__device__ __forceinline__ void gv_block(act_t* out, const act_t* x, const act_t* w, int N, int K, int wpr) {
    extern __shared__ uint4 xs[];
    __shared__ float part[8];
    int kv = K / 8;
    const uint4* xg = reinterpret_cast<const uint4*>(x);
    if (XS) {
        for (int i = threadIdx.x; i < kv; i += blockDim.x) xs[i] = __ldg(xg + i);
        __syncthreads();
    }
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int rows = 8 / wpr, r_local = warp / wpr, ws = warp % wpr;
    int n = blockIdx.x * rows + r_local;
    bool active = n < N;
    const uint4* wr = reinterpret_cast<const uint4*>(w + (size_t)(active ? n : 0) * K);
    int stride = 32 * wpr;
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    for (int i0 = ws * 32 + lane; i0 < kv; i0 += stride * U) {
        uint4 wv[U], xv[U];
#pragma unroll
        for (int u = 0; u < U; u++) {
            int i = i0 + u * stride;
            bool ok = active && i < kv;
            wv[u] = ok ? ldw<LD>(wr + i) : make_uint4(0u, 0u, 0u, 0u);
            if (!XS) xv[u] = ok ? __ldg(xg + i) : make_uint4(0u, 0u, 0u, 0u);
        }
#pragma unroll
        for (int u = 0; u < U; u++) {
            int i = i0 + u * stride;
            if (i < kv) {
                if (XS) xv[u] = xs[i];
                acc[u & 3] += dot8(wv[u], xv[u]);
            }
        }
    }
    float s = warp_sum((acc[0] + acc[1]) + (acc[2] + acc[3]));
    if (lane == 0) part[warp] = s;
    __syncthreads();
    if (ws == 0 && lane == 0 && active) {
        float t = 0.f;
        for (int j = 0; j < wpr; j++) t += part[r_local * wpr + j];
        out[n] = from_f(t);
    }
}

#define GV_BLOCK(NAME, LD, U, XS) \
    extern "C" __global__ void __launch_bounds__(256) NAME(act_t* out, const act_t* x, const act_t* w, int N, int K, int wpr) { \
        gv_block<LD, U, XS>(out, x, w, N, K, wpr); }

GV_BLOCK(vb_ld0_u8, 0, 8, false)
GV_BLOCK(vb_ld1_u8, 1, 8, false)
GV_BLOCK(vb_ld2_u8, 2, 8, false)
GV_BLOCK(vb_ld1_u8_xs, 1, 8, true)
GV_BLOCK(vb_ld2_u8_xs, 2, 8, true)
GV_BLOCK(vb_ld1_u16_xs, 1, 16, true)
GV_BLOCK(vb_ld1_u4_xs, 1, 4, true)

// Persistent: grid = blocks_per_sm * SMs, 8 warps; x staged in shared memory once per block; warp g of
// G in the grid takes rows g*R .. g*R+R-1, then g*R + G*R, ... : R rows read together, U loads per row.
template <int LD, int R, int U>
__device__ __forceinline__ void gv_persist(act_t* out, const act_t* x, const act_t* w, int N, int K) {
    extern __shared__ uint4 xs[];
    int kv = K / 8;
    const uint4* xg = reinterpret_cast<const uint4*>(x);
    for (int i = threadIdx.x; i < kv; i += blockDim.x) xs[i] = __ldg(xg + i);
    __syncthreads();
    int lane = threadIdx.x & 31;
    int g = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    int G = gridDim.x * (blockDim.x >> 5);
    for (int n0 = g * R; n0 < N; n0 += G * R) {
        float acc[R];
        const uint4* wr[R];
#pragma unroll
        for (int r = 0; r < R; r++) {
            acc[r] = 0.f;
            wr[r] = reinterpret_cast<const uint4*>(w + (size_t)min(n0 + r, N - 1) * K);
        }
        for (int i0 = lane; i0 < kv; i0 += 32 * U) {
            uint4 wv[R][U];
#pragma unroll
            for (int u = 0; u < U; u++) {
                int i = i0 + u * 32;
#pragma unroll
                for (int r = 0; r < R; r++) wv[r][u] = i < kv ? ldw<LD>(wr[r] + i) : make_uint4(0u, 0u, 0u, 0u);
            }
#pragma unroll
            for (int u = 0; u < U; u++) {
                int i = i0 + u * 32;
                if (i < kv) {
                    uint4 xv = xs[i];
#pragma unroll
                    for (int r = 0; r < R; r++) acc[r] += dot8(wv[r][u], xv);
                }
            }
        }
#pragma unroll
        for (int r = 0; r < R; r++) {
            float s = warp_sum(acc[r]);
            if (lane == 0 && n0 + r < N) out[n0 + r] = from_f(s);
        }
    }
}

#define GV_PERSIST(NAME, LD, R, U) \
    extern "C" __global__ void __launch_bounds__(256) NAME(act_t* out, const act_t* x, const act_t* w, int N, int K) { \
        gv_persist<LD, R, U>(out, x, w, N, K); }

GV_PERSIST(vp_ld1_r1_u8, 1, 1, 8)
GV_PERSIST(vp_ld1_r2_u4, 1, 2, 4)
GV_PERSIST(vp_ld1_r4_u2, 1, 4, 2)
GV_PERSIST(vp_ld2_r2_u4, 2, 2, 4)
GV_PERSIST(vp_ld1_r2_u8, 1, 2, 8)

// Half-warp rows (short K, e.g. the MoE down projection of Qwen3-30B-A3B, K = 768): persistent grid, x
// staged in shared memory, lanes 0-15 take row 2g and lanes 16-31 row 2g + 1, so a lane holds up to U of
// its row's 16-byte loads in flight where a whole warp per row gives each lane only kv / 32 of them.
// (Prepared in session 2, not yet measured.)
template <int U>
__device__ __forceinline__ void gv_half(act_t* out, const act_t* x, const act_t* w, int N, int K) {
    extern __shared__ uint4 xs[];
    int kv = K / 8;
    const uint4* xg = reinterpret_cast<const uint4*>(x);
    for (int i = threadIdx.x; i < kv; i += blockDim.x) xs[i] = __ldg(xg + i);
    __syncthreads();
    int lane = threadIdx.x & 31, half = lane >> 4, hl = lane & 15;
    int g = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    int G = gridDim.x * (blockDim.x >> 5);
    for (int n0 = 2 * g; n0 < N; n0 += 2 * G) {  // warp-uniform trip count: both halves share kv
        int n = n0 + half;
        bool active = n < N;
        const uint4* wr = reinterpret_cast<const uint4*>(w + (size_t)(active ? n : 0) * K);
        float acc = 0.f;
        for (int i0 = hl; i0 < kv; i0 += 16 * U) {
            uint4 wv[U];
#pragma unroll
            for (int u = 0; u < U; u++) {
                int i = i0 + u * 16;
                wv[u] = i < kv ? ldw<0>(wr + i) : make_uint4(0u, 0u, 0u, 0u);
            }
#pragma unroll
            for (int u = 0; u < U; u++) {
                int i = i0 + u * 16;
                if (i < kv) acc += dot8(wv[u], xs[i]);
            }
        }
#pragma unroll
        for (int o = 8; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);  // within each half
        if (hl == 0 && active) out[n] = from_f(acc);
    }
}

extern "C" __global__ void __launch_bounds__(256) vh_u8(act_t* out, const act_t* x, const act_t* w, int N, int K) {
    gv_half<8>(out, x, w, N, K);
}
extern "C" __global__ void __launch_bounds__(256) vh_u4(act_t* out, const act_t* x, const act_t* w, int N, int K) {
    gv_half<4>(out, x, w, N, K);
}

// Read-bandwidth probe: every thread sums 16-byte loads over a grid-stride loop (U in flight).
extern "C" __global__ void __launch_bounds__(256) read_probe(float* out, const uint4* p, long long n16) {
    long long stride = (long long)gridDim.x * blockDim.x;
    float acc = 0.f;
    for (long long i0 = (long long)blockIdx.x * blockDim.x + threadIdx.x; i0 < n16; i0 += stride * 8) {
        uint4 v[8];
#pragma unroll
        for (int u = 0; u < 8; u++) {
            long long i = i0 + u * stride;
            v[u] = i < n16 ? ldw<1>(p + i) : make_uint4(0u, 0u, 0u, 0u);
        }
#pragma unroll
        for (int u = 0; u < 8; u++)
            if (i0 + u * stride < n16) acc += __uint_as_float(v[u].x ^ v[u].y ^ v[u].z ^ v[u].w);
    }
    acc = warp_sum(acc);
    if ((threadIdx.x & 31) == 0) atomicAdd(out, acc);
}
