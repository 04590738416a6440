//! Chat evals: the categorical scorer against oracle logits (always right, always 'A', a decoy
//! outside the letters), ChatCORE arithmetic, the command-line task list, and quick runs of the
//! fixture model on ARC-Easy and GSM8K that must be in range and repeatable at temperature 0, and
//! the command's report section.

mod common;

use std::collections::HashMap;

use anyhow::Result;
use clap::Parser;
use common::{fixture_engine, tokenizer};
use nanochat::conversation::render_for_completion;
use nanochat::eval::chat::{
    evaluate_categorical, run_chat_eval, ChatCoreReport, ChatEvalArgs, ChatEvalOptions, ChatEvalResult, TASK_NAMES,
};
use nanochat::tasks::arc::{ArcSubset, ArcTask};
use nanochat::tasks::mmlu::Mmlu;
use nanochat::tasks::{Answer, DataRoot, Task};

fn options(max_problems: usize) -> ChatEvalOptions {
    ChatEvalOptions {
        data: DataRoot::new(common::data()),
        max_problems: Some(max_problems),
        max_new_tokens: 24,
        batch_size: 2,
        ..ChatEvalOptions::default()
    }
}

/// The correct letter's token for every prompt of the first `n` problems.
fn correct_letters(task: &dyn Task, tok: &bpe::Tokenizer, n: usize) -> HashMap<Vec<u32>, u32> {
    (0..n)
        .map(|i| {
            let example = task.get(i).unwrap();
            let Answer::Choice { correct, .. } = &example.answer else { panic!("multiple choice expected") };
            (render_for_completion(tok, &example.conversation).unwrap(), tok.encode(correct)[0])
        })
        .collect()
}

/// Logits that favour `favoured(prompt)` among the letters, with a far larger decoy on a token that
/// is no letter: the scorer must look at the letters only.
fn oracle(
    favoured: impl Fn(&[u32]) -> u32,
    decoy: u32,
    vocab: usize,
) -> impl FnMut(&[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
    move |prompts| {
        Ok(prompts
            .iter()
            .map(|p| {
                let mut row: Vec<f32> = (0..vocab).map(|i| (i % 7) as f32 * 0.01).collect();
                row[decoy as usize] = 100.0;
                row[favoured(p) as usize] = 1.0;
                row
            })
            .collect())
    }
}

#[test]
fn categorical_scoring_picks_the_argmax_letter() -> Result<()> {
    let tok = tokenizer()?;
    let task = ArcTask::load(&DataRoot::new(common::data()), ArcSubset::Easy, "test")?;
    let n = 60;
    let opts = options(n);
    let decoy = tok.encode(" the")[0];
    let correct = correct_letters(&task, &tok, n);
    let vocab = tok.vocab_size();

    let right = evaluate_categorical(&task, &tok, n, &opts, oracle(|p| correct[p], decoy, vocab))?;
    assert_eq!((right.problems, right.passed), (n, n), "the oracle is always right");

    let letter_a = tok.encode("A")[0];
    let always_a = evaluate_categorical(&task, &tok, n, &opts, oracle(|_| letter_a, decoy, vocab))?;
    let answers_a = correct.values().filter(|&&id| id == letter_a).count();
    assert!(0 < answers_a && answers_a < n, "the sample should mix answers");
    assert_eq!(always_a.passed, answers_a);
    // ARC items have 3 to 5 choices: the baseline is the mean chance of a guess, near 1/4
    let baseline = always_a.chance / n as f64;
    assert!((0.2..=0.34).contains(&baseline), "baseline {baseline}");
    Ok(())
}

#[test]
fn mmlu_baseline_is_one_quarter() -> Result<()> {
    let tok = tokenizer()?;
    let task = Mmlu::load(&DataRoot::new(common::data()), "test")?;
    let letter_b = tok.encode("B")[0];
    let tally = evaluate_categorical(&task, &tok, 8, &options(8), oracle(|_| letter_b, 0, tok.vocab_size()))?;
    assert_eq!(tally.chance / 8.0, 0.25);
    Ok(())
}

fn result(task: &str, accuracy: f64, baseline: f64) -> ChatEvalResult {
    ChatEvalResult {
        task: task.to_string(),
        eval_type: String::new(),
        problems: 100,
        passed: (accuracy * 100.0) as usize,
        accuracy,
        baseline,
        centered: (accuracy - baseline) / (1.0 - baseline),
        seconds: 0.0,
    }
}

#[test]
fn chatcore_is_the_mean_centered_accuracy() {
    let partial = ChatCoreReport::new(vec![result("ARC-Easy", 0.5, 0.25), result("GSM8K", 0.1, 0.0)]);
    assert!((partial.chatcore - (1.0 / 3.0 + 0.1) / 2.0).abs() < 1e-12);
    assert!(!partial.complete);
    let all = ChatCoreReport::new(TASK_NAMES.iter().map(|t| result(t, 0.25, 0.25)).collect());
    assert!(all.complete);
    assert_eq!(all.chatcore, 0.0);
    let json = serde_json::to_value(&all).unwrap();
    assert_eq!(json["results"].as_array().unwrap().len(), 6);
}

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    eval: ChatEvalArgs,
}

#[test]
fn the_task_list_is_parsed_and_checked() {
    let cli = Cli::parse_from(["eval", "-a", "ARC-Easy|GSM8K", "-x", "3"]);
    assert_eq!(cli.eval.tasks().unwrap(), ["ARC-Easy", "GSM8K"]);
    assert_eq!(cli.eval.options().max_problems, Some(3));
    assert_eq!(cli.eval.options().temperature, 0.0);
    assert_eq!(Cli::parse_from(["eval"]).eval.tasks().unwrap(), TASK_NAMES);
    let err = Cli::parse_from(["eval", "-a", "ARC-Medium"]).eval.tasks().unwrap_err().to_string();
    assert!(err.contains("ARC-Medium") && err.contains("ARC-Easy"), "{err}");
}

#[test]
fn the_fixture_model_scores_in_range_and_repeatably() -> Result<()> {
    let engine = fixture_engine()?;
    for task in ["ARC-Easy", "GSM8K"] {
        let first = run_chat_eval(&engine, task, &options(3))?;
        let again = run_chat_eval(&engine, task, &options(3))?;
        assert_eq!(first.problems, 3, "{task}");
        assert!(first.passed <= 3 && (0.0..=1.0).contains(&first.accuracy), "{first:?}");
        assert!(first.centered <= 1.0 && first.centered >= -first.baseline / (1.0 - first.baseline), "{first:?}");
        assert_eq!((first.passed, first.baseline), (again.passed, again.baseline), "{task} at temperature 0");
        let expected_type = if task == "GSM8K" { "generative" } else { "categorical" };
        assert_eq!(first.eval_type, expected_type);
        if task == "GSM8K" {
            assert_eq!(first.baseline, 0.0);
        }
    }
    // right-padding in a batch must not change any prediction: one prompt per pass scores the same
    let batched = run_chat_eval(&engine, "ARC-Easy", &ChatEvalOptions { batch_size: 4, ..options(8) })?;
    let single = run_chat_eval(&engine, "ARC-Easy", &ChatEvalOptions { batch_size: 1, ..options(8) })?;
    assert_eq!(batched.passed, single.passed);
    eprintln!("fixture model, 8 ARC-Easy problems: {batched:?}");
    Ok(())
}

#[test]
fn the_samples_file_holds_every_completion_and_its_grade() -> Result<()> {
    let engine = fixture_engine()?;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("samples.jsonl");
    let opts = ChatEvalOptions { samples_file: Some(path.clone()), num_samples: 2, temperature: 1.0, ..options(3) };
    let result = run_chat_eval(&engine, "GSM8K", &opts)?;
    let lines: Vec<serde_json::Value> =
        std::fs::read_to_string(&path)?.lines().map(serde_json::from_str).collect::<Result<_, _>>()?;
    assert_eq!(lines.len(), 3, "one line per problem");
    let mut passed = 0;
    for (i, line) in lines.iter().enumerate() {
        assert_eq!((line["task"].as_str(), line["index"].as_u64()), (Some("GSM8K-test"), Some(i as u64)));
        let (completions, grades) = (line["completions"].as_array().unwrap(), line["passed"].as_array().unwrap());
        assert_eq!((completions.len(), grades.len()), (2, 2));
        // The same completions again, from the engine directly: the file is what was graded.
        let again = nanochat::eval::chat::sample_problem(
            nanochat::eval::chat::load_task("GSM8K", &DataRoot::new(common::data()))?.as_ref(),
            &engine,
            i,
            &nanochat::eval::chat::generate_options(&opts),
        )?;
        let texts = again.completions(engine.tokenizer());
        assert_eq!(completions.iter().map(|c| c.as_str().unwrap()).collect::<Vec<_>>(), texts);
        passed += usize::from(grades.iter().any(|g| g.as_bool() == Some(true)));
    }
    assert_eq!(passed, result.passed);
    Ok(())
}

#[test]
fn humaneval_and_spellingbee_run_end_to_end() -> Result<()> {
    let engine = fixture_engine()?;
    for task in ["HumanEval", "SpellingBee"] {
        let result = run_chat_eval(&engine, task, &options(2))?;
        eprintln!("fixture model: {result:?}");
        assert_eq!((result.problems, result.eval_type.as_str(), result.baseline), (2, "generative", 0.0));
        assert!(result.passed <= 2);
    }
    Ok(())
}

#[test]
fn the_command_loads_a_checkpoint_and_writes_the_json_report() -> Result<()> {
    // a base dir holding the fixture tokenizer and weights as SFT checkpoint d2, step 5
    let base = tempfile::tempdir()?;
    common::fixture_checkpoint(base.path(), "chatsft_checkpoints")?;
    // only this test reads NANOCHAT_BASE_DIR; the others name their data directory
    std::env::set_var("NANOCHAT_BASE_DIR", base.path());
    let output = base.path().join("chat_eval.json");
    let data = common::data();
    let args = [
        "eval",
        "-a",
        "ARC-Easy|GSM8K",
        "-x",
        "2",
        "-m",
        "16",
        "--data-dir",
        data.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
    ];
    nanochat::eval::chat::run(Cli::parse_from(args).eval)?;
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&output)?)?;
    let tasks: Vec<&str> = report["results"].as_array().unwrap().iter().map(|r| r["task"].as_str().unwrap()).collect();
    assert_eq!(tasks, ["ARC-Easy", "GSM8K"]);
    assert_eq!(report["complete"], false);
    assert!(report["chatcore"].as_f64().unwrap() <= 1.0);
    // the report section: accuracy per task; no ChatCORE, since not all six tasks ran
    let section: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(base.path().join("report/chat_eval_sft.json"))?)?;
    let metrics = &section["metrics"];
    assert_eq!(metrics["tasks"]["ARC-Easy"], report["results"][0]["accuracy"]);
    assert!(metrics["tasks"]["GSM8K"].is_number() && metrics["chatcore"].is_null(), "{section}");
    Ok(())
}
