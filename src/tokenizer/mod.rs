//! Byte-level BPE tokenizer (Qwen3's), loaded from an HF tokenizer.json and reproducing HF
//! `tokenizers` ids exactly. Encode: split out added tokens (`added`), NFC-normalize the rest,
//! split it with Qwen's pattern (`pretokenize`), merge each piece's bytes by rank (`bpe`).
//! Decode: concatenate token bytes, lossy UTF-8; `stream` does the same incrementally.
//!
//! `load` refuses any tokenizer.json whose pipeline differs from what these modules implement.

mod added;
mod bpe;
pub mod bytelevel;
mod load;
pub mod pretokenize;
mod stream;
mod unicode_tables;

pub use stream::StreamDecoder;

use crate::error::{Error, Result};
use crate::{bail, ensure};
use added::{AddedMatcher, Segment};
use bpe::Merges;
use rayon::prelude::*;
use rustc_hash::FxHashMap;
use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
// The NFC of HF `tokenizers` itself: its Unicode 9.0 tables leave alone the pairs that later
// Unicode versions compose (e.g. U+1611E U+1611E, Unicode 16), so a current NFC would differ.
use unicode_normalization_alignments::{is_nfc_quick, IsNormalized, UnicodeNormalization};

const UNKNOWN: u8 = 0;
const SHORTCUT: u8 = 1;
const NO_SHORTCUT: u8 = 2;

/// Ids above this are refused: they would only size tables, and no real vocabulary comes close.
const MAX_ID: u32 = 1 << 24;

/// A loaded tokenizer. Cloning is cheap (shared, immutable tables).
#[derive(Clone)]
pub struct Tokenizer {
    inner: Arc<Inner>,
}

struct Inner {
    nfc: bool,
    merges: Merges,
    /// Vocab tokens by their bytes: a piece that is one token may skip merging (see `encode_piece`).
    whole: FxHashMap<Box<[u8]>, u32>,
    /// model.ignore_merges: a piece found in `whole` is that token, whatever the merges say.
    ignore_merges: bool,
    /// Per id, whether merging its own bytes yields it: UNKNOWN until first needed.
    verdict: Vec<AtomicU8>,
    added: AddedMatcher,
    /// Bytes each id decodes to (index = id); None for ids no token has.
    id_bytes: Vec<Option<Box<[u8]>>>,
    /// The token string of each id (byte-level form for vocab tokens, content for added ones).
    id_strings: Vec<Option<Box<str>>>,
    special: Vec<bool>,
    token_ids: HashMap<String, u32>,
    vocab_size: usize,
}

impl Tokenizer {
    /// Load a tokenizer.json file.
    pub fn from_file(path: &Path) -> Result<Tokenizer> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::from_json(&bytes).map_err(|e| match e {
            Error::Tokenizer(m) => Error::Tokenizer(format!("{}: {m}", path.display())),
            other => other,
        })
    }

    /// Load `dir/tokenizer.json`.
    pub fn from_pretrained(dir: &Path) -> Result<Tokenizer> {
        Self::from_file(&dir.join("tokenizer.json"))
    }

    /// Load from the contents of a tokenizer.json.
    pub fn from_json(bytes: &[u8]) -> Result<Tokenizer> {
        let raw = load::parse(bytes)?;
        let options = load::check(&raw)?;
        build(raw, options).map(|inner| Tokenizer { inner: Arc::new(inner) })
    }

    /// Token ids of `text`. `add_special_tokens` is accepted for API parity: Qwen's
    /// post-processor (ByteLevel, the only one accepted) adds nothing, as in HF.
    pub fn encode(&self, text: &str, _add_special_tokens: bool) -> Vec<u32> {
        let mut out = Vec::with_capacity(text.len() / 3 + 1);
        self.inner.added.split(text, |segment| match segment {
            Segment::Token(id) => out.push(id),
            Segment::Text(t) => self.encode_text(t, &mut out),
        });
        out
    }

    /// `encode` of each text, in parallel (rayon), results in input order.
    pub fn encode_batch(&self, texts: &[String], add_special_tokens: bool) -> Vec<Vec<u32>> {
        texts.par_iter().map(|t| self.encode(t, add_special_tokens)).collect()
    }

    /// Text of `ids` (invalid UTF-8 replaced by U+FFFD); unknown ids are an error.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        let mut bytes = Vec::with_capacity(ids.len() * 4);
        for &id in ids {
            let b = self.token_bytes(id)?;
            if !(skip_special_tokens && self.is_special(id)) {
                bytes.extend_from_slice(b);
            }
        }
        Ok(match String::from_utf8(bytes) {
            Ok(s) => s,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        })
    }

    /// Number of distinct ids, added tokens included (151,669 for Qwen3).
    pub fn vocab_size(&self) -> usize {
        self.inner.vocab_size
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_ids.get(token).copied()
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_strings.get(id as usize)?.as_deref().map(str::to_owned)
    }

    /// Whether `id` is an added token marked special (skipped by `skip_special_tokens`).
    pub fn is_special(&self, id: u32) -> bool {
        self.inner.special.get(id as usize).copied().unwrap_or(false)
    }

    /// The bytes `id` decodes to.
    pub(crate) fn token_bytes(&self, id: u32) -> Result<&[u8]> {
        match self.inner.id_bytes.get(id as usize) {
            Some(Some(b)) => Ok(b),
            _ => bail!(InvalidArgument, "token id {id} is not in the vocabulary (size {})", self.inner.vocab_size),
        }
    }

    /// Plain text between added tokens: normalize, pre-tokenize, merge.
    fn encode_text(&self, text: &str, out: &mut Vec<u32>) {
        let text: Cow<str> = if self.inner.nfc && !text.is_ascii() && is_nfc_quick(text.chars()) != IsNormalized::Yes {
            Cow::Owned(text.nfc().map(|(c, _)| c).collect())
        } else {
            Cow::Borrowed(text)
        };
        for piece in pretokenize::pieces(&text) {
            self.encode_piece(piece.as_bytes(), out);
        }
    }

    /// Most pieces of ordinary text are a vocab token; then one lookup replaces the merges, once
    /// merging that token's bytes has been seen to give the token itself (BPE doesn't promise it).
    #[inline]
    fn encode_piece(&self, piece: &[u8], out: &mut Vec<u32>) {
        let inner = &*self.inner;
        if let Some(&id) = inner.whole.get(piece) {
            if inner.ignore_merges {
                out.push(id);
                return;
            }
            // The verdict is deterministic, so racing threads store the same value.
            let verdict = &inner.verdict[id as usize];
            match verdict.load(Ordering::Relaxed) {
                SHORTCUT => return out.push(id),
                NO_SHORTCUT => {}
                _ => {
                    let start = out.len();
                    inner.merges.encode_piece(piece, out);
                    let ok = out[start..] == [id];
                    verdict.store(if ok { SHORTCUT } else { NO_SHORTCUT }, Ordering::Relaxed);
                    return;
                }
            }
        }
        inner.merges.encode_piece(piece, out);
    }
}

/// Build the id-space tables from the checked tokenizer.json.
fn build(raw: load::RawTokenizer, options: load::Options) -> Result<Inner> {
    let model = raw.model;
    let byte_char = bytelevel::byte_to_char();
    let mut byte_ids = [0u32; 256];
    for (b, c) in byte_char.iter().enumerate() {
        match model.vocab.get(c.encode_utf8(&mut [0; 4]) as &str) {
            Some(&id) => byte_ids[b] = id,
            None => bail!(Tokenizer, "tokenizer.json: model.vocab lacks the byte-level token {c:?} (byte {b:#04x})"),
        }
    }
    let vocab_id = |s: &str, rank: usize| {
        model
            .vocab
            .get(s)
            .copied()
            .ok_or_else(|| Error::Tokenizer(format!("tokenizer.json: model.merges[{rank}] uses {s:?}, which is not in model.vocab")))
    };
    let mut pairs = FxHashMap::default();
    pairs.reserve(model.merges.len());
    for (rank, load::Merge(a, b)) in model.merges.iter().enumerate() {
        let key = (vocab_id(a, rank)? as u64) << 32 | vocab_id(b, rank)? as u64;
        // A repeated pair keeps its last rank, as HF's map does.
        pairs.insert(key, (rank as u32, vocab_id(&format!("{a}{b}"), rank)?));
    }

    let max_id = model.vocab.values().chain(raw.added_tokens.iter().map(|t| &t.id)).copied().max().unwrap_or(0);
    ensure!(max_id < MAX_ID, Tokenizer, "tokenizer.json: token id {max_id} is too large (limit {MAX_ID})");
    let n = max_id as usize + 1;
    let mut id_bytes: Vec<Option<Box<[u8]>>> = vec![None; n];
    let mut id_strings: Vec<Option<Box<str>>> = vec![None; n];
    let mut special = vec![false; n];
    for (token, &id) in &model.vocab {
        if let Some(other) = &id_strings[id as usize] {
            bail!(Tokenizer, "tokenizer.json: model.vocab gives id {id} to both {other:?} and {token:?}");
        }
        id_strings[id as usize] = Some(token.as_str().into());
        id_bytes[id as usize] = Some(decode_bytes(token));
    }
    let whole = model.vocab.iter().filter_map(|(t, &id)| Some((bytelevel::token_bytes(t)?.into_boxed_slice(), id))).collect();
    let verdict = (0..n).map(|_| AtomicU8::new(UNKNOWN)).collect();

    let mut token_ids = model.vocab;
    for t in &raw.added_tokens {
        let slot = &mut id_strings[t.id as usize];
        if let Some(other) = slot.as_deref().filter(|s| *s != t.content) {
            bail!(Tokenizer, "tokenizer.json: added token {:?} has id {}, already the id of {other:?}", t.content, t.id);
        }
        *slot = Some(t.content.as_str().into());
        id_bytes[t.id as usize] = Some(decode_bytes(&t.content));
        special[t.id as usize] |= t.special;
        token_ids.insert(t.content.clone(), t.id);
    }
    let added = AddedMatcher::new(raw.added_tokens.iter().map(|t| (t.content.as_str(), t.id)));
    let vocab_size = id_strings.iter().filter(|s| s.is_some()).count();
    Ok(Inner {
        nfc: options.nfc,
        merges: Merges::new(byte_ids, pairs),
        whole,
        ignore_merges: model.ignore_merges,
        verdict,
        added,
        id_bytes,
        id_strings,
        special,
        token_ids,
        vocab_size,
    })
}

/// What the byte-level decoder makes of a token: its bytes if every character is a byte-level
/// one, else the token's own UTF-8 (HF does the same).
fn decode_bytes(token: &str) -> Box<[u8]> {
    bytelevel::token_bytes(token).unwrap_or_else(|| token.as_bytes().to_vec()).into_boxed_slice()
}

#[cfg(test)]
mod tests;

#[cfg(test)]
impl Inner {
    fn added_matches(&self, text: &str) -> bool {
        let mut any = false;
        self.added.split(text, |s| any |= matches!(s, Segment::Token(_)));
        any
    }
}
