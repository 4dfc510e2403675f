// attention.cu: the paged KV cache (append) and causal grouped-query attention over it, for
// prefill and decode alike. The cache is [n_blocks, block_size, kv_dim] per layer for K and for V;
// `slots[t]` is row t's flat cache slot (block * block_size + pos % block_size; common.cuh cache_slot).

// grid (ceil(kv_dim/256), T).
extern "C" __global__ void kv_append(act_t* kc, act_t* vc, const act_t* k, const act_t* v,
    const unsigned long long* slots, int kv_dim) {
    grid_dependency();
    int t = blockIdx.y;
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= kv_dim) return;
    size_t dst = (size_t)slots[t] * kv_dim + i, src = (size_t)t * kv_dim + i;
    kc[dst] = k[src];
    vc[dst] = v[src];
}

#define ATT_WARPS 4
#define MAX_HD_PER_LANE 8  // head_dim <= 256

// out[t, h] = softmax(q[t, h] · K[:ctx]ᵀ * scale) · V[:ctx] for query head h over its KV head
// h / (nh/nkv). row_ctx[t]: keys row t sees (itself included); row_table[t]: offset of its
// sequence's block table in `tables`. grid (nh, T), ATT_WARPS warps: each warp runs an online
// softmax over every ATT_WARPS-th key, lanes split head_dim; the warps' states merge at the end.
extern "C" __global__ void __launch_bounds__(ATT_WARPS * 32) attention(act_t* out, const act_t* q,
    const act_t* kc, const act_t* vc, const unsigned* row_ctx, const unsigned* row_table,
    const unsigned* tables, int nh, int nkv, int hd, int block_size, int kv_dim, float scale) {
    grid_dependency();
    __shared__ float qs[MAX_HD_PER_LANE * 32];
    __shared__ float wm[ATT_WARPS], wl[ATT_WARPS];
    __shared__ float wacc[ATT_WARPS][MAX_HD_PER_LANE * 32];
    int h = blockIdx.x, t = blockIdx.y;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int group = nh / nkv;
    size_t kv_off = (size_t)(h / group) * hd;
    const act_t* qh = q + ((size_t)t * nh + h) * hd;
    for (int i = threadIdx.x; i < hd; i += blockDim.x) qs[i] = to_f(qh[i]);
    __syncthreads();
    int ctx = (int)row_ctx[t];
    const unsigned* table = tables + row_table[t];

    float m = -INFINITY, l = 0.f;
    float acc[MAX_HD_PER_LANE];
#pragma unroll
    for (int i = 0; i < MAX_HD_PER_LANE; i++) acc[i] = 0.f;
    for (int j = warp; j < ctx; j += ATT_WARPS) {
        size_t slot = cache_slot(table, j, block_size);
        const act_t* kj = kc + slot * kv_dim + kv_off;
        const act_t* vj = vc + slot * kv_dim + kv_off;
        float dot = 0.f;
#pragma unroll
        for (int i = 0; i < MAX_HD_PER_LANE; i++) {
            int d = lane + 32 * i;
            if (d < hd) dot += qs[d] * to_f(kj[d]);
        }
        float s = warp_sum(dot) * scale;
        float m_new = fmaxf(m, s);
        float corr = expf(m - m_new);  // 0 on the first key (m = -inf)
        float p = expf(s - m_new);
        l = l * corr + p;
#pragma unroll
        for (int i = 0; i < MAX_HD_PER_LANE; i++) {
            int d = lane + 32 * i;
            if (d < hd) acc[i] = acc[i] * corr + p * to_f(vj[d]);
        }
        m = m_new;
    }
    if (lane == 0) { wm[warp] = m; wl[warp] = l; }
#pragma unroll
    for (int i = 0; i < MAX_HD_PER_LANE; i++) {
        int d = lane + 32 * i;
        if (d < hd) wacc[warp][d] = acc[i];
    }
    __syncthreads();
    float mx = -INFINITY;
    for (int w = 0; w < ATT_WARPS; w++) mx = fmaxf(mx, wm[w]);
    float total = 0.f, f[ATT_WARPS];
    for (int w = 0; w < ATT_WARPS; w++) {
        f[w] = wl[w] > 0.f ? expf(wm[w] - mx) : 0.f;  // a warp that saw no key contributes nothing
        total += wl[w] * f[w];
    }
    float inv = 1.f / total;
    act_t* o = out + ((size_t)t * nh + h) * hd;
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        float s = 0.f;
        for (int w = 0; w < ATT_WARPS; w++) s += wacc[w][d] * f[w];
        o[d] = from_f(s * inv);
    }
}

// Decode attention (T <= GEMV_MAX_ROWS rows), grouped and split: block (b, t, s) serves G query
// heads h0 .. h0+G-1 that share KV head kvh (b = kvh * (group / G) + chunk), so each K/V row is read
// once for its whole group, over split s of `splits` (ceil(ctx / splits) keys each, computed here
// from row_ctx so one launch shape serves every context length). Warp w takes keys lo + 4w ..
// (AD_KB at a time, all their K and V loads issued before the first use), lane j holds head dims
// j*ND .. j*ND+ND-1 (hd = 32 ND) with its q values in registers; online softmax per (warp, head); the
// warps merge in shared memory. splits == 1: writes out; launched with the splits as one cluster
// (splits <= AD_MAX_CLUSTER), the blocks merge the splits through distributed shared memory and write
// out; else the unnormalised partial state ml [T, nh, splits, 2] = (max, sum of exp), acc [T, nh,
// splits, hd] for `attention_combine` (a split with no keys writes l = 0). grid (nkv * group / G, T,
// splits), NW warps: AD_WARPS, 4 for G = 8 (its warp states would pass 48 KB of shared memory). The
// host takes the block size from the kernel's launch bounds.
#ifndef AD_WARPS  // tunable: QWEN3RS_CUDA_DEFINES (compile.rs)
#define AD_WARPS 4
#endif
// Least blocks an SM the decode kernels are compiled for (__launch_bounds__). Fewer registers let a
// block start beside the q/k/v product ahead of it (62 registers × 256 threads, 4 blocks: the whole
// register file) and leave room for the o projection's blocks behind it (RESULTS.md session 16's
// leads). Unset: 2 for the pushed exchange's kernels (XCH 2), ptxas's own choice for the others. Left to
// ptxas, attention_decode_rope_push_g2_d128 (Qwen3-30B-A3B's) took 128 registers and spilled 4 bytes,
// reloaded after a cluster barrier's L1 invalidate on the way to the merge: an L2 round trip that
// waited behind the o projection's early loads on the SM (~0.9 µs a layer). At 2: 143 registers, no
// spill, 30B-A3B decode 1.012× (RESULTS.md runs 40.5, 40.6). 2 would cost 0.6B's
// attention_decode_rope_g2_d128 (128 registers, no spill; 139 at 2) 0.7 %.
#ifdef AD_MIN_BLOCKS  // tunable: QWEN3RS_CUDA_DEFINES (compile.rs)
#define AD_BOUNDS(NW, XCH) __launch_bounds__((NW) * 32, AD_MIN_BLOCKS)
#else
#define AD_BOUNDS(NW, XCH) AD_BOUNDS_##XCH(NW)
#define AD_BOUNDS_1(NW) __launch_bounds__((NW) * 32)
#define AD_BOUNDS_2(NW) __launch_bounds__((NW) * 32, 2)
#endif
#define AD_MAX_CLUSTER 16  // most splits merged in a cluster (mod.rs MAX_ATTN_CLUSTER)
// Profiling only: 1 drops the release/acquire ordering of the barrier before the splits' merge, so the
// merge may read stale states (wrong results, right timing), 2 that of the last barrier too (relaxed
// already with AD_STORES 2): what that ordering costs while the o projection's early loads fill the
// SMs' memory queues (RESULTS.md run 35.1).
#ifndef AD_BARRIER_RELAXED  // tunable: QWEN3RS_CUDA_DEFINES (compile.rs)
#define AD_BARRIER_RELAXED 0
#endif
// How the clustered splits exchange their states (XCH, a template parameter; RESULTS.md runs 35.8,
// 37.4): 1 each block reads the others' shared memory after a cluster barrier, whose release is a
// GPU-wide MEMBAR; 2 (the `_push` kernels) each block pushes its states into the merging blocks' shared
// memory with st.async, counted there by an mbarrier's bytes (no release). The host takes 2 for models
// with MoE layers (30B-A3B +1.0-2.0 % in four calls), 1 for the others (0.6B 0.97, 8B and 32B 1.00).
// Where the clustered decode attention's K/V append goes (RESULTS.md run 35). A cluster barrier's release
// is a GPU-wide MEMBAR (SASS), slow while the o projection's early loads fill the memory system (2.2 µs),
// and longer for a thread with global stores of its own outstanding. 1: main's order before run 35 (the
// append before the key loop, both barriers releases); 2: the append after the first barrier, and the
// last barrier relaxed (it only keeps blocks from leaving while others read their shared memory).
#ifndef AD_STORES  // tunable: QWEN3RS_CUDA_DEFINES (compile.rs)
#define AD_STORES 2
#endif
#ifndef AD_KB  // tunable: QWEN3RS_CUDA_DEFINES (compile.rs)
#define AD_KB 4
#endif

// What the decode kernel needs to do qk_norm_rope_append's work itself (the _rope kernels): the raw
// k and v rows [T, nkv*HD] of this step, the norm weights, the f32 RoPE table and row t's position.
struct RopeIn {
    const act_t* k;
    const act_t* v;
    const act_t* q_norm;
    const act_t* k_norm;
    const float* rope;
    const unsigned* positions;
    float eps;
};

// The cluster merge of the splits' states: AD_MERGE_STEP (1, 2, 4, 8, 16) states a step of two rolled
// loops over the splits there are (max, then the sums: merge_states' sums in its order). Unrolled over
// AD_MAX_CLUSTER (16) states predicated on r < splits instead, the merge was ~6 KB of SASS with sixteen
// expf, the only code the merging blocks run after their mbarrier: 2 µs of them on Qwen3-30B-A3B (run
// 41.2); a step of 4 made 30B-A3B 1.008 and 0.6B 1.009 faster (run 42.1). A step of 1 serialises the
// loads (XCH 1 reads them from the other blocks): 0.6B 0.957.
#ifndef AD_MERGE_STEP  // tunable: QWEN3RS_CUDA_DEFINES (compile.rs)
#define AD_MERGE_STEP 4
#endif

// Online-softmax states s < N (running max m[s], sum of exponentials l[s], accumulator element a[s])
// merged: mx = the max over the states that saw a key (l > 0: the others contribute nothing), total =
// Σ l·e^(m − mx), returned Σ a·e^(m − mx). The decode attention's merge of its warps; its cluster merge
// of the splits (rolled, AD_MERGE_STEP) and attention_combine (a warp across the splits) do the same sums.
template <int N>
__device__ __forceinline__ float merge_states(const float (&m)[N], const float (&l)[N], const float (&a)[N], float& mx, float& total) {
    mx = -INFINITY;
#pragma unroll
    for (int s = 0; s < N; s++) if (l[s] > 0.f) mx = fmaxf(mx, m[s]);
    total = 0.f;
    float acc = 0.f;
#pragma unroll
    for (int s = 0; s < N; s++) {
        if (l[s] > 0.f) {
            float f = expf(m[s] - mx);
            total += l[s] * f;
            acc += a[s] * f;
        }
    }
    return acc;
}

template <int G, int ND, bool ROPE, int NW, int XCH>
__device__ __forceinline__ void attention_decode_impl(act_t* out, float* part_ml, float* part_acc, const act_t* q,
    act_t* kc, act_t* vc, const unsigned* row_ctx, const unsigned* row_table, const unsigned* tables,
    int nh, int nkv, int block_size, int kv_dim, float scale, RopeIn r) {
    // Without ROPE the step's keys were appended by the kernel ahead (qk_norm_rope_append): wait first.
    if (!ROPE) grid_dependency();
    constexpr int HD = 32 * ND;
    __shared__ float wm[NW][G], wl[NW][G];
    __shared__ float wacc[NW][G][HD];
    __shared__ float cm[G], cl[G];  // clustered: this split's max and sum of exp a head
    int group = nh / nkv, chunks = group / G;
    int kvh = blockIdx.x / chunks, h0 = kvh * group + (blockIdx.x % chunks) * G;
    int t = blockIdx.y, s = blockIdx.z, splits = gridDim.z;
    // All the splits in one cluster (launched so by the host): they merge through shared memory and
    // write out; else they leave their partial states to attention_combine.
    const bool clustered = splits > 1 && splits <= AD_MAX_CLUSTER && cluster_blocks() == (unsigned)splits;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    // With ROPE, what comes before grid_dependency() below is nothing the kernel ahead writes: the
    // row's context length, page table and position (host metadata, uploaded before the step's first
    // kernel), the RoPE table (a weight) and the cached keys before the step's own (written by earlier
    // steps; the step's own key, `last`, comes from registers). So the warp's first AD_KB keys are in
    // registers when q arrives, and only the q/k/v loads wait for the q/k/v products.
    int ctx = (int)row_ctx[t];
    int per = (ctx + splits - 1) / splits;
    int lo = s * per, hi = min(ctx, lo + per);
    const unsigned* table = tables + row_table[t];
    size_t kv_off = (size_t)kvh * HD + lane * ND;
    const int last = ctx - 1;
    // A warp's keys come in batches of AD_KB, software-pipelined: while a batch is computed, the next
    // batch's K / V loads are in flight (kept as loaded, `kr` / `vr`, converted when their turn comes)
    // and the page-table lookups of the batch after it (`at`). A long split is then paced by its loads,
    // not by load, compute, load, ... in series.
    // The lane's offsets of keys j0 .. j0 + AD_KB - 1 in the cache: -1 past the split and, with ROPE,
    // for `last` (the caller fills it in from registers).
    auto offsets = [&](long long (&at)[AD_KB], int j0) {
#pragma unroll
        for (int b = 0; b < AD_KB; b++) {
            int j = j0 + b;
            at[b] = j < hi && !(ROPE && j == last) ? (long long)(cache_slot(table, j, block_size) * kv_dim + kv_off) : -1;
        }
    };
    RawND<ND> kr[AD_KB], vr[AD_KB];
    auto issue = [&](const long long (&at)[AD_KB]) {
#pragma unroll
        for (int b = 0; b < AD_KB; b++) {
            kr[b] = at[b] >= 0 ? load_raw<ND>(kc + at[b]) : RawND<ND>{};
            vr[b] = at[b] >= 0 ? load_raw<ND>(vc + at[b]) : RawND<ND>{};
        }
    };
    const int first = lo + warp * AD_KB, stride = NW * AD_KB;
    long long at[AD_KB];
    offsets(at, first);
    issue(at);
    offsets(at, first + stride);
    // XCH 2: block s merges chunks c = s, s + splits, ... of CH outputs of the group's G * HD,
    // receiving from every split its accumulators there (rx_a[split][c / splits][CH]) and its max and sum
    // of each head that starts in the chunk or spans its start (rx_ml[split][g]). The mbarrier counts
    // those bytes; it is set before any block of the cluster may push (the cluster barrier's arrive
    // here, its wait before the pushes).
    constexpr int CH = NW * 32, N_CHUNKS = (G * HD + CH - 1) / CH;
    const int mine = (N_CHUNKS + splits - 1) / splits;  // chunks a block merges, at most
    __shared__ alignas(8) unsigned long long xbar;
    __shared__ float rx_a[XCH == 2 ? (AD_MAX_CLUSTER + N_CHUNKS) * CH : 1];  // splits * mine <= N_CHUNKS + splits - 1
    __shared__ float2 rx_ml[XCH == 2 ? AD_MAX_CLUSTER : 1][G];
    if (XCH == 2 && clustered) {
        if (threadIdx.x == 0) {
            unsigned bytes = 0;
            for (int c = s; c < N_CHUNKS; c += splits) {
                const int b = c * CH, e = min(G * HD, b + CH);
                bytes += (e - b) * 4 + (b % HD != 0) * 8;
                for (int g = 0; g < G; g++) bytes += (g * HD >= b && g * HD < e) * 8;
            }
            mbar_expect_bytes(smem_addr(&xbar), bytes * splits);
        }
        cluster_arrive_relaxed();
    }
    // The QK-norm weights and the row's RoPE cos / sin too.
    NormRope<ND> qnr, knr;
    if (ROPE) {
        const float* cs = r.rope + (size_t)r.positions[t] * HD;
        qnr = load_norm_rope<ND>(r.q_norm, cs);
        knr = load_norm_rope<ND>(r.k_norm, cs);
        grid_dependency();
    }

    float qr[G][ND];
#pragma unroll
    for (int g = 0; g < G; g++) load_nd<ND>(q + ((size_t)t * nh + h0 + g) * HD + lane * ND, qr[g]);
    // _rope: q gets its QK-norm and RoPE here; the step's own key (the last, ctx - 1, one row per
    // sequence) comes from registers, normed and rotated by every warp of the block whose split holds
    // it, and that block's first chunk also writes it and its value to the cache for later steps
    // (no other block reads that slot in this launch).
    float k_new[ND], v_new[ND];
    if (ROPE) {
#pragma unroll
        for (int g = 0; g < G; g++) norm_rope_head<ND>(qr[g], qnr, r.eps);
        TL_MARK(0, qr[0][0]);
        if (last >= lo && last < hi) {
            size_t src = ((size_t)t * nkv + kvh) * HD + lane * ND;
            load_nd<ND>(r.k + src, k_new);
            load_nd<ND>(r.v + src, v_new);
            norm_rope_head<ND>(k_new, knr, r.eps);
        }
    }
    // The append of the step's key and value (AD_STORES).
    auto append = [&]() {
        if (ROPE && last >= lo && last < hi && warp == 0 && blockIdx.x % chunks == 0) {
            size_t at = cache_slot(table, last, block_size) * kv_dim + kv_off;
            store_nd<ND>(kc + at, k_new);
            store_nd<ND>(vc + at, v_new);
        }
    };
    if (AD_STORES == 1 || !clustered) append();

    // Online softmax a batch of AD_KB keys at a time: the AD_KB score sums run side by side (their
    // shuffles interleave) and the running max, sum and accumulator are rescaled once a batch.
    float m[G], l[G], acc[G][ND];
#pragma unroll
    for (int g = 0; g < G; g++) {
        m[g] = -INFINITY;
        l[g] = 0.f;
#pragma unroll
        for (int i = 0; i < ND; i++) acc[g][i] = 0.f;
    }
    for (int j0 = first; j0 < hi; j0 += stride) {
        float kf[AD_KB][ND], vf[AD_KB][ND];
#pragma unroll
        for (int b = 0; b < AD_KB; b++) {
            unpack_raw(kr[b], kf[b]);
            unpack_raw(vr[b], vf[b]);
        }
        if (j0 + stride < hi) {
            issue(at);
            offsets(at, j0 + 2 * stride);
        }
        // Only the split holding `last` has k_new / v_new. Another split's last batch may reach past its
        // keys to `last` (129 keys in 16 splits of 9: split 13's batch at key 125 spans 125-128), where
        // p = 0 would still multiply an uninitialised v_new: NaN for some bits (RESULTS.md run 39.3).
        if (ROPE && last >= lo && last < hi && last >= j0 && last < j0 + AD_KB) {
#pragma unroll
            for (int b = 0; b < AD_KB; b++) {
                if (j0 + b == last) {
#pragma unroll
                    for (int i = 0; i < ND; i++) { kf[b][i] = k_new[i]; vf[b][i] = v_new[i]; }
                }
            }
        }
#pragma unroll
        for (int g = 0; g < G; g++) {
            float sc[AD_KB];
#pragma unroll
            for (int b = 0; b < AD_KB; b++) {
                float dot = 0.f;
#pragma unroll
                for (int i = 0; i < ND; i++) dot += qr[g][i] * kf[b][i];
                sc[b] = dot;
            }
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) {
#pragma unroll
                for (int b = 0; b < AD_KB; b++) sc[b] += __shfl_xor_sync(0xffffffffu, sc[b], o);
            }
            float m_new = m[g];
#pragma unroll
            for (int b = 0; b < AD_KB; b++) {
                sc[b] = j0 + b < hi ? sc[b] * scale : -INFINITY;
                m_new = fmaxf(m_new, sc[b]);  // finite: key j0 < hi
            }
            float corr = expf(m[g] - m_new);  // 0 on the first batch (m = -inf)
            float p[AD_KB], psum = 0.f;
#pragma unroll
            for (int b = 0; b < AD_KB; b++) {
                p[b] = expf(sc[b] - m_new);  // 0 past the split
                psum += p[b];
            }
            l[g] = l[g] * corr + psum;
#pragma unroll
            for (int i = 0; i < ND; i++) {
                float a = acc[g][i] * corr;
#pragma unroll
                for (int b = 0; b < AD_KB; b++) a += p[b] * vf[b][i];
                acc[g][i] = a;
            }
            m[g] = m_new;
        }
    }
    TL_MARK(1, acc[0][0] + l[0]);
#pragma unroll
    for (int g = 0; g < G; g++) {
        if (lane == 0) { wm[warp][g] = m[g]; wl[warp][g] = l[g]; }
#pragma unroll
        for (int i = 0; i < ND; i++) wacc[warp][g][lane * ND + i] = acc[g][i];
    }
    __syncthreads();
    if (XCH == 2 && clustered) cluster_wait();  // every block's mbarrier is set
    for (int i = threadIdx.x; i < G * HD; i += blockDim.x) {
        int g = i / HD, d = i % HD;
        float mw[NW], lw[NW], aw[NW], mx, total;
#pragma unroll
        for (int w = 0; w < NW; w++) {
            mw[w] = wm[w][g];
            lw[w] = wl[w][g];
            aw[w] = wacc[w][g][d];
        }
        const float a = merge_states(mw, lw, aw, mx, total);
        size_t row = (size_t)t * nh + h0 + g;
        if (splits == 1) {
            out[row * HD + d] = from_f(a / total);
        } else if (clustered && XCH == 2) {
            const int c = i / CH, to = c % splits;
            const unsigned bar = cluster_map(smem_addr(&xbar), to);
            st_async(cluster_map(smem_addr(&rx_a[(s * mine + c / splits) * CH + i % CH]), to), a, bar);
            if (d == 0 || i % CH == 0) st_async(cluster_map(smem_addr(&rx_ml[s][g]), to), mx, total, bar);
        } else if (clustered) {
            if (d == 0) { cm[g] = mx; cl[g] = total; }
            wacc[0][g][d] = a;  // (g, d) is this thread's alone
        } else {
            size_t idx = row * splits + s;
            if (d == 0) { part_ml[idx * 2] = mx; part_ml[idx * 2 + 1] = total; }
            part_acc[idx * HD + d] = a;
        }
    }
    TL_MARK(2, wm[0][0]);
    if (!clustered) return;
    // The splits' merge, attention_combine's sums: block s of the cluster (its rank: the cluster spans
    // z) takes outputs s * CH .. of the group's G * HD, reading every split's state from its block's
    // shared memory (XCH 2: from its own, where the splits pushed them).
    if (XCH == 2) mbar_wait_first(smem_addr(&xbar));
    else if (AD_BARRIER_RELAXED) cluster_sync_relaxed();
    else cluster_sync();
    TL_MARK(3, 0.f);
    if (AD_STORES == 2) append();
    for (int i = s * CH + threadIdx.x, k = 0; i < G * HD; i += splits * CH, k++) {
        int g = i / HD, d = i % HD;
        // Split r's state (r < splits): from this block's shared memory (XCH 2) or from block r's.
        auto state = [&](int r, float& m, float& l, float& acc) {
            if (XCH == 2) {
                const float2 ml = rx_ml[r][g];
                m = ml.x;
                l = ml.y;
                acc = rx_a[(r * mine + k) * CH + threadIdx.x];
            } else {
                m = *cluster_ptr(&cm[g], r);
                l = *cluster_ptr(&cl[g], r);
                acc = *cluster_ptr(&wacc[0][g][d], r);
            }
        };
        float mx = -INFINITY, total = 0.f, a = 0.f;
#pragma unroll 1
        for (int r0 = 0; r0 < splits; r0 += AD_MERGE_STEP) {
#pragma unroll
            for (int j = 0; j < AD_MERGE_STEP; j++) {
                float m = 0.f, l = 0.f, acc;
                if (r0 + j < splits) state(r0 + j, m, l, acc);  // (acc unused: its load left out)
                if (l > 0.f) mx = fmaxf(mx, m);
            }
        }
#pragma unroll 1
        for (int r0 = 0; r0 < splits; r0 += AD_MERGE_STEP) {  // merge_states' sums, in its order
#pragma unroll
            for (int j = 0; j < AD_MERGE_STEP; j++) {
                float m = 0.f, l = 0.f, acc = 0.f;
                if (r0 + j < splits) state(r0 + j, m, l, acc);
                if (l > 0.f) {
                    const float f = expf(m - mx);
                    total += l * f;
                    a += acc * f;
                }
            }
        }
        out[((size_t)t * nh + h0 + g) * HD + d] = from_f(a / total);
    }
    // No block leaves while the others still read its shared memory. With AD_STORES 2 without a
    // release (no MEMBAR): every value read from another block went into a store issued before it.
    if (AD_BARRIER_RELAXED == 2 || AD_STORES == 2) cluster_sync_relaxed();
    else cluster_sync();
}

// attention_decode_g<G>_d<HD>: the step's keys already in the cache; attention_decode_rope_g<G>_d<HD>:
// q and the step's k raw from the q/k/v products (RopeIn), qk_norm_rope_append done here;
// attention_decode_rope_push_g<G>_d<HD>: the same with the pushed exchange (XCH 2).
#define AD_NW(G) ((G) == 8 ? 4 : AD_WARPS)  // warps a block of the G-heads kernels
#define AD_ROPE_KERNEL(NAME, G, HD, XCH) \
    extern "C" __global__ void AD_BOUNDS(AD_NW(G), XCH) NAME(act_t* out, float* part_ml, float* part_acc, const act_t* q, \
        act_t* kc, act_t* vc, const unsigned* row_ctx, const unsigned* row_table, const unsigned* tables, int nh, int nkv, \
        int block_size, int kv_dim, float scale, const act_t* k, const act_t* v, const act_t* q_norm, const act_t* k_norm, \
        const float* rope, const unsigned* positions, float eps) { \
        TIMELINE(#NAME); attention_decode_impl<G, HD / 32, true, AD_NW(G), XCH>(out, part_ml, part_acc, q, kc, vc, row_ctx, \
            row_table, tables, nh, nkv, block_size, kv_dim, scale, RopeIn{k, v, q_norm, k_norm, rope, positions, eps}); }
#define AD_KERNEL(G, HD) \
    extern "C" __global__ void AD_BOUNDS(AD_NW(G), 1) attention_decode_g##G##_d##HD(act_t* out, float* part_ml, \
        float* part_acc, const act_t* q, act_t* kc, act_t* vc, const unsigned* row_ctx, const unsigned* row_table, \
        const unsigned* tables, int nh, int nkv, int block_size, int kv_dim, float scale) { \
        TIMELINE("attention_decode_g" #G "_d" #HD); attention_decode_impl<G, HD / 32, false, AD_NW(G), 1>(out, part_ml, part_acc, q, kc, vc, row_ctx, row_table, tables, nh, nkv, \
            block_size, kv_dim, scale, RopeIn{}); } \
    AD_ROPE_KERNEL(attention_decode_rope_g##G##_d##HD, G, HD, 1) \
    AD_ROPE_KERNEL(attention_decode_rope_push_g##G##_d##HD, G, HD, 2)
AD_KERNEL(1, 64) AD_KERNEL(2, 64) AD_KERNEL(4, 64) AD_KERNEL(8, 64)
AD_KERNEL(1, 128) AD_KERNEL(2, 128) AD_KERNEL(4, 128) AD_KERNEL(8, 128)

// out[t, h] = Σ_s acc_s · e^(m_s − M) / Σ_s l_s · e^(m_s − M) over the splits that saw keys.
// grid (nh, T), 128 threads; splits <= AD_MAX_SPLITS.
#define AD_MAX_SPLITS 128
extern "C" __global__ void __launch_bounds__(128) attention_combine(act_t* out, const float* part_ml, const float* part_acc,
    int nh, int hd, int splits) {
    grid_dependency();
    __shared__ float wsplit[AD_MAX_SPLITS];
    __shared__ float total_sh;
    int h = blockIdx.x, t = blockIdx.y;
    size_t base = ((size_t)t * nh + h) * splits;
    if (threadIdx.x < 32) {  // warp 0: the max, the split weights e^(m_s - M) and their sum
        float mx = -INFINITY;
        for (int s = threadIdx.x; s < splits; s += 32)
            if (part_ml[(base + s) * 2 + 1] > 0.f) mx = fmaxf(mx, part_ml[(base + s) * 2]);
        mx = warp_max(mx);
        float total = 0.f;
        for (int s = threadIdx.x; s < splits; s += 32) {
            float l = part_ml[(base + s) * 2 + 1];
            float w = l > 0.f ? expf(part_ml[(base + s) * 2] - mx) : 0.f;
            wsplit[s] = w;
            total += l * w;
        }
        total = warp_sum(total);
        if (threadIdx.x == 0) total_sh = total;
    }
    __syncthreads();
    float inv = 1.f / total_sh;
    act_t* o = out + ((size_t)t * nh + h) * hd;
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        float a = 0.f;
#pragma unroll 8
        for (int s = 0; s < splits; s++) a += part_acc[(base + s) * hd + d] * wsplit[s];
        o[d] = from_f(a * inv);
    }
}

// Tiled causal attention for prefill (no per-row walk over the whole context): block (h, tile)
// takes FA_BQ consecutive rows of one sequence (tiles[2*i] = first row, tiles[2*i+1] = rows) and
// streams that sequence's keys through shared memory FA_BK at a time, so each K/V row is read
// once per tile of queries instead of once per query. Warp w owns rows w*FA_RPW ..; lane j owns
// key j of the K tile for Q·Kᵀ (rows padded by one 32-bit word: no bank conflicts) and output
// dims lane + 32 i for P·V. Online softmax per row as in `attention`; row r sees keys < row_ctx.
// grid (nh, n_tiles), FA_WARPS warps, dynamic shared memory (FA_BQ + 2 FA_BK) * srow act_t.
#define FA_BQ 64
#define FA_BK 32
#define FA_WARPS 8
#define FA_RPW (FA_BQ / FA_WARPS)
template <int ND>  // output dims per lane: hd <= 32 * ND
__device__ __forceinline__ void attention_tiled_impl(act_t* out, const act_t* q,
    const act_t* kc, const act_t* vc, const unsigned* row_ctx, const unsigned* row_table, const unsigned* tables,
    const int* tiles, int nh, int nkv, int hd, int block_size, int kv_dim, float scale) {
    extern __shared__ __align__(16) unsigned char fa_smem[];
    const int srow = hd + (sizeof(act_t) == 4 ? 1 : 2);
    act_t* qs = reinterpret_cast<act_t*>(fa_smem);
    act_t* ks = qs + FA_BQ * srow;
    act_t* vs = ks + FA_BK * srow;
    int h = blockIdx.x;
    int row0 = tiles[2 * blockIdx.y], nrows = tiles[2 * blockIdx.y + 1];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    size_t kv_off = (size_t)(h / (nh / nkv)) * hd;
    for (int i = threadIdx.x; i < FA_BQ * hd; i += blockDim.x) {
        int r = i / hd, d = i % hd;
        qs[r * srow + d] = r < nrows ? q[((size_t)(row0 + r) * nh + h) * hd + d] : from_f(0.f);
    }
    const unsigned* table = tables + row_table[row0];
    int ctx_last = (int)row_ctx[row0 + nrows - 1];  // rows are consecutive positions: the last sees most
    int my0 = warp * FA_RPW;
    int ctx_r[FA_RPW];
    int warp_ctx = 0;
#pragma unroll
    for (int r = 0; r < FA_RPW; r++) {
        ctx_r[r] = my0 + r < nrows ? (int)row_ctx[row0 + my0 + r] : 0;
        warp_ctx = max(warp_ctx, ctx_r[r]);
    }
    float m[FA_RPW], l[FA_RPW], acc[FA_RPW][ND];
#pragma unroll
    for (int r = 0; r < FA_RPW; r++) {
        m[r] = -INFINITY;
        l[r] = 0.f;
#pragma unroll
        for (int i = 0; i < ND; i++) acc[r][i] = 0.f;
    }
    for (int k0 = 0; k0 < ctx_last; k0 += FA_BK) {
        __syncthreads();  // the previous tile's K/V (and, first time, Q) are done with / written
        for (int i = threadIdx.x; i < FA_BK * hd; i += blockDim.x) {
            int j = i / hd, d = i % hd, key = k0 + j;
            act_t kv = from_f(0.f), vv = from_f(0.f);
            if (key < ctx_last) {
                size_t slot = cache_slot(table, key, block_size);
                kv = kc[slot * kv_dim + kv_off + d];
                vv = vc[slot * kv_dim + kv_off + d];
            }
            ks[j * srow + d] = kv;
            vs[j * srow + d] = vv;
        }
        __syncthreads();
        if (k0 >= warp_ctx) continue;  // none of this warp's rows sees these keys (warp-uniform)
        float s[FA_RPW];
#pragma unroll
        for (int r = 0; r < FA_RPW; r++) s[r] = 0.f;
        const act_t* kr = ks + lane * srow;
#pragma unroll 4
        for (int d = 0; d < hd; d++) {
            float kd = to_f(kr[d]);
#pragma unroll
            for (int r = 0; r < FA_RPW; r++) s[r] += to_f(qs[(my0 + r) * srow + d]) * kd;
        }
        int key = k0 + lane;
#pragma unroll
        for (int r = 0; r < FA_RPW; r++) {
            float sc = key < ctx_r[r] ? s[r] * scale : -INFINITY;
            float m_new = fmaxf(m[r], warp_max(sc));
            if (m_new == -INFINITY) { s[r] = 0.f; continue; }  // the row has no key yet (warp-uniform)
            float corr = expf(m[r] - m_new);  // 0 on the row's first keys (m = -inf)
            float p = expf(sc - m_new);
            l[r] = l[r] * corr + warp_sum(p);
            m[r] = m_new;
#pragma unroll
            for (int i = 0; i < ND; i++) acc[r][i] *= corr;
            s[r] = p;
        }
        for (int j = 0; j < FA_BK; j++) {
            float vj[ND];
#pragma unroll
            for (int i = 0; i < ND; i++) {
                int d = lane + 32 * i;
                vj[i] = d < hd ? to_f(vs[j * srow + d]) : 0.f;
            }
#pragma unroll
            for (int r = 0; r < FA_RPW; r++) {
                float pj = __shfl_sync(0xffffffffu, s[r], j);
#pragma unroll
                for (int i = 0; i < ND; i++) acc[r][i] += pj * vj[i];
            }
        }
    }
#pragma unroll
    for (int r = 0; r < FA_RPW; r++) {
        int row = my0 + r;
        if (row >= nrows) continue;
        float inv = 1.f / l[r];
        act_t* o = out + ((size_t)(row0 + row) * nh + h) * hd;
#pragma unroll
        for (int i = 0; i < ND; i++) {
            int d = lane + 32 * i;
            if (d < hd) o[d] = from_f(acc[r][i] * inv);
        }
    }
}

#define FA_ARGS act_t* out, const act_t* q, const act_t* kc, const act_t* vc, const unsigned* row_ctx, \
    const unsigned* row_table, const unsigned* tables, const int* tiles, int nh, int nkv, int hd, int block_size, int kv_dim, float scale
#define FA_PASS out, q, kc, vc, row_ctx, row_table, tables, tiles, nh, nkv, hd, block_size, kv_dim, scale
// head_dim <= 128 (every Qwen3) and <= 256.
extern "C" __global__ void __launch_bounds__(FA_WARPS * 32) attention_tiled_128(FA_ARGS) { grid_dependency(); attention_tiled_impl<4>(FA_PASS); }
extern "C" __global__ void __launch_bounds__(FA_WARPS * 32) attention_tiled_256(FA_ARGS) { grid_dependency(); attention_tiled_impl<8>(FA_PASS); }
