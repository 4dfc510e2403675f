"""qwen3rs: run the Qwen3 model family (dense and MoE) from Python on a Rust core."""

from . import _native
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
