//! Op by op, the CUDA backend against the scalar CPU reference (`test-backend-ops` style): every
//! `Backend` op on random inputs, odd sizes included (T = 1, 7, 9, 33; K not a multiple of 8;
//! head_dim 64 and 128; GQA; several sequences with paged blocks), in f32 and bf16. Both backends
//! get the same inputs (rounded to the compute dtype) and the result is compared by
//! ‖gpu − cpu‖ / ‖cpu‖ against the bars below. Prints SKIP and passes where no GPU is usable.
//!
//! Bars (why): f32 — both compute in f32 and differ only in summation order and FMA contraction:
//! 1e-5 for pointwise / per-row ops, 1e-4 for reductions over K or the context (matmul, attention,
//! MoE). bf16 — both round each op's output to bf16 at the same points, so differences are the
//! rare element whose f32 value lands on the other side of a bf16 rounding boundary (one bf16 ulp,
//! 2^-8 relative): 1e-2 for every op. Integer results (argmax) must be identical.
#![cfg(feature = "cuda")]

use qwen3rs::backend::cpu::CpuBackend;
use qwen3rs::backend::cuda::{self, CudaBackend};
use qwen3rs::backend::{AttnShape, Backend, BatchInfo, BlockInput, MoeDummy, MoeHost, SeqSlot};
use qwen3rs::model::dummy::DummySpec;
use qwen3rs::tensor::{DType, HostTensor, Window};
use qwen3rs::Error;

// f16 joined in session 2; its first GPU run is still to come (the prefill-attention test already ran it).
const DTYPES: [DType; 3] = [DType::F32, DType::BF16, DType::F16];

fn bars(dtype: DType) -> (f64, f64) {
    match dtype {
        DType::F32 => (1e-5, 1e-4),
        _ => (1e-2, 1e-2),
    }
}

fn gpu(dtype: DType) -> Option<CudaBackend> {
    if !cuda::available() {
        eprintln!("SKIP (no usable GPU): {}", cuda::unavailable_reason().unwrap_or_default());
        return None;
    }
    Some(CudaBackend::new(0, dtype).expect("CUDA is available but the backend failed"))
}

/// splitmix64-based uniform values in [-scale, scale).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn uniform(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| ((self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale).collect()
    }
    fn below(&mut self, n: u32) -> u32 {
        (self.next() % n as u64) as u32
    }
}

fn tensor(values: &[f32], shape: &[usize]) -> HostTensor {
    HostTensor::from_f32(values, shape.to_vec())
}

fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    assert!(got.iter().all(|v| v.is_finite()), "non-finite GPU output");
    let num: f64 = got.iter().zip(want).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
    let den: f64 = want.iter().map(|b| (*b as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

fn check(what: &str, dtype: DType, got: &[f32], want: &[f32], bar: f64) {
    let e = rel_err(got, want);
    eprintln!("{what:<48} {:>8} rel err {e:.2e} (bar {bar:.0e})", dtype.name());
    assert!(e <= bar, "{what} {}: relative error {e:.3e} > {bar:.0e}", dtype.name());
}

/// `got` and `want` are the same bits, element for element.
fn same_bits(what: &str, dtype: DType, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what} {}: lengths", dtype.name());
    let diff = got.iter().zip(want).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
    assert_eq!(diff, 0, "{what} {}: {diff} of {} elements differ", dtype.name(), got.len());
}

// ---- generic op runners: the same code on either backend ----

fn run_embed<B: Backend>(be: &B, table: &HostTensor, ids: &[u32]) -> Vec<f32> {
    let w = be.upload(table.clone()).unwrap();
    let mut out = be.alloc(ids.len(), table.shape[1]).unwrap();
    be.embed(&mut out, &w, ids).unwrap();
    be.download(&out).unwrap()
}

fn run_add_rms<B: Backend>(be: &B, x: &[f32], d: Option<&[f32]>, t: usize, c: usize, w: &HostTensor) -> (Vec<f32>, Vec<f32>) {
    let xb = be.upload_buf(t, c, x).unwrap();
    let delta = d.map(|d| be.upload_buf(t, c, d).unwrap());
    let w = be.upload(w.clone()).unwrap();
    let (mut x_out, mut out) = (be.alloc(t, c).unwrap(), be.alloc(t, c).unwrap());
    be.add_rms_norm(&mut x_out, &mut out, &BlockInput { x: &xb, delta: delta.as_ref(), norm: &w, eps: 1e-6 }).unwrap();
    (be.download(&x_out).unwrap(), be.download(&out).unwrap())
}

/// The products a block input feeds, fused with its residual add and norm (`norm_matmul_many` etc.).
enum Fed<'a> {
    Qkv(&'a [HostTensor; 3]),
    Swiglu(&'a HostTensor, &'a HostTensor),
    Moe(&'a MoeHost),
}

/// x_out and the products of one fused block input: x (+ d) normed with w, then `fed`.
fn run_block_input<B: Backend>(
    be: &B,
    x: &[f32],
    d: Option<&[f32]>,
    t: usize,
    k: usize,
    w: &HostTensor,
    fed: &Fed,
) -> (Vec<f32>, Vec<f32>) {
    let xb = be.upload_buf(t, k, x).unwrap();
    let delta = d.map(|d| be.upload_buf(t, k, d).unwrap());
    let nw = be.upload(w.clone()).unwrap();
    let input = BlockInput { x: &xb, delta: delta.as_ref(), norm: &nw, eps: 1e-6 };
    let (mut x_out, mut h) = (be.alloc(t, k).unwrap(), be.alloc(t, k).unwrap());
    let up = |w: &HostTensor| be.upload(w.clone()).unwrap();
    let out = match fed {
        Fed::Qkv(ws) => {
            let w: Vec<B::Weight> = ws.iter().map(up).collect();
            let mut o: Vec<B::Buf> = ws.iter().map(|w| be.alloc(t, w.shape[0]).unwrap()).collect();
            let [a, b, c] = &mut o[..] else { unreachable!() };
            be.norm_matmul_many(&mut x_out, &mut h, &input, &mut [a, b, c], &[&w[0], &w[1], &w[2]]).unwrap();
            o.iter().flat_map(|b| be.download(b).unwrap()).collect()
        }
        Fed::Swiglu(gate, upw) => {
            let n = gate.shape[0];
            let (mut out, mut g, mut u) = (be.alloc(t, n).unwrap(), be.alloc(t, n).unwrap(), be.alloc(t, n).unwrap());
            be.norm_matmul_swiglu(&mut x_out, &mut h, &input, &mut out, &mut g, &mut u, &up(gate), &up(upw)).unwrap();
            be.download(&out).unwrap()
        }
        Fed::Moe(moe) => {
            let m = be.upload_moe(copy_moe(moe)).unwrap();
            let mut out = be.alloc(t, k).unwrap();
            be.norm_moe(&mut x_out, &mut h, &input, &mut out, &m).unwrap();
            be.download(&out).unwrap()
        }
    };
    (be.download(&x_out).unwrap(), out)
}

fn run_matmul<B: Backend>(be: &B, x: &[f32], t: usize, w: &HostTensor) -> Vec<f32> {
    let (n, k) = (w.shape[0], w.shape[1]);
    let xb = be.upload_buf(t, k, x).unwrap();
    let w = be.upload(w.clone()).unwrap();
    let mut out = be.alloc(t, n).unwrap();
    be.matmul(&mut out, &xb, &w).unwrap();
    be.download(&out).unwrap()
}

#[allow(clippy::too_many_arguments)]
fn run_qk<B: Backend>(
    be: &B,
    q: &[f32],
    k: &[f32],
    qn: &HostTensor,
    kn: &HostTensor,
    rope: &HostTensor,
    pos: &[u32],
    s: AttnShape,
) -> (Vec<f32>, Vec<f32>) {
    let t = pos.len();
    let mut qb = be.upload_buf(t, s.n_heads * s.head_dim, q).unwrap();
    let mut kb = be.upload_buf(t, s.n_kv_heads * s.head_dim, k).unwrap();
    let (qn, kn, rope) = (be.upload(qn.clone()).unwrap(), be.upload(kn.clone()).unwrap(), be.upload_exact(rope.clone()).unwrap());
    be.qk_norm_rope(&mut qb, &mut kb, &qn, &kn, 1e-6, &rope, pos, s).unwrap();
    (be.download(&qb).unwrap(), be.download(&kb).unwrap())
}

fn run_swiglu<B: Backend>(be: &B, g: &[f32], u: &[f32], t: usize, c: usize) -> Vec<f32> {
    let (gb, ub) = (be.upload_buf(t, c, g).unwrap(), be.upload_buf(t, c, u).unwrap());
    let mut out = be.alloc(t, c).unwrap();
    be.swiglu(&mut out, &gb, &ub).unwrap();
    be.download(&out).unwrap()
}

fn run_gather<B: Backend>(be: &B, x: &[f32], t: usize, c: usize, rows: &[u32]) -> Vec<f32> {
    let xb = be.upload_buf(t, c, x).unwrap();
    let mut out = be.alloc(rows.len(), c).unwrap();
    be.gather_rows(&mut out, &xb, rows).unwrap();
    be.download(&out).unwrap()
}

/// `n` experts' [gate, up, down] of uniform weights in ±0.2 (gate and up [inter, h], down [h, inter]).
fn random_experts(r: &mut Rng, n: usize, h: usize, inter: usize) -> Vec<[HostTensor; 3]> {
    let mut matrix = |rows: usize, cols: usize| tensor(&r.uniform(rows * cols, 0.2), &[rows, cols]);
    (0..n).map(|_| [matrix(inter, h), matrix(inter, h), matrix(h, inter)]).collect()
}

fn copy_moe(moe: &MoeHost) -> MoeHost {
    MoeHost {
        router: moe.router.clone(),
        experts: moe.experts.clone(),
        first_expert: moe.first_expert,
        top_k: moe.top_k,
        norm_topk_prob: moe.norm_topk_prob,
    }
}

fn run_moe<B: Backend>(be: &B, x: &[f32], t: usize, moe: &MoeHost) -> Vec<f32> {
    let h = moe.router.shape[1];
    let m = be.upload_moe(copy_moe(moe)).unwrap();
    let xb = be.upload_buf(t, h, x).unwrap();
    let mut out = be.alloc(t, h).unwrap();
    be.moe(&mut out, &xb, &m).unwrap();
    be.download(&out).unwrap()
}

/// Two steps over a paged cache: (1) sequence B's first 20 tokens; (2) a mixed batch of sequence
/// A's 7-token prefill and B's one decode token. Returns the attention output of step 2.
fn run_attention<B: Backend>(be: &B, s: AttnShape, data: &[Vec<f32>; 5]) -> Vec<f32> {
    let kvd = s.n_kv_heads * s.head_dim;
    let qd = s.n_heads * s.head_dim;
    let bs = 16;
    let mut kv = be.alloc_kv(8, bs, kvd).unwrap();
    let blocks_a = [6u32];
    let blocks_b = [3u32, 1];
    // Step 1: B positions 0..20.
    let tok1 = vec![0u32; 20];
    let pos1: Vec<u32> = (0..20).collect();
    let b1 =
        BatchInfo { tokens: &tok1, positions: &pos1, seqs: vec![SeqSlot { rows: 0..20, start_pos: 0, blocks: &blocks_b }], block_size: bs };
    let (k1, v1) = (be.upload_buf(20, kvd, &data[0]).unwrap(), be.upload_buf(20, kvd, &data[1]).unwrap());
    be.kv_append(&mut kv, &k1, &v1, &b1).unwrap();
    // Step 2: A rows 0..7 at positions 0..7, B row 7 at position 20.
    let tok2 = vec![0u32; 8];
    let pos2: Vec<u32> = (0..7).chain([20]).collect();
    let b2 = BatchInfo {
        tokens: &tok2,
        positions: &pos2,
        block_size: bs,
        seqs: vec![SeqSlot { rows: 0..7, start_pos: 0, blocks: &blocks_a }, SeqSlot { rows: 7..8, start_pos: 20, blocks: &blocks_b }],
    };
    let (k2, v2) = (be.upload_buf(8, kvd, &data[2]).unwrap(), be.upload_buf(8, kvd, &data[3]).unwrap());
    be.kv_append(&mut kv, &k2, &v2, &b2).unwrap();
    let q = be.upload_buf(8, qd, &data[4]).unwrap();
    let mut out = be.alloc(8, qd).unwrap();
    be.attention(&mut out, &q, &kv, &b2, s).unwrap();
    be.download(&out).unwrap()
}

fn rope_table(max_pos: usize, hd: usize) -> HostTensor {
    let half = hd / 2;
    let mut t = vec![0f32; max_pos * hd];
    for p in 0..max_pos {
        for i in 0..half {
            let f = 1.0 / 10000f32.powf(2.0 * i as f32 / hd as f32);
            t[p * hd + i] = (p as f32 * f).cos();
            t[p * hd + half + i] = (p as f32 * f).sin();
        }
    }
    tensor(&t, &[max_pos, hd])
}

// ---- tests ----

#[test]
fn embed_and_gather() {
    for dtype in DTYPES {
        let Some(g) = gpu(dtype) else { return };
        let c = CpuBackend::new(dtype);
        let mut r = Rng(1);
        let table = tensor(&r.uniform(50 * 72, 1.0), &[50, 72]);
        for t in [1usize, 7] {
            let ids: Vec<u32> = (0..t).map(|_| r.below(50)).collect();
            check(&format!("embed T={t} H=72"), dtype, &run_embed(&g, &table, &ids), &run_embed(&c, &table, &ids), 0.0);
            let x = r.uniform(t * 72, 1.0);
            let rows: Vec<u32> = (0..3).map(|_| r.below(t as u32)).collect();
            check(&format!("gather_rows T={t}"), dtype, &run_gather(&g, &x, t, 72, &rows), &run_gather(&c, &x, t, 72, &rows), 0.0);
            // Rows of 75: no 16-byte copies.
            let x = r.uniform(t * 75, 1.0);
            check(&format!("gather_rows T={t} cols=75"), dtype, &run_gather(&g, &x, t, 75, &rows), &run_gather(&c, &x, t, 75, &rows), 0.0);
        }
        assert!(matches!(g.embed(&mut g.alloc(1, 72).unwrap(), &g.upload(table.clone()).unwrap(), &[50]), Err(Error::InvalidArgument(_))));
    }
}

#[test]
fn norms() {
    for dtype in DTYPES {
        let Some(g) = gpu(dtype) else { return };
        let c = CpuBackend::new(dtype);
        let (bar, _) = bars(dtype);
        let mut r = Rng(2);
        // add_rms_norm_vec (cols a multiple of 16 bytes, up to 8,192 bf16 / 4,096 f32), and add_rms_norm
        // for odd rows (1001) and wider ones (9000).
        for (t, cols) in [(1usize, 64usize), (7, 72), (9, 1000), (33, 2048), (3, 1001), (2, 9000), (5, 4096)] {
            let w = tensor(&r.uniform(cols, 1.0).iter().map(|v| 1.0 + 0.1 * v).collect::<Vec<_>>(), &[cols]);
            let x = r.uniform(t * cols, 2.0);
            let d = r.uniform(t * cols, 1.0);
            for d in [Some(&d[..]), None] {
                let (gr, go) = run_add_rms(&g, &x, d, t, cols, &w);
                let (cr, co) = run_add_rms(&c, &x, d, t, cols, &w);
                let what = if d.is_some() { "x + delta" } else { "x" };
                check(&format!("add_rms_norm residual T={t} cols={cols} of {what}"), dtype, &gr, &cr, bar);
                check(&format!("add_rms_norm out T={t} cols={cols} of {what}"), dtype, &go, &co, bar);
            }
        }
    }
}

#[test]
fn matmul_gemv_and_cublas() {
    for dtype in DTYPES {
        let Some(g) = gpu(dtype) else { return };
        let c = CpuBackend::new(dtype);
        let (_, bar) = bars(dtype);
        let mut r = Rng(3);
        // T <= 8 takes the GEMV kernels (16-byte loads when K allows, else element loads), T > 8 cuBLAS.
        // The persistent grid has fewer rows than warps (3, 72) or many rows per warp (8200), a partial
        // last unrolled step (1032); x is staged in shared memory up to 56 KB and read from global
        // memory past it (K = 4096 with T = 8 in bf16; T >= 4 in f32). Rows of 3072, 4096 and 25600 take the
        // matmul_wide build (mod.rs WIDE_ROWS; 25600: x from global memory past 56 KB for T > 1).
        for (n, k) in
            [(72usize, 64usize), (100, 37), (256, 1024), (1000, 2048), (3, 4096), (5003, 1032), (8200, 256), (77, 3072), (33, 25600)]
        {
            let w = tensor(&r.uniform(n * k, (3.0 / k as f32).sqrt()), &[n, k]);
            for t in [1usize, 3, 7, 8, 9, 33] {
                let x = r.uniform(t * k, 1.0);
                check(&format!("matmul T={t} N={n} K={k}"), dtype, &run_matmul(&g, &x, t, &w), &run_matmul(&c, &x, t, &w), bar);
            }
        }
        // bf16-stored weights in f32 compute (widened on upload), as a bf16 checkpoint loaded as float32.
        let wb = tensor(&r.uniform(64 * 96, 0.2), &[64, 96]).to_dtype(DType::BF16);
        let x = r.uniform(5 * 96, 1.0);
        check("matmul bf16 weights T=5", dtype, &run_matmul(&g, &x, 5, &wb), &run_matmul(&c, &x, 5, &wb), bar);
    }
}

fn run_matmul3<B: Backend>(be: &B, x: &[f32], t: usize, ws: &[HostTensor; 3]) -> Vec<f32> {
    let k = ws[0].shape[1];
    let xb = be.upload_buf(t, k, x).unwrap();
    let w: Vec<B::Weight> = ws.iter().map(|w| be.upload(w.clone()).unwrap()).collect();
    let mut o: Vec<B::Buf> = ws.iter().map(|w| be.alloc(t, w.shape[0]).unwrap()).collect();
    let [a, b, c] = &mut o[..] else { unreachable!() };
    be.matmul_many(&mut [a, b, c], &xb, &[&w[0], &w[1], &w[2]]).unwrap();
    o.iter().flat_map(|b| be.download(b).unwrap()).collect()
}

fn run_matmul_swiglu<B: Backend>(be: &B, x: &[f32], t: usize, gate: &HostTensor, up: &HostTensor) -> Vec<f32> {
    let (n, k) = (gate.shape[0], gate.shape[1]);
    let xb = be.upload_buf(t, k, x).unwrap();
    let (g, u) = (be.upload(gate.clone()).unwrap(), be.upload(up.clone()).unwrap());
    let (mut out, mut gs, mut us) = (be.alloc(t, n).unwrap(), be.alloc(t, n).unwrap(), be.alloc(t, n).unwrap());
    be.matmul_swiglu(&mut out, &mut gs, &mut us, &xb, &g, &u).unwrap();
    be.download(&out).unwrap()
}

#[test]
fn fused_decode_products() {
    // q/k/v in one launch (gemv3) and gate·up·SwiGLU in one (gemv_swiglu) for T <= 8; T = 9 and
    // K not a multiple of the vector width take the unfused path. Odd row counts throughout. Both
    // GEMV builds: each row length on its listed build (matmul's, 8 loads a lane in flight, unless
    // listed) and, for every row length, matmul_wide's (16) and matmul_narrow's (4).
    for (dtype, build) in DTYPES.into_iter().flat_map(|d| [(d, None), (d, Some(1)), (d, Some(2))]) {
        let Some(g) = gpu(dtype) else { return };
        g.set_gemv_build_all(build);
        let build_name = build.map_or("listed", |i| cuda::GEMV_BUILDS[i]);
        let c = CpuBackend::new(dtype);
        let (_, bar) = bars(dtype);
        let mut r = Rng(13);
        for (ns, k) in [([256usize, 72, 72], 1024usize), ([2048, 512, 512], 4096), ([100, 37, 5], 72), ([64, 16, 16], 37)] {
            let s = (3.0 / k as f32).sqrt();
            let ws = ns.map(|n| tensor(&r.uniform(n * k, s), &[n, k]));
            for t in [1usize, 3, 8, 9] {
                let x = r.uniform(t * k, 1.0);
                let what = format!("matmul_many T={t} N={ns:?} K={k} build={build_name}");
                check(&what, dtype, &run_matmul3(&g, &x, t, &ws), &run_matmul3(&c, &x, t, &ws), bar);
            }
        }
        for (n, k) in [(300usize, 1024usize), (1001, 72), (3072, 1024), (40, 37)] {
            let s = (3.0 / k as f32).sqrt();
            let (gw, uw) = (tensor(&r.uniform(n * k, s), &[n, k]), tensor(&r.uniform(n * k, s), &[n, k]));
            for t in [1usize, 5, 8, 9] {
                let x = r.uniform(t * k, 1.0);
                check(
                    &format!("matmul_swiglu T={t} N={n} K={k} build={build_name}"),
                    dtype,
                    &run_matmul_swiglu(&g, &x, t, &gw, &uw),
                    &run_matmul_swiglu(&c, &x, t, &gw, &uw),
                    bar,
                );
            }
        }
    }
}

#[test]
fn products_fused_with_the_block_input_norm() {
    // Decode products take the residual add and RMSNorm in their prologue (stage_input): q/k/v,
    // gate·up·SwiGLU and the MoE router + experts, with and without a delta (the first layer), odd
    // shapes; T = 9, K not a multiple of the vector width, and x past 56 KB (T = 8, K = 4096 in bf16)
    // take add_rms_norm and the plain products instead. x_out is the residual after the add.
    for dtype in DTYPES {
        let Some(g) = gpu(dtype) else { return };
        let c = CpuBackend::new(dtype);
        let (_, bar) = bars(dtype);
        let mut r = Rng(17);
        let mut cases: Vec<(usize, Fed, &str)> = vec![];
        let qkv: Vec<(usize, [HostTensor; 3])> =
            [([256usize, 72, 72], 1024usize), ([100, 37, 5], 72), ([64, 16, 16], 37), ([600, 64, 64], 4096)]
                .into_iter()
                .map(|(ns, k)| (k, ns.map(|n| tensor(&r.uniform(n * k, (3.0 / k as f32).sqrt()), &[n, k]))))
                .collect();
        let mlp: Vec<(usize, HostTensor, HostTensor)> = [(300usize, 1024usize), (1001, 72), (40, 37)]
            .into_iter()
            .map(|(n, k)| {
                (
                    k,
                    tensor(&r.uniform(n * k, (3.0 / k as f32).sqrt()), &[n, k]),
                    tensor(&r.uniform(n * k, (3.0 / k as f32).sqrt()), &[n, k]),
                )
            })
            .collect();
        let moes: Vec<(usize, MoeHost)> = [(16usize, 4usize, 96usize, 40usize), (8, 2, 100, 48), (128, 8, 128, 64)]
            .into_iter()
            .map(|(e, k, h, inter)| {
                let experts = random_experts(&mut r, e, h, inter);
                (h, MoeHost { router: tensor(&r.uniform(e * h, 0.5), &[e, h]), experts, first_expert: 0, top_k: k, norm_topk_prob: true })
            })
            .collect();
        cases.extend(qkv.iter().map(|(k, ws)| (*k, Fed::Qkv(ws), "q/k/v")));
        cases.extend(mlp.iter().map(|(k, gw, uw)| (*k, Fed::Swiglu(gw, uw), "gate·up·swiglu")));
        cases.extend(moes.iter().map(|(h, m)| (*h, Fed::Moe(m), "moe")));
        for (k, fed, what) in &cases {
            let w = tensor(&r.uniform(*k, 1.0).iter().map(|v| 1.0 + 0.1 * v).collect::<Vec<_>>(), &[*k]);
            for t in [1usize, 3, 8, 9] {
                let (x, d) = (r.uniform(t * k, 2.0), r.uniform(t * k, 1.0));
                for d in [Some(&d[..]), None] {
                    let (gx, go) = run_block_input(&g, &x, d, t, *k, &w, fed);
                    let (cx, co) = run_block_input(&c, &x, d, t, *k, &w, fed);
                    let label = format!("norm + {what} T={t} K={k} delta={}", d.is_some());
                    check(&format!("{label}: x_out"), dtype, &gx, &cx, 0.0);
                    check(&label, dtype, &go, &co, bar);
                }
            }
        }
    }
}

#[test]
fn qk_norm_rope() {
    for dtype in DTYPES {
        let Some(g) = gpu(dtype) else { return };
        let c = CpuBackend::new(dtype);
        let (bar, _) = bars(dtype);
        let mut r = Rng(4);
        // Head dims 64 and 128: a warp a head, 4 a block (qk_norm_rope_d*: 5 + 1 and 6 + 1 heads leave
        // a block part-filled); 96: a block a head.
        for (hd, nh, nkv, t) in [
            (128usize, 4usize, 2usize, 1usize),
            (128, 8, 2, 7),
            (64, 3, 1, 9),
            (128, 9, 3, 40),
            (128, 5, 1, 3),
            (128, 6, 1, 5),
            (96, 2, 1, 3),
        ] {
            let s = AttnShape { n_heads: nh, n_kv_heads: nkv, head_dim: hd };
            let rope = rope_table(300, hd);
            let qn = tensor(&r.uniform(hd, 0.5).iter().map(|v| 1.0 + v).collect::<Vec<_>>(), &[hd]);
            let kn = tensor(&r.uniform(hd, 0.5).iter().map(|v| 1.0 + v).collect::<Vec<_>>(), &[hd]);
            let pos: Vec<u32> = (0..t).map(|_| r.below(300)).collect();
            let q = r.uniform(t * nh * hd, 2.0);
            let k = r.uniform(t * nkv * hd, 2.0);
            let (gq, gk) = run_qk(&g, &q, &k, &qn, &kn, &rope, &pos, s);
            let (cq, ck) = run_qk(&c, &q, &k, &qn, &kn, &rope, &pos, s);
            check(&format!("qk_norm_rope q hd={hd} T={t}"), dtype, &gq, &cq, bar);
            check(&format!("qk_norm_rope k hd={hd} T={t}"), dtype, &gk, &ck, bar);
        }
    }
}

/// QK-norm + RoPE fused with the cache append: two sequences (3 rows after 6 cached, 2 rows from
/// position 0) in scattered blocks. Returns q, k and the attention over the updated cache.
fn run_qk_append<B: Backend>(be: &B, s: AttnShape, r: &mut Rng) -> Vec<f32> {
    let (hd, kvd, qd, bs) = (s.head_dim, s.n_kv_heads * s.head_dim, s.n_heads * s.head_dim, 4usize);
    let rope = be.upload_exact(rope_table(64, hd)).unwrap();
    let qn = be.upload(tensor(&r.uniform(hd, 0.5).iter().map(|v| 1.0 + v).collect::<Vec<_>>(), &[hd])).unwrap();
    let kn = be.upload(tensor(&r.uniform(hd, 0.5).iter().map(|v| 1.0 + v).collect::<Vec<_>>(), &[hd])).unwrap();
    let mut kv = be.alloc_kv(8, bs, kvd).unwrap();
    let tables = [vec![5u32, 1, 6], vec![2u32]];
    // The cached prefix of sequence A (plain append).
    let tok = vec![0u32; 6];
    let pos: Vec<u32> = (0..6).collect();
    let b =
        BatchInfo { tokens: &tok, positions: &pos, block_size: bs, seqs: vec![SeqSlot { rows: 0..6, start_pos: 0, blocks: &tables[0] }] };
    let (k, v) = (be.upload_buf(6, kvd, &r.uniform(6 * kvd, 1.0)).unwrap(), be.upload_buf(6, kvd, &r.uniform(6 * kvd, 1.0)).unwrap());
    be.kv_append(&mut kv, &k, &v, &b).unwrap();
    let tok = vec![0u32; 5];
    let pos: Vec<u32> = (6..9).chain(0..2).collect();
    let b = BatchInfo {
        tokens: &tok,
        positions: &pos,
        block_size: bs,
        seqs: vec![SeqSlot { rows: 0..3, start_pos: 6, blocks: &tables[0] }, SeqSlot { rows: 3..5, start_pos: 0, blocks: &tables[1] }],
    };
    let mut q = be.upload_buf(5, qd, &r.uniform(5 * qd, 2.0)).unwrap();
    let mut k = be.upload_buf(5, kvd, &r.uniform(5 * kvd, 2.0)).unwrap();
    let v = be.upload_buf(5, kvd, &r.uniform(5 * kvd, 1.0)).unwrap();
    be.qk_norm_rope_append(&mut q, &mut k, &v, &qn, &kn, 1e-6, &rope, &mut kv, &b, s).unwrap();
    let mut out = be.alloc(5, qd).unwrap();
    be.attention(&mut out, &q, &kv, &b, s).unwrap();
    [be.download(&q).unwrap(), be.download(&k).unwrap(), be.download(&out).unwrap()].concat()
}

/// Decode steps through `qk_norm_rope_attention` (on a GPU the `_rope` decode attention kernels): a
/// prefix of `ctx[i]` keys per sequence appended plainly, then `steps` decode steps of one row per
/// sequence, each step's q/k/v fresh. Returns every step's attention output.
fn run_rope_attention_steps<B: Backend>(be: &B, s: AttnShape, ctx: &[usize], steps: usize, r: &mut Rng) -> Vec<f32> {
    let (hd, kvd, qd, bs) = (s.head_dim, s.n_kv_heads * s.head_dim, s.n_heads * s.head_dim, 16usize);
    let max_pos = ctx.iter().max().unwrap() + steps + 1;
    let rope = be.upload_exact(rope_table(max_pos, hd)).unwrap();
    let qn = be.upload(tensor(&r.uniform(hd, 0.5).iter().map(|v| 1.0 + v).collect::<Vec<_>>(), &[hd])).unwrap();
    let kn = be.upload(tensor(&r.uniform(hd, 0.5).iter().map(|v| 1.0 + v).collect::<Vec<_>>(), &[hd])).unwrap();
    // Blocks handed out back to front, so tables are not in order.
    let per_seq: Vec<usize> = ctx.iter().map(|c| (c + steps).div_ceil(bs)).collect();
    let total: usize = per_seq.iter().sum();
    let mut next = total as u32;
    let tables: Vec<Vec<u32>> = per_seq
        .iter()
        .map(|&n| {
            (0..n)
                .map(|_| {
                    next -= 1;
                    next
                })
                .collect()
        })
        .collect();
    let mut kv = be.alloc_kv(total, bs, kvd).unwrap();
    for (i, &c) in ctx.iter().enumerate().filter(|(_, &c)| c > 0) {
        let (tok, pos) = (vec![0u32; c], (0..c as u32).collect::<Vec<_>>());
        let b = BatchInfo {
            tokens: &tok,
            positions: &pos,
            block_size: bs,
            seqs: vec![SeqSlot { rows: 0..c, start_pos: 0, blocks: &tables[i] }],
        };
        let (k, v) = (be.upload_buf(c, kvd, &r.uniform(c * kvd, 1.0)).unwrap(), be.upload_buf(c, kvd, &r.uniform(c * kvd, 1.0)).unwrap());
        be.kv_append(&mut kv, &k, &v, &b).unwrap();
    }
    let t = ctx.len();
    let mut outs = vec![];
    for step in 0..steps {
        let tok = vec![0u32; t];
        let pos: Vec<u32> = ctx.iter().map(|&c| (c + step) as u32).collect();
        let seqs = (0..t).map(|i| SeqSlot { rows: i..i + 1, start_pos: ctx[i] + step, blocks: &tables[i] }).collect();
        let b = BatchInfo { tokens: &tok, positions: &pos, block_size: bs, seqs };
        let mut q = be.upload_buf(t, qd, &r.uniform(t * qd, 2.0)).unwrap();
        let mut k = be.upload_buf(t, kvd, &r.uniform(t * kvd, 2.0)).unwrap();
        let v = be.upload_buf(t, kvd, &r.uniform(t * kvd, 1.0)).unwrap();
        let mut out = be.alloc(t, qd).unwrap();
        be.qk_norm_rope_attention(&mut out, &mut q, &mut k, &v, &qn, &kn, 1e-6, &rope, &mut kv, &b, s).unwrap();
        outs.extend(be.download(&out).unwrap());
    }
    outs
}

#[test]
fn decode_attention_with_qk_norm_rope_and_append() {
    // The `_rope` decode kernels against the CPU's qk_norm_rope_append + attention: every group size
    // (G = 1, 2, 4, 8 heads a block), both head dims, the first token (no cached keys), several
    // sequences of different lengths, and contexts past 1,024 keys (several splits, G = 8). Three
    // steps each, so a key the kernel appended is read back by the next step.
    for dtype in DTYPES {
        let Some(g) = gpu(dtype) else { return };
        let c = CpuBackend::new(dtype);
        let (_, bar) = bars(dtype);
        for (hd, nh, nkv) in [(128usize, 16usize, 8usize), (128, 32, 4), (64, 8, 8), (64, 8, 2), (128, 16, 2)] {
            let s = AttnShape { n_heads: nh, n_kv_heads: nkv, head_dim: hd };
            for ctx in [vec![0usize], vec![5], vec![37, 0, 200], vec![1500, 3], vec![2100, 17, 64, 9, 1, 300, 33, 700]] {
                let (gv, cv) =
                    (run_rope_attention_steps(&g, s, &ctx, 3, &mut Rng(43)), run_rope_attention_steps(&c, s, &ctx, 3, &mut Rng(43)));
                check(&format!("qk_norm_rope_attention hd={hd} nh={nh} nkv={nkv} ctx={ctx:?}"), dtype, &gv, &cv, bar);
            }
        }
    }
}

#[test]
fn qk_norm_rope_fused_with_cache_append() {
    for dtype in DTYPES {
        let Some(g) = gpu(dtype) else { return };
        let c = CpuBackend::new(dtype);
        let (_, bar) = bars(dtype);
        // 3 + 1 and 6 + 1 heads: a block of qk_norm_rope_d*'s with q and k heads, one part-filled.
        for (hd, nh, nkv) in [(128usize, 8usize, 2usize), (64, 3, 1), (128, 3, 1), (128, 6, 1)] {
            let s = AttnShape { n_heads: nh, n_kv_heads: nkv, head_dim: hd };
            let (gv, cv) = (run_qk_append(&g, s, &mut Rng(41)), run_qk_append(&c, s, &mut Rng(41)));
            check(&format!("qk_norm_rope_append + attention hd={hd} nh={nh} nkv={nkv}"), dtype, &gv, &cv, bar);
        }
    }
}

#[test]
fn paged_attention_prefill_and_decode() {
    for dtype in DTYPES {
        let Some(g) = gpu(dtype) else { return };
        let c = CpuBackend::new(dtype);
        let (_, bar) = bars(dtype);
        let mut r = Rng(5);
        for (hd, nh, nkv) in [(128usize, 8usize, 2usize), (64, 4, 4), (128, 16, 8), (128, 64, 4), (64, 6, 2)] {
            let s = AttnShape { n_heads: nh, n_kv_heads: nkv, head_dim: hd };
            let kvd = nkv * hd;
            let data = [
                r.uniform(20 * kvd, 1.0),
                r.uniform(20 * kvd, 1.0),
                r.uniform(8 * kvd, 1.0),
                r.uniform(8 * kvd, 1.0),
                r.uniform(8 * nh * hd, 1.0),
            ];
            check(&format!("attention hd={hd} nh={nh} nkv={nkv}"), dtype, &run_attention(&g, s, &data), &run_attention(&c, s, &data), bar);
        }
    }
}

/// Decode rows of three sequences of `lens` cached tokens (the GPU splits the keys across blocks, then
/// merges; a short one leaves most splits without keys) in scattered blocks, one new token each.
/// Returns the attention output of the decode step [3, nh*hd].
fn run_split_decode_attention<B: Backend>(be: &B, s: AttnShape, lens: [usize; 3], r: &mut Rng) -> Vec<f32> {
    let (kvd, qd, bs) = (s.n_kv_heads * s.head_dim, s.n_heads * s.head_dim, 16usize);
    let n_blocks: usize = lens.iter().map(|l| (l + 1).div_ceil(bs)).sum();
    let mut kv = be.alloc_kv(n_blocks, bs, kvd).unwrap();
    // Blocks handed out in reverse, interleaved between the sequences.
    let mut free: Vec<u32> = (0..n_blocks as u32).collect();
    let tables: Vec<Vec<u32>> = lens.iter().map(|l| (0..(l + 1).div_ceil(bs)).map(|_| free.pop().unwrap()).collect()).collect();
    for (i, &len) in lens.iter().enumerate() {
        let tok = vec![0u32; len];
        let pos: Vec<u32> = (0..len as u32).collect();
        let b = BatchInfo {
            tokens: &tok,
            positions: &pos,
            seqs: vec![SeqSlot { rows: 0..len, start_pos: 0, blocks: &tables[i] }],
            block_size: bs,
        };
        let (k, v) =
            (be.upload_buf(len, kvd, &r.uniform(len * kvd, 1.0)).unwrap(), be.upload_buf(len, kvd, &r.uniform(len * kvd, 1.0)).unwrap());
        be.kv_append(&mut kv, &k, &v, &b).unwrap();
    }
    let tok = vec![0u32; 3];
    let pos: Vec<u32> = lens.iter().map(|&l| l as u32).collect();
    let seqs = (0..3).map(|i| SeqSlot { rows: i..i + 1, start_pos: lens[i], blocks: &tables[i] }).collect();
    let b = BatchInfo { tokens: &tok, positions: &pos, seqs, block_size: bs };
    let (k, v) = (be.upload_buf(3, kvd, &r.uniform(3 * kvd, 1.0)).unwrap(), be.upload_buf(3, kvd, &r.uniform(3 * kvd, 1.0)).unwrap());
    be.kv_append(&mut kv, &k, &v, &b).unwrap();
    // Sharper scores than uniform(1) give: a few keys dominate, as in a trained model.
    let q = be.upload_buf(3, qd, &r.uniform(3 * qd, 4.0)).unwrap();
    let mut out = be.alloc(3, qd).unwrap();
    be.attention(&mut out, &q, &kv, &b, s).unwrap();
    be.download(&out).unwrap()
}

/// A prefill batch (T > 8: the GPU's tiled attention): sequence A with 40 cached tokens gets 70 new
/// rows (a full and a partial 64-row tile), B 33 rows from position 0, C one row after 5 cached.
fn run_attention_prefill<B: Backend>(be: &B, s: AttnShape, r: &mut Rng) -> Vec<f32> {
    let (kvd, qd, bs) = (s.n_kv_heads * s.head_dim, s.n_heads * s.head_dim, 16usize);
    let mut kv = be.alloc_kv(16, bs, kvd).unwrap();
    let tables: [Vec<u32>; 3] = [vec![9, 2, 14, 5, 11, 0, 7], vec![3, 12, 1], vec![15]];
    // Step 1: the cached prefixes (A 40 tokens, C 5).
    let tok = vec![0u32; 45];
    let pos: Vec<u32> = (0..40).chain(0..5).collect();
    let b = BatchInfo {
        tokens: &tok,
        positions: &pos,
        block_size: bs,
        seqs: vec![SeqSlot { rows: 0..40, start_pos: 0, blocks: &tables[0] }, SeqSlot { rows: 40..45, start_pos: 0, blocks: &tables[2] }],
    };
    let (k, v) = (be.upload_buf(45, kvd, &r.uniform(45 * kvd, 1.0)).unwrap(), be.upload_buf(45, kvd, &r.uniform(45 * kvd, 1.0)).unwrap());
    be.kv_append(&mut kv, &k, &v, &b).unwrap();
    // Step 2: A rows 0..70 (positions 40..110), B rows 70..103 (0..33), C row 103 (position 5).
    let t = 104;
    let tok = vec![0u32; t];
    let pos: Vec<u32> = (40..110).chain(0..33).chain([5]).collect();
    let b = BatchInfo {
        tokens: &tok,
        positions: &pos,
        block_size: bs,
        seqs: vec![
            SeqSlot { rows: 0..70, start_pos: 40, blocks: &tables[0] },
            SeqSlot { rows: 70..103, start_pos: 0, blocks: &tables[1] },
            SeqSlot { rows: 103..104, start_pos: 5, blocks: &tables[2] },
        ],
    };
    let (k, v) = (be.upload_buf(t, kvd, &r.uniform(t * kvd, 1.0)).unwrap(), be.upload_buf(t, kvd, &r.uniform(t * kvd, 1.0)).unwrap());
    be.kv_append(&mut kv, &k, &v, &b).unwrap();
    let q = be.upload_buf(t, qd, &r.uniform(t * qd, 3.0)).unwrap();
    let mut out = be.alloc(t, qd).unwrap();
    be.attention(&mut out, &q, &kv, &b, s).unwrap();
    be.download(&out).unwrap()
}

#[test]
fn tiled_prefill_attention() {
    for dtype in DTYPES {
        let Some(g) = gpu(dtype) else { return };
        let c = CpuBackend::new(dtype);
        let (_, bar) = bars(dtype);
        for (hd, nh, nkv) in [(128usize, 8usize, 2usize), (64, 4, 4), (256, 2, 1), (96, 6, 3)] {
            let s = AttnShape { n_heads: nh, n_kv_heads: nkv, head_dim: hd };
            let (gv, cv) = (run_attention_prefill(&g, s, &mut Rng(31)), run_attention_prefill(&c, s, &mut Rng(31)));
            check(&format!("tiled prefill attention hd={hd} nh={nh} nkv={nkv}"), dtype, &gv, &cv, bar);
        }
    }
}

/// A prefill batch of sequences given as (cached tokens, new rows), each in scattered cache blocks
/// of `bs` slots: step 1 appends the cached prefixes, step 2 appends every sequence's new rows and
/// runs attention over them. Returns the attention output of step 2 [T, nh*hd].
fn run_attention_batch<B: Backend>(be: &B, s: AttnShape, seqs: &[(usize, usize)], bs: usize, r: &mut Rng) -> Vec<f32> {
    let (kvd, qd) = (s.n_kv_heads * s.head_dim, s.n_heads * s.head_dim);
    let n_blocks: usize = seqs.iter().map(|&(c, n)| (c + n).div_ceil(bs)).sum::<usize>() + 2;
    let mut kv = be.alloc_kv(n_blocks, bs, kvd).unwrap();
    // Blocks handed out in a shuffled order.
    let mut free: Vec<u32> = (0..n_blocks as u32).collect();
    for i in (1..free.len()).rev() {
        free.swap(i, r.below(i as u32 + 1) as usize);
    }
    let tables: Vec<Vec<u32>> = seqs.iter().map(|&(c, n)| (0..(c + n).div_ceil(bs)).map(|_| free.pop().unwrap()).collect()).collect();
    let append = |kv: &mut B::KvLayer, parts: &[(usize, usize, usize)], r: &mut Rng| {
        // parts: (sequence, first position, rows)
        let t: usize = parts.iter().map(|p| p.2).sum();
        let tok = vec![0u32; t];
        let pos: Vec<u32> = parts.iter().flat_map(|&(_, p0, n)| (p0..p0 + n).map(|p| p as u32)).collect();
        let mut row = 0;
        let slots = parts
            .iter()
            .map(|&(i, p0, n)| {
                row += n;
                SeqSlot { rows: row - n..row, start_pos: p0, blocks: &tables[i] }
            })
            .collect();
        let b = BatchInfo { tokens: &tok, positions: &pos, seqs: slots, block_size: bs };
        let (k, v) = (be.upload_buf(t, kvd, &r.uniform(t * kvd, 1.0)).unwrap(), be.upload_buf(t, kvd, &r.uniform(t * kvd, 1.0)).unwrap());
        be.kv_append(kv, &k, &v, &b).unwrap();
    };
    let cached: Vec<(usize, usize, usize)> = seqs.iter().enumerate().filter(|(_, s)| s.0 > 0).map(|(i, s)| (i, 0, s.0)).collect();
    if !cached.is_empty() {
        append(&mut kv, &cached, r);
    }
    let new: Vec<(usize, usize, usize)> = seqs.iter().enumerate().map(|(i, s)| (i, s.0, s.1)).collect();
    append(&mut kv, &new, r);
    let t: usize = seqs.iter().map(|s| s.1).sum();
    let tok = vec![0u32; t];
    let pos: Vec<u32> = seqs.iter().flat_map(|&(c, n)| (c..c + n).map(|p| p as u32)).collect();
    let mut row = 0;
    let slots = seqs
        .iter()
        .enumerate()
        .map(|(i, &(c, n))| {
            row += n;
            SeqSlot { rows: row - n..row, start_pos: c, blocks: &tables[i] }
        })
        .collect();
    let b = BatchInfo { tokens: &tok, positions: &pos, seqs: slots, block_size: bs };
    // Sharper scores than uniform(1) give: a few keys dominate, as in a trained model.
    let q = be.upload_buf(t, qd, &r.uniform(t * qd, 3.0)).unwrap();
    let mut out = be.alloc(t, qd).unwrap();
    be.attention(&mut out, &q, &kv, &b, s).unwrap();
    be.download(&out).unwrap()
}

#[test]
fn tensor_core_prefill_attention() {
    // bf16 / f16 with head_dim 16, 32, 64 or 128 take attention_prefill.cu (tensor cores; head_dim 128
    // on sm_90 attention_prefill_wg_128, wgmma, or with it switched off mma.sync); f32 and
    // other head dims the tiled kernel. Prompts of odd lengths, several per batch, with cached prefixes
    // (chunked prefill: keys from earlier steps, not a multiple of a page or a key tile); GQA
    // groups 1, 2, 4 and 8.
    let seqs = [(0usize, 1usize), (0, 17), (0, 64), (37, 65), (0, 200), (5, 1), (130, 9), (300, 1000)];
    let small = [(0usize, 33usize), (64, 64), (3, 1), (17, 130)];
    for dtype in [DType::BF16, DType::F16, DType::F32] {
        let Some(g) = gpu(dtype) else { return };
        let c = CpuBackend::new(dtype);
        let (_, bar) = bars(dtype);
        for (hd, nh, nkv, bs, big) in [
            (128usize, 8usize, 8usize, 16usize, true),
            (128, 8, 4, 16, false),
            (64, 8, 2, 16, true),
            (128, 16, 2, 16, true),
            (64, 4, 4, 8, false),
            (128, 4, 1, 32, false),
            (32, 4, 2, 16, false),
            (16, 4, 2, 16, false),
            (96, 4, 2, 16, false),
        ] {
            let s = AttnShape { n_heads: nh, n_kv_heads: nkv, head_dim: hd };
            let batch: &[(usize, usize)] = if big { &seqs } else { &small };
            let cv = run_attention_batch(&c, s, batch, bs, &mut Rng(41));
            // Head_dim 128 on sm_90: the wgmma kernel (the default), then the mma.sync one.
            for wgmma in [true, false] {
                g.set_attn_wgmma(wgmma);
                let gv = run_attention_batch(&g, s, batch, bs, &mut Rng(41));
                check(
                    &format!("prefill attention hd={hd} nh={nh} nkv={nkv} bs={bs} T={} wgmma={wgmma}", gv.len() / (nh * hd)),
                    dtype,
                    &gv,
                    &cv,
                    bar,
                );
            }
        }
    }
}

#[test]
fn split_kv_decode_attention_long_contexts() {
    for dtype in DTYPES {
        let Some(g) = gpu(dtype) else { return };
        let c = CpuBackend::new(dtype);
        let (_, bar) = bars(dtype);
        // Groups of 4, 1, 16 (two blocks of 8 heads per KV head), 8 and 2; a group of 3 takes the
        // plain per-head kernel.
        for (hd, nh, nkv) in [(128usize, 8usize, 2usize), (64, 4, 4), (128, 32, 2), (64, 8, 1), (128, 4, 2), (128, 6, 2)] {
            let s = AttnShape { n_heads: nh, n_kv_heads: nkv, head_dim: hd };
            let lens = [600, 3000, 4];
            let (gv, cv) = (run_split_decode_attention(&g, s, lens, &mut Rng(21)), run_split_decode_attention(&c, s, lens, &mut Rng(21)));
            check(&format!("split-KV attention hd={hd} nh={nh} nkv={nkv}"), dtype, &gv, &cv, bar);
        }
    }
}

#[test]
fn split_kv_decode_attention_merged_in_clusters_or_combined() {
    // Short contexts, where 2, 4, 8 or 16 splits merge inside the attention launch (a thread block
    // cluster, sm_90+; their states read after a cluster barrier, or pushed), against the CPU; and the
    // same with clusters off (attention_combine).
    for dtype in DTYPES {
        let Some(g) = gpu(dtype) else { return };
        let c = CpuBackend::new(dtype);
        let (_, bar) = bars(dtype);
        for (cluster, push) in [(16, false), (16, true), (0, false)] {
            g.set_attn_cluster(cluster);
            g.set_attn_push(Some(push));
            for (hd, nh, nkv) in [(128usize, 16usize, 8usize), (128, 32, 2), (64, 8, 2)] {
                let s = AttnShape { n_heads: nh, n_kv_heads: nkv, head_dim: hd };
                for ctx in [vec![20usize], vec![40, 3], vec![70], vec![200, 5, 0]] {
                    let (gv, cv) =
                        (run_rope_attention_steps(&g, s, &ctx, 3, &mut Rng(47)), run_rope_attention_steps(&c, s, &ctx, 3, &mut Rng(47)));
                    check(
                        &format!("clusters {cluster} push {push}: qk_norm_rope_attention hd={hd} nh={nh} nkv={nkv} ctx={ctx:?}"),
                        dtype,
                        &gv,
                        &cv,
                        bar,
                    );
                }
                for lens in [[100, 250, 4], [20, 9, 1]] {
                    let (gv, cv) =
                        (run_split_decode_attention(&g, s, lens, &mut Rng(23)), run_split_decode_attention(&c, s, lens, &mut Rng(23)));
                    check(&format!("clusters {cluster}: split-KV attention hd={hd} nh={nh} nkv={nkv} lens={lens:?}"), dtype, &gv, &cv, bar);
                }
            }
        }
    }
}

#[test]
fn swiglu() {
    for dtype in DTYPES {
        let Some(g) = gpu(dtype) else { return };
        let c = CpuBackend::new(dtype);
        let (bar, _) = bars(dtype);
        let mut r = Rng(6);
        for (t, cols) in [(1usize, 96usize), (7, 1001)] {
            let (gt, up) = (r.uniform(t * cols, 4.0), r.uniform(t * cols, 2.0));
            check(&format!("swiglu T={t} cols={cols}"), dtype, &run_swiglu(&g, &gt, &up, t, cols), &run_swiglu(&c, &gt, &up, t, cols), bar);
        }
    }
}

#[test]
fn moe_routing_and_experts() {
    for dtype in DTYPES {
        let Some(g) = gpu(dtype) else { return };
        let c = CpuBackend::new(dtype);
        let (_, bar) = bars(dtype);
        let mut r = Rng(7);
        for (e, k, h, inter, norm) in [
            (8usize, 2usize, 64usize, 48usize, true),
            (16, 4, 96, 40, false),
            (128, 8, 128, 64, true),
            // H not a multiple of 8: element loads in the router, the unfused expert path.
            (8, 2, 100, 48, false),
            // T = 7: x (7 × 4352) and the activations (14 × 2200) past 56 KB, read from global memory.
            (4, 2, 4352, 2200, true),
            // Odd k, and k = 9 (moe_down_combine: a second round of slots for one of an output's warps).
            (12, 3, 256, 96, true),
            (24, 9, 136, 72, false),
            // The expert rows of Qwen3-30B-A3B (768) and, with an odd k, Qwen3-235B-A22B (1536).
            (16, 8, 512, 768, true),
            (16, 5, 256, 1536, true),
            // More experts than the decode kernel routes over itself (ROUTE_MAX_E): moe_route first.
            (300, 4, 64, 32, false),
        ] {
            let experts = random_experts(&mut r, e, h, inter);
            let moe = MoeHost { router: tensor(&r.uniform(e * h, 0.5), &[e, h]), experts, first_expert: 0, top_k: k, norm_topk_prob: norm };
            // T = 33 and 200: prefill (cuBLAS router and grouped GEMMs), E = 128 with experts left empty.
            for t in [1usize, 2, 7, 8, 33, 200] {
                let x = r.uniform(t * h, 1.0);
                check(&format!("moe E={e} k={k} T={t} norm={norm}"), dtype, &run_moe(&g, &x, t, &moe), &run_moe(&c, &x, t, &moe), bar);
            }
        }
        // Ties: experts 2j and 2j + 1 have the same router row, so equal probabilities; with an odd k
        // the last choice splits a pair, and it must go to the lower id as on the CPU (a tie going the
        // other way routes through another expert: far past the bar). Decode batches only (the router
        // kernel's logits of equal rows are equal; prefill's cuBLAS GEMM promises no such thing); 300
        // experts: moe_route's choice.
        for (e, k) in [(16usize, 3usize), (128, 7), (300, 5)] {
            let (h, inter) = (64, 32);
            let rows: Vec<f32> = r.uniform(e / 2 * h, 0.5).chunks(h).flat_map(|row| [row, row]).flatten().copied().collect();
            let experts = random_experts(&mut r, e, h, inter);
            let moe = MoeHost { router: tensor(&rows, &[e, h]), experts, first_expert: 0, top_k: k, norm_topk_prob: true };
            for t in [1usize, 2, 8] {
                let x = r.uniform(t * h, 1.0);
                check(&format!("moe tied E={e} k={k} T={t}"), dtype, &run_moe(&g, &x, t, &moe), &run_moe(&c, &x, t, &moe), bar);
            }
        }
        // Every probability equal (a zero router): every choice a tie, each going to the lower id, so the
        // k lowest ids, as on the CPU (decode's fused routing for 40 and 128 experts, moe_route for 300).
        for (e, k) in [(40usize, 3usize), (128, 8), (300, 5)] {
            let (h, inter) = (64, 32);
            let experts = random_experts(&mut r, e, h, inter);
            let moe = MoeHost { router: tensor(&vec![0.0; e * h], &[e, h]), experts, first_expert: 0, top_k: k, norm_topk_prob: true };
            for t in [1usize, 8] {
                let x = r.uniform(t * h, 1.0);
                check(&format!("moe flat E={e} k={k} T={t}"), dtype, &run_moe(&g, &x, t, &moe), &run_moe(&c, &x, t, &moe), bar);
            }
        }
        // More experts than the backend routes (moe_route's shared memory is sized for 1,024): an
        // error at upload that names the count and the limit.
        let (e, h, inter) = (1025usize, 8usize, 8usize);
        let experts =
            (0..e).map(|_| [tensor(&[0.1; 64], &[inter, h]), tensor(&[0.1; 64], &[inter, h]), tensor(&[0.1; 64], &[h, inter])]).collect();
        assert!(g.set_expert_tile(100).unwrap_err().to_string().contains("128 or 256 rows, not 100"));
        let err = g
            .upload_moe(MoeHost {
                router: tensor(&r.uniform(e * h, 0.5), &[e, h]),
                experts,
                first_expert: 0,
                top_k: 8,
                norm_topk_prob: true,
            })
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(err.contains("1..=1024 experts, got 1025"), "{err}");
    }
}

/// `matmul_norm_moe` `repeat` times on the same inputs: a (T × K) through o_proj into the residual x
/// (T × H), normed with w, then the MoE block. Returns x_out, the MoE output and delta, which starts as
/// 7.0 everywhere (the GPU leaves it so where it takes the router into the o projection).
fn run_o_moe<B: Backend>(be: &B, a: &[f32], x: &[f32], o: &HostTensor, w: &HostTensor, moe: &MoeHost, repeat: usize) -> [Vec<f32>; 3] {
    let (h, k) = (o.shape[0], o.shape[1]);
    let t = x.len() / h;
    let (ab, xb) = (be.upload_buf(t, k, a).unwrap(), be.upload_buf(t, h, x).unwrap());
    let (ow, nw, m) = (be.upload(o.clone()).unwrap(), be.upload(w.clone()).unwrap(), be.upload_moe(copy_moe(moe)).unwrap());
    let mut delta = be.upload_buf(t, h, &vec![7.0; t * h]).unwrap();
    let (mut x_out, mut hb, mut out) = (be.alloc(t, h).unwrap(), be.alloc(t, h).unwrap(), be.alloc(t, h).unwrap());
    for _ in 0..repeat {
        be.matmul_norm_moe(&mut delta, &ab, &ow, &mut x_out, &mut hb, (&xb, &nw, 1e-6), &mut out, &m).unwrap();
    }
    [&x_out, &out, &delta].map(|b| be.download(b).unwrap())
}

#[test]
fn moe_router_in_the_o_projection() {
    // Decode of one row with the router folded into the o projection (gemv_router, the gate/up kernel
    // routing from its fixed-point sums), three times in a row (the sums must be cleared after each
    // layer: sums left over would sharpen the softmax and change the outputs), against the CPU's o
    // projection, add, norm, router and experts. Where it applies the GPU leaves delta as it was;
    // elsewhere (T = 2, H not a multiple of 8, more than 256 experts) the products run apart.
    // Bars: f32 as for any MoE block (the folding, the fixed point and the scaling are exact math, so
    // only the summation order differs). In bf16 / f16 the folded router sums the normed input before
    // it is rounded to the dtype, the CPU after: each logit moves by ~2^-9 · |router row| · sqrt(H)
    // (with these random routers 0.05 at H = 8,192), the softmax weights with it: 1.1e-2 measured
    // there (run 43.2), so 2e-2 for the folded cases; a wrong expert moves the output by ~1e-1 or more.
    for dtype in DTYPES {
        let Some(g) = gpu(dtype) else { return };
        let c = CpuBackend::new(dtype);
        let (_, bar) = bars(dtype);
        let folded_bar = if dtype == DType::F32 { bar } else { 2e-2 };
        let mut r = Rng(29);
        let mut cases = vec![];
        // (experts, k, H, K of o, intermediate, renormalised top-k, T, router, where the router folds in)
        #[derive(Clone, Copy, PartialEq)]
        enum Router {
            Random,
            Tied,
            Zero,
        }
        for (e, k, h, ko, inter, norm, t, router, folds) in [
            (128usize, 8usize, 256usize, 512usize, 64usize, true, 1usize, Router::Random, true),
            // Qwen3-30B-A3B's H and o width, 60 experts (not a multiple of 32), raw top-k weights.
            (60, 5, 2048, 4096, 96, false, 1, Router::Random, true),
            // H = 8,192: 1,024 groups of 8 rows, more than the grid's blocks (several rounds a block).
            (16, 4, 8192, 256, 32, false, 1, Router::Random, true),
            // Experts 2j, 2j + 1 with the same router row: equal sums, so each tie goes to the lower id.
            (16, 3, 128, 128, 32, true, 1, Router::Tied, true),
            (128, 8, 64, 64, 32, true, 1, Router::Zero, true),
            (128, 8, 256, 512, 64, true, 2, Router::Random, false),
            (8, 2, 100, 64, 48, true, 1, Router::Random, false),
            (300, 4, 64, 64, 32, true, 1, Router::Random, false),
        ] {
            let rows = match router {
                Router::Random => r.uniform(e * h, 0.5),
                Router::Tied => r.uniform(e / 2 * h, 0.5).chunks(h).flat_map(|row| [row, row]).flatten().copied().collect(),
                Router::Zero => vec![0.0; e * h],
            };
            let experts = random_experts(&mut r, e, h, inter);
            let moe = MoeHost { router: tensor(&rows, &[e, h]), experts, first_expert: 0, top_k: k, norm_topk_prob: norm };
            let o = tensor(&r.uniform(h * ko, (3.0 / ko as f32).sqrt()), &[h, ko]);
            let w = tensor(&r.uniform(h, 1.0).iter().map(|v| 1.0 + 0.1 * v).collect::<Vec<_>>(), &[h]);
            cases.push((moe, o, w, t, folds, format!("o + moe E={e} k={k} H={h} K={ko} T={t}")));
        }
        for (moe, o, w, t, folds, label) in &cases {
            let (h, ko) = (o.shape[0], o.shape[1]);
            let (a, x) = (r.uniform(t * ko, 1.0), r.uniform(t * h, 2.0));
            let [gx, go, gd] = run_o_moe(&g, &a, &x, o, w, moe, 3);
            let [cx, co, _] = run_o_moe(&c, &a, &x, o, w, moe, 1);
            check(&format!("{label}: x_out"), dtype, &gx, &cx, bar);
            check(label, dtype, &go, &co, if *folds { folded_bar } else { bar });
            let untouched = gd.iter().all(|&v| v == 7.0);
            assert_eq!(untouched, *folds, "{label} {}: the router folded into o: {untouched}, expected {folds}", dtype.name());
        }
    }
}

#[test]
fn moe_prefill_experts_on_tensor_cores() {
    // expert_gemm (wgmma, sm_90a; bf16 and f16): prefill's experts against the CPU, with the cuBLAS
    // path as a second opinion. T = 9 with 8 experts: tiles of a few rows (only the 32-row piece);
    // T = 100 and 700: tiles of 64-row pieces plus a 32-row one. A router that sends most rows to
    // expert 0 (its row is large along x's first column, which is positive): a segment of most of
    // the T rows, so several 256-row tiles and a short last one. Expert parallelism: a block of the
    // experts (the others' choices left out of the sort, their slots skipped in the combine).
    for dtype in [DType::BF16, DType::F16] {
        let Some(g) = gpu(dtype) else { return };
        if !g.expert_gemm_fits(256, 128) {
            eprintln!("SKIP moe_prefill_experts_on_tensor_cores: expert_gemm needs compute capability 9.0");
            return;
        }
        let c = CpuBackend::new(dtype);
        let (_, bar) = bars(dtype);
        let mut r = Rng(11);
        for (e, k, h, inter, skew, held) in [
            (8usize, 2usize, 256usize, 128usize, false, 0..8),
            (8, 2, 256, 128, true, 0..8),
            (16, 8, 512, 768, false, 0..16),
            (16, 5, 256, 1536, true, 0..16),
            (8, 3, 384, 192, false, 2..6),
        ] {
            let mut router = r.uniform(e * h, 0.5);
            if skew {
                router[0] = 8.0;
            }
            let experts = random_experts(&mut r, held.len(), h, inter);
            let moe = MoeHost { router: tensor(&router, &[e, h]), experts, first_expert: held.start, top_k: k, norm_topk_prob: true };
            for t in [9usize, 100, 700] {
                let mut x = r.uniform(t * h, 1.0);
                x.iter_mut().step_by(h).for_each(|v| *v = v.abs() + 0.5);
                let what = format!("moe E={e} k={k} H={h} I={inter} T={t} skew={skew} held={held:?}");
                let want = run_moe(&c, &x, t, &moe);
                for rows in [128, 256] {
                    g.set_expert_tile(rows).unwrap();
                    check(&format!("{what} expert_gemm_{rows}"), dtype, &run_moe(&g, &x, t, &moe), &want, bar);
                }
                g.set_expert_tile(128).unwrap();
                g.set_moe_wgmma(false);
                let cublas = run_moe(&g, &x, t, &moe);
                g.set_moe_wgmma(true);
                check(&format!("{what} cuBLAS"), dtype, &cublas, &want, bar);
            }
        }
    }
}

#[test]
fn dummy_weights_drawn_on_device_equal_the_host() {
    // The device's splitmix64 chains must give the host's values exactly (both round to bf16 at
    // the same point); shapes: a norm vector, odd sizes, several chunks with a short last one.
    for dtype in DTYPES {
        let Some(g) = gpu(dtype) else { return };
        let c = CpuBackend::new(dtype);
        for (i, shape) in [vec![1024usize], vec![33, 77], vec![3, 70_001], vec![128, 1111]].into_iter().enumerate() {
            let spec = DummySpec::new(42 + i as u64, &format!("t{i}"), &shape);
            let n: usize = shape.iter().product();
            // Read back through an embedding of every row (a vector as one row: same values,
            // which depend only on the spec and the element index).
            let (rows, cols) = if shape.len() == 1 { (1, n) } else { (shape[0], shape[1]) };
            let ids: Vec<u32> = (0..rows as u32).collect();
            let (gw, cw) = (g.dummy_weight(&spec, &[rows, cols]).unwrap(), c.dummy_weight(&spec, &[rows, cols]).unwrap());
            let (mut go, mut co) = (g.alloc(rows, cols).unwrap(), c.alloc(rows, cols).unwrap());
            g.embed(&mut go, &gw, &ids).unwrap();
            c.embed(&mut co, &cw, &ids).unwrap();
            let (gv, cv) = (g.download(&go).unwrap(), c.download(&co).unwrap());
            same_bits(&format!("dummy_weight {shape:?}: the device's against the host's"), dtype, &gv, &cv);
        }
        // A dummy MoE layer drawn on the device computes what the host-built one does.
        let (_, bar) = bars(dtype);
        let (e, k, h, inter) = (16usize, 4usize, 96usize, 40usize);
        let spec = |name: &str, shape: &[usize]| DummySpec::new(5, name, shape);
        let make = || MoeDummy {
            router: spec("router", &[e, h]),
            experts: (0..e)
                .map(|x| [spec(&format!("g{x}"), &[inter, h]), spec(&format!("u{x}"), &[inter, h]), spec(&format!("d{x}"), &[h, inter])])
                .collect(),
            hidden: h,
            inter,
            part: 0..inter,
            held: 0..e,
            top_k: k,
            norm_topk_prob: true,
        };
        let (gm, cm) = (g.dummy_moe(make()).unwrap(), c.dummy_moe(make()).unwrap());
        let mut r = Rng(11);
        for t in [1usize, 9] {
            let x = r.uniform(t * h, 1.0);
            let (gx, cx) = (g.upload_buf(t, h, &x).unwrap(), c.upload_buf(t, h, &x).unwrap());
            let (mut go, mut co) = (g.alloc(t, h).unwrap(), c.alloc(t, h).unwrap());
            g.moe(&mut go, &gx, &gm).unwrap();
            c.moe(&mut co, &cx, &cm).unwrap();
            check(&format!("dummy moe E={e} k={k} T={t}"), dtype, &g.download(&go).unwrap(), &c.download(&co).unwrap(), bar);
        }
    }
}

/// A dummy weight read back through an embedding of every row: f32 [rows * cols].
fn read_dummy<B: Backend>(be: &B, w: &B::Weight, rows: usize, cols: usize) -> Vec<f32> {
    let ids: Vec<u32> = (0..rows as u32).collect();
    let mut out = be.alloc(rows, cols).unwrap();
    be.embed(&mut out, w, &ids).unwrap();
    be.download(&out).unwrap()
}

#[test]
fn dummy_shards_drawn_on_device_equal_the_host_slice() {
    // Tensor-parallel shards (a range of rows, or a range of columns of every row) drawn alone on the
    // device must equal that part of the host's whole tensor, bit for bit: odd shapes, shards that
    // start and end inside a chunk, rows longer than a chunk, uneven rank counts.
    let shapes: [[usize; 2]; 6] = [[33, 77], [3, 70_001], [5, 65_537], [37, 3001], [600, 200], [200, 600]];
    for dtype in DTYPES {
        let Some(g) = gpu(dtype) else { return };
        let mut checked = 0;
        for (i, shape) in shapes.iter().enumerate() {
            let (rows, cols) = (shape[0], shape[1]);
            let spec = DummySpec::new(9 + i as u64, &format!("s{i}"), shape);
            let whole = spec.host_tensor(shape);
            let mut windows =
                vec![Window { rows: 1..rows - 1, cols: 2..cols - 3 }, Window { rows: rows / 2..rows / 2 + 1, cols: cols / 3..cols }];
            for n in 1..=4 {
                for r in 0..n {
                    windows.push(Window { rows: r * rows / n..(r + 1) * rows / n, cols: 0..cols });
                    windows.push(Window { rows: 0..rows, cols: r * cols / n..(r + 1) * cols / n });
                }
            }
            for w in windows.into_iter().filter(|w| w.numel() > 0) {
                let part = g.dummy_window(&spec, shape, &w).unwrap();
                let got = read_dummy(&g, &part, w.rows.len(), w.cols.len());
                let want = whole.window(&w).unwrap().to_dtype(dtype).to_f32_vec(); // f16 rounds tiny bf16 values
                same_bits(&format!("dummy_window {shape:?} {w:?}: the device's against the host slice"), dtype, &got, &want);
                checked += 1;
            }
        }
        eprintln!("dummy shards {}: {checked} windows bit-identical to the host slices", dtype.name());
        // MoE: every expert's part of the columns, drawn on the device (one launch per projection),
        // computes what the uploaded host slices do on the same device (the same weights: equal up to
        // the order the prefill path's expert sort happens to give rows, which should not change a
        // bit either; 1e-6 leaves room for that, while a misplaced expert or column moves it by ~1e-1).
        // Parts of 384 columns: multiples of 8 (as real models' are), rows crossing chunk borders.
        let (e, k, h, inter) = (8usize, 2usize, 200usize, 384usize);
        let spec = |name: &str, shape: &[usize]| DummySpec::new(6, name, shape);
        let make = |part: std::ops::Range<usize>| MoeDummy {
            router: spec("router", &[e, h]),
            experts: (0..e)
                .map(|x| [spec(&format!("g{x}"), &[inter, h]), spec(&format!("u{x}"), &[inter, h]), spec(&format!("d{x}"), &[h, inter])])
                .collect(),
            hidden: h,
            inter,
            part,
            held: 0..e,
            top_k: k,
            norm_topk_prob: true,
        };
        let mut r = Rng(12);
        for (n, rank) in [(2usize, 0usize), (2, 1), (3, 1), (8, 7)] {
            let moe = make(rank * inter / n..(rank + 1) * inter / n);
            let (gate_up, down) = moe.windows();
            let experts = moe
                .experts
                .iter()
                .map(|[gs, us, ds]| {
                    [
                        gs.host_window(&[inter, h], &gate_up).unwrap(),
                        us.host_window(&[inter, h], &gate_up).unwrap(),
                        ds.host_window(&[h, inter], &down).unwrap(),
                    ]
                })
                .collect();
            let host = MoeHost { router: moe.router.host_tensor(&[e, h]), experts, first_expert: 0, top_k: k, norm_topk_prob: true };
            let (drawn, uploaded) = (g.dummy_moe(moe).unwrap(), g.upload_moe(host).unwrap());
            for t in [1usize, 9] {
                let x = r.uniform(t * h, 1.0);
                let gx = g.upload_buf(t, h, &x).unwrap();
                let (mut a, mut b) = (g.alloc(t, h).unwrap(), g.alloc(t, h).unwrap());
                g.moe(&mut a, &gx, &drawn).unwrap();
                g.moe(&mut b, &gx, &uploaded).unwrap();
                let (a, b) = (g.download(&a).unwrap(), g.download(&b).unwrap());
                let diff = a.iter().zip(&b).filter(|(p, q)| p.to_bits() != q.to_bits()).count();
                let err = rel_err(&a, &b);
                eprintln!("dummy moe part {rank}/{n} T={t} {}: {diff} of {} outputs differ, rel err {err:.2e}", dtype.name(), a.len());
                assert!(err <= 1e-6, "device-drawn expert columns differ from the uploaded host slices: rel err {err:.2e}");
            }
        }
    }
}

#[test]
fn argmax_rows_on_device() {
    for dtype in DTYPES {
        let Some(g) = gpu(dtype) else { return };
        let c = CpuBackend::new(dtype);
        let mut r = Rng(8);
        let (rows, cols) = (5usize, 151_936usize);
        let mut x = r.uniform(rows * cols, 10.0);
        x[cols + 7] = 50.0; // row 1: a tie at 7 and 9000 → 7
        x[cols + 9000] = 50.0;
        x[2 * cols + 3] = f32::NAN; // row 2: NaN is never chosen
        x[2 * cols + 100] = 60.0;
        x[4 * cols + cols - 1] = 70.0; // row 4: the last column
        for v in &mut x[3 * cols..4 * cols] {
            *v = -v.abs() - 1.0; // row 3: -0 at 5 ties +0 at 6 → 5
        }
        (x[3 * cols + 5], x[3 * cols + 6]) = (-0.0, 0.0);
        x[..cols].fill(f32::NAN); // row 0: all NaN → 0
        let (gb, cb) = (g.upload_buf(rows, cols, &x).unwrap(), c.upload_buf(rows, cols, &x).unwrap());
        let (gi, ci) = (g.argmax_rows(&gb, rows, cols).unwrap(), c.argmax_rows(&cb, rows, cols).unwrap());
        eprintln!("argmax {}: gpu {gi:?} cpu {ci:?}", dtype.name());
        assert_eq!(gi, ci);
        assert_eq!(gi, [0, 7, 100, 5, (cols - 1) as u32]);
        // Columns past `limit` (padding ids) never win, even with the largest value.
        let limit = cols - 1000;
        let (gi, ci) = (g.argmax_rows(&gb, rows, limit).unwrap(), c.argmax_rows(&cb, rows, limit).unwrap());
        assert_eq!(gi, ci);
        assert!(gi[4] < limit as u32);
        // A short odd row: fewer elements than one block's threads.
        let x = r.uniform(3 * 37, 1.0);
        let (gb, cb) = (g.upload_buf(3, 37, &x).unwrap(), c.upload_buf(3, 37, &x).unwrap());
        assert_eq!(g.argmax_rows(&gb, 3, 37).unwrap(), c.argmax_rows(&cb, 3, 37).unwrap());
        // More rows than the device state was first made for (it grows), each launch clearing what
        // the next one needs: the same rows twice give the same ids.
        let (rows, cols) = (45usize, 4099usize);
        let x = r.uniform(rows * cols, 1.0);
        let (gb, cb) = (g.upload_buf(rows, cols, &x).unwrap(), c.upload_buf(rows, cols, &x).unwrap());
        let want = c.argmax_rows(&cb, rows, cols).unwrap();
        for _ in 0..2 {
            assert_eq!(g.argmax_rows(&gb, rows, cols).unwrap(), want);
        }
    }
}

#[test]
fn top_rows_on_device_equal_the_rows_read_back() {
    // Top-k sampling's candidates (`top_rows`): selected on the device against the same rows read back
    // and selected on the host (sampler::top_scaled), value for value and id for id: ties, -0 and +0,
    // NaN, ±inf, per-row k and temperature, a row with fewer finite values than k, a short row and a
    // long one, all columns or fewer (`limit`).
    for dtype in DTYPES {
        let Some(g) = gpu(dtype) else { return };
        g.set_device_top(true);
        let mut r = Rng(12);
        for (rows, cols) in [(3usize, 151_936usize), (2, 1000), (1, 300_000)] {
            let mut x: Vec<f32> = r.uniform(rows * cols, 8.0).iter().map(|v| (v * 2.0).round() / 2.0).collect();
            (x[5], x[77], x[cols - 1], x[9], x[10]) = (f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -0.0, 0.0);
            if rows > 1 {
                x[cols + 3] = 100.0;
            }
            if rows > 2 {
                for v in &mut x[2 * cols..3 * cols] {
                    *v = f32::NEG_INFINITY; // row 2: three finite values only
                }
                (x[2 * cols + 7], x[2 * cols + 8], x[2 * cols + 900]) = (-0.0, 0.0, -3.0);
            }
            let buf = g.upload_buf(rows, cols, &x).unwrap();
            let want: Vec<(usize, f32)> = [(20, 1.0 / 0.6), (64, 1.0), (5, 3.0)].into_iter().take(rows).collect();
            for limit in [cols, cols - 100] {
                let dev = g.top_rows(&buf, rows, limit, &want).unwrap();
                let host = qwen3rs::backend::top_rows_on_host(&g, &buf, rows, limit, &want).unwrap();
                let bits = |v: &Vec<Vec<(f32, u32)>>| {
                    v.iter().map(|row| row.iter().map(|&(l, i)| (l.to_bits(), i)).collect::<Vec<_>>()).collect::<Vec<_>>()
                };
                assert_eq!(bits(&dev), bits(&host), "{} rows {rows} cols {cols} limit {limit}", dtype.name());
                assert!(dev.iter().zip(&want).all(|(row, w)| row.len() <= w.0));
            }
        }
    }
}

#[test]
fn out_of_memory_is_an_error_and_the_backend_stays_usable() {
    let Some(g) = gpu(DType::BF16) else { return };
    // 1 TiB of KV cache: more than any GPU has.
    match g.alloc_kv(1 << 20, 16, 32768) {
        Err(Error::OutOfMemory(m)) => eprintln!("OOM as expected: {m}"),
        Err(e) => panic!("expected OutOfMemory, got {e}"),
        Ok(_) => panic!("a 1 TiB allocation succeeded?"),
    }
    match g.alloc_kv(8, 12, 64) {
        Err(Error::InvalidArgument(m)) => assert!(m.contains("block_size 12"), "{m}"),
        Err(e) => panic!("expected InvalidArgument for block_size 12, got {e}"),
        Ok(_) => panic!("block_size 12 accepted"),
    }
    let c = CpuBackend::new(DType::BF16);
    let x: Vec<f32> = (0..7 * 64).map(|i| (i as f32 * 0.37).sin()).collect();
    let w = tensor(&vec![1.0; 64], &[64]);
    check("rms_norm after OOM", DType::BF16, &run_add_rms(&g, &x, None, 7, 64, &w).1, &run_add_rms(&c, &x, None, 7, 64, &w).1, 1e-2);
}
