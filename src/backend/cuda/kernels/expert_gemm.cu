// expert_gemm.cu: MoE prefill's expert products on Hopper's tensor cores (wgmma, sm_90a; bf16/f16).
// A block takes one tile of moe_sort (up to 128 or 256 rows routed to one expert, by the kernel's build)
// and 128 weight rows: gate and up (64 rows each, SwiGLU in the epilogue, out = act) or 128 rows of
// the down projection (out = y). Both operands stream through shared memory with cp.async, K-major
// in 128-byte swizzled rows, as many stages as fit; the weight rows are wgmma's M (two warpgroups of 64),
// the tile's rows its N, in pieces of 64 and a last piece of 32 (a tile's rows rounded up to 32).
// Each weight byte is read once from memory per tile, and a tile's blocks run side by side, so the
// expert's weights come from HBM about once a layer (prefill of Qwen3-30B-A3B is as much weight
// reading, 1.2 GB a layer, as arithmetic). Rows read from `x` through `src` (gate/up: the sorted
// pair's token row; no gather kernel), or in place (down: act, already in sorted order).
// Rounding as the cuBLAS path: f32 accumulation, gate and up rounded before SwiGLU, outputs rounded.

#if defined(__CUDA_ARCH_FEAT_SM90_ALL) && Q_DTYPE != 0

#define EG_BK 64                                  // K a stage: one 128-byte swizzled row
#define EG_A_BYTES (128 * EG_BK * 2)              // 128 weight rows a stage
// Two builds of the kernel (mod.rs EXPERT_TILES): expert_gemm_128 takes tiles of up to 128 rows, two
// blocks an SM (112 KB of shared memory each), the default; expert_gemm_256 tiles of up to 256, one block
// an SM with 227 KB, twice the accumulators and registers (30B-A3B prefill 2k 0.933 of _128's; tiles of
// 64 rows, three blocks an SM, 0.920: RESULTS.md run 24.2).
#define EG_SMEM(MAXR) ((MAXR) == 256 ? 227 * 1024 : 112 * 1024)
#ifndef EG_MAX_STAGES  // tunable: QWEN3RS_CUDA_DEFINES (compile.rs)
#define EG_MAX_STAGES 8                           // stages at most (a stage holds 128 + the tile's rows)
#endif
// Each warpgroup's wgmma groups left in flight at the end of a step: 1, or 0 with EG_MMA_SERIAL
// (then loads can run a stage further ahead).
#ifdef EG_MMA_SERIAL  // tunable: QWEN3RS_CUDA_DEFINES (compile.rs)
#define EG_MMA_PENDING 0
#else
#define EG_MMA_PENDING 1
#endif

// Wait until at most n of this thread's cp.async groups are pending (n is an immediate in PTX).
__device__ __forceinline__ void eg_cp_wait(int n) {
    switch (n) {
    case 0: cp_async_wait_all(); break;
    case 1: asm volatile("cp.async.wait_group 1;" ::: "memory"); break;
    case 2: asm volatile("cp.async.wait_group 2;" ::: "memory"); break;
    case 3: asm volatile("cp.async.wait_group 3;" ::: "memory"); break;
    case 4: asm volatile("cp.async.wait_group 4;" ::: "memory"); break;
    case 5: asm volatile("cp.async.wait_group 5;" ::: "memory"); break;
    case 6: asm volatile("cp.async.wait_group 6;" ::: "memory"); break;
    default: asm volatile("cp.async.wait_group 7;" ::: "memory"); break;  // more stages: waits for more
    }
}

// One stage (64 of K) of a warpgroup's product: 64 weight rows × NP * 32 tile rows, in pieces of 64
// rows and a last of 32 when NP is odd; back to back, with no branch between them (ptxas then issues
// them as one batch). Descriptors step 32 bytes along K (+2) and 64 rows along the tile (+512).
template <int NP>
__device__ __forceinline__ void eg_stage(float* acc, unsigned long long da, unsigned long long db) {
#pragma unroll
    for (int ks = 0; ks < EG_BK / 16; ks++) {
#pragma unroll
        for (int j = 0; j < NP / 2; j++) wg_mma64(acc + 32 * j, da + 2 * ks, db + 2 * ks + 512 * j);
        if (NP & 1) wg_mma32(acc + 32 * (NP / 2), da + 2 * ks, db + 2 * ks + 512 * (NP / 2));
    }
}

// eg_stage for the tile's np = nt / 32 (at most MAXR / 32) pieces of 32 rows.
template <int MAXR>
__device__ __forceinline__ void eg_stage_n(int np, float* acc, unsigned long long da, unsigned long long db) {
    switch (np) {
    case 1: eg_stage<1>(acc, da, db); return;
    case 2: eg_stage<2>(acc, da, db); return;
    case 3: eg_stage<3>(acc, da, db); return;
    }
    if constexpr (MAXR == 128) {
        eg_stage<4>(acc, da, db);
    } else {
        switch (np) {
        case 4: eg_stage<4>(acc, da, db); return;
        case 5: eg_stage<5>(acc, da, db); return;
        case 6: eg_stage<6>(acc, da, db); return;
        case 7: eg_stage<7>(acc, da, db); return;
        default: eg_stage<8>(acc, da, db); return;
        }
    }
}

// out rows row0 .. row0 + rows of tile blockIdx.y (moe_sort's tiles; tile_e -1: none):
//   w1 set (gate/up):  out[r, n] = rnd(silu(rnd(x_r · w0[e, n]))) · rnd(x_r · w1[e, n]), n in blockIdx.x * 64 + [0, 64);
//   w1 null (down):    out[r, n] = x_r · w0[e, n],                                       n in blockIdx.x * 128 + [0, 128);
// x_r = x[src[r]] (src set) or x[r]; w0/w1 [E, N, K]; out [., N]. K % 64 == 0; N % 64 (gate/up) or
// % 128 (down) == 0. Tiles of at most MAXR rows; 256 threads, dynamic shared memory EG_SMEM(MAXR).
template <int MAXR>
__device__ __forceinline__ void expert_gemm_impl(act_t* out, const act_t* x, const int* src,
    const act_t* w0, const act_t* w1, const int* tile_e, const int* tile_row0, const int* tile_rows, int N, int K) {
    constexpr int ACC = MAXR / 2;  // accumulators a thread: 64 weight rows × MAXR tile rows / 128
    extern __shared__ __align__(1024) unsigned char eg_smem[];
    const int tile = blockIdx.y, e = tile_e[tile];
    if (e < 0) return;
    const int row0 = tile_row0[tile], rows = tile_rows[tile];
    const bool swiglu = w1 != nullptr;
    const int n0 = blockIdx.x * (swiglu ? 64 : 128);
    const int tid = threadIdx.x, wg = tid >> 7, warp = (tid >> 5) & 3, lane = tid & 31;
    const int nt = (rows + 31) & ~31;  // rows rounded up to 32
    const unsigned base = (static_cast<unsigned>(__cvta_generic_to_shared(eg_smem)) + 1023) & ~1023u;
    unsigned char* base_ptr = eg_smem + (base - static_cast<unsigned>(__cvta_generic_to_shared(eg_smem)));

    // This thread's copies a stage: 16-byte chunk c of shared rows tid / 8 + 32 q (A: 4 rows,
    // B: nt / 32 rows); the swizzled chunk is the same for all of them.
    const int c = tid & 7, r0 = tid >> 3;
    const unsigned sw = r0 * 128 + ((c ^ (r0 & 7)) << 4);
    const size_t wstride = (size_t)N * K;
    const act_t* a_src[4];
#pragma unroll
    for (int q = 0; q < 4; q++) {
        int r = r0 + 32 * q;
        a_src[q] = (swiglu && r >= 64) ? w1 + e * wstride + (size_t)(n0 + r - 64) * K : w0 + e * wstride + (size_t)(n0 + r) * K;
        a_src[q] += c * 8;
    }
    const act_t* b_src[MAXR / 32];
#pragma unroll
    for (int q = 0; q < MAXR / 32; q++) {
        int r = min(r0 + 32 * q, rows - 1);  // rows past the tile repeat its last (their columns are dropped)
        int xr = src ? src[row0 + r] : row0 + r;
        b_src[q] = x + (size_t)xr * K + c * 8;
    }
    // As many stages as fit (a stage: 128 weight rows and the tile's nt rows, 64 wide; at most
    // EG_MAX_STAGES): 4 for a tile of 256 rows, 6 for 160, 8 for 96 or fewer. Loads run `ahead`
    // stages ahead of the wgmma: stage kt + ahead goes where kt - 1 - EG_MMA_PENDING was, which both
    // warpgroups are done with once past the barrier of step kt (each waited for it in step kt - 1).
    const int stage_bytes = EG_A_BYTES + nt * 128;
    const int stages = max(2 + EG_MMA_PENDING, min(EG_MAX_STAGES, (EG_SMEM(MAXR) - 1024) / stage_bytes)), ahead = stages - 1 - EG_MMA_PENDING;
    auto load = [&](int slot, int kt) {
        const unsigned a = base + slot * stage_bytes, b = a + EG_A_BYTES;
        const int k0 = kt * EG_BK;
#pragma unroll
        for (int q = 0; q < 4; q++) cp_async16(a + sw + q * 32 * 128, a_src[q] + k0);
#pragma unroll
        for (int q = 0; q < MAXR / 32; q++)
            if (32 * q < nt) cp_async16(b + sw + q * 32 * 128, b_src[q] + k0);
    };

    float acc[ACC];
#pragma unroll
    for (int i = 0; i < ACC; i++) acc[i] = 0.f;
    const int KT = K / EG_BK;
    const unsigned long long desc0 = wg_desc(base);  // stage offsets add to it (base + 227 KB stays in its 14 bits)
    for (int s = 0; s < ahead; s++) {
        if (s < KT) load(s, s);
        cp_async_commit();
    }
    for (int kt = 0, slot = 0; kt < KT; kt++, slot = slot + 1 == stages ? 0 : slot + 1) {
        eg_cp_wait(ahead - 1);  // stage kt landed (one group a step, empty ones included)
        asm volatile("fence.proxy.async.shared::cta;" ::: "memory");  // cp.async writes, seen by wgmma
        __syncthreads();  // every thread's copies of stage kt landed; both warpgroups past their wait
        if (kt + ahead < KT) load((kt + ahead) % stages, kt + ahead);
        cp_async_commit();
        const unsigned long long da = desc0 + ((slot * stage_bytes + wg * 64 * 128) >> 4), db = desc0 + ((slot * stage_bytes + EG_A_BYTES) >> 4);
        wg_fence_acc<ACC>(acc);
        asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
        eg_stage_n<MAXR>(nt >> 5, acc, da, db);
        asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
        asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(EG_MMA_PENDING) : "memory");
        wg_fence_acc<ACC>(acc);
    }
    asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
    wg_fence_acc<ACC>(acc);
    cp_async_wait_all();
    __syncthreads();  // the stages are free: the epilogue stages the output tile there

    // The 128 × nt tile staged as act_t, [tile row][weight row] (rows padded by 16 bytes against bank
    // conflicts), then written out a 16-byte vector at a time by the whole block (the SwiGLU among
    // them: gate's weight rows are columns 0-63, up's 64-127). Accumulator i of a thread is weight row
    // 64 * wg + 16 * warp + lane / 4 (+ 8 for bit 1 of i % 32), tile row 64 * (i / 32) + 8 * (i % 32 / 4)
    // + 2 * (lane % 4) + i % 2: fixed offsets from one address, all 128 stored (rows past nt too,
    // there is room: one straight run of stores).
    const int pitch = 128 + 8;
    act_t* st = reinterpret_cast<act_t*>(base_ptr);
    act_t* mine = st + 2 * (lane & 3) * pitch + 64 * wg + 16 * warp + (lane >> 2);
#pragma unroll
    for (int i = 0; i < ACC; i++) mine[(64 * (i >> 5) + 8 * ((i & 31) >> 2) + (i & 1)) * pitch + 8 * ((i >> 1) & 1)] = from_f(acc[i]);
    __syncthreads();
    const int chunks = swiglu ? 8 : 16;  // 16-byte vectors of output a row
    for (int i = tid; i < rows * chunks; i += 256) {
        const int r = i / chunks, ch = i % chunks;
        uint4 v = *reinterpret_cast<const uint4*>(st + r * pitch + ch * 8);
        if (swiglu) {
            float g[VEC], u[VEC];
            unpack_vec(v, g);
            unpack_vec(*reinterpret_cast<const uint4*>(st + r * pitch + 64 + ch * 8), u);
#pragma unroll
            for (int k = 0; k < VEC; k++) g[k] = rnd(silu(g[k])) * u[k];  // as the swiglu kernel
            v = pack_vec(g);
        }
        *reinterpret_cast<uint4*>(out + (size_t)(row0 + r) * N + n0 + ch * 8) = v;
    }
}

#define EG_ARGS act_t* out, const act_t* x, const int* src, const act_t* w0, const act_t* w1, const int* tile_e, \
    const int* tile_row0, const int* tile_rows, int N, int K
#define EG_PASS out, x, src, w0, w1, tile_e, tile_row0, tile_rows, N, K
extern "C" __global__ void __launch_bounds__(256, 1) expert_gemm_256(EG_ARGS) { grid_dependency(); expert_gemm_impl<256>(EG_PASS); }
extern "C" __global__ void __launch_bounds__(256, 2) expert_gemm_128(EG_ARGS) { grid_dependency(); expert_gemm_impl<128>(EG_PASS); }

#endif
