//! The inference engine shared by the chat CLI, the web server, the chat evals and RL: prefill a
//! prompt once into a KV cache, copy the cache into one row per sample, then decode all rows
//! together, one token per step, running the calculator tool inside each row.
//!
//! Semantics follow the original's `Engine`:
//! - sampling ([`sampling`]): temperature 0 is argmax (first index on ties); otherwise
//!   softmax(logits / T), restricted to the `top_k` largest logits when asked, drawn from a
//!   [`StdRng`](rand::rngs::StdRng) seeded per request, so the same request gives the same tokens.
//!   Beyond the original, the knobs of OpenAI-style APIs: top-p (nucleus), frequency and presence
//!   penalties, and the log-probabilities of the generated tokens;
//! - a row is complete once it emits `<|assistant_end|>` or `<|bos|>`; generation stops when every
//!   row is complete or after `max_tokens` steps;
//! - tool use ([`RowState`]): tokens between `<|python_start|>` and `<|python_end|>` are decoded and
//!   given to [`calculate`]; an answer is forced into the row as `<|output_start|>` answer
//!   `<|output_end|>` over the next steps (mask 0, while sampled tokens have mask 1) and fed to the
//!   model like sampled tokens.
//!
//! Two backends run the model ([`Backend`]): on the CPU the native path of `model::decode` (plain
//! buffers, no per-token allocation, several times faster), elsewhere the candle GPT with its
//! [`KvCache`]. Both compute the same logits (within float rounding), so the choice does not change
//! what is generated beyond ties. The native backend can also keep its matrices in bf16 or int8
//! ([`WeightFormat`], [`Engine::with_weights`]): faster decoding, slightly different logits.
//!
//! One deliberate difference: the original samples the first token once from the batch-1 prefill and
//! copies it to every row; here each row samples its own first token from the same logits, so N
//! samples at temperature > 0 differ from their first token on (at temperature 0 nothing changes).
//! Each row draws from a generator of its own ([`GenerateOptions::row_seed`]; row 0 uses the
//! request's seed itself), so a row's tokens do not depend on how many rows decode beside it, and
//! the server's batched workers, which decode each request's rows among other requests', give the
//! same tokens.

pub mod sampling;

use std::collections::VecDeque;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, IndexOp, Tensor};

use crate::calculator::calculate;
use crate::model::decode::{DecodeCache, DecodeModel, WeightFormat};
use crate::model::{KvCache, GPT};
pub use sampling::{logprobs, sample, Penalties, Sampler, TokenLogprob};

/// Complete sequences, one per sample, and their masks: what [`Engine::generate_batch`] returns.
pub type Sequences = (Vec<Vec<u32>>, Vec<Vec<u8>>);

/// What to generate for one request.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateOptions {
    /// Rows decoded together from one prefill.
    pub num_samples: usize,
    /// Steps at most; the KV cache is sized to the prompt plus this.
    pub max_tokens: usize,
    /// 0 = greedy; otherwise the softmax temperature.
    pub temperature: f64,
    /// Sample only among the `k` largest logits; `None` or `Some(0)` = no limit.
    pub top_k: Option<usize>,
    /// Then only among the most likely tokens whose probabilities reach `top_p`; 1 = no limit.
    pub top_p: f64,
    /// Frequency and presence penalties of each row's own tokens; zero = off.
    pub penalties: Penalties,
    /// Seeds the request's random number generators ([`GenerateOptions::row_seed`]).
    pub seed: u64,
    /// Report each generated token's log-probability with this many alternatives
    /// ([`Generation::logprobs`]); `None` = none (computing them costs a pass over the vocabulary).
    pub logprobs: Option<usize>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            num_samples: 1,
            max_tokens: 256,
            temperature: 1.0,
            top_k: None,
            top_p: 1.0,
            penalties: Penalties::default(),
            seed: 42,
            logprobs: None,
        }
    }
}

impl GenerateOptions {
    /// The seed of row `row`'s generator: the request's seed for row 0, spread apart for the
    /// others (consecutive seeds would already give unrelated streams; the odd constant keeps
    /// row 1 of seed s from being row 0 of seed s + 1).
    pub fn row_seed(&self, row: usize) -> u64 {
        self.seed.wrapping_add((row as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15))
    }

    /// The sampler of row `row`.
    pub fn sampler(&self, row: usize) -> Sampler {
        Sampler::new(self.temperature, self.top_k, self.top_p, self.penalties, self.row_seed(row))
    }

    /// Whether the settings are usable, with the reason when not.
    pub fn check(&self) -> Result<()> {
        ensure!(self.num_samples > 0, "num_samples must be at least 1");
        ensure!(
            self.temperature.is_finite() && self.temperature >= 0.0,
            "temperature must be a finite number >= 0, got {}",
            self.temperature
        );
        ensure!(self.top_p > 0.0 && self.top_p <= 1.0, "top_p must be in (0, 1], got {}", self.top_p);
        ensure!(
            self.penalties.frequency.is_finite() && self.penalties.presence.is_finite(),
            "penalties must be finite numbers"
        );
        Ok(())
    }
}

/// The sampling flags `chat` and `serve` share, with one set of defaults (for `serve`, what a
/// request that names none gets).
#[derive(clap::Args, Debug, Clone, PartialEq)]
pub struct SamplingArgs {
    /// Sampling temperature; 0 = always the most likely token.
    #[arg(short = 't', long, default_value_t = 0.6)]
    pub temperature: f64,
    /// Sample among the k most likely tokens only; 0 = all.
    #[arg(short = 'k', long, default_value_t = 50)]
    pub top_k: usize,
    /// Longest reply, in tokens.
    #[arg(short = 'm', long, default_value_t = 512)]
    pub max_tokens: usize,
}

/// The ids of the special tokens the engine reacts to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Specials {
    pub bos: u32,
    pub assistant_end: u32,
    pub python_start: u32,
    pub python_end: u32,
    pub output_start: u32,
    pub output_end: u32,
}

impl Specials {
    pub fn from_tokenizer(tokenizer: &bpe::Tokenizer) -> Result<Self> {
        let id = |name: &str| {
            tokenizer.special_id(name).with_context(|| format!("the tokenizer has no special token {name}"))
        };
        Ok(Self {
            bos: tokenizer.bos_id(),
            assistant_end: id("<|assistant_end|>")?,
            python_start: id("<|python_start|>")?,
            python_end: id("<|python_end|>")?,
            output_start: id("<|output_start|>")?,
            output_end: id("<|output_end|>")?,
        })
    }

    /// Whether `id` ends a row.
    pub fn is_stop(&self, id: u32) -> bool {
        id == self.assistant_end || id == self.bos
    }
}

/// One row's decoding state: the tool-use state machine and whether the row is complete. Kept
/// apart from the model so it can be driven by any token source (tests use a scripted one).
#[derive(Debug, Clone, Default)]
pub struct RowState {
    forced: VecDeque<u32>,
    in_python: bool,
    expr: Vec<u32>,
    completed: bool,
}

impl RowState {
    pub fn new() -> Self {
        Self::default()
    }

    /// Once true, the row has emitted `<|assistant_end|>` or `<|bos|>`.
    pub fn is_completed(&self) -> bool {
        self.completed
    }

    /// Chooses the row's next token, a pending forced token (mask 0) or else `sampled` (mask 1),
    /// and advances the state with it.
    pub fn step(&mut self, sampled: u32, specials: &Specials, tokenizer: &bpe::Tokenizer) -> (u32, u8) {
        let (token, mask) = match self.forced.pop_front() {
            Some(forced) => (forced, 0),
            None => (sampled, 1),
        };
        if specials.is_stop(token) {
            self.completed = true;
        }
        if token == specials.python_start {
            self.in_python = true;
            self.expr.clear();
        } else if token == specials.python_end && self.in_python {
            self.in_python = false;
            if !self.expr.is_empty() {
                if let Some(answer) = calculate(&tokenizer.decode(&self.expr)) {
                    self.forced.push_back(specials.output_start);
                    self.forced.extend(tokenizer.encode(&answer));
                    self.forced.push_back(specials.output_end);
                }
            }
            self.expr.clear();
        } else if self.in_python {
            self.expr.push(token);
        }
        (token, mask)
    }
}

/// Which implementation of the forward pass generates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// `model::decode`: the weights copied into host memory, pure-Rust kernels. The default on the CPU.
    Native,
    /// The candle GPT on its own device. The default elsewhere.
    Candle,
}

/// A model with its tokenizer, ready to generate.
pub struct Engine {
    model: GPT,
    /// The native copy of the model when the backend is [`Backend::Native`].
    native: Option<DecodeModel>,
    tokenizer: bpe::Tokenizer,
    specials: Specials,
    device: Device,
}

impl Engine {
    /// An engine with the backend suited to the model's device: native on the CPU, candle elsewhere.
    /// The native backend copies the weights now: later changes to the model's parameters (an
    /// optimizer step) are not seen until a new engine is built, as RL does every step.
    pub fn new(model: GPT, tokenizer: bpe::Tokenizer) -> Result<Self> {
        Self::with_weights(model, tokenizer, WeightFormat::F32)
    }

    /// [`Engine::new`] with the native backend's matrices stored in `weights`. Only the native
    /// backend has reduced-precision weights, so bf16 or int8 choose it even for a model on a GPU
    /// (which then decodes on the CPU from a host copy).
    pub fn with_weights(model: GPT, tokenizer: bpe::Tokenizer, weights: WeightFormat) -> Result<Self> {
        let on_cpu = model.rotary().0.device().is_cpu();
        let backend = if on_cpu || weights != WeightFormat::F32 { Backend::Native } else { Backend::Candle };
        Self::with_backend_and_weights(model, tokenizer, backend, weights)
    }

    /// An engine on the given backend (benchmarks compare the two; the native one also runs a
    /// model that lives on a GPU, from a host copy of its weights).
    pub fn with_backend(model: GPT, tokenizer: bpe::Tokenizer, backend: Backend) -> Result<Self> {
        Self::with_backend_and_weights(model, tokenizer, backend, WeightFormat::F32)
    }

    /// [`Engine::with_backend`] with the native backend's matrices in `weights`; the candle
    /// backend only runs f32 (its model's own weights), so it refuses any other format.
    pub fn with_backend_and_weights(
        model: GPT,
        tokenizer: bpe::Tokenizer,
        backend: Backend,
        weights: WeightFormat,
    ) -> Result<Self> {
        ensure!(
            backend == Backend::Native || weights == WeightFormat::F32,
            "{weights} weights need the native backend; the candle backend runs the model's f32 weights"
        );
        ensure!(
            tokenizer.vocab_size() <= model.config().vocab_size,
            "the tokenizer has {} ids but the model only {}: they do not belong together",
            tokenizer.vocab_size(),
            model.config().vocab_size
        );
        let specials = Specials::from_tokenizer(&tokenizer)?;
        let device = model.rotary().0.device().clone();
        let native = match backend {
            Backend::Native => Some(DecodeModel::from_gpt_with(&model, weights)?),
            Backend::Candle => None,
        };
        Ok(Self { model, native, tokenizer, specials, device })
    }

    pub fn model(&self) -> &GPT {
        &self.model
    }

    /// The native model, when the backend is [`Backend::Native`]: the server decodes the replies
    /// of several requests through it together.
    pub fn native(&self) -> Option<&DecodeModel> {
        self.native.as_ref()
    }

    pub fn backend(&self) -> Backend {
        if self.native.is_some() {
            Backend::Native
        } else {
            Backend::Candle
        }
    }

    /// The format of the weights that generate: the native model's, or f32 for the candle backend.
    pub fn weights(&self) -> WeightFormat {
        self.native.as_ref().map_or(WeightFormat::F32, DecodeModel::format)
    }

    pub fn tokenizer(&self) -> &bpe::Tokenizer {
        &self.tokenizer
    }

    pub fn specials(&self) -> &Specials {
        &self.specials
    }

    /// Longest prompt + generation the model's rotary tables cover.
    pub fn max_positions(&self) -> Result<usize> {
        Ok(self.model.rotary().0.dim(0)?)
    }

    /// Starts generating from `prompt`: prefills it (batch 1), then yields one step at a time the
    /// token column (one token per sample) and its mask (1 sampled, 0 forced by the tool). Rows
    /// that completed keep being decoded until every row has (their later tokens are junk the
    /// caller ignores, as [`Engine::generate_batch`] does).
    pub fn generate(&self, prompt: &[u32], opts: &GenerateOptions) -> Result<Generation<'_>> {
        ensure!(!prompt.is_empty(), "cannot generate from an empty prompt: start it with <|bos|>");
        opts.check()?;
        let vocab = self.model.config().vocab_size;
        if let Some(&bad) = prompt.iter().find(|&&t| t as usize >= vocab) {
            bail!("prompt token {bad} is outside the model's vocabulary of {vocab}");
        }
        // The last sampled token is never fed back, so prompt + max_tokens positions always suffice.
        let capacity = prompt.len() + opts.max_tokens;
        let limit = self.max_positions()?;
        ensure!(
            capacity <= limit,
            "prompt of {} tokens + max_tokens {} exceeds the model's {limit} positions: \
             shorten the conversation or ask for fewer tokens",
            prompt.len(),
            opts.max_tokens
        );
        let (cache, logits) = match &self.native {
            Some(native) => {
                // prefill slot 0, then every other sample starts from a copy of it
                let mut cache = native.new_cache(opts.num_samples, capacity)?;
                let logits = native.prefill(&mut cache, 0, prompt)?.to_vec();
                for slot in 1..opts.num_samples {
                    cache.copy_slot(0, slot)?;
                }
                (Cache::Native(Box::new(cache)), logits)
            }
            None => {
                let mut cache = KvCache::with_capacity(self.model.config().n_layer, capacity);
                let ids = Tensor::new(prompt, &self.device)?.unsqueeze(0)?;
                let logits =
                    self.model.forward_cached_last(&ids, &mut cache)?.i((0, 0))?.to_dtype(DType::F32)?.to_vec1()?;
                // one sample decodes in the prefill cache itself; more get a copy each
                let cache = if opts.num_samples == 1 { cache } else { cache.expand_batch(opts.num_samples)? };
                (Cache::Candle(cache), logits)
            }
        };
        Ok(Generation {
            engine: self,
            opts: opts.clone(),
            samplers: (0..opts.num_samples).map(|row| opts.sampler(row)).collect(),
            cache,
            rows: vec![RowState::new(); opts.num_samples],
            prefill_logits: Some(logits),
            last_column: Vec::new(),
            logprobs: Vec::new(),
            generated: 0,
            finished: false,
        })
    }

    /// Generates `opts.num_samples` complete sequences. Each row is the prompt followed by its
    /// completion, without the `<|assistant_end|>` / `<|bos|>` that ended it (as the original's
    /// `generate_batch`); masks are 0 over the prompt and forced tokens, 1 over sampled ones.
    pub fn generate_batch(&self, prompt: &[u32], opts: &GenerateOptions) -> Result<Sequences> {
        let mut results = vec![prompt.to_vec(); opts.num_samples];
        let mut masks = vec![vec![0u8; prompt.len()]; opts.num_samples];
        let mut completed = vec![false; opts.num_samples];
        for step in self.generate(prompt, opts)? {
            let (column, column_masks) = step?;
            for (i, (&token, &mask)) in column.iter().zip(&column_masks).enumerate() {
                if completed[i] {
                    continue;
                }
                if self.specials.is_stop(token) {
                    completed[i] = true;
                } else {
                    results[i].push(token);
                    masks[i].push(mask);
                }
            }
            if completed.iter().all(|&c| c) {
                break;
            }
        }
        Ok((results, masks))
    }
}

/// The key/value state of a generation, one kind per backend.
enum Cache {
    /// Boxed: it holds the scratch buffers inline, several times the candle cache's size.
    Native(Box<DecodeCache>),
    Candle(KvCache),
}

/// A running generation: an iterator of steps, `(token column, mask column)`. After an error it
/// ends.
pub struct Generation<'a> {
    engine: &'a Engine,
    opts: GenerateOptions,
    /// One per row.
    samplers: Vec<Sampler>,
    cache: Cache,
    rows: Vec<RowState>,
    /// The batch-1 logits after the prompt, used by the first step.
    prefill_logits: Option<Vec<f32>>,
    last_column: Vec<u32>,
    /// The last step's log-probabilities, one per row, when asked for.
    logprobs: Vec<TokenLogprob>,
    generated: usize,
    finished: bool,
}

impl Generation<'_> {
    /// The log-probabilities of the last step's tokens, one per row, when
    /// [`GenerateOptions::logprobs`] asks for them (empty otherwise).
    pub fn logprobs(&self) -> &[TokenLogprob] {
        &self.logprobs
    }

    fn step(&mut self) -> Result<(Vec<u32>, Vec<u8>)> {
        let n = self.opts.num_samples;
        let vocab = self.engine.model.config().vocab_size;
        let owned: Vec<f32>;
        // every row's logits; a stride of 0 shares one row of logits between all rows
        let (logits, stride): (&[f32], usize) = match self.prefill_logits.take() {
            // every row draws its own first token from the shared prefill logits
            Some(logits) => {
                owned = logits;
                (&owned, 0)
            }
            None => match (&mut self.cache, &self.engine.native) {
                (Cache::Native(cache), Some(native)) => {
                    let rows: Vec<(usize, u32)> = self.last_column.iter().copied().enumerate().collect();
                    (native.step(cache, &rows)?, vocab)
                }
                (Cache::Candle(cache), _) => {
                    let ids = Tensor::from_vec(self.last_column.clone(), (n, 1), &self.engine.device)?;
                    let logits = self.engine.model.forward_cached(&ids, cache)?;
                    owned = logits.i((.., 0, ..))?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                    (&owned, vocab)
                }
                (Cache::Native(_), None) => bail!("a native cache without the native model"),
            },
        };
        ensure!(logits.len() >= (n - 1) * stride + vocab, "{} logits for {n} rows of {vocab}", logits.len());
        let (specials, tokenizer) = (&self.engine.specials, &self.engine.tokenizer);
        let (mut column, mut masks) = (Vec::with_capacity(n), Vec::with_capacity(n));
        self.logprobs.clear();
        for (i, (row, sampler)) in self.rows.iter_mut().zip(&mut self.samplers).enumerate() {
            let row_logits = &logits[i * stride..i * stride + vocab];
            let (token, mask) = row.step(sampler.sample(row_logits), specials, tokenizer);
            sampler.observe(token);
            if let Some(top) = self.opts.logprobs {
                self.logprobs.push(logprobs(row_logits, token, top));
            }
            column.push(token);
            masks.push(mask);
        }
        self.last_column.clone_from(&column);
        self.generated += 1;
        Ok((column, masks))
    }
}

impl Iterator for Generation<'_> {
    type Item = Result<(Vec<u32>, Vec<u8>)>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.finished || self.generated >= self.opts.max_tokens || self.rows.iter().all(RowState::is_completed) {
            return None;
        }
        let step = self.step();
        if step.is_err() {
            self.finished = true;
        }
        Some(step)
    }
}

/// Turns a stream of generated ids into printable text: special tokens print nothing, and bytes
/// of a character split across tokens are held back until it is complete, so a streaming
/// display never shows half a character or a raw `<|...|>` string.
#[derive(Debug, Default)]
pub struct TextStream {
    pending: Vec<u8>,
}

impl TextStream {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one id; returns the text that became complete (possibly empty).
    pub fn push(&mut self, tokenizer: &bpe::Tokenizer, id: u32) -> String {
        if (id as usize) < tokenizer.n_mergeable() {
            self.pending.extend(tokenizer.decode_bytes(&[id]));
        }
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(text) => {
                    out.push_str(text);
                    self.pending.clear();
                    return out;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    // valid_up_to marks a UTF-8 boundary, so this slice is valid text
                    out.push_str(&String::from_utf8_lossy(&self.pending[..valid]));
                    match e.error_len() {
                        // an incomplete character at the end: wait for the next token
                        None => {
                            self.pending.drain(..valid);
                            return out;
                        }
                        // bytes that can never become valid: one U+FFFD, as a lossy decode
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            self.pending.drain(..valid + bad);
                        }
                    }
                }
            }
        }
    }

    /// What is left at the end of the stream: an unfinished character becomes U+FFFD.
    pub fn finish(&mut self) -> String {
        let out = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        out
    }
}
