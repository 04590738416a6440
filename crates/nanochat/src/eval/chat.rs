//! `nanochat chat eval`: the chat model's scores on ARC-Easy, ARC-Challenge, MMLU, GSM8K,
//! HumanEval and SpellingBee, and ChatCORE over them.
//!
//! Design choices, following the original's `chat_eval`:
//! - categorical tasks (ARC, MMLU) are scored without sampling: the prompt is rendered for
//!   completion, one batched forward pass gives the logits after `<|assistant_start|>`, and the
//!   answer is the choice whose letter token has the largest logit — the argmax is restricted to
//!   the letters offered, so a model that would rather say something else still picks one;
//! - generative tasks (GSM8K, HumanEval, SpellingBee) sample `num_samples` completions through the
//!   [`Engine`] (temperature 0 by default: greedy) and pass if any sample passes (pass@k);
//! - centered accuracy `(acc − b) / (1 − b)` with `b` the chance of guessing: the mean over the
//!   problems of 1 / (number of choices) for multiple choice (0.25 for MMLU's four), 0 for
//!   generative tasks; ChatCORE is the mean centered accuracy over the tasks run (the original
//!   reports it only when all six ran: [`ChatCoreReport::complete`] says whether they did).
//!
//! Data-parallel (`mpirun -n W nanochat chat eval ...`, docs/DISTRIBUTED.md): rank r scores
//! problems r, r + W, r + 2W, ... of each task (every problem with the options, seeds included, it
//! has in one process), the counts are added across ranks, and rank 0 alone prints and writes the
//! JSON and the report section; an error on any rank ends every rank.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, IndexOp, Tensor};
use clap::Args;
use serde::Serialize;

use crate::checkpoint::{ModelArgs, Source};
use crate::conversation::render_for_completion;
use crate::data::sources::{self, Dataset, Online, RemoteFile};
use crate::dist::{self, or_abort, rank_stride, Communicator, DistMode, SingleProcess};
use crate::engine::{Engine, GenerateOptions};
use crate::execution::Limits;
use crate::model::decode::WeightFormat;
use crate::tasks::arc::{ArcSubset, ArcTask};
use crate::tasks::gsm8k::Gsm8k;
use crate::tasks::humaneval::HumanEval;
use crate::tasks::mmlu::Mmlu;
use crate::tasks::spelling::{load_words, SpellingBee, Split};
use crate::tasks::{Answer, DataRoot, EvalType, Example, Task};

/// The tasks `chat eval` knows, in the original's order.
pub const TASK_NAMES: [&str; 6] = ["ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee"];

/// Problems generated for SpellingBee, as in the original.
const SPELLING_BEE_SIZE: usize = 256;

/// How to run one task.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatEvalOptions {
    /// Where the task data comes from.
    pub data: DataRoot,
    /// Evaluate only the first N problems.
    pub max_problems: Option<usize>,
    /// Prompts per forward pass, categorical tasks.
    pub batch_size: usize,
    /// Samples per problem, generative tasks (pass@k with k = this).
    pub num_samples: usize,
    pub max_new_tokens: usize,
    pub temperature: f64,
    pub top_k: Option<usize>,
    pub seed: u64,
    /// Print a running score to stderr.
    pub progress: bool,
    /// Append every generative completion (special tokens spelled out) to this JSON-lines file.
    pub samples_file: Option<PathBuf>,
}

impl Default for ChatEvalOptions {
    fn default() -> Self {
        ChatEvalOptions {
            data: DataRoot::from_args(None),
            max_problems: None,
            batch_size: 8,
            num_samples: 1,
            max_new_tokens: 512,
            temperature: 0.0,
            top_k: Some(50),
            seed: 42,
            progress: false,
            samples_file: None,
        }
    }
}

/// One task's score.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatEvalResult {
    pub task: String,
    /// `categorical` or `generative`.
    pub eval_type: String,
    pub problems: usize,
    pub passed: usize,
    pub accuracy: f64,
    /// The accuracy of guessing.
    pub baseline: f64,
    /// `(accuracy − baseline) / (1 − baseline)`.
    pub centered: f64,
    pub seconds: f64,
}

/// Every task run and ChatCORE over them.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatCoreReport {
    pub results: Vec<ChatEvalResult>,
    pub chatcore: f64,
    /// Whether all six tasks ran, the condition for the original's ChatCORE.
    pub complete: bool,
}

impl ChatCoreReport {
    pub fn new(results: Vec<ChatEvalResult>) -> ChatCoreReport {
        let chatcore = if results.is_empty() {
            0.0
        } else {
            results.iter().map(|r| r.centered).sum::<f64>() / results.len() as f64
        };
        let complete = TASK_NAMES.iter().all(|name| results.iter().any(|r| r.task == *name));
        ChatCoreReport { results, chatcore, complete }
    }
}

/// Counts while a task is scored.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Tally {
    pub problems: usize,
    pub passed: usize,
    /// Sum over the problems of the chance of passing by guessing.
    pub chance: f64,
}

impl Tally {
    /// The counts of every rank of `comm` added up (in f64, exact for any realistic count), the
    /// same on every rank.
    pub fn all_reduce(self, comm: &dyn Communicator) -> Result<Tally> {
        let mut sums = [self.problems as f64, self.passed as f64, self.chance];
        comm.all_reduce_sum_f64(&mut sums)?;
        Ok(Tally { problems: sums[0].round() as usize, passed: sums[1].round() as usize, chance: sums[2] })
    }

    fn result(self, task: &str, eval_type: EvalType, seconds: f64) -> ChatEvalResult {
        let n = self.problems.max(1) as f64;
        let (accuracy, baseline) = (self.passed as f64 / n, self.chance / n);
        ChatEvalResult {
            task: task.to_string(),
            eval_type: match eval_type {
                EvalType::Categorical => "categorical",
                EvalType::Generative => "generative",
            }
            .to_string(),
            problems: self.problems,
            passed: self.passed,
            accuracy,
            baseline,
            centered: (accuracy - baseline) / (1.0 - baseline),
            seconds,
        }
    }
}

/// Loads a task by its `chat eval` name, from the evaluation split the original uses.
pub fn load_task(name: &str, root: &DataRoot) -> Result<Box<dyn Task>> {
    Ok(match name {
        "ARC-Easy" => Box::new(ArcTask::load(root, ArcSubset::Easy, "test")?),
        "ARC-Challenge" => Box::new(ArcTask::load(root, ArcSubset::Challenge, "test")?),
        "MMLU" => Box::new(Mmlu::load(root, "test")?),
        "GSM8K" => Box::new(Gsm8k::load(root, "test")?),
        "HumanEval" => Box::new(HumanEval::load(root, Limits::default())?),
        "SpellingBee" => Box::new(SpellingBee::new(load_words(root)?, SPELLING_BEE_SIZE, Split::Test)),
        other => bail!("unknown chat eval task {other:?}: use one of {}", TASK_NAMES.join(", ")),
    })
}

/// The online data of the task named `name` (as [`load_task`] reads it).
fn task_sources(name: &str) -> Vec<Dataset> {
    match name {
        "ARC-Easy" => vec![sources::arc("ARC-Easy", "test")],
        "ARC-Challenge" => vec![sources::arc("ARC-Challenge", "test")],
        "MMLU" => vec![sources::mmlu("test")],
        "GSM8K" => vec![sources::gsm8k("test")],
        "HumanEval" => vec![sources::humaneval()],
        "SpellingBee" => vec![Dataset::Words],
        _ => Vec::new(),
    }
}

/// Scores `engine` on the task named `task_name`.
pub fn run_chat_eval(engine: &Engine, task_name: &str, opts: &ChatEvalOptions) -> Result<ChatEvalResult> {
    run_chat_eval_on(&SingleProcess, engine, task_name, opts)
}

/// [`run_chat_eval`] as one rank of `comm`: this rank scores its stride of the problems and the
/// counts are added across ranks, so every rank returns the whole task's score. Every rank must
/// call it with the same task and options. Only rank 0 shows progress (its own share's).
pub fn run_chat_eval_on(
    comm: &dyn Communicator,
    engine: &Engine,
    task_name: &str,
    opts: &ChatEvalOptions,
) -> Result<ChatEvalResult> {
    let task = load_task(task_name, &opts.data)?;
    let problems = opts.max_problems.map_or(task.len(), |m| m.min(task.len()));
    let start = Instant::now();
    let eval_type = task.eval_type().with_context(|| format!("{task_name} is training data, not an eval"))?;
    let indices: Vec<usize> = rank_stride(comm, 0, problems).collect();
    let opts = ChatEvalOptions { progress: opts.progress && comm.is_root(), ..opts.clone() };
    let tally = match eval_type {
        EvalType::Categorical => {
            let pad = engine.tokenizer().bos_id();
            evaluate_categorical_at(task.as_ref(), engine.tokenizer(), &indices, &opts, |prompts| {
                last_logits(engine, prompts, pad)
            })?
        }
        EvalType::Generative => evaluate_generative_at(task.as_ref(), engine, &indices, &opts)?,
    };
    let tally = tally.all_reduce(comm)?;
    Ok(tally.result(task_name, eval_type, start.elapsed().as_secs_f64()))
}

/// Scores the first `problems` problems of a multiple-choice task. `logits` maps a batch of
/// prompts to the logits after each prompt's last token (one row of vocabulary size per prompt);
/// it is the model in [`run_chat_eval`] and a stand-in in tests.
pub fn evaluate_categorical(
    task: &dyn Task,
    tokenizer: &bpe::Tokenizer,
    problems: usize,
    opts: &ChatEvalOptions,
    logits: impl FnMut(&[Vec<u32>]) -> Result<Vec<Vec<f32>>>,
) -> Result<Tally> {
    let indices: Vec<usize> = (0..problems).collect();
    evaluate_categorical_at(task, tokenizer, &indices, opts, logits)
}

/// [`evaluate_categorical`] on the problems at `indices` (a rank's share), in batches of them.
pub fn evaluate_categorical_at(
    task: &dyn Task,
    tokenizer: &bpe::Tokenizer,
    indices: &[usize],
    opts: &ChatEvalOptions,
    mut logits: impl FnMut(&[Vec<u32>]) -> Result<Vec<Vec<f32>>>,
) -> Result<Tally> {
    ensure!(opts.batch_size > 0, "the batch size must be at least 1");
    let mut tally = Tally::default();
    for batch in indices.chunks(opts.batch_size) {
        let examples = batch.iter().map(|&i| task.get(i)).collect::<Result<Vec<_>>>()?;
        let prompts = examples
            .iter()
            .map(|e| render_for_completion(tokenizer, &e.conversation))
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("rendering a {} prompt", task.name()))?;
        let rows = logits(&prompts)?;
        ensure!(rows.len() == prompts.len(), "{} rows of logits for {} prompts", rows.len(), prompts.len());
        for (example, row) in examples.iter().zip(&rows) {
            let Answer::Choice { letters, .. } = &example.answer else {
                bail!("{}: a categorical task must give multiple-choice answers", task.name());
            };
            let letter_ids = letters.iter().map(|l| letter_id(tokenizer, l)).collect::<Result<Vec<_>>>()?;
            let logit = |id: u32| row.get(id as usize).copied().unwrap_or(f32::NEG_INFINITY);
            // the first letter wins ties, like an argmax
            let best =
                (0..letters.len())
                    .fold(0, |best, j| if logit(letter_ids[j]) > logit(letter_ids[best]) { j } else { best });
            tally.problems += 1;
            tally.passed += usize::from(task.evaluate(example, &letters[best]));
            tally.chance += 1.0 / letters.len() as f64;
        }
        if opts.progress {
            eprint!("\r{}: {}/{} ({:.2}%)", task.name(), tally.passed, tally.problems, percent(&tally));
        }
    }
    if opts.progress {
        eprintln!();
    }
    Ok(tally)
}

/// The single token a choice letter encodes to.
fn letter_id(tokenizer: &bpe::Tokenizer, letter: &str) -> Result<u32> {
    match tokenizer.encode(letter)[..] {
        [id] => Ok(id),
        _ => {
            bail!("the choice letter {letter:?} is not a single token: categorical scoring needs one token per letter")
        }
    }
}

/// One batched forward pass: the logits after each prompt's last token. Prompts are padded on the
/// right (with `pad`), which a causal model never looks at from the positions read.
fn last_logits(engine: &Engine, prompts: &[Vec<u32>], pad: u32) -> Result<Vec<Vec<f32>>> {
    let width = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let limit = engine.max_positions()?;
    ensure!(width <= limit, "a prompt of {width} tokens exceeds the model's {limit} positions: use a larger model");
    let mut ids = Vec::with_capacity(prompts.len() * width);
    for prompt in prompts {
        ids.extend_from_slice(prompt);
        ids.extend(std::iter::repeat_n(pad, width - prompt.len()));
    }
    let device = engine.model().rotary().0.device().clone();
    let idx = Tensor::from_vec(ids, (prompts.len(), width), &device)?;
    let logits = engine.model().forward(&idx, None)?; // (B, T, V)
    prompts
        .iter()
        .enumerate()
        .map(|(b, prompt)| Ok(logits.i((b, prompt.len() - 1))?.to_dtype(DType::F32)?.to_vec1()?))
        .collect()
}

/// Scores the first `problems` problems of a generative task: `num_samples` completions each,
/// a pass when any of them passes.
pub fn evaluate_generative(task: &dyn Task, engine: &Engine, problems: usize, opts: &ChatEvalOptions) -> Result<Tally> {
    let indices: Vec<usize> = (0..problems).collect();
    evaluate_generative_at(task, engine, &indices, opts)
}

/// [`evaluate_generative`] on the problems at `indices` (a rank's share). A problem's samples
/// depend on the problem and the options only, not on which rank draws them.
pub fn evaluate_generative_at(
    task: &dyn Task,
    engine: &Engine,
    indices: &[usize],
    opts: &ChatEvalOptions,
) -> Result<Tally> {
    let mut tally = Tally::default();
    let mut samples = match &opts.samples_file {
        Some(path) => Some((samples_file(path)?, path)),
        None => None,
    };
    for &index in indices {
        let (completions, grades) = grade_samples(task, engine, index, &generate_options(opts))?;
        if let Some((file, path)) = &mut samples {
            record_samples(file, path, &task.name(), index, &completions, &grades)?;
        }
        let passed = grades.iter().any(|&p| p);
        tally.problems += 1;
        tally.passed += usize::from(passed);
        if opts.progress {
            eprint!("\r{}: {}/{} ({:.2}%)", task.name(), tally.passed, tally.problems, percent(&tally));
        }
    }
    if opts.progress {
        eprintln!();
    }
    Ok(tally)
}

/// The samples file, opened for appending (under MPI every rank appends its own problems to the
/// same file, a line per write).
fn samples_file(path: &Path) -> Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {} for the samples", path.display()))
}

/// Appends one problem's completions and grades as a JSON line.
fn record_samples(
    file: &mut std::fs::File,
    path: &Path,
    task: &str,
    index: usize,
    completions: &[String],
    grades: &[bool],
) -> Result<()> {
    use std::io::Write;
    let line = serde_json::json!({ "task": task, "index": index, "completions": completions, "passed": grades });
    file.write_all(format!("{line}\n").as_bytes()).with_context(|| format!("writing {}", path.display()))
}

/// Samples `gen.num_samples` completions of problem `index` and grades each one: the completions
/// as text and whether each passed.
pub fn grade_samples(
    task: &dyn Task,
    engine: &Engine,
    index: usize,
    gen: &GenerateOptions,
) -> Result<(Vec<String>, Vec<bool>)> {
    let sampled = sample_problem(task, engine, index, gen)?;
    let completions = sampled.completions(engine.tokenizer());
    let grades = completions.iter().map(|c| task.evaluate(&sampled.example, c)).collect();
    Ok((completions, grades))
}

/// The sampling options of a generative eval.
pub fn generate_options(opts: &ChatEvalOptions) -> GenerateOptions {
    GenerateOptions {
        num_samples: opts.num_samples,
        max_tokens: opts.max_new_tokens,
        temperature: opts.temperature,
        top_k: opts.top_k,
        seed: opts.seed,
        ..GenerateOptions::default()
    }
}

/// Completions sampled for one problem: what RL learns from and generative evals grade.
pub struct SampledProblem {
    pub example: Example,
    /// Tokens of the prompt, which every row starts with.
    pub prompt_len: usize,
    /// Per sample, the prompt and its completion (without the token that ended it).
    pub rows: Vec<Vec<u32>>,
    /// Per sample, 1 where the model sampled the token, 0 over the prompt and forced tool output.
    pub masks: Vec<Vec<u8>>,
}

impl SampledProblem {
    /// The completions as text.
    pub fn completions(&self, tokenizer: &bpe::Tokenizer) -> Vec<String> {
        self.rows.iter().map(|row| tokenizer.decode(&row[self.prompt_len..])).collect()
    }
}

/// Renders problem `index` of `task` for completion and samples `gen.num_samples` completions; a
/// long prompt gets fewer new tokens rather than an error, one that fills the context is an error.
pub fn sample_problem(task: &dyn Task, engine: &Engine, index: usize, gen: &GenerateOptions) -> Result<SampledProblem> {
    let tokenizer = engine.tokenizer();
    let limit = engine.max_positions()?;
    let example = task.get(index)?;
    let prompt = render_for_completion(tokenizer, &example.conversation)
        .with_context(|| format!("rendering {} problem {index}", task.name()))?;
    ensure!(
        prompt.len() < limit,
        "{} problem {index}: its prompt of {} tokens leaves no room in the model's {limit} positions",
        task.name(),
        prompt.len()
    );
    let gen = GenerateOptions { max_tokens: gen.max_tokens.min(limit - prompt.len()), ..gen.clone() };
    let (rows, masks) = engine.generate_batch(&prompt, &gen)?;
    Ok(SampledProblem { example, prompt_len: prompt.len(), rows, masks })
}

fn percent(tally: &Tally) -> f64 {
    100.0 * tally.passed as f64 / tally.problems.max(1) as f64
}

#[derive(Args, Debug)]
pub struct ChatEvalArgs {
    /// Tasks to run, separated by `|` or `,` (ARC-Easy, ARC-Challenge, MMLU, GSM8K, HumanEval,
    /// SpellingBee); default: all six, and ChatCORE over them.
    #[arg(short = 'a', long)]
    pub task_name: Option<String>,
    #[command(flatten)]
    pub model: ModelArgs,
    /// Sampling temperature of generative tasks; 0 = greedy.
    #[arg(short = 't', long, default_value_t = 0.0)]
    pub temperature: f64,
    /// Longest completion, in tokens.
    #[arg(short = 'm', long, default_value_t = 512)]
    pub max_new_tokens: usize,
    /// Samples per generative problem; it passes if any sample does.
    #[arg(short = 'n', long, default_value_t = 1)]
    pub num_samples: usize,
    /// Sample among the k most likely tokens only; 0 = all.
    #[arg(short = 'k', long, default_value_t = 50)]
    pub top_k: usize,
    /// Prompts per forward pass for the multiple-choice tasks.
    #[arg(short = 'b', long, default_value_t = 8)]
    pub batch_size: usize,
    /// Evaluate only the first N problems of each task.
    #[arg(short = 'x', long)]
    pub max_problems: Option<usize>,
    #[arg(long, env = "NANOCHAT_DATA_MIRROR", value_name = "DIR", help = crate::data::MIRROR_HELP)]
    pub data_dir: Option<PathBuf>,
    /// Seed of the sampling.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// Append the completions of the generative tasks (GSM8K, HumanEval, SpellingBee) to this
    /// JSON-lines file, special tokens spelled out: to see how the model answers and uses the tool.
    #[arg(long)]
    pub samples: Option<PathBuf>,
    /// Split the problems across processes: auto (MPI under mpirun, NCCL under a torchrun-style
    /// launch), mpi, nccl (GPUs, the `nccl` feature), or none.
    #[arg(long, value_enum, default_value_t = DistMode::Auto)]
    pub dist: DistMode,
}

impl ChatEvalArgs {
    /// The task names asked for, checked.
    pub fn tasks(&self) -> Result<Vec<String>> {
        let Some(list) = &self.task_name else {
            return Ok(TASK_NAMES.iter().map(|s| s.to_string()).collect());
        };
        let names: Vec<String> =
            list.split(['|', ',']).map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect();
        for name in &names {
            ensure!(TASK_NAMES.contains(&name.as_str()), "unknown task {name:?}: use one of {}", TASK_NAMES.join(", "));
        }
        ensure!(!names.is_empty(), "no task named in {list:?}: use one of {}", TASK_NAMES.join(", "));
        Ok(names)
    }

    /// What running the evaluation downloads on first use (nothing with a mirror).
    pub fn downloads(&self) -> Vec<RemoteFile> {
        if self.data_dir.is_some() {
            return Vec::new();
        }
        let online = Online::from_env();
        let tasks = self.tasks().unwrap_or_default();
        tasks.iter().flat_map(|t| task_sources(t)).map(|d| online.file(&d)).collect()
    }

    pub fn options(&self) -> ChatEvalOptions {
        ChatEvalOptions {
            data: DataRoot::from_args(self.data_dir.clone()),
            max_problems: self.max_problems,
            batch_size: self.batch_size,
            num_samples: self.num_samples,
            max_new_tokens: self.max_new_tokens,
            temperature: self.temperature,
            top_k: Some(self.top_k),
            seed: self.seed,
            progress: true,
            samples_file: self.samples.clone(),
        }
    }
}

/// `nanochat chat eval`: loads the model, runs the tasks, prints one line per task and ChatCORE,
/// and writes the JSON report when `--output` is given; on the processes `--dist` finds.
pub fn run(args: ChatEvalArgs) -> Result<()> {
    let comm = dist::init(args.dist)?;
    let result = run_on(&args, comm.as_ref());
    or_abort(comm.as_ref(), result)
}

/// [`run`] as one rank of `comm`: every rank loads the model and scores its share of every task;
/// rank 0 alone prints and writes.
fn run_on(args: &ChatEvalArgs, comm: &dyn Communicator) -> Result<()> {
    let started = Instant::now();
    let tasks = args.tasks()?;
    let opts = args.options();
    let engine = args.model.load_engine(Source::Sft, WeightFormat::F32)?;
    let mut results = Vec::new();
    for task in &tasks {
        let result = run_chat_eval_on(comm, &engine, task, &opts)?;
        if !comm.is_root() {
            continue;
        }
        println!(
            "{}: accuracy {:.4} ({}/{}), centered {:.4}, {:.1}s",
            result.task, result.accuracy, result.passed, result.problems, result.centered, result.seconds
        );
        results.push(result);
    }
    if !comm.is_root() {
        return Ok(());
    }
    let report = ChatCoreReport::new(results);
    let note = if report.complete { "" } else { " (over the tasks run, not all six)" };
    println!("ChatCORE: {:.4}{note}", report.chatcore);
    if let Some(path) = &args.output {
        let json = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, json).with_context(|| format!("writing the results to {}", path.display()))?;
    }
    write_report_section(args, &report, started.elapsed().as_secs_f64())
}

/// The report section `chat_eval_<source>`: accuracy per task, and ChatCORE when all six ran
/// (over fewer tasks it is not comparable, so the summary table shows "-").
fn write_report_section(args: &ChatEvalArgs, report: &ChatCoreReport, seconds: f64) -> Result<()> {
    let source = format!("{:?}", args.model.source.unwrap_or(Source::Sft)).to_lowercase();
    let mut markdown = format!("- model: {source} {}\n", args.model.model_tag.as_deref().unwrap_or("(default tag)"));
    let mut tasks = serde_json::Map::new();
    for r in &report.results {
        markdown.push_str(&format!("- {}: {:.4} ({}/{})\n", r.task, r.accuracy, r.passed, r.problems));
        tasks.insert(r.task.clone(), serde_json::json!(r.accuracy));
    }
    markdown.push_str(&format!(
        "- ChatCORE: {:.4}{}\n",
        report.chatcore,
        if report.complete { "" } else { " (partial)" }
    ));
    let chatcore = report.complete.then_some(report.chatcore);
    let metrics = serde_json::json!({ "seconds": seconds, "tasks": tasks, "chatcore": chatcore });
    crate::report::write_section(&format!("chat_eval_{source}"), &markdown, metrics)?;
    Ok(())
}
