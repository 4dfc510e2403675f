//! Reading tokenizer.json (HF `tokenizers` format) and checking that it describes a tokenizer this
//! crate reproduces exactly: byte-level BPE, NFC (or no) normalizer, Qwen's split pattern, the
//! byte-level decoder. Anything else is refused with the field and value named, rather than
//! tokenized differently from HF.

use super::pretokenize::QWEN_PATTERN;
use crate::bail;
use crate::error::{Error, Result};
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::fmt;

#[derive(Deserialize)]
pub struct RawTokenizer {
    #[serde(default)]
    pub truncation: Value,
    #[serde(default)]
    pub padding: Value,
    #[serde(default)]
    pub normalizer: Value,
    #[serde(default)]
    pub pre_tokenizer: Value,
    #[serde(default)]
    pub post_processor: Value,
    #[serde(default)]
    pub decoder: Value,
    #[serde(default)]
    pub added_tokens: Vec<RawAddedToken>,
    pub model: RawModel,
}

#[derive(Deserialize)]
pub struct RawModel {
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub vocab: HashMap<String, u32>,
    pub merges: Vec<Merge>,
    #[serde(default)]
    pub dropout: Option<f64>,
    #[serde(default)]
    pub continuing_subword_prefix: Option<String>,
    #[serde(default)]
    pub end_of_word_suffix: Option<String>,
    #[serde(default)]
    pub ignore_merges: bool,
}

#[derive(Deserialize)]
pub struct RawAddedToken {
    pub id: u32,
    pub content: String,
    #[serde(default)]
    pub single_word: bool,
    #[serde(default)]
    pub lstrip: bool,
    #[serde(default)]
    pub rstrip: bool,
    pub normalized: Option<bool>,
    #[serde(default)]
    pub special: bool,
}

/// One merge: `["a", "b"]` (current format) or `"a b"` (older format).
pub struct Merge(pub String, pub String);

impl<'de> Deserialize<'de> for Merge {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct MergeVisitor;
        impl<'de> Visitor<'de> for MergeVisitor {
            type Value = Merge;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a merge: [\"left\", \"right\"] or \"left right\"")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> std::result::Result<Merge, E> {
                let mut parts = s.split(' ');
                match (parts.next(), parts.next(), parts.next()) {
                    (Some(a), Some(b), None) => Ok(Merge(a.into(), b.into())),
                    _ => Err(E::custom(format!("merge {s:?} is not two tokens separated by one space"))),
                }
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<Merge, A::Error> {
                let a: String = seq.next_element()?.ok_or_else(|| de::Error::invalid_length(0, &self))?;
                let b: String = seq.next_element()?.ok_or_else(|| de::Error::invalid_length(1, &self))?;
                if seq.next_element::<de::IgnoredAny>()?.is_some() {
                    return Err(de::Error::invalid_length(3, &self));
                }
                Ok(Merge(a, b))
            }
        }
        d.deserialize_any(MergeVisitor)
    }
}

/// What the checked configuration leaves to decide.
pub struct Options {
    pub nfc: bool,
}

pub fn parse(bytes: &[u8]) -> Result<RawTokenizer> {
    serde_json::from_slice(bytes).map_err(|e| Error::Tokenizer(format!("tokenizer.json is malformed: {e}")))
}

/// Check every pipeline stage; the model's own fields are checked in `check_model`.
pub fn check(raw: &RawTokenizer) -> Result<Options> {
    if !raw.truncation.is_null() {
        bail!(Tokenizer, "tokenizer.json: truncation is not supported (found {})", short(&raw.truncation));
    }
    if !raw.padding.is_null() {
        bail!(Tokenizer, "tokenizer.json: padding is not supported (found {})", short(&raw.padding));
    }
    let nfc = match type_of(&raw.normalizer) {
        None if raw.normalizer.is_null() => false,
        Some("NFC") => true,
        _ => bail!(Tokenizer, "tokenizer.json: normalizer {} is not supported (only NFC or null)", short(&raw.normalizer)),
    };
    check_pre_tokenizer(&raw.pre_tokenizer)?;
    match type_of(&raw.post_processor) {
        None if raw.post_processor.is_null() => {}
        // The byte-level post-processor only adjusts offsets; ids are unchanged.
        Some("ByteLevel") => {}
        _ => bail!(Tokenizer, "tokenizer.json: post_processor {} is not supported (only ByteLevel or null)", short(&raw.post_processor)),
    }
    if type_of(&raw.decoder) != Some("ByteLevel") {
        bail!(Tokenizer, "tokenizer.json: decoder {} is not supported (only ByteLevel)", short(&raw.decoder));
    }
    check_model(&raw.model)?;
    for t in &raw.added_tokens {
        check_added(t)?;
    }
    Ok(Options { nfc })
}

fn check_pre_tokenizer(pre: &Value) -> Result<()> {
    let split = json!({"type": "Split", "pattern": {"Regex": QWEN_PATTERN}, "behavior": "Isolated", "invert": false});
    let ok = type_of(pre) == Some("Sequence")
        && match pre.get("pretokenizers").and_then(Value::as_array).map(Vec::as_slice) {
            Some([first, second]) => {
                *first == split
                    && type_of(second) == Some("ByteLevel")
                    && second.get("add_prefix_space") == Some(&Value::Bool(false))
                    && second.get("use_regex") == Some(&Value::Bool(false))
            }
            _ => false,
        };
    if !ok {
        bail!(
            Tokenizer,
            "tokenizer.json: pre_tokenizer {} is not supported (only Qwen's: Split on its pattern, then ByteLevel without regex or prefix space)",
            short(pre)
        );
    }
    Ok(())
}

fn check_model(m: &RawModel) -> Result<()> {
    if let Some(kind) = m.kind.as_deref().filter(|k| *k != "BPE") {
        bail!(Tokenizer, "tokenizer.json: model.type {kind:?} is not supported (only BPE)");
    }
    if let Some(p) = m.dropout.filter(|&p| p != 0.0) {
        bail!(Tokenizer, "tokenizer.json: model.dropout {p} is not supported (only null)");
    }
    for (field, value) in [("continuing_subword_prefix", &m.continuing_subword_prefix), ("end_of_word_suffix", &m.end_of_word_suffix)] {
        if let Some(v) = value.as_deref().filter(|v| !v.is_empty()) {
            bail!(Tokenizer, "tokenizer.json: model.{field} {v:?} is not supported (only empty)");
        }
    }
    Ok(())
}

fn check_added(t: &RawAddedToken) -> Result<()> {
    let name = &t.content;
    if name.is_empty() {
        bail!(Tokenizer, "tokenizer.json: added token {} has empty content", t.id);
    }
    for (flag, set) in [("single_word", t.single_word), ("lstrip", t.lstrip), ("rstrip", t.rstrip)] {
        if set {
            bail!(Tokenizer, "tokenizer.json: added token {name:?} has {flag}=true, which is not supported");
        }
    }
    if t.normalized.unwrap_or(!t.special) {
        bail!(Tokenizer, "tokenizer.json: added token {name:?} has normalized=true, which is not supported");
    }
    Ok(())
}

fn type_of(v: &Value) -> Option<&str> {
    v.get("type").and_then(Value::as_str)
}

/// A value for an error message, cut short.
fn short(v: &Value) -> String {
    let s = v.to_string();
    match s.char_indices().nth(120) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s,
    }
}
