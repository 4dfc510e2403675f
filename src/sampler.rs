//! Token selection: `SamplingParams` (validated) and a seeded `Sampler`.
//! Temperature 0 is greedy (argmax, ties to the lowest id, as torch.argmax).

use crate::error::Result;
use crate::{bail, ensure};
use rand_chacha::ChaCha8Rng;
use rand_core::{Rng, SeedableRng};

#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 = greedy.
    pub temperature: f32,
    /// 0 = off.
    pub top_k: usize,
    /// 1.0 = off.
    pub top_p: f32,
    /// 0.0 = off.
    pub min_p: f32,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// 1.0 = off.
    pub repetition_penalty: f32,
    pub seed: u64,
    /// Number of top log-probabilities to report per sampled token (0 = none).
    pub logprobs: usize,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            seed: 0,
            logprobs: 0,
        }
    }
}

impl SamplingParams {
    pub fn validate(&self) -> Result<()> {
        ensure!(self.temperature.is_finite() && self.temperature >= 0.0, InvalidArgument,
            "temperature must be a finite number >= 0, got {}", self.temperature);
        ensure!(self.top_p > 0.0 && self.top_p <= 1.0, InvalidArgument, "top_p must be in (0, 1], got {}", self.top_p);
        ensure!((0.0..=1.0).contains(&self.min_p), InvalidArgument, "min_p must be in [0, 1], got {}", self.min_p);
        ensure!(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0, InvalidArgument,
            "repetition_penalty must be > 0, got {}", self.repetition_penalty);
        if !self.presence_penalty.is_finite() || !self.frequency_penalty.is_finite() {
            bail!(InvalidArgument, "presence_penalty and frequency_penalty must be finite numbers");
        }
        Ok(())
    }
}

/// One sampled token.
#[derive(Clone, Debug, PartialEq)]
pub struct Sampled {
    pub token: u32,
}

pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = ChaCha8Rng::seed_from_u64(params.seed);
        Sampler { params, rng }
    }

    /// Choose the next token from `logits` [vocab] given the tokens generated so far.
    pub fn sample(&mut self, logits: &[f32], _history: &[u32]) -> Sampled {
        if self.params.temperature == 0.0 {
            return Sampled { token: argmax(logits) };
        }
        let inv_t = 1.0 / self.params.temperature;
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let probs: Vec<f32> = logits.iter().map(|&l| ((l - max) * inv_t).exp()).collect();
        let total: f32 = probs.iter().sum();
        let mut r = (self.rng.next_u32() as f32 / u32::MAX as f32) * total;
        for (i, p) in probs.iter().enumerate() {
            r -= p;
            if r <= 0.0 {
                return Sampled { token: i as u32 };
            }
        }
        Sampled { token: argmax(logits) }
    }
}

/// Index of the largest value; the lowest index wins ties (as torch.argmax).
pub fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] {
            best = i;
        }
    }
    best as u32
}
