//! The CORE metric of the DCLM paper, as the original's `core_eval.py` + `base_eval.py` compute it.
//!
//! Design choices, all as in the original unless marked *ours*:
//! - items of each task are shuffled once with a fixed seed (1337) and then cut to `max_per_task`, so
//!   quick runs see a representative subset rather than the first (often sorted) items
//! - few-shot examples are drawn per item from the *other* items of the (cut) task with a stream seeded
//!   `1234 + idx`. *Ours*: the stream is SplitMix64, not Python's Mersenne Twister, so the examples
//!   chosen differ from the original's; the rule is the same: `k` distinct indices ≠ `idx`, uniformly,
//!   in draw order (see [`fewshot_indices`]); `k` is capped at the items available
//! - prompts: few-shot examples rendered with their gold answer and joined by a blank line, then the
//!   item; multiple choice renders one prompt per choice, schema one per context option, language
//!   modeling the prompt with and without the continuation (contexts trimmed, as the Jinja `trim`)
//! - every prompt is tokenized with BOS prepended; the scored span is found in token space: the first
//!   token after the common prefix (multiple choice), the common suffix (schema), the tokens after the
//!   prompt without continuation (language modeling, which must be a token prefix of the full prompt)
//! - rows longer than the model's context lose their oldest tokens. The original never crops its own
//!   GPT (only wrapped Hugging Face models); *ours* crops at the rotary table length, the longest input
//!   the model can take, which is the same as not cropping wherever the original runs at all
//! - all rows of an item in one padded forward pass; multiple choice and schema pick the option with
//!   the lowest mean loss over its span (ties and NaN resolve as Python's `min` + `index`: the first
//!   option wins unless a later one is strictly lower); language modeling is correct iff the greedy
//!   argmax reproduces every continuation token
//! - centered accuracy `(acc - b) / (1 - b)` with `b` the random baseline; CORE = mean over tasks

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{Tensor, D};
use serde::Serialize;

use super::bundle::{Bundle, Item, TaskSpec, TaskType};
use crate::model::ops::cross_entropy_per_token;
use crate::model::GPT;

/// Per-position outputs of a model on a batch of token rows, each as long as its row: at position
/// `t`, the loss (nats) of `row[t + 1]` and the argmax next-token prediction. The last position has
/// no target: its loss is NaN.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenScores {
    pub losses: Vec<Vec<f32>>,
    pub argmax: Vec<Vec<u32>>,
}

impl TokenScores {
    /// Scores from full logits, `logits[row][t]` over the vocabulary: how a test double or any
    /// model that exposes logits gets its scores (log-softmax loss; argmax ties: the lowest id).
    pub fn from_logits(rows: &[Vec<u32>], logits: &[Vec<Vec<f32>>]) -> Result<Self> {
        let (mut losses, mut argmax) = (Vec::new(), Vec::new());
        for (row, row_logits) in rows.iter().zip(logits) {
            if row.len() != row_logits.len() {
                bail!("{} logit vectors for a row of {} tokens", row_logits.len(), row.len());
            }
            let mut l = Vec::with_capacity(row.len());
            let mut a = Vec::with_capacity(row.len());
            for (t, z) in row_logits.iter().enumerate() {
                let max = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let lse = max + z.iter().map(|&x| (x - max).exp()).sum::<f32>().ln();
                l.push(match row.get(t + 1) {
                    Some(&next) => {
                        lse - z.get(next as usize).copied().ok_or_else(|| anyhow!("token {next} > vocab"))?
                    }
                    None => f32::NAN,
                });
                a.push(z.iter().enumerate().fold(0, |best, (i, &x)| if x > z[best] { i } else { best }) as u32);
            }
            losses.push(l);
            argmax.push(a);
        }
        if losses.len() != rows.len() {
            bail!("logits for {} rows, expected {}", losses.len(), rows.len());
        }
        Ok(Self { losses, argmax })
    }
}

/// What CORE needs of a model: its context length and next-token losses/predictions per row.
pub trait LanguageModel {
    /// The longest row the model can take; longer rows lose their oldest tokens.
    fn max_seq_len(&self) -> usize;
    /// Scores each row (rows may differ in length; padding is the implementation's business).
    fn score(&self, rows: &[Vec<u32>]) -> Result<TokenScores>;
}

impl LanguageModel for GPT {
    fn max_seq_len(&self) -> usize {
        self.rotary().0.dims().first().copied().unwrap_or(0)
    }

    fn score(&self, rows: &[Vec<u32>]) -> Result<TokenScores> {
        let b = rows.len();
        let t = rows.iter().map(Vec::len).max().unwrap_or(0);
        if b == 0 || t == 0 {
            bail!("nothing to score: {b} rows of at most {t} tokens");
        }
        // Right padding is invisible to the real positions under causal attention; its value
        // (0 here, BOS in the original) only feeds positions that are never read.
        let (mut inputs, mut targets) = (vec![0u32; b * t], vec![0i64; b * t]);
        for (r, row) in rows.iter().enumerate() {
            inputs[r * t..r * t + row.len()].copy_from_slice(row);
            for (k, &next) in row.iter().skip(1).enumerate() {
                targets[r * t + k] = i64::from(next);
            }
        }
        let device = self.rotary().0.device().clone();
        let idx = Tensor::from_vec(inputs, (b, t), &device)?;
        let logits = self.forward(&idx, None)?; // (B, T, V)
        let v = logits.dim(D::Minus1)?;
        let argmax = logits.argmax(D::Minus1)?.to_vec2::<u32>()?; // (B, T)
        let targets = Tensor::from_vec(targets, b * t, &device)?;
        let (losses, _) = cross_entropy_per_token(&logits.reshape((b * t, v))?, &targets)?;
        let losses = losses.to_vec1::<f32>()?;
        let mut out = TokenScores { losses: Vec::with_capacity(b), argmax: Vec::with_capacity(b) };
        for (r, (row, pred)) in rows.iter().zip(argmax).enumerate() {
            let mut l = losses[r * t..r * t + row.len()].to_vec();
            if let Some(last) = l.last_mut() {
                *last = f32::NAN;
            }
            out.losses.push(l);
            out.argmax.push(pred[..row.len()].to_vec());
        }
        Ok(out)
    }
}

/// SplitMix64: a tiny, well-mixed generator whose output is fixed forever, so that the shuffles
/// and few-shot draws (and hence CORE numbers) never change with a dependency upgrade.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` by multiply-high (bias below n / 2^64: irrelevant at these sizes).
    fn below(&mut self, n: usize) -> usize {
        ((u128::from(self.next_u64()) * n as u128) >> 64) as usize
    }
}

/// The fixed order in which a task's items are visited (and cut by `max_per_task`): a Fisher-Yates
/// shuffle of `0..n` seeded 1337, like the original's `random.Random(1337).shuffle`.
pub fn shuffled_order(n: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = SplitMix64(1337);
    for i in (1..n).rev() {
        order.swap(i, rng.below(i + 1));
    }
    order
}

/// The few-shot examples of item `idx` among `n`: `min(k, n - 1)` distinct indices other than
/// `idx`, uniform without replacement, in draw order, from a stream seeded `1234 + idx`.
pub fn fewshot_indices(idx: usize, n: usize, k: usize) -> Vec<usize> {
    let k = k.min(n.saturating_sub(1));
    let mut rng = SplitMix64(1234 + idx as u64);
    let mut chosen = Vec::with_capacity(k);
    while chosen.len() < k {
        // Draw among the n - 1 others by skipping over idx, then reject repeats.
        let j = rng.below(n - 1);
        let j = if j >= idx { j + 1 } else { j };
        if !chosen.contains(&j) {
            chosen.push(j);
        }
    }
    chosen
}

/// The prompts of `item` after its `fewshot` examples: one per choice (multiple choice), one per
/// context option (schema), or [without, with] the continuation (language modeling).
pub fn render_prompts(item: &Item, fewshot: &[&Item], delimiter: &str) -> Result<Vec<String>> {
    let pick = |options: &[String], gold: usize| -> Result<String> {
        options.get(gold).cloned().ok_or_else(|| anyhow!("gold {gold} out of range for {} options", options.len()))
    };
    let mut shots = String::new();
    for ex in fewshot {
        if std::mem::discriminant(*ex) != std::mem::discriminant(item) {
            bail!("a few-shot example of another task type than the item");
        }
        let shot = match ex {
            Item::MultipleChoice { query, choices, gold } => format!("{query}{delimiter}{}", pick(choices, *gold)?),
            Item::Schema { context_options, continuation, gold } => {
                format!("{}{delimiter}{continuation}", pick(context_options, *gold)?)
            }
            Item::LanguageModeling { context, continuation } => format!("{}{delimiter}{continuation}", context.trim()),
        };
        shots.push_str(&shot);
        shots.push_str("\n\n");
    }
    Ok(match item {
        Item::MultipleChoice { query, choices, .. } => {
            choices.iter().map(|c| format!("{shots}{query}{delimiter}{c}")).collect()
        }
        Item::Schema { context_options, continuation, .. } => {
            context_options.iter().map(|c| format!("{shots}{c}{delimiter}{continuation}")).collect()
        }
        Item::LanguageModeling { context, continuation } => {
            let without = format!("{shots}{}{delimiter}", context.trim());
            let with = format!("{without}{continuation}");
            // Stripped so that a trailing space of the delimiter is not a token of its own that the
            // full prompt would merge into the continuation's first token.
            vec![without.trim().to_string(), with]
        }
    })
}

/// Token rows of one item and the span `[start, end)` of each row whose tokens are scored.
#[derive(Debug, Clone, PartialEq)]
pub struct Prepared {
    pub rows: Vec<Vec<u32>>,
    pub spans: Vec<(usize, usize)>,
}

/// Tokenizes `prompts` (BOS first), locates the scored spans and crops rows to `max_len`.
pub fn prepare(
    task_type: TaskType,
    prompts: &[String],
    tokenizer: &bpe::Tokenizer,
    max_len: usize,
) -> Result<Prepared> {
    let bos = tokenizer.bos_id();
    let tokens: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| {
            let mut row = vec![bos];
            tokenizer.encode_into(p, &mut row);
            row
        })
        .collect();
    if tokens.is_empty() {
        bail!("an item without prompts");
    }
    let min_len = tokens.iter().map(Vec::len).min().unwrap_or(0);
    let common = |at: &dyn Fn(&Vec<u32>, usize) -> u32| {
        (0..min_len).take_while(|&i| tokens.iter().all(|r| at(r, i) == at(&tokens[0], i))).count()
    };
    let (rows, spans) = match task_type {
        TaskType::MultipleChoice => {
            let start = common(&|r, i| r[i]);
            let spans = tokens.iter().map(|r| (start, r.len())).collect();
            (tokens, spans)
        }
        TaskType::Schema => {
            let suffix = common(&|r, i| r[r.len() - 1 - i]);
            let spans = tokens.iter().map(|r| (r.len() - suffix, r.len())).collect();
            (tokens, spans)
        }
        TaskType::LanguageModeling => {
            let [without, with] = <[Vec<u32>; 2]>::try_from(tokens)
                .map_err(|t| anyhow!("language modeling needs 2 prompts, got {}", t.len()))?;
            if without.len() >= with.len() || with[..without.len()] != without[..] {
                bail!("the prompt without its continuation does not tokenize to a prefix of the full prompt");
            }
            let span = (without.len(), with.len());
            (vec![with], vec![span])
        }
    };
    let mut out = Prepared { rows: Vec::with_capacity(rows.len()), spans: Vec::with_capacity(rows.len()) };
    for (row, (start, end)) in rows.into_iter().zip(spans) {
        let crop = row.len().saturating_sub(max_len);
        // The first scored token is predicted from the one before it, which must survive the crop.
        if crop > 0 && start < crop + 1 {
            bail!("a continuation of {} tokens does not fit the model's context of {max_len}", end - start);
        }
        out.rows.push(row[crop..].to_vec());
        out.spans.push((start - crop, end - crop));
    }
    Ok(out)
}

/// Whether the model got `item` right, from the scores of its prepared rows.
pub fn judge(item: &Item, prepared: &Prepared, scores: &TokenScores) -> Result<bool> {
    let span_of = |r: usize| -> Result<(usize, usize)> {
        let (s, e) = *prepared.spans.get(r).ok_or_else(|| anyhow!("no row {r}"))?;
        let len = scores.losses.get(r).map_or(0, Vec::len).min(scores.argmax.get(r).map_or(0, Vec::len));
        if s == 0 || e > len || s > e {
            bail!("span {s}..{e} does not fit the {len} scores of row {r}");
        }
        Ok((s, e))
    };
    match item {
        Item::LanguageModeling { .. } => {
            let (s, e) = span_of(0)?;
            // The prediction at position t is for token t + 1.
            Ok(scores.argmax[0][s - 1..e - 1] == prepared.rows[0][s..e])
        }
        Item::MultipleChoice { gold, .. } | Item::Schema { gold, .. } => {
            let mut best: Option<(usize, f64)> = None;
            for r in 0..prepared.rows.len() {
                let (s, e) = span_of(r)?;
                let span = &scores.losses[r][s - 1..e - 1];
                // An empty span has mean NaN, as torch's mean of nothing.
                let mean = span.iter().map(|&x| f64::from(x)).sum::<f64>() / span.len() as f64;
                if best.is_none_or(|(_, b)| mean < b) {
                    best = Some((r, mean));
                }
            }
            Ok(best.map(|(r, _)| r) == Some(*gold))
        }
    }
}

/// Result of one task.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TaskResult {
    pub label: String,
    pub task_type: TaskType,
    pub num_fewshot: usize,
    pub examples: usize,
    pub accuracy: f64,
    pub random_baseline: f64,
    pub centered: f64,
    pub seconds: f64,
}

/// Results of a CORE run: per task in `core.yaml` order, and their mean centered accuracy.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CoreResults {
    pub tasks: Vec<TaskResult>,
    pub core: f64,
}

/// How far above chance: 0 at the random baseline `b`, 1 at perfect accuracy.
pub fn centered_accuracy(accuracy: f64, baseline: f64) -> f64 {
    (accuracy - baseline) / (1.0 - baseline)
}

impl CoreResults {
    /// The original's CSV (`Task, Accuracy, Centered`, then a `CORE` row).
    pub fn to_csv(&self) -> String {
        let mut s = format!("{:<35}, {:<10}, {:<10}\n", "Task", "Accuracy", "Centered");
        for t in &self.tasks {
            s.push_str(&format!("{:<35}, {:<10.6}, {:<10.6}\n", t.label, t.accuracy, t.centered));
        }
        s.push_str(&format!("{:<35}, {:<10}, {:<10.6}\n", "CORE", "", self.core));
        s
    }

    /// Writes `{stem}.csv` and `{stem}.json` into `dir`; returns their paths.
    pub fn save(&self, dir: &Path, stem: &str) -> Result<(PathBuf, PathBuf)> {
        let csv = dir.join(format!("{stem}.csv"));
        let json = dir.join(format!("{stem}.json"));
        crate::common::write_atomic(&csv, self.to_csv().as_bytes())?;
        crate::common::write_atomic(&json, &serde_json::to_vec_pretty(self)?)?;
        Ok((csv, json))
    }
}

/// Accuracy of `model` on `items` (already shuffled and cut) of `task`; `tick` after each item.
pub fn evaluate_task(
    model: &impl LanguageModel,
    tokenizer: &bpe::Tokenizer,
    task: &TaskSpec,
    items: &[Item],
    mut tick: impl FnMut(),
) -> Result<f64> {
    if items.is_empty() {
        bail!("task {} has no items", task.label);
    }
    let max_len = model.max_seq_len();
    let mut correct = 0usize;
    for (idx, item) in items.iter().enumerate() {
        let shots: Vec<&Item> =
            fewshot_indices(idx, items.len(), task.num_fewshot).into_iter().map(|i| &items[i]).collect();
        let judged = (|| {
            let prompts = render_prompts(item, &shots, &task.continuation_delimiter)?;
            let prepared = prepare(task.task_type, &prompts, tokenizer, max_len)?;
            let scores = model.score(&prepared.rows)?;
            judge(item, &prepared, &scores)
        })()
        .with_context(|| format!("task {}, item {idx} (after the shuffle)", task.label))?;
        correct += usize::from(judged);
        tick();
    }
    Ok(correct as f64 / items.len() as f64)
}

/// Evaluates the tasks of `bundle` (all of `core.yaml`, or whatever the caller kept in
/// `bundle.tasks`), at most `max_per_task` items each, with a progress bar and a line per task.
pub fn evaluate_bundle(
    model: &impl LanguageModel,
    tokenizer: &bpe::Tokenizer,
    bundle: &Bundle,
    max_per_task: Option<usize>,
) -> Result<CoreResults> {
    if max_per_task == Some(0) {
        bail!("--max-per-task must be at least 1 (leave it out to evaluate every item)");
    }
    if bundle.tasks.is_empty() {
        bail!("no tasks to evaluate");
    }
    let mut tasks = Vec::with_capacity(bundle.tasks.len());
    for task in &bundle.tasks {
        let started = Instant::now();
        let mut all = bundle.load_items(task)?.into_iter().map(Some).collect::<Vec<_>>();
        let mut items: Vec<Item> = shuffled_order(all.len()).into_iter().filter_map(|i| all[i].take()).collect();
        items.truncate(max_per_task.unwrap_or(usize::MAX));
        let pb = crate::common::progress_bar(items.len() as u64, &task.label);
        let accuracy = evaluate_task(model, tokenizer, task, &items, || pb.inc(1))?;
        pb.finish_and_clear();
        let random_baseline = bundle.baseline(&task.label)?;
        let centered = centered_accuracy(accuracy, random_baseline);
        let seconds = started.elapsed().as_secs_f64();
        eprintln!(
            "{:<35} {:>2}-shot {:<17} accuracy {accuracy:.4} | centered {centered:.4} | {} items in {seconds:.1}s",
            task.label,
            task.num_fewshot,
            format!("{:?}", task.task_type),
            items.len()
        );
        tasks.push(TaskResult {
            label: task.label.clone(),
            task_type: task.task_type,
            num_fewshot: task.num_fewshot,
            examples: items.len(),
            accuracy,
            random_baseline,
            centered,
            seconds,
        });
    }
    let core = tasks.iter().map(|t| t.centered).sum::<f64>() / tasks.len() as f64;
    eprintln!("{:<35} {core:.4}", "CORE");
    Ok(CoreResults { tasks, core })
}

/// The CORE metric of `model` over the bundle in `bundle_dir` (the entry point of `base eval`).
pub fn evaluate_core(
    model: &GPT,
    tokenizer: &bpe::Tokenizer,
    bundle_dir: &Path,
    max_per_task: Option<usize>,
) -> Result<CoreResults> {
    if model.config().vocab_size < tokenizer.vocab_size() {
        bail!(
            "the model's vocabulary ({}) is smaller than the tokenizer's ({}): load the tokenizer it was trained with",
            model.config().vocab_size,
            tokenizer.vocab_size()
        );
    }
    let bundle = Bundle::load_or_download(bundle_dir)?;
    evaluate_bundle(model, tokenizer, &bundle, max_per_task)
}
