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

/// Text from Python; a str that isn't valid Unicode (a lone surrogate) is a TokenizerError.
fn text_arg(text: &Bound<'_, pyo3::types::PyString>) -> PyResult<String> {
    text.extract::<String>().map_err(|_| {
        to_py(Error::Tokenizer("text is not valid Unicode (it contains a lone surrogate)".into()))
    })
}

/// Token ids from Python; anything outside 0..2**32 is an InvalidArgumentError.
fn ids_arg(ids: Vec<i64>) -> PyResult<Vec<u32>> {
    ids.into_iter()
        .map(|id| {
            u32::try_from(id)
                .map_err(|_| to_py(Error::InvalidArgument(format!("token id {id} is not in the vocabulary"))))
        })
        .collect()
}

/// Qwen3's byte-level BPE tokenizer (Rust core), identical in ids to HF `tokenizers`.
#[pyclass(name = "Tokenizer", module = "qwen3rs._native", frozen)]
pub(crate) struct PyTokenizer {
    pub(crate) inner: crate::tokenizer::Tokenizer,
}

#[pymethods]
impl PyTokenizer {
    /// Load a tokenizer.json file.
    #[staticmethod]
    fn from_file(py: Python<'_>, path: std::path::PathBuf) -> PyResult<Self> {
        let inner = py.detach(|| crate::tokenizer::Tokenizer::from_file(&path)).map_err(to_py)?;
        Ok(PyTokenizer { inner })
    }

    /// Load `dir/tokenizer.json`.
    #[staticmethod]
    fn from_pretrained(py: Python<'_>, dir: std::path::PathBuf) -> PyResult<Self> {
        let inner = py.detach(|| crate::tokenizer::Tokenizer::from_pretrained(&dir)).map_err(to_py)?;
        Ok(PyTokenizer { inner })
    }

    #[pyo3(signature = (text, add_special_tokens = false))]
    fn encode(&self, py: Python<'_>, text: &Bound<'_, pyo3::types::PyString>, add_special_tokens: bool) -> PyResult<Vec<u32>> {
        let text = text_arg(text)?;
        Ok(py.detach(|| self.inner.encode(&text, add_special_tokens)))
    }

    /// Encode several texts in parallel (rayon), GIL released.
    #[pyo3(signature = (texts, add_special_tokens = false))]
    fn encode_batch(
        &self,
        py: Python<'_>,
        texts: Vec<Bound<'_, pyo3::types::PyString>>,
        add_special_tokens: bool,
    ) -> PyResult<Vec<Vec<u32>>> {
        let texts = texts.iter().map(text_arg).collect::<PyResult<Vec<String>>>()?;
        Ok(py.detach(|| self.inner.encode_batch(&texts, add_special_tokens)))
    }

    #[pyo3(signature = (ids, skip_special_tokens = false))]
    fn decode(&self, py: Python<'_>, ids: Vec<i64>, skip_special_tokens: bool) -> PyResult<String> {
        let ids = ids_arg(ids)?;
        py.detach(|| self.inner.decode(&ids, skip_special_tokens)).map_err(to_py)
    }

    /// Number of ids, added tokens included.
    #[getter]
    fn vocab_size(&self) -> usize {
        self.inner.vocab_size()
    }

    fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    fn id_to_token(&self, id: i64) -> Option<String> {
        u32::try_from(id).ok().and_then(|id| self.inner.id_to_token(id))
    }

    fn __repr__(&self) -> String {
        format!("Tokenizer(vocab_size={})", self.inner.vocab_size())
    }
}

// ---- Model -----------------------------------------------------------------------------------

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<PyTokenizer>()?;
    Ok(())
}
