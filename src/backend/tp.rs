//! Tensor parallelism: one model over N devices of one backend, as vLLM and SGLang split it.
//! Attention is split by heads (K/V heads replicated where devices outnumber them), dense MLPs and
//! every expert's intermediate columns by columns (gate/up) and rows (down), lm_head by vocabulary;
//! o_proj, down_proj and the MoE block produce partial sums that one all-reduce per block adds up.
//! With `MoeSplit::Experts` (expert parallelism, `load(..., expert_parallel=True)`) each rank holds
//! whole experts instead, a contiguous 1/N of them; everything else is split as above.
//! `TensorParallel<B>` is itself a `Backend`, so the model and engine run on it unchanged; it issues
//! each op to every rank in turn (asynchronous on GPUs) and calls the backend's `Collective`.

use super::{expert_windows, AttnShape, Backend, BatchInfo, BlockInput, MoeDummy, MoeHost, Split};
use crate::config::Qwen3Config;
use crate::error::Result;
use crate::model::dummy::DummySpec;
use crate::tensor::{matrix_dims, DType, HostTensor, Window};
use crate::{bail, ensure};
use std::ops::Range;

/// What a backend needs to be one rank of a tensor-parallel group.
pub trait Collective: Backend {
    /// What the ranks share to talk to each other (NCCL communicators on CUDA; nothing on the CPU).
    type Group: Send + Sync;
    fn group(ranks: &[Self]) -> Result<Self::Group>;
    /// Elementwise sum of `bufs` (one per rank, equal shapes), left in every one of them.
    fn all_reduce_sum(group: &Self::Group, ranks: &[Self], bufs: &mut [Self::Buf]) -> Result<()>;
}

/// How the model's attention heads are spread over the ranks.
#[derive(Clone, Copy, Debug)]
struct HeadPlan {
    n: usize,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
}

impl HeadPlan {
    fn heads_per_rank(&self) -> usize {
        self.n_heads / self.n
    }

    fn kv_per_rank(&self) -> usize {
        (self.n_kv_heads / self.n).max(1)
    }

    /// First KV head of rank r (a rank holds `kv_per_rank` consecutive heads).
    fn kv_start(&self, r: usize) -> usize {
        if self.n_kv_heads >= self.n {
            r * self.n_kv_heads / self.n
        } else {
            r / (self.n / self.n_kv_heads)
        }
    }

    fn rank_shape(&self) -> AttnShape {
        AttnShape { n_heads: self.heads_per_rank(), n_kv_heads: self.kv_per_rank(), head_dim: self.head_dim }
    }
}

/// How the experts of a MoE layer are spread over the ranks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MoeSplit {
    /// Every rank holds 1/N of every expert's intermediate columns (gate/up rows, down columns), as
    /// a dense MLP is split: every rank computes every routed expert, on its columns.
    Columns,
    /// Expert parallelism, as vLLM and SGLang do it: rank r holds experts [r·E/N, (r+1)·E/N) whole.
    /// The router is replicated, so every rank routes every token over all E experts identically
    /// (same top-k, same weights) and computes only the contributions of its own experts (the
    /// others count as zero). The MoE output is then a partial sum per rank, and the block's one
    /// all-reduce adds them: with every rank already holding every token (one process, the same
    /// batch on each), that all-reduce is a valid expert-parallel combine, in place of the
    /// all-to-all dispatch and combine that ranks holding different tokens would need.
    Experts,
}

pub struct TensorParallel<B: Collective> {
    ranks: Vec<B>,
    group: B::Group,
    heads: HeadPlan,
    moe_split: MoeSplit,
}

/// A buffer as its parts on each rank.
pub struct TpBuf<Bf> {
    parts: Vec<Bf>,
    split: Split,
    rows: usize,
}

/// A weight as its shards on each rank.
pub struct TpWeight<W> {
    parts: Vec<W>,
    split: Split,
}

impl<B: Collective> TensorParallel<B> {
    /// Spread `config`'s model over `ranks`, every expert split by columns; a split that doesn't
    /// divide the model is an error.
    pub fn new(ranks: Vec<B>, config: &Qwen3Config) -> Result<Self> {
        Self::with_moe_split(ranks, config, MoeSplit::Columns)
    }

    /// As `new`, with the experts of MoE layers spread as `moe_split` says. `MoeSplit::Experts` needs
    /// a MoE model (on a dense one it would silently change nothing) whose experts the ranks divide.
    pub fn with_moe_split(ranks: Vec<B>, config: &Qwen3Config, moe_split: MoeSplit) -> Result<Self> {
        let n = ranks.len();
        ensure!(n >= 1, InvalidArgument, "tensor_parallel must be >= 1");
        let c = config;
        let divides = |what: &str, v: usize| -> Result<()> {
            ensure!(v.is_multiple_of(n), InvalidArgument, "tensor_parallel={n} does not divide {what} ({v})");
            Ok(())
        };
        divides("num_attention_heads", c.num_attention_heads)?;
        divides("intermediate_size", c.intermediate_size)?;
        divides("vocab_size", c.vocab_size)?;
        match (moe_split, c.num_experts) {
            (MoeSplit::Columns, 0) => {}
            (MoeSplit::Columns, _) => divides("moe_intermediate_size", c.moe_intermediate_size)?,
            (MoeSplit::Experts, 0) => bail!(InvalidArgument,
                "expert_parallel=True needs a MoE model, but this config has num_experts=0 (dense: its MLPs are split by tensor_parallel alone)"),
            (MoeSplit::Experts, e) => ensure!(e % n == 0, InvalidArgument,
                "expert_parallel=True: tensor_parallel={n} does not divide num_experts ({e}); each rank holds num_experts / tensor_parallel whole experts"),
        }
        let nkv = c.num_key_value_heads;
        ensure!(
            nkv.is_multiple_of(n) || n.is_multiple_of(nkv),
            InvalidArgument,
            "tensor_parallel={n} must divide num_key_value_heads ({nkv}) or be a multiple of it"
        );
        let group = B::group(&ranks)?;
        let heads = HeadPlan { n, n_heads: c.num_attention_heads, n_kv_heads: nkv, head_dim: c.head_dim };
        Ok(TensorParallel { ranks, group, heads, moe_split })
    }

    pub fn size(&self) -> usize {
        self.ranks.len()
    }

    /// Run `f(rank, r)` on every rank, collecting the results.
    fn each<T>(&self, mut f: impl FnMut(&B, usize) -> Result<T>) -> Result<Vec<T>> {
        self.ranks.iter().enumerate().map(|(r, b)| f(b, r)).collect()
    }

    fn all_reduce(&self, buf: &mut TpBuf<B::Buf>) -> Result<()> {
        B::all_reduce_sum(&self.group, &self.ranks, &mut buf.parts)
    }

    /// The part of a weight [out, in] of `shape` that rank r holds.
    fn window(&self, shape: &[usize], split: Split, r: usize) -> Window {
        let hd = self.heads.head_dim;
        let (rows, cols) = matrix_dims(shape);
        let mut w = Window::full(shape);
        match split {
            Split::Replicated => {}
            Split::Columns => w.rows = self.share(rows, r),
            Split::KvHeads => {
                let start = self.heads.kv_start(r) * hd;
                w.rows = start..start + self.heads.kv_per_rank() * hd;
            }
            Split::Rows => w.cols = self.share(cols, r),
        }
        w
    }

    /// Rank r's 1/N of `0..len` (rows, columns or experts).
    fn share(&self, len: usize, r: usize) -> Range<usize> {
        let n = self.size();
        r * len / n..(r + 1) * len / n
    }

    /// The experts of a MoE layer of `experts` × `inter` columns that rank r holds, and the
    /// intermediate columns of each it holds.
    fn moe_shard(&self, experts: usize, inter: usize, r: usize) -> (Range<usize>, Range<usize>) {
        match self.moe_split {
            MoeSplit::Columns => (0..experts, self.share(inter, r)),
            MoeSplit::Experts => (self.share(experts, r), 0..inter),
        }
    }

    fn cols_per_rank(&self, cols: usize, split: Split) -> usize {
        match split {
            Split::Replicated => cols,
            Split::Columns | Split::Rows => cols / self.size(),
            Split::KvHeads => self.heads.kv_per_rank() * self.heads.head_dim,
        }
    }
}

/// Rank r's part of a block input.
fn rank_input<'a, B: Collective>(input: &BlockInput<'a, TensorParallel<B>>, r: usize) -> BlockInput<'a, B> {
    BlockInput { x: &input.x.parts[r], delta: input.delta.map(|d| &d.parts[r]), norm: &input.norm.parts[r], eps: input.eps }
}

/// Zip a TpBuf's parts with every rank for an op that writes `out`.
macro_rules! per_rank {
    ($self:ident, |$b:ident, $r:ident| $body:expr) => {
        for ($r, $b) in $self.ranks.iter().enumerate() {
            $body?;
        }
    };
}

impl<B: Collective> Backend for TensorParallel<B> {
    type Buf = TpBuf<B::Buf>;
    type Weight = TpWeight<B::Weight>;
    type KvLayer = Vec<B::KvLayer>;
    type Moe = Vec<B::Moe>;

    fn device_name(&self) -> String {
        self.ranks.iter().map(|b| b.device_name()).collect::<Vec<_>>().join(",")
    }

    fn dtype(&self) -> DType {
        self.ranks[0].dtype()
    }

    fn upload(&self, tensor: HostTensor) -> Result<Self::Weight> {
        self.upload_split(tensor, Split::Replicated)
    }

    fn upload_exact(&self, tensor: HostTensor) -> Result<Self::Weight> {
        Ok(TpWeight { parts: self.each(|b, _| b.upload_exact(tensor.clone()))?, split: Split::Replicated })
    }

    fn upload_split(&self, tensor: HostTensor, split: Split) -> Result<Self::Weight> {
        let parts = self.each(|b, r| b.upload(tensor.window(&self.window(&tensor.shape, split, r))?))?;
        Ok(TpWeight { parts, split })
    }

    /// Replicated dummy weights are drawn by every rank (on the device for CUDA).
    fn dummy_weight(&self, spec: &DummySpec, shape: &[usize]) -> Result<Self::Weight> {
        Ok(TpWeight { parts: self.each(|b, _| b.dummy_weight(spec, shape))?, split: Split::Replicated })
    }

    /// Split dummy weights: each rank draws only its shard (on its device for CUDA).
    fn dummy_weight_split(&self, spec: &DummySpec, shape: &[usize], split: Split) -> Result<Self::Weight> {
        match split {
            Split::Replicated => self.dummy_weight(spec, shape),
            _ => Ok(TpWeight { parts: self.each(|b, r| b.dummy_window(spec, shape, &self.window(shape, split, r)))?, split }),
        }
    }

    /// Each rank gets its `moe_shard` of the layer (whole experts or every expert's columns) and the
    /// whole router. Checkpoint tensors are views of the memory-mapped files, so a rank's upload reads
    /// only the bytes of what it holds: under expert parallelism, only its own experts.
    fn upload_moe(&self, moe: MoeHost) -> Result<Self::Moe> {
        let e = moe.experts.len();
        ensure!(
            moe.first_expert == 0 && e == moe.router.shape[0],
            InvalidArgument,
            "tensor parallelism splits whole MoE layers, got experts {}..{} of {}",
            moe.first_expert,
            moe.first_expert + e,
            moe.router.shape[0]
        );
        let (h, inter) = (moe.router.shape[1], moe.experts.first().map_or(0, |x| x[0].shape[0]));
        self.each(|b, r| {
            let (held, part) = self.moe_shard(e, inter, r);
            let (gate_up, down) = expert_windows(h, part);
            let experts = moe.experts[held.clone()]
                .iter()
                .map(|[g, u, d]| Ok([g.window(&gate_up)?, u.window(&gate_up)?, d.window(&down)?]))
                .collect::<Result<Vec<_>>>()?;
            b.upload_moe(MoeHost {
                router: moe.router.clone(),
                experts,
                first_expert: held.start,
                top_k: moe.top_k,
                norm_topk_prob: moe.norm_topk_prob,
            })
        })
    }

    /// As `upload_moe`, each rank drawing only what it holds.
    fn dummy_moe(&self, moe: MoeDummy) -> Result<Self::Moe> {
        let e = moe.experts.len();
        ensure!(
            moe.part == (0..moe.inter) && moe.held == (0..e),
            InvalidArgument,
            "tensor parallelism splits whole MoE layers, got columns {:?} of {} and experts {:?} of {e}",
            moe.part,
            moe.inter,
            moe.held
        );
        self.each(|b, r| {
            let (held, part) = self.moe_shard(e, moe.inter, r);
            b.dummy_moe(MoeDummy { held, part, ..moe.clone() })
        })
    }

    fn alloc(&self, rows: usize, cols: usize) -> Result<Self::Buf> {
        self.alloc_split(rows, cols, Split::Replicated)
    }

    fn alloc_split(&self, rows: usize, cols: usize, split: Split) -> Result<Self::Buf> {
        let c = self.cols_per_rank(cols, split);
        Ok(TpBuf { parts: self.each(|b, _| b.alloc(rows, c))?, split, rows })
    }

    fn alloc_kv(&self, n_blocks: usize, block_size: usize, _kv_dim: usize) -> Result<Self::KvLayer> {
        let d = self.heads.kv_per_rank() * self.heads.head_dim;
        self.each(|b, _| b.alloc_kv(n_blocks, block_size, d))
    }

    /// A replicated buffer holding `data` on every rank.
    fn upload_buf(&self, rows: usize, cols: usize, data: &[f32]) -> Result<Self::Buf> {
        Ok(TpBuf { parts: self.each(|b, _| b.upload_buf(rows, cols, data))?, split: Split::Replicated, rows })
    }

    fn download(&self, buf: &Self::Buf) -> Result<Vec<f32>> {
        match buf.split {
            Split::Replicated => self.ranks[0].download(&buf.parts[0]),
            Split::Columns => {
                // Rank r holds columns [r*c, (r+1)*c) of every row: interleave them back.
                let parts = self.each(|b, r| b.download(&buf.parts[r]))?;
                let per = parts[0].len().checked_div(buf.rows).unwrap_or(0);
                let mut out = Vec::with_capacity(parts[0].len() * parts.len());
                for i in 0..buf.rows {
                    for p in &parts {
                        out.extend_from_slice(&p[i * per..(i + 1) * per]);
                    }
                }
                Ok(out)
            }
            other => bail!(InvalidArgument, "a {other:?}-split buffer has no single host layout"),
        }
    }

    fn embed(&self, out: &mut Self::Buf, table: &Self::Weight, ids: &[u32]) -> Result<()> {
        per_rank!(self, |b, r| b.embed(&mut out.parts[r], &table.parts[r], ids));
        Ok(())
    }

    fn add_rms_norm(&self, x_out: &mut Self::Buf, h: &mut Self::Buf, input: &BlockInput<Self>) -> Result<()> {
        per_rank!(self, |b, r| b.add_rms_norm(&mut x_out.parts[r], &mut h.parts[r], &rank_input(input, r)));
        Ok(())
    }

    // The fused block inputs run per rank (so each GPU fuses them): their products are split by
    // columns or KV heads, which need no all-reduce; the MoE block's partial sums get one.
    fn norm_matmul_many(
        &self,
        x_out: &mut Self::Buf,
        h: &mut Self::Buf,
        input: &BlockInput<Self>,
        outs: &mut [&mut Self::Buf],
        ws: &[&Self::Weight],
    ) -> Result<()> {
        ensure!(ws.iter().all(|w| w.split != Split::Rows), InvalidArgument, "norm_matmul_many: a row-split weight needs an all-reduce");
        per_rank!(self, |b, r| b.norm_matmul_many(
            &mut x_out.parts[r],
            &mut h.parts[r],
            &rank_input(input, r),
            &mut outs.iter_mut().map(|o| &mut o.parts[r]).collect::<Vec<_>>(),
            &ws.iter().map(|w| &w.parts[r]).collect::<Vec<_>>()
        ));
        Ok(())
    }

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
        ensure!(
            gate.split != Split::Rows && up.split != Split::Rows,
            InvalidArgument,
            "norm_matmul_swiglu: a row-split weight needs an all-reduce"
        );
        per_rank!(self, |b, r| b.norm_matmul_swiglu(
            &mut x_out.parts[r],
            &mut h.parts[r],
            &rank_input(input, r),
            &mut out.parts[r],
            &mut g.parts[r],
            &mut u.parts[r],
            &gate.parts[r],
            &up.parts[r]
        ));
        Ok(())
    }

    fn norm_moe(
        &self,
        x_out: &mut Self::Buf,
        h: &mut Self::Buf,
        input: &BlockInput<Self>,
        out: &mut Self::Buf,
        moe: &Self::Moe,
    ) -> Result<()> {
        per_rank!(self, |b, r| b.norm_moe(&mut x_out.parts[r], &mut h.parts[r], &rank_input(input, r), &mut out.parts[r], &moe[r]));
        self.all_reduce(out)
    }

    fn matmul(&self, out: &mut Self::Buf, x: &Self::Buf, w: &Self::Weight) -> Result<()> {
        per_rank!(self, |b, r| b.matmul(&mut out.parts[r], &x.parts[r], &w.parts[r]));
        if w.split == Split::Rows {
            self.all_reduce(out)?;
        }
        Ok(())
    }

    fn qk_norm_rope(
        &self,
        q: &mut Self::Buf,
        k: &mut Self::Buf,
        q_norm: &Self::Weight,
        k_norm: &Self::Weight,
        eps: f32,
        rope: &Self::Weight,
        positions: &[u32],
        _shape: AttnShape,
    ) -> Result<()> {
        let shape = self.heads.rank_shape();
        per_rank!(self, |b, r| b.qk_norm_rope(
            &mut q.parts[r],
            &mut k.parts[r],
            &q_norm.parts[r],
            &k_norm.parts[r],
            eps,
            &rope.parts[r],
            positions,
            shape
        ));
        Ok(())
    }

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
        _shape: AttnShape,
    ) -> Result<()> {
        let shape = self.heads.rank_shape();
        per_rank!(self, |b, r| b.qk_norm_rope_attention(
            &mut out.parts[r],
            &mut q.parts[r],
            &mut k.parts[r],
            &v.parts[r],
            &q_norm.parts[r],
            &k_norm.parts[r],
            eps,
            &rope.parts[r],
            &mut kv[r],
            batch,
            shape
        ));
        Ok(())
    }

    fn kv_append(&self, kv: &mut Self::KvLayer, k: &Self::Buf, v: &Self::Buf, batch: &BatchInfo) -> Result<()> {
        per_rank!(self, |b, r| b.kv_append(&mut kv[r], &k.parts[r], &v.parts[r], batch));
        Ok(())
    }

    fn attention(&self, out: &mut Self::Buf, q: &Self::Buf, kv: &Self::KvLayer, batch: &BatchInfo, _shape: AttnShape) -> Result<()> {
        let shape = self.heads.rank_shape();
        per_rank!(self, |b, r| b.attention(&mut out.parts[r], &q.parts[r], &kv[r], batch, shape));
        Ok(())
    }

    fn swiglu(&self, out: &mut Self::Buf, gate: &Self::Buf, up: &Self::Buf) -> Result<()> {
        per_rank!(self, |b, r| b.swiglu(&mut out.parts[r], &gate.parts[r], &up.parts[r]));
        Ok(())
    }

    fn moe(&self, out: &mut Self::Buf, x: &Self::Buf, moe: &Self::Moe) -> Result<()> {
        per_rank!(self, |b, r| b.moe(&mut out.parts[r], &x.parts[r], &moe[r]));
        self.all_reduce(out)
    }

    fn gather_rows(&self, out: &mut Self::Buf, x: &Self::Buf, rows: &[u32]) -> Result<()> {
        per_rank!(self, |b, r| b.gather_rows(&mut out.parts[r], &x.parts[r], rows));
        Ok(())
    }
}
