//! The CUDA backend (cudarc, loaded at run time): weights uploaded once in the compute dtype
//! (bf16 by default, f32 for checks), activations as device buffers of that dtype, a paged KV
//! cache allocated up front (so an impossible `max_seq_len` fails at load with OutOfMemory),
//! NVRTC-compiled kernels for every op (`kernels/*.cu`), cuBLAS for products of more than
//! `GEMV_MAX_ROWS` rows and a 16-byte-load GEMV below that. Semantics equal the CPU reference:
//! each op rounds its output to the compute dtype, the MoE router runs in f32.
//!
//! Metadata (token ids, positions, slot mapping, block tables, row lists) is uploaded into
//! per-kind device buffers that only grow; an upload is skipped when the host content equals the
//! last one, so the 2 × n_layers attention calls of a forward upload the batch layout once.
//! MoE routing, expert grouping and the weighted combine run on the device: nothing goes back to
//! the host inside a forward pass. Scratch for MoE lives in grow-only buffers too.

pub mod compile;
mod gpu;
pub mod libs;
mod nccl;

use super::{AttnShape, Backend, BatchInfo, MoeHost};
use crate::error::{Error, Result};
use crate::tensor::{DType, HostTensor};
use crate::{bail, ensure};
use gpu::{args, DevMem, Gpu};
use half::{bf16, f16};
use std::sync::{Mutex, OnceLock};

/// Rows up to which matmul uses the GEMV kernel rather than cuBLAS (must match matmul.cu).
pub const GEMV_MAX_ROWS: usize = 8;
/// Rows per MoE expert tile (must match GG_TM in matmul.cu).
const MOE_TILE_ROWS: usize = 16;
const MAX_TOP_K: usize = 32;
const MAX_HEAD_DIM: usize = 256;

/// Whether a CUDA GPU is usable: driver, NVRTC, cuBLAS and headers found, driver new enough, and
/// at least one device. Checked once per process; never panics.
pub fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| unavailable_reason().is_none())
}

/// Why CUDA can't be used here (None when it can).
pub fn unavailable_reason() -> Option<String> {
    let check = || -> Result<()> {
        let n = gpu::device_count()?;
        ensure!(n > 0, Device, "the NVIDIA driver sees no GPU");
        libs::find_include_dir()?;
        Ok(())
    };
    check().err().map(|e| e.to_string())
}

/// Compile every kernel for compute capability `arch` without a GPU (NVRTC + headers only).
pub fn compile_kernels(arch: (i32, i32)) -> Result<Vec<String>> {
    gpu::no_panic("NVRTC", || compile::compile_all(arch))
}

pub use libs::add_search_dirs;

/// How many CUDA GPUs the driver sees.
pub fn device_count() -> Result<usize> {
    gpu::device_count()
}

/// [rows, cols] row-major in the compute dtype, on the device.
pub struct CudaBuf {
    mem: DevMem,
    pub rows: usize,
    pub cols: usize,
}

impl CudaBuf {
    /// The device address of the first element.
    pub(crate) fn device_ptr(&self) -> u64 {
        self.mem.ptr
    }
}

/// A weight on the device: the compute dtype, except `upload_exact` tables (f32 RoPE).
pub struct CudaWeight {
    mem: DevMem,
    pub shape: Vec<usize>,
    pub dtype: DType,
}

/// One layer's K and V caches, each [n_blocks, block_size, kv_dim] in the compute dtype.
pub struct CudaKv {
    k: DevMem,
    v: DevMem,
    n_blocks: usize,
    block_size: usize,
    kv_dim: usize,
}

/// A sparse MoE layer: router [E, H]; gate, up [E, I, H] and down [E, H, I], each one allocation.
pub struct CudaMoe {
    router: CudaWeight,
    gate: DevMem,
    up: DevMem,
    down: DevMem,
    n_experts: usize,
    inter: usize,
    hidden: usize,
    top_k: usize,
    norm_topk_prob: bool,
}

/// Kinds of metadata buffer (index into `CudaBackend::meta`).
#[derive(Clone, Copy)]
enum Meta {
    Ids,
    Positions,
    Slots,
    RowCtx,
    RowTable,
    Tables,
    Rows,
}
const N_META: usize = 7;

/// Kinds of scratch buffer (index into `CudaBackend::scratch`).
#[derive(Clone, Copy)]
enum Scratch {
    RouterProbs, // [T, E] f32
    TopIds,      // [T, k] i32
    TopWeights,  // [T, k] f32
    SortedSrc,   // [P] i32
    PairPos,     // [P] i32
    TileE,       // [tiles] i32
    TileRow0,    // [tiles] i32
    TileRows,    // [tiles] i32
    Gate,        // [P, I]
    Up,          // [P, I]
    Act,         // [P, I]
    Y,           // [P, H]
    ArgmaxIds,   // [R] u32
}
const N_SCRATCH: usize = 13;

/// A grow-only device buffer that remembers what was last uploaded into it.
#[derive(Default)]
struct Slot {
    mem: Option<DevMem>,
    host: Vec<u8>,
}

pub struct CudaBackend {
    gpu: Gpu,
    ordinal: usize,
    meta: Mutex<Vec<Slot>>,
    scratch: Mutex<Vec<Slot>>,
}

fn check_shape(name: &str, got: (usize, usize), want: (usize, usize)) -> Result<()> {
    ensure!(got == want, InvalidArgument, "{name}: buffer is {got:?}, expected {want:?}");
    Ok(())
}

fn blocks(n: usize, per: usize) -> u32 {
    n.div_ceil(per) as u32
}

fn lock<T>(m: &Mutex<T>) -> Result<std::sync::MutexGuard<'_, T>> {
    m.lock().map_err(|_| Error::Device("CUDA backend state poisoned by an earlier panic".into()))
}

impl CudaBackend {
    /// A backend on GPU `ordinal` computing in `dtype`. Errors (never panics) when CUDA is unusable.
    pub fn new(ordinal: usize, dtype: DType) -> Result<Self> {
        let gpu = Gpu::new(ordinal, dtype).map_err(|e| match e {
            Error::Device(m) => Error::Device(format!("cannot use cuda:{ordinal}: {m}")),
            other => other,
        })?;
        let slots = |n| (0..n).map(|_| Slot::default()).collect::<Vec<_>>();
        Ok(CudaBackend { gpu, ordinal, meta: Mutex::new(slots(N_META)), scratch: Mutex::new(slots(N_SCRATCH)) })
    }

    /// The device index this backend runs on.
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// Bind this backend's context to the calling thread.
    pub(crate) fn bind(&self) -> Result<()> {
        self.gpu.bind()
    }

    /// The raw stream all of this backend's work is ordered on (for NCCL).
    pub(crate) fn stream_handle(&self) -> *mut std::ffi::c_void {
        self.gpu.stream() as *mut std::ffi::c_void
    }

    /// The GPU's name and compute capability, e.g. "NVIDIA H200 (sm_90)".
    pub fn describe(&self) -> String {
        format!("{} (sm_{}{})", self.gpu.name, self.gpu.arch.0, self.gpu.arch.1)
    }

    fn esize(&self) -> usize {
        self.gpu.dtype.size()
    }

    /// Make `slot` hold at least `bytes`; returns its device pointer. Growing frees the old buffer
    /// first (cuMemFree waits for kernels still reading it).
    fn grow(&self, slot: &mut Slot, bytes: usize) -> Result<u64> {
        if slot.mem.as_ref().is_none_or(|m| m.bytes < bytes) {
            slot.mem = None;
            slot.host.clear();
            slot.mem = Some(self.gpu.alloc(bytes.max(256).next_power_of_two())?);
        }
        Ok(slot.mem.as_ref().map_or(0, |m| m.ptr))
    }

    /// Device copy of metadata `bytes` (re-uploaded only when it changed).
    fn meta(&self, kind: Meta, bytes: &[u8]) -> Result<u64> {
        let mut slots = lock(&self.meta)?;
        let slot = &mut slots[kind as usize];
        if slot.mem.is_some() && slot.host == bytes {
            return Ok(slot.mem.as_ref().map_or(0, |m| m.ptr));
        }
        let ptr = self.grow(slot, bytes.len())?;
        self.gpu.upload(slot.mem.as_ref().expect("grown above"), 0, bytes)?;
        slot.host.clear();
        slot.host.extend_from_slice(bytes);
        Ok(ptr)
    }

    /// Device pointers of scratch buffers of the given sizes in bytes.
    fn scratch<const N: usize>(&self, want: [(Scratch, usize); N]) -> Result<[u64; N]> {
        let mut slots = lock(&self.scratch)?;
        let mut out = [0u64; N];
        for (o, (kind, bytes)) in out.iter_mut().zip(want) {
            *o = self.grow(&mut slots[kind as usize], bytes)?;
        }
        Ok(out)
    }

    /// Host bytes of `t` in the compute dtype (converted once here when stored differently).
    fn host_bytes(&self, t: &HostTensor, dtype: DType) -> HostTensor {
        t.to_dtype(dtype)
    }

    fn upload_as(&self, tensor: &HostTensor, dtype: DType) -> Result<CudaWeight> {
        let converted = self.host_bytes(tensor, dtype);
        let mem = self.gpu.alloc(converted.raw().len())?;
        self.gpu.upload(&mem, 0, converted.raw())?;
        Ok(CudaWeight { mem, shape: tensor.shape.clone(), dtype })
    }

    /// Per-row attention metadata of `batch`: cache slot, keys visible, block-table offset; and
    /// the concatenated block tables. Validated like the CPU backend.
    fn batch_meta(&self, batch: &BatchInfo, kv: &CudaKv) -> Result<(u64, u64, u64, u64)> {
        let t = batch.rows();
        let (mut slots, mut ctx, mut table_at, mut tables) = (vec![0u64; t], vec![0u32; t], vec![0u32; t], vec![]);
        for seq in &batch.seqs {
            let at = tables.len() as u32;
            tables.extend_from_slice(seq.blocks);
            for (i, row) in seq.rows.clone().enumerate() {
                ensure!(row < t, InvalidArgument, "sequence row {row} is outside a batch of {t} rows");
                let pos = seq.start_pos + i;
                let block = *seq.blocks.get(pos / kv.block_size)
                    .ok_or_else(|| Error::InvalidArgument(format!("position {pos} has no cache block")))? as usize;
                ensure!(block < kv.n_blocks, InvalidArgument, "cache block {block} out of range");
                slots[row] = (block * kv.block_size + pos % kv.block_size) as u64;
                ctx[row] = (pos + 1) as u32;
                table_at[row] = at;
            }
        }
        if tables.is_empty() {
            tables.push(0);
        }
        Ok((
            self.meta(Meta::Slots, bytemuck::cast_slice(&slots))?,
            self.meta(Meta::RowCtx, bytemuck::cast_slice(&ctx))?,
            self.meta(Meta::RowTable, bytemuck::cast_slice(&table_at))?,
            self.meta(Meta::Tables, bytemuck::cast_slice(&tables))?,
        ))
    }

    /// `n` elements of type T from device address `ptr` (after all queued work).
    fn download_typed<T: bytemuck::Pod>(&self, n: usize, ptr: u64) -> Result<Vec<T>> {
        let mut v = vec![T::zeroed(); n];
        self.gpu.download(bytemuck::cast_slice_mut(&mut v), ptr)?;
        Ok(v)
    }

    fn check_weight(&self, w: &CudaWeight, what: &str) -> Result<()> {
        ensure!(w.dtype == self.gpu.dtype, InvalidArgument, "{what}: weight is {}, backend computes in {}", w.dtype.name(), self.gpu.dtype.name());
        Ok(())
    }

    /// out [T, N] = x [T, K] · w [N, K]ᵀ on raw pointers.
    fn matmul_raw(&self, out: u64, x: u64, w: u64, t: usize, n: usize, k: usize) -> Result<()> {
        if t == 0 || n == 0 {
            return Ok(());
        }
        if t <= GEMV_MAX_ROWS {
            let vec = 16 / self.esize();
            let kernel = if k % vec == 0 { "gemv" } else { "gemv_scalar" };
            let (ti, ni, ki) = (t as i32, n as i32, k as i32);
            self.gpu.launch("matmul", kernel, (blocks(n, 8), 1, 1), 256, 0, args![out, x, w, ti, ni, ki])
        } else {
            self.gpu.gemm(out, x, w, t, n, k)
        }
    }
}

impl Backend for CudaBackend {
    type Buf = CudaBuf;
    type Weight = CudaWeight;
    type KvLayer = CudaKv;
    type Moe = CudaMoe;

    fn device_name(&self) -> String {
        format!("cuda:{}", self.ordinal)
    }

    fn dtype(&self) -> DType {
        self.gpu.dtype
    }

    fn upload(&self, tensor: HostTensor) -> Result<CudaWeight> {
        self.upload_as(&tensor, self.gpu.dtype)
    }

    fn upload_exact(&self, tensor: HostTensor) -> Result<CudaWeight> {
        let dtype = tensor.dtype;
        self.upload_as(&tensor, dtype)
    }

    fn upload_moe(&self, moe: MoeHost) -> Result<CudaMoe> {
        let (e, h) = (moe.router.shape[0], moe.router.shape[1]);
        ensure!(e == moe.experts.len() && e > 0, InvalidArgument, "MoE router has {e} rows for {} experts", moe.experts.len());
        ensure!(moe.top_k >= 1 && moe.top_k <= e.min(MAX_TOP_K), InvalidArgument, "MoE top_k {} must be in 1..={}", moe.top_k, e.min(MAX_TOP_K));
        ensure!(e <= 1024, InvalidArgument, "the CUDA backend routes at most 1024 experts, got {e}");
        let inter = moe.experts[0][0].shape[0];
        let es = self.esize();
        let per = inter * h * es;
        let (gate, up, down) = (self.gpu.alloc(e * per)?, self.gpu.alloc(e * per)?, self.gpu.alloc(e * per)?);
        // Expert by expert straight into its place: no host copy of a whole layer.
        for (i, [g, u, d]) in moe.experts.iter().enumerate() {
            for (dst, t) in [(&gate, g), (&up, u), (&down, d)] {
                ensure!(t.numel() == inter * h, InvalidArgument, "expert {i}: tensor of {:?} elements, expected {}", t.shape, inter * h);
                self.gpu.upload(dst, i * per, self.host_bytes(t, self.gpu.dtype).raw())?;
            }
        }
        let router = self.upload(moe.router)?;
        Ok(CudaMoe { router, gate, up, down, n_experts: e, inter, hidden: h, top_k: moe.top_k, norm_topk_prob: moe.norm_topk_prob })
    }

    fn alloc(&self, rows: usize, cols: usize) -> Result<CudaBuf> {
        let bytes = rows.checked_mul(cols).and_then(|n| n.checked_mul(self.esize()))
            .ok_or_else(|| Error::InvalidArgument("buffer size overflows".into()))?;
        Ok(CudaBuf { mem: self.gpu.alloc_zeroed(bytes)?, rows, cols })
    }

    fn alloc_kv(&self, n_blocks: usize, block_size: usize, kv_dim: usize) -> Result<CudaKv> {
        let bytes = n_blocks.checked_mul(block_size).and_then(|n| n.checked_mul(kv_dim)).and_then(|n| n.checked_mul(self.esize()))
            .ok_or_else(|| Error::InvalidArgument("KV cache size overflows".into()))?;
        // Committed up front: an impossible max_seq_len fails here, at load, not mid-generation.
        let k = self.gpu.alloc(bytes)?;
        let v = self.gpu.alloc(bytes)?;
        Ok(CudaKv { k, v, n_blocks, block_size, kv_dim })
    }

    fn upload_buf(&self, rows: usize, cols: usize, data: &[f32]) -> Result<CudaBuf> {
        ensure!(data.len() == rows * cols, InvalidArgument, "upload_buf: {} values for a [{rows}, {cols}] buffer", data.len());
        let host = HostTensor::from_f32(data, vec![rows, cols]).to_dtype(self.gpu.dtype);
        let buf = CudaBuf { mem: self.gpu.alloc(host.raw().len())?, rows, cols };
        self.gpu.upload(&buf.mem, 0, host.raw())?;
        Ok(buf)
    }

    fn download(&self, buf: &CudaBuf) -> Result<Vec<f32>> {
        let n = buf.rows * buf.cols;
        Ok(match self.gpu.dtype {
            DType::F32 => self.download_typed::<f32>(n, buf.mem.ptr)?,
            DType::BF16 => self.download_typed::<bf16>(n, buf.mem.ptr)?.iter().map(|x| x.to_f32()).collect(),
            DType::F16 => self.download_typed::<f16>(n, buf.mem.ptr)?.iter().map(|x| x.to_f32()).collect(),
        })
    }

    fn embed(&self, out: &mut CudaBuf, table: &CudaWeight, ids: &[u32]) -> Result<()> {
        self.check_weight(table, "embed")?;
        let (vocab, h) = (table.shape[0], table.shape[1]);
        check_shape("embed", (out.rows, out.cols), (ids.len(), h))?;
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= vocab) {
            bail!(InvalidArgument, "token id {bad} is out of range for a vocabulary of {vocab}");
        }
        let ids_d = self.meta(Meta::Ids, bytemuck::cast_slice(ids))?;
        let (o, t, hi, vi) = (out.mem.ptr, table.mem.ptr, h as i32, vocab as i32);
        self.gpu.launch("elementwise", "embed", (blocks(h, 256), ids.len() as u32, 1), 256, 0, args![o, t, ids_d, hi, vi])
    }

    fn rms_norm(&self, out: &mut CudaBuf, x: &CudaBuf, w: &CudaWeight, eps: f32) -> Result<()> {
        check_shape("rms_norm", (out.rows, out.cols), (x.rows, x.cols))?;
        self.check_weight(w, "rms_norm")?;
        let (o, xp, wp, c) = (out.mem.ptr, x.mem.ptr, w.mem.ptr, x.cols as i32);
        self.gpu.launch("norm", "rms_norm", (x.rows as u32, 1, 1), 256, 0, args![o, xp, wp, c, eps])
    }

    fn add_rms_norm(&self, residual: &mut CudaBuf, delta: &CudaBuf, out: &mut CudaBuf, w: &CudaWeight, eps: f32) -> Result<()> {
        check_shape("add_rms_norm", (delta.rows, delta.cols), (residual.rows, residual.cols))?;
        check_shape("add_rms_norm", (out.rows, out.cols), (residual.rows, residual.cols))?;
        self.check_weight(w, "add_rms_norm")?;
        let (r, d, o, wp, c) = (residual.mem.ptr, delta.mem.ptr, out.mem.ptr, w.mem.ptr, residual.cols as i32);
        self.gpu.launch("norm", "add_rms_norm", (residual.rows as u32, 1, 1), 256, 0, args![r, d, o, wp, c, eps])
    }

    fn matmul(&self, out: &mut CudaBuf, x: &CudaBuf, w: &CudaWeight) -> Result<()> {
        self.check_weight(w, "matmul")?;
        ensure!(w.shape.len() == 2 && w.shape[1] == x.cols, InvalidArgument,
            "matmul: weight {:?} does not take rows of {}", w.shape, x.cols);
        check_shape("matmul", (out.rows, out.cols), (x.rows, w.shape[0]))?;
        self.matmul_raw(out.mem.ptr, x.mem.ptr, w.mem.ptr, x.rows, w.shape[0], x.cols)
    }

    fn qk_norm_rope(&self, q: &mut CudaBuf, k: &mut CudaBuf, q_norm: &CudaWeight, k_norm: &CudaWeight, eps: f32,
        rope: &CudaWeight, positions: &[u32], shape: AttnShape) -> Result<()> {
        let hd = shape.head_dim;
        ensure!(rope.dtype == DType::F32 && rope.shape.len() == 2 && rope.shape[1] == hd, InvalidArgument, "rope table must be f32 [max_pos, head_dim]");
        let max_pos = rope.shape[0];
        if let Some(&p) = positions.iter().find(|&&p| p as usize >= max_pos) {
            bail!(InvalidArgument, "position {p} is past the RoPE table ({max_pos})");
        }
        check_shape("qk_norm_rope", (q.rows, q.cols), (positions.len(), shape.n_heads * hd))?;
        check_shape("qk_norm_rope", (k.rows, k.cols), (positions.len(), shape.n_kv_heads * hd))?;
        self.check_weight(q_norm, "q_norm")?;
        self.check_weight(k_norm, "k_norm")?;
        let pos = self.meta(Meta::Positions, bytemuck::cast_slice(positions))?;
        let (qp, kp, qn, kn, rp) = (q.mem.ptr, k.mem.ptr, q_norm.mem.ptr, k_norm.mem.ptr, rope.mem.ptr);
        let (nh, nkv, hdi) = (shape.n_heads as i32, shape.n_kv_heads as i32, hd as i32);
        let grid = ((shape.n_heads + shape.n_kv_heads) as u32, positions.len() as u32, 1);
        self.gpu.launch("norm", "qk_norm_rope", grid, 128, (hd * 4) as u32, args![qp, kp, qn, kn, rp, pos, nh, nkv, hdi, eps])
    }

    fn kv_append(&self, kv: &mut CudaKv, k: &CudaBuf, v: &CudaBuf, batch: &BatchInfo) -> Result<()> {
        let d = kv.kv_dim;
        check_shape("kv_append", (k.rows, k.cols), (batch.rows(), d))?;
        check_shape("kv_append", (v.rows, v.cols), (batch.rows(), d))?;
        let (slots, _, _, _) = self.batch_meta(batch, kv)?;
        let (kc, vc, kp, vp, di) = (kv.k.ptr, kv.v.ptr, k.mem.ptr, v.mem.ptr, d as i32);
        self.gpu.launch("attention", "kv_append", (blocks(d, 256), batch.rows() as u32, 1), 256, 0, args![kc, vc, kp, vp, slots, di])
    }

    fn attention(&self, out: &mut CudaBuf, q: &CudaBuf, kv: &CudaKv, batch: &BatchInfo, shape: AttnShape) -> Result<()> {
        let (nh, hd) = (shape.n_heads, shape.head_dim);
        ensure!(hd <= MAX_HEAD_DIM, InvalidArgument, "the CUDA attention kernel takes head_dim <= {MAX_HEAD_DIM}, got {hd}");
        ensure!(shape.n_kv_heads > 0 && nh % shape.n_kv_heads == 0, InvalidArgument, "n_heads must be a multiple of n_kv_heads");
        check_shape("attention", (out.rows, out.cols), (q.rows, nh * hd))?;
        check_shape("attention", (q.rows, 1), (batch.rows(), 1))?;
        let (_, ctx, table_at, tables) = self.batch_meta(batch, kv)?;
        let (o, qp, kc, vc) = (out.mem.ptr, q.mem.ptr, kv.k.ptr, kv.v.ptr);
        let (nhi, nkv, hdi, bs, kvd) = (nh as i32, shape.n_kv_heads as i32, hd as i32, kv.block_size as i32, kv.kv_dim as i32);
        let scale = 1.0 / (hd as f32).sqrt();
        self.gpu.launch("attention", "attention", (nh as u32, q.rows as u32, 1), 128, 0,
            args![o, qp, kc, vc, ctx, table_at, tables, nhi, nkv, hdi, bs, kvd, scale])
    }

    fn swiglu(&self, out: &mut CudaBuf, gate: &CudaBuf, up: &CudaBuf) -> Result<()> {
        check_shape("swiglu", (out.rows, out.cols), (gate.rows, gate.cols))?;
        check_shape("swiglu", (up.rows, up.cols), (gate.rows, gate.cols))?;
        let n = (gate.rows * gate.cols) as i64;
        let (o, g, u) = (out.mem.ptr, gate.mem.ptr, up.mem.ptr);
        self.gpu.launch("elementwise", "swiglu", (blocks(n as usize, 256), 1, 1), 256, 0, args![o, g, u, n])
    }

    fn moe(&self, out: &mut CudaBuf, x: &CudaBuf, moe: &CudaMoe) -> Result<()> {
        let (t, h, e, k, inter) = (x.rows, x.cols, moe.n_experts, moe.top_k, moe.inter);
        check_shape("moe", (out.rows, out.cols), (t, h))?;
        ensure!(h == moe.hidden, InvalidArgument, "moe: rows of {h}, experts take {}", moe.hidden);
        if t == 0 {
            return Ok(());
        }
        let p = t * k;
        let max_tiles = p.div_ceil(MOE_TILE_ROWS) + e;
        let es = self.esize();
        let [probs, ids, weights, sorted, pair_pos, tile_e, tile_row0, tile_rows, g, u, act, y] = self.scratch([
            (Scratch::RouterProbs, t * e * 4), (Scratch::TopIds, p * 4), (Scratch::TopWeights, p * 4),
            (Scratch::SortedSrc, p * 4), (Scratch::PairPos, p * 4), (Scratch::TileE, max_tiles * 4),
            (Scratch::TileRow0, max_tiles * 4), (Scratch::TileRows, max_tiles * 4), (Scratch::Gate, p * inter * es),
            (Scratch::Up, p * inter * es), (Scratch::Act, p * inter * es), (Scratch::Y, p * h * es),
        ])?;
        let (xp, rp, (ei, hi, ii, ki, ti, pi)) = (x.mem.ptr, moe.router.mem.ptr, (e as i32, h as i32, inter as i32, k as i32, t as i32, p as i32));
        // 1. Router logits in f32, then softmax / top-k / renormalisation per row.
        self.gpu.launch("matmul", "router_logits", (blocks(e, 8), t as u32, 1), 256, 0, args![probs, xp, rp, ei, hi])?;
        let norm = moe.norm_topk_prob as i32;
        self.gpu.launch("moe", "moe_route", (blocks(t, 128), 1, 1), 128, 0, args![probs, ids, weights, ti, ei, ki, norm])?;
        // 2. Group the (row, expert) pairs by expert into tiles.
        let (tm, mt) = (MOE_TILE_ROWS as i32, max_tiles as i32);
        self.gpu.launch("moe", "moe_sort", (1, 1, 1), 1024, (2 * e * 4) as u32,
            args![ids, pi, ki, ei, tm, mt, sorted, pair_pos, tile_e, tile_row0, tile_rows])?;
        // 3. Experts: gate and up over the gathered rows, SwiGLU, down.
        let (gp, up, dp, null) = (moe.gate.ptr, moe.up.ptr, moe.down.ptr, 0u64);
        let grid_i = (blocks(inter, 64), max_tiles as u32, 1);
        self.gpu.launch("matmul", "grouped_gemm", grid_i, 256, 0, args![g, xp, gp, sorted, tile_e, tile_row0, tile_rows, ii, hi])?;
        self.gpu.launch("matmul", "grouped_gemm", grid_i, 256, 0, args![u, xp, up, sorted, tile_e, tile_row0, tile_rows, ii, hi])?;
        let n = (p * inter) as i64;
        self.gpu.launch("elementwise", "swiglu", (blocks(p * inter, 256), 1, 1), 256, 0, args![act, g, u, n])?;
        self.gpu.launch("matmul", "grouped_gemm", (blocks(h, 64), max_tiles as u32, 1), 256, 0,
            args![y, act, dp, null, tile_e, tile_row0, tile_rows, hi, ii])?;
        // 4. Weighted sum per row, in ascending expert order.
        let o = out.mem.ptr;
        self.gpu.launch("moe", "moe_combine", (blocks(h, 256), t as u32, 1), 256, 0, args![o, y, pair_pos, weights, ki, hi])
    }

    fn gather_rows(&self, out: &mut CudaBuf, x: &CudaBuf, rows: &[u32]) -> Result<()> {
        check_shape("gather_rows", (out.rows, out.cols), (rows.len(), x.cols))?;
        if let Some(&r) = rows.iter().find(|&&r| r as usize >= x.rows) {
            bail!(InvalidArgument, "gather_rows: row {r} out of range");
        }
        let rows_d = self.meta(Meta::Rows, bytemuck::cast_slice(rows))?;
        let (o, xp, c) = (out.mem.ptr, x.mem.ptr, x.cols as i32);
        self.gpu.launch("elementwise", "gather_rows", (blocks(x.cols, 256), rows.len() as u32, 1), 256, 0, args![o, xp, rows_d, c])
    }

    fn argmax_rows(&self, logits: &CudaBuf, rows: usize, limit: usize) -> Result<Vec<u32>> {
        let r = logits.rows;
        ensure!(rows == r, InvalidArgument, "argmax_rows: buffer has {r} rows, caller expects {rows}");
        let [ids] = self.scratch([(Scratch::ArgmaxIds, r * 4)])?;
        let (xp, c, l) = (logits.mem.ptr, logits.cols as i32, limit.min(logits.cols) as i32);
        self.gpu.launch("elementwise", "argmax_rows", (r as u32, 1, 1), 1024, 0, args![ids, xp, c, l])?;
        self.download_typed::<u32>(r, ids)
    }
}
