// attention_prefill.cu: causal grouped-query attention for prefill on tensor cores (FlashAttention-2
// style), bf16 and f16 only: the f32 build of this module is empty and f32 keeps `attention_tiled_*`
// (attention.cu). Same inputs and semantics as `attention_tiled_*`: block (h, tile) takes the up to
// FP_BQ consecutive rows of one sequence of tiles[2*tile] (first row), tiles[2*tile+1] (rows) for
// query head h over KV head h / (nh/nkv); row t sees keys [0, row_ctx[t]) of its sequence, whose block
// table starts at tables[row_table[t]]; key j lives at cache slot table[j / bs] * bs + j % bs
// (common.cuh cache_slot) of the paged cache [n_blocks, bs, kv_dim]. Scores and the softmax are f32; P
// is rounded to act_t for the P·V product (f32 accumulation), the output is rounded to act_t once at
// the end.
//
// Structure (FA2): 4 warps, warp w owns query rows 16w..16w+15 of the tile. Q is staged through
// shared memory into registers (mma A fragments) once. K and V tiles of FP_BK = 64 keys stream
// through shared memory by cp.async: V(n) is fetched while S = Q·K(n)ᵀ and the softmax run, K(n+1)
// while O += P·V(n) runs. The page lookups of a key tile are done once (64 threads) into a
// double-buffered slot table in shared memory, read by the copies of K and of V. S stays in
// registers; its accumulator layout is exactly the A-fragment layout P needs for P·V, so P never
// touches shared memory. A warp skips a key tile that none of its rows sees (causal); the mask is
// only evaluated on tiles that cross a row's context end.
//
// Fragment layouts relied on (PTX ISA, mma.m16n8k16 with .bf16/.f16 inputs, f32 accumulators;
// lane = 4 g + t, g = groupID = lane / 4, t = lane % 4; a "pair" is two 16-bit values in one 32-bit
// register, the lower column/row index in the low half):
//   A (16x16, row-major)  a0 = A[g][2t, 2t+1]   a1 = A[g+8][2t, 2t+1]
//                         a2 = A[g][2t+8, +9]   a3 = A[g+8][2t+8, +9]
//   B (16x8, k x n)       b0 = B[2t, 2t+1][g]   b1 = B[2t+8, 2t+9][g]
//   C/D (16x8, f32)       c0, c1 = C[g][2t, 2t+1]   c2, c3 = C[g+8][2t, 2t+1]
// ldmatrix.m8n8.x4: lanes 8i..8i+7 give the addresses of rows 0..7 of matrix i; register i of lane
// (g, t) receives row g, columns 2t, 2t+1 of matrix i; with .trans it receives rows 2t, 2t+1 of
// column g instead (so an 8x8 block stored [key][dim] arrives as the B fragment of V).
//   Q (A of S = Q·Kᵀ, k = head dim): matrix i = rows 8(i&1).., dims 8(i>>1).. of the k-step, so lane
//     l addresses row l%16, dim 16 kk + 8 (l/16).
//   K (B of S, B[d][key] = K[key][d], stored [key][d]): no transpose needed; matrix i = keys
//     8 nb + 8 (i>>1) .., dims 16 kk + 8 (i&1): registers (0,1) = (b0,b1) of key block nb, (2,3) of
//     nb+1. Lane l addresses key 8 nb + 8 (l/16) + l%8, dim 16 kk + 8 ((l/8)&1).
//   P (A of O = P·V, k = key): S accumulator blocks 2j and 2j+1 (keys 16j..16j+15) give
//     a0 = (S[2j].c0, c1), a1 = (S[2j].c2, c3), a2 = (S[2j+1].c0, c1), a3 = (S[2j+1].c2, c3).
//   V (B of O, B[key][d] = V[key][d], stored [key][d]): ldmatrix.trans; matrix i = keys
//     16 j + 8 (i&1) .., dims 8 nd + 8 (i>>1): registers (0,1) = (b0,b1) of dim block nd, (2,3) of
//     nd+1. Lane l addresses key 16 j + 8 ((l/8)&1) + l%8, dim 8 nd + 8 (l/16).
// scripts/fa_prefill_sim.py emulates these instructions lane by lane and checks this index math.
//
// Shared memory: Q [FP_BQ][SROW], K [FP_BK][SROW], V [FP_BK][SROW] act_t, SROW = HD + 8: rows are
// 16-byte aligned and 16 bytes apart modulo 128, so the 8 row addresses of every ldmatrix phase hit
// distinct bank groups (no conflicts; also for HD 16 and 32, whose 48- and 80-byte rows step 3 and
// 5 bank groups). HD 128: 52,224 bytes; HD 64: 27,648 (dynamic), plus the 512-byte slot table.

#if Q_DTYPE != 0

#define FP_BQ 64     // query rows per block (= ATTN_TILE_ROWS on the host)
#define FP_BK 64     // keys per K/V tile
#define FP_WARPS 4   // 16 query rows each
#define FP_THREADS (FP_WARPS * 32)
#define FP_PAD 8     // act_t of padding per shared row

__device__ __forceinline__ unsigned fp_smem_addr(const void* p) { return (unsigned)__cvta_generic_to_shared(p); }


// volatile + "memory": never merged with the identical load of the previous key tile, never moved
// across a barrier.
__device__ __forceinline__ void fp_ldsm_x4(unsigned (&r)[4], unsigned addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr) : "memory");
}
__device__ __forceinline__ void fp_ldsm_x4_trans(unsigned (&r)[4], unsigned addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr) : "memory");
}

// d += A·B for one m16n8k16 (layouts above).
__device__ __forceinline__ void fp_mma(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
#if Q_DTYPE == 1
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]) : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]) : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

// 2^x (approximate, 2 ulp; subnormal results flushed to 0, 2^-inf = 0).
__device__ __forceinline__ float fp_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

// One K/V tile of keys k0 .. k0 + FP_BK - 1 into a thread's online softmax (both prefill kernels).
// s[nb][c] is the score of row (c < 2 ? g : g + 8), key k0 + 8 nb + 2 t4 + (c & 1), from Q·Kᵀ; it
// becomes p = 2^(s·sl2 − m) (P before rounding). With `mask` (some row's context ends in this tile)
// keys at or past a row's context (ctx_a for row g, ctx_b for g + 8) get −inf first. m: the running
// max (log2 units: raw max · sl2, the scale being positive), l: the running sum of this thread's
// columns, o [ND][4] (same rows as s) rescaled by the change of m. Every row sees key 0, so after
// tile 0 m is finite and the correction and p are never NaN.
template <int ND>
__device__ __forceinline__ void fp_softmax_tile(float (&s)[FP_BK / 8][4], float (&o)[ND][4], float (&m)[2], float (&l)[2],
    bool mask, int k0, int t4, int ctx_a, int ctx_b, float sl2) {
    constexpr int NB = FP_BK / 8;
    if (mask) {
#pragma unroll
        for (int nb = 0; nb < NB; nb++)
#pragma unroll
            for (int c = 0; c < 4; c++) {
                int key = k0 + nb * 8 + t4 * 2 + (c & 1);
                if (key >= (c < 2 ? ctx_a : ctx_b)) s[nb][c] = -INFINITY;
            }
    }
#pragma unroll
    for (int i = 0; i < 2; i++) {
        float mx = -INFINITY;
#pragma unroll
        for (int nb = 0; nb < NB; nb++) mx = fmaxf(mx, fmaxf(s[nb][2 * i], s[nb][2 * i + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));  // the quad holds the row's 64 keys
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        mx = fmaxf(m[i], mx * sl2);
        const float corr = fp_exp2(m[i] - mx);  // 0 on the first tile (m = -inf)
        m[i] = mx;
        float sum = 0.f;
#pragma unroll
        for (int nb = 0; nb < NB; nb++) {
            s[nb][2 * i] = fp_exp2(fmaf(s[nb][2 * i], sl2, -mx));
            s[nb][2 * i + 1] = fp_exp2(fmaf(s[nb][2 * i + 1], sl2, -mx));
            sum += s[nb][2 * i] + s[nb][2 * i + 1];
        }
        l[i] = l[i] * corr + sum;
#pragma unroll
        for (int n = 0; n < ND; n++) {
            o[n][2 * i] *= corr;
            o[n][2 * i + 1] *= corr;
        }
    }
}

// Two f32 -> one register of two act_t, `lo` in the low half (the lower column).
__device__ __forceinline__ unsigned fp_pack(float lo, float hi) {
#if Q_DTYPE == 1
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
#else
    __half2 v = __floats2half2_rn(lo, hi);
#endif
    return *reinterpret_cast<unsigned*>(&v);
}

template <int HD>
__device__ __forceinline__ void attention_prefill_impl(act_t* out, const act_t* q, const act_t* kc, const act_t* vc,
    const unsigned* row_ctx, const unsigned* row_table, const unsigned* tables, const int* tiles,
    int nh, int nkv, int block_size, int kv_dim, float scale) {
    static_assert(HD % 16 == 0 && HD <= 256, "head_dim: a multiple of 16");
    constexpr int SROW = HD + FP_PAD;                  // shared row stride, act_t
    constexpr int CH = HD / 8;                         // 16-byte chunks per row
    constexpr int LOADS = FP_BK * CH / FP_THREADS;     // 16-byte copies per thread per K or V tile
    static_assert(FP_BK * CH % FP_THREADS == 0 && FP_BQ * CH % FP_THREADS == 0, "whole copy rounds");
    constexpr int KSTEPS = HD / 16;                    // k-steps of Q·Kᵀ
    constexpr int NB = FP_BK / 8;                      // 8-key blocks of S
    constexpr int ND = HD / 8;                         // 8-dim blocks of O
    extern __shared__ __align__(16) unsigned char fp_smem[];
    __shared__ unsigned slots[2][FP_BK];  // cache slot of each key of a K/V tile (~0u: past the context), two tiles
    act_t* qs = reinterpret_cast<act_t*>(fp_smem);
    act_t* ks = qs + FP_BQ * SROW;
    act_t* vs = ks + FP_BK * SROW;

    const int h = blockIdx.x;
    const int tile = gridDim.y - 1 - blockIdx.y;  // a sequence's last tiles see the most keys: start them first
    const int row0 = tiles[2 * tile], nrows = tiles[2 * tile + 1];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int g = lane >> 2, t4 = lane & 3;
    const size_t kv_off = (size_t)(h / (nh / nkv)) * HD;
    const unsigned* table = tables + row_table[row0];
    const int ctx_last = (int)row_ctx[row0 + nrows - 1];  // rows are consecutive positions: the last sees most
    const int n_kt = (ctx_last + FP_BK - 1) / FP_BK;

    // Q rows -> shared (rows past the tile: zeros).
#pragma unroll
    for (int it = 0; it < FP_BQ * CH / FP_THREADS; it++) {
        int i = tid + it * FP_THREADS, r = i / CH, c = i % CH;
        bool ok = r < nrows;
        const act_t* src = q + ((size_t)(row0 + (ok ? r : 0)) * nh + h) * HD + c * 8;
        cp_async16(fp_smem_addr(qs + r * SROW + c * 8), src, ok);
    }
    // The page lookups of key tile k0 / FP_BK, once per tile for K and V and every thread's copies.
    auto find_slots = [&](int k0) {
        if (tid < FP_BK) {
            int key = k0 + tid;
            slots[(k0 / FP_BK) & 1][tid] = key < ctx_last ? (unsigned)cache_slot(table, key, block_size) : ~0u;
        }
    };
    // Keys of tile `kt` of `cache` -> dst (keys past the context: zeros, so that P·V never meets an
    // uninitialised NaN pattern; their scores are masked to -inf).
    auto load_kv = [&](act_t* dst, const act_t* cache, int kt) {
#pragma unroll
        for (int it = 0; it < LOADS; it++) {
            int i = tid + it * FP_THREADS, r = i / CH, c = i % CH;
            unsigned slot = slots[kt & 1][r];
            bool ok = slot != ~0u;
            cp_async16(fp_smem_addr(dst + r * SROW + c * 8), cache + (size_t)(ok ? slot : 0) * kv_dim + kv_off + c * 8, ok);
        }
    };
    find_slots(0);
    __syncthreads();
    load_kv(ks, kc, 0);
    cp_async_commit();

    // This thread's two rows (warp-local g and g+8); rows past the tile take the last row's context
    // (finite scores; never written). hi: most keys any real row of the warp sees (0: the warp has
    // none); lo: fewest keys any of its 16 rows sees (tiles entirely below it need no mask).
    const int ra = warp * 16 + g, rb = ra + 8;
    const int ctx_a = ra < nrows ? (int)row_ctx[row0 + ra] : ctx_last;
    const int ctx_b = rb < nrows ? (int)row_ctx[row0 + rb] : ctx_last;
    const int warp_hi = __reduce_max_sync(0xffffffffu, (unsigned)max(ra < nrows ? ctx_a : 0, rb < nrows ? ctx_b : 0));
    const int warp_lo = __reduce_min_sync(0xffffffffu, (unsigned)min(ctx_a, ctx_b));
    const float sl2 = scale * 1.4426950408889634f;  // exp(x * scale) = 2^(x * sl2)

    cp_async_wait_all();
    __syncthreads();
    unsigned qf[KSTEPS][4];
    {
        const unsigned qa = fp_smem_addr(qs + (warp * 16 + (lane & 15)) * SROW + (lane >> 4) * 8);
#pragma unroll
        for (int kk = 0; kk < KSTEPS; kk++) fp_ldsm_x4(qf[kk], qa + kk * 16 * (int)sizeof(act_t));
    }
    const unsigned ka = fp_smem_addr(ks + ((lane >> 4) * 8 + (lane & 7)) * SROW + ((lane >> 3) & 1) * 8);
    const unsigned va = fp_smem_addr(vs + (((lane >> 3) & 1) * 8 + (lane & 7)) * SROW + (lane >> 4) * 8);

    float o[ND][4];
#pragma unroll
    for (int n = 0; n < ND; n++) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
    float m[2] = {-INFINITY, -INFINITY};  // running max (log2 units) of rows g, g+8
    float l[2] = {0.f, 0.f};              // running sum of this thread's columns; quad-reduced at the end

    for (int kt = 0; kt < n_kt; kt++) {
        const int k0 = kt * FP_BK;
        load_kv(vs, vc, kt);
        cp_async_commit();
        // Slots of the next tile into the other buffer: its last readers (the copies of tile kt-1)
        // were issued before the previous barrier; K(kt+1) reads it after the next one.
        if (kt + 1 < n_kt) find_slots(k0 + FP_BK);
        const bool active = k0 < warp_hi;  // warp-uniform
        float s[NB][4];
        if (active) {
#pragma unroll
            for (int n = 0; n < NB; n++) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
            for (int kk = 0; kk < KSTEPS; kk++) {
#pragma unroll
                for (int nb = 0; nb < NB; nb += 2) {
                    unsigned b[4];
                    fp_ldsm_x4(b, ka + (nb * 8 * SROW + kk * 16) * (int)sizeof(act_t));
                    fp_mma(s[nb], qf[kk], b[0], b[1]);
                    fp_mma(s[nb + 1], qf[kk], b[2], b[3]);
                }
            }
            // Mask where some row's context ends inside this tile (warp-uniform), online softmax.
            fp_softmax_tile<ND>(s, o, m, l, k0 + FP_BK > warp_lo, k0, t4, ctx_a, ctx_b, sl2);
        }
        cp_async_wait_all();  // V(kt) is here ...
        __syncthreads();         // ... for every thread, and no warp reads K(kt) any more
        if (kt + 1 < n_kt) {
            load_kv(ks, kc, kt + 1);
            cp_async_commit();
        }
        if (active) {
#pragma unroll
            for (int j = 0; j < FP_BK / 16; j++) {
                unsigned a[4] = {fp_pack(s[2 * j][0], s[2 * j][1]), fp_pack(s[2 * j][2], s[2 * j][3]),
                                 fp_pack(s[2 * j + 1][0], s[2 * j + 1][1]), fp_pack(s[2 * j + 1][2], s[2 * j + 1][3])};
#pragma unroll
                for (int nd = 0; nd < ND; nd += 2) {
                    unsigned b[4];
                    fp_ldsm_x4_trans(b, va + (j * 16 * SROW + nd * 8) * (int)sizeof(act_t));
                    fp_mma(o[nd], a, b[0], b[1]);
                    fp_mma(o[nd + 1], a, b[2], b[3]);
                }
            }
        }
        cp_async_wait_all();  // K(kt+1) is here ...
        __syncthreads();         // ... for every thread, and no warp reads V(kt) any more
    }

    // O / l, rounded to act_t, staged in this warp's own 16 Q rows (no other warp reads them after
    // the fragments were loaded), then written 16 bytes at a time.
    if (warp_hi == 0) return;  // no real rows (warp-uniform)
#pragma unroll
    for (int i = 0; i < 2; i++) {
        l[i] += __shfl_xor_sync(0xffffffffu, l[i], 1);
        l[i] += __shfl_xor_sync(0xffffffffu, l[i], 2);
        l[i] = 1.f / l[i];
    }
#pragma unroll
    for (int n = 0; n < ND; n++) {
        *reinterpret_cast<unsigned*>(qs + ra * SROW + n * 8 + t4 * 2) = fp_pack(o[n][0] * l[0], o[n][1] * l[0]);
        *reinterpret_cast<unsigned*>(qs + rb * SROW + n * 8 + t4 * 2) = fp_pack(o[n][2] * l[1], o[n][3] * l[1]);
    }
    __syncwarp();
#pragma unroll
    for (int it = 0; it < 16 * CH / 32; it++) {
        int i = lane + it * 32, r = warp * 16 + i / CH, c = i % CH;
        if (r < nrows)
            *reinterpret_cast<uint4*>(out + ((size_t)(row0 + r) * nh + h) * HD + c * 8) =
                *reinterpret_cast<const uint4*>(qs + r * SROW + c * 8);
    }
}

#define FP_ARGS act_t* out, const act_t* q, const act_t* kc, const act_t* vc, const unsigned* row_ctx, \
    const unsigned* row_table, const unsigned* tables, const int* tiles, int nh, int nkv, int hd, int block_size, int kv_dim, float scale
#define FP_PASS out, q, kc, vc, row_ctx, row_table, tables, tiles, nh, nkv, block_size, kv_dim, scale
// grid (nh, n_tiles), FP_THREADS threads, dynamic shared memory (FP_BQ + 2 FP_BK) * (hd + FP_PAD)
// act_t. `hd` must equal the kernel's head_dim (it is in the argument list to match attention_tiled_*).
// ptxas (sm_90): hd 128 246 registers (2 blocks per SM), hd 64 128 (4 blocks per SM); no spills.
// hd 16 and 32 serve the small test checkpoints (the conformance suite runs this kernel end to end).
extern "C" __global__ void __launch_bounds__(FP_THREADS, 4) attention_prefill_16(FP_ARGS) { grid_dependency(); attention_prefill_impl<16>(FP_PASS); }
extern "C" __global__ void __launch_bounds__(FP_THREADS, 4) attention_prefill_32(FP_ARGS) { grid_dependency(); attention_prefill_impl<32>(FP_PASS); }
extern "C" __global__ void __launch_bounds__(FP_THREADS, 4) attention_prefill_64(FP_ARGS) { grid_dependency(); attention_prefill_impl<64>(FP_PASS); }
extern "C" __global__ void __launch_bounds__(FP_THREADS) attention_prefill_128(FP_ARGS) { grid_dependency(); attention_prefill_impl<128>(FP_PASS); }


// ---- head_dim 128 on Hopper's warpgroup MMA (sm_90a): attention_prefill_wg_128 ----
// Same inputs, tiles and semantics as attention_prefill_128 (FP_BQ = 64 query rows a block, keys
// FP_BK = 64 at a time, P rounded to act_t for P·V), one warpgroup a block. S = Q·Kᵀ is wgmma
// m64n64k16 with Q and K from shared memory (K-major); O += P·V is wgmma m64n128k16 with P from
// registers (the S accumulator layout is the A-fragment layout, as for mma.sync above) and V from
// shared memory read N-major (imm-trans-b): V is stored [key][dim] like K. No ldmatrix: the tensor
// cores read Q, K and V from shared memory themselves, half the shared-memory reads of the mma.sync
// kernel's ldmatrix traffic a FLOP.
// Shared memory, each operand in 64-dim halves of 64 rows × 128 bytes, swizzled (common.cuh):
// Q [2][64][64] at 0, K [2 buffers][2][64][64] at 16 KB, V likewise at 48 KB: 80 KB (+1 KB to align),
// two blocks an SM. V's descriptor (N-major, 128-byte swizzle): the next 64 dims are the other half
// (leading byte offset 8 KB), the next 8 keys 1,024 bytes on (stride byte offset); a k16 step is 16
// keys, 2,048 bytes.
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define FW_SMEM (80 * 1024)

// d[64 × 128] += A[64 × 16] (registers: this thread's fragment of P) · B[16 × 128] (V, N-major).
__device__ __forceinline__ void fw_mma_pv(float* d, const unsigned (&a)[4], unsigned long long b) {
    asm volatile(
        "wgmma.mma_async.sync.aligned.m64n128k16.f32." WG_AB "." WG_AB " "
        "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,"
        "%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,"
        "%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,"
        "%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63}, {%64,%65,%66,%67}, %68, 1, 1, 1, 1;"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
          "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
          "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b));
}

// 16-byte copies of one 64-row, 128-dim tile into its two swizzled halves at `dst`: thread tid copies
// chunk tid % 16 of rows tid / 16 + 8 i; row_src(r) is the row's first element, or null for zeros
// (then `any`, a valid address, is named and nothing read).
template <typename RowSrc>
__device__ __forceinline__ void fw_load_tile(unsigned dst, int tid, const act_t* any, RowSrc row_src) {
    const int c = tid & 15, half = c >> 3, cc = c & 7;
#pragma unroll
    for (int i = 0; i < 8; i++) {
        const int r = (tid >> 4) + 8 * i;
        const act_t* src = row_src(r);
        cp_async16(dst + half * 8192 + r * 128 + ((cc ^ (r & 7)) << 4), (src ? src : any) + c * 8, src != nullptr);
    }
}

__device__ __forceinline__ void fw_attention(act_t* out, const act_t* q, const act_t* kc, const act_t* vc,
    const unsigned* row_ctx, const unsigned* row_table, const unsigned* tables, const int* tiles,
    int nh, int nkv, int block_size, int kv_dim, float scale) {
    constexpr int HD = 128;
    extern __shared__ __align__(1024) unsigned char fw_smem[];
    __shared__ unsigned slots[2][FP_BK];  // cache slot of each key of a K/V tile (~0u: past the context)
    const unsigned raw = fp_smem_addr(fw_smem), base = (raw + 1023) & ~1023u;
    const unsigned qs = base, ks = base + 16 * 1024, vs = base + 48 * 1024;  // + buffer * 16 KB

    const int h = blockIdx.x;
    const int tile = gridDim.y - 1 - blockIdx.y;  // a sequence's last tiles see the most keys: start them first
    const int row0 = tiles[2 * tile], nrows = tiles[2 * tile + 1];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int g = lane >> 2, t4 = lane & 3;
    const size_t kv_off = (size_t)(h / (nh / nkv)) * HD;
    const unsigned* table = tables + row_table[row0];
    const int ctx_last = (int)row_ctx[row0 + nrows - 1];  // rows are consecutive positions: the last sees most
    const int ctx_first = (int)row_ctx[row0];             // and the first fewest
    const int n_kt = (ctx_last + FP_BK - 1) / FP_BK;

    auto find_slots = [&](int kt) {
        if (tid < FP_BK) {
            int key = kt * FP_BK + tid;
            slots[kt & 1][tid] = key < ctx_last ? (unsigned)cache_slot(table, key, block_size) : ~0u;
        }
    };
    auto load_kv = [&](int kt) {
        const unsigned* sl = slots[kt & 1];
        const unsigned buf = (kt & 1) * 16 * 1024;
        fw_load_tile(ks + buf, tid, kc, [&](int r) { return sl[r] == ~0u ? nullptr : kc + (size_t)sl[r] * kv_dim + kv_off; });
        fw_load_tile(vs + buf, tid, vc, [&](int r) { return sl[r] == ~0u ? nullptr : vc + (size_t)sl[r] * kv_dim + kv_off; });
    };
    fw_load_tile(qs, tid, q, [&](int r) { return r < nrows ? q + ((size_t)(row0 + r) * nh + h) * HD : nullptr; });
    find_slots(0);
    __syncthreads();
    load_kv(0);
    cp_async_commit();
    if (n_kt > 1) find_slots(1);

    // This thread's two rows g and g + 8 of its warp's 16; rows past the tile take the last row's
    // context (finite scores; never written).
    const int ra = warp * 16 + g, rb = ra + 8;
    const int ctx_a = ra < nrows ? (int)row_ctx[row0 + ra] : ctx_last;
    const int ctx_b = rb < nrows ? (int)row_ctx[row0 + rb] : ctx_last;
    const float sl2 = scale * 1.4426950408889634f;  // exp(x * scale) = 2^(x * sl2)
    const unsigned long long dq = wg_desc(qs);
    // V: N-major, the other 64 dims 8 KB on (leading byte offset), 8 keys 1,024 bytes on.
    const unsigned long long dv = (unsigned long long)((vs & 0x3FFFF) >> 4) | ((unsigned long long)(8192 >> 4) << 16)
                                  | ((unsigned long long)(1024 >> 4) << 32) | (1ull << 62);

    float o[HD / 8][4];  // O[row][dim]: o[j][c] is row (c < 2 ? g : g + 8), dim 8 j + 2 t4 + (c & 1)
#pragma unroll
    for (int j = 0; j < HD / 8; j++) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
    float m[2] = {-INFINITY, -INFINITY};  // running max (log2 units) of rows g, g + 8
    float l[2] = {0.f, 0.f};              // running sum of this thread's columns; quad-reduced at the end

    for (int kt = 0; kt < n_kt; kt++) {
        const int k0 = kt * FP_BK;
        cp_async_wait_all();
        asm volatile("fence.proxy.async.shared::cta;" ::: "memory");  // cp.async writes, seen by wgmma
        __syncthreads();  // tile kt (and Q) landed for all; slots of kt + 1 visible; tile kt - 1 read by none
        if (kt + 1 < n_kt) {
            load_kv(kt + 1);
            cp_async_commit();
        }
        // S = Q · K(kt)ᵀ: s[j][c] is row (c < 2 ? g : g + 8), key k0 + 8 j + 2 t4 + (c & 1).
        float s[FP_BK / 8][4];
#pragma unroll
        for (int j = 0; j < FP_BK / 8; j++) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
        const unsigned long long dk = wg_desc(ks + (kt & 1) * 16 * 1024);
        wg_fence_acc<32>(&s[0][0]);
        asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
#pragma unroll
        for (int kk = 0; kk < HD / 16; kk++) {
            const unsigned long long step = (kk >> 2) * (8192 >> 4) + (kk & 3) * 2;  // half, then 32 bytes a k16 step
            wg_mma64(&s[0][0], dq + step, dk + step);
        }
        asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
        asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
        wg_fence_acc<32>(&s[0][0]);
        // Slots of tile kt + 2 into the buffer tile kt's copies read (issued before this step's barrier).
        if (kt + 2 < n_kt) find_slots(kt + 2);
        // Mask where some row's context ends inside this tile, online softmax.
        fp_softmax_tile<HD / 8>(s, o, m, l, k0 + FP_BK > ctx_first, k0, t4, ctx_a, ctx_b, sl2);
        // O += P · V(kt), a k16 step (16 keys: S blocks 2 kk and 2 kk + 1) at a time; P packed first,
        // so that the four wgmma issue as one batch.
        unsigned pa[FP_BK / 16][4];
#pragma unroll
        for (int kk = 0; kk < FP_BK / 16; kk++) {
            pa[kk][0] = fp_pack(s[2 * kk][0], s[2 * kk][1]);
            pa[kk][1] = fp_pack(s[2 * kk][2], s[2 * kk][3]);
            pa[kk][2] = fp_pack(s[2 * kk + 1][0], s[2 * kk + 1][1]);
            pa[kk][3] = fp_pack(s[2 * kk + 1][2], s[2 * kk + 1][3]);
        }
        const unsigned long long dvk = dv + (((kt & 1) * 16 * 1024) >> 4);
        wg_fence_acc<64>(&o[0][0]);
        asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
#pragma unroll
        for (int kk = 0; kk < FP_BK / 16; kk++) fw_mma_pv(&o[0][0], pa[kk], dvk + kk * (2048 >> 4));
        asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
        asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
        wg_fence_acc<64>(&o[0][0]);
    }

    // O / l rounded to act_t, staged [row][HD + FP_PAD] over the K buffers, then 16-byte stores.
#pragma unroll
    for (int r = 0; r < 2; r++) {
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
        l[r] = 1.f / l[r];
    }
    __syncthreads();  // no thread reads K(n_kt - 1) any more
    act_t* st = reinterpret_cast<act_t*>(fw_smem + (ks - raw));
    constexpr int SROW = HD + FP_PAD;
#pragma unroll
    for (int j = 0; j < 16; j++) {
        *reinterpret_cast<unsigned*>(st + ra * SROW + j * 8 + t4 * 2) = fp_pack(o[j][0] * l[0], o[j][1] * l[0]);
        *reinterpret_cast<unsigned*>(st + rb * SROW + j * 8 + t4 * 2) = fp_pack(o[j][2] * l[1], o[j][3] * l[1]);
    }
    __syncthreads();
    for (int i = tid; i < nrows * (HD / 8); i += FP_THREADS) {
        const int r = i / (HD / 8), c = i % (HD / 8);
        *reinterpret_cast<uint4*>(out + ((size_t)(row0 + r) * nh + h) * HD + c * 8) = *reinterpret_cast<const uint4*>(st + r * SROW + c * 8);
    }
}

// grid (nh, n_tiles), FP_THREADS (one warpgroup), dynamic shared memory FW_SMEM + 1,024.
extern "C" __global__ void __launch_bounds__(FP_THREADS, 2) attention_prefill_wg_128(FP_ARGS) { grid_dependency(); fw_attention(FP_PASS); }
#endif  // __CUDA_ARCH_FEAT_SM90_ALL

#endif  // Q_DTYPE != 0
