//! Prompt caching: the keys and values of recent conversations, kept after their replies end, so
//! that a request starting with the same tokens (the next turn of a chat re-sends the whole
//! conversation) prefills only what is new.
//!
//! Design choices:
//! - one cache shared by the workers (their models are copies of one another, so their keys and
//!   values are interchangeable), bounded in bytes (`--prompt-cache-mb`), least recently used
//!   first out;
//! - an entry is a token sequence and the keys and values of its positions ([`SlotKv`]), saved
//!   when a reply ends: the prompt and the generated tokens (all but the last, which the model
//!   never read). An entry that another entry extends is dropped, since the longer one covers it;
//! - a request takes the longest common prefix of its prompt with any entry, at most all but the
//!   last prompt token (prefilling that one gives the logits of the first reply token), copies
//!   those positions into its slot and prefills the rest. The copy holds the very floats the
//!   original pass wrote, so the reply is what a full prefill gives, up to the float rounding of
//!   pushing the remaining tokens through the kernels in another grouping (as continuous batching
//!   already does); the tests check that replies are the same token for token.

use std::sync::atomic::Ordering;

use anyhow::Result;

use super::metrics::Stats;
use crate::model::decode::{DecodeCache, SlotKv};

struct Entry {
    tokens: Vec<u32>,
    kv: SlotKv,
    /// The cache's clock when last stored or used: the smallest is evicted first.
    used: u64,
}

/// Saved conversations, least recently used first out once over `budget` bytes.
pub struct PromptCache {
    budget: usize,
    entries: Vec<Entry>,
    bytes: usize,
    clock: u64,
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

impl PromptCache {
    /// A cache of at most `budget` bytes of keys and values (0 = off).
    pub fn new(budget: usize) -> Self {
        PromptCache { budget, entries: Vec::new(), bytes: 0, clock: 0 }
    }

    pub fn budget(&self) -> usize {
        self.budget
    }

    /// Conversations held, and the bytes of their keys and values.
    pub fn size(&self) -> (usize, usize) {
        (self.entries.len(), self.bytes)
    }

    /// Readies `slot` for `prompt`: copies in the longest cached prefix (all but the last prompt
    /// token at most) or empties it. Returns the number of positions copied; the caller prefills
    /// `prompt[returned..]`.
    pub fn restore(&mut self, prompt: &[u32], cache: &mut DecodeCache, slot: usize) -> Result<usize> {
        let limit = prompt.len().saturating_sub(1);
        let best = self
            .entries
            .iter()
            .enumerate()
            .map(|(i, e)| (i, common_prefix(&e.tokens, prompt).min(limit).min(e.kv.len())))
            .max_by_key(|&(_, len)| len)
            .filter(|&(_, len)| len > 0);
        let Some((i, len)) = best else {
            cache.reset_slot(slot)?;
            return Ok(0);
        };
        cache.load_slot(slot, &self.entries[i].kv, len)?;
        self.clock += 1;
        self.entries[i].used = self.clock;
        Ok(len)
    }

    /// Keeps `kv`, the keys and values of `tokens` (as many positions as tokens), and evicts the
    /// least recently used entries beyond the budget.
    pub fn store(&mut self, tokens: Vec<u32>, kv: SlotKv) {
        if tokens.is_empty() || tokens.len() != kv.len() || kv.bytes() > self.budget {
            return;
        }
        self.clock += 1;
        // an entry that already covers these tokens only gets fresher
        if let Some(e) = self.entries.iter_mut().find(|e| e.tokens.starts_with(&tokens)) {
            e.used = self.clock;
            return;
        }
        // entries these tokens extend are covered by the new one
        self.entries.retain(|e| !tokens.starts_with(&e.tokens));
        self.entries.push(Entry { tokens, kv, used: self.clock });
        self.bytes = self.entries.iter().map(|e| e.kv.bytes()).sum();
        while self.bytes > self.budget {
            let Some(oldest) = self.entries.iter().enumerate().min_by_key(|(_, e)| e.used).map(|(i, _)| i) else {
                break;
            };
            self.bytes -= self.entries.swap_remove(oldest).kv.bytes();
        }
    }

    /// Publishes the size in the server's counters.
    pub fn report(&self, stats: &Stats) {
        let (entries, bytes) = self.size();
        stats.cache_entries.store(entries, Ordering::SeqCst);
        stats.cache_bytes.store(bytes, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use candle_core::{DType, Device, Tensor};
    use candle_nn::VarBuilder;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::model::decode::DecodeModel;
    use crate::model::{GPTConfig, GPT};

    /// Every weight random (the v0 init zeroes the output projections, which would make every
    /// position's keys independent of the others and every logit 0).
    fn model() -> DecodeModel {
        let config = GPTConfig {
            sequence_len: 32,
            vocab_size: 64,
            n_layer: 2,
            n_head: 2,
            n_kv_head: 1,
            n_embd: 32,
            rotary: Default::default(),
        };
        let mut rng = StdRng::seed_from_u64(3);
        let weights: HashMap<String, Tensor> = config
            .params()
            .into_iter()
            .map(|spec| {
                let values: Vec<f32> = (0..spec.numel()).map(|_| rng.random::<f32>() - 0.5).collect();
                (spec.name, Tensor::from_vec(values, spec.shape, &Device::Cpu).unwrap())
            })
            .collect();
        let gpt = GPT::new(&config, VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu)).unwrap();
        DecodeModel::from_gpt(&gpt).unwrap()
    }

    /// A slot holding `tokens`, saved.
    fn saved(model: &DecodeModel, tokens: &[u32]) -> SlotKv {
        let mut cache = model.new_cache(1, 64).unwrap();
        model.prefill(&mut cache, 0, tokens).unwrap();
        cache.save_slot(0).unwrap()
    }

    #[test]
    fn the_longest_prefix_is_restored_and_extends_to_the_full_prefill() {
        let model = model();
        let mut pc = PromptCache::new(1 << 20);
        let turn1: Vec<u32> = (1..20).collect();
        pc.store(turn1.clone(), saved(&model, &turn1));
        pc.store(vec![1, 2, 3, 9, 9], saved(&model, &[1, 2, 3, 9, 9]));
        let turn2: Vec<u32> = (1..20).chain([40, 41, 42]).collect();
        let mut cache = model.new_cache(2, 64).unwrap();
        let reused = pc.restore(&turn2, &mut cache, 1).unwrap();
        assert_eq!(reused, 19);
        assert_eq!(cache.pos(1), 19);
        let cached = model.prefill(&mut cache, 1, &turn2[19..]).unwrap().to_vec();
        let mut fresh = model.new_cache(1, 64).unwrap();
        let full = model.prefill(&mut fresh, 0, &turn2).unwrap().to_vec();
        let diff = cached.iter().zip(&full).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(diff < 1e-5, "logits differ by {diff}");
        // never the whole prompt: its last token is prefilled for the logits
        assert_eq!(pc.restore(&turn1, &mut cache, 0).unwrap(), 18);
        assert_eq!(pc.restore(&[50, 51], &mut cache, 0).unwrap(), 0);
        assert_eq!(cache.pos(0), 0);
    }

    #[test]
    fn entries_are_bounded_in_bytes_and_least_recently_used_go_first() {
        let model = model();
        let one = saved(&model, &[1, 2, 3, 4]).bytes();
        let mut pc = PromptCache::new(2 * one);
        pc.store(vec![1, 2, 3, 4], saved(&model, &[1, 2, 3, 4]));
        pc.store(vec![5, 6, 7, 8], saved(&model, &[5, 6, 7, 8]));
        let mut cache = model.new_cache(1, 64).unwrap();
        // using the first makes the second the least recently used
        assert_eq!(pc.restore(&[1, 2, 3, 9], &mut cache, 0).unwrap(), 3);
        pc.store(vec![9, 10, 11, 12], saved(&model, &[9, 10, 11, 12]));
        assert_eq!(pc.size(), (2, 2 * one));
        assert_eq!(pc.restore(&[5, 6, 7, 8, 1], &mut cache, 0).unwrap(), 0, "evicted");
        assert_eq!(pc.restore(&[1, 2, 3, 4, 1], &mut cache, 0).unwrap(), 4);
        // an extension replaces the entry it extends (and, 1.25 entries big, pushes the least
        // recently used out); a prefix of an entry adds nothing
        pc.store(vec![9, 10, 11, 12, 13], saved(&model, &[9, 10, 11, 12, 13]));
        pc.store(vec![9, 10], saved(&model, &[9, 10]));
        assert_eq!(pc.size().0, 1);
        assert_eq!(pc.restore(&[9, 10, 11, 12, 13, 14], &mut cache, 0).unwrap(), 5);
        assert_eq!(pc.restore(&[1, 2, 3, 4, 1], &mut cache, 0).unwrap(), 0);
        // too big for the budget, or off: nothing kept
        let long: Vec<u32> = (0..12).collect();
        pc.store(long.clone(), saved(&model, &long));
        assert_eq!(pc.restore(&[0, 1, 2, 3, 4, 5, 6], &mut cache, 0).unwrap(), 0);
        let mut off = PromptCache::new(0);
        off.store(vec![1, 2], saved(&model, &[1, 2]));
        assert_eq!(off.size(), (0, 0));
    }
}
