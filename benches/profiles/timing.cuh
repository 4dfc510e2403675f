// timing.cuh: what the standalone profiles share: CUDA-event and graph timing, PDL launches as gpu.rs makes
// them, and how their kernels use the bytes they load (so that the loads are not optimised away).
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

// The launches `capture` queues on st, captured into a graph and instantiated.
template <class F>
cudaGraphExec_t instantiate(cudaStream_t st, F capture) {
    cudaGraph_t g;
    cudaGraphExec_t ge;
    CHECK(cudaStreamBeginCapture(st, cudaStreamCaptureModeGlobal));
    capture();
    CHECK(cudaStreamEndCapture(st, &g));
    CHECK(cudaGraphInstantiate(&ge, g, 0));
    CHECK(cudaGraphDestroy(g));
    return ge;
}

// µs a launch of the `launches` launches `capture` queues on st, captured into one graph: best of 5
// replays after a warm-up one.
template <class F>
float graph_us_a_launch(cudaStream_t st, int launches, F capture) {
    cudaGraphExec_t ge = instantiate(st, capture);
    const float ms = best_ms(st, 1, 5, [&] { CHECK(cudaGraphLaunch(ge, st)); });
    CHECK(cudaGraphExecDestroy(ge));
    return ms * 1e3f / launches;
}

// The launches `capture` queues on st, captured into a graph and run once.
template <class F>
void graph_once(cudaStream_t st, F capture) {
    cudaGraphExec_t ge = instantiate(st, capture);
    CHECK(cudaGraphLaunch(ge, st));
    CHECK(cudaStreamSynchronize(st));
    CHECK(cudaGraphExecDestroy(ge));
}

// A launch of `kernel` on st with programmatic dependent launch, as gpu.rs `launch` makes it (blocks of
// `block` threads; `cluster` > 1: clusters of that many blocks along z, as `launch_cluster`).
template <class... K, class... A>
void launch_pdl_on(cudaStream_t st, void (*kernel)(K...), dim3 grid, size_t smem, int block, int cluster, A... args) {
    cudaLaunchConfig_t cfg = {};
    cudaLaunchAttribute attr[2];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    attr[1].id = cudaLaunchAttributeClusterDimension;
    attr[1].val.clusterDim.x = 1;
    attr[1].val.clusterDim.y = 1;
    attr[1].val.clusterDim.z = cluster;
    cfg.gridDim = grid;
    cfg.blockDim = dim3(block);
    cfg.dynamicSmemBytes = smem;
    cfg.stream = st;
    cfg.attrs = attr;
    cfg.numAttrs = cluster > 1 ? 2 : 1;
    CHECK(cudaLaunchKernelEx(&cfg, kernel, args...));
}
