//! Tensor-parallel shards of dummy weights (issue 8): a shard drawn alone (`DummySpec::host_window`,
//! `Backend::dummy_window`, `dummy_moe` with a part of the experts' columns or, under expert
//! parallelism, a block of whole experts) equals that part of the whole tensor, bit for bit: row
//! ranges and column ranges, odd shapes, shards that start and end inside a 65,536-element chunk or
//! cross chunk borders. The whole tensor itself is checked against
//! a plain sequential walk of the chains (the generator as first written), so the values every
//! earlier dummy model had are unchanged. The CUDA versions of these checks are in cuda_ops.rs and
//! cuda_tp.rs.

use half::bf16;
mod common;

use common::AsHostTensors;
use qwen3rs::backend::cpu::CpuBackend;
use qwen3rs::backend::tp::{MoeSplit, TensorParallel};
use qwen3rs::backend::{Backend, MoeDummy, MoeHost};
use qwen3rs::config::Qwen3Config;
use qwen3rs::engine::Engine;
use qwen3rs::model::dummy::{splitmix64, DummySpec, DummyWeights, DUMMY_CHUNK};
use qwen3rs::model::Model;
use qwen3rs::tensor::{DType, HostTensor, Window};
use qwen3rs::weights::TensorSource;
use std::path::Path;

/// Every element of the tensor, one chunk after the other, each chain walked from its start.
fn sequential(spec: &DummySpec, n: usize) -> Vec<bf16> {
    let mut out = Vec::with_capacity(n);
    for c in 0..n.div_ceil(DUMMY_CHUNK) {
        let mut state = spec.chunk_state(c);
        for _ in 0..DUMMY_CHUNK.min(n - c * DUMMY_CHUNK) {
            state = splitmix64(state);
            out.push(spec.value(state));
        }
    }
    out
}

fn bits(t: &HostTensor) -> Vec<u16> {
    t.to_f32_vec().iter().map(|&v| bf16::from_f32(v).to_bits()).collect()
}

/// The windows to check on a [rows, cols] tensor: every rank's row and column shard for 1–4 ranks
/// (uneven ones too), and odd rectangles.
fn windows(rows: usize, cols: usize) -> Vec<Window> {
    let mut out = vec![];
    for n in 1..=4 {
        for r in 0..n {
            out.push(Window { rows: r * rows / n..(r + 1) * rows / n, cols: 0..cols });
            out.push(Window { rows: 0..rows, cols: r * cols / n..(r + 1) * cols / n });
        }
    }
    out.push(Window {
        rows: 1.min(rows)..rows.saturating_sub(1).max(1.min(rows)),
        cols: 2.min(cols)..cols.saturating_sub(3).max(2.min(cols)),
    });
    out.push(Window { rows: rows / 2..rows / 2 + 1, cols: cols / 3..cols });
    out.push(Window { rows: 0..rows, cols: cols - 1..cols });
    out.retain(|w| w.numel() > 0);
    out
}

/// Shapes: a vector, small matrices inside one chunk, rows longer than a chunk, chunk-sized rows,
/// and row counts whose shard borders fall inside chunks.
const SHAPES: [&[usize]; 8] = [&[1000], &[33, 77], &[3, 70_001], &[2, 65_536], &[5, 65_537], &[37, 3001], &[600, 200], &[200, 600]];

#[test]
fn whole_dummy_tensor_is_the_sequential_walk() {
    for (i, &shape) in SHAPES.iter().enumerate() {
        let spec = DummySpec::new(7 + i as u64, &format!("t{i}"), shape);
        let n: usize = shape.iter().product();
        let want: Vec<u16> = sequential(&spec, n).iter().map(|v| v.to_bits()).collect();
        let got = spec.host_tensor(shape);
        assert_eq!(got.shape, shape);
        assert!(bits(&got) == want, "{shape:?}: host_tensor differs from the sequential walk");
    }
}

#[test]
fn dummy_shard_equals_the_slice_of_the_whole_tensor() {
    let mut checked = 0;
    for (i, &shape) in SHAPES.iter().enumerate() {
        let spec = DummySpec::new(7 + i as u64, &format!("t{i}"), shape);
        let whole = spec.host_tensor(shape);
        let (rows, cols) = if shape.len() == 1 { (1, shape[0]) } else { (shape[0], shape[1]) };
        for w in windows(rows, cols) {
            let part = spec.host_window(shape, &w).unwrap();
            let want = whole.window(&w).unwrap();
            assert_eq!(part.shape, want.shape, "{shape:?} {w:?}");
            assert!(bits(&part) == bits(&want), "{shape:?} {w:?}: shard differs from the slice");
            // And element by element against the plain walk (checks `HostTensor::window` too).
            let flat = sequential(&spec, rows * cols);
            let direct: Vec<u16> =
                w.rows.clone().flat_map(|r| w.cols.clone().map(move |c| (r, c))).map(|(r, c)| flat[r * cols + c].to_bits()).collect();
            assert!(bits(&part) == direct, "{shape:?} {w:?}: shard differs from the walk");
            checked += 1;
        }
    }
    assert!(checked > 100);
}

#[test]
fn windows_outside_the_tensor_are_errors() {
    let spec = DummySpec::new(1, "x", &[4, 6]);
    for w in [Window { rows: 0..5, cols: 0..6 }, Window { rows: 0..4, cols: 3..7 }] {
        assert!(spec.host_window(&[4, 6], &w).is_err(), "{w:?}");
        assert!(CpuBackend::new(DType::F32).dummy_window(&spec, &[4, 6], &w).is_err(), "{w:?}");
    }
}

/// A MoE layer's parts, as a backend's `dummy_moe` gets them under tensor parallelism: the columns
/// `part` of the experts `held`.
fn moe_dummy(part: std::ops::Range<usize>, held: std::ops::Range<usize>) -> MoeDummy {
    let (e, h, inter) = (4usize, 200usize, 344usize);
    let spec = |name: &str, shape: &[usize]| DummySpec::new(5, name, shape);
    MoeDummy {
        router: spec("router", &[e, h]),
        experts: (0..e)
            .map(|x| [spec(&format!("g{x}"), &[inter, h]), spec(&format!("u{x}"), &[inter, h]), spec(&format!("d{x}"), &[h, inter])])
            .collect(),
        hidden: h,
        inter,
        part,
        held,
        top_k: 2,
        norm_topk_prob: true,
    }
}

/// The MoE output of 3 rows of x through `moe` on `be`.
fn run_moe(be: &CpuBackend, moe: &<CpuBackend as Backend>::Moe) -> Vec<f32> {
    let x: Vec<f32> = (0..3 * 200).map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0).collect();
    let xb = be.upload_buf(3, 200, &x).unwrap();
    let mut out = be.alloc(3, 200).unwrap();
    be.moe(&mut out, &xb, moe).unwrap();
    be.download(&out).unwrap()
}

/// Rank r of n's (columns, experts) of the 4 × 344 layer: every expert's 1/n of the columns, or
/// (expert parallelism) 1/n of the experts whole.
fn shard(n: usize, r: usize, whole_experts: bool) -> (std::ops::Range<usize>, std::ops::Range<usize>) {
    if whole_experts {
        (0..344, r * 4 / n..(r + 1) * 4 / n)
    } else {
        (r * 344 / n..(r + 1) * 344 / n, 0..4)
    }
}

#[test]
fn dummy_moe_part_equals_the_slices_of_the_whole_experts() {
    let be = CpuBackend::new(DType::F32);
    for (n, r, whole_experts) in [(1, 0, false), (2, 0, false), (2, 1, false), (4, 3, false), (2, 0, true), (2, 1, true), (4, 2, true)] {
        let (part, held) = shard(n, r, whole_experts);
        let moe = moe_dummy(part.clone(), held.clone());
        let (gate_up, down) = moe.windows();
        let experts = moe.experts[held.clone()]
            .iter()
            .map(|[g, u, d]| {
                [
                    g.host_tensor(&[344, 200]).window(&gate_up).unwrap(),
                    u.host_tensor(&[344, 200]).window(&gate_up).unwrap(),
                    d.host_tensor(&[200, 344]).window(&down).unwrap(),
                ]
            })
            .collect();
        let host = MoeHost { router: moe.router.host_tensor(&[4, 200]), experts, first_expert: held.start, top_k: 2, norm_topk_prob: true };
        let (drawn, sliced) = (be.dummy_moe(moe).unwrap(), be.upload_moe(host).unwrap());
        let (a, b) = (run_moe(&be, &drawn), run_moe(&be, &sliced));
        assert!(
            a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits()),
            "tp={n} rank {r}: expert columns {part:?} of experts {held:?} differ"
        );
    }
}

#[test]
fn moe_shards_sum_to_the_whole_layer() {
    // Column parts and expert blocks alike: the ranks' outputs add up to the unsplit layer's (f32:
    // only the summation order differs), and an expert block alone is not the whole (the other
    // experts' contributions are really left out, for the all-reduce to add).
    let be = CpuBackend::new(DType::F32);
    let whole = run_moe(&be, &be.dummy_moe(moe_dummy(0..344, 0..4)).unwrap());
    for n in [2usize, 4] {
        for whole_experts in [false, true] {
            let parts: Vec<Vec<f32>> = (0..n)
                .map(|r| {
                    let (part, held) = shard(n, r, whole_experts);
                    run_moe(&be, &be.dummy_moe(moe_dummy(part, held)).unwrap())
                })
                .collect();
            let sum: Vec<f32> = (0..whole.len()).map(|i| parts.iter().map(|p| p[i]).sum()).collect();
            let err = rel_err(&sum, &whole);
            assert!(err <= 1e-6, "n={n} whole_experts={whole_experts}: sum of ranks is {err:.2e} from the whole layer");
            assert!(parts.iter().all(|p| rel_err(p, &whole) > 1e-2), "n={n} whole_experts={whole_experts}: one rank computed everything");
        }
    }
}

fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    let num: f32 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
    let den: f32 = b.iter().map(|y| y * y).sum();
    (num / den).sqrt()
}

fn odd_config() -> Qwen3Config {
    // 200 wide, 4 heads of 48 over 2 KV heads, dense layer 0 (600 columns) and a MoE layer 1 (4 experts
    // of 344 columns), untied lm_head of 1,000: every split's shards start or end inside a chunk.
    Qwen3Config::from_file(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny_qwen3/odd_tp_config.json")).unwrap()
}

fn logits<B: Backend>(backend: B, src: &dyn TensorSource, ids: &[u32]) -> Vec<f32> {
    let model = Model::load(backend, odd_config(), src, 64, &mut |_, _| {}).unwrap();
    Engine::new(model, None, 1).unwrap().logits(ids).unwrap()
}

#[test]
fn tensor_parallel_dummy_model_equals_the_sliced_host_model() {
    // Bit-identical logits: each rank's drawn shards are the slices the host path uploads, with the
    // experts split by columns or (expert parallelism) whole, 2 or 1 of the 4 per rank.
    let ids: Vec<u32> = (0..23).map(|i| (i * 131 % 1000) as u32).collect();
    let one = logits(CpuBackend::new(DType::F32), &DummyWeights { seed: 3 }, &ids);
    for split in [MoeSplit::Columns, MoeSplit::Experts] {
        for n in [2usize, 4] {
            let tp =
                || TensorParallel::with_moe_split((0..n).map(|_| CpuBackend::new(DType::F32)).collect(), &odd_config(), split).unwrap();
            let drawn = logits(tp(), &DummyWeights { seed: 3 }, &ids);
            let sliced = logits(tp(), &AsHostTensors(DummyWeights { seed: 3 }), &ids);
            assert!(
                drawn.iter().zip(&sliced).all(|(a, b)| a.to_bits() == b.to_bits()),
                "tp={n} {split:?}: drawn shards differ from sliced ones"
            );
            let err = rel_err(&drawn, &one);
            assert!(err <= 1e-5, "tp={n} {split:?}: {err} vs one device");
        }
    }
}
