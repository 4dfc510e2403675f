//! `Model<B>`: the Qwen3 decoder — one forward pass for dense and MoE checkpoints (`enum Ffn`) over
//! a batch of sequences, on any `Backend`. The forward reads top to bottom in numbered steps; every
//! buffer lives in `Scratch`, allocated once per batch shape, so decoding allocates nothing per token.

pub mod dummy;
pub mod kv_cache;
pub mod rope;

use crate::backend::{AttnShape, Backend, BatchInfo, BlockInput, MoeDummy, MoeHost, Split};
use crate::config::Qwen3Config;
use crate::error::Result;
use crate::weights::TensorSource;
use dummy::DummySpec;
use kv_cache::KvCache;

enum Ffn<B: Backend> {
    /// SwiGLU MLP: gate/up [I, H], down [H, I].
    Dense { gate: B::Weight, up: B::Weight, down: B::Weight },
    /// Router + experts, in the backend's layout.
    Moe(B::Moe),
}

struct Layer<B: Backend> {
    input_norm: B::Weight,
    q_proj: B::Weight,
    k_proj: B::Weight,
    v_proj: B::Weight,
    o_proj: B::Weight,
    q_norm: B::Weight,
    k_norm: B::Weight,
    post_norm: B::Weight,
    ffn: Ffn<B>,
}

pub struct Model<B: Backend> {
    pub config: Qwen3Config,
    pub backend: B,
    /// [V, H]
    embed: B::Weight,
    layers: Vec<Layer<B>>,
    final_norm: B::Weight,
    /// [V, H]; None when tied to `embed`.
    lm_head: Option<B::Weight>,
    /// [max_seq_len, head_dim] cos|sin.
    rope: B::Weight,
    pub max_seq_len: usize,
}

/// Every activation buffer of one forward pass over T rows, R of which produce logits.
pub struct Scratch<B: Backend> {
    rows: usize,
    logit_rows: usize,
    x: B::Buf,        // [T, H] residual stream
    x_next: B::Buf,   // [T, H] the residual stream after the next add (then swapped with x)
    h: B::Buf,        // [T, H] normed input of the current block
    attn_out: B::Buf, // [T, H] attention block's output, added to x by the next norm
    ffn_out: B::Buf,  // [T, H] feed-forward block's output, added to x by the next norm
    q: B::Buf,        // [T, n_heads*hd]
    k: B::Buf,        // [T, n_kv*hd]
    v: B::Buf,        // [T, n_kv*hd]
    attn: B::Buf,     // [T, n_heads*hd]
    gate: B::Buf,     // [T, I]  (dense layers)
    up: B::Buf,       // [T, I]
    act: B::Buf,      // [T, I]
    last: B::Buf,     // [R, H] rows whose logits are wanted
    /// [R, V] logits of the wanted rows.
    pub logits: B::Buf,
}

impl<B: Backend> Scratch<B> {
    pub fn new(model: &Model<B>, rows: usize, logit_rows: usize) -> Result<Self> {
        let (c, be) = (&model.config, &model.backend);
        let (h, inter) = (c.hidden_size, c.intermediate_size);
        let dense_rows = if model.layers.iter().any(|l| matches!(l.ffn, Ffn::Dense { .. })) { rows } else { 0 };
        Ok(Scratch {
            rows,
            logit_rows,
            x: be.alloc(rows, h)?,
            x_next: be.alloc(rows, h)?,
            h: be.alloc(rows, h)?,
            attn_out: be.alloc(rows, h)?,
            ffn_out: be.alloc(rows, h)?,
            q: be.alloc_split(rows, c.q_dim(), Split::Columns)?,
            k: be.alloc_split(rows, c.kv_dim(), Split::KvHeads)?,
            v: be.alloc_split(rows, c.kv_dim(), Split::KvHeads)?,
            attn: be.alloc_split(rows, c.q_dim(), Split::Columns)?,
            gate: be.alloc_split(dense_rows, inter, Split::Columns)?,
            up: be.alloc_split(dense_rows, inter, Split::Columns)?,
            act: be.alloc_split(dense_rows, inter, Split::Columns)?,
            last: be.alloc(logit_rows, h)?,
            // A tied lm_head is the (replicated) embedding; an untied one is split by vocabulary.
            logits: be.alloc_split(logit_rows, c.vocab_size, if model.lm_head.is_some() { Split::Columns } else { Split::Replicated })?,
        })
    }

    /// Reuse these buffers for a batch of this shape, reallocating only if it differs.
    pub fn fit(this: &mut Option<Self>, model: &Model<B>, rows: usize, logit_rows: usize) -> Result<()> {
        if !matches!(this, Some(s) if s.rows == rows && s.logit_rows == logit_rows) {
            *this = None; // free the old buffers first: prefill buffers can be large
            *this = Some(Scratch::new(model, rows, logit_rows)?);
        }
        Ok(())
    }
}

fn layer_name(i: usize, rest: &str) -> String {
    format!("model.layers.{i}.{rest}")
}

impl<B: Backend> Model<B> {
    /// Build the model from `src`, checking every tensor's presence and shape.
    /// `progress(done, total)` is called after each layer.
    pub fn load(
        backend: B,
        config: Qwen3Config,
        src: &dyn TensorSource,
        max_seq_len: usize,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Self> {
        crate::ensure!(max_seq_len > 0, InvalidArgument, "max_seq_len must be > 0");
        let c = &config;
        let (h, hd) = (c.hidden_size, c.head_dim);
        // Dummy weights are drawn by the backend itself (on the device for CUDA), same values.
        let dummy = src.dummy_seed();
        if dummy.is_some() {
            backend.check_dummy_fits(c.weight_elements())?;
        }
        let w = |name: &str, shape: &[usize]| -> Result<B::Weight> {
            match dummy {
                Some(seed) => backend.dummy_weight(&DummySpec::new(seed, name, shape), shape),
                None => backend.upload(src.tensor(name, shape)?),
            }
        };
        let split = |name: &str, shape: &[usize], how: Split| -> Result<B::Weight> {
            match dummy {
                Some(seed) => backend.dummy_weight_split(&DummySpec::new(seed, name, shape), shape, how),
                None => backend.upload_split(src.tensor(name, shape)?, how),
            }
        };
        let total = c.num_hidden_layers + 2;
        let embed = w("model.embed_tokens.weight", &[c.vocab_size, h])?;
        progress(1, total);
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let ln = |rest: &str| layer_name(i, rest);
            let ffn = if let (true, Some(seed)) = (c.is_moe_layer(i), dummy) {
                let (e, mi) = (c.num_experts, c.moe_intermediate_size);
                let spec = |p: &str, shape: &[usize]| DummySpec::new(seed, &ln(p), shape);
                let experts = (0..e)
                    .map(|x| {
                        let en = |p: &str| format!("mlp.experts.{x}.{p}_proj.weight");
                        [spec(&en("gate"), &[mi, h]), spec(&en("up"), &[mi, h]), spec(&en("down"), &[h, mi])]
                    })
                    .collect();
                Ffn::Moe(backend.dummy_moe(MoeDummy {
                    router: spec("mlp.gate.weight", &[e, h]),
                    experts,
                    hidden: h,
                    inter: mi,
                    part: 0..mi,
                    held: 0..e,
                    top_k: c.num_experts_per_tok,
                    norm_topk_prob: c.norm_topk_prob,
                })?)
            } else if c.is_moe_layer(i) {
                let (e, mi) = (c.num_experts, c.moe_intermediate_size);
                let experts = (0..e)
                    .map(|x| {
                        let en = |p: &str| ln(&format!("mlp.experts.{x}.{p}_proj.weight"));
                        Ok([src.tensor(&en("gate"), &[mi, h])?, src.tensor(&en("up"), &[mi, h])?, src.tensor(&en("down"), &[h, mi])?])
                    })
                    .collect::<Result<Vec<_>>>()?;
                let router = src.tensor(&ln("mlp.gate.weight"), &[e, h])?;
                Ffn::Moe(backend.upload_moe(MoeHost {
                    router,
                    experts,
                    first_expert: 0,
                    top_k: c.num_experts_per_tok,
                    norm_topk_prob: c.norm_topk_prob,
                })?)
            } else {
                let inter = c.intermediate_size;
                Ffn::Dense {
                    gate: split(&ln("mlp.gate_proj.weight"), &[inter, h], Split::Columns)?,
                    up: split(&ln("mlp.up_proj.weight"), &[inter, h], Split::Columns)?,
                    down: split(&ln("mlp.down_proj.weight"), &[h, inter], Split::Rows)?,
                }
            };
            layers.push(Layer {
                input_norm: w(&ln("input_layernorm.weight"), &[h])?,
                q_proj: split(&ln("self_attn.q_proj.weight"), &[c.q_dim(), h], Split::Columns)?,
                k_proj: split(&ln("self_attn.k_proj.weight"), &[c.kv_dim(), h], Split::KvHeads)?,
                v_proj: split(&ln("self_attn.v_proj.weight"), &[c.kv_dim(), h], Split::KvHeads)?,
                o_proj: split(&ln("self_attn.o_proj.weight"), &[h, c.q_dim()], Split::Rows)?,
                q_norm: w(&ln("self_attn.q_norm.weight"), &[hd])?,
                k_norm: w(&ln("self_attn.k_norm.weight"), &[hd])?,
                post_norm: w(&ln("post_attention_layernorm.weight"), &[h])?,
                ffn,
            });
            progress(i + 2, total);
        }
        let final_norm = w("model.norm.weight", &[h])?;
        let lm_head = if c.tie_word_embeddings { None } else { Some(split("lm_head.weight", &[c.vocab_size, h], Split::Columns)?) };
        let rope = backend.upload_exact(rope::table(c, max_seq_len))?;
        progress(total, total);
        Ok(Model { config, backend, embed, layers, final_norm, lm_head, rope, max_seq_len })
    }

    fn attn_shape(&self) -> AttnShape {
        let c = &self.config;
        AttnShape { n_heads: c.num_attention_heads, n_kv_heads: c.num_key_value_heads, head_dim: c.head_dim }
    }

    /// One forward step: append the batch's tokens to their sequences' caches and leave the logits of
    /// `logit_rows` (indices into the batch's rows) in `s.logits` [R, V].
    pub fn forward(&self, batch: &BatchInfo, cache: &mut KvCache<B>, s: &mut Scratch<B>, logit_rows: &[u32]) -> Result<()> {
        self.backend.run(|| self.forward_steps(batch, cache, s, logit_rows))
    }

    fn forward_steps(&self, batch: &BatchInfo, cache: &mut KvCache<B>, s: &mut Scratch<B>, logit_rows: &[u32]) -> Result<()> {
        let (be, eps) = (&self.backend, self.config.rms_norm_eps);
        let shape = self.attn_shape();
        crate::ensure!(
            batch.rows() == s.rows && logit_rows.len() == s.logit_rows,
            InvalidArgument,
            "scratch is sized for {} rows / {} logit rows, batch has {} / {}",
            s.rows,
            s.logit_rows,
            batch.rows(),
            logit_rows.len()
        );
        // 1. Token embeddings → residual stream x [T, H].
        be.embed(&mut s.x, &self.embed, batch.tokens)?;
        for (i, layer) in self.layers.iter().enumerate() {
            // 2. x += the previous layer's FFN output; h = norm(x); q, k, v = h · W. (Each add writes
            //    x_next, then the two swap: see Backend::add_rms_norm.)
            let input = BlockInput { x: &s.x, delta: (i > 0).then_some(&s.ffn_out), norm: &layer.input_norm, eps };
            be.norm_matmul_many(
                &mut s.x_next,
                &mut s.h,
                &input,
                &mut [&mut s.q, &mut s.k, &mut s.v],
                &[&layer.q_proj, &layer.k_proj, &layer.v_proj],
            )?;
            std::mem::swap(&mut s.x, &mut s.x_next);
            // 3. Attention: per-head QK-norm + RoPE, cache append, causal GQA, output projection.
            be.qk_norm_rope_attention(
                &mut s.attn,
                &mut s.q,
                &mut s.k,
                &s.v,
                &layer.q_norm,
                &layer.k_norm,
                eps,
                &self.rope,
                &mut cache.layers[i],
                batch,
                shape,
            )?;
            // 4. x += attention; h = post-attention norm(x); 5. feed-forward: SwiGLU MLP or routed
            //    experts → ffn_out.
            match &layer.ffn {
                Ffn::Dense { gate, up, down } => {
                    be.matmul(&mut s.attn_out, &s.attn, &layer.o_proj)?;
                    let input = BlockInput { x: &s.x, delta: Some(&s.attn_out), norm: &layer.post_norm, eps };
                    be.norm_matmul_swiglu(&mut s.x_next, &mut s.h, &input, &mut s.act, &mut s.gate, &mut s.up, gate, up)?;
                    be.matmul(&mut s.ffn_out, &s.act, down)?;
                }
                Ffn::Moe(moe) => {
                    let input = (&s.x, &layer.post_norm, eps);
                    be.matmul_norm_moe(&mut s.attn_out, &s.attn, &layer.o_proj, &mut s.x_next, &mut s.h, input, &mut s.ffn_out, moe)?
                }
            }
            std::mem::swap(&mut s.x, &mut s.x_next);
        }
        // 6. x += last FFN; final norm of the wanted rows; lm_head (tied or not) → logits [R, V].
        be.add_rms_norm(&mut s.x_next, &mut s.h, &BlockInput { x: &s.x, delta: Some(&s.ffn_out), norm: &self.final_norm, eps })?;
        be.gather_rows(&mut s.last, &s.h, logit_rows)?;
        be.matmul(&mut s.logits, &s.last, self.lm_head.as_ref().unwrap_or(&self.embed))?;
        Ok(())
    }
}
