//! MPI, the communicator of `mpirun` jobs (behind the `mpi` feature): MPI_COMM_WORLD through the
//! `mpi` crate, used from the training thread only (`MPI_THREAD_FUNNELED`).

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
            let displs = round_counts.iter().scan(0, |at, &n| Some(std::mem::replace(at, *at + n))).collect::<Vec<_>>();
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
