//! Running untrusted code: a sandbox for model-written Python (HumanEval completions). Each
//! program runs in its own `python3` process and can neither hang, exhaust or reach the host,
//! nor leave anything behind, whoever runs nanochat.
//!
//! Two layers:
//! 1. The operating system's ([`Isolation::Namespaces`], in `jail.rs` and `filesystem.rs`): the
//!    program runs in its own PID, mount, network, IPC and UTS namespaces, inside a user
//!    namespace when nanochat is not root (unprivileged user namespaces) or as a throwaway user id
//!    when it is. It sees a private root: the system directories read-only, private size-capped
//!    tmpfs mounts for `/tmp` (its working directory and `HOME`), `/var/tmp` and `/dev/shm`, and
//!    nothing else: not the user's home or files. It has no network (a new network namespace has
//!    only a downed loopback). It is PID 1 of its namespace, so when it ends (or is killed at the
//!    wall-clock limit) the kernel kills everything it started, `setsid` daemons included. The
//!    existing limits hold on top: CPU seconds (`SIGXCPU`), address space (`MemoryError`), file
//!    size (`EFBIG`), processes (a fork bomb stalls at the cap; the count is per namespace, so
//!    one run's leftovers cannot starve the next), no core dumps, no new privileges.
//! 2. Python's own ([`guard.py`](guard.py)): before the program, `os.kill`, `os.remove`,
//!    `subprocess`, `shutil.rmtree`, ... are replaced by functions that raise, as the original's
//!    HumanEval `reliability_guard` does, and a program that exits before its end fails.
//!
//! Where the kernel refuses namespaces: as root, the program still runs as a throwaway user id
//! ([`Isolation::ThrowawayUser`]) with the limits, and every process and temporary file of that id
//! is removed afterwards, but it shares the host's network and world-readable files (nanochat
//! says so once); not as root, nothing runs and the error says how to allow user namespaces.
//!
//! Output: stdout and stderr captured up to a bound, the rest drained and dropped. A crash is
//! reported with its signal ([`Outcome::Crashed`]), apart from the memory limit.

mod filesystem;
mod jail;
mod throwaway;

use std::ffi::CString;
use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use filesystem::{c_path, Interpreter, WORKDIR};
use jail::{Namespaces, Plan, Report, Step};
use throwaway::{chown, remove_leftovers, throwaway_ids};

/// The limits of one run.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Wall-clock time before the program and everything it started are killed.
    pub timeout: Duration,
    /// CPU seconds per process (`RLIMIT_CPU`).
    pub cpu_seconds: u64,
    /// Address space per process, bytes (`RLIMIT_AS`).
    pub memory_bytes: u64,
    /// Largest file the program may write, bytes (`RLIMIT_FSIZE`).
    pub file_size_bytes: u64,
    /// Processes of the sandbox's user (`RLIMIT_NPROC`).
    pub max_processes: u64,
    /// Size of each private tmpfs (`/tmp`, `/var/tmp`, `/dev/shm`), bytes.
    pub tmpfs_bytes: u64,
    /// Bytes of stdout and of stderr kept.
    pub output_bytes: usize,
}

impl Default for Limits {
    /// The original's HumanEval timeout (5 s) with room for Python's own start-up in the memory cap.
    fn default() -> Self {
        Limits {
            timeout: Duration::from_secs(5),
            cpu_seconds: 5,
            memory_bytes: 512 << 20,
            file_size_bytes: 16 << 20,
            max_processes: 32,
            tmpfs_bytes: 32 << 20,
            output_bytes: 64 << 10,
        }
    }
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Outcome {
    /// It ran to its end and exited with status 0.
    Passed,
    /// Any other exit: the last lines of stderr say why (a failed assert, a syntax error, …).
    Failed { stderr_tail: String },
    /// Killed at the wall-clock timeout or by the CPU limit.
    Timeout,
    /// `MemoryError`: the address-space limit.
    MemoryExceeded,
    /// Killed by a signal, e.g. `SIGSEGV` (a crash in C code) or `SIGABRT`.
    Crashed { signal: String },
}

/// How the program is kept apart from the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Isolation {
    /// Own namespaces and a private root: see the module header.
    Namespaces,
    /// Root only, where the kernel refuses namespaces: a throwaway user id, the limits, and
    /// cleanup by that id; the host's network and world-readable files are reachable.
    ThrowawayUser,
}

/// The result of one run.
#[derive(Debug, Clone)]
pub struct Execution {
    pub outcome: Outcome,
    pub duration: Duration,
    pub stdout: String,
    pub stderr: String,
    pub isolation: Isolation,
    /// The program's working directory and `HOME`, as it saw them.
    pub workdir: PathBuf,
    /// The user id it ran as, on the host.
    pub uid: u32,
    /// The inode of its PID namespace (with [`Isolation::Namespaces`]): empty and gone by now.
    pub pid_namespace: Option<u64>,
    /// The host directory the run used (the private root's mount point, or the working
    /// directory of a throwaway user), already removed.
    pub scratch: PathBuf,
}

impl Execution {
    pub fn passed(&self) -> bool {
        self.outcome == Outcome::Passed
    }

    /// Whether the program had no network.
    pub fn network_isolated(&self) -> bool {
        self.isolation == Isolation::Namespaces
    }
}

/// The sandbox's own failure before the program ran (not the program's).
#[derive(Debug, thiserror::Error)]
#[error("setting up the sandbox failed while {action}: {source}")]
pub struct SetupError {
    step: Step,
    action: String,
    source: std::io::Error,
}

/// The guard and the bootstrap that runs the program (see guard.py).
const GUARD: &str = include_str!("guard.py");
/// Lines of stderr kept in [`Outcome::Failed`].
const TAIL_LINES: usize = 20;
/// How long to wait for the output pipes to close after the program is gone.
const DRAIN_GRACE: Duration = Duration::from_secs(1);
/// Beyond the timeout, how long the supervisor may take to set up and tear down before it is
/// killed itself (it kills the program at the timeout; this only guards against a stuck kernel).
const SUPERVISOR_GRACE: Duration = Duration::from_secs(10);
/// Runs Python programs under [`Limits`].
#[derive(Debug, Clone)]
pub struct Sandbox {
    interpreter: Interpreter,
    limits: Limits,
    isolation: Isolation,
}

impl Sandbox {
    /// A sandbox with the interpreter from `$NANOCHAT_PYTHON`, else `/usr/bin/python3`, else the
    /// real executable behind `python3` on `PATH`, and the best isolation this machine allows,
    /// found by running an empty program. Not root and no user namespaces: an error that says how
    /// to allow them.
    pub fn new(limits: Limits) -> Result<Sandbox> {
        let python = match std::env::var_os("NANOCHAT_PYTHON") {
            Some(path) => PathBuf::from(path),
            None if Path::new("/usr/bin/python3").is_file() => PathBuf::from("/usr/bin/python3"),
            None => resolve_python()?,
        };
        let sandbox = Sandbox::with_isolation(&python, limits.clone(), Isolation::Namespaces);
        match sandbox {
            Ok(sandbox) => Ok(sandbox),
            Err(e) => match e.downcast_ref::<SetupError>() {
                Some(setup) if setup.step.isolates() && is_root() => {
                    eprintln!(
                        "sandbox: no namespaces here ({setup}); programs run as a throwaway user with the limits, \
                         but can reach the network and the world-readable files"
                    );
                    Sandbox::with_isolation(&python, limits, Isolation::ThrowawayUser)
                }
                Some(setup) if setup.step.isolates() => bail!("{}", refusal(setup)),
                _ => Err(e),
            },
        }
    }

    /// A sandbox running `python` with exactly this isolation, checked by running an empty
    /// program. [`Isolation::ThrowawayUser`] needs root.
    pub fn with_isolation(python: &Path, limits: Limits, isolation: Isolation) -> Result<Sandbox> {
        if isolation == Isolation::ThrowawayUser && !is_root() {
            bail!("running programs as a throwaway user needs root");
        }
        let interpreter = Interpreter::locate(python)?;
        let sandbox = Sandbox { interpreter, limits, isolation };
        let probe = sandbox.run("pass\n")?;
        if !probe.passed() {
            bail!(
                "{} cannot run an empty program in the sandbox ({:?}): {}. Check the interpreter (NANOCHAT_PYTHON) \
                 and the limits",
                python.display(),
                probe.outcome,
                tail(&probe.stderr, TAIL_LINES)
            );
        }
        Ok(sandbox)
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The interpreter it runs.
    pub fn python(&self) -> &Path {
        &self.interpreter.path
    }

    pub fn isolation(&self) -> Isolation {
        self.isolation
    }

    /// Runs `program` and returns how it ended. Errors are the sandbox's own failures (no
    /// interpreter, no temporary directory, a kernel that refuses a step), never the program's.
    pub fn run(&self, program: &str) -> Result<Execution> {
        let scratch = Scratch::create()?;
        let ids = if is_root() { Some(throwaway_ids()?) } else { None };
        let plan = self.plan(&scratch.0, program, ids)?;
        let start = Instant::now();
        let started = jail::start(&plan).context("starting the sandbox's supervisor")?;
        let stdout = capture(started.stdout, self.limits.output_bytes);
        let stderr = capture(started.stderr, self.limits.output_bytes);
        let waited = wait_for(started.pid, self.limits.timeout + SUPERVISOR_GRACE);
        let report = Report::read(started.report).context("reading the sandbox's report");
        if self.isolation == Isolation::ThrowawayUser {
            if let Some((uid, _)) = ids {
                remove_leftovers(uid, &scratch.0);
            }
        }
        let duration = start.elapsed();
        let (stdout, stderr) = (stdout.finish(), stderr.finish());
        let supervisor_status = waited?;
        let report = report?;
        if let Some((step, item, source)) = report.failure {
            return Err(SetupError { step, action: plan.describe(step, item), source }.into());
        }
        let outcome = match (report.done, report.exited) {
            (Some(true), _) => Outcome::Timeout,
            (Some(false), Some(status)) => classify(ExitStatus::from_raw(status), &stderr),
            _ => bail!(
                "the sandbox's supervisor ended without a full report ({supervisor_status}): the program's fate is \
                 unknown"
            ),
        };
        let workdir = match self.isolation {
            Isolation::Namespaces => PathBuf::from(WORKDIR),
            Isolation::ThrowawayUser => scratch.0.clone(),
        };
        // SAFETY: getuid has no preconditions.
        let uid = ids.map_or_else(|| unsafe { libc::getuid() }, |(uid, _)| uid);
        Ok(Execution {
            outcome,
            duration,
            stdout,
            stderr,
            isolation: self.isolation,
            workdir,
            uid,
            pid_namespace: report.pid_namespace,
            scratch: scratch.0.clone(),
        })
    }

    /// What the jail is to do for `program`, with `scratch` as the private root's mount point (or
    /// the working directory) and `ids` the throwaway user when root.
    fn plan(&self, scratch: &Path, program: &str, ids: Option<(u32, u32)>) -> Result<Plan> {
        let limits = &self.limits;
        let (namespaces, workdir) = match self.isolation {
            Isolation::Namespaces => {
                let root = filesystem::root_fs(scratch, &self.interpreter, limits, program.as_bytes())?;
                let id_maps = match ids {
                    Some(_) => None,
                    None => {
                        // SAFETY: getuid and getgid have no preconditions.
                        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
                        Some((format!("{uid} {uid} 1\n").into_bytes(), format!("{gid} {gid} 1\n").into_bytes()))
                    }
                };
                (Some(Namespaces { id_maps, root }), PathBuf::from(WORKDIR))
            }
            Isolation::ThrowawayUser => {
                let script = scratch.join("program.py");
                std::fs::write(&script, program).with_context(|| format!("writing {}", script.display()))?;
                if let Some((uid, gid)) = ids {
                    chown(scratch, uid, gid)?;
                }
                (None, scratch.to_path_buf())
            }
        };
        let env = [
            "PATH=/usr/local/bin:/usr/bin:/bin".to_string(),
            format!("HOME={}", workdir.display()),
            "LANG=C.UTF-8".to_string(),
        ];
        Ok(Plan {
            namespaces,
            python: c_path(&self.interpreter.path)?,
            argv: ["python3", "-I", "-B", "-c", GUARD].map(CString::new).into_iter().collect::<Result<_, _>>()?,
            envp: env.into_iter().map(CString::new).collect::<Result<_, _>>()?,
            workdir: c_path(&workdir)?,
            drop_to: ids,
            limits: vec![
                (libc::RLIMIT_CPU, limits.cpu_seconds, limits.cpu_seconds + 1),
                (libc::RLIMIT_AS, limits.memory_bytes, limits.memory_bytes),
                (libc::RLIMIT_FSIZE, limits.file_size_bytes, limits.file_size_bytes),
                (libc::RLIMIT_NPROC, limits.max_processes, limits.max_processes),
            ],
            timeout: limits.timeout,
        })
    }
}

/// The error for a caller that is not root on a kernel that refuses user namespaces.
fn refusal(setup: &SetupError) -> String {
    let setting = |path: &str| {
        let value = std::fs::read_to_string(path).map(|v| v.trim().to_string()).ok()?;
        Some(format!("{}={value}", path.trim_start_matches("/proc/sys/").replace('/', ".")))
    };
    let current: Vec<String> = [
        "/proc/sys/kernel/unprivileged_userns_clone",
        "/proc/sys/user/max_user_namespaces",
        "/proc/sys/kernel/apparmor_restrict_unprivileged_userns",
    ]
    .iter()
    .filter_map(|p| setting(p))
    .collect();
    format!(
        "refusing to run untrusted code: {setup}. Without root the sandbox needs unprivileged user namespaces to \
         isolate programs, and this system refuses them (now: {}). To allow them, as root: `sysctl -w \
         kernel.unprivileged_userns_clone=1` (Debian, older Ubuntu), `sysctl -w user.max_user_namespaces=15000` (if \
         it is 0), or on Ubuntu 23.10 and later `sysctl -w kernel.apparmor_restrict_unprivileged_userns=0` (or an \
         AppArmor profile that grants `userns` to nanochat); in a container, allow the unshare system call (e.g. \
         Docker's --security-opt seccomp=unconfined). Or run as root, where programs run as a throwaway user",
        if current.is_empty() { "no such setting found".to_string() } else { current.join(", ") }
    )
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Waits for the supervisor to exit, killing it (and with it the program) past `limit`.
fn wait_for(pid: libc::pid_t, limit: Duration) -> Result<ExitStatus> {
    let start = Instant::now();
    loop {
        let mut status = 0;
        // SAFETY: status is a valid int for the duration of the call; pid is our unreaped child.
        match unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } {
            r if r == pid => return Ok(ExitStatus::from_raw(status)),
            0 => {}
            _ => {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(e).context("waiting for the sandbox's supervisor");
                }
            }
        }
        if start.elapsed() > limit {
            // SAFETY: pid is our child, not reaped yet, so it cannot be a stranger's.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// How a program that ended on its own (not at the wall-clock limit) ended.
fn classify(status: ExitStatus, stderr: &str) -> Outcome {
    match status.signal() {
        Some(libc::SIGXCPU) => Outcome::Timeout,
        _ if status.success() => Outcome::Passed,
        _ if stderr.contains("MemoryError") => Outcome::MemoryExceeded,
        Some(signal) => Outcome::Crashed { signal: signal_name(signal) },
        None => Outcome::Failed { stderr_tail: tail(stderr, TAIL_LINES) },
    }
}

/// `SIGSEGV` and friends by name.
fn signal_name(signal: i32) -> String {
    let name = match signal {
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGBUS => "SIGBUS",
        libc::SIGABRT => "SIGABRT",
        libc::SIGILL => "SIGILL",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        libc::SIGHUP => "SIGHUP",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGSYS => "SIGSYS",
        libc::SIGTRAP => "SIGTRAP",
        libc::SIGXFSZ => "SIGXFSZ",
        libc::SIGUSR1 => "SIGUSR1",
        libc::SIGUSR2 => "SIGUSR2",
        libc::SIGALRM => "SIGALRM",
        other => return format!("signal {other}"),
    };
    name.to_string()
}

/// The real interpreter behind `python3` on `PATH`, as it reports itself.
fn resolve_python() -> Result<PathBuf> {
    let out = std::process::Command::new("python3")
        .args(["-c", "import sys; print(sys.executable)"])
        .output()
        .context("running python3 to find the interpreter: install python3 or set NANOCHAT_PYTHON")?;
    let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !out.status.success() || path.is_empty() {
        bail!("python3 did not report its executable: install python3 or set NANOCHAT_PYTHON to one");
    }
    Ok(PathBuf::from(path))
}

/// A scratch directory, removed when dropped (also when the run fails half-way).
struct Scratch(PathBuf);

impl Scratch {
    fn create() -> Result<Scratch> {
        let base = std::env::temp_dir();
        for _ in 0..16 {
            let dir = base.join(format!("nanochat-sandbox-{}-{:016x}", std::process::id(), rand::random::<u64>()));
            match std::fs::create_dir(&dir) {
                Ok(()) => return Ok(Scratch(dir)),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e).with_context(|| format!("creating the scratch directory {}", dir.display())),
            }
        }
        bail!("could not create a fresh scratch directory under {}: clean it up or set TMPDIR", base.display())
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            eprintln!("sandbox: could not remove {}: {e}", self.0.display());
        }
    }
}

/// A pipe read on its own thread into a bounded buffer; past the bound it is drained and dropped
/// so the program never blocks on a full pipe.
struct Capture {
    buffer: Arc<Mutex<Vec<u8>>>,
    done: mpsc::Receiver<()>,
}

fn capture(mut pipe: impl Read + Send + 'static, bound: usize) -> Capture {
    let buffer = Arc::new(Mutex::new(Vec::new()));
    let (tx, done) = mpsc::channel();
    let shared = Arc::clone(&buffer);
    std::thread::spawn(move || {
        let mut chunk = [0u8; 8192];
        while let Ok(n @ 1..) = pipe.read(&mut chunk) {
            if let Ok(mut buf) = shared.lock() {
                let room = bound.saturating_sub(buf.len());
                buf.extend_from_slice(&chunk[..n.min(room)]);
            }
        }
        let _ = tx.send(());
    });
    Capture { buffer, done }
}

impl Capture {
    /// The text read so far, after waiting a little for the pipe to close.
    fn finish(self) -> String {
        let _ = self.done.recv_timeout(DRAIN_GRACE);
        let bytes = self.buffer.lock().map(|b| b.clone()).unwrap_or_default();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

/// The last `lines` lines of `text`.
fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
