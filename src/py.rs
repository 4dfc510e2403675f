//! The only PyO3 file: Python classes and functions over the Rust core, and the one place where
//! `Error` variants become Python exceptions (classes defined in python/qwen3rs/errors.py).
//! Every compute entry point releases the GIL.

use crate::chat::{parse_tool_calls, split_thinking, ChatTemplate};
use crate::config::Qwen3Config;
use crate::device::{load_engine, Device, LoadOptions};
use crate::engine::output::Delta;
use crate::engine::{AnyEngine, GenOutput, GenRequest};
use crate::error::{catch_panic, Error, Result};
use crate::model::dummy::DummyWeights;
use crate::sampler::{GenerationConfig, SamplingOverrides, SamplingParams};
use crate::tensor::DType;
use crate::tokenizer::Tokenizer;
use crate::weights::{SafetensorsWeights, TensorSource};
use numpy::{IntoPyArray, PyArray2};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};
use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex, MutexGuard};

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
        Error::Internal(_) => "Qwen3Error",
    };
    let message = err.to_string();
    Python::attach(|py| match py.import("qwen3rs.errors").and_then(|m| m.getattr(class)) {
        Ok(cls) => PyErr::from_type(cls.cast_into().expect("exception class"), message),
        Err(e) => e,
    })
}

// ---- Tokenizer -------------------------------------------------------------------------------

/// Text from Python; a str that isn't valid Unicode (a lone surrogate) is a TokenizerError.
fn text_arg(text: &Bound<'_, pyo3::types::PyString>) -> PyResult<String> {
    text.extract::<String>().map_err(|_| to_py(Error::Tokenizer("text is not valid Unicode (it contains a lone surrogate)".into())))
}

/// Token ids from Python ints: negative or too-large values are an error naming the value.
fn to_ids(ids: Vec<i64>, what: &str) -> PyResult<Vec<u32>> {
    ids.into_iter()
        .map(|id| u32::try_from(id).map_err(|_| to_py(Error::InvalidArgument(format!("token id {id} in {what} is out of range")))))
        .collect()
}

/// A Python object (messages, tools) as JSON, through Python's own json module.
fn to_json(py: Python<'_>, obj: &Bound<'_, PyAny>, what: &str) -> PyResult<serde_json::Value> {
    let text: String = py
        .import("json")?
        .call_method1("dumps", (obj,))
        .and_then(|t| t.extract())
        .map_err(|e| to_py(Error::InvalidArgument(format!("{what} must be JSON-serialisable: {e}"))))?;
    serde_json::from_str(&text).map_err(|e| to_py(Error::InvalidArgument(format!("{what}: {e}"))))
}

/// Qwen3's byte-level BPE tokenizer (Rust core), identical in ids to HF `tokenizers`.
#[pyclass(name = "Tokenizer", module = "qwen3rs._native", frozen)]
pub(crate) struct PyTokenizer {
    pub(crate) inner: Tokenizer,
    /// The checkpoint's chat template (tokenizer_config.json / chat_template.jinja beside tokenizer.json).
    pub(crate) template: Option<Arc<ChatTemplate>>,
}

impl PyTokenizer {
    /// The tokenizer and chat template of a checkpoint folder.
    fn load_dir(dir: &std::path::Path) -> Result<Self> {
        let inner = Tokenizer::from_pretrained(dir)?;
        let template = ChatTemplate::from_dir(dir)?.map(Arc::new);
        Ok(PyTokenizer { inner, template })
    }
}

#[pymethods]
impl PyTokenizer {
    /// Load a tokenizer.json file.
    #[staticmethod]
    fn from_file(py: Python<'_>, path: std::path::PathBuf) -> PyResult<Self> {
        py.detach(|| {
            let inner = Tokenizer::from_file(&path)?;
            // A chat template beside the file is picked up, as from_pretrained does.
            let template = match path.parent() {
                Some(dir) => ChatTemplate::from_dir(dir)?.map(Arc::new),
                None => None,
            };
            Ok(PyTokenizer { inner, template })
        })
        .map_err(to_py)
    }

    /// Load `dir/tokenizer.json`.
    #[staticmethod]
    fn from_pretrained(py: Python<'_>, dir: std::path::PathBuf) -> PyResult<Self> {
        py.detach(|| Self::load_dir(&dir)).map_err(to_py)
    }

    /// Render a conversation with the checkpoint's own chat template, as transformers'
    /// `apply_chat_template(..., tokenize=False)` does. `enable_thinking=None` = the template's default.
    #[pyo3(signature = (messages, tools=None, add_generation_prompt=true, enable_thinking=None))]
    fn apply_chat_template(
        &self,
        py: Python<'_>,
        messages: &Bound<'_, PyAny>,
        tools: Option<&Bound<'_, PyAny>>,
        add_generation_prompt: bool,
        enable_thinking: Option<bool>,
    ) -> PyResult<String> {
        let Some(template) = &self.template else {
            return Err(to_py(Error::Tokenizer(
                "this tokenizer has no chat template (no tokenizer_config.json chat_template or chat_template.jinja)".into(),
            )));
        };
        let messages = to_json(py, messages, "messages")?;
        let tools = tools.filter(|t| !t.is_none()).map(|t| to_json(py, t, "tools")).transpose()?;
        py.detach(|| template.render(&messages, tools.as_ref(), add_generation_prompt, enable_thinking)).map_err(to_py)
    }

    #[getter]
    fn has_chat_template(&self) -> bool {
        self.template.is_some()
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
        let ids = to_ids(ids, "ids")?;
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

// ---- Model ----------------------------------------------------------------------------------

/// A loaded model and its engine. The engine sits behind a mutex: one generate call at a time per
/// model, while other Python threads keep running (the GIL is released during compute).
#[pyclass(name = "Model", module = "qwen3rs._native", frozen)]
struct PyModel {
    engine: Arc<Mutex<AnyEngine>>,
    config_json: String,
    generation: GenerationConfig,
    template: Option<Arc<ChatTemplate>>,
}

fn lock(engine: &Mutex<AnyEngine>) -> Result<MutexGuard<'_, AnyEngine>> {
    engine.lock().map_err(|_| Error::Device("the model was poisoned by an earlier failure".into()))
}

impl PyModel {
    fn with_engine<T: Send>(&self, py: Python<'_>, f: impl FnOnce(&mut AnyEngine) -> Result<T> + Send) -> PyResult<T> {
        py.detach(|| catch_panic(|| f(&mut *lock(&self.engine)?))).map_err(to_py)
    }

    fn read<T>(&self, f: impl FnOnce(&AnyEngine) -> T) -> PyResult<T> {
        Ok(f(&*lock(&self.engine).map_err(to_py)?))
    }
}

fn load_options(
    device: &str,
    dtype: &str,
    max_seq_len: Option<usize>,
    max_batch: usize,
    (tensor_parallel, expert_parallel): (usize, bool),
    cpu: (Option<usize>, Option<&str>),
) -> Result<LoadOptions> {
    Ok(LoadOptions {
        num_threads: cpu.0,
        quantize: crate::backend::cpu::Quant::parse(cpu.1.unwrap_or("none"))?,
        device: Device::parse(device)?,
        dtype: if dtype == "auto" { None } else { Some(DType::parse(dtype)?) },
        max_seq_len,
        max_batch,
        tensor_parallel,
        expert_parallel,
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

fn build(
    py: Python<'_>,
    config_json: String,
    src: impl TensorSource + Send,
    opts: LoadOptions,
    tokenizer_dir: Option<PathBuf>,
    progress: Option<Py<PyAny>>,
) -> PyResult<PyModel> {
    let config = Qwen3Config::from_json(&config_json).map_err(to_py)?;
    let mut progress = progress_fn(progress);
    py.detach(|| {
        catch_panic(|| {
            let (tokenizer, generation) = match &tokenizer_dir {
                Some(dir) if dir.join("tokenizer.json").is_file() => (Some(PyTokenizer::load_dir(dir)?), GenerationConfig::from_dir(dir)?),
                Some(dir) => (None, GenerationConfig::from_dir(dir)?),
                None => (None, GenerationConfig::default()),
            };
            let template = tokenizer.as_ref().and_then(|t| t.template.clone());
            let engine = load_engine(config, &src, tokenizer.map(|t| t.inner), &opts, &mut progress)?;
            Ok(PyModel { engine: Arc::new(Mutex::new(engine)), config_json, generation, template })
        })
    })
    .map_err(to_py)
}

/// Load a Hugging Face checkpoint folder (config.json + safetensors [+ tokenizer files]).
#[pyfunction]
#[pyo3(signature = (path, device="cpu", dtype="auto", max_seq_len=None, max_batch=8, tensor_parallel=1, progress=None, num_threads=None,
    quantize=None, expert_parallel=false))]
#[allow(clippy::too_many_arguments)]
fn load_checkpoint(
    py: Python<'_>,
    path: PathBuf,
    device: &str,
    dtype: &str,
    max_seq_len: Option<usize>,
    max_batch: usize,
    tensor_parallel: usize,
    progress: Option<Py<PyAny>>,
    num_threads: Option<usize>,
    quantize: Option<&str>,
    expert_parallel: bool,
) -> PyResult<PyModel> {
    let opts =
        load_options(device, dtype, max_seq_len, max_batch, (tensor_parallel, expert_parallel), (num_threads, quantize)).map_err(to_py)?;
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
    build(py, config_json, weights, opts, Some(path), progress)
}

/// Random weights of the shapes `config_json` describes; tokenizer files from `tokenizer_dir`.
#[pyfunction]
#[pyo3(signature = (config_json, device="cpu", dtype="auto", max_seq_len=None, max_batch=8, seed=0, tokenizer_dir=None,
    tensor_parallel=1, progress=None, num_threads=None, quantize=None, expert_parallel=false))]
#[allow(clippy::too_many_arguments)]
fn load_dummy(
    py: Python<'_>,
    config_json: String,
    device: &str,
    dtype: &str,
    max_seq_len: Option<usize>,
    max_batch: usize,
    seed: u64,
    tokenizer_dir: Option<PathBuf>,
    tensor_parallel: usize,
    progress: Option<Py<PyAny>>,
    num_threads: Option<usize>,
    quantize: Option<&str>,
    expert_parallel: bool,
) -> PyResult<PyModel> {
    let opts =
        load_options(device, dtype, max_seq_len, max_batch, (tensor_parallel, expert_parallel), (num_threads, quantize)).map_err(to_py)?;
    build(py, config_json, DummyWeights { seed }, opts, tokenizer_dir, progress)
}

/// One finished generation as a dict (the Python side turns it into a `Completion`).
fn output_dict<'py>(py: Python<'py>, o: GenOutput, thinking_enabled: bool) -> PyResult<Bound<'py, PyDict>> {
    let (thinking, content) = split_thinking(&o.text, thinking_enabled);
    let (content, calls) = parse_tool_calls(&content);
    let calls: Vec<serde_json::Value> = calls.into_iter().map(|c| serde_json::json!({"name": c.name, "arguments": c.arguments})).collect();
    let d = PyDict::new(py);
    d.set_item("token_ids", o.tokens)?;
    d.set_item("text", o.text)?;
    d.set_item("thinking", thinking)?;
    d.set_item("content", content)?;
    d.set_item("tool_calls_json", serde_json::Value::Array(calls).to_string())?;
    d.set_item("finish_reason", o.finish_reason.as_str())?;
    d.set_item("thinking_tokens", o.thinking_tokens)?;
    d.set_item("cached_tokens", o.cached_tokens)?;
    d.set_item("logprobs", o.logprobs)?;
    d.set_item("prefill_s", o.prefill_s)?;
    d.set_item("decode_s", o.decode_s)?;
    Ok(d)
}

/// Messages passed from a generation thread to a `Stream` iterator.
enum StreamMsg {
    Delta(usize, Delta),
    Done(Result<Vec<GenOutput>>),
}

/// One streamed piece as Python sees it: (index of the generation, kind, text, token ids).
type StreamItem = (usize, &'static str, String, Vec<u32>);

/// An iterator over `(index, kind, text, token_ids)` of a running generation; `outputs()` once exhausted.
#[pyclass(name = "Stream", module = "qwen3rs._native")]
struct PyStream {
    rx: Mutex<Receiver<StreamMsg>>,
    outputs: Option<Vec<GenOutput>>,
    thinking_enabled: bool,
}

#[pymethods]
impl PyStream {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&mut self, py: Python<'_>) -> PyResult<Option<StreamItem>> {
        if self.outputs.is_some() {
            return Ok(None);
        }
        let rx = &self.rx;
        let msg = py.detach(|| rx.lock().map_err(|_| ()).and_then(|r| r.recv().map_err(|_| ())));
        match msg {
            Ok(StreamMsg::Delta(i, d)) => Ok(Some((i, d.kind.as_str(), d.text, d.token_ids))),
            Ok(StreamMsg::Done(Ok(outputs))) => {
                self.outputs = Some(outputs);
                Ok(None)
            }
            Ok(StreamMsg::Done(Err(e))) => Err(to_py(e)),
            Err(()) => Err(to_py(Error::Device("the generation thread ended unexpectedly".into()))),
        }
    }

    /// The finished generations (dicts), once the iterator is exhausted.
    fn outputs<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyDict>>> {
        match &self.outputs {
            Some(outs) => outs.iter().map(|o| output_dict(py, o.clone(), self.thinking_enabled)).collect(),
            None => Err(to_py(Error::InvalidArgument("the stream is not finished yet".into()))),
        }
    }
}

#[pymethods]
impl PyModel {
    /// The checkpoint's config.json text.
    #[getter]
    fn config_json(&self) -> &str {
        &self.config_json
    }

    /// Decode steps launched before the host read the last step's tokens (CUDA graphs, greedy),
    /// and of those the ones whose results were never read: (launched, discarded).
    fn steps_ahead(&self) -> PyResult<(u64, u64)> {
        self.read(|e| e.steps_ahead().into())
    }

    #[getter]
    fn device(&self) -> PyResult<String> {
        self.read(|e| e.device_name())
    }

    #[getter]
    fn dtype(&self) -> PyResult<&'static str> {
        self.read(|e| e.dtype().name())
    }

    #[getter]
    fn max_seq_len(&self) -> PyResult<usize> {
        self.read(|e| e.max_seq_len())
    }

    #[getter]
    fn eos_token_ids(&self) -> PyResult<Vec<u32>> {
        self.read(|e| e.config().eos_token_ids.clone())
    }

    /// The checkpoint's tokenizer (with its chat template), or None.
    #[getter]
    fn tokenizer(&self) -> PyResult<Option<PyTokenizer>> {
        let template = self.template.clone();
        self.read(|e| e.tokenizer().map(|t| PyTokenizer { inner: t.clone(), template }))
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

    fn open_session(&self, py: Python<'_>) -> PyResult<u64> {
        self.with_engine(py, |e| Ok(e.open_session()))
    }

    fn close_session(&self, py: Python<'_>, session: u64) -> PyResult<()> {
        self.with_engine(py, |e| {
            e.close_session(session);
            Ok(())
        })
    }

    /// Tokens cached by a session (None when closed).
    fn session_len(&self, session: u64) -> PyResult<Option<usize>> {
        self.read(|e| e.session_len(session))
    }

    /// Generate for a batch of token-id prompts. `chat` picks the sampling defaults (thinking or not,
    /// see `SamplingParams::for_mode`); `thinking` says the output starts inside a think block.
    /// Returns a list of dicts, or a `Stream` when `stream`.
    #[pyo3(signature = (prompts, max_new_tokens, *, chat=false, thinking=false, thinking_budget=None, temperature=None,
        top_k=None, top_p=None, min_p=None, presence_penalty=None, frequency_penalty=None, repetition_penalty=None,
        seed=None, logprobs=None, stop=vec![], stop_token_ids=vec![], session=None, stream=false))]
    #[allow(clippy::too_many_arguments)]
    fn generate<'py>(
        &self,
        py: Python<'py>,
        prompts: Vec<Vec<i64>>,
        max_new_tokens: usize,
        chat: bool,
        thinking: bool,
        thinking_budget: Option<usize>,
        temperature: Option<f32>,
        top_k: Option<usize>,
        top_p: Option<f32>,
        min_p: Option<f32>,
        presence_penalty: Option<f32>,
        frequency_penalty: Option<f32>,
        repetition_penalty: Option<f32>,
        seed: Option<u64>,
        logprobs: Option<usize>,
        stop: Vec<String>,
        stop_token_ids: Vec<i64>,
        session: Option<u64>,
        stream: bool,
    ) -> PyResult<Py<PyAny>> {
        let overrides =
            SamplingOverrides { temperature, top_k, top_p, min_p, presence_penalty, frequency_penalty, repetition_penalty, seed, logprobs };
        // Raw completion follows generation_config.json (thinking-mode values) like transformers does.
        let sampling = SamplingParams::for_mode(!chat || thinking, &self.generation, &overrides).map_err(to_py)?;
        let stop_token_ids = to_ids(stop_token_ids, "stop_token_ids")?;
        let requests = prompts
            .into_iter()
            .enumerate()
            .map(|(i, p)| {
                Ok(GenRequest {
                    prompt: to_ids(p, &format!("prompt {i}"))?,
                    max_new_tokens,
                    sampling: sampling.clone(),
                    stop_token_ids: stop_token_ids.clone(),
                    stop: stop.clone(),
                    thinking,
                    thinking_budget: if thinking { thinking_budget } else { None },
                    session,
                })
            })
            .collect::<PyResult<Vec<_>>>()?;
        if !stream {
            let outputs = self.with_engine(py, move |e| e.generate(requests, &mut |_, _| Ok(())))?;
            let dicts = outputs.into_iter().map(|o| output_dict(py, o, thinking)).collect::<PyResult<Vec<_>>>()?;
            return Ok(PyList::new(py, dicts)?.into_any().unbind());
        }
        let (tx, rx) = mpsc::channel();
        let engine = Arc::clone(&self.engine);
        std::thread::spawn(move || {
            let result = catch_panic(|| {
                lock(&engine).and_then(|mut e| {
                    e.generate(requests, &mut |i, d| {
                        // The receiver is gone when Python dropped the stream: stop generating.
                        tx.send(StreamMsg::Delta(i, d)).map_err(|_| Error::InvalidArgument("stream closed".into()))
                    })
                })
            });
            let _ = tx.send(StreamMsg::Done(result));
        });
        Ok(Py::new(py, PyStream { rx: Mutex::new(rx), outputs: None, thinking_enabled: thinking })?.into_any())
    }
}

/// The CPU kernels' instruction set ("avx512bf16", "avx2", ...) and the default thread count.
#[pyfunction]
fn cpu_info() -> (&'static str, usize) {
    (crate::backend::cpu::simd::best().name(), crate::backend::cpu::default_num_threads())
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<PyTokenizer>()?;
    m.add_class::<PyModel>()?;
    m.add_function(wrap_pyfunction!(load_checkpoint, m)?)?;
    m.add_function(wrap_pyfunction!(load_dummy, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_available, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_unavailable_reason, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_device_count, m)?)?;
    m.add_function(wrap_pyfunction!(_set_cuda_search_paths, m)?)?;
    m.add_function(wrap_pyfunction!(_compile_cuda_kernels, m)?)?;
    m.add_function(wrap_pyfunction!(cpu_info, m)?)?;
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

/// How many CUDA GPUs are usable (0 where none is).
#[pyfunction]
fn cuda_device_count(py: Python<'_>) -> usize {
    py.detach(crate::device::cuda_device_count)
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
