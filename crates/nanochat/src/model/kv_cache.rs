//! The key/value cache for incremental decoding: per layer, the keys and values of every position
//! seen so far (after RoPE and QK-norm, as the original caches them), plus the position at which
//! the next chunk of tokens starts.
//!
//! Each layer's keys and values live in buffers allocated once, (B, n_kv_head, capacity, head_dim),
//! and every chunk is written into place, so a decode step copies only its own token instead of the
//! whole history. A cache made with [`KvCache::with_capacity`] (the engine sizes it to prompt + max
//! tokens) refuses a chunk that would go past it with an error, never a silent overflow; one made
//! with [`KvCache::new`] has no bound of its own and grows its buffers by doubling.

use candle_core::{Result, Tensor};

/// Cached keys and values for every layer.
#[derive(Debug)]
pub struct KvCache {
    /// Per layer, the key and value buffers; only the first `pos` positions along dim 2 are valid.
    layers: Vec<Option<(Tensor, Tensor)>>,
    pos: usize,
    capacity: usize,
}

/// Smallest buffer a growing cache allocates, in positions.
const MIN_GROWTH: usize = 64;

impl KvCache {
    /// An empty cache for a model with `n_layer` blocks, bounded only by the model's rotary tables.
    pub fn new(n_layer: usize) -> Self {
        Self::with_capacity(n_layer, usize::MAX)
    }

    /// An empty cache that holds at most `capacity` positions, allocated on the first chunk.
    pub fn with_capacity(n_layer: usize, capacity: usize) -> Self {
        Self { layers: vec![None; n_layer], pos: 0, capacity }
    }

    /// Number of positions already in the cache: the position of the next token.
    pub fn pos(&self) -> usize {
        self.pos
    }

    /// The most positions this cache accepts.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Empties the cache so it can be reused for a new sequence.
    pub fn reset(&mut self) {
        self.layers.iter_mut().for_each(|l| *l = None);
        self.pos = 0;
    }

    /// Copies a batch-1 cache into a batch-`n` one: the engine prefills a prompt once and then
    /// decodes `n` samples from it. The copy has this cache's capacity and owns its buffers.
    pub fn expand_batch(&self, n: usize) -> Result<Self> {
        let expand = |t: &Tensor| -> Result<Tensor> {
            let mut dims = t.dims().to_vec();
            if dims[0] != 1 {
                candle_core::bail!("expand_batch needs a batch-1 cache, got batch {}", dims[0]);
            }
            dims[0] = n;
            // a real copy even for n = 1: the buffers are written in place, so they must not be shared
            let expanded = t.broadcast_as(dims)?;
            if expanded.is_contiguous() {
                expanded.copy()
            } else {
                expanded.contiguous()
            }
        };
        let layers = self
            .layers
            .iter()
            .map(|l| match l {
                Some((k, v)) => Ok(Some((expand(k)?, expand(v)?))),
                None => Ok(None),
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { layers, pos: self.pos, capacity: self.capacity })
    }

    /// Writes this chunk's keys and values (B, n_kv_head, T, head_dim) for `layer` after the
    /// cached positions and returns the whole history (views into the buffers). Layer 0 appends
    /// first, so a chunk that does not fit is refused before any layer has changed.
    pub(crate) fn append(&mut self, layer: usize, k: Tensor, v: Tensor) -> Result<(Tensor, Tensor)> {
        let (pos, capacity) = (self.pos, self.capacity);
        let t = k.dim(2)?;
        let needed = pos + t;
        if needed > capacity {
            candle_core::bail!(
                "kv cache full: {pos} cached + {t} new positions exceed its capacity of {capacity}; \
                 ask for fewer tokens or size the cache for prompt + max tokens"
            );
        }
        let Some(slot) = self.layers.get_mut(layer) else {
            candle_core::bail!("kv cache has no layer {layer}");
        };
        let allocated = slot.as_ref().map_or(Ok(0), |(kb, _)| kb.dim(2))?;
        if needed > allocated {
            // bounded: the whole capacity at once; unbounded: double, so growth costs O(1) per token
            let len = if capacity == usize::MAX { needed.max(2 * allocated).max(MIN_GROWTH) } else { capacity };
            *slot = Some(match slot.take() {
                Some((kb, vb)) => (grow(&kb, len, pos)?, grow(&vb, len, pos)?),
                None => (grow(&k, len, 0)?, grow(&v, len, 0)?),
            });
        }
        let Some((kb, vb)) = slot.as_ref() else {
            candle_core::bail!("kv cache layer {layer} was not allocated");
        };
        kb.slice_set(&k.contiguous()?, 2, pos)?;
        vb.slice_set(&v.contiguous()?, 2, pos)?;
        Ok((kb.narrow(2, 0, needed)?, vb.narrow(2, 0, needed)?))
    }

    /// Moves the position forward once every layer has appended a chunk of `t` tokens.
    pub(crate) fn advance(&mut self, t: usize) {
        self.pos += t;
    }
}

/// A zeroed buffer shaped like `like` but `len` long along dim 2, holding the first `keep`
/// positions of `like`.
fn grow(like: &Tensor, len: usize, keep: usize) -> Result<Tensor> {
    let mut dims = like.dims().to_vec();
    dims[2] = len;
    let buf = Tensor::zeros(dims, like.dtype(), like.device())?;
    if keep > 0 {
        buf.slice_set(&like.narrow(2, 0, keep)?.contiguous()?, 2, 0)?;
    }
    Ok(buf)
}
