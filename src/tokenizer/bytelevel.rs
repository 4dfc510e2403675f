//! The byte-level alphabet (GPT-2's `bytes_to_unicode`): each byte is shown as one printable
//! character, so vocab and merges in tokenizer.json are strings over these 256 characters.
//! The core works on raw bytes; this module converts token strings to and from them.

/// The character standing for each byte.
pub fn byte_to_char() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut extra = 0u32;
    for b in 0..256u32 {
        let printable = (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
        table[b as usize] = if printable {
            char::from_u32(b).unwrap_or('\0')
        } else {
            extra += 1;
            char::from_u32(255 + extra).unwrap_or('\0')
        };
    }
    table
}

/// Byte of a byte-level character, if it is one (they all lie below U+0144).
fn char_to_byte(c: char) -> Option<u8> {
    static TABLE: std::sync::OnceLock<[i16; 0x144]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [-1i16; 0x144];
        for (b, c) in byte_to_char().iter().enumerate() {
            t[*c as usize] = b as i16;
        }
        t
    });
    let v = *table.get(c as usize)?;
    u8::try_from(v).ok()
}

/// Bytes of a token string made only of byte-level characters; None if any character isn't one.
pub fn token_bytes(token: &str) -> Option<Vec<u8>> {
    token.chars().map(char_to_byte).collect()
}

/// The byte-level string of some bytes.
pub fn bytes_to_token(bytes: &[u8], table: &[char; 256]) -> String {
    bytes.iter().map(|&b| table[b as usize]).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alphabet_round_trips() {
        let t = byte_to_char();
        assert_eq!(t[b' ' as usize], 'Ġ');
        assert_eq!(t[b'\n' as usize], 'Ċ');
        assert_eq!(t[b'a' as usize], 'a');
        let all: Vec<u8> = (0..=255).collect();
        assert_eq!(token_bytes(&bytes_to_token(&all, &t)).unwrap(), all);
        assert_eq!(token_bytes("a b"), None); // a plain space is not in the alphabet
    }
}
