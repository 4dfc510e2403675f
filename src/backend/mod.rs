//! `trait Backend`: the coarse op set one forward pass is made of (about one kernel launch each),
//! and the batch description the ops share. `cpu` is the scalar reference every other backend is
//! tested against; a backend owns its buffer, weight, KV-cache and MoE layouts. `cuda` is the
//! GPU backend with the `cuda` feature, and a stand-in that only reports "not built" without it,
//! so no code outside this folder needs a `#[cfg]`.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(not(feature = "cuda"))]
#[path = "cuda_stub.rs"]
pub mod cuda;
pub mod tp;

use crate::error::Result;
use crate::model::dummy::DummySpec;
use crate::tensor::{DType, HostTensor, Window};
use std::ops::Range;

/// Where one sequence's new tokens sit in a batch and in the paged KV cache.
#[derive(Clone, Debug)]
pub struct SeqSlot<'a> {
    /// Rows of this sequence's new tokens in the batch's [T, ...] buffers.
    pub rows: Range<usize>,
    /// Position of its first new token (= tokens already in its cache).
    pub start_pos: usize,
    /// Its block table: cache block id of positions [i*block_size, (i+1)*block_size).
    pub blocks: &'a [u32],
}

/// One forward step over a batch of sequences, flattened into T rows.
#[derive(Clone, Debug)]
pub struct BatchInfo<'a> {
    /// [T] token ids.
    pub tokens: &'a [u32],
    /// [T] absolute positions.
    pub positions: &'a [u32],
    pub seqs: Vec<SeqSlot<'a>>,
    pub block_size: usize,
}

impl BatchInfo<'_> {
    pub fn rows(&self) -> usize {
        self.tokens.len()
    }
}

/// The attention geometry of a model.
#[derive(Clone, Copy, Debug)]
pub struct AttnShape {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

/// The experts of one sparse MoE layer, as read from the checkpoint.
pub struct MoeHost {
    /// [E, H] router (`mlp.gate.weight`): every device routes over all E experts.
    pub router: HostTensor,
    /// Per expert this device holds: gate [I, H], up [I, H], down [H, I]. All E on one device;
    /// expert parallelism gives each rank a contiguous block of whole experts.
    pub experts: Vec<[HostTensor; 3]>,
    /// `experts[i]` is expert `first_expert + i`; tokens routed to experts outside the block get no
    /// contribution from this device (another rank adds it).
    pub first_expert: usize,
    pub top_k: usize,
    pub norm_topk_prob: bool,
}

/// How tensor parallelism (`backend::tp`) splits a weight or activation across devices; single-device
/// backends ignore it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    /// The same on every device (embeddings, norms, the residual stream).
    Replicated,
    /// Output features split: query heads, MLP intermediate columns, lm_head vocabulary rows.
    Columns,
    /// Key/value heads split (each replicated on several devices when there are fewer than devices).
    KvHeads,
    /// Input features split (o_proj, down_proj): each device's product is a partial sum, all-reduced.
    Rows,
}

/// A sparse MoE layer of dummy weights, described rather than materialised (`Backend::dummy_moe`).
#[derive(Clone)]
pub struct MoeDummy {
    /// [E, H] router.
    pub router: DummySpec,
    /// Per expert: gate [I, H], up [I, H], down [H, I].
    pub experts: Vec<[DummySpec; 3]>,
    pub hidden: usize,
    pub inter: usize,
    /// The intermediate columns of every expert this device holds: gate and up rows, down columns.
    /// All of 0..inter on one device; tensor parallelism gives each rank its 1/N.
    pub part: Range<usize>,
    /// The experts this device holds (whole, or their `part`): all of 0..E on one device; expert
    /// parallelism gives each rank a contiguous block (see `MoeHost::first_expert`).
    pub held: Range<usize>,
    pub top_k: usize,
    pub norm_topk_prob: bool,
}

impl MoeDummy {
    /// The windows of gate/up [I, H] and of down [H, I] this device holds.
    pub fn windows(&self) -> (Window, Window) {
        expert_windows(self.hidden, self.part.clone())
    }
}

/// The windows of an expert's gate/up [I, H] and down [H, I] that hold its intermediate columns `part`.
pub fn expert_windows(hidden: usize, part: Range<usize>) -> (Window, Window) {
    (Window { rows: part.clone(), cols: 0..hidden }, Window { rows: 0..hidden, cols: part })
}

/// What goes into a transformer block: the residual stream `x`, plus the previous block's output
/// `delta` (none before the first block), normalised with `norm` (RMSNorm, `eps`).
pub struct BlockInput<'a, B: Backend> {
    pub x: &'a B::Buf,
    pub delta: Option<&'a B::Buf>,
    pub norm: &'a B::Weight,
    pub eps: f32,
}

pub trait Backend: Send + Sync + Sized + 'static {
    /// An activation buffer: [rows, cols] row-major in the compute dtype.
    type Buf: Send;
    /// A weight tensor resident on this backend.
    type Weight: Send + Sync;
    /// One layer's K and V cache blocks: [n_blocks, block_size, n_kv_heads * head_dim] each.
    type KvLayer: Send;
    /// One sparse MoE layer (router + experts) in the backend's own layout.
    type Moe: Send + Sync;

    /// "cpu", "cuda:0", ...
    fn device_name(&self) -> String;
    /// Run one forward pass's ops inside the backend's execution context (the CPU backend's thread
    /// pool, so its ops don't each hop into the pool). Provided: runs `f` as is.
    fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        f()
    }
    /// The dtype activations and the KV cache are kept in.
    fn dtype(&self) -> DType;

    /// A weight, converted to the dtype this backend computes with where it differs.
    fn upload(&self, tensor: HostTensor) -> Result<Self::Weight>;
    /// A table kept exactly as given (the f32 RoPE table).
    fn upload_exact(&self, tensor: HostTensor) -> Result<Self::Weight>;
    fn upload_moe(&self, moe: MoeHost) -> Result<Self::Moe>;
    /// Before a dummy model is drawn: an error if its `elements` weight elements cannot fit where this
    /// backend keeps weights. The CPU backend checks host memory (an allocation past it ends the process
    /// instead of raising); the default accepts (a device reports its out-of-memory as it happens).
    fn check_dummy_fits(&self, _elements: usize) -> Result<()> {
        Ok(())
    }
    /// A dummy weight of `shape` (see `model::dummy`), equal to `upload(spec.host_tensor(shape))`.
    /// A GPU backend overrides this to draw the values on the device: no host copy of the model.
    fn dummy_weight(&self, spec: &DummySpec, shape: &[usize]) -> Result<Self::Weight> {
        self.upload(spec.host_tensor(shape))
    }
    /// The part `window` of a dummy weight of `shape` (a tensor-parallel shard), equal to `upload` of
    /// `spec.host_tensor(shape).window(window)`; only that part is drawn (on the device for CUDA).
    fn dummy_window(&self, spec: &DummySpec, shape: &[usize], window: &Window) -> Result<Self::Weight> {
        self.upload(spec.host_window(shape, window)?)
    }
    /// A dummy weight tensor parallelism splits as `split` (single-device backends take it whole).
    fn dummy_weight_split(&self, spec: &DummySpec, shape: &[usize], _split: Split) -> Result<Self::Weight> {
        self.dummy_weight(spec, shape)
    }
    /// A dummy MoE layer (the columns `moe.part` of the experts `moe.held`), equal to `upload_moe` of
    /// those parts of the materialised tensors.
    fn dummy_moe(&self, moe: MoeDummy) -> Result<Self::Moe> {
        let (h, i) = (moe.hidden, moe.inter);
        let (gate_up, down) = moe.windows();
        let held = moe
            .experts
            .get(moe.held.clone())
            .ok_or_else(|| crate::Error::InvalidArgument(format!("MoE experts {:?} held of {}", moe.held, moe.experts.len())))?;
        let experts = held
            .iter()
            .map(|[g, u, d]| Ok([g.host_window(&[i, h], &gate_up)?, u.host_window(&[i, h], &gate_up)?, d.host_window(&[h, i], &down)?]))
            .collect::<Result<Vec<_>>>()?;
        let router = moe.router.host_tensor(&[moe.experts.len(), h]);
        self.upload_moe(MoeHost { router, experts, first_expert: moe.held.start, top_k: moe.top_k, norm_topk_prob: moe.norm_topk_prob })
    }
    /// A zeroed [rows, cols] buffer.
    fn alloc(&self, rows: usize, cols: usize) -> Result<Self::Buf>;
    /// A weight tensor parallelism splits as `split` (single-device backends take it whole).
    fn upload_split(&self, tensor: HostTensor, _split: Split) -> Result<Self::Weight> {
        self.upload(tensor)
    }
    /// A buffer tensor parallelism splits as `split` (single-device backends allocate it whole).
    fn alloc_split(&self, rows: usize, cols: usize, _split: Split) -> Result<Self::Buf> {
        self.alloc(rows, cols)
    }
    /// A KV-cache layer with room for `n_blocks` blocks (storage may be committed lazily).
    fn alloc_kv(&self, n_blocks: usize, block_size: usize, kv_dim: usize) -> Result<Self::KvLayer>;
    /// A [rows, cols] buffer holding `data` rounded to the compute dtype (tests; host-made inputs).
    fn upload_buf(&self, rows: usize, cols: usize, data: &[f32]) -> Result<Self::Buf>;
    /// Copy a buffer to the host as f32 [rows * cols].
    fn download(&self, buf: &Self::Buf) -> Result<Vec<f32>>;

    /// out[t] = table[ids[t]]  (out [T, H], table [V, H]).
    fn embed(&self, out: &mut Self::Buf, table: &Self::Weight, ids: &[u32]) -> Result<()>;
    /// The residual add and norm in front of a block: x_out = x + delta (x alone without delta),
    /// h = rms_norm(x_out) * norm. Out of place: x_out is a second residual buffer (the model swaps
    /// the two), so a GPU can fuse this into the products that read h (`norm_matmul_many` and
    /// siblings), whose every block reads x while one of them writes x_out.
    fn add_rms_norm(&self, x_out: &mut Self::Buf, h: &mut Self::Buf, input: &BlockInput<Self>) -> Result<()>;
    /// `add_rms_norm`, then outs[i] = h · ws[i]ᵀ (`matmul_many`: the q, k, v projections).
    fn norm_matmul_many(
        &self,
        x_out: &mut Self::Buf,
        h: &mut Self::Buf,
        input: &BlockInput<Self>,
        outs: &mut [&mut Self::Buf],
        ws: &[&Self::Weight],
    ) -> Result<()> {
        self.add_rms_norm(x_out, h, input)?;
        self.matmul_many(outs, h, ws)
    }
    /// `add_rms_norm`, then out = `matmul_swiglu` of h (the dense MLP's first half).
    #[allow(clippy::too_many_arguments)]
    fn norm_matmul_swiglu(
        &self,
        x_out: &mut Self::Buf,
        h: &mut Self::Buf,
        input: &BlockInput<Self>,
        out: &mut Self::Buf,
        g: &mut Self::Buf,
        u: &mut Self::Buf,
        gate: &Self::Weight,
        up: &Self::Weight,
    ) -> Result<()> {
        self.add_rms_norm(x_out, h, input)?;
        self.matmul_swiglu(out, g, u, h, gate, up)
    }
    /// `add_rms_norm`, then out = `moe` of h.
    fn norm_moe(
        &self,
        x_out: &mut Self::Buf,
        h: &mut Self::Buf,
        input: &BlockInput<Self>,
        out: &mut Self::Buf,
        moe: &Self::Moe,
    ) -> Result<()> {
        self.add_rms_norm(x_out, h, input)?;
        self.moe(out, h, moe)
    }
    /// The attention's output projection and the MoE block behind it: delta = a · o_projᵀ
    /// (`matmul`), then `norm_moe` of the block input (x, delta, norm, eps). A GPU folds the router
    /// into the projection (the norm is linear in x + delta up to one scale) and may leave delta
    /// unwritten: x_out holds x + delta.
    #[allow(clippy::too_many_arguments)]
    fn matmul_norm_moe(
        &self,
        delta: &mut Self::Buf,
        a: &Self::Buf,
        o_proj: &Self::Weight,
        x_out: &mut Self::Buf,
        h: &mut Self::Buf,
        (x, norm, eps): (&Self::Buf, &Self::Weight, f32),
        out: &mut Self::Buf,
        moe: &Self::Moe,
    ) -> Result<()> {
        self.matmul(delta, a, o_proj)?;
        self.norm_moe(x_out, h, &BlockInput { x, delta: Some(delta), norm, eps }, out, moe)
    }
    /// out [T, N] = x [T, K] · w [N, K]ᵀ.
    fn matmul(&self, out: &mut Self::Buf, x: &Self::Buf, w: &Self::Weight) -> Result<()>;
    /// outs[i] [T, N_i] = x [T, K] · ws[i]ᵀ for weights sharing one input (the q, k, v
    /// projections): one launch on a GPU instead of one each.
    fn matmul_many(&self, outs: &mut [&mut Self::Buf], x: &Self::Buf, ws: &[&Self::Weight]) -> Result<()> {
        crate::ensure!(outs.len() == ws.len(), InvalidArgument, "matmul_many: {} outputs for {} weights", outs.len(), ws.len());
        for (o, w) in outs.iter_mut().zip(ws) {
            self.matmul(o, x, w)?;
        }
        Ok(())
    }
    /// out = swiglu(x · gateᵀ, x · upᵀ), the same values as matmul, matmul, swiglu (which is
    /// what this does by default, through the scratch buffers `g` and `u` [T, I]). A GPU backend
    /// fuses the three for decode.
    #[allow(clippy::too_many_arguments)]
    fn matmul_swiglu(
        &self,
        out: &mut Self::Buf,
        g: &mut Self::Buf,
        u: &mut Self::Buf,
        x: &Self::Buf,
        gate: &Self::Weight,
        up: &Self::Weight,
    ) -> Result<()> {
        self.matmul(g, x, gate)?;
        self.matmul(u, x, up)?;
        self.swiglu(out, g, u)
    }
    /// Per head: RMSNorm over head_dim with q_norm / k_norm, then RoPE (rotate halves) at `positions`.
    /// `rope` is [max_pos, head_dim]: cos in the first half of each row, sin in the second.
    #[allow(clippy::too_many_arguments)]
    fn qk_norm_rope(
        &self,
        q: &mut Self::Buf,
        k: &mut Self::Buf,
        q_norm: &Self::Weight,
        k_norm: &Self::Weight,
        eps: f32,
        rope: &Self::Weight,
        positions: &[u32],
        shape: AttnShape,
    ) -> Result<()>;
    /// `qk_norm_rope`, then `kv_append` of the rotated k and of v: one launch on a GPU.
    #[allow(clippy::too_many_arguments)]
    fn qk_norm_rope_append(
        &self,
        q: &mut Self::Buf,
        k: &mut Self::Buf,
        v: &Self::Buf,
        q_norm: &Self::Weight,
        k_norm: &Self::Weight,
        eps: f32,
        rope: &Self::Weight,
        kv: &mut Self::KvLayer,
        batch: &BatchInfo,
        shape: AttnShape,
    ) -> Result<()> {
        self.qk_norm_rope(q, k, q_norm, k_norm, eps, rope, batch.positions, shape)?;
        self.kv_append(kv, k, v, batch)
    }
    /// `qk_norm_rope_append`, then `attention` into `out`: for a decode step a GPU does both in the
    /// attention kernel (q and the step's k are then left as the products wrote them).
    #[allow(clippy::too_many_arguments)]
    fn qk_norm_rope_attention(
        &self,
        out: &mut Self::Buf,
        q: &mut Self::Buf,
        k: &mut Self::Buf,
        v: &Self::Buf,
        q_norm: &Self::Weight,
        k_norm: &Self::Weight,
        eps: f32,
        rope: &Self::Weight,
        kv: &mut Self::KvLayer,
        batch: &BatchInfo,
        shape: AttnShape,
    ) -> Result<()> {
        self.qk_norm_rope_append(q, k, v, q_norm, k_norm, eps, rope, kv, batch, shape)?;
        self.attention(out, q, kv, batch, shape)
    }
    /// Write each row's k, v [T, kv_dim] into the cache slots its sequence's position maps to.
    fn kv_append(&self, kv: &mut Self::KvLayer, k: &Self::Buf, v: &Self::Buf, batch: &BatchInfo) -> Result<()>;
    /// Causal grouped-query attention of q [T, n_heads*hd] over each sequence's cache → out [T, n_heads*hd].
    fn attention(&self, out: &mut Self::Buf, q: &Self::Buf, kv: &Self::KvLayer, batch: &BatchInfo, shape: AttnShape) -> Result<()>;
    /// out = silu(gate) * up.
    fn swiglu(&self, out: &mut Self::Buf, gate: &Self::Buf, up: &Self::Buf) -> Result<()>;
    /// out [T, H] = Σ_top-k  weight_e · expert_e(x), routing on the backend.
    fn moe(&self, out: &mut Self::Buf, x: &Self::Buf, moe: &Self::Moe) -> Result<()>;
    /// out[i] = x[rows[i]].
    fn gather_rows(&self, out: &mut Self::Buf, x: &Self::Buf, rows: &[u32]) -> Result<()>;

    /// Most prompt tokens one generation step feeds (the engine's chunked prefill). A GPU takes
    /// longer chunks: bigger GEMMs, and more rows per expert in a MoE layer.
    fn prefill_chunk(&self) -> usize {
        crate::engine::PREFILL_CHUNK
    }

    /// Run `body`, one decode forward of `rows` rows (one token per sequence) that launches only
    /// on this backend. A GPU backend may record it once per `rows` as a CUDA graph and replay it
    /// on later steps (`body` then still runs on the host, for its checks and metadata, but
    /// launches nothing). `prepared`: this step is the one `prepare_decode_step` was last given,
    /// with these input ids now known — the backend may launch it without running `body` again.
    /// The default just runs it.
    fn decode_step(&self, rows: usize, prepared: Option<&[u32]>, body: &mut dyn FnMut() -> Result<()>) -> Result<()> {
        let _ = (rows, prepared);
        body()
    }

    /// The host's part of the next decode step, done while the current one runs on the device:
    /// `body` is that step's forward with its input ids not known yet (any valid ids stand in);
    /// nothing may launch. Returns whether the step was prepared; the caller then passes its ids
    /// to `decode_step` as `prepared`, and must not do so unless that step's batch is this one's
    /// but for the ids. The default prepares nothing.
    fn prepare_decode_step(&self, rows: usize, body: &mut dyn FnMut() -> Result<()>) -> Result<bool> {
        let _ = (rows, body);
        Ok(false)
    }

    /// Launch the prepared decode step of `rows` rows (`prepare_decode_step`) now, before the ids it
    /// feeds are known on the host: input row r takes the id that the last `queue_argmax` chooses for
    /// its row r, on the device. So the next step is queued while the host still waits for this
    /// one's tokens, and the device does not idle between steps. Returns false (nothing launched)
    /// when no step of `rows` rows is prepared; the default launches nothing.
    fn launch_ahead(&self, rows: usize) -> Result<bool> {
        let _ = rows;
        Ok(false)
    }

    /// `argmax_rows` in two halves: queue the choice behind the work queued so far, without waiting
    /// (false: this backend can't; use `argmax_rows`), then `take_argmax` waits for the ids. Between
    /// the two, `launch_ahead` may queue the next step, which reads the ids on the device.
    fn queue_argmax(&self, logits: &Self::Buf, rows: usize, limit: usize) -> Result<bool> {
        let _ = (logits, rows, limit);
        Ok(false)
    }

    /// The ids of the last `queue_argmax` (of `rows` rows), once the device has chosen them.
    fn take_argmax(&self, rows: usize) -> Result<Vec<u32>> {
        let _ = rows;
        crate::bail!(Device, "take_argmax without a queued argmax")
    }

    /// Per row r of `logits` [R, V], over its first `limit` columns: the `want[r].0` best values
    /// scaled by `want[r].1` as the sampler scales them, best first (`sampler::top_scaled`), for
    /// `Sampler::sample_top`. A GPU backend may select them on the device and copy back k per row
    /// instead of V; the default reads the rows back.
    fn top_rows(&self, logits: &Self::Buf, rows: usize, limit: usize, want: &[(usize, f32)]) -> Result<Vec<Vec<(f32, u32)>>> {
        top_rows_on_host(self, logits, rows, limit, want)
    }

    /// Greedy choice per row of `logits` [R, V]: the index of the largest value, NaN counting as
    /// -inf and ties going to the lowest index (as the sampler's greedy mode). A GPU backend does
    /// this on the device and copies back R ids instead of R × V logits.
    /// `rows` is R (the caller's scratch knows it); only the first `limit` columns compete (ids past
    /// the tokenizer's vocabulary are padding).
    fn argmax_rows(&self, logits: &Self::Buf, rows: usize, limit: usize) -> Result<Vec<u32>> {
        let values = self.download(logits)?;
        let cols = values.len().checked_div(rows).unwrap_or(0);
        Ok(values.chunks(cols.max(1)).take(rows).map(|row| argmax(&row[..limit.min(row.len())])).collect())
    }
}

/// `Backend::top_rows` from the rows read back to the host.
pub fn top_rows_on_host<B: Backend>(
    b: &B,
    logits: &B::Buf,
    rows: usize,
    limit: usize,
    want: &[(usize, f32)],
) -> Result<Vec<Vec<(f32, u32)>>> {
    let values = b.download(logits)?;
    let cols = values.len().checked_div(rows).unwrap_or(0);
    crate::ensure!(want.len() == rows && cols > 0, InvalidArgument, "top_rows: {} wants for {rows} rows of {cols}", want.len());
    Ok(want
        .iter()
        .enumerate()
        .map(|(r, &(k, inv_t))| crate::sampler::top_scaled(&values[r * cols..r * cols + limit.min(cols)], k, inv_t))
        .collect())
}

/// Index of the largest value; NaN counts as -inf, ties go to the lowest index.
pub fn argmax(values: &[f32]) -> u32 {
    let mut best = (f32::NEG_INFINITY, 0usize);
    for (i, &v) in values.iter().enumerate() {
        let v = if v.is_nan() { f32::NEG_INFINITY } else { v };
        if v > best.0 {
            best = (v, i);
        }
    }
    best.1 as u32
}
