//! The generate loop: sequences, batching, prefill/decode steps and stop conditions. One `step()`
//! schedules one forward pass: prompt tokens first (in chunks, several sequences together), then one
//! decode token for every running sequence. `AnyEngine` picks the backend at the edge.

pub mod output;

use crate::backend::{Backend, BatchInfo, SeqSlot};
use crate::chat::BUDGET_EXHAUSTED_TEXT;
use crate::ensure;
use crate::error::Result;
use crate::model::kv_cache::{KvCache, SeqCache, BLOCK_SIZE};
use crate::model::{Model, Scratch};
use crate::sampler::{Sampler, SamplingParams};
use crate::tokenizer::Tokenizer;
use output::{Delta, TextTracker};
use std::collections::{HashMap, VecDeque};
use std::time::Instant;

/// Most prompt tokens fed in one forward pass by `logits` (which keeps every row's logits), and
/// the default of `Backend::prefill_chunk` for generation (bounds the activation memory).
pub const PREFILL_CHUNK: usize = 512;

/// One generation request (token level; chat rendering happens above).
#[derive(Clone, Debug, Default)]
pub struct GenRequest {
    /// The whole prompt; with a session, the whole conversation so far (the cached prefix is reused).
    pub prompt: Vec<u32>,
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    /// Generation stops after any of these (the eos ids unless ignored, plus the user's).
    pub stop_token_ids: Vec<u32>,
    /// Stop strings, matched on the decoded text and cut from it (needs a tokenizer).
    pub stop: Vec<String>,
    /// The output starts inside a think block (chat with thinking on).
    pub thinking: bool,
    /// Most tokens the model may think before the runtime closes the block for it (None = unlimited).
    pub thinking_budget: Option<usize>,
    /// Keep the KV cache in this session after the request (see `Engine::open_session`).
    pub session: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop token was generated.
    Stop,
    /// max_new_tokens reached.
    Length,
    /// A stop string matched.
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
    /// Decoded text, special tokens skipped, cut at a matched stop string ("" without a tokenizer).
    pub text: String,
    pub finish_reason: FinishReason,
    /// Prompt tokens reused from a session's cache instead of prefilled.
    pub cached_tokens: usize,
    /// Tokens up to and including `</think>` (all of them if the block never closed); 0 when not thinking.
    pub thinking_tokens: usize,
    /// Per token, when logprobs were asked for: (sampled token's logprob, top-n (id, logprob)).
    pub logprobs: Vec<(f32, Vec<(u32, f32)>)>,
    /// Seconds until this request's first token.
    pub prefill_s: f64,
    /// Seconds from the first token to the last.
    pub decode_s: f64,
}

struct Sequence {
    request: GenRequest,
    cache: SeqCache,
    /// Prompt tokens found in the session's cache.
    cached: usize,
    sampler: Sampler,
    /// Prompt tokens already in the cache.
    fed: usize,
    generated: Vec<u32>,
    /// Tokens to emit next instead of sampling (the thinking-budget text).
    forced: VecDeque<u32>,
    /// Model-sampled tokens inside the think block so far.
    thought: usize,
    thinking_tokens: usize,
    text: Option<TextTracker>,
    logprobs: Vec<(f32, Vec<(u32, f32)>)>,
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

    fn in_thinking(&self) -> bool {
        self.request.thinking && self.thinking_tokens == 0
    }
}

/// A conversation whose KV cache outlives one request.
struct Session {
    cache: SeqCache,
    /// The tokens in `cache`, position by position.
    tokens: Vec<u32>,
}

/// What `generate` reports as it goes: streamed text of request `index`.
pub type EventSink<'a> = dyn FnMut(usize, Delta) -> Result<()> + 'a;

pub struct Engine<B: Backend> {
    pub model: Model<B>,
    pub tokenizer: Option<Tokenizer>,
    cache: KvCache<B>,
    scratch: Option<Scratch<B>>,
    /// Decode steps' buffers, kept apart from prefill's so their addresses survive a prefill (a
    /// CUDA graph captured over them stays valid from one request to the next).
    decode_scratch: Option<Scratch<B>>,
    sessions: HashMap<u64, Session>,
    next_session: u64,
    /// Sequences the cache is sized for: a larger batch runs in waves of this many.
    max_seqs: usize,
    /// The decode step the backend has prepared (`prepare_decode_step`), as `decode_rows`: valid
    /// for the next step of the same `run` if it feeds exactly these.
    prepared: Option<Vec<(usize, usize)>>,
    /// The decode step already launched (`Backend::launch_ahead`), as `decode_rows`: fed on the
    /// device with the tokens the last step chose. The next step is this one if it feeds exactly
    /// these rows; if not (a sequence stopped), its results are never read.
    ahead: Option<Vec<(usize, usize)>>,
    /// Decode steps launched ahead, and of those the ones never read (a sequence stopped first).
    pub steps_ahead: [u64; 2],
}

impl<B: Backend> Engine<B> {
    /// An engine whose cache holds `max_seqs` sequences of the model's max_seq_len.
    pub fn new(model: Model<B>, tokenizer: Option<Tokenizer>, max_seqs: usize) -> Result<Self> {
        let c = &model.config;
        let cache = KvCache::new(&model.backend, c.num_hidden_layers, c.kv_dim(), model.max_seq_len, max_seqs)?;
        Ok(Engine {
            model,
            tokenizer,
            cache,
            scratch: None,
            decode_scratch: None,
            sessions: HashMap::new(),
            next_session: 1,
            max_seqs,
            prepared: None,
            ahead: None,
            steps_ahead: [0; 2],
        })
    }

    /// Start a conversation whose cache is kept between requests (pass its id in `GenRequest::session`).
    pub fn open_session(&mut self) -> u64 {
        let id = self.next_session;
        self.next_session += 1;
        self.sessions.insert(id, Session { cache: SeqCache::default(), tokens: vec![] });
        id
    }

    /// End a conversation and free its cache blocks.
    pub fn close_session(&mut self, id: u64) {
        if let Some(mut s) = self.sessions.remove(&id) {
            self.cache.release(&mut s.cache);
        }
    }

    /// Tokens a session's cache holds.
    pub fn session_len(&self, id: u64) -> Option<usize> {
        self.sessions.get(&id).map(|s| s.tokens.len())
    }

    fn check_ids(&self, ids: &[u32], what: &str) -> Result<()> {
        ensure!(!ids.is_empty(), InvalidArgument, "{what} is empty: give at least one token");
        let vocab = self.model.config.vocab_size;
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= vocab) {
            crate::bail!(InvalidArgument, "token id {bad} in {what} is out of range for a vocabulary of {vocab}");
        }
        ensure!(
            ids.len() <= self.model.max_seq_len,
            InvalidArgument,
            "{what} has {} tokens, more than max_seq_len = {}",
            ids.len(),
            self.model.max_seq_len
        );
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

    /// Logits [L, V] of `ids` appended to what `seq` already caches.
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
                block_size: BLOCK_SIZE,
            };
            Scratch::fit(&mut self.scratch, &self.model, chunk.len(), chunk.len())?;
            let s = self.scratch.as_mut().expect("fitted above");
            self.model.forward(&batch, &mut self.cache, s, &rows)?;
            out.extend(self.model.backend.download(&s.logits)?);
            seq.len += chunk.len();
        }
        Ok(out)
    }

    /// Tokens of the text the runtime inserts when a thinking budget runs out.
    fn budget_tokens(&self) -> Result<Vec<u32>> {
        match &self.tokenizer {
            Some(t) => Ok(t.encode(BUDGET_EXHAUSTED_TEXT, false)),
            None => crate::bail!(InvalidArgument, "thinking_budget needs a tokenizer; this checkpoint has none"),
        }
    }

    fn validate(&self, i: usize, n: usize, r: &GenRequest) -> Result<()> {
        let what = if n == 1 { "prompt".to_string() } else { format!("prompt {i}") };
        self.check_ids(&r.prompt, &what)?;
        ensure!(r.max_new_tokens >= 1, InvalidArgument, "max_new_tokens must be >= 1, got {}", r.max_new_tokens);
        let need = r.prompt.len().saturating_add(r.max_new_tokens);
        ensure!(
            need <= self.model.max_seq_len,
            InvalidArgument,
            "{what} ({} tokens) + max_new_tokens ({}) = {need} exceeds max_seq_len = {}",
            r.prompt.len(),
            r.max_new_tokens,
            self.model.max_seq_len
        );
        ensure!(r.stop.is_empty() || self.tokenizer.is_some(), InvalidArgument, "stop strings need a tokenizer; this checkpoint has none");
        if let Some(id) = r.session {
            ensure!(self.sessions.contains_key(&id), InvalidArgument, "session {id} is closed or unknown");
            ensure!(n == 1 || r.session.is_none(), InvalidArgument, "a session runs one request at a time");
        }
        Ok(())
    }

    /// Run `requests` to completion, streaming text to `on_delta` as it is produced: together, or in
    /// waves of `max_seqs` when there are more than the cache is sized for.
    pub fn generate(&mut self, requests: Vec<GenRequest>, on_delta: &mut EventSink) -> Result<Vec<GenOutput>> {
        if requests.len() <= self.max_seqs {
            return self.generate_together(requests, on_delta);
        }
        let mut outputs = Vec::with_capacity(requests.len());
        for (w, wave) in requests.chunks(self.max_seqs).enumerate() {
            let offset = w * self.max_seqs;
            outputs.extend(self.generate_together(wave.to_vec(), &mut |i, d| on_delta(offset + i, d))?);
        }
        Ok(outputs)
    }

    /// Run `requests` as one batch (each forward step feeds all of them).
    fn generate_together(&mut self, requests: Vec<GenRequest>, on_delta: &mut EventSink) -> Result<Vec<GenOutput>> {
        let n = requests.len();
        for (i, r) in requests.iter().enumerate() {
            self.validate(i, n, r)?;
        }
        let budget_text = if requests.iter().any(|r| r.thinking && r.thinking_budget.is_some()) { self.budget_tokens()? } else { vec![] };
        let now = Instant::now();
        let mut seqs = Vec::with_capacity(n);
        for request in requests {
            let sampler = Sampler::new(request.sampling.clone(), &request.prompt)?;
            let text = self.tokenizer.as_ref().map(|t| TextTracker::new(t, request.stop.clone(), request.thinking));
            let (cache, fed) = self.take_session_prefix(&request);
            // A zero budget closes the think block before the model writes anything.
            let forced = if request.thinking && request.thinking_budget == Some(0) {
                budget_text.iter().copied().collect()
            } else {
                VecDeque::new()
            };
            seqs.push(Sequence {
                request,
                cache,
                cached: fed,
                sampler,
                fed,
                text,
                generated: vec![],
                forced,
                thought: 0,
                thinking_tokens: 0,
                logprobs: vec![],
                finish: None,
                started: now,
                first_token_at: None,
                finished_at: None,
            });
        }
        let result = self.run(&mut seqs, &budget_text, on_delta);
        for s in seqs.iter_mut() {
            self.store_session(s, result.is_ok());
        }
        result?;
        Ok(seqs.into_iter().map(Self::output).collect())
    }

    /// The logits of the last prefill or decode step (their scratch is fitted by then).
    fn step_logits(&self, prefilling: bool) -> &B::Buf {
        &if prefilling { &self.scratch } else { &self.decode_scratch }.as_ref().expect("a step fitted it").logits
    }

    /// While a decode step runs on the device, do the host's part of the next one (the backend's
    /// dry pass over it): the same sequences one position on, their tokens not sampled yet. Not
    /// when a sequence may not take another token (max_new_tokens, max_seq_len, a full cache); a
    /// sequence that stops on the token sampled now just leaves the preparation unused.
    fn prepare_next(&mut self, seqs: &mut [Sequence], chosen: &[(usize, usize)]) -> Result<()> {
        for &(i, _) in chosen {
            let s = &mut seqs[i];
            // The token sampled now is generated[len]; the next step feeds it and samples one more.
            let next_len = s.cache.len + 1;
            if s.generated.len() + 2 > s.request.max_new_tokens || self.cache.reserve(&mut s.cache, next_len).is_err() {
                return Ok(());
            }
        }
        let tokens = vec![0u32; chosen.len()];
        let (positions, slots) = layout(seqs, chosen);
        let batch = BatchInfo { tokens: &tokens, positions: &positions, seqs: slots, block_size: BLOCK_SIZE };
        let logit_rows: Vec<u32> = (0..chosen.len() as u32).collect();
        let s = self.decode_scratch.as_mut().expect("a decode step fitted it");
        let (model, cache) = (&self.model, &mut self.cache);
        if model.backend.prepare_decode_step(tokens.len(), &mut || model.forward(&batch, cache, s, &logit_rows))? {
            self.prepared = Some(decode_rows(seqs, chosen));
        }
        Ok(())
    }

    /// A session request reuses the cached tokens its prompt starts with; the rest is prefilled.
    fn take_session_prefix(&mut self, r: &GenRequest) -> (SeqCache, usize) {
        let Some(session) = r.session.and_then(|id| self.sessions.get_mut(&id)) else { return (SeqCache::default(), 0) };
        let common = session.tokens.iter().zip(&r.prompt).take_while(|(a, b)| a == b).count();
        // At least the last prompt token is fed again: its logits choose the first new token.
        let keep = common.min(r.prompt.len() - 1);
        let mut cache = std::mem::take(&mut session.cache);
        self.cache.truncate(&mut cache, keep);
        session.tokens.truncate(keep);
        (cache, keep)
    }

    /// Give a session its cache back (or free the cache of a sessionless sequence).
    fn store_session(&mut self, s: &mut Sequence, ok: bool) {
        match s.request.session.and_then(|id| self.sessions.get_mut(&id)) {
            Some(session) if ok => {
                // The cache holds the prompt and every generated token but the last (never fed).
                let mut tokens = s.request.prompt.clone();
                tokens.extend_from_slice(&s.generated[..s.generated.len().saturating_sub(1)]);
                tokens.truncate(s.cache.len);
                session.tokens = tokens;
                session.cache = std::mem::take(&mut s.cache);
            }
            Some(session) => {
                // A failed request leaves the session empty rather than half-written.
                session.tokens.clear();
                self.cache.release(&mut s.cache);
            }
            None => self.cache.release(&mut s.cache),
        }
    }

    fn output(s: Sequence) -> GenOutput {
        let first = s.first_token_at.unwrap_or(s.started);
        let end = s.finished_at.unwrap_or(first);
        let thinking_tokens = if s.request.thinking && s.thinking_tokens == 0 { s.generated.len() } else { s.thinking_tokens };
        GenOutput {
            text: s.text.as_ref().map(|t| t.text().to_string()).unwrap_or_default(),
            tokens: s.generated,
            finish_reason: s.finish.unwrap_or(FinishReason::Length),
            cached_tokens: s.cached,
            thinking_tokens,
            logprobs: s.logprobs,
            prefill_s: (first - s.started).as_secs_f64(),
            decode_s: (end - first).as_secs_f64(),
        }
    }

    fn run(&mut self, seqs: &mut [Sequence], budget_text: &[u32], on_delta: &mut EventSink) -> Result<()> {
        // A prepared or launched step names sequences by their index in `seqs`: it never outlives one run.
        (self.prepared, self.ahead) = (None, None);
        let mut result = Ok(());
        while result.is_ok() && seqs.iter().any(|s| s.finish.is_none()) {
            result = self.step(seqs, budget_text, on_delta);
        }
        self.steps_ahead[1] += u64::from(self.ahead.is_some());
        (self.prepared, self.ahead) = (None, None);
        result
    }

    /// One forward pass: prompt chunks if any sequence still has prompt left, else one token each.
    fn step(&mut self, seqs: &mut [Sequence], budget_text: &[u32], on_delta: &mut EventSink) -> Result<()> {
        let prefilling = seqs.iter().any(|s| s.finish.is_none() && s.fed < s.request.prompt.len());
        let mut budget = if prefilling { self.model.backend.prefill_chunk() } else { usize::MAX };
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
        let (positions, slots) = layout(seqs, &chosen);
        let (mut tokens, mut logit_rows, mut sampling) = (vec![], vec![], vec![]);
        for &(i, n) in &chosen {
            let s = &seqs[i];
            let row = tokens.len();
            tokens.extend_from_slice(&s.next_input(n)[..n]);
            // Only a sequence whose prompt ends here (or that is decoding) samples a token.
            if !prefilling || s.fed + n == s.request.prompt.len() {
                logit_rows.push((row + n - 1) as u32);
                sampling.push(i);
            }
        }
        let batch = BatchInfo { tokens: &tokens, positions: &positions, seqs: slots, block_size: BLOCK_SIZE };
        let scratch = if prefilling { &mut self.scratch } else { &mut self.decode_scratch };
        Scratch::fit(scratch, &self.model, tokens.len(), logit_rows.len())?;
        let s = scratch.as_mut().expect("fitted above");
        // 3. Forward, then advance every fed sequence. A decode step (one token per sequence) goes
        //    through `decode_step`, so a GPU backend can replay it as one CUDA graph.
        //    Its host part may have run already, during the previous step (`prepare_next`).
        let (prepared, ahead) = (self.prepared.take(), self.ahead.take());
        if prefilling {
            self.model.forward(&batch, &mut self.cache, s, &logit_rows)?;
        } else if ahead.is_some() && ahead == Some(decode_rows(seqs, &chosen)) {
            // Launched during the last step, fed the tokens it chose on the device (all greedy).
        } else {
            self.steps_ahead[1] += u64::from(ahead.is_some());
            let ids = (prepared == Some(decode_rows(seqs, &chosen))).then_some(&tokens[..]);
            let (model, cache) = (&self.model, &mut self.cache);
            model.backend.decode_step(tokens.len(), ids, &mut || model.forward(&batch, cache, s, &logit_rows))?;
        }
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
        // 4. Choose one token for each sequence that produced logits; check its stop conditions.
        //    When every one is plain greedy (no penalties, no logprobs, nothing forced) the backend
        //    picks the argmax itself and only R ids come back, not R × V logits; and then the next
        //    decode step, prepared meanwhile, may be launched before they come back (fed on the
        //    device), so that the device does not wait for the host between steps.
        let vocab = self.model.config.vocab_size;
        // Ids past the tokenizer's vocabulary are padding rows of the embedding: never sampled.
        let usable = self.tokenizer.as_ref().map_or(vocab, |t| t.vocab_size().min(vocab));
        let all_greedy = sampling.iter().all(|&i| seqs[i].request.sampling.is_plain_greedy() && seqs[i].forced.is_empty());
        let rows = logit_rows.len();
        let queued = all_greedy && self.model.backend.queue_argmax(self.step_logits(prefilling), rows, usable)?;
        if !prefilling {
            self.prepare_next(seqs, &chosen)?;
            if queued && self.prepared.is_some() && self.model.backend.launch_ahead(rows)? {
                self.ahead = self.prepared.take();
                self.steps_ahead[0] += 1;
            }
        }
        let be = &self.model.backend;
        let (logits, greedy, tops) = if all_greedy {
            let ids = if queued { be.take_argmax(rows)? } else { be.argmax_rows(self.step_logits(prefilling), rows, usable)? };
            (vec![], ids, vec![])
        } else {
            // Top-k sampling without penalties needs only each row's k best scaled logits (a forced
            // row needs none: any stand-in).
            let wants: Option<Vec<(usize, f32)>> = sampling
                .iter()
                .map(|&i| if seqs[i].forced.is_empty() { seqs[i].sampler.wants_top(usable) } else { Some((1, 1.0)) })
                .collect();
            match wants {
                Some(wants) => (vec![], vec![], be.top_rows(self.step_logits(prefilling), rows, usable, &wants)?),
                None => (be.download(self.step_logits(prefilling))?, vec![], vec![]),
            }
        };
        let mut deltas = vec![];
        for (r, &i) in sampling.iter().enumerate() {
            let seq = &mut seqs[i];
            let token = match seq.forced.pop_front() {
                Some(t) => t,
                None => {
                    // The model chose this token: inside the think block it counts against the budget.
                    if seq.in_thinking() {
                        seq.thought += 1;
                    }
                    if all_greedy {
                        greedy[r]
                    } else {
                        let sampled = match tops.get(r) {
                            Some(top) => seq.sampler.sample_top(top)?,
                            None => seq.sampler.sample(&logits[r * vocab..r * vocab + usable], &seq.generated)?,
                        };
                        if seq.request.sampling.logprobs > 0 {
                            seq.logprobs.push((sampled.logprob, sampled.top_logprobs));
                        }
                        sampled.token
                    }
                }
            };
            let now = Instant::now();
            seq.first_token_at.get_or_insert(now);
            seq.generated.push(token);
            let was_thinking = seq.in_thinking();
            let mut finish = None;
            if let (Some(text), Some(tok)) = (seq.text.as_mut(), self.tokenizer.as_ref()) {
                if text.push(tok, token, &mut deltas)? {
                    finish = Some(FinishReason::StopString);
                }
                if was_thinking && !text.in_thinking() {
                    seq.thinking_tokens = seq.generated.len();
                }
            }
            // The thinking budget: once spent inside an open think block, close it for the model.
            if let Some(limit) = seq.request.thinking_budget {
                if seq.in_thinking() && seq.thought >= limit && seq.forced.is_empty() {
                    seq.forced.extend(budget_text.iter().copied());
                }
            }
            if finish.is_none() && seq.forced.is_empty() && seq.request.stop_token_ids.contains(&token) {
                finish = Some(FinishReason::Stop);
            }
            if finish.is_none() && seq.generated.len() >= seq.request.max_new_tokens {
                finish = Some(FinishReason::Length);
            }
            if finish.is_some() {
                seq.finish = finish;
                seq.finished_at = Some(now);
                if let (Some(text), Some(tok)) = (seq.text.as_mut(), self.tokenizer.as_ref()) {
                    text.finish(tok, &mut deltas);
                }
            }
            for d in deltas.drain(..) {
                on_delta(i, d)?;
            }
        }
        Ok(())
    }
}

/// The positions of a batch of `chosen` (sequence, rows fed) and its slot per sequence: rows in
/// `chosen` order, each sequence's from its cache's current length on.
fn layout<'a>(seqs: &'a [Sequence], chosen: &[(usize, usize)]) -> (Vec<u32>, Vec<SeqSlot<'a>>) {
    let (mut positions, mut slots, mut row) = (vec![], Vec::with_capacity(chosen.len()), 0);
    for &(i, n) in chosen {
        let c = &seqs[i].cache;
        positions.extend((c.len..c.len + n).map(|p| p as u32));
        slots.push(SeqSlot { rows: row..row + n, start_pos: c.len, blocks: &c.blocks });
        row += n;
    }
    (positions, slots)
}

/// A decode step as `prepare_next` records it: (sequence, position) of each row.
fn decode_rows(seqs: &[Sequence], chosen: &[(usize, usize)]) -> Vec<(usize, usize)> {
    chosen.iter().map(|&(i, _)| (i, seqs[i].cache.len)).collect()
}

/// The backend an engine runs on, chosen at load time: the only place that names backends.
#[allow(clippy::large_enum_variant)] // one per loaded model
pub enum AnyEngine {
    Cpu(Engine<crate::backend::cpu::CpuBackend>),
    /// CPU ranks standing in for GPUs: checks the tensor-parallel sharding.
    CpuTp(Engine<crate::backend::tp::TensorParallel<crate::backend::cpu::CpuBackend>>),
    /// Never built without the `cuda` feature (its backend type is then uninhabited).
    Cuda(Engine<crate::backend::cuda::CudaBackend>),
    /// Several GPUs of one host, NCCL between them.
    CudaTp(Engine<crate::backend::tp::TensorParallel<crate::backend::cuda::CudaBackend>>),
}

/// Run `$body` with `$e` bound to the engine of whichever backend this is.
macro_rules! with_engine {
    ($any:expr, $e:ident => $body:expr) => {
        match $any {
            AnyEngine::Cpu($e) => $body,
            AnyEngine::CpuTp($e) => $body,
            AnyEngine::Cuda($e) => $body,
            AnyEngine::CudaTp($e) => $body,
        }
    };
}

impl AnyEngine {
    pub fn config(&self) -> &crate::config::Qwen3Config {
        with_engine!(self, e => &e.model.config)
    }

    /// Decode steps launched ahead so far, and of those the ones never read (`Engine::steps_ahead`).
    pub fn steps_ahead(&self) -> [u64; 2] {
        with_engine!(self, e => e.steps_ahead)
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

    pub fn generate(&mut self, requests: Vec<GenRequest>, on_delta: &mut EventSink) -> Result<Vec<GenOutput>> {
        with_engine!(self, e => e.generate(requests, on_delta))
    }

    pub fn tokenizer(&self) -> Option<&Tokenizer> {
        with_engine!(self, e => e.tokenizer.as_ref())
    }

    pub fn open_session(&mut self) -> u64 {
        with_engine!(self, e => e.open_session())
    }

    pub fn close_session(&mut self, id: u64) {
        with_engine!(self, e => e.close_session(id))
    }

    pub fn session_len(&self, id: u64) -> Option<usize> {
        with_engine!(self, e => e.session_len(id))
    }
}
