//! Copies of a [`DecodeCache`] slot's keys and values, kept apart from the cache: what a server
//! keeps of a finished conversation so that a later request sharing its beginning starts from
//! there ([`DecodeCache::load_slot`]) instead of prefilling it again (prompt caching).
//!
//! A copy is exact: the same floats the forward pass wrote, so a prefix restored and extended gives
//! the keys and values the cache had when the sequence was first decoded.

use anyhow::{ensure, Result};

use super::DecodeCache;

/// The keys and values of the first `len` positions of one slot ([`DecodeCache::save_slot`]).
pub struct SlotKv {
    len: usize,
    kv_heads: usize,
    head_dim: usize,
    /// Per layer, (kv_head, position, head_dim) for `len` positions.
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

impl SlotKv {
    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes of keys and values held.
    pub fn bytes(&self) -> usize {
        4 * self.k.iter().chain(&self.v).map(Vec::len).sum::<usize>()
    }
}

impl DecodeCache {
    /// A copy of the keys and values of every position cached in `slot`.
    pub fn save_slot(&self, slot: usize) -> Result<SlotKv> {
        ensure!(slot < self.slots, "slot {slot} out of range: the cache has {} slots", self.slots);
        let (len, cap, hd) = (self.pos[slot], self.capacity, self.head_dim);
        let copy = |buf: &Vec<f32>| {
            let mut out = Vec::with_capacity(self.kv_heads * len * hd);
            for h in 0..self.kv_heads {
                let from = (slot * self.kv_heads + h) * cap * hd;
                out.extend_from_slice(&buf[from..from + len * hd]);
            }
            out
        };
        Ok(SlotKv {
            len,
            kv_heads: self.kv_heads,
            head_dim: hd,
            k: self.k.iter().map(copy).collect(),
            v: self.v.iter().map(copy).collect(),
        })
    }

    /// Makes `slot` hold the first `len` positions of `kv` (saved from a cache of the same model),
    /// ready to prefill what follows them.
    pub fn load_slot(&mut self, slot: usize, kv: &SlotKv, len: usize) -> Result<()> {
        ensure!(slot < self.slots, "slot {slot} out of range: the cache has {} slots", self.slots);
        ensure!(
            kv.k.len() == self.k.len() && kv.kv_heads == self.kv_heads && kv.head_dim == self.head_dim,
            "saved keys and values of another model shape"
        );
        ensure!(len <= kv.len, "{len} positions asked from a saved sequence of {}", kv.len);
        ensure!(len <= self.capacity, "{len} saved positions over the cache's capacity of {}", self.capacity);
        let (cap, hd, heads) = (self.capacity, self.head_dim, self.kv_heads);
        for (cache, saved) in self.k.iter_mut().zip(&kv.k).chain(self.v.iter_mut().zip(&kv.v)) {
            for h in 0..heads {
                let (from, to) = (h * kv.len * hd, (slot * heads + h) * cap * hd);
                cache[to..to + len * hd].copy_from_slice(&saved[from..from + len * hd]);
            }
        }
        self.pos[slot] = len;
        Ok(())
    }
}
