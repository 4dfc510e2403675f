// norm.cu: RMSNorm after the residual add (with no delta: plain RMSNorm) and per-head QK-norm + RoPE.

// x_out = round(x + delta) (x alone when delta is null); out = rms_norm(x_out) * w. Each thread
// re-reads only the x_out elements it wrote itself, so no barrier is needed between the two passes.
// x_out never aliases x, delta or out (the model passes distinct buffers), which lets the loads of
// several iterations be in flight. One block of 1,024 threads per row (a decode step has one row:
// the more loads in flight, the sooner it's done). (A decode step fuses this into the products that read `out`:
// stage_input in matmul.cu.)
extern "C" __global__ void add_rms_norm(act_t* __restrict__ x_out, const act_t* __restrict__ x, const act_t* __restrict__ delta,
    act_t* __restrict__ out, const act_t* __restrict__ w, int cols, float eps) {
    grid_dependency();
    size_t row = (size_t)blockIdx.x * cols;
    act_t* r = x_out + row;
    act_t* o = out + row;
    float ss = 0.f;
#pragma unroll 4
    for (int i = threadIdx.x; i < cols; i += blockDim.x) {
        act_t s = delta ? from_f(to_f(x[row + i]) + to_f(delta[row + i])) : x[row + i];
        r[i] = s;
        float v = to_f(s);
        ss += v * v;
    }
    float inv = 1.f / sqrtf(block_sum(ss) / (float)cols + eps);
    for (int i = threadIdx.x; i < cols; i += blockDim.x) o[i] = from_f(to_f(w[i]) * (to_f(r[i]) * inv));
}

// add_rms_norm for rows of cols % VEC == 0, cols <= NORM_VEC_THREADS * VEC * NORM_VEC_MAX: 16-byte
// accesses, a thread's x_out vectors kept in registers between the passes, a block of
// NORM_VEC_THREADS per row. The same values as add_rms_norm (only the sum of squares' order differs).
// (add_rms_norm moved 32 MB of a 2,048-row prefill at 1.3 TB/s: RESULTS.md run 16.1.)
#define NORM_VEC_THREADS 256
#define NORM_VEC_MAX 4
extern "C" __global__ void __launch_bounds__(NORM_VEC_THREADS) add_rms_norm_vec(act_t* __restrict__ x_out,
    const act_t* __restrict__ x, const act_t* __restrict__ delta, act_t* __restrict__ out, const act_t* __restrict__ w,
    int cols, float eps) {
    TIMELINE("add_rms_norm_vec");
    grid_dependency();
    size_t row = (size_t)blockIdx.x * cols / VEC;
    const int cv = cols / VEC;
    const uint4* xv = reinterpret_cast<const uint4*>(x) + row;
    const uint4* dv = reinterpret_cast<const uint4*>(delta) + row;
    uint4* rv = reinterpret_cast<uint4*>(x_out) + row;
    uint4* ov = reinterpret_cast<uint4*>(out) + row;
    float s[NORM_VEC_MAX][VEC];
    float ss = 0.f;
#pragma unroll
    for (int u = 0; u < NORM_VEC_MAX; u++) {
        int i = threadIdx.x + u * NORM_VEC_THREADS;
        if (i < cv) {
            unpack_vec(__ldg(xv + i), s[u]);
            if (delta) {
                float d[VEC];
                unpack_vec(__ldg(dv + i), d);
#pragma unroll
                for (int j = 0; j < VEC; j++) s[u][j] = rnd(s[u][j] + d[j]);
            }
            rv[i] = pack_vec(s[u]);
#pragma unroll
            for (int j = 0; j < VEC; j++) ss += s[u][j] * s[u][j];
        }
    }
    float inv = 1.f / sqrtf(block_sum(ss) / (float)cols + eps);
#pragma unroll
    for (int u = 0; u < NORM_VEC_MAX; u++) {
        int i = threadIdx.x + u * NORM_VEC_THREADS;
        if (i < cv) {
            float wf[VEC];
            unpack_vec(__ldg(reinterpret_cast<const uint4*>(w) + i), wf);
#pragma unroll
            for (int j = 0; j < VEC; j++) wf[j] = wf[j] * (s[u][j] * inv);
            ov[i] = pack_vec(wf);
        }
    }
}

// Per head of q [T, nh*hd] and k [T, nkv*hd]: RMSNorm over hd with q_norm/k_norm (rounded), then
// RoPE rotating halves (i with i + hd/2) from the f32 table rope [max_pos, hd] (cos | sin), rounded.
// With kc non-null, also the cache append (fused kv_append): a k head's rotated values and the
// matching v head go to row t's cache slot, slots[t] * kv_dim + head offset.
// grid (nh + nkv, T), dynamic shared memory hd floats.
extern "C" __global__ void qk_norm_rope(act_t* q, act_t* k, const act_t* q_norm, const act_t* k_norm,
    const float* rope, const unsigned* positions, int nh, int nkv, int hd, float eps,
    act_t* kc, act_t* vc, const act_t* v_in, const unsigned long long* slots, int kv_dim) {
    grid_dependency();
    extern __shared__ float head[];
    int t = blockIdx.y, h = blockIdx.x;
    act_t* v;
    const act_t* w;
    if (h < nh) { v = q + ((size_t)t * nh + h) * hd; w = q_norm; }
    else { v = k + ((size_t)t * nkv + (h - nh)) * hd; w = k_norm; }
    float ss = 0.f;
    for (int i = threadIdx.x; i < hd; i += blockDim.x) { float x = to_f(v[i]); head[i] = x; ss += x * x; }
    float inv = 1.f / sqrtf(block_sum(ss) / (float)hd + eps);
    for (int i = threadIdx.x; i < hd; i += blockDim.x) head[i] = rnd(to_f(w[i]) * (head[i] * inv));
    __syncthreads();
    int half = hd / 2;
    const float* cs = rope + (size_t)positions[t] * hd;
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        float x1 = head[i], x2 = head[i + half], c = cs[i], s = cs[half + i];
        v[i] = from_f(x1 * c - x2 * s);
        v[i + half] = from_f(x2 * c + x1 * s);
    }
    if (kc != nullptr && h >= nh) {
        // Each thread copies the elements it wrote itself: no barrier needed.
        size_t off = (h - nh) * (size_t)hd;
        size_t dst = (size_t)slots[t] * kv_dim + off, src = (size_t)t * kv_dim + off;
        for (int i = threadIdx.x; i < half; i += blockDim.x) {
            kc[dst + i] = v[i];
            kc[dst + i + half] = v[i + half];
        }
        for (int i = threadIdx.x; i < hd; i += blockDim.x) vc[dst + i] = v_in[src + i];
    }
}

// qk_norm_rope for head_dim 32 * ND (64, 128): a warp per head (norm_rope_head: the same values),
// QKR_WARPS heads a block, ND elements a lane in one load and one store. (The block-per-head kernel
// above ran a 2,048-row prefill's q/k at 0.47 TB/s: RESULTS.md run 16.1.) grid (ceil((nh + nkv) /
// QKR_WARPS), T), QKR_WARPS * 32 threads.
#define QKR_WARPS 4
template <int ND>
__device__ __forceinline__ void qk_norm_rope_warp(act_t* q, act_t* k, const act_t* q_norm, const act_t* k_norm,
    const float* rope, const unsigned* positions, int nh, int nkv, float eps,
    act_t* kc, act_t* vc, const act_t* v_in, const unsigned long long* slots, int kv_dim) {
    constexpr int HD = 32 * ND;
    int t = blockIdx.y, h = blockIdx.x * QKR_WARPS + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (h >= nh + nkv) return;
    act_t* v = h < nh ? q + ((size_t)t * nh + h) * HD : k + ((size_t)t * nkv + (h - nh)) * HD;
    float x[ND];
    load_nd<ND>(v + lane * ND, x);
    norm_rope_head<ND>(x, load_norm_rope<ND>(h < nh ? q_norm : k_norm, rope + (size_t)positions[t] * HD), eps);
    store_nd<ND>(v + lane * ND, x);
    if (kc != nullptr && h >= nh) {
        size_t off = (size_t)(h - nh) * HD + lane * ND;
        size_t dst = (size_t)slots[t] * kv_dim + off, src = (size_t)t * kv_dim + off;
        store_nd<ND>(kc + dst, x);
        float vv[ND];
        load_nd<ND>(v_in + src, vv);
        store_nd<ND>(vc + dst, vv);
    }
}

#define QKR_KERNEL(HD) \
    extern "C" __global__ void __launch_bounds__(QKR_WARPS * 32) qk_norm_rope_d##HD(act_t* q, act_t* k, const act_t* q_norm, \
        const act_t* k_norm, const float* rope, const unsigned* positions, int nh, int nkv, int hd, float eps, act_t* kc, \
        act_t* vc, const act_t* v_in, const unsigned long long* slots, int kv_dim) { grid_dependency(); \
        qk_norm_rope_warp<HD / 32>(q, k, q_norm, k_norm, rope, positions, nh, nkv, eps, kc, vc, v_in, slots, kv_dim); }
QKR_KERNEL(64) QKR_KERNEL(128)
