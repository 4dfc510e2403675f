//! Dummy weights: random tensors of a real config's shapes, for benchmarks and tests where real
//! checkpoints can't be downloaded. Deterministic in (seed, tensor name) and independent of the
//! thread count: each chunk of `DUMMY_CHUNK` elements draws from its own splitmix64 chain.
//!
//! `DummySpec` is everything a backend needs to generate a tensor itself: `Backend::dummy_weight`
//! defaults to building it here on the host and uploading it, and the CUDA backend runs the same
//! chains in a kernel (one thread per chunk), so a 32B model never exists in host memory. Both give
//! bit-identical bf16 values: the arithmetic below has no fused multiply-add (Rust never contracts
//! and the kernel uses `__fmul_rn`/`__fadd_rn`).

use crate::error::Result;
use crate::tensor::{DType, HostTensor};
use crate::weights::TensorSource;
use half::bf16;
use rayon::prelude::*;

pub struct DummyWeights {
    pub seed: u64,
}

/// Elements per independent random chain (the CUDA kernel's `DUMMY_CHUNK` must match).
pub const DUMMY_CHUNK: usize = 1 << 16;

/// splitmix64: a counter-based generator, so any element can be drawn independently.
pub fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// FNV-1a of the tensor name: gives every tensor its own stream.
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

/// How one dummy tensor is drawn: uniform in [center - half_width, center + half_width), rounded to bf16.
#[derive(Clone, Copy, Debug)]
pub struct DummySpec {
    /// Per-tensor stream key (seed ^ name hash, mixed).
    pub stream: u64,
    pub center: f32,
    pub half_width: f32,
}

impl DummySpec {
    pub fn new(seed: u64, name: &str, shape: &[usize]) -> Self {
        // Norm weights around 1; matrices uniform with std 1/sqrt(fan_in), so activations stay O(1).
        let (center, half_width) = if shape.len() == 1 {
            (1.0f32, 0.1f32)
        } else {
            (0.0, (3.0f32 / shape[shape.len() - 1] as f32).sqrt())
        };
        DummySpec { stream: splitmix64(seed ^ name_hash(name)), center, half_width }
    }

    /// First chain state of chunk `c`.
    pub fn chunk_state(&self, c: usize) -> u64 {
        splitmix64(self.stream ^ (c as u64).wrapping_mul(0x2545_F491_4F6C_DD1D))
    }

    /// The value a chain state gives.
    pub fn value(&self, state: u64) -> bf16 {
        let unit = (state >> 40) as f32 / (1u64 << 24) as f32; // [0, 1)
        bf16::from_f32(self.center + self.half_width * (2.0 * unit - 1.0))
    }

    /// The whole tensor on the host.
    pub fn host_tensor(&self, shape: &[usize]) -> HostTensor {
        let n: usize = shape.iter().product();
        let mut values = vec![bf16::ZERO; n];
        values.par_chunks_mut(DUMMY_CHUNK).enumerate().for_each(|(c, chunk)| {
            let mut state = self.chunk_state(c);
            for v in chunk.iter_mut() {
                state = splitmix64(state);
                *v = self.value(state);
            }
        });
        HostTensor::from_bf16(&values, shape.to_vec())
    }
}

impl TensorSource for DummyWeights {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<HostTensor> {
        Ok(DummySpec::new(self.seed, name, shape).host_tensor(shape))
    }

    fn stored_dtype(&self) -> DType {
        DType::BF16
    }

    fn dummy_seed(&self) -> Option<u64> {
        Some(self.seed)
    }
}
