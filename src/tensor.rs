//! Element types and host tensors. A `HostTensor` holds one dtype's elements either borrowed from a
//! memory-mapped safetensors file (zero copy) or owned; kernels see it as a typed slice.

use crate::error::Result;
use crate::{bail, ensure};
use half::{bf16, f16};
use memmap2::Mmap;
use std::sync::Arc;

/// Element type of a tensor (as stored, or as computed).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    BF16,
    F16,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::BF16 | DType::F16 => 2,
        }
    }

    /// The torch-style name ("float32", "bfloat16", "float16").
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::BF16 => "bfloat16",
            DType::F16 => "float16",
        }
    }

    /// Parse a user-facing dtype name; accepts torch names and short forms.
    pub fn parse(name: &str) -> Result<DType> {
        Ok(match name {
            "float32" | "f32" | "fp32" | "float" => DType::F32,
            "bfloat16" | "bf16" => DType::BF16,
            "float16" | "f16" | "fp16" | "half" => DType::F16,
            _ => bail!(InvalidArgument, "unknown dtype {name:?}: expected \"auto\", \"bfloat16\", \"float16\" or \"float32\""),
        })
    }
}

/// Where a tensor's bytes live.
#[derive(Clone)]
enum Bytes {
    /// A byte range of a shared memory map, aligned for the dtype.
    Mapped { map: Arc<Mmap>, start: usize, len: usize },
    /// Owned elements; stored as u32 words so the buffer is aligned for every dtype.
    Owned { words: Arc<Vec<u32>>, len: usize },
}

/// A typed view of a tensor's elements.
#[derive(Clone, Copy)]
pub enum Elems<'a> {
    F32(&'a [f32]),
    BF16(&'a [bf16]),
    F16(&'a [f16]),
}

/// A tensor in host memory: dtype, shape (row-major) and its bytes.
#[derive(Clone)]
pub struct HostTensor {
    pub dtype: DType,
    pub shape: Vec<usize>,
    bytes: Bytes,
}

impl HostTensor {
    /// A view of `len` bytes at `start` of a memory map. Misaligned data (possible with hand-written
    /// files) is copied instead, since kernels read typed slices.
    pub fn from_map(map: &Arc<Mmap>, start: usize, len: usize, dtype: DType, shape: Vec<usize>) -> Result<Self> {
        ensure!(start + len <= map.len(), Weights, "tensor bytes {start}..{} lie past the end of the file ({} bytes)", start + len, map.len());
        let aligned = (map.as_ptr() as usize + start) % dtype.size() == 0;
        if aligned {
            Ok(HostTensor { dtype, shape, bytes: Bytes::Mapped { map: map.clone(), start, len } })
        } else {
            Ok(Self::from_bytes(&map[start..start + len], dtype, shape))
        }
    }

    /// An owned copy of raw little-endian bytes.
    pub fn from_bytes(raw: &[u8], dtype: DType, shape: Vec<usize>) -> Self {
        let mut words = vec![0u32; raw.len().div_ceil(4)];
        bytemuck::cast_slice_mut::<u32, u8>(&mut words)[..raw.len()].copy_from_slice(raw);
        HostTensor { dtype, shape, bytes: Bytes::Owned { words: Arc::new(words), len: raw.len() } }
    }

    pub fn from_f32(values: &[f32], shape: Vec<usize>) -> Self {
        Self::from_bytes(bytemuck::cast_slice(values), DType::F32, shape)
    }

    pub fn from_bf16(values: &[bf16], shape: Vec<usize>) -> Self {
        Self::from_bytes(bytemuck::cast_slice(values), DType::BF16, shape)
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn raw(&self) -> &[u8] {
        match &self.bytes {
            Bytes::Mapped { map, start, len } => &map[*start..*start + *len],
            Bytes::Owned { words, len } => &bytemuck::cast_slice::<u32, u8>(words)[..*len],
        }
    }

    pub fn elems(&self) -> Elems<'_> {
        let raw = self.raw();
        // Alignment was ensured at construction, so these casts cannot fail.
        match self.dtype {
            DType::F32 => Elems::F32(bytemuck::cast_slice(raw)),
            DType::BF16 => Elems::BF16(bytemuck::cast_slice(raw)),
            DType::F16 => Elems::F16(bytemuck::cast_slice(raw)),
        }
    }

    /// Rows [start, start + n) of a 2-D tensor (a copy).
    pub fn slice_rows(&self, start: usize, n: usize) -> Result<HostTensor> {
        ensure!(self.shape.len() == 2 && start + n <= self.shape[0], InvalidArgument,
            "cannot take rows {start}..{} of a tensor of shape {:?}", start + n, self.shape);
        let row = self.shape[1] * self.dtype.size();
        Ok(Self::from_bytes(&self.raw()[start * row..(start + n) * row], self.dtype, vec![n, self.shape[1]]))
    }

    /// Columns [start, start + n) of every row of a 2-D tensor (a copy).
    pub fn slice_cols(&self, start: usize, n: usize) -> Result<HostTensor> {
        ensure!(self.shape.len() == 2 && start + n <= self.shape[1], InvalidArgument,
            "cannot take columns {start}..{} of a tensor of shape {:?}", start + n, self.shape);
        let (es, row) = (self.dtype.size(), self.shape[1] * self.dtype.size());
        let mut bytes = Vec::with_capacity(self.shape[0] * n * es);
        for r in self.raw().chunks(row) {
            bytes.extend_from_slice(&r[start * es..(start + n) * es]);
        }
        Ok(Self::from_bytes(&bytes, self.dtype, vec![self.shape[0], n]))
    }

    /// All elements widened to f32.
    pub fn to_f32_vec(&self) -> Vec<f32> {
        match self.elems() {
            Elems::F32(v) => v.to_vec(),
            Elems::BF16(v) => v.iter().map(|x| x.to_f32()).collect(),
            Elems::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
        }
    }

    /// The same tensor in `dtype` (no copy when it already is).
    pub fn to_dtype(&self, dtype: DType) -> HostTensor {
        if dtype == self.dtype {
            return self.clone();
        }
        let values = self.to_f32_vec();
        match dtype {
            DType::F32 => Self::from_f32(&values, self.shape.clone()),
            DType::BF16 => {
                let v: Vec<bf16> = values.iter().map(|&x| bf16::from_f32(x)).collect();
                Self::from_bf16(&v, self.shape.clone())
            }
            DType::F16 => {
                let v: Vec<f16> = values.iter().map(|&x| f16::from_f32(x)).collect();
                Self::from_bytes(bytemuck::cast_slice(&v), DType::F16, self.shape.clone())
            }
        }
    }
}
