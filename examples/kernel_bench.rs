//! Micro-benchmark of the CPU matmul paths: GB/s of weights (decode, t=1) and GFLOP/s (prefill).
//!
//!     cargo run --release --example kernel_bench -- [threads]

use qwen3rs::backend::cpu::simd::Isa;
use qwen3rs::backend::cpu::{matmul_with, CpuWeight, Q8Weight};
use qwen3rs::tensor::{DType, HostTensor};
use std::time::Instant;

fn main() {
    let threads: usize = std::env::args().nth(1).map(|s| s.parse().unwrap()).unwrap_or(2);
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
    // 64 matrices of [3072, 1024]: 400 MB of bf16, far past the caches.
    let n: usize = std::env::var("KB_N").ok().map(|s| s.parse().unwrap()).unwrap_or(3072);
    let mats: usize = std::env::var("KB_MATS").ok().map(|s| s.parse().unwrap()).unwrap_or(64);
    let k = 1024;
    let vals: Vec<f32> = (0..n * k).map(|i| ((i * 2_654_435_761usize) % 1000) as f32 / 1000.0 - 0.5).collect();
    let base = HostTensor::from_f32(&vals, vec![n, k]);
    for kind in ["bf16", "int8"] {
        let ws: Vec<CpuWeight> = (0..mats)
            .map(|_| match kind {
                "bf16" => CpuWeight::Host(base.to_dtype(DType::BF16)),
                _ => CpuWeight::Q8(Q8Weight::quantize(&base)),
            })
            .collect();
        let bytes: usize = ws.iter().map(|w| w.bytes()).sum();
        for isa in Isa::available() {
            for &(t, bf16_acts) in &[(1usize, false), (1, true), (128, true)] {
                let x: Vec<f32> = (0..t * k).map(|i| half::bf16::from_f32((i % 17) as f32 / 17.0).to_f32()).collect();
                let mut out = vec![0f32; t * n];
                let reps = if t == 1 { 200 / mats.min(200) + 3 } else { 1 };
                let used = if t == 1 { mats } else { 4.min(mats) };
                let mut best = f64::MAX;
                for _ in 0..reps {
                    let st = Instant::now();
                    pool.install(|| ws[..used].iter().for_each(|w| matmul_with(isa, bf16_acts, &mut out, &x, w, t)));
                    best = best.min(st.elapsed().as_secs_f64());
                }
                let flops = 2.0 * (t * n * k * used) as f64;
                println!(
                    "{kind:5} {:11} t={t:3} bf16_acts={bf16_acts:5}: {:6.1} GB/s of weights, {:6.1} GFLOP/s",
                    isa.name(),
                    (bytes * used / mats) as f64 / best / 1e9,
                    flops / best / 1e9
                );
            }
        }
    }
}
