"""Type stubs of the Rust extension module (src/py.rs)."""

from os import PathLike
from typing import Any, Callable, Iterator

__version__: str

# ---- Tokenizer ----

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
    def apply_chat_template(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
                            add_generation_prompt: bool = True, enable_thinking: bool | None = None) -> str:
        """Render with the checkpoint's own chat template, as transformers' apply_chat_template(tokenize=False)."""
    @property
    def has_chat_template(self) -> bool: ...

# ---- Model ----

class Stream(Iterator[tuple[int, str, str, list[int]]]):
    """(index, kind, text, token_ids) of a running generation."""

    def __next__(self) -> tuple[int, str, str, list[int]]: ...
    def outputs(self) -> list[dict[str, Any]]:
        """The finished generations, once the iterator is exhausted."""

class Model:
    @property
    def config_json(self) -> str: ...
    @property
    def device(self) -> str: ...
    @property
    def dtype(self) -> str: ...
    @property
    def max_seq_len(self) -> int: ...
    @property
    def eos_token_ids(self) -> list[int]: ...
    @property
    def tokenizer(self) -> Tokenizer | None: ...
    def logits(self, token_ids: list[int]) -> Any:
        """numpy float32 [len(token_ids), vocab_size]."""
    def open_session(self) -> int: ...
    def close_session(self, session: int) -> None: ...
    def session_len(self, session: int) -> int | None: ...
    def generate(self, prompts: list[list[int]], max_new_tokens: int, *, chat: bool = False, thinking: bool = False,
                 thinking_budget: int | None = None, temperature: float | None = None, top_k: int | None = None,
                 top_p: float | None = None, min_p: float | None = None, presence_penalty: float | None = None,
                 frequency_penalty: float | None = None, repetition_penalty: float | None = None, seed: int | None = None,
                 logprobs: int | None = None, stop: list[str] = ..., stop_token_ids: list[int] = ...,
                 session: int | None = None, stream: bool = False) -> list[dict[str, Any]] | Stream: ...

def load_checkpoint(path: str | PathLike[str], device: str = "cpu", dtype: str = "auto", max_seq_len: int | None = None,
                    max_batch: int = 8, tensor_parallel: int = 1, progress: Callable[[int, int], None] | None = None,
                    num_threads: int | None = None, quantize: str | None = None, expert_parallel: bool = False) -> Model: ...
def load_dummy(config_json: str, device: str = "cpu", dtype: str = "auto", max_seq_len: int | None = None,
               max_batch: int = 8, seed: int = 0, tokenizer_dir: str | None = None, tensor_parallel: int = 1,
               progress: Callable[[int, int], None] | None = None, num_threads: int | None = None,
               quantize: str | None = None, expert_parallel: bool = False) -> Model: ...

# ---- Devices ----

def cuda_available() -> bool: ...
def cpu_info() -> tuple[str, int]: ...
def cuda_unavailable_reason() -> str | None: ...
def cuda_device_count() -> int:
    """Usable CUDA GPUs (0 where none is); never raises."""
def _set_cuda_search_paths(lib_dirs: list[str], include_dirs: list[str]) -> None: ...
def _compile_cuda_kernels(arch: str = "sm_90") -> list[str]: ...
