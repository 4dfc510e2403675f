"""Type stubs of the Rust extension module (src/py.rs)."""

__version__: str

# ---- Tokenizer ----

# ---- Model ----
