//! JSON text exactly as Python's `json.dumps` writes it, for the chat template's `tojson` filter.
//! transformers renders chat templates with `tojson = json.dumps(x, ensure_ascii=False, indent=...,
//! separators=..., sort_keys=...)`, so tool schemas in a prompt are `{"a": 1, "b": [1, 2]}` (spaces
//! after separators, insertion order, raw non-ASCII). minijinja's own `tojson` is compact-ish and
//! HTML-escapes `<>&'`, which would change the prompt the model sees; this writer reproduces Python.

use serde_json::{Map, Value};
use std::fmt::Write;

/// The `json.dumps` options transformers' `tojson` forwards.
#[derive(Clone, Debug, Default)]
pub struct DumpOptions {
    pub ensure_ascii: bool,
    /// Spaces per level; `None` = everything on one line.
    pub indent: Option<usize>,
    /// (item separator, key separator); Python's default depends on `indent`.
    pub separators: Option<(String, String)>,
    pub sort_keys: bool,
}

/// `json.dumps(value, **options)`.
pub fn dumps(value: &Value, options: &DumpOptions) -> String {
    // Python: with an indent the item separator loses its trailing space (the newline replaces it).
    let (item_sep, key_sep) = match &options.separators {
        Some((i, k)) => (i.as_str(), k.as_str()),
        None if options.indent.is_some() => (",", ": "),
        None => (", ", ": "),
    };
    let mut w = Writer { out: String::new(), options, item_sep, key_sep };
    w.value(value, 0);
    w.out
}

struct Writer<'a> {
    out: String,
    options: &'a DumpOptions,
    item_sep: &'a str,
    key_sep: &'a str,
}

impl Writer<'_> {
    fn value(&mut self, value: &Value, depth: usize) {
        match value {
            Value::Null => self.out.push_str("null"),
            Value::Bool(b) => self.out.push_str(if *b { "true" } else { "false" }),
            Value::Number(n) => write_number(&mut self.out, n),
            Value::String(s) => write_string(&mut self.out, s, self.options.ensure_ascii),
            Value::Array(items) => {
                if items.is_empty() {
                    self.out.push_str("[]");
                    return;
                }
                self.out.push('[');
                for (i, item) in items.iter().enumerate() {
                    self.separator(i == 0, depth + 1);
                    self.value(item, depth + 1);
                }
                self.close(']', depth);
            }
            Value::Object(map) => self.object(map, depth),
        }
    }

    fn object(&mut self, map: &Map<String, Value>, depth: usize) {
        if map.is_empty() {
            self.out.push_str("{}");
            return;
        }
        let mut entries: Vec<(&String, &Value)> = map.iter().collect();
        if self.options.sort_keys {
            // Python sorts str keys by code point, which is the byte order of UTF-8.
            entries.sort_by(|a, b| a.0.cmp(b.0));
        }
        self.out.push('{');
        for (i, (key, item)) in entries.into_iter().enumerate() {
            self.separator(i == 0, depth + 1);
            write_string(&mut self.out, key, self.options.ensure_ascii);
            self.out.push_str(self.key_sep);
            self.value(item, depth + 1);
        }
        self.close('}', depth);
    }

    /// What goes before an item: the item separator (except first), then a newline + indent.
    fn separator(&mut self, first: bool, depth: usize) {
        if !first {
            self.out.push_str(self.item_sep);
        }
        self.newline(depth);
    }

    fn close(&mut self, bracket: char, depth: usize) {
        self.newline(depth);
        self.out.push(bracket);
    }

    fn newline(&mut self, depth: usize) {
        if let Some(indent) = self.options.indent {
            self.out.push('\n');
            self.out.extend(std::iter::repeat_n(' ', indent * depth));
        }
    }
}

fn write_number(out: &mut String, n: &serde_json::Number) {
    if let Some(f) = n.as_f64().filter(|_| n.is_f64()) {
        out.push_str(&python_float_repr(f));
    } else {
        let _ = write!(out, "{n}");
    }
}

/// Python's `float.__repr__` (as json.dumps uses): shortest round-trip digits, fixed notation for
/// decimal exponents in [-4, 16), otherwise `d.ddde+XX` with at least two exponent digits.
pub fn python_float_repr(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity".into() } else { "-Infinity".into() };
    }
    // Rust's `{:e}` gives the same shortest round-trip digits as Python's repr: "-1.2345e-7".
    let sci = format!("{f:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| c.is_ascii_digit()).collect();
    if (-4..16).contains(&exp) {
        format!("{sign}{}", fixed_notation(&digits, exp))
    } else {
        let (head, tail) = digits.split_at(1);
        let frac = if tail.is_empty() { String::new() } else { format!(".{tail}") };
        let esign = if exp < 0 { '-' } else { '+' };
        format!("{sign}{head}{frac}e{esign}{:02}", exp.abs())
    }
}

/// Digits d1d2d3… with value d1.d2d3… × 10^exp written without exponent, always with a fraction.
fn fixed_notation(digits: &str, exp: i32) -> String {
    if exp < 0 {
        let zeros = "0".repeat((-exp - 1) as usize);
        return format!("0.{zeros}{digits}");
    }
    let int_len = exp as usize + 1;
    if digits.len() <= int_len {
        format!("{digits}{}.0", "0".repeat(int_len - digits.len()))
    } else {
        format!("{}.{}", &digits[..int_len], &digits[int_len..])
    }
}

/// A JSON string literal the way Python escapes it: `\" \\ \n \r \t \b \f`, other control
/// characters as `\u00xx` (lowercase hex); non-ASCII raw unless `ensure_ascii`.
fn write_string(out: &mut String, s: &str, ensure_ascii: bool) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c if ensure_ascii && !c.is_ascii() => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn default_separators_and_order() {
        // Expected strings are what CPython 3 prints for json.dumps(..., ensure_ascii=False).
        let v: Value = serde_json::from_str(r#"{"z": 1, "a": [1, 2.5, {}], "b": [], "c": null, "d": true}"#).unwrap();
        assert_eq!(dumps(&v, &DumpOptions::default()), r#"{"z": 1, "a": [1, 2.5, {}], "b": [], "c": null, "d": true}"#);
        let sorted = DumpOptions { sort_keys: true, ..Default::default() };
        assert_eq!(dumps(&v, &sorted), r#"{"a": [1, 2.5, {}], "b": [], "c": null, "d": true, "z": 1}"#);
    }

    #[test]
    fn indent_and_custom_separators() {
        let v = json!({"a": [1, 2], "b": {}});
        let indented = DumpOptions { indent: Some(2), ..Default::default() };
        assert_eq!(dumps(&v, &indented), "{\n  \"a\": [\n    1,\n    2\n  ],\n  \"b\": {}\n}");
        let compact = DumpOptions { separators: Some((",".into(), ":".into())), ..Default::default() };
        assert_eq!(dumps(&v, &compact), r#"{"a":[1,2],"b":{}}"#);
    }

    #[test]
    fn string_escapes() {
        let v = json!("q\"b\\n\n r\r t\t b\u{08} f\u{0c} x\u{01} \u{7f} <>&' é 中 😀");
        assert_eq!(dumps(&v, &DumpOptions::default()), "\"q\\\"b\\\\n\\n r\\r t\\t b\\b f\\f x\\u0001 \u{7f} <>&' é 中 😀\"");
        let ascii = DumpOptions { ensure_ascii: true, ..Default::default() };
        assert_eq!(dumps(&json!("é中😀"), &ascii), r#""\u00e9\u4e2d\ud83d\ude00""#);
    }

    #[test]
    fn floats_like_python_repr() {
        // (value, repr(value)) pairs taken from CPython.
        let cases = [
            (1.0, "1.0"),
            (0.1, "0.1"),
            (-2.5, "-2.5"),
            (100.0, "100.0"),
            (1e15, "1000000000000000.0"),
            (1e16, "1e+16"),
            (1.5e16, "1.5e+16"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (1.25e-7, "1.25e-07"),
            (1e100, "1e+100"),
            (123456.789, "123456.789"),
            (0.0, "0.0"),
            (-0.0, "-0.0"),
            (f64::NAN, "NaN"),
            (f64::INFINITY, "Infinity"),
            (f64::NEG_INFINITY, "-Infinity"),
        ];
        for (f, want) in cases {
            assert_eq!(python_float_repr(f), want, "{f}");
        }
        assert_eq!(dumps(&json!([1, -3, 2.0, 1e20]), &DumpOptions::default()), "[1, -3, 2.0, 1e+20]");
    }
}
