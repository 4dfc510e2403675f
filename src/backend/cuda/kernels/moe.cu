// moe.cu: MoE expert bookkeeping on the device (routing itself is in matmul.cu, next to the router
// product: `router_logits`, `moe_route`). `moe_sort`: group the (row, choice) pairs by expert into tiles
// for `grouped_gemm`; `moe_combine`: weighted sum of each row's expert outputs, in ascending expert
// order as the CPU. Expert parallelism: a device holding experts [e0, e0 + held) of E routes over all
// E, then keeps only its own choices: their ids become local (id - e0), every other choice gets id -1
// and weight 0, and the expert kernels and the combine skip those (another rank adds them).

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
// of other ranks' experts have no y row. grid (ceil(H/256), T).
extern "C" __global__ void moe_combine(act_t* out, const act_t* y, const int* pair_pos, const float* weights, int k, int H) {
    grid_dependency();
    int t = blockIdx.y;
    int h = blockIdx.x * blockDim.x + threadIdx.x;
    if (h >= H) return;
    float acc = 0.f;
    for (int s = 0; s < k; s++) {
        if (weights[t * k + s] == 0.f) continue;
        int pos = pair_pos ? pair_pos[t * k + s] : t * k + s;
        float c = rnd(to_f(y[(size_t)pos * H + h]) * weights[t * k + s]);
        acc = rnd(acc + c);
    }
    out[(size_t)t * H + h] = from_f(acc);
}
