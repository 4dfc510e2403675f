"""Type stubs of the Rust extension module (src/py.rs)."""

__version__: str

# ---- Tokenizer ----

from os import PathLike

class Tokenizer:
    """Qwen3's byte-level BPE tokenizer (Rust core); ids identical to HF `tokenizers`."""

    @staticmethod
    def from_file(path: str | PathLike[str]) -> Tokenizer: ...
    @staticmethod
    def from_pretrained(dir: str | PathLike[str]) -> Tokenizer:
        """Load ``dir/tokenizer.json``."""
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]: ...
    def encode_batch(self, texts: list[str], add_special_tokens: bool = False) -> list[list[int]]:
        """Encode in parallel (rayon), GIL released."""
    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        """Raises InvalidArgumentError on an id not in the vocabulary."""
    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (151669 for Qwen3)."""
    def token_to_id(self, token: str) -> int | None: ...
    def id_to_token(self, id: int) -> str | None:
        """The token's string form (byte-level characters for vocab tokens)."""

# ---- Model ----
