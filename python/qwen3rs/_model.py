"""`load()` and `Model`: resolve a checkpoint (folder, hub id or dummy spec), build the native engine,
and turn keyword arguments into native calls. Everything per token happens in Rust."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from . import _native
from .errors import CheckpointNotFoundError, InvalidArgumentError

_PACKAGE_DIR = Path(__file__).resolve().parent
CONFIGS_DIR = _PACKAGE_DIR / "configs"
BUNDLED_TOKENIZER_DIR = _PACKAGE_DIR / "tokenizer"


def dummy_names() -> list[str]:
    """The model names `load("dummy:NAME")` accepts (the official Qwen3 configs bundled here)."""
    return sorted(p.stem for p in CONFIGS_DIR.glob("*.json"))


class _ProgressBar:
    """A one-line progress bar on stderr (shown only when stderr is a terminal)."""

    def __init__(self, label: str, enabled: bool):
        self.label = label
        self.enabled = enabled and sys.stderr.isatty()

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        width = 30
        filled = width * done // max(total, 1)
        sys.stderr.write(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}")
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def check_int(name: str, value: Any, minimum: int, allow_none: bool = True) -> None:
    """An int argument (bool excluded) of at least `minimum`, or None where allowed."""
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise InvalidArgumentError(f"{name} must be an int >= {minimum}{' or None' if allow_none else ''}, got {value!r}")


def _resolve_path(path: str | os.PathLike) -> Path:
    p = Path(path).expanduser()
    if p.exists():
        if not p.is_dir():
            raise CheckpointNotFoundError(f"checkpoint must be a folder with config.json and *.safetensors, got a file: {p}")
        return p
    text = str(path)
    looks_like_repo = text.count("/") == 1 and not text.startswith((".", "/", "~"))
    if looks_like_repo:
        try:
            from huggingface_hub import snapshot_download  # optional dependency
        except ImportError:
            raise CheckpointNotFoundError(
                f"{text!r} is not a local folder; to fetch it from the Hugging Face Hub install huggingface_hub "
                "(pip install 'qwen3rs[hub]')"
            ) from None
        patterns = ["*.json", "*.safetensors", "*.jinja", "merges.txt", "vocab.json"]
        try:
            return Path(snapshot_download(text, allow_patterns=patterns))
        except Exception as e:  # network, auth, missing repo: all mean "not found" to the caller
            raise CheckpointNotFoundError(f"could not fetch {text!r} from the Hugging Face Hub: {e}") from e
    raise CheckpointNotFoundError(f"checkpoint folder not found: {p}")


def _read_generation_config(folder: Path) -> dict[str, Any]:
    path = folder / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # optional file: a broken one only loses sampling defaults


def load(
    path: str | os.PathLike,
    device: str = "auto",
    dtype: str = "auto",
    max_seq_len: int | None = None,
    seed: int = 0,
    progress: bool = True,
    max_batch: int = 8,
    tensor_parallel: int = 1,
    num_threads: int | None = None,
    quantize: str | None = None,
    expert_parallel: bool = False,
) -> "Model":
    """Load a Qwen3 / Qwen3-MoE model.

    path: a checkpoint folder (config.json + *.safetensors [+ tokenizer files]); a Hugging Face repo id
    (fetched with huggingface_hub when installed); or "dummy:Qwen3-0.6B" (any bundled official size, or
    "dummy:/path/config.json"): random weights of that shape with the bundled Qwen3 tokenizer.
    device: "auto" | "cpu" | "cuda" | "cuda:N". dtype: "auto" (as stored) | "bfloat16" | "float16" | "float32".
    max_seq_len: KV-cache capacity per sequence (default min(max_position_embeddings, 32768)).
    max_batch: sequences generated at once (KV-cache blocks are committed lazily on the CPU).
    progress: a progress bar on stderr while loading (when stderr is a terminal).
    tensor_parallel: split the model over this many devices (cuda:0..N-1): attention by heads, MLPs and
    every expert by columns, partial sums all-reduced with NCCL. With device="cpu", N ranks in one
    process stand in for the GPUs (to check the sharding; not faster).
    expert_parallel: with tensor_parallel=N >= 2 on a MoE model, each device holds N-th of the experts
    whole (rank r: experts [r*E/N, (r+1)*E/N), loading only their tensors) instead of N-th of every
    expert's columns; attention and dense MLPs stay split as above. Every rank routes every token
    over all E experts (the router is replicated), computes only its own experts' contributions, and
    the MoE block's all-reduce sums them (every rank holds every token, so that sum is the combine).
    Needs num_experts divisible by N. An error with tensor_parallel=1 (one device holds every expert
    anyway) and on a dense model (no experts to spread: the flag would silently do nothing).
    num_threads (CPU): worker threads (default: env QWEN3RS_NUM_THREADS, else every CPU this process may use).
    quantize (CPU): "int8" stores weight matrices as int8 with one scale per output row (weight-only:
    activations stay in `dtype`; norms and the MoE router stay unquantised)."""
    if not isinstance(device, str):
        raise InvalidArgumentError(f"device must be a string, got {device!r}")
    if not isinstance(dtype, str):
        raise InvalidArgumentError(f"dtype must be a string, got {dtype!r}")
    check_int("max_seq_len", max_seq_len, 1)
    check_int("max_batch", max_batch, 1, allow_none=False)
    check_int("tensor_parallel", tensor_parallel, 1, allow_none=False)
    if not isinstance(expert_parallel, bool):
        raise InvalidArgumentError(f"expert_parallel must be True or False, got {expert_parallel!r}")
    check_int("num_threads", num_threads, 1)
    if quantize is not None and not isinstance(quantize, str):
        raise InvalidArgumentError(f"quantize must be a string or None, got {quantize!r}")
    cpu = {"num_threads": num_threads, "quantize": quantize, "expert_parallel": expert_parallel}
    text = os.fspath(path) if isinstance(path, os.PathLike) else path
    if not isinstance(text, str):
        raise InvalidArgumentError(f"path must be a string or os.PathLike, got {path!r}")
    bar = _ProgressBar(f"loading {text}", progress)
    if text.startswith("dummy:"):
        name = text[len("dummy:"):]
        # A bundled official config by name, or any config.json by path (random weights of its shapes).
        config_file = CONFIGS_DIR / f"{name}.json"
        if not config_file.is_file():
            config_file = Path(name).expanduser()
        if not name or not config_file.is_file():
            raise InvalidArgumentError(
                f"unknown dummy model {name!r}: choose one of {', '.join(dummy_names())}, or give a config.json path")
        folder = BUNDLED_TOKENIZER_DIR
        native = _native.load_dummy(config_file.read_text(), device=device, dtype=dtype, max_seq_len=max_seq_len,
                                    max_batch=max_batch, seed=seed, tokenizer_dir=str(folder),
                                    tensor_parallel=tensor_parallel, progress=bar, **cpu)
    else:
        folder = _resolve_path(text)
        native = _native.load_checkpoint(str(folder), device=device, dtype=dtype, max_seq_len=max_seq_len,
                                         max_batch=max_batch, tensor_parallel=tensor_parallel, progress=bar, **cpu)
    return Model(native, _read_generation_config(folder), text)


class Model:
    """A loaded Qwen3 model. Create it with `qwen3rs.load(...)`."""

    def __init__(self, native: Any, generation_config: dict[str, Any], source: str):
        self._native = native
        self.tokenizer = native.tokenizer
        self.generation_config = generation_config
        self.source = source
        self._config = json.loads(native.config_json)

    @property
    def config(self) -> dict[str, Any]:
        """The checkpoint's config.json."""
        return self._config

    @property
    def device(self) -> str:
        return self._native.device

    @property
    def dtype(self) -> str:
        return self._native.dtype

    @property
    def max_seq_len(self) -> int:
        return self._native.max_seq_len

    def __repr__(self) -> str:
        c = self._config
        kind = "MoE" if "Moe" in (c.get("architectures") or [""])[0] else "dense"
        return (f"<qwen3rs.Model {self.source!r} {kind}, {c.get('num_hidden_layers')} layers, device={self.device}, "
                f"dtype={self.dtype}, max_seq_len={self.max_seq_len}>")

    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        """float32 [len(token_ids), vocab_size]: logits of one causal forward pass; no state is kept."""
        return self._native.logits(_as_id_list(token_ids, "token_ids"))

    def generate(self, prompt: Any, **kwargs: Any) -> Any:
        """Generate a continuation; see `qwen3rs.generate`."""
        from ._generate import generate

        return generate(self, prompt, **kwargs)

    def chat(self, system: str | None = None, think: bool = True, tools: list[dict] | None = None, **defaults: Any):
        """A conversation that keeps its KV cache between turns (`.send(text)` returns a Completion)."""
        from ._generate import ChatSession

        return ChatSession(self, system=system, think=think, tools=tools, **defaults)


def _as_id_list(ids: Any, what: str) -> list[int]:
    if isinstance(ids, np.ndarray):
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise InvalidArgumentError(f"{what} must be a 1-D array of integers, got {ids.dtype} {ids.shape}")
        return ids.tolist()
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
        raise InvalidArgumentError(f"{what} must be a sequence of ints, got {type(ids).__name__}")
    out = []
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise InvalidArgumentError(f"{what} must contain ints, got {i!r}")
        out.append(int(i))
    return out
