"""qwen3rs: run the Qwen3 model family (dense and MoE) from Python on a Rust core.

    import qwen3rs
    model = qwen3rs.load("dummy:Qwen3-0.6B")          # or a checkpoint folder / Hub repo id
    out = qwen3rs.generate(model, "Why is the sky blue?", think=False)
"""

from __future__ import annotations

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


def _register_pip_cuda() -> None:
    """Tell the native loader where pip's CUDA 13 wheels (nvidia-cuda-nvrtc, nvidia-cublas,
    nvidia-cuda-runtime) put their libraries and headers; CUDA_HOME and the library path come first."""
    import os
    import sys

    libs, includes = [], []
    for root in sys.path:
        base = os.path.join(root or ".", "nvidia")
        if not os.path.isdir(base):
            continue
        for sub in ("cu13", "cublas", "cuda_nvrtc", "cuda_runtime", "nccl"):
            if os.path.isdir(os.path.join(base, sub, "lib")):
                libs.append(os.path.join(base, sub, "lib"))
            if os.path.isdir(os.path.join(base, sub, "include")):
                includes.append(os.path.join(base, sub, "include"))
    _native._set_cuda_search_paths(libs, includes)


_register_pip_cuda()


def cuda_available() -> bool:
    """Whether a CUDA GPU is usable from this process (driver, GPU, NVRTC, cuBLAS and headers found).
    Never raises; `cuda_unavailable_reason()` says what is missing."""
    return _native.cuda_available()


def cuda_unavailable_reason() -> str | None:
    """Why `cuda_available()` is False, or None when it is True."""
    return _native.cuda_unavailable_reason()


def cuda_device_count() -> int:
    """How many CUDA GPUs are usable (what `load(..., tensor_parallel=N)` can spread a model over):
    0 where `cuda_available()` is False. Never raises."""
    return _native.cuda_device_count()


__all__ = [
    "load", "generate", "Model", "Completion", "Delta", "ChatSession", "Stream", "Tokenizer", "dummy_names",
    "cuda_available", "cuda_unavailable_reason", "cuda_device_count",
    "Qwen3Error", "CheckpointNotFoundError", "ConfigError", "WeightsError", "TokenizerError",
    "InvalidArgumentError", "DeviceError", "DeviceOutOfMemoryError",
]
