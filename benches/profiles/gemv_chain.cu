// gemv_chain.cu: our own decode products (kernels/matmul.cu, bf16) timed as sync_cost.cu times its bare
// phases: PHASES launches back to back in a CUDA graph with programmatic dependent launch, as a decode
// step runs them, each launch on fresh weights (no L2 reuse). Where a product costs more than a bare
// phase of the same bytes (sync_cost.cu, RESULTS.md run 19.5), the variants below say which stage it is:
// the input staging in shared memory (_xs against plain), the fused RMSNorm (gemv3 / gemv_swiglu with
// and without a norm weight), the grid (the host's rows / 8 blocks against two blocks an SM). Also the
// decode attention (`attention_decode_rope_g2_d128`, 129 keys) with its splits merged in a cluster, with
// an attention_combine launch, and unsplit. And the lm_head (gemv_t1_xs, 151,936 rows of 1,024).
//
//   nvcc -O3 -arch=sm_90 -o /tmp/gemv_chain benches/profiles/gemv_chain.cu && /tmp/gemv_chain
//   /tmp/gemv_chain moe     (Qwen3-30B-A3B's decode layer instead: moe_30b below; 60 GB, ~1 min)
//
// The bare phase of sync_cost.cu (phase.cuh) runs first, for a same-call reference. Prints µs a launch.
#include "phase.cuh"
#include "timing.cuh"

#include <string>
#include <vector>

#define Q_DTYPE 1
#include "../../src/backend/cuda/kernels/common.cuh"
#include "../../src/backend/cuda/kernels/matmul.cu"
#include "../../src/backend/cuda/kernels/attention.cu"

constexpr int PHASES = 200, REPS = 10;

static cudaStream_t st;

// Time `launch(p)` for p < phases captured into one graph: µs a launch.
template <class F>
double time_chain(F launch, int phases = PHASES) {
    cudaGraph_t g;
    cudaGraphExec_t ge;
    CHECK(cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal));
    for (int p = 0; p < phases; p++) launch(p);
    CHECK(cudaStreamEndCapture(st, &g));
    CHECK(cudaGraphInstantiate(&ge, g, 0));
    cudaEvent_t e0, e1;
    CHECK(cudaEventCreate(&e0));
    CHECK(cudaEventCreate(&e1));
    CHECK(cudaGraphLaunch(ge, st));
    CHECK(cudaEventRecord(e0, st));
    for (int r = 0; r < REPS; r++) CHECK(cudaGraphLaunch(ge, st));
    CHECK(cudaEventRecord(e1, st));
    CHECK(cudaEventSynchronize(e1));
    float ms = 0;
    CHECK(cudaEventElapsedTime(&ms, e0, e1));
    CHECK(cudaGraphExecDestroy(ge));
    CHECK(cudaGraphDestroy(g));
    return ms * 1e3 / REPS / phases;
}

// A PDL launch of `kernel` on the profile's stream (timing.cuh launch_pdl_on).
template <class... K, class... A>
void launch_pdl(void (*kernel)(K...), dim3 grid, size_t smem, int block, int cluster, A... args) {
    launch_pdl_on(st, kernel, grid, smem, block, cluster, args...);
}

template <class... K, class... A>
void launch_pdl(void (*kernel)(K...), int grid, size_t smem, A... args) {
    launch_pdl(kernel, dim3(grid), smem, 256, 1, args...);
}

// gpu.rs persistent_grid: resident blocks on the GPU, at most `useful`.
template <class... K>
int persistent_grid(void (*kernel)(K...), size_t smem, int useful, int sms) {
    int per_sm = 0;
    CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, 256, smem));
    return per_sm * sms < useful ? per_sm * sms : useful;
}

static void row(const char* name, int grid, double mb, double us) { printf("%-44s %6d %8.1f %9.2f\n", name, grid, mb, us); }

// The bare phase (phase.cuh) of `mb` MB on `grid` blocks reading w, `phases` launches: µs a launch.
static double bare_phase(const uint4* w, double mb, int grid, float* res, int phases = PHASES) {
    size_t vecs = (size_t)(mb * 1e6) / 16;
    return time_chain([&](int p) { launch_pdl(phase_kernel, grid, 0, w, vecs, res, p, 1, 0); }, phases);
}

static void dense_0_6b(int sms) {
    // Qwen3-0.6B's decode products: hidden 1024, q 2048, kv 1024, intermediate 3072.
    const int H = 1024, Q = 2048, KV = 1024, I = 3072;
    const size_t per_phase = (size_t)(Q + 2 * KV) * H * 2 + (size_t)2 * I * H * 2;  // the largest: gemv3 or gate + up
    act_t* w;
    CHECK(cudaMalloc(&w, per_phase * PHASES));
    CHECK(cudaMemset(w, 0x3c, per_phase * PHASES));  // bf16 0x3c3c ~ 0.0115
    act_t *x, *out, *o1, *o2, *delta, *x_out, *nw;
    float* res;
    CHECK(cudaMalloc(&x, 64 << 10));
    CHECK(cudaMemset(x, 0x3c, 64 << 10));
    CHECK(cudaMalloc(&delta, 64 << 10));
    CHECK(cudaMemset(delta, 0x3c, 64 << 10));
    CHECK(cudaMalloc(&nw, 64 << 10));
    CHECK(cudaMemset(nw, 0x3c, 64 << 10));
    CHECK(cudaMalloc(&out, 64 << 10));
    CHECK(cudaMalloc(&o1, 64 << 10));
    CHECK(cudaMalloc(&o2, 64 << 10));
    CHECK(cudaMalloc(&x_out, 64 << 10));
    CHECK(cudaMalloc(&res, (size_t)PHASES * 2 * sms * sizeof(float)));  // phase.cuh: [phases, grid]
    CHECK(cudaMemset(res, 0, (size_t)PHASES * 2 * sms * sizeof(float)));
    auto wp = [&](int p) { return w + (per_phase / 2) * p; };  // act_t elements a phase
    const act_t* none = nullptr;
    act_t* none_out = nullptr;
    printf("%d SMs; Qwen3-0.6B decode shapes, bf16, T = 1; %d launches a graph, PDL; us a launch\n", sms, PHASES);
    printf("%-44s %6s %8s %9s\n", "kernel", "grid", "MB", "us");
    for (double mb : {4.19, 8.39, 12.58}) row("bare phase (phase.cuh, as sync_cost.cu)", 2 * sms, mb, bare_phase((const uint4*)w, mb, 2 * sms, res));
    // o projection: x [1, 2048] -> [1, 1024]; down: x [1, 3072] -> [1, 1024].
    for (int K : {Q, I}) {
        double mb = (double)H * K * 2 / 1e6;
        const char* what = K == Q ? "o proj" : "down";
        for (int xs = 1; xs >= 0; xs--) {
            auto kernel = xs ? gemv_t1_xs : gemv_t1;
            size_t smem = xs ? K * 2 : 0;
            CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 64 << 10));
            int host_grid = persistent_grid(kernel, smem, H / 8, sms);
            char name[64];
            for (int grid : {host_grid, 2 * sms}) {
                double us = time_chain([&](int p) { launch_pdl(kernel, grid, smem, out, (const act_t*)x, (const act_t*)wp(p), 1, H, K); });
                snprintf(name, sizeof name, "%s gemv_t1%s%s", what, xs ? "_xs" : "", grid == host_grid ? " (host grid)" : "");
                row(name, grid, mb, us);
            }
        }
    }
    // q/k/v: normed x [1, 1024] -> q 2048, k 1024, v 1024; with and without the fused add + norm.
    for (int norm = 1; norm >= 0; norm--) {
        size_t smem = H * 2;
        int grid = persistent_grid(gemv3_t1_xs, smem, (Q + 2 * KV) / 8, sms);
        double us = time_chain([&](int p) {
            const act_t* w0 = wp(p);
            launch_pdl(gemv3_t1_xs, grid, smem, out, w0, Q, o1, w0 + (size_t)Q * H, KV, o2, w0 + (size_t)(Q + KV) * H, KV, (const act_t*)x, 1, H,
                norm ? (const act_t*)delta : none, norm ? x_out : none_out, norm ? (const act_t*)nw : none, 1e-6f);
        });
        row(norm ? "q/k/v gemv3_t1_xs, add + norm fused" : "q/k/v gemv3_t1_xs, no norm", grid, (double)(Q + 2 * KV) * H * 2 / 1e6, us);
    }
    // gate + up + SwiGLU: normed x [1, 1024] -> [1, 3072].
    for (int norm = 1; norm >= 0; norm--) {
        size_t smem = H * 2;
        int grid = persistent_grid(gemv_swiglu_t1_xs, smem, I / 8, sms);
        double us = time_chain([&](int p) {
            const act_t* g = wp(p);
            launch_pdl(gemv_swiglu_t1_xs, grid, smem, out, (const act_t*)x, g, g + (size_t)I * H, 1, I, H,
                norm ? (const act_t*)delta : none, norm ? x_out : none_out, norm ? (const act_t*)nw : none, 1e-6f);
        });
        row(norm ? "gate/up gemv_swiglu_t1_xs, add + norm fused" : "gate/up gemv_swiglu_t1_xs, no norm", grid, (double)2 * I * H * 2 / 1e6, us);
    }
    // The lm_head: x [1, 1024] -> [1, 151936], 311 MB, LM launches on their own weights.
    const int V = 151936, LM = 12;
    act_t *lw, *logits;
    {
        CHECK(cudaMalloc(&lw, (size_t)V * H * 2 * LM));
        CHECK(cudaMemset(lw, 0x3c, (size_t)V * H * 2 * LM));
        CHECK(cudaMalloc(&logits, (size_t)V * 2));
        size_t smem = H * 2;
        int grid = persistent_grid(gemv_t1_xs, smem, V / 8, sms);
        double us = time_chain([&](int p) { launch_pdl(gemv_t1_xs, grid, smem, logits, (const act_t*)x, (const act_t*)(lw + (size_t)V * H * p), 1, V, H); }, LM);
        row("lm_head gemv_t1_xs (host grid)", grid, (double)V * H * 2 / 1e6, us);
        printf("%-44s %6s %8s %9.2f\n", "  its bandwidth, TB/s", "", "", (double)V * H * 2 / us / 1e6);
    }
    // Decode attention, one row at position 128 (129 keys with its own), 16 heads over 8 KV heads of 128,
    // paged blocks of 16 keys; each launch its own layer's cache (no L2 reuse).
    {
        const int NH = 16, NKV = 8, HD = 128, BS = 16, CTX = 129, NB = (CTX + BS - 1) / BS, KVD = NKV * HD;
        const size_t layer = (size_t)NB * BS * KVD;
        act_t *kc, *vc, *qn, *kn;
        float *rope, *ml, *acc;
        unsigned* meta;
        CHECK(cudaMalloc(&kc, layer * 2 * PHASES));
        CHECK(cudaMalloc(&vc, layer * 2 * PHASES));
        CHECK(cudaMemset(kc, 0x3c, layer * 2 * PHASES));
        CHECK(cudaMemset(vc, 0x3c, layer * 2 * PHASES));
        CHECK(cudaMalloc(&qn, HD * 2));
        CHECK(cudaMalloc(&kn, HD * 2));
        CHECK(cudaMemset(qn, 0x3c, HD * 2));
        CHECK(cudaMemset(kn, 0x3c, HD * 2));
        CHECK(cudaMalloc(&rope, 256 * HD * sizeof(float)));
        CHECK(cudaMemset(rope, 0, 256 * HD * sizeof(float)));
        CHECK(cudaMalloc(&ml, 16 * NH * 2 * sizeof(float)));
        CHECK(cudaMalloc(&acc, 16 * NH * HD * sizeof(float)));
        // meta: row_ctx [1], row_table [1], positions [1], then the block table [NB].
        unsigned host_meta[3 + NB] = {CTX, 0, CTX - 1};
        for (int b = 0; b < NB; b++) host_meta[3 + b] = b;
        CHECK(cudaMalloc(&meta, sizeof host_meta));
        CHECK(cudaMemcpy(meta, host_meta, sizeof host_meta, cudaMemcpyHostToDevice));
        CHECK(cudaFuncSetAttribute(attention_decode_rope_g2_d128, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
        const float scale = 0.08838835f;
        for (int splits : {16, 8, 1}) {
            for (int cluster = 1; cluster >= 0; cluster--) {
                if (splits == 1 && !cluster) continue;
                double us = time_chain([&](int p) {
                    launch_pdl(attention_decode_rope_g2_d128, dim3(NH / 2, 1, splits), 0, 128, cluster && splits > 1 ? splits : 1, out, ml, acc,
                        (const act_t*)x, kc + layer * p, vc + layer * p, (const unsigned*)meta, (const unsigned*)meta + 1, (const unsigned*)meta + 3,
                        NH, NKV, BS, KVD, scale, (const act_t*)delta, (const act_t*)nw, (const act_t*)qn, (const act_t*)kn, (const float*)rope,
                        (const unsigned*)meta + 2, 1e-6f);
                    if (splits > 1 && !cluster)
                        launch_pdl(attention_combine, dim3(NH), 0, 128, 1, out, (const float*)ml, (const float*)acc, NH, HD, splits);
                });
                char name[64];
                snprintf(name, sizeof name, "attention rope g2 d128, %d splits%s", splits,
                    splits == 1 ? "" : cluster ? " in a cluster" : " + combine launch");
                row(name, NH / 2 * splits, (double)CTX * KVD * 4 / 1e6, us);
            }
        }
        // A whole 0.6B decode step's body as the model launches it: per layer q/k/v with the input
        // norm, attention (16 splits in a cluster), o, gate/up with the post-attention norm, down;
        // 28 layers on their own weights and caches, then the lm_head. Against the sum of the kernels
        // timed alone above: what neighbours cost each other.
        const int LAYERS = 28;
        act_t *q, *k, *v, *att, *o_out, *act, *resid, *resid2, *down;
        for (act_t** b : {&q, &k, &v, &att, &o_out, &act, &resid, &resid2, &down}) {
            CHECK(cudaMalloc(b, 64 << 10));
            CHECK(cudaMemset(*b, 0x3c, 64 << 10));
        }
        CHECK(cudaFuncSetAttribute(gemv_t1_xs, cudaFuncAttributeMaxDynamicSharedMemorySize, 64 << 10));
        const int g_qkv = persistent_grid(gemv3_t1_xs, H * 2, (Q + 2 * KV) / 8, sms), g_o = persistent_grid(gemv_t1_xs, Q * 2, H / 8, sms);
        const int g_mlp = persistent_grid(gemv_swiglu_t1_xs, H * 2, I / 8, sms), g_down = persistent_grid(gemv_t1_xs, I * 2, H / 8, sms);
        const int g_lm = persistent_grid(gemv_t1_xs, H * 2, V / 8, sms);
        double us = time_chain([&](int l) {
            if (l == LAYERS) {
                launch_pdl(gemv_t1_xs, g_lm, H * 2, logits, (const act_t*)resid, (const act_t*)lw, 1, V, H);
                return;
            }
            const act_t* a = wp(l);  // q/k/v, then gate/up
            const act_t* b = wp(l + LAYERS);  // o, then down
            launch_pdl(gemv3_t1_xs, g_qkv, H * 2, q, a, Q, k, a + (size_t)Q * H, KV, v, a + (size_t)(Q + KV) * H, KV, (const act_t*)resid, 1, H,
                (const act_t*)down, resid2, (const act_t*)nw, 1e-6f);
            launch_pdl(attention_decode_rope_g2_d128, dim3(NH / 2, 1, 16), 0, 128, 16, att, ml, acc, (const act_t*)q, kc + layer * l, vc + layer * l,
                (const unsigned*)meta, (const unsigned*)meta + 1, (const unsigned*)meta + 3, NH, NKV, BS, KVD, scale, (const act_t*)k, (const act_t*)v,
                (const act_t*)qn, (const act_t*)kn, (const float*)rope, (const unsigned*)meta + 2, 1e-6f);
            launch_pdl(gemv_t1_xs, g_o, Q * 2, o_out, (const act_t*)att, b, 1, H, Q);
            launch_pdl(gemv_swiglu_t1_xs, g_mlp, H * 2, act, (const act_t*)resid2, a + (size_t)(Q + 2 * KV) * H, a + (size_t)(Q + 2 * KV + I) * H, 1, I, H,
                (const act_t*)o_out, resid, (const act_t*)nw, 1e-6f);
            launch_pdl(gemv_t1_xs, g_down, I * 2, down, (const act_t*)act, b + (size_t)H * Q, 1, H, I);
        }, LAYERS + 1);
        printf("%-44s %6s %8s %9.1f\n", "0.6B step body: 28 layers + lm_head, us", "", "", us * (LAYERS + 1));
        printf("%-44s %6s %8s %9.1f\n", "  as tok/s (no embed, argmax, host)", "", "", 1e6 / (us * (LAYERS + 1)));
    }
}

// Qwen3-30B-A3B's decode layer (hidden 2048; q 32 heads, k/v 4 heads of 128; 128 experts of 768, top 8)
// as the host launches it with T = 1: q/k/v with the input norm, attention (129 keys, 16 splits in a
// cluster), o, router_logits with the post-attention norm (it stores the residual), the experts' gate/up
// routing for themselves from the logits (moe_gemv_swiglu_xs, reading the rows the router normed), their
// down projection with the weighted combine (moe_down_combine_xs). Each kernel alone, then 48 layers and
// the lm_head as one step. Every layer has its own weights, all 128 experts (60 GB in all, as the model).
// The routing: fixed (all weights equal, so the router picks experts 0-7 everywhere: few pages, warm
// TLBs) or random (the experts read logits drawn at random for each launch instead of the router's: as a
// real step, other experts, and other pages, each token).
static void moe_30b(int sms) {
    const int H = 2048, Q = 4096, KV = 512, E = 128, TOPK = 8, I = 768, V = 151936, NH = 32, NKV = 4, HD = 128;
    const int LW = 48, LAYERS = 48, ALONE = 48;
    const size_t qkv_e = (size_t)(Q + 2 * KV) * H, o_e = (size_t)H * Q, r_e = (size_t)E * H, x_e = (size_t)E * I * H;
    const size_t layer_e = qkv_e + o_e + r_e + 3 * x_e;
    act_t* wl;
    CHECK(cudaMalloc(&wl, layer_e * 2 * LW));
    CHECK(cudaMemset(wl, 0x3c, layer_e * 2 * LW));
    auto qkv_w = [&](int l) { return (const act_t*)wl + layer_e * (l % LW); };
    auto o_w = [&](int l) { return qkv_w(l) + qkv_e; };
    auto router_w = [&](int l) { return o_w(l) + o_e; };
    auto gate_w = [&](int l) { return router_w(l) + r_e; };
    auto up_w = [&](int l) { return gate_w(l) + x_e; };
    auto down_w = [&](int l) { return up_w(l) + x_e; };
    act_t *resid, *resid2, *moe_out, *q, *k, *v, *att, *o_out, *act, *nw, *lw, *logits;
    act_t* xn;  // the normed input router_logits stores for the experts
    for (act_t** b : {&resid, &resid2, &moe_out, &q, &k, &v, &att, &o_out, &act, &nw, &xn}) {
        CHECK(cudaMalloc(b, 64 << 10));
        CHECK(cudaMemset(*b, 0x3c, 64 << 10));
    }
    CHECK(cudaMalloc(&lw, (size_t)V * H * 2));
    CHECK(cudaMemset(lw, 0x3c, (size_t)V * H * 2));
    CHECK(cudaMalloc(&logits, (size_t)V * 2));
    float *probs, *weights, *res, *ml, *acc, *rope, *random_logits;
    int* ids;
    CHECK(cudaMalloc(&probs, E * sizeof(float)));
    {  // [ALONE][E] logits of a fixed pseudo-random draw
        std::vector<float> host((size_t)ALONE * E);
        unsigned state = 12345u;
        for (float& f : host) {
            state = state * 1664525u + 1013904223u;
            f = (float)(state >> 8) / (float)(1u << 24) * 4.f;
        }
        CHECK(cudaMalloc(&random_logits, host.size() * sizeof(float)));
        CHECK(cudaMemcpy(random_logits, host.data(), host.size() * sizeof(float), cudaMemcpyHostToDevice));
    }
    bool random_routing = false;
    CHECK(cudaMalloc(&weights, TOPK * sizeof(float)));
    CHECK(cudaMalloc(&ids, TOPK * sizeof(int)));
    CHECK(cudaMalloc(&res, (size_t)PHASES * 2 * sms * sizeof(float)));
    CHECK(cudaMemset(res, 0, (size_t)PHASES * 2 * sms * sizeof(float)));
    CHECK(cudaMalloc(&ml, 16 * NH * 2 * sizeof(float)));
    CHECK(cudaMalloc(&acc, 16 * NH * HD * sizeof(float)));
    CHECK(cudaMalloc(&rope, 256 * HD * sizeof(float)));
    CHECK(cudaMemset(rope, 0, 256 * HD * sizeof(float)));
    // The KV cache of each weight layer: 129 keys in paged blocks of 16; meta as in dense_0_6b.
    const int BS = 16, CTX = 129, NB = (CTX + BS - 1) / BS, KVD = NKV * HD;
    const size_t cache = (size_t)NB * BS * KVD;
    act_t *kc, *vc;
    CHECK(cudaMalloc(&kc, cache * 2 * LW));
    CHECK(cudaMalloc(&vc, cache * 2 * LW));
    CHECK(cudaMemset(kc, 0x3c, cache * 2 * LW));
    CHECK(cudaMemset(vc, 0x3c, cache * 2 * LW));
    unsigned host_meta[3 + NB] = {CTX, 0, CTX - 1};
    for (int b = 0; b < NB; b++) host_meta[3 + b] = b;
    unsigned* meta;
    CHECK(cudaMalloc(&meta, sizeof host_meta));
    CHECK(cudaMemcpy(meta, host_meta, sizeof host_meta, cudaMemcpyHostToDevice));
    CHECK(cudaFuncSetAttribute(attention_decode_rope_g2_d128, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
    const float scale = 0.08838835f, eps = 1e-6f;

    const int g_qkv = persistent_grid(gemv3_t1_xs, H * 2, (Q + 2 * KV) / 8, sms), g_o = persistent_grid(gemv_t1_xs, Q * 2, H / 8, sms);
    const int g_up = persistent_grid(moe_gemv_swiglu_xs, H * 2, TOPK * I / 8, sms);
    const int g_down = persistent_grid(moe_down_combine_xs, TOPK * I * 2, H * 2 / 8, sms), g_lm = persistent_grid(gemv_t1_xs, H * 2, V / 8, sms);
    auto qkv = [&](int l) {
        launch_pdl(gemv3_t1_xs, g_qkv, H * 2, q, qkv_w(l), Q, k, qkv_w(l) + (size_t)Q * H, KV, v, qkv_w(l) + (size_t)(Q + KV) * H, KV,
            (const act_t*)resid, 1, H, (const act_t*)moe_out, resid2, (const act_t*)nw, eps);
    };
    auto attention = [&](int l) {
        launch_pdl(attention_decode_rope_g2_d128, dim3(NKV * (NH / NKV / 2), 1, 16), 0, 128, 16, att, ml, acc, (const act_t*)q,
            kc + cache * (l % LW), vc + cache * (l % LW), (const unsigned*)meta, (const unsigned*)meta + 1, (const unsigned*)meta + 3, NH, NKV,
            BS, KVD, scale, (const act_t*)k, (const act_t*)v, (const act_t*)nw, (const act_t*)nw, (const float*)rope, (const unsigned*)meta + 2, eps);
    };
    auto o_proj = [&](int l) { launch_pdl(gemv_t1_xs, g_o, Q * 2, o_out, (const act_t*)att, o_w(l), 1, H, Q); };
    auto router = [&](int l) {
        launch_pdl(router_logits, dim3(E / 8), H * 2, 256, 1, probs, (const act_t*)resid2, router_w(l), E, H, (const act_t*)o_out, resid,
            (const act_t*)nw, eps, xn);
    };
    auto experts_up = [&](int l) {
        const float* route = random_routing ? random_logits + (size_t)(l % ALONE) * E : probs;
        launch_pdl(moe_gemv_swiglu_xs, g_up, H * 2, act, (const act_t*)xn, gate_w(l), up_w(l), ids, weights, route,
            (const unsigned long long*)nullptr, (const act_t*)nullptr, 0.f, E, 1, 0, E, TOPK, TOPK, I, H);
    };
    auto experts_down = [&](int l) {
        launch_pdl(moe_down_combine_xs, g_down, TOPK * I * 2, moe_out, (const act_t*)act, down_w(l), (const int*)ids, (const float*)weights,
            1, TOPK, H, I, (unsigned long long*)nullptr, 0);
    };
    printf("%d SMs; Qwen3-30B-A3B decode layer, bf16, T = 1; %d launches a graph, PDL, %d weight layers; us a launch\n", sms, ALONE, LW);
    printf("%-44s %6s %8s %9s\n", "kernel", "grid", "MB", "us");
    for (double mb : {16.8, 21.0, 25.2, 50.3}) row("bare phase (phase.cuh)", 2 * sms, mb, bare_phase((const uint4*)wl, mb, 2 * sms, res, ALONE));
    row("q/k/v gemv3_t1_xs, add + norm fused", g_qkv, qkv_e * 2 / 1e6, time_chain(qkv, ALONE));
    row("attention rope g2 d128, 16 splits in a cluster", NKV * 4 * 16, (double)CTX * KVD * 4 / 1e6, time_chain(attention, ALONE));
    row("o proj gemv_t1_xs", g_o, o_e * 2 / 1e6, time_chain(o_proj, ALONE));
    row("router_logits, add + norm fused", E / 8, r_e * 2 / 1e6, time_chain(router, ALONE));
    const double up_mb = (double)TOPK * 2 * I * H * 2 / 1e6, down_mb = (double)TOPK * I * H * 2 / 1e6;
    row("experts gate/up moe_gemv_swiglu_xs, fixed", g_up, up_mb, time_chain(experts_up, ALONE));
    // down alone: its ids come from a gate/up launch; timed as the pair minus gate/up alone.
    auto pair = [&](int l) { experts_up(l); experts_down(l); };
    row("experts down moe_down_combine_xs, fixed", g_down, down_mb, time_chain(pair, ALONE) - time_chain(experts_up, ALONE));
    // Where gate/up's time over the bare phase goes: the same kernel without its in-kernel routing
    // (logits null: the ids the launches above stored); and the dense gemv_swiglu_t1_xs over the same
    // bytes (the 8 experts' 6,144 gate/up row pairs read as one [6144, 2048] pair of matrices), which
    // has neither the routing nor an expert's rows per warp.
    auto unrouted = [&](int l) {
        launch_pdl(moe_gemv_swiglu_xs, g_up, H * 2, act, (const act_t*)xn, gate_w(l), up_w(l), ids, weights, (const float*)nullptr,
            (const unsigned long long*)nullptr, (const act_t*)nullptr, 0.f, E, 1, 0, E, TOPK, TOPK, I, H);
    };
    row("  gate/up without its routing", g_up, up_mb, time_chain(unrouted, ALONE));
    const int g_dense = persistent_grid(gemv_swiglu_t1_xs, H * 2, TOPK * I / 8, sms);
    auto dense_up = [&](int l) {
        launch_pdl(gemv_swiglu_t1_xs, g_dense, H * 2, act, (const act_t*)resid, gate_w(l), up_w(l), 1, TOPK * I, H, (const act_t*)nullptr,
            (act_t*)nullptr, (const act_t*)nullptr, eps);
    };
    row("  dense gemv_swiglu_t1_xs, same bytes", g_dense, up_mb, time_chain(dense_up, ALONE));
    // The same for down: the dense gemv_t1_xs over the 8 experts' rows ([16384, 768] read as one matrix).
    const int g_dense_down = persistent_grid(gemv_t1_xs, I * 2, TOPK * H / 8, sms);
    auto dense_down = [&](int l) { launch_pdl(gemv_t1_xs, g_dense_down, I * 2, moe_out, (const act_t*)act, down_w(l), 1, TOPK * H, I); };
    row("  dense gemv_t1_xs (down's bytes, rows of 768)", g_dense_down, down_mb, time_chain(dense_down, ALONE));
    random_routing = true;
    row("experts gate/up, random routing", g_up, up_mb, time_chain(experts_up, ALONE));
    row("experts down, random routing", g_down, down_mb, time_chain(pair, ALONE) - time_chain(experts_up, ALONE));
    random_routing = false;
    auto step = [&](int l) {
        if (l == LAYERS) {
            launch_pdl(gemv_t1_xs, g_lm, H * 2, logits, (const act_t*)resid, (const act_t*)lw, 1, V, H);
            return;
        }
        qkv(l);
        attention(l);
        o_proj(l);
        router(l);
        experts_up(l);
        experts_down(l);
    };
    for (bool random : {false, true}) {
        random_routing = random;
        double us = time_chain(step, LAYERS + 1) * (LAYERS + 1);
        printf("%-44s %6s %8s %9.1f\n", random ? "step body, random routing, us" : "30B-A3B step body: 48 layers + lm_head, us", "", "", us);
        printf("%-44s %6s %8s %9.1f\n", "  as tok/s (no embed, argmax, host)", "", "", 1e6 / us);
    }
}

int main(int argc, char** argv) {
    int sms = 0;
    CHECK(cudaSetDevice(0));
    CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
    CHECK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
    if (argc > 1 && std::string(argv[1]) == "moe") moe_30b(sms);
    else dense_0_6b(sms);
    return 0;
}
