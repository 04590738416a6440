//! Midtraining and SFT on a tiny model: a base checkpoint is pretrained in-test for 2 steps, then
//! midtraining lowers the loss on a small repeated mixture, resumes exactly, and leaves a checkpoint
//! the engine loads; SFT trains only on the assistant's tokens and leaves a loadable checkpoint; RL
//! raises a toy reward and runs on GSM8K; the original's mixtures build from the small data mirror
//! (and the full one, with its sizes, when `NANOCHAT_DATA_MIRROR` names it).

mod common;

use std::path::Path;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use clap::Parser;
use nanochat::checkpoint::{self, Checkpoint};
use nanochat::checkpoint::{ModelArgs, Source};
use nanochat::conversation::render_conversation;
use nanochat::data::dataset::write_shard;
use nanochat::engine::GenerateOptions;
use nanochat::eval::chat::sample_problem;
use nanochat::model::decode::WeightFormat;
use nanochat::tasks::identity::Identity;
use nanochat::tasks::mixture::TaskSequence;
use nanochat::tasks::Task;
use nanochat::train::mid::{self, split_off_val, MidArgs};
use nanochat::train::rl::{self, RlArgs};
use nanochat::train::sft::{self, collate, SftArgs};

/// Identity conversations, the same `copies` times over: easy to learn within a few steps.
fn repeated_identity(copies: usize) -> Arc<dyn Task> {
    let one: Arc<dyn Task> = Arc::new(Identity::new(6, 7));
    Arc::new(TaskSequence::new(vec![one; copies]))
}

/// Text for the tokenizer and the pretraining shards: the identity conversations' words.
fn texts() -> Vec<String> {
    let task = Identity::new(40, 3);
    (0..task.len())
        .map(|i| {
            let conv = task.get(i).unwrap().conversation;
            serde_json::to_string(&conv).unwrap()
        })
        .collect()
}

/// A 300-token tokenizer, and a base checkpoint of a 1-layer model pretrained 2 steps, in `base`
/// laid out as `$NANOCHAT_BASE_DIR`. Returns the tokenizer and the base checkpoint.
fn setup(base: &Path) -> (bpe::Tokenizer, Checkpoint) {
    let docs = texts();
    let tok = bpe::Tokenizer::train(docs.iter(), 300, bpe::DEFAULT_PATTERN).unwrap();
    tok.save(&base.join("tokenizer")).unwrap();
    let shards = base.join("base_data");
    std::fs::create_dir_all(&shards).unwrap();
    write_shard(&shards.join("shard_00000.parquet"), &docs).unwrap();
    write_shard(&shards.join("shard_00001.parquet"), &docs[..5]).unwrap();
    let shards = shards.to_string_lossy().into_owned();
    let argv = [
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
        "128",
        "--num-iterations",
        "2",
        "--eval-every",
        "0",
        "--sample-every",
        "0",
        "--data-dir",
        &shards,
    ];
    let args = nanochat::train::base::TrainArgs::try_parse_from(argv).unwrap();
    let dir = base.join("base_checkpoints/d1");
    nanochat::train::base::train(&args, &tok, &dir).unwrap();
    let ckpt = checkpoint::load(&dir, 2, &Device::Cpu, false, Some(&tok.fingerprint())).unwrap();
    (tok, ckpt)
}

fn mid_args(extra: &[&str]) -> MidArgs {
    let mut argv = vec!["train", "--device-batch-size", "4", "--total-batch-size", "128", "--eval-every", "5"];
    argv.extend_from_slice(extra);
    MidArgs::try_parse_from(argv).unwrap()
}

fn sft_args(extra: &[&str]) -> SftArgs {
    let mut argv = vec![
        "train",
        "--device-batch-size",
        "2",
        "--target-examples-per-step",
        "4",
        "--eval-steps",
        "2",
        "--eval-every",
        "3",
    ];
    argv.extend_from_slice(extra);
    SftArgs::try_parse_from(argv).unwrap()
}

fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len() as f64
}

#[test]
fn mid_then_sft_train_and_leave_checkpoints_the_engine_loads() {
    let base = tempfile::tempdir().unwrap();
    let (tok, base_ckpt) = setup(base.path());

    let (train_task, val_task) = split_off_val(repeated_identity(40), 0.1).unwrap();
    let mid_dir = base.path().join("mid_checkpoints/d1");
    let args = mid_args(&["--num-iterations", "15", "--matrix-lr", "0.04"]);
    let report = mid::train(&args, &tok, train_task.as_ref(), val_task.as_ref(), &base_ckpt, &mid_dir).unwrap();
    assert_eq!(report.losses.len(), 15);
    let (first, last) = (mean(&report.losses[..3]), mean(&report.losses[12..]));
    assert!(last < first - 0.5, "midtraining loss did not fall: {:?}", report.losses);
    assert!(report.val_bpb.is_some_and(f64::is_finite));
    assert_eq!(checkpoint::latest_step(&mid_dir).unwrap(), Some(15));

    // SFT from the midtrained weights, on the same conversations.
    let mid_ckpt = checkpoint::load(&mid_dir, 15, &Device::Cpu, false, Some(&tok.fingerprint())).unwrap();
    let sft_dir = base.path().join("chatsft_checkpoints/d1");
    let report = sft::train(
        &sft_args(&["--max-iterations", "6"]),
        &tok,
        train_task.as_ref(),
        val_task.as_ref(),
        &mid_ckpt,
        &sft_dir,
    )
    .unwrap();
    assert_eq!(report.losses.len(), 6);
    assert!(report.losses.iter().all(|l| l.is_finite()) && report.val_loss.is_finite());
    assert_eq!(checkpoint::latest_step(&sft_dir).unwrap(), Some(6));

    // only this test reads NANOCHAT_BASE_DIR; the others pass their directories
    std::env::set_var("NANOCHAT_BASE_DIR", base.path());
    for source in [Source::Mid, Source::Sft] {
        let engine = ModelArgs { source: Some(source), ..ModelArgs::default() }
            .load_engine(Source::Sft, WeightFormat::F32)
            .unwrap();
        assert_eq!(engine.model().config(), &base_ckpt.meta.model_config);
    }
    // The stages find their starting checkpoint the same way: the deepest tag, the latest step.
    let (ckpt, at) = ModelArgs::default().load(Source::Mid, &tok, &Device::Cpu).unwrap();
    assert_eq!((ckpt.meta.step, at.tag.as_str()), (15, "d1"));
    let Err(err) = ModelArgs::default().load(Source::Rl, &tok, &Device::Cpu) else {
        panic!("there is no RL checkpoint to load");
    };
    assert!(format!("{err:#}").contains("run `nanochat rl train` first"), "{err:#}");
}

#[test]
fn resumed_midtraining_equals_uninterrupted_midtraining() {
    let tmp = tempfile::tempdir().unwrap();
    let (tok, base_ckpt) = setup(tmp.path());
    let (train_task, val_task) = split_off_val(repeated_identity(20), 0.1).unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let run = |extra: &[&str], dir: &Path| {
        let mut all = vec!["--num-iterations", "6", "--save-every", "3", "--eval-every", "3"];
        all.extend_from_slice(extra);
        mid::train(&mid_args(&all), &tok, train_task.as_ref(), val_task.as_ref(), &base_ckpt, dir).unwrap()
    };
    let full = run(&[], &a);
    for path in [checkpoint::model_path, checkpoint::optim_path, checkpoint::meta_path] {
        std::fs::create_dir_all(&b).unwrap();
        std::fs::copy(path(&a, 3), path(&b, 3)).unwrap();
    }
    let resumed = run(&["--resume-from-step", "3"], &b);
    assert_eq!(resumed.start_step, 3);
    assert_eq!(resumed.losses, full.losses[3..], "losses after the resume differ");
    assert_eq!(resumed.val_bpb, full.val_bpb);
    let ca = checkpoint::load(&a, 6, &Device::Cpu, true, None).unwrap();
    let cb = checkpoint::load(&b, 6, &Device::Cpu, true, None).unwrap();
    for (name, t) in &ca.model {
        let (x, y) = (t.flatten_all().unwrap().to_vec1::<f32>().unwrap(), cb.model[name].flatten_all().unwrap());
        assert_eq!(x, y.to_vec1::<f32>().unwrap(), "{name} differs after resume");
    }
    // The EMA goes through the meta's JSON, which serde_json (without `float_roundtrip`) may read
    // back an ulp off; the weights and losses above are the exact check.
    let (ema_a, ema_b) = (ca.meta.loop_state.smooth_train_loss, cb.meta.loop_state.smooth_train_loss);
    assert!((ema_a - ema_b).abs() < 1e-12, "{ema_a} vs {ema_b}");

    // A resume over other data is refused rather than silently diverging.
    let (other, _) = split_off_val(repeated_identity(30), 0.1).unwrap();
    let err =
        mid::train(&mid_args(&["--resume-from-step", "3"]), &tok, other.as_ref(), val_task.as_ref(), &base_ckpt, &b)
            .unwrap_err();
    assert!(format!("{err:#}").contains("resume with the original options"), "{err:#}");
}

#[test]
fn sft_targets_are_ignored_exactly_where_the_mask_is_zero_or_padding() {
    let tok = bpe::Tokenizer::train(texts().iter(), 300, bpe::DEFAULT_PATTERN).unwrap();
    let task = Identity::new(3, 11);
    let rendered: Vec<_> =
        (0..3).map(|i| render_conversation(&tok, &task.get(i).unwrap().conversation, 1000).unwrap()).collect();
    let pad = tok.special_id("<|assistant_end|>").unwrap();
    let (inputs, targets, cols) = collate(&rendered, pad);
    assert_eq!(cols, rendered.iter().map(|(ids, _)| ids.len()).max().unwrap() - 1);
    for (row, (ids, mask)) in rendered.iter().enumerate() {
        for i in 0..cols {
            let (x, y) = (inputs[row * cols + i], targets[row * cols + i]);
            if i + 1 < ids.len() {
                assert_eq!(x, ids[i]);
                let expected = if mask[i + 1] == 1 { i64::from(ids[i + 1]) } else { -1 };
                assert_eq!(y, expected, "row {row} position {i}");
            } else {
                assert_eq!((x, y), (pad, -1), "row {row} position {i} is padding");
            }
        }
        // Some targets are trained on, some (the user's turn) are not.
        let row_targets = &targets[row * cols..(row + 1) * cols];
        assert!(row_targets.iter().any(|&t| t >= 0) && row_targets.iter().any(|&t| t < 0));
    }
}

#[test]
fn the_original_mixtures_build_from_the_data_mirrors() {
    check_mixtures(&common::data(), false);
    if let Some(full) = common::full_mirror("the_original_mixtures_build_from_the_data_mirrors") {
        check_mixtures(&full, true);
    }
}

/// Midtraining's mixture, 2% held out for validation (a rounded share on the small mirror's few
/// hundred conversations), and SFT's, from the mirror `data` (`full`: the whole offline mirror).
fn check_mixtures(data: &Path, full: bool) {
    let data = data.to_string_lossy().into_owned();
    let args = mid_args(&["--data-dir", &data]);
    let (train, val) = mid::mid_mixture(&args.stage, args.val_fraction).unwrap();
    let total = train.len() + val.len();
    if full {
        assert!(val.len() * 49 < total && val.len() * 51 > total);
    } else {
        assert!(!val.is_empty() && val.len() * 10 < total, "{} of {total} held out", val.len());
    }
    // every task of the original mixture is in it
    assert!(train.name().contains("GSM8K") && train.name().contains("SpellingBee"), "{}", train.name());
    let (sft_train, sft_val) = sft::sft_mixture(&sft_args(&["--data-dir", &data]).stage).unwrap();
    // the spelling tasks alone are 600 conversations
    assert!(sft_train.len() > if full { 10_000 } else { 600 } && !sft_val.is_empty());
}

#[test]
fn sft_loss_is_the_mean_over_supervised_tokens_and_ignores_masked_targets() {
    let tmp = tempfile::tempdir().unwrap();
    let (tok, ckpt) = setup(tmp.path());
    let (model, _) = checkpoint::model_from_checkpoint(&ckpt, &Device::Cpu).unwrap();
    let task = Identity::new(2, 5);
    // cut to 200 tokens: the model's rotary tables reach 10 × its 32-token context
    let mut rendered: Vec<_> =
        (0..2).map(|i| render_conversation(&tok, &task.get(i).unwrap().conversation, 200).unwrap()).collect();
    let pad = tok.special_id("<|assistant_end|>").unwrap();
    let loss_of = |convs: &[(Vec<u32>, Vec<u8>)]| {
        let (x, y, cols) = collate(convs, pad);
        let x = Tensor::from_vec(x, (convs.len(), cols), &Device::Cpu).unwrap();
        let y = Tensor::from_vec(y, (convs.len(), cols), &Device::Cpu).unwrap();
        (model.forward(&x, Some(&y)).unwrap().to_scalar::<f32>().unwrap(), x)
    };
    let (loss, x) = loss_of(&rendered);

    // Oracle: log-softmax of the full logits, averaged by hand over the mask-1 targets only.
    let logits = model.forward(&x, None).unwrap().to_vec3::<f32>().unwrap();
    let (mut sum, mut count) = (0.0f64, 0usize);
    for (row, (ids, mask)) in rendered.iter().enumerate() {
        for i in 0..ids.len() - 1 {
            if mask[i + 1] == 1 {
                let l = &logits[row][i];
                let max = l.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
                let lse = max as f64 + l.iter().map(|&v| ((v - max) as f64).exp()).sum::<f64>().ln();
                sum += lse - l[ids[i + 1] as usize] as f64;
                count += 1;
            }
        }
    }
    let expected = sum / count as f64;
    assert!((f64::from(loss) - expected).abs() < 1e-4, "loss {loss} vs hand-computed {expected}");

    // A masked target changed (a different trailing token the model is not asked to write) leaves
    // the loss exactly as it was.
    for (ids, mask) in rendered.iter_mut() {
        ids.push(7);
        mask.push(0);
    }
    let (with_7, _) = loss_of(&rendered);
    for (ids, _) in rendered.iter_mut() {
        *ids.last_mut().unwrap() = 42;
    }
    let (with_42, _) = loss_of(&rendered);
    assert_eq!(with_7, with_42, "a masked target changed the loss");
    // ... while the same change to a supervised target does change it.
    for (_, mask) in rendered.iter_mut() {
        *mask.last_mut().unwrap() = 1;
    }
    let (supervised_42, _) = loss_of(&rendered);
    assert_ne!(with_42, supervised_42);
    // A micro-batch whose every target is masked (a user turn cut at the context) has loss 0, not NaN.
    let all_masked: Vec<_> = rendered.iter().map(|(ids, mask)| (ids.clone(), vec![0u8; mask.len()])).collect();
    assert_eq!(loss_of(&all_masked).0, 0.0);
}

/// Prompts from the identity conversations, rewarded by the share of vowels among the letters of
/// the completion: a reward a random model gets sometimes, and can learn to get more often.
struct Vowels(Identity);

impl Task for Vowels {
    fn name(&self) -> String {
        "vowels".to_string()
    }
    fn len(&self) -> usize {
        self.0.len()
    }
    fn get(&self, index: usize) -> anyhow::Result<nanochat::tasks::Example> {
        self.0.get(index)
    }
    fn eval_type(&self) -> Option<nanochat::tasks::EvalType> {
        Some(nanochat::tasks::EvalType::Generative)
    }
    fn evaluate(&self, example: &nanochat::tasks::Example, completion: &str) -> bool {
        self.reward(example, completion) > 0.5
    }
    fn reward(&self, _: &nanochat::tasks::Example, completion: &str) -> f64 {
        let letters: Vec<char> = completion.chars().filter(char::is_ascii_alphabetic).collect();
        let vowels = letters.iter().filter(|c| "aeiouAEIOU".contains(**c)).count();
        vowels as f64 / letters.len().max(1) as f64
    }
}

/// The mean reward of 8 samples on each of the first 4 problems, with fixed seeds.
fn mean_reward(engine: &nanochat::engine::Engine, task: &Vowels) -> f64 {
    let mut rewards = Vec::new();
    for index in 0..4 {
        let gen = GenerateOptions {
            num_samples: 8,
            max_tokens: 12,
            temperature: 1.0,
            top_k: None,
            seed: index as u64,
            ..Default::default()
        };
        let sampled = sample_problem(task, engine, index, &gen).unwrap();
        let completions = sampled.completions(engine.tokenizer());
        rewards.extend(completions.iter().map(|c| task.reward(&sampled.example, c)));
    }
    mean(&rewards)
}

#[test]
fn rl_steps_on_a_toy_reward_raise_the_reward() {
    let tmp = tempfile::tempdir().unwrap();
    let (tok, ckpt) = setup(tmp.path());
    let task = Vowels(Identity::new(8, 3));
    let argv = [
        "train",
        "--examples-per-step",
        "4",
        "--num-samples",
        "8",
        "--device-batch-size",
        "4",
        "--max-new-tokens",
        "12",
        "--top-k",
        "0",
        "--num-epochs",
        "6",
        "--init-lr-frac",
        "1.0",
        "--eval-every",
        "0",
        "--eval-examples",
        "2",
        "--save-every",
        "6",
    ];
    let args = RlArgs::try_parse_from(argv).unwrap();
    let dir = tmp.path().join("chatrl_checkpoints/d1");
    let report = rl::train(&args, &tok, &task, &task, &ckpt, &dir).unwrap();
    assert_eq!(report.rewards.len(), 12);
    assert_eq!(report.pass_at_k.len(), 4, "pass@1..4");
    assert!(report.pass_at_k.windows(2).all(|w| w[0] <= w[1]), "pass@k grows with k: {:?}", report.pass_at_k);
    assert_eq!(checkpoint::latest_step(&dir).unwrap(), Some(12));
    assert!(checkpoint::model_path(&dir, 6).is_file(), "the periodic checkpoint");

    // Same prompts, same seeds: the trained policy earns more than the one it started from.
    let engine_of = |c: &Checkpoint| {
        let (model, _) = checkpoint::model_from_checkpoint(c, &Device::Cpu).unwrap();
        nanochat::engine::Engine::new(model, tok.clone()).unwrap()
    };
    let before = mean_reward(&engine_of(&ckpt), &task);
    let trained = checkpoint::load(&dir, 12, &Device::Cpu, false, Some(&tok.fingerprint())).unwrap();
    let after = mean_reward(&engine_of(&trained), &task);
    println!("mean reward {before:.3} -> {after:.3}; per step {:?}", report.rewards);
    assert!(after > before + 0.1, "RL did not raise the reward: {before:.3} -> {after:.3}");
}

#[test]
fn rl_runs_on_gsm8k_with_calculator_prompts() {
    let tmp = tempfile::tempdir().unwrap();
    let (tok, ckpt) = setup(tmp.path());
    let root = nanochat::tasks::DataRoot::new(common::data());
    let gsm8k = nanochat::tasks::gsm8k::Gsm8k::load(&root, "test").unwrap();
    let argv = [
        "train",
        "--examples-per-step",
        "2",
        "--num-samples",
        "4",
        "--device-batch-size",
        "2",
        "--max-new-tokens",
        "8",
        "--max-iterations",
        "2",
        "--eval-every",
        "1",
        "--eval-examples",
        "2",
    ];
    let args = RlArgs::try_parse_from(argv).unwrap();
    let dir = tmp.path().join("chatrl_checkpoints/d1");
    let report = rl::train(&args, &tok, &gsm8k, &gsm8k, &ckpt, &dir).unwrap();
    // a 2-step random model solves nothing, but every part ran: rollouts, rewards, pass@k, checkpoint
    assert_eq!(report.rewards, vec![0.0, 0.0]);
    assert_eq!(report.pass_at_k, vec![0.0, 0.0]);
    let metrics = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().filter(|l| l.contains("pass_at_k")).count(), 3, "{metrics}");
    assert_eq!(metrics.lines().filter(|l| l.contains("\"reward\"")).count(), 2, "{metrics}");
    let saved = checkpoint::load(&dir, 2, &Device::Cpu, false, Some(&tok.fingerprint())).unwrap();
    assert_eq!(saved.meta.model_config, ckpt.meta.model_config);
    // Too few problems for one step, or samples that do not split into groups, are clear errors.
    let bad = RlArgs::try_parse_from(["train", "--num-samples", "5", "--device-batch-size", "2"]).unwrap();
    let err = rl::train(&bad, &tok, &gsm8k, &gsm8k, &ckpt, &dir).unwrap_err();
    assert!(format!("{err:#}").contains("not a multiple"), "{err:#}");
}
