//! The CUDA backend (cudarc, loaded at run time): weights uploaded once in the compute dtype
//! (bf16 by default, f32 for checks), activations as device buffers of that dtype, a paged KV
//! cache allocated up front (so an impossible `max_seq_len` fails at load with OutOfMemory),
//! NVRTC-compiled kernels for every op (`kernels/*.cu`), cuBLAS for products of more than
//! `GEMV_MAX_ROWS` rows and a 16-byte-load GEMV below that. Semantics equal the CPU reference:
//! each op rounds its output to the compute dtype, the MoE router runs in f32.
//!
//! Metadata (token ids, positions, slot mapping, block tables, row lists) is uploaded into
//! per-kind device buffers that only grow; an upload is skipped when the host content equals the
//! last one, so the 2 × n_layers attention calls of a forward upload the batch layout once. Under a
//! CUDA graph (decode) it goes to one pinned staging arena instead, moved by one copy node a step.
//! MoE routing, expert grouping and the weighted combine run on the device: nothing goes back to
//! the host inside a forward pass. Scratch for MoE lives in grow-only buffers too.

pub mod compile;
mod gpu;
pub mod libs;
mod nccl;

use super::MoeDummy;
use super::{AttnShape, Backend, BatchInfo, BlockInput, MoeHost};
use crate::error::{Error, Result};
use crate::model::dummy::{DummySpec, Walk};
use crate::tensor::{DType, HostTensor, Window};
use crate::{bail, ensure};
use gpu::{args, DevMem, Gpu, Graph, Mode, PinnedMem};
use half::{bf16, f16};
use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

/// Rows up to which matmul uses the GEMV kernel rather than cuBLAS (must match matmul.cu).
pub const GEMV_MAX_ROWS: usize = 8;

/// Bytes of x a decode GEMV block stages in shared memory (beyond: read through L1); 56 KB keeps four
/// 256-thread blocks resident per SM and covers one row of Qwen3-32B's down projection (K = 25,600),
/// which ran at 0.65 of the bandwidth with x from L1 (RESULTS.md run 11).
const GEMV_SMEM_X: usize = 56 * 1024;

/// Weight-row lengths (elements) whose decode GEMVs run matmul_wide's build (16 loads a lane in flight
/// instead of 8), in `QWEN3RS_CUDA_WIDE_ROWS`'s syntax (`parse_wide_rows`), as measured on the Qwen3
/// shapes in bf16 (RESULTS.md runs 25.5, 25.6, 27.3, 27.4), decode against no row on it: 0.6B 1.037× (its down
/// projection, 3,072), 30B-A3B 1.006× (o, 4,096), 8B 1.00× (4,096), 32B 1.065× (its down, 25,600; o, 8,192,
/// alone is neutral); 2,048 in the plain GEMV family only (0.6B's o): 0.6B 1.015×, 30B-A3B 0.999×.
/// Left out: 32B's 5,120 (0.973× with it), 8B's down, 12,288 (0.991×), and 2,048 in 30B-A3B's q/k/v
/// (gemv3, 0.967×) and expert gate/up (moe_gemv_swiglu, 0.905×). No rule by length alone fits: the
/// build with fewer batches a row wins where a row's loads would end in a part-filled batch or another
/// round trip, and loses where its extra registers cost blocks an SM.
const WIDE_ROWS: &str = "3072,4096,8192,25600,gemv:2048";

/// Weight-row lengths whose decode GEMVs run matmul_narrow's build (4 loads a lane in flight; registers
/// for 5 blocks an SM instead of 4), in `QWEN3RS_CUDA_NARROW_ROWS`'s syntax: Qwen3-30B-A3B's q/k/v
/// (5,120 rows of 2,048): every warp of the 640 blocks one row, where 4 blocks an SM left 896 of 4,224
/// warps a second row, the launch's tail (1.8 µs a layer less, benches/profiles/block_timeline.py;
/// decode 1.029×, RESULTS.md runs 31.7–31.8). Every GEMV on the narrow build loses elsewhere (0.6B
/// 0.909×, 8B 0.975×, 32B 0.957×). (Qwen3-1.7B's q/k/v, 4,096 rows of 2,048, take it too, unmeasured:
/// matmul's 4 blocks an SM already give each of its rows a warp.)
const NARROW_ROWS: &str = "gemv3:2048";

/// The builds of matmul.cu for the decode GEMVs (compile.rs SOURCES): 8, 16 and 4 loads a lane in flight.
pub const GEMV_BUILDS: [&str; 3] = ["matmul", "matmul_wide", "matmul_narrow"];

/// One entry of a row-length list (WIDE_ROWS, NARROW_ROWS): a weight-row length, and the GEMV family it
/// applies to (its kernels' name before `_t1`/`_xs`: gemv, gemv3, gemv_swiglu, moe_gemv_swiglu,
/// moe_down_combine), or every family.
#[derive(Debug, Clone, PartialEq)]
struct GemvRows {
    family: Option<&'static str>,
    k: usize,
}

/// The non-empty items of a comma-separated environment value, trimmed.
fn list_items(spec: &str) -> impl Iterator<Item = &str> {
    spec.split(',').map(str::trim).filter(|s| !s.is_empty())
}

/// The comma-separated `N` or `FAMILY:N` entries of env `var`'s value `spec`: (the GEMV family, its name
/// resolved to the known one, or None for every family; N), entries of 0 left out; an error naming the
/// variable and the entry for a family no GEMV kernel has or an N that is not a number.
fn parse_family_entries(var: &str, spec: &str) -> Result<Vec<(Option<&'static str>, usize)>> {
    let families = [&GEMV[..], &GEMV3, &GEMV_SWIGLU, &MOE_GEMV_SWIGLU, &MOE_DOWN_COMBINE].map(gemv_family);
    let mut entries = Vec::new();
    for item in list_items(spec) {
        let (family, n) = match item.split_once(':') {
            Some((f, n)) => {
                let Some(&known) = families.iter().find(|&&known| known == f.trim()) else {
                    bail!(InvalidArgument, "{var}: no GEMV family {:?} in {item:?} (families: {})", f.trim(), families.join(", "));
                };
                (Some(known), n)
            }
            None => (None, item),
        };
        let Ok(n) = n.trim().parse::<usize>() else {
            bail!(InvalidArgument, "{var}: bad entry {item:?} (N or FAMILY:N)");
        };
        if n > 0 {
            entries.push((family, n));
        }
    }
    Ok(entries)
}

/// `QWEN3RS_CUDA_WIDE_ROWS` / `_NARROW_ROWS` (`var`): comma-separated `K` (every family) or `FAMILY:K`
/// entries; 0 or nothing: none; unset: `default`.
fn parse_gemv_rows(var: &str, default: &str) -> Result<Vec<GemvRows>> {
    let spec = std::env::var(var).unwrap_or_else(|_| default.to_string());
    Ok(parse_family_entries(var, &spec)?.into_iter().map(|(family, k)| GemvRows { family, k }).collect())
}

/// `QWEN3RS_CUDA_SKIP`: comma-separated kernel names (profiling only: those kernels are never launched,
/// so every result after them is wrong; what the step costs without them, RESULTS.md run 29.5); an
/// error naming the entry for one that is not a kernel name.
fn parse_skip(spec: &str) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for item in list_items(spec) {
        ensure!(
            item.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'),
            InvalidArgument,
            "QWEN3RS_CUDA_SKIP: {item:?} is not a kernel name"
        );
        names.push(item.to_string());
    }
    Ok(names)
}

/// Most blocks an SM of persistent grids: every kernel's cap (None: as many as fit), and GEMV families' own.
type BlockCaps = (Option<u32>, Vec<(&'static str, u32)>);

/// `QWEN3RS_CUDA_BLOCKS_PER_SM` (sweeps; unset: as many blocks an SM as fit): `N` caps every persistent
/// grid, `FAMILY:N` the decode GEMVs of one family (fewer blocks of a kernel leave room for the next
/// kernel's blocks to start beside them under PDL).
fn parse_block_caps(spec: &str) -> Result<BlockCaps> {
    let entries = parse_family_entries("QWEN3RS_CUDA_BLOCKS_PER_SM", spec)?;
    let all = entries.iter().rev().find(|e| e.0.is_none()).map(|e| e.1 as u32);
    Ok((all, entries.into_iter().filter_map(|(f, n)| Some((f?, n as u32))).collect()))
}

/// The family name of a GEMV kernel family (`gemv_t1` → gemv, `moe_gemv_swiglu` → itself).
fn gemv_family(family: &[&'static str]) -> &'static str {
    let first: &'static str = family[0];
    first.strip_suffix("_t1").unwrap_or(first)
}

/// A decode GEMV launch as `gemv_plan` chooses it: (module, kernel, grid, dynamic shared memory).
type GemvPlan = (&'static str, &'static str, (u32, u32, u32), u32);

/// Kernel names of the decode-GEMV families in matmul.cu: [T = 1, T = 1 with x in shared memory,
/// T <= GEMV_MAX_ROWS, the same with x in shared memory]. MoE experts see one x row per pair, so
/// their families stop after the T = 1 pair.
const GEMV: [&str; 4] = ["gemv_t1", "gemv_t1_xs", "gemv_t8", "gemv_t8_xs"];
const GEMV3: [&str; 4] = ["gemv3_t1", "gemv3_t1_xs", "gemv3_t8", "gemv3_t8_xs"];
const GEMV_SWIGLU: [&str; 4] = ["gemv_swiglu_t1", "gemv_swiglu_t1_xs", "gemv_swiglu_t8", "gemv_swiglu_t8_xs"];
const MOE_GEMV_SWIGLU: [&str; 2] = ["moe_gemv_swiglu", "moe_gemv_swiglu_xs"];
const MOE_DOWN_COMBINE: [&str; 2] = ["moe_down_combine", "moe_down_combine_xs"];
const GEMV_ROUTER: [&str; 2] = ["gemv_router", "gemv_router_xs"];
/// Warps of `moe_down_combine` per output element (MD_WPO in matmul.cu; a sweep's other MD_WPO only
/// moves the grid's size off its fit, the kernel loops over whatever it is given).
const MOE_DOWN_WARPS: usize = 2;
/// Rows per MoE expert tile (must match GG_TM in matmul.cu).
const MOE_TILE_ROWS: usize = 16;
/// expert_gemm's builds: (most rows of one expert a tile takes, kernel, dynamic shared memory; EG_SMEM
/// in expert_gemm.cu, as many stages as the tile's rows allow). The first is the default (two blocks an
/// SM); `QWEN3RS_CUDA_EXPERT_TILE=256` takes the second (one block an SM: 0.933 the speed, run 24.2).
const EXPERT_TILES: [(usize, &str, u32); 2] = [(128, "expert_gemm_128", 112 * 1024), (256, "expert_gemm_256", 227 * 1024)];
const MAX_TOP_K: usize = 32;
/// int64 words from one expert's router sum to the next in `CudaMoe::route_acc` (a 128-byte line each:
/// the most OR_STRIDE in matmul.cu may be).
const ROUTE_ACC_STRIDE: usize = 16;
/// Most experts the decode expert kernel routes over itself (ROUTE_MAX_E in matmul.cu).
const ROUTE_MAX_E: usize = 256;
const MAX_HEAD_DIM: usize = 256;
/// Query rows per block of the tiled prefill attention (FA_BQ in attention.cu; keys go 32 at a time;
/// FP_BQ in attention_prefill.cu).
const ATTN_TILE_ROWS: usize = 64;
/// Most KV splits of decode attention (`AD_MAX_SPLITS` in attention.cu).
const MAX_ATTN_SPLITS: usize = 128;
/// Most blocks of a cluster on sm_90 (8 portable, 16 with the function's leave; attention.cu AD_MAX_CLUSTER).
const MAX_ATTN_CLUSTER: usize = 16;
/// Keys per shared-memory tile of the tensor-core prefill attention (FP_BK in attention_prefill.cu).
const ATTN_PREFILL_KEYS: usize = 64;
/// attention_prefill_wg_128's dynamic shared memory (FW_SMEM in attention_prefill.cu, + 1 KB to align).
const ATTN_WG_SMEM: u32 = 80 * 1024 + 1024;

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

/// A sparse MoE layer: router [E, H]; gate, up [held, I, H] and down [held, H, I], each one allocation,
/// of experts `first_expert..first_expert + held` (all E on one device; a block under expert parallelism).
pub struct CudaMoe {
    router: CudaWeight,
    gate: DevMem,
    up: DevMem,
    down: DevMem,
    n_experts: usize,
    first_expert: usize,
    held: usize,
    inter: usize,
    hidden: usize,
    top_k: usize,
    norm_topk_prob: bool,
    /// The router's sums for one decode row, n_experts int64 in units of 2^-32, ROUTE_ACC_STRIDE apart,
    /// which the o projection adds up when it takes the router in (`gemv_router` in matmul.cu); zero
    /// between layers.
    route_acc: DevMem,
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
    Tiles,
    TopScale,
}
const N_META: usize = 9;

/// Kinds of scratch buffer (index into `CudaBackend::scratch`).
#[derive(Clone, Copy)]
enum Scratch {
    RouterProbs, // [T, E] f32
    TopIds,      // [T, k] i32
    TopWeights,  // [T, k] f32
    SortedSrc,   // [P] i32
    PairPos,     // [P] i32
    TileE,       // [tiles] i32 (MoE prefill through cuBLAS: tile_e, tile_row0, tile_rows of E + 1 each, side by side)
    TileRow0,    // [tiles] i32
    TileRows,    // [tiles] i32
    Gate,        // [P, I]
    Up,          // [P, I]
    Act,         // [P, I]
    Y,           // [P, H]
    AttnMl,      // [T, nh, splits, 2] f32
    AttnAcc,     // [T, nh, splits, hd] f32
    Xs,          // [P, H] rows of x in expert order
    TopPart,     // [R, blocks, k] u64 (top_rows)
    TopOut,      // [R, k] u64
    MoeIn,       // [T, H] the MoE block's normed input (decode: router_logits stores it for the experts)
}
const N_SCRATCH: usize = 18;

/// A grow-only device buffer that remembers what was last uploaded into it.
#[derive(Default)]
struct Slot {
    mem: Option<DevMem>,
    host: Vec<u8>,
    /// Graph modes (metadata): bytes written in the current forward (None: not yet written in it).
    written: Option<usize>,
}

/// Graph modes' metadata: every kind's bytes at a fixed offset of one pinned staging buffer per graph
/// parity (`Graphs`), and one device buffer that a single copy node, before the step's first kernel,
/// fills from the parity's staging (one copy a step: six copy nodes between the first layer's kernels
/// cost ~20 µs a step, RESULTS.md run 21.3).
#[derive(Default)]
struct MetaArena {
    /// Bytes reserved per kind (grow-only); a kind's offset is the sum of those before it.
    cap: [usize; N_META],
    pinned: [Option<PinnedMem>; 2],
    mem: Option<DevMem>,
    /// The current forward has noted (and under a capture recorded) its copy.
    copied: bool,
}

impl MetaArena {
    fn offset(&self, kind: usize) -> usize {
        self.cap[..kind].iter().sum()
    }

    fn total(&self) -> usize {
        self.cap.iter().sum()
    }
}

/// Chunks per block of `dummy_fill` (must match DF_THREADS in elementwise.cu).
const DUMMY_THREADS: usize = 128;
/// A block's residual add and input norm as the arguments of the product kernels that fuse it
/// (`CudaBackend::fused_norm`); `FusedNorm::NONE` for a plain product.
#[derive(Clone, Copy)]
struct FusedNorm {
    delta: u64,
    x_out: u64,
    w: u64,
    eps: f32,
}

impl FusedNorm {
    const NONE: FusedNorm = FusedNorm { delta: 0, x_out: 0, w: 0, eps: 0.0 };
}

/// Device pointers the `_rope` decode attention kernels read (attention.cu `RopeIn`).
#[derive(Clone, Copy)]
struct RopeArgs {
    k: u64,
    v: u64,
    q_norm: u64,
    k_norm: u64,
    rope: u64,
    positions: u64,
    eps: f32,
}

/// Most values a row `top_rows` selects on the device, and a thread's share of a row (TOP_MAX and
/// TOP_PER_THREAD in elementwise.cu).
const TOP_MAX: usize = 64;
const TOP_PER_THREAD: usize = 16;

/// A staged input id meaning "the id the last queued argmax chooses for this row" (elementwise.cu).
const FROM_DEVICE: u32 = u32::MAX;

/// The greedy choice: `argmax_rows` (elementwise.cu) state for up to `cap` rows, and the last
/// `queue_argmax`'s event. Its per-row block counters also serve `top_rows` (stream order keeps the
/// two kernels apart, and each leaves them zero).
struct Argmax {
    /// keys [cap] u64, chosen [cap] u64, counts [cap] u32: zero between launches (the kernels clear
    /// what they used), chosen the last argmax launch's keys.
    dev: Option<DevMem>,
    /// The chosen keys again, in mapped host memory [cap] u64, and its device address.
    host: Option<(PinnedMem, u64)>,
    cap: usize,
    /// Passed once the last queued launch has stored its keys.
    done: gpu::Event,
    /// Rows queued and not taken yet.
    queued: Option<usize>,
}

impl Argmax {
    /// Device addresses of (keys, counts, chosen) and the host copy.
    fn ptrs(&self) -> (u64, u64, u64, u64) {
        let d = self.dev.as_ref().map_or(0, |m| m.ptr);
        (d, d + 16 * self.cap as u64, d + 8 * self.cap as u64, self.host.as_ref().map_or(0, |h| h.1))
    }
}

/// Least capacity of the block-table slot under graphs: 1024 blocks (16k tokens at block size 16)
/// before it has to grow (which drops the graph once).
const GRAPH_TABLES_MIN_BYTES: usize = 4096;

/// Decode-step CUDA graphs. Each batch size has two, one per parity, each reading the metadata
/// staging of its parity, and launches alternate parities: so the host can fill one parity's
/// staging (the next step's dry pass, `prepare_decode_step`) while the other parity's graph runs.
struct Graphs {
    /// By (rows, parity).
    by_rows: HashMap<(usize, usize), GraphState>,
    /// By (rows, parity): graphs captured for other launch shapes than the current one (a decode step's
    /// shape changes with its context length: the attention's KV splits), most recently used first,
    /// and the hash of their launches; `CudaBackend::graph_cache` of them at most.
    spare: HashMap<(usize, usize), Vec<(Graph, u64)>>,
    /// A prepared next step (its rows; its parity is the current one).
    prepared: Option<usize>,
    /// Recorded after each launch of a parity's graph: once passed, its staging may be rewritten.
    done: [gpu::Event; 2],
}

impl Graphs {
    /// Keep the graph of (rows, parity) `key` whose launches hash to `hash`, at most `cap` of them.
    fn stash(&mut self, key: (usize, usize), graph: Graph, hash: u64, cap: usize) {
        let kept = self.spare.entry(key).or_default();
        kept.insert(0, (graph, hash));
        kept.truncate(cap);
    }

    /// The kept graph of `key` whose launches hash to `hash`, if any: it replays what a capture of
    /// the step would record now (the hash covers every launch's kernel, shape and argument bytes
    /// and the metadata copy).
    fn take_spare(&mut self, key: (usize, usize), hash: u64) -> Option<(Graph, u64)> {
        let kept = self.spare.get_mut(&key)?;
        let i = kept.iter().position(|&(_, h)| h == hash)?;
        Some(kept.remove(i))
    }

    /// Make `key`'s kept graph of `hash` (if any) its current one, keeping the current one (if any).
    fn swap_in(&mut self, key: (usize, usize), hash: u64, cap: usize) -> bool {
        let Some(found) = self.take_spare(key, hash) else { return false };
        if let Some(GraphState::Ready(graph, old)) = self.by_rows.remove(&key) {
            self.stash(key, graph, old, cap);
        }
        self.by_rows.insert(key, GraphState::Ready(found.0, found.1));
        true
    }
}

/// What `decode_step` knows about one batch size and parity.
enum GraphState {
    /// Ran eagerly once: capture on the next step.
    Warm,
    /// Captured: the graph and the hash of its launches.
    Ready(Graph, u64),
    /// Capture failed: always eager.
    Never,
}

pub struct CudaBackend {
    gpu: Gpu,
    ordinal: usize,
    meta: Mutex<Vec<Slot>>,
    /// Graph modes' metadata staging (locked after `meta`).
    staging: Mutex<MetaArena>,
    scratch: Mutex<Vec<Slot>>,
    /// Decode graphs (None: graphs off).
    graphs: Option<Mutex<Graphs>>,
    /// The parity of the next graph step: whose staging graph-mode metadata goes to.
    parity: std::sync::atomic::AtomicUsize,
    /// Decode steps prepared while the previous one runs (`prepare_decode_step`);
    /// `QWEN3RS_CUDA_PIPELINE=0` does each step's dry pass just before its launch.
    pipeline: bool,
    /// Prepared decode steps launched before the host has the ids they feed (`launch_ahead`);
    /// `QWEN3RS_CUDA_AHEAD=0` launches each step after the last one's tokens are read. Off with
    /// `QWEN3RS_CUDA_REPLAYS` (a step launched ahead is launched once).
    ahead: bool,
    /// The last queued greedy choice (`queue_argmax`).
    argmax: Mutex<Argmax>,
    /// Decode graphs kept per batch size and parity for launch shapes other than the current one
    /// (`QWEN3RS_CUDA_GRAPH_CACHE=N`, 8 by default; 0: a shape change drops the graph, and the step
    /// after next captures it again: 0.6B decode 0.928 of the default, 30B-A3B 0.957, RESULTS run 22.1).
    graph_cache: usize,
    /// Top-k sampling's candidates selected on the device (`top_rows`; `QWEN3RS_CUDA_DEVICE_TOP=0`
    /// reads the rows back and selects on the host: 0.6B sampled decode 0.74 of the default, run 22.1).
    device_top: std::sync::atomic::AtomicBool,
    /// Set when a graph-mode forward did something a graph can't replay.
    graph_bad: std::sync::atomic::AtomicBool,
    /// `QWEN3RS_CUDA_TRACE=1`: host time of each graph replay's parts, reported every 100 replays.
    replay_trace: Option<Mutex<ReplayTrace>>,
    /// `QWEN3RS_CUDA_REPLAYS=N` (profiling; 1): each decode-step graph is launched N times. A repeat
    /// recomputes the same step (same inputs, cache slot and logits: the tokens do not change), so
    /// each adds the graph's own GPU time and nothing of the host's (benches/profiles/replay_trace.py).
    replays: usize,
    /// Fused decode kernels (q/k/v, gate·up·SwiGLU, QK-norm + RoPE + KV append, MoE experts);
    /// `QWEN3RS_CUDA_FUSED=0` runs the unfused ops.
    fused: bool,
    /// Decode attention that does QK-norm, RoPE and the KV append itself (`_rope` kernels);
    /// `QWEN3RS_CUDA_ROPE_ATTN=0` launches qk_norm_rope_append before it.
    rope_attn: bool,
    /// MoE decode routing inside the gate/up expert kernel (no moe_route launch);
    /// `QWEN3RS_CUDA_FUSED_ROUTE=0` launches moe_route first.
    fused_route: bool,
    /// MoE decode of one row with the router folded into the o projection (`gemv_router`; no
    /// router_logits launch); `QWEN3RS_CUDA_ROUTER_IN_O=0` keeps the router kernel.
    router_in_o: bool,
    /// Warps (logits) per block of the decode router (8; `QWEN3RS_CUDA_ROUTER_WARPS`, 1..=32: fewer
    /// spread its 128 logits over more SMs).
    router_warps: usize,
    /// Grouped split-KV decode attention; `QWEN3RS_CUDA_SPLITKV=0` keeps one block per (head, row).
    split_kv: bool,
    /// Least keys a decode-attention split takes (8; `QWEN3RS_CUDA_SPLIT_KEYS`; 16 until run 18.3).
    split_keys: usize,
    /// Weight-row lengths whose decode GEMVs run `matmul_wide`'s build: WIDE_ROWS;
    /// `QWEN3RS_CUDA_WIDE_ROWS=K1,FAMILY:K2,...` (0: none).
    wide_rows: Vec<GemvRows>,
    /// The same for `matmul_narrow`'s build: NARROW_ROWS; `QWEN3RS_CUDA_NARROW_ROWS` (wide_rows first).
    narrow_rows: Vec<GemvRows>,
    /// Most blocks an SM of one GEMV family's persistent grids: `QWEN3RS_CUDA_BLOCKS_PER_SM`'s `FAMILY:N`
    /// entries (`parse_block_caps`; its bare `N` caps every persistent grid: `Gpu::new`'s blocks_per_sm).
    family_blocks: Vec<(&'static str, u32)>,
    /// Every decode GEMV on GEMV_BUILDS[i] (tests: `set_gemv_build_all`); past its end: by the lists.
    gemv_build_all: std::sync::atomic::AtomicUsize,
    /// Most decode-attention splits merged inside the attention launch, its splits one thread block
    /// cluster (sm_90+: 16; `QWEN3RS_CUDA_ATTN_CLUSTER=N`, 0 = off); more splits than this, or none of
    /// it, go through an `attention_combine` launch.
    attn_cluster: std::sync::atomic::AtomicUsize,
    /// How the decode attention's clustered splits exchange their states (attention.cu XCH): PUSH_AUTO
    /// (the default) pushes them where this backend holds MoE layers (`holds_moe`) and reads them after a
    /// cluster barrier elsewhere (RESULTS.md run 37.4: 30B-A3B +1.3 %, 0.6B 0.97, 8B and 32B 1.00);
    /// `QWEN3RS_CUDA_ATTN_PUSH=1` / `0` (PUSH_ON / PUSH_OFF) always / never.
    attn_push: std::sync::atomic::AtomicU8,
    /// Whether a MoE layer was uploaded or drawn here (`upload_moe`, `dummy_moe`).
    holds_moe: std::sync::atomic::AtomicBool,
    /// Tiled prefill attention; `QWEN3RS_CUDA_TILED_ATTN=0` keeps one block per (head, row).
    tiled_attn: bool,
    /// MoE prefill through expert_gemm (wgmma) where it runs; `QWEN3RS_CUDA_MOE_WGMMA=0` keeps cuBLAS.
    moe_wgmma: std::sync::atomic::AtomicBool,
    /// expert_gemm's build, an index into EXPERT_TILES: `QWEN3RS_CUDA_EXPERT_TILE` (128 or 256 rows).
    expert_tile: std::sync::atomic::AtomicUsize,
    /// Prefill attention of head_dim 128 on wgmma (sm_90); `QWEN3RS_CUDA_ATTN_WGMMA=0` keeps mma.sync.
    attn_wgmma: std::sync::atomic::AtomicBool,
    /// MoE prefill through cuBLAS grouped GEMMs; `QWEN3RS_CUDA_MOE_CUBLAS=0` keeps `grouped_gemm`.
    /// Turned off for the process's backend after the first cuBLAS refusal.
    moe_cublas: std::sync::atomic::AtomicBool,
    /// Prompt tokens per prefill pass: 2,048 (a 2k prompt in one pass); `QWEN3RS_CUDA_PREFILL_CHUNK`
    /// overrides (512 was the first value).
    prefill_chunk: usize,
}

/// `CudaBackend::attn_push`'s values.
const PUSH_AUTO: u8 = 0;
const PUSH_OFF: u8 = 1;
const PUSH_ON: u8 = 2;

/// `attn_push`'s value for always (Some(true)), never (Some(false)) or by the model (None).
fn push_code(push: Option<bool>) -> u8 {
    match push {
        None => PUSH_AUTO,
        Some(false) => PUSH_OFF,
        Some(true) => PUSH_ON,
    }
}

/// Whether env `name` is set to 0/false/off/no (a switch back to an older kernel path, for bisecting).
fn env_off(name: &str) -> bool {
    matches!(std::env::var(name).as_deref().map(str::trim), Ok("0" | "false" | "off" | "no"))
}

/// A positive count from env `name`, if set to one.
pub(crate) fn env_count(name: &str) -> Option<usize> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok()).filter(|&n: &usize| n > 0)
}

/// Most decode-attention splits a cluster of compute capability `arch` merges: 16 from sm_90, none
/// below (no clusters).
fn attn_cluster_cap(arch: (i32, i32)) -> usize {
    if arch.0 >= 9 {
        MAX_ATTN_CLUSTER
    } else {
        0
    }
}

/// Decode-attention splits merged in one cluster by default: the device's cap
/// (`QWEN3RS_CUDA_ATTN_CLUSTER=N` lowers it; 0: none).
fn attn_cluster_default(arch: (i32, i32)) -> usize {
    if env_off("QWEN3RS_CUDA_ATTN_CLUSTER") {
        return 0;
    }
    env_count("QWEN3RS_CUDA_ATTN_CLUSTER").unwrap_or(MAX_ATTN_CLUSTER).min(attn_cluster_cap(arch))
}

/// Whether decode steps use CUDA graphs: on unless `QWEN3RS_CUDA_GRAPHS` is 0/false/off.
pub fn graphs_enabled() -> bool {
    !env_off("QWEN3RS_CUDA_GRAPHS")
}

fn check_shape(name: &str, got: (usize, usize), want: (usize, usize)) -> Result<()> {
    ensure!(got == want, InvalidArgument, "{name}: buffer is {got:?}, expected {want:?}");
    Ok(())
}

/// Threads of a row-norm block: 1,024, since decode normalises one row and 256 threads left a 4,096-wide
/// add + RMSNorm latency-bound at 15 µs on the H200 (ncu, benches/RESULTS.md run 6).
const NORM_THREADS: u32 = 1024;
/// add_rms_norm_vec (norm.cu): threads a row, 16-byte vectors a thread at most.
const NORM_VEC_THREADS: u32 = 256;
const NORM_VEC_MAX: usize = 4;

/// A MoE layer the kernels can run: 1..=1024 experts routed, top_k of them, `held` a non-empty block.
fn check_moe(e: usize, held: std::ops::Range<usize>, top_k: usize) -> Result<()> {
    ensure!(e > 0 && e <= 1024, InvalidArgument, "the CUDA backend routes 1..=1024 experts, got {e}");
    ensure!(top_k >= 1 && top_k <= e.min(MAX_TOP_K), InvalidArgument, "MoE top_k {top_k} must be in 1..={}", e.min(MAX_TOP_K));
    ensure!(!held.is_empty() && held.end <= e, InvalidArgument, "MoE experts {held:?} held of {e}");
    Ok(())
}

fn blocks(n: usize, per: usize) -> u32 {
    n.div_ceil(per) as u32
}

/// The grouped decode-attention kernel for a head shape and its heads per block (`attention_decode_g{G}_d{hd}`
/// in attention.cu, `_rope_` with the QK-norm, RoPE and cache append in it, `_rope_push_` with its
/// clustered splits pushing their states: G query heads of one KV head per block, G = the group up to
/// `g_max`), if there is one.
fn decode_attention_kernel(s: AttnShape, g_max: usize, rope: bool, push: bool) -> Option<(&'static str, usize)> {
    const NAMES: [[[&str; 4]; 2]; 3] = [
        [
            ["attention_decode_g1_d64", "attention_decode_g2_d64", "attention_decode_g4_d64", "attention_decode_g8_d64"],
            ["attention_decode_g1_d128", "attention_decode_g2_d128", "attention_decode_g4_d128", "attention_decode_g8_d128"],
        ],
        [
            [
                "attention_decode_rope_g1_d64",
                "attention_decode_rope_g2_d64",
                "attention_decode_rope_g4_d64",
                "attention_decode_rope_g8_d64",
            ],
            [
                "attention_decode_rope_g1_d128",
                "attention_decode_rope_g2_d128",
                "attention_decode_rope_g4_d128",
                "attention_decode_rope_g8_d128",
            ],
        ],
        [
            [
                "attention_decode_rope_push_g1_d64",
                "attention_decode_rope_push_g2_d64",
                "attention_decode_rope_push_g4_d64",
                "attention_decode_rope_push_g8_d64",
            ],
            [
                "attention_decode_rope_push_g1_d128",
                "attention_decode_rope_push_g2_d128",
                "attention_decode_rope_push_g4_d128",
                "attention_decode_rope_push_g8_d128",
            ],
        ],
    ];
    let group = s.n_heads / s.n_kv_heads;
    let g = group.min(g_max);
    let d = [64, 128].iter().position(|&hd| hd == s.head_dim)?;
    let gi = [1, 2, 4, 8].iter().position(|&x| x == g)?;
    let kind = if !rope {
        0
    } else if push {
        2
    } else {
        1
    };
    group.is_power_of_two().then_some((NAMES[kind][d][gi], g))
}

/// Host time of graph replays (`QWEN3RS_CUDA_TRACE=1`): waiting for the previous step, the dry pass
/// that hashes every launch and fills the metadata staging, and the graph launch call.
#[derive(Default)]
struct ReplayTrace {
    n: u32,
    sum: [std::time::Duration; 3],
}

impl ReplayTrace {
    fn add(&mut self, parts: [std::time::Duration; 3]) {
        self.n += 1;
        for (s, p) in self.sum.iter_mut().zip(parts) {
            *s += p;
        }
        if self.n == 100 {
            let us = |d: std::time::Duration| d.as_secs_f64() * 1e6 / self.n as f64;
            eprintln!(
                "qwen3rs trace: graph replay host time per step over {} steps: wait {:.0} us, dry pass {:.0} us, launch {:.0} us",
                self.n,
                us(self.sum[0]),
                us(self.sum[1]),
                us(self.sum[2])
            );
            *self = ReplayTrace::default();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> Result<std::sync::MutexGuard<'_, T>> {
    m.lock().map_err(|_| Error::Device("CUDA backend state poisoned by an earlier panic".into()))
}

impl CudaBackend {
    /// A backend on GPU `ordinal` computing in `dtype`. Errors (never panics) when CUDA is unusable.
    pub fn new(ordinal: usize, dtype: DType) -> Result<Self> {
        let (blocks_per_sm, family_blocks) = parse_block_caps(&std::env::var("QWEN3RS_CUDA_BLOCKS_PER_SM").unwrap_or_default())?;
        let skip = parse_skip(&std::env::var("QWEN3RS_CUDA_SKIP").unwrap_or_default())?;
        let gpu = Gpu::new(ordinal, dtype, blocks_per_sm, skip).map_err(|e| match e {
            Error::Device(m) => Error::Device(format!("cannot use cuda:{ordinal}: {m}")),
            other => other,
        })?;
        let slots = |n| (0..n).map(|_| Slot::default()).collect::<Vec<_>>();
        let graphs = if graphs_enabled() {
            Some(Mutex::new(Graphs { by_rows: HashMap::new(), spare: HashMap::new(), prepared: None, done: [gpu.event()?, gpu.event()?] }))
        } else {
            None
        };
        let attn_cluster = attn_cluster_default(gpu.arch);
        let trace = std::env::var_os("QWEN3RS_CUDA_TRACE").is_some() && !env_off("QWEN3RS_CUDA_TRACE");
        let replays = env_count("QWEN3RS_CUDA_REPLAYS").unwrap_or(1);
        let argmax = Argmax { dev: None, host: None, cap: 0, done: gpu.event()?, queued: None };
        Ok(CudaBackend {
            gpu,
            ordinal,
            meta: Mutex::new(slots(N_META)),
            staging: Default::default(),
            scratch: Mutex::new(slots(N_SCRATCH)),
            graphs,
            parity: 0.into(),
            pipeline: !env_off("QWEN3RS_CUDA_PIPELINE"),
            ahead: !env_off("QWEN3RS_CUDA_AHEAD") && replays == 1,
            argmax: Mutex::new(argmax),
            graph_cache: std::env::var("QWEN3RS_CUDA_GRAPH_CACHE").ok().and_then(|v| v.trim().parse().ok()).unwrap_or(8),
            device_top: (!env_off("QWEN3RS_CUDA_DEVICE_TOP")).into(),
            graph_bad: Default::default(),
            replay_trace: trace.then(Default::default),
            replays,
            fused: !env_off("QWEN3RS_CUDA_FUSED"),
            rope_attn: !env_off("QWEN3RS_CUDA_ROPE_ATTN"),
            fused_route: !env_off("QWEN3RS_CUDA_FUSED_ROUTE"),
            router_in_o: !env_off("QWEN3RS_CUDA_ROUTER_IN_O"),
            router_warps: env_count("QWEN3RS_CUDA_ROUTER_WARPS").unwrap_or(8).min(32),
            split_kv: !env_off("QWEN3RS_CUDA_SPLITKV"),
            split_keys: env_count("QWEN3RS_CUDA_SPLIT_KEYS").unwrap_or(8),
            wide_rows: parse_gemv_rows("QWEN3RS_CUDA_WIDE_ROWS", WIDE_ROWS)?,
            narrow_rows: parse_gemv_rows("QWEN3RS_CUDA_NARROW_ROWS", NARROW_ROWS)?,
            gemv_build_all: GEMV_BUILDS.len().into(),
            family_blocks,
            attn_cluster: attn_cluster.into(),
            attn_push: push_code(
                std::env::var("QWEN3RS_CUDA_ATTN_PUSH").is_ok_and(|v| !v.trim().is_empty()).then(|| !env_off("QWEN3RS_CUDA_ATTN_PUSH")),
            )
            .into(),
            holds_moe: false.into(),
            tiled_attn: !env_off("QWEN3RS_CUDA_TILED_ATTN"),
            moe_cublas: (!env_off("QWEN3RS_CUDA_MOE_CUBLAS")).into(),
            moe_wgmma: (!env_off("QWEN3RS_CUDA_MOE_WGMMA")).into(),
            expert_tile: EXPERT_TILES.iter().position(|t| Some(t.0) == env_count("QWEN3RS_CUDA_EXPERT_TILE")).unwrap_or(0).into(),
            attn_wgmma: (!env_off("QWEN3RS_CUDA_ATTN_WGMMA")).into(),
            prefill_chunk: env_count("QWEN3RS_CUDA_PREFILL_CHUNK").unwrap_or(2048),
        })
    }

    /// MoE prefill through cuBLAS grouped GEMMs (`true`, the default) or the `grouped_gemm` kernel,
    /// as `QWEN3RS_CUDA_MOE_CUBLAS` chooses at construction: lets one test process check both.
    pub fn set_moe_cublas(&self, on: bool) {
        self.moe_cublas.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// MoE prefill through expert_gemm where it runs (`true`, the default) or not, as
    /// `QWEN3RS_CUDA_MOE_WGMMA` chooses at construction: lets one test process check both.
    pub fn set_moe_wgmma(&self, on: bool) {
        self.moe_wgmma.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// expert_gemm's build by its most rows a tile (128 or 256), as `QWEN3RS_CUDA_EXPERT_TILE` chooses
    /// at construction: lets one test process check both.
    pub fn set_expert_tile(&self, rows: usize) -> Result<()> {
        let i = EXPERT_TILES.iter().position(|t| t.0 == rows);
        let i = i.ok_or_else(|| Error::InvalidArgument(format!("expert_gemm tiles take 128 or 256 rows, not {rows}")))?;
        self.expert_tile.store(i, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Prefill attention of head_dim 128 on wgmma where it runs (`true`, the default, sm_90) or on
    /// mma.sync, as `QWEN3RS_CUDA_ATTN_WGMMA` chooses at construction: lets one test process check both.
    pub fn set_attn_wgmma(&self, on: bool) {
        self.attn_wgmma.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether expert_gemm runs the experts of a prefill batch with rows of `hidden` and experts
    /// of `inter` rows: Hopper (sm_90a's wgmma), bf16 or f16, hidden a multiple of 128 and inter of 64.
    pub fn expert_gemm_fits(&self, hidden: usize, inter: usize) -> bool {
        self.gpu.arch == (9, 0) && self.gpu.dtype != DType::F32 && hidden.is_multiple_of(128) && inter.is_multiple_of(64)
    }

    /// Top-k sampling's candidates selected on the device (`true`) or from the rows read back, as
    /// `QWEN3RS_CUDA_DEVICE_TOP` chooses at construction: lets one test process check both.
    pub fn set_device_top(&self, on: bool) {
        self.device_top.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Most decode-attention splits merged in a thread block cluster (0: every split count goes
    /// through `attention_combine`), capped at what the device takes: lets one test process check both.
    pub fn set_attn_cluster(&self, max_splits: usize) {
        self.attn_cluster.store(max_splits.min(attn_cluster_cap(self.gpu.arch)), std::sync::atomic::Ordering::Relaxed);
    }

    /// The decode attention's clustered splits always push their states (Some(true)), never (Some(false)),
    /// or push them where this backend holds MoE layers (None, the default): lets one test process check
    /// both exchanges.
    pub fn set_attn_push(&self, push: Option<bool>) {
        self.attn_push.store(push_code(push), std::sync::atomic::Ordering::Relaxed);
    }

    /// Every decode GEMV on build GEMV_BUILDS[i] (Some(i)), or each on the build its row length's
    /// list names (None): lets one test process check every build.
    pub fn set_gemv_build_all(&self, build: Option<usize>) {
        self.gemv_build_all.store(build.unwrap_or(GEMV_BUILDS.len()), std::sync::atomic::Ordering::Relaxed);
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

    /// Elements of one 16-byte access (VEC in the kernels).
    fn vec(&self) -> usize {
        16 / self.esize()
    }

    /// Blocks of 256 threads for n elements at VEC (16 bytes) a thread: the elementwise kernels.
    fn vec_blocks(&self, n: usize) -> u32 {
        blocks(n.div_ceil(self.vec()), 256)
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

    /// Whether decode steps of this backend use CUDA graphs.
    pub fn uses_graphs(&self) -> bool {
        self.graphs.is_some()
    }

    /// Device copy of metadata `bytes` (re-uploaded only when it changed).
    fn meta(&self, kind: Meta, bytes: &[u8]) -> Result<u64> {
        let mode = self.gpu.note(|h| h)?;
        if mode != Mode::Eager {
            return self.meta_graph(kind, bytes, mode);
        }
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

    /// `meta` under a graph: the bytes go to the kind's place in the parity's pinned staging, and the
    /// forward's first call notes (Capture: records) one copy of the whole staging to the device. One
    /// content per kind per forward (every layer's attention shares the batch layout); a second,
    /// different one marks the step bad. The copy moves every kind's whole place, so longer block
    /// tables fit the same graph.
    fn meta_graph(&self, kind: Meta, bytes: &[u8], mode: Mode) -> Result<u64> {
        let mut slots = lock(&self.meta)?;
        let mut arena = lock(&self.staging)?;
        let (k, par) = (kind as usize, self.parity.load(std::sync::atomic::Ordering::Relaxed));
        let slot = &mut slots[k];
        if let (Some(n), Some(pinned), Some(mem)) = (slot.written, arena.pinned[par].as_ref(), arena.mem.as_ref()) {
            let off = arena.offset(k);
            if pinned.as_slice()[off..off + n] != *bytes {
                self.graph_bad.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            return Ok(mem.ptr + off as u64);
        }
        if arena.cap[k] < bytes.len() || arena.mem.is_none() {
            // Growing under a capture would free memory mid-capture: refuse, the caller falls back.
            if mode == Mode::Capture {
                self.graph_bad.store(true, std::sync::atomic::Ordering::Relaxed);
                crate::bail!(Device, "metadata staging grew during a CUDA graph capture");
            }
            let want = if matches!(kind, Meta::Tables) { (bytes.len() * 2).max(GRAPH_TABLES_MIN_BYTES) } else { bytes.len() };
            self.grow_staging(&mut arena, k, want.max(64).next_power_of_two())?;
        }
        let (off, total) = (arena.offset(k), arena.total());
        let copied = std::mem::replace(&mut arena.copied, true);
        let MetaArena { pinned, mem, .. } = &mut *arena;
        let (pinned, mem) = (pinned[par].as_mut().expect("allocated above"), mem.as_ref().expect("allocated above"));
        pinned.as_mut_slice()[off..off + bytes.len()].copy_from_slice(bytes);
        if !copied {
            // The copy node's shape is part of what a replay must match.
            self.gpu.note(|h| [mem.ptr, pinned.addr(), total as u64].iter().fold(h, |h, v| gpu::hash_bytes(h, &v.to_le_bytes())))?;
            if mode == Mode::Capture {
                self.gpu.copy_from_pinned(mem.ptr, pinned, total)?;
            }
        }
        slot.written = Some(bytes.len());
        Ok(mem.ptr + off as u64)
    }

    /// Make kind `k`'s place in the staging `cap` bytes: new buffers, every kind's bytes moved over.
    fn grow_staging(&self, arena: &mut MetaArena, k: usize, cap: usize) -> Result<()> {
        self.gpu.sync()?; // nothing may still read the old buffers
        let old: Vec<(usize, usize)> = (0..N_META).map(|i| (arena.offset(i), arena.cap[i])).collect();
        arena.cap[k] = arena.cap[k].max(cap);
        let total = arena.total();
        arena.mem = None;
        arena.mem = Some(self.gpu.alloc(total)?);
        for p in 0..2 {
            let mut staged = self.gpu.alloc_pinned(total)?;
            if let Some(before) = arena.pinned[p].take() {
                for (i, &(from, n)) in old.iter().enumerate() {
                    let to = arena.offset(i);
                    staged.as_mut_slice()[to..to + n].copy_from_slice(&before.as_slice()[from..from + n]);
                }
            }
            arena.pinned[p] = Some(staged);
        }
        Ok(())
    }

    /// The argmax state, with room for `rows` rows (at least 32: a decode step's pointers never move).
    fn argmax_state(&self, rows: usize) -> Result<std::sync::MutexGuard<'_, Argmax>> {
        let mut a = lock(&self.argmax)?;
        if a.cap < rows {
            ensure!(self.gpu.note(|h| h)? != Mode::Capture, Device, "argmax buffers grew during a CUDA graph capture");
            self.gpu.sync()?; // no launch may still use the old buffers
            let cap = rows.max(32).next_power_of_two();
            (a.dev, a.host) = (None, None);
            a.dev = Some(self.gpu.alloc_zeroed(20 * cap)?);
            a.host = Some(self.gpu.alloc_mapped(8 * cap)?);
            a.cap = cap;
        }
        Ok(a)
    }

    /// Launch a decode step's graph of parity `p`, mark its end, and make the other parity next.
    fn launch_step(&self, graphs: &Graphs, graph: &Graph, p: usize) -> Result<()> {
        self.gpu.launch_graph(graph)?;
        self.gpu.record(&graphs.done[p])?;
        self.parity.store(1 - p, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Overwrite the input ids in parity `p`'s staging (a prepared step's, whose dry pass had none).
    fn set_staged_ids(&self, p: usize, ids: &[u32]) -> Result<()> {
        let mut arena = lock(&self.staging)?;
        let bytes: &[u8] = bytemuck::cast_slice(ids);
        let (off, fits) = (arena.offset(Meta::Ids as usize), arena.cap[Meta::Ids as usize] >= bytes.len());
        let staged = arena.pinned[p].as_mut().filter(|_| fits);
        let staged = staged.ok_or_else(|| Error::Device("a prepared decode step has no staging for its ids".into()))?;
        staged.as_mut_slice()[off..off + bytes.len()].copy_from_slice(bytes);
        Ok(())
    }

    /// Forget what graph-mode forwards wrote (before and after each).
    fn reset_graph_meta(&self) -> Result<()> {
        for slot in lock(&self.meta)?.iter_mut() {
            slot.written = None;
        }
        lock(&self.staging)?.copied = false;
        self.graph_bad.store(false, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Run `body` with launches in `mode`; returns (body's result, launch hash, whether it was bad).
    fn run_in_mode(&self, mode: Mode, body: &mut dyn FnMut() -> Result<()>) -> Result<(Result<()>, u64, bool)> {
        self.reset_graph_meta()?;
        self.gpu.set_mode(mode)?;
        // A panic must not leave the backend in a mode that launches nothing: catch it, go back to
        // eager, and report it as an error.
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(&mut *body)).unwrap_or_else(|p| {
            let msg = p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default();
            Err(Error::Device(format!("panic in a CUDA graph step: {msg}")))
        });
        let hash = self.gpu.set_mode(Mode::Eager)?;
        let bad = self.graph_bad.load(std::sync::atomic::Ordering::Relaxed);
        self.reset_graph_meta()?;
        Ok((r, hash, bad))
    }

    /// Fill device address `out` with the part `window` of the dummy tensor of `shape` (`numel` of
    /// the window), for `jobs` tensors laid end to end: job j uses `keys[j]` (a device array) or
    /// `key` when `keys` is 0. Only the chunks the window reaches are walked.
    #[allow(clippy::too_many_arguments)]
    fn dummy_fill(&self, out: u64, shape: &[usize], window: &Window, spec: &DummySpec, key: u64, keys: u64, jobs: usize) -> Result<()> {
        window.check(shape)?;
        let walk = Walk::new(shape, window);
        let (first, last) = walk.chunks();
        if first == last || jobs == 0 {
            return Ok(());
        }
        let Walk { cols, row0, rows, col0, ncols } = walk;
        let (chunk0, c, hw) = (first as u64, spec.center, spec.half_width);
        self.gpu.launch(
            "elementwise",
            "dummy_fill",
            (blocks(last - first, DUMMY_THREADS), jobs as u32, 1),
            DUMMY_THREADS as u32,
            0,
            args![out, keys, key, cols, row0, rows, col0, ncols, chunk0, c, hw],
        )
    }

    /// moe_sort (moe.cu): the `p` pairs of `ids` [p] (top_k a row) grouped by the experts held here,
    /// into tiles of at most `tile_rows_max` rows in `max_tiles` slots. `out`: sorted_src, pair_pos,
    /// tile_e, tile_row0, tile_rows.
    fn moe_sort(&self, moe: &CudaMoe, ids: u64, p: usize, tile_rows_max: usize, max_tiles: usize, out: [u64; 5]) -> Result<()> {
        let [sorted, pair_pos, tile_e, tile_row0, tile_rows] = out;
        let (pi, ki, held, tm, mt) = (p as i32, moe.top_k as i32, moe.held as i32, tile_rows_max as i32, max_tiles as i32);
        self.gpu.launch(
            "moe",
            "moe_sort",
            (1, 1, 1),
            1024,
            (2 * moe.held * 4) as u32,
            args![ids, pi, ki, held, tm, mt, sorted, pair_pos, tile_e, tile_row0, tile_rows],
        )
    }

    /// The experts of a prefill batch on Hopper's tensor cores (expert_gemm.cu): sort the pairs into
    /// tiles of at most 128 (or 256) rows of one expert, then gate·up·SwiGLU and down, one
    /// expert_gemm launch each, reading x through the sort (no gather) and the tiles on the device
    /// (no host sync), and the weighted combine.
    fn moe_expert_gemm(&self, out: &mut CudaBuf, x: &CudaBuf, moe: &CudaMoe, bufs: [u64; 9]) -> Result<()> {
        let [ids, weights, sorted, pair_pos, tile_e, tile_row0, tile_rows, act, y] = bufs;
        let (t, h, k, inter) = (x.rows, x.cols, moe.top_k, moe.inter);
        let p = t * k;
        // Tile slots (moe_sort marks those past the last -1; their blocks return at once), within
        // moe_impl's tile scratch (sized for MOE_TILE_ROWS-row tiles) and the grid's 65,535 rows.
        let (tile_rows_max, kernel, smem) = EXPERT_TILES[self.expert_tile.load(std::sync::atomic::Ordering::Relaxed)];
        let tiles = p.div_ceil(tile_rows_max) + moe.held;
        ensure!(tiles <= 65_535, InvalidArgument, "moe: {t} rows with top-k {k} make {tiles} expert tiles, more than a grid takes");
        self.moe_sort(moe, ids, p, tile_rows_max, tiles, [sorted, pair_pos, tile_e, tile_row0, tile_rows])?;
        let (ki, xp, hi, ii, null) = (k as i32, x.mem.ptr, h as i32, inter as i32, 0u64);
        let (gp, up, dp) = (moe.gate.ptr, moe.up.ptr, moe.down.ptr);
        self.gpu.launch(
            "expert_gemm",
            kernel,
            (blocks(inter, 64), tiles as u32, 1),
            256,
            smem,
            args![act, xp, sorted, gp, up, tile_e, tile_row0, tile_rows, ii, hi],
        )?;
        self.gpu.launch(
            "expert_gemm",
            kernel,
            (blocks(h, 128), tiles as u32, 1),
            256,
            smem,
            args![y, act, null, dp, null, tile_e, tile_row0, tile_rows, hi, ii],
        )?;
        let o = out.mem.ptr;
        self.gpu.launch("moe", "moe_combine", (self.vec_blocks(h), t as u32, 1), 256, 0, args![o, y, pair_pos, weights, ki, hi])
    }

    /// The experts of a prefill batch through cuBLAS: sort the (row, expert) pairs into one segment
    /// per expert, read the segments' bounds back (one host sync per layer: fine for prefill, never
    /// on the decode path), gather x into expert order, then gate, up and down as grouped GEMMs on
    /// the tensor cores, SwiGLU between, and the weighted combine.
    fn moe_grouped_cublas(&self, out: &mut CudaBuf, x: &CudaBuf, moe: &CudaMoe, bufs: [u64; 11]) -> Result<()> {
        let [ids, weights, sorted, pair_pos, tiles, _, _, g, u, act, y] = bufs;
        let (t, h, e, k, inter) = (x.rows, x.cols, moe.held, moe.top_k, moe.inter);
        let p = t * k;
        let es = self.esize() as u64;
        // One tile per expert held (tile rows = P): at most E tiles, then -1. The three tile arrays
        // side by side in `tiles` (sized for it by moe_impl), so that one read brings them back.
        let (tile_row0, tile_rows) = (tiles + 4 * (e as u64 + 1), tiles + 8 * (e as u64 + 1));
        self.moe_sort(moe, ids, p, p, e + 1, [sorted, pair_pos, tiles, tile_row0, tile_rows])?;
        let all: Vec<i32> = self.download_typed(3 * (e + 1), tiles)?;
        let (te, rest) = all.split_at(e + 1);
        let (r0, nr) = rest.split_at(e + 1);
        let segs: Vec<(u64, u64, u64)> =
            te.iter().zip(r0).zip(nr).take_while(|((&x, _), _)| x >= 0).map(|((&x, &r), &n)| (x as u64, r as u64, n as u64)).collect();
        // The pairs routed to experts held here (all P on one device; under expert parallelism
        // possibly none, and then this rank's part of the output is zero).
        let pl = segs.iter().map(|s| s.2).sum::<u64>() as usize;
        ensure!(segs.iter().all(|s| (s.0 as usize) < e) && pl <= p, Device, "MoE sort produced inconsistent segments");
        let (o, hi, ki) = (out.mem.ptr, h as i32, k as i32);
        if pl == 0 {
            let null = 0u64;
            return self.gpu.launch("moe", "moe_combine", (self.vec_blocks(h), t as u32, 1), 256, 0, args![o, y, null, weights, ki, hi]);
        }
        let xp = x.mem.ptr;
        let [xs] = self.scratch([(Scratch::Xs, p * h * self.esize())])?;
        self.gpu.launch("elementwise", "gather_rows", (self.vec_blocks(h), pl as u32, 1), 256, 0, args![xs, xp, sorted, hi])?;
        let per = (inter * h) as u64 * es;
        let (ie, he) = (inter as u64 * es, h as u64 * es);
        // Gate and up in one call (twice the groups: one launch and one pointer upload fewer, and
        // one wave tail instead of two).
        let gate = segs.iter().map(|&(x, r, n)| (g + r * ie, xs + r * he, moe.gate.ptr + x * per, n as usize));
        let up = segs.iter().map(|&(x, r, n)| (u + r * ie, xs + r * he, moe.up.ptr + x * per, n as usize));
        self.gpu.grouped_gemm(&gate.chain(up).collect::<Vec<_>>(), inter, h)?;
        let n = (pl * inter) as i64;
        self.gpu.launch("elementwise", "swiglu", (self.vec_blocks(pl * inter), 1, 1), 256, 0, args![act, g, u, n])?;
        let down: Vec<_> = segs.iter().map(|&(x, r, n)| (y + r * he, act + r * ie, moe.down.ptr + x * per, n as usize)).collect();
        self.gpu.grouped_gemm(&down, h, inter)?;
        self.gpu.launch("moe", "moe_combine", (self.vec_blocks(h), t as u32, 1), 256, 0, args![o, y, pair_pos, weights, ki, hi])
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
                let block =
                    *seq.blocks
                        .get(pos / kv.block_size)
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
        ensure!(
            w.dtype == self.gpu.dtype,
            InvalidArgument,
            "{what}: weight is {}, backend computes in {}",
            w.dtype.name(),
            self.gpu.dtype.name()
        );
        Ok(())
    }

    /// The device arguments of `input` for a decode product whose prologue can take the block's
    /// residual add and norm (x of t rows of k staged in shared memory: stage_input in matmul.cu);
    /// None where add_rms_norm has to run on its own.
    fn fused_norm(&self, x_out: &CudaBuf, input: &BlockInput<Self>) -> Result<Option<FusedNorm>> {
        let (t, k) = (input.x.rows, input.x.cols);
        if !(self.fused_gemv(t, k) && t * k * self.esize() <= GEMV_SMEM_X) {
            return Ok(None);
        }
        self.check_block_input("add_rms_norm", x_out, input)?;
        Ok(Some(FusedNorm { delta: input.delta.map_or(0, |d| d.mem.ptr), x_out: x_out.mem.ptr, w: input.norm.mem.ptr, eps: input.eps }))
    }

    fn check_block_input(&self, what: &str, x_out: &CudaBuf, input: &BlockInput<Self>) -> Result<()> {
        let x = input.x;
        check_shape(what, (x_out.rows, x_out.cols), (x.rows, x.cols))?;
        if let Some(d) = input.delta {
            check_shape(what, (d.rows, d.cols), (x.rows, x.cols))?;
        }
        self.check_weight(input.norm, what)?;
        ensure!(input.norm.shape == [x.cols], InvalidArgument, "{what}: norm weight {:?} for rows of {}", input.norm.shape, x.cols);
        Ok(())
    }

    /// The launch (module, kernel, grid, dynamic shared memory) of a decode GEMV over `rows` weight rows
    /// (a warp's work each; for moe_down_combine MOE_DOWN_WARPS per output element), with `t` rows of x
    /// per weight row of `k` elements and `x_elems` elements of x read by every block: rows of the lengths
    /// `wide_rows` lists take matmul_wide's build, those `narrow_rows` lists matmul_narrow's; x is
    /// staged in shared memory when it fits `GEMV_SMEM_X`; the grid fills the GPU once (persistent kernels).
    fn gemv_plan(&self, family: &[&'static str], t: usize, k: usize, x_elems: usize, rows: usize) -> Result<GemvPlan> {
        let fam = gemv_family(family);
        let listed = |rows: &[GemvRows]| rows.iter().any(|w| w.k == k && w.family.is_none_or(|f| f == fam));
        let module = match self.gemv_build_all.load(std::sync::atomic::Ordering::Relaxed) {
            i if i < GEMV_BUILDS.len() => GEMV_BUILDS[i],
            _ if listed(&self.wide_rows) => "matmul_wide",
            _ if listed(&self.narrow_rows) => "matmul_narrow",
            _ => "matmul",
        };
        let x_bytes = x_elems * self.esize();
        let xs = x_bytes <= GEMV_SMEM_X;
        let name = family[2 * usize::from(t > 1) + usize::from(xs)];
        let smem = if xs { x_bytes as u32 } else { 0 };
        let mut grid = self.gpu.persistent_grid(module, name, 256, smem, rows.div_ceil(8))?;
        if let Some(&(_, cap)) = self.family_blocks.iter().find(|c| c.0 == fam) {
            grid = grid.min(cap * self.gpu.sms);
        }
        Ok((module, name, (grid, 1, 1), smem))
    }

    /// KV splits of decode attention `kernel` over `blocks` (heads, row) blocks for a longest context
    /// of `longest` keys: at least `split_keys` (8) keys per split, and no more splits than the GPU
    /// holds at once (the kernel's occupancy: a second wave would double the time); a power of two
    /// below that, so that the launch shape (part of a CUDA graph) changes only at a few context
    /// lengths. (Fewer splits give each warp a longer serial chain of keys: 8 keys beat 4, 16 and 64
    /// on the benchmark's contexts, RESULTS.md runs 17.1 and 18.3, and beat 16 again with the splits
    /// merged in clusters, run 19.4; `QWEN3RS_CUDA_SPLIT_KEYS` for benches/kernel_sweep.py.)
    fn decode_splits(&self, kernel: &'static str, threads: u32, longest: usize, blocks: usize) -> Result<usize> {
        let resident = self.gpu.persistent_grid("attention", kernel, threads, 0, usize::MAX)? as usize;
        let fill = (resident / blocks.max(1)).clamp(1, MAX_ATTN_SPLITS);
        let want = (longest / self.split_keys).clamp(1, fill);
        Ok(if want == fill { fill } else { 1 << want.ilog2() })
    }

    /// Whether a product of t rows of k goes to the fused decode GEMV kernels.
    fn fused_gemv(&self, t: usize, k: usize) -> bool {
        self.fused && (1..=GEMV_MAX_ROWS).contains(&t) && k.is_multiple_of(self.vec())
    }

    /// out [T, N] = x [T, K] · w [N, K]ᵀ on raw pointers.
    fn matmul_raw(&self, out: u64, x: u64, w: u64, t: usize, n: usize, k: usize) -> Result<()> {
        if t == 0 || n == 0 {
            return Ok(());
        }
        if t <= GEMV_MAX_ROWS {
            let (ti, ni, ki) = (t as i32, n as i32, k as i32);
            if k.is_multiple_of(self.vec()) {
                let (module, name, grid, smem) = self.gemv_plan(&GEMV, t, k, t * k, n)?;
                return self.gpu.launch(module, name, grid, 256, smem, args![out, x, w, ti, ni, ki]);
            }
            self.gpu.launch("matmul", "gemv_scalar", (blocks(n, 8), 1, 1), 256, 0, args![out, x, w, ti, ni, ki])
        } else {
            self.gpu.gemm(out, x, w, t, n, k)
        }
    }

    /// Whether three products of x go to the fused decode GEMV (`gemv3`).
    fn gemv3_fits(&self, outs: &[&mut CudaBuf], x: &CudaBuf, ws: &[&CudaWeight]) -> bool {
        outs.len() == 3
            && ws.len() == 3
            && self.fused_gemv(x.rows, x.cols)
            && outs.iter().zip(ws).all(|(o, w)| {
                w.dtype == self.gpu.dtype && w.shape.len() == 2 && w.shape[1] == x.cols && o.rows == x.rows && o.cols == w.shape[0]
            })
    }

    /// outs[i] = x · ws[i]ᵀ in one launch (q, k, v), x normed first with `norm` (gemv3_rows in matmul.cu).
    fn gemv3(&self, outs: &mut [&mut CudaBuf], x: &CudaBuf, ws: &[&CudaWeight], norm: FusedNorm) -> Result<()> {
        let (t, k) = (x.rows, x.cols);
        let ns = [ws[0].shape[0], ws[1].shape[0], ws[2].shape[0]];
        let (module, name, grid, smem) = self.gemv_plan(&GEMV3, t, k, t * k, ns.iter().sum())?;
        let (o0, o1, o2) = (outs[0].mem.ptr, outs[1].mem.ptr, outs[2].mem.ptr);
        let (w0, w1, w2) = (ws[0].mem.ptr, ws[1].mem.ptr, ws[2].mem.ptr);
        let (n0, n1, n2) = (ns[0] as i32, ns[1] as i32, ns[2] as i32);
        let (xp, ti, ki) = (x.mem.ptr, t as i32, k as i32);
        let FusedNorm { delta, x_out, w, eps } = norm;
        self.gpu.launch(module, name, grid, 256, smem, args![o0, w0, n0, o1, w1, n1, o2, w2, n2, xp, ti, ki, delta, x_out, w, eps])
    }

    /// Whether gate · up · SwiGLU of x goes to the fused decode GEMV (`gemv_swiglu`).
    fn gemv_swiglu_fits(&self, out: &CudaBuf, x: &CudaBuf, gate: &CudaWeight, up: &CudaWeight) -> bool {
        self.fused_gemv(x.rows, x.cols)
            && [gate, up].iter().all(|w| w.dtype == self.gpu.dtype && w.shape.len() == 2 && w.shape[1] == x.cols)
            && gate.shape == up.shape
            && (out.rows, out.cols) == (x.rows, gate.shape[0])
    }

    /// out = swiglu(x · gateᵀ, x · upᵀ) in one launch, x normed first with `norm`.
    fn gemv_swiglu(&self, out: &mut CudaBuf, x: &CudaBuf, gate: &CudaWeight, up: &CudaWeight, norm: FusedNorm) -> Result<()> {
        let (t, n, k) = (x.rows, gate.shape[0], x.cols);
        let (module, name, grid, smem) = self.gemv_plan(&GEMV_SWIGLU, t, k, t * k, n)?;
        let (o, xp, gp, upp) = (out.mem.ptr, x.mem.ptr, gate.mem.ptr, up.mem.ptr);
        let (ti, ni, ki) = (t as i32, n as i32, k as i32);
        let FusedNorm { delta, x_out, w, eps } = norm;
        self.gpu.launch(module, name, grid, 256, smem, args![o, xp, gp, upp, ti, ni, ki, delta, x_out, w, eps])
    }

    /// The MoE layer (`Backend::moe`); with `norm` (decode only, `moe_decode_fits`) x is the block's
    /// input before its residual add and norm, which the router and gate/up kernels fuse. `in_o`: the
    /// o projection took the router in (`router_in_o`): x is the residual after the add (norm.delta and
    /// norm.x_out unused) and moe.route_acc holds the router's sums.
    fn moe_impl(&self, out: &mut CudaBuf, x: &CudaBuf, moe: &CudaMoe, norm: FusedNorm, in_o: bool) -> Result<()> {
        ensure!(norm.w == 0 || self.moe_decode_fits(x, moe), InvalidArgument, "moe: a fused norm needs the decode path");
        let (t, h, e, k, inter) = (x.rows, x.cols, moe.n_experts, moe.top_k, moe.inter);
        check_shape("moe", (out.rows, out.cols), (t, h))?;
        ensure!(h == moe.hidden, InvalidArgument, "moe: rows of {h}, experts take {}", moe.hidden);
        if t == 0 {
            return Ok(());
        }
        let p = t * k;
        let max_tiles = p.div_ceil(MOE_TILE_ROWS) + moe.held;
        let es = self.esize();
        let decode = self.moe_decode_fits(x, moe);
        // Prefill's experts on expert_gemm (SwiGLU in its epilogue: no gate/up scratch).
        let on_wgmma = !decode && self.moe_wgmma.load(std::sync::atomic::Ordering::Relaxed) && self.expert_gemm_fits(h, inter);
        let gate_up = if on_wgmma { 0 } else { p * inter * es };
        let [probs, ids, weights, sorted, pair_pos, tile_e, tile_row0, tile_rows, g, u, act, y, x_normed] = self.scratch([
            (Scratch::RouterProbs, t * e * 4),
            (Scratch::TopIds, p * 4),
            (Scratch::TopWeights, p * 4),
            (Scratch::SortedSrc, p * 4),
            (Scratch::PairPos, p * 4),
            (Scratch::TileE, max_tiles.max(3 * (moe.held + 1)) * 4),
            (Scratch::TileRow0, max_tiles * 4),
            (Scratch::TileRows, max_tiles * 4),
            (Scratch::Gate, gate_up),
            (Scratch::Up, gate_up),
            (Scratch::Act, p * inter * es),
            (Scratch::Y, p * h * es),
            (Scratch::MoeIn, if norm.w != 0 && !in_o { t * h * es } else { 0 }),
        ])?;
        let (xp, rp, (ei, hi, ii, ki, ti, pi)) =
            (x.mem.ptr, moe.router.mem.ptr, (e as i32, h as i32, inter as i32, k as i32, t as i32, p as i32));
        // 1. Router logits in f32, then softmax / top-k / renormalisation per row (route_rows, a block):
        // in decode the gate/up expert kernel routes for itself (below), else moe_route does.
        // (One launch for logits and routing, a block per row, took 19.8 µs a layer against 12.7
        // for two on Qwen3-30B-A3B decode: one SM computing 128 logits; RESULTS.md run 14.)
        // With a fused norm the router stores the residual (norm.x_out), norms x for itself and, in
        // decode, stores the normed rows for the experts. With `in_o` there are no logits: the o
        // projection added up the router's sums (matmul_norm_moe; +1.8 % on Qwen3-30B-A3B decode
        // against the router kernel, RESULTS.md run 43.4).
        let FusedNorm { delta, x_out, w: nw, eps } = norm;
        // Choices of experts other ranks hold (expert parallelism) come out as id -1, weight 0.
        let (renorm, e0, held) = (moe.norm_topk_prob as i32, moe.first_expert as i32, moe.held as i32);
        // (The router's last block routing every row instead, with a grid-wide counter, measured
        // 276 against 279 tok/s on Qwen3-30B-A3B decode: no gain; RESULTS.md run 15.)
        // With a fused norm (decode only, checked above) the router also stores the normed rows, and
        // the experts read them.
        let x_normed = if nw != 0 && !in_o { x_normed } else { 0 };
        if in_o {
            // The logits are in moe.route_acc (the gate/up kernel scales them).
        } else if t > GEMV_MAX_ROWS && nw == 0 {
            // Prefill: a GEMM (router_logits, a warp per logit, took 233 µs a layer for 2,048 rows of
            // Qwen3-30B-A3B: RESULTS.md run 16.1).
            self.gpu.gemm_to(probs, true, xp, rp, t, e, h)?;
        } else {
            let smem = if nw != 0 { (h * es) as u32 } else { 0 };
            let w = self.router_warps;
            self.gpu.launch(
                "matmul",
                "router_logits",
                (blocks(e, w), t as u32, 1),
                32 * w as u32,
                smem,
                args![probs, xp, rp, ei, hi, delta, x_out, nw, eps, x_normed],
            )?;
        }
        // Decode: the gate/up kernel routes for itself (every block, from the logits), one launch less.
        let self_routed = in_o || (decode && self.fused_route && e <= ROUTE_MAX_E);
        if !self_routed {
            // moe_route's shared memory: 4 rows of E probabilities and k choices, within the 48 KB
            // default for the at most 1,024 experts check_moe admits.
            let smem = (4 * (e + k) * 4) as u32;
            self.gpu.launch(
                "moe",
                "moe_route",
                (blocks(t, 4), 1, 1),
                128,
                smem,
                args![probs, ids, weights, ti, ei, ki, renorm, e0, held],
            )?;
        }
        if decode {
            // Decode: GEMVs over the rows of the chosen experts only (no sort, every warp busy):
            // gate·up·SwiGLU per (pair, expert row), then the down projection with the weighted
            // combine in it, MOE_DOWN_WARPS warps per output element. Gate/up read the rows the router normed.
            let (gp, upp, dp) = (moe.gate.ptr, moe.up.ptr, moe.down.ptr);
            let (module, name, grid, smem) = self.gemv_plan(&MOE_GEMV_SWIGLU, 1, h, t * h, p * inter)?;
            let xin = if x_normed != 0 { x_normed } else { xp };
            // The router's sums and the norm the gate/up kernel applies itself (in_o), or its logits.
            let (logits, acc, acc_nw) = match (in_o, self_routed) {
                (true, _) => (0u64, moe.route_acc.ptr, nw),
                (false, true) => (probs, 0, 0),
                (false, false) => (0, 0, 0),
            };
            ensure!(!in_o || smem > 0, Device, "moe: the router's sums need x in shared memory");
            self.gpu.launch(
                module,
                name,
                grid,
                256,
                smem,
                args![act, xin, gp, upp, ids, weights, logits, acc, acc_nw, eps, ei, renorm, e0, held, ki, pi, ii, hi],
            )?;
            let (module, name, grid, smem) = self.gemv_plan(&MOE_DOWN_COMBINE, 1, inter, p * inter, t * h * MOE_DOWN_WARPS)?;
            let o = out.mem.ptr;
            return self.gpu.launch(module, name, grid, 256, smem, args![o, act, dp, ids, weights, ti, ki, hi, ii, acc, ei]);
        }
        if on_wgmma {
            return self.moe_expert_gemm(out, x, moe, [ids, weights, sorted, pair_pos, tile_e, tile_row0, tile_rows, act, y]);
        }
        if self.moe_cublas.load(std::sync::atomic::Ordering::Relaxed) && self.gpu.note(|h| h)? == Mode::Eager {
            match self.moe_grouped_cublas(out, x, moe, [ids, weights, sorted, pair_pos, tile_e, tile_row0, tile_rows, g, u, act, y]) {
                Ok(()) => return Ok(()),
                // A cuBLAS without grouped GEMM for this dtype: the kernel path from now on. The
                // routing above is still valid; sorting again below is harmless.
                Err(Error::Device(m)) if m.contains("cuBLAS grouped GEMM") => {
                    eprintln!("qwen3rs: {m}; MoE prefill falls back to the grouped_gemm kernel");
                    self.moe_cublas.store(false, std::sync::atomic::Ordering::Relaxed);
                }
                Err(e) => return Err(e),
            }
        }
        // 2. Group the (row, expert) pairs by expert (of those held here) into tiles.
        self.moe_sort(moe, ids, p, MOE_TILE_ROWS, max_tiles, [sorted, pair_pos, tile_e, tile_row0, tile_rows])?;
        // 3. Experts: gate and up over the gathered rows, SwiGLU, down.
        let (gp, up, dp, null) = (moe.gate.ptr, moe.up.ptr, moe.down.ptr, 0u64);
        let grid_i = (blocks(inter, 64), max_tiles as u32, 1);
        self.gpu.launch("matmul", "grouped_gemm", grid_i, 256, 0, args![g, xp, gp, sorted, tile_e, tile_row0, tile_rows, ii, hi])?;
        self.gpu.launch("matmul", "grouped_gemm", grid_i, 256, 0, args![u, xp, up, sorted, tile_e, tile_row0, tile_rows, ii, hi])?;
        let n = (p * inter) as i64;
        self.gpu.launch("elementwise", "swiglu", (self.vec_blocks(p * inter), 1, 1), 256, 0, args![act, g, u, n])?;
        self.gpu.launch(
            "matmul",
            "grouped_gemm",
            (blocks(h, 64), max_tiles as u32, 1),
            256,
            0,
            args![y, act, dp, null, tile_e, tile_row0, tile_rows, hi, ii],
        )?;
        // 4. Weighted sum per row, in ascending expert order.
        let o = out.mem.ptr;
        self.gpu.launch("moe", "moe_combine", (self.vec_blocks(h), t as u32, 1), 256, 0, args![o, y, pair_pos, weights, ki, hi])
    }

    /// Decode attention, if this batch (at most GEMV_MAX_ROWS rows) and head shape have a kernel:
    /// a block per (KV head, G of its query heads, row, split of the keys), then a merge of the
    /// splits when there are several. G = 8 reads each K/V row once for up to 8 heads (long
    /// contexts); below 1,024 keys the reads are few and G = 2 gives more, lighter blocks (RESULTS.md
    /// run 13). With `rope` (one row per sequence) the `_rope` kernel, which also does
    /// qk_norm_rope_append's work. Ok(false): no such kernel (or `rope` from 1,024 keys on), nothing launched.
    fn decode_attention(
        &self,
        out: &CudaBuf,
        q: &CudaBuf,
        kv: &CudaKv,
        batch: &BatchInfo,
        shape: AttnShape,
        rope: Option<RopeArgs>,
    ) -> Result<bool> {
        let (nh, hd, t) = (shape.n_heads, shape.head_dim, q.rows);
        ensure!(shape.n_kv_heads > 0 && nh % shape.n_kv_heads == 0, InvalidArgument, "n_heads must be a multiple of n_kv_heads");
        let longest = batch.seqs.iter().map(|s| s.start_pos + s.rows.len()).max().unwrap_or(0);
        let g_max = if longest < 1024 { 2 } else { 8 };
        // The `_rope` kernels only where launches dominate: from 1,024 keys on they decoded 8B at 8k / 32k
        // at 145 / 77 tok/s against 167 / 101 with qk_norm_rope_append launched first (RESULTS.md run 16.1).
        if rope.is_some() && longest >= 1024 {
            return Ok(false);
        }
        let push = match self.attn_push.load(std::sync::atomic::Ordering::Relaxed) {
            PUSH_AUTO => self.holds_moe.load(std::sync::atomic::Ordering::Relaxed),
            on => on == PUSH_ON,
        };
        let Some((name, g)) = decode_attention_kernel(shape, g_max, rope.is_some(), push).filter(|_| self.split_kv && t <= GEMV_MAX_ROWS)
        else {
            return Ok(false);
        };
        let (_, ctx, table_at, tables) = self.batch_meta(batch, kv)?;
        let (o, qp, kc, vc) = (out.mem.ptr, q.mem.ptr, kv.k.ptr, kv.v.ptr);
        let (nhi, nkv, hdi, bs, kvd) = (nh as i32, shape.n_kv_heads as i32, hd as i32, kv.block_size as i32, kv.kv_dim as i32);
        let scale = 1.0 / (hd as f32).sqrt();
        let group_blocks = nh / g;
        // AD_WARPS warps a block (attention.cu; its launch bounds).
        let threads = self.gpu.max_threads("attention", name)?;
        let splits = self.decode_splits(name, threads, longest, group_blocks * t)?;
        // Up to attn_cluster splits are one cluster and merge in the launch (RESULTS.md run 19.2: +5 %
        // on 0.6B, +2 % on 30B-A3B); more leave partial states in scratch for attention_combine.
        let clustered = splits > 1 && splits <= self.attn_cluster.load(std::sync::atomic::Ordering::Relaxed);
        let [ml, acc] = if splits == 1 || clustered {
            [0, 0]
        } else {
            self.scratch([(Scratch::AttnMl, t * nh * splits * 8), (Scratch::AttnAcc, t * nh * splits * hd * 4)])?
        };
        let grid = (group_blocks as u32, t as u32, splits as u32);
        let cluster = if clustered { splits as u32 } else { 1 };
        match rope {
            None => self.gpu.launch_cluster(
                "attention",
                name,
                grid,
                threads,
                0,
                cluster,
                args![o, ml, acc, qp, kc, vc, ctx, table_at, tables, nhi, nkv, bs, kvd, scale],
            )?,
            Some(RopeArgs { k, v, q_norm, k_norm, rope, positions, eps }) => self.gpu.launch_cluster(
                "attention",
                name,
                grid,
                threads,
                0,
                cluster,
                args![o, ml, acc, qp, kc, vc, ctx, table_at, tables, nhi, nkv, bs, kvd, scale, k, v, q_norm, k_norm, rope, positions, eps],
            )?,
        }
        if splits > 1 && !clustered {
            let si = splits as i32;
            self.gpu.launch("attention", "attention_combine", (nh as u32, t as u32, 1), 128, 0, args![o, ml, acc, nhi, hdi, si])?;
        }
        Ok(true)
    }

    /// The arguments of qk_norm_rope_append (and of the `_rope` decode attention) fit together.
    #[allow(clippy::too_many_arguments)]
    fn check_qk_norm_rope(
        &self,
        q: &CudaBuf,
        k: &CudaBuf,
        v: &CudaBuf,
        q_norm: &CudaWeight,
        k_norm: &CudaWeight,
        rope: &CudaWeight,
        kv: &CudaKv,
        batch: &BatchInfo,
        shape: AttnShape,
    ) -> Result<()> {
        let (hd, d) = (shape.head_dim, kv.kv_dim);
        ensure!(
            rope.dtype == DType::F32 && rope.shape.len() == 2 && rope.shape[1] == hd,
            InvalidArgument,
            "rope table must be f32 [max_pos, head_dim]"
        );
        let max_pos = rope.shape[0];
        if let Some(&p) = batch.positions.iter().find(|&&p| p as usize >= max_pos) {
            bail!(InvalidArgument, "position {p} is past the RoPE table ({max_pos})");
        }
        check_shape("qk_norm_rope", (q.rows, q.cols), (batch.rows(), shape.n_heads * hd))?;
        check_shape("qk_norm_rope", (k.rows, k.cols), (batch.rows(), shape.n_kv_heads * hd))?;
        check_shape("kv_append", (v.rows, v.cols), (batch.rows(), d))?;
        ensure!(d == shape.n_kv_heads * hd, InvalidArgument, "KV cache rows of {d} for {} heads of {hd}", shape.n_kv_heads);
        self.check_weight(q_norm, "q_norm")?;
        self.check_weight(k_norm, "k_norm")
    }

    /// qk_norm_rope (norm.cu) over `rows` rows: a warp a head for head_dim 64 and 128, else a block a head.
    fn launch_qk_norm_rope(&self, shape: AttnShape, rows: usize, args: &[(*mut std::ffi::c_void, usize)]) -> Result<()> {
        const QKR_WARPS: usize = 4; // norm.cu
        let heads = shape.n_heads + shape.n_kv_heads;
        let warp_kernel = match shape.head_dim {
            64 => "qk_norm_rope_d64",
            128 => "qk_norm_rope_d128",
            hd => return self.gpu.launch("norm", "qk_norm_rope", (heads as u32, rows as u32, 1), 128, (hd * 4) as u32, args),
        };
        self.gpu.launch("norm", warp_kernel, (heads.div_ceil(QKR_WARPS) as u32, rows as u32, 1), 128, 0, args)
    }

    /// Whether a MoE layer over x takes the decode path (expert GEMVs over the chosen experts only).
    fn moe_decode_fits(&self, x: &CudaBuf, moe: &CudaMoe) -> bool {
        self.fused_gemv(x.rows, x.cols) && moe.inter.is_multiple_of(self.vec())
    }

    /// Whether the o projection a · o_projᵀ (one row, into the residual x) can take in `moe`'s
    /// router (`matmul_norm_moe`, gemv_router in matmul.cu: 8 adjacent rows a block, a thread an
    /// expert, the gate/up kernel routing from the sums); the block input's norm fits as well
    /// (`fused_norm`, checked by the caller).
    fn router_in_o_fits(&self, a: &CudaBuf, o_proj: &CudaWeight, x: &CudaBuf, moe: &CudaMoe) -> bool {
        self.router_in_o
            && self.fused_route
            && x.rows == 1
            && x.cols.is_multiple_of(8)
            && moe.n_experts <= 256  // a thread an expert in blocks of 256
            && self.moe_decode_fits(x, moe)
            && self.fused_gemv(a.rows, a.cols)
            && o_proj.dtype == self.gpu.dtype
            && o_proj.shape == [x.cols, a.cols]
            && moe.router.dtype == self.gpu.dtype
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
        let (e, h, held) = (moe.router.shape[0], moe.router.shape[1], moe.experts.len());
        check_moe(e, moe.first_expert..moe.first_expert + held, moe.top_k)?;
        let inter = moe.experts[0][0].shape[0];
        let es = self.esize();
        let per = inter * h * es;
        let (gate, up, down) = (self.gpu.alloc(held * per)?, self.gpu.alloc(held * per)?, self.gpu.alloc(held * per)?);
        // Expert by expert straight into its place: no host copy of a whole layer.
        for (i, [g, u, d]) in moe.experts.iter().enumerate() {
            for (dst, t) in [(&gate, g), (&up, u), (&down, d)] {
                ensure!(t.numel() == inter * h, InvalidArgument, "expert {i}: tensor of {:?} elements, expected {}", t.shape, inter * h);
                self.gpu.upload(dst, i * per, self.host_bytes(t, self.gpu.dtype).raw())?;
            }
        }
        let router = self.upload(moe.router)?;
        self.holds_moe.store(true, std::sync::atomic::Ordering::Relaxed);
        Ok(CudaMoe {
            router,
            gate,
            up,
            down,
            n_experts: e,
            first_expert: moe.first_expert,
            held,
            inter,
            hidden: h,
            top_k: moe.top_k,
            norm_topk_prob: moe.norm_topk_prob,
            route_acc: self.gpu.alloc_zeroed(e * ROUTE_ACC_STRIDE * 8)?,
        })
    }

    fn dummy_weight(&self, spec: &DummySpec, shape: &[usize]) -> Result<CudaWeight> {
        self.dummy_window(spec, shape, &Window::full(shape))
    }

    fn dummy_window(&self, spec: &DummySpec, shape: &[usize], window: &Window) -> Result<CudaWeight> {
        window.check(shape)?;
        let mem = self.gpu.alloc(window.numel() * self.esize())?;
        self.dummy_fill(mem.ptr, shape, window, spec, spec.stream, 0, 1)?;
        Ok(CudaWeight { mem, shape: window.part_shape(shape), dtype: self.gpu.dtype })
    }

    fn dummy_moe(&self, moe: MoeDummy) -> Result<CudaMoe> {
        let (e, h, inter, held) = (moe.experts.len(), moe.hidden, moe.inter, moe.held.clone());
        check_moe(e, held.clone(), moe.top_k)?;
        let (gate_up, down) = moe.windows();
        let per = gate_up.numel();
        let mut out = vec![];
        // One launch per projection over the experts held (grid.y = expert): each launch's chains are
        // as long as one expert's tensor, so 128 experts cost about what one does. Under tensor
        // parallelism each expert's part (`moe.part`) is drawn alone; under expert parallelism only
        // this rank's experts (`moe.held`).
        let specs = &moe.experts[held.clone()];
        for (p, (shape, window)) in [([inter, h], &gate_up), ([inter, h], &gate_up), ([h, inter], &down)].into_iter().enumerate() {
            let mem = self.gpu.alloc(held.len() * per * self.esize())?;
            let keys: Vec<u64> = specs.iter().map(|x| x[p].stream).collect();
            let keys_d = self.gpu.alloc(held.len() * 8)?;
            self.gpu.upload(&keys_d, 0, bytemuck::cast_slice(&keys))?;
            self.dummy_fill(mem.ptr, &shape, window, &specs[0][p], 0, keys_d.ptr, held.len())?;
            drop(keys_d); // cuMemFree waits for the fill
            out.push(mem);
        }
        let router = self.dummy_weight(&moe.router, &[e, h])?;
        let [gate, up, down]: [DevMem; 3] = out.try_into().map_err(|_| Error::Device("three projections".into()))?;
        self.holds_moe.store(true, std::sync::atomic::Ordering::Relaxed);
        Ok(CudaMoe {
            router,
            gate,
            up,
            down,
            n_experts: e,
            first_expert: held.start,
            held: held.len(),
            inter: moe.part.len(),
            hidden: h,
            top_k: moe.top_k,
            norm_topk_prob: moe.norm_topk_prob,
            route_acc: self.gpu.alloc_zeroed(e * ROUTE_ACC_STRIDE * 8)?,
        })
    }

    fn prefill_chunk(&self) -> usize {
        self.prefill_chunk
    }

    fn decode_step(&self, rows: usize, prepared: Option<&[u32]>, body: &mut dyn FnMut() -> Result<()>) -> Result<()> {
        let Some(graphs) = &self.graphs else { return body() };
        // Bigger batches use cuBLAS, which is left out of capture.
        if rows == 0 || rows > GEMV_MAX_ROWS {
            return body();
        }
        let mut graphs = lock(graphs)?;
        let was_prepared = graphs.prepared.take() == Some(rows);
        let p = self.parity.load(std::sync::atomic::Ordering::Relaxed);
        match graphs.by_rows.remove(&(rows, p)) {
            None => {
                body()?; // kernels load, scratch and metadata slots reach this shape's sizes
                graphs.by_rows.insert((rows, 0), GraphState::Warm);
                graphs.by_rows.insert((rows, 1), GraphState::Warm);
                Ok(())
            }
            Some(GraphState::Never) => {
                graphs.by_rows.insert((rows, p), GraphState::Never);
                body()
            }
            Some(GraphState::Warm) => {
                // A dry pass (no launches) grows the metadata slots and fills their staging, so
                // the capture itself allocates nothing.
                self.gpu.sync()?;
                let (r, got, bad) = self.run_in_mode(Mode::Replay, body)?;
                r?;
                if !bad && graphs.swap_in((rows, p), got, self.graph_cache) {
                    let Some(GraphState::Ready(graph, _)) = graphs.by_rows.get(&(rows, p)) else { bail!(Device, "decode graph lost") };
                    return self.launch_step(&graphs, graph, p);
                }
                // Whatever goes wrong below, nothing of the step has run (a dry pass and a capture
                // launch nothing): give up graphs for this batch size, say why once, run eagerly.
                let captured: std::result::Result<(Graph, u64), String> = if bad {
                    Err("the forward's metadata changed within a step".into())
                } else if let Err(e) = self.gpu.begin_capture() {
                    Err(e.to_string())
                } else {
                    let (r, hash, bad) = self.run_in_mode(Mode::Capture, body)?;
                    let graph = self.gpu.end_capture();
                    match (r, graph) {
                        (Ok(()), Ok(graph)) if !bad => match self.launch_step(&graphs, &graph, p) {
                            Ok(()) => Ok((graph, hash)),
                            Err(e) => Err(e.to_string()),
                        },
                        (Err(e), _) | (_, Err(e)) => Err(e.to_string()),
                        _ => Err("a metadata slot had to grow during the capture".into()),
                    }
                };
                match captured {
                    Ok((graph, hash)) => {
                        graphs.by_rows.insert((rows, p), GraphState::Ready(graph, hash));
                        Ok(())
                    }
                    Err(why) => {
                        eprintln!("qwen3rs: no CUDA graph for decode batches of {rows} ({why}); decoding them eagerly");
                        graphs.by_rows.insert((rows, 0), GraphState::Never);
                        graphs.by_rows.insert((rows, 1), GraphState::Never);
                        body()
                    }
                }
            }
            Some(GraphState::Ready(mut graph, mut hash)) => {
                let t0 = std::time::Instant::now();
                let t1 = match prepared.filter(|_| was_prepared) {
                    // prepare_decode_step did the dry pass while the previous step ran; only the
                    // input ids were unknown then.
                    Some(ids) => {
                        self.set_staged_ids(p, ids)?;
                        t0
                    }
                    None => {
                        // The last graph of this parity must be done with its staging first.
                        graphs.done[p].wait()?;
                        let t1 = std::time::Instant::now();
                        let (r, got, bad) = self.run_in_mode(Mode::Replay, body)?;
                        r?;
                        if bad || got != hash {
                            // Another launch shape (the attention's KV splits follow the context) or
                            // something moved (scratch reallocated, a slot grew): the graph kept for
                            // these launches, else run eagerly and capture on the next step.
                            match (!bad).then(|| graphs.take_spare((rows, p), got)).flatten() {
                                Some((kept, h)) => {
                                    graphs.stash((rows, p), std::mem::replace(&mut graph, kept), hash, self.graph_cache);
                                    hash = h;
                                }
                                None => {
                                    graphs.stash((rows, p), graph, hash, self.graph_cache);
                                    graphs.by_rows.insert((rows, p), GraphState::Warm);
                                    return body();
                                }
                            }
                        }
                        t1
                    }
                };
                let t2 = std::time::Instant::now();
                for _ in 1..self.replays {
                    self.gpu.launch_graph(&graph)?;
                }
                self.launch_step(&graphs, &graph, p)?;
                graphs.by_rows.insert((rows, p), GraphState::Ready(graph, hash));
                if let Some(trace) = &self.replay_trace {
                    lock(trace)?.add([t1 - t0, t2 - t1, t2.elapsed()]);
                }
                Ok(())
            }
        }
    }

    fn prepare_decode_step(&self, rows: usize, body: &mut dyn FnMut() -> Result<()>) -> Result<bool> {
        let Some(graphs) = self.graphs.as_ref().filter(|_| self.pipeline) else { return Ok(false) };
        let mut graphs = lock(graphs)?;
        graphs.prepared = None;
        // The next step's parity (the current step's graph flipped it).
        let p = self.parity.load(std::sync::atomic::Ordering::Relaxed);
        let Some(GraphState::Ready(_, hash)) = graphs.by_rows.get(&(rows, p)) else { return Ok(false) };
        let hash = *hash;
        graphs.done[p].wait()?;
        let (r, got, bad) = self.run_in_mode(Mode::Replay, body)?;
        r?;
        // Another launch shape: the graph kept for it, if any; else the step itself finds the
        // mismatch again and captures.
        if !bad && (got == hash || graphs.swap_in((rows, p), got, self.graph_cache)) {
            graphs.prepared = Some(rows);
        }
        Ok(graphs.prepared.is_some())
    }

    fn alloc(&self, rows: usize, cols: usize) -> Result<CudaBuf> {
        let bytes = rows
            .checked_mul(cols)
            .and_then(|n| n.checked_mul(self.esize()))
            .ok_or_else(|| Error::InvalidArgument("buffer size overflows".into()))?;
        Ok(CudaBuf { mem: self.gpu.alloc_zeroed(bytes)?, rows, cols })
    }

    fn alloc_kv(&self, n_blocks: usize, block_size: usize, kv_dim: usize) -> Result<CudaKv> {
        // The decode attention finds a key's slot by shift and mask (attention.cu, slot_of).
        ensure!(block_size.is_power_of_two(), InvalidArgument, "KV cache block_size {block_size} is not a power of two");
        let bytes = n_blocks
            .checked_mul(block_size)
            .and_then(|n| n.checked_mul(kv_dim))
            .and_then(|n| n.checked_mul(self.esize()))
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
        // Where a step launched ahead finds the ids it is fed (FROM_DEVICE in its staged ids): a
        // decode batch's; the argmax of a longer one never feeds a step.
        let chosen = if ids.len() <= GEMV_MAX_ROWS { self.argmax_state(ids.len())?.ptrs().2 } else { 0 };
        let (o, t, hi, vi) = (out.mem.ptr, table.mem.ptr, h as i32, vocab as i32);
        self.gpu.launch("elementwise", "embed", (blocks(h, 256), ids.len() as u32, 1), 256, 0, args![o, t, ids_d, chosen, hi, vi])
    }

    fn add_rms_norm(&self, x_out: &mut CudaBuf, h: &mut CudaBuf, input: &BlockInput<Self>) -> Result<()> {
        self.check_block_input("add_rms_norm", x_out, input)?;
        check_shape("add_rms_norm", (h.rows, h.cols), (x_out.rows, x_out.cols))?;
        let (xo, x, d, o, wp) = (x_out.mem.ptr, input.x.mem.ptr, input.delta.map_or(0, |d| d.mem.ptr), h.mem.ptr, input.norm.mem.ptr);
        let (c, eps) = (x_out.cols as i32, input.eps);
        let (name, threads) =
            if x_out.cols.is_multiple_of(self.vec()) && x_out.cols <= NORM_VEC_THREADS as usize * self.vec() * NORM_VEC_MAX {
                ("add_rms_norm_vec", NORM_VEC_THREADS)
            } else {
                ("add_rms_norm", NORM_THREADS)
            };
        self.gpu.launch("norm", name, (x_out.rows as u32, 1, 1), threads, 0, args![xo, x, d, o, wp, c, eps])
    }

    fn norm_matmul_many(
        &self,
        x_out: &mut CudaBuf,
        h: &mut CudaBuf,
        input: &BlockInput<Self>,
        outs: &mut [&mut CudaBuf],
        ws: &[&CudaWeight],
    ) -> Result<()> {
        match self.fused_norm(x_out, input)? {
            Some(norm) if self.gemv3_fits(outs, input.x, ws) => self.gemv3(outs, input.x, ws, norm),
            _ => {
                self.add_rms_norm(x_out, h, input)?;
                self.matmul_many(outs, h, ws)
            }
        }
    }

    fn norm_matmul_swiglu(
        &self,
        x_out: &mut CudaBuf,
        h: &mut CudaBuf,
        input: &BlockInput<Self>,
        out: &mut CudaBuf,
        g: &mut CudaBuf,
        u: &mut CudaBuf,
        gate: &CudaWeight,
        up: &CudaWeight,
    ) -> Result<()> {
        match self.fused_norm(x_out, input)? {
            Some(norm) if self.gemv_swiglu_fits(out, input.x, gate, up) => self.gemv_swiglu(out, input.x, gate, up, norm),
            _ => {
                self.add_rms_norm(x_out, h, input)?;
                self.matmul_swiglu(out, g, u, h, gate, up)
            }
        }
    }

    fn norm_moe(&self, x_out: &mut CudaBuf, h: &mut CudaBuf, input: &BlockInput<Self>, out: &mut CudaBuf, moe: &CudaMoe) -> Result<()> {
        match self.fused_norm(x_out, input)? {
            Some(norm) if self.moe_decode_fits(input.x, moe) => self.moe_impl(out, input.x, moe, norm, false),
            _ => {
                self.add_rms_norm(x_out, h, input)?;
                self.moe(out, h, moe)
            }
        }
    }

    fn matmul_norm_moe(
        &self,
        delta: &mut CudaBuf,
        a: &CudaBuf,
        o_proj: &CudaWeight,
        x_out: &mut CudaBuf,
        h: &mut CudaBuf,
        (x, norm, eps): (&CudaBuf, &CudaWeight, f32),
        out: &mut CudaBuf,
        moe: &CudaMoe,
    ) -> Result<()> {
        let fused = self.fused_norm(x_out, &BlockInput { x, delta: Some(delta), norm, eps })?;
        let Some(fused) = fused.filter(|_| self.router_in_o_fits(a, o_proj, x, moe)) else {
            self.matmul(delta, a, o_proj)?;
            return self.norm_moe(x_out, h, &BlockInput { x, delta: Some(delta), norm, eps }, out, moe);
        };
        let (n, k) = (x.cols, a.cols);
        let (module, name, grid, smem) = self.gemv_plan(&GEMV_ROUTER, 1, k, k, n)?;
        let (xo, ap, wp, xp, nw, rp, acc) =
            (x_out.mem.ptr, a.mem.ptr, o_proj.mem.ptr, x.mem.ptr, fused.w, moe.router.mem.ptr, moe.route_acc.ptr);
        let (ni, ki, ei) = (n as i32, k as i32, moe.n_experts as i32);
        self.gpu.launch(module, name, grid, 256, smem, args![xo, ap, wp, ni, ki, xp, nw, rp, ei, acc])?;
        self.moe_impl(out, x_out, moe, FusedNorm { delta: 0, x_out: 0, ..fused }, true)
    }

    fn matmul(&self, out: &mut CudaBuf, x: &CudaBuf, w: &CudaWeight) -> Result<()> {
        self.check_weight(w, "matmul")?;
        ensure!(
            w.shape.len() == 2 && w.shape[1] == x.cols,
            InvalidArgument,
            "matmul: weight {:?} does not take rows of {}",
            w.shape,
            x.cols
        );
        check_shape("matmul", (out.rows, out.cols), (x.rows, w.shape[0]))?;
        self.matmul_raw(out.mem.ptr, x.mem.ptr, w.mem.ptr, x.rows, w.shape[0], x.cols)
    }

    fn matmul_many(&self, outs: &mut [&mut CudaBuf], x: &CudaBuf, ws: &[&CudaWeight]) -> Result<()> {
        if self.gemv3_fits(outs, x, ws) {
            return self.gemv3(outs, x, ws, FusedNorm::NONE);
        }
        ensure!(outs.len() == ws.len(), InvalidArgument, "matmul_many: {} outputs for {} weights", outs.len(), ws.len());
        for (o, w) in outs.iter_mut().zip(ws) {
            self.matmul(o, x, w)?;
        }
        Ok(())
    }

    fn matmul_swiglu(
        &self,
        out: &mut CudaBuf,
        g: &mut CudaBuf,
        u: &mut CudaBuf,
        x: &CudaBuf,
        gate: &CudaWeight,
        up: &CudaWeight,
    ) -> Result<()> {
        if self.gemv_swiglu_fits(out, x, gate, up) {
            return self.gemv_swiglu(out, x, gate, up, FusedNorm::NONE);
        }
        self.matmul(g, x, gate)?;
        self.matmul(u, x, up)?;
        self.swiglu(out, g, u)
    }

    fn qk_norm_rope(
        &self,
        q: &mut CudaBuf,
        k: &mut CudaBuf,
        q_norm: &CudaWeight,
        k_norm: &CudaWeight,
        eps: f32,
        rope: &CudaWeight,
        positions: &[u32],
        shape: AttnShape,
    ) -> Result<()> {
        let hd = shape.head_dim;
        ensure!(
            rope.dtype == DType::F32 && rope.shape.len() == 2 && rope.shape[1] == hd,
            InvalidArgument,
            "rope table must be f32 [max_pos, head_dim]"
        );
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
        let (null, zero) = (0u64, 0i32);
        self.launch_qk_norm_rope(shape, positions.len(), args![qp, kp, qn, kn, rp, pos, nh, nkv, hdi, eps, null, null, null, null, zero])
    }

    fn qk_norm_rope_append(
        &self,
        q: &mut CudaBuf,
        k: &mut CudaBuf,
        v: &CudaBuf,
        q_norm: &CudaWeight,
        k_norm: &CudaWeight,
        eps: f32,
        rope: &CudaWeight,
        kv: &mut CudaKv,
        batch: &BatchInfo,
        shape: AttnShape,
    ) -> Result<()> {
        if !self.fused {
            self.qk_norm_rope(q, k, q_norm, k_norm, eps, rope, batch.positions, shape)?;
            return self.kv_append(kv, k, v, batch);
        }
        self.check_qk_norm_rope(q, k, v, q_norm, k_norm, rope, kv, batch, shape)?;
        let (hd, d) = (shape.head_dim, kv.kv_dim);
        let pos = self.meta(Meta::Positions, bytemuck::cast_slice(batch.positions))?;
        let (slots, _, _, _) = self.batch_meta(batch, kv)?;
        let (qp, kp, qn, kn, rp) = (q.mem.ptr, k.mem.ptr, q_norm.mem.ptr, k_norm.mem.ptr, rope.mem.ptr);
        let (nh, nkv, hdi) = (shape.n_heads as i32, shape.n_kv_heads as i32, hd as i32);
        let (kc, vc, vp, di) = (kv.k.ptr, kv.v.ptr, v.mem.ptr, d as i32);
        self.launch_qk_norm_rope(shape, batch.rows(), args![qp, kp, qn, kn, rp, pos, nh, nkv, hdi, eps, kc, vc, vp, slots, di])
    }

    fn qk_norm_rope_attention(
        &self,
        out: &mut CudaBuf,
        q: &mut CudaBuf,
        k: &mut CudaBuf,
        v: &CudaBuf,
        q_norm: &CudaWeight,
        k_norm: &CudaWeight,
        eps: f32,
        rope: &CudaWeight,
        kv: &mut CudaKv,
        batch: &BatchInfo,
        shape: AttnShape,
    ) -> Result<()> {
        // Decode (one row per sequence): the attention kernel norms and rotates q and the step's k
        // and appends k, v itself (`_rope` kernels): a launch less per layer.
        if self.fused && self.rope_attn && batch.seqs.iter().all(|s| s.rows.len() == 1) {
            self.check_qk_norm_rope(q, k, v, q_norm, k_norm, rope, kv, batch, shape)?;
            check_shape("attention", (out.rows, out.cols), (q.rows, q.cols))?;
            let positions = self.meta(Meta::Positions, bytemuck::cast_slice(batch.positions))?;
            let args =
                RopeArgs { k: k.mem.ptr, v: v.mem.ptr, q_norm: q_norm.mem.ptr, k_norm: k_norm.mem.ptr, rope: rope.mem.ptr, positions, eps };
            if self.decode_attention(out, q, kv, batch, shape, Some(args))? {
                return Ok(());
            }
        }
        self.qk_norm_rope_append(q, k, v, q_norm, k_norm, eps, rope, kv, batch, shape)?;
        self.attention(out, q, kv, batch, shape)
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
        if self.decode_attention(out, q, kv, batch, shape, None)? {
            return Ok(());
        }
        let (_, ctx, table_at, tables) = self.batch_meta(batch, kv)?;
        let (o, qp, kc, vc) = (out.mem.ptr, q.mem.ptr, kv.k.ptr, kv.v.ptr);
        let (nhi, nkv, hdi, bs, kvd) = (nh as i32, shape.n_kv_heads as i32, hd as i32, kv.block_size as i32, kv.kv_dim as i32);
        let scale = 1.0 / (hd as f32).sqrt();
        let t = q.rows;
        if self.tiled_attn && t > GEMV_MAX_ROWS {
            // Prefill: tiles of up to 64 consecutive rows of one sequence.
            let mut tiles: Vec<i32> = vec![];
            for seq in &batch.seqs {
                for r0 in seq.rows.clone().step_by(ATTN_TILE_ROWS) {
                    tiles.extend([r0 as i32, (seq.rows.end - r0).min(ATTN_TILE_ROWS) as i32]);
                }
            }
            if tiles.is_empty() {
                return Ok(());
            }
            let tiles_d = self.meta(Meta::Tiles, bytemuck::cast_slice(&tiles))?;
            // bf16 / f16 with head_dim 128 (every Qwen3), 64, 32 or 16: tensor cores (its 16-byte
            // copies need aligned buffers). Same arguments as the tiled kernel; unlike it (and the
            // CPU), the softmax weights are rounded to the compute dtype for P·V, as in
            // FlashAttention (~1e-3 relative).
            let fa_kernel = match hd {
                16 => Some("attention_prefill_16"),
                32 => Some("attention_prefill_32"),
                64 => Some("attention_prefill_64"),
                128 => Some("attention_prefill_128"),
                _ => None,
            };
            if let Some(kernel) = fa_kernel.filter(|_| self.esize() == 2 && [o, qp, kc, vc].iter().all(|p| p % 16 == 0)) {
                // Head_dim 128 on Hopper: the warpgroup-MMA kernel (same arguments and tiles).
                let (kernel, smem) = if hd == 128 && self.gpu.arch == (9, 0) && self.attn_wgmma.load(std::sync::atomic::Ordering::Relaxed) {
                    ("attention_prefill_wg_128", ATTN_WG_SMEM)
                } else {
                    (kernel, ((ATTN_TILE_ROWS + 2 * ATTN_PREFILL_KEYS) * (hd + 8) * 2) as u32)
                };
                return self.gpu.launch(
                    "attention_prefill",
                    kernel,
                    (nh as u32, (tiles.len() / 2) as u32, 1),
                    128,
                    smem,
                    args![o, qp, kc, vc, ctx, table_at, tables, tiles_d, nhi, nkv, hdi, bs, kvd, scale],
                );
            }
            let srow = hd + if self.esize() == 4 { 1 } else { 2 };
            let smem = ((ATTN_TILE_ROWS + 2 * 32) * srow * self.esize()) as u32;
            let kernel = if hd <= 128 { "attention_tiled_128" } else { "attention_tiled_256" };
            return self.gpu.launch(
                "attention",
                kernel,
                (nh as u32, (tiles.len() / 2) as u32, 1),
                256,
                smem,
                args![o, qp, kc, vc, ctx, table_at, tables, tiles_d, nhi, nkv, hdi, bs, kvd, scale],
            );
        }
        self.gpu.launch(
            "attention",
            "attention",
            (nh as u32, t as u32, 1),
            128,
            0,
            args![o, qp, kc, vc, ctx, table_at, tables, nhi, nkv, hdi, bs, kvd, scale],
        )
    }

    fn swiglu(&self, out: &mut CudaBuf, gate: &CudaBuf, up: &CudaBuf) -> Result<()> {
        check_shape("swiglu", (out.rows, out.cols), (gate.rows, gate.cols))?;
        check_shape("swiglu", (up.rows, up.cols), (gate.rows, gate.cols))?;
        let n = (gate.rows * gate.cols) as i64;
        let (o, g, u) = (out.mem.ptr, gate.mem.ptr, up.mem.ptr);
        self.gpu.launch("elementwise", "swiglu", (self.vec_blocks(n as usize), 1, 1), 256, 0, args![o, g, u, n])
    }

    fn moe(&self, out: &mut CudaBuf, x: &CudaBuf, moe: &CudaMoe) -> Result<()> {
        self.moe_impl(out, x, moe, FusedNorm::NONE, false)
    }

    fn gather_rows(&self, out: &mut CudaBuf, x: &CudaBuf, rows: &[u32]) -> Result<()> {
        check_shape("gather_rows", (out.rows, out.cols), (rows.len(), x.cols))?;
        if let Some(&r) = rows.iter().find(|&&r| r as usize >= x.rows) {
            bail!(InvalidArgument, "gather_rows: row {r} out of range");
        }
        let rows_d = self.meta(Meta::Rows, bytemuck::cast_slice(rows))?;
        let (o, xp, c) = (out.mem.ptr, x.mem.ptr, x.cols as i32);
        self.gpu.launch("elementwise", "gather_rows", (self.vec_blocks(x.cols), rows.len() as u32, 1), 256, 0, args![o, xp, rows_d, c])
    }

    fn argmax_rows(&self, logits: &CudaBuf, rows: usize, limit: usize) -> Result<Vec<u32>> {
        self.queue_argmax(logits, rows, limit)?;
        self.take_argmax(rows)
    }

    fn queue_argmax(&self, logits: &CudaBuf, rows: usize, limit: usize) -> Result<bool> {
        let r = logits.rows;
        ensure!(rows == r, InvalidArgument, "argmax_rows: buffer has {r} rows, caller expects {rows}");
        let mut a = self.argmax_state(r)?;
        let (keys, counts, chosen, host) = a.ptrs();
        let (xp, c, l) = (logits.mem.ptr, logits.cols as i32, limit.min(logits.cols) as i32);
        // About 4 elements a thread: 149 blocks for Qwen3's vocabulary.
        let grid = (blocks(l as usize, 256 * 4).min(1024), r as u32, 1);
        self.gpu.launch("elementwise", "argmax_rows", grid, 256, 0, args![keys, counts, chosen, host, xp, c, l])?;
        self.gpu.record(&a.done)?;
        a.queued = Some(r);
        Ok(true)
    }

    fn take_argmax(&self, rows: usize) -> Result<Vec<u32>> {
        let mut a = lock(&self.argmax)?;
        ensure!(a.queued.take() == Some(rows), Device, "take_argmax of {rows} rows: no argmax of {rows} rows queued");
        a.done.wait()?;
        let host = &a.host.as_ref().expect("a queued argmax has its buffers").0;
        // The low half of a key is the complement of the index (argmax_key in elementwise.cu).
        let index = |k: u64| if k == 0 { 0 } else { u32::MAX - k as u32 };
        Ok(host.as_slice()[..rows * 8].chunks_exact(8).map(|c| index(bytemuck::pod_read_unaligned(c))).collect())
    }

    fn top_rows(&self, logits: &CudaBuf, rows: usize, limit: usize, want: &[(usize, f32)]) -> Result<Vec<Vec<(f32, u32)>>> {
        let (limit, k) = (limit.min(logits.cols), want.iter().map(|w| w.0).max().unwrap_or(0));
        let nb = limit.div_ceil(256 * TOP_PER_THREAD);
        if !self.device_top.load(std::sync::atomic::Ordering::Relaxed)
            || k == 0
            || k > TOP_MAX
            || nb * k > 256 * TOP_PER_THREAD
            || want.len() != rows
            || logits.rows != rows
        {
            return super::top_rows_on_host(self, logits, rows, limit, want);
        }
        let scales: Vec<f32> = want.iter().map(|w| w.1).collect();
        let inv_t = self.meta(Meta::TopScale, bytemuck::cast_slice(&scales))?;
        let [part, out] = self.scratch([(Scratch::TopPart, rows * nb * k * 8), (Scratch::TopOut, rows * k * 8)])?;
        let counts = self.argmax_state(rows)?.ptrs().1;
        let (xp, ci, li, ki) = (logits.mem.ptr, logits.cols as i32, limit as i32, k as i32);
        self.gpu.launch("elementwise", "top_rows", (nb as u32, rows as u32, 1), 256, 0, args![out, part, counts, xp, inv_t, ci, li, ki])?;
        let keys: Vec<u64> = self.download_typed(rows * k, out)?;
        // A key (top_key): the value's bits made order-preserving, above 2^31 - 1 - index, above a zero's sign.
        let decode = |key: u64| {
            let (o, low) = ((key >> 32) as u32, key as u32);
            let v = f32::from_bits(if o & 0x8000_0000 != 0 { o & 0x7fff_ffff } else { !o });
            (if low & 1 == 1 { -0.0 } else { v }, 0x7fff_ffff - (low >> 1))
        };
        Ok(want
            .iter()
            .enumerate()
            .map(|(r, &(kr, _))| {
                keys[r * k..r * k + kr]
                    .iter()
                    .filter(|&&key| key != 0)
                    .map(|&key| decode(key))
                    .filter(|c| c.0 > f32::NEG_INFINITY)
                    .collect()
            })
            .collect())
    }

    fn launch_ahead(&self, rows: usize) -> Result<bool> {
        let Some(graphs) = self.graphs.as_ref().filter(|_| self.ahead) else { return Ok(false) };
        let mut graphs = lock(graphs)?;
        let p = self.parity.load(std::sync::atomic::Ordering::Relaxed);
        if graphs.prepared.take() != Some(rows) {
            return Ok(false);
        }
        let Some(GraphState::Ready(graph, _)) = graphs.by_rows.get(&(rows, p)) else { return Ok(false) };
        self.set_staged_ids(p, &vec![FROM_DEVICE; rows])?;
        self.launch_step(&graphs, graph, p)?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gemv_rows_parse_lengths_and_families() {
        // (Unset variables: the default spec is parsed.)
        let w = |family, k| GemvRows { family, k };
        let var = "QWEN3RS_TEST_UNSET_ROWS";
        assert_eq!(parse_gemv_rows(var, "3072, gemv:2048,0").unwrap(), vec![w(None, 3072), w(Some("gemv"), 2048)]);
        assert_eq!(parse_gemv_rows(var, "0").unwrap(), vec![]);
        assert_eq!(parse_gemv_rows(var, "").unwrap(), vec![]);
        let e = parse_gemv_rows(var, "4096,gemv:x").unwrap_err().to_string();
        assert!(e.contains(var) && e.contains("gemv:x"), "{e}");
        assert!(parse_gemv_rows(var, "-1").is_err());
        let e = parse_gemv_rows(var, "gemvv:2048").unwrap_err().to_string();
        assert!(e.contains("no GEMV family \"gemvv\"") && e.contains("moe_down_combine"), "{e}");
        assert_eq!(parse_gemv_rows(var, WIDE_ROWS).unwrap().len(), 5);
        assert_eq!(parse_gemv_rows(var, NARROW_ROWS).unwrap(), vec![w(Some("gemv3"), 2048)]);
        assert_eq!(gemv_family(&GEMV), "gemv");
        assert_eq!(gemv_family(&GEMV3), "gemv3");
        assert_eq!(gemv_family(&GEMV_SWIGLU), "gemv_swiglu");
        assert_eq!(gemv_family(&MOE_GEMV_SWIGLU), "moe_gemv_swiglu");
        assert_eq!(gemv_family(&MOE_DOWN_COMBINE), "moe_down_combine");
    }

    #[test]
    fn block_caps_parse_every_kernel_and_families() {
        assert_eq!(parse_block_caps("").unwrap(), (None, vec![]));
        assert_eq!(parse_block_caps("3").unwrap(), (Some(3), vec![]));
        assert_eq!(parse_block_caps("gemv3:3, 2,moe_down_combine:1").unwrap(), (Some(2), vec![("gemv3", 3), ("moe_down_combine", 1)]));
        assert_eq!(parse_block_caps("gemv3:0").unwrap(), (None, vec![]));
        let e = parse_block_caps("attention:2").unwrap_err().to_string();
        assert!(e.contains("QWEN3RS_CUDA_BLOCKS_PER_SM") && e.contains("no GEMV family \"attention\""), "{e}");
        let e = parse_block_caps("gemv3:three").unwrap_err().to_string();
        assert!(e.contains("QWEN3RS_CUDA_BLOCKS_PER_SM: bad entry \"gemv3:three\""), "{e}");
    }

    #[test]
    fn skip_lists_kernel_names() {
        assert_eq!(parse_skip("").unwrap(), Vec::<String>::new());
        assert_eq!(parse_skip(" gemv3_t1_xs, router_logits ,").unwrap(), vec!["gemv3_t1_xs", "router_logits"]);
        let e = parse_skip("router_logits;gemv3_t1_xs").unwrap_err().to_string();
        assert!(e.contains("QWEN3RS_CUDA_SKIP: \"router_logits;gemv3_t1_xs\" is not a kernel name"), "{e}");
    }
}
