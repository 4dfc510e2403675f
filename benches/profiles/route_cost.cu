// route_cost.cu: what the MoE decode routing (common.cuh route_rows: softmax, rank step, choices) costs
// alone, in SM cycles, against the ~2.9 µs the gate/up kernel spends from its wait to its choices on
// Qwen3-30B-A3B (RESULTS.md runs 34.3, 37.2-37.3: the same whatever the rank step's code or the
// instruction cache). One row of E = 128 logits, k = 8, 256 threads a block, the logits in L2 (written
// just before, as router_logits writes them). Thread 0's clock at route_rows' RR_MARK steps:
//   m0 entry, m1 softmax done (the logits' loads in), m2 rank step done (past its barrier), m3 choices stored.
// Three layouts, every block's marks, the median and the slowest block printed in ns:
//   1/SM          one routing block an SM
//   2/SM          two routing blocks an SM, as the gate/up kernel's two blocks route at once
//   1/SM+stream   one routing block an SM beside a block streaming weights (16-byte loads, as gate/up's
//                 blocks that already routed do)
// If the routing is fast alone and slow beside the stream, the cost is the SM it shares, not its code.
//
//   nvcc -O3 -arch=sm_90 -o /tmp/route_cost benches/profiles/route_cost.cu && /tmp/route_cost
#include "phase.cuh"

#include <algorithm>
#include <vector>

__device__ __forceinline__ long long* rr_stamps() {
    __shared__ long long st[4];
    return st;
}
#define RR_MARK(i) \
    do { if (threadIdx.x == 0) rr_stamps()[i] = clock64(); } while (0)

#define Q_DTYPE 1
#include "../../src/backend/cuda/kernels/common.cuh"

constexpr int E = 128, K = 8, THREADS = 256;

// Blocks below `routers` route logits + (launch * E); the others stream `vecs` 16-byte words of w.
__global__ void __launch_bounds__(THREADS) route_kernel(const float* logits, int* ids, long long* marks, int routers,
    const uint4* w, size_t vecs, float* sink, int E) {  // (E an argument, as in the kernels: not folded; run 38.3)
    __shared__ __align__(16) float p[ROUTE_MAX_E];
    __shared__ int sel[MAX_TOP_K], rid[MAX_TOP_K];
    if ((int)blockIdx.x >= routers) {
        float s = 0.f;
        const size_t tid = (blockIdx.x - routers) * (size_t)THREADS + threadIdx.x, nth = (gridDim.x - routers) * (size_t)THREADS;
        for (size_t i = tid; i < vecs; i += nth * 4) {
            uint4 v[4];
#pragma unroll
            for (int u = 0; u < 4; u++) v[u] = i + u * nth < vecs ? __ldcs(w + i + u * nth) : make_uint4(0, 0, 0, 0);
#pragma unroll
            for (int u = 0; u < 4; u++) s += __uint_as_float(v[u].x & 0x3f800000u);
        }
        if (s == 1234.5f) *sink = s;  // keeps the loads
        return;
    }
    route_rows(logits, 1, p, ROUTE_MAX_E, sel, rid, nullptr, blockIdx.x == 0 ? ids : nullptr, nullptr, E, K, 1, 0, E);
    __syncthreads();
    if (threadIdx.x == 0)
        for (int i = 0; i < 4; i++) marks[blockIdx.x * 4 + i] = rr_stamps()[i];
}

int main() {
    int dev = 0, sms = 0, khz = 0;
    CHECK(cudaSetDevice(dev));
    CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
    CHECK(cudaDeviceGetAttribute(&khz, cudaDevAttrClockRate, dev));
    const double ns_per_cycle = 1e6 / khz;
    std::vector<float> host(E);
    for (int e = 0; e < E; e++) host[e] = (float)((e * 7919) % 1000) / 250.f - 2.f;  // distinct logits
    const size_t vecs = (size_t)256 << 20 >> 4;  // 256 MB streamed: longer than any routing
    float *logits, *sink;
    int* ids;
    long long* marks;
    uint4* w;
    CHECK(cudaMalloc(&logits, E * sizeof(float)));
    CHECK(cudaMalloc(&ids, K * sizeof(int)));
    CHECK(cudaMalloc(&marks, 4 * 2 * sms * sizeof(long long)));
    CHECK(cudaMalloc(&w, vecs * 16));
    CHECK(cudaMalloc(&sink, sizeof(float)));
    CHECK(cudaMemset(w, 0x3c, vecs * 16));
    printf("%d SMs, clock %d MHz; ns, median / slowest block\n", sms, khz / 1000);
    printf("%-14s %12s %12s %12s %12s\n", "layout", "softmax", "rank step", "choices", "total");
    struct Layout { const char* name; int routers, grid; };
    for (Layout l : {Layout{"1/SM", sms, sms}, Layout{"2/SM", 2 * sms, 2 * sms}, Layout{"1/SM+stream", sms, 2 * sms}}) {
        std::vector<long long> m(4 * l.routers);
        std::vector<double> part[4];
        for (int rep = 0; rep < 20; rep++) {
            CHECK(cudaMemcpy(logits, host.data(), E * sizeof(float), cudaMemcpyHostToDevice));  // into L2
            route_kernel<<<l.grid, THREADS>>>(logits, ids, marks, l.routers, w, vecs, sink, E);
            CHECK(cudaGetLastError());
            CHECK(cudaDeviceSynchronize());
            if (rep < 5) continue;  // warm-up
            CHECK(cudaMemcpy(m.data(), marks, m.size() * sizeof(long long), cudaMemcpyDeviceToHost));
            for (int b = 0; b < l.routers; b++) {
                const long long* x = &m[b * 4];
                for (int i = 0; i < 3; i++) part[i].push_back((x[i + 1] - x[i]) * ns_per_cycle);
                part[3].push_back((x[3] - x[0]) * ns_per_cycle);
            }
        }
        printf("%-14s", l.name);
        for (auto& v : part) {
            std::sort(v.begin(), v.end());
            printf(" %5.0f / %5.0f", v[v.size() / 2], v.back());
        }
        printf("\n");
    }
    return 0;
}
