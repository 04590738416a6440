//! Starting a program in the sandbox: the processes between nanochat's `fork` and the
//! interpreter's `exec`, and the pipe they report through.
//!
//! - The supervisor, a `fork` of nanochat, takes a session of its own, creates the namespaces
//!   (user, when not root; PID, mount, network, IPC, UTS), starts the init, waits for it up to
//!   the wall-clock limit, kills it there, and reports. It dies with nanochat
//!   (`PR_SET_PDEATHSIG`), so a killed evaluator leaves nothing running.
//! - The init, a `clone` of the supervisor, is PID 1 of the new PID namespace. It builds the
//!   private root ([`RootFs`]), pivots into it, starts the program, drops its own capabilities,
//!   reaps whatever exits, and when the program exits, reports its status and exits too: the
//!   kernel then kills every process left in the namespace (daemons, `setsid` included), and the
//!   supervisor's `waitpid` returns only once they are all gone. It dies with the supervisor.
//! - The program, a `clone` of the init (PID 2), enters its working directory, sets the limits,
//!   drops to the sandbox's user when nanochat is root, forbids new privileges and execs the
//!   interpreter. It is an ordinary process, not PID 1, so signals act on it as anywhere else.
//!
//! Without namespaces (a root caller whose kernel refuses them) the same processes run with no
//! `unshare` and no private root; the caller then cleans up by user id.
//!
//! Between fork and exec a child of a multi-threaded process may only make async-signal-safe
//! calls, so everything here is a system call on memory prepared before the fork ([`Plan`]):
//! nothing allocates, locks or formats. The init and the program are made with a raw `clone`
//! rather than libc's `fork`, which would run the parent's `atfork` handlers; and ids change
//! through raw system calls, not libc's wrappers, which coordinate with threads these processes
//! do not have.

use std::ffi::{c_char, c_int, c_long, c_ulong, CStr, CString};
use std::io::{PipeReader, Read};
use std::os::fd::AsRawFd;
use std::time::Duration;

/// One step of the setup, named in the error when it fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Step {
    Descriptors = 1,
    Namespaces,
    IdMaps,
    Fork,
    Wait,
    PrivateMounts,
    RootFs,
    Directory,
    Symlink,
    Tmpfs,
    Bind,
    ReadOnly,
    Program,
    PivotRoot,
    RootReadOnly,
    Workdir,
    Limits,
    Identity,
    Exec,
}

impl Step {
    fn from_i64(value: i64) -> Option<Step> {
        use Step::*;
        [
            Descriptors,
            Namespaces,
            IdMaps,
            Fork,
            Wait,
            PrivateMounts,
            RootFs,
            Directory,
            Symlink,
            Tmpfs,
            Bind,
            ReadOnly,
            Program,
            PivotRoot,
            RootReadOnly,
            Workdir,
            Limits,
            Identity,
            Exec,
        ]
        .into_iter()
        .find(|s| *s as i64 == value)
    }

    /// Whether this step exists only to isolate the program: a failure there means the kernel
    /// refuses the namespaces (or a mount inside them), not that the interpreter is broken.
    pub(super) fn isolates(self) -> bool {
        use Step::*;
        matches!(
            self,
            Namespaces
                | IdMaps
                | PrivateMounts
                | RootFs
                | Directory
                | Symlink
                | Tmpfs
                | Bind
                | ReadOnly
                | PivotRoot
                | RootReadOnly
        )
    }
}

/// Everything the two children need, prepared before the fork.
pub(super) struct Plan {
    /// `None`: no namespaces (the throwaway-user scheme).
    pub namespaces: Option<Namespaces>,
    pub python: CString,
    pub argv: Vec<CString>,
    pub envp: Vec<CString>,
    /// The program's working directory, as it sees it.
    pub workdir: CString,
    /// (uid, gid) to switch to before exec, when nanochat is root.
    pub drop_to: Option<(u32, u32)>,
    /// (resource, soft, hard) set before exec.
    pub limits: Vec<(libc::__rlimit_resource_t, u64, u64)>,
    /// Wall-clock time from the supervisor's start until it kills the program.
    pub timeout: Duration,
}

pub(super) struct Namespaces {
    /// When not root: a user namespace mapping the caller's own uid and gid (`"id id 1\n"`).
    pub id_maps: Option<(Vec<u8>, Vec<u8>)>,
    pub root: RootFs,
}

/// The program's filesystem: a tmpfs root mounted on the host's `stage` directory (inside the
/// new mount namespace only), with directories, symlinks, read-only bind mounts of what the
/// interpreter needs, writable size-capped tmpfs mounts, a `/proc` of the new PID namespace, and
/// the program itself; then `pivot_root` into it and the root made read-only.
pub(super) struct RootFs {
    pub stage: CString,
    /// tmpfs options of the root and of the writable mounts.
    pub root_options: CString,
    pub tmpfs_options: CString,
    /// Directories to create, parents first (host paths under `stage`).
    pub dirs: Vec<CString>,
    /// (target, link) symlinks to create.
    pub symlinks: Vec<(CString, CString)>,
    /// Mount points of the writable tmpfs mounts.
    pub tmpfs: Vec<CString>,
    pub binds: Vec<Bind>,
    pub proc: CString,
    pub program_path: CString,
    pub program: Vec<u8>,
    /// `stage/.old`, where `pivot_root` puts the host's root before it is detached.
    pub old_root: CString,
}

pub(super) struct Bind {
    pub source: CString,
    pub target: CString,
    /// A file (a device) rather than a directory: its mount point is created as an empty file.
    pub file: bool,
    /// The flags that remount it read-only (keeping the source's locked flags), if it should be.
    pub read_only: Option<c_ulong>,
}

impl Plan {
    /// What step `step`, item `item`, was doing, in words.
    pub(super) fn describe(&self, step: Step, item: usize) -> String {
        let root = self.namespaces.as_ref().map(|ns| &ns.root);
        let path = |list: Option<&Vec<CString>>| {
            list.and_then(|l| l.get(item)).map(|p| p.to_string_lossy().into_owned()).unwrap_or_default()
        };
        let bind = root.and_then(|r| r.binds.get(item));
        let bind_text = |b: Option<&Bind>| {
            b.map(|b| format!("{} at {}", b.source.to_string_lossy(), b.target.to_string_lossy())).unwrap_or_default()
        };
        match step {
            Step::Descriptors => "setting up the program's session and descriptors".into(),
            Step::Namespaces => "creating namespaces (unshare)".into(),
            Step::IdMaps => "writing the user namespace's uid/gid maps".into(),
            Step::Fork => "starting the program's process".into(),
            Step::Wait => "waiting for the program".into(),
            Step::PrivateMounts => "making the mounts private".into(),
            Step::RootFs => {
                format!("mounting a tmpfs on {}", root.map(|r| r.stage.to_string_lossy()).unwrap_or_default())
            }
            Step::Directory => format!("creating {}", path(root.map(|r| &r.dirs))),
            Step::Symlink => format!(
                "creating the symlink {}",
                root.and_then(|r| r.symlinks.get(item)).map(|s| s.1.to_string_lossy()).unwrap_or_default()
            ),
            Step::Tmpfs => format!("mounting a tmpfs on {}", path(root.map(|r| &r.tmpfs))),
            Step::Bind => format!("bind-mounting {}", bind_text(bind)),
            Step::ReadOnly => format!("making {} read-only", bind_text(bind)),
            Step::Program => "writing program.py".into(),
            Step::PivotRoot => "switching to the private root (pivot_root)".into(),
            Step::RootReadOnly => "making the private root read-only".into(),
            Step::Workdir => format!("entering {}", self.workdir.to_string_lossy()),
            Step::Limits => "setting the resource limits".into(),
            Step::Identity => "dropping privileges".into(),
            Step::Exec => format!("running {}", self.python.to_string_lossy()),
        }
    }
}

/// The report pipe's records, 4 × i64 each, written whole (well under `PIPE_BUF`, so atomic).
const RECORD: usize = 32;
/// A setup step failed: step, item, errno.
const FAILED: i64 = 1;
/// The inode of the program's PID namespace.
const PID_NAMESPACE: i64 = 2;
/// The program ended (sent by the init): its wait status.
const EXITED: i64 = 3;
/// The init ended (sent by the supervisor): 1 if it was killed at the wall-clock limit.
const DONE: i64 = 4;
/// The descriptor the report pipe moves to in the children (closed at exec).
const REPORT_FD: c_int = 3;

/// What the children reported.
#[derive(Debug, Default)]
pub(super) struct Report {
    pub failure: Option<(Step, usize, std::io::Error)>,
    pub pid_namespace: Option<u64>,
    /// The program's wait status, if it ended on its own.
    pub exited: Option<c_int>,
    /// Whether the supervisor saw the end of the init, and killed it at the limit.
    pub done: Option<bool>,
}

/// The running supervisor and the read ends of its pipes.
pub(super) struct Started {
    pub pid: libc::pid_t,
    pub stdout: PipeReader,
    pub stderr: PipeReader,
    pub report: PipeReader,
}

impl Report {
    /// Reads the report pipe; call once the supervisor has exited (every write end is then
    /// closed: the program's at its exec, and nothing the program starts ever had one).
    pub(super) fn read(mut pipe: PipeReader) -> std::io::Result<Report> {
        let mut bytes = Vec::new();
        pipe.read_to_end(&mut bytes)?;
        let mut report = Report::default();
        for record in bytes.chunks_exact(RECORD) {
            let field = |i: usize| {
                let mut word = [0u8; 8];
                word.copy_from_slice(&record[i * 8..i * 8 + 8]);
                i64::from_ne_bytes(word)
            };
            match field(0) {
                FAILED => {
                    let step = Step::from_i64(field(1)).unwrap_or(Step::Exec);
                    let item = usize::try_from(field(2)).unwrap_or(0);
                    report.failure = Some((step, item, std::io::Error::from_raw_os_error(field(3) as i32)));
                }
                PID_NAMESPACE => report.pid_namespace = u64::try_from(field(1)).ok(),
                EXITED => report.exited = Some(field(1) as c_int),
                DONE => report.done = Some(field(1) != 0),
                _ => {}
            }
        }
        Ok(report)
    }
}

/// Forks the supervisor, which starts the program as `plan` says.
pub(super) fn start(plan: &Plan) -> std::io::Result<Started> {
    let (stdout, stdout_w) = std::io::pipe()?;
    let (stderr, stderr_w) = std::io::pipe()?;
    let (report, report_w) = std::io::pipe()?;
    let stdin = std::fs::File::open("/dev/null")?;
    let argv = pointers(&plan.argv);
    let envp = pointers(&plan.envp);
    let fds = [stdin.as_raw_fd(), stdout_w.as_raw_fd(), stderr_w.as_raw_fd()];
    let report_fd = report_w.as_raw_fd();
    // SAFETY: getpid has no preconditions.
    let parent = unsafe { libc::getpid() };
    // SAFETY: the child runs `supervise`, which only makes async-signal-safe system calls on
    // memory prepared above (the plan, the pointer arrays, the descriptors) and never returns.
    match unsafe { libc::fork() } {
        -1 => Err(std::io::Error::last_os_error()),
        // SAFETY: in the child, as above.
        0 => unsafe { supervise(plan, fds, report_fd, parent, &argv, &envp) },
        // the write ends close here: only the children hold them
        pid => Ok(Started { pid, stdout, stderr, report }),
    }
}

fn pointers(strings: &[CString]) -> Vec<*const c_char> {
    strings.iter().map(|s| s.as_ptr()).chain(std::iter::once(std::ptr::null())).collect()
}

fn errno() -> c_int {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// Writes one record to the report pipe (a single `write` of 32 bytes).
unsafe fn send(fd: c_int, kind: i64, a: i64, b: i64, c: i64) {
    let mut record = [0u8; RECORD];
    for (i, value) in [kind, a, b, c].into_iter().enumerate() {
        record[i * 8..i * 8 + 8].copy_from_slice(&value.to_ne_bytes());
    }
    libc::write(fd, record.as_ptr().cast(), RECORD);
}

/// Reports a failed step with the current errno and exits.
unsafe fn fail(fd: c_int, step: Step, item: usize) -> ! {
    let errno = errno();
    send(fd, FAILED, step as i64, item as i64, i64::from(errno));
    libc::_exit(1)
}

unsafe fn check(result: c_int, fd: c_int, step: Step, item: usize) {
    if result < 0 {
        fail(fd, step, item);
    }
}

/// The supervisor: see the module header.
unsafe fn supervise(
    plan: &Plan,
    fds: [c_int; 3],
    report: c_int,
    parent: libc::pid_t,
    argv: &[*const c_char],
    envp: &[*const c_char],
) -> ! {
    // die with nanochat; if it is already gone, do nothing
    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as c_ulong) < 0 || libc::getppid() != parent {
        libc::_exit(1);
    }
    check(libc::setsid(), report, Step::Descriptors, 0);
    for (target, fd) in fds.into_iter().enumerate() {
        check(libc::dup2(fd, target as c_int), report, Step::Descriptors, 1);
    }
    // the report pipe moves to descriptor 3 (closed at exec) and every other descriptor goes;
    // close_range is best effort (Linux 5.9), nanochat's own descriptors are close-on-exec anyway
    let report = if report == REPORT_FD {
        report
    } else {
        check(libc::dup3(report, REPORT_FD, libc::O_CLOEXEC), report, Step::Descriptors, 2);
        REPORT_FD
    };
    libc::syscall(libc::SYS_close_range, REPORT_FD + 1, c_int::MAX, 0);
    let no_core = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    check(libc::setrlimit(libc::RLIMIT_CORE, &no_core), report, Step::Limits, 0);

    if let Some(ns) = &plan.namespaces {
        let mut flags =
            libc::CLONE_NEWNS | libc::CLONE_NEWPID | libc::CLONE_NEWNET | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS;
        if ns.id_maps.is_some() {
            flags |= libc::CLONE_NEWUSER;
        }
        check(libc::unshare(flags), report, Step::Namespaces, 0);
        if let Some((uid_map, gid_map)) = &ns.id_maps {
            // map only the caller's own ids: the program can own its files, and holds no
            // capability once it execs
            write_file(c"/proc/self/setgroups", b"deny", report, 0);
            write_file(c"/proc/self/uid_map", uid_map, report, 1);
            write_file(c"/proc/self/gid_map", gid_map, report, 2);
        }
    }
    let init = clone(report);
    if init == 0 {
        run_init(plan, report, argv, envp);
    }
    let timed_out = wait_until(init, plan.timeout, report);
    send(report, DONE, i64::from(timed_out), 0, 0);
    libc::_exit(0)
}

/// A child process, like `fork` but without the `atfork` handlers; 0 in the child.
unsafe fn clone(report: c_int) -> libc::pid_t {
    let pid = libc::syscall(libc::SYS_clone, libc::SIGCHLD as c_long, 0 as c_long, 0 as c_long, 0 as c_long, 0);
    if pid < 0 {
        fail(report, Step::Fork, 0);
    }
    pid as libc::pid_t
}

unsafe fn write_file(path: &CStr, data: &[u8], report: c_int, item: usize) {
    let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
    check(fd, report, Step::IdMaps, item);
    let written = libc::write(fd, data.as_ptr().cast(), data.len());
    if written != data.len() as isize {
        fail(report, Step::IdMaps, item);
    }
    libc::close(fd);
}

/// Monotonic time since boot.
unsafe fn now() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts);
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Waits for the init; at `timeout` kills it (and with it the PID namespace) and waits for
/// that. Returns whether it had to.
unsafe fn wait_until(pid: libc::pid_t, timeout: Duration, report: c_int) -> bool {
    let start = now();
    let mut status = 0;
    loop {
        match libc::waitpid(pid, &mut status, libc::WNOHANG) {
            r if r == pid => return false,
            0 => {}
            _ if errno() == libc::EINTR => {}
            _ => fail(report, Step::Wait, 0),
        }
        if now().saturating_sub(start) >= timeout {
            libc::kill(pid, libc::SIGKILL);
            loop {
                if libc::waitpid(pid, &mut status, 0) == pid {
                    return true;
                }
                if errno() != libc::EINTR {
                    fail(report, Step::Wait, 1);
                }
            }
        }
        let pause = libc::timespec { tv_sec: 0, tv_nsec: 2_000_000 };
        libc::nanosleep(&pause, std::ptr::null_mut());
    }
}

/// The init: see the module header.
unsafe fn run_init(plan: &Plan, report: c_int, argv: &[*const c_char], envp: &[*const c_char]) -> ! {
    check(libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as c_ulong), report, Step::Identity, 0);
    // what the init creates is readable by the sandbox's user, whatever nanochat's umask
    libc::umask(0o022);
    if let Some(ns) = &plan.namespaces {
        build_root(&ns.root, report);
    }
    let program = clone(report);
    if program == 0 {
        run_program(plan, report, argv, envp);
    }
    // reaping needs no privilege: drop every capability the init holds (in its user namespace,
    // or as root), so nothing the program does can borrow them
    let header = [0x2008_0522u32, 0]; // _LINUX_CAPABILITY_VERSION_3, this process
    let data = [0u32; 6];
    libc::syscall(libc::SYS_capset, header.as_ptr(), data.as_ptr());
    loop {
        let mut status = 0;
        let pid = libc::waitpid(-1, &mut status, 0);
        if pid == program {
            send(report, EXITED, i64::from(status), 0, 0);
            // exiting ends the namespace: the kernel kills whatever the program left
            libc::_exit(0);
        }
        if pid < 0 && errno() != libc::EINTR {
            fail(report, Step::Wait, 2);
        }
    }
}

/// The program's process: see the module header.
unsafe fn run_program(plan: &Plan, report: c_int, argv: &[*const c_char], envp: &[*const c_char]) -> ! {
    check(libc::chdir(plan.workdir.as_ptr()), report, Step::Workdir, 0);
    for (i, &(resource, soft, hard)) in plan.limits.iter().enumerate() {
        let limit = libc::rlimit { rlim_cur: soft, rlim_max: hard };
        check(libc::setrlimit(resource, &limit), report, Step::Limits, i + 1);
    }
    if let Some((uid, gid)) = plan.drop_to {
        let null = std::ptr::null::<libc::gid_t>();
        check(libc::syscall(libc::SYS_setgroups, 0 as c_long, null) as c_int, report, Step::Identity, 1);
        check(libc::syscall(libc::SYS_setresgid, gid, gid, gid) as c_int, report, Step::Identity, 2);
        check(libc::syscall(libc::SYS_setresuid, uid, uid, uid) as c_int, report, Step::Identity, 3);
    }
    // no setuid binary may hand privileges back; die with the init (set after the id change,
    // which clears it)
    let no_new_privs = libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1 as c_ulong, 0 as c_ulong, 0 as c_ulong, 0 as c_ulong);
    check(no_new_privs, report, Step::Identity, 4);
    check(libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as c_ulong), report, Step::Identity, 5);
    libc::execve(plan.python.as_ptr(), argv.as_ptr(), envp.as_ptr());
    fail(report, Step::Exec, 0)
}

/// Builds the private root described by `fs` and pivots into it.
unsafe fn build_root(fs: &RootFs, report: c_int) {
    // the PID namespace, for the caller's record (the host's /proc is still visible here)
    let mut st: libc::stat = std::mem::zeroed();
    if libc::stat(c"/proc/self/ns/pid".as_ptr(), &mut st) == 0 {
        send(report, PID_NAMESPACE, st.st_ino as i64, 0, 0);
    }
    let null = std::ptr::null::<c_char>();
    let no_data = std::ptr::null::<libc::c_void>();
    // nothing mounted from here on propagates back to the host
    check(
        libc::mount(null, c"/".as_ptr(), null, libc::MS_REC | libc::MS_PRIVATE, no_data),
        report,
        Step::PrivateMounts,
        0,
    );
    let tmpfs = c"tmpfs".as_ptr();
    let fs_flags = libc::MS_NOSUID | libc::MS_NODEV;
    check(
        libc::mount(tmpfs, fs.stage.as_ptr(), tmpfs, fs_flags, fs.root_options.as_ptr().cast()),
        report,
        Step::RootFs,
        0,
    );
    for (i, dir) in fs.dirs.iter().enumerate() {
        if libc::mkdir(dir.as_ptr(), 0o755) < 0 && errno() != libc::EEXIST {
            fail(report, Step::Directory, i);
        }
    }
    for (i, (target, link)) in fs.symlinks.iter().enumerate() {
        check(libc::symlink(target.as_ptr(), link.as_ptr()), report, Step::Symlink, i);
    }
    for (i, dir) in fs.tmpfs.iter().enumerate() {
        check(
            libc::mount(tmpfs, dir.as_ptr(), tmpfs, fs_flags, fs.tmpfs_options.as_ptr().cast()),
            report,
            Step::Tmpfs,
            i,
        );
    }
    for (i, bind) in fs.binds.iter().enumerate() {
        if bind.file {
            let fd = libc::open(bind.target.as_ptr(), libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC, 0o644);
            check(fd, report, Step::Bind, i);
            libc::close(fd);
        }
        let flags = libc::MS_BIND | libc::MS_REC;
        check(libc::mount(bind.source.as_ptr(), bind.target.as_ptr(), null, flags, no_data), report, Step::Bind, i);
        if let Some(flags) = bind.read_only {
            check(libc::mount(null, bind.target.as_ptr(), null, flags, no_data), report, Step::ReadOnly, i);
        }
    }
    // a /proc of the new PID namespace; where the kernel refuses it (a container that masks parts
    // of its own /proc), the program runs without one
    let proc_flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    let proc = c"proc".as_ptr();
    libc::mount(proc, fs.proc.as_ptr(), proc, proc_flags, no_data);

    let fd =
        libc::open(fs.program_path.as_ptr(), libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY | libc::O_CLOEXEC, 0o644);
    check(fd, report, Step::Program, 0);
    let mut rest = &fs.program[..];
    while !rest.is_empty() {
        let n = libc::write(fd, rest.as_ptr().cast(), rest.len());
        if n < 0 && errno() == libc::EINTR {
            continue;
        }
        if n <= 0 {
            fail(report, Step::Program, 1);
        }
        rest = &rest[n as usize..];
    }
    libc::close(fd);

    check(
        libc::syscall(libc::SYS_pivot_root, fs.stage.as_ptr(), fs.old_root.as_ptr()) as c_int,
        report,
        Step::PivotRoot,
        0,
    );
    check(libc::chdir(c"/".as_ptr()), report, Step::PivotRoot, 1);
    check(libc::umount2(c"/.old".as_ptr(), libc::MNT_DETACH), report, Step::PivotRoot, 2);
    check(libc::rmdir(c"/.old".as_ptr()), report, Step::PivotRoot, 3);
    let read_only = libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV;
    check(libc::mount(null, c"/".as_ptr(), null, read_only, no_data), report, Step::RootReadOnly, 0);
}
