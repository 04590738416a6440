//! CORE evaluation and bits per byte: the bundle parses completely (the small mirror's, and the full
//! one when `NANOCHAT_DATA_MIRROR` names it); prompts and scored token
//! spans of each task type match hand-written expectations (with a byte-level tokenizer, where
//! token positions are byte positions); fake models with known losses give known accuracies; a
//! tiny random GPT runs end to end, deterministically; bpb matches a hand computation.

mod common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use anyhow::Result;
use candle_core::{Device, Tensor};
use nanochat::eval::bundle::parse_core_yaml;
use nanochat::eval::core::{
    centered_accuracy, evaluate_bundle, fewshot_indices, judge, prepare, render_prompts, shuffled_order, NativeScorer,
    Prepared, TokenScores,
};
use nanochat::eval::{bits_per_byte, evaluate_core, BpbTotals, Bundle, Item, LanguageModel, TaskType};
use nanochat::model::decode::DecodeModel;
use nanochat::model::{GPTConfig, GPT};

/// The CORE bundle of the small data mirror: all 22 tasks, a few items each.
fn bundle_dir() -> PathBuf {
    common::data().join("eval/eval_bundle")
}

/// Every byte is a token and id = byte value; BOS = 256.
fn byte_tokenizer() -> bpe::Tokenizer {
    bpe::Tokenizer::from_tokens((0..=255u8).map(|b| vec![b]).collect(), bpe::DEFAULT_PATTERN).unwrap()
}

fn s(x: &str) -> String {
    x.to_string()
}

#[test]
fn core_yaml_parser_folds_quoted_scalars_as_yaml() {
    let yaml = "icl_tasks:\n- label: a\n  dataset_uri: x/a.jsonl\n  num_fewshot:\n  - 10\n  icl_task_type: \
                language_modeling\n  continuation_delimiter: '\n\n    Answer: '\n- label: b\n  dataset_uri: x/b.jsonl\n  \
                num_fewshot:\n  - 0\n  icl_task_type: schema\n  continuation_delimiter: 'it''s\n    folded\n\n    \
                twice '\n- label: c\n  dataset_uri: x/c.jsonl\n  num_fewshot:\n  - 3\n  icl_task_type: multiple_choice\n";
    let tasks = parse_core_yaml(yaml).unwrap();
    // Values as PyYAML's safe_load gives them.
    assert_eq!(tasks.len(), 3);
    assert_eq!((tasks[0].num_fewshot, tasks[0].task_type), (10, TaskType::LanguageModeling));
    assert_eq!(tasks[0].continuation_delimiter, "\nAnswer: ");
    assert_eq!(tasks[1].continuation_delimiter, "it's folded\ntwice ");
    assert_eq!((tasks[2].label.as_str(), tasks[2].continuation_delimiter.as_str()), ("c", " "));
    assert!(parse_core_yaml("icl_tasks:\n- label: a\n  icl_task_type: essay\n").is_err());
}

#[test]
fn bundle_parses_with_items_and_baselines_for_all_22_tasks() {
    let full = common::full_mirror("bundle_parses_with_items_and_baselines_for_all_22_tasks");
    for dir in std::iter::once(bundle_dir()).chain(full.map(|m| m.join("eval/eval_bundle"))) {
        check_bundle(&dir);
    }
    let missing = Bundle::load(Path::new("/nonexistent")).unwrap_err().to_string();
    assert!(missing.contains("--bundle-dir"), "{missing}");
}

/// Every task of the bundle in `dir` has its items (as many as its MANIFEST.json lists), a
/// baseline and the original's delimiter.
fn check_bundle(dir: &Path) {
    let bundle = Bundle::load(dir).unwrap();
    assert_eq!(bundle.tasks.len(), 22);
    let count = |t: TaskType| bundle.tasks.iter().filter(|x| x.task_type == t).count();
    assert_eq!(
        (count(TaskType::MultipleChoice), count(TaskType::Schema), count(TaskType::LanguageModeling)),
        (11, 2, 9)
    );
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("MANIFEST.json")).unwrap()).unwrap();
    let answer_delimited: HashSet<&str> = ["jeopardy", "arc_easy", "arc_challenge", "piqa", "boolq"].into();
    for task in &bundle.tasks {
        let items = bundle.load_items(task).unwrap();
        assert_eq!(items.len() as u64, manifest[&task.dataset_uri]["rows"].as_u64().unwrap(), "{}", task.label);
        let b = bundle.baseline(&task.label).unwrap();
        assert!((0.0..1.0).contains(&b), "{}: {b}", task.label);
        let delimiter = if answer_delimited.contains(task.label.as_str()) { "\nAnswer: " } else { " " };
        assert_eq!(task.continuation_delimiter, delimiter, "{}", task.label);
    }
    // The CSV holds percentages.
    assert!((bundle.baseline("commonsense_qa").unwrap() - 0.403).abs() < 1e-12);
    assert!((bundle.baseline("boolq").unwrap() - 0.62).abs() < 1e-12);
    assert_eq!(bundle.baseline("jeopardy").unwrap(), 0.0);
    let hz = &bundle.tasks[0];
    assert_eq!(
        (hz.label.as_str(), hz.num_fewshot, hz.dataset_uri.as_str()),
        ("hellaswag_zeroshot", 0, "language_understanding/hellaswag.jsonl")
    );
}

/// Bytes of the row in `span`, as text.
fn span_text(rows: &[Vec<u32>], spans: &[(usize, usize)], r: usize) -> String {
    let (a, b) = spans[r];
    String::from_utf8(rows[r][a..b].iter().map(|&t| t as u8).collect()).unwrap()
}

#[test]
fn multiple_choice_prompts_and_spans() {
    let tok = byte_tokenizer();
    let shot = Item::MultipleChoice { query: s("2+2="), choices: vec![s("3"), s("4")], gold: 1 };
    let item = Item::MultipleChoice { query: s("Pet?"), choices: vec![s("the cat"), s("the dog")], gold: 0 };
    let prompts = render_prompts(&item, &[&shot], "\nAnswer: ").unwrap();
    assert_eq!(prompts, [s("2+2=\nAnswer: 4\n\nPet?\nAnswer: the cat"), s("2+2=\nAnswer: 4\n\nPet?\nAnswer: the dog")]);
    let p = prepare(TaskType::MultipleChoice, &prompts, &tok, 1000).unwrap();
    // BOS, then one token per byte; the scored span starts after the longest common token prefix,
    // so the shared "the " is context, as in the original.
    let start = 1 + "2+2=\nAnswer: 4\n\nPet?\nAnswer: the ".len();
    assert_eq!(p.rows[0][0], 256);
    assert_eq!(p.spans, [(start, start + 3), (start, start + 3)]);
    assert_eq!((span_text(&p.rows, &p.spans, 0), span_text(&p.rows, &p.spans, 1)), (s("cat"), s("dog")));
    // Cropped to 10 tokens from the left: the spans move with the tokens.
    let cropped = prepare(TaskType::MultipleChoice, &prompts, &tok, 10).unwrap();
    assert_eq!(cropped.rows[0], p.rows[0][p.rows[0].len() - 10..]);
    assert_eq!(cropped.spans[0], (7, 10));
    // A continuation that does not fit (its predictor token cropped away) is an error.
    assert!(prepare(TaskType::MultipleChoice, &prompts, &tok, 3).is_err());
}

#[test]
fn schema_prompts_and_spans() {
    let tok = byte_tokenizer();
    let item = Item::Schema {
        context_options: vec![s("Ann thanked Bea because Ann"), s("Ann thanked Bea because Bea")],
        continuation: s("was kind."),
        gold: 1,
    };
    let shot = Item::Schema { context_options: vec![s("A"), s("B")], continuation: s("won."), gold: 0 };
    let prompts = render_prompts(&item, &[&shot], " ").unwrap();
    assert_eq!(
        prompts,
        [s("A won.\n\nAnn thanked Bea because Ann was kind."), s("A won.\n\nAnn thanked Bea because Bea was kind.")]
    );
    let p = prepare(TaskType::Schema, &prompts, &tok, 1000).unwrap();
    // The common suffix is " was kind." ("Ann" and "Bea" differ in their last byte).
    let end = 1 + prompts[0].len();
    assert_eq!(p.spans, [(end - 10, end), (end - 10, end)]);
    assert_eq!(span_text(&p.rows, &p.spans, 1), " was kind.");
}

#[test]
fn language_modeling_prompts_and_spans() {
    let tok = byte_tokenizer();
    let shot = Item::LanguageModeling { context: s("  op 1 = "), continuation: s("2") };
    let item = Item::LanguageModeling { context: s("op 3 =\n"), continuation: s("6") };
    let prompts = render_prompts(&item, &[&shot], " ").unwrap();
    // Contexts trimmed; the prompt without continuation loses the delimiter's trailing space.
    assert_eq!(prompts, [s("op 1 = 2\n\nop 3 ="), s("op 1 = 2\n\nop 3 = 6")]);
    let p = prepare(TaskType::LanguageModeling, &prompts, &tok, 1000).unwrap();
    assert_eq!(p.rows.len(), 1);
    assert_eq!(p.spans, [(1 + prompts[0].len(), 1 + prompts[1].len())]);
    assert_eq!(span_text(&p.rows, &p.spans, 0), " 6");
    let mixed =
        render_prompts(&item, &[&Item::Schema { context_options: vec![s("a")], continuation: s("b"), gold: 0 }], " ");
    assert!(mixed.is_err(), "few-shot examples must be of the item's type");
}

#[test]
fn fewshot_draws_and_shuffle_are_deterministic_and_valid() {
    for (idx, n, k) in [(0, 100, 10), (57, 100, 10), (3, 11, 10), (2, 4, 10), (0, 1, 5), (5, 20321, 10)] {
        let a = fewshot_indices(idx, n, k);
        assert_eq!(a, fewshot_indices(idx, n, k));
        assert_eq!(a.len(), k.min(n - 1));
        assert!(a.iter().all(|&i| i != idx && i < n));
        assert_eq!(a.iter().collect::<HashSet<_>>().len(), a.len(), "distinct");
    }
    assert_ne!(fewshot_indices(0, 100, 10), fewshot_indices(1, 100, 10), "seeded per item");
    let order = shuffled_order(1000);
    assert_eq!(order, shuffled_order(1000));
    let mut sorted = order.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (0..1000).collect::<Vec<_>>());
    assert_ne!(order, sorted);
}

#[test]
fn judge_picks_lowest_mean_loss_first_on_ties() {
    let item = Item::MultipleChoice { query: s("q"), choices: vec![s("a"), s("b"), s("c")], gold: 1 };
    let prepared = nanochat::eval::core::Prepared { rows: vec![vec![0; 4]; 3], spans: vec![(1, 3); 3] };
    let scores =
        |l: [[f32; 2]; 3]| TokenScores { losses: l.iter().map(|r| r.to_vec()).collect(), argmax: vec![vec![0; 2]; 3] };
    // Means over the spans: 2.0, 1.0, 1.0 → option 1 (first of the tied minimum).
    let s1 = scores([[1.0, 3.0], [1.5, 0.5], [0.0, 2.0]]);
    assert!(judge(&item, &prepared, &s1).unwrap());
    // All equal → option 0.
    let s0 = scores([[1.0; 2], [1.0; 2], [1.0; 2]]);
    assert!(!judge(&item, &prepared, &s0).unwrap());
    // Scores that do not match the spans are an error, not a verdict.
    let short = TokenScores { losses: vec![vec![1.0]; 3], argmax: vec![vec![0]; 3] };
    assert!(judge(&item, &prepared, &short).is_err());
}

/// A model that puts all probability on the next token of the rows it is told are correct, and
/// is uniform (argmax: id 0) on every other row.
struct Oracle {
    vocab: usize,
    gold_rows: HashSet<Vec<u32>>,
}

impl LanguageModel for Oracle {
    fn max_seq_len(&self) -> usize {
        1 << 20
    }
    fn score(&self, prepared: &Prepared) -> Result<TokenScores> {
        let logits: Vec<Vec<Vec<f32>>> = prepared
            .rows
            .iter()
            .map(|row| {
                (0..row.len())
                    .map(|t| {
                        let mut z = vec![0.0; self.vocab];
                        if let (true, Some(&next)) = (self.gold_rows.contains(row), row.get(t + 1)) {
                            z[next as usize] = 100.0;
                        }
                        z
                    })
                    .collect()
            })
            .collect();
        TokenScores::from_logits(prepared, |r, t| &logits[r][t])
    }
}

/// A bundle of three tasks, one per type, written to a temporary directory.
fn tiny_bundle() -> (tempfile::TempDir, Bundle) {
    let dir = tempfile::tempdir().unwrap();
    let yaml = "icl_tasks:\n- label: mc\n  dataset_uri: t/mc.jsonl\n  num_fewshot:\n  - 2\n  icl_task_type: multiple_choice\n  \
                continuation_delimiter: '\n\n    Answer: '\n- label: sc\n  dataset_uri: t/sc.jsonl\n  num_fewshot:\n  - 0\n  \
                icl_task_type: schema\n- label: lm\n  dataset_uri: t/lm.jsonl\n  num_fewshot:\n  - 3\n  icl_task_type: language_modeling\n";
    std::fs::write(dir.path().join("core.yaml"), yaml).unwrap();
    let csv = "Eval Task,Task Type,Random baseline,Description\nmc,multiple choice,25,\"four, choices\"\nsc,schema,50,x\nlm,lm,0,\"say \"\"hi\"\"\"\n";
    std::fs::write(dir.path().join("eval_meta_data.csv"), csv).unwrap();
    std::fs::create_dir_all(dir.path().join("eval_data/t")).unwrap();
    let golds = [0, 1, 2, 3, 0, 0, 2, 0];
    let mc: Vec<String> = golds
        .iter()
        .enumerate()
        .map(|(i, g)| format!(r#"{{"query": "Question {i}?", "choices": ["A", "B", "C", "D"], "gold": {g}}}"#))
        .collect();
    let sc: Vec<String> = [0, 1, 1, 0]
        .iter()
        .enumerate()
        .map(|(i, g)| format!(r#"{{"context_options": ["{i}: x", "{i}: y"], "continuation": "fell.", "gold": {g}}}"#))
        .collect();
    let lm: Vec<String> =
        (0..5).map(|i| format!(r#"{{"context": "{i} plus {i} is", "continuation": "{}"}}"#, 2 * i)).collect();
    for (name, lines) in [("mc", mc), ("sc", sc), ("lm", lm)] {
        std::fs::write(dir.path().join(format!("eval_data/t/{name}.jsonl")), lines.join("\n") + "\n").unwrap();
    }
    let bundle = Bundle::load(dir.path()).unwrap();
    (dir, bundle)
}

/// The rows an oracle must favour: each item's gold row, built the way the evaluation builds it.
fn gold_rows(bundle: &Bundle, tok: &bpe::Tokenizer, max_per_task: usize) -> HashSet<Vec<u32>> {
    let mut out = HashSet::new();
    for task in &bundle.tasks {
        let all = bundle.load_items(task).unwrap();
        let items: Vec<Item> =
            shuffled_order(all.len()).into_iter().take(max_per_task).map(|i| all[i].clone()).collect();
        for (idx, item) in items.iter().enumerate() {
            let shots: Vec<&Item> =
                fewshot_indices(idx, items.len(), task.num_fewshot).iter().map(|&i| &items[i]).collect();
            let prompts = render_prompts(item, &shots, &task.continuation_delimiter).unwrap();
            let p = prepare(task.task_type, &prompts, tok, usize::MAX).unwrap();
            let gold = match item {
                Item::MultipleChoice { gold, .. } | Item::Schema { gold, .. } => *gold,
                Item::LanguageModeling { .. } => 0,
            };
            out.insert(p.rows[gold].clone());
        }
    }
    out
}

#[test]
fn oracle_scores_perfectly_and_uniform_model_picks_the_first_option() {
    let (dir, bundle) = tiny_bundle();
    let tok = byte_tokenizer();
    let oracle = Oracle { vocab: tok.vocab_size(), gold_rows: gold_rows(&bundle, &tok, usize::MAX) };
    let res = evaluate_bundle(&oracle, &tok, &bundle, None).unwrap();
    for t in &res.tasks {
        assert_eq!((t.accuracy, t.centered), (1.0, 1.0), "{}", t.label);
    }
    assert_eq!(res.core, 1.0);
    assert_eq!(res.tasks.iter().map(|t| t.examples).collect::<Vec<_>>(), [8, 4, 5]);

    // Uniform: every option's mean loss ties (equal span lengths), so option 0 wins; greedy
    // decoding emits id 0, never a continuation.
    let uniform = Oracle { vocab: tok.vocab_size(), gold_rows: HashSet::new() };
    let res = evaluate_bundle(&uniform, &tok, &bundle, None).unwrap();
    let acc: Vec<f64> = res.tasks.iter().map(|t| t.accuracy).collect();
    assert_eq!(acc, [4.0 / 8.0, 2.0 / 4.0, 0.0]);
    let centered = [centered_accuracy(0.5, 0.25), centered_accuracy(0.5, 0.5), 0.0];
    assert_eq!(res.tasks.iter().map(|t| t.centered).collect::<Vec<_>>(), centered);
    assert!((centered[0] - 1.0 / 3.0).abs() < 1e-12);
    assert_eq!(res.core, centered.iter().sum::<f64>() / 3.0);

    // max_per_task cuts after the shuffle: a fresh oracle for the cut still scores 1.
    let oracle = Oracle { vocab: tok.vocab_size(), gold_rows: gold_rows(&bundle, &tok, 3) };
    let res = evaluate_bundle(&oracle, &tok, &bundle, Some(3)).unwrap();
    assert!(res.tasks.iter().all(|t| t.examples == 3 && t.accuracy == 1.0));
    assert!(evaluate_bundle(&oracle, &tok, &bundle, Some(0)).is_err());

    let (csv, json) = res.save(dir.path(), "core").unwrap();
    let csv = std::fs::read_to_string(csv).unwrap();
    assert_eq!(csv.lines().next().unwrap(), format!("{:<35}, {:<10}, {:<10}", "Task", "Accuracy", "Centered"));
    assert!(csv.lines().last().unwrap().starts_with("CORE"));
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap();
    assert_eq!(json["core"], 1.0);
    assert_eq!(json["tasks"][2]["task_type"], "language_modeling");
}

fn tiny_gpt(vocab: usize) -> GPT {
    let cfg = GPTConfig::from_depth(1, vocab, 32);
    assert_eq!(cfg.n_embd, 64);
    GPT::init(&cfg, 7, &Device::Cpu).unwrap().0
}

#[test]
fn gpt_and_native_scores_match_unpadded_logits() {
    let tok = byte_tokenizer();
    let model = tiny_gpt(tok.vocab_size());
    // Rows of different lengths sharing their first three tokens, scored from token 3 on: the
    // native scorer runs the shared prefix (up to the first scored prediction) once.
    let rows = vec![vec![256, 72, 105, 33, 10, 72, 105], vec![256, 72, 105, 65], vec![256, 72, 105, 33]];
    let prepared = Prepared { rows: rows.clone(), spans: vec![(3, 7), (3, 4), (3, 4)] };
    let logits: Vec<Vec<Vec<f32>>> = rows
        .iter()
        .map(|r| {
            let idx = Tensor::new(r.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
            model.forward(&idx, None).unwrap().squeeze(0).unwrap().to_vec2::<f32>().unwrap()
        })
        .collect();
    let expected = TokenScores::from_logits(&prepared, |r, t| &logits[r][t]).unwrap();
    assert_eq!(expected.losses.iter().map(Vec::len).collect::<Vec<_>>(), [4, 1, 1]);
    let native = NativeScorer::new(DecodeModel::from_gpt(&model).unwrap());
    for _ in 0..2 {
        // Twice: the second call reuses the native scorer's cache.
        for scores in [model.score(&prepared).unwrap(), native.score(&prepared).unwrap()] {
            assert_eq!(scores.argmax, expected.argmax);
            for (a, b) in scores.losses.iter().flatten().zip(expected.losses.iter().flatten()) {
                assert!((a - b).abs() < 1e-4, "{a} vs {b}");
            }
        }
    }
    assert_eq!(model.max_seq_len(), 320, "the rotary tables: 10 x sequence_len");
    assert_eq!(native.max_seq_len(), 320);
    let bad = Prepared { rows: rows.clone(), spans: vec![(0, 2), (3, 4), (3, 4)] };
    assert!(native.score(&bad).is_err() && model.score(&bad).is_err(), "span starting at BOS");
}

#[test]
fn native_scores_equal_gpt_scores_on_real_core_items() {
    let bundle = Bundle::load(&bundle_dir()).unwrap();
    let tok = byte_tokenizer();
    let model = tiny_gpt(tok.vocab_size());
    let native = NativeScorer::new(DecodeModel::from_gpt(&model).unwrap());
    let (mut positions, mut same_argmax, mut worst) = (0usize, 0usize, 0f32);
    for task in &bundle.tasks {
        let all = bundle.load_items(task).unwrap();
        let items: Vec<Item> = shuffled_order(all.len()).into_iter().take(2).map(|i| all[i].clone()).collect();
        for (idx, item) in items.iter().enumerate() {
            let shots: Vec<&Item> =
                fewshot_indices(idx, items.len(), task.num_fewshot).iter().map(|&i| &items[i]).collect();
            let prompts = render_prompts(item, &shots, &task.continuation_delimiter).unwrap();
            let p = prepare(task.task_type, &prompts, &tok, model.max_seq_len()).unwrap();
            let (g, n) = (model.score(&p).unwrap(), native.score(&p).unwrap());
            for (a, b) in g.losses.iter().flatten().zip(n.losses.iter().flatten()) {
                worst = worst.max((a - b).abs() / a.abs().max(1.0));
            }
            for (a, b) in g.argmax.iter().flatten().zip(n.argmax.iter().flatten()) {
                positions += 1;
                same_argmax += usize::from(a == b);
            }
            assert_eq!(judge(item, &p, &g).unwrap(), judge(item, &p, &n).unwrap(), "{} item {idx}", task.label);
        }
    }
    assert!(worst < 1e-4, "largest relative loss difference {worst}");
    // A random model's logits are nearly flat, so a rounding-level difference may flip a near tie.
    assert!(same_argmax as f64 >= 0.99 * positions as f64, "{same_argmax} of {positions} argmax equal");
}

#[test]
fn tiny_gpt_runs_core_end_to_end_deterministically() {
    let bundle = Bundle::load(&bundle_dir()).unwrap();
    let text: Vec<String> = bundle
        .tasks
        .iter()
        .take(4)
        .flat_map(|t| bundle.load_items(t).unwrap().into_iter().take(50))
        .map(|item| format!("{item:?}"))
        .collect();
    let tok = bpe::Tokenizer::train(&text, 320, bpe::DEFAULT_PATTERN).unwrap();
    let model = tiny_gpt(tok.vocab_size());
    let a = evaluate_core(&model, &tok, &bundle_dir(), Some(2)).unwrap();
    let b = evaluate_core(&model, &tok, &bundle_dir(), Some(2)).unwrap();
    assert_eq!(a.tasks.len(), 22);
    for (x, y) in a.tasks.iter().zip(&b.tasks) {
        assert_eq!((x.examples, x.accuracy, x.centered), (y.examples, y.accuracy, y.centered), "{}", x.label);
        assert!([0.0, 0.5, 1.0].contains(&x.accuracy), "{}: {}", x.label, x.accuracy);
        assert_eq!(x.centered, centered_accuracy(x.accuracy, bundle.baseline(&x.label).unwrap()));
        assert!(x.centered <= 1.0);
    }
    assert_eq!(a.core, b.core);
    assert!((a.core - a.tasks.iter().map(|t| t.centered).sum::<f64>() / 22.0).abs() < 1e-12);
}

#[test]
fn bits_per_byte_by_hand() {
    // Ids 0, 1, 3 have 1, 2, 3 bytes; id 2 is a special (0 bytes); -1 is ignored.
    let token_bytes = [1, 2, 0, 3];
    let losses = [1.0, 2.0, 3.0, 4.0, 5.0];
    let targets = [0, 1, 2, 3, -1];
    // Counted: 1.0 + 2.0 + 4.0 = 7 nats over 1 + 2 + 3 = 6 bytes.
    let expected = 7.0 / (std::f64::consts::LN_2 * 6.0);
    assert!((bits_per_byte(&losses, &targets, &token_bytes).unwrap() - expected).abs() < 1e-12);
    let mut totals = BpbTotals::default();
    totals.add(&losses[..2], &targets[..2], &token_bytes).unwrap();
    totals.add(&losses[2..], &targets[2..], &token_bytes).unwrap();
    assert_eq!(totals, BpbTotals { nats: 7.0, bytes: 6 });
    assert!(bits_per_byte(&[1.0], &[4], &token_bytes).is_err(), "outside the vocabulary");
    assert!(bits_per_byte(&[1.0], &[2], &token_bytes).is_err(), "no bytes counted");
    assert!(bits_per_byte(&[1.0, 2.0], &[0], &token_bytes).is_err(), "misaligned");
}
