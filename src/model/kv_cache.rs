//! The paged KV cache: per layer a pool of fixed-size blocks (backend storage), and per sequence a
//! block table. Many sequences share one pool, so batching and chat sessions need no copies.

use crate::backend::Backend;
use crate::ensure;
use crate::error::Result;

/// Tokens per cache block.
pub const BLOCK_SIZE: usize = 16;

/// One sequence's place in the cache.
#[derive(Clone, Debug, Default)]
pub struct SeqCache {
    /// Cache block ids: positions [i*BLOCK_SIZE, (i+1)*BLOCK_SIZE) live in blocks[i].
    pub blocks: Vec<u32>,
    /// Tokens already written.
    pub len: usize,
}

pub struct KvCache<B: Backend> {
    /// [n_layers] K/V block pools.
    pub layers: Vec<B::KvLayer>,
    free: Vec<u32>,
    /// Longest sequence allowed (the user's max_seq_len).
    pub max_seq_len: usize,
}

impl<B: Backend> KvCache<B> {
    /// A cache for up to `max_seqs` sequences of `max_seq_len` tokens each.
    pub fn new(backend: &B, n_layers: usize, kv_dim: usize, max_seq_len: usize, max_seqs: usize) -> Result<Self> {
        let n_blocks = max_seq_len.div_ceil(BLOCK_SIZE) * max_seqs;
        ensure!(n_blocks <= u32::MAX as usize, InvalidArgument, "KV cache of {n_blocks} blocks is too large");
        let layers = (0..n_layers).map(|_| backend.alloc_kv(n_blocks, BLOCK_SIZE, kv_dim)).collect::<Result<_>>()?;
        // Pop from the end: low block ids are handed out first.
        let free = (0..n_blocks as u32).rev().collect();
        Ok(KvCache { layers, free, max_seq_len })
    }

    /// Make room for `seq` to hold `new_len` tokens.
    pub fn reserve(&mut self, seq: &mut SeqCache, new_len: usize) -> Result<()> {
        ensure!(
            new_len <= self.max_seq_len,
            InvalidArgument,
            "sequence of {new_len} tokens does not fit max_seq_len = {} (load the model with a larger max_seq_len)",
            self.max_seq_len
        );
        let needed = new_len.div_ceil(BLOCK_SIZE);
        while seq.blocks.len() < needed {
            let Some(b) = self.free.pop() else {
                crate::bail!(InvalidArgument, "the KV cache is full: too many sequences at once for its capacity");
            };
            seq.blocks.push(b);
        }
        Ok(())
    }

    /// Return a sequence's blocks to the pool.
    pub fn release(&mut self, seq: &mut SeqCache) {
        self.free.extend(seq.blocks.drain(..).rev());
        seq.len = 0;
    }

    /// Forget tokens past `len` (keeps their blocks for reuse by the same sequence).
    pub fn truncate(&mut self, seq: &mut SeqCache, len: usize) {
        seq.len = seq.len.min(len);
    }
}
