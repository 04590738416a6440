//! NCCL, the third [`Communicator`]: data-parallel training with one process per GPU
//! (`--dist nccl`, docs/DISTRIBUTED.md "GPUs: NCCL").
//!
//! Two halves:
//! - the rendezvous, plain code that is always compiled and unit-tested: how the ranks learn their
//!   rank, the world size and NCCL's unique id. Under `mpirun` rank 0's id travels through MPI;
//!   under a torchrun-style launch (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`) it travels through a file
//!   that rank 0 writes atomically and the others poll for;
//! - the communicator itself (`Nccl`, behind the `nccl` feature: cudarc's NCCL bindings through
//!   candle). The trait's collectives take host slices, so they copy to the GPU, run the NCCL
//!   collective there and copy back; `Nccl`'s own tensor methods run on the GPU buffers
//!   themselves, for callers that hold the concrete type.
//!
//! Nothing of the second half has run yet: no machine with a GPU and a Rust toolchain has been
//! available (docs/CUDA.md says what was type-checked and linked).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use thiserror::Error;

use super::{Communicator, DistError};

/// Bytes of an NCCL unique id (`ncclUniqueId`).
pub const ID_LEN: usize = 128;
/// Names the file through which a torchrun-style launch passes the id.
pub const ID_FILE_VAR: &str = "NANOCHAT_NCCL_ID_FILE";
/// Seconds the ranks other than 0 wait for the id file.
pub const ID_TIMEOUT_VAR: &str = "NANOCHAT_NCCL_ID_TIMEOUT";
/// As long as torchrun's own rendezvous waits by default: rank 0 may still be loading data.
const DEFAULT_ID_TIMEOUT: Duration = Duration::from_secs(900);
/// First line of an id file: says what the file is and which format it has.
const ID_FILE_HEADER: &str = "nanochat-nccl-id 1";

/// What can go wrong setting up or using NCCL.
#[derive(Debug, Error)]
pub enum NcclError {
    #[error(
        "{0}, but this nanochat was built without NCCL: rebuild with `cargo build --release --features nccl` \
         (needs the CUDA toolkit and libnccl, see docs/CUDA.md), or pass --dist none"
    )]
    NotBuilt(String),
    #[error("{var}={value:?} is not a valid {what}")]
    BadEnv { var: &'static str, value: String, what: &'static str },
    #[error("{set} is set but {unset} is not: a torchrun-style launch sets RANK and WORLD_SIZE")]
    HalfLaunch { set: &'static str, unset: &'static str },
    #[error("rank {rank} is out of range for {world_size} processes")]
    BadRank { rank: usize, world_size: usize },
    #[error("cannot write the NCCL id file {path}: {message}")]
    WriteIdFile { path: PathBuf, message: String },
    #[error("cannot read the NCCL id file {path}: {source}")]
    ReadIdFile { path: PathBuf, source: std::io::Error },
    #[error("{path} is not an NCCL id file written by nanochat ({reason}); remove it or set {ID_FILE_VAR}")]
    MalformedIdFile { path: PathBuf, reason: String },
    #[error(
        "rank 0 did not write the NCCL id file {path} within {waited:?}{stale}: did rank 0 start and \
         see the same file (set {ID_FILE_VAR} to a path every rank shares; {ID_TIMEOUT_VAR} sets the wait)?"
    )]
    IdFileTimeout { path: PathBuf, waited: Duration, stale: String },
    #[error("rank 0 sent an NCCL id of {0} bytes instead of {ID_LEN}")]
    BadId(usize),
    #[error("NCCL: {0}")]
    Nccl(String),
    #[error("CUDA: {0}")]
    Cuda(String),
}

/// A torchrun-style launch, from its environment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Launch {
    pub rank: usize,
    pub world_size: usize,
    /// What tells this launch from an earlier one that left an id file behind: torchrun's run id
    /// and master address and port, those of them that are set (empty when none is).
    pub run: String,
}

/// The torchrun-style launch this process belongs to (`RANK` and `WORLD_SIZE` set), if any.
pub fn torchrun_launch() -> Result<Option<Launch>, NcclError> {
    launch_from(|var| std::env::var(var).ok())
}

/// [`torchrun_launch`] from any source of variables, so that tests need not touch the process's
/// environment (other tests read it concurrently).
fn launch_from(var: impl Fn(&str) -> Option<String>) -> Result<Option<Launch>, NcclError> {
    let (rank, world_size) = match (var("RANK"), var("WORLD_SIZE")) {
        (None, None) => return Ok(None),
        (Some(_), None) => return Err(NcclError::HalfLaunch { set: "RANK", unset: "WORLD_SIZE" }),
        (None, Some(_)) => return Err(NcclError::HalfLaunch { set: "WORLD_SIZE", unset: "RANK" }),
        (Some(r), Some(w)) => (r, w),
    };
    let parse = |name: &'static str, value: String| {
        value.trim().parse::<usize>().map_err(|_| NcclError::BadEnv { var: name, value, what: "count" })
    };
    let (rank, world_size) = (parse("RANK", rank)?, parse("WORLD_SIZE", world_size)?);
    if rank >= world_size {
        return Err(NcclError::BadRank { rank, world_size });
    }
    let run = ["TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT"]
        .into_iter()
        .filter_map(|name| Some(format!("{name}={}", var(name)?)))
        .collect::<Vec<_>>()
        .join(" ");
    // One line in the file: a value with a line break must not end it early.
    let run = run.replace(['\n', '\r'], " ");
    Ok(Some(Launch { rank, world_size, run }))
}

/// Whether `--dist auto`, with no MPI launcher in sight, should start NCCL: under a torchrun-style
/// launch of more than one rank.
pub fn torchrun_wants_nccl() -> Result<bool, NcclError> {
    wants_nccl(torchrun_launch())
}

/// [`torchrun_wants_nccl`] of a launch read. A lone RANK or WORLD_SIZE is no such launch but some
/// other tool's variable, so `auto` runs alone then; a malformed pair is an error.
fn wants_nccl(launch: Result<Option<Launch>, NcclError>) -> Result<bool, NcclError> {
    match launch {
        Ok(launch) => Ok(launch.is_some_and(|l| l.world_size > 1)),
        Err(NcclError::HalfLaunch { .. }) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Where a torchrun-style launch passes the id: `$NANOCHAT_NCCL_ID_FILE`, else `nccl_id` in
/// `$NANOCHAT_BASE_DIR` (which a multi-machine run already shares, for checkpoints).
pub fn id_file_path() -> PathBuf {
    std::env::var_os(ID_FILE_VAR).map(PathBuf::from).unwrap_or_else(|| crate::common::base_dir().join("nccl_id"))
}

/// How long the other ranks wait for rank 0's id file: `$NANOCHAT_NCCL_ID_TIMEOUT` seconds.
pub fn id_timeout() -> Result<Duration, NcclError> {
    match std::env::var(ID_TIMEOUT_VAR) {
        Err(_) => Ok(DEFAULT_ID_TIMEOUT),
        Ok(value) => value
            .trim()
            .parse::<f64>()
            .ok()
            .and_then(|s| Duration::try_from_secs_f64(s).ok())
            .ok_or(NcclError::BadEnv { var: ID_TIMEOUT_VAR, value, what: "number of seconds" }),
    }
}

/// Rank 0's side of the file rendezvous: writes `id` for launch `run` of `world_size` ranks to
/// `path`, through a temporary file and a rename so that no rank ever reads half an id.
pub fn write_id_file(path: &Path, id: &[u8; ID_LEN], run: &str, world_size: usize) -> Result<(), NcclError> {
    let hex: String = id.iter().map(|b| format!("{b:02x}")).collect();
    let text = format!("{ID_FILE_HEADER}\nrun {run}\nworld {world_size}\nid {hex}\n");
    crate::common::write_atomic(path, text.as_bytes())
        .map_err(|e| NcclError::WriteIdFile { path: path.to_path_buf(), message: format!("{e:#}") })
}

/// The contents of an id file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdFile {
    pub run: String,
    pub world_size: usize,
    pub id: [u8; ID_LEN],
}

/// Reads back what [`write_id_file`] wrote; anything else is refused, not guessed at.
pub fn parse_id_file(path: &Path, text: &str) -> Result<IdFile, NcclError> {
    let bad = |reason: &str| NcclError::MalformedIdFile { path: path.to_path_buf(), reason: reason.to_string() };
    let mut lines = text.lines();
    if lines.next() != Some(ID_FILE_HEADER) {
        return Err(bad(&format!("its first line is not {ID_FILE_HEADER:?}")));
    }
    let mut field = |name: &str| {
        lines
            .next()
            .and_then(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .ok_or_else(|| bad(&format!("no {name:?} line where expected")))
    };
    let run = field("run")?.to_string();
    let world_size = field("world")?.parse::<usize>().map_err(|_| bad("its world size is not a count"))?;
    let hex = field("id")?.as_bytes();
    if hex.len() != 2 * ID_LEN {
        return Err(bad(&format!("its id has {} hex digits, not {}", hex.len(), 2 * ID_LEN)));
    }
    let mut id = [0u8; ID_LEN];
    for (byte, pair) in id.iter_mut().zip(hex.chunks_exact(2)) {
        let digits = std::str::from_utf8(pair).map_err(|_| bad("its id is not hexadecimal"))?;
        *byte = u8::from_str_radix(digits, 16).map_err(|_| bad("its id is not hexadecimal"))?;
    }
    Ok(IdFile { run, world_size, id })
}

/// The other ranks' side of the file rendezvous: the id rank 0 wrote to `path` for this launch
/// (`run`, `world_size`), polled every `poll` for at most `timeout`. A file of another launch
/// (a crashed run's leftover) is waited past: rank 0 replaces it. A file that is not an id file
/// at all is an error at once, as no wait mends it.
pub fn wait_for_id_file(
    path: &Path,
    run: &str,
    world_size: usize,
    timeout: Duration,
    poll: Duration,
) -> Result<[u8; ID_LEN], NcclError> {
    let start = Instant::now();
    let mut stale = String::new();
    loop {
        match std::fs::read_to_string(path) {
            Ok(text) => {
                let file = parse_id_file(path, &text)?;
                if file.run == run && file.world_size == world_size {
                    return Ok(file.id);
                }
                stale = format!(
                    " (it holds the id of another launch: run {:?} of {} ranks, this is run {run:?} of \
                     {world_size})",
                    file.run, file.world_size
                );
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(NcclError::ReadIdFile { path: path.to_path_buf(), source }),
        }
        if start.elapsed() >= timeout {
            return Err(NcclError::IdFileTimeout { path: path.to_path_buf(), waited: timeout, stale });
        }
        std::thread::sleep(poll.min(timeout.saturating_sub(start.elapsed())));
    }
}

/// Removes rank 0's id file once every rank has joined, so that a finished launch leaves none
/// behind for the next one to trip over. Failing to is not worth stopping a run for: the next
/// launch tells a leftover by its run tag, or rank 0 replaces it.
pub fn remove_id_file(path: &Path) {
    if let Err(e) = std::fs::remove_file(path) {
        if e.kind() != std::io::ErrorKind::NotFound {
            eprintln!("warning: could not remove the NCCL id file {}: {e}", path.display());
        }
    }
}

/// The NCCL communicator for this process, `reason` saying why NCCL was asked for. Under an MPI
/// launcher the ranks meet through MPI (needs the `mpi` feature too); under a torchrun-style
/// launch through the id file; otherwise this process is a world of one on its GPU.
pub fn init(reason: &str) -> Result<Box<dyn Communicator>, DistError> {
    init_nccl(reason)
}

#[cfg(not(feature = "nccl"))]
fn init_nccl(reason: &str) -> Result<Box<dyn Communicator>, DistError> {
    Err(NcclError::NotBuilt(reason.to_string()).into())
}

#[cfg(feature = "nccl")]
fn init_nccl(_reason: &str) -> Result<Box<dyn Communicator>, DistError> {
    Ok(Box::new(gpu::Nccl::init()?))
}

#[cfg(feature = "nccl")]
pub use gpu::{Nccl, Reduce};

#[cfg(feature = "nccl")]
mod gpu {
    use std::ffi::c_char;
    use std::sync::Arc;

    use candle_core::backend::BackendStorage;
    use candle_core::backprop::GradStore;
    use candle_core::cuda_backend::cudarc;
    use candle_core::cuda_backend::{CudaDType, CudaStorage};
    use candle_core::{CpuStorage, CudaDevice, CustomOp1, DType, Layout, Shape, Tensor, Var};
    use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DeviceRepr, ValidAsZeroBits};
    use cudarc::nccl::{Comm, Id, NcclType, ReduceOp};

    use super::{id_file_path, id_timeout, remove_id_file, torchrun_launch, wait_for_id_file, write_id_file};
    use super::{NcclError, ID_LEN};
    use crate::dist::{self, Communicator, DistError, DistMode};

    /// How often the other ranks look for rank 0's id file.
    const ID_POLL: std::time::Duration = std::time::Duration::from_millis(100);

    fn nccl_err(e: cudarc::nccl::result::NcclError) -> NcclError {
        NcclError::Nccl(format!("{e:?}"))
    }

    fn cuda_err(e: cudarc::driver::DriverError) -> NcclError {
        NcclError::Cuda(format!("{e:?}"))
    }

    /// The reductions the tensor methods offer (cudarc's `ReduceOp` is neither `Copy` nor `Clone`).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Reduce {
        Sum,
        /// The mean over ranks, divided on the GPU by NCCL itself (`ncclAvg`).
        Avg,
    }

    impl Reduce {
        fn op(self) -> ReduceOp {
            match self {
                Reduce::Sum => ReduceOp::Sum,
                Reduce::Avg => ReduceOp::Avg,
            }
        }
    }

    /// One rank of an NCCL communicator on GPU `dist::local_rank()`.
    pub struct Nccl {
        // Declared first so that it is dropped (ncclCommAbort) before MPI is finalised.
        comm: Comm,
        stream: Arc<CudaStream>,
        /// MPI's world when mpirun launched the job: kept because dropping it finalises MPI, and
        /// used to abort every rank at once.
        mpi: Option<Box<dyn Communicator>>,
    }

    impl Nccl {
        /// Joins the job this process was launched into (see [`super::init`]).
        pub fn init() -> Result<Nccl, DistError> {
            // The rendezvous first, the GPU after: a rank that fails to open its GPU then fails in
            // `Comm::from_rank`, not before an MPI collective that the other ranks would wait in.
            let meeting = meet()?;
            let ordinal = dist::local_rank();
            let context = CudaContext::new(ordinal)
                .map_err(|e| NcclError::Cuda(format!("opening GPU {ordinal} (the local rank) for NCCL: {e:?}")))?;
            // The per-thread default stream is the one candle's `Device::new_cuda` runs its kernels
            // on: the collectives then queue behind the kernels that produced their inputs (and
            // cudarc's events order them across streams anyway).
            let stream = context.per_thread_stream();
            // Collective: returns once every rank has joined, so every rank has read the id file.
            let comm =
                Comm::from_rank(stream.clone(), meeting.rank, meeting.world_size, meeting.id).map_err(nccl_err)?;
            if let Some(path) = &meeting.id_file {
                remove_id_file(path);
            }
            Ok(Nccl { comm, stream, mpi: meeting.mpi })
        }

        /// The element-wise sum or mean of `t` over the ranks, computed on the GPU from the tensor's
        /// own buffer (no host copy); `t` must be a contiguous CUDA tensor of f32, f64, bf16 or f16.
        pub fn all_reduce_tensor(&self, t: &Tensor, op: Reduce) -> candle_core::Result<Tensor> {
            t.apply_op1_no_bwd(&TensorOp { comm: &self.comm, kind: OpKind::AllReduce(op) })
        }

        /// Rank `root`'s `t`, on every rank, GPU to GPU.
        pub fn broadcast_tensor(&self, t: &Tensor, root: usize) -> candle_core::Result<Tensor> {
            dist_check_root(root, self.world_size()).map_err(candle_core::Error::wrap)?;
            t.apply_op1_no_bwd(&TensorOp { comm: &self.comm, kind: OpKind::Broadcast(root) })
        }

        /// The gradients of `vars` averaged over the ranks without leaving the GPU: flattened into
        /// one f32 buffer (one collective per step, not one per tensor), reduced with `ncclAvg`,
        /// split back into the shapes and dtypes they had. The replicated-optimizer path; the
        /// trait's `reduce_scatter_sum` serves the sharded one (through the host).
        pub fn all_reduce_mean_grads(&self, vars: &[Var], grads: &GradStore) -> candle_core::Result<GradStore> {
            let present: Vec<(&Var, &Tensor)> = vars.iter().filter_map(|v| Some((v, grads.get(v)?))).collect();
            let mut out = GradStore::default();
            if present.is_empty() {
                return Ok(out);
            }
            let flat = present
                .iter()
                .map(|(_, g)| g.to_dtype(DType::F32)?.flatten_all())
                .collect::<candle_core::Result<Vec<_>>>()?;
            let mean = self.all_reduce_tensor(&Tensor::cat(&flat, 0)?, Reduce::Avg)?;
            let mut offset = 0;
            for (var, g) in present {
                let n = g.elem_count();
                out.insert(var, mean.narrow(0, offset, n)?.reshape(g.shape())?.to_dtype(g.dtype())?);
                offset += n;
            }
            Ok(out)
        }

        fn upload<T: DeviceRepr>(&self, host: &[T]) -> Result<CudaSlice<T>, NcclError> {
            self.stream.clone_htod(host).map_err(cuda_err)
        }

        /// Copies `dev` into `host` and waits for the copy (and every collective before it).
        fn download<T: DeviceRepr>(&self, dev: &CudaSlice<T>, host: &mut [T]) -> Result<(), NcclError> {
            self.stream.memcpy_dtoh(dev, host).map_err(cuda_err)?;
            self.stream.synchronize().map_err(cuda_err)
        }

        /// Every rank's `mine`, all of `piece` elements (padded by the caller), in rank order.
        fn all_gather_padded<T: DeviceRepr + ValidAsZeroBits + NcclType + Clone + Default>(
            &self,
            mine: &[T],
            piece: usize,
        ) -> Result<Vec<T>, NcclError> {
            let mut send = mine.to_vec();
            send.resize(piece, T::default());
            let send = self.upload(&send)?;
            let mut recv = self.stream.alloc_zeros::<T>(piece * self.world_size()).map_err(cuda_err)?;
            self.comm.all_gather(&send, &mut recv).map_err(nccl_err)?;
            let mut all = vec![T::default(); piece * self.world_size()];
            self.download(&recv, &mut all)?;
            Ok(all)
        }
    }

    /// What the rendezvous tells a rank: who it is, the id to join with, and what to keep.
    struct Meeting {
        rank: usize,
        world_size: usize,
        id: Id,
        mpi: Option<Box<dyn Communicator>>,
        /// The id file that rank 0 wrote, to remove once every rank has joined.
        id_file: Option<std::path::PathBuf>,
    }

    /// The rendezvous: through MPI under an MPI launcher, through the id file under a
    /// torchrun-style launch, else a world of one (which still runs every collective through
    /// NCCL: a check of the build on one GPU).
    fn meet() -> Result<Meeting, DistError> {
        if let Some(var) = dist::mpi_launch_var() {
            let mpi = dist::init(DistMode::Mpi).map_err(|e| match e {
                DistError::MpiNotBuilt(_) => DistError::MpiNotBuilt(format!(
                    "--dist nccl meets its peers through MPI under an MPI launcher ({var} is set)"
                )),
                other => other,
            })?;
            let (rank, world_size) = (mpi.rank(), mpi.world_size());
            let mine = if rank == 0 { id_bytes(&Id::new().map_err(nccl_err)?).to_vec() } else { Vec::new() };
            let all = mpi.all_gather_bytes(&mine)?;
            let id = id_from_bytes(all.first().map(Vec::as_slice).unwrap_or_default())?;
            return Ok(Meeting { rank, world_size, id, mpi: Some(mpi), id_file: None });
        }
        let Some(launch) = torchrun_launch()? else {
            return Ok(Meeting { rank: 0, world_size: 1, id: Id::new().map_err(nccl_err)?, mpi: None, id_file: None });
        };
        let path = id_file_path();
        let (id, id_file) = if launch.rank == 0 {
            let id = Id::new().map_err(nccl_err)?;
            write_id_file(&path, &id_bytes(&id), &launch.run, launch.world_size)?;
            (id, Some(path))
        } else {
            let bytes = wait_for_id_file(&path, &launch.run, launch.world_size, id_timeout()?, ID_POLL)?;
            (id_from_bytes(&bytes)?, None)
        };
        Ok(Meeting { rank: launch.rank, world_size: launch.world_size, id, mpi: None, id_file })
    }

    fn dist_check_root(root: usize, world_size: usize) -> Result<(), DistError> {
        if root < world_size {
            Ok(())
        } else {
            Err(DistError::BadRoot { root, world_size })
        }
    }

    fn id_bytes(id: &Id) -> [u8; ID_LEN] {
        id.internal().map(|c| c as u8)
    }

    fn id_from_bytes(bytes: &[u8]) -> Result<Id, NcclError> {
        let bytes: &[u8; ID_LEN] = bytes.try_into().map_err(|_| NcclError::BadId(bytes.len()))?;
        Ok(Id::uninit(bytes.map(|b| b as c_char)))
    }

    /// The counts check the MPI communicator makes too: one piece per rank, adding up to `len`.
    fn check_counts(counts: &[usize], world_size: usize, len: usize, ok: bool) -> Result<(), DistError> {
        if counts.len() == world_size && ok {
            Ok(())
        } else {
            Err(DistError::BadCounts { counts: counts.to_vec(), world_size, len })
        }
    }

    impl Communicator for Nccl {
        fn rank(&self) -> usize {
            self.comm.rank()
        }

        fn world_size(&self) -> usize {
            self.comm.world_size()
        }

        fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<(), DistError> {
            // Lengths agree on every rank, so every rank skips an empty buffer alike.
            if buf.is_empty() {
                return Ok(());
            }
            let mut dev = self.upload(buf)?;
            self.comm.all_reduce_in_place(&mut dev, &ReduceOp::Sum).map_err(nccl_err)?;
            Ok(self.download(&dev, buf)?)
        }

        fn reduce_scatter_sum(&self, buf: &[f32], counts: &[usize]) -> Result<Vec<f32>, DistError> {
            let world_size = self.world_size();
            check_counts(counts, world_size, buf.len(), counts.iter().sum::<usize>() == buf.len())?;
            let mine = counts[self.rank()];
            // ncclReduceScatter hands every rank an equal piece: pad each rank's piece to the
            // largest (the pieces are balanced by size, so the padding is small).
            let piece = counts.iter().copied().max().unwrap_or(0);
            if piece == 0 {
                return Ok(Vec::new());
            }
            let mut padded = vec![0f32; piece * world_size];
            let mut start = 0;
            for (r, &n) in counts.iter().enumerate() {
                padded[r * piece..r * piece + n].copy_from_slice(&buf[start..start + n]);
                start += n;
            }
            let send = self.upload(&padded)?;
            let mut recv = self.stream.alloc_zeros::<f32>(piece).map_err(cuda_err)?;
            self.comm.reduce_scatter(&send, &mut recv, &ReduceOp::Sum).map_err(nccl_err)?;
            let mut out = vec![0f32; piece];
            self.download(&recv, &mut out)?;
            out.truncate(mine);
            Ok(out)
        }

        fn all_gather(&self, mine: &[f32], counts: &[usize]) -> Result<Vec<f32>, DistError> {
            let world_size = self.world_size();
            check_counts(counts, world_size, mine.len(), counts.get(self.rank()) == Some(&mine.len()))?;
            // ncclAllGather takes equal pieces too: pad to the largest and cut the padding out.
            let piece = counts.iter().copied().max().unwrap_or(0);
            if piece == 0 {
                return Ok(Vec::new());
            }
            let all = self.all_gather_padded(mine, piece)?;
            Ok(counts.iter().enumerate().flat_map(|(r, &n)| all[r * piece..r * piece + n].iter().copied()).collect())
        }

        fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<(), DistError> {
            dist_check_root(root, self.world_size())?;
            if buf.is_empty() {
                return Ok(());
            }
            let root = i32::try_from(root).map_err(|_| DistError::TooLarge(root))?;
            let mut dev = self.upload(buf)?;
            self.comm.broadcast_in_place(&mut dev, root).map_err(nccl_err)?;
            Ok(self.download(&dev, buf)?)
        }

        fn all_gather_bytes(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>, DistError> {
            // The lengths first (they differ between ranks), then the bytes padded to the longest.
            let lens = self.all_gather_padded(&[mine.len() as u64], 1)?;
            let lens: Vec<usize> = lens.iter().map(|&n| usize::try_from(n).unwrap_or(usize::MAX)).collect();
            let piece = lens.iter().copied().max().unwrap_or(0);
            if piece == 0 {
                return Ok(vec![Vec::new(); lens.len()]);
            }
            let all = self.all_gather_padded(mine, piece)?;
            Ok(lens.iter().enumerate().map(|(r, &n)| all[r * piece..r * piece + n].to_vec()).collect())
        }

        fn barrier(&self) -> Result<(), DistError> {
            // An all-reduce completes on a rank only once every rank has entered it.
            let mut one = self.upload(&[0f32])?;
            self.comm.all_reduce_in_place(&mut one, &ReduceOp::Sum).map_err(nccl_err)?;
            Ok(self.stream.synchronize().map_err(cuda_err)?)
        }

        fn abort(&self, code: i32) -> ! {
            match &self.mpi {
                // MPI_Abort ends every rank of mpirun's job.
                Some(mpi) => mpi.abort(code),
                // torchrun ends the other workers when one exits with an error.
                None => std::process::exit(code),
            }
        }
    }

    /// A collective on a tensor's CUDA buffer, as a candle op that yields a new tensor.
    struct TensorOp<'a> {
        comm: &'a Comm,
        kind: OpKind,
    }

    #[derive(Clone, Copy)]
    enum OpKind {
        AllReduce(Reduce),
        Broadcast(usize),
    }

    impl TensorOp<'_> {
        fn run<T: CudaDType + DeviceRepr + ValidAsZeroBits + NcclType>(
            &self,
            storage: &CudaStorage,
            start: usize,
            end: usize,
        ) -> candle_core::Result<CudaStorage> {
            let device: &CudaDevice = &storage.device;
            let src = storage.as_cuda_slice::<T>()?.slice(start..end);
            let mut dst = device.alloc_zeros::<T>(end - start)?;
            let wrap = |e: cudarc::nccl::result::NcclError| candle_core::Error::wrap(nccl_err(e));
            match self.kind {
                OpKind::AllReduce(op) => {
                    self.comm.all_reduce(&src, &mut dst, &op.op()).map_err(wrap)?;
                }
                OpKind::Broadcast(root) => {
                    let root = i32::try_from(root).map_err(candle_core::Error::wrap)?;
                    // The send buffer matters on the root only; passing it everywhere is allowed.
                    self.comm.broadcast(Some(&src), &mut dst, root).map_err(wrap)?;
                }
            }
            Ok(CudaStorage::wrap_cuda_slice(dst, device.clone()))
        }
    }

    impl CustomOp1 for TensorOp<'_> {
        fn name(&self) -> &'static str {
            "nccl-collective"
        }

        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
            candle_core::bail!("NCCL collectives take CUDA tensors: this one is on the CPU")
        }

        fn cuda_fwd(&self, storage: &CudaStorage, layout: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
            let Some((start, end)) = layout.contiguous_offsets() else {
                candle_core::bail!("NCCL collectives take contiguous tensors")
            };
            let out = match storage.dtype() {
                DType::F32 => self.run::<f32>(storage, start, end)?,
                DType::F64 => self.run::<f64>(storage, start, end)?,
                DType::BF16 => self.run::<half::bf16>(storage, start, end)?,
                DType::F16 => self.run::<half::f16>(storage, start, end)?,
                other => candle_core::bail!("NCCL collectives on {other:?} tensors are not wired"),
            };
            Ok((out, layout.shape().clone()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| pairs.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string())
    }

    #[test]
    fn a_torchrun_launch_is_read_from_its_variables() {
        assert_eq!(launch_from(vars(&[])).unwrap(), None);
        let launch = launch_from(vars(&[
            ("RANK", "3"),
            ("WORLD_SIZE", "8"),
            ("MASTER_ADDR", "10.0.0.1"),
            ("MASTER_PORT", "29500"),
        ]))
        .unwrap();
        assert_eq!(
            launch,
            Some(Launch { rank: 3, world_size: 8, run: "MASTER_ADDR=10.0.0.1 MASTER_PORT=29500".into() })
        );
        assert!(matches!(launch_from(vars(&[("RANK", "0")])), Err(NcclError::HalfLaunch { unset: "WORLD_SIZE", .. })));
        assert!(matches!(
            launch_from(vars(&[("RANK", "8"), ("WORLD_SIZE", "8")])),
            Err(NcclError::BadRank { rank: 8, world_size: 8 })
        ));
        let err = launch_from(vars(&[("RANK", "one"), ("WORLD_SIZE", "2")])).unwrap_err();
        assert!(err.to_string().contains("RANK=\"one\""), "{err}");
    }

    #[test]
    fn auto_starts_nccl_under_a_torchrun_launch_of_several_ranks_only() {
        let wants = |pairs: &[(&str, &str)]| wants_nccl(launch_from(vars(pairs)));
        assert!(wants(&[("RANK", "1"), ("WORLD_SIZE", "2")]).unwrap());
        assert!(!wants(&[("RANK", "0"), ("WORLD_SIZE", "1")]).unwrap());
        assert!(!wants(&[]).unwrap());
        assert!(!wants(&[("RANK", "5")]).unwrap());
        assert!(wants(&[("RANK", "0"), ("WORLD_SIZE", "many")]).is_err());
    }

    #[test]
    fn an_id_file_round_trips_and_is_written_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("nccl_id");
        let id: [u8; ID_LEN] = std::array::from_fn(|i| (i * 37 % 256) as u8);
        write_id_file(&path, &id, "MASTER_PORT=29500", 4).unwrap();
        // Written through a rename: nothing but the file itself is left in the directory.
        let names: Vec<_> =
            std::fs::read_dir(path.parent().unwrap()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["nccl_id"]);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(parse_id_file(&path, &text).unwrap(), IdFile { run: "MASTER_PORT=29500".into(), world_size: 4, id });
        let got = wait_for_id_file(&path, "MASTER_PORT=29500", 4, Duration::ZERO, Duration::ZERO).unwrap();
        assert_eq!(got, id);
    }

    #[test]
    fn the_other_ranks_wait_for_rank_0s_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nccl_id");
        let id = [7u8; ID_LEN];
        std::thread::scope(|scope| {
            let waiter =
                scope.spawn(|| wait_for_id_file(&path, "", 2, Duration::from_secs(30), Duration::from_millis(5)));
            std::thread::sleep(Duration::from_millis(50));
            write_id_file(&path, &id, "", 2).unwrap();
            assert_eq!(waiter.join().unwrap().unwrap(), id);
        });
    }

    #[test]
    fn a_missing_or_stale_file_times_out_with_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nccl_id");
        let timeout = Duration::from_millis(30);
        let err = wait_for_id_file(&path, "", 2, timeout, Duration::from_millis(5)).unwrap_err();
        assert!(matches!(err, NcclError::IdFileTimeout { .. }), "{err}");
        let message = err.to_string();
        assert!(message.contains("rank 0 did not write") && message.contains(ID_FILE_VAR), "{message}");
        // A leftover of another launch is not taken for this one's, and the error says so.
        write_id_file(&path, &[1; ID_LEN], "MASTER_PORT=1", 2).unwrap();
        let err = wait_for_id_file(&path, "MASTER_PORT=2", 2, timeout, Duration::from_millis(5)).unwrap_err();
        assert!(err.to_string().contains("another launch"), "{err}");
        let err = wait_for_id_file(&path, "MASTER_PORT=1", 3, timeout, Duration::from_millis(5)).unwrap_err();
        assert!(err.to_string().contains("of 2 ranks"), "{err}");
    }

    #[test]
    fn a_malformed_id_file_is_refused_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nccl_id");
        let good = format!("{ID_FILE_HEADER}\nrun \nworld 2\nid {}\n", "ab".repeat(ID_LEN));
        assert_eq!(parse_id_file(&path, &good).unwrap().id, [0xab; ID_LEN]);
        let bad = [
            ("", "first line"),
            ("something else\n", "first line"),
            (&*format!("{ID_FILE_HEADER}\nworld 2\n"), "\"run\""),
            (&*format!("{ID_FILE_HEADER}\nrun x\nworld two\nid 00\n"), "world size"),
            (&*format!("{ID_FILE_HEADER}\nrun x\nworld 2\nid abcd\n"), "4 hex digits"),
            (&*format!("{ID_FILE_HEADER}\nrun x\nworld 2\nid {}\n", "zz".repeat(ID_LEN)), "not hexadecimal"),
        ];
        for (text, reason) in bad {
            let err = parse_id_file(&path, text).unwrap_err();
            assert!(matches!(err, NcclError::MalformedIdFile { .. }) && err.to_string().contains(reason), "{err}");
        }
        // A malformed file ends the wait at once instead of after the timeout.
        std::fs::write(&path, "not an id").unwrap();
        let start = Instant::now();
        let err = wait_for_id_file(&path, "", 2, Duration::from_secs(60), Duration::from_millis(5)).unwrap_err();
        assert!(matches!(err, NcclError::MalformedIdFile { .. }) && start.elapsed() < Duration::from_secs(10), "{err}");
    }

    #[cfg(not(feature = "nccl"))]
    #[test]
    fn asking_for_nccl_without_the_feature_says_how_to_get_it() {
        let err = init("--dist nccl was given").err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("--features nccl") && err.starts_with("--dist nccl was given"), "{err}");
    }
}
