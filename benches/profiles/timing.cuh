// timing.cuh: what the standalone profiles early_loads.cu and shared_reads.cu share: CUDA-event timing, and
// how their kernels use the bytes they load (so that the loads are not optimised away).
#pragma once
#include <cstdio>
#include <cstdlib>
#include <cuda_runtime.h>

#ifndef CHECK
#define CHECK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { printf("%s failed: %s (line %d)\n", #x, cudaGetErrorString(e), __LINE__); exit(1); } } while (0)
#endif

// A 16-byte vector folded into a float (its bytes' use: the loads stay).
__device__ __forceinline__ float use(const uint4& v) { return __uint_as_float(v.x & 0x3f800000u) + __uint_as_float(v.w & 0x3f800000u); }

// The warp's sum of s, stored at out[the warp's index in the grid].
__device__ __forceinline__ void put(float* out, float s) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    if ((threadIdx.x & 31) == 0) out[blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5)] = s;
}

// Milliseconds `work` (queued on st) takes: the best of `runs` runs after `warmups` unmeasured ones.
template <class F>
float best_ms(cudaStream_t st, int warmups, int runs, F work) {
    cudaEvent_t a, b;
    CHECK(cudaEventCreate(&a));
    CHECK(cudaEventCreate(&b));
    float best = 1e30f;
    for (int r = 0; r < warmups + runs; r++) {
        CHECK(cudaEventRecord(a, st));
        work();
        CHECK(cudaEventRecord(b, st));
        CHECK(cudaEventSynchronize(b));
        float ms;
        CHECK(cudaEventElapsedTime(&ms, a, b));
        if (r >= warmups && ms < best) best = ms;
    }
    CHECK(cudaEventDestroy(a));
    CHECK(cudaEventDestroy(b));
    return best;
}

// µs a launch of the `launches` launches `capture` queues on st, captured into one graph: best of 5
// replays after a warm-up one.
template <class F>
float graph_us_a_launch(cudaStream_t st, int launches, F capture) {
    cudaGraph_t g;
    cudaGraphExec_t ge;
    CHECK(cudaStreamBeginCapture(st, cudaStreamCaptureModeGlobal));
    capture();
    CHECK(cudaStreamEndCapture(st, &g));
    CHECK(cudaGraphInstantiate(&ge, g, 0));
    const float ms = best_ms(st, 1, 5, [&] { CHECK(cudaGraphLaunch(ge, st)); });
    CHECK(cudaGraphExecDestroy(ge));
    CHECK(cudaGraphDestroy(g));
    return ms * 1e3f / launches;
}
