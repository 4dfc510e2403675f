//! qwen3rs: a runtime for the Qwen3 model family (dense and MoE).
//!
//! Map (see DESIGN.md in the project brief):
//! - `config`   — config.json of Qwen3ForCausalLM / Qwen3MoeForCausalLM, validated.
//! - `weights`  — memory-mapped safetensors (single or sharded), tensors checked by name/dtype/shape.
//! - `tensor`   — dtypes and host tensors (borrowed from a memory map or owned).
//! - `backend`  — `trait Backend`, the coarse op set; `cpu` holds the scalar reference every backend is tested against.
//! - `model`    — `Model<B>`: one forward pass for dense and MoE over a batch of sequences; RoPE/YaRN; paged KV cache.
//! - `tokenizer`, `chat` — byte-level BPE; the model's own Jinja chat template and output parsing.
//! - `sampler`, `engine` — token selection; the generate loop (stop conditions, thinking budget, streaming).
//! - `py`       — the only PyO3 file (feature `python`).
//!
//! Performance notes (what was tried, kept, dropped — and why):
//! - CPU weights are used in place from the memory map (bf16/f16/f32 as stored); activations are f32.
//! - CUDA (first version, correctness first): GEMV kernel for T <= 8 rows (16-byte weight loads,
//!   one warp per output column), cuBLAS GemmEx (f32 accumulation) above; attention is one block
//!   per (head, row) with a per-warp online softmax (no split-KV yet); MoE experts run as tiled
//!   grouped GEMMs over expert-sorted rows (tiles of 16 rows, no host sync). Metadata uploads are
//!   skipped when unchanged.
//! - CUDA, issue 6 (speed; figures in benches/RESULTS.md, each step switchable by an env var read
//!   at load for bisecting): decode steps as CUDA graphs, one per batch size, metadata through
//!   pinned staging and replays checked by a hash of every launch; persistent decode GEMVs (a warp
//!   per weight row, 8 loads in flight per lane, x staged in shared memory) with q/k/v and
//!   gate·up·SwiGLU fused; QK-norm + RoPE + KV append in one kernel; MoE decode reading only the
//!   chosen experts; split-KV decode attention reading each K/V row once per query-head group;
//!   tensor-core (mma.sync) flash attention for prefill; MoE prefill through cuBLAS grouped GEMMs;
//!   dummy weights drawn on the device. Not yet: a device sampler for non-greedy.

pub mod error;
pub mod backend;
pub mod chat;
pub mod config;
pub mod device;
pub mod engine;
pub mod model;
pub mod sampler;
pub mod tensor;
pub mod tokenizer;
pub mod weights;

#[cfg(feature = "python")]
mod py;

pub use error::{Error, Result};
