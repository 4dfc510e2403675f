//! Dummy weights: random tensors of a real config's shapes, for benchmarks and tests where real
//! checkpoints can't be downloaded. Deterministic in (seed, tensor name) and independent of the
//! thread count: each chunk of a tensor draws from its own counter-based stream (splitmix64).

use crate::error::Result;
use crate::tensor::{DType, HostTensor};
use crate::weights::TensorSource;
use half::bf16;
use rayon::prelude::*;

pub struct DummyWeights {
    pub seed: u64,
}

/// splitmix64: a counter-based generator, so any element can be drawn independently.
fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// FNV-1a of the tensor name: gives every tensor its own stream.
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

impl TensorSource for DummyWeights {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<HostTensor> {
        let n: usize = shape.iter().product();
        let stream = splitmix64(self.seed ^ name_hash(name));
        // Norm weights around 1; matrices uniform with std 1/sqrt(fan_in), so activations stay O(1).
        let (center, half_width) = if shape.len() == 1 {
            (1.0f32, 0.1f32)
        } else {
            (0.0, (3.0f32 / shape[shape.len() - 1] as f32).sqrt())
        };
        let mut values = vec![bf16::ZERO; n];
        const CHUNK: usize = 1 << 16;
        values.par_chunks_mut(CHUNK).enumerate().for_each(|(c, chunk)| {
            let mut state = splitmix64(stream ^ (c as u64).wrapping_mul(0x2545_F491_4F6C_DD1D));
            for v in chunk.iter_mut() {
                state = splitmix64(state);
                let unit = (state >> 40) as f32 / (1u64 << 24) as f32; // [0, 1)
                *v = bf16::from_f32(center + half_width * (2.0 * unit - 1.0));
            }
        });
        Ok(HostTensor::from_bf16(&values, shape.to_vec()))
    }

    fn stored_dtype(&self) -> DType {
        DType::BF16
    }
}
