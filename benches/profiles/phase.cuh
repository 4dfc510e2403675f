// phase.cuh: the bare decode-like phase that benches/profiles/sync_cost.cu and gemv_chain.cu time (one
// definition, so that their figures compare): every thread of a grid of PHASE_THREADS-thread blocks reads
// a value another block wrote in the phase before (the dependency: an activation), streams its share of
// the phase's weights with 16-byte loads, PHASE_UNROLL in flight a lane, and its block writes one sum.
#pragma once
#include <cstdio>
#include <cstdlib>
#include <cuda_runtime.h>

#define CHECK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { printf("%s failed: %s (line %d)\n", #x, cudaGetErrorString(e), __LINE__); exit(1); } } while (0)

constexpr int PHASE_THREADS = 256, PHASE_UNROLL = 4;

__device__ __forceinline__ void prefetch_share(const uint4* w, size_t vecs, size_t tid, size_t nth) {
    for (size_t i = tid * 8; i < vecs; i += nth * 8) asm volatile("prefetch.global.L2 [%0];" :: "l"(w + i));
}

// One phase's work for this thread. The dependency: a value another block wrote in the phase before
// (res[p - 1][next block]); then the weights; the block's sum goes to res[p][block] (no atomics: one
// address taking every warp's atomic would serialise and be measured instead). res: [phases, grid].
__device__ __forceinline__ void phase_work(const uint4* w, size_t vecs, float* res, int p, size_t tid, size_t nth) {
    __shared__ float part[PHASE_THREADS / 32];
    float s = p > 0 ? ((volatile float*)res)[(size_t)(p - 1) * gridDim.x + (blockIdx.x + 1) % gridDim.x] * 1e-9f : 0.f;
    for (size_t i0 = tid; i0 < vecs; i0 += nth * PHASE_UNROLL) {
        uint4 v[PHASE_UNROLL];
#pragma unroll
        for (int u = 0; u < PHASE_UNROLL; u++) {
            size_t i = i0 + u * nth;
            v[u] = i < vecs ? __ldcs(w + i) : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int u = 0; u < PHASE_UNROLL; u++) s += __uint_as_float(v[u].x & 0x3f800000u) + __uint_as_float(v[u].w & 0x3f800000u);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = s;
    __syncthreads();
    if (threadIdx.x == 0) {
        float t = 0.f;
        for (int i = 0; i < PHASE_THREADS / 32; i++) t += part[i];
        res[(size_t)p * gridDim.x + blockIdx.x] = t;
    }
    __syncthreads();
}

// Phase p as a kernel of its own, on weights w + p * vecs: with pdl, waiting for the kernel ahead
// (griddepcontrol, as kernels/ do); with pf, prefetching its weights to L2 before that wait.
__global__ void __launch_bounds__(PHASE_THREADS) phase_kernel(const uint4* w, size_t vecs, float* res, int p, int pdl, int pf) {
    size_t tid = blockIdx.x * (size_t)blockDim.x + threadIdx.x, nth = (size_t)gridDim.x * blockDim.x;
    const uint4* wp = w + (size_t)p * vecs;
    if (pf) prefetch_share(wp, vecs, tid, nth);
    if (pdl) {
        asm volatile("griddepcontrol.wait;" ::: "memory");
        asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
    }
    phase_work(wp, vecs, res, p, tid, nth);
}

