// timing.cuh: CUDA-event timing shared by the standalone profiles (early_loads.cu, shared_reads.cu).
#pragma once
#include <cstdio>
#include <cstdlib>
#include <cuda_runtime.h>

#ifndef CHECK
#define CHECK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { printf("%s failed: %s (line %d)\n", #x, cudaGetErrorString(e), __LINE__); exit(1); } } while (0)
#endif

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
