// sync_cost.cu: what a dependent step costs on this GPU, kernel boundaries against grid barriers
// (issue 6: decides whether one persistent kernel a decode step would beat a kernel a phase).
//
//   nvcc -O3 -arch=sm_90 -o /tmp/sync_cost benches/profiles/sync_cost.cu && /tmp/sync_cost [BLOCKS_PER_SM, 2]
//
// A "phase" stands for one decode product: every warp of a persistent grid (2 blocks of 256 threads
// an SM) first reads the previous phase's result (the dependency: an activation), then streams its
// share of `bytes` of fresh weights with 16-byte loads, 4 in flight a lane, and adds its sum to this
// phase's result. PHASES phases run back to back, timed over several replays, as:
//   graph        one kernel a phase in a CUDA graph, plain stream order
//   graph+pdl    the same with programmatic dependent launch (griddepcontrol.wait first, as kernels/)
//   graph+pdl+pf the same, each kernel prefetching its weights to L2 before the wait (our decode GEMVs)
//   barrier      one cooperative kernel, phases separated by a grid barrier (an atomic count)
//   barrier+pf   the same, each block prefetching its next phase's weights to L2 before the barrier
// Prints µs a phase for each, next to the weights' time at the copy bandwidth measured here.
#include "phase.cuh"

constexpr int PHASES = 200, REPS = 10;

// Sense-free grid barrier: arrivals count up forever; a block waits until the count reaches its
// round's multiple of the grid.
__device__ __forceinline__ void grid_barrier(unsigned* count, unsigned round) {
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence();
        atomicAdd(count, 1u);
        unsigned want = round * gridDim.x, seen;
        do {
            asm volatile("ld.acquire.gpu.u32 %0, [%1];" : "=r"(seen) : "l"(count) : "memory");
        } while (seen < want);
    }
    __syncthreads();
}

__global__ void __launch_bounds__(PHASE_THREADS) persistent_kernel(const uint4* w, size_t vecs, float* res, unsigned* count, int pf) {
    size_t tid = blockIdx.x * (size_t)blockDim.x + threadIdx.x, nth = (size_t)gridDim.x * blockDim.x;
    for (int p = 0; p < PHASES; p++) {
        const uint4* wp = w + (size_t)p * vecs;
        if (p > 0) {
            if (pf) prefetch_share(wp, vecs, tid, nth);
            grid_barrier(count, p);
        }
        phase_work(wp, vecs, res, p, tid, nth);
    }
}

int main(int argc, char** argv) {
    const int want_per_sm = argc > 1 ? atoi(argv[1]) : 2;  // blocks an SM (at most what fits)
    int dev = 0, sms = 0;
    CHECK(cudaSetDevice(dev));
    CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
    int per_sm = 0;
    CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, persistent_kernel, PHASE_THREADS, 0));
    const int grid = sms * (per_sm < want_per_sm ? per_sm : want_per_sm);
    const size_t sizes[] = {0, 1u << 20, 4u << 20, 16u << 20};
    const size_t max_bytes = (16u << 20) * (size_t)PHASES;
    uint4* w;
    float* res;
    unsigned* count;
    CHECK(cudaMalloc(&w, max_bytes));
    CHECK(cudaMemset(w, 0x3c, max_bytes));
    CHECK(cudaMalloc(&res, (size_t)PHASES * grid * sizeof(float)));
    CHECK(cudaMalloc(&count, sizeof(unsigned)));
    cudaStream_t st;
    CHECK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
    cudaEvent_t e0, e1;
    CHECK(cudaEventCreate(&e0));
    CHECK(cudaEventCreate(&e1));

    // Copy bandwidth (read + write bytes), for the weights' floor.
    float ms = 0;
    CHECK(cudaEventRecord(e0, st));
    for (int i = 0; i < 5; i++) CHECK(cudaMemcpyAsync((char*)w + max_bytes / 2, w, max_bytes / 2, cudaMemcpyDeviceToDevice, st));
    CHECK(cudaEventRecord(e1, st));
    CHECK(cudaEventSynchronize(e1));
    CHECK(cudaEventElapsedTime(&ms, e0, e1));
    const double copy_tbps = 5.0 * max_bytes / (ms * 1e-3) / 1e12;
    CHECK(cudaMemset(w, 0x3c, max_bytes));
    printf("%d SMs, grid %d x %d threads, %d phases, copy %.2f TB/s\n", sms, grid, PHASE_THREADS, PHASES, copy_tbps);
    printf("%-14s %12s %12s %12s %12s\n", "us a phase", "0 MB", "1 MB", "4 MB", "16 MB");

    const char* names[] = {"graph", "graph+pdl", "graph+pdl+pf", "barrier", "barrier+pf"};
    double table[5][4];
    for (int si = 0; si < 4; si++) {
        size_t vecs = sizes[si] / 16;
        for (int mode = 0; mode < 3; mode++) {
            int pdl = mode >= 1, pf = mode == 2;
            cudaGraph_t g;
            cudaGraphExec_t ge;
            CHECK(cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal));
            CHECK(cudaMemsetAsync(res, 0, (size_t)PHASES * grid * sizeof(float), st));
            for (int p = 0; p < PHASES; p++) {
                cudaLaunchConfig_t cfg = {};
                cudaLaunchAttribute attr[1];
                attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
                attr[0].val.programmaticStreamSerializationAllowed = 1;
                cfg.gridDim = dim3(grid);
                cfg.blockDim = dim3(PHASE_THREADS);
                cfg.stream = st;
                cfg.attrs = attr;
                cfg.numAttrs = pdl ? 1 : 0;
                CHECK(cudaLaunchKernelEx(&cfg, phase_kernel, (const uint4*)w, vecs, res, p, pdl, pf));
            }
            CHECK(cudaStreamEndCapture(st, &g));
            CHECK(cudaGraphInstantiate(&ge, g, 0));
            CHECK(cudaGraphLaunch(ge, st));  // warm-up
            CHECK(cudaEventRecord(e0, st));
            for (int r = 0; r < REPS; r++) CHECK(cudaGraphLaunch(ge, st));
            CHECK(cudaEventRecord(e1, st));
            CHECK(cudaEventSynchronize(e1));
            CHECK(cudaEventElapsedTime(&ms, e0, e1));
            table[mode][si] = ms * 1e3 / REPS / PHASES;
            CHECK(cudaGraphExecDestroy(ge));
            CHECK(cudaGraphDestroy(g));
        }
        for (int pf = 0; pf < 2; pf++) {
            float total = 0;
            for (int r = 0; r <= REPS; r++) {
                CHECK(cudaMemsetAsync(res, 0, (size_t)PHASES * grid * sizeof(float), st));
                CHECK(cudaMemsetAsync(count, 0, sizeof(unsigned), st));
                const uint4* wc = w;
                void* args[] = {(void*)&wc, (void*)&vecs, (void*)&res, (void*)&count, (void*)&pf};
                CHECK(cudaEventRecord(e0, st));
                CHECK(cudaLaunchCooperativeKernel((void*)persistent_kernel, dim3(grid), dim3(PHASE_THREADS), args, 0, st));
                CHECK(cudaEventRecord(e1, st));
                CHECK(cudaEventSynchronize(e1));
                CHECK(cudaEventElapsedTime(&ms, e0, e1));
                if (r > 0) total += ms;  // the first is a warm-up
            }
            table[3 + pf][si] = total * 1e3 / REPS / PHASES;
        }
    }
    for (int m = 0; m < 5; m++) {
        printf("%-14s", names[m]);
        for (int si = 0; si < 4; si++) printf(" %12.2f", table[m][si]);
        printf("\n");
    }
    printf("%-14s", "bytes at copy");
    for (int si = 0; si < 4; si++) printf(" %12.2f", sizes[si] / (copy_tbps * 1e12) * 1e6);
    printf("\n");
    return 0;
}
