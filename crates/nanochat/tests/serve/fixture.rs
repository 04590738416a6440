//! Self-contained models for the API tests (no files read): a tokenizer trained here on generated
//! text, a model with random weights everywhere (varied, prompt-dependent replies: what prompt
//! caching must reproduce), and a "scripted" model that writes a chosen reply, calculator call
//! included.
//!
//! The scripted model is a bigram table built into the weights: every block is zero, so the
//! residual stream at a position is the normalised embedding of its token; each token of the
//! script gets its own basis vector as embedding, and `lm_head` maps that vector to the next
//! token of the script (logit ~15 after the softcap, every other logit 0), so greedy decoding,
//! and almost surely sampling, follows the script from `<|assistant_start|>` on.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use nanochat::engine::{Backend, Engine};
use nanochat::model::{GPTConfig, Param, GPT};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const WORDS: [&str; 40] = [
    "the", "a", "model", "reads", "writes", "tokens", "and", "then", "it", "stops", "when", "asked", "small", "chat",
    "server", "answers", "every", "question", "with", "care", "numbers", "like", "12", "34", "46", "add", "sum", "is",
    "hello", "there", "what", "why", "sky", "blue", "story", "one", "two", "three", "done", "cache",
];

/// A tokenizer with 512 ids (256 bytes, 247 merges, the 9 specials) trained on sentences of
/// [`WORDS`] with punctuation.
pub fn tokenizer() -> bpe::Tokenizer {
    let mut rng = StdRng::seed_from_u64(1);
    let docs: Vec<String> = (0..400)
        .map(|_| {
            let mut doc = String::new();
            for _ in 0..rng.random_range(5..15) {
                let word = WORDS[rng.random_range(0..WORDS.len())];
                if doc.is_empty() {
                    let mut chars = word.chars();
                    doc.extend(chars.next().map(|c| c.to_ascii_uppercase()));
                    doc.push_str(chars.as_str());
                } else {
                    doc.push(' ');
                    doc.push_str(word);
                }
            }
            doc.push_str([".", "!", "?", ", and more."][rng.random_range(0..4)]);
            doc
        })
        .collect();
    bpe::Tokenizer::train(&docs, 512, bpe::DEFAULT_PATTERN).expect("training the fixture tokenizer")
}

fn config(tok: &bpe::Tokenizer, n_layer: usize, n_head: usize, n_embd: usize) -> GPTConfig {
    GPTConfig {
        sequence_len: 64,
        vocab_size: tok.vocab_size(),
        n_layer,
        n_head,
        n_kv_head: 1,
        n_embd,
        rotary: Default::default(),
    }
}

fn engine(config: &GPTConfig, weights: HashMap<String, Tensor>, tok: bpe::Tokenizer, backend: Backend) -> Engine {
    let vb = VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu);
    Engine::with_backend(GPT::new(config, vb).expect("the fixture model"), tok, backend).expect("the fixture engine")
}

/// Two layers, width 64, two query heads sharing one kv head, 640 positions; every weight
/// uniform in ±0.35, seeded, except that the special tokens' logits are 0, far below the
/// largest: replies are ordinary text that runs to its token budget.
pub fn random_engine(seed: u64) -> Engine {
    random_engine_on(seed, Backend::Native)
}

/// [`random_engine`] on the given backend (the candle one is what a GPU worker runs).
pub fn random_engine_on(seed: u64, backend: Backend) -> Engine {
    let tok = tokenizer();
    let config = config(&tok, 2, 2, 64);
    let mut rng = StdRng::seed_from_u64(seed);
    let weights = config
        .params()
        .into_iter()
        .map(|spec| {
            let mut values: Vec<f32> = (0..spec.numel()).map(|_| (rng.random::<f32>() - 0.5) * 0.7).collect();
            if spec.param == Param::LmHead {
                values[tok.n_mergeable() * config.n_embd..].fill(0.0);
            }
            (spec.name, Tensor::from_vec(values, spec.shape, &Device::Cpu).expect("a weight"))
        })
        .collect();
    engine(&config, weights, tok, backend)
}

/// What the scripted model writes after `<|assistant_start|>`: pieces of text and special tokens.
pub enum Say<'a> {
    Text(&'a str),
    Special(&'a str),
}

/// A model that answers any prompt with `script`, then `<|assistant_end|>`. Tokens the engine
/// forces (the calculator's output after `<|python_end|>`) are left out of the script: the model's
/// guesses there are never used. Panics if a token would need two different successors.
pub fn scripted_engine(script: &[Say]) -> Engine {
    let tok = tokenizer();
    let special = |name: &str| tok.special_id(name).unwrap_or_else(|| panic!("no {name}"));
    let mut chain = vec![special("<|assistant_start|>")];
    for say in script {
        match say {
            Say::Text(text) => chain.extend(tok.encode(text)),
            Say::Special(name) => chain.push(special(name)),
        }
    }
    chain.push(special("<|assistant_end|>"));
    let python_end = special("<|python_end|>");
    let output_end = special("<|output_end|>");
    let n_embd = 128;
    let config = config(&tok, 1, 1, n_embd);
    let vocab = config.vocab_size;
    // each token of the chain gets a basis vector; the next token's lm_head row points at it
    let mut basis: HashMap<u32, usize> = HashMap::new();
    let mut next: HashMap<u32, u32> = HashMap::new();
    for pair in chain.windows(2) {
        let (from, to) = (pair[0], pair[1]);
        // after <|python_end|> the calculator's output is forced: the script goes on after
        // <|output_end|>
        let from = if from == python_end { output_end } else { from };
        if let Some(&old) = next.get(&from) {
            assert_eq!(old, to, "token {from} is followed by both {old} and {to}: choose another script");
        }
        next.insert(from, to);
        let len = basis.len();
        basis.entry(from).or_insert(len);
    }
    assert!(basis.len() <= n_embd, "a script of more than {n_embd} distinct tokens");
    let mut weights: HashMap<String, Tensor> = HashMap::new();
    for spec in config.params() {
        let mut values = vec![0.0f32; spec.numel()];
        match spec.param {
            Param::Wte => {
                for (&token, &b) in &basis {
                    values[token as usize * n_embd + b] = 1.0;
                }
            }
            Param::LmHead => {
                assert_eq!(spec.shape, [vocab, n_embd]);
                for (from, to) in &next {
                    values[*to as usize * n_embd + basis[from]] = 10.0;
                }
            }
            Param::Block(..) => {}
        }
        weights.insert(spec.name, Tensor::from_vec(values, spec.shape, &Device::Cpu).expect("a weight"));
    }
    engine(&config, weights, tok, Backend::Native)
}
