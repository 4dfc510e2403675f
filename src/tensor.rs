//! Element types and host tensors. A `HostTensor` holds one dtype's elements either borrowed from a
//! memory-mapped safetensors file (zero copy) or owned; kernels see it as a typed slice.

use crate::error::Result;
use crate::{bail, ensure};
use half::{bf16, f16};
use memmap2::Mmap;
use std::ops::Range;
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

/// A rectangle of a tensor seen as a matrix [rows, cols] (the last dimension is the columns, the
/// others fold into the rows): what one tensor-parallel rank holds of a split weight.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Window {
    pub rows: Range<usize>,
    pub cols: Range<usize>,
}

/// `shape` as a matrix: (rows, cols).
pub fn matrix_dims(shape: &[usize]) -> (usize, usize) {
    match shape.split_last() {
        Some((&cols, rest)) => (rest.iter().product(), cols),
        None => (1, 1),
    }
}

impl Window {
    /// All of a tensor of `shape`.
    pub fn full(shape: &[usize]) -> Self {
        let (rows, cols) = matrix_dims(shape);
        Window { rows: 0..rows, cols: 0..cols }
    }

    pub fn numel(&self) -> usize {
        self.rows.len() * self.cols.len()
    }

    /// The part's shape: `shape` itself when the window is all of it, else [rows, cols].
    pub fn part_shape(&self, shape: &[usize]) -> Vec<usize> {
        if *self == Window::full(shape) {
            shape.to_vec()
        } else {
            vec![self.rows.len(), self.cols.len()]
        }
    }

    /// An error unless the window lies inside a tensor of `shape`.
    pub fn check(&self, shape: &[usize]) -> Result<()> {
        let (rows, cols) = matrix_dims(shape);
        ensure!(
            self.rows.start <= self.rows.end && self.rows.end <= rows && self.cols.start <= self.cols.end && self.cols.end <= cols,
            InvalidArgument,
            "window rows {:?} × columns {:?} is not inside a tensor of shape {shape:?}",
            self.rows,
            self.cols
        );
        Ok(())
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
        ensure!(
            start + len <= map.len(),
            Weights,
            "tensor bytes {start}..{} lie past the end of the file ({} bytes)",
            start + len,
            map.len()
        );
        let aligned = (map.as_ptr() as usize + start).is_multiple_of(dtype.size());
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

    /// The part of this tensor inside `w` (a view when it is all of it, else a copy).
    pub fn window(&self, w: &Window) -> Result<HostTensor> {
        w.check(&self.shape)?;
        if *w == Window::full(&self.shape) {
            return Ok(self.clone());
        }
        let (_, cols) = matrix_dims(&self.shape);
        let (es, row) = (self.dtype.size(), cols * self.dtype.size());
        let shape = vec![w.rows.len(), w.cols.len()];
        if w.numel() == 0 {
            return Ok(Self::from_bytes(&[], self.dtype, shape));
        }
        let rows = &self.raw()[w.rows.start * row..w.rows.end * row];
        if w.cols == (0..cols) {
            return Ok(Self::from_bytes(rows, self.dtype, shape));
        }
        let mut bytes = Vec::with_capacity(w.numel() * es);
        for r in rows.chunks(row) {
            bytes.extend_from_slice(&r[w.cols.start * es..w.cols.end * es]);
        }
        Ok(Self::from_bytes(&bytes, self.dtype, shape))
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
