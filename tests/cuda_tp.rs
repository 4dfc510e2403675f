#![cfg(feature = "cuda")]
//! Tensor parallelism on GPUs: `TensorParallel<CudaBackend>` (NCCL all-reduce) computes the logits
//! the single-GPU model does, on the conformance checkpoints. With one GPU the group has one rank
//! (NCCL loads, initialises and all-reduces, the sharding is trivial); with more, 2 ranks really
//! split the model. Prints SKIP and passes where no GPU (or NCCL) is usable.

mod common;

use common::AsHostTensors;
use qwen3rs::backend::cuda::{self, CudaBackend};
use qwen3rs::backend::tp::TensorParallel;
use qwen3rs::backend::Backend;
use qwen3rs::config::Qwen3Config;
use qwen3rs::engine::Engine;
use qwen3rs::model::dummy::DummyWeights;
use qwen3rs::model::Model;
use qwen3rs::tensor::DType;
use qwen3rs::weights::{SafetensorsWeights, TensorSource};
use std::path::Path;

const CASES: [&str; 3] = ["dense_untied_f32_gqa4", "moe_mixed_sharded_bf16", "dense_tied_bf16"];

fn logits<B: Backend>(backend: B, case: &str, ids: &[u32]) -> Vec<f32> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(case);
    let config = Qwen3Config::from_file(&dir.join("config.json")).unwrap();
    let weights = SafetensorsWeights::open_dir(&dir).unwrap();
    let model = Model::load(backend, config, &weights, 256, &mut |_, _| {}).unwrap();
    Engine::new(model, None, 1).unwrap().logits(ids).unwrap()
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
        for n in [1usize, 2].into_iter().filter(|&n| n <= gpus) {
            let ranks = (0..n).map(|i| CudaBackend::new(i, DType::F32).unwrap()).collect();
            let tp = match TensorParallel::new(ranks, &config) {
                Ok(tp) => tp,
                Err(e) => {
                    eprintln!("SKIP tensor_parallel={n} ({case}): {e}");
                    continue;
                }
            };
            let err = rel_err(&logits(tp, case, &ids), &one);
            eprintln!("tensor_parallel={n} {case}: rel err {err:.2e} vs one GPU (f32, bar 1e-5)");
            assert!(err <= 1e-5, "{case} tp={n}: {err}");
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
        for n in [1usize, 2].into_iter().filter(|&n| n <= gpus) {
            let tp = || TensorParallel::new((0..n).map(|i| CudaBackend::new(i, DType::F32).unwrap()).collect(), &config).unwrap();
            let drawn = dummy_logits(tp(), &config, &DummyWeights { seed: 3 }, &ids);
            let sliced = dummy_logits(tp(), &config, &AsHostTensors(DummyWeights { seed: 3 }), &ids);
            let (same, vs_one) = (rel_err(&drawn, &sliced), rel_err(&drawn, &one));
            eprintln!("tensor_parallel={n} dummy {file}: rel err {same:.2e} vs host shards (bar 1e-6), {vs_one:.2e} vs one GPU (bar 1e-5)");
            assert!(same <= 1e-6, "{file} tp={n}: drawn shards give {same} vs host shards");
            assert!(vs_one <= 1e-5, "{file} tp={n}: {vs_one} vs one GPU");
        }
    }
}
