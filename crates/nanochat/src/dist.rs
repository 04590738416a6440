//! Data-parallel communication between training processes: a small communicator (rank, world
//! size, reduce-scatter, all-gather, all-reduce of totals, broadcast, barrier) with a
//! single-process implementation that is always there and an MPI one behind the `mpi` feature
//! (`mpirun -n N nanochat base train ...`), and the ZeRO-2 pieces built on it: which rank owns
//! which parameter ([`Shards`]), gradients reduced to their owners, updated parameters gathered.
//!
//! Design choices (docs/DISTRIBUTED.md has the whole picture):
//! - existing engines only, never a home-made network layer: MPI for CPUs; NCCL for GPUs
//!   (`src/dist_nccl.rs`, behind the `nccl` feature; rendezvous through MPI or a file; not yet
//!   run on a GPU);
//! - MPI is used only from the training thread (`MPI_THREAD_FUNNELED`): the data loader's and
//!   rayon's threads never communicate;
//! - tensors travel as one flat f32 buffer per collective (all gradients in one message), which
//!   costs a copy but keeps the per-message latency out of the step;
//! - the optimizer state is sharded, not replicated (as the original's DistMuon and DistAdamW):
//!   each parameter has one owner rank, balanced by size, which alone receives its averaged
//!   gradient, keeps its optimizer state and computes its update (Muon's Newton–Schulz included);
//!   the updated parameters are then gathered by every rank.

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
    #[error("pieces of {counts:?} elements do not fit {world_size} ranks and a buffer of {len} elements")]
    BadCounts { counts: Vec<usize>, world_size: usize, len: usize },
    #[error("{vars} parameters but ownership of {owned}: shard the optimizers of these parameters")]
    NotSharded { vars: usize, owned: usize },
    #[error(transparent)]
    Nccl(#[from] crate::dist_nccl::NcclError),
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

    fn all_reduce_sum_f64(&self, _buf: &mut [f64]) -> Result<(), DistError> {
        Ok(())
    }

    fn reduce_scatter_sum(&self, buf: &[f32], counts: &[usize]) -> Result<Vec<f32>, DistError> {
        check_scatter_counts(counts, 1, buf.len())?;
        Ok(buf.to_vec())
    }

    fn all_gather(&self, mine: &[f32], counts: &[usize]) -> Result<Vec<f32>, DistError> {
        check_gather_counts(counts, 1, 0, mine.len())?;
        Ok(mine.to_vec())
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
        DistMode::Nccl => return crate::dist_nccl::init("--dist nccl was given"),
        DistMode::Auto => match mpi_launch_var() {
            Some(var) => format!("an MPI launcher started this process ({var} is set)"),
            // torchrun-style (RANK, WORLD_SIZE) has no MPI behind it: NCCL's file rendezvous, or a
            // refusal without the feature rather than W copies overwriting each other's checkpoints.
            None if crate::dist_nccl::torchrun_wants_nccl()? => {
                return crate::dist_nccl::init(
                    "a torchrun-style launcher started this process (RANK and WORLD_SIZE are set)",
                )
            }
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

    use super::{check_gather_counts, check_root, check_scatter_counts, Communicator, DistError};

    /// Elements per message: MPI counts are 32-bit, so bigger buffers go in pieces.
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

        fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<(), DistError> {
            for chunk in buf.chunks_mut(CHUNK) {
                // rsmpi has no MPI_IN_PLACE for all-reduce: send a copy.
                let send = chunk.to_vec();
                self.world.all_reduce_into(&send[..], chunk, SystemOperation::sum());
            }
            Ok(())
        }

        fn reduce_scatter_sum(&self, buf: &[f32], counts: &[usize]) -> Result<Vec<f32>, DistError> {
            check_scatter_counts(counts, self.world_size(), buf.len())?;
            // rsmpi wraps MPI_Reduce_scatter_block (equal pieces) only; one MPI_Reduce of each
            // rank's piece onto that rank moves the same data without padding the pieces.
            let mut mine = Vec::new();
            let mut start = 0;
            for (owner, &n) in counts.iter().enumerate() {
                let piece = &buf[start..start + n];
                start += n;
                let root = self.world.process_at_rank(count(owner)?);
                if owner == self.rank() {
                    mine = vec![0f32; n];
                    for (send, recv) in piece.chunks(CHUNK).zip(mine.chunks_mut(CHUNK)) {
                        root.reduce_into_root(send, recv, SystemOperation::sum());
                    }
                } else {
                    for send in piece.chunks(CHUNK) {
                        root.reduce_into(send, SystemOperation::sum());
                    }
                }
            }
            Ok(mine)
        }

        fn all_gather(&self, mine: &[f32], counts: &[usize]) -> Result<Vec<f32>, DistError> {
            check_gather_counts(counts, self.world_size(), self.rank(), mine.len())?;
            let starts: Vec<usize> = counts.iter().scan(0, |at, &n| Some(std::mem::replace(at, *at + n))).collect();
            let mut all = vec![0f32; counts.iter().sum()];
            // Counts and displacements are 32-bit: in rounds of at most CHUNK elements in all,
            // each rank sending the next piece of its own.
            let per_rank = (CHUNK / counts.len()).max(1);
            let longest = counts.iter().copied().max().unwrap_or(0);
            let mut from = 0;
            while from < longest {
                let sizes: Vec<usize> = counts.iter().map(|&n| n.saturating_sub(from).min(per_rank)).collect();
                let round_counts = sizes.iter().map(|&n| count(n)).collect::<Result<Vec<Count>, _>>()?;
                let displs =
                    round_counts.iter().scan(0, |at, &n| Some(std::mem::replace(at, *at + n))).collect::<Vec<_>>();
                let mut round = vec![0f32; sizes.iter().sum()];
                let send = &mine[from.min(mine.len())..][..sizes[self.rank()]];
                let mut partition = PartitionMut::new(&mut round[..], &round_counts[..], &displs[..]);
                self.world.all_gather_varcount_into(send, &mut partition);
                let mut at = 0;
                for (&start, &n) in starts.iter().zip(&sizes) {
                    all[start + from..start + from + n].copy_from_slice(&round[at..at + n]);
                    at += n;
                }
                from += per_rank;
            }
            Ok(all)
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

/// Which rank owns each of a list of parameters (ZeRO-2): the owner alone receives the parameter's
/// averaged gradient, keeps its optimizer state and computes its update. Every rank computes the
/// same ownership from the same sizes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shards {
    /// This process's rank.
    rank: usize,
    world_size: usize,
    /// The owner of each parameter, in the list's order.
    owners: Vec<usize>,
}

impl Shards {
    /// Ownership of parameters of `sizes` elements balanced by size: largest first, each to the
    /// rank with the fewest elements so far (the lowest such rank on ties), as the optimizer
    /// work and state of a parameter grow with its size. Deterministic, so the same on every rank.
    pub fn balanced(sizes: &[usize], rank: usize, world_size: usize) -> Shards {
        let world_size = world_size.max(1);
        let mut order: Vec<usize> = (0..sizes.len()).collect();
        // A stable sort: parameters of equal size keep their order.
        order.sort_by_key(|&i| std::cmp::Reverse(sizes[i]));
        let mut load = vec![0usize; world_size];
        let mut owners = vec![0; sizes.len()];
        for i in order {
            let lightest = (0..world_size).min_by_key(|&r| (load[r], r)).unwrap_or(0);
            owners[i] = lightest;
            load[lightest] += sizes[i];
        }
        Shards { rank, world_size, owners }
    }

    pub fn world_size(&self) -> usize {
        self.world_size
    }

    /// The owner of each parameter, in the list's order.
    pub fn owners(&self) -> &[usize] {
        &self.owners
    }

    /// Whether this rank owns parameter `i`.
    pub fn owns(&self, i: usize) -> bool {
        self.owners.get(i) == Some(&self.rank)
    }

    /// The parameters grouped by owner, rank 0's first, each group in list order: the layout of
    /// the flat buffers of [`reduce_grads_to_owners`] and [`all_gather_vars`].
    fn by_owner(&self) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.owners.len()).collect();
        order.sort_by_key(|&i| self.owners[i]);
        order
    }

    fn check(&self, vars: &[Var]) -> Result<(), DistError> {
        if vars.len() == self.owners.len() {
            Ok(())
        } else {
            Err(DistError::NotSharded { vars: vars.len(), owned: self.owners.len() })
        }
    }
}

/// The first half of a ZeRO-2 step: each gradient of `vars` is summed over the ranks onto its
/// owner alone (one reduce-scatter of all of them) and divided by the number of ranks, so that the
/// owner holds the gradient of the mean loss over every rank's batches, which is what one process
/// with the same global batch computes, up to the order of additions. Returns this rank's own
/// gradients; the others' are dropped. Which vars have a gradient depends on the model only, so
/// it is the same on every rank.
pub fn reduce_grads_to_owners(
    comm: &dyn Communicator,
    vars: &[Var],
    shards: &Shards,
    grads: &GradStore,
) -> anyhow::Result<GradStore> {
    shards.check(vars)?;
    let present: Vec<(usize, Tensor)> =
        shards.by_owner().into_iter().filter_map(|i| Some((i, grads.get(&vars[i])?.clone()))).collect();
    let mut counts = vec![0; shards.world_size];
    for (i, g) in &present {
        counts[shards.owners[*i]] += g.elem_count();
    }
    let mut mine = comm.reduce_scatter_sum(&flatten(present.iter().map(|(_, g)| g))?, &counts)?;
    let scale = 1.0 / shards.world_size as f32;
    mine.iter_mut().for_each(|x| *x *= scale);
    let mut own = GradStore::default();
    let mut offset = 0;
    for (i, g) in present.iter().filter(|(i, _)| shards.owns(*i)) {
        own.insert(&vars[*i], unflatten(&mine, &mut offset, g)?);
    }
    Ok(own)
}

/// The second half of a ZeRO-2 step: every rank gets the values of `vars` that their owners
/// hold, the parameters each just updated (one all-gather), so that all ranks hold the same
/// weights again.
pub fn all_gather_vars(comm: &dyn Communicator, vars: &[Var], shards: &Shards) -> anyhow::Result<()> {
    shards.check(vars)?;
    let order = shards.by_owner();
    let mut counts = vec![0; shards.world_size];
    for &i in &order {
        counts[shards.owners[i]] += vars[i].elem_count();
    }
    let mine = flatten(order.iter().filter(|&&i| shards.owns(i)).map(|&i| vars[i].as_tensor()))?;
    let all = comm.all_gather(&mine, &counts)?;
    let mut offset = 0;
    for i in order {
        if shards.owns(i) {
            offset += vars[i].elem_count();
        } else {
            vars[i].set(&unflatten(&all, &mut offset, vars[i].as_tensor())?)?;
        }
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

    /// W ranks as threads of one process, to test the users of the collectives without MPI: every
    /// collective is an exchange of each rank's contribution through shared slots, and the sums
    /// add the ranks in order, as MPI's reductions of two ranks do.
    struct Threads {
        rank: usize,
        size: usize,
        shared: std::sync::Arc<(std::sync::Mutex<Vec<Vec<f64>>>, std::sync::Barrier)>,
    }

    impl Threads {
        fn world(size: usize) -> Vec<Threads> {
            let shared =
                std::sync::Arc::new((std::sync::Mutex::new(vec![Vec::new(); size]), std::sync::Barrier::new(size)));
            (0..size).map(|rank| Threads { rank, size, shared: shared.clone() }).collect()
        }

        /// Every rank's contribution, on every rank.
        fn exchange(&self, mine: Vec<f64>) -> Vec<Vec<f64>> {
            let (slots, barrier) = &*self.shared;
            slots.lock().unwrap()[self.rank] = mine;
            barrier.wait();
            let all = slots.lock().unwrap().clone();
            // No rank overwrites its slot (next collective) before every rank has read them all.
            barrier.wait();
            all
        }

        fn sum_f32(&self, buf: &[f32]) -> Vec<f32> {
            let all = self.exchange(buf.iter().map(|&x| f64::from(x)).collect());
            (0..buf.len()).map(|j| all.iter().fold(0f32, |acc, r| acc + r[j] as f32)).collect()
        }
    }

    impl Communicator for Threads {
        fn rank(&self) -> usize {
            self.rank
        }
        fn world_size(&self) -> usize {
            self.size
        }
        fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<(), DistError> {
            let all = self.exchange(buf.to_vec());
            for (j, x) in buf.iter_mut().enumerate() {
                *x = all.iter().map(|r| r[j]).sum();
            }
            Ok(())
        }
        fn reduce_scatter_sum(&self, buf: &[f32], counts: &[usize]) -> Result<Vec<f32>, DistError> {
            check_scatter_counts(counts, self.size, buf.len())?;
            let start: usize = counts[..self.rank].iter().sum();
            Ok(self.sum_f32(buf)[start..start + counts[self.rank]].to_vec())
        }
        fn all_gather(&self, mine: &[f32], counts: &[usize]) -> Result<Vec<f32>, DistError> {
            check_gather_counts(counts, self.size, self.rank, mine.len())?;
            Ok(self.exchange(mine.iter().map(|&x| f64::from(x)).collect()).concat().iter().map(|&x| x as f32).collect())
        }
        fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<(), DistError> {
            let all = self.exchange(buf.iter().map(|&x| f64::from(x)).collect());
            buf.iter_mut().zip(&all[root]).for_each(|(x, &y)| *x = y as f32);
            Ok(())
        }
        fn all_gather_bytes(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>, DistError> {
            let all = self.exchange(mine.iter().map(|&b| f64::from(b)).collect());
            Ok(all.iter().map(|r| r.iter().map(|&b| b as u8).collect()).collect())
        }
        fn barrier(&self) -> Result<(), DistError> {
            self.exchange(Vec::new());
            Ok(())
        }
        fn abort(&self, code: i32) -> ! {
            panic!("rank {} aborted with {code}", self.rank)
        }
    }

    #[test]
    fn ownership_balances_elements_the_same_way_every_time() {
        // Largest first to the lightest rank: 10 -> 0, 8 -> 1, 3 -> 1, 2 -> 0, 2 -> 1 (12 vs 13).
        let sizes = [10, 3, 8, 2, 2];
        let shards = Shards::balanced(&sizes, 1, 2);
        assert_eq!(shards.owners(), [0, 1, 1, 0, 1]);
        assert_eq!((0..5).filter(|&i| shards.owns(i)).collect::<Vec<_>>(), [1, 2, 4]);
        assert_eq!(Shards::balanced(&sizes, 0, 2).owners(), shards.owners());
        assert_eq!(Shards::balanced(&sizes, 0, 1).owners(), [0; 5]);
        // More ranks than parameters: the spare ranks own nothing.
        assert_eq!(Shards::balanced(&[4, 4], 0, 3).owners(), [0, 1]);
    }

    #[test]
    fn gradients_reach_their_owners_averaged_and_updates_reach_every_rank() {
        let shapes: [&[usize]; 3] = [&[2, 3], &[4], &[5]];
        let results = std::thread::scope(|scope| {
            let handles: Vec<_> = Threads::world(2)
                .into_iter()
                .map(|comm| {
                    scope.spawn(move || {
                        let dev = candle_core::Device::Cpu;
                        // Every rank has its own copy of the parameters, with its own gradients.
                        let r = comm.rank() as f32;
                        let vars: Vec<Var> = shapes
                            .iter()
                            .map(|&s| Var::from_tensor(&Tensor::zeros(s, DType::F32, &dev)?))
                            .collect::<candle_core::Result<_>>()?;
                        let mut grads = GradStore::default();
                        for (i, v) in vars.iter().enumerate() {
                            grads.insert(
                                v,
                                (Tensor::ones(v.shape(), DType::F32, &dev)? * (10.0 * i as f64 + f64::from(r)))?,
                            );
                        }
                        let sizes: Vec<usize> = vars.iter().map(|v| v.elem_count()).collect();
                        let shards = Shards::balanced(&sizes, comm.rank(), 2);
                        let own = reduce_grads_to_owners(&comm, &vars, &shards, &grads)?;
                        let mut seen = Vec::new();
                        for (i, v) in vars.iter().enumerate() {
                            let mean = own.get(v).map(|g| g.flatten_all()?.to_vec1::<f32>()).transpose()?;
                            seen.push(mean);
                            if shards.owns(i) {
                                // The owner's update: a value that says who made it.
                                v.set(
                                    &(Tensor::ones(v.shape(), DType::F32, &dev)?
                                        * (100.0 * f64::from(r + 1.0) + i as f64))?,
                                )?;
                            }
                        }
                        all_gather_vars(&comm, &vars, &shards)?;
                        let after: Vec<Vec<f32>> = vars
                            .iter()
                            .map(|v| v.flatten_all()?.to_vec1::<f32>())
                            .collect::<candle_core::Result<_>>()?;
                        anyhow::Ok((shards.owners().to_vec(), seen, after))
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap().unwrap()).collect::<Vec<_>>()
        });
        let owners = &results[0].0;
        // Sizes 6, 4, 5: rank 0 owns the first, rank 1 the other two (9 elements against 6).
        assert_eq!(owners, &[0, 1, 1]);
        for (rank, (_, seen, after)) in results.iter().enumerate() {
            for (i, grad) in seen.iter().enumerate() {
                let n = shapes[i].iter().product();
                // Ranks' gradients 10 i and 10 i + 1: the mean is 10 i + 0.5, on the owner only.
                let expected = (owners[i] == rank).then(|| vec![10.0 * i as f32 + 0.5; n]);
                assert_eq!(grad, &expected, "rank {rank}, parameter {i}");
                assert_eq!(
                    after[i],
                    vec![100.0 * (owners[i] as f32 + 1.0) + i as f32; n],
                    "rank {rank}, parameter {i}"
                );
            }
        }
    }
}
