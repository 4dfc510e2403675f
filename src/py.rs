//! The only PyO3 file: Python classes and functions over the Rust core, and the one place where
//! `Error` variants become Python exceptions (classes defined in python/qwen3rs/errors.py).
//! Every compute entry point releases the GIL.

use crate::config::Qwen3Config;
use crate::device::{load_engine, Device, LoadOptions};
use crate::engine::{AnyEngine, Control, GenRequest};
use crate::error::{Error, Result};
use crate::model::dummy::DummyWeights;
use crate::sampler::SamplingParams;
use crate::tensor::DType;
use crate::weights::{SafetensorsWeights, TensorSource};
use numpy::{IntoPyArray, PyArray2};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use std::path::PathBuf;
use std::sync::Mutex;

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

// ---- Model ----------------------------------------------------------------------------------

/// A loaded model and its engine. The engine sits behind a mutex: one generate call at a time per
/// model, while other Python threads keep running (the GIL is released during compute).
#[pyclass(name = "Model", module = "qwen3rs._native", frozen)]
struct PyModel {
    engine: Mutex<AnyEngine>,
    config_json: String,
}

impl PyModel {
    fn with_engine<T: Send>(&self, py: Python<'_>, f: impl FnOnce(&mut AnyEngine) -> Result<T> + Send) -> PyResult<T> {
        py.detach(|| {
            let mut engine = self.engine.lock().map_err(|_| Error::Device("the model was poisoned by an earlier failure".into()))?;
            f(&mut engine)
        })
        .map_err(to_py)
    }
}

/// Token ids from Python ints: negative or too-large values are an error naming the value.
fn to_ids(ids: Vec<i64>, what: &str) -> PyResult<Vec<u32>> {
    ids.into_iter()
        .map(|id| u32::try_from(id).map_err(|_| to_py(Error::InvalidArgument(format!("token id {id} in {what} is out of range")))))
        .collect()
}

fn load_options(device: &str, dtype: &str, max_seq_len: Option<usize>, max_batch: usize) -> Result<LoadOptions> {
    Ok(LoadOptions {
        device: Device::parse(device)?,
        dtype: if dtype == "auto" { None } else { Some(DType::parse(dtype)?) },
        max_seq_len,
        max_batch,
    })
}

/// Call the Python progress callback (if any) from the loading thread.
fn progress_fn(callback: Option<Py<PyAny>>) -> impl FnMut(usize, usize) + Send {
    move |done, total| {
        if let Some(cb) = &callback {
            Python::attach(|py| {
                if let Err(e) = cb.call1(py, (done, total)) {
                    e.print(py);
                }
            });
        }
    }
}

fn build(py: Python<'_>, config_json: String, src: impl TensorSource + Send, opts: LoadOptions, progress: Option<Py<PyAny>>) -> PyResult<PyModel> {
    let config = Qwen3Config::from_json(&config_json).map_err(to_py)?;
    let mut progress = progress_fn(progress);
    let engine = py.detach(|| load_engine(config, &src, &opts, &mut progress)).map_err(to_py)?;
    Ok(PyModel { engine: Mutex::new(engine), config_json })
}

/// Load a Hugging Face checkpoint folder (config.json + safetensors).
#[pyfunction]
#[pyo3(signature = (path, device="cpu", dtype="auto", max_seq_len=None, max_batch=8, progress=None))]
fn load_checkpoint(py: Python<'_>, path: PathBuf, device: &str, dtype: &str, max_seq_len: Option<usize>, max_batch: usize,
    progress: Option<Py<PyAny>>) -> PyResult<PyModel> {
    let opts = load_options(device, dtype, max_seq_len, max_batch).map_err(to_py)?;
    if !path.is_dir() {
        return Err(to_py(Error::NotFound { path, what: "checkpoint folder".into() }));
    }
    let config_path = path.join("config.json");
    let config_json = std::fs::read_to_string(&config_path).map_err(|e| to_py(Error::io(&config_path, e)))?;
    // Validate the config before touching the weights, so config errors name config.json.
    Qwen3Config::from_json(&config_json).map_err(|e| match e {
        Error::Config(m) => to_py(Error::Config(format!("{}: {m}", config_path.display()))),
        other => to_py(other),
    })?;
    let weights = py.detach(|| SafetensorsWeights::open_dir(&path)).map_err(to_py)?;
    build(py, config_json, weights, opts, progress)
}

/// Random weights of the shapes `config_json` describes.
#[pyfunction]
#[pyo3(signature = (config_json, device="cpu", dtype="auto", max_seq_len=None, max_batch=8, seed=0, progress=None))]
fn load_dummy(py: Python<'_>, config_json: String, device: &str, dtype: &str, max_seq_len: Option<usize>, max_batch: usize,
    seed: u64, progress: Option<Py<PyAny>>) -> PyResult<PyModel> {
    let opts = load_options(device, dtype, max_seq_len, max_batch).map_err(to_py)?;
    build(py, config_json, DummyWeights { seed }, opts, progress)
}

#[pymethods]
impl PyModel {
    /// The checkpoint's config.json text.
    #[getter]
    fn config_json(&self) -> &str {
        &self.config_json
    }

    #[getter]
    fn device(&self) -> String {
        self.engine.lock().map(|e| e.device_name()).unwrap_or_default()
    }

    #[getter]
    fn dtype(&self) -> &'static str {
        self.engine.lock().map(|e| e.dtype().name()).unwrap_or("?")
    }

    #[getter]
    fn max_seq_len(&self) -> usize {
        self.engine.lock().map(|e| e.max_seq_len()).unwrap_or(0)
    }

    #[getter]
    fn vocab_size(&self) -> usize {
        self.engine.lock().map(|e| e.config().vocab_size).unwrap_or(0)
    }

    #[getter]
    fn eos_token_ids(&self) -> Vec<u32> {
        self.engine.lock().map(|e| e.config().eos_token_ids.clone()).unwrap_or_default()
    }

    /// Logits [L, vocab] (float32) of one causal forward pass; no state kept.
    fn logits<'py>(&self, py: Python<'py>, token_ids: Vec<i64>) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let ids = to_ids(token_ids, "token_ids")?;
        let n = ids.len();
        let (logits, vocab) = self.with_engine(py, |e| Ok((e.logits(&ids)?, e.config().vocab_size)))?;
        let array = numpy::ndarray::Array2::from_shape_vec((n, vocab), logits)
            .map_err(|e| to_py(Error::Device(format!("logits buffer has the wrong size: {e}"))))?;
        Ok(array.into_pyarray(py))
    }

    /// Token-level generation for a batch of prompts; returns one dict per prompt.
    #[pyo3(signature = (prompts, max_new_tokens, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0,
        presence_penalty=0.0, frequency_penalty=0.0, repetition_penalty=1.0, seed=0, stop_token_ids=vec![]))]
    #[allow(clippy::too_many_arguments)]
    fn generate_ids<'py>(&self, py: Python<'py>, prompts: Vec<Vec<i64>>, max_new_tokens: usize, temperature: f32, top_k: usize,
        top_p: f32, min_p: f32, presence_penalty: f32, frequency_penalty: f32, repetition_penalty: f32, seed: u64,
        stop_token_ids: Vec<i64>) -> PyResult<Vec<Bound<'py, PyDict>>> {
        let stop = to_ids(stop_token_ids, "stop_token_ids")?;
        let sampling = SamplingParams { temperature, top_k, top_p, min_p, presence_penalty, frequency_penalty, repetition_penalty, seed, logprobs: 0 };
        let mut requests = Vec::with_capacity(prompts.len());
        for (i, p) in prompts.into_iter().enumerate() {
            requests.push(GenRequest { prompt: to_ids(p, &format!("prompt {i}"))?, max_new_tokens, sampling: sampling.clone(), stop_token_ids: stop.clone() });
        }
        let outputs = self.with_engine(py, move |e| e.generate(requests, &mut |_, _| Ok(Control::Continue)))?;
        outputs
            .into_iter()
            .map(|o| {
                let d = PyDict::new(py);
                d.set_item("token_ids", o.tokens)?;
                d.set_item("finish_reason", o.finish_reason.as_str())?;
                d.set_item("prefill_s", o.prefill_s)?;
                d.set_item("decode_s", o.decode_s)?;
                Ok(d)
            })
            .collect()
    }
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<PyModel>()?;
    m.add_function(wrap_pyfunction!(load_checkpoint, m)?)?;
    m.add_function(wrap_pyfunction!(load_dummy, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_available, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_unavailable_reason, m)?)?;
    m.add_function(wrap_pyfunction!(_set_cuda_search_paths, m)?)?;
    m.add_function(wrap_pyfunction!(_compile_cuda_kernels, m)?)?;
    Ok(())
}

/// Whether a CUDA GPU is usable from this process.
#[pyfunction]
fn cuda_available() -> bool {
    crate::device::cuda_available()
}

/// Why no CUDA GPU is usable (None when one is).
#[pyfunction]
fn cuda_unavailable_reason(py: Python<'_>) -> Option<String> {
    py.detach(crate::device::cuda_unavailable_reason)
}

/// Folders of pip-installed CUDA libraries / headers (site-packages/nvidia/cu13/...), searched
/// after CUDA_HOME and the library path. Called once by the package at import.
#[pyfunction]
fn _set_cuda_search_paths(lib_dirs: Vec<PathBuf>, include_dirs: Vec<PathBuf>) {
    crate::backend::cuda::add_search_dirs(lib_dirs, include_dirs);
}

/// Compile every CUDA kernel with NVRTC for `arch` ("sm_90"); returns "module/dtype" names.
/// Needs NVRTC and the CUDA headers, not a GPU (a CI check).
#[pyfunction]
#[pyo3(signature = (arch="sm_90"))]
fn _compile_cuda_kernels(py: Python<'_>, arch: &str) -> PyResult<Vec<String>> {
    let digits = arch.strip_prefix("sm_").filter(|d| d.len() >= 2 && d.bytes().all(|b| b.is_ascii_digit()));
    let Some(d) = digits else {
        return Err(to_py(Error::InvalidArgument(format!("arch must look like \"sm_90\", got {arch:?}"))));
    };
    let (major, minor) = d.split_at(d.len() - 1);
    let arch = (major.parse().unwrap_or(0), minor.parse().unwrap_or(0));
    py.detach(|| crate::backend::cuda::compile_kernels(arch)).map_err(to_py)
}
