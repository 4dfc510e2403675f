// lds_behind_loads.cu: does a shared-memory load wait behind an SM's burst of global loads, and does it
// when the same bytes come by TMA bulk copies instead? RESULTS.md run 41.2: in the Qwen3-30B-A3B decode
// the merging attention blocks' shared loads of the pushed states took 1.3 µs, and the few MUFU after
// them 0.7, while the o projection behind them (PDL) had its ~128 KB an SM of early weight loads in
// flight. If bulk copies (issued by the SM's TMA unit into shared memory, not through the LSU) leave
// shared loads alone, o could take its early weights that way.
//
//   nvcc -O3 -arch=sm_90a -o /tmp/lds_behind_loads benches/profiles/lds_behind_loads.cu && /tmp/lds_behind_loads [KB PIECES]
//
// KB PIECES: the bulk mode's bytes a block (default 120, at most 220) in that many copies (default 8):
// e.g. 196 8 for run 30.5's down-projection copies, whose slowness is not understood.
//
// One block an SM, 16 warps. Warps 1..15 take 120 KB (an o block pair's early bytes) of a fresh part of
// a 1 GB buffer (no L2 hits), by mode: none; LDG (16 ld.global.L1::no_allocate.v4 a thread, as common.cuh
// ld_early, summed after); BULK (8 cp.async.bulk copies of 15 KB into shared memory, one mbarrier). Warp 0's
// lane 0 probes every 0.25 µs from 0.2 µs after the block's start: one dependent shared load (LDS) and one
// MUFU (ex2), each timed with clock64; in launches of their own, an L2-resident global load instead (one
// stuck behind the burst holds back the probes after it), and, in others, the decode attention's wait for
// its pushes on an mbarrier already complete (try_wait.acquire.cluster: SYNCS.PHASECHK then CCTL.IVALL,
// the L1 invalidate of a cluster-scope acquire) followed by an LDS; and in others, once at 0.2 µs, 8 KB of
// straight-line FFMA the SM has not run before, then the same again (instruction fetches behind the burst?;
// the 8 copies of that code come around again after 8 launches: 7 a kind, so each launch's is new); and in
// others 4 KB of L2-resident data by one bulk copy into shared memory, or an L2-resident load through the
// non-coherent path (RESULTS.md run 42.5). Per mode and probe time: the median over the
// SMs of each probe's ns, and when the block's loads were all in (median, max). (The L2 row's probes
// start late where the one before was stuck: its "at" is not the row above's.)
#include "timing.cuh"

#include <algorithm>
#include <vector>

constexpr int WARPS = 16, LOADERS = (WARPS - 1) * 32, VECS = 16, PROBES = 20, LAUNCHES = 6;
constexpr int BLOCK_BYTES = LOADERS * VECS * 16;  // 122,880
constexpr size_t BUF = 1ull << 30;

struct Out {
    unsigned long long at[PROBES];      // probe start, ns after the block's start
    unsigned lds[PROBES], mufu[PROBES], l2[PROBES], cold[2];  // clock64 cycles
    unsigned long long loads_in;        // ns after the block's start
    unsigned long long cycles, ns;      // the prober's span, to convert
};

__device__ __forceinline__ unsigned long long now() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)::"memory");
    return t;
}
__device__ __forceinline__ unsigned smem(const void* p) { return (unsigned)__cvta_generic_to_shared(p); }

// 8 KB of straight-line FFMA (copy B of eight, so that each launch runs code no launch ran before),
// timed once and then again (the second time from the instruction caches).
template <int B>
__device__ __forceinline__ void cold_code(Out& o, float x, float* sink) {
#pragma unroll 1
    for (int rep = 0; rep < 2; rep++) {
        const long long c0 = clock64();
#pragma unroll
        for (int j = 0; j < 512; j++) asm volatile("fma.rn.f32 %0, %0, %1, %1;" : "+f"(x) : "f"(1.0001f + B));
        if (x == 12345.f) sink[3] = x;
        o.cold[rep] = (unsigned)(clock64() - c0);
    }
}

template <int MODE>  // 0 none, 1 LDG, 2 bulk
__global__ void __launch_bounds__(WARPS * 32, 1) burst(Out* out, const uint4* buf, const unsigned* l2line, float* sink, int l2probe, int bulk_bytes, int pieces, int launch) {
    extern __shared__ __align__(128) unsigned char dyn[];
    __shared__ __align__(8) unsigned long long bar, done_bar, x_bar;
    __shared__ __align__(128) unsigned char x_buf[4096];
    __shared__ unsigned probe_word[32];
    __shared__ unsigned long long t_start, t_in;
    Out& o = out[blockIdx.x];
    const uint4* mine = buf + (size_t)blockIdx.x * ((MODE == 2 ? bulk_bytes : BLOCK_BYTES) / 16);
    if (threadIdx.x == 0) {
        asm volatile("mbarrier.init.shared.b64 [%0], 1;" ::"r"(smem(&bar)));
        asm volatile("mbarrier.init.shared.b64 [%0], 1;" ::"r"(smem(&done_bar)));
        asm volatile("mbarrier.init.shared.b64 [%0], 1;" ::"r"(smem(&x_bar)));
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
        asm volatile("mbarrier.arrive.shared.b64 _, [%0];" ::"r"(smem(&done_bar)) : "memory");  // phase 0 complete
        t_in = 0;
    }
    if (threadIdx.x < 32) probe_word[threadIdx.x] = threadIdx.x;
    __syncthreads();
    if (threadIdx.x == 0) t_start = now();
    __syncthreads();
    const int warp = threadIdx.x >> 5;
    if (warp > 0) {
        float s = 0.f;
        if (MODE == 1) {
            uint4 v[VECS];
            const int t = threadIdx.x - 32;
#pragma unroll
            for (int i = 0; i < VECS; i++)
                asm volatile("ld.global.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                             : "=r"(v[i].x), "=r"(v[i].y), "=r"(v[i].z), "=r"(v[i].w) : "l"(mine + i * LOADERS + t));
#pragma unroll
            for (int i = 0; i < VECS; i++) s += __uint_as_float((v[i].x ^ v[i].y ^ v[i].z ^ v[i].w) & 0x3f800000u);
        } else if (MODE == 2) {
            if (threadIdx.x == 32) {
                asm volatile("mbarrier.arrive.expect_tx.shared.b64 _, [%0], %1;" ::"r"(smem(&bar)), "r"(bulk_bytes) : "memory");
                const int piece = bulk_bytes / pieces;
                for (int p = 0; p < pieces; p++)
                    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                                 ::"r"(smem(dyn + p * piece)), "l"(reinterpret_cast<const char*>(mine) + p * piece), "r"(piece), "r"(smem(&bar)) : "memory");
            }
            unsigned done = 0;
            while (!done)
                asm volatile("{ .reg .pred p; mbarrier.try_wait.parity.shared.b64 p, [%1], 0; selp.u32 %0, 1, 0, p; }"
                             : "=r"(done) : "r"(smem(&bar)) : "memory");
            const uint4 w = reinterpret_cast<const uint4*>(dyn)[threadIdx.x - 32];
            s = __uint_as_float((w.x ^ w.y ^ w.z ^ w.w) & 0x3f800000u);
        }
        const unsigned long long t = now();
        atomicMax(&t_in, t);
        if (s == 12345.f) sink[0] = s;
    } else if (threadIdx.x == 0) {
        const unsigned long long t0 = t_start, c0 = clock64();
        unsigned idx = 0;
        float f = 0.5f;
        // Each probe: a clock read, the operation, a predicate on its result (so the wait for it comes
        // before), the second clock read; one asm statement, in that order.
        for (int p = 0; p < PROBES; p++) {
            const unsigned long long at = t0 + 200 + 250ull * p;
            while (now() < at) {}
            o.at[p] = now() - t0;
            unsigned long long a, b, c, d;
            asm volatile("{ .reg .u32 v; .reg .pred q; mov.u64 %0, %%clock64; ld.volatile.shared.u32 v, [%3];"
                         " setp.eq.u32 q, v, 12345; @q trap; mov.u64 %1, %%clock64; mov.u32 %2, v; }"
                         : "=l"(a), "=l"(b), "=r"(idx) : "r"(smem((const void*)&probe_word[idx & 31])) : "memory");
            asm volatile("{ .reg .pred q; ex2.approx.f32 %1, %1; setp.eq.f32 q, %1, 0f46403800; @q trap;"
                         " mov.u64 %0, %%clock64; }" : "=l"(c), "+f"(f) :: "memory");
            d = c;
            if (l2probe == 3) {  // code this SM has not run (a copy of its own each launch), then again
                if (p == 0) {
                    switch (launch & 7) {
                        case 0: cold_code<0>(o, f, sink); break;
                        case 1: cold_code<1>(o, f, sink); break;
                        case 2: cold_code<2>(o, f, sink); break;
                        case 3: cold_code<3>(o, f, sink); break;
                        case 4: cold_code<4>(o, f, sink); break;
                        case 5: cold_code<5>(o, f, sink); break;
                        case 6: cold_code<6>(o, f, sink); break;
                        default: cold_code<7>(o, f, sink); break;
                    }
                }
            } else if (l2probe == 2)  // the decode attention's wait for its pushes (SASS: SYNCS.PHASECHK, CCTL.IVALL), then an LDS
                asm volatile("{ .reg .u32 v; .reg .pred q; waitp: mbarrier.try_wait.parity.acquire.cluster.shared::cta.b64 q, [%1], 0;"
                             " @!q bra waitp; ld.volatile.shared.u32 v, [%2]; setp.eq.u32 q, v, 12345; @q trap;"
                             " mov.u64 %0, %%clock64; }" : "=l"(d) : "r"(smem(&done_bar)), "r"(smem((const void*)&probe_word[0])) : "memory");
            else if (l2probe == 4)  // 4 KB of L2-resident activations by one bulk copy, then an LDS of them
                asm volatile("{ .reg .u32 v; .reg .pred q; mbarrier.arrive.expect_tx.shared.b64 _, [%1], 4096;"
                             " cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%2], [%3], 4096, [%1];"
                             " waitx: mbarrier.try_wait.parity.shared.b64 q, [%1], %4; @!q bra waitx;"
                             " ld.volatile.shared.u32 v, [%2]; setp.eq.u32 q, v, 12345; @q trap; mov.u64 %0, %%clock64; }"
                             : "=l"(d) : "r"(smem(&x_bar)), "r"(smem(x_buf)), "l"(l2line), "r"(p & 1) : "memory");
            else if (l2probe == 5)  // an L2-resident load through the non-coherent (texture) path
                asm volatile("{ .reg .u32 v; .reg .pred q; ld.global.nc.u32 v, [%1]; setp.eq.u32 q, v, 12345; @q trap;"
                             " mov.u64 %0, %%clock64; }" : "=l"(d) : "l"(l2line + 64 + (idx & 31)) : "memory");
            else if (l2probe)  // its own launches: a load stuck behind the burst holds the probes after it
                asm volatile("{ .reg .u32 v; .reg .pred q; ld.global.cg.u32 v, [%1]; setp.eq.u32 q, v, 12345; @q trap;"
                             " mov.u64 %0, %%clock64; }" : "=l"(d) : "l"(l2line + (idx & 31)) : "memory");
            o.lds[p] = (unsigned)(b - a);
            o.mufu[p] = (unsigned)(c - b);
            o.l2[p] = (unsigned)(d - c);
        }
        o.cycles = clock64() - c0;
        o.ns = now() - t0;
    }
    __syncthreads();
    if (threadIdx.x == 0) o.loads_in = t_in ? t_in - t_start : 0;
}

int main(int argc, char** argv) {
    const int bulk_bytes = (argc > 1 ? atoi(argv[1]) : 120) * 1024, pieces = argc > 2 ? atoi(argv[2]) : 8;
    if (bulk_bytes <= 0 || bulk_bytes > 220 * 1024 || pieces <= 0 || bulk_bytes % (16 * pieces)) {
        printf("KB in 1..220, KB * 1024 a multiple of 16 * PIECES\n");
        return 1;
    }
    int sms;
    CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
    uint4* buf;
    unsigned* line;
    float* sink;
    Out* out;
    CHECK(cudaMalloc(&buf, BUF));
    CHECK(cudaMemset(buf, 1, BUF));
    CHECK(cudaMalloc(&line, 4096));
    CHECK(cudaMemset(line, 0, 4096));
    CHECK(cudaMalloc(&sink, 64));
    CHECK(cudaMalloc(&out, sizeof(Out) * sms));
    const size_t smem_bytes = std::max(BLOCK_BYTES, bulk_bytes);
    CHECK(cudaFuncSetAttribute(burst<0>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem_bytes));
    CHECK(cudaFuncSetAttribute(burst<1>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem_bytes));
    CHECK(cudaFuncSetAttribute(burst<2>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem_bytes));
    const size_t per_launch = (size_t)sms * smem_bytes;
    printf("%d SMs; a block loads %d bytes (bulk: %d in %d copies); probes every 0.25 us from 0.2 us; ns, median over SMs of the median launch\n",
           sms, BLOCK_BYTES, bulk_bytes, pieces);
    const char* names[3] = {"none", "LDG", "bulk"};
    std::vector<Out> h(sms);
    size_t off = 0;
    for (int mode = 0; mode < 3; mode++) {
        std::vector<std::vector<double>> lds(PROBES), mufu(PROBES), l2(PROBES), at(PROBES), ivall(PROBES), bulkx(PROBES), ncld(PROBES);
        std::vector<double> in, cold0, cold1;
        for (int l = 0; l < 6 * (LAUNCHES + 1); l++) {
            const int l2probe = l / (LAUNCHES + 1);
            if (off + per_launch > BUF) off = 0;
            const uint4* b = buf + off / 16;
            off += per_launch;
            if (mode == 0) burst<0><<<sms, WARPS * 32, smem_bytes>>>(out, b, line, sink, l2probe, bulk_bytes, pieces, l);
            if (mode == 1) burst<1><<<sms, WARPS * 32, smem_bytes>>>(out, b, line, sink, l2probe, bulk_bytes, pieces, l);
            if (mode == 2) burst<2><<<sms, WARPS * 32, smem_bytes>>>(out, b, line, sink, l2probe, bulk_bytes, pieces, l);
            CHECK(cudaGetLastError());
            CHECK(cudaDeviceSynchronize());
            if (l % (LAUNCHES + 1) == 0) continue;  // warm-ups
            CHECK(cudaMemcpy(h.data(), out, sizeof(Out) * sms, cudaMemcpyDeviceToHost));
            for (auto& o : h) {
                const double ns_per_cycle = (double)o.ns / (double)o.cycles;
                if (l2probe == 3) {
                    cold0.push_back(o.cold[0] * ns_per_cycle);
                    cold1.push_back(o.cold[1] * ns_per_cycle);
                    continue;
                }
                for (int p = 0; p < PROBES; p++) {
                    if (l2probe) {
                        (l2probe == 1 ? l2 : l2probe == 2 ? ivall : l2probe == 4 ? bulkx : ncld)[p].push_back(o.l2[p] * ns_per_cycle);
                        continue;
                    }
                    at[p].push_back(o.at[p]);
                    lds[p].push_back(o.lds[p] * ns_per_cycle);
                    mufu[p].push_back(o.mufu[p] * ns_per_cycle);
                }
                in.push_back(o.loads_in);
            }
        }
        auto med = [](std::vector<double> v) { std::sort(v.begin(), v.end()); return v.empty() ? 0.0 : v[v.size() / 2]; };
        auto mx = [](const std::vector<double>& v) { return v.empty() ? 0.0 : *std::max_element(v.begin(), v.end()); };
        // One row: the median of each probe's values.
        auto row = [&](const char* label, const std::vector<std::vector<double>>& probes) {
            printf("\n   %s", label);
            for (int p = 0; p < PROBES; p++) printf(" %6.0f", med(probes[p]));
        };
        printf("\n%s: loads all in at %.0f ns (median block), %.0f (last)", names[mode], med(in), mx(in));
        row("at ns:", at);
        row("LDS  :", lds);
        row("MUFU :", mufu);
        row("L2 ld:", l2);
        row("acq+LDS:", ivall);
        row("bulk 4K:", bulkx);
        row("nc ld:", ncld);
        printf("\n   8 KB of code not run before, at 0.2 us: %.0f ns; the same code again: %.0f ns", med(cold0), med(cold1));
        printf("\n");
    }
    return 0;
}
