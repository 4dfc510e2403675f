//! Streaming decode: text is handed out as tokens arrive, but never half a character. Bytes of
//! an incomplete UTF-8 sequence wait for the next token; bytes that can never become valid are
//! replaced by U+FFFD exactly as a whole-sequence lossy decode would, so the concatenated output
//! equals `Tokenizer::decode` of all the ids.

use super::Tokenizer;
use crate::error::Result;

pub struct StreamDecoder {
    skip_special_tokens: bool,
    pending: Vec<u8>,
}

impl StreamDecoder {
    pub fn new(skip_special_tokens: bool) -> Self {
        StreamDecoder { skip_special_tokens, pending: Vec::new() }
    }

    /// The text completed by `id` (possibly empty). An unknown id is an error and changes nothing.
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<String> {
        let bytes = tok.token_bytes(id)?;
        if self.skip_special_tokens && tok.is_special(id) {
            return Ok(String::new());
        }
        self.pending.extend_from_slice(bytes);
        Ok(self.take_complete())
    }

    /// Whatever is left (an unfinished character becomes U+FFFD); the decoder is empty afterwards.
    pub fn finish(&mut self, _tok: &Tokenizer) -> String {
        let text = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        text
    }

    /// Decode the longest prefix of `pending` that later bytes can't change.
    fn take_complete(&mut self) -> String {
        let mut out = String::new();
        let mut start = 0;
        while start < self.pending.len() {
            match std::str::from_utf8(&self.pending[start..]) {
                Ok(s) => {
                    out.push_str(s);
                    start = self.pending.len();
                }
                Err(e) => {
                    let valid = start + e.valid_up_to();
                    // from_utf8 validated this range just above, so this never falls back.
                    out.push_str(std::str::from_utf8(&self.pending[start..valid]).unwrap_or_default());
                    match e.error_len() {
                        // Invalid whatever follows: one U+FFFD per maximal invalid run, as lossy does.
                        Some(n) => {
                            out.push('\u{FFFD}');
                            start = valid + n;
                        }
                        // An incomplete character at the end: keep it for the next token.
                        None => {
                            start = valid;
                            break;
                        }
                    }
                }
            }
        }
        self.pending.drain(..start);
        out
    }
}
