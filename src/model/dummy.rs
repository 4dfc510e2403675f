//! Dummy weights: random tensors of a real config's shapes, for benchmarks and tests where real
//! checkpoints can't be downloaded. Deterministic in (seed, tensor name) and independent of the
//! thread count: each chunk of `DUMMY_CHUNK` elements draws from its own splitmix64 chain.
//!
//! `DummySpec` is everything a backend needs to generate a tensor itself: `Backend::dummy_weight`
//! defaults to building it here on the host and uploading it, and the CUDA backend runs the same
//! chains in a kernel (one thread per chunk), so a 32B model never exists in host memory. Both give
//! bit-identical bf16 values: the arithmetic below has no fused multiply-add (Rust never contracts
//! and the kernel uses `__fmul_rn`/`__fadd_rn`).
//!
//! A tensor-parallel shard (a `Window`: a range of rows, or a range of columns of every row) is drawn
//! alone, equal to that part of the whole tensor: only the chunks it touches are walked, and only its
//! elements are stored. A chain has no jump-ahead, so a chunk is walked from its start up to the
//! shard's last element in it (a column shard therefore walks nearly every chunk, but stores 1/N).

use crate::error::Result;
use crate::tensor::{matrix_dims, DType, HostTensor, Window};
use crate::weights::TensorSource;
use half::bf16;
use rayon::prelude::*;

pub struct DummyWeights {
    pub seed: u64,
}

/// Elements per independent random chain (the CUDA kernel's `DUMMY_CHUNK` must match).
pub const DUMMY_CHUNK: usize = 1 << 16;

/// splitmix64: a counter-based generator, so any element can be drawn independently.
pub fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// FNV-1a of the tensor name: gives every tensor its own stream.
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

/// How one dummy tensor is drawn: uniform in [center - half_width, center + half_width), rounded to bf16.
#[derive(Clone, Copy, Debug)]
pub struct DummySpec {
    /// Per-tensor stream key (seed ^ name hash, mixed).
    pub stream: u64,
    pub center: f32,
    pub half_width: f32,
}

impl DummySpec {
    pub fn new(seed: u64, name: &str, shape: &[usize]) -> Self {
        // Norm weights around 1; matrices uniform with std 1/sqrt(fan_in), so activations stay O(1).
        let (center, half_width) = if shape.len() == 1 { (1.0f32, 0.1f32) } else { (0.0, (3.0f32 / shape[shape.len() - 1] as f32).sqrt()) };
        DummySpec { stream: splitmix64(seed ^ name_hash(name)), center, half_width }
    }

    /// First chain state of chunk `c`.
    pub fn chunk_state(&self, c: usize) -> u64 {
        splitmix64(self.stream ^ (c as u64).wrapping_mul(0x2545_F491_4F6C_DD1D))
    }

    /// The value a chain state gives.
    pub fn value(&self, state: u64) -> bf16 {
        let unit = (state >> 40) as f32 / (1u64 << 24) as f32; // [0, 1)
        bf16::from_f32(self.center + self.half_width * (2.0 * unit - 1.0))
    }

    /// The whole tensor on the host.
    pub fn host_tensor(&self, shape: &[usize]) -> HostTensor {
        self.host_window(shape, &Window::full(shape)).expect("the full window lies inside its tensor")
    }

    /// The part `window` of the tensor of `shape` on the host, equal to `host_tensor(shape).window(window)`
    /// but drawing only the chunks the window touches and storing only the window.
    pub fn host_window(&self, shape: &[usize], window: &Window) -> Result<HostTensor> {
        window.check(shape)?;
        let walk = Walk::new(shape, window);
        let mut values = vec![bf16::ZERO; window.numel()];
        // The window's elements, in flat order, are the output's in order: each chunk fills one
        // contiguous run of the output, so the chunks split it into disjoint slices.
        let (first, last) = walk.chunks();
        let mut parts = Vec::with_capacity(last - first);
        let (mut rest, mut done) = (values.as_mut_slice(), 0);
        for c in first..last {
            let end = walk.count_before(walk.end().min((c as u64 + 1) * DUMMY_CHUNK as u64));
            let (part, tail) = std::mem::take(&mut rest).split_at_mut(end - done);
            (rest, done) = (tail, end);
            parts.push((c, part));
        }
        parts.into_par_iter().for_each(|(c, out)| self.walk_chunk(&walk, c, out));
        Ok(HostTensor::from_bf16(&values, window.part_shape(shape)))
    }

    /// Chunk `c`'s elements inside `walk`, into `out` (exactly as many).
    fn walk_chunk(&self, walk: &Walk, c: usize, out: &mut [bf16]) {
        let (cs, ce) = (c as u64 * DUMMY_CHUNK as u64, ((c as u64 + 1) * DUMMY_CHUNK as u64).min(walk.end()));
        let mut state = self.chunk_state(c);
        let (mut pos, mut done) = (cs, 0usize); // `pos`: flat index of the next value the chain gives
        for row in (cs / walk.cols).max(walk.row0)..=((ce - 1) / walk.cols).min(walk.row0 + walk.rows - 1) {
            let a = cs.max(row * walk.cols + walk.col0);
            let b = ce.min(row * walk.cols + walk.col0 + walk.ncols);
            if a >= b {
                continue;
            }
            while pos < a {
                state = splitmix64(state);
                pos += 1;
            }
            for v in &mut out[done..done + (b - a) as usize] {
                state = splitmix64(state);
                *v = self.value(state);
            }
            (pos, done) = (b, done + (b - a) as usize);
        }
        debug_assert_eq!(done, out.len());
    }
}

/// A window as the generators walk it (here and in the CUDA `dummy_fill` kernel): columns
/// `col0..col0+ncols` of rows `row0..row0+rows` of a matrix `cols` wide, in flat element indices.
/// A window of whole rows becomes one row of the flat tensor, so its walk has one run per chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Walk {
    pub cols: u64,
    pub row0: u64,
    pub rows: u64,
    pub col0: u64,
    pub ncols: u64,
}

impl Walk {
    pub fn new(shape: &[usize], w: &Window) -> Self {
        let (rows, cols) = matrix_dims(shape);
        let (rows, cols) = (rows as u64, cols as u64);
        let (r, c) = ((w.rows.start as u64, w.rows.len() as u64), (w.cols.start as u64, w.cols.len() as u64));
        if r.1 == 0 || c.1 == 0 {
            return Walk { cols: 1, row0: 0, rows: 0, col0: 0, ncols: 0 };
        }
        if c == (0, cols) || r.1 == 1 {
            // Whole rows (or a single row): one contiguous run of the flat tensor.
            Walk { cols: rows * cols, row0: 0, rows: 1, col0: r.0 * cols + c.0, ncols: (r.1 - 1) * cols + c.1 }
        } else {
            Walk { cols, row0: r.0, rows: r.1, col0: c.0, ncols: c.1 }
        }
    }

    pub fn numel(&self) -> usize {
        (self.rows * self.ncols) as usize
    }

    /// Flat index of the window's first element.
    pub fn start(&self) -> u64 {
        self.row0 * self.cols + self.col0
    }

    /// One past the flat index of the window's last element (`start` when it is empty).
    pub fn end(&self) -> u64 {
        if self.numel() == 0 {
            self.start()
        } else {
            (self.row0 + self.rows - 1) * self.cols + self.col0 + self.ncols
        }
    }

    /// Chunks `first..last` the window touches.
    pub fn chunks(&self) -> (usize, usize) {
        if self.numel() == 0 {
            return (0, 0);
        }
        ((self.start() / DUMMY_CHUNK as u64) as usize, self.end().div_ceil(DUMMY_CHUNK as u64) as usize)
    }

    /// How many of the window's elements have a flat index below `p`.
    pub fn count_before(&self, p: u64) -> usize {
        let (row, col) = (p / self.cols, p % self.cols);
        let full_rows = row.saturating_sub(self.row0).min(self.rows);
        let in_row =
            if (self.row0..self.row0 + self.rows).contains(&row) { col.clamp(self.col0, self.col0 + self.ncols) - self.col0 } else { 0 };
        (full_rows * self.ncols + in_row) as usize
    }
}

impl TensorSource for DummyWeights {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<HostTensor> {
        Ok(DummySpec::new(self.seed, name, shape).host_tensor(shape))
    }

    fn stored_dtype(&self) -> DType {
        DType::BF16
    }

    fn dummy_seed(&self) -> Option<u64> {
        Some(self.seed)
    }
}
