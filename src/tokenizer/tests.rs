//! Tests over the real Qwen3 tokenizer.json: the conformance fixture (ids produced by HF
//! `tokenizers`), decode, streaming, and refusal of malformed or unsupported files.

use super::*;
use std::sync::OnceLock;

fn qwen() -> &'static Tokenizer {
    static TOK: OnceLock<Tokenizer> = OnceLock::new();
    TOK.get_or_init(|| {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/qwen3rs/tokenizer");
        Tokenizer::from_pretrained(&dir).expect("bundled tokenizer loads")
    })
}

fn fixture() -> Vec<(String, Vec<u32>)> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer/encode.jsonl");
    let text = std::fs::read_to_string(path).expect("fixture");
    text.lines()
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).expect("fixture line");
            let ids = v["ids"].as_array().expect("ids").iter().map(|i| i.as_u64().expect("id") as u32).collect();
            (v["text"].as_str().expect("text").to_owned(), ids)
        })
        .collect()
}

#[test]
fn sizes_and_lookups() {
    let t = qwen();
    assert_eq!(t.vocab_size(), 151_669);
    assert_eq!(t.token_to_id("<think>"), Some(151_667));
    assert_eq!(t.token_to_id("Ġ"), Some(220));
    assert_eq!(t.id_to_token(220).as_deref(), Some("Ġ"));
    assert_eq!(t.id_to_token(151_645).as_deref(), Some("<|im_end|>"));
    assert_eq!(t.id_to_token(151_669), None);
    assert!(t.is_special(151_645));
    assert!(!t.is_special(151_667)); // <think> is added but not special
}

#[test]
fn conformance_fixture_ids() {
    let t = qwen();
    let mut bad = vec![];
    let cases = fixture();
    assert!(cases.len() > 300);
    for (text, ids) in &cases {
        if t.encode(text, false) != *ids {
            bad.push(text.clone());
        }
    }
    assert!(bad.is_empty(), "{} of {} fixture lines differ, e.g. {:?}", bad.len(), cases.len(), &bad[..bad.len().min(3)]);
    let texts: Vec<String> = cases.iter().map(|c| c.0.clone()).collect();
    let batch = t.encode_batch(&texts, true);
    assert!(batch.iter().zip(&cases).all(|(got, c)| *got == c.1));
}

#[test]
fn whole_token_shortcut_agrees_with_merging() {
    // Every vocab token whose bytes are one pre-token: encoding it (shortcut, verified on first
    // use, then cached) must equal the plain merge result, on the first and on the second call.
    let t = qwen();
    let mut checked = 0;
    for id in (0..151_643u32).step_by(7) {
        let Some(bytes) = t.inner.id_bytes[id as usize].as_deref() else { continue };
        let Ok(text) = std::str::from_utf8(bytes) else { continue };
        if pretokenize::pieces(text).count() != 1 || t.inner.added_matches(text) {
            continue;
        }
        if t.inner.nfc && is_nfc_quick(text.chars()) != IsNormalized::Yes {
            continue;
        }
        let mut merged = vec![];
        t.inner.merges.encode_piece(bytes, &mut merged);
        assert_eq!(t.encode(text, false), merged, "{text:?}");
        assert_eq!(t.encode(text, false), merged, "{text:?} (cached verdict)");
        checked += 1;
    }
    assert!(checked > 10_000, "{checked}");
}

#[test]
fn decode_and_skip_special() {
    let t = qwen();
    let ids = t.encode("a<think>b</think><|im_end|>c", false);
    assert_eq!(ids, [64, 151_667, 65, 151_668, 151_645, 66]);
    assert_eq!(t.decode(&ids, false).unwrap(), "a<think>b</think><|im_end|>c");
    assert_eq!(t.decode(&ids, true).unwrap(), "a<think>b</think>c");
    assert!(matches!(t.decode(&[1, 151_669], false), Err(Error::InvalidArgument(_))));
    assert!(matches!(t.decode(&[u32::MAX], false), Err(Error::InvalidArgument(_))));
}

#[test]
fn stream_never_splits_characters() {
    let t = qwen();
    for text in ["emoji 👍🏽👨‍👩‍👧‍👦 中文字符 é", "plain ascii", "🇯🇵🇯🇵🇯🇵"] {
        let ids = t.encode(text, false);
        let mut d = StreamDecoder::new(false);
        let mut out = String::new();
        for &id in &ids {
            let piece = d.push(t, id).unwrap();
            assert!(!piece.contains('\u{FFFD}'), "broken character in {piece:?}");
            out.push_str(&piece);
        }
        out.push_str(&d.finish(t));
        assert_eq!(out, text);
    }
    // A lone lead byte followed by ASCII: replaced exactly as a whole decode replaces it.
    let lead = t.token_to_id("Ã").unwrap(); // byte 0xC3
    let ids = [lead, 64, lead];
    let mut d = StreamDecoder::new(false);
    let mut out = String::new();
    for id in ids {
        out.push_str(&d.push(t, id).unwrap());
    }
    out.push_str(&d.finish(t));
    assert_eq!(out, t.decode(&ids, false).unwrap());
    assert_eq!(out, "\u{FFFD}a\u{FFFD}");
    assert!(d.push(t, 999_999).is_err());
}

#[test]
fn long_pieces_are_not_quadratic() {
    let t = qwen();
    let letters = "abcdefghij".repeat(100_000); // one 1 MB pre-token
    let emoji = "👍".repeat(100_000); // one 400 kB pre-token
    let start = std::time::Instant::now();
    for text in [&letters, &emoji] {
        let ids = t.encode(text, false);
        assert_eq!(t.decode(&ids, false).unwrap(), *text);
    }
    assert!(start.elapsed().as_secs_f64() < 5.0, "took {:?}", start.elapsed());
}

fn load_err(json: &str) -> String {
    match Tokenizer::from_json(json.as_bytes()) {
        Err(Error::Tokenizer(m)) => m,
        Err(e) => panic!("wrong error kind: {e}"),
        Ok(_) => panic!("loaded: {json}"),
    }
}

#[test]
fn refuses_malformed_and_unsupported() {
    assert!(load_err("{").contains("malformed"));
    assert!(load_err("{}").contains("model"));
    let real = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("python/qwen3rs/tokenizer/tokenizer.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&real).unwrap();
    let mutate = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut w = v.clone();
        f(&mut w);
        load_err(&w.to_string())
    };
    assert!(mutate(&|w| w["normalizer"] = serde_json::json!({"type": "NFKC"})).contains("normalizer"));
    assert!(mutate(&|w| w["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = "\\s+".into()).contains("pre_tokenizer"));
    assert!(mutate(&|w| w["decoder"] = serde_json::Value::Null).contains("decoder"));
    assert!(mutate(&|w| w["model"]["type"] = "WordPiece".into()).contains("WordPiece"));
    assert!(mutate(&|w| w["model"]["merges"][0] = serde_json::json!(["Ġ", "nope"])).contains("nope"));
    assert!(mutate(&|w| w["model"]["merges"][0] = serde_json::json!(["Ġ"])).contains("malformed"));
    assert!(mutate(&|w| w["added_tokens"][0]["lstrip"] = true.into()).contains("lstrip"));
    assert!(mutate(&|w| w["added_tokens"][0]["id"] = 5.into()).contains("id 5"));
    assert!(mutate(&|w| w["model"]["vocab"]["Ġ"] = 4_000_000_000u64.into()).contains("too large"));
    assert!(mutate(&|w| w["post_processor"] = serde_json::json!({"type": "TemplateProcessing"})).contains("post_processor"));
    v["model"]["vocab"].as_object_mut().unwrap().remove("Ġ");
    assert!(load_err(&v.to_string()).contains("byte-level token"));
}

#[test]
fn missing_file_is_not_found() {
    assert!(matches!(Tokenizer::from_file(Path::new("/nonexistent/tokenizer.json")), Err(Error::NotFound { .. })));
}
