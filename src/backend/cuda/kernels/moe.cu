// moe.cu: MoE routing on the device. `moe_route`: softmax, top-k, renormalisation per row (f32);
// `moe_sort`: group the (row, choice) pairs by expert into tiles for `grouped_gemm` / `expert_gemm`;
// `moe_combine`: weighted sum of each row's expert outputs, in ascending expert order as the CPU
// (prefill; decode adds them up inside its down projection, moe_down_combine in matmul.cu).
// Expert parallelism: a device holding experts [e0, e0 + held) of E routes over all E, then keeps
// only its own choices: their ids become local (id - e0), every other choice gets id -1 and weight 0,
// and the expert kernels and the combine skip those (another rank adds them).

// Pairs p = t*k + s of `ids` [P] grouped by expert: sorted_src[pos] = t, pair_pos[p] = pos; tiles of
// at most tm rows never straddle experts (tile_e = -1 past the last). Pairs of id -1 (other ranks'
// experts) are left out: pair_pos -1, and the segments cover only the others. One block; 2*E ints of
// shared memory (E: the experts this device holds).
extern "C" __global__ void moe_sort(const int* ids, int P, int k, int E, int tm, int max_tiles,
    int* sorted_src, int* pair_pos, int* tile_e, int* tile_row0, int* tile_rows) {
    grid_dependency();
    extern __shared__ int sh[];
    int* cnt = sh;
    int* off = sh + E;
    for (int e = threadIdx.x; e < E; e += blockDim.x) cnt[e] = 0;
    __syncthreads();
    for (int p = threadIdx.x; p < P; p += blockDim.x) if (ids[p] >= 0) atomicAdd(&cnt[ids[p]], 1);
    __syncthreads();
    if (threadIdx.x == 0) {
        int run = 0, tiles = 0;
        for (int e = 0; e < E; e++) {
            int c = cnt[e];
            off[e] = run;
            for (int s = 0; s < c && tiles < max_tiles; s += tm) {
                tile_e[tiles] = e;
                tile_row0[tiles] = run + s;
                tile_rows[tiles] = min(tm, c - s);
                tiles++;
            }
            run += c;
            cnt[e] = 0;  // reused below as the per-expert cursor
        }
        for (; tiles < max_tiles; tiles++) tile_e[tiles] = -1;
    }
    __syncthreads();
    for (int p = threadIdx.x; p < P; p += blockDim.x) {
        int e = ids[p];
        if (e < 0) { pair_pos[p] = -1; continue; }
        int pos = off[e] + atomicAdd(&cnt[e], 1);
        sorted_src[pos] = p / k;
        pair_pos[p] = pos;
    }
}

// out[t] = Σ_s round(weight[t,s] * y[pair_pos[t,s]]), accumulated (and rounded) in slot order;
// pair_pos null: y is in pair order (y[t*k + s]). Slots of weight 0 are skipped (they add 0): those
// of other ranks' experts have no y row. Thread j takes elements j*VEC .. of the row (16-byte
// accesses when H % VEC == 0). grid (ceil(ceil(H / VEC) / 256), T).
extern "C" __global__ void moe_combine(act_t* out, const act_t* y, const int* pair_pos, const float* weights, int k, int H) {
    grid_dependency();
    int t = blockIdx.y;
    int h = (blockIdx.x * blockDim.x + threadIdx.x) * VEC;
    if (h >= H) return;
    const bool vec = H % VEC == 0;
    const int n = min(VEC, H - h);
    float acc[VEC], yv[VEC];
#pragma unroll
    for (int j = 0; j < VEC; j++) acc[j] = 0.f;
    for (int s = 0; s < k; s++) {
        float w = weights[t * k + s];
        if (w == 0.f) continue;
        int pos = pair_pos ? pair_pos[t * k + s] : t * k + s;
        const act_t* yr = y + (size_t)pos * H + h;
        if (vec) unpack_vec(__ldg(reinterpret_cast<const uint4*>(yr)), yv);
        else for (int j = 0; j < VEC; j++) yv[j] = j < n ? to_f(yr[j]) : 0.f;
#pragma unroll
        for (int j = 0; j < VEC; j++) acc[j] = rnd(acc[j] + rnd(yv[j] * w));
    }
    act_t* o = out + (size_t)t * H + h;
    if (vec) *reinterpret_cast<uint4*>(o) = pack_vec(acc);
    else for (int j = 0; j < n; j++) o[j] = from_f(acc[j]);
}

// logits [T, E] f32 in; ids/weights [T, k] out as route_rows chooses them. A block routes 4 rows (a
// warp each for the softmax; a thread per logit scanning E experts k + 3 times took 48 µs a layer for
// a 16-token prefill of Qwen3-30B-A3B, RESULTS.md run 12). grid ceil(T / 4), 128 threads; dynamic
// shared memory 4 * (E + k) * 4 bytes (E a multiple of 4 for 16-byte rows, else any).
extern "C" __global__ void moe_route(const float* logits, int* ids, float* weights, int T, int E, int k, int norm, int e0, int held) {
    extern __shared__ float4 route_shared[];
    grid_dependency();
    float* p = reinterpret_cast<float*>(route_shared);
    const int t0 = blockIdx.x * 4, rows = min(4, T - t0);
    route_rows(logits + (size_t)t0 * E, rows, p, E, reinterpret_cast<int*>(p + 4 * E), ids + (size_t)t0 * k, weights + (size_t)t0 * k,
        nullptr, nullptr, E, k, norm, e0, held);
}
