//! Streaming read bandwidth: every thread sums its share of a 1 GiB buffer (AVX-512/AVX2 via the
//! compiler, 16 accumulators), best of several passes. Prints GB/s; the ceiling decode is compared to.
//!
//!     cargo run --release --example bandwidth -- [threads] [MiB]

use rayon::prelude::*;
use std::time::Instant;

#[inline(always)]
fn sum_body(v: &[f32]) -> f32 {
    let mut acc = [0f32; 64];
    for c in v.chunks_exact(64) {
        for l in 0..64 {
            acc[l] += c[l];
        }
    }
    acc.iter().sum()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn sum_avx512(v: &[f32]) -> f32 {
    sum_body(v)
}

fn sum(v: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512F was just detected; the body is safe Rust.
        return unsafe { sum_avx512(v) };
    }
    sum_body(v)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let threads: usize = args.get(1).map(|s| s.parse().unwrap()).unwrap_or(2);
    let mib: usize = args.get(2).map(|s| s.parse().unwrap()).unwrap_or(1024);
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
    let n = mib * 1024 * 1024 / 4;
    let buf: Vec<f32> = pool.install(|| (0..n).into_par_iter().map(|i| (i % 7) as f32).collect());
    let per = n.div_ceil(threads);
    let mut best = f64::MAX;
    let mut total = 0f32;
    for _ in 0..7 {
        let t = Instant::now();
        total += pool.install(|| buf.par_chunks(per).map(sum).sum::<f32>());
        best = best.min(t.elapsed().as_secs_f64());
    }
    println!(
        "{{\"threads\": {threads}, \"bytes\": {}, \"best_s\": {best:.6}, \"gb_s\": {:.2}, \"check\": {total}}}",
        n * 4,
        (n * 4) as f64 / best / 1e9
    );
}
