//! The CPU backend: f32 activations, weights used in place as stored (bf16/f16/f32, usually straight
//! from the memory map), rayon over output columns / heads. With dtype bfloat16 (or float16) every op
//! rounds its output to that dtype and the KV cache is stored in it, so the CPU reproduces what a
//! bf16 GPU computes. KV blocks are committed lazily: a long `max_seq_len` costs nothing until used.

pub mod kernels;

use super::{AttnShape, Backend, BatchInfo, MoeHost};
use crate::error::Result;
use crate::tensor::{DType, Elems, HostTensor};
use crate::{bail, ensure};
use half::{bf16, f16};
use kernels::Elem;
use rayon::prelude::*;

pub struct CpuBackend {
    dtype: DType,
}

impl CpuBackend {
    pub fn new(dtype: DType) -> Self {
        CpuBackend { dtype }
    }

    /// Round activations to the compute dtype (no-op in f32).
    fn round(&self, v: &mut [f32]) {
        match self.dtype {
            DType::F32 => {}
            DType::BF16 => v.iter_mut().for_each(|x| *x = bf16::from_f32(*x).to_f32()),
            DType::F16 => v.iter_mut().for_each(|x| *x = f16::from_f32(*x).to_f32()),
        }
    }
}

/// [rows, cols] f32, row-major.
#[derive(Clone, Debug)]
pub struct CpuBuf {
    pub data: Vec<f32>,
    pub rows: usize,
    pub cols: usize,
}

impl CpuBuf {
    pub fn row(&self, r: usize) -> &[f32] {
        &self.data[r * self.cols..(r + 1) * self.cols]
    }
}

enum KvData {
    F32(Vec<f32>),
    BF16(Vec<bf16>),
    F16(Vec<f16>),
}

/// One layer's K and V blocks, each [n_blocks, block_size, kv_dim], grown on first write.
pub struct CpuKv {
    k: KvData,
    v: KvData,
    n_blocks: usize,
    block_size: usize,
    kv_dim: usize,
}

pub struct CpuMoe {
    router: HostTensor,
    experts: Vec<[HostTensor; 3]>,
    top_k: usize,
    norm_topk_prob: bool,
}

/// A raw pointer that rayon tasks may share, for writes to provably disjoint elements.
#[derive(Clone, Copy)]
struct SharedMut(*mut f32);
// SAFETY: only used by kernels whose tasks write disjoint indices and finish before the borrow ends.
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

fn check_shape(name: &str, got: (usize, usize), want: (usize, usize)) -> Result<()> {
    ensure!(got == want, InvalidArgument, "{name}: buffer is {got:?}, expected {want:?}");
    Ok(())
}

fn elems_of(w: &HostTensor) -> Elems<'_> {
    w.elems()
}

/// out [T, N] = x [T, K] · w [N, K]ᵀ; each task reads a block of weight rows once for all T rows.
fn matmul_typed<W: Elem>(out: &mut [f32], x: &[f32], w: &[W], t: usize, n: usize, k: usize) {
    const COLS_PER_TASK: usize = 16;
    let out_ptr = SharedMut(out.as_mut_ptr());
    (0..n.div_ceil(COLS_PER_TASK)).into_par_iter().for_each(|b| {
        // Capture the Sync wrapper whole (a closure would otherwise capture its raw-pointer field).
        #[allow(clippy::redundant_locals)]
        let out_ptr = out_ptr;
        for j in b * COLS_PER_TASK..n.min((b + 1) * COLS_PER_TASK) {
            let w_row = &w[j * k..(j + 1) * k];
            for i in 0..t {
                let v = kernels::dot(w_row, &x[i * k..(i + 1) * k]);
                // SAFETY: (i, j) is written by exactly one task (j is in this task's block) and
                // i*n + j < t*n = out.len().
                unsafe { *out_ptr.0.add(i * n + j) = v };
            }
        }
    });
}

pub(crate) fn matmul_host(out: &mut [f32], x: &[f32], w: &HostTensor, t: usize) {
    let (n, k) = (w.shape[0], w.shape[1]);
    match elems_of(w) {
        Elems::F32(ws) => matmul_typed(out, x, ws, t, n, k),
        Elems::BF16(ws) => matmul_typed(out, x, ws, t, n, k),
        Elems::F16(ws) => matmul_typed(out, x, ws, t, n, k),
    }
}

fn rms_norm_rows(out: &mut [f32], x: &[f32], w: &HostTensor, cols: usize, eps: f32) {
    let rows = out.par_chunks_mut(cols).zip(x.par_chunks(cols));
    match elems_of(w) {
        Elems::F32(g) => rows.for_each(|(o, x)| kernels::rms_norm(o, x, g, eps)),
        Elems::BF16(g) => rows.for_each(|(o, x)| kernels::rms_norm(o, x, g, eps)),
        Elems::F16(g) => rows.for_each(|(o, x)| kernels::rms_norm(o, x, g, eps)),
    }
}

impl KvData {
    fn new(dtype: DType) -> Self {
        match dtype {
            DType::F32 => KvData::F32(vec![]),
            DType::BF16 => KvData::BF16(vec![]),
            DType::F16 => KvData::F16(vec![]),
        }
    }

    fn write(&mut self, at: usize, src: &[f32]) {
        fn put<T: Elem>(dst: &mut Vec<T>, at: usize, src: &[f32]) {
            if dst.len() < at + src.len() {
                dst.resize(at + src.len(), T::from_f32(0.0));
            }
            for (d, &s) in dst[at..at + src.len()].iter_mut().zip(src) {
                *d = T::from_f32(s);
            }
        }
        match self {
            KvData::F32(d) => put(d, at, src),
            KvData::BF16(d) => put(d, at, src),
            KvData::F16(d) => put(d, at, src),
        }
    }
}

/// Causal attention of one query head over one sequence's cached keys/values.
#[allow(clippy::too_many_arguments)]
fn attend_head<T: Elem>(out: &mut [f32], q: &[f32], k: &[T], v: &[T], ctx: usize, blocks: &[u32],
    block_size: usize, kv_dim: usize, kv_off: usize, scores: &mut Vec<f32>) {
    let hd = q.len();
    let scale = 1.0 / (hd as f32).sqrt();
    let slot = |j: usize| (blocks[j / block_size] as usize * block_size + j % block_size) * kv_dim + kv_off;
    scores.clear();
    for j in 0..ctx {
        let s = slot(j);
        scores.push(kernels::dot(&k[s..s + hd], q) * scale);
    }
    kernels::softmax(scores);
    out.fill(0.0);
    for (j, &p) in scores.iter().enumerate() {
        let s = slot(j);
        for (o, &x) in out.iter_mut().zip(&v[s..s + hd]) {
            *o += p * x.to_f32();
        }
    }
}

impl Backend for CpuBackend {
    type Buf = CpuBuf;
    type Weight = HostTensor;
    type KvLayer = CpuKv;
    type Moe = CpuMoe;

    fn device_name(&self) -> String {
        "cpu".into()
    }

    fn dtype(&self) -> DType {
        self.dtype
    }

    fn upload(&self, tensor: HostTensor) -> Result<HostTensor> {
        // f32 compute keeps bf16/f16 weights as stored (widening is exact); bf16 compute of f32 or
        // f16 weights converts them once, so the math equals a bf16 model's.
        match (self.dtype, tensor.dtype) {
            (DType::F32, _) => Ok(tensor),
            (d, s) if d == s => Ok(tensor),
            (d, _) => Ok(tensor.to_dtype(d)),
        }
    }

    fn upload_exact(&self, tensor: HostTensor) -> Result<HostTensor> {
        Ok(tensor)
    }

    fn upload_moe(&self, moe: MoeHost) -> Result<CpuMoe> {
        let experts = moe
            .experts
            .into_iter()
            .map(|[g, u, d]| Ok([self.upload(g)?, self.upload(u)?, self.upload(d)?]))
            .collect::<Result<Vec<_>>>()?;
        Ok(CpuMoe { router: self.upload(moe.router)?, experts, top_k: moe.top_k, norm_topk_prob: moe.norm_topk_prob })
    }

    fn alloc(&self, rows: usize, cols: usize) -> Result<CpuBuf> {
        let len = rows.checked_mul(cols).ok_or_else(|| crate::Error::InvalidArgument("buffer size overflows".into()))?;
        let mut data = Vec::new();
        data.try_reserve_exact(len)
            .map_err(|_| crate::Error::OutOfMemory(format!("cannot allocate a [{rows}, {cols}] f32 buffer")))?;
        data.resize(len, 0.0);
        Ok(CpuBuf { data, rows, cols })
    }

    fn alloc_kv(&self, n_blocks: usize, block_size: usize, kv_dim: usize) -> Result<CpuKv> {
        Ok(CpuKv { k: KvData::new(self.dtype), v: KvData::new(self.dtype), n_blocks, block_size, kv_dim })
    }

    fn upload_buf(&self, rows: usize, cols: usize, data: &[f32]) -> Result<CpuBuf> {
        ensure!(data.len() == rows * cols, InvalidArgument, "upload_buf: {} values for a [{rows}, {cols}] buffer", data.len());
        let mut buf = CpuBuf { data: data.to_vec(), rows, cols };
        self.round(&mut buf.data);
        Ok(buf)
    }

    fn download(&self, buf: &CpuBuf) -> Result<Vec<f32>> {
        Ok(buf.data.clone())
    }

    fn embed(&self, out: &mut CpuBuf, table: &HostTensor, ids: &[u32]) -> Result<()> {
        let (vocab, h) = (table.shape[0], table.shape[1]);
        check_shape("embed", (out.rows, out.cols), (ids.len(), h))?;
        for (row, &id) in out.data.chunks_mut(h).zip(ids) {
            ensure!((id as usize) < vocab, InvalidArgument, "token id {id} is out of range for a vocabulary of {vocab}");
            let id = id as usize;
            match table.elems() {
                Elems::F32(t) => row.copy_from_slice(&t[id * h..(id + 1) * h]),
                Elems::BF16(t) => row.iter_mut().zip(&t[id * h..(id + 1) * h]).for_each(|(o, v)| *o = v.to_f32()),
                Elems::F16(t) => row.iter_mut().zip(&t[id * h..(id + 1) * h]).for_each(|(o, v)| *o = v.to_f32()),
            }
        }
        self.round(&mut out.data);
        Ok(())
    }

    fn rms_norm(&self, out: &mut CpuBuf, x: &CpuBuf, w: &HostTensor, eps: f32) -> Result<()> {
        check_shape("rms_norm", (out.rows, out.cols), (x.rows, x.cols))?;
        rms_norm_rows(&mut out.data, &x.data, w, x.cols, eps);
        self.round(&mut out.data);
        Ok(())
    }

    fn add_rms_norm(&self, residual: &mut CpuBuf, delta: &CpuBuf, out: &mut CpuBuf, w: &HostTensor, eps: f32) -> Result<()> {
        check_shape("add_rms_norm", (delta.rows, delta.cols), (residual.rows, residual.cols))?;
        residual.data.iter_mut().zip(&delta.data).for_each(|(r, d)| *r += d);
        self.round(&mut residual.data);
        self.rms_norm(out, residual, w, eps)
    }

    fn matmul(&self, out: &mut CpuBuf, x: &CpuBuf, w: &HostTensor) -> Result<()> {
        ensure!(w.shape.len() == 2 && w.shape[1] == x.cols, InvalidArgument,
            "matmul: weight {:?} does not take rows of {}", w.shape, x.cols);
        check_shape("matmul", (out.rows, out.cols), (x.rows, w.shape[0]))?;
        matmul_host(&mut out.data, &x.data, w, x.rows);
        self.round(&mut out.data);
        Ok(())
    }

    fn qk_norm_rope(&self, q: &mut CpuBuf, k: &mut CpuBuf, q_norm: &HostTensor, k_norm: &HostTensor, eps: f32,
        rope: &HostTensor, positions: &[u32], shape: AttnShape) -> Result<()> {
        let hd = shape.head_dim;
        let table = match rope.elems() {
            Elems::F32(t) => t,
            _ => bail!(InvalidArgument, "rope table must be f32"),
        };
        let max_pos = rope.shape[0];
        for &p in positions {
            ensure!((p as usize) < max_pos, InvalidArgument, "position {p} is past the RoPE table ({max_pos})");
        }
        for (buf, w, heads) in [(&mut *q, q_norm, shape.n_heads), (&mut *k, k_norm, shape.n_kv_heads)] {
            check_shape("qk_norm_rope", (buf.rows, buf.cols), (positions.len(), heads * hd))?;
            let mut normed = vec![0f32; buf.data.len()];
            rms_norm_rows(&mut normed, &buf.data, w, hd, eps);
            self.round(&mut normed);
            for (row, &p) in normed.chunks_mut(heads * hd).zip(positions) {
                let cs = &table[p as usize * hd..(p as usize + 1) * hd];
                for head in row.chunks_mut(hd) {
                    kernels::rope(head, &cs[..hd / 2], &cs[hd / 2..]);
                }
            }
            self.round(&mut normed);
            buf.data = normed;
        }
        Ok(())
    }

    fn kv_append(&self, kv: &mut CpuKv, k: &CpuBuf, v: &CpuBuf, batch: &BatchInfo) -> Result<()> {
        let d = kv.kv_dim;
        check_shape("kv_append", (k.rows, k.cols), (batch.rows(), d))?;
        for seq in &batch.seqs {
            for (i, row) in seq.rows.clone().enumerate() {
                let pos = seq.start_pos + i;
                let block = *seq.blocks.get(pos / kv.block_size).ok_or_else(|| {
                    crate::Error::InvalidArgument(format!("position {pos} has no cache block"))
                })? as usize;
                ensure!(block < kv.n_blocks, InvalidArgument, "cache block {block} out of range");
                let at = (block * kv.block_size + pos % kv.block_size) * d;
                kv.k.write(at, k.row(row));
                kv.v.write(at, v.row(row));
            }
        }
        Ok(())
    }

    fn attention(&self, out: &mut CpuBuf, q: &CpuBuf, kv: &CpuKv, batch: &BatchInfo, shape: AttnShape) -> Result<()> {
        let (nh, hd) = (shape.n_heads, shape.head_dim);
        let group = nh / shape.n_kv_heads;
        check_shape("attention", (out.rows, out.cols), (q.rows, nh * hd))?;
        // Which sequence each row belongs to, and how many positions it sees (itself included).
        let mut row_seq = vec![0usize; q.rows];
        for (s, seq) in batch.seqs.iter().enumerate() {
            row_seq[seq.rows.clone()].iter_mut().for_each(|x| *x = s);
        }
        let (bs, d) = (kv.block_size, kv.kv_dim);
        out.data.par_chunks_mut(hd).enumerate().for_each_init(Vec::new, |scores, (i, o)| {
            let (row, h) = (i / nh, i % nh);
            let seq = &batch.seqs[row_seq[row]];
            let ctx = seq.start_pos + (row - seq.rows.start) + 1;
            let qh = &q.data[row * nh * hd + h * hd..row * nh * hd + (h + 1) * hd];
            let kv_off = (h / group) * hd;
            match (&kv.k, &kv.v) {
                (KvData::F32(k), KvData::F32(v)) => attend_head(o, qh, k, v, ctx, seq.blocks, bs, d, kv_off, scores),
                (KvData::BF16(k), KvData::BF16(v)) => attend_head(o, qh, k, v, ctx, seq.blocks, bs, d, kv_off, scores),
                (KvData::F16(k), KvData::F16(v)) => attend_head(o, qh, k, v, ctx, seq.blocks, bs, d, kv_off, scores),
                _ => unreachable!("K and V are created with one dtype"),
            }
        });
        self.round(&mut out.data);
        Ok(())
    }

    fn swiglu(&self, out: &mut CpuBuf, gate: &CpuBuf, up: &CpuBuf) -> Result<()> {
        check_shape("swiglu", (out.rows, out.cols), (gate.rows, gate.cols))?;
        check_shape("swiglu", (up.rows, up.cols), (gate.rows, gate.cols))?;
        // In bf16, transformers rounds silu(gate) before multiplying; do the same.
        let mut act: Vec<f32> = gate.data.iter().map(|&g| kernels::silu(g)).collect();
        self.round(&mut act);
        out.data.iter_mut().zip(act).zip(&up.data).for_each(|((o, a), &u)| *o = a * u);
        self.round(&mut out.data);
        Ok(())
    }

    fn moe(&self, out: &mut CpuBuf, x: &CpuBuf, moe: &CpuMoe) -> Result<()> {
        let (t, h) = (x.rows, x.cols);
        let n_experts = moe.router.shape[0];
        check_shape("moe", (out.rows, out.cols), (t, h))?;
        // 1. Router: logits and softmax in f32 (a bf16 round here flips near-tied expert choices),
        //    top-k, optional renormalisation.
        let mut logits = vec![0f32; t * n_experts];
        matmul_host(&mut logits, &x.data, &moe.router, t);
        let mut routes: Vec<Vec<(usize, f32)>> = vec![vec![]; n_experts]; // expert → (row, weight)
        for (row, l) in logits.chunks_mut(n_experts).enumerate() {
            kernels::softmax(l);
            let top = kernels::top_k(l, moe.top_k);
            let total: f32 = if moe.norm_topk_prob { top.iter().map(|&e| l[e]).sum() } else { 1.0 };
            for e in top {
                routes[e].push((row, l[e] / total));
            }
        }
        // 2. Experts in ascending order, each over the rows routed to it.
        out.data.fill(0.0);
        for (e, rows) in routes.iter().enumerate().filter(|(_, r)| !r.is_empty()) {
            let [gate, up, down] = &moe.experts[e];
            let inter = gate.shape[0];
            let n = rows.len();
            let mut xe = CpuBuf { data: Vec::with_capacity(n * h), rows: n, cols: h };
            rows.iter().for_each(|&(r, _)| xe.data.extend_from_slice(x.row(r)));
            let mut g = self.alloc(n, inter)?;
            let mut u = self.alloc(n, inter)?;
            self.matmul(&mut g, &xe, gate)?;
            self.matmul(&mut u, &xe, up)?;
            let mut a = self.alloc(n, inter)?;
            self.swiglu(&mut a, &g, &u)?;
            let mut y = self.alloc(n, h)?;
            self.matmul(&mut y, &a, down)?;
            for (i, &(r, w)) in rows.iter().enumerate() {
                let mut contrib: Vec<f32> = y.row(i).iter().map(|v| v * w).collect();
                self.round(&mut contrib);
                let dst = &mut out.data[r * h..(r + 1) * h];
                dst.iter_mut().zip(contrib).for_each(|(o, c)| *o += c);
                self.round(dst);
            }
        }
        Ok(())
    }

    fn gather_rows(&self, out: &mut CpuBuf, x: &CpuBuf, rows: &[u32]) -> Result<()> {
        check_shape("gather_rows", (out.rows, out.cols), (rows.len(), x.cols))?;
        for (dst, &r) in out.data.chunks_mut(x.cols).zip(rows) {
            ensure!((r as usize) < x.rows, InvalidArgument, "gather_rows: row {r} out of range");
            dst.copy_from_slice(x.row(r as usize));
        }
        Ok(())
    }
}

/// CPU ranks of a tensor-parallel group live in one process: the all-reduce is a plain sum (in rank
/// order, rounded to the compute dtype like a reduction in that dtype). A stand-in that tests the
/// sharding logic without GPUs.
impl super::tp::Collective for CpuBackend {
    type Group = ();

    fn group(_ranks: &[Self]) -> Result<()> {
        Ok(())
    }

    fn all_reduce_sum(_group: &(), ranks: &[Self], bufs: &mut [CpuBuf]) -> Result<()> {
        let Some((first, rest)) = bufs.split_first_mut() else { return Ok(()) };
        for b in rest.iter() {
            ensure!(b.data.len() == first.data.len(), InvalidArgument, "all_reduce: ranks hold buffers of different sizes");
            first.data.iter_mut().zip(&b.data).for_each(|(s, x)| *s += x);
        }
        ranks[0].round(&mut first.data);
        for b in rest.iter_mut() {
            b.data.copy_from_slice(&first.data);
        }
        Ok(())
    }
}
