//! The generate loop: sequences, batching, prefill/decode steps and stop conditions. One `step()`
//! schedules one forward pass: prompt tokens first (in chunks, several sequences together), then one
//! decode token for every running sequence. `AnyEngine` picks the backend at the edge.

use crate::backend::{Backend, BatchInfo, SeqSlot};
use crate::error::Result;
use crate::model::kv_cache::{KvCache, SeqCache};
use crate::model::{Model, Scratch};
use crate::sampler::{Sampler, SamplingParams};
use crate::ensure;
use std::time::Instant;

/// Most prompt tokens fed in one forward pass (bounds the activation memory of long prompts).
pub const PREFILL_CHUNK: usize = 512;

/// One generation request (token level; chat rendering happens above).
#[derive(Clone, Debug)]
pub struct GenRequest {
    pub prompt: Vec<u32>,
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    /// Generation stops after any of these (the eos ids unless `ignore_eos`, plus the user's).
    pub stop_token_ids: Vec<u32>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop token was generated.
    Stop,
    /// max_new_tokens reached.
    Length,
    /// A stop string matched (decided above the engine).
    StopString,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::StopString => "stop_string",
        }
    }
}

#[derive(Clone, Debug)]
pub struct GenOutput {
    pub tokens: Vec<u32>,
    pub finish_reason: FinishReason,
    /// Seconds until this request's first token.
    pub prefill_s: f64,
    /// Seconds from the first token to the last.
    pub decode_s: f64,
}

/// What the per-token callback tells the loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Control {
    Continue,
    /// Stop this sequence now, with this reason.
    Finish(FinishReason),
}

struct Sequence {
    request: GenRequest,
    cache: SeqCache,
    sampler: Sampler,
    /// Prompt tokens not yet fed.
    fed: usize,
    generated: Vec<u32>,
    finish: Option<FinishReason>,
    started: Instant,
    first_token_at: Option<Instant>,
    finished_at: Option<Instant>,
}

impl Sequence {
    /// Tokens this sequence feeds next: a prompt chunk, or its last sampled token.
    fn next_input(&self, budget: usize) -> &[u32] {
        if self.fed < self.request.prompt.len() {
            let end = self.request.prompt.len().min(self.fed + budget);
            &self.request.prompt[self.fed..end]
        } else {
            std::slice::from_ref(self.generated.last().expect("a sequence past its prompt has sampled a token"))
        }
    }
}

pub struct Engine<B: Backend> {
    pub model: Model<B>,
    cache: KvCache<B>,
    scratch: Option<Scratch<B>>,
}

impl<B: Backend> Engine<B> {
    /// An engine whose cache holds `max_seqs` sequences of the model's max_seq_len.
    pub fn new(model: Model<B>, max_seqs: usize) -> Result<Self> {
        let c = &model.config;
        let cache = KvCache::new(&model.backend, c.num_hidden_layers, c.kv_dim(), model.max_seq_len, max_seqs)?;
        Ok(Engine { model, cache, scratch: None })
    }

    fn check_ids(&self, ids: &[u32], what: &str) -> Result<()> {
        ensure!(!ids.is_empty(), InvalidArgument, "{what} is empty: give at least one token");
        let vocab = self.model.config.vocab_size;
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= vocab) {
            crate::bail!(InvalidArgument, "token id {bad} in {what} is out of range for a vocabulary of {vocab}");
        }
        ensure!(ids.len() <= self.model.max_seq_len, InvalidArgument,
            "{what} has {} tokens, more than max_seq_len = {}", ids.len(), self.model.max_seq_len);
        Ok(())
    }

    /// Logits [L, V] of one causal forward pass over `ids`; no state is kept.
    pub fn logits(&mut self, ids: &[u32]) -> Result<Vec<f32>> {
        self.check_ids(ids, "token_ids")?;
        let mut seq = SeqCache::default();
        let result = self.logits_into(ids, &mut seq);
        self.cache.release(&mut seq);
        result
    }

    fn logits_into(&mut self, ids: &[u32], seq: &mut SeqCache) -> Result<Vec<f32>> {
        let vocab = self.model.config.vocab_size;
        let mut out = Vec::with_capacity(ids.len() * vocab);
        for chunk in ids.chunks(PREFILL_CHUNK) {
            self.cache.reserve(seq, seq.len + chunk.len())?;
            let positions: Vec<u32> = (seq.len..seq.len + chunk.len()).map(|p| p as u32).collect();
            let rows: Vec<u32> = (0..chunk.len() as u32).collect();
            let batch = BatchInfo {
                tokens: chunk,
                positions: &positions,
                seqs: vec![SeqSlot { rows: 0..chunk.len(), start_pos: seq.len, blocks: &seq.blocks }],
                block_size: crate::model::kv_cache::BLOCK_SIZE,
            };
            Scratch::fit(&mut self.scratch, &self.model, chunk.len(), chunk.len())?;
            let s = self.scratch.as_mut().expect("fitted above");
            self.model.forward(&batch, &mut self.cache, s, &rows)?;
            out.extend(self.model.backend.download(&s.logits)?);
            seq.len += chunk.len();
        }
        Ok(out)
    }

    /// Run `requests` together to completion. `on_token(i, token)` sees each sampled token of request
    /// i and may finish that request (stop strings are matched there, on decoded text).
    pub fn generate(&mut self, requests: Vec<GenRequest>,
        on_token: &mut dyn FnMut(usize, u32) -> Result<Control>) -> Result<Vec<GenOutput>> {
        for (i, r) in requests.iter().enumerate() {
            let what = if requests.len() == 1 { "prompt".to_string() } else { format!("prompt {i}") };
            self.check_ids(&r.prompt, &what)?;
            ensure!(r.max_new_tokens >= 1, InvalidArgument, "max_new_tokens must be >= 1, got {}", r.max_new_tokens);
            let need = r.prompt.len().saturating_add(r.max_new_tokens);
            ensure!(need <= self.model.max_seq_len, InvalidArgument,
                "{what} ({} tokens) + max_new_tokens ({}) = {need} exceeds max_seq_len = {}",
                r.prompt.len(), r.max_new_tokens, self.model.max_seq_len);
        }
        let now = Instant::now();
        let mut seqs: Vec<Sequence> = requests
            .into_iter()
            .map(|request| Ok(Sequence {
                sampler: Sampler::new(request.sampling.clone(), &request.prompt)?,
                request,
                cache: SeqCache::default(),
                fed: 0,
                generated: vec![],
                finish: None,
                started: now,
                first_token_at: None,
                finished_at: None,
            }))
            .collect::<Result<_>>()?;
        let result = self.run(&mut seqs, on_token);
        for s in seqs.iter_mut() {
            self.cache.release(&mut s.cache);
        }
        result?;
        Ok(seqs
            .into_iter()
            .map(|s| {
                let first = s.first_token_at.unwrap_or(s.started);
                let end = s.finished_at.unwrap_or(first);
                GenOutput {
                    tokens: s.generated,
                    finish_reason: s.finish.unwrap_or(FinishReason::Length),
                    prefill_s: (first - s.started).as_secs_f64(),
                    decode_s: (end - first).as_secs_f64(),
                }
            })
            .collect())
    }

    fn run(&mut self, seqs: &mut [Sequence], on_token: &mut dyn FnMut(usize, u32) -> Result<Control>) -> Result<()> {
        while seqs.iter().any(|s| s.finish.is_none()) {
            self.step(seqs, on_token)?;
        }
        Ok(())
    }

    /// One forward pass: prompt chunks if any sequence still has prompt left, else one token each.
    fn step(&mut self, seqs: &mut [Sequence], on_token: &mut dyn FnMut(usize, u32) -> Result<Control>) -> Result<()> {
        let prefilling = seqs.iter().any(|s| s.finish.is_none() && s.fed < s.request.prompt.len());
        let mut budget = if prefilling { PREFILL_CHUNK } else { usize::MAX };
        // 1. Choose what each sequence feeds, and reserve its cache.
        let mut chosen: Vec<(usize, usize)> = vec![]; // (sequence, tokens fed)
        for (i, s) in seqs.iter_mut().enumerate() {
            let in_prompt = s.fed < s.request.prompt.len();
            if s.finish.is_some() || in_prompt != prefilling || budget == 0 {
                continue;
            }
            let n = s.next_input(budget).len();
            let new_len = s.cache.len + n;
            self.cache.reserve(&mut s.cache, new_len)?;
            chosen.push((i, n));
            budget = budget.saturating_sub(n);
        }
        // 2. Flatten them into one batch.
        let (mut tokens, mut positions, mut logit_rows, mut sampling) = (vec![], vec![], vec![], vec![]);
        let mut slots = Vec::with_capacity(chosen.len());
        for &(i, n) in &chosen {
            let s = &seqs[i];
            let row = tokens.len();
            tokens.extend_from_slice(&s.next_input(n)[..n]);
            positions.extend((s.cache.len..s.cache.len + n).map(|p| p as u32));
            slots.push(SeqSlot { rows: row..row + n, start_pos: s.cache.len, blocks: &s.cache.blocks });
            // Only a sequence whose prompt ends here (or that is decoding) samples a token.
            if !prefilling || s.fed + n == s.request.prompt.len() {
                logit_rows.push((row + n - 1) as u32);
                sampling.push(i);
            }
        }
        let batch = BatchInfo { tokens: &tokens, positions: &positions, seqs: slots, block_size: crate::model::kv_cache::BLOCK_SIZE };
        Scratch::fit(&mut self.scratch, &self.model, tokens.len(), logit_rows.len())?;
        let s = self.scratch.as_mut().expect("fitted above");
        // 3. Forward, then advance every fed sequence.
        self.model.forward(&batch, &mut self.cache, s, &logit_rows)?;
        for &(i, n) in &chosen {
            let seq = &mut seqs[i];
            seq.cache.len += n;
            if prefilling {
                seq.fed += n;
            }
        }
        if logit_rows.is_empty() {
            return Ok(());
        }
        // 4. Sample one token for each sequence that produced logits; check its stop conditions.
        //    When every one is plain greedy (no penalties, no logprobs), the backend picks the
        //    argmax itself and only R ids come back, not R × V logits.
        let all_greedy = sampling.iter().all(|&i| seqs[i].request.sampling.is_plain_greedy());
        let (logits, greedy) = if all_greedy {
            (vec![], self.model.backend.argmax_rows(&s.logits, logit_rows.len())?)
        } else {
            (self.model.backend.download(&s.logits)?, vec![])
        };
        let vocab = self.model.config.vocab_size;
        for (r, &i) in sampling.iter().enumerate() {
            let seq = &mut seqs[i];
            let token = if all_greedy { greedy[r] } else { seq.sampler.sample(&logits[r * vocab..(r + 1) * vocab], &seq.generated)?.token };
            seq.generated.push(token);
            let now = Instant::now();
            seq.first_token_at.get_or_insert(now);
            let mut finish = match on_token(i, token)? {
                Control::Finish(reason) => Some(reason),
                Control::Continue => None,
            };
            if finish.is_none() && seq.request.stop_token_ids.contains(&token) {
                finish = Some(FinishReason::Stop);
            }
            if finish.is_none() && seq.generated.len() >= seq.request.max_new_tokens {
                finish = Some(FinishReason::Length);
            }
            if finish.is_some() {
                seq.finish = finish;
                seq.finished_at = Some(now);
            }
        }
        Ok(())
    }
}

/// The backend an engine runs on, chosen at load time: the only place that names backends.
#[allow(clippy::large_enum_variant)] // one per loaded model
pub enum AnyEngine {
    Cpu(Engine<crate::backend::cpu::CpuBackend>),
    /// Never built without the `cuda` feature (its backend type is then uninhabited).
    Cuda(Engine<crate::backend::cuda::CudaBackend>),
}

/// Run `$body` with `$e` bound to the engine of whichever backend this is.
macro_rules! with_engine {
    ($any:expr, $e:ident => $body:expr) => {
        match $any {
            AnyEngine::Cpu($e) => $body,
            AnyEngine::Cuda($e) => $body,
        }
    };
}

impl AnyEngine {
    pub fn config(&self) -> &crate::config::Qwen3Config {
        with_engine!(self, e => &e.model.config)
    }

    pub fn device_name(&self) -> String {
        with_engine!(self, e => e.model.backend.device_name())
    }

    pub fn dtype(&self) -> crate::tensor::DType {
        with_engine!(self, e => e.model.backend.dtype())
    }

    pub fn max_seq_len(&self) -> usize {
        with_engine!(self, e => e.model.max_seq_len)
    }

    pub fn logits(&mut self, ids: &[u32]) -> Result<Vec<f32>> {
        with_engine!(self, e => e.logits(ids))
    }

    pub fn generate(&mut self, requests: Vec<GenRequest>,
        on_token: &mut dyn FnMut(usize, u32) -> Result<Control>) -> Result<Vec<GenOutput>> {
        with_engine!(self, e => e.generate(requests, on_token))
    }
}
