//! The crate's one error type. Every failure a user can cause (a missing file, a malformed config,
//! a bad argument) is a variant here with a short message naming the file, field, tensor or value;
//! `py.rs` maps each variant to a Python exception in one place. Nothing user-reachable panics.

use std::fmt;
use std::path::{Path, PathBuf};

#[derive(Debug)]
pub enum Error {
    /// A file or folder the caller named (or the checkpoint needs) does not exist.
    NotFound { path: PathBuf, what: String },
    /// Reading an existing file failed (permissions, I/O error).
    Io { path: PathBuf, source: std::io::Error },
    /// config.json is malformed, incomplete, or describes a model this runtime can't run.
    Config(String),
    /// A safetensors file is malformed, or a tensor is missing or of the wrong dtype/shape.
    Weights(String),
    /// tokenizer.json / chat template is malformed or unsupported, or text/ids can't be converted.
    Tokenizer(String),
    /// An argument is out of range: token ids, sampling values, lengths, dtype/device names.
    InvalidArgument(String),
    /// The requested device is unavailable or failed (driver, library, kernel compilation).
    Device(String),
    /// The device ran out of memory.
    OutOfMemory(String),
    /// A bug: an internal invariant failed (a caught panic). Reported, never a crash.
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        if source.kind() == std::io::ErrorKind::NotFound {
            Error::NotFound { path: path.to_path_buf(), what: "file".into() }
        } else {
            Error::Io { path: path.to_path_buf(), source }
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::NotFound { path, what } => write!(f, "{what} not found: {}", path.display()),
            Error::Io { path, source } => write!(f, "{}: {source}", path.display()),
            Error::Config(m) | Error::Weights(m) | Error::Tokenizer(m) => f.write_str(m),
            Error::InvalidArgument(m) | Error::Device(m) | Error::OutOfMemory(m) => f.write_str(m),
            Error::Internal(m) => write!(f, "internal error (please report): {m}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// Run `f`, turning a panic (a bug) into `Error::Internal` so it can never reach Python as a crash.
pub fn catch_panic<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|payload| {
        let msg = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        Err(Error::Internal(msg))
    })
}

/// Return early with `Error::$kind(format!(...))`.
#[macro_export]
macro_rules! bail {
    ($kind:ident, $($arg:tt)*) => { return Err($crate::error::Error::$kind(format!($($arg)*))) };
}

/// Return early with `Error::$kind(format!(...))` unless `cond` holds.
#[macro_export]
macro_rules! ensure {
    // (A NaN fails a comparison, so `ensure!(x > 0.0, ..)` refuses it: the condition is taken whole.)
    ($cond:expr, $kind:ident, $($arg:tt)*) => {{ let ok: bool = $cond; if !ok { $crate::bail!($kind, $($arg)*); } }};
}
