//! Data-parallel communication between training processes: a small communicator (rank, world
//! size, all-reduce, broadcast, all-gather, barrier) with a single-process implementation that is
//! always there and an MPI one behind the `mpi` feature (`mpirun -n N nanochat base train ...`).
//!
//! Design choices (docs/DISTRIBUTED.md has the whole picture):
//! - existing engines only, never a home-made network layer: MPI for CPUs; NCCL for GPUs is
//!   designed (cudarc behind `cuda`, rendezvous through MPI) but not written, as nothing here can
//!   test it;
//! - MPI is used only from the training thread (`MPI_THREAD_FUNNELED`): the data loader's and
//!   rayon's threads never communicate;
//! - tensors travel as one flat f32 buffer per collective (all gradients in one message), which
//!   costs a copy but keeps the per-message latency out of the step.

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use serde::Serialize;
use thiserror::Error;

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
}

/// How a training run finds its peers (`--dist`).
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum DistMode {
    /// MPI when an MPI launcher started this process (mpirun sets OMPI_COMM_WORLD_SIZE, Hydra
    /// PMI_SIZE, PMIx PMIX_RANK), else a single process.
    Auto,
    /// MPI, even as a singleton (`nanochat ...` without mpirun is then a world of one).
    Mpi,
    /// A single process, whatever the environment says.
    None,
}

/// The collectives data-parallel training needs. Every rank must make the same calls in the same
/// order with buffers of the same length; the results are then the same on every rank.
pub trait Communicator {
    /// This process's index, 0-based; rank 0 logs and writes checkpoints.
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Replaces `buf` on every rank by the element-wise sum over ranks.
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), DistError>;
    /// [`Communicator::all_reduce_sum`] in f64, for totals that f32 would round (token counts).
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<(), DistError>;
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

    /// Replaces `buf` on every rank by the element-wise mean over ranks.
    fn all_reduce_avg(&self, buf: &mut [f32]) -> Result<(), DistError> {
        self.all_reduce_sum(buf)?;
        let scale = 1.0 / self.world_size() as f32;
        buf.iter_mut().for_each(|x| *x *= scale);
        Ok(())
    }
}

/// A world of one: every collective is the identity.
#[derive(Clone, Copy, Debug, Default)]
pub struct SingleProcess;

impl Communicator for SingleProcess {
    fn rank(&self) -> usize {
        0
    }

    fn world_size(&self) -> usize {
        1
    }

    fn all_reduce_sum(&self, _buf: &mut [f32]) -> Result<(), DistError> {
        Ok(())
    }

    fn all_reduce_sum_f64(&self, _buf: &mut [f64]) -> Result<(), DistError> {
        Ok(())
    }

    fn broadcast(&self, _buf: &mut [f32], root: usize) -> Result<(), DistError> {
        check_root(root, 1)
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

fn check_root(root: usize, world_size: usize) -> Result<(), DistError> {
    if root < world_size {
        Ok(())
    } else {
        Err(DistError::BadRoot { root, world_size })
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
        DistMode::Auto => match mpi_launch_var() {
            Some(var) => format!("an MPI launcher started this process ({var} is set)"),
            None => return Ok(Box::new(SingleProcess)),
        },
    };
    init_mpi(launched_by)
}

#[cfg(feature = "mpi")]
fn init_mpi(_launched_by: String) -> Result<Box<dyn Communicator>, DistError> {
    Ok(Box::new(mpi_world::Mpi::init()?))
}

#[cfg(not(feature = "mpi"))]
fn init_mpi(launched_by: String) -> Result<Box<dyn Communicator>, DistError> {
    Err(DistError::MpiNotBuilt(launched_by))
}

#[cfg(feature = "mpi")]
mod mpi_world {
    use mpi::collective::SystemOperation;
    use mpi::datatype::PartitionMut;
    use mpi::environment::Universe;
    use mpi::topology::SimpleCommunicator;
    use mpi::traits::{Communicator as _, CommunicatorCollectives, Root};
    use mpi::Count;

    use super::{check_root, Communicator, DistError};

    /// Elements per all-reduce message: MPI counts are 32-bit, so bigger buffers go in pieces.
    const CHUNK: usize = 1 << 28;

    /// MPI_COMM_WORLD of `mpirun`'s job.
    pub(super) struct Mpi {
        // Declared before the universe so that it is dropped first: the universe finalises MPI.
        world: SimpleCommunicator,
        _universe: Universe,
    }

    impl Mpi {
        pub(super) fn init() -> Result<Mpi, DistError> {
            let (universe, _) =
                mpi::initialize_with_threading(mpi::Threading::Funneled).ok_or(DistError::AlreadyInitialized)?;
            Ok(Mpi { world: universe.world(), _universe: universe })
        }
    }

    fn count(n: usize) -> Result<Count, DistError> {
        Count::try_from(n).map_err(|_| DistError::TooLarge(n))
    }

    impl Communicator for Mpi {
        fn rank(&self) -> usize {
            usize::try_from(self.world.rank()).unwrap_or(0)
        }

        fn world_size(&self) -> usize {
            usize::try_from(self.world.size()).unwrap_or(1)
        }

        fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), DistError> {
            for chunk in buf.chunks_mut(CHUNK) {
                // rsmpi has no MPI_IN_PLACE for all-reduce: send a copy.
                let send = chunk.to_vec();
                self.world.all_reduce_into(&send[..], chunk, SystemOperation::sum());
            }
            Ok(())
        }

        fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<(), DistError> {
            for chunk in buf.chunks_mut(CHUNK) {
                let send = chunk.to_vec();
                self.world.all_reduce_into(&send[..], chunk, SystemOperation::sum());
            }
            Ok(())
        }

        fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<(), DistError> {
            check_root(root, self.world_size())?;
            let root = self.world.process_at_rank(count(root)?);
            for chunk in buf.chunks_mut(CHUNK) {
                root.broadcast_into(chunk);
            }
            Ok(())
        }

        fn all_gather_bytes(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>, DistError> {
            let mut counts: Vec<Count> = vec![0; self.world_size()];
            self.world.all_gather_into(&count(mine.len())?, &mut counts[..]);
            let mut displs = Vec::with_capacity(counts.len());
            let mut total: Count = 0;
            for &c in &counts {
                displs.push(total);
                total = total.checked_add(c).ok_or(DistError::TooLarge(usize::MAX))?;
            }
            let mut all = vec![0u8; usize::try_from(total).unwrap_or(0)];
            let mut partition = PartitionMut::new(&mut all[..], &counts[..], &displs[..]);
            self.world.all_gather_varcount_into(mine, &mut partition);
            let pieces = counts.iter().zip(&displs).map(|(&c, &d)| {
                let (c, d) = (usize::try_from(c).unwrap_or(0), usize::try_from(d).unwrap_or(0));
                all[d..d + c].to_vec()
            });
            Ok(pieces.collect())
        }

        fn barrier(&self) -> Result<(), DistError> {
            self.world.barrier();
            Ok(())
        }

        fn abort(&self, code: i32) -> ! {
            self.world.abort(code)
        }
    }
}

/// The tensors as one f32 buffer, in order.
fn flatten<'a>(tensors: impl IntoIterator<Item = &'a Tensor>) -> candle_core::Result<Vec<f32>> {
    let mut flat = Vec::new();
    for t in tensors {
        flat.extend(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?);
    }
    Ok(flat)
}

/// The piece of `flat` at `*offset` shaped, typed and placed like `like`; advances `offset`.
fn unflatten(flat: &[f32], offset: &mut usize, like: &Tensor) -> candle_core::Result<Tensor> {
    let n = like.elem_count();
    let t = Tensor::from_slice(&flat[*offset..*offset + n], like.shape(), like.device())?.to_dtype(like.dtype())?;
    *offset += n;
    Ok(t)
}

/// Averages the gradients of `vars` across ranks (in one message), so that every rank steps with
/// the gradient of the mean loss over all ranks' batches. A no-op for a single process.
pub fn all_reduce_grads(comm: &dyn Communicator, vars: &[Var], grads: &mut GradStore) -> anyhow::Result<()> {
    if comm.world_size() == 1 {
        return Ok(());
    }
    // Which vars have a gradient depends on the model only, so it is the same on every rank.
    let present: Vec<(&Var, Tensor)> = vars.iter().filter_map(|v| Some((v, grads.get(v)?.clone()))).collect();
    let mut flat = flatten(present.iter().map(|(_, g)| g))?;
    comm.all_reduce_avg(&mut flat)?;
    let mut offset = 0;
    for (var, g) in present {
        grads.insert(var, unflatten(&flat, &mut offset, &g)?);
    }
    Ok(())
}

/// Gives every rank rank 0's values of `vars` (as PyTorch's DDP does at the start), so that the
/// ranks start in step whatever their initialisation or the checkpoint file they read.
pub fn broadcast_vars(comm: &dyn Communicator, vars: &[Var]) -> anyhow::Result<()> {
    if comm.world_size() == 1 {
        return Ok(());
    }
    let mut flat = flatten(vars.iter().map(|v| v.as_tensor()))?;
    comm.broadcast(&mut flat, 0)?;
    let mut offset = 0;
    for var in vars {
        var.set(&unflatten(&flat, &mut offset, var.as_tensor())?)?;
    }
    Ok(())
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
        comm.all_reduce_sum(&mut buf).unwrap();
        comm.all_reduce_avg(&mut buf).unwrap();
        comm.broadcast(&mut buf, 0).unwrap();
        assert_eq!(buf, [1.5, -2.0, 3.25]);
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
        fn all_reduce_sum(&self, _: &mut [f32]) -> Result<(), DistError> {
            Ok(())
        }
        fn all_reduce_sum_f64(&self, _: &mut [f64]) -> Result<(), DistError> {
            Ok(())
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

    #[test]
    fn flat_buffers_round_trip_tensors_of_any_shape_and_dtype() {
        let dev = candle_core::Device::Cpu;
        let a = Tensor::arange(0f32, 6.0, &dev).unwrap().reshape((2, 3)).unwrap();
        let b = Tensor::new(&[7f32, 8.0], &dev).unwrap().to_dtype(DType::BF16).unwrap();
        let flat = flatten([&a, &b]).unwrap();
        assert_eq!(flat, [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 7.0, 8.0]);
        let mut offset = 0;
        let a2 = unflatten(&flat, &mut offset, &a).unwrap();
        let b2 = unflatten(&flat, &mut offset, &b).unwrap();
        assert_eq!(offset, 8);
        assert_eq!((a2.dims(), b2.dtype()), (a.dims(), DType::BF16));
        assert_eq!(a2.to_vec2::<f32>().unwrap(), a.to_vec2::<f32>().unwrap());
        assert_eq!(b2.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap(), [7.0, 8.0]);
    }
}
