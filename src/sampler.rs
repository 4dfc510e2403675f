//! Token selection. `SamplingParams` (validated; `for_mode` builds Qwen3's thinking / non-thinking
//! defaults with explicit overrides) and a seeded `Sampler` that turns one step's logits into a
//! token, with vLLM's semantics and order of operations:
//!
//! 1. penalties — repetition over prompt + generated tokens (positive logits divided, negative
//!    multiplied, once per distinct token), then frequency (× count) and presence (once) over
//!    generated tokens only, both subtracted;
//! 2. temperature — 0 (or below 1e-5, as vLLM) is greedy: argmax, ties to the lowest id, filters
//!    ignored;
//! 3. min_p (drop tokens with p < min_p · p_max), then top_k, then top_p (keep the most likely
//!    tokens while the mass ranked above them is < top_p, renormalising after top_k);
//! 4. one draw from the remaining distribution with the request's ChaCha8 stream (same seed, same
//!    logits → same tokens).
//!
//! Reported log-probabilities are the log-softmax of the *processed* logits, i.e. of the exact
//! distribution sampled from (after penalties, temperature and filters; filtered tokens are never
//! listed). In greedy mode that is the log-softmax of the penalised logits.
//!
//! Speed matters (vocab 151,936, one call per generated token): scratch buffers live in the
//! Sampler, so a step allocates nothing except the returned top-logprob list; top_k uses
//! `select_nth_unstable_by` instead of a full sort, and top_p alone sorts only a growing prefix.

use crate::error::Result;
use crate::{bail, ensure};
use rand_chacha::ChaCha8Rng;
use rand_core::{Rng, SeedableRng};
use std::cmp::Ordering;
use std::path::Path;

/// Temperatures below this are greedy (as vLLM's `_SAMPLING_EPS`): dividing by them would overflow.
pub const GREEDY_TEMPERATURE: f32 = 1e-5;
/// Presence / frequency penalties are limited to [-2, 2], as in vLLM and the OpenAI API.
pub const MAX_ABS_PENALTY: f32 = 2.0;

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
    /// Subtracted once from the logit of every token already generated. 0.0 = off.
    pub presence_penalty: f32,
    /// Subtracted per occurrence from the logit of every token already generated. 0.0 = off.
    pub frequency_penalty: f32,
    /// Divides positive / multiplies negative logits of tokens in prompt or output. 1.0 = off.
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
            "repetition_penalty must be a finite number > 0, got {}", self.repetition_penalty);
        for (name, value) in [("presence_penalty", self.presence_penalty), ("frequency_penalty", self.frequency_penalty)] {
            ensure!((-MAX_ABS_PENALTY..=MAX_ABS_PENALTY).contains(&value), InvalidArgument,
                "{name} must be in [-2, 2], got {value}");
        }
        Ok(())
    }

    /// Whether this request picks the argmax instead of drawing.
    pub fn is_greedy(&self) -> bool {
        self.temperature < GREEDY_TEMPERATURE
    }

    /// The parameters for one request: the mode's defaults, then every value the caller set.
    /// Thinking mode uses the checkpoint's generation_config.json (Qwen3 ships temperature 0.6,
    /// top_p 0.95, top_k 20; those are also the fallback when the file lacks them; `do_sample:
    /// false` means greedy). Non-thinking mode uses Qwen's recommendation for it (temperature 0.7,
    /// top_p 0.8, top_k 20, min_p 0), since generation_config.json only describes thinking mode.
    /// A repetition_penalty in generation_config.json applies to both. No seed → a random one.
    pub fn for_mode(thinking: bool, generation: &GenerationConfig, overrides: &SamplingOverrides) -> Result<SamplingParams> {
        let mut p = SamplingParams { top_k: 20, min_p: 0.0, ..Default::default() };
        if thinking {
            p.temperature = generation.temperature.unwrap_or(0.6);
            p.top_p = generation.top_p.unwrap_or(0.95);
            p.top_k = generation.top_k.unwrap_or(20);
            p.min_p = generation.min_p.unwrap_or(0.0);
            if generation.do_sample == Some(false) {
                p.temperature = 0.0;
            }
        } else {
            p.temperature = 0.7;
            p.top_p = 0.8;
        }
        p.repetition_penalty = generation.repetition_penalty.unwrap_or(1.0);
        overrides.apply(&mut p);
        p.validate()?;
        Ok(p)
    }
}

/// Sampling values a user set explicitly (`None` = take the mode's default).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SamplingOverrides {
    pub temperature: Option<f32>,
    pub top_k: Option<usize>,
    pub top_p: Option<f32>,
    pub min_p: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub repetition_penalty: Option<f32>,
    /// `None` = a fresh random seed per request.
    pub seed: Option<u64>,
    pub logprobs: Option<usize>,
}

impl SamplingOverrides {
    fn apply(&self, p: &mut SamplingParams) {
        fn set<T: Copy>(field: &mut T, value: Option<T>) {
            if let Some(v) = value {
                *field = v;
            }
        }
        set(&mut p.temperature, self.temperature);
        set(&mut p.top_k, self.top_k);
        set(&mut p.top_p, self.top_p);
        set(&mut p.min_p, self.min_p);
        set(&mut p.presence_penalty, self.presence_penalty);
        set(&mut p.frequency_penalty, self.frequency_penalty);
        set(&mut p.repetition_penalty, self.repetition_penalty);
        set(&mut p.logprobs, self.logprobs);
        p.seed = self.seed.unwrap_or_else(random_seed);
    }
}

/// A seed nobody chose: std's per-process random hasher keys, mixed with the time.
fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    h.write_u128(now.as_nanos());
    h.finish()
}

/// The sampling fields of a checkpoint's generation_config.json (absent fields are `None`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GenerationConfig {
    pub do_sample: Option<bool>,
    pub temperature: Option<f32>,
    pub top_k: Option<usize>,
    pub top_p: Option<f32>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
}

impl GenerationConfig {
    pub fn from_json(text: &str) -> Result<Self> {
        let v: serde_json::Value = match serde_json::from_str(text) {
            Ok(v) => v,
            Err(e) => bail!(Config, "generation_config.json: invalid JSON: {e}"),
        };
        let float = |k: &str| v.get(k).and_then(serde_json::Value::as_f64).map(|x| x as f32);
        Ok(GenerationConfig {
            do_sample: v.get("do_sample").and_then(serde_json::Value::as_bool),
            temperature: float("temperature"),
            top_k: v.get("top_k").and_then(serde_json::Value::as_u64).map(|k| k as usize),
            top_p: float("top_p"),
            min_p: float("min_p"),
            repetition_penalty: float("repetition_penalty"),
        })
    }

    /// generation_config.json in `dir`; all `None` when the file does not exist.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("generation_config.json");
        if !path.is_file() {
            return Ok(GenerationConfig::default());
        }
        let text = std::fs::read_to_string(&path).map_err(|e| crate::error::Error::io(&path, e))?;
        Self::from_json(&text)
    }
}

/// One sampled token.
#[derive(Clone, Debug, PartialEq)]
pub struct Sampled {
    pub token: u32,
    /// Log-probability of `token` under the processed distribution (see the module docs).
    pub logprob: f32,
    /// The `params.logprobs` most likely tokens (fewer if fewer survive the filters) with their
    /// log-probabilities, most likely first, ties by lower id. Empty when `logprobs` is 0.
    pub top_logprobs: Vec<(u32, f32)>,
}

/// Per-request sampler: parameters, the request's random stream, its prompt tokens (for the
/// repetition penalty) and scratch buffers reused across steps.
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
    /// Distinct prompt token ids, sorted (for the repetition penalty and membership tests).
    prompt_tokens: Vec<u32>,
    /// The step's processed logits.
    work: Vec<f32>,
    /// Occurrences of each token in the generated history; all zero between calls.
    counts: Vec<u32>,
    /// Distinct generated tokens of this step (the non-zero entries of `counts`).
    touched: Vec<u32>,
    /// Token ids still in the running after filtering, most likely first once sorted.
    candidates: Vec<u32>,
}

impl Sampler {
    /// A sampler for one request. `prompt` is the prompt's token ids: the repetition penalty
    /// covers them as well as the generated tokens (vLLM), presence/frequency penalties do not.
    pub fn new(params: SamplingParams, prompt: &[u32]) -> Result<Self> {
        params.validate()?;
        let mut prompt_tokens = prompt.to_vec();
        prompt_tokens.sort_unstable();
        prompt_tokens.dedup();
        let rng = ChaCha8Rng::seed_from_u64(params.seed);
        Ok(Sampler { params, rng, prompt_tokens, work: Vec::new(), counts: Vec::new(), touched: Vec::new(), candidates: Vec::new() })
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Choose the next token from `logits` [vocab], given `generated`: the tokens generated so far
    /// in this request (not the prompt, which `new` took). NaN logits count as -inf (never chosen),
    /// +inf as the largest finite value. Errors (`InvalidArgument`) for empty logits, a token id
    /// outside the vocabulary in the prompt or history, or when no logit is above -inf.
    pub fn sample(&mut self, logits: &[f32], generated: &[u32]) -> Result<Sampled> {
        ensure!(!logits.is_empty(), InvalidArgument, "logits are empty");
        self.load(logits);
        self.apply_penalties(generated)?;
        if self.params.is_greedy() {
            self.sample_greedy()
        } else {
            self.sample_random()
        }
    }

    fn load(&mut self, logits: &[f32]) {
        self.work.clear();
        self.work.extend(logits.iter().map(|&l| sanitize(l)));
        if self.counts.len() != logits.len() {
            self.counts.clear();
            self.counts.resize(logits.len(), 0);
        }
    }

    fn apply_penalties(&mut self, generated: &[u32]) -> Result<()> {
        let vocab = self.work.len();
        if let Some(&bad) = self.prompt_tokens.last().filter(|&&t| t as usize >= vocab) {
            bail!(InvalidArgument, "prompt token id {bad} is outside the vocabulary of {vocab} logits");
        }
        // Count generated tokens; `counts` is all zero on entry and reset before returning.
        self.touched.clear();
        for &t in generated {
            let Some(c) = self.counts.get_mut(t as usize) else {
                self.reset_counts();
                bail!(InvalidArgument, "generated token id {t} is outside the vocabulary of {vocab} logits");
            };
            if *c == 0 {
                self.touched.push(t);
            }
            *c += 1;
        }
        let p = &self.params;
        if p.repetition_penalty != 1.0 {
            for &t in &self.prompt_tokens {
                self.work[t as usize] = repetition(self.work[t as usize], p.repetition_penalty);
            }
            for &t in &self.touched {
                if self.prompt_tokens.binary_search(&t).is_err() {
                    self.work[t as usize] = repetition(self.work[t as usize], p.repetition_penalty);
                }
            }
        }
        if p.frequency_penalty != 0.0 || p.presence_penalty != 0.0 {
            for &t in &self.touched {
                let count = self.counts[t as usize] as f32;
                self.work[t as usize] -= p.frequency_penalty * count + p.presence_penalty;
            }
        }
        self.reset_counts();
        Ok(())
    }

    fn reset_counts(&mut self) {
        for &t in &self.touched {
            self.counts[t as usize] = 0;
        }
    }

    fn sample_greedy(&mut self) -> Result<Sampled> {
        let token = argmax(&self.work);
        let max = self.work[token as usize];
        ensure!(max > f32::NEG_INFINITY, InvalidArgument, "every logit is -inf or NaN: nothing can be sampled");
        self.candidates.clear();
        self.candidates.extend((0..self.work.len() as u32).filter(|&i| self.work[i as usize] > f32::NEG_INFINITY));
        let log_z = log_sum_exp(&self.work, &self.candidates, max);
        Ok(self.result(token, max, log_z))
    }

    fn sample_random(&mut self) -> Result<Sampled> {
        let inv_t = 1.0 / self.params.temperature;
        let mut max = f32::NEG_INFINITY;
        for l in self.work.iter_mut() {
            // Clamp: a huge logit over a small temperature must not become +inf (inf - inf = NaN).
            *l = (*l * inv_t).min(f32::MAX);
            max = max.max(*l);
        }
        ensure!(max > f32::NEG_INFINITY, InvalidArgument, "every logit is -inf or NaN: nothing can be sampled");
        self.filter(max);
        let log_z = log_sum_exp(&self.work, &self.candidates, max);
        let token = self.draw(max, log_z);
        Ok(self.result(token, max, log_z))
    }

    /// Fill `candidates` with the tokens that survive min_p, top_k and top_p, in that order.
    fn filter(&mut self, max: f32) {
        // p_i < min_p · p_max  ⇔  l_i - l_max < ln(min_p): no softmax needed.
        let floor = if self.params.min_p > 0.0 { max + self.params.min_p.ln() } else { f32::NEG_INFINITY };
        let work = &self.work;
        self.candidates.clear();
        self.candidates.extend((0..work.len() as u32).filter(|&i| {
            let l = work[i as usize];
            l > f32::NEG_INFINITY && l >= floor
        }));
        let k = self.params.top_k;
        if k > 0 && k < self.candidates.len() {
            let by_rank = rank_order(work);
            self.candidates.select_nth_unstable_by(k - 1, by_rank);
            self.candidates.truncate(k);
            self.candidates.sort_unstable_by(by_rank);
        }
        if self.params.top_p < 1.0 {
            self.apply_top_p(max);
        }
    }

    /// Keep the most likely candidates while the probability mass ranked above each is < top_p
    /// (mass renormalised over the candidates, as vLLM does after top_k). Only a prefix large
    /// enough to reach top_p is sorted, growing ×4 from 64, so peaked distributions stay cheap.
    fn apply_top_p(&mut self, max: f32) {
        let work = &self.work;
        let by_rank = rank_order(work);
        let total: f64 = self.candidates.iter().map(|&i| weight(work[i as usize], max)).sum();
        let target = self.params.top_p as f64 * total;
        let n = self.candidates.len();
        let mut prefix = 64.min(n);
        loop {
            if prefix < n {
                self.candidates.select_nth_unstable_by(prefix - 1, by_rank);
            }
            self.candidates[..prefix].sort_unstable_by(by_rank);
            let mut above = 0.0;
            for (rank, &i) in self.candidates[..prefix].iter().enumerate() {
                if above >= target {
                    self.candidates.truncate(rank);
                    return;
                }
                above += weight(work[i as usize], max);
            }
            if prefix == n {
                return;
            }
            prefix = (prefix * 4).min(n);
        }
    }

    /// Inverse-CDF draw over the candidates with weights exp(l - max) (their sum is exp(log_z)).
    fn draw(&mut self, max: f32, log_z: f64) -> u32 {
        // 53 random bits → a uniform f64 in [0, 1).
        let u = (self.rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64);
        let target = u * log_z.exp();
        let mut cumulative = 0.0;
        for &i in &self.candidates {
            cumulative += weight(self.work[i as usize], max);
            if cumulative > target {
                return i;
            }
        }
        // Rounding left the target at the very top: take the last candidate with positive weight.
        let last = self.candidates.iter().rev().find(|&&i| weight(self.work[i as usize], max) > 0.0);
        last.or(self.candidates.last()).copied().unwrap_or(0)
    }

    /// Package `token` with its log-probability and the top-n list over `candidates`.
    fn result(&mut self, token: u32, max: f32, log_z: f64) -> Sampled {
        let logprob_of = |l: f32| ((l - max) as f64 - log_z) as f32;
        let logprob = logprob_of(self.work[token as usize]);
        let n = self.params.logprobs.min(self.candidates.len());
        let mut top_logprobs = Vec::new();
        if n > 0 {
            let by_rank = rank_order(&self.work);
            if n < self.candidates.len() {
                self.candidates.select_nth_unstable_by(n - 1, by_rank);
            }
            self.candidates[..n].sort_unstable_by(by_rank);
            top_logprobs.extend(self.candidates[..n].iter().map(|&i| (i, logprob_of(self.work[i as usize]))));
        }
        Sampled { token, logprob, top_logprobs }
    }
}

/// NaN → -inf (never chosen); +inf → the largest finite value (so max-subtraction stays finite).
fn sanitize(l: f32) -> f32 {
    if l.is_nan() {
        f32::NEG_INFINITY
    } else {
        l.min(f32::MAX)
    }
}

/// vLLM's repetition penalty: shrink a positive logit, push a negative one further down.
fn repetition(l: f32, penalty: f32) -> f32 {
    if l > 0.0 {
        l / penalty
    } else {
        l * penalty
    }
}

/// Unnormalised probability relative to the maximum logit (f32 exp, summed in f64). Every sum
/// and the draw use this one function so the CDF walk and its total agree exactly.
fn weight(l: f32, max: f32) -> f64 {
    (l - max).exp() as f64
}

/// ln Σ exp(l_i) over `ids`, computed relative to `max` (≥ every l_i).
fn log_sum_exp(work: &[f32], ids: &[u32], max: f32) -> f64 {
    let sum: f64 = ids.iter().map(|&i| weight(work[i as usize], max)).sum();
    sum.ln()
}

/// Most likely first; equal logits by lower id, so every selection is deterministic.
fn rank_order(work: &[f32]) -> impl Fn(&u32, &u32) -> Ordering + Copy + '_ {
    move |&a, &b| work[b as usize].total_cmp(&work[a as usize]).then(a.cmp(&b))
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

#[cfg(test)]
mod tests;
