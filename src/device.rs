//! Device selection: parse "auto" | "cpu" | "cuda" | "cuda:N" and build the engine on that backend.

use crate::backend::cpu::CpuBackend;
use crate::backend::cuda::{self, CudaBackend};
use crate::backend::tp::{MoeSplit, TensorParallel};
use crate::bail;
use crate::config::Qwen3Config;
use crate::engine::{AnyEngine, Engine};
use crate::error::Result;
use crate::model::Model;
use crate::tensor::DType;
use crate::tokenizer::Tokenizer;
use crate::weights::TensorSource;

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
            "auto" => {
                if cuda_available() {
                    Device::Cuda(0)
                } else {
                    Device::Cpu
                }
            }
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

/// Whether a CUDA device can be used: built with CUDA, driver, NVRTC, cuBLAS and headers found,
/// and a GPU present. Checked once per process; never raises.
pub fn cuda_available() -> bool {
    cuda::available()
}

/// Why `cuda_available()` is false (None when it is true).
pub fn cuda_unavailable_reason() -> Option<String> {
    cuda::unavailable_reason()
}

/// How many CUDA GPUs can be used (0 where `cuda_available()` is false). Never raises.
pub fn cuda_device_count() -> usize {
    if cuda_available() {
        cuda::device_count().unwrap_or(0)
    } else {
        0
    }
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
    /// Devices one model is split over (tensor parallelism); 1 = one device. On the CPU, N ranks in
    /// one process stand in for N GPUs (to check the sharding; it is not faster).
    pub tensor_parallel: usize,
    /// Expert parallelism: with tensor_parallel = N >= 2 on a MoE model, each rank holds 1/N of the
    /// experts whole instead of 1/N of every expert's columns (`tp::MoeSplit`).
    pub expert_parallel: bool,
    /// CPU worker threads; None = `QWEN3RS_NUM_THREADS`, else all CPUs available.
    pub num_threads: Option<usize>,
    /// Weight-only quantisation at load time (CPU only).
    pub quantize: Option<crate::backend::cpu::Quant>,
}

/// Build an engine for `config` with weights from `src` on the requested device.
pub fn load_engine(
    config: Qwen3Config,
    src: &dyn TensorSource,
    tokenizer: Option<Tokenizer>,
    opts: &LoadOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<AnyEngine> {
    let dtype = opts.dtype.unwrap_or_else(|| src.stored_dtype());
    let max_seq_len = opts.max_seq_len.unwrap_or(config.max_position_embeddings.min(32768));
    crate::ensure!(max_seq_len >= 1, InvalidArgument, "max_seq_len must be >= 1, got {max_seq_len}");
    crate::ensure!(opts.max_batch >= 1, InvalidArgument, "max_batch must be >= 1");
    let tp = opts.tensor_parallel;
    crate::ensure!(tp >= 1, InvalidArgument, "tensor_parallel must be >= 1, got {tp}");
    // One device holding every expert is what expert_parallel=False gives already: asking for it
    // with tensor_parallel=1 is a mistake worth reporting.
    crate::ensure!(
        !opts.expert_parallel || tp >= 2,
        InvalidArgument,
        "expert_parallel=True spreads the experts over tensor_parallel >= 2 devices, got tensor_parallel={tp}"
    );
    let moe_split = if opts.expert_parallel { MoeSplit::Experts } else { MoeSplit::Columns };
    let cpu_opts = crate::backend::cpu::CpuOptions { num_threads: opts.num_threads, quant: opts.quantize };
    // The same model + engine on whichever backend the arm builds.
    macro_rules! engine_on {
        ($backend:expr) => {
            Engine::new(Model::load($backend, config, src, max_seq_len, progress)?, tokenizer, opts.max_batch)?
        };
    }
    Ok(match opts.device {
        Device::Cpu if tp > 1 => {
            let ranks = (0..tp).map(|_| CpuBackend::with_options(dtype, cpu_opts)).collect::<Result<Vec<_>>>()?;
            AnyEngine::CpuTp(engine_on!(TensorParallel::with_moe_split(ranks, &config, moe_split)?))
        }
        Device::Cpu => AnyEngine::Cpu(engine_on!(CpuBackend::with_options(dtype, cpu_opts)?)),
        Device::Cuda(first) if tp > 1 => {
            // One process drives GPUs first..first+tp, as vLLM's single-node tensor parallelism does.
            let ranks = (first..first + tp).map(|n| CudaBackend::new(n, dtype)).collect::<Result<Vec<_>>>()?;
            AnyEngine::CudaTp(engine_on!(TensorParallel::with_moe_split(ranks, &config, moe_split)?))
        }
        Device::Cuda(n) => AnyEngine::Cuda(engine_on!(CudaBackend::new(n, dtype)?)),
    })
}
