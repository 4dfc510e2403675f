//! Byte-pair merging of one pre-token: start from one token per byte, then repeatedly merge the
//! adjacent pair of lowest merge rank (leftmost on ties) until no pair has a merge. This is the
//! order HF `tokenizers` merges in (its heap pops the least (rank, position)).
//!
//! Short pieces (nearly all of them) use an array rescanned per merge: quadratic but tiny and
//! cache-friendly. Long pieces (a megabyte with no spaces, thousands of emoji) use a heap over a
//! linked list, O(n log n), so no input is quadratic.

use rustc_hash::FxHashMap;
use std::cmp::Reverse;
use std::collections::BinaryHeap;

/// Pieces of more bytes than this go to the heap algorithm.
const SMALL_PIECE: usize = 128;

const NO_RANK: u32 = u32::MAX;
/// A (rank, merged id) pair packed as `rank << 32 | id`: ordering by it orders by rank.
const NO_MERGE: u64 = u64::MAX;

/// The merge table in id space.
pub struct Merges {
    /// Token id of each single byte.
    pub byte_ids: [u32; 256],
    /// (left id, right id) packed as `left << 32 | right` → (rank, merged id).
    pub pairs: FxHashMap<u64, (u32, u32)>,
    /// The same for the 65,536 pairs of single bytes (index `first << 8 | second`), packed as
    /// NO_MERGE or `rank << 32 | id`: every piece starts with these lookups, so they stay in cache.
    pub byte_pairs: Box<[u64]>,
}

impl Merges {
    pub fn new(byte_ids: [u32; 256], pairs: FxHashMap<u64, (u32, u32)>) -> Self {
        let mut m = Merges { byte_ids, pairs, byte_pairs: Box::new([]) };
        m.byte_pairs = (0..65536usize).map(|i| m.packed(byte_ids[i >> 8], byte_ids[i & 0xFF])).collect();
        m
    }

    #[inline]
    fn packed(&self, left: u32, right: u32) -> u64 {
        self.get(left, right).map_or(NO_MERGE, |(rank, id)| (rank as u64) << 32 | id as u64)
    }

    #[inline]
    fn get(&self, left: u32, right: u32) -> Option<(u32, u32)> {
        self.pairs.get(&((left as u64) << 32 | right as u64)).copied()
    }

    #[inline]
    fn rank(&self, left: u32, right: u32) -> u32 {
        self.get(left, right).map_or(NO_RANK, |(rank, _)| rank)
    }

    /// Append the tokens of `piece` (non-empty) to `out`.
    pub fn encode_piece(&self, piece: &[u8], out: &mut Vec<u32>) {
        if piece.len() <= SMALL_PIECE {
            self.encode_small(piece, out)
        } else {
            self.encode_large(piece, out)
        }
    }

    /// Array algorithm; `merges[i]` caches the packed (rank, id) of pair (ids[i], ids[i+1]).
    fn encode_small(&self, piece: &[u8], out: &mut Vec<u32>) {
        let mut ids = [0u32; SMALL_PIECE];
        let mut merges = [NO_MERGE; SMALL_PIECE];
        let mut n = piece.len();
        for (slot, &b) in ids.iter_mut().zip(piece) {
            *slot = self.byte_ids[b as usize];
        }
        for (slot, w) in merges.iter_mut().zip(piece.windows(2)) {
            *slot = self.byte_pairs[(w[0] as usize) << 8 | w[1] as usize];
        }
        while n > 1 {
            let (best, packed) = min_merge(&merges[..n - 1]);
            if packed == NO_MERGE {
                break;
            }
            let merged = packed as u32;
            ids[best] = merged;
            ids.copy_within(best + 2..n, best + 1);
            merges.copy_within(best + 2..n, best + 1);
            n -= 1;
            merges[n - 1] = NO_MERGE;
            if best + 1 < n {
                merges[best] = self.packed(merged, ids[best + 1]);
            }
            if best > 0 {
                merges[best - 1] = self.packed(ids[best - 1], merged);
            }
        }
        out.extend_from_slice(&ids[..n]);
    }

    /// Heap algorithm over a doubly linked list of symbols.
    pub(crate) fn encode_large(&self, piece: &[u8], out: &mut Vec<u32>) {
        const NONE: u32 = u32::MAX;
        let n = piece.len();
        let mut ids: Vec<u32> = piece.iter().map(|&b| self.byte_ids[b as usize]).collect();
        let mut prev: Vec<u32> = (0..n as u32).map(|i| i.wrapping_sub(1)).collect();
        let mut next: Vec<u32> = (1..=n as u32).map(|i| if i as usize == n { NONE } else { i }).collect();
        let mut alive = vec![true; n];
        let mut heap = BinaryHeap::with_capacity(n);
        for i in 0..n - 1 {
            let rank = self.rank(ids[i], ids[i + 1]);
            if rank != NO_RANK {
                heap.push(Reverse((rank, i as u32)));
            }
        }
        while let Some(Reverse((rank, pos))) = heap.pop() {
            let p = pos as usize;
            if !alive[p] || next[p] == NONE {
                continue;
            }
            let q = next[p] as usize;
            // Stale entry: the pair at `p` changed since it was pushed (ranks are unique per pair).
            let Some((r, merged)) = self.get(ids[p], ids[q]) else { continue };
            if r != rank {
                continue;
            }
            ids[p] = merged;
            alive[q] = false;
            next[p] = next[q];
            if next[q] != NONE {
                prev[next[q] as usize] = pos;
            }
            if prev[p] != NONE {
                let l = prev[p] as usize;
                let r = self.rank(ids[l], merged);
                if r != NO_RANK {
                    heap.push(Reverse((r, l as u32)));
                }
            }
            if next[p] != NONE {
                let r = self.rank(merged, ids[next[p] as usize]);
                if r != NO_RANK {
                    heap.push(Reverse((r, pos)));
                }
            }
        }
        let mut i = 0u32;
        while i != NONE {
            out.push(ids[i as usize]);
            i = next[i as usize];
        }
    }
}

/// Position and value of the first minimum.
#[inline]
fn min_merge(merges: &[u64]) -> (usize, u64) {
    let mut best = (0, NO_MERGE);
    for (i, &r) in merges.iter().enumerate() {
        if r < best.1 {
            best = (i, r);
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A toy table over bytes a=0, b=1, c=2: ab→3 (rank 0), bc→4 (rank 1), 3c→5 (rank 2), aa→6 (rank 3).
    fn toy() -> Merges {
        let mut byte_ids = [0u32; 256];
        byte_ids[b'a' as usize] = 0;
        byte_ids[b'b' as usize] = 1;
        byte_ids[b'c' as usize] = 2;
        let mut pairs = FxHashMap::default();
        for (rank, (l, r, id)) in [(0, 1, 3), (1, 2, 4), (3, 2, 5), (0, 0, 6)].into_iter().enumerate() {
            pairs.insert((l as u64) << 32 | r as u64, (rank as u32, id));
        }
        Merges::new(byte_ids, pairs)
    }

    fn both(m: &Merges, s: &[u8]) -> Vec<u32> {
        let (mut a, mut b) = (vec![], vec![]);
        m.encode_small(s, &mut a);
        m.encode_large(s, &mut b);
        assert_eq!(a, b, "small and large algorithms disagree on {:?}", String::from_utf8_lossy(s));
        a
    }

    #[test]
    fn merges_by_rank_then_leftmost() {
        let m = toy();
        assert_eq!(both(&m, b"abc"), [5]); // ab first (rank 0), then (ab)c
        assert_eq!(both(&m, b"bc"), [4]);
        assert_eq!(both(&m, b"aaa"), [6, 0]); // leftmost aa
        assert_eq!(both(&m, b"aabc"), [0, 5]); // ab (rank 0) beats aa (rank 3)
        assert_eq!(both(&m, b"a"), [0]);
    }

    #[test]
    fn small_and_large_agree_on_random_strings() {
        let m = toy();
        let mut x = 0x2545F4914F6CDD1Du64;
        for len in 1..200 {
            let s: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    b"abc"[(x % 3) as usize]
                })
                .collect();
            both(&m, &s[..len.min(SMALL_PIECE)]);
        }
    }
}
