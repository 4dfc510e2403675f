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
//! - CUDA, issue 6 (speed; figures and every measurement in benches/RESULTS.md by run number; each
//!   step switchable by an env var read at load, for bisecting). Kept:
//!   - decode: each step one CUDA graph per batch size (kept per launch shape, replays checked by a
//!     hash of every launch), kernels chained by programmatic dependent launch (PDL), greedy steps
//!     launched before the host has read the last token (ids fed on the device), top-k candidates
//!     chosen on the device; persistent GEMVs (a warp per weight row, 8 16-byte L1-bypassing loads in
//!     flight a lane, the first batch issued before the wait, x staged in shared memory) with q/k/v,
//!     gate·up·SwiGLU and the block's add + RMSNorm fused in; QK-norm + RoPE + KV append + split-KV
//!     attention in one launch, splits merged in a thread-block cluster; MoE decode reading only the
//!     chosen experts, routed inside the gate/up kernel, down with the weighted combine; a second
//!     build of the GEMVs with 16 loads a lane in flight for the row lengths (and kernel families)
//!     where it measured faster (`matmul_wide`, WIDE_ROWS, 25.5–25.6, 27.3–27.4).
//!   - prefill: attention of head_dim 128 on wgmma on sm_90a (else mma.sync flash attention); MoE
//!     experts on wgmma (`expert_gemm`, 128-row tiles, two blocks an SM, no host sync; else cuBLAS
//!     grouped GEMMs); dense products on cuBLAS; dummy weights drawn on the device.
//! - Dropped after measuring (runs in RESULTS.md): one persistent kernel a decode step (a grid barrier
//!   costs more than a PDL boundary, 19.5); decode products on tensor cores (tiles 18.1, per-row mma
//!   18.2: the products are bound by per-launch latency, not instructions); a warp-level fused norm
//!   (21.1); the MoE down projection prefetching its rows (22.4, 23.1); the products prefetching their
//!   rows into L2 before the wait, where their first batch is loaded anyway (26.4–26.5: without it
//!   +4–5 %); short rows loaded two to a batch (26.1); expert tiles of 256 or 64 rows (24.2); moe_sort
//!   keeping pair ids in registers (24.1, +0.2 %); the next weights brought into L2 by a kernel on a
//!   second stream (24.3, −35 % on 0.6B) and the o projection's weights copied into shared memory during
//!   the attention (24.5, −8 %): work put beside the decode kernels costs more than the idle time it
//!   means to fill; q/k/v and the decode attention in one cluster launch (25.2–25.4: clusters of 16 at
//!   one block an SM do not all fit at once). Refuted code stays on its git branch, named in RESULTS.md.

pub mod backend;
pub mod chat;
pub mod config;
pub mod device;
pub mod engine;
pub mod error;
pub mod model;
pub mod sampler;
pub mod tensor;
pub mod tokenizer;
pub mod weights;

#[cfg(feature = "python")]
mod py;

pub use error::{Error, Result};
