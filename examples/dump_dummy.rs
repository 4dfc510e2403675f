//! Write the random weights `dummy:<model>` loads as a safetensors file, so peers (llama.cpp via
//! benches/gguf_from_dummy.py) can run on exactly the same weights.
//!
//!     cargo run --release --example dump_dummy -- python/qwen3rs/configs/Qwen3-0.6B.json out.safetensors [seed]

use qwen3rs::backend::cpu::CpuBackend;
use qwen3rs::config::Qwen3Config;
use qwen3rs::model::{dummy::DummyWeights, Model};
use qwen3rs::tensor::{DType, HostTensor};
use qwen3rs::weights::TensorSource;
use std::sync::Mutex;

/// Passes tensors through and keeps a copy of each, in the order the model asks for them.
struct Recorder {
    inner: DummyWeights,
    seen: Mutex<Vec<(String, HostTensor)>>,
}

impl TensorSource for Recorder {
    fn tensor(&self, name: &str, shape: &[usize]) -> qwen3rs::Result<HostTensor> {
        let t = self.inner.tensor(name, shape)?;
        self.seen.lock().unwrap().push((name.to_string(), t.clone()));
        Ok(t)
    }
    fn stored_dtype(&self) -> DType {
        self.inner.stored_dtype()
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let (config_path, out) = (&args[1], &args[2]);
    let seed = args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(0);
    let config = Qwen3Config::from_json(&std::fs::read_to_string(config_path)?)?;
    let rec = Recorder { inner: DummyWeights { seed }, seen: Mutex::new(vec![]) };
    Model::load(CpuBackend::new(DType::BF16), config, &rec, 16, &mut |_, _| {})?;
    let seen = rec.seen.into_inner().unwrap();
    let views: Vec<(String, safetensors::tensor::TensorView)> = seen
        .iter()
        .map(|(n, t)| (n.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::BF16, t.shape.clone(), t.raw()).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, std::path::Path::new(out))?;
    eprintln!("wrote {} tensors to {out}", seen.len());
    Ok(())
}
