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
