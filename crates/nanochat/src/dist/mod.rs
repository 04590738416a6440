//! Data-parallel communication between training processes: a small communicator (rank, world
//! size, reduce-scatter, all-gather, all-reduce of totals, broadcast, barrier) with a
//! single-process implementation that is always there and an MPI one behind the `mpi` feature
//! (`mpirun -n N nanochat base train ...`), and the ZeRO-2 pieces built on it: which rank owns
//! which parameter ([`Shards`]), gradients reduced to their owners, updated parameters gathered.
//!
//! The pieces, one file each: the trait and the choice of implementation (here), `single`
//! (a world of one), `mpi`, `nccl`, and `shards` (ZeRO-2 ownership and its collectives).
//!
//! Design choices (docs/DISTRIBUTED.md has the whole picture):
//! - existing engines only, never a home-made network layer: MPI for CPUs; NCCL for GPUs
//!   (`nccl.rs`, behind the `nccl` feature; rendezvous through MPI or a file; not yet
//!   run on a GPU);
//! - MPI is used only from the training thread (`MPI_THREAD_FUNNELED`): the data loader's and
//!   rayon's threads never communicate;
//! - tensors travel as one flat f32 buffer per collective (all gradients in one message), which
//!   costs a copy but keeps the per-message latency out of the step;
//! - the optimizer state is sharded, not replicated (as the original's DistMuon and DistAdamW):
//!   each parameter has one owner rank, balanced by size, which alone receives its averaged
//!   gradient, keeps its optimizer state and computes its update (Muon's Newton–Schulz included);
//!   the updated parameters are then gathered by every rank.

#[cfg(feature = "mpi")]
mod mpi;
pub mod nccl;
mod shards;
mod single;

use serde::Serialize;
use thiserror::Error;

pub use shards::{all_gather_vars, broadcast_vars, reduce_grads_to_owners, Shards};
pub use single::SingleProcess;

/// What can go wrong setting up or using a communicator.
#[derive(Debug, Error)]
pub enum DistError {
    #[error(
        "{0}, but this nanochat was built without MPI: rebuild with `cargo build --release --features mpi` \
         (needs an MPI library such as OpenMPI and libclang), or pass --dist none"
    )]
    MpiNotBuilt(String),
    #[error("MPI is already initialised in this process: only one distributed run per process")]
    AlreadyInitialized,
    #[error("rank {root} is out of range for {world_size} processes")]
    BadRoot { root: usize, world_size: usize },
    #[error("a message of {0} elements is too large for MPI's 32-bit counts")]
    TooLarge(usize),
    #[error("pieces of {counts:?} elements do not fit {world_size} ranks and a buffer of {len} elements")]
    BadCounts { counts: Vec<usize>, world_size: usize, len: usize },
    #[error("{vars} parameters but ownership of {owned}: shard the optimizers of these parameters")]
    NotSharded { vars: usize, owned: usize },
    #[error(transparent)]
    Nccl(#[from] nccl::NcclError),
}

/// How a training run finds its peers (`--dist`).
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum DistMode {
    /// MPI when an MPI launcher started this process (mpirun sets OMPI_COMM_WORLD_SIZE, Hydra
    /// PMI_SIZE, PMIx PMIX_RANK), NCCL when a torchrun-style one did (RANK, WORLD_SIZE > 1), else a
    /// single process.
    Auto,
    /// MPI, even as a singleton (`nanochat ...` without mpirun is then a world of one).
    Mpi,
    /// A single process, whatever the environment says.
    None,
    /// NCCL on GPU LOCAL_RANK, one process per GPU, meeting through MPI under mpirun or through a
    /// file under torchrun-style RANK/WORLD_SIZE (needs the `nccl` feature).
    Nccl,
}

/// The collectives data-parallel training needs. Every rank must make the same calls in the same
/// order with buffers of the same length; the results are then the same on every rank.
pub trait Communicator {
    /// This process's index, 0-based; rank 0 logs and writes checkpoints.
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Replaces `buf` on every rank by the element-wise sum over ranks, in f64 so that totals
    /// (token counts, losses, passes) are not rounded.
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<(), DistError>;
    /// Sums `buf` element-wise over the ranks and hands each rank only its piece of the sum: rank
    /// r gets the `counts[r]` elements that follow the first `counts[0] + … + counts[r - 1]`
    /// (MPI_Reduce_scatter). `counts` has one entry per rank and adds up to `buf.len()`.
    fn reduce_scatter_sum(&self, buf: &[f32], counts: &[usize]) -> Result<Vec<f32>, DistError>;
    /// The ranks' pieces concatenated in rank order, on every rank, where rank r contributes
    /// `mine` of `counts[r]` elements (MPI_Allgatherv).
    fn all_gather(&self, mine: &[f32], counts: &[usize]) -> Result<Vec<f32>, DistError>;
    /// Replaces `buf` on every rank by rank `root`'s.
    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<(), DistError>;
    /// Every rank's bytes (of any length), in rank order, on every rank.
    fn all_gather_bytes(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>, DistError>;
    /// Returns once every rank has called it.
    fn barrier(&self) -> Result<(), DistError>;
    /// Ends every rank of the job with `code`: a rank that fails alone would leave the others
    /// waiting forever in their next collective.
    fn abort(&self, code: i32) -> !;

    fn is_root(&self) -> bool {
        self.rank() == 0
    }
}

fn check_root(root: usize, world_size: usize) -> Result<(), DistError> {
    if root < world_size {
        Ok(())
    } else {
        Err(DistError::BadRoot { root, world_size })
    }
}

/// A reduce-scatter's pieces: one per rank, together the whole buffer of `len` elements.
fn check_scatter_counts(counts: &[usize], world_size: usize, len: usize) -> Result<(), DistError> {
    if counts.len() == world_size && counts.iter().sum::<usize>() == len {
        Ok(())
    } else {
        Err(DistError::BadCounts { counts: counts.to_vec(), world_size, len })
    }
}

/// An all-gather's pieces: one per rank, this rank's (`rank`) the `len` elements it sends.
fn check_gather_counts(counts: &[usize], world_size: usize, rank: usize, len: usize) -> Result<(), DistError> {
    if counts.len() == world_size && counts.get(rank) == Some(&len) {
        Ok(())
    } else {
        Err(DistError::BadCounts { counts: counts.to_vec(), world_size, len })
    }
}

/// The environment variable by which an MPI launcher announced this process, if one did.
pub fn mpi_launch_var() -> Option<&'static str> {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"].into_iter().find(|v| std::env::var_os(v).is_some())
}

/// This process's index among the ranks on its machine (which GPU it should use), from the
/// launcher's environment; 0 when not launched by one.
pub fn local_rank() -> usize {
    ["OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "LOCAL_RANK"]
        .iter()
        .find_map(|v| std::env::var(v).ok()?.parse().ok())
        .unwrap_or(0)
}

/// The communicator `mode` asks for. MPI can be initialised once per process, so call this once
/// and keep the result for the whole run: dropping an MPI communicator finalises MPI.
pub fn init(mode: DistMode) -> Result<Box<dyn Communicator>, DistError> {
    let launched_by = match mode {
        DistMode::None => return Ok(Box::new(SingleProcess)),
        DistMode::Mpi => "--dist mpi was given".to_string(),
        DistMode::Nccl => return nccl::init("--dist nccl was given"),
        DistMode::Auto => match mpi_launch_var() {
            Some(var) => format!("an MPI launcher started this process ({var} is set)"),
            // torchrun-style (RANK, WORLD_SIZE) has no MPI behind it: NCCL's file rendezvous, or a
            // refusal without the feature rather than W copies overwriting each other's checkpoints.
            None if nccl::torchrun_wants_nccl()? => {
                return nccl::init("a torchrun-style launcher started this process (RANK and WORLD_SIZE are set)")
            }
            None => return Ok(Box::new(SingleProcess)),
        },
    };
    init_mpi(launched_by)
}

#[cfg(feature = "mpi")]
fn init_mpi(_launched_by: String) -> Result<Box<dyn Communicator>, DistError> {
    Ok(Box::new(self::mpi::Mpi::init()?))
}

#[cfg(not(feature = "mpi"))]
fn init_mpi(launched_by: String) -> Result<Box<dyn Communicator>, DistError> {
    Err(DistError::MpiNotBuilt(launched_by))
}

/// `result`, unless it is an error on one of several ranks: then the error is printed with the
/// rank and the whole job ends (`MPI_Abort`), since returning alone would leave the other ranks
/// waiting forever in their next collective.
pub fn or_abort<T>(comm: &dyn Communicator, result: anyhow::Result<T>) -> anyhow::Result<T> {
    match result {
        Err(e) if comm.world_size() > 1 => {
            eprintln!("rank {} of {}: error: {e:#}", comm.rank(), comm.world_size());
            comm.abort(1)
        }
        other => other,
    }
}

/// This rank's share of the `count` items from `first` on: `first + rank`, then every
/// `world_size`-th one. Together the ranks take each item once, whatever the number of ranks.
pub fn rank_stride(comm: &dyn Communicator, first: usize, count: usize) -> impl Iterator<Item = usize> {
    (first..first + count).skip(comm.rank()).step_by(comm.world_size().max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_single_process_is_a_world_of_one_whose_collectives_are_identities() {
        let comm = SingleProcess;
        assert_eq!((comm.rank(), comm.world_size(), comm.is_root()), (0, 1, true));
        let mut buf = [1.5f32, -2.0, 3.25];
        comm.broadcast(&mut buf, 0).unwrap();
        assert_eq!(buf, [1.5, -2.0, 3.25]);
        assert_eq!(comm.reduce_scatter_sum(&buf, &[3]).unwrap(), buf);
        assert_eq!(comm.all_gather(&buf, &[3]).unwrap(), buf);
        for bad in [&[2][..], &[3, 0]] {
            assert!(matches!(comm.reduce_scatter_sum(&buf, bad), Err(DistError::BadCounts { .. })), "{bad:?}");
            assert!(matches!(comm.all_gather(&buf, bad), Err(DistError::BadCounts { .. })), "{bad:?}");
        }
        let mut totals = [1e17f64 + 1.0, 3.0];
        comm.all_reduce_sum_f64(&mut totals).unwrap();
        assert_eq!(totals, [1e17 + 1.0, 3.0]);
        assert_eq!(comm.all_gather_bytes(b"state").unwrap(), vec![b"state".to_vec()]);
        comm.barrier().unwrap();
        assert!(matches!(comm.broadcast(&mut buf, 1), Err(DistError::BadRoot { root: 1, world_size: 1 })));
        assert_eq!(or_abort(&comm, Err::<(), _>(anyhow::anyhow!("alone"))).unwrap_err().to_string(), "alone");
    }

    /// A world of W ranks, as far as `rank_stride` looks: rank and size only.
    struct Rank(usize, usize);

    impl Communicator for Rank {
        fn rank(&self) -> usize {
            self.0
        }
        fn world_size(&self) -> usize {
            self.1
        }
        fn all_reduce_sum_f64(&self, _: &mut [f64]) -> Result<(), DistError> {
            Ok(())
        }
        fn reduce_scatter_sum(&self, buf: &[f32], _: &[usize]) -> Result<Vec<f32>, DistError> {
            Ok(buf.to_vec())
        }
        fn all_gather(&self, mine: &[f32], _: &[usize]) -> Result<Vec<f32>, DistError> {
            Ok(mine.to_vec())
        }
        fn broadcast(&self, _: &mut [f32], _: usize) -> Result<(), DistError> {
            Ok(())
        }
        fn all_gather_bytes(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>, DistError> {
            Ok(vec![mine.to_vec()])
        }
        fn barrier(&self) -> Result<(), DistError> {
            Ok(())
        }
        fn abort(&self, code: i32) -> ! {
            std::process::exit(code)
        }
    }

    #[test]
    fn the_ranks_strides_take_every_item_once() {
        assert_eq!(rank_stride(&Rank(1, 3), 10, 8).collect::<Vec<_>>(), [11, 14, 17]);
        let mut all: Vec<usize> = (0..3).flat_map(|r| rank_stride(&Rank(r, 3), 10, 8)).collect();
        all.sort_unstable();
        assert_eq!(all, (10..18).collect::<Vec<_>>());
        assert_eq!(rank_stride(&SingleProcess, 4, 3).collect::<Vec<_>>(), [4, 5, 6]);
    }

    #[test]
    fn none_and_auto_without_a_launcher_give_a_single_process() {
        assert_eq!(init(DistMode::None).unwrap().world_size(), 1);
        if mpi_launch_var().is_none() {
            assert_eq!(init(DistMode::Auto).unwrap().world_size(), 1);
        }
    }

    #[cfg(not(feature = "mpi"))]
    #[test]
    fn asking_for_mpi_without_the_feature_says_how_to_get_it() {
        let err = init(DistMode::Mpi).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("--features mpi"), "{err}");
    }
}
