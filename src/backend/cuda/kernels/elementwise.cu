// elementwise.cu: row copies and pointwise ops (embedding, gather, SwiGLU) and greedy argmax.

// The argmax of a row as one u64 that atomicMax can reduce: the value's bits made order-preserving
// as an unsigned int above the complement of the index, so the larger value wins and equal values go
// to the lower index; NaN counts as -inf and -0 as +0 (as the host sampler, which compares floats).
__device__ __forceinline__ unsigned long long argmax_key(float v, int j) {
    if (isnan(v)) v = -INFINITY;
    if (v == 0.f) v = 0.f;
    unsigned b = __float_as_uint(v);
    unsigned o = (b & 0x80000000u) ? ~b : (b | 0x80000000u);
    return ((unsigned long long)o << 32) | (0xffffffffu - (unsigned)j);
}

// The index of an argmax key (0 for a row with no key: none of its values counted).
__device__ __forceinline__ unsigned key_index(unsigned long long key) {
    return key ? 0xffffffffu - (unsigned)key : 0u;
}

// out[t, :] = table[ids[t], :]   out [T, h], table [vocab, h]; grid (ceil(h/256), T).
// ids[t] FROM_DEVICE: the id argmax_rows chose for its row t (keys `chosen`), the step before's token
// when the host launched this one before reading it (decoding ahead, CudaBackend::launch_ahead).
#define FROM_DEVICE 0xffffffffu
extern "C" __global__ void embed(act_t* out, const act_t* table, const unsigned* ids, const unsigned long long* chosen, int h, int vocab) {
    TIMELINE("embed");
    grid_dependency();
    int t = blockIdx.y;
    unsigned id = ids[t];
    if (id == FROM_DEVICE && chosen) id = key_index(chosen[t]);
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= h) return;
    out[(size_t)t * h + i] = id < (unsigned)vocab ? table[(size_t)id * h + i] : from_f(0.f);
}

// out[i, :] = x[rows[i], :]: thread j copies elements j*VEC .. (one 16-byte copy when cols % VEC == 0).
// grid (ceil(ceil(cols / VEC) / 256), R). (Element by element it moved 134 MB of a 2,048-row MoE
// prefill at 0.86 TB/s: RESULTS.md run 16.1.)
extern "C" __global__ void gather_rows(act_t* out, const act_t* x, const unsigned* rows, int cols) {
    grid_dependency();
    int i = (blockIdx.x * blockDim.x + threadIdx.x) * VEC;
    if (i >= cols) return;
    act_t* o = out + (size_t)blockIdx.y * cols + i;
    const act_t* s = x + (size_t)rows[blockIdx.y] * cols + i;
    if (cols % VEC == 0) {
        *reinterpret_cast<uint4*>(o) = __ldg(reinterpret_cast<const uint4*>(s));
    } else {
        for (int j = 0; j < VEC && i + j < cols; j++) o[j] = s[j];
    }
}

// out = round(round(silu(gate)) * up), as transformers in bf16 (silu's output is rounded first).
// Thread j takes elements j*VEC .. (one 16-byte access each where all VEC are there; the buffers
// start 256-byte aligned). grid ceil(ceil(n / VEC) / 256).
extern "C" __global__ void swiglu(act_t* out, const act_t* gate, const act_t* up, long long n) {
    grid_dependency();
    long long i = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * VEC;
    if (i >= n) return;
    if (i + VEC <= n) {
        float g[VEC], u[VEC];
        unpack_vec(__ldg(reinterpret_cast<const uint4*>(gate + i)), g);
        unpack_vec(__ldg(reinterpret_cast<const uint4*>(up + i)), u);
#pragma unroll
        for (int j = 0; j < VEC; j++) g[j] = rnd(silu(g[j])) * u[j];
        *reinterpret_cast<uint4*>(out + i) = pack_vec(g);
    } else {
        for (long long j = i; j < n; j++) out[j] = from_f(rnd(silu(to_f(gate[j]))) * to_f(up[j]));
    }
}

// chosen[r] = max_{j < limit} argmax_key(x[r, j], j), rows `cols` apart, also stored to host[r] (mapped
// host memory; null: not). grid (blocks, rows), 256 threads: a thread takes elements j, j + S, ... (S
// the threads of a row), ARGMAX_UNROLL loads in flight, then one atomicMax per warp into keys[r]; the
// row's last block to finish (counts[r]) moves keys[r] to chosen[r] and clears keys[r] and counts[r]
// for the next launch (both zero before the first). So one launch, no clearing and no copy around it.
// (A block per row with one load in flight per thread took 61 us for Qwen3's 151,936 logits: RESULTS.md run 14.)
#ifndef ARGMAX_UNROLL  // tunable: QWEN3RS_CUDA_DEFINES (compile.rs)
#define ARGMAX_UNROLL 4
#endif
extern "C" __global__ void argmax_rows(unsigned long long* keys, unsigned* counts, unsigned long long* chosen,
    unsigned long long* host, const act_t* x, int cols, int limit) {
    __shared__ bool last;
    TIMELINE("argmax_rows");
    grid_dependency();
    const int r = blockIdx.y;
    const act_t* row = x + (size_t)r * cols;
    const int stride = gridDim.x * blockDim.x;
    unsigned long long best = 0;
    for (int j0 = blockIdx.x * blockDim.x + threadIdx.x; j0 < limit; j0 += ARGMAX_UNROLL * stride) {
        float v[ARGMAX_UNROLL];
#pragma unroll
        for (int u = 0; u < ARGMAX_UNROLL; u++) {
            int j = j0 + u * stride;
            v[u] = j < limit ? to_f(row[j]) : 0.f;
        }
#pragma unroll
        for (int u = 0; u < ARGMAX_UNROLL; u++) {
            int j = j0 + u * stride;
            if (j < limit) best = max(best, argmax_key(v[u], j));
        }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) best = max(best, __shfl_xor_sync(0xffffffffu, best, o));
    if ((threadIdx.x & 31) == 0 && best) {
        atomicMax(keys + r, best);
        __threadfence();  // before this block counts itself done
    }
    __syncthreads();
    if (threadIdx.x == 0) last = atomicAdd(counts + r, 1u) == gridDim.x - 1;
    __syncthreads();
    if (last && threadIdx.x == 0) {
        const unsigned long long k = atomicExch(keys + r, 0ull);
        counts[r] = 0;
        chosen[r] = k;
        if (host) {
            host[r] = k;
            __threadfence_system();
        }
    }
}

// Top-k for sampling (CudaBackend::top_rows; the host's sampler::top_scaled): per row r, the k <= TOP_MAX
// best of s_j = min(sanitize(x[r, j]) * inv_t[r], FLT_MAX) over j < limit (sanitize: NaN as -inf, capped
// at FLT_MAX; a plain IEEE product as on the host) as top_key(s_j, j) keys, best first, 0 past the
// row's elements. grid (blocks, rows), 256 threads; block b holds the row's elements b * 256 + t + u *
// blocks * 256 (u < TOP_PER_THREAD: the host sizes the grid so) in registers and takes k rounds of a
// block-wide max, each below the last, into part[r][b][..]; the row's last block to finish (counts[r])
// runs the same rounds over the blocks' parts into out[r][..] and clears counts[r] for the next launch.
#define TOP_MAX 64
#define TOP_PER_THREAD 16

// A value (not NaN) and its index j < 2^31 as one u64 ordered as the host ranks them: larger values
// first, -0 equal to +0, then lower indices; the low bit keeps a zero's sign (the host reports -0).
__device__ __forceinline__ unsigned long long top_key(float v, int j) {
    const unsigned neg_zero = v == 0.f && signbit(v);
    const unsigned b = __float_as_uint(v == 0.f ? 0.f : v);
    const unsigned o = (b & 0x80000000u) ? ~b : (b | 0x80000000u);
    return ((unsigned long long)o << 32) | ((0x7fffffffu - (unsigned)j) << 1) | neg_zero;
}

// The k best of the block's keys (TOP_PER_THREAD a thread in `mine`, 0 for none), best first, into dst.
__device__ __forceinline__ void block_top(const unsigned long long (&mine)[TOP_PER_THREAD], unsigned long long* dst, int k) {
    __shared__ unsigned long long warp_best[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    unsigned long long below = ~0ull;  // keys are distinct (each holds its index): strictly below the last taken
    for (int i = 0; i < k; i++) {
        unsigned long long best = 0;
#pragma unroll
        for (int u = 0; u < TOP_PER_THREAD; u++) best = mine[u] < below ? max(best, mine[u]) : best;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) best = max(best, __shfl_xor_sync(0xffffffffu, best, o));
        if (lane == 0) warp_best[warp] = best;
        __syncthreads();
        best = 0;
        for (int w = 0; w < warps; w++) best = max(best, warp_best[w]);
        if (threadIdx.x == 0) dst[i] = best;
        below = best;
        __syncthreads();  // before warp_best is written again
    }
}

extern "C" __global__ void top_rows(unsigned long long* out, unsigned long long* part, unsigned* counts, const act_t* x,
    const float* inv_t, int cols, int limit, int k) {
    __shared__ bool last;
    grid_dependency();
    const int r = blockIdx.y, nb = gridDim.x;
    const act_t* row = x + (size_t)r * cols;
    const float it = inv_t[r];
    unsigned long long mine[TOP_PER_THREAD];
#pragma unroll
    for (int u = 0; u < TOP_PER_THREAD; u++) {
        const int j = blockIdx.x * blockDim.x + threadIdx.x + u * nb * blockDim.x;
        float v = j < limit ? to_f(row[j]) : 0.f;
        v = isnan(v) ? -INFINITY : fminf(v, 3.402823466e38f);
        mine[u] = j < limit ? top_key(fminf(v * it, 3.402823466e38f), j) : 0ull;
    }
    unsigned long long* parts = part + (size_t)r * nb * k;
    block_top(mine, parts + (size_t)blockIdx.x * k, k);
    if (threadIdx.x == 0) {
        __threadfence();  // this block's part before its count
        last = atomicAdd(counts + r, 1u) == nb - 1;
    }
    __syncthreads();
    if (!last) return;
    __threadfence();
#pragma unroll
    for (int u = 0; u < TOP_PER_THREAD; u++) {
        const int i = threadIdx.x + u * blockDim.x;
        mine[u] = i < nb * k ? __ldcg(parts + i) : 0ull;
    }
    block_top(mine, out + (size_t)r * k, k);
    if (threadIdx.x == 0) counts[r] = 0;
}

// Dummy weights on the device: the same splitmix64 chains as model/dummy.rs, so the values are
// bit-identical to the host's. Element j of chunk c (DUMMY_CHUNK elements) is the (j+1)-th state of
// the chain started at splitmix64(key ^ c * 0x2545F4914F6CDD1D), mapped to
// center + half_width * (2u - 1) with u the top 24 bits / 2^24, rounded to bf16 (then to act_t).
// One thread runs one chain (they are sequential by construction); DF_STEPS values per thread go
// through shared memory so that a warp stores 32 consecutive elements of one chunk.
// Only a window is stored (a tensor-parallel shard; dummy.rs `Walk`): columns col0..col0+ncols of
// rows row0..row0+nrows of a matrix `cols` wide, row-major into out; the whole tensor is one row of
// its own length. The grid walks chunks chunk0.. up to the window's end, each chain only as far as
// the window reaches into it; a thread keeps the (row, column) of the element it stores next, so
// no division per element.
// Job j (grid.y) fills out[j*nrows*ncols ..) with key keys[j] (or `key` when keys is null).
// grid (ceil(chunks / DF_THREADS), jobs), DF_THREADS threads.
#define DUMMY_CHUNK 65536
#define DF_THREADS 128
#define DF_STEPS 32
static_assert(DUMMY_CHUNK % DF_STEPS == 0 && DF_THREADS % DF_STEPS == 0, "a warp's stores stay inside one chunk");

__device__ __forceinline__ unsigned long long splitmix64(unsigned long long z) {
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// (row, col) += (dr, dc) in a matrix `cols` wide, dc < cols.
__device__ __forceinline__ void advance(unsigned long long& row, unsigned long long& col, unsigned long long dr,
    unsigned long long dc, unsigned long long cols) {
    row += dr;
    col += dc;
    if (col >= cols) { col -= cols; row++; }
}

extern "C" __global__ void __launch_bounds__(DF_THREADS) dummy_fill(act_t* out, const unsigned long long* keys,
    unsigned long long key, unsigned long long cols, unsigned long long row0, unsigned long long nrows,
    unsigned long long col0, unsigned long long ncols, unsigned long long chunk0, float center, float half_width) {
    grid_dependency();
    __shared__ act_t buf[DF_THREADS][DF_STEPS + 1];
    unsigned long long k = keys ? keys[blockIdx.y] : key;
    act_t* o = out + (size_t)blockIdx.y * nrows * ncols;
    unsigned long long c0 = chunk0 + (unsigned long long)blockIdx.x * DF_THREADS;
    unsigned long long c = c0 + threadIdx.x;
    unsigned long long state = splitmix64(k ^ (c * 0x2545F4914F6CDD1Dull));
    unsigned long long end = (row0 + nrows - 1) * cols + col0 + ncols;  // one past the window's last element
    // Every chunk of this block needs at most as many values as its first one.
    unsigned long long first = c0 * DUMMY_CHUNK;
    if (first >= end) return;
    int limit = (int)min((unsigned long long)DUMMY_CHUNK, end - first);
    // Store pass m, lane j: element j0 + j of chunk c0 + ci0 + m * stride.
    const int stride = DF_THREADS / DF_STEPS;
    int ci0 = threadIdx.x / DF_STEPS, j = threadIdx.x % DF_STEPS;
    unsigned long long f = (c0 + ci0) * DUMMY_CHUNK + j;
    unsigned long long row = f / cols, col = f % cols;
    const unsigned long long hop = (unsigned long long)stride * DUMMY_CHUNK;
    const unsigned long long hop_r = hop / cols, hop_c = hop % cols, step_r = DF_STEPS / cols, step_c = DF_STEPS % cols;
    for (int j0 = 0; j0 < limit; j0 += DF_STEPS) {
#pragma unroll 4
        for (int s = 0; s < DF_STEPS; s++) {
            state = splitmix64(state);
            float u = (float)(unsigned)(state >> 40) * (1.0f / 16777216.0f);  // exact, as the host's division
            float v = __fadd_rn(center, __fmul_rn(half_width, __fsub_rn(__fmul_rn(2.0f, u), 1.0f)));
            buf[threadIdx.x][s] = from_f(__bfloat162float(__float2bfloat16_rn(v)));
        }
        __syncthreads();
        unsigned long long r = row, cc = col;
        for (int m = 0, ci = ci0; m < DF_STEPS; m++, ci += stride) {
            if (r >= row0 && r < row0 + nrows && cc >= col0 && cc < col0 + ncols) o[(r - row0) * ncols + (cc - col0)] = buf[ci][j];
            advance(r, cc, hop_r, hop_c, cols);
        }
        __syncthreads();
        advance(row, col, step_r, step_c, cols);
    }
}
