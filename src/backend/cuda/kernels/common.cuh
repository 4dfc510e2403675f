// common.cuh: prepended to every kernel file. `act_t` is the compute dtype (chosen per module by
// -DQ_DTYPE: 0 f32, 1 bf16, 2 f16); activations, weights and the KV cache are all act_t, math is
// f32. `rnd` rounds an f32 to act_t and back: ops round where the CPU reference rounds.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

// NVRTC has no <math.h> macros.
#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif

#if Q_DTYPE == 0
typedef float act_t;
#elif Q_DTYPE == 1
typedef __nv_bfloat16 act_t;
#else
typedef __half act_t;
#endif

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }

__device__ __forceinline__ act_t from_f(float x) {
#if Q_DTYPE == 0
    return x;
#elif Q_DTYPE == 1
    return __float2bfloat16_rn(x);
#else
    return __float2half_rn(x);
#endif
}

__device__ __forceinline__ float rnd(float x) { return to_f(from_f(x)); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the total.
__device__ float block_sum(float v) {
    __shared__ float partial[32];
    __shared__ float total;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum(v);
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    if (warp == 0) {
        float s = lane < (int)(blockDim.x >> 5) ? partial[lane] : 0.f;
        s = warp_sum(s);
        if (lane == 0) total = s;
    }
    __syncthreads();
    float t = total;
    __syncthreads();  // `partial`/`total` may be reused by the next call
    return t;
}

// Programmatic dependent launch (gpu.rs `launch`, sm_90+): a kernel may start while the kernel ahead
// of it on the stream is still running. Every kernel calls grid_dependency() before it reads or
// writes any activation, cache or scratch buffer: it waits until the kernel ahead has completed and
// its writes are visible, then lets the kernel behind start its own prologue. Before it a kernel may
// only read weights (load_batch, load_norm_weight, prefetch_lines) and host metadata (the decode
// attention; tests/test_kernel_sources.py checks both). No-op without PDL or below sm_90.
__device__ __forceinline__ void tl_waited();
__device__ __forceinline__ void grid_dependency() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
    tl_waited();
}

// Block timeline (profiling only: QWEN3RS_CUDA_DEFINES=BLOCK_TIMELINE=1, dumped by gpu.rs when
// QWEN3RS_CUDA_TIMELINE names a file; benches/profiles/block_timeline.py reads it). Each block of a
// kernel that opens TIMELINE("name") records, in a ring of TL_CAP records a module, the kernel (FNV-1a
// of its name), its block and grid size, its SM, and three %globaltimer stamps: entry, the end of its
// grid_dependency() wait and its last warp's exit; and up to TL_MARKS stamps of thread 0 at TL_MARK(i, v),
// taken once v (a value computed there) is ready (mark 0: stage_input's end). Without the define the
// macros are nothing.
#ifdef BLOCK_TIMELINE
#define TL_CAP (1u << 17)
#define TL_MAGIC 0xA5000000u
#define TL_MARKS 4
struct TlRecord {
    unsigned long long t0, wait, end, mark[TL_MARKS];
    unsigned kid, block, grid, smid;
};
__device__ TlRecord qw_timeline[TL_CAP];
__device__ unsigned qw_timeline_n;
__device__ __forceinline__ unsigned long long tl_now() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}
// The block's record, TL_MAGIC | index (another value: the kernel opened no timeline), and thread 0's
// stamps until the block ends: kept in shared memory and written out last, so that the timeline adds no
// global store ahead of a kernel's barriers (a barrier's release waits for those; RESULTS.md run 35).
struct TlStamps {
    unsigned long long t0, wait, mark[TL_MARKS];
    unsigned slot;
};
__device__ __forceinline__ TlStamps& tl_stamps() {
    __shared__ TlStamps st;
    return st;
}
__device__ __forceinline__ bool tl_open() { return (tl_stamps().slot & 0xFF000000u) == TL_MAGIC; }
__device__ constexpr unsigned tl_hash(const char* s, unsigned h = 2166136261u) { return *s ? tl_hash(s + 1, (h ^ (unsigned char)*s) * 16777619u) : h; }
struct Timeline {
    unsigned kid, i;
    __device__ explicit Timeline(unsigned kid_) : kid(kid_) {
        TlStamps& st = tl_stamps();
        if (threadIdx.x == 0) {
            st.t0 = tl_now();
            st.wait = 0ull;
#pragma unroll
            for (int m = 0; m < TL_MARKS; m++) st.mark[m] = 0ull;
            st.slot = TL_MAGIC | (atomicAdd(&qw_timeline_n, 1u) & (TL_CAP - 1));
        }
        __syncthreads();
        i = st.slot & (TL_CAP - 1);
    }
    // Every warp's exit raises `end` (stamps only grow, so a slot's earlier record needs no reset);
    // thread 0 writes the rest of the record.
    __device__ ~Timeline() {
        if ((threadIdx.x & 31) == 0) atomicMax(&qw_timeline[i].end, tl_now());
        if (threadIdx.x == 0) {
            TlStamps& st = tl_stamps();
            TlRecord& r = qw_timeline[i];
            unsigned smid;
            asm volatile("mov.u32 %0, %%smid;" : "=r"(smid));
            r.t0 = st.t0;
            r.wait = st.wait;
#pragma unroll
            for (int m = 0; m < TL_MARKS; m++) r.mark[m] = st.mark[m];
            r.kid = kid;
            r.block = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
            r.grid = gridDim.x * gridDim.y * gridDim.z;
            r.smid = smid;
            st.slot = 0;
        }
    }
};
__device__ __forceinline__ void tl_waited() {
    if (threadIdx.x == 0 && tl_open()) tl_stamps().wait = tl_now();
}
__device__ __forceinline__ void tl_mark(int i, float v) {
    if (threadIdx.x == 0 && tl_open()) {
        unsigned long long t;
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t) : "f"(v) : "memory");
        tl_stamps().mark[i] = t;
    }
}
#define TIMELINE(name) Timeline tl_scope_(tl_hash(name))
#define TL_MARK(i, v) tl_mark(i, v)
#else
__device__ __forceinline__ void tl_waited() {}
#define TIMELINE(name)
#define TL_MARK(i, v)
#endif

// Thread block clusters (sm_90+; gpu.rs `launch_cluster`): the blocks of a cluster run at once on one
// GPC and read each other's shared memory. Without a cluster launch (or below sm_90) a block is a
// cluster of one: cluster_blocks() is 1 and cluster_sync() is __syncthreads().
__device__ __forceinline__ unsigned cluster_blocks() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    unsigned n;
    asm volatile("mov.u32 %0, %%cluster_nctarank;" : "=r"(n));
    return n;
#else
    return 1;
#endif
}

// Every thread of every block of the cluster arrives; shared-memory writes before it are visible to
// the cluster's reads after it.
__device__ __forceinline__ void cluster_sync() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
#else
    __syncthreads();
#endif
}

// Pushing data into other blocks' shared memory with its own completion (sm_90+; the decode attention's
// `_push` kernels, XCH 2): the receiver counts the bytes on an mbarrier (`st.async ... complete_tx`), so no
// release (a GPU-wide MEMBAR, RESULTS.md run 35.7) orders them. Below sm_90 nothing here runs (no
// clusters): the bodies are left out.
__device__ __forceinline__ unsigned smem_addr(const void* p) { return (unsigned)__cvta_generic_to_shared(p); }
// This block's shared address `a` in cluster block `rank` (a shared::cluster address).
__device__ __forceinline__ unsigned cluster_map(unsigned a, unsigned rank) {
    unsigned d = a;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(rank));
#endif
    return d;
}
// One thread: the mbarrier at `bar` set to complete once `bytes` have arrived, made visible to the
// cluster's st.async (the cluster's blocks then arrive at, and later wait on, a cluster barrier).
__device__ __forceinline__ void mbar_expect_bytes(unsigned bar, unsigned bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;\n\t"
                 "mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n\t"
                 "fence.mbarrier_init.release.cluster;" :: "r"(bar), "r"(bytes) : "memory");
#endif
}
__device__ __forceinline__ void st_async(unsigned addr, float v, unsigned bar) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.b32 [%0], %1, [%2];" :: "r"(addr), "r"(__float_as_uint(v)), "r"(bar) : "memory");
#endif
}
__device__ __forceinline__ void st_async(unsigned addr, float x, float y, unsigned bar) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.v2.b32 [%0], {%1, %2}, [%3];" :: "r"(addr), "r"(__float_as_uint(x)),
                 "r"(__float_as_uint(y)), "r"(bar) : "memory");
#endif
}
// Until the mbarrier's first phase completes (every expected byte arrived), with acquire at cluster scope.
__device__ __forceinline__ void mbar_wait_first(unsigned bar) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    unsigned done = 0;
    while (!done) {
        asm volatile("{\n\t.reg .pred p;\n\tmbarrier.try_wait.parity.acquire.cluster.shared::cta.b64 p, [%1], 0;\n\tselp.u32 %0, 1, 0, p;\n\t}"
                     : "=r"(done) : "r"(bar) : "memory");
    }
#endif
}
// The two halves of a cluster barrier without ordering: arrive early, wait when it matters.
__device__ __forceinline__ void cluster_arrive_relaxed() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("barrier.cluster.arrive.relaxed.aligned;" ::: "memory");
#endif
}
__device__ __forceinline__ void cluster_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("barrier.cluster.wait.aligned;" ::: "memory");
#endif
}
// cluster_sync without its release (arrive.relaxed, no GPU-wide MEMBAR ahead of it): what a block wrote
// before it may not yet be seen by the cluster after it. For a barrier that only keeps blocks from
// leaving (attention.cu, AD_STORES = 2), and for profiling (AD_BARRIER_RELAXED).
__device__ __forceinline__ void cluster_sync_relaxed() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    cluster_arrive_relaxed();
    cluster_wait();
#else
    __syncthreads();
#endif
}

// `p` (in this block's shared memory) as a generic address of the same place in cluster block
// `rank`'s shared memory: ordinary loads read it there.
template <class T>
__device__ __forceinline__ const T* cluster_ptr(const T* p, unsigned rank) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    unsigned long long r;
    asm volatile("mapa.u64 %0, %1, %2;" : "=l"(r) : "l"(p), "r"(rank));
    return reinterpret_cast<const T*>(r);
#else
    return p;
#endif
}

__device__ __forceinline__ int warp_id_global() { return blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5); }
__device__ __forceinline__ int warps_global() { return gridDim.x * (blockDim.x >> 5); }

// The calling warp prefetches bytes [0, n) at p into L2, a 128-byte line per lane.
__device__ __forceinline__ void prefetch_lines(const void* p, int n) {
    const char* c = reinterpret_cast<const char*>(p);
    for (int off = (threadIdx.x & 31) * 128; off < n; off += 32 * 128) asm volatile("prefetch.global.L2 [%0];" :: "l"(c + off));
}

// Loads a kernel may issue before grid_dependency() (weights, cached keys of earlier steps): plain
// global loads. The read-only path (ld.global.nc, __ldg) is not served, under programmatic dependent
// launch, before the kernel ahead has completed: o's pattern behind a 7 µs kernel added 5.1 µs with .nc
// and 1.0 with plain loads (benches/profiles/early_loads.cu, RESULTS.md run 33.10). LD_NC=1 (tunable)
// keeps the .nc form for comparison.
#ifndef LD_NC  // tunable: QWEN3RS_CUDA_DEFINES (compile.rs)
#define LD_NC 0
#endif
__device__ __forceinline__ uint4 ld_early(const uint4* p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 700
    uint4 r;
    if (LD_NC) {
        asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
    } else {
        asm volatile("ld.global.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
    }
    return r;
#else
    return __ldg(p);
#endif
}
__device__ __forceinline__ uint2 ld_early(const uint2* p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 700
    uint2 r;
    if (LD_NC) {
        asm volatile("ld.global.nc.v2.u32 {%0,%1}, [%2];" : "=r"(r.x), "=r"(r.y) : "l"(p));
    } else {
        asm volatile("ld.global.v2.u32 {%0,%1}, [%2];" : "=r"(r.x), "=r"(r.y) : "l"(p));
    }
    return r;
#else
    return __ldg(p);
#endif
}

// 16-byte accesses: VEC elements of act_t as one uint4.
#define VEC (16 / (int)sizeof(act_t))

// A vector V (uint4: VEC elements; uint2: half as many) of act_t as f32, and back. In bf16 a word's two
// elements are its low half shifted up and its high half masked (a bf16 is the top half of its f32):
// one instruction each, where to_f of the high half is an extract and a shift (PRMT, IMAD.U32).
template <class V>
__device__ __forceinline__ void unpack_vec(const V& v, float* f) {
#if Q_DTYPE == 1
    const unsigned* w = reinterpret_cast<const unsigned*>(&v);
#pragma unroll
    for (int j = 0; j < (int)(sizeof(V) / 4); j++) {
        f[2 * j] = __uint_as_float(w[j] << 16);
        f[2 * j + 1] = __uint_as_float(w[j] & 0xffff0000u);
    }
#else
    const act_t* e = reinterpret_cast<const act_t*>(&v);
#pragma unroll
    for (int j = 0; j < (int)(sizeof(V) / sizeof(act_t)); j++) f[j] = to_f(e[j]);
#endif
}

template <class V = uint4>
__device__ __forceinline__ V pack_vec(const float* f) {
    V v;
    act_t* e = reinterpret_cast<act_t*>(&v);
#pragma unroll
    for (int j = 0; j < (int)(sizeof(V) / sizeof(act_t)); j++) e[j] = from_f(f[j]);
    return v;
}

// ND elements of act_t from p (aligned to ND elements) as f32, in one load where the width allows.
template <int ND>
__device__ __forceinline__ void load_nd(const act_t* p, float* f) {
    constexpr int BYTES = ND * (int)sizeof(act_t);
    if constexpr (BYTES == 16) {
        unpack_vec(ld_early(reinterpret_cast<const uint4*>(p)), f);
    } else if constexpr (BYTES == 8) {
        unpack_vec(ld_early(reinterpret_cast<const uint2*>(p)), f);
    } else {
#pragma unroll
        for (int i = 0; i < ND; i++) f[i] = to_f(p[i]);
    }
}

// ND elements of act_t as loaded, not yet converted (a load in flight stays in flight until its
// values are used: a conversion right after it would wait there), in one load where the width allows.
template <int ND>
struct alignas(ND * sizeof(act_t) < 16 ? ND * sizeof(act_t) : 16) RawND {
    act_t e[ND];
};
template <int ND>
__device__ __forceinline__ RawND<ND> load_raw(const act_t* p) {
    constexpr int BYTES = ND * (int)sizeof(act_t);
    RawND<ND> r;
    if constexpr (BYTES == 16) {
        *reinterpret_cast<uint4*>(r.e) = ld_early(reinterpret_cast<const uint4*>(p));
    } else if constexpr (BYTES == 8) {
        *reinterpret_cast<uint2*>(r.e) = ld_early(reinterpret_cast<const uint2*>(p));
    } else {
#pragma unroll
        for (int i = 0; i < ND; i++) r.e[i] = p[i];
    }
    return r;
}
template <int ND>
__device__ __forceinline__ void unpack_raw(const RawND<ND>& r, float* f) {
#pragma unroll
    for (int i = 0; i < ND; i++) f[i] = to_f(r.e[i]);
}

// ND f32 values to p (aligned to ND elements) as act_t, in one store where the width allows.
template <int ND>
__device__ __forceinline__ void store_nd(act_t* p, const float* f) {
    constexpr int BYTES = ND * (int)sizeof(act_t);
    if constexpr (BYTES == 16) {
        *reinterpret_cast<uint4*>(p) = pack_vec<uint4>(f);
    } else if constexpr (BYTES == 8) {
        *reinterpret_cast<uint2*>(p) = pack_vec<uint2>(f);
    } else {
#pragma unroll
        for (int i = 0; i < ND; i++) p[i] = from_f(f[i]);
    }
}

// Key j's slot in a paged KV cache [n_blocks, block_size, kv_dim] whose sequence's block table is
// `table`: table[j / block_size] * block_size + j % block_size, by shift and mask (block_size is a
// power of two: mod.rs alloc_kv requires it; the division by a runtime divisor was ~500 of the decode
// attention's 3,224 instructions, RESULTS.md run 42.1).
__device__ __forceinline__ size_t cache_slot(const unsigned* table, int j, int block_size) {
    return (size_t)table[j >> (31 - __clz(block_size))] * block_size + (j & (block_size - 1));
}

// What norm_rope_head needs of a lane besides the head itself: its ND norm weights and the cos / sin
// of its ND elements from the RoPE table row cs (cos | sin). All weights or host metadata: the decode
// attention loads them before grid_dependency().
template <int ND>
struct NormRope {
    float w[ND], c[ND], s[ND];
};
template <int ND>
__device__ __forceinline__ NormRope<ND> load_norm_rope(const act_t* w, const float* cs) {
    constexpr int HALF = 16 * ND;
    const int lane = threadIdx.x & 31;
    NormRope<ND> r;
    load_nd<ND>(w + lane * ND, r.w);
#pragma unroll
    for (int i = 0; i < ND; i++) {
        int i0 = (lane * ND + i) % HALF;
        r.c[i] = cs[i0];
        r.s[i] = cs[HALF + i0];
    }
    return r;
}

// One head held by a warp, ND elements a lane (lane l: elements l*ND ..), in place: RMSNorm with the
// weight (rounded), then RoPE rotating halves, rounded (p: load_norm_rope): the values qk_norm_rope
// (norm.cu) writes, computed by one warp. An element's partner half a head away sits in lane l ^ 16.
template <int ND>
__device__ __forceinline__ void norm_rope_head(float* x, const NormRope<ND>& p, float eps) {
    constexpr int HD = 32 * ND;
    int lane = threadIdx.x & 31;
    float ss = 0.f;
#pragma unroll
    for (int i = 0; i < ND; i++) ss += x[i] * x[i];
    float inv = 1.f / sqrtf(warp_sum(ss) / (float)HD + eps);
#pragma unroll
    for (int i = 0; i < ND; i++) x[i] = rnd(p.w[i] * (x[i] * inv));
#pragma unroll
    for (int i = 0; i < ND; i++) {
        float o = __shfl_xor_sync(0xffffffffu, x[i], 16);
        x[i] = rnd(lane < 16 ? x[i] * p.c[i] - o * p.s[i] : x[i] * p.c[i] + o * p.s[i]);
    }
}

__device__ __forceinline__ float silu(float x) { return x / (1.f + expf(-x)); }

// MoE routing of `rows` rows by the whole block (moe_route, and the decode expert kernels that route
// for themselves); every thread of the block calls it, and the block has at least `rows` warps.
// logits [rows, E] f32 (global or shared memory); p (shared, rows of `stride` floats, 16-byte aligned) gets each
// row's softmax; sel (shared, [rows, k]) the choices in rank order. ids/weights [rows, k] out: the k
// most probable experts of the row sorted by expert id, and their (renormalised) probabilities
// (weights null: not stored); where ids2 is not null the same go to ids2/weights2 too. Ties go to the
// lower expert id; NaN is never chosen (a NaN or infinite logit makes every probability NaN: every id
// -1). Expert parallelism: a device holding experts [e0, e0 + held) keeps only its own choices, as
// local ids; the others become id -1, weight 0.
// 1. warp r: row r's softmax, in the lanes' order (lane l sums experts l, l + 32, ...).
// 2. every thread, (row, expert) pairs: the expert's rank is how many of its row's experts come
//    before it (larger, or equal with a lower id); ranks below k are chosen. Block-wide, in parallel:
//    a warp picking the k best one after another (k rounds of a warp-wide argmax) took 5.9 µs more of
//    the Qwen3-30B-A3B decode gate/up kernel than no routing at all (RESULTS.md run 22.1).
// 3. warp r, lane s < k: choice s of row r: the total of the chosen probabilities (summed in rank
//    order, largest first, as the host sums them) and where the choice goes in expert-id order.
// side_job: work of the caller's that every thread does between steps 1 and 2 (the rows' warps after
// their softmax), before the barrier there. Visible to the block after its next barrier.
#define MAX_TOP_K 32
#define ROUTE_MAX_E 256
// Profiling hook (benches/profiles/route_cost.cu defines it): thread 0's clock at route_rows' steps.
#ifndef RR_MARK
#define RR_MARK(i)
#endif
struct NoSideJob {
    __device__ void operator()() const {}
};
template <class F = NoSideJob>
__device__ __forceinline__ void route_rows(const float* logits, int rows, float* p, int stride, int* sel, int* ids, float* weights,
    int* ids2, float* weights2, int E, int k, int norm, int e0, int held, F side_job = F()) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    RR_MARK(0);
    if (warp < rows) {
        float* pr = p + (size_t)warp * stride;
        const float* lr = logits + (size_t)warp * E;
        float mx = -INFINITY;
        for (int e = lane; e < E; e += 32) { pr[e] = lr[e]; mx = fmaxf(mx, pr[e]); }
        mx = warp_max(mx);
        float sum = 0.f;
        for (int e = lane; e < E; e += 32) { float v = expf(pr[e] - mx); pr[e] = v; sum += v; }
        const float inv = 1.f / warp_sum(sum);
        for (int e = lane; e < E; e += 32) pr[e] *= inv;
        if (lane < k) sel[warp * k + lane] = -1;
        RR_MARK(1);  // (after warp_sum: the logits' loads are in)
    }
    side_job();  // every thread, the rows' warps after their softmax
    __syncthreads();
    const bool vec = E % 4 == 0 && stride % 4 == 0;
    for (int i = threadIdx.x; i < rows * E; i += blockDim.x) {
        const int r = i / E, e = i % E;
        const float* pr = p + (size_t)r * stride;
        const float v = pr[e];
        int rank = 0;
        if (vec) {
            for (int j = 0; j < E; j += 4) {
                const float4 q = *reinterpret_cast<const float4*>(pr + j);
                rank += (q.x > v || (q.x == v && j < e)) + (q.y > v || (q.y == v && j + 1 < e)) +
                        (q.z > v || (q.z == v && j + 2 < e)) + (q.w > v || (q.w == v && j + 3 < e));
            }
        } else {
            for (int j = 0; j < E; j++) rank += pr[j] > v || (pr[j] == v && j < e);
        }
        if (v == v && rank < k) sel[r * k + rank] = e;
    }
    __syncthreads();
    RR_MARK(2);
    if (warp >= rows) return;
    const int s = lane, chosen = s < k ? sel[warp * k + s] : 0x7fffffff;  // lanes past k: after every choice
    const float v = s < k && chosen >= 0 ? p[(size_t)warp * stride + chosen] : 0.f;
    float total = 0.f;
    int pos = 0;
    for (int j = 0; j < k; j++) {
        total += __shfl_sync(0xffffffffu, v, j);
        const int o = __shfl_sync(0xffffffffu, chosen, j);
        pos += o < chosen || (o == chosen && j < s);
    }
    if (s >= k) return;
    if (!norm) total = 1.f;
    const int local = chosen - e0;
    const bool mine = chosen >= 0 && local >= 0 && local < held;
    const int id = mine ? local : -1;
    const float w = mine ? v / total : 0.f;
    ids[warp * k + pos] = id;
    if (weights) weights[warp * k + pos] = w;
    if (ids2) {
        ids2[warp * k + pos] = id;
        weights2[warp * k + pos] = w;
    }
    RR_MARK(3);
}

// cp.async (sm_80+; attention_prefill.cu, expert_gemm.cu): 16 bytes global -> shared (address dst),
// bypassing L1, without holding the thread up; `valid` false writes 16 zero bytes and reads nothing.
// Groups of them committed, then waited for.
__device__ __forceinline__ void cp_async16(unsigned dst, const void* src, bool valid = true) {
    unsigned n = valid ? 16u : 0u;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }

// Hopper's warpgroup MMA (wgmma; sm_90a builds, bf16/f16: expert_gemm.cu, attention_prefill.cu).
// Operands in shared memory are described by 64-bit descriptors, kept in 128-byte
// swizzled rows (16-byte chunk c of row r at r * 128 + ((c ^ (r % 8)) * 16) from a 1,024-aligned base).
#if defined(__CUDA_ARCH_FEAT_SM90_ALL) && Q_DTYPE != 0
#if Q_DTYPE == 1
#define WG_AB "bf16"
#else
#define WG_AB "f16"
#endif

// A K-major operand: rows of 64 elements (128 bytes, swizzled), 8-row groups 1,024 bytes apart. Its
// start address steps 32 bytes a k16 step; a descriptor plus (bytes >> 4) is the one bytes further
// (shared addresses stay below 2^18, inside the field).
__device__ __forceinline__ unsigned long long wg_desc(unsigned addr) {
    return (unsigned long long)((addr & 0x3FFFF) >> 4) | (1ull << 16) | ((unsigned long long)(1024 >> 4) << 32) | (1ull << 62);
}

// d[64 × 64] += A[64 × 16] · B[16 × 64], A and B K-major in shared memory.
__device__ __forceinline__ void wg_mma64(float* d, unsigned long long a, unsigned long long b) {
    asm volatile(
        "wgmma.mma_async.sync.aligned.m64n64k16.f32." WG_AB "." WG_AB " "
        "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,"
        "%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, %32, %33, 1, 1, 1, 0, 0;"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "l"(a), "l"(b));
}

// d[64 × 32] += A[64 × 16] · B[16 × 32], as wg_mma64.
__device__ __forceinline__ void wg_mma32(float* d, unsigned long long a, unsigned long long b) {
    asm volatile(
        "wgmma.mma_async.sync.aligned.m64n32k16.f32." WG_AB "." WG_AB " "
        "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15}, %16, %17, 1, 1, 1, 0, 0;"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
        : "l"(a), "l"(b));
}

// Keeps the compiler from moving reads or writes of N accumulators across a wgmma wait.
template <int N>
__device__ __forceinline__ void wg_fence_acc(float* d) {
#pragma unroll
    for (int i = 0; i < N; i++) asm volatile("" : "+f"(d[i])::"memory");
}
#endif
