//! `Qwen3Config`: config.json of `Qwen3ForCausalLM` and `Qwen3MoeForCausalLM` under Hugging Face's
//! field names, one struct for dense and MoE, validated so the model code can trust it.

use crate::error::{Error, Result};
use crate::{bail, ensure};
use serde::Deserialize;
use std::path::Path;

/// How RoPE frequencies are scaled for long contexts (`rope_scaling` in config.json).
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    None,
    /// Position interpolation: every frequency divided by `factor`.
    Linear { factor: f64 },
    /// YaRN, as transformers' `_compute_yarn_parameters` computes it.
    Yarn {
        /// The effective factor: transformers replaces the configured one by
        /// max_position_embeddings / original_max_position_embeddings when the latter is given.
        factor: f64,
        original_max_position_embeddings: usize,
        beta_fast: f64,
        beta_slow: f64,
        /// None = derived from `factor` (0.1·ln(factor) + 1).
        attention_factor: Option<f64>,
        mscale: Option<f64>,
        mscale_all_dim: Option<f64>,
        truncate: bool,
    },
}

#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(u32),
    Many(Vec<u32>),
}

/// The fields of config.json as published (unknown fields are ignored).
#[derive(Clone, Debug, Deserialize)]
struct RawConfig {
    #[serde(default)]
    architectures: Vec<String>,
    #[serde(default)]
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    max_position_embeddings: usize,
    #[serde(default = "default_eps")]
    rms_norm_eps: f64,
    rope_theta: Option<f64>,
    #[serde(default)]
    rope_scaling: Option<serde_json::Value>,
    /// transformers >= 5 writes RoPE settings here instead of rope_theta/rope_scaling.
    #[serde(default)]
    rope_parameters: Option<serde_json::Value>,
    #[serde(default)]
    tie_word_embeddings: bool,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default = "default_act")]
    hidden_act: String,
    #[serde(default)]
    use_sliding_window: bool,
    bos_token_id: Option<u32>,
    eos_token_id: Option<OneOrMany>,
    // MoE
    #[serde(default)]
    num_experts: usize,
    #[serde(default)]
    num_experts_per_tok: usize,
    #[serde(default)]
    moe_intermediate_size: usize,
    #[serde(default)]
    norm_topk_prob: bool,
    #[serde(default = "one")]
    decoder_sparse_step: usize,
    #[serde(default)]
    mlp_only_layers: Vec<usize>,
}

fn default_eps() -> f64 {
    1e-6
}
fn default_act() -> String {
    "silu".into()
}
fn one() -> usize {
    1
}

/// A validated Qwen3 / Qwen3-MoE configuration.
#[derive(Clone, Debug)]
pub struct Qwen3Config {
    pub architecture: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// 0 for dense models.
    pub num_experts: usize,
    pub num_experts_per_tok: usize,
    pub moe_intermediate_size: usize,
    pub norm_topk_prob: bool,
    pub decoder_sparse_step: usize,
    pub mlp_only_layers: Vec<usize>,
}

const DENSE: &str = "Qwen3ForCausalLM";
const MOE: &str = "Qwen3MoeForCausalLM";

impl Qwen3Config {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json(&text).map_err(|e| match e {
            Error::Config(m) => Error::Config(format!("{}: {m}", path.display())),
            other => other,
        })
    }

    pub fn from_json(text: &str) -> Result<Self> {
        let raw: RawConfig = serde_json::from_str(text).map_err(|e| Error::Config(format!("invalid config.json: {e}")))?;
        Self::from_raw(raw)
    }

    fn from_raw(raw: RawConfig) -> Result<Self> {
        let architecture = match raw.architectures.first() {
            Some(a) => a.clone(),
            None => match raw.model_type.as_deref() {
                Some("qwen3") => DENSE.to_string(),
                Some("qwen3_moe") => MOE.to_string(),
                other => bail!(Config, "config.json names no architecture (architectures is empty, model_type {other:?})"),
            },
        };
        ensure!(
            architecture == DENSE || architecture == MOE,
            Config,
            "unsupported architecture {architecture:?}: qwen3rs runs {DENSE} and {MOE}"
        );
        ensure!(raw.hidden_act == "silu", Config, "unsupported hidden_act {:?}: Qwen3 uses \"silu\"", raw.hidden_act);
        ensure!(!raw.attention_bias, Config, "attention_bias = true is not supported (no Qwen3 checkpoint uses it)");
        ensure!(!raw.use_sliding_window, Config, "use_sliding_window = true is not supported");
        for (name, v) in [
            ("vocab_size", raw.vocab_size),
            ("hidden_size", raw.hidden_size),
            ("intermediate_size", raw.intermediate_size),
            ("num_hidden_layers", raw.num_hidden_layers),
            ("num_attention_heads", raw.num_attention_heads),
            ("max_position_embeddings", raw.max_position_embeddings),
        ] {
            ensure!(v > 0, Config, "config.json field {name} must be > 0, got {v}");
        }
        let n_kv = raw.num_key_value_heads.unwrap_or(raw.num_attention_heads);
        ensure!(
            n_kv > 0 && raw.num_attention_heads.is_multiple_of(n_kv),
            Config,
            "num_attention_heads ({}) must be a multiple of num_key_value_heads ({n_kv})",
            raw.num_attention_heads
        );
        let head_dim = raw.head_dim.unwrap_or(raw.hidden_size / raw.num_attention_heads);
        ensure!(head_dim > 0 && head_dim.is_multiple_of(2), Config, "head_dim must be even and > 0, got {head_dim}");
        ensure!(raw.rms_norm_eps.is_finite() && raw.rms_norm_eps > 0.0, Config, "rms_norm_eps must be > 0, got {}", raw.rms_norm_eps);
        let (rope_theta, rope_scaling) = parse_rope(&raw)?;
        let is_moe = architecture == MOE;
        if is_moe {
            ensure!(raw.num_experts > 0, Config, "{MOE} needs num_experts > 0");
            ensure!(
                raw.num_experts_per_tok > 0 && raw.num_experts_per_tok <= raw.num_experts,
                Config,
                "num_experts_per_tok must be in 1..={}, got {}",
                raw.num_experts,
                raw.num_experts_per_tok
            );
            ensure!(raw.moe_intermediate_size > 0, Config, "{MOE} needs moe_intermediate_size > 0");
            ensure!(raw.decoder_sparse_step > 0, Config, "decoder_sparse_step must be > 0");
        }
        let eos_token_ids = match raw.eos_token_id {
            None => vec![],
            Some(OneOrMany::One(id)) => vec![id],
            Some(OneOrMany::Many(ids)) => ids,
        };
        Ok(Qwen3Config {
            architecture,
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: raw.num_attention_heads,
            num_key_value_heads: n_kv,
            head_dim,
            max_position_embeddings: raw.max_position_embeddings,
            rms_norm_eps: raw.rms_norm_eps as f32,
            rope_theta,
            rope_scaling,
            tie_word_embeddings: raw.tie_word_embeddings,
            bos_token_id: raw.bos_token_id,
            eos_token_ids,
            num_experts: if is_moe { raw.num_experts } else { 0 },
            num_experts_per_tok: raw.num_experts_per_tok,
            moe_intermediate_size: raw.moe_intermediate_size,
            norm_topk_prob: raw.norm_topk_prob,
            decoder_sparse_step: raw.decoder_sparse_step,
            mlp_only_layers: raw.mlp_only_layers,
        })
    }

    /// Whether decoder layer `i` uses the sparse MoE block (transformers' Qwen3MoeDecoderLayer rule).
    pub fn is_moe_layer(&self, i: usize) -> bool {
        self.num_experts > 0 && !self.mlp_only_layers.contains(&i) && (i + 1).is_multiple_of(self.decoder_sparse_step)
    }

    pub fn q_dim(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    /// Elements of every weight tensor of the checkpoint: the embedding, each layer's attention, norms
    /// and MLP or experts (with their router), the final norm and an untied lm_head.
    pub fn weight_elements(&self) -> usize {
        let (h, hd) = (self.hidden_size, self.head_dim);
        let attention = 2 * self.q_dim() * h + 2 * self.kv_dim() * h + 2 * h + 2 * hd;
        let layers: usize = (0..self.num_hidden_layers)
            .map(|i| {
                let mlp = if self.is_moe_layer(i) {
                    self.num_experts * (3 * self.moe_intermediate_size * h + h)
                } else {
                    3 * self.intermediate_size * h
                };
                attention + mlp
            })
            .sum();
        let heads = if self.tie_word_embeddings { 1 } else { 2 };
        heads * self.vocab_size * h + layers + h
    }

    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }
}

fn get_f64(obj: &serde_json::Value, key: &str) -> Result<Option<f64>> {
    match obj.get(key) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(v) => v.as_f64().map(Some).ok_or_else(|| Error::Config(format!("rope_scaling.{key} must be a number, got {v}"))),
    }
}

fn parse_rope(raw: &RawConfig) -> Result<(f64, RopeScaling)> {
    // transformers >= 5 nests rope_theta and the scaling into rope_parameters.
    let scaling = raw.rope_scaling.as_ref().or(raw.rope_parameters.as_ref());
    let theta = match (raw.rope_theta, raw.rope_parameters.as_ref()) {
        (Some(t), _) => t,
        (None, Some(p)) => get_f64(p, "rope_theta")?.unwrap_or(10000.0),
        (None, None) => 10000.0,
    };
    ensure!(theta.is_finite() && theta > 1.0, Config, "rope_theta must be > 1, got {theta}");
    let Some(s) = scaling.filter(|s| !s.is_null()) else { return Ok((theta, RopeScaling::None)) };
    ensure!(s.is_object(), Config, "rope_scaling must be an object or null, got {s}");
    let kind = s.get("rope_type").or_else(|| s.get("type")).and_then(|v| v.as_str()).unwrap_or("default");
    let factor = get_f64(s, "factor")?;
    let scaling = match kind {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear { factor: positive_factor(factor)? },
        "yarn" => {
            let factor = positive_factor(factor)?;
            let (factor, original) = match get_f64(s, "original_max_position_embeddings")? {
                Some(v) => {
                    ensure!(v >= 1.0, Config, "rope_scaling.original_max_position_embeddings must be >= 1, got {v}");
                    (raw.max_position_embeddings as f64 / v, v as usize)
                }
                None => (factor, raw.max_position_embeddings),
            };
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings: original,
                beta_fast: get_f64(s, "beta_fast")?.unwrap_or(32.0),
                beta_slow: get_f64(s, "beta_slow")?.unwrap_or(1.0),
                attention_factor: get_f64(s, "attention_factor")?,
                mscale: get_f64(s, "mscale")?,
                mscale_all_dim: get_f64(s, "mscale_all_dim")?,
                truncate: s.get("truncate").and_then(|v| v.as_bool()).unwrap_or(true),
            }
        }
        other => bail!(Config, "unsupported rope_scaling type {other:?}: qwen3rs supports \"default\", \"linear\" and \"yarn\""),
    };
    Ok((theta, scaling))
}

fn positive_factor(factor: Option<f64>) -> Result<f64> {
    match factor {
        Some(f) if f.is_finite() && f >= 1.0 => Ok(f),
        Some(f) => bail!(Config, "rope_scaling.factor must be >= 1, got {f}"),
        None => bail!(Config, "rope_scaling needs a factor"),
    }
}
