// shared_reads.cu: what it costs when many blocks read the same bytes at once (RESULTS.md run 34.8: in
// moe_router_gemv_swiglu_xs every cluster of 8 blocks read the Qwen3-30B-A3B router's 512 KB, 30 clusters
// at once, and the reads took ~12 µs where the bytes once would take ~0.1).
//
//   nvcc -O3 -arch=sm_90 -o /tmp/shared_reads benches/profiles/shared_reads.cu && /tmp/shared_reads
//
// A group is 8 blocks of 8 warps; warp w of a group reads rows w and w + 64 of a 512 KB matrix (128 rows
// of 4 KB, the router's shape), its 16 16-byte loads a lane all in flight, and writes one sum. G groups a
// launch, LAUNCHES launches back to back in one CUDA graph; µs a launch less an empty launch's:
//   shared   every group reads the same matrix, a fresh one each launch (from DRAM once, then L2)
//   own      each group reads its own matrix (G × 512 KB a launch, all fresh)
//   warm     every group reads the same matrix, the same one every launch (L2 hits only)
// each launched plainly and in clusters of 8 (a group a cluster, as the refuted kernel was).
#include <initializer_list>

#include "timing.cuh"

constexpr int ROW_VECS = 256, ROWS = 128, GROUP_BLOCKS = 8, WARPS = 8, LAUNCHES = 50, MAX_GROUPS = 30;
constexpr size_t MATRIX_VECS = (size_t)ROWS * ROW_VECS;  // 512 KB

enum Mode { SHARED, OWN, WARM };

__global__ void empty(const uint4*, float* out, int) {
    if (threadIdx.x == 0 && blockIdx.x == 0 && out == nullptr) out[0] = 0.f;
}

__global__ void __launch_bounds__(WARPS * 32) group_rows(const uint4* w, float* out, int own) {
    const int g = blockIdx.x / GROUP_BLOCKS, gw = (blockIdx.x % GROUP_BLOCKS) * WARPS + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    const uint4* m = w + (own ? (size_t)g * MATRIX_VECS : 0);
    uint4 v[16];
#pragma unroll
    for (int i = 0; i < 16; i++) {
        const uint4* p = m + (size_t)(gw + 64 * (i / 8)) * ROW_VECS + lane + 32 * (i % 8);
        asm volatile("ld.global.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(v[i].x), "=r"(v[i].y), "=r"(v[i].z), "=r"(v[i].w) : "l"(p));
    }
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < 16; i++) s += use(v[i]);
    put(out, s);
}

// µs a launch of `k` over G groups in `mode`, clusters of `cluster` blocks (1: a plain launch), LAUNCHES
// launches captured into one graph.
template <class K>
float time_groups(K k, int groups, Mode mode, int cluster, const uint4* w, float* out, cudaStream_t st) {
    return graph_us_a_launch(st, LAUNCHES, [&] {
        for (int i = 0; i < LAUNCHES; i++) {
            const size_t at = mode == WARM ? 0 : mode == SHARED ? (size_t)i * MATRIX_VECS : (size_t)i * MAX_GROUPS * MATRIX_VECS;
            cudaLaunchAttribute attr{};
            attr.id = cudaLaunchAttributeClusterDimension;
            attr.val.clusterDim.x = cluster;
            attr.val.clusterDim.y = 1;
            attr.val.clusterDim.z = 1;
            cudaLaunchConfig_t c{};
            c.gridDim = dim3(groups * GROUP_BLOCKS);
            c.blockDim = dim3(WARPS * 32);
            c.stream = st;
            c.attrs = &attr;
            c.numAttrs = cluster > 1 ? 1 : 0;
            CHECK(cudaLaunchKernelEx(&c, k, w + at, out, (int)(mode == OWN)));
        }
    });
}

int main() {
    uint4* w;
    float* out;
    const size_t bytes = MATRIX_VECS * 16 * MAX_GROUPS * LAUNCHES;
    CHECK(cudaMalloc(&w, bytes));
    CHECK(cudaMemset(w, 0x3c, bytes));
    CHECK(cudaMalloc(&out, MAX_GROUPS * GROUP_BLOCKS * WARPS * sizeof(float)));
    cudaStream_t st;
    CHECK(cudaStreamCreate(&st));
    const float e = time_groups(empty, 1, WARM, 1, w, out, st);
    printf("empty launch %.2f µs; a group reads 0.52 MB\n", e);
    printf("%6s %-8s %14s %14s %18s\n", "groups", "mode", "plain µs", "clusters µs", "plain TB/s read");
    const char* names[3] = {"shared", "own", "warm"};
    for (int groups : {1, 8, 16, 30}) {
        for (Mode mode : {SHARED, OWN, WARM}) {
            const float plain = time_groups(group_rows, groups, mode, 1, w, out, st) - e;
            const float clustered = time_groups(group_rows, groups, mode, GROUP_BLOCKS, w, out, st) - e;
            const double mb = groups * MATRIX_VECS * 16 / 1e6;
            printf("%6d %-8s %14.2f %14.2f %18.2f\n", groups, names[mode], plain, clustered, mb / plain);  // MB/µs = TB/s
        }
    }
    return 0;
}
