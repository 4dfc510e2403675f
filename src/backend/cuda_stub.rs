//! Stand-in for the CUDA backend in builds without the `cuda` feature: the same names, types
//! that can't be constructed (so `AnyEngine::Cuda` type-checks and is never built), and
//! constructors that say CUDA is not compiled in.

use super::{AttnShape, Backend, BatchInfo, BlockInput, MoeHost};
use crate::error::Result;
use crate::tensor::{DType, HostTensor};
use std::path::PathBuf;

/// An uninhabited type: no value of it exists, so every method below is unreachable.
pub enum Never {}

pub struct CudaBackend(Never);

const NOT_BUILT: &str = "this build of qwen3rs has no CUDA backend (built without the `cuda` feature)";

pub fn available() -> bool {
    false
}

pub fn unavailable_reason() -> Option<String> {
    Some(NOT_BUILT.into())
}

pub fn compile_kernels(_arch: (i32, i32)) -> Result<Vec<String>> {
    crate::bail!(Device, "{NOT_BUILT}")
}

pub fn add_search_dirs(_lib_dirs: Vec<PathBuf>, _include_dirs: Vec<PathBuf>) {}

pub fn device_count() -> Result<usize> {
    crate::bail!(Device, "{NOT_BUILT}")
}

impl CudaBackend {
    pub fn new(_ordinal: usize, _dtype: DType) -> Result<Self> {
        crate::bail!(Device, "{NOT_BUILT}")
    }

    pub fn describe(&self) -> String {
        match self.0 {}
    }
}

impl Backend for CudaBackend {
    type Buf = Never;
    type Weight = Never;
    type KvLayer = Never;
    type Moe = Never;

    fn device_name(&self) -> String {
        match self.0 {}
    }
    fn dtype(&self) -> DType {
        match self.0 {}
    }
    fn upload(&self, _: HostTensor) -> Result<Never> {
        match self.0 {}
    }
    fn upload_exact(&self, _: HostTensor) -> Result<Never> {
        match self.0 {}
    }
    fn upload_moe(&self, _: MoeHost) -> Result<Never> {
        match self.0 {}
    }
    fn alloc(&self, _: usize, _: usize) -> Result<Never> {
        match self.0 {}
    }
    fn alloc_kv(&self, _: usize, _: usize, _: usize) -> Result<Never> {
        match self.0 {}
    }
    fn upload_buf(&self, _: usize, _: usize, _: &[f32]) -> Result<Never> {
        match self.0 {}
    }
    fn download(&self, _: &Never) -> Result<Vec<f32>> {
        match self.0 {}
    }
    fn embed(&self, _: &mut Never, _: &Never, _: &[u32]) -> Result<()> {
        match self.0 {}
    }
    fn add_rms_norm(&self, _: &mut Never, _: &mut Never, _: &BlockInput<Self>) -> Result<()> {
        match self.0 {}
    }
    fn matmul(&self, _: &mut Never, _: &Never, _: &Never) -> Result<()> {
        match self.0 {}
    }
    fn qk_norm_rope(&self, _: &mut Never, _: &mut Never, _: &Never, _: &Never, _: f32, _: &Never, _: &[u32], _: AttnShape) -> Result<()> {
        match self.0 {}
    }
    fn kv_append(&self, _: &mut Never, _: &Never, _: &Never, _: &BatchInfo) -> Result<()> {
        match self.0 {}
    }
    fn attention(&self, _: &mut Never, _: &Never, _: &Never, _: &BatchInfo, _: AttnShape) -> Result<()> {
        match self.0 {}
    }
    fn swiglu(&self, _: &mut Never, _: &Never, _: &Never) -> Result<()> {
        match self.0 {}
    }
    fn moe(&self, _: &mut Never, _: &Never, _: &Never) -> Result<()> {
        match self.0 {}
    }
    fn gather_rows(&self, _: &mut Never, _: &Never, _: &[u32]) -> Result<()> {
        match self.0 {}
    }
}

impl super::tp::Collective for CudaBackend {
    type Group = Never;

    fn group(ranks: &[Self]) -> Result<Never> {
        match ranks.first() {
            Some(b) => match b.0 {},
            None => crate::bail!(Device, "{NOT_BUILT}"),
        }
    }

    fn all_reduce_sum(group: &Never, _ranks: &[Self], _bufs: &mut [Never]) -> Result<()> {
        match *group {}
    }
}
