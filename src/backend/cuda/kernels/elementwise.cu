// elementwise.cu: row copies and pointwise ops (embedding, gather, SwiGLU) and greedy argmax.

// out[t, :] = table[ids[t], :]   out [T, h], table [vocab, h]; grid (ceil(h/256), T).
extern "C" __global__ void embed(act_t* out, const act_t* table, const unsigned* ids, int h, int vocab) {
    int t = blockIdx.y;
    unsigned id = ids[t];
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= h) return;
    out[(size_t)t * h + i] = id < (unsigned)vocab ? table[(size_t)id * h + i] : from_f(0.f);
}

// out[i, :] = x[rows[i], :]   grid (ceil(cols/256), R).
extern "C" __global__ void gather_rows(act_t* out, const act_t* x, const unsigned* rows, int cols) {
    int r = blockIdx.y;
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= cols) return;
    out[(size_t)r * cols + i] = x[(size_t)rows[r] * cols + i];
}

// out = round(round(silu(gate)) * up), as transformers in bf16 (silu's output is rounded first).
extern "C" __global__ void swiglu(act_t* out, const act_t* gate, const act_t* up, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float a = rnd(silu(to_f(gate[i])));
    out[i] = from_f(a * to_f(up[i]));
}

// ids[r] = argmax_{j < limit} x[r, j]: NaN counts as -inf, ties go to the lowest index (as the host
// sampler). One block of 1024 threads per row; rows are `cols` apart.
extern "C" __global__ void argmax_rows(unsigned* ids, const act_t* x, int cols, int limit) {
    __shared__ float best_v[32];
    __shared__ int best_i[32];
    const act_t* row = x + (size_t)blockIdx.x * cols;
    float bv = -INFINITY;
    int bi = 0x7fffffff;
    for (int j = threadIdx.x; j < limit; j += blockDim.x) {
        float v = to_f(row[j]);
        if (isnan(v)) v = -INFINITY;
        if (v > bv || (v == bv && j < bi)) { bv = v; bi = j; }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffffu, bv, o);
        int oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (ov > bv || (ov == bv && oi < bi)) { bv = ov; bi = oi; }
    }
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) { best_v[warp] = bv; best_i[warp] = bi; }
    __syncthreads();
    if (warp == 0) {
        int nw = blockDim.x >> 5;
        bv = lane < nw ? best_v[lane] : -INFINITY;
        bi = lane < nw ? best_i[lane] : 0x7fffffff;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            float ov = __shfl_xor_sync(0xffffffffu, bv, o);
            int oi = __shfl_xor_sync(0xffffffffu, bi, o);
            if (ov > bv || (ov == bv && oi < bi)) { bv = ov; bi = oi; }
        }
        if (lane == 0) ids[blockIdx.x] = bi == 0x7fffffff ? 0u : (unsigned)bi;
    }
}
