// common.cuh: prepended to every kernel file. `act_t` is the compute dtype (chosen per module by
// -DQ_DTYPE: 0 f32, 1 bf16, 2 f16); activations, weights and the KV cache are all act_t, math is
// f32. `rnd` rounds an f32 to act_t and back: ops round where the CPU reference rounds.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

// NVRTC has no <math.h> macros.
#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif

#if Q_DTYPE == 0
typedef float act_t;
#elif Q_DTYPE == 1
typedef __nv_bfloat16 act_t;
#else
typedef __half act_t;
#endif

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }

__device__ __forceinline__ act_t from_f(float x) {
#if Q_DTYPE == 0
    return x;
#elif Q_DTYPE == 1
    return __float2bfloat16_rn(x);
#else
    return __float2half_rn(x);
#endif
}

__device__ __forceinline__ float rnd(float x) { return to_f(from_f(x)); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the total.
__device__ float block_sum(float v) {
    __shared__ float partial[32];
    __shared__ float total;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum(v);
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    if (warp == 0) {
        float s = lane < (int)(blockDim.x >> 5) ? partial[lane] : 0.f;
        s = warp_sum(s);
        if (lane == 0) total = s;
    }
    __syncthreads();
    float t = total;
    __syncthreads();  // `partial`/`total` may be reused by the next call
    return t;
}

__device__ __forceinline__ float silu(float x) { return x / (1.f + expf(-x)); }

// ---- The 16-byte-load row dot of the decode GEMVs (matmul.cu) and the MoE router (moe.cu) ----
#define VEC (16 / (int)sizeof(act_t))  // elements per 16-byte load
#define GV_UNROLL 8                     // 16-byte weight loads in flight per lane

template <bool XS>
__device__ __forceinline__ uint4 ld_x(const uint4* p) { return XS ? *p : __ldg(p); }

// Lane partial sums acc[t] += x row t · weight row (t < T <= TMAX; K = kv * VEC; x rows kv apart).
template <int TMAX, bool XS>
__device__ __forceinline__ void row_dot(float* acc, const act_t* wrow, const act_t* x, int T, int kv) {
    const uint4* wr = reinterpret_cast<const uint4*>(wrow);
    const uint4* xr = reinterpret_cast<const uint4*>(x);
    for (int i0 = threadIdx.x & 31; i0 < kv; i0 += 32 * GV_UNROLL) {
        uint4 wv[GV_UNROLL];
#pragma unroll
        for (int u = 0; u < GV_UNROLL; u++) {
            int i = i0 + u * 32;
            wv[u] = i < kv ? __ldg(wr + i) : make_uint4(0u, 0u, 0u, 0u);
        }
#pragma unroll
        for (int u = 0; u < GV_UNROLL; u++) {
            int i = i0 + u * 32;
            if (i < kv) {
                const act_t* we = reinterpret_cast<const act_t*>(&wv[u]);
                float wf[VEC];
#pragma unroll
                for (int j = 0; j < VEC; j++) wf[j] = to_f(we[j]);
#pragma unroll
                for (int t = 0; t < TMAX; t++) {
                    if (t < T) {
                        uint4 xv = ld_x<XS>(xr + (size_t)t * kv + i);
                        const act_t* xe = reinterpret_cast<const act_t*>(&xv);
                        float s0 = 0.f, s1 = 0.f;  // two chains: half the FMA latency
#pragma unroll
                        for (int j = 0; j < VEC; j += 2) {
                            s0 += wf[j] * to_f(xe[j]);
                            s1 += wf[j + 1] * to_f(xe[j + 1]);
                        }
                        acc[t] += s0 + s1;
                    }
                }
            }
        }
    }
}
