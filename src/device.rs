//! Device selection: parse "auto" | "cpu" | "cuda" | "cuda:N" and build the engine on that backend.

use crate::backend::cpu::CpuBackend;
use crate::config::Qwen3Config;
use crate::engine::{AnyEngine, Engine};
use crate::error::Result;
use crate::model::Model;
use crate::tensor::DType;
use crate::tokenizer::Tokenizer;
use crate::weights::TensorSource;
use crate::bail;

/// Where a model runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda(usize),
}

impl Device {
    /// Parse a device string; "auto" picks CUDA when a usable GPU exists, else the CPU.
    pub fn parse(spec: &str) -> Result<Device> {
        let spec = spec.trim().to_ascii_lowercase();
        Ok(match spec.as_str() {
            "auto" => if cuda_available() { Device::Cuda(0) } else { Device::Cpu },
            "cpu" => Device::Cpu,
            "cuda" | "gpu" => Device::Cuda(0),
            s if s.starts_with("cuda:") => match s[5..].parse::<usize>() {
                Ok(n) => Device::Cuda(n),
                Err(_) => bail!(InvalidArgument, "invalid device {spec:?}: expected \"cuda:N\" with N a GPU index"),
            },
            _ => bail!(InvalidArgument, "unknown device {spec:?}: expected \"auto\", \"cpu\", \"cuda\" or \"cuda:N\""),
        })
    }
}

/// Whether a CUDA device can be used (driver and a GPU present).
pub fn cuda_available() -> bool {
    false
}

/// Everything `load` needs besides the weights.
pub struct LoadOptions {
    pub device: Device,
    /// None = the checkpoint's stored dtype.
    pub dtype: Option<DType>,
    /// None = min(max_position_embeddings, 32768).
    pub max_seq_len: Option<usize>,
    /// Sequences the KV cache can hold at once.
    pub max_batch: usize,
    /// CPU worker threads; None = `QWEN3RS_NUM_THREADS`, else all CPUs available.
    pub num_threads: Option<usize>,
    /// Weight-only quantisation at load time (CPU only).
    pub quantize: Option<crate::backend::cpu::Quant>,
}

/// Build an engine for `config` with weights from `src` on the requested device.
pub fn load_engine(config: Qwen3Config, src: &dyn TensorSource, tokenizer: Option<Tokenizer>, opts: &LoadOptions,
    progress: &mut dyn FnMut(usize, usize)) -> Result<AnyEngine> {
    let dtype = opts.dtype.unwrap_or_else(|| src.stored_dtype());
    let max_seq_len = opts.max_seq_len.unwrap_or(config.max_position_embeddings.min(32768));
    crate::ensure!(max_seq_len >= 1, InvalidArgument, "max_seq_len must be >= 1, got {max_seq_len}");
    crate::ensure!(opts.max_batch >= 1, InvalidArgument, "max_batch must be >= 1");
    match opts.device {
        Device::Cpu => {
            let cpu_opts = crate::backend::cpu::CpuOptions { num_threads: opts.num_threads, quant: opts.quantize };
            let model = Model::load(CpuBackend::with_options(dtype, cpu_opts)?, config, src, max_seq_len, progress)?;
            Ok(AnyEngine::Cpu(Engine::new(model, tokenizer, opts.max_batch)?))
        }
        Device::Cuda(n) => bail!(Device, "device cuda:{n} requested, but this build of qwen3rs has no CUDA backend"),
    }
}
