"""The package's exceptions. Each also derives from the built-in a caller would catch
(ValueError for bad input, FileNotFoundError for missing files), so plain `except ValueError` works."""


class Qwen3Error(Exception):
    """Base of every error raised by qwen3rs itself."""


class CheckpointNotFoundError(Qwen3Error, FileNotFoundError):
    """A file or folder the checkpoint needs does not exist."""


class ConfigError(Qwen3Error, ValueError):
    """config.json is malformed, incomplete, or describes a model qwen3rs can't run."""


class WeightsError(Qwen3Error, ValueError):
    """A safetensors file is malformed, or a tensor is missing or has the wrong dtype or shape."""


class TokenizerError(Qwen3Error, ValueError):
    """tokenizer.json or the chat template is malformed or unsupported, or ids/text can't be converted."""


class InvalidArgumentError(Qwen3Error, ValueError):
    """An argument is out of range: token ids, sampling values, lengths, dtype or device names."""


class DeviceError(Qwen3Error, RuntimeError):
    """The requested device is unavailable or failed (driver, library, kernel compilation)."""


class DeviceOutOfMemoryError(DeviceError, MemoryError):
    """The device ran out of memory; the process stays usable."""


class Qwen3IOError(Qwen3Error, OSError):
    """Reading an existing file failed."""
