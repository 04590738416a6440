//! Data-parallel pretraining over MPI: `mpirun -n 2` on a tiny model gives the losses, the
//! validation bpb and the final weights of one process with the same global batch, the ranks read
//! disjoint row groups, each rank keeps (and saves) the optimizer state of its own parameters only,
//! together one process's, rank 0 alone writes the weights and the metrics, and an MPI run resumes
//! from its checkpoint exactly (with the same number of processes only). Midtraining, SFT and RL
//! under `mpirun -n 2` give the losses (rewards), validation numbers and final weights of one
//! process, a single process resumes midtraining from a 2-rank checkpoint, and `chat eval` and
//! `base eval` give one process's scores.
//!
//! The MPI tests need this crate built with `--features mpi` and `mpirun` on the PATH; without
//! them it is skipped with a notice, unless, for a missing mpirun, NANOCHAT_REQUIRE_MPI=1 (as
//! .ci/run sets once it has installed OpenMPI) makes that a failure. The single-process communicator and the rank-strided
//! loader have their own tests (src/dist.rs; tests/data_loader.rs, `ranks_together_...`).

mod common;

use std::collections::{BTreeSet, HashMap};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use clap::Parser;
use nanochat::checkpoint::{self, Meta};
use nanochat::data::loader::LoaderState;
use nanochat::tasks::identity::Identity;
use nanochat::tasks::Task;
use nanochat::train::base::{train, TrainArgs};
use parquet::data_type::{ByteArray, ByteArrayType};
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::parser::parse_message_type;
use serde_json::Value;

/// Tokens per document, BOS excluded: with BOS, one stream batch of 4 rows of 32 tokens plus the
/// last target (4 × 32 + 1). So every micro-batch is exactly one document, and one process's
/// micro-batches 2s and 2s+1 are the documents ranks 0 and 1 read at step s.
const DOC_TOKENS: usize = 128;

/// Text of simple sentences (letters only: no digit is ever merged by the tokenizer).
fn sentences(count: usize, seed: u64) -> Vec<String> {
    const WORDS: [&str; 12] = [
        "the cat",
        "a dog",
        "the old man",
        "sees",
        "likes",
        "walks past",
        "the river.",
        "a red house.",
        "my sister",
        "waits for",
        "the garden.",
        "an open door.",
    ];
    let mut x = seed;
    let mut next = move || {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (x >> 33) as usize
    };
    (0..count).map(|_| (0..80).map(|_| WORDS[next() % WORDS.len()]).collect::<Vec<_>>().join(" ")).collect()
}

/// `text` cut to whole words under DOC_TOKENS tokens, then topped up with digits, each its own
/// token, to exactly DOC_TOKENS.
fn exact_doc(tok: &bpe::Tokenizer, text: &str) -> String {
    let mut doc = String::new();
    for word in text.split(' ') {
        let longer = if doc.is_empty() { word.to_string() } else { format!("{doc} {word}") };
        if tok.encode(&longer).len() > DOC_TOKENS - 8 {
            break;
        }
        doc = longer;
    }
    doc.push_str(&"7".repeat(DOC_TOKENS - tok.encode(&doc).len()));
    assert_eq!(tok.encode(&doc).len(), DOC_TOKENS, "{doc}");
    doc
}

/// A shard with one document per row group, so that two ranks split even a few documents.
fn write_shard_of_single_docs(path: &Path, docs: &[String]) {
    let schema = Arc::new(parse_message_type("message schema { REQUIRED BYTE_ARRAY text (STRING); }").unwrap());
    let file = std::fs::File::create(path).unwrap();
    let mut writer = SerializedFileWriter::new(file, schema, Arc::new(WriterProperties::builder().build())).unwrap();
    for doc in docs {
        let mut row_group = writer.next_row_group().unwrap();
        let mut column = row_group.next_column().unwrap().unwrap();
        column.typed::<ByteArrayType>().write_batch(&[ByteArray::from(doc.as_str())], None, None).unwrap();
        column.close().unwrap();
        row_group.close().unwrap();
    }
    writer.close().unwrap();
}

/// `base` laid out as $NANOCHAT_BASE_DIR: a tokenizer, 12 training and 6 validation documents.
fn setup(base: &Path) -> bpe::Tokenizer {
    let texts = sentences(18, 3);
    let tok = bpe::Tokenizer::train(texts.iter(), 300, bpe::DEFAULT_PATTERN).unwrap();
    tok.save(&base.join("tokenizer")).unwrap();
    let docs: Vec<String> = texts.iter().map(|t| exact_doc(&tok, t)).collect();
    let data = base.join("base_data");
    std::fs::create_dir_all(&data).unwrap();
    write_shard_of_single_docs(&data.join("shard_00000.parquet"), &docs[..12]);
    write_shard_of_single_docs(&data.join("shard_00001.parquet"), &docs[12..]);
    tok
}

/// The options of every run here: 2 documents per step (one per rank under MPI), 4 steps,
/// validation on 4 documents at steps 0, 2 and 4, checkpoints at steps 2 and 4.
fn argv(base: &Path, extra: &[&str]) -> Vec<String> {
    let data = base.join("base_data").to_string_lossy().into_owned();
    let mut argv: Vec<String> = [
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
        "--num-iterations",
        "4",
        "--eval-every",
        "2",
        "--eval-tokens",
        "512",
        "--sample-every",
        "0",
        "--save-every",
        "2",
        "--data-dir",
        &data,
    ]
    .map(String::from)
    .to_vec();
    argv.extend(extra.iter().map(|s| s.to_string()));
    argv
}

/// Whether this test can run: built with the `mpi` feature (else it skips: `cargo test` without
/// features builds no MPI binary) and `mpirun` is installed (else it skips with a notice, or fails
/// when NANOCHAT_REQUIRE_MPI is set).
fn mpi_available(test: &str) -> bool {
    if !cfg!(feature = "mpi") {
        common::skipped(test, "it needs `cargo test --features mpi`");
        return false;
    }
    if Command::new("mpirun").arg("--version").output().is_ok_and(|o| o.status.success()) {
        return true;
    }
    assert!(std::env::var_os("NANOCHAT_REQUIRE_MPI").is_none(), "NANOCHAT_REQUIRE_MPI is set but mpirun is missing");
    common::skipped(test, "it needs mpirun (apt-get install openmpi-bin libopenmpi-dev)");
    false
}

/// `mpirun -n 2 nanochat base train <args>` with $NANOCHAT_BASE_DIR at `base`; returns its output,
/// each line tagged with the rank that wrote it (`[job,rank]<stderr>:`).
fn mpirun_train(base: &Path, args: &[String]) -> String {
    let mut all: Vec<String> = ["base", "train", "--dist", "mpi"].map(String::from).to_vec();
    all.extend_from_slice(args);
    mpirun(base, &all)
}

/// `mpirun -n 2 nanochat <args>` with $NANOCHAT_BASE_DIR at `base`; returns its output as
/// [`mpirun_train`] does.
fn mpirun(base: &Path, args: &[String]) -> String {
    let out = Command::new("mpirun")
        .args(["-n", "2", "--oversubscribe", "--tag-output"])
        .arg(env!("CARGO_BIN_EXE_nanochat"))
        .args(args)
        .env("NANOCHAT_BASE_DIR", base)
        // one thread per rank: the two ranks share this machine's cores
        .env("RAYON_NUM_THREADS", "1")
        // CI runs as root, which OpenMPI refuses unless told
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        // containers often forbid the cross-process memory attach of OpenMPI's shared-memory transport
        .env("OMPI_MCA_btl_vader_single_copy_mechanism", "none")
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "mpirun failed:\n{text}");
    text
}

/// (step, value) records of one quantity.
type Series = Vec<(u64, f64)>;

/// (losses by step, validation bpb by step) from a metrics log.
fn metrics(dir: &Path) -> (Series, Series) {
    let text = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    let records: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let series = |key: &str| -> Series {
        records.iter().filter_map(|r| Some((r["step"].as_u64()?, r.get(key)?.as_f64()?))).collect()
    };
    (series("loss"), series("val_bpb"))
}

fn max_diff(a: &[(u64, f64)], b: &[(u64, f64)]) -> f64 {
    assert_eq!(a.iter().map(|p| p.0).collect::<Vec<_>>(), b.iter().map(|p| p.0).collect::<Vec<_>>());
    a.iter().zip(b).map(|(x, y)| (x.1 - y.1).abs()).fold(0.0, f64::max)
}

/// Copies the checkpoint of `step`: its meta and every file the meta lists.
fn copy_checkpoint(from: &Path, to: &Path, step: usize) {
    std::fs::create_dir_all(to).unwrap();
    std::fs::copy(checkpoint::meta_path(from, step), checkpoint::meta_path(to, step)).unwrap();
    for name in checkpoint::load_meta(from, step).unwrap().files.keys() {
        std::fs::copy(from.join(name), to.join(name)).unwrap();
    }
}

/// The largest difference between two sets of the same named tensors (of any dtype).
fn max_tensor_diff(a: &HashMap<String, Tensor>, b: &HashMap<String, Tensor>) -> f64 {
    assert_eq!(a.keys().collect::<BTreeSet<_>>(), b.keys().collect::<BTreeSet<_>>());
    let values = |t: &Tensor| t.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let mut diff = 0.0f64;
    for (name, t) in a {
        let (x, y) = (values(t), values(&b[name]));
        assert_eq!(x.len(), y.len(), "{name}");
        diff = x.iter().zip(&y).map(|(p, q)| (p - q).abs()).fold(diff, f64::max);
    }
    diff
}

/// The weights of the checkpoint of `step` in `dir`.
fn weights(dir: &Path, step: usize) -> HashMap<String, Tensor> {
    checkpoint::load(dir, step, &Device::Cpu, false, None).unwrap().model
}

/// The optimizer state of the checkpoint of `step` in `dir`, whether one file or per-rank shards.
fn optimizer_state(dir: &Path, step: usize) -> HashMap<String, Tensor> {
    checkpoint::load(dir, step, &Device::Cpu, true, None).unwrap().optim
}

/// The parameters an optimizer state holds something for (`adamw.<param>.exp_avg` -> `<param>`).
fn params_of(state: &HashMap<String, Tensor>) -> BTreeSet<String> {
    state
        .keys()
        .map(|k| {
            let k = k.strip_prefix("adamw.").or_else(|| k.strip_prefix("muon.")).unwrap();
            k.rsplit_once('.').unwrap().0.to_string()
        })
        .collect()
}

#[test]
fn two_mpi_ranks_train_like_one_process_with_the_same_global_batch() {
    if !mpi_available("two_mpi_ranks_train_like_one_process_with_the_same_global_batch") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path();
    let tok = setup(base);
    let checkpoints = |tag: &str| -> PathBuf { base.join("base_checkpoints").join(tag) };

    // One process, two micro-batches per step.
    let single_args =
        TrainArgs::try_parse_from(["train".to_string()].into_iter().chain(argv(base, &["--dist", "none"]))).unwrap();
    train(&single_args, &tok, &checkpoints("single")).unwrap();
    let (single_losses, single_bpb) = metrics(&checkpoints("single"));

    // Two ranks, one micro-batch each.
    let started = std::time::Instant::now();
    let output = mpirun_train(base, &argv(base, &["--model-tag", "mpi"]));
    println!("mpirun -n 2: 4 steps in {:.1}s", started.elapsed().as_secs_f64());
    let (mpi_losses, mpi_bpb) = metrics(&checkpoints("mpi"));
    let (loss_diff, bpb_diff) = (max_diff(&single_losses, &mpi_losses), max_diff(&single_bpb, &mpi_bpb));
    println!("max |loss diff| {loss_diff:e}, max |val bpb diff| {bpb_diff:e}");
    assert!(loss_diff < 1e-4, "losses differ: {single_losses:?} vs {mpi_losses:?}");
    assert!(bpb_diff < 1e-4, "validation bpb differs: {single_bpb:?} vs {mpi_bpb:?}");
    assert!(mpi_losses[3].1 < mpi_losses[0].1, "loss did not fall: {mpi_losses:?}");

    let weight_diff = max_weight_diff(&checkpoints("single"), &checkpoints("mpi"), 4);
    println!("max |final weight diff| {weight_diff:e}");
    assert!(weight_diff < 1e-4, "final weights differ by {weight_diff}");

    // The optimizer state is sharded: one file per rank (none for the whole), each rank's with the
    // state of its own parameters only, the ranks' disjoint and together one process's state.
    assert!(!checkpoint::optim_path(&checkpoints("mpi"), 4).exists());
    let shards: Vec<HashMap<String, Tensor>> = (0..2)
        .map(|r| {
            candle_core::safetensors::load(checkpoint::optim_shard_path(&checkpoints("mpi"), 4, r), &Device::Cpu)
                .unwrap()
        })
        .collect();
    let (own0, own1) = (params_of(&shards[0]), params_of(&shards[1]));
    println!("rank 0 owns {own0:?}, rank 1 owns {own1:?}");
    assert!(!own0.is_empty() && !own1.is_empty(), "a rank owns nothing: {own0:?} / {own1:?}");
    assert!(own0.is_disjoint(&own1), "both ranks hold state of {:?}", own0.intersection(&own1).collect::<Vec<_>>());
    let single_state = optimizer_state(&checkpoints("single"), 4);
    let merged = optimizer_state(&checkpoints("mpi"), 4);
    assert_eq!(merged.len(), shards[0].len() + shards[1].len());
    let state_diff = max_tensor_diff(&single_state, &merged);
    println!("max |optimizer state diff| {state_diff:e}");
    assert!(state_diff < 1e-4, "optimizer states differ by {state_diff}");

    // Rank 0 alone logged and saved: one metrics record per step, one save line per checkpoint.
    assert_eq!(mpi_losses.len(), 4);
    let saves: Vec<&str> = output.lines().filter(|l| l.contains("saved checkpoint")).collect();
    assert_eq!(saves.len(), 2, "{output}");
    assert!(saves.iter().all(|l| l.contains(",0]<")), "a rank other than 0 saved: {saves:?}");
    assert_eq!(checkpoint::latest_step(&checkpoints("mpi")).unwrap(), Some(4));

    // Each rank's data position is saved, and each read its own stride of row groups.
    let meta = checkpoint::load_meta(&checkpoints("mpi"), 4).unwrap();
    assert_eq!(meta.run_config["world_size"], 2);
    let states: Vec<LoaderState> = serde_json::from_value(meta.run_config["loader_states"].clone()).unwrap();
    assert_eq!(states.len(), 2);
    for (rank, state) in states.iter().enumerate() {
        assert_eq!((state.rank, state.world_size), (rank, 2));
        assert_eq!(state.next.row_group % 2, rank, "rank {rank} read another rank's row group: {state:?}");
    }
    assert_eq!(meta.loader_state.as_ref(), Some(&states[0]));

    // Resumed from step 2 under MPI, it finishes as the uninterrupted run did.
    copy_checkpoint(&checkpoints("mpi"), &checkpoints("resumed"), 2);
    mpirun_train(base, &argv(base, &["--model-tag", "resumed", "--resume-from-step", "2"]));
    let (resumed_losses, resumed_bpb) = metrics(&checkpoints("resumed"));
    assert!(max_diff(&resumed_losses, &mpi_losses[2..]) < 1e-6, "{resumed_losses:?} vs {mpi_losses:?}");
    assert!(max_diff(&resumed_bpb, &mpi_bpb[1..]) < 1e-6, "{resumed_bpb:?} vs {mpi_bpb:?}");
    // The ranks got their own optimizer state back: the weights and the state end as they did.
    let resumed_weights = max_weight_diff(&checkpoints("resumed"), &checkpoints("mpi"), 4);
    let resumed_state = max_tensor_diff(&optimizer_state(&checkpoints("resumed"), 4), &merged);
    println!("resumed: max |weight diff| {resumed_weights:e}, |optimizer state diff| {resumed_state:e}");
    assert!(resumed_weights < 1e-6 && resumed_state < 1e-6, "{resumed_weights} / {resumed_state}");

    // A single process cannot take over two ranks' data positions.
    let alone = TrainArgs::try_parse_from(
        ["train".to_string()].into_iter().chain(argv(base, &["--dist", "none", "--resume-from-step", "2"])),
    )
    .unwrap();
    let err = format!("{:#}", train(&alone, &tok, &checkpoints("mpi")).unwrap_err());
    assert!(err.contains("written by a run of 2 processes"), "{err}");
}

/// `nanochat <args>` in one process, with $NANOCHAT_BASE_DIR at `base`; returns its output.
fn single(base: &Path, args: &[String]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_nanochat"))
        .args(args)
        .env("NANOCHAT_BASE_DIR", base)
        .env("RAYON_NUM_THREADS", "1")
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "nanochat failed:\n{text}");
    text
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// The first `n` lines of the small data mirror's `relative` file, written to the same path under
/// `to` (gzipped again if it was).
fn copy_head(to: &Path, relative: &str, n: usize) {
    let from = common::data().join(relative);
    let file = std::fs::File::open(&from).unwrap();
    let gz = relative.ends_with(".gz");
    let reader: Box<dyn BufRead> = if gz {
        Box::new(std::io::BufReader::new(flate2::read::GzDecoder::new(file)))
    } else {
        Box::new(std::io::BufReader::new(file))
    };
    let lines: Vec<String> = reader.lines().take(n).map(Result::unwrap).collect();
    let text = lines.iter().map(|l| format!("{l}\n")).collect::<String>();
    let path = to.join(relative);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    if gz {
        let mut enc = flate2::write::GzEncoder::new(std::fs::File::create(&path).unwrap(), flate2::Compression::fast());
        enc.write_all(text.as_bytes()).unwrap();
        enc.finish().unwrap();
    } else {
        std::fs::write(&path, text).unwrap();
    }
}

/// `base` as $NANOCHAT_BASE_DIR for the chat stages: [`setup`]'s tokenizer and shards, a base
/// checkpoint `d1` of a 1-layer model pretrained 2 steps, a small copy of the task data mirror
/// (the first few rows of every file the mixtures read) and a 12-conversation identity file.
/// Returns the identity file and the task data directory, as strings for the command line.
fn setup_chat_stages(base: &Path) -> (String, String) {
    let tok = setup(base);
    let args = TrainArgs::try_parse_from(["train".to_string()].into_iter().chain(argv(
        base,
        &["--dist", "none", "--num-iterations", "2", "--eval-every", "0", "--save-every", "0", "--model-tag", "d1"],
    )))
    .unwrap();
    train(&args, &tok, &base.join("base_checkpoints/d1")).unwrap();
    let data = base.join("task_data");
    for (file, rows) in [
        ("sft/sharegpt_train.jsonl.gz", 46),
        ("sft/sharegpt_test.jsonl.gz", 8),
        ("words/words_alpha.txt", 2000),
        ("eval/mmlu/dev.jsonl", 5),
        ("eval/mmlu/validation.jsonl", 5),
        ("eval/arc/ARC-Easy-validation.jsonl", 5),
        ("eval/arc/ARC-Challenge-validation.jsonl", 5),
        ("eval/gsm8k/train.jsonl", 10),
    ] {
        copy_head(&data, file, rows);
    }
    let identity = Identity::new(12, 5);
    let lines: String = (0..identity.len())
        .map(|i| serde_json::to_string(&identity.get(i).unwrap().conversation).unwrap() + "\n")
        .collect();
    let identity_file = base.join("identity.jsonl");
    std::fs::write(&identity_file, lines).unwrap();
    (identity_file.to_string_lossy().into_owned(), data.to_string_lossy().into_owned())
}

/// The largest difference between two checkpoints' weights, which must have the same tensors.
fn max_weight_diff(a: &Path, b: &Path, step: usize) -> f64 {
    max_tensor_diff(&weights(a, step), &weights(b, step))
}

/// A series of one quantity from a metrics log.
fn series(dir: &Path, key: &str) -> Series {
    let text = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    let records: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    records.iter().filter_map(|r| Some((r["step"].as_u64()?, r.get(key)?.as_f64()?))).collect()
}

/// Runs `stage train <args>` once alone and once under `mpirun -n 2`, moving the single run's
/// checkpoint directory `<checkpoints>/d1` aside to `<checkpoints>/single`; returns both directories
/// and the MPI run's output.
fn single_then_mpi(base: &Path, stage: &str, checkpoints: &str, args: &[String]) -> (PathBuf, PathBuf, String) {
    let dir = base.join(checkpoints);
    let mut all = strings(&[stage, "train"]);
    all.extend_from_slice(args);
    single(base, &[all.clone(), strings(&["--dist", "none"])].concat());
    std::fs::rename(dir.join("d1"), dir.join("single")).unwrap();
    let started = std::time::Instant::now();
    let output = mpirun(base, &[all, strings(&["--dist", "mpi"])].concat());
    println!("mpirun -n 2 {stage} train: {:.1}s", started.elapsed().as_secs_f64());
    (dir.join("single"), dir.join("d1"), output)
}

/// Rank 0 alone logged the saves: `saves` lines, all from rank 0.
fn saved_by_rank_0_only(output: &str, saves: usize) {
    let lines: Vec<&str> = output.lines().filter(|l| l.contains("saved checkpoint")).collect();
    assert_eq!(lines.len(), saves, "{output}");
    assert!(lines.iter().all(|l| l.contains(",0]<")), "a rank other than 0 saved: {lines:?}");
}

#[test]
fn two_mpi_ranks_midtrain_like_one_process() {
    if !mpi_available("two_mpi_ranks_midtrain_like_one_process") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path();
    let (identity, data) = setup_chat_stages(base);
    // 4 micro-batches of 2 rows of 32 tokens per step (2 per rank under MPI), 3 steps, validation
    // on 2 micro-batches at steps 0 and 3, a checkpoint at steps 2 and 3.
    let args = strings(&[
        "--device-batch-size",
        "2",
        "--total-batch-size",
        "256",
        "--num-iterations",
        "3",
        "--eval-every",
        "3",
        "--eval-tokens",
        "128",
        "--val-fraction",
        "0.1",
        "--save-every",
        "2",
        "--identity-file",
        &identity,
        "--data-dir",
        &data,
    ]);
    let (one, two, output) = single_then_mpi(base, "mid", "mid_checkpoints", &args);
    let (loss_one, loss_two) = (series(&one, "loss"), series(&two, "loss"));
    let (bpb_one, bpb_two) = (series(&one, "val_bpb"), series(&two, "val_bpb"));
    assert_eq!(loss_two.len(), 3, "rank 0 alone logs, once per step: {loss_two:?}");
    assert_eq!(bpb_two.len(), 2);
    let (loss_diff, bpb_diff) = (max_diff(&loss_one, &loss_two), max_diff(&bpb_one, &bpb_two));
    let weight_diff = max_weight_diff(&one, &two, 3);
    println!("mid: max |loss diff| {loss_diff:e}, |val bpb diff| {bpb_diff:e}, |weight diff| {weight_diff:e}");
    assert!(loss_diff < 1e-4, "losses differ: {loss_one:?} vs {loss_two:?}");
    assert!(bpb_diff < 1e-4, "validation bpb differs: {bpb_one:?} vs {bpb_two:?}");
    assert!(weight_diff < 1e-4, "final weights differ by {weight_diff}");
    saved_by_rank_0_only(&output, 2);
    let meta: Meta = checkpoint::load_meta(&two, 3).unwrap();
    assert_eq!(meta.run_config["world_size"], 2);

    // One process resumes from the 2 ranks' step-2 checkpoint (their optimizer shards together)
    // and ends where it would have without the interruption.
    let mut resume = strings(&["mid", "train"]);
    resume.extend_from_slice(&args);
    single(base, &[resume, strings(&["--dist", "none", "--resume-from-step", "2"])].concat());
    let resumed_diff = max_weight_diff(&one, &two, 3);
    println!("mid: one process resumed from the 2-rank checkpoint: |weight diff| {resumed_diff:e}");
    assert!(resumed_diff < 1e-4, "the resumed weights differ by {resumed_diff}");
    assert!(max_diff(&series(&two, "loss"), &loss_one) < 1e-4);
}

#[test]
fn two_mpi_ranks_finetune_like_one_process() {
    if !mpi_available("two_mpi_ranks_finetune_like_one_process") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path();
    let (identity, data) = setup_chat_stages(base);
    // 8 conversations per step in 4 micro-batches of 2 (2 per rank under MPI), 3 steps from the
    // base checkpoint, validation on 2 micro-batches at steps 0, 2 and 3.
    let args = strings(&[
        "--source",
        "base",
        "--device-batch-size",
        "2",
        "--target-examples-per-step",
        "8",
        "--max-iterations",
        "3",
        "--eval-every",
        "2",
        "--eval-steps",
        "2",
        "--identity-file",
        &identity,
        "--data-dir",
        &data,
    ]);
    let (one, two, output) = single_then_mpi(base, "sft", "chatsft_checkpoints", &args);
    let (loss_one, loss_two) = (series(&one, "loss"), series(&two, "loss"));
    let (val_one, val_two) = (series(&one, "val_loss"), series(&two, "val_loss"));
    assert_eq!(loss_two.len(), 3, "rank 0 alone logs, once per step: {loss_two:?}");
    assert_eq!(val_two.len(), 3);
    let (loss_diff, val_diff) = (max_diff(&loss_one, &loss_two), max_diff(&val_one, &val_two));
    let weight_diff = max_weight_diff(&one, &two, 3);
    println!("sft: max |loss diff| {loss_diff:e}, |val loss diff| {val_diff:e}, |weight diff| {weight_diff:e}");
    assert!(loss_diff < 1e-4, "losses differ: {loss_one:?} vs {loss_two:?}");
    assert!(val_diff < 1e-4, "validation losses differ: {val_one:?} vs {val_two:?}");
    assert!(weight_diff < 1e-4, "final weights differ by {weight_diff}");
    saved_by_rank_0_only(&output, 1);

    // A step that does not split evenly across the ranks is refused, by every rank at once.
    let mut odd = strings(&["sft", "train", "--dist", "mpi"]);
    odd.extend_from_slice(&args);
    odd.extend(strings(&["--target-examples-per-step", "6"]));
    let out = Command::new("mpirun")
        .args(["-n", "2", "--oversubscribe"])
        .arg(env!("CARGO_BIN_EXE_nanochat"))
        .args(&odd)
        .env("NANOCHAT_BASE_DIR", base)
        .env("RAYON_NUM_THREADS", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("OMPI_MCA_btl_vader_single_copy_mechanism", "none")
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success() && text.contains("does not split evenly"), "{text}");
}

/// The fixture model and its tokenizer as checkpoint `<stage_dir>/d2` of step 5 under
/// $NANOCHAT_BASE_DIR `base`.
fn fixture_checkpoint(base: &Path, stage_dir: &str) {
    common::fixture_checkpoint(base, stage_dir).unwrap();
}

#[test]
fn chat_eval_under_two_mpi_ranks_scores_like_one_process() {
    if !mpi_available("chat_eval_under_two_mpi_ranks_scores_like_one_process") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path();
    fixture_checkpoint(base, "chatsft_checkpoints");
    let data = common::data().to_string_lossy().into_owned();
    // 7 problems per task: an odd count, so the ranks' shares differ in size.
    let eval = |output: &Path, dist: &str| {
        let out = output.to_string_lossy().into_owned();
        strings(&[
            "chat",
            "eval",
            "-a",
            "ARC-Easy|MMLU|GSM8K|SpellingBee",
            "-x",
            "7",
            "-m",
            "16",
            "-b",
            "3",
            "--data-dir",
            &data,
            "--output",
            &out,
            "--dist",
            dist,
        ])
    };
    let (one, two) = (base.join("one.json"), base.join("two.json"));
    single(base, &eval(&one, "none"));
    let started = std::time::Instant::now();
    let output = mpirun(base, &eval(&two, "mpi"));
    println!("mpirun -n 2 chat eval: {:.1}s", started.elapsed().as_secs_f64());
    let read = |path: &Path| -> Vec<(String, u64, u64)> {
        let report: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let results = report["results"].as_array().unwrap();
        results
            .iter()
            .map(|r| {
                (
                    r["task"].as_str().unwrap().to_string(),
                    r["problems"].as_u64().unwrap(),
                    r["passed"].as_u64().unwrap(),
                )
            })
            .collect()
    };
    let (scores_one, scores_two) = (read(&one), read(&two));
    println!("chat eval: one process {scores_one:?}, two ranks {scores_two:?}");
    assert_eq!(scores_one, scores_two);
    assert!(scores_two.iter().all(|(_, problems, _)| *problems == 7), "{scores_two:?}");
    // Rank 0 alone prints the scores.
    let printed: Vec<&str> = output.lines().filter(|l| l.contains("ChatCORE")).collect();
    assert_eq!(printed.len(), 1, "{output}");
    assert!(printed[0].contains(",0]<"), "{printed:?}");
}

#[test]
fn base_eval_under_two_mpi_ranks_scores_like_one_process() {
    if !mpi_available("base_eval_under_two_mpi_ranks_scores_like_one_process") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path();
    fixture_checkpoint(base, "base_checkpoints");
    let docs: Vec<String> =
        (0..100).map(|i| format!("Document {i}: the cat sat on the mat, and {} dogs watched.", i % 7)).collect();
    nanochat::data::dataset::write_shard(&base.join("data/shard_00000.parquet"), &docs).unwrap();
    nanochat::data::dataset::write_shard(&base.join("data/shard_00001.parquet"), &docs).unwrap();
    let (bundle, data) = (common::data().join("eval/eval_bundle"), base.join("data"));
    // 3 items per CORE task and 5 validation batches of 2 rows of 64 tokens: odd counts, so that
    // the ranks' shares differ in size.
    let eval = |dist: &str| {
        let mut args = strings(&["base", "eval", "--eval", "core,bpb", "--max-per-task", "3", "--eval-tokens", "640"]);
        args.extend(strings(&["--device-batch-size", "2", "--dist", dist]));
        args.extend(["--bundle-dir".to_string(), bundle.to_string_lossy().into_owned()]);
        args.extend(["--data-dir".to_string(), data.to_string_lossy().into_owned()]);
        args
    };
    // The per-task accuracies and the report section's CORE and validation bpb of the last run.
    let results = || -> (Vec<(String, f64)>, f64, f64) {
        let read =
            |path: &str| -> Value { serde_json::from_str(&std::fs::read_to_string(base.join(path)).unwrap()).unwrap() };
        let core = read("base_eval/base_d2_000005.json");
        let tasks = core["tasks"].as_array().unwrap();
        let accuracies =
            tasks.iter().map(|t| (t["label"].as_str().unwrap().to_string(), t["accuracy"].as_f64().unwrap())).collect();
        let section = read("report/base_eval.json");
        (accuracies, section["metrics"]["core"].as_f64().unwrap(), section["metrics"]["val_bpb"].as_f64().unwrap())
    };
    single(base, &eval("none"));
    let (tasks_one, core_one, bpb_one) = results();
    let started = std::time::Instant::now();
    let output = mpirun(base, &eval("mpi"));
    println!("mpirun -n 2 base eval: {:.1}s", started.elapsed().as_secs_f64());
    let (tasks_two, core_two, bpb_two) = results();
    println!("base eval: CORE {core_one} vs {core_two}, validation bpb {bpb_one} vs {bpb_two}");
    assert_eq!(tasks_one.len(), 22);
    assert_eq!(tasks_one, tasks_two);
    assert!(tasks_one.iter().any(|(_, a)| *a > 0.0), "no task got any item right: {tasks_one:?}");
    assert_eq!(core_one, core_two);
    assert!((bpb_one - bpb_two).abs() < 1e-9, "validation bpb {bpb_one} vs {bpb_two}");
    // Rank 0 alone prints the results (and the per-task lines), once.
    for what in ["; per task in", ": validation bpb"] {
        let printed: Vec<&str> = output.lines().filter(|l| l.contains(what)).collect();
        assert_eq!(printed.len(), 1, "{what}: {output}");
        assert!(printed[0].contains(",0]<"), "{printed:?}");
    }
    assert!(!output.lines().any(|l| l.contains(",1]<") && l.contains("accuracy")), "{output}");
}

/// `base` as $NANOCHAT_BASE_DIR for RL: a base checkpoint `d1` that has learnt to write `#### 1`
/// and `#### 2` at random (so that its GSM8K rewards vary between samples and the policy gradient
/// is not zero) and GSM8K files whose answers are 1 or 2. Returns the task data directory.
fn setup_rl(base: &Path) -> String {
    let mut x = 7u64;
    let mut digit = move || {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ["1", "2"][((x >> 33) & 1) as usize]
    };
    let docs: Vec<String> =
        (0..60).map(|_| (0..30).map(|_| format!("#### {}", digit())).collect::<Vec<_>>().join(" ")).collect();
    let tok = bpe::Tokenizer::train(docs.iter(), 300, bpe::DEFAULT_PATTERN).unwrap();
    tok.save(&base.join("tokenizer")).unwrap();
    let shards = base.join("base_data");
    nanochat::data::dataset::write_shard(&shards.join("shard_00000.parquet"), &docs[..50]).unwrap();
    nanochat::data::dataset::write_shard(&shards.join("shard_00001.parquet"), &docs[50..]).unwrap();
    let args = TrainArgs::try_parse_from(["train".to_string()].into_iter().chain(argv(
        base,
        &["--dist", "none", "--num-iterations", "30", "--eval-every", "0", "--save-every", "0", "--model-tag", "d1"],
    )))
    .unwrap();
    train(&args, &tok, &base.join("base_checkpoints/d1")).unwrap();
    let gsm8k = base.join("task_data/eval/gsm8k");
    std::fs::create_dir_all(&gsm8k).unwrap();
    for (split, count) in [("train", 16), ("test", 8)] {
        let rows: String = (0..count)
            .map(|i| {
                serde_json::json!({ "question": "the cat", "answer": format!("It is.\n#### {}", 1 + i % 2) })
                    .to_string()
                    + "\n"
            })
            .collect();
        std::fs::write(gsm8k.join(format!("{split}.jsonl")), rows).unwrap();
    }
    base.join("task_data").to_string_lossy().into_owned()
}

#[test]
fn two_mpi_ranks_do_rl_like_one_process() {
    if !mpi_available("two_mpi_ranks_do_rl_like_one_process") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path();
    let data = setup_rl(base);
    // 3 steps of 4 problems (2 per rank under MPI) × 4 samples; pass@1,2 on 3 test problems (an
    // odd count: the ranks' shares differ) at steps 0, 2 and 3.
    let args = strings(&[
        "--source",
        "base",
        "--examples-per-step",
        "4",
        "--num-samples",
        "4",
        "--device-batch-size",
        "2",
        "--max-new-tokens",
        "8",
        "--max-iterations",
        "3",
        "--eval-every",
        "2",
        "--eval-examples",
        "3",
        "--save-every",
        "0",
        "--init-lr-frac",
        "1.0",
        "--data-dir",
        &data,
    ]);
    let (one, two, output) = single_then_mpi(base, "rl", "chatrl_checkpoints", &args);
    let (reward_one, reward_two) = (series(&one, "reward"), series(&two, "reward"));
    let (loss_one, loss_two) = (series(&one, "pg_loss"), series(&two, "pg_loss"));
    let pass_at_k = |dir: &Path| -> Vec<Value> {
        let text = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
        text.lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .filter_map(|r| r.get("pass_at_k").cloned())
            .collect()
    };
    let weight_diff = max_weight_diff(&one, &two, 3);
    let moved = max_tensor_diff(&weights(&one, 3), &weights(&base.join("base_checkpoints/d1"), 30));
    println!(
        "rl: rewards {reward_one:?} vs {reward_two:?}, losses {loss_one:?} vs {loss_two:?}, |weight diff| \
         {weight_diff:e} (the weights moved by up to {moved:e})"
    );
    assert_eq!(reward_two.len(), 3, "rank 0 alone logs, once per step: {reward_two:?}");
    assert_eq!(reward_one, reward_two, "the ranks sampled other rollouts than one process");
    // Rewards that vary between samples, so that the policy gradient is not zero.
    assert!(reward_one.iter().all(|(_, r)| *r > 0.0 && *r < 1.0), "{reward_one:?}");
    assert!(max_diff(&loss_one, &loss_two) < 1e-4, "losses differ: {loss_one:?} vs {loss_two:?}");
    assert!(loss_one.iter().any(|(_, l)| *l != 0.0), "{loss_one:?}");
    assert_eq!(pass_at_k(&one).len(), 3);
    assert_eq!(pass_at_k(&one), pass_at_k(&two));
    assert!(moved > 1e-3, "RL did not change the weights (by {moved})");
    assert!(weight_diff < 1e-4, "final weights differ by {weight_diff}");
    saved_by_rank_0_only(&output, 1);
}
