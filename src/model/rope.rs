//! RoPE tables: inverse frequencies (plain, linear or YaRN, exactly as transformers'
//! `modeling_rope_utils` computes them) and the [max_pos, head_dim] cos|sin table the backends read.

use crate::config::{Qwen3Config, RopeScaling};
use crate::tensor::HostTensor;
use std::f64::consts::PI;

/// Inverse frequencies [head_dim/2] (f32, as torch computes them) and the factor cos/sin are scaled by.
pub fn inv_freq(cfg: &Qwen3Config) -> (Vec<f32>, f32) {
    let dim = cfg.head_dim;
    let base = cfg.rope_theta;
    // torch: base ** (arange(0, dim, 2).float() / dim), in f32.
    let pos_freqs: Vec<f32> = (0..dim / 2).map(|i| (base as f32).powf((2 * i) as f32 / dim as f32)).collect();
    let plain: Vec<f32> = pos_freqs.iter().map(|&p| 1.0 / p).collect();
    match &cfg.rope_scaling {
        RopeScaling::None => (plain, 1.0),
        RopeScaling::Linear { factor } => (plain.iter().map(|f| f / *factor as f32).collect(), 1.0),
        RopeScaling::Yarn {
            factor,
            original_max_position_embeddings,
            beta_fast,
            beta_slow,
            attention_factor,
            mscale,
            mscale_all_dim,
            truncate,
        } => {
            let (factor, original) = (*factor, *original_max_position_embeddings as f64);
            let get_mscale = |scale: f64, m: f64| if scale <= 1.0 { 1.0 } else { 0.1 * m * scale.ln() + 1.0 };
            let attn = match (attention_factor, mscale, mscale_all_dim) {
                (Some(a), _, _) => *a,
                (None, Some(m), Some(ma)) if *m != 0.0 && *ma != 0.0 => get_mscale(factor, *m) / get_mscale(factor, *ma),
                _ => get_mscale(factor, 1.0),
            };
            let beta_fast = if *beta_fast == 0.0 { 32.0 } else { *beta_fast };
            let beta_slow = if *beta_slow == 0.0 { 1.0 } else { *beta_slow };
            let correction_dim = |rotations: f64| (dim as f64 * (original / (rotations * 2.0 * PI)).ln()) / (2.0 * base.ln());
            let (mut low, mut high) = (correction_dim(beta_fast), correction_dim(beta_slow));
            if *truncate {
                low = low.floor();
                high = high.ceil();
            }
            let low = low.max(0.0) as f32;
            let mut high = high.min(dim as f64 - 1.0) as f32;
            if low == high {
                high += 0.001; // transformers' guard against a zero-width ramp
            }
            let freqs = (0..dim / 2)
                .map(|i| {
                    let ramp = ((i as f32 - low) / (high - low)).clamp(0.0, 1.0);
                    let extrapolation = 1.0 - ramp;
                    let interp = 1.0 / (factor as f32 * pos_freqs[i]);
                    interp * (1.0 - extrapolation) + plain[i] * extrapolation
                })
                .collect();
            (freqs, attn as f32)
        }
    }
}

/// The [max_pos, head_dim] f32 table: row p holds cos(p·f)·s for each frequency, then sin(p·f)·s.
pub fn table(cfg: &Qwen3Config, max_pos: usize) -> HostTensor {
    let (freqs, scale) = inv_freq(cfg);
    let half = freqs.len();
    let mut t = vec![0f32; max_pos * 2 * half];
    for (p, row) in t.chunks_mut(2 * half).enumerate() {
        for (i, &f) in freqs.iter().enumerate() {
            // The angle is an f32 product, as in transformers (inv_freq @ position_ids in float32).
            let angle = (p as f32 * f) as f64;
            row[i] = (angle.cos() as f32) * scale;
            row[half + i] = (angle.sin() as f32) * scale;
        }
    }
    HostTensor::from_f32(&t, vec![max_pos, 2 * half])
}
