// early_loads.cu: how fast 16.8 MB of weights arrive when every warp asks for its whole row at once, as
// Qwen3-30B-A3B's decode o projection does before its wait (gemv_t1_xs, matmul_wide: 2,048 rows of
// 8 KB, a warp a row, 16 16-byte loads a lane in flight). RESULTS.md run 33.6: those weights take ~9 µs
// from request to use in the decode step, where the copy bandwidth would bring them in ~4.
//
//   nvcc -O3 -arch=sm_90 -o /tmp/early_loads benches/profiles/early_loads.cu && /tmp/early_loads
//
// Each variant reads a fresh 16.8 MB matrix a launch (LAUNCHES of them, no L2 reuse) and writes one sum a
// warp; launches run back to back in a CUDA graph (plain stream order). Prints µs a launch, less an empty
// launch's, and the bandwidth that makes:
//   stride U      phase.cuh's bare phase: the grid reads consecutive 16-byte vectors, U a lane in flight
//   rows U        a warp a row, its lanes' 16 vectors issued U at a time (U = 16: o's pattern)
//   rows 16 rot   as rows 16, warp w issuing its row's 512-byte pieces from piece w % 16 on
//   rows bulk     a warp a row, one cp.async.bulk of the row's 8 KB into shared memory, then summed
// Then as in the decode step: o's pattern launched with programmatic dependent launch behind a kernel of
// 64 blocks that holds the GPU for SPIN_US (its own wait first, then it lets the next kernel start, as
// kernels/ do) while o's loads are in flight, µs a pair against the spin kernel alone: with `l2`, the
// spinning blocks also chase dependent L2 reads, as the decode attention's chain does.
#include "timing.cuh"

constexpr int ROWS = 2048, ROW_VECS = 512, WARPS = 8, LAUNCHES = 100;  // 8 KB rows: 512 16-byte vectors
constexpr size_t MATRIX_VECS = (size_t)ROWS * ROW_VECS;

__global__ void empty(const uint4*, float* out) {
    if (threadIdx.x == 0 && blockIdx.x == 0 && out == nullptr) out[0] = 0.f;
}

template <int U>
__global__ void __launch_bounds__(WARPS * 32) stride(const uint4* w, float* out) {
    const size_t tid = blockIdx.x * (size_t)blockDim.x + threadIdx.x, nth = (size_t)gridDim.x * blockDim.x;
    float s = 0.f;
    for (size_t i0 = tid; i0 < MATRIX_VECS; i0 += nth * U) {
        uint4 v[U];
#pragma unroll
        for (int u = 0; u < U; u++) v[u] = i0 + u * nth < MATRIX_VECS ? __ldcs(w + i0 + u * nth) : make_uint4(0, 0, 0, 0);
#pragma unroll
        for (int u = 0; u < U; u++) s += use(v[u]);
    }
    put(out, s);
}

template <int U, bool ROT>
__global__ void __launch_bounds__(WARPS * 32) rows(const uint4* w, float* out) {
    const int warp = blockIdx.x * WARPS + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    const uint4* row = w + (size_t)warp * ROW_VECS;
    const int rot = ROT ? warp % (ROW_VECS / 32) : 0;
    float s = 0.f;
    for (int p0 = 0; p0 < ROW_VECS / 32; p0 += U) {
        uint4 v[U];
#pragma unroll
        for (int u = 0; u < U; u++) v[u] = __ldcs(row + ((p0 + u + rot) % (ROW_VECS / 32)) * 32 + lane);
#pragma unroll
        for (int u = 0; u < U; u++) s += use(v[u]);
    }
    put(out, s);
}

__global__ void __launch_bounds__(WARPS * 32) rows_bulk(const uint4* w, float* out) {
    extern __shared__ __align__(128) uint4 sm[];
    __shared__ __align__(8) unsigned long long bar[WARPS];
    const int wb = threadIdx.x >> 5, warp = blockIdx.x * WARPS + wb, lane = threadIdx.x & 31;
    uint4* mine = sm + wb * ROW_VECS;
    const unsigned b = (unsigned)__cvta_generic_to_shared(&bar[wb]), dst = (unsigned)__cvta_generic_to_shared(mine);
    if (lane == 0) {
        asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;\n\tfence.mbarrier_init.release.cluster;" ::"r"(b) : "memory");
        asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(b), "r"(ROW_VECS * 16) : "memory");
        asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(dst),
                     "l"(w + (size_t)warp * ROW_VECS), "r"(ROW_VECS * 16), "r"(b) : "memory");
    }
    __syncwarp();
    unsigned done = 0;
    while (!done) {
        asm volatile("{\n\t.reg .pred p;\n\tmbarrier.try_wait.parity.shared::cta.b64 p, [%1], 0;\n\tselp.u32 %0, 1, 0, p;\n\t}"
                     : "=r"(done) : "r"(b) : "memory");
    }
    float s = 0.f;
    for (int i = lane; i < ROW_VECS; i += 32) s += use(mine[i]);
    put(out, s);
}

constexpr unsigned SPIN_US = 7;

__global__ void __launch_bounds__(128) spin(const unsigned* chain, float* out, int l2) {
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
    unsigned long long t0, t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
    unsigned i = threadIdx.x, acc = 0;
    do {
        if (l2) i = __ldcg(chain + (i & 4095)), acc += i;
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t) :: "memory");
    } while (t - t0 < SPIN_US * 1000ull);
    if (acc == 0xffffffffu) out[0] = 1.f;
}

// o's pattern as the decode product runs it: the row's 16 loads a lane issued, then the wait, then used
// (MODE 0: ld.global.nc as matmul.cu's ld_weight; 1: plain ld.global; 2: .nc, used before the wait).
template <int MODE>
__global__ void __launch_bounds__(WARPS * 32) rows_pdl(const uint4* w, float* out) {
    const int warp = blockIdx.x * WARPS + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    const uint4* row = w + (size_t)warp * ROW_VECS;
    uint4 v[ROW_VECS / 32];
#pragma unroll
    for (int u = 0; u < ROW_VECS / 32; u++) {
        if (MODE == 1) {
            asm volatile("ld.global.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(v[u].x), "=r"(v[u].y), "=r"(v[u].z), "=r"(v[u].w) : "l"(row + u * 32 + lane));
        } else {
            asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                         : "=r"(v[u].x), "=r"(v[u].y), "=r"(v[u].z), "=r"(v[u].w) : "l"(row + u * 32 + lane));
        }
    }
    float s = 0.f;
    if (MODE == 2) {
#pragma unroll
        for (int u = 0; u < ROW_VECS / 32; u++) s += use(v[u]);
    }
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
    if (MODE != 2) {
#pragma unroll
        for (int u = 0; u < ROW_VECS / 32; u++) s += use(v[u]);
    }
    put(out, s);
}

// µs a (spin, o) pair over LAUNCHES fresh matrices in one graph, o launched with PDL (o: false, the spin
// kernel alone), best of 5 replays.
template <int MODE>
float time_pairs(const uint4* w, const unsigned* chain, float* out, int l2, bool o, cudaStream_t st) {
    return graph_us_a_launch(st, LAUNCHES, [&] {
        for (int i = 0; i < LAUNCHES; i++) {
            launch_pdl_on(st, spin, dim3(64), 0, 128, 1, chain, out, l2);
            if (o) launch_pdl_on(st, rows_pdl<MODE>, dim3(ROWS / WARPS), 0, WARPS * 32, 1, w + (size_t)i * MATRIX_VECS, out);
        }
    });
}

// µs a launch of `k` over LAUNCHES fresh matrices, in one graph, best of 5 replays.
template <class K>
float time_launches(K k, const uint4* w, float* out, int smem, cudaStream_t st) {
    return graph_us_a_launch(st, LAUNCHES, [&] {
        for (int i = 0; i < LAUNCHES; i++) k<<<ROWS / WARPS, WARPS * 32, smem, st>>>(w + (size_t)i * MATRIX_VECS, out);
    });
}

int main() {
    uint4* w;
    float* out;
    CHECK(cudaMalloc(&w, MATRIX_VECS * 16 * LAUNCHES));
    CHECK(cudaMemset(w, 0x3c, MATRIX_VECS * 16 * LAUNCHES));
    CHECK(cudaMalloc(&out, ROWS * sizeof(float)));
    cudaStream_t st;
    CHECK(cudaStreamCreate(&st));
    const int bulk_smem = WARPS * ROW_VECS * 16;
    CHECK(cudaFuncSetAttribute(rows_bulk, cudaFuncAttributeMaxDynamicSharedMemorySize, bulk_smem));
    // The copy bandwidth: 1 GB device to device, the best of 4 copies.
    const size_t half = MATRIX_VECS * 16 * LAUNCHES / 2;
    const float ms = best_ms(st, 0, 4, [&] { CHECK(cudaMemcpyAsync((char*)w + half, w, half, cudaMemcpyDeviceToDevice, st)); });
    const double copy_tbs = 2.0 * half / (ms * 1e-3) / 1e12, mb = MATRIX_VECS * 16 / 1e6;
    const float e = time_launches(empty, w, out, 0, st);
    printf("copy %.2f TB/s (%.1f MB at it: %.2f µs); empty launch %.2f µs\n", copy_tbs, mb, mb / copy_tbs, e);
    printf("%-14s %10s %10s %8s\n", "variant", "µs/launch", "less empty", "TB/s");
    auto row = [&](const char* name, float us) { printf("%-14s %10.2f %10.2f %8.2f\n", name, us, us - e, mb / (us - e)); };  // MB/µs = TB/s
    row("stride 4", time_launches(stride<4>, w, out, 0, st));
    row("stride 16", time_launches(stride<16>, w, out, 0, st));
    row("rows 16", time_launches(rows<16, false>, w, out, 0, st));
    row("rows 8", time_launches(rows<8, false>, w, out, 0, st));
    row("rows 4", time_launches(rows<4, false>, w, out, 0, st));
    row("rows 16 rot", time_launches(rows<16, true>, w, out, 0, st));
    row("rows bulk", time_launches(rows_bulk, w, out, bulk_smem, st));
    unsigned* chain;
    CHECK(cudaMalloc(&chain, 4096 * sizeof(unsigned)));
    unsigned host[4096];
    for (unsigned i = 0; i < 4096; i++) host[i] = (i * 2654435761u) >> 20;  // a pseudo-random walk
    CHECK(cudaMemcpy(chain, host, sizeof(host), cudaMemcpyHostToDevice));
    const char* modes[3] = {"ld.global.nc", "ld.global", "ld.global.nc used before the wait"};
    for (int l2 = 0; l2 < 2; l2++) {
        const float alone = time_pairs<0>(w, chain, out, l2, false, st);
        float pair[3] = {time_pairs<0>(w, chain, out, l2, true, st), time_pairs<1>(w, chain, out, l2, true, st),
                         time_pairs<2>(w, chain, out, l2, true, st)};
        for (int m = 0; m < 3; m++)
            printf("spin %u µs%s alone %.2f µs; o's pattern (%s) behind it: %.2f a pair, o adds %.2f\n", SPIN_US,
                   l2 ? " + L2 chase" : "", alone, modes[m], pair[m], pair[m] - alone);
    }
    return 0;
}
