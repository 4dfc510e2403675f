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
