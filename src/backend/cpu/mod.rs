//! The CPU backend: f32 activations, weights used in place as stored (bf16/f16/f32, usually straight
//! from the memory map), rayon over output columns / heads. With dtype bfloat16 (or float16) every op
//! rounds its output to that dtype and the KV cache is stored in it, so the CPU reproduces what a
//! bf16 GPU computes. KV blocks are committed lazily: a long `max_seq_len` costs nothing until used.

pub mod kernels;
pub mod simd;
#[cfg(test)]
mod tests;

use super::{AttnShape, Backend, BatchInfo, BlockInput, MoeHost};
use crate::error::Result;
use crate::tensor::{DType, Elems, HostTensor};
use crate::{bail, ensure};
use half::{bf16, f16};
use kernels::Elem;
use rayon::prelude::*;
use simd::{Isa, TileElem};
use std::cell::RefCell;
use std::sync::Arc;

/// Weight-only quantisation the CPU backend can apply at load time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Quant {
    /// Symmetric int8 with one f32 scale per output row (matrices only; norms stay as stored).
    Int8,
}

impl Quant {
    /// Parse the user-facing name ("int8"); "none"/"" mean no quantisation.
    pub fn parse(name: &str) -> Result<Option<Quant>> {
        Ok(match name {
            "" | "none" => None,
            "int8" | "q8" => Some(Quant::Int8),
            _ => bail!(InvalidArgument, "unknown quantize {name:?}: expected \"none\" or \"int8\""),
        })
    }
}

/// How the CPU backend runs: threads and weight quantisation.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuOptions {
    /// Worker threads; None = `QWEN3RS_NUM_THREADS`, else the CPUs this process may use.
    pub num_threads: Option<usize>,
    pub quant: Option<Quant>,
}

pub struct CpuBackend {
    dtype: DType,
    quant: Option<Quant>,
    isa: Isa,
    /// Every parallel loop of this backend runs inside this pool.
    pool: Arc<rayon::ThreadPool>,
}

/// The default thread count: `QWEN3RS_NUM_THREADS`, else the CPUs available to this process.
pub fn default_num_threads() -> usize {
    std::env::var("QWEN3RS_NUM_THREADS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1))
}

/// Bytes of host memory available to new allocations (Linux: MemAvailable in /proc/meminfo; None
/// elsewhere or when it cannot be read).
fn host_memory_available() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb = info.lines().find_map(|l| l.strip_prefix("MemAvailable:"))?.trim().strip_suffix("kB")?.trim().parse::<u64>().ok()?;
    Some(kb * 1024)
}

impl CpuBackend {
    pub fn new(dtype: DType) -> Self {
        Self::with_options(dtype, CpuOptions::default()).expect("default CPU options are valid")
    }

    pub fn with_options(dtype: DType, opts: CpuOptions) -> Result<Self> {
        let threads = opts.num_threads.unwrap_or_else(default_num_threads);
        ensure!(threads >= 1, InvalidArgument, "num_threads must be >= 1, got {threads}");
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("qwen3rs-cpu-{i}"))
            .build()
            .map_err(|e| crate::Error::InvalidArgument(format!("cannot start {threads} CPU threads: {e}")))?;
        Ok(CpuBackend { dtype, quant: opts.quant, isa: simd::best(), pool: Arc::new(pool) })
    }

    pub fn num_threads(&self) -> usize {
        self.pool.current_num_threads()
    }

    /// The instruction set the kernels use.
    pub fn isa(&self) -> Isa {
        self.isa
    }

    /// Round activations to the compute dtype (no-op in f32).
    fn round(&self, v: &mut [f32]) {
        match self.dtype {
            DType::F32 => {}
            DType::BF16 => {
                let isa = self.isa;
                v.par_chunks_mut(1 << 14).for_each(|c| simd::round_bf16(isa, c));
            }
            DType::F16 => v.iter_mut().for_each(|x| *x = f16::from_f32(*x).to_f32()),
        }
    }

    /// Activations are bf16-exact (bf16 compute), so bf16 × bf16 products lose nothing.
    fn bf16_acts(&self) -> bool {
        self.dtype == DType::BF16
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

/// Int8 weights: q [rows, cols], w[r][c] ≈ q[r][c] · scale[r].
pub struct Q8Weight {
    pub q: Vec<i8>,
    pub scale: Vec<f32>,
    pub rows: usize,
    pub cols: usize,
}

impl Q8Weight {
    /// Symmetric per-row quantisation: scale = max|w| / 127, q = round(w / scale).
    pub fn quantize(t: &HostTensor) -> Q8Weight {
        let (rows, cols) = (t.shape[0], t.shape[1]);
        let values = t.to_f32_vec();
        let mut q = vec![0i8; rows * cols];
        let mut scale = vec![0f32; rows];
        q.par_chunks_mut(cols).zip(scale.par_iter_mut()).zip(values.par_chunks(cols)).for_each(|((qr, s), vr)| {
            let amax = vr.iter().fold(0f32, |m, v| m.max(v.abs()));
            *s = if amax > 0.0 { amax / 127.0 } else { 1.0 };
            let inv = 1.0 / *s;
            qr.iter_mut().zip(vr).for_each(|(q, v)| *q = (v * inv).round().clamp(-127.0, 127.0) as i8);
        });
        Q8Weight { q, scale, rows, cols }
    }

    pub fn row(&self, r: usize) -> &[i8] {
        &self.q[r * self.cols..(r + 1) * self.cols]
    }
}

/// A weight on the CPU: a host tensor used in place (zero copy from the memory map where the dtype
/// allows), or int8 weight-only quantised.
pub enum CpuWeight {
    Host(HostTensor),
    Q8(Q8Weight),
}

impl CpuWeight {
    pub fn shape(&self) -> [usize; 2] {
        match self {
            CpuWeight::Host(t) => [t.shape[0], t.shape.get(1).copied().unwrap_or(1)],
            CpuWeight::Q8(q) => [q.rows, q.cols],
        }
    }

    fn host(&self, what: &str) -> Result<&HostTensor> {
        match self {
            CpuWeight::Host(t) => Ok(t),
            CpuWeight::Q8(_) => bail!(InvalidArgument, "{what}: expected an unquantised tensor"),
        }
    }

    /// Bytes one full read of this weight touches (for bandwidth figures).
    pub fn bytes(&self) -> usize {
        match self {
            CpuWeight::Host(t) => t.raw().len(),
            CpuWeight::Q8(q) => q.q.len() + 4 * q.scale.len(),
        }
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
    router: CpuWeight,
    /// Experts `first_expert..first_expert + experts.len()` of the router's E (all of them on one device).
    experts: Vec<[CpuWeight; 3]>,
    first_expert: usize,
    top_k: usize,
    norm_topk_prob: bool,
    /// Buffers reused across calls, so decoding allocates nothing once warm.
    scratch: std::sync::Mutex<MoeScratch>,
}

#[derive(Default)]
struct MoeScratch {
    logits: Vec<f32>,
    order: Vec<usize>,
    /// expert → (row, weight)
    routes: Vec<Vec<(usize, f32)>>,
    xe: Vec<f32>,
    g: Vec<f32>,
    u: Vec<f32>,
    a: Vec<f32>,
    y: Vec<f32>,
}

/// Indices of the k largest values into `order`, largest first, ties to the lower index (as
/// `kernels::top_k`, without allocating once `order` has grown).
fn top_k_into(order: &mut Vec<usize>, values: &[f32], k: usize) {
    order.clear();
    order.extend(0..values.len());
    let cmp = |a: &usize, b: &usize| values[*b].total_cmp(&values[*a]).then(a.cmp(b));
    if k < order.len() {
        order.select_nth_unstable_by(k, cmp);
    }
    order.truncate(k);
    order.sort_unstable_by(cmp);
}

/// A raw pointer that rayon tasks may share, for writes to provably disjoint elements.
#[derive(Clone, Copy)]
struct SharedMut(*mut f32);
// SAFETY: only used by kernels whose tasks write disjoint indices and finish before the borrow ends.
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

impl SharedMut {
    /// The pointer (a method, so closures capture the Send wrapper rather than its raw field).
    fn ptr(self) -> *mut f32 {
        self.0
    }
}

fn check_shape(name: &str, got: (usize, usize), want: (usize, usize)) -> Result<()> {
    ensure!(got == want, InvalidArgument, "{name}: buffer is {got:?}, expected {want:?}");
    Ok(())
}

/// Weight rows per tile (register blocking) and activation rows per tile.
const MR: usize = 4;
const NR: usize = 4;

thread_local! {
    /// Activations as bf16 for `vdpbf16ps` (reused: no allocation per token once warm).
    static ACTS_BF16: RefCell<Vec<bf16>> = const { RefCell::new(Vec::new()) };
    /// A block of int8 weight rows widened to bf16 for prefill.
    static BLOCK_BF16: RefCell<Vec<bf16>> = const { RefCell::new(Vec::new()) };
    /// A task's weight rows packed into AVX512-BF16 panels.
    static PANELS: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
}

/// The activation rows a tile reads: f32, or bf16 (bf16 compute with AVX512-BF16).
#[derive(Clone, Copy)]
enum Acts<'a> {
    F32(&'a [f32]),
    Bf16(&'a [bf16]),
}

/// One tile's results into out [T, N], scaled per weight row for int8.
#[inline(always)]
fn store<const M: usize, const N: usize>(out: SharedMut, n_total: usize, i0: usize, j0: usize, v: [[f32; N]; M], scale: Option<&[f32]>) {
    for (m, col) in v.iter().enumerate() {
        let s = scale.map_or(1.0, |s| s[j0 + m]);
        for (n, &val) in col.iter().enumerate() {
            // SAFETY: (i0+n, j0+m) lies in this task's rows j0.. of out [T, N] (the caller checked
            // shapes), and no other task writes those weight rows.
            unsafe { *out.ptr().add((i0 + n) * n_total + j0 + m) = val * s };
        }
    }
}

/// Call the local `go!(M, N)` with the register-tile shape for a full (`m4`) or single weight row and
/// `nr` activation rows: tile sizes are const generics, so the runtime shape picks a monomorphised call.
macro_rules! by_tile_shape {
    ($m4:expr, $nr:expr, $go:ident) => {
        match ($m4, $nr) {
            (true, 1) => $go!(4, 1),
            (true, 2) => $go!(4, 2),
            (true, 3) => $go!(4, 3),
            (true, _) => $go!(4, 4),
            (false, 1) => $go!(1, 1),
            (false, 2) => $go!(1, 2),
            (false, 3) => $go!(1, 3),
            (false, _) => $go!(1, 4),
        }
    };
}

/// out[:, j0..j0+rows] for weight rows `w` (rows × k, first row is global row j0).
#[allow(clippy::too_many_arguments)]
fn gemm_block<W: TileElem>(
    isa: Isa,
    out: SharedMut,
    n_total: usize,
    j0: usize,
    w: &[W],
    k: usize,
    x: Acts,
    t: usize,
    scale: Option<&[f32]>,
) {
    let rows = w.len() / k;
    let wr = |j: usize| &w[j * k..(j + 1) * k];
    for i0 in (0..t).step_by(NR) {
        let nr = NR.min(t - i0);
        let mut j = 0;
        while j < rows {
            let m4 = j + MR <= rows;
            match x {
                Acts::F32(x) => {
                    let xr = |n: usize| &x[(i0 + n) * k..(i0 + n + 1) * k];
                    macro_rules! go {
                        ($m:literal, $n:literal) => {{
                            let wa: [&[W]; $m] = std::array::from_fn(|m| wr(j + m));
                            let xa: [&[f32]; $n] = std::array::from_fn(|n| xr(n));
                            store(out, n_total, i0, j0 + j, W::tile::<$m, $n>(isa, wa, xa), scale)
                        }};
                    }
                    by_tile_shape!(m4, nr, go);
                }
                Acts::Bf16(x) => {
                    // Only bf16 weight rows reach here (see `matmul_into`).
                    let wb: &[bf16] = W::as_bf16(w).expect("bf16 activations meet bf16 weights only");
                    let wr = |j: usize| &wb[j * k..(j + 1) * k];
                    let xr = |n: usize| &x[(i0 + n) * k..(i0 + n + 1) * k];
                    macro_rules! go {
                        ($m:literal, $n:literal) => {{
                            let wa: [&[bf16]; $m] = std::array::from_fn(|m| wr(j + m));
                            let xa: [&[bf16]; $n] = std::array::from_fn(|n| xr(n));
                            store(out, n_total, i0, j0 + j, simd::tile_bf16_bf16::<$m, $n>(isa, wa, xa), scale)
                        }};
                    }
                    by_tile_shape!(m4, nr, go);
                }
            }
            j += if m4 { MR } else { 1 };
        }
    }
}

/// Weight rows per parallel task: enough tasks to balance threads, whole register tiles, and for
/// prefill a block small enough to stay in L2 while every activation row passes over it.
fn rows_per_task(n: usize, k: usize, t: usize, threads: usize) -> usize {
    let balance = n.div_ceil(threads * 8);
    let cap = if t > 1 { ((256 * 1024) / (2 * k)).max(MR) } else { usize::MAX };
    balance.min(cap).max(MR).div_ceil(MR) * MR
}

/// out [T, N] = x [T, K] · wᵀ over `threads` threads, dispatched on the weight's element type.
#[allow(clippy::too_many_arguments)]
fn matmul_typed<W: TileElem>(isa: Isa, out: &mut [f32], x: Acts, w: &[W], t: usize, n: usize, k: usize, scale: Option<&[f32]>) {
    let out_ptr = SharedMut(out.as_mut_ptr());
    let per = rows_per_task(n, k, t, rayon::current_num_threads());
    w.par_chunks(per * k).enumerate().for_each(|(b, wb)| gemm_block(isa, out_ptr, n, b * per, wb, k, x, t, scale));
}

/// Prefill with AVX512-BF16 on packed panels: each task packs its weight rows once (bf16, or int8
/// widened exactly), then runs every activation row over them 8 at a time.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
fn matmul_panels<W: simd::WeightElem>(out: &mut [f32], xb: &[bf16], w: &[W], t: usize, n: usize, k: usize, scale: Option<&[f32]>) {
    use simd::panel::{kernel, pack, ACT_ROWS, ROWS};
    let kp = k / 2;
    let xu: &[u32] = bytemuck::cast_slice(xb);
    let out_ptr = SharedMut(out.as_mut_ptr());
    let per = rows_per_task(n, k, t, rayon::current_num_threads()).div_ceil(ROWS) * ROWS;
    (0..n.div_ceil(per)).into_par_iter().for_each(|b| {
        let (j0, j1) = (b * per, n.min((b + 1) * per));
        let n_panels = (j1 - j0).div_ceil(ROWS);
        PANELS.with_borrow_mut(|panels| {
            panels.resize(n_panels * kp * ROWS, 0);
            for p in 0..n_panels {
                let (r0, r1) = (j0 + p * ROWS, j1.min(j0 + (p + 1) * ROWS));
                pack(&mut panels[p * kp * ROWS..(p + 1) * kp * ROWS], &w[r0 * k..r1 * k], r1 - r0, k);
            }
            for i0 in (0..t).step_by(ACT_ROWS) {
                let nr = ACT_ROWS.min(t - i0);
                for p in 0..n_panels {
                    let c0 = j0 + p * ROWS;
                    let cols = j1.min(c0 + ROWS) - c0;
                    let panel = &panels[p * kp * ROWS..(p + 1) * kp * ROWS];
                    let sc = scale.map(|s| &s[c0..c0 + cols]);
                    // SAFETY: out rows i0..i0+nr, columns c0..c0+cols lie inside out [t, n] and
                    // belong to this task alone.
                    let dst = unsafe { out_ptr.ptr().add(i0 * n + c0) };
                    macro_rules! go {
                        ($nn:literal) => {{
                            let xa: [&[u32]; $nn] = std::array::from_fn(|r| &xu[(i0 + r) * kp..(i0 + r + 1) * kp]);
                            // SAFETY: this path runs only with Isa::Avx512Bf16 (detected); panel is
                            // [kp][32], x rows kp long, dst has nr rows × cols writable (see above).
                            unsafe { kernel::<$nn>(panel, xa, kp, dst, n, cols, sc) }
                        }};
                    }
                    match nr {
                        1 => go!(1),
                        2 => go!(2),
                        3 => go!(3),
                        4 => go!(4),
                        5 => go!(5),
                        6 => go!(6),
                        7 => go!(7),
                        _ => go!(8),
                    }
                }
            }
        })
    });
}

/// out [T, N] = x [T, K] · w [N, K]ᵀ for any CPU weight.
fn matmul_into(isa: Isa, bf16_acts: bool, out: &mut [f32], x: &[f32], w: &CpuWeight, t: usize) {
    let [n, k] = w.shape();
    assert!(out.len() == t * n && x.len() == t * k, "matmul_into: shapes differ");
    let dp = bf16_acts && isa == Isa::Avx512Bf16;
    // bf16 × bf16 (`vdpbf16ps`) needs the activations as bf16 once per matmul; they are bf16-exact
    // in bf16 compute, so this is lossless.
    let with_acts = |f: &mut dyn FnMut(Acts)| {
        if dp {
            ACTS_BF16.with_borrow_mut(|xb| {
                xb.resize(x.len(), bf16::ZERO);
                if x.len() <= 1 << 16 {
                    simd::to_bf16(isa, xb, x); // decode: not worth a parallel region
                } else {
                    xb.par_chunks_mut(1 << 14).zip(x.par_chunks(1 << 14)).for_each(|(d, s)| simd::to_bf16(isa, d, s));
                }
                f(Acts::Bf16(xb))
            })
        } else {
            f(Acts::F32(x))
        }
    };
    #[cfg(target_arch = "x86_64")]
    if dp && t >= simd::panel::ACT_ROWS && k.is_multiple_of(2) {
        let ok = ACTS_BF16.with_borrow_mut(|xb| {
            xb.resize(x.len(), bf16::ZERO);
            xb.par_chunks_mut(1 << 14).zip(x.par_chunks(1 << 14)).for_each(|(d, s)| simd::to_bf16(isa, d, s));
            match w {
                CpuWeight::Host(h) => match h.elems() {
                    Elems::BF16(ws) => matmul_panels(out, xb, ws, t, n, k, None),
                    _ => return false,
                },
                CpuWeight::Q8(q) => matmul_panels(out, xb, &q.q, t, n, k, Some(&q.scale)),
            }
            true
        });
        if ok {
            return;
        }
    }
    match w {
        CpuWeight::Host(h) => match h.elems() {
            Elems::F32(ws) => matmul_typed(isa, out, Acts::F32(x), ws, t, n, k, None),
            Elems::BF16(ws) => with_acts(&mut |xa| matmul_typed(isa, out, xa, ws, t, n, k, None)),
            Elems::F16(ws) => matmul_typed(isa, out, Acts::F32(x), ws, t, n, k, None),
        },
        CpuWeight::Q8(q) if t < NR => matmul_typed(isa, out, Acts::F32(x), &q.q, t, n, k, Some(&q.scale)),
        CpuWeight::Q8(q) => {
            // Prefill: widen each task's block of int8 rows to bf16 once (exact), then the bf16 tiles.
            with_acts(&mut |xa| {
                let out_ptr = SharedMut(out.as_mut_ptr());
                let per = rows_per_task(n, k, t, rayon::current_num_threads());
                q.q.par_chunks(per * k).enumerate().for_each(|(b, qb)| {
                    BLOCK_BF16.with_borrow_mut(|wb| {
                        wb.resize(qb.len(), bf16::ZERO);
                        simd::i8_to_bf16(isa, wb, qb);
                        gemm_block(isa, out_ptr, n, b * per, &wb[..], k, xa, t, Some(&q.scale));
                    })
                });
            })
        }
    }
}

/// The scalar reference matmul (the oracle the tests compare `matmul_into` against).
pub fn matmul_reference(out: &mut [f32], x: &[f32], w: &CpuWeight, t: usize) {
    let [n, k] = w.shape();
    for i in 0..t {
        for j in 0..n {
            out[i * n + j] = match w {
                CpuWeight::Host(h) => match h.elems() {
                    Elems::F32(ws) => kernels::dot(&ws[j * k..(j + 1) * k], &x[i * k..(i + 1) * k]),
                    Elems::BF16(ws) => kernels::dot(&ws[j * k..(j + 1) * k], &x[i * k..(i + 1) * k]),
                    Elems::F16(ws) => kernels::dot(&ws[j * k..(j + 1) * k], &x[i * k..(i + 1) * k]),
                },
                CpuWeight::Q8(q) => simd::dot_ref(q.row(j), &x[i * k..(i + 1) * k]) * q.scale[j],
            };
        }
    }
}

/// The same, with the kernels of `isa` (for tests and benchmarks of each path).
pub fn matmul_with(isa: Isa, bf16_acts: bool, out: &mut [f32], x: &[f32], w: &CpuWeight, t: usize) {
    matmul_into(isa, bf16_acts, out, x, w, t)
}

fn rms_norm_row(isa: Isa, out: &mut [f32], x: &[f32], w: Elems, eps: f32) {
    match w {
        Elems::F32(g) => simd::rms_norm_f32(isa, out, x, g, eps),
        Elems::BF16(g) => simd::rms_norm_bf16(isa, out, x, g, eps),
        Elems::F16(g) => kernels::rms_norm(out, x, g, eps),
    }
}

fn rms_norm_rows(isa: Isa, out: &mut [f32], x: &[f32], w: &HostTensor, cols: usize, eps: f32) {
    let w = w.elems();
    out.par_chunks_mut(cols).zip(x.par_chunks(cols)).with_min_len(4).for_each(|(o, x)| rms_norm_row(isa, o, x, w, eps));
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
                // Grow in large steps, so appending a token rarely reallocates.
                let want = (at + src.len()).max(dst.len() * 2).max(1 << 16);
                dst.resize(want, T::from_f32(0.0));
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

thread_local! {
    /// Attention scores of one task's queries, [queries, ctx] (reused across calls).
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// Cache offsets of each key/value row a task reads.
    static SLOTS: RefCell<Vec<usize>> = const { RefCell::new(Vec::new()) };
}

/// Query rows of one sequence attended together: they share each key/value read.
const ATTN_ROWS: usize = 4;

/// One attention task: `rows` query rows from `row0` of one sequence, all query heads of one KV head.
#[derive(Clone, Copy)]
struct AttnTask<'a> {
    seq: &'a super::SeqSlot<'a>,
    row0: usize,
    rows: usize,
    kv_head: usize,
}

/// The scalar reference: causal attention of one query head over one sequence's cached keys/values.
#[allow(clippy::too_many_arguments)]
pub fn attend_head_reference<T: Elem>(
    out: &mut [f32],
    q: &[f32],
    k: &[T],
    v: &[T],
    ctx: usize,
    blocks: &[u32],
    block_size: usize,
    kv_dim: usize,
    kv_off: usize,
) {
    let hd = q.len();
    let scale = 1.0 / (hd as f32).sqrt();
    let slot = |j: usize| (blocks[j / block_size] as usize * block_size + j % block_size) * kv_dim + kv_off;
    let mut scores: Vec<f32> = (0..ctx).map(|j| kernels::dot(&k[slot(j)..slot(j) + hd], q) * scale).collect();
    kernels::softmax(&mut scores);
    out.fill(0.0);
    for (j, &p) in scores.iter().enumerate() {
        for (o, &x) in out.iter_mut().zip(&v[slot(j)..slot(j) + hd]) {
            *o += p * x.to_f32();
        }
    }
}

/// Σ p·v over a task's keys for one query: (isa, out [hd], probs, cache, key offsets).
type PvFn<T> = fn(Isa, &mut [f32], &[f32], &[T], &[usize]);

/// Scores of 1 or 4 keys against every query of a task (queries in tiles of up to 4).
fn score_keys<T: TileElem, const M: usize>(
    isa: Isa,
    keys: [&[T]; M],
    queries: &[&[f32]],
    scores: &mut [f32],
    ctx: usize,
    j0: usize,
    scale: f32,
) {
    for (c, qs) in queries.chunks(4).enumerate() {
        macro_rules! go {
            ($n:literal) => {{
                let qa: [&[f32]; $n] = std::array::from_fn(|n| qs[n]);
                let r = T::tile::<M, $n>(isa, keys, qa);
                for m in 0..M {
                    for n in 0..$n {
                        scores[(c * 4 + n) * ctx + j0 + m] = r[m][n] * scale;
                    }
                }
            }};
        }
        match qs.len() {
            1 => go!(1),
            2 => go!(2),
            3 => go!(3),
            _ => go!(4),
        }
    }
}

/// One task: scores of all its queries against the keys they see (4 keys per tile, each key read once
/// for all queries), a softmax per query over its causal prefix, then Σ p·v per query.
#[allow(clippy::too_many_arguments)]
fn attend_task<T: Elem + TileElem>(
    isa: Isa,
    task: AttnTask,
    q: &[f32],
    q_cols: usize,
    out: SharedMut,
    k: &[T],
    v: &[T],
    kv: (usize, usize),
    group: usize,
    hd: usize,
    pv: PvFn<T>,
) {
    let (block_size, kv_dim) = kv;
    let seq = task.seq;
    let first_ctx = seq.start_pos + (task.row0 - seq.rows.start) + 1;
    let ctx = first_ctx + task.rows - 1; // the last row sees the most keys
    let scale = 1.0 / (hd as f32).sqrt();
    let kv_off = task.kv_head * hd;
    // Queries: row-major over (row, head in group), as `scores` rows.
    let nq = task.rows * group;
    let q_at = |i: usize| {
        let (r, g) = (i / group, i % group);
        let at = (task.row0 + r) * q_cols + (task.kv_head * group + g) * hd;
        &q[at..at + hd]
    };
    const MAX_Q: usize = 64;
    assert!(nq <= MAX_Q, "attention: {nq} queries per task");
    let mut queries: [&[f32]; MAX_Q] = [&[]; MAX_Q];
    for (i, slot) in queries.iter_mut().enumerate().take(nq) {
        *slot = q_at(i);
    }
    let queries = &queries[..nq];
    SLOTS.with_borrow_mut(|slots| {
        slots.clear();
        slots.extend((0..ctx).map(|j| (seq.blocks[j / block_size] as usize * block_size + j % block_size) * kv_dim + kv_off));
        SCORES.with_borrow_mut(|scores| {
            scores.clear();
            scores.resize(nq * ctx, 0.0);
            let key = |j: usize| &k[slots[j]..slots[j] + hd];
            let mut j = 0;
            while j + 4 <= ctx {
                score_keys::<T, 4>(isa, [key(j), key(j + 1), key(j + 2), key(j + 3)], queries, scores, ctx, j, scale);
                j += 4;
            }
            while j < ctx {
                score_keys::<T, 1>(isa, [key(j)], queries, scores, ctx, j, scale);
                j += 1;
            }
            let mut acc = [0f32; 1024];
            for i in 0..nq {
                let (r, g) = (i / group, i % group);
                let seen = first_ctx + r;
                let p = &mut scores[i * ctx..i * ctx + seen];
                simd::softmax(isa, p);
                pv(isa, &mut acc[..hd], p, v, &slots[..seen]);
                let at = (task.row0 + r) * q_cols + (task.kv_head * group + g) * hd;
                for (o, &a) in acc[..hd].iter().enumerate() {
                    // SAFETY: this task alone writes rows row0.. of its KV head's query heads, and
                    // at + o < (row0 + rows) * q_cols <= out.len() (shapes checked by the caller).
                    unsafe { *out.0.add(at + o) = a };
                }
            }
        })
    })
}

fn pv_f16(_: Isa, out: &mut [f32], probs: &[f32], v: &[f16], slots: &[usize]) {
    let hd = out.len();
    out.fill(0.0);
    for (&p, &s) in probs.iter().zip(slots) {
        out.iter_mut().zip(&v[s..s + hd]).for_each(|(o, x)| *o += p * x.to_f32());
    }
}

impl Backend for CpuBackend {
    type Buf = CpuBuf;
    type Weight = CpuWeight;
    type KvLayer = CpuKv;
    type Moe = CpuMoe;

    fn device_name(&self) -> String {
        "cpu".into()
    }

    fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        self.pool.install(f)
    }

    fn dtype(&self) -> DType {
        self.dtype
    }

    fn upload(&self, tensor: HostTensor) -> Result<CpuWeight> {
        if self.quant == Some(Quant::Int8) && tensor.shape.len() == 2 {
            return Ok(CpuWeight::Q8(self.pool.install(|| Q8Weight::quantize(&tensor))));
        }
        // f32 compute keeps bf16/f16 weights as stored (widening is exact); bf16 compute of f32 or
        // f16 weights converts them once, so the math equals a bf16 model's.
        Ok(CpuWeight::Host(match (self.dtype, tensor.dtype) {
            (DType::F32, _) => tensor,
            (d, s) if d == s => tensor,
            (d, _) => tensor.to_dtype(d),
        }))
    }

    fn upload_exact(&self, tensor: HostTensor) -> Result<CpuWeight> {
        Ok(CpuWeight::Host(tensor))
    }

    fn check_dummy_fits(&self, elements: usize) -> Result<()> {
        // Dummy weights are drawn in bf16 and kept so (or converted to f16, or quantised to int8).
        let bytes = elements as f64 * if self.quant == Some(Quant::Int8) { 1.0 } else { 2.0 };
        let Some(available) = host_memory_available() else { return Ok(()) };
        let gb = |b: f64| b / 1e9;
        ensure!(
            bytes <= available as f64,
            OutOfMemory,
            "the model's dummy weights ({:.1} billion) need {:.1} GB of host memory on the CPU, and {:.1} GB are \
             available (MemAvailable): load it with device=\"cuda\", or take a smaller model",
            elements as f64 / 1e9,
            gb(bytes),
            gb(available as f64)
        );
        Ok(())
    }

    fn upload_moe(&self, moe: MoeHost) -> Result<CpuMoe> {
        let (e, first, held) = (moe.router.shape[0], moe.first_expert, moe.experts.len());
        ensure!(held > 0 && first + held <= e, InvalidArgument, "MoE experts {first}..{} held of a router over {e}", first + held);
        let experts =
            moe.experts.into_iter().map(|[g, u, d]| Ok([self.upload(g)?, self.upload(u)?, self.upload(d)?])).collect::<Result<Vec<_>>>()?;
        // The router stays unquantised: int8 noise there flips near-tied expert choices.
        let router = match self.dtype {
            DType::F32 => moe.router,
            d => moe.router.to_dtype(d),
        };
        Ok(CpuMoe {
            router: CpuWeight::Host(router),
            experts,
            first_expert: first,
            top_k: moe.top_k,
            norm_topk_prob: moe.norm_topk_prob,
            scratch: Default::default(),
        })
    }

    fn alloc(&self, rows: usize, cols: usize) -> Result<CpuBuf> {
        let len = rows.checked_mul(cols).ok_or_else(|| crate::Error::InvalidArgument("buffer size overflows".into()))?;
        let mut data = Vec::new();
        data.try_reserve_exact(len).map_err(|_| crate::Error::OutOfMemory(format!("cannot allocate a [{rows}, {cols}] f32 buffer")))?;
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

    fn embed(&self, out: &mut CpuBuf, table: &CpuWeight, ids: &[u32]) -> Result<()> {
        let [vocab, h] = table.shape();
        check_shape("embed", (out.rows, out.cols), (ids.len(), h))?;
        for (row, &id) in out.data.chunks_mut(h).zip(ids) {
            ensure!((id as usize) < vocab, InvalidArgument, "token id {id} is out of range for a vocabulary of {vocab}");
            let id = id as usize;
            match table {
                CpuWeight::Host(t) => match t.elems() {
                    Elems::F32(t) => row.copy_from_slice(&t[id * h..(id + 1) * h]),
                    Elems::BF16(t) => row.iter_mut().zip(&t[id * h..(id + 1) * h]).for_each(|(o, v)| *o = v.to_f32()),
                    Elems::F16(t) => row.iter_mut().zip(&t[id * h..(id + 1) * h]).for_each(|(o, v)| *o = v.to_f32()),
                },
                CpuWeight::Q8(q) => {
                    let s = q.scale[id];
                    row.iter_mut().zip(q.row(id)).for_each(|(o, &v)| *o = v as f32 * s);
                }
            }
        }
        self.round(&mut out.data);
        Ok(())
    }

    fn add_rms_norm(&self, x_out: &mut CpuBuf, h: &mut CpuBuf, input: &BlockInput<Self>) -> Result<()> {
        let x = input.x;
        check_shape("add_rms_norm", (x_out.rows, x_out.cols), (x.rows, x.cols))?;
        check_shape("add_rms_norm", (h.rows, h.cols), (x.rows, x.cols))?;
        let w = input.norm.host("add_rms_norm")?;
        match input.delta {
            Some(d) => {
                check_shape("add_rms_norm", (d.rows, d.cols), (x.rows, x.cols))?;
                x_out.data.iter_mut().zip(&x.data).zip(&d.data).for_each(|((o, a), b)| *o = a + b);
                self.round(&mut x_out.data);
            }
            None => x_out.data.copy_from_slice(&x.data),
        }
        self.pool.install(|| {
            rms_norm_rows(self.isa, &mut h.data, &x_out.data, w, x.cols, input.eps);
            self.round(&mut h.data);
        });
        Ok(())
    }

    fn matmul(&self, out: &mut CpuBuf, x: &CpuBuf, w: &CpuWeight) -> Result<()> {
        let [n, k] = w.shape();
        ensure!(k == x.cols, InvalidArgument, "matmul: weight [{n}, {k}] does not take rows of {}", x.cols);
        check_shape("matmul", (out.rows, out.cols), (x.rows, n))?;
        self.pool.install(|| {
            matmul_into(self.isa, self.bf16_acts(), &mut out.data, &x.data, w, x.rows);
            self.round(&mut out.data);
        });
        Ok(())
    }

    fn qk_norm_rope(
        &self,
        q: &mut CpuBuf,
        k: &mut CpuBuf,
        q_norm: &CpuWeight,
        k_norm: &CpuWeight,
        eps: f32,
        rope: &CpuWeight,
        positions: &[u32],
        shape: AttnShape,
    ) -> Result<()> {
        let hd = shape.head_dim;
        let rope = rope.host("rope")?;
        let table = match rope.elems() {
            Elems::F32(t) => t,
            _ => bail!(InvalidArgument, "rope table must be f32"),
        };
        let max_pos = rope.shape[0];
        for &p in positions {
            ensure!((p as usize) < max_pos, InvalidArgument, "position {p} is past the RoPE table ({max_pos})");
        }
        const MAX_HD: usize = 1024;
        ensure!(hd <= MAX_HD && hd.is_multiple_of(2), InvalidArgument, "head_dim {hd} is not supported on the CPU");
        let (isa, dtype) = (self.isa, self.dtype);
        for (buf, w, heads) in [(&mut *q, q_norm, shape.n_heads), (&mut *k, k_norm, shape.n_kv_heads)] {
            check_shape("qk_norm_rope", (buf.rows, buf.cols), (positions.len(), heads * hd))?;
            let w = w.host("qk_norm")?.elems();
            let round = |v: &mut [f32]| match dtype {
                DType::F32 => {}
                DType::BF16 => simd::round_bf16(isa, v),
                DType::F16 => v.iter_mut().for_each(|x| *x = f16::from_f32(*x).to_f32()),
            };
            // Each head in place: norm → round → RoPE → round (as the reference's two passes).
            self.pool.install(|| {
                buf.data.par_chunks_mut(hd).enumerate().with_min_len(8).for_each(|(i, head)| {
                    let p = positions[i / heads] as usize;
                    let cs = &table[p * hd..(p + 1) * hd];
                    let mut tmp = [0f32; MAX_HD];
                    tmp[..hd].copy_from_slice(head);
                    rms_norm_row(isa, head, &tmp[..hd], w, eps);
                    round(head);
                    simd::rope(isa, head, &cs[..hd / 2], &cs[hd / 2..]);
                    round(head);
                })
            });
        }
        Ok(())
    }

    fn kv_append(&self, kv: &mut CpuKv, k: &CpuBuf, v: &CpuBuf, batch: &BatchInfo) -> Result<()> {
        let d = kv.kv_dim;
        check_shape("kv_append", (k.rows, k.cols), (batch.rows(), d))?;
        for seq in &batch.seqs {
            for (i, row) in seq.rows.clone().enumerate() {
                let pos = seq.start_pos + i;
                let block = *seq
                    .blocks
                    .get(pos / kv.block_size)
                    .ok_or_else(|| crate::Error::InvalidArgument(format!("position {pos} has no cache block")))?
                    as usize;
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
        ensure!(hd <= 1024 && group * ATTN_ROWS <= 64, InvalidArgument, "attention shape {shape:?} is not supported on the CPU");
        let (bs, d, isa, n_kv) = (kv.block_size, kv.kv_dim, self.isa, shape.n_kv_heads);
        // Tasks: per sequence, blocks of ATTN_ROWS rows × KV heads (indexed, so nothing is allocated).
        let blocks_of = |s: &super::SeqSlot| s.rows.len().div_ceil(ATTN_ROWS);
        let n_tasks: usize = batch.seqs.iter().map(|s| blocks_of(s) * n_kv).sum();
        let task_at = |mut i: usize| {
            for seq in &batch.seqs {
                let n = blocks_of(seq) * n_kv;
                if i < n {
                    let (blk, kv_head) = (i / n_kv, i % n_kv);
                    let row0 = seq.rows.start + blk * ATTN_ROWS;
                    return AttnTask { seq, row0, rows: ATTN_ROWS.min(seq.rows.end - row0), kv_head };
                }
                i -= n;
            }
            unreachable!("task index within n_tasks")
        };
        let out_ptr = SharedMut(out.data.as_mut_ptr());
        let q_cols = nh * hd;
        self.pool.install(|| {
            (0..n_tasks).into_par_iter().for_each(|i| {
                let task = task_at(i);
                match (&kv.k, &kv.v) {
                    (KvData::F32(k), KvData::F32(v)) => {
                        attend_task(isa, task, &q.data, q_cols, out_ptr, k, v, (bs, d), group, hd, simd::pv_f32)
                    }
                    (KvData::BF16(k), KvData::BF16(v)) => {
                        attend_task(isa, task, &q.data, q_cols, out_ptr, k, v, (bs, d), group, hd, simd::pv_bf16)
                    }
                    (KvData::F16(k), KvData::F16(v)) => attend_task(isa, task, &q.data, q_cols, out_ptr, k, v, (bs, d), group, hd, pv_f16),
                    _ => unreachable!("K and V are created with one dtype"),
                }
            });
            self.round(&mut out.data);
        });
        Ok(())
    }

    fn swiglu(&self, out: &mut CpuBuf, gate: &CpuBuf, up: &CpuBuf) -> Result<()> {
        check_shape("swiglu", (out.rows, out.cols), (gate.rows, gate.cols))?;
        check_shape("swiglu", (up.rows, up.cols), (gate.rows, gate.cols))?;
        let isa = self.isa;
        match self.dtype {
            DType::F16 => {
                // In f16, transformers rounds silu(gate) before multiplying; do the same.
                let r = |x: f32| f16::from_f32(x).to_f32();
                out.data.iter_mut().zip(&gate.data).zip(&up.data).for_each(|((o, &g), &u)| *o = r(r(kernels::silu(g)) * u));
            }
            dtype => {
                let bf = dtype == DType::BF16;
                const CHUNK: usize = 1 << 14;
                self.pool.install(|| {
                    out.data
                        .par_chunks_mut(CHUNK)
                        .zip(gate.data.par_chunks(CHUNK))
                        .zip(up.data.par_chunks(CHUNK))
                        .for_each(|((o, g), u)| simd::swiglu(isa, o, g, u, bf))
                });
            }
        }
        Ok(())
    }

    fn moe(&self, out: &mut CpuBuf, x: &CpuBuf, moe: &CpuMoe) -> Result<()> {
        let (t, h) = (x.rows, x.cols);
        let [n_experts, _] = moe.router.shape();
        check_shape("moe", (out.rows, out.cols), (t, h))?;
        let mut guard = moe.scratch.lock().unwrap_or_else(|e| e.into_inner());
        let sc = &mut *guard;
        let (isa, bf16_acts) = (self.isa, self.bf16_acts());
        self.pool.install(|| {
            // 1. Router: logits and softmax in f32 (a bf16 round here flips near-tied expert choices),
            //    top-k, optional renormalisation.
            sc.logits.resize(t * n_experts, 0.0);
            matmul_into(isa, bf16_acts, &mut sc.logits, &x.data, &moe.router, t);
            sc.routes.resize_with(n_experts, Vec::new);
            sc.routes.iter_mut().for_each(|r| r.clear());
            for (row, l) in sc.logits.chunks_mut(n_experts).enumerate() {
                kernels::softmax(l);
                top_k_into(&mut sc.order, l, moe.top_k);
                let total: f32 = if moe.norm_topk_prob { sc.order.iter().map(|&e| l[e]).sum() } else { 1.0 };
                for &e in &sc.order {
                    sc.routes[e].push((row, l[e] / total));
                }
            }
            // 2. The experts this device holds in ascending order, each over the rows routed to it
            //    (under expert parallelism another rank adds the rest).
            out.data.fill(0.0);
            let held = &sc.routes[moe.first_expert..moe.first_expert + moe.experts.len()];
            for ([gate, up, down], rows) in moe.experts.iter().zip(held).filter(|(_, r)| !r.is_empty()) {
                let [inter, _] = gate.shape();
                let n = rows.len();
                sc.xe.clear();
                rows.iter().for_each(|&(r, _)| sc.xe.extend_from_slice(x.row(r)));
                for b in [&mut sc.g, &mut sc.u, &mut sc.a] {
                    b.resize(n * inter, 0.0);
                }
                sc.y.resize(n * h, 0.0);
                matmul_into(isa, bf16_acts, &mut sc.g, &sc.xe, gate, n);
                self.round(&mut sc.g);
                matmul_into(isa, bf16_acts, &mut sc.u, &sc.xe, up, n);
                self.round(&mut sc.u);
                match self.dtype {
                    DType::F16 => {
                        let r = |x: f32| f16::from_f32(x).to_f32();
                        sc.a.iter_mut().zip(&sc.g).zip(&sc.u).for_each(|((o, &g), &u)| *o = r(r(kernels::silu(g)) * u));
                    }
                    d => simd::swiglu(isa, &mut sc.a, &sc.g, &sc.u, d == DType::BF16),
                }
                matmul_into(isa, bf16_acts, &mut sc.y, &sc.a, down, n);
                self.round(&mut sc.y);
                for (i, &(r, w)) in rows.iter().enumerate() {
                    let dst = &mut out.data[r * h..(r + 1) * h];
                    let y = &mut sc.y[i * h..(i + 1) * h];
                    y.iter_mut().for_each(|v| *v *= w);
                    self.round(y);
                    dst.iter_mut().zip(y.iter()).for_each(|(o, c)| *o += c);
                    self.round(dst);
                }
            }
        });
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
