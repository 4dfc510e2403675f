//! Byte-level BPE tokenizer loaded from tokenizer.json. (Being written.)
