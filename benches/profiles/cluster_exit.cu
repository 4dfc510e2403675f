// cluster_exit.cu: what holds a clustered kernel's blocks past their last work. RESULTS.md run 39.7: in
// the Qwen3-30B-A3B decode the attention's blocks leave ~2.8 µs after their merge whatever they do there
// (no store, no merge work, with or without the last cluster barrier), while the o projection launched
// behind them with PDL has its whole 16.8 MB of weight loads in flight.
//
//   nvcc -O3 -arch=sm_90 -o /tmp/cluster_exit benches/profiles/cluster_exit.cu && /tmp/cluster_exit
//
// 1. %globaltimer's resolution (the block timeline's clock): the smallest nonzero step one thread sees in
//    a tight loop, against clock64 over the same span.
// 2. A stand-in for the decode attention (16 × 4 blocks of 128 threads, clusters of 4 along z, as 30B-A3B's
//    at ~70 keys) and one for the o projection (256 blocks of 256 threads, a warp an 8 KB row of a fresh
//    16.8 MB matrix), in pairs captured in one graph, each launched with programmatic dependent launch as
//    gpu.rs does. The attention waits (griddepcontrol.wait, then launch_dependents), chases dependent L2
//    reads for ATT_US (its keys and merge), stamps `done`, optionally meets its cluster at a relaxed
//    barrier, and each warp stamps its exit (atomicMax, as common.cuh's Timeline). The o stand-in issues
//    EARLY of its row's 16 loads a lane before its wait (plain ld.global, as kernels/ load early), the
//    rest after, and stamps its wait's return. Per variant: µs a pair, and medians over the launches of
//    the attention's median block's exit − done, its last exit − its first done, and o's first and last
//    wait return after the attention's last exit.
#include "timing.cuh"

#include <algorithm>
#include <vector>

constexpr int ROWS = 2048, ROW_VECS = 512, O_WARPS = 8, LAUNCHES = 50;  // o: 8 KB rows, a warp a row
constexpr size_t MATRIX_VECS = (size_t)ROWS * ROW_VECS;
constexpr int ATT_X = 16, ATT_SPLITS = 4, ATT_BLOCKS = ATT_X * ATT_SPLITS, O_BLOCKS = ROWS / O_WARPS;
constexpr unsigned ATT_US = 3;

__device__ __forceinline__ unsigned long long now() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)::"memory");
    return t;
}

// Per launch: the attention's blocks' done and exit stamps, o's blocks' wait returns (ns).
struct Stamps {
    unsigned long long done[LAUNCHES][ATT_BLOCKS], exit[LAUNCHES][ATT_BLOCKS], o_wait[LAUNCHES][O_BLOCKS];
};

__global__ void resolution(unsigned long long* out) {
    unsigned long long t0 = now(), c0 = clock64(), prev = t0, step = ~0ull;
    for (int i = 0; i < 200000; i++) {
        unsigned long long t = now();
        if (t != prev) { step = t - prev < step ? t - prev : step; prev = t; }
    }
    out[0] = step;
    out[1] = now() - t0;
    out[2] = clock64() - c0;
}

template <bool BARRIER>
__global__ void __launch_bounds__(128) att(Stamps* s, int l, const unsigned* chain, float* sink) {
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
    const int b = blockIdx.x + ATT_X * blockIdx.z;
    const unsigned long long t0 = now();
    unsigned i = threadIdx.x, acc = 0;
    do {
        i = __ldcg(chain + (i & 4095));
        acc += i;
    } while (now() - t0 < ATT_US * 1000ull);
    if (threadIdx.x == 0) s->done[l][b] = now();
    if (BARRIER) asm volatile("barrier.cluster.arrive.relaxed.aligned;\n\tbarrier.cluster.wait.aligned;" ::: "memory");
    if (acc == 0xffffffffu) sink[0] = 1.f;
    if ((threadIdx.x & 31) == 0) atomicMax(&s->exit[l][b], now());
}

template <int EARLY>
__global__ void __launch_bounds__(O_WARPS * 32) o_proj(const uint4* w, Stamps* s, int l, float* out) {
    const int warp = blockIdx.x * O_WARPS + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    const uint4* row = w + (size_t)warp * ROW_VECS;
    uint4 v[ROW_VECS / 32];
#pragma unroll
    for (int u = 0; u < EARLY; u++)
        asm volatile("ld.global.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(v[u].x), "=r"(v[u].y), "=r"(v[u].z), "=r"(v[u].w) : "l"(row + u * 32 + lane));
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
    if (threadIdx.x == 0) s->o_wait[l][blockIdx.x] = now();
#pragma unroll
    for (int u = EARLY; u < ROW_VECS / 32; u++)
        asm volatile("ld.global.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(v[u].x), "=r"(v[u].y), "=r"(v[u].z), "=r"(v[u].w) : "l"(row + u * 32 + lane));
    float sum = 0.f;
#pragma unroll
    for (int u = 0; u < ROW_VECS / 32; u++) sum += use(v[u]);
    put(out, sum);
}

double median(std::vector<double> x) {
    std::sort(x.begin(), x.end());
    return x.empty() ? 0.0 : x[x.size() / 2];
}

int main() {
    cudaStream_t st;
    CHECK(cudaStreamCreate(&st));
    unsigned long long* r;
    CHECK(cudaMalloc(&r, 3 * sizeof(unsigned long long)));
    resolution<<<1, 1, 0, st>>>(r);
    unsigned long long hr[3];
    CHECK(cudaMemcpy(hr, r, sizeof(hr), cudaMemcpyDeviceToHost));
    printf("%%globaltimer: smallest step %llu ns; %.1f µs of it took %llu clock64 cycles (%.0f MHz)\n", hr[0], hr[1] / 1e3, hr[2],
           hr[2] / (hr[1] / 1e3));

    uint4* w;
    float* out;
    unsigned* chain;
    Stamps *s, *hs = new Stamps;
    CHECK(cudaMalloc(&w, MATRIX_VECS * 16 * LAUNCHES));
    CHECK(cudaMemset(w, 0x3c, MATRIX_VECS * 16 * LAUNCHES));
    CHECK(cudaMalloc(&out, ROWS * sizeof(float)));
    CHECK(cudaMalloc(&s, sizeof(Stamps)));
    CHECK(cudaMalloc(&chain, 4096 * sizeof(unsigned)));
    unsigned host[4096];
    for (unsigned i = 0; i < 4096; i++) host[i] = (i * 2654435761u) >> 20;  // a pseudo-random walk
    CHECK(cudaMemcpy(chain, host, sizeof(host), cudaMemcpyHostToDevice));

    printf("attention stand-in %d blocks (clusters of %d), %u µs of L2 chase; o stand-in %d blocks, 16.8 MB; %d pairs a graph\n",
           ATT_BLOCKS, ATT_SPLITS, ATT_US, O_BLOCKS, LAUNCHES);
    printf("%-34s %9s %14s %16s %18s\n", "variant", "µs/pair", "exit-done p50", "last exit-done", "o wait first/last");
    // LAUNCHES (attention, o) pairs (early < 0: the attention alone), the o stand-ins on fresh matrices.
    auto pairs = [&](bool barrier, int early) {
        const dim3 att_grid(ATT_X, 1, ATT_SPLITS), o_grid(O_BLOCKS);
        for (int l = 0; l < LAUNCHES; l++) {
            launch_pdl_on(st, barrier ? att<true> : att<false>, att_grid, 0, 128, ATT_SPLITS, s, l, chain, out);
            const uint4* wl = w + (size_t)l * MATRIX_VECS;
            if (early == 16) launch_pdl_on(st, o_proj<16>, o_grid, 0, O_WARPS * 32, 1, wl, s, l, out);
            else if (early == 8) launch_pdl_on(st, o_proj<8>, o_grid, 0, O_WARPS * 32, 1, wl, s, l, out);
            else if (early == 0) launch_pdl_on(st, o_proj<0>, o_grid, 0, O_WARPS * 32, 1, wl, s, l, out);
        }
    };
    auto variant = [&](const char* name, bool barrier, int early) {
        const float us = graph_us_a_launch(st, LAUNCHES, [&] { pairs(barrier, early); });
        // The stamps of one more replay alone (exits are atomicMax'd: cleared first).
        CHECK(cudaMemsetAsync(s, 0, sizeof(Stamps), st));
        graph_once(st, [&] { pairs(barrier, early); });
        CHECK(cudaMemcpy(hs, s, sizeof(Stamps), cudaMemcpyDeviceToHost));
        std::vector<double> ed, span, ow0, ow1;
        for (int l = 1; l < LAUNCHES; l++) {
            std::vector<double> d;
            unsigned long long first_done = ~0ull, last_exit = 0;
            for (int b = 0; b < ATT_BLOCKS; b++) {
                d.push_back((double)(hs->exit[l][b] - hs->done[l][b]) / 1e3);
                first_done = std::min(first_done, hs->done[l][b]);
                last_exit = std::max(last_exit, hs->exit[l][b]);
            }
            ed.push_back(median(d));
            span.push_back((double)(last_exit - first_done) / 1e3);
            if (early >= 0) {
                unsigned long long a = ~0ull, z = 0;
                for (int b = 0; b < O_BLOCKS; b++) a = std::min(a, hs->o_wait[l][b]), z = std::max(z, hs->o_wait[l][b]);
                ow0.push_back(((double)a - (double)last_exit) / 1e3);
                ow1.push_back(((double)z - (double)last_exit) / 1e3);
            }
        }
        char ow[64] = "-";
        if (early >= 0) snprintf(ow, sizeof(ow), "%.2f/%.2f", median(ow0), median(ow1));
        printf("%-34s %9.2f %14.2f %16.2f %18s\n", name, us, median(ed), median(span), ow);
    };
    variant("attention alone, barrier", true, -1);
    variant("attention alone, no barrier", false, -1);
    variant("+ o, 16 early loads, barrier", true, 16);
    variant("+ o, 16 early loads, no barrier", false, 16);
    variant("+ o, 8 early loads, barrier", true, 8);
    variant("+ o, 0 early loads, barrier", true, 0);
    return 0;
}
