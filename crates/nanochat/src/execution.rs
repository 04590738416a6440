//! Running untrusted code: a sandbox for model-written Python (HumanEval completions). Each
//! program runs in its own `python3` process and cannot hang, exhaust or reach the host.
//!
//! What contains it, and why each piece:
//! - a fresh scratch directory as the working directory and `HOME`, removed afterwards, so the
//!   program's files never outlive it;
//! - a cleared environment (only `PATH`, `HOME`, `LANG`) and `python3 -I` (isolated mode), so no
//!   secret in the parent's environment and no user site-packages leak in;
//! - `setrlimit` before `exec`: CPU seconds (a busy loop dies by `SIGXCPU`), address space (a
//!   memory hog gets `MemoryError`), file size (a huge write gets `EFBIG`), number of processes
//!   (a fork bomb stalls at the cap), no core dumps;
//! - started as root, it drops to `nobody` first: root ignores the process cap and may write anywhere;
//! - its own session and process group, killed as a whole (`killpg`) at the wall-clock timeout and
//!   after the program exits, so no child outlives the run;
//! - no network where the kernel allows unprivileged user namespaces: `unshare(CLONE_NEWUSER |
//!   CLONE_NEWNET)` leaves the program a network namespace with only a downed loopback. Where that
//!   is not permitted the program runs with the host's network, and [`Execution::network_isolated`]
//!   says so (the first refusal is remembered, so later runs do not try again);
//! - stdout and stderr captured up to a bound, the rest drained and dropped.
//!
//! Not contained: a process that leaves the group with `setsid` survives the final `killpg` until it
//! exits or hits its CPU limit (a cgroup or PID namespace would close that; neither is always
//! available unprivileged). The pipes it holds are then abandoned, not waited for.

use std::io::Read;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;

/// The limits of one run.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Wall-clock time before the whole process group is killed.
    pub timeout: Duration,
    /// CPU seconds per process (`RLIMIT_CPU`).
    pub cpu_seconds: u64,
    /// Address space per process, bytes (`RLIMIT_AS`).
    pub memory_bytes: u64,
    /// Largest file the program may write, bytes (`RLIMIT_FSIZE`).
    pub file_size_bytes: u64,
    /// Processes of the sandbox's user (`RLIMIT_NPROC`).
    pub max_processes: u64,
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
            output_bytes: 64 << 10,
        }
    }
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Outcome {
    /// Exit status 0.
    Passed,
    /// Any other exit: the last lines of stderr say why (a failed assert, a syntax error, …).
    Failed { stderr_tail: String },
    /// Killed at the wall-clock timeout or by the CPU limit.
    Timeout,
    /// `MemoryError`, or killed by a signal that the memory limit causes (`SIGKILL`, `SIGSEGV`).
    MemoryExceeded,
}

/// The result of one run.
#[derive(Debug, Clone)]
pub struct Execution {
    pub outcome: Outcome,
    pub duration: Duration,
    pub stdout: String,
    pub stderr: String,
    /// Whether the program ran in its own network namespace (no network).
    pub network_isolated: bool,
    /// Whether it ran as `nobody` because the caller is root.
    pub dropped_privileges: bool,
    /// The process group the program ran in (its pid); every member is killed before returning.
    pub process_group: i32,
    /// The scratch directory it ran in, already removed.
    pub scratch: PathBuf,
}

impl Execution {
    pub fn passed(&self) -> bool {
        self.outcome == Outcome::Passed
    }
}

/// The `nobody` user and group, which own nothing: the identity a root caller runs programs as.
const NOBODY: u32 = 65534;
/// Lines of stderr kept in [`Outcome::Failed`].
const TAIL_LINES: usize = 20;
/// How long to wait for the output pipes to close after the group is killed.
const DRAIN_GRACE: Duration = Duration::from_secs(1);

/// Set once the kernel refuses a network namespace: later runs do not try again.
static NETNS_REFUSED: OnceLock<()> = OnceLock::new();

/// Runs Python programs under [`Limits`].
#[derive(Debug, Clone)]
pub struct Sandbox {
    python: PathBuf,
    limits: Limits,
}

impl Sandbox {
    /// A sandbox with the interpreter from `$NANOCHAT_PYTHON`, else `/usr/bin/python3`, else the
    /// real executable behind `python3` on `PATH`. The resolved path matters: shims such as
    /// pyenv's need environment variables the sandbox clears.
    pub fn new(limits: Limits) -> Result<Sandbox> {
        let python = match std::env::var_os("NANOCHAT_PYTHON") {
            Some(path) => PathBuf::from(path),
            None if Path::new("/usr/bin/python3").is_file() => PathBuf::from("/usr/bin/python3"),
            None => resolve_python()?,
        };
        Ok(Sandbox::with_python(python, limits))
    }

    pub fn with_python(python: PathBuf, limits: Limits) -> Sandbox {
        Sandbox { python, limits }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Runs `program` and returns how it ended. Errors are the sandbox's own failures (no
    /// interpreter, no temporary directory), never the program's.
    pub fn run(&self, program: &str) -> Result<Execution> {
        let scratch = Scratch::create()?;
        let script = scratch.0.join("program.py");
        std::fs::write(&script, program).with_context(|| format!("writing {}", script.display()))?;
        // SAFETY: geteuid has no preconditions.
        let drop_privileges = unsafe { libc::geteuid() } == 0;
        if drop_privileges {
            chown(&scratch.0, NOBODY)?;
        }
        let start = Instant::now();
        let (mut child, network_isolated) = self.spawn(&scratch.0, drop_privileges)?;
        let pgid = child.id() as i32;
        let stdout = capture(child.stdout.take(), self.limits.output_bytes);
        let stderr = capture(child.stderr.take(), self.limits.output_bytes);

        let timed_out = loop {
            match has_exited(pgid) {
                Ok(true) => break false,
                Ok(false) => {}
                // never leave a program running behind an error
                Err(e) => {
                    kill_group(pgid);
                    let _ = child.wait();
                    return Err(e);
                }
            }
            if start.elapsed() >= self.limits.timeout {
                break true;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        // the whole group goes: on timeout the program, otherwise the children it left behind. The
        // leader is not reaped yet, so its pid (the group id) cannot have been reused by a stranger.
        kill_group(pgid);
        let status = child.wait().context("reaping the sandboxed python")?;
        let duration = start.elapsed();
        let (stdout, stderr) = (stdout.finish(), stderr.finish());

        let signal = status.signal();
        let outcome = if timed_out || signal == Some(libc::SIGXCPU) {
            Outcome::Timeout
        } else if status.success() {
            Outcome::Passed
        } else if stderr.contains("MemoryError") || matches!(signal, Some(libc::SIGKILL | libc::SIGSEGV)) {
            Outcome::MemoryExceeded
        } else {
            Outcome::Failed { stderr_tail: tail(&stderr, TAIL_LINES) }
        };
        Ok(Execution {
            outcome,
            duration,
            stdout,
            stderr,
            network_isolated,
            dropped_privileges: drop_privileges,
            process_group: pgid,
            scratch: scratch.0.clone(),
        })
    }

    /// Starts the interpreter, in a network namespace unless the kernel refused one before; a
    /// refusal now is remembered and the run retried without. (A spawn that fails for another
    /// reason, say a missing interpreter, fails the retry too and is reported as such.)
    fn spawn(&self, scratch: &Path, drop_privileges: bool) -> Result<(Child, bool)> {
        if NETNS_REFUSED.get().is_none() {
            match self.command(scratch, drop_privileges, true).spawn() {
                Ok(child) => return Ok((child, true)),
                Err(refused) => {
                    let child =
                        self.command(scratch, drop_privileges, false).spawn().map_err(|e| self.spawn_error(e))?;
                    if NETNS_REFUSED.set(()).is_ok() {
                        eprintln!("sandbox: no network namespace ({refused}); programs run with the host's network");
                    }
                    return Ok((child, false));
                }
            }
        }
        let child = self.command(scratch, drop_privileges, false).spawn().map_err(|e| self.spawn_error(e))?;
        Ok((child, false))
    }

    fn spawn_error(&self, e: std::io::Error) -> anyhow::Error {
        anyhow::anyhow!(
            "starting {} in the sandbox failed: {e}. Install python3 or point NANOCHAT_PYTHON at an interpreter \
             that every user may run (the sandbox runs it as nobody when started as root)",
            self.python.display()
        )
    }

    fn command(&self, scratch: &Path, drop_privileges: bool, isolate: bool) -> Command {
        let mut cmd = Command::new(&self.python);
        cmd.args(["-I", "-B", "program.py"])
            .current_dir(scratch)
            .env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .env("HOME", scratch)
            .env("LANG", "C.UTF-8")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let limits = self.limits.clone();
        // SAFETY: geteuid has no preconditions.
        let uid = if drop_privileges { NOBODY } else { unsafe { libc::geteuid() } };
        // gid_map may only map the writer's own group, which is the effective one at that point
        // SAFETY: getegid has no preconditions.
        let gid = if drop_privileges { NOBODY } else { unsafe { libc::getegid() } };
        // built before the fork: the child may not allocate between fork and exec
        let uid_map = format!("{uid} {uid} 1\n");
        let gid_map = format!("{gid} {gid} 1\n");
        // SAFETY: the closure runs between fork and exec and only makes async-signal-safe system
        // calls on data prepared before the fork; it allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                set_limit(libc::RLIMIT_CPU, limits.cpu_seconds, limits.cpu_seconds + 1)?;
                set_limit(libc::RLIMIT_AS, limits.memory_bytes, limits.memory_bytes)?;
                set_limit(libc::RLIMIT_FSIZE, limits.file_size_bytes, limits.file_size_bytes)?;
                set_limit(libc::RLIMIT_NPROC, limits.max_processes, limits.max_processes)?;
                set_limit(libc::RLIMIT_CORE, 0, 0)?;
                if drop_privileges
                    && (libc::setgroups(0, std::ptr::null()) < 0
                        || libc::setgid(NOBODY) < 0
                        || libc::setuid(NOBODY) < 0)
                {
                    return Err(std::io::Error::last_os_error());
                }
                if isolate {
                    // changing uid cleared the dumpable flag, which hands /proc/self to root: restore
                    // it so the maps below can be written (exec would restore it anyway)
                    if drop_privileges && libc::prctl(libc::PR_SET_DUMPABLE, 1, 0, 0, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    if libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNET) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    // map the program's own ids, so it can create files in the scratch directory
                    // (unmapped ids get EOVERFLOW) while holding no capability after exec
                    write_proc(c"/proc/self/setgroups", b"deny")?;
                    write_proc(c"/proc/self/uid_map", uid_map.as_bytes())?;
                    write_proc(c"/proc/self/gid_map", gid_map.as_bytes())?;
                }
                Ok(())
            });
        }
        cmd
    }
}

/// The real interpreter behind `python3` on `PATH`, as it reports itself.
fn resolve_python() -> Result<PathBuf> {
    let out = Command::new("python3")
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

fn chown(path: &Path, id: u32) -> Result<()> {
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .with_context(|| format!("{} is not a valid path", path.display()))?;
    // SAFETY: c_path is a valid NUL-terminated string for the duration of the call.
    if unsafe { libc::chown(c_path.as_ptr(), id, id) } < 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("handing {} to nobody", path.display()));
    }
    Ok(())
}

fn set_limit(resource: libc::__rlimit_resource_t, soft: u64, hard: u64) -> std::io::Result<()> {
    let limit = libc::rlimit { rlim_cur: soft, rlim_max: hard };
    // SAFETY: limit is a valid rlimit for the duration of the call.
    if unsafe { libc::setrlimit(resource, &limit) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Writes `data` to a `/proc` file with raw system calls (safe between fork and exec).
fn write_proc(path: &std::ffi::CStr, data: &[u8]) -> std::io::Result<()> {
    // SAFETY: path is NUL-terminated and data valid for its length; the descriptor is closed here.
    unsafe {
        let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let written = libc::write(fd, data.as_ptr().cast(), data.len());
        libc::close(fd);
        if written != data.len() as isize {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Whether the process has exited, without reaping it (`WNOWAIT`).
fn has_exited(pid: i32) -> Result<bool> {
    // SAFETY: an all-zero siginfo_t is valid, and waitid writes only into it.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    let flags = libc::WEXITED | libc::WNOHANG | libc::WNOWAIT;
    // SAFETY: info is a valid siginfo_t for the duration of the call.
    if unsafe { libc::waitid(libc::P_PID, pid as libc::id_t, &mut info, flags) } < 0 {
        return Err(std::io::Error::last_os_error()).context("waiting for the sandboxed python");
    }
    // SAFETY: waitid filled info in; si_pid stays 0 while the process runs (WNOHANG).
    Ok(unsafe { info.si_pid() } != 0)
}

/// Kills every process in the group; a group already gone is fine.
fn kill_group(pgid: i32) {
    // SAFETY: killpg has no memory-safety preconditions; pgid is the group the child leads.
    unsafe {
        libc::killpg(pgid, libc::SIGKILL);
    }
}

/// A pipe read on its own thread into a bounded buffer; past the bound it is drained and dropped
/// so the program never blocks on a full pipe.
struct Capture {
    buffer: Arc<Mutex<Vec<u8>>>,
    done: Option<mpsc::Receiver<()>>,
}

fn capture(pipe: Option<impl Read + Send + 'static>, bound: usize) -> Capture {
    let buffer = Arc::new(Mutex::new(Vec::new()));
    let Some(mut pipe) = pipe else {
        return Capture { buffer, done: None };
    };
    let (tx, rx) = mpsc::channel();
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
    Capture { buffer, done: Some(rx) }
}

impl Capture {
    /// The text read so far, after waiting a little for the pipe to close.
    fn finish(self) -> String {
        if let Some(done) = self.done {
            let _ = done.recv_timeout(DRAIN_GRACE);
        }
        let bytes = self.buffer.lock().map(|b| b.clone()).unwrap_or_default();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

/// The last `lines` lines of `text`.
fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
