//! The only PyO3 file: Python classes and functions over the Rust core, and the one place where
//! `Error` variants become Python exceptions (classes defined in python/qwen3rs/errors.py).
//! Every compute entry point releases the GIL.

use crate::error::Error;
use pyo3::prelude::*;

/// Map a core error to the matching exception class of `qwen3rs.errors`.
pub(crate) fn to_py(err: Error) -> PyErr {
    let class = match &err {
        Error::NotFound { .. } => "CheckpointNotFoundError",
        Error::Io { .. } => "Qwen3IOError",
        Error::Config(_) => "ConfigError",
        Error::Weights(_) => "WeightsError",
        Error::Tokenizer(_) => "TokenizerError",
        Error::InvalidArgument(_) => "InvalidArgumentError",
        Error::Device(_) => "DeviceError",
        Error::OutOfMemory(_) => "DeviceOutOfMemoryError",
    };
    let message = err.to_string();
    Python::attach(|py| {
        match py.import("qwen3rs.errors").and_then(|m| m.getattr(class)) {
            Ok(cls) => PyErr::from_type(cls.cast_into().expect("exception class"), message),
            Err(e) => e,
        }
    })
}

// ---- Tokenizer -------------------------------------------------------------------------------

// ---- Model -----------------------------------------------------------------------------------

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
