//! Every SIMD path against the scalar reference, on random inputs of odd sizes.
//! Thresholds: dot products may differ by summation order only, so |fast − ref| ≤ 2e-6 · Σ|w·x|
//! (+1e-30) for f32, bf16 and int8 weights alike (bf16 × bf16 with `vdpbf16ps` has exact products
//! on bf16-exact inputs, so the same bound holds); bf16 rounding, RoPE and axpy are bit-exact;
//! exp within 4 ulp (rel 5e-7); SwiGLU, softmax and RMSNorm within rel 2e-6 in f32 (in bf16
//! SwiGLU may land one bf16 ulp away where the f32 values straddle a rounding boundary).

use super::simd::{self, Isa};
use super::*;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        ((z >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.next()).collect()
    }
}

const KS: [usize; 9] = [1, 7, 15, 17, 33, 64, 127, 1000, 1024];

fn weight(kind: &str, v: &[f32], n: usize, k: usize) -> CpuWeight {
    let t = HostTensor::from_f32(v, vec![n, k]);
    match kind {
        "f32" => CpuWeight::Host(t),
        "bf16" => CpuWeight::Host(t.to_dtype(DType::BF16)),
        "f16" => CpuWeight::Host(t.to_dtype(DType::F16)),
        _ => CpuWeight::Q8(Q8Weight::quantize(&t)),
    }
}

fn abs_bound(x: &[f32], w: &CpuWeight, t: usize) -> Vec<f32> {
    let [n, k] = w.shape();
    let wf: Vec<f32> = match w {
        CpuWeight::Host(h) => h.to_f32_vec().iter().map(|v| v.abs()).collect(),
        CpuWeight::Q8(q) => q.q.iter().enumerate().map(|(i, &v)| (v as f32 * q.scale[i / k]).abs()).collect(),
    };
    let mut b = vec![0f32; t * n];
    for i in 0..t {
        for j in 0..n {
            b[i * n + j] = (0..k).map(|c| wf[j * k + c] * x[i * k + c].abs()).sum();
        }
    }
    b
}

#[test]
fn matmul_every_isa_matches_reference() {
    let mut rng = Rng(7);
    let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
    for isa in Isa::available() {
        for kind in ["f32", "bf16", "f16", "int8"] {
            for &k in &KS {
                for &(n, t) in &[(1, 1), (5, 1), (17, 2), (9, 3), (13, 4), (33, 5), (6, 9), (70, 17), (31, 8)] {
                    let w = weight(kind, &rng.vec(n * k), n, k);
                    for bf16_acts in [false, true] {
                        let mut x = rng.vec(t * k);
                        if bf16_acts {
                            x.iter_mut().for_each(|v| *v = simd::round_bf16_one(*v));
                        }
                        let mut want = vec![0f32; t * n];
                        matmul_reference(&mut want, &x, &w, t);
                        let mut got = vec![f32::NAN; t * n];
                        pool.install(|| matmul_with(isa, bf16_acts, &mut got, &x, &w, t));
                        let bound = abs_bound(&x, &w, t);
                        for i in 0..t * n {
                            assert!(
                                (got[i] - want[i]).abs() <= 2e-6 * bound[i] + 1e-30,
                                "{isa:?} {kind} bf16_acts={bf16_acts} k={k} n={n} t={t} [{i}]: {} vs {}",
                                got[i],
                                want[i]
                            );
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn int8_quantisation_error_is_within_half_a_step() {
    let mut rng = Rng(3);
    let (n, k) = (7, 333);
    let v = rng.vec(n * k);
    let q = Q8Weight::quantize(&HostTensor::from_f32(&v, vec![n, k]));
    for j in 0..n {
        for c in 0..k {
            let back = q.q[j * k + c] as f32 * q.scale[j];
            assert!((back - v[j * k + c]).abs() <= 0.5 * q.scale[j] * 1.0001);
        }
    }
}

#[test]
fn round_bf16_is_bit_exact() {
    let mut rng = Rng(11);
    let mut special = vec![
        0.0,
        -0.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        f32::MAX,
        f32::MIN_POSITIVE,
        1e-40,
        -1e-40,
        f32::from_bits(0x3F80_8000),
        f32::from_bits(0x3F81_8000),
        f32::from_bits(0x7F7F_FFFF),
        f32::from_bits(0x7FC0_0001),
    ];
    special.extend(rng.vec(1000).iter().map(|v| v * 1e3));
    special.extend((0..2000u32).map(|i| f32::from_bits(i.wrapping_mul(2_654_435_761))));
    for isa in Isa::available() {
        for len in [1, 7, 15, 17, 33, 127, special.len()] {
            let mut got = special[..len].to_vec();
            simd::round_bf16(isa, &mut got);
            for (g, &x) in got.iter().zip(&special[..len]) {
                let want = bf16::from_f32(x).to_f32();
                assert!(g.to_bits() == want.to_bits() || (g.is_nan() && want.is_nan()), "{isa:?} {x:e}: {g:e} vs {want:e}");
            }
        }
    }
}

#[test]
fn exp_is_close_to_std() {
    let mut x = -87.0f32;
    while x < 88.0 {
        let (got, want) = (simd::exp_approx(x), x.exp());
        assert!(((got - want) / want).abs() <= 5e-7, "exp({x}) = {got} vs {want}");
        x += 0.0137;
    }
    assert_eq!(simd::exp_approx(f32::NEG_INFINITY), 0.0f32.max(simd::exp_approx(-1e9)));
}

fn close(a: &[f32], b: &[f32], rel: f32, what: &str) {
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!((x - y).abs() <= rel * y.abs().max(1e-6), "{what} [{i}]: {x} vs {y}");
    }
}

#[test]
fn elementwise_kernels_match_reference() {
    let mut rng = Rng(5);
    for isa in Isa::available() {
        for &n in &[1usize, 7, 15, 17, 33, 127, 1000] {
            let (g, u) = (rng.vec(n).iter().map(|v| v * 8.0).collect::<Vec<_>>(), rng.vec(n));
            // SwiGLU in f32.
            let mut got = vec![0f32; n];
            simd::swiglu(isa, &mut got, &g, &u, false);
            let want: Vec<f32> = g.iter().zip(&u).map(|(&g, &u)| kernels::silu(g) * u).collect();
            close(&got, &want, 2e-6, &format!("{isa:?} swiglu f32"));
            // SwiGLU in bf16: at most one bf16 step (2^-7 relative) apart.
            simd::swiglu(isa, &mut got, &g, &u, true);
            let r = |x: f32| bf16::from_f32(x).to_f32();
            let want: Vec<f32> = g.iter().zip(&u).map(|(&g, &u)| r(r(kernels::silu(g)) * u)).collect();
            close(&got, &want, 1.0 / 128.0, &format!("{isa:?} swiglu bf16"));
            // Softmax.
            let mut got: Vec<f32> = g.clone();
            simd::softmax(isa, &mut got);
            let mut want = g.clone();
            kernels::softmax(&mut want);
            close(&got, &want, 2e-6, &format!("{isa:?} softmax"));
            // RMSNorm, f32 and bf16 weights.
            let w = rng.vec(n);
            let mut got = vec![0f32; n];
            let mut want = vec![0f32; n];
            simd::rms_norm_f32(isa, &mut got, &g, &w, 1e-6);
            kernels::rms_norm(&mut want, &g, &w, 1e-6);
            close(&got, &want, 2e-6, &format!("{isa:?} rms_norm f32"));
            let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
            simd::rms_norm_bf16(isa, &mut got, &g, &wb, 1e-6);
            kernels::rms_norm(&mut want, &g, &wb, 1e-6);
            close(&got, &want, 2e-6, &format!("{isa:?} rms_norm bf16"));
            // axpy (bit-exact: one multiply-add per element, no contraction).
            let mut got = u.clone();
            simd::axpy_bf16(isa, &mut got, 0.37, &wb);
            let want: Vec<f32> = u.iter().zip(&wb).map(|(&o, &v)| o + 0.37 * v.to_f32()).collect();
            assert_eq!(got, want, "{isa:?} axpy");
        }
        for &hd in &[2usize, 64, 128, 130] {
            let v = rng.vec(hd);
            let (c, s) = (rng.vec(hd / 2), rng.vec(hd / 2));
            let mut got = v.clone();
            simd::rope(isa, &mut got, &c, &s);
            let mut want = v.clone();
            kernels::rope(&mut want, &c, &s);
            assert_eq!(got, want, "{isa:?} rope");
        }
    }
}

#[test]
fn attention_matches_reference() {
    use crate::backend::{AttnShape, Backend, BatchInfo, SeqSlot};
    let mut rng = Rng(9);
    for dtype in [DType::F32, DType::BF16] {
        for &(nh, nkv, hd) in &[(4usize, 2usize, 16usize), (6, 1, 34), (2, 2, 128)] {
            let be = CpuBackend::with_options(dtype, CpuOptions { num_threads: Some(2), quant: None }).unwrap();
            let shape = AttnShape { n_heads: nh, n_kv_heads: nkv, head_dim: hd };
            let (bs, kvd) = (4, nkv * hd);
            let mut kv = be.alloc_kv(16, bs, kvd).unwrap();
            let blocks_a: Vec<u32> = vec![3, 0, 5, 7, 9];
            let blocks_b: Vec<u32> = vec![1, 2];
            // Step 1: prefill 9 rows of A and 5 of B; step 2: one decode row each.
            for (start_a, rows_a, start_b, rows_b) in [(0usize, 9usize, 0usize, 5usize), (9, 1, 5, 1)] {
                let t = rows_a + rows_b;
                let mut k = be.alloc(t, kvd).unwrap();
                let mut v = be.alloc(t, kvd).unwrap();
                let mut q = be.alloc(t, nh * hd).unwrap();
                for buf in [&mut k, &mut v, &mut q] {
                    buf.data = rng.vec(buf.data.len()).iter().map(|x| simd::round_bf16_one(*x)).collect();
                }
                let positions: Vec<u32> = (start_a..start_a + rows_a).chain(start_b..start_b + rows_b).map(|p| p as u32).collect();
                let tokens = vec![0u32; t];
                let batch = BatchInfo {
                    tokens: &tokens,
                    positions: &positions,
                    seqs: vec![
                        SeqSlot { rows: 0..rows_a, start_pos: start_a, blocks: &blocks_a },
                        SeqSlot { rows: rows_a..t, start_pos: start_b, blocks: &blocks_b },
                    ],
                    block_size: bs,
                };
                be.kv_append(&mut kv, &k, &v, &batch).unwrap();
                let mut out = be.alloc(t, nh * hd).unwrap();
                be.attention(&mut out, &q, &kv, &batch, shape).unwrap();
                for (row, seq) in (0..t).map(|r| (r, batch.seqs.iter().find(|s| s.rows.contains(&r)).unwrap())) {
                    let ctx = seq.start_pos + row - seq.rows.start + 1;
                    for h in 0..nh {
                        let qh = &q.data[row * nh * hd + h * hd..][..hd];
                        let mut want = vec![0f32; hd];
                        let off = (h / (nh / nkv)) * hd;
                        match (&kv.k, &kv.v) {
                            (KvData::F32(kk), KvData::F32(vv)) => {
                                attend_head_reference(&mut want, qh, kk, vv, ctx, seq.blocks, bs, kvd, off)
                            }
                            (KvData::BF16(kk), KvData::BF16(vv)) => {
                                attend_head_reference(&mut want, qh, kk, vv, ctx, seq.blocks, bs, kvd, off)
                            }
                            _ => unreachable!(),
                        }
                        if dtype == DType::BF16 {
                            want.iter_mut().for_each(|x| *x = simd::round_bf16_one(*x));
                        }
                        let got = &out.data[row * nh * hd + h * hd..][..hd];
                        let tol = if dtype == DType::BF16 { 1.0 / 128.0 } else { 2e-6 };
                        for (g, w) in got.iter().zip(&want) {
                            // Outputs are O(1) weighted sums of values: 1e-5 absolute covers the score sums' reordering.
                            assert!((g - w).abs() <= tol * w.abs() + 1e-5, "{dtype:?} nh={nh} hd={hd} row {row} head {h}: {g} vs {w}");
                        }
                    }
                }
            }
        }
    }
}
