//! A sequence's generated text as it grows: incremental detokenization (never half a character),
//! the thinking/content split of each streamed piece, and stop strings (matched on the decoded
//! text, never streamed: text that could still become a stop string is held back until it can't).

use crate::chat::THINK_END;
use crate::error::Result;
use crate::tokenizer::{StreamDecoder, Tokenizer};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeltaKind {
    Thinking,
    Content,
}

impl DeltaKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DeltaKind::Thinking => "thinking",
            DeltaKind::Content => "content",
        }
    }
}

/// One streamed piece of one sequence's output.
#[derive(Clone, Debug, PartialEq)]
pub struct Delta {
    pub kind: DeltaKind,
    pub text: String,
    /// The tokens whose text this is (text can lag tokens by an incomplete character or a held-back
    /// stop-string prefix; then the tokens come with the text they complete).
    pub token_ids: Vec<u32>,
}

pub struct TextTracker {
    decoder: StreamDecoder,
    stop: Vec<String>,
    /// All text so far (special tokens skipped), cut at a stop string once one matched.
    text: String,
    /// Bytes of `text` already streamed.
    emitted: usize,
    /// Tokens whose text has not been streamed yet.
    pending_ids: Vec<u32>,
    /// Whether the output is inside a think block (chat with thinking on, until `</think>`).
    thinking: bool,
    think_end: Option<u32>,
    stopped: bool,
}

impl TextTracker {
    pub fn new(tok: &Tokenizer, stop: Vec<String>, thinking: bool) -> Self {
        TextTracker {
            decoder: StreamDecoder::new(true),
            stop: stop.into_iter().filter(|s| !s.is_empty()).collect(),
            text: String::new(),
            emitted: 0,
            pending_ids: vec![],
            thinking,
            think_end: tok.token_to_id(THINK_END),
            stopped: false,
        }
    }

    pub fn text(&self) -> &str {
        &self.text
    }

    /// Whether the output is still inside its think block.
    pub fn in_thinking(&self) -> bool {
        self.thinking
    }

    /// Add one generated token; returns the pieces now safe to stream, and whether a stop string matched
    /// (the text is then cut where it starts).
    pub fn push(&mut self, tok: &Tokenizer, id: u32, deltas: &mut Vec<Delta>) -> Result<bool> {
        if self.stopped {
            return Ok(true);
        }
        let piece = self.decoder.push(tok, id)?;
        let search_from = floor_char_boundary(&self.text, self.emitted.saturating_sub(self.max_stop_len()));
        self.text.push_str(&piece);
        self.pending_ids.push(id);
        if let Some(at) = self.find_stop(search_from) {
            self.text.truncate(at);
            self.stopped = true;
            self.flush(self.text.len(), true, deltas);
            return Ok(true);
        }
        let closes_thinking = self.thinking && Some(id) == self.think_end;
        let safe = if closes_thinking { self.text.len() } else { self.text.len() - self.held_back() };
        self.flush(safe, closes_thinking, deltas);
        if closes_thinking {
            self.thinking = false;
        }
        Ok(false)
    }

    /// Stream whatever is left at the end of generation (held-back text that never became a stop string).
    pub fn finish(&mut self, tok: &Tokenizer, deltas: &mut Vec<Delta>) {
        if !self.stopped {
            let rest = self.decoder.finish(tok);
            self.text.push_str(&rest);
        }
        self.flush(self.text.len(), true, deltas);
    }

    /// Stream text[emitted..upto] with the tokens not yet reported. Without new text the tokens wait for
    /// the text they complete, unless `force` (end of thinking, a stop, the end) reports them anyway.
    fn flush(&mut self, upto: usize, force: bool, deltas: &mut Vec<Delta>) {
        let has_text = upto > self.emitted;
        if !has_text && (!force || self.pending_ids.is_empty()) {
            return;
        }
        let text = if has_text { self.text[self.emitted..upto].to_string() } else { String::new() };
        let kind = if self.thinking { DeltaKind::Thinking } else { DeltaKind::Content };
        deltas.push(Delta { kind, text, token_ids: std::mem::take(&mut self.pending_ids) });
        self.emitted = self.emitted.max(upto);
    }

    fn max_stop_len(&self) -> usize {
        self.stop.iter().map(|s| s.len()).max().unwrap_or(0)
    }

    fn find_stop(&self, from: usize) -> Option<usize> {
        self.stop.iter().filter_map(|s| self.text[from..].find(s.as_str()).map(|i| from + i)).min()
    }

    /// Length of the longest tail of the text that is a proper prefix of a stop string.
    fn held_back(&self) -> usize {
        let mut best = 0;
        for s in &self.stop {
            for (i, _) in s.char_indices().skip(1) {
                if i > best && self.text.ends_with(&s[..i]) {
                    best = i;
                }
            }
        }
        best.min(self.text.len() - self.emitted.min(self.text.len()))
    }
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}
