//! Pretraining on a tiny model and synthetic shards: the loss falls, a resumed run is identical to
//! an uninterrupted one, gradient accumulation equals one big batch, and bits per byte matches a
//! hand computation; on a slice of real text (Gutenberg, from the small data mirror), 300 steps take
//! the loss well below the text's unigram entropy.

mod common;

use std::path::Path;

use candle_core::{Device, Tensor};
use clap::Parser;
use nanochat::checkpoint;
use nanochat::data::dataset::write_shard;
use nanochat::eval::{evaluate_bpb, BpbTotals};
use nanochat::model::{GPTConfig, GPT};
use nanochat::optim::{setup_optimizers, OptimConfig};
use nanochat::train::base::{evaluate_checkpoint, train, TrainArgs};
use nanochat::train::forward_backward;

/// Documents of simple, repetitive sentences: easy to learn, so the loss falls within a few steps.
fn make_docs(count: usize, seed: u64) -> Vec<String> {
    const SUBJECTS: [&str; 4] = ["the cat", "a dog", "the old man", "my sister"];
    const VERBS: [&str; 4] = ["sees", "likes", "walks past", "waits for"];
    const OBJECTS: [&str; 4] = ["the river.", "a red house.", "the garden.", "an open door."];
    let mut x = seed;
    let mut next = move || {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (x >> 33) as usize
    };
    (0..count)
        .map(|_| {
            let sentences = 5 + next() % 10;
            let parts: Vec<String> = (0..sentences)
                .map(|_| format!("{} {} {}", SUBJECTS[next() % 4], VERBS[next() % 4], OBJECTS[next() % 4]))
                .collect();
            parts.join(" ")
        })
        .collect()
}

/// A training and a validation shard in `dir`, and a 300-token tokenizer trained on the text.
fn setup(dir: &Path) -> bpe::Tokenizer {
    let train_docs = make_docs(400, 1);
    write_shard(&dir.join("shard_00000.parquet"), &train_docs).unwrap();
    write_shard(&dir.join("shard_00001.parquet"), &make_docs(40, 2)).unwrap();
    bpe::Tokenizer::train(train_docs.iter().take(100), 300, bpe::DEFAULT_PATTERN).unwrap()
}

fn args(data: &Path, extra: &[&str]) -> TrainArgs {
    let data = data.to_string_lossy().into_owned();
    let mut argv = vec![
        "train",
        "--depth",
        "1",
        "--n-embd",
        "64",
        "--max-seq-len",
        "32",
        "--device-batch-size",
        "4",
        "--total-batch-size",
        "256",
        "--eval-every",
        "0",
        "--sample-every",
        "0",
        "--data-dir",
        &data,
    ];
    argv.extend_from_slice(extra);
    TrainArgs::try_parse_from(argv).unwrap()
}

fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len() as f64
}

#[test]
fn loss_falls_and_the_run_leaves_a_checkpoint_and_metrics() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = setup(tmp.path());
    let out = tmp.path().join("ckpt");
    let report = train(&args(tmp.path(), &["--num-iterations", "20", "--eval-every", "20"]), &tok, &out).unwrap();
    assert_eq!(report.losses.len(), 20);
    let (first, last) = (mean(&report.losses[..3]), mean(&report.losses[17..]));
    assert!(last < first - 1.0, "loss did not fall: {:?}", report.losses);
    // Uniform guessing over 300 tokens would be ln(300) / ln(2) / (bytes per token) bits per byte.
    let bpb = report.val_bpb.unwrap();
    assert!(bpb.is_finite() && bpb > 0.0 && bpb < 2.5, "val bpb {bpb}");
    assert_eq!(checkpoint::latest_step(&out).unwrap(), Some(20));
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().filter(|l| l.contains("\"loss\"")).count(), 20);
    assert_eq!(metrics.lines().filter(|l| l.contains("val_bpb")).count(), 2);

    // `base eval` on the saved weights reproduces the last in-training evaluation (same tokens).
    let (eval_bpb, samples) = evaluate_checkpoint(&out, 20, &tok, tmp.path(), 4, 20 * 256).unwrap();
    assert_eq!(eval_bpb, bpb);
    assert_eq!(samples.len(), 6);
    assert!(samples[0].starts_with("The capital of France is"));
}

#[test]
fn resumed_run_equals_uninterrupted_run() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = setup(tmp.path());
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let straight = args(tmp.path(), &["--num-iterations", "6", "--save-every", "3", "--eval-every", "3"]);
    let full = train(&straight, &tok, &a).unwrap();
    // Only the step-3 checkpoint travels: the resumed run knows nothing else of the first.
    for path in [checkpoint::model_path, checkpoint::optim_path, checkpoint::meta_path] {
        std::fs::create_dir_all(&b).unwrap();
        std::fs::copy(path(&a, 3), path(&b, 3)).unwrap();
    }
    // The metrics of the first run's later steps must give way to the resumed run's.
    std::fs::copy(a.join("metrics.jsonl"), b.join("metrics.jsonl")).unwrap();
    let resumed_args = args(
        tmp.path(),
        &["--num-iterations", "6", "--save-every", "3", "--eval-every", "3", "--resume-from-step", "3"],
    );
    let resumed = train(&resumed_args, &tok, &b).unwrap();
    assert_eq!(resumed.start_step, 3);
    assert_eq!(resumed.losses, full.losses[3..], "losses after the resume differ");
    assert_eq!(resumed.val_bpb, full.val_bpb);
    let ca = checkpoint::load(&a, 6, &Device::Cpu, true, Some(&tok.fingerprint())).unwrap();
    let cb = checkpoint::load(&b, 6, &Device::Cpu, true, Some(&tok.fingerprint())).unwrap();
    for (name, t) in &ca.model {
        let (x, y) = (t.flatten_all().unwrap().to_vec1::<f32>().unwrap(), cb.model[name].flatten_all().unwrap());
        assert_eq!(x, y.to_vec1::<f32>().unwrap(), "{name} differs after resume");
    }
    assert_eq!(ca.meta.loader_state, cb.meta.loader_state);
    assert_eq!(ca.meta.loop_state.smooth_train_loss, cb.meta.loop_state.smooth_train_loss);
    let records = |dir: &Path| -> Vec<(u64, Option<f64>, Option<f64>)> {
        let text = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
        let values = text.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap());
        values.map(|v| (v["step"].as_u64().unwrap(), v["loss"].as_f64(), v["val_bpb"].as_f64())).collect()
    };
    assert_eq!(records(&a), records(&b));

    // Resuming with another model shape, or from a step that was never saved, says what is wrong.
    let wrong = args(tmp.path(), &["--num-iterations", "6", "--n-embd", "128", "--resume-from-step", "3"]);
    let err = format!("{:#}", train(&wrong, &tok, &b).unwrap_err());
    assert!(err.contains("resume with the options of the original run"), "{err}");
    let missing = args(tmp.path(), &["--num-iterations", "6", "--resume-from-step", "4"]);
    let err = format!("{:#}", train(&missing, &tok, &b).unwrap_err());
    assert!(err.contains("no checkpoint for step 4"), "{err}");
}

#[test]
fn batch_sizes_that_do_not_divide_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = setup(tmp.path());
    let bad = args(tmp.path(), &["--num-iterations", "1", "--total-batch-size", "300"]);
    let err = format!("{:#}", train(&bad, &tok, &tmp.path().join("x")).unwrap_err());
    assert!(err.contains("multiple of --device-batch-size 4 x --max-seq-len 32"), "{err}");
}

fn tiny_config() -> GPTConfig {
    GPTConfig {
        sequence_len: 16,
        vocab_size: 50,
        n_layer: 2,
        n_head: 2,
        n_kv_head: 2,
        n_embd: 32,
        rotary: Default::default(),
    }
}

fn random_ids(n: usize, seed: u32) -> Vec<u32> {
    (0..n as u32).map(|i| (i.wrapping_mul(2654435761).wrapping_add(seed) >> 7) % 50).collect()
}

#[test]
fn two_micro_batches_of_two_equal_one_batch_of_four() {
    let dev = Device::Cpu;
    let cfg = tiny_config();
    let ids = random_ids(4 * 16, 1);
    let targets: Vec<i64> = random_ids(4 * 16, 2).into_iter().map(i64::from).collect();
    let x = Tensor::from_vec(ids, (4, 16), &dev).unwrap();
    let y = Tensor::from_vec(targets, (4, 16), &dev).unwrap();
    let mut results = Vec::new();
    for accum in [1, 2] {
        let (model, varmap) = GPT::init(&cfg, 5, &dev).unwrap();
        let mut opt = setup_optimizers(&model, &varmap, &OptimConfig::default()).unwrap();
        let vars: Vec<_> = opt.vars().cloned().collect();
        let rows = 4 / accum;
        let micro = (0..accum).map(|i| Ok((x.narrow(0, i * rows, rows)?, y.narrow(0, i * rows, rows)?)));
        let (loss, store) = forward_backward(&model, &vars, micro, accum).unwrap();
        let grads: Vec<Vec<f32>> =
            vars.iter().map(|v| store.get(v).unwrap().flatten_all().unwrap().to_vec1().unwrap()).collect();
        opt.step(&store).unwrap();
        let weights: Vec<Vec<f32>> = vars.iter().map(|v| v.flatten_all().unwrap().to_vec1().unwrap()).collect();
        results.push((loss, grads, weights));
    }
    let (one, two) = (&results[0], &results[1]);
    assert!((one.0 - two.0).abs() < 1e-5, "losses {} vs {}", one.0, two.0);
    let max_diff = |a: &[Vec<f32>], b: &[Vec<f32>]| {
        a.iter().flatten().zip(b.iter().flatten()).map(|(p, q)| (p - q).abs()).fold(0.0f32, f32::max)
    };
    let grad_diff = max_diff(&one.1, &two.1);
    let weight_diff = max_diff(&one.2, &two.2);
    println!("max |grad diff| {grad_diff:e}, max |weight diff| after a step {weight_diff:e}");
    assert!(grad_diff < 1e-5, "gradients differ by {grad_diff}");
    assert!(weight_diff < 1e-5, "weights after a step differ by {weight_diff}");
}

#[test]
fn bits_per_byte_matches_a_hand_computation() {
    // Totals alone: -1 targets and zero-byte (special) targets are left out of both sums.
    let mut totals = BpbTotals::default();
    totals.add(&[1.0, 2.0, 4.0, 8.0], &[0, -1, 2, 3], &[3, 5, 0, 2]).unwrap();
    assert_eq!((totals.nats, totals.bytes), (9.0, 5));

    // Through the model: log-softmax by hand, in f64, from the logits.
    let dev = Device::Cpu;
    let cfg = tiny_config();
    let (model, _) = GPT::init(&cfg, 9, &dev).unwrap();
    let ids = random_ids(2 * 16, 3);
    let mut targets: Vec<i64> = random_ids(2 * 16, 4).into_iter().map(i64::from).collect();
    targets[5] = -1;
    targets[6] = 49; // a "special": zero bytes below
    let token_bytes: Vec<u32> = (0..50).map(|i| if i == 49 { 0 } else { 1 + i % 4 }).collect();
    let x = Tensor::from_vec(ids, (2, 16), &dev).unwrap();
    let y = Tensor::from_vec(targets.clone(), (2, 16), &dev).unwrap();
    let logits: Vec<Vec<f32>> = model.forward(&x, None).unwrap().reshape((32, 50)).unwrap().to_vec2().unwrap();
    let (mut nats, mut bytes) = (0.0f64, 0u64);
    for (row, &t) in logits.iter().zip(&targets) {
        if t < 0 || token_bytes[t as usize] == 0 {
            continue;
        }
        let max = row.iter().fold(f64::MIN, |m, &v| m.max(f64::from(v)));
        let lse = max + row.iter().map(|&v| (f64::from(v) - max).exp()).sum::<f64>().ln();
        nats += lse - f64::from(row[t as usize]);
        bytes += u64::from(token_bytes[t as usize]);
    }
    let expected = nats / (std::f64::consts::LN_2 * bytes as f64);
    let got = evaluate_bpb(&model, [Ok((x.clone(), y.clone()))], &token_bytes).unwrap();
    assert!((got - expected).abs() < 1e-5 * expected, "bpb {got} vs hand {expected}");
}

#[test]
fn the_horizon_comes_from_iterations_flops_or_the_chinchilla_ratio() {
    let parse = |extra: &[&str]| {
        let mut argv = vec!["train", "--depth", "2", "--max-seq-len", "64", "--device-batch-size", "2"];
        argv.extend_from_slice(&["--total-batch-size", "1024"]);
        argv.extend_from_slice(extra);
        TrainArgs::try_parse_from(argv).unwrap()
    };
    let cfg = parse(&[]).model_config(512).unwrap();
    assert_eq!((cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_kv_head), (2, 128, 1, 1));
    assert_eq!(parse(&[]).grad_accum_steps().unwrap(), 8);
    assert_eq!(parse(&["--num-iterations", "7"]).num_iterations(&cfg).unwrap(), 7);
    let chinchilla = (20 * cfg.num_params()) / 1024;
    assert_eq!(parse(&[]).num_iterations(&cfg).unwrap(), chinchilla);
    let flops = format!("{}", cfg.estimate_flops() as f64 * 1024.0 * 300.0);
    assert_eq!(parse(&["--target-flops", &flops]).num_iterations(&cfg).unwrap(), 300);
    assert!(TrainArgs::try_parse_from(["train", "--num-iterations", "3", "--target-flops", "1e9"]).is_err());
    let gqa = parse(&["--n-embd", "256", "--n-kv-head", "1"]).model_config(512).unwrap();
    assert_eq!((gqa.n_embd, gqa.n_head, gqa.n_kv_head), (256, 2, 1));
    let err = format!("{:#}", parse(&["--n-embd", "256", "--n-kv-head", "3"]).model_config(512).unwrap_err());
    assert!(err.contains("n_kv_head must divide n_head"), "{err}");
}

#[test]
fn a_few_hundred_steps_on_gutenberg_beat_the_unigram_entropy() {
    // A ~400 kB slice of the mirror's Gutenberg text, in 2,000-character documents.
    let mirror = common::data().join("pretrain/gutenberg");
    let shard = nanochat::data::dataset::Shard::open(&mirror.join("shard_00000.parquet")).unwrap();
    let text: String = shard.read_texts(0).unwrap().concat().chars().take(440_000).collect();
    let chars: Vec<char> = text.chars().collect();
    let docs: Vec<String> = chars.chunks(2_000).map(|c| c.iter().collect()).collect();
    let (train_docs, val_docs) = docs.split_at(200);
    let tmp = tempfile::tempdir().unwrap();
    write_shard(&tmp.path().join("shard_00000.parquet"), train_docs).unwrap();
    write_shard(&tmp.path().join("shard_00001.parquet"), val_docs).unwrap();
    let tok = bpe::Tokenizer::train(train_docs.iter(), 512, bpe::DEFAULT_PATTERN).unwrap();

    // The unigram entropy of the training tokens (documents start with BOS, as the loader feeds them).
    let mut counts = vec![0u64; tok.vocab_size()];
    for doc in train_docs {
        counts[tok.bos_id() as usize] += 1;
        for id in tok.encode(doc) {
            counts[id as usize] += 1;
        }
    }
    let total = counts.iter().sum::<u64>() as f64;
    let unigram: f64 = counts.iter().filter(|&&c| c > 0).map(|&c| -(c as f64 / total) * (c as f64 / total).ln()).sum();

    let extra = ["--max-seq-len", "64", "--device-batch-size", "8", "--total-batch-size", "512"];
    let mut all = vec!["--num-iterations", "300"];
    all.extend_from_slice(&extra);
    let report = train(&args(tmp.path(), &all), &tok, &tmp.path().join("ckpt")).unwrap();
    let last = mean(&report.losses[report.losses.len() - 20..]);
    println!("unigram entropy {unigram:.3} nats, loss {:.3} -> {last:.3}", report.losses[0]);
    assert!(last < unigram - 0.5, "loss {last:.3} is not well below the unigram entropy {unigram:.3}");
}
