"""qwen3rs: run the Qwen3 model family (dense and MoE) from Python on a Rust core.

    import qwen3rs
    model = qwen3rs.load("dummy:Qwen3-0.6B")          # or a checkpoint folder / Hub repo id
    out = qwen3rs.generate(model, "Why is the sky blue?", think=False)
"""

from . import _native
from ._generate import ChatSession, Stream, generate
from ._model import Model, dummy_names, load
from ._types import Completion, Delta
from ._native import Tokenizer
from .errors import (
    CheckpointNotFoundError,
    ConfigError,
    DeviceError,
    DeviceOutOfMemoryError,
    InvalidArgumentError,
    Qwen3Error,
    TokenizerError,
    WeightsError,
)

__version__ = _native.__version__


def cuda_available() -> bool:
    """Whether a CUDA GPU is usable from this process."""
    return _native.cuda_available()


__all__ = [
    "load", "generate", "Model", "Completion", "Delta", "ChatSession", "Stream", "Tokenizer", "dummy_names", "cuda_available",
    "Qwen3Error", "CheckpointNotFoundError", "ConfigError", "WeightsError", "TokenizerError",
    "InvalidArgumentError", "DeviceError", "DeviceOutOfMemoryError",
]
