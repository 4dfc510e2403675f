//! Added tokens (`<|im_end|>`, `<think>`, ...): matched in the raw text before anything else, the
//! leftmost match first and the longest one at a position (HF uses Aho-Corasick, leftmost-longest).
//! Special or not makes no difference here; only decode's `skip_special_tokens` looks at it.

/// A run of the input: plain text to normalize and tokenize, or one added token.
#[derive(Debug, PartialEq, Eq)]
pub enum Segment<'a> {
    Text(&'a str),
    Token(u32),
}

pub struct AddedMatcher {
    /// Patterns grouped by first byte, longest first.
    by_first: Vec<Vec<(Box<[u8]>, u32)>>,
    /// The distinct first bytes, for a fast scan when there are few (Qwen: all start with '<').
    firsts: Vec<u8>,
}

impl AddedMatcher {
    /// `tokens`: (content, id), contents non-empty.
    pub fn new<'a>(tokens: impl IntoIterator<Item = (&'a str, u32)>) -> Self {
        let mut by_first: Vec<Vec<(Box<[u8]>, u32)>> = vec![Vec::new(); 256];
        for (content, id) in tokens {
            if let Some(&b) = content.as_bytes().first() {
                by_first[b as usize].push((content.as_bytes().into(), id));
            }
        }
        for group in &mut by_first {
            group.sort_by_key(|b| std::cmp::Reverse(b.0.len()));
            group.dedup_by(|a, b| a.0 == b.0);
        }
        let firsts = (0..=255u8).filter(|&b| !by_first[b as usize].is_empty()).collect();
        AddedMatcher { by_first, firsts }
    }

    /// Position of the next byte at or after `from` that could start a token.
    #[inline]
    fn next_candidate(&self, hay: &[u8], from: usize) -> Option<usize> {
        let rest = hay.get(from..)?;
        let found = match *self.firsts.as_slice() {
            [] => None,
            [a] => memchr::memchr(a, rest),
            [a, b] => memchr::memchr2(a, b, rest),
            [a, b, c] => memchr::memchr3(a, b, c, rest),
            _ => rest.iter().position(|&x| !self.by_first[x as usize].is_empty()),
        };
        found.map(|i| from + i)
    }

    /// The longest token matching at `pos`.
    #[inline]
    fn match_at(&self, hay: &[u8], pos: usize) -> Option<(usize, u32)> {
        let group = &self.by_first[*hay.get(pos)? as usize];
        group.iter().find(|(p, _)| hay[pos..].starts_with(p)).map(|(p, id)| (p.len(), *id))
    }

    /// Call `f` on the segments of `text` in order.
    pub fn split<'a>(&self, text: &'a str, mut f: impl FnMut(Segment<'a>)) {
        let hay = text.as_bytes();
        let (mut last, mut pos) = (0, 0);
        while let Some(at) = self.next_candidate(hay, pos) {
            match self.match_at(hay, at) {
                Some((len, id)) => {
                    // Tokens are whole UTF-8 strings, so `at` and `at + len` are char boundaries.
                    if at > last {
                        f(Segment::Text(&text[last..at]));
                    }
                    f(Segment::Token(id));
                    last = at + len;
                    pos = last;
                }
                None => pos = at + 1,
            }
        }
        if last < text.len() {
            f(Segment::Text(&text[last..]));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segments<'a>(m: &AddedMatcher, s: &'a str) -> Vec<Segment<'a>> {
        let mut v = vec![];
        m.split(s, |seg| v.push(seg));
        v
    }

    #[test]
    fn leftmost_longest() {
        let m = AddedMatcher::new([("<a>", 1), ("<a><b>", 2), ("<b>", 3), ("é!", 4)]);
        use Segment::*;
        assert_eq!(segments(&m, "x<a><b>y<b><<a>"), [Text("x"), Token(2), Text("y"), Token(3), Text("<"), Token(1)]);
        assert_eq!(segments(&m, "é!é"), [Token(4), Text("é")]);
        assert_eq!(segments(&m, ""), []);
        let none = AddedMatcher::new([]);
        assert_eq!(segments(&none, "<a>"), [Text("<a>")]);
    }
}
