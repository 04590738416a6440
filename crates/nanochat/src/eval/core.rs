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
//! - all rows of an item in one padded forward pass (on a GPU; *ours*, on the CPU: the rows' shared
//!   prefix once, then each row's rest, through the native path, see [`NativeScorer`]); multiple
//!   choice and schema pick the option with the lowest mean loss over its span (ties and NaN resolve
//!   as Python's `min` + `index`: the first option wins unless a later one is strictly lower);
//!   language modeling is correct iff the greedy argmax reproduces every continuation token
//! - centered accuracy `(acc - b) / (1 - b)` with `b` the random baseline; CORE = mean over tasks
//! - data-parallel (`mpirun -n W nanochat base eval`), as the original under torchrun: rank r
//!   judges items r, r + W, ... of each (cut) task, and the counts of correct items are added
//!   across ranks; an item is judged alone, so the results are one process's

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::Tensor;
use serde::Serialize;

use super::bundle::{Bundle, Item, TaskSpec, TaskType};
use crate::dist::{rank_stride, Communicator, SingleProcess};
use crate::model::decode::{DecodeCache, DecodeModel};
use crate::model::GPT;

/// What a model says about the scored span of each row of an item: for every scored token
/// `row[t]` (`t` in the row's span), its loss in nats and the model's greedy prediction for it,
/// both from the logits at position `t - 1`.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenScores {
    pub losses: Vec<Vec<f32>>,
    pub argmax: Vec<Vec<u32>>,
}

impl TokenScores {
    /// Scores of `prepared` from logits: `logits(r, t)` gives the vocabulary logits at position `t`
    /// of row `r` (log-softmax loss; argmax ties go to the lowest id). How the GPT, the native
    /// path and test doubles share one definition of the scores.
    pub fn from_logits<'a>(prepared: &Prepared, mut logits: impl FnMut(usize, usize) -> &'a [f32]) -> Result<Self> {
        let (mut losses, mut argmax) = (Vec::new(), Vec::new());
        for (r, (row, &(s, e))) in prepared.rows.iter().zip(&prepared.spans).enumerate() {
            if s == 0 || s > e || e > row.len() {
                bail!("span {s}..{e} does not fit row {r} of {} tokens", row.len());
            }
            let (mut l, mut a) = (Vec::with_capacity(e - s), Vec::with_capacity(e - s));
            for (t, &next) in row.iter().enumerate().take(e).skip(s) {
                let z = logits(r, t - 1);
                let max = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let lse = max + z.iter().map(|&x| (x - max).exp()).sum::<f32>().ln();
                let next = next as usize;
                l.push(lse - z.get(next).copied().ok_or_else(|| anyhow!("token {next} outside the vocabulary"))?);
                a.push(z.iter().enumerate().fold(0, |best, (i, &x)| if x > z[best] { i } else { best }) as u32);
            }
            losses.push(l);
            argmax.push(a);
        }
        Ok(Self { losses, argmax })
    }
}

/// What CORE needs of a model: its context length and the scores of an item's spans.
pub trait LanguageModel {
    /// The longest row the model can take; longer rows lose their oldest tokens.
    fn max_seq_len(&self) -> usize;
    /// Scores the span of each row (rows may differ in length; padding is the implementation's business).
    fn score(&self, prepared: &Prepared) -> Result<TokenScores>;
}

impl LanguageModel for GPT {
    fn max_seq_len(&self) -> usize {
        self.rotary().0.dims().first().copied().unwrap_or(0)
    }

    fn score(&self, prepared: &Prepared) -> Result<TokenScores> {
        let rows = &prepared.rows;
        let b = rows.len();
        let t = rows.iter().map(Vec::len).max().unwrap_or(0);
        if b == 0 || t == 0 {
            bail!("nothing to score: {b} rows of at most {t} tokens");
        }
        // Right padding is invisible to the real positions under causal attention; its value
        // (0 here, BOS in the original) only feeds positions that are never read.
        let mut inputs = vec![0u32; b * t];
        for (r, row) in rows.iter().enumerate() {
            inputs[r * t..r * t + row.len()].copy_from_slice(row);
        }
        let idx = Tensor::from_vec(inputs, (b, t), self.rotary().0.device())?;
        let logits = self.forward(&idx, None)?.flatten_all()?.to_vec1::<f32>()?; // (B, T, V)
        let v = logits.len() / (b * t);
        TokenScores::from_logits(prepared, |r, p| &logits[(r * t + p) * v..(r * t + p + 1) * v])
    }
}

/// CORE on the native CPU path ([`DecodeModel`]): the rows of an item share their few-shot
/// context (and, for multiple choice, the question), so that prefix goes through the model once
/// and is copied into every row's cache slot; only the rest of each row is computed, and the
/// vocabulary projection only where a scored token is predicted. Same scores as the GPT's padded
/// batch up to float rounding, several times faster.
pub struct NativeScorer {
    model: DecodeModel,
    cache: RefCell<Option<DecodeCache>>,
}

impl NativeScorer {
    pub fn new(model: DecodeModel) -> Self {
        Self { model, cache: RefCell::new(None) }
    }
}

impl LanguageModel for NativeScorer {
    fn max_seq_len(&self) -> usize {
        self.model.max_positions()
    }

    fn score(&self, prepared: &Prepared) -> Result<TokenScores> {
        let rows = &prepared.rows;
        let longest = rows.iter().map(Vec::len).max().unwrap_or(0);
        if rows.is_empty() || longest == 0 || rows.len() != prepared.spans.len() {
            bail!("nothing to score: {} rows of at most {longest} tokens", rows.len());
        }
        if let Some((r, (s, e))) =
            prepared.spans.iter().enumerate().find(|(r, &(s, e))| s == 0 || s > e || e > rows[*r].len())
        {
            bail!("span {s}..{e} does not fit row {r} of {} tokens", rows[r].len());
        }
        // The shared prefix ends before the first position whose logits any row needs.
        let first_scored = prepared.spans.iter().map(|&(s, _)| s.saturating_sub(1)).min().unwrap_or(0);
        let shared = (0..first_scored).take_while(|&i| rows.iter().all(|r| r.get(i) == Some(&rows[0][i]))).count();
        let mut guard = self.cache.borrow_mut();
        let fits = guard.as_ref().is_some_and(|c| c.slots() >= rows.len() && c.capacity() >= longest);
        if !fits {
            // Grown to the largest item seen so far, so a run allocates a handful of times.
            let (slots, capacity) = guard.as_ref().map_or((0, 0), |c| (c.slots(), c.capacity()));
            *guard = Some(self.model.new_cache(slots.max(rows.len()), capacity.max(longest))?);
        }
        let cache = guard.as_mut().context("the scoring cache")?;
        cache.reset_slot(0)?;
        if shared > 0 {
            self.model.prefill_logits(cache, 0, &rows[0][..shared], shared)?;
        }
        for r in 1..rows.len() {
            cache.copy_slot(0, r)?;
        }
        let vocab = self.model.config().vocab_size;
        let mut logits = Vec::with_capacity(rows.len());
        for (r, (row, &(s, _))) in rows.iter().zip(&prepared.spans).enumerate() {
            // Logits from position s - 1 on: appended token s - 1 - shared.
            logits.push(self.model.prefill_logits(cache, r, &row[shared..], s - 1 - shared)?);
        }
        TokenScores::from_logits(prepared, |r, p| {
            let at = p + 1 - prepared.spans[r].0;
            &logits[r][at * vocab..(at + 1) * vocab]
        })
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
    let rows = prepared.rows.len();
    let fits = |r: usize| {
        let (s, e) = prepared.spans[r];
        scores.losses.get(r).map(Vec::len) == Some(e - s) && scores.argmax.get(r).map(Vec::len) == Some(e - s)
    };
    if prepared.spans.len() != rows || !(0..rows).all(fits) {
        bail!("the scores do not match the spans of the item's {rows} rows");
    }
    match item {
        Item::LanguageModeling { .. } => {
            let (s, e) = prepared.spans[0];
            Ok(scores.argmax[0] == prepared.rows[0][s..e])
        }
        Item::MultipleChoice { gold, .. } | Item::Schema { gold, .. } => {
            let mut best: Option<(usize, f64)> = None;
            for (r, span) in scores.losses.iter().enumerate() {
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

/// How many of the items at `indices` of `items` (the whole cut task, where the few-shot examples
/// come from) `model` gets right; `tick` after each item.
fn count_correct(
    model: &impl LanguageModel,
    tokenizer: &bpe::Tokenizer,
    task: &TaskSpec,
    items: &[Item],
    indices: impl IntoIterator<Item = usize>,
    mut tick: impl FnMut(),
) -> Result<usize> {
    let max_len = model.max_seq_len();
    let mut correct = 0usize;
    for idx in indices {
        let item = items.get(idx).with_context(|| format!("task {} has no item {idx}", task.label))?;
        let shots: Vec<&Item> =
            fewshot_indices(idx, items.len(), task.num_fewshot).into_iter().map(|i| &items[i]).collect();
        let judged = (|| {
            let prompts = render_prompts(item, &shots, &task.continuation_delimiter)?;
            let prepared = prepare(task.task_type, &prompts, tokenizer, max_len)?;
            let scores = model.score(&prepared)?;
            judge(item, &prepared, &scores)
        })()
        .with_context(|| format!("task {}, item {idx} (after the shuffle)", task.label))?;
        correct += usize::from(judged);
        tick();
    }
    Ok(correct)
}

/// Evaluates the tasks of `bundle` (all of `core.yaml`, or whatever the caller kept in
/// `bundle.tasks`), at most `max_per_task` items each, with a progress bar and a line per task.
pub fn evaluate_bundle(
    model: &impl LanguageModel,
    tokenizer: &bpe::Tokenizer,
    bundle: &Bundle,
    max_per_task: Option<usize>,
) -> Result<CoreResults> {
    evaluate_bundle_on(&SingleProcess, model, tokenizer, bundle, max_per_task)
}

/// [`evaluate_bundle`] as one rank of `comm`: this rank judges its stride of each task's items
/// and the counts are added across ranks, so every rank returns one process's results; rank 0
/// alone shows progress and prints.
pub fn evaluate_bundle_on(
    comm: &dyn Communicator,
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
        if items.is_empty() {
            bail!("task {} has no items", task.label);
        }
        let mine: Vec<usize> = rank_stride(comm, 0, items.len()).collect();
        let pb = if comm.is_root() {
            crate::common::progress_bar(mine.len() as u64, &task.label)
        } else {
            indicatif::ProgressBar::hidden()
        };
        let correct = count_correct(model, tokenizer, task, &items, mine, || pb.inc(1))?;
        pb.finish_and_clear();
        let mut total = [correct as f64];
        comm.all_reduce_sum_f64(&mut total)?;
        let accuracy = total[0] / items.len() as f64;
        let random_baseline = bundle.baseline(&task.label)?;
        let centered = centered_accuracy(accuracy, random_baseline);
        let seconds = started.elapsed().as_secs_f64();
        if comm.is_root() {
            eprintln!(
                "{:<35} {:>2}-shot {:<17} accuracy {accuracy:.4} | centered {centered:.4} | {} items in {seconds:.1}s",
                task.label,
                task.num_fewshot,
                format!("{:?}", task.task_type),
                items.len()
            );
        }
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
    if comm.is_root() {
        eprintln!("{:<35} {core:.4}", "CORE");
    }
    Ok(CoreResults { tasks, core })
}

/// The CORE metric of `model` over the bundle in `bundle_dir` (the entry point of `base eval`).
pub fn evaluate_core(
    model: &GPT,
    tokenizer: &bpe::Tokenizer,
    bundle_dir: &Path,
    max_per_task: Option<usize>,
) -> Result<CoreResults> {
    evaluate_core_on(&SingleProcess, model, tokenizer, bundle_dir, max_per_task)
}

/// [`evaluate_core`] as one rank of `comm` (see [`evaluate_bundle_on`]): rank 0 reads the bundle
/// first, so that a broken one fails there before the others read it.
pub fn evaluate_core_on(
    comm: &dyn Communicator,
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
    let root_bundle = if comm.is_root() { Some(Bundle::load(bundle_dir)?) } else { None };
    comm.barrier()?;
    let bundle = match root_bundle {
        Some(bundle) => bundle,
        None => Bundle::load(bundle_dir)?,
    };
    if model.rotary().0.device().is_cpu() {
        let native = NativeScorer::new(DecodeModel::from_gpt(model)?);
        evaluate_bundle_on(comm, &native, tokenizer, &bundle, max_per_task)
    } else {
        evaluate_bundle_on(comm, model, tokenizer, &bundle, max_per_task)
    }
}
