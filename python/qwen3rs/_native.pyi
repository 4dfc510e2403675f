"""Type stubs of the Rust extension module (src/py.rs)."""

__version__: str

# ---- Tokenizer ----

# ---- Model ----

# ---- Devices ----

def cuda_available() -> bool: ...
def cuda_unavailable_reason() -> str | None: ...
def _set_cuda_search_paths(lib_dirs: list[str], include_dirs: list[str]) -> None: ...
def _compile_cuda_kernels(arch: str = "sm_90") -> list[str]: ...
