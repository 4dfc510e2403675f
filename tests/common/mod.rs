//! Helpers shared by the Rust integration tests (`mod common;` in each test file that uses them).

use qwen3rs::model::dummy::DummyWeights;
use qwen3rs::tensor::{DType, HostTensor};
use qwen3rs::weights::TensorSource;
use qwen3rs::Result;

/// Dummy weights handed out as host tensors (no seed): the backend then uploads and shards them
/// like a checkpoint's, the path every split had before shards were drawn alone.
pub struct AsHostTensors(pub DummyWeights);

impl TensorSource for AsHostTensors {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<HostTensor> {
        self.0.tensor(name, shape)
    }
    fn stored_dtype(&self) -> DType {
        self.0.stored_dtype()
    }
}
