//! Tests for chat templates (against transformers' renderings in tests/fixtures/tokenizer/chat.jsonl)
//! and for thinking / tool-call parsing.

use super::*;
use serde_json::json;
use std::path::PathBuf;

fn manifest() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn qwen3_template() -> ChatTemplate {
    ChatTemplate::from_dir(&manifest().join("python/qwen3rs/tokenizer"))
        .expect("bundled tokenizer folder loads")
        .expect("bundled tokenizer folder has a template")
}

#[test]
fn renders_every_fixture_exactly_like_transformers() {
    let template = qwen3_template();
    let text = std::fs::read_to_string(manifest().join("tests/fixtures/tokenizer/chat.jsonl")).unwrap();
    let mut checked = 0;
    for (line_no, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let case: Json = serde_json::from_str(line).unwrap();
        let tools = case.get("tools").filter(|t| !t.is_null());
        let rendered = template
            .render(&case["messages"], tools, case["add_generation_prompt"].as_bool().unwrap(), case["enable_thinking"].as_bool())
            .unwrap_or_else(|e| panic!("line {}: {e}", line_no + 1));
        assert_eq!(rendered, case["text"].as_str().unwrap(), "line {}", line_no + 1);
        checked += 1;
    }
    assert_eq!(checked, 48);
}

#[test]
fn jsonl_field_and_jinja_file_give_the_same_template() {
    let dir = manifest().join("python/qwen3rs/tokenizer");
    let config: Json = serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer_config.json")).unwrap()).unwrap();
    let from_field = ChatTemplate::new(config["chat_template"].as_str().unwrap(), None, Some("<|im_end|>".into())).unwrap();
    let messages = json!([{"role": "system", "content": "S"}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "<think>\nr\n</think>\n\nanswer"}, {"role": "user", "content": "again"}]);
    assert_eq!(
        from_field.render(&messages, None, true, Some(false)).unwrap(),
        qwen3_template().render(&messages, None, true, Some(false)).unwrap()
    );
    assert_eq!(qwen3_template().eos_token(), Some("<|im_end|>"));
    assert_eq!(qwen3_template().bos_token(), None);
}

#[test]
fn from_dir_without_template_is_none() {
    let dir = std::env::temp_dir().join(format!("qwen3rs-chat-empty-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    assert!(ChatTemplate::from_dir(&dir).unwrap().is_none());
    std::fs::write(dir.join("tokenizer_config.json"), r#"{"eos_token": {"content": "<e>"}}"#).unwrap();
    assert!(ChatTemplate::from_dir(&dir).unwrap().is_none());
    std::fs::write(dir.join("tokenizer_config.json"),
        r#"{"eos_token": {"content": "<e>"}, "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D{{ eos_token }}"}]}"#).unwrap();
    let t = ChatTemplate::from_dir(&dir).unwrap().unwrap();
    assert_eq!(t.render(&json!([]), None, false, None).unwrap(), "D<e>");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn tojson_matches_python_json_dumps() {
    // Expected strings are CPython's json.dumps(x, ensure_ascii=False[, ...]) for the same input.
    let t = ChatTemplate::new(
        "{{ messages[0].content | tojson }}|{{ tools | tojson }}|{{ tools | tojson(indent=2) }}|{{ tools | tojson(sort_keys=true) }}",
        None,
        None,
    )
    .unwrap();
    let tools = json!({"b": "é<&>'\"", "a": [1, 2.0, null, true]});
    let out = t.render(&json!([{"role": "user", "content": "x\ny"}]), Some(&tools), false, None).unwrap();
    assert_eq!(
        out,
        concat!(
            r#""x\ny"|{"b": "é<&>'\"", "a": [1, 2.0, null, true]}|"#,
            "{\n  \"b\": \"é<&>'\\\"\",\n  \"a\": [\n    1,\n    2.0,\n    null,\n    true\n  ]\n}|",
            r#"{"a": [1, 2.0, null, true], "b": "é<&>'\""}"#
        )
    );
}

#[test]
fn python_printing_and_string_methods() {
    let t = ChatTemplate::new(
        "{{ documents }} {{ add_generation_prompt }} {{ not add_generation_prompt }} {{ 'a,b'.split(',')[1] }} {{ '\\n x \\n'.strip() }} {{ 'xxa'.lstrip('x') }}",
        None, None).unwrap();
    assert_eq!(t.render(&json!([]), None, true, None).unwrap(), "None True False b x a");
}

#[test]
fn enable_thinking_none_is_undefined() {
    let t = ChatTemplate::new("{{ enable_thinking is defined }}-{{ tools is none }}", None, None).unwrap();
    assert_eq!(t.render(&json!([]), None, false, None).unwrap(), "False-True");
    assert_eq!(t.render(&json!([]), None, false, Some(false)).unwrap(), "True-True");
}

#[test]
fn template_errors_are_tokenizer_errors() {
    match ChatTemplate::new("{% for x in %}", None, None) {
        Err(Error::Tokenizer(m)) => assert!(m.contains("syntax error"), "{m}"),
        other => panic!("expected a syntax error, got {other:?}"),
    }
    let t = ChatTemplate::new("{% if messages|length == 0 %}{{ raise_exception('Need at least one message!') }}{% endif %}ok", None, None)
        .unwrap();
    match t.render(&json!([]), None, false, None) {
        Err(Error::Tokenizer(m)) => assert_eq!(m, "Need at least one message!"),
        other => panic!("expected the template's exception, got {other:?}"),
    }
    assert_eq!(t.render(&json!([{"role": "user", "content": "x"}]), None, false, None).unwrap(), "ok");
    // Qwen3's template indexes messages[0]: an empty conversation is an error, not a panic.
    assert!(matches!(qwen3_template().render(&json!([]), None, true, None), Err(Error::Tokenizer(_))));
}

#[test]
fn malformed_messages_are_invalid_arguments() {
    let t = qwen3_template();
    let bad = [
        json!({"role": "user", "content": "x"}),
        json!("hello"),
        json!([1]),
        json!([{"content": "x"}]),
        json!([{"role": 3, "content": "x"}]),
        json!([{"role": "user"}]),
        json!([{"role": "user", "content": 5}]),
    ];
    for messages in bad {
        assert!(matches!(t.render(&messages, None, true, None), Err(Error::InvalidArgument(_))), "{messages}");
    }
    // An assistant turn that only calls tools needs no content. (Being the last turn after the
    // last user query, the template gives it an empty think block.)
    let ok = json!([{"role": "user", "content": "w?"},
        {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": {"x": 1}}}]}]);
    assert_eq!(t.render(&ok, None, false, None).unwrap(),
        "<|im_start|>user\nw?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n<tool_call>\n{\"name\": \"f\", \"arguments\": {\"x\": 1}}\n</tool_call><|im_end|>\n");
}

#[test]
fn split_thinking_cases() {
    let s = |t: &str, on: bool| {
        let (a, b) = split_thinking(t, on);
        (a.to_owned(), b.to_owned())
    };
    let pair = |a: &str, b: &str| (a.to_owned(), b.to_owned());
    // The usual thinking-mode output.
    assert_eq!(s("<think>\nLet me see.\n2+2=4.\n</think>\n\nIt is 4.", true), pair("Let me see.\n2+2=4.", "It is 4."));
    // Soft /no_think: an empty think block.
    assert_eq!(s("<think>\n\n</think>\n\nIt is 4.", true), pair("", "It is 4."));
    // Prompt already opened <think> (Thinking-2507 models): no opening tag in the output.
    assert_eq!(s("reasoning\n</think>\n\nanswer", true), pair("reasoning", "answer"));
    // Unclosed (truncated / budget-limited) block: all thinking.
    assert_eq!(s("<think>\nstill going", true), pair("still going", ""));
    assert_eq!(s("no tags at all", true), pair("no tags at all", ""));
    // Thinking disabled: verbatim content, tags and all.
    assert_eq!(s("plain answer", false), pair("", "plain answer"));
    assert_eq!(s("<think>\nx\n</think>\n\ny", false), pair("", "<think>\nx\n</think>\n\ny"));
    // Only newlines are stripped (as the template does), not other whitespace; a later </think> stays in content.
    assert_eq!(s("<think>\n  a  \n</think>\n  b </think> c", true), pair("  a  ", "  b </think> c"));
    assert_eq!(s("", true), pair("", ""));
}

#[test]
fn split_thinking_inverts_the_template_history_rendering() {
    // The template renders the last assistant turn as <think>\n{reasoning}\n</think>\n\n{content}.
    let t = qwen3_template();
    let messages = json!([{"role": "user", "content": "q"},
        {"role": "assistant", "content": "A.", "reasoning_content": "R1\nR2"}]);
    let rendered = t.render(&messages, None, false, None).unwrap();
    let generated = rendered.split("<|im_start|>assistant\n").nth(1).unwrap().trim_end_matches("<|im_end|>\n");
    let (thinking, content) = split_thinking(generated, true);
    assert_eq!((thinking.as_str(), content.as_str()), ("R1\nR2", "A."));
}

#[test]
fn budget_text_closes_the_think_block() {
    let generated = format!("<think>\nlong reasoning{BUDGET_EXHAUSTED_TEXT}Final.");
    let (thinking, content) = split_thinking(&generated, true);
    assert_eq!(
        thinking,
        "long reasoning\n\nConsidering the limited time by the user, I have to give the solution based on the thinking directly now."
    );
    assert_eq!(content, "Final.");
}

#[test]
fn parse_tool_calls_cases() {
    // Two calls after some text, as the template renders them.
    let text = "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"get_time\", \"arguments\": {\"tz\": \"CET\", \"n\": [1, 2]}}\n</tool_call>";
    let (content, calls) = parse_tool_calls(text);
    assert_eq!(content, "Let me check.");
    assert_eq!(
        calls,
        vec![
            ToolCall { name: "get_weather".into(), arguments: json!({"city": "Paris"}) },
            ToolCall { name: "get_time".into(), arguments: json!({"tz": "CET", "n": [1, 2]}) },
        ]
    );

    // Only a call: empty content; missing arguments → {}.
    let (content, calls) = parse_tool_calls("<tool_call>\n{\"name\": \"now\"}\n</tool_call>");
    assert_eq!(content, "");
    assert_eq!(calls, vec![ToolCall { name: "now".into(), arguments: json!({}) }]);

    // No calls: content untouched (whitespace included).
    assert_eq!(parse_tool_calls("  just text\n"), ("  just text\n".to_owned(), vec![]));
}

#[test]
fn invalid_tool_calls_stay_in_content() {
    let bad = "<tool_call>\n{\"name\": \"f\", \"arguments\": {oops}\n</tool_call>";
    assert_eq!(parse_tool_calls(bad), (bad.to_owned(), vec![]));
    let no_name = "<tool_call>\n{\"arguments\": {}}\n</tool_call>";
    assert_eq!(parse_tool_calls(no_name), (no_name.to_owned(), vec![]));
    let not_object = "<tool_call>\n[1, 2]\n</tool_call>";
    assert_eq!(parse_tool_calls(not_object), (not_object.to_owned(), vec![]));
    let unclosed = "<tool_call>\n{\"name\": \"f\", \"arguments\": {}}";
    assert_eq!(parse_tool_calls(unclosed), (unclosed.to_owned(), vec![]));

    // A good call next to a bad one: the good one is extracted, the bad one kept verbatim.
    let mixed = format!("{bad}\n<tool_call>\n{{\"name\": \"g\", \"arguments\": {{\"a\": 1}}}}\n</tool_call>");
    let (content, calls) = parse_tool_calls(&mixed);
    assert_eq!(content, bad);
    assert_eq!(calls, vec![ToolCall { name: "g".into(), arguments: json!({"a": 1}) }]);
}

#[test]
fn parsing_never_panics_on_odd_text() {
    for text in [
        "</think><think>",
        "<think>",
        "</think>",
        "<tool_call></tool_call>",
        "<tool_call>",
        "</tool_call><tool_call>",
        "é</think>中",
        "<tool_call>\u{0}</tool_call>",
    ] {
        for on in [true, false] {
            let _ = split_thinking(text, on);
        }
        let _ = parse_tool_calls(text);
    }
}
