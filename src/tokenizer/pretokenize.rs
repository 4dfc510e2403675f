//! Qwen's pre-tokenizer: the split pattern of its tokenizer.json, hand-written as a state machine
//! (a regex engine with lookahead is ~10x slower and the pattern is fixed). It must agree exactly
//! with the pattern as HF `tokenizers` runs it (Oniguruma, leftmost-first alternation):
//!
//! ```text
//! (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
//! ```
//!
//! Every character is matched by some alternative, so the "Isolated" split is just the sequence of
//! matches. Each match is found in time linear in its length, so a whole text splits in linear time.

use super::unicode_tables::{BLOCKS, BLOCK_INDEX};

/// The exact pattern string this module implements; any other pattern is refused at load time.
pub const QWEN_PATTERN: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

const LETTER: u8 = 1;
const NUMBER: u8 = 2;
const SPACE: u8 = 4;

/// The class bits (\p{L}, \p{N}, \s) of one character, as the regex engine defines them.
#[inline]
fn class(c: char) -> u8 {
    let c = c as usize;
    BLOCKS[BLOCK_INDEX[c >> 8] as usize][c & 0xFF]
}

/// The pieces of `text`, in order; their concatenation is `text`.
pub fn pieces(text: &str) -> Pieces<'_> {
    Pieces { text, pos: 0 }
}

pub struct Pieces<'a> {
    text: &'a str,
    pos: usize,
}

impl<'a> Iterator for Pieces<'a> {
    type Item = &'a str;

    #[inline]
    fn next(&mut self) -> Option<&'a str> {
        if self.pos >= self.text.len() {
            return None;
        }
        let start = self.pos;
        let end = match_at(self.text, start);
        self.pos = end;
        Some(&self.text[start..end])
    }
}

/// The character starting at byte `pos` (a char boundary) and the position after it.
#[inline]
fn char_at(text: &str, pos: usize) -> Option<(char, usize)> {
    let b = *text.as_bytes().get(pos)?;
    if b < 0x80 {
        return Some((b as char, pos + 1));
    }
    let c = text[pos..].chars().next()?;
    Some((c, pos + c.len_utf8()))
}

/// Advance over characters whose class satisfies `keep`.
#[inline]
fn skip_while(text: &str, mut pos: usize, keep: impl Fn(char, u8) -> bool) -> usize {
    while let Some((c, next)) = char_at(text, pos) {
        if !keep(c, class(c)) {
            break;
        }
        pos = next;
    }
    pos
}

#[inline]
fn is_other(cls: u8) -> bool {
    cls == 0
}

#[inline]
fn is_crlf(c: char) -> bool {
    c == '\r' || c == '\n'
}

/// End of the match starting at `start` (always > start).
#[inline]
fn match_at(text: &str, start: usize) -> usize {
    let Some((c0, p1)) = char_at(text, start) else { return text.len() };
    let cls0 = class(c0);
    let next = char_at(text, p1);
    // (?i:'s|'t|'re|'ve|'m|'ll|'d)
    if c0 == '\'' {
        if let Some(end) = contraction(text, p1) {
            return end;
        }
    }
    // [^\r\n\p{L}\p{N}]?\p{L}+
    if cls0 & LETTER != 0 {
        return skip_while(text, p1, |_, k| k & LETTER != 0);
    }
    if cls0 & NUMBER == 0 && !is_crlf(c0) {
        if let Some((_, p2)) = next.filter(|&(c1, _)| class(c1) & LETTER != 0) {
            return skip_while(text, p2, |_, k| k & LETTER != 0);
        }
    }
    // \p{N}
    if cls0 & NUMBER != 0 {
        return p1;
    }
    // ' ?[^\s\p{L}\p{N}]+[\r\n]*'
    let others_from = if is_other(cls0) {
        Some(p1)
    } else if c0 == ' ' {
        next.filter(|&(c1, _)| is_other(class(c1))).map(|(_, p2)| p2)
    } else {
        None
    };
    if let Some(p) = others_from {
        let end = skip_while(text, p, |_, k| is_other(k));
        return skip_while(text, end, |c, _| is_crlf(c));
    }
    // c0 is whitespace here: every other character took a branch above.
    whitespace_match(text, start)
}

/// `'s|'t|'re|'ve|'m|'ll|'d`, case-insensitive as the regex engine folds case (simple Unicode
/// folding: only U+017F LONG S folds onto one of these letters besides their ASCII cases).
/// `pos` is just after the apostrophe.
#[inline]
fn contraction(text: &str, pos: usize) -> Option<usize> {
    let (c1, p2) = char_at(text, pos)?;
    match c1 {
        's' | 'S' | '\u{17F}' | 't' | 'T' | 'm' | 'M' | 'd' | 'D' => Some(p2),
        'r' | 'R' | 'v' | 'V' | 'l' | 'L' => {
            let want = if matches!(c1, 'l' | 'L') { 'l' } else { 'e' };
            let (c2, p3) = char_at(text, p2)?;
            (c2.to_ascii_lowercase() == want && c2.is_ascii()).then_some(p3)
        }
        _ => None,
    }
}

/// `\s*[\r\n]+|\s+(?!\S)|\s+` at a whitespace character.
fn whitespace_match(text: &str, start: usize) -> usize {
    let mut pos = start;
    let mut last_crlf_end = None; // end of the last \r or \n in the run
    let mut last_start = start; // start of the run's last character
    let mut count = 0usize;
    while let Some((c, next)) = char_at(text, pos) {
        if class(c) & SPACE == 0 {
            break;
        }
        if is_crlf(c) {
            last_crlf_end = Some(next);
        }
        last_start = pos;
        pos = next;
        count += 1;
    }
    if let Some(end) = last_crlf_end {
        // \s* backtracks to the last line break, [\r\n]+ takes it.
        return end;
    }
    if pos == text.len() || count < 2 {
        // \s+(?!\S) at the end of text, or \s+ on a single whitespace before a non-space.
        return pos;
    }
    // \s+(?!\S): give back the last whitespace so that what follows the match is a space.
    last_start
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(s: &str) -> Vec<&str> {
        pieces(s).collect()
    }

    #[test]
    fn classes_from_table() {
        assert_eq!(class('a'), LETTER);
        assert_eq!(class('é'), LETTER);
        assert_eq!(class('中'), LETTER);
        assert_eq!(class('7'), NUMBER);
        assert_eq!(class('½'), NUMBER);
        assert_eq!(class(' '), SPACE);
        assert_eq!(class('\u{85}'), SPACE);
        assert_eq!(class('\u{3000}'), SPACE);
        assert_eq!(class('\u{1C}'), 0); // Python's isspace() says yes; \s says no
        assert_eq!(class('!'), 0);
        assert_eq!(class('\u{10FFFF}'), 0);
    }

    #[test]
    fn splits_like_the_pattern() {
        // Expected splits checked against HF tokenizers' Split pre-tokenizer.
        assert_eq!(split("a\r\n \r\n  b"), ["a", "\r\n \r\n", " ", " b"]);
        assert_eq!(split(" \n x"), [" \n", " x"]);
        assert_eq!(split("a\u{85}\u{85}b"), ["a", "\u{85}", "\u{85}b"]);
        assert_eq!(split("  !!\n\n"), [" ", " !!\n\n"]);
        assert_eq!(split(" \u{3000}x"), [" ", "\u{3000}x"]);
        assert_eq!(split("'ſx 'Sx 'ſT"), ["'ſ", "x", " '", "Sx", " '", "ſT"]);
        assert_eq!(split("I'M can't we'LL 're"), ["I", "'M", " can", "'t", " we", "'LL", " '", "re"]);
        assert_eq!(split("x=1;y=22"), ["x", "=", "1", ";y", "=", "2", "2"]);
        assert_eq!(split("trailing   "), ["trailing", "   "]);
        assert_eq!(split("\t\t x"), ["\t\t", " x"]);
        assert_eq!(split(""), Vec::<&str>::new());
    }

    #[test]
    fn pieces_cover_text() {
        let s = "Hé said: 'hello'!\r\n\r\n  12 ½ 👍👍 \u{a0}x  ";
        assert_eq!(split(s).concat(), s);
    }
}
