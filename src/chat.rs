//! Chat formatting and output parsing. `ChatTemplate` renders the model's own Jinja `chat_template`
//! (from chat_template.jinja or tokenizer_config.json) with minijinja, configured like transformers'
//! `apply_chat_template` (trim_blocks, lstrip_blocks, Python string methods, a `json.dumps`-exact
//! `tojson`, `raise_exception`, special tokens in the context) so prompts are byte-identical to
//! transformers'. `split_thinking` and `parse_tool_calls` turn generated text back into
//! thinking / content / tool calls, using the same conventions the template uses to render history.

mod pyjson;

use crate::error::{Error, Result};
use crate::{bail, ensure};
use minijinja::value::{Kwargs, Rest, ValueKind};
use minijinja::{Environment, ErrorKind, Value};
use serde_json::Value as Json;
use std::path::Path;

pub use pyjson::{dumps as python_json_dumps, DumpOptions};

pub const THINK_START: &str = "<think>";
pub const THINK_END: &str = "</think>";
/// Forced into the output when the thinking budget runs out, closing the think block (Qwen's wording).
pub const BUDGET_EXHAUSTED_TEXT: &str =
    "\n\nConsidering the limited time by the user, I have to give the solution based on the thinking directly now.\n</think>\n\n";
pub const TOOL_CALL_START: &str = "<tool_call>";
pub const TOOL_CALL_END: &str = "</tool_call>";

const TEMPLATE_NAME: &str = "chat_template";

/// A compiled chat template plus the special tokens transformers passes to it.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").field("bos_token", &self.bos_token).field("eos_token", &self.eos_token).finish_non_exhaustive()
    }
}

/// Marks an error raised by the template's own `raise_exception(msg)`, so its message is reported
/// verbatim (transformers raises `TemplateError(msg)`), without minijinja's kind/location decoration.
#[derive(Debug)]
struct RaisedByTemplate;

impl std::fmt::Display for RaisedByTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("raised by the chat template")
    }
}

impl std::error::Error for RaisedByTemplate {}

impl ChatTemplate {
    /// Compile `source`. Syntax errors → `Error::Tokenizer` with minijinja's message and line.
    pub fn new(source: &str, bos_token: Option<String>, eos_token: Option<String>) -> Result<Self> {
        let mut env = Environment::new();
        // transformers: ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).
        let syntax = minijinja::syntax::SyntaxConfig::builder().trim_blocks(true).lstrip_blocks(true).build().map_err(template_error)?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.set_formatter(python_formatter);
        env.add_filter("tojson", tojson);
        env.add_function("raise_exception", raise_exception);
        env.add_template_owned(TEMPLATE_NAME, source.to_owned()).map_err(template_error)?;
        Ok(ChatTemplate { env, bos_token, eos_token })
    }

    /// The template a checkpoint/tokenizer folder ships: chat_template.jinja first, else the
    /// `chat_template` field of tokenizer_config.json; `None` when neither exists. Special tokens
    /// come from tokenizer_config.json when present.
    pub fn from_dir(dir: &Path) -> Result<Option<ChatTemplate>> {
        let config = read_tokenizer_config(dir)?;
        let jinja_path = dir.join("chat_template.jinja");
        let source = if jinja_path.is_file() {
            std::fs::read_to_string(&jinja_path).map_err(|e| Error::io(&jinja_path, e))?
        } else {
            match config.as_ref().and_then(|c| c.get("chat_template")) {
                Some(field) => template_from_config_field(field)?,
                None => return Ok(None),
            }
        };
        let token = |name: &str| config.as_ref().and_then(|c| special_token(c.get(name)?));
        Ok(Some(ChatTemplate::new(&source, token("bos_token"), token("eos_token"))?))
    }

    /// Render a conversation, as `tokenizer.apply_chat_template(messages, tools=tools,
    /// add_generation_prompt=..., enable_thinking=..., tokenize=False)` does. `enable_thinking: None`
    /// leaves the variable undefined (not passed), which templates treat differently from `false`.
    pub fn render(
        &self,
        messages: &Json,
        tools: Option<&Json>,
        add_generation_prompt: bool,
        enable_thinking: Option<bool>,
    ) -> Result<String> {
        validate_messages(messages)?;
        let mut ctx = serde_json::Map::new();
        ctx.insert("messages".into(), messages.clone());
        ctx.insert("tools".into(), tools.cloned().unwrap_or(Json::Null));
        ctx.insert("documents".into(), Json::Null);
        ctx.insert("add_generation_prompt".into(), Json::Bool(add_generation_prompt));
        if let Some(enable) = enable_thinking {
            ctx.insert("enable_thinking".into(), Json::Bool(enable));
        }
        // transformers passes only the special tokens that are set (special_tokens_map).
        for (name, token) in [("bos_token", &self.bos_token), ("eos_token", &self.eos_token)] {
            if let Some(t) = token {
                ctx.insert(name.into(), Json::String(t.clone()));
            }
        }
        let template = self.env.get_template(TEMPLATE_NAME).map_err(template_error)?;
        // serde_json (preserve_order) → minijinja keeps key order, which `tojson` output depends on.
        let ctx = <Value as serde::Deserialize>::deserialize(Json::Object(ctx))
            .map_err(|e| Error::InvalidArgument(format!("chat messages: {e}")))?;
        template.render(ctx).map_err(template_error)
    }

    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }

    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }
}

fn read_tokenizer_config(dir: &Path) -> Result<Option<Json>> {
    let path = dir.join("tokenizer_config.json");
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let value = serde_json::from_str(&text).map_err(|e| Error::Tokenizer(format!("{}: invalid JSON: {e}", path.display())))?;
    Ok(Some(value))
}

/// tokenizer_config.json's `chat_template` is a string, or a list of `{name, template}` of which
/// transformers uses the one named "default".
fn template_from_config_field(field: &Json) -> Result<String> {
    if let Some(s) = field.as_str() {
        return Ok(s.to_owned());
    }
    let named = field.as_array().and_then(|list| list.iter().find(|t| t.get("name").and_then(Json::as_str) == Some("default")));
    match named.and_then(|t| t.get("template")).and_then(Json::as_str) {
        Some(s) => Ok(s.to_owned()),
        None => bail!(Tokenizer, "tokenizer_config.json: chat_template must be a string or a list with a \"default\" entry"),
    }
}

/// A special token is stored as a string or as an AddedToken object `{"content": ...}`; null = unset.
fn special_token(value: &Json) -> Option<String> {
    match value {
        Json::String(s) => Some(s.clone()),
        Json::Object(o) => o.get("content").and_then(Json::as_str).map(str::to_owned),
        _ => None,
    }
}

/// Messages must be a list of objects, each with a string `role` and a `content` that is a string,
/// null or a list of parts (content may be absent on assistant messages that carry `tool_calls`).
fn validate_messages(messages: &Json) -> Result<()> {
    let Some(list) = messages.as_array() else {
        bail!(InvalidArgument, "messages must be a list of {{\"role\", \"content\"}} objects, got {}", json_kind(messages));
    };
    for (i, message) in list.iter().enumerate() {
        let Some(obj) = message.as_object() else {
            bail!(InvalidArgument, "messages[{i}] must be an object with \"role\" and \"content\", got {}", json_kind(message));
        };
        ensure!(obj.get("role").is_some_and(Json::is_string), InvalidArgument, "messages[{i}] needs a string \"role\"");
        match obj.get("content") {
            Some(Json::String(_) | Json::Null | Json::Array(_)) => {}
            None if obj.contains_key("tool_calls") => {}
            None => bail!(InvalidArgument, "messages[{i}] needs a \"content\""),
            Some(other) => bail!(InvalidArgument, "messages[{i}].content must be a string, null or a list, got {}", json_kind(other)),
        }
    }
    Ok(())
}

fn json_kind(v: &Json) -> &'static str {
    match v {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(_) => "a number",
        Json::String(_) => "a string",
        Json::Array(_) => "a list",
        Json::Object(_) => "an object",
    }
}

fn template_error(e: minijinja::Error) -> Error {
    let raised = std::error::Error::source(&e).is_some_and(|s| s.is::<RaisedByTemplate>());
    match (raised, e.detail()) {
        (true, Some(message)) => Error::Tokenizer(message.to_owned()),
        _ => Error::Tokenizer(format!("chat template: {e}")),
    }
}

/// `raise_exception(message)`, the helper transformers gives templates to reject bad input.
fn raise_exception(message: String) -> std::result::Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, message).with_source(RaisedByTemplate))
}

/// Print values the way Jinja2 (Python) does where minijinja differs: None, True, False.
fn python_formatter(out: &mut minijinja::Output, state: &mut minijinja::State, value: &Value) -> std::result::Result<(), minijinja::Error> {
    let python = match value.kind() {
        ValueKind::None => "None",
        ValueKind::Bool if value.is_true() => "True",
        ValueKind::Bool => "False",
        _ => return minijinja::escape_formatter(out, state, value),
    };
    out.write_str(python).map_err(|_| minijinja::Error::from(ErrorKind::WriteFailure))
}

/// transformers' `tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)`:
/// `json.dumps` with those arguments (positional in that order, or by keyword).
fn tojson(value: &Value, args: Rest<Value>, kwargs: Kwargs) -> std::result::Result<String, minijinja::Error> {
    let names = ["ensure_ascii", "indent", "separators", "sort_keys"];
    if args.len() > names.len() {
        return Err(minijinja::Error::new(ErrorKind::TooManyArguments, "tojson takes at most 4 arguments"));
    }
    let arg = |i: usize| -> std::result::Result<Option<Value>, minijinja::Error> {
        let by_kw: Option<Value> = kwargs.get(names[i])?;
        Ok(by_kw.or_else(|| args.get(i).cloned()).filter(|v| !v.is_none() && !v.is_undefined()))
    };
    let mut options = DumpOptions::default();
    if let Some(v) = arg(0)? {
        options.ensure_ascii = v.is_true();
    }
    if let Some(v) = arg(1)? {
        options.indent = Some(v.as_usize().ok_or_else(|| bad_arg("indent must be a non-negative integer"))?);
    }
    if let Some(v) = arg(2)? {
        let pair: Vec<String> = v.try_iter()?.map(|s| s.to_string()).collect();
        let [item, key] = <[String; 2]>::try_from(pair).map_err(|_| bad_arg("separators must be a pair of strings"))?;
        options.separators = Some((item, key));
    }
    if let Some(v) = arg(3)? {
        options.sort_keys = v.is_true();
    }
    kwargs.assert_all_used()?;
    let json = serde_json::to_value(value).map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    Ok(pyjson::dumps(&json, &options))
}

fn bad_arg(msg: &'static str) -> minijinja::Error {
    minijinja::Error::new(ErrorKind::InvalidOperation, msg)
}

/// Split generated text into `(thinking, content)` the way the Qwen3 template reads history back:
/// thinking is the text before the first `</think>` (after a leading `<think>`, if any) with
/// surrounding newlines stripped (`reasoning_content.strip('\n')`); content is what follows the
/// first `</think>`, with leading newlines stripped (`content.lstrip('\n')`). With thinking enabled
/// an unclosed block (no `</think>` yet: a truncated or still-running generation, or a model whose
/// prompt already opened `<think>`) is all thinking. With thinking disabled everything is content.
pub fn split_thinking(text: &str, thinking_enabled: bool) -> (String, String) {
    if !thinking_enabled {
        return (String::new(), text.to_owned());
    }
    let (reasoning, content) = match text.find(THINK_END) {
        Some(end) => (&text[..end], &text[end + THINK_END.len()..]),
        None => (text, ""),
    };
    // Same as the template's `.split('<think>')[-1]`: whatever precedes the opening tag (normally
    // nothing) is not reasoning.
    let reasoning = match reasoning.rfind(THINK_START) {
        Some(start) => &reasoning[start + THINK_START.len()..],
        None => reasoning,
    };
    (reasoning.trim_matches('\n').to_owned(), content.trim_start_matches('\n').to_owned())
}

/// One function call the model asked for.
#[derive(Clone, Debug, PartialEq)]
pub struct ToolCall {
    pub name: String,
    /// The arguments as JSON (an object for well-formed calls); `{}` when the call omits them.
    pub arguments: Json,
}

/// Extract `<tool_call>\n{"name": ..., "arguments": ...}\n</tool_call>` blocks (Hermes style, as the
/// Qwen3 template renders them) from `content`. Returns the remaining content and the calls in
/// order. A block whose body is not a JSON object with a string `name` (or an unclosed block) is
/// left in the content verbatim. When at least one call was extracted, the remaining content is
/// trimmed of surrounding whitespace (the template joins content and calls with newlines).
pub fn parse_tool_calls(content: &str) -> (String, Vec<ToolCall>) {
    let mut remaining = String::with_capacity(content.len());
    let mut calls = Vec::new();
    let mut rest = content;
    while let Some(start) = rest.find(TOOL_CALL_START) {
        let body_start = start + TOOL_CALL_START.len();
        let Some(body_len) = rest[body_start..].find(TOOL_CALL_END) else { break };
        let block_end = body_start + body_len + TOOL_CALL_END.len();
        match parse_call_body(&rest[body_start..body_start + body_len]) {
            Some(call) => {
                remaining.push_str(&rest[..start]);
                calls.push(call);
            }
            None => remaining.push_str(&rest[..block_end]),
        }
        rest = &rest[block_end..];
    }
    remaining.push_str(rest);
    if calls.is_empty() {
        return (remaining, calls);
    }
    (remaining.trim().to_owned(), calls)
}

fn parse_call_body(body: &str) -> Option<ToolCall> {
    let Json::Object(mut obj) = serde_json::from_str::<Json>(body.trim()).ok()? else { return None };
    let Some(Json::String(name)) = obj.remove("name") else { return None };
    let arguments = obj.remove("arguments").unwrap_or_else(|| Json::Object(Default::default()));
    Some(ToolCall { name, arguments })
}

#[cfg(test)]
mod tests;
