#![cfg(feature = "cuda")]
//! Tensor parallelism on GPUs: `TensorParallel<CudaBackend>` (NCCL all-reduce) computes the logits
//! the single-GPU model does, on the conformance checkpoints, with experts split by columns or whole
//! (expert parallelism). With one GPU the group has one rank (NCCL loads, initialises and
//! all-reduces, the sharding is trivial); with more, 2 ranks really split the model. The expert-
//! parallel kernels (a block of whole experts, other ranks' choices skipped) are also checked on one
//! GPU against the CPU backend. Prints SKIP and passes where no GPU (or NCCL) is usable.

mod common;

use common::AsHostTensors;
use qwen3rs::backend::cpu::CpuBackend;
use qwen3rs::backend::cuda::{self, CudaBackend};
use qwen3rs::backend::tp::{MoeSplit, TensorParallel};
use qwen3rs::backend::{Backend, MoeHost};
use qwen3rs::config::Qwen3Config;
use qwen3rs::engine::Engine;
use qwen3rs::model::dummy::{DummySpec, DummyWeights};
use qwen3rs::model::Model;
use qwen3rs::tensor::DType;
use qwen3rs::weights::{SafetensorsWeights, TensorSource};
use std::ops::Range;
use std::path::Path;

const CASES: [&str; 3] = ["dense_untied_f32_gqa4", "moe_mixed_sharded_bf16", "dense_tied_bf16"];

fn logits<B: Backend>(backend: B, case: &str, ids: &[u32]) -> Vec<f32> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(case);
    let config = Qwen3Config::from_file(&dir.join("config.json")).unwrap();
    let weights = SafetensorsWeights::open_dir(&dir).unwrap();
    let model = Model::load(backend, config, &weights, 256, &mut |_, _| {}).unwrap();
    Engine::new(model, None, 1).unwrap().logits(ids).unwrap()
}

/// The (ranks, expert split) pairs to run on `gpus` GPUs: 1 and 2 ranks, experts by columns and, for
/// a MoE model, whole.
fn sizes(gpus: usize, config: &Qwen3Config) -> Vec<(usize, MoeSplit)> {
    let splits: &[MoeSplit] = if config.num_experts > 0 { &[MoeSplit::Columns, MoeSplit::Experts] } else { &[MoeSplit::Columns] };
    [1usize, 2].into_iter().filter(|&n| n <= gpus).flat_map(|n| splits.iter().map(move |&s| (n, s))).collect()
}

fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    let num: f32 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
    let den: f32 = b.iter().map(|y| y * y).sum();
    (num / den).sqrt()
}

#[test]
fn tensor_parallel_on_gpus_equals_one_gpu() {
    if !cuda::available() {
        eprintln!("SKIP (no usable GPU): {}", cuda::unavailable_reason().unwrap_or_default());
        return;
    }
    let gpus = cuda::device_count().unwrap_or(1);
    let ids: Vec<u32> = (3..40).collect();
    for case in CASES {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(case);
        let config = Qwen3Config::from_file(&dir.join("config.json")).unwrap();
        let one = logits(CudaBackend::new(0, DType::F32).unwrap(), case, &ids);
        for (n, split) in sizes(gpus, &config) {
            let ranks = (0..n).map(|i| CudaBackend::new(i, DType::F32).unwrap()).collect();
            let tp = match TensorParallel::with_moe_split(ranks, &config, split) {
                Ok(tp) => tp,
                Err(e) => {
                    eprintln!("SKIP tensor_parallel={n} {split:?} ({case}): {e}");
                    continue;
                }
            };
            let err = rel_err(&logits(tp, case, &ids), &one);
            eprintln!("tensor_parallel={n} {split:?} {case}: rel err {err:.2e} vs one GPU (f32, bar 1e-5)");
            assert!(err <= 1e-5, "{case} tp={n} {split:?}: {err}");
        }
    }
}

fn dummy_logits<B: Backend>(backend: B, config: &Qwen3Config, src: &dyn TensorSource, ids: &[u32]) -> Vec<f32> {
    let model = Model::load(backend, config.clone(), src, 64, &mut |_, _| {}).unwrap();
    Engine::new(model, None, 1).unwrap().logits(ids).unwrap()
}

#[test]
fn dummy_shards_drawn_on_each_gpu_equal_the_host_shards() {
    // Each rank draws its shards of the dummy weights on its own GPU (row and column splits, MoE
    // expert columns, the odd fixture's shards starting inside chunks): the logits equal those of the
    // same model whose shards were cut from whole host tensors, and those of one GPU.
    if !cuda::available() {
        eprintln!("SKIP (no usable GPU): {}", cuda::unavailable_reason().unwrap_or_default());
        return;
    }
    let gpus = cuda::device_count().unwrap_or(1);
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny_qwen3");
    let ids: Vec<u32> = (0..23).map(|i| (i * 131 % 1000) as u32).collect();
    for file in ["odd_tp_config.json", "moe_config.json", "config.json"] {
        let config = Qwen3Config::from_file(&dir.join(file)).unwrap();
        let one = dummy_logits(CudaBackend::new(0, DType::F32).unwrap(), &config, &DummyWeights { seed: 3 }, &ids);
        for (n, split) in sizes(gpus, &config) {
            let tp = || {
                TensorParallel::with_moe_split((0..n).map(|i| CudaBackend::new(i, DType::F32).unwrap()).collect(), &config, split).unwrap()
            };
            let drawn = dummy_logits(tp(), &config, &DummyWeights { seed: 3 }, &ids);
            let sliced = dummy_logits(tp(), &config, &AsHostTensors(DummyWeights { seed: 3 }), &ids);
            let (same, vs_one) = (rel_err(&drawn, &sliced), rel_err(&drawn, &one));
            eprintln!("tensor_parallel={n} {split:?} dummy {file}: rel err {same:.2e} vs host shards (bar 1e-6), {vs_one:.2e} vs one GPU (bar 1e-5)");
            assert!(same <= 1e-6, "{file} tp={n} {split:?}: drawn shards give {same} vs host shards");
            assert!(vs_one <= 1e-5, "{file} tp={n} {split:?}: {vs_one} vs one GPU");
        }
    }
}

/// The experts `held` of a random MoE layer of `e` experts (bf16-valued dummy tensors), whole.
fn moe_block(e: usize, k: usize, h: usize, inter: usize, held: Range<usize>) -> MoeHost {
    let t = |name: String, shape: &[usize]| DummySpec::new(21, &name, shape).host_tensor(shape);
    let experts =
        held.clone().map(|x| [t(format!("g{x}"), &[inter, h]), t(format!("u{x}"), &[inter, h]), t(format!("d{x}"), &[h, inter])]).collect();
    MoeHost { router: t("router".into(), &[e, h]), experts, first_expert: held.start, top_k: k, norm_topk_prob: true }
}

fn l2(a: &[f32]) -> f32 {
    a.iter().map(|v| v * v).sum::<f32>().sqrt()
}

fn run_moe<B: Backend>(be: &B, moe: MoeHost, x: &[f32], t: usize) -> Vec<f32> {
    let h = moe.router.shape[1];
    let m = be.upload_moe(moe).unwrap();
    let xb = be.upload_buf(t, h, x).unwrap();
    let mut out = be.alloc(t, h).unwrap();
    be.moe(&mut out, &xb, &m).unwrap();
    be.download(&out).unwrap()
}

#[test]
fn expert_blocks_on_a_gpu_equal_the_cpu() {
    // Expert parallelism's kernels on one GPU: a block of whole experts (moe_route's local ids, id -1
    // for other ranks' choices, skipped by the decode GEMVs, moe_sort, both prefill paths and the
    // combine) computes what the CPU backend does with the same block, and the blocks of N ranks add
    // up to the whole layer. T = 1, 4 and 8: decode GEMVs (the down projection with the combine in it);
    // 37: prefill through cuBLAS and through the grouped_gemm kernel. Small T leaves some ranks without
    // any pair: their output must be zero. k = 5: an odd number of slots per row.
    if !cuda::available() {
        eprintln!("SKIP (no usable GPU): {}", cuda::unavailable_reason().unwrap_or_default());
        return;
    }
    let (g, c) = (CudaBackend::new(0, DType::F32).unwrap(), CpuBackend::new(DType::F32));
    for (e, k, h, inter) in [(8usize, 2usize, 64usize, 48usize), (16, 4, 96, 40), (128, 8, 128, 64), (24, 5, 128, 96)] {
        for t in [1usize, 4, 8, 37] {
            let x: Vec<f32> = (0..t * h).map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0).collect();
            let whole = run_moe(&c, moe_block(e, k, h, inter, 0..e), &x, t);
            for n in [2usize, 4] {
                for cublas in [true, false] {
                    g.set_moe_cublas(cublas);
                    let mut sum = vec![0f32; t * h];
                    for r in 0..n {
                        let held = r * e / n..(r + 1) * e / n;
                        let want = run_moe(&c, moe_block(e, k, h, inter, held.clone()), &x, t);
                        let got = run_moe(&g, moe_block(e, k, h, inter, held.clone()), &x, t);
                        // Relative to the whole layer's output (a rank's part may be all zeros).
                        let diff: Vec<f32> = got.iter().zip(&want).map(|(a, b)| a - b).collect();
                        let err = l2(&diff) / l2(&whole);
                        assert!(err <= 1e-5, "E={e} k={k} T={t} rank {r}/{n} experts {held:?} cublas={cublas}: {err:.2e} vs the CPU");
                        sum.iter_mut().zip(&got).for_each(|(s, v)| *s += v);
                    }
                    let err = rel_err(&sum, &whole);
                    eprintln!(
                        "expert blocks E={e} k={k} T={t} n={n} cublas={cublas}: sum of ranks {err:.2e} from the whole layer (bar 1e-5)"
                    );
                    assert!(err <= 1e-5, "E={e} k={k} T={t} n={n} cublas={cublas}: sum of ranks {err:.2e} from the whole layer");
                }
            }
        }
    }
}
