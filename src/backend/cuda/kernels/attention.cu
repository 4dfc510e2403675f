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
