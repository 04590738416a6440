//! The key/value cache for incremental decoding: per layer, the keys and values of every position
//! seen so far (after RoPE and QK-norm, as the original caches them), plus the position at which
//! the next chunk of tokens starts.

use candle_core::{Result, Tensor};

/// Cached keys and values, each (B, n_kv_head, T_cached, head_dim), for every layer.
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    pos: usize,
}

impl KvCache {
    /// An empty cache for a model with `n_layer` blocks.
    pub fn new(n_layer: usize) -> Self {
        Self { layers: vec![None; n_layer], pos: 0 }
    }

    /// Number of positions already in the cache: the position of the next token.
    pub fn pos(&self) -> usize {
        self.pos
    }

    /// Empties the cache so it can be reused for a new sequence.
    pub fn reset(&mut self) {
        self.layers.iter_mut().for_each(|l| *l = None);
        self.pos = 0;
    }

    /// Copies a batch-1 cache into a batch-`n` one: the engine prefills a prompt once and then
    /// decodes `n` samples from it.
    pub fn expand_batch(&self, n: usize) -> Result<Self> {
        let expand = |t: &Tensor| -> Result<Tensor> {
            let mut dims = t.dims().to_vec();
            if dims[0] != 1 {
                candle_core::bail!("expand_batch needs a batch-1 cache, got batch {}", dims[0]);
            }
            dims[0] = n;
            t.broadcast_as(dims)?.contiguous()
        };
        let layers = self
            .layers
            .iter()
            .map(|l| match l {
                Some((k, v)) => Ok(Some((expand(k)?, expand(v)?))),
                None => Ok(None),
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { layers, pos: self.pos })
    }

    /// Appends this chunk's keys and values for `layer` and returns the whole history.
    pub(crate) fn append(&mut self, layer: usize, k: Tensor, v: Tensor) -> Result<(Tensor, Tensor)> {
        let Some(slot) = self.layers.get_mut(layer) else {
            candle_core::bail!("kv cache has no layer {layer}");
        };
        let (k, v) = match slot.take() {
            Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
            None => (k, v),
        };
        *slot = Some((k.clone(), v.clone()));
        Ok((k, v))
    }

    /// Moves the position forward once every layer has appended a chunk of `t` tokens.
    pub(crate) fn advance(&mut self, t: usize) {
        self.pos += t;
    }
}
