// attention.cu: the paged KV cache (append) and causal grouped-query attention over it, for
// prefill and decode alike. The cache is [n_blocks, block_size, kv_dim] per layer for K and for V;
// `slots[t]` is row t's flat cache slot (block * block_size + pos % block_size).

// grid (ceil(kv_dim/256), T).
extern "C" __global__ void kv_append(act_t* kc, act_t* vc, const act_t* k, const act_t* v,
    const unsigned long long* slots, int kv_dim) {
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
        size_t slot = (size_t)table[j / block_size] * block_size + (j % block_size);
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

// Split-KV decode attention (few rows, long contexts): block (h, t, s) runs the same online softmax
// as `attention` over its share of row t's keys — split s of `splits`, ceil(ctx / splits) keys each,
// the share computed here from row_ctx so one launch shape serves every context length — and
// writes the unnormalised partial state: ml [T, nh, splits, 2] = (max, sum of exp), acc [T, nh,
// splits, hd]. `attention_combine` merges the splits. A split with no keys writes l = 0.
// grid (nh, T, splits), ATT_WARPS warps.
extern "C" __global__ void __launch_bounds__(ATT_WARPS * 32) attention_split(float* part_ml, float* part_acc,
    const act_t* q, const act_t* kc, const act_t* vc, const unsigned* row_ctx, const unsigned* row_table,
    const unsigned* tables, int nh, int nkv, int hd, int block_size, int kv_dim, float scale) {
    __shared__ float qs[MAX_HD_PER_LANE * 32];
    __shared__ float wm[ATT_WARPS], wl[ATT_WARPS];
    __shared__ float wacc[ATT_WARPS][MAX_HD_PER_LANE * 32];
    int h = blockIdx.x, t = blockIdx.y, s = blockIdx.z, splits = gridDim.z;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int group = nh / nkv;
    size_t kv_off = (size_t)(h / group) * hd;
    const act_t* qh = q + ((size_t)t * nh + h) * hd;
    for (int i = threadIdx.x; i < hd; i += blockDim.x) qs[i] = to_f(qh[i]);
    __syncthreads();
    int ctx = (int)row_ctx[t];
    int per = (ctx + splits - 1) / splits;
    int lo = s * per, hi = min(ctx, lo + per);
    const unsigned* table = tables + row_table[t];

    float m = -INFINITY, l = 0.f;
    float acc[MAX_HD_PER_LANE];
#pragma unroll
    for (int i = 0; i < MAX_HD_PER_LANE; i++) acc[i] = 0.f;
    for (int j = lo + warp; j < hi; j += ATT_WARPS) {
        size_t slot = (size_t)table[j / block_size] * block_size + (j % block_size);
        const act_t* kj = kc + slot * kv_dim + kv_off;
        const act_t* vj = vc + slot * kv_dim + kv_off;
        float dot = 0.f;
#pragma unroll
        for (int i = 0; i < MAX_HD_PER_LANE; i++) {
            int d = lane + 32 * i;
            if (d < hd) dot += qs[d] * to_f(kj[d]);
        }
        float sc = warp_sum(dot) * scale;
        float m_new = fmaxf(m, sc);
        float corr = expf(m - m_new);
        float p = expf(sc - m_new);
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
    for (int w = 0; w < ATT_WARPS; w++) if (wl[w] > 0.f) mx = fmaxf(mx, wm[w]);
    float total = 0.f, f[ATT_WARPS];
    for (int w = 0; w < ATT_WARPS; w++) {
        f[w] = wl[w] > 0.f ? expf(wm[w] - mx) : 0.f;
        total += wl[w] * f[w];
    }
    size_t idx = ((size_t)t * nh + h) * splits + s;
    if (threadIdx.x == 0) { part_ml[idx * 2] = mx; part_ml[idx * 2 + 1] = total; }
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        float a = 0.f;
        for (int w = 0; w < ATT_WARPS; w++) a += wacc[w][d] * f[w];
        part_acc[idx * hd + d] = a;
    }
}

// out[t, h] = Σ_s acc_s · e^(m_s − M) / Σ_s l_s · e^(m_s − M) over the splits that saw keys.
// grid (nh, T), 128 threads.
extern "C" __global__ void attention_combine(act_t* out, const float* part_ml, const float* part_acc, int nh, int hd, int splits) {
    int h = blockIdx.x, t = blockIdx.y;
    size_t base = ((size_t)t * nh + h) * splits;
    float mx = -INFINITY;
    for (int s = 0; s < splits; s++) if (part_ml[(base + s) * 2 + 1] > 0.f) mx = fmaxf(mx, part_ml[(base + s) * 2]);
    float total = 0.f;
    for (int s = 0; s < splits; s++) {
        float l = part_ml[(base + s) * 2 + 1];
        if (l > 0.f) total += l * expf(part_ml[(base + s) * 2] - mx);
    }
    float inv = 1.f / total;
    act_t* o = out + ((size_t)t * nh + h) * hd;
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        float a = 0.f;
        for (int s = 0; s < splits; s++) {
            float l = part_ml[(base + s) * 2 + 1];
            if (l > 0.f) a += part_acc[(base + s) * hd + d] * expf(part_ml[(base + s) * 2] - mx);
        }
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
                size_t slot = (size_t)table[key / block_size] * block_size + (key % block_size);
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
extern "C" __global__ void __launch_bounds__(FA_WARPS * 32) attention_tiled_128(FA_ARGS) { attention_tiled_impl<4>(FA_PASS); }
extern "C" __global__ void __launch_bounds__(FA_WARPS * 32) attention_tiled_256(FA_ARGS) { attention_tiled_impl<8>(FA_PASS); }
