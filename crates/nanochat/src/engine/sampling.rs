//! Choosing the next token from a row of logits, with the knobs OpenAI-style APIs expose, and the
//! log-probabilities those APIs report.
//!
//! Design choices:
//! - the order of llama.cpp's and vLLM's samplers: repetition penalties on the logits, then
//!   temperature (0 = argmax, first index on ties), top-k, top-p (nucleus), and one draw from
//!   what is left, renormalised;
//! - penalties as OpenAI defines them: `logit[t] -= frequency · count[t] + presence · (count[t] > 0)`,
//!   counting the tokens this row generated (prompt tokens do not count);
//! - top-p keeps the smallest set of most likely tokens whose probability reaches `top_p` (the
//!   token that crosses it included). Sorting a whole 32k vocabulary per token would cost as much
//!   as a decode step, so the most likely 64 are sorted first and the set widens only while they
//!   fall short: a trained model's nucleus is usually a handful of tokens;
//! - with `top_p = 1` and no penalties a draw is exactly the one [`sample`] makes (same candidates,
//!   same order, one `f64` from the generator), so adding the knobs changed no seeded output;
//! - log-probabilities are the model's own (log-softmax of the raw logits, temperature 1, before
//!   penalties and truncation), as OpenAI reports them, whatever the sampling settings.

use std::cmp::Ordering;
use std::collections::HashMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// How many of the most likely candidates the nucleus search sorts first.
const NUCLEUS_FIRST: usize = 64;

/// Larger logit first, then smaller index: a total order, so ties pick the first index (NaN,
/// as in torch's argmax, counts as the largest).
fn before(logits: &[f32]) -> impl Fn(&usize, &usize) -> Ordering + '_ {
    |a, b| logits[*b].total_cmp(&logits[*a]).then(a.cmp(b))
}

fn argmax(logits: &[f32]) -> u32 {
    (0..logits.len()).min_by(before(logits)).unwrap_or(0) as u32
}

/// Draws the next token from one row of logits: argmax at temperature 0 (first index on ties),
/// else softmax(logits / temperature) over all logits or the `top_k` largest.
pub fn sample(logits: &[f32], temperature: f64, top_k: Option<usize>, rng: &mut impl Rng) -> u32 {
    sample_nucleus(logits, temperature, top_k, 1.0, rng)
}

/// [`sample`] restricted further to the nucleus of probability `top_p` (1 = no restriction).
pub fn sample_nucleus(logits: &[f32], temperature: f64, top_k: Option<usize>, top_p: f64, rng: &mut impl Rng) -> u32 {
    if temperature == 0.0 {
        return argmax(logits);
    }
    let mut candidates: Vec<usize> = (0..logits.len()).collect();
    if let Some(k) = top_k.filter(|&k| k > 0 && k < logits.len()) {
        candidates.select_nth_unstable_by(k - 1, before(logits));
        candidates.truncate(k);
        candidates.sort_unstable();
    }
    let max = candidates.iter().map(|&i| logits[i]).fold(f32::NEG_INFINITY, f32::max) as f64;
    let weights: Vec<f64> = candidates.iter().map(|&i| ((logits[i] as f64 - max) / temperature).exp()).collect();
    let total: f64 = weights.iter().sum();
    if !(total.is_finite() && total > 0.0) {
        // NaN logits leave nothing to sample from: fall back to the most likely token
        return argmax(logits);
    }
    let (candidates, weights, total) =
        if top_p < 1.0 { nucleus(candidates, weights, total * top_p) } else { (candidates, weights, total) };
    let mut u = rng.random::<f64>() * total;
    for (&i, &w) in candidates.iter().zip(&weights) {
        if u < w {
            return i as u32;
        }
        u -= w;
    }
    // rounding can leave u just above the last weight: that draw belongs to the last candidate
    candidates.last().copied().unwrap_or(0) as u32
}

/// The most likely candidates, most likely first, whose weights first reach `target`, with their
/// weights and sum.
fn nucleus(candidates: Vec<usize>, weights: Vec<f64>, target: f64) -> (Vec<usize>, Vec<f64>, f64) {
    let mut pairs: Vec<(f64, usize)> = weights.into_iter().zip(candidates).collect();
    let heavier = |a: &(f64, usize), b: &(f64, usize)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
    let mut sorted = NUCLEUS_FIRST.min(pairs.len());
    loop {
        if sorted < pairs.len() {
            pairs.select_nth_unstable_by(sorted - 1, heavier);
        }
        pairs[..sorted].sort_unstable_by(heavier);
        let mut sum = 0.0;
        for (n, &(w, _)) in pairs[..sorted].iter().enumerate() {
            sum += w;
            if sum >= target {
                let kept = &pairs[..=n];
                return (kept.iter().map(|p| p.1).collect(), kept.iter().map(|p| p.0).collect(), sum);
            }
        }
        if sorted == pairs.len() {
            // rounding kept the sum of everything just below the target: everything is the nucleus
            return (pairs.iter().map(|p| p.1).collect(), pairs.iter().map(|p| p.0).collect(), sum);
        }
        sorted = (sorted * 4).min(pairs.len());
    }
}

/// OpenAI's repetition penalties (each -2 to 2 in its API; 0 = off).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Penalties {
    /// Subtracted from a token's logit once per time the row generated it.
    pub frequency: f32,
    /// Subtracted from a token's logit once the row generated it at all.
    pub presence: f32,
}

impl Penalties {
    pub fn is_off(&self) -> bool {
        self.frequency == 0.0 && self.presence == 0.0
    }
}

/// The sampling state of one row: its settings, its random generator and the counts its
/// penalties need.
#[derive(Debug, Clone)]
pub struct Sampler {
    temperature: f64,
    top_k: Option<usize>,
    top_p: f64,
    penalties: Penalties,
    rng: StdRng,
    counts: HashMap<u32, u32>,
    /// The penalised logits, reused between tokens.
    penalised: Vec<f32>,
}

impl Sampler {
    /// A row sampling with these settings from a generator seeded with `seed`.
    pub fn new(temperature: f64, top_k: Option<usize>, top_p: f64, penalties: Penalties, seed: u64) -> Self {
        Self {
            temperature,
            top_k,
            top_p,
            penalties,
            rng: StdRng::seed_from_u64(seed),
            counts: HashMap::new(),
            penalised: Vec::new(),
        }
    }

    /// Chooses the next token from `logits`.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let logits = if self.penalties.is_off() || self.counts.is_empty() {
            logits
        } else {
            self.penalised.clear();
            self.penalised.extend_from_slice(logits);
            for (&token, &count) in &self.counts {
                if let Some(l) = self.penalised.get_mut(token as usize) {
                    *l -= self.penalties.frequency * count as f32 + self.penalties.presence;
                }
            }
            &self.penalised
        };
        sample_nucleus(logits, self.temperature, self.top_k, self.top_p, &mut self.rng)
    }

    /// Records a token the row generated (sampled or forced), for the penalties.
    pub fn observe(&mut self, token: u32) {
        if !self.penalties.is_off() {
            *self.counts.entry(token).or_default() += 1;
        }
    }
}

/// The log-probability of one generated token and of the most likely alternatives at its
/// position, as the APIs report them.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token: u32,
    pub logprob: f32,
    /// The `top` most likely tokens and their log-probabilities, most likely first.
    pub top: Vec<(u32, f32)>,
}

/// The log-softmax of `logits` at `token`, and the `top` most likely tokens (first index on ties).
pub fn logprobs(logits: &[f32], token: u32, top: usize) -> TokenLogprob {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&l| (l as f64 - max).exp()).sum();
    let log_z = max + sum.ln();
    let logprob = |i: usize| logits.get(i).map_or(f32::NEG_INFINITY, |&l| (l as f64 - log_z) as f32);
    let top = top.min(logits.len());
    let mut order: Vec<usize> = (0..logits.len()).collect();
    if top > 0 && top < order.len() {
        order.select_nth_unstable_by(top - 1, before(logits));
    }
    order.truncate(top);
    order.sort_unstable_by(before(logits));
    TokenLogprob {
        token,
        logprob: logprob(token as usize),
        top: order.into_iter().map(|i| (i as u32, logprob(i))).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The nucleus of `probs` computed the plain way: sort everything, keep the prefix that
    /// first reaches `top_p`.
    fn oracle_nucleus(probs: &[f64], top_p: f64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..probs.len()).collect();
        order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)));
        let mut sum = 0.0;
        let mut kept = Vec::new();
        for i in order {
            kept.push(i);
            sum += probs[i];
            if sum >= top_p {
                break;
            }
        }
        kept.sort_unstable();
        kept
    }

    fn softmax(logits: &[f32]) -> Vec<f64> {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let e: Vec<f64> = logits.iter().map(|&l| (l as f64 - max).exp()).collect();
        let s: f64 = e.iter().sum();
        e.iter().map(|v| v / s).collect()
    }

    #[test]
    fn top_p_draws_only_and_all_of_the_nucleus_even_past_the_first_sorted_block() {
        let mut rng = StdRng::seed_from_u64(1);
        // a flat-ish distribution over 1,000 tokens: the nucleus at 0.5 holds hundreds of them
        let logits: Vec<f32> = (0..1000).map(|_| rng.random::<f32>() * 2.0).collect();
        for top_p in [0.05, 0.5, 0.9] {
            let want = oracle_nucleus(&softmax(&logits), top_p);
            assert!(top_p < 0.1 || want.len() > 4 * NUCLEUS_FIRST, "{top_p}: {}", want.len());
            let mut seen = vec![false; logits.len()];
            for _ in 0..4000 {
                seen[sample_nucleus(&logits, 1.0, None, top_p, &mut rng) as usize] = true;
            }
            let got: Vec<usize> = (0..logits.len()).filter(|&i| seen[i]).collect();
            assert!(got.iter().all(|i| want.binary_search(i).is_ok()), "top_p {top_p}: drew outside the nucleus");
            // thousands of draws over a few hundred similar tokens reach nearly all of them
            assert!(got.len() * 10 >= want.len() * 9, "top_p {top_p}: drew {} of {} tokens", got.len(), want.len());
        }
    }

    #[test]
    fn top_p_frequencies_are_the_renormalised_probabilities_and_combine_with_top_k() {
        // probabilities 0.5, 0.3, 0.15, 0.05
        let logits = [0.5f64, 0.3, 0.15, 0.05].map(|p| p.ln() as f32);
        let mut rng = StdRng::seed_from_u64(7);
        let draws = 20_000;
        let mut counts = [0usize; 4];
        for _ in 0..draws {
            counts[sample_nucleus(&logits, 1.0, None, 0.75, &mut rng) as usize] += 1;
        }
        assert_eq!(counts[2] + counts[3], 0, "{counts:?}");
        let share = counts[0] as f64 / draws as f64;
        assert!((share - 0.625).abs() < 0.02, "token 0 drawn {share} of the time, expected 0.5 / 0.8");
        // top-k 3 first (0.5, 0.3, 0.15 renormalised to 0.526, 0.316, 0.158), then top-p 0.95
        // keeps all three of them
        let mut seen = [false; 4];
        for _ in 0..2000 {
            seen[sample_nucleus(&logits, 1.0, Some(3), 0.95, &mut rng) as usize] = true;
        }
        assert_eq!(seen, [true, true, true, false]);
        // a tiny top-p is greedy
        for _ in 0..100 {
            assert_eq!(sample_nucleus(&logits, 1.5, None, 0.01, &mut rng), 0);
        }
    }

    #[test]
    fn top_p_one_is_the_plain_draw() {
        let mut gen = StdRng::seed_from_u64(3);
        let logits: Vec<f32> = (0..500).map(|_| gen.random::<f32>() * 4.0).collect();
        let (mut a, mut b) = (StdRng::seed_from_u64(9), StdRng::seed_from_u64(9));
        let mut sampler = Sampler::new(0.8, Some(40), 1.0, Penalties::default(), 9);
        for _ in 0..200 {
            let plain = sample(&logits, 0.8, Some(40), &mut a);
            assert_eq!(sample_nucleus(&logits, 0.8, Some(40), 1.0, &mut b), plain);
            assert_eq!(sampler.sample(&logits), plain);
        }
    }

    #[test]
    fn penalties_lower_the_logits_of_generated_tokens() {
        let logits = [2.0f32, 1.85, 1.0];
        // frequency: each repetition costs 0.3, so greedy alternates 0 and 1 (2.0 - 0.3 < 1.85,
        // 1.85 - 0.3 < 1.7, ...) until both have fallen below token 2's 1.0
        let mut s = Sampler::new(0.0, None, 1.0, Penalties { frequency: 0.3, presence: 0.0 }, 0);
        let mut picks = Vec::new();
        for _ in 0..8 {
            let t = s.sample(&logits);
            s.observe(t);
            picks.push(t);
        }
        assert_eq!(picks, [0, 1, 0, 1, 0, 1, 0, 2]);
        // presence: once only, however often
        let mut s = Sampler::new(0.0, None, 1.0, Penalties { frequency: 0.0, presence: 0.5 }, 0);
        let picks: Vec<u32> = (0..4)
            .map(|_| {
                let t = s.sample(&logits);
                s.observe(t);
                t
            })
            .collect();
        assert_eq!(picks, [0, 1, 0, 0]);
        // negative penalties encourage repetition
        let mut s = Sampler::new(0.0, None, 1.0, Penalties { frequency: -1.0, presence: 0.0 }, 0);
        s.observe(2);
        assert_eq!(s.sample(&logits), 0);
        s.observe(2);
        assert_eq!(s.sample(&logits), 2);
    }

    #[test]
    fn logprobs_are_the_log_softmax_and_the_top_tokens_in_order() {
        let logits = [1.0f32, 3.0, -2.0, 3.0, 0.5];
        let lp = logprobs(&logits, 4, 3);
        let p = softmax(&logits);
        assert!((lp.logprob as f64 - p[4].ln()).abs() < 1e-6);
        assert_eq!(lp.top.iter().map(|t| t.0).collect::<Vec<_>>(), [1, 3, 0]);
        for (id, l) in &lp.top {
            assert!((*l as f64 - p[*id as usize].ln()).abs() < 1e-6);
        }
        assert!(logprobs(&logits, 0, 0).top.is_empty());
        assert_eq!(logprobs(&logits, 0, 99).top.len(), 5);
        let total: f64 = logprobs(&logits, 0, 5).top.iter().map(|t| (t.1 as f64).exp()).sum();
        assert!((total - 1.0).abs() < 1e-6);
    }
}
