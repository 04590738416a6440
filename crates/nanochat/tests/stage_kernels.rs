//! The kernels are chosen per stage, not per process: in one process, as the speedrun runs its
//! stages, a `--bf16` base stage leaves the stages after it in f32. Midtraining from the same
//! base checkpoint gives bit-identical losses before and after a `--bf16` pretraining ran in the
//! same process, and every stage reports the kernels it built. On a CPU with AVX-512 BF16 the bf16
//! stage is also checked to have really run bf16 GEMMs (its losses differ from the f32 run's).

use std::path::Path;
use std::sync::Arc;

use candle_core::Device;
use clap::Parser;
use nanochat::checkpoint::{self, Checkpoint};
use nanochat::data::dataset::write_shard;
use nanochat::model::fused::{bf16_supported, Gemm};
use nanochat::model::Kernels;
use nanochat::tasks::identity::Identity;
use nanochat::tasks::mixture::TaskSequence;
use nanochat::tasks::Task;
use nanochat::train::base::{self, TrainArgs, TrainReport};
use nanochat::train::mid::{self, split_off_val, MidArgs};

/// The identity conversations as JSON text: pretraining documents and the tokenizer's corpus.
fn texts() -> Vec<String> {
    let task = Identity::new(40, 3);
    (0..task.len()).map(|i| serde_json::to_string(&task.get(i).unwrap().conversation).unwrap()).collect()
}

/// `base train` of a 1-layer model for 3 steps on the shards in `data`, into `out`.
fn base_train(data: &Path, out: &Path, tok: &bpe::Tokenizer, bf16: bool) -> TrainReport {
    let data = data.to_string_lossy().into_owned();
    let mut argv = vec!["train", "--depth", "1", "--n-embd", "64", "--max-seq-len", "32", "--device-batch-size", "4"];
    argv.extend(["--total-batch-size", "128", "--num-iterations", "3", "--eval-every", "0", "--sample-every", "0"]);
    argv.extend(["--data-dir", &data]);
    if bf16 {
        argv.push("--bf16");
    }
    base::train(&TrainArgs::try_parse_from(argv).unwrap(), tok, out).unwrap()
}

/// `mid train` for 4 steps from `base` on repeated identity conversations, into `out`.
fn mid_train(tok: &bpe::Tokenizer, base: &Checkpoint, out: &Path) -> TrainReport {
    let one: Arc<dyn Task> = Arc::new(Identity::new(6, 7));
    let (train, val) = split_off_val(Arc::new(TaskSequence::new(vec![one; 20])), 0.1).unwrap();
    let mut argv = vec!["train", "--device-batch-size", "4", "--total-batch-size", "128"];
    argv.extend(["--num-iterations", "4", "--eval-every", "2"]);
    let args = MidArgs::try_parse_from(argv).unwrap();
    mid::train(&args, tok, train.as_ref(), val.as_ref(), base, out).unwrap()
}

#[test]
fn a_bf16_stage_leaves_the_next_stages_of_the_process_in_f32() {
    let tmp = tempfile::tempdir().unwrap();
    let docs = texts();
    let tok = bpe::Tokenizer::train(docs.iter(), 300, bpe::DEFAULT_PATTERN).unwrap();
    write_shard(&tmp.path().join("shard_00000.parquet"), &docs).unwrap();
    write_shard(&tmp.path().join("shard_00001.parquet"), &docs[..5]).unwrap();

    // The reference: an f32 pretraining, then midtraining from its checkpoint, with no bf16 stage yet.
    let f32_base = base_train(tmp.path(), &tmp.path().join("base_f32"), &tok, false);
    assert_eq!(f32_base.kernels, Kernels::default());
    let base_ckpt = checkpoint::load(&tmp.path().join("base_f32"), 3, &Device::Cpu, false, None).unwrap();
    let reference = mid_train(&tok, &base_ckpt, &tmp.path().join("mid_reference"));
    assert_eq!(reference.kernels, Kernels::default());

    // A --bf16 pretraining in the same process: its model (and only its) runs the bf16 GEMMs.
    let bf16_base = base_train(tmp.path(), &tmp.path().join("base_bf16"), &tok, true);
    assert_eq!(bf16_base.kernels, Kernels { fused: true, bf16: true });
    if bf16_supported() {
        assert_eq!(bf16_base.kernels.gemm(), Gemm::Bf16);
        assert_ne!(bf16_base.losses, f32_base.losses, "the --bf16 stage ran no bf16 GEMM");
    } else {
        eprintln!("this CPU lacks AVX-512 BF16: the --bf16 stage ran f32 GEMMs, so only the kernels are compared");
    }

    // The stages after it run f32, exactly as before it.
    let after = mid_train(&tok, &base_ckpt, &tmp.path().join("mid_after"));
    assert_eq!(after.kernels, Kernels::default());
    assert_eq!(after.kernels.gemm(), Gemm::F32);
    assert_eq!(after.losses, reference.losses, "midtraining after a --bf16 stage is not the f32 run");
    assert_eq!(after.val_bpb, reference.val_bpb);
    let again = base_train(tmp.path(), &tmp.path().join("base_f32_again"), &tok, false);
    assert_eq!(again.losses, f32_base.losses, "pretraining after a --bf16 stage is not the f32 run");
}
