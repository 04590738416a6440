//! The HumanEval sandbox against hostile programs, case by case: each must end as expected within
//! its limits, stay contained, and leave nothing behind: no process of its PID namespace or of its
//! throwaway user, no scratch directory, no file in the host's /tmp, /var/tmp or /dev/shm, nothing
//! in the user's home.
//!
//! Every case runs under each isolation this machine gives: namespaces (with
//! `NANOCHAT_REQUIRE_NAMESPACES` set, their absence fails instead of skipping) and, as root, the
//! throwaway-user fallback as well. As root, `every_case_again_as_an_unprivileged_user` runs this
//! whole binary again as the user `nctest` (CI creates it with `useradd -m nctest`; without it,
//! `nobody`), where the namespaces come from an unprivileged user namespace. By hand:
//!
//! ```text
//! cargo test -p nanochat --test sandbox --no-run        # prints the test binary's path
//! install -m 755 target/debug/deps/sandbox-<hash> /tmp/sandbox-test
//! setpriv --reuid nctest --regid nctest --init-groups env HOME=/home/nctest /tmp/sandbox-test
//! ```

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use nanochat::execution::{Execution, Isolation, Limits, Outcome, Sandbox};

/// One run at a time: the timing assertions assume the machine's cores are the run's.
static SERIAL: Mutex<()> = Mutex::new(());

/// Loads a C library handle in a program, to get past the Python-level guard.
const LIBC: &str = "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n";

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// A sandbox for each isolation available here: the best one, and as root the throwaway user.
fn sandboxes(limits: Limits) -> Vec<Sandbox> {
    let best = match Sandbox::new(limits.clone()) {
        Ok(best) => best,
        Err(e) if std::env::var_os("NANOCHAT_REQUIRE_NAMESPACES").is_none() => {
            eprintln!("SKIPPED: no sandbox on this machine: {e:#}");
            return Vec::new();
        }
        Err(e) => panic!("NANOCHAT_REQUIRE_NAMESPACES is set, but: {e:#}"),
    };
    if best.isolation() != Isolation::Namespaces {
        assert!(
            std::env::var_os("NANOCHAT_REQUIRE_NAMESPACES").is_none(),
            "NANOCHAT_REQUIRE_NAMESPACES is set, but the sandbox fell back to {:?}",
            best.isolation()
        );
        eprintln!("NOTE: no namespaces here: the cases run with the throwaway user only");
        return vec![best];
    }
    let mut all = vec![best.clone()];
    if is_root() {
        all.push(Sandbox::with_isolation(best.python(), limits, Isolation::ThrowawayUser).unwrap());
    }
    all
}

/// Runs `program` and checks that nothing of it is left.
fn run_in(sandbox: &Sandbox, program: &str) -> Execution {
    let _guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let exec = sandbox.run(program).unwrap();
    assert_nothing_left(&exec);
    exec
}

/// Every case under every isolation, with default limits.
fn each(program: &str, check: impl Fn(&Execution)) {
    each_with(Limits::default(), program, check)
}

fn each_with(limits: Limits, program: &str, check: impl Fn(&Execution)) {
    for sandbox in sandboxes(limits) {
        let exec = run_in(&sandbox, program);
        eprintln!("{:?}: {:?} in {:?}", exec.isolation, exec.outcome, exec.duration);
        check(&exec);
    }
}

fn assert_nothing_left(exec: &Execution) {
    assert!(!exec.scratch.exists(), "scratch directory {} left behind", exec.scratch.display());
    // the PID namespace empties before the run returns; a throwaway user's processes are killed
    if let Some(ns) = exec.pid_namespace {
        let left = in_pid_namespace(ns);
        assert!(left.is_empty(), "processes left in the program's PID namespace: {left:?}");
    }
    // SAFETY: getuid has no preconditions.
    if exec.uid != unsafe { libc::getuid() } {
        let left = owned_by(exec.uid);
        assert!(left.is_empty(), "processes of the throwaway user {} left: {left:?}", exec.uid);
    }
    if exec.isolation == Isolation::Namespaces {
        assert!(exec.pid_namespace.is_some(), "a namespaced run reports its PID namespace");
    }
}

/// Pids of live processes, with a predicate on their /proc directory.
fn processes(keep: impl Fn(&Path) -> bool) -> Vec<i32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
        let dir = entry.path();
        let zombie = std::fs::read_to_string(dir.join("stat"))
            .ok()
            .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| rest.starts_with('Z')))
            .unwrap_or(true);
        if !zombie && keep(&dir) {
            pids.push(pid);
        }
    }
    pids
}

fn in_pid_namespace(inode: u64) -> Vec<i32> {
    let want = format!("pid:[{inode}]");
    processes(|dir| std::fs::read_link(dir.join("ns/pid")).is_ok_and(|l| l.as_os_str() == want.as_str()))
}

fn owned_by(uid: u32) -> Vec<i32> {
    processes(|dir| {
        let status = std::fs::read_to_string(dir.join("status")).unwrap_or_default();
        let ids = status.lines().find_map(|l| l.strip_prefix("Uid:")).unwrap_or_default();
        ids.split_whitespace().take(2).any(|id| id == uid.to_string())
    })
}

fn named(comm: &str) -> Vec<i32> {
    processes(|dir| std::fs::read_to_string(dir.join("comm")).is_ok_and(|c| c.trim() == comm))
}

/// A token no other run or test uses, for file and process names.
fn token() -> String {
    format!("nc{:08x}", rand::random::<u32>())
}

#[test]
fn a_correct_program_passes_and_a_failing_assert_fails() {
    each("def add(a, b):\n    return a + b\n\nassert add(2, 3) == 5\nprint('fine')\n", |ok| {
        assert_eq!(ok.outcome, Outcome::Passed, "stderr: {}", ok.stderr);
        assert_eq!(ok.stdout.trim(), "fine");
    });
    each("def add(a, b):\n    return a - b\n\nassert add(2, 3) == 5, 'wrong sum'\n", |bad| match &bad.outcome {
        Outcome::Failed { stderr_tail } => {
            assert!(stderr_tail.contains("AssertionError: wrong sum"), "{stderr_tail}");
            // the traceback shows the program's own line
            assert!(stderr_tail.contains("assert add(2, 3) == 5, 'wrong sum'"), "{stderr_tail}");
        }
        other => panic!("expected a failure, got {other:?}"),
    });
}

#[test]
fn an_infinite_loop_times_out() {
    let limits = Limits { timeout: Duration::from_millis(1500), cpu_seconds: 30, ..Limits::default() };
    each_with(limits, "while True:\n    pass\n", |exec| {
        assert_eq!(exec.outcome, Outcome::Timeout);
        assert!(exec.duration < Duration::from_secs(3), "took {:?}", exec.duration);
    });
}

#[test]
fn the_cpu_limit_ends_a_busy_loop_before_the_wall_clock() {
    let limits = Limits { timeout: Duration::from_secs(20), cpu_seconds: 1, ..Limits::default() };
    each_with(limits, "while True:\n    pass\n", |exec| {
        assert_eq!(exec.outcome, Outcome::Timeout);
        assert!(exec.duration < Duration::from_secs(10), "took {:?}", exec.duration);
    });
}

#[test]
fn a_memory_hog_is_reported_as_memory_exceeded() {
    let limits = Limits { memory_bytes: 256 << 20, ..Limits::default() };
    each_with(limits, "hog = []\nwhile True:\n    hog.append(bytearray(1 << 20))\n", |exec| {
        assert_eq!(exec.outcome, Outcome::MemoryExceeded, "stderr: {}", exec.stderr);
    });
}

#[test]
fn a_crash_is_reported_with_its_signal() {
    each(&format!("{LIBC}ctypes.string_at(0)\n"), |exec| {
        assert_eq!(exec.outcome, Outcome::Crashed { signal: "SIGSEGV".into() }, "stderr: {}", exec.stderr);
    });
    each(&format!("{LIBC}libc.abort()\n"), |exec| {
        assert_eq!(exec.outcome, Outcome::Crashed { signal: "SIGABRT".into() }, "stderr: {}", exec.stderr);
    });
}

#[test]
fn a_fork_bomb_is_contained() {
    let limits = Limits { timeout: Duration::from_secs(2), max_processes: 16, ..Limits::default() };
    each_with(limits, &format!("{LIBC}while True:\n    libc.fork()\n"), |exec| {
        assert_eq!(exec.outcome, Outcome::Timeout);
        assert!(exec.duration < Duration::from_secs(4), "took {:?}", exec.duration);
        // the host can still start processes
        assert!(std::process::Command::new("true").status().unwrap().success());
    });
}

#[test]
fn a_process_cap_hog_does_not_starve_the_next_run() {
    let limits = Limits { max_processes: 8, ..Limits::default() };
    let hog = format!(
        "{LIBC}import time\nn = 0\nwhile n < 100:\n    pid = libc.fork()\n    if pid == 0:\n        time.sleep(60)\n        \
         libc._exit(0)\n    if pid < 0:\n        break\n    n += 1\nprint('FORKED', n)\n"
    );
    let normal = format!(
        "{LIBC}import os\npids = []\nfor _ in range(4):\n    pid = libc.fork()\n    if pid == 0:\n        libc._exit(7)\n    \
         assert pid > 0, f'fork failed: errno {{ctypes.get_errno()}}'\n    pids.append(pid)\nfor pid in pids:\n    \
         assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 7\nprint('FORKED', len(pids))\n"
    );
    for sandbox in sandboxes(limits) {
        let exec = run_in(&sandbox, &hog);
        assert_eq!(exec.outcome, Outcome::Passed, "stderr: {}", exec.stderr);
        let forked: usize = exec.stdout.split_whitespace().nth(1).unwrap().parse().unwrap();
        assert!(forked < 8, "{forked} children under a cap of 8 processes");
        // the sleepers died with the run, so the next run can fork
        let next = run_in(&sandbox, &normal);
        assert_eq!(next.outcome, Outcome::Passed, "{:?}: stderr: {}", next.isolation, next.stderr);
        assert_eq!(next.stdout.trim(), "FORKED 4");
    }
}

#[test]
fn a_double_forked_setsid_daemon_dies_with_the_run() {
    let token = token();
    let program = format!(
        "{LIBC}import time\nif libc.fork() == 0:\n    libc.setsid()\n    if libc.fork() == 0:\n        \
         libc.prctl(15, b'{token}', 0, 0, 0)\n        for _ in range(600):\n            \
         with open('/tmp/{token}', 'a') as f:\n                f.write('still here\\n')\n            \
         time.sleep(0.1)\n    libc._exit(0)\ntime.sleep(0.3)\nprint('STARTED')\n"
    );
    each(&program, |exec| {
        assert_eq!(exec.outcome, Outcome::Passed, "stderr: {}", exec.stderr);
        assert_eq!(exec.stdout.trim(), "STARTED");
        assert!(exec.duration < Duration::from_secs(3), "the run waited for its daemon: {:?}", exec.duration);
        // a surviving daemon would keep writing
        std::thread::sleep(Duration::from_millis(300));
        assert!(named(&token).is_empty(), "the daemon {token} survived");
        assert!(!Path::new("/tmp").join(&token).exists(), "the daemon wrote to the host's /tmp");
    });
}

#[test]
fn the_file_size_limit_stops_a_huge_write() {
    let limits = Limits { file_size_bytes: 1 << 20, ..Limits::default() };
    let program = "import os\ntry:\n    with open('big', 'wb') as f:\n        for _ in range(64):\n            \
                   f.write(b'x' * (1 << 20))\n            f.flush()\n    print('WROTE ALL')\nexcept OSError as e:\n    \
                   print('STOPPED', os.path.getsize('big'), e.errno)\n";
    each_with(limits, program, |exec| {
        let fields: Vec<&str> = exec.stdout.split_whitespace().collect();
        assert_eq!(fields.first(), Some(&"STOPPED"), "stdout: {} stderr: {}", exec.stdout, exec.stderr);
        let size: u64 = fields[1].parse().unwrap();
        assert!(size <= 1 << 20, "wrote {size} bytes past the 1 MiB limit");
        assert_eq!(fields[2], "27", "expected EFBIG (27, file too large)");
    });
}

#[test]
fn the_parents_environment_is_not_visible_and_home_is_the_working_directory() {
    // cargo sets CARGO_* variables in the test's environment: the program must see none of them
    assert!(std::env::vars().any(|(k, _)| k.starts_with("CARGO")));
    each("import os, json\nprint(json.dumps(dict(os.environ)))\nprint(os.getcwd())\n", |exec| {
        assert_eq!(exec.outcome, Outcome::Passed, "stderr: {}", exec.stderr);
        let mut lines = exec.stdout.lines();
        let env: serde_json::Map<String, serde_json::Value> = serde_json::from_str(lines.next().unwrap()).unwrap();
        let mut keys: Vec<&str> = env.keys().map(String::as_str).filter(|k| *k != "LC_CTYPE").collect();
        keys.sort_unstable();
        assert_eq!(keys, ["HOME", "LANG", "PATH"]);
        let cwd = lines.next().unwrap();
        assert_eq!(env["HOME"], cwd, "HOME must be the working directory");
        assert_eq!(Path::new(cwd), exec.workdir);
    });
}

#[test]
fn the_network_is_unreachable_with_namespaces() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let program = format!(
        "import socket\ns = socket.socket()\ns.settimeout(2)\ntry:\n    s.connect(('127.0.0.1', {port}))\n    \
         print('CONNECTED')\nexcept OSError as e:\n    print('BLOCKED', e)\n"
    );
    each(&program, |exec| {
        assert_eq!(exec.outcome, Outcome::Passed, "stderr: {}", exec.stderr);
        if exec.network_isolated() {
            assert!(exec.stdout.starts_with("BLOCKED"), "isolated, yet: {}", exec.stdout);
        } else {
            // the report must be truthful: without namespaces the host's loopback is reachable
            assert!(exec.stdout.starts_with("CONNECTED"), "reported not isolated, yet: {}", exec.stdout);
        }
    });
}

/// The user's home, as this process knows it.
fn home() -> PathBuf {
    PathBuf::from(std::env::var_os("HOME").expect("HOME is set"))
}

#[test]
fn the_users_secrets_are_out_of_reach() {
    let dir = tempfile::tempdir().unwrap();
    let secret_text = format!("secret-{}", token());
    let secret = dir.path().join("credentials");
    std::fs::write(&secret, &secret_text).unwrap();
    std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let paths = [secret.clone(), home().join(".bashrc"), home().join(".ssh/id_rsa"), PathBuf::from("/etc/shadow")];
    let paths: Vec<String> = paths.iter().map(|p| format!("{:?}", p.display().to_string())).collect();
    let program = format!(
        "for path in [{}]:\n    try:\n        with open(path) as f:\n            print('READ', path, f.read())\n    \
         except OSError as e:\n        print('HIDDEN', path, type(e).__name__)\n",
        paths.join(", ")
    );
    each(&program, |exec| {
        assert_eq!(exec.outcome, Outcome::Passed, "stderr: {}", exec.stderr);
        assert!(!exec.stdout.contains(&secret_text), "the secret leaked: {}", exec.stdout);
        assert!(!exec.stdout.contains("READ"), "read outside the sandbox: {}", exec.stdout);
        assert_eq!(exec.stdout.matches("HIDDEN").count(), 4, "{}", exec.stdout);
        if exec.isolation == Isolation::Namespaces {
            // the user's files are not merely unreadable: not there at all (/etc is, read-only)
            assert_eq!(exec.stdout.matches("FileNotFoundError").count(), 3, "{}", exec.stdout);
        }
    });
}

#[test]
fn the_program_sees_only_what_python_needs_and_none_of_it_is_writable() {
    let program = "import os\nprint('ROOT', ' '.join(sorted(os.listdir('/'))))\n\
                   print('PIDS', ' '.join(sorted(p for p in os.listdir('/proc') if p.isdigit())))\n\
                   for path in ['/x', '/usr/x', '/etc/x', '/proc/x']:\n    try:\n        open(path, 'w')\n        \
                   print('WROTE', path)\n    except OSError as e:\n        print('REFUSED', path, e.errno)\n";
    each(program, |exec| {
        assert_eq!(exec.outcome, Outcome::Passed, "stderr: {}", exec.stderr);
        assert!(!exec.stdout.contains("WROTE"), "{}", exec.stdout);
        if exec.isolation != Isolation::Namespaces {
            return;
        }
        let line = |tag: &str| exec.stdout.lines().find_map(|l| l.strip_prefix(tag)).unwrap_or_default().to_string();
        let allowed = ["bin", "dev", "etc", "lib", "lib32", "lib64", "libx32", "proc", "sbin", "tmp", "usr", "var"];
        for entry in line("ROOT ").split_whitespace() {
            assert!(allowed.contains(&entry), "/{entry} is visible: {}", exec.stdout);
        }
        // its own PID namespace: the sandbox's init and the program
        assert_eq!(line("PIDS "), "1 2", "{}", exec.stdout);
        // a read-only filesystem (EROFS) everywhere but the private temporary directories
        assert_eq!(
            exec.stdout.matches(" 30\n").count() + usize::from(exec.stdout.ends_with(" 30")),
            3,
            "{}",
            exec.stdout
        );
    });
}

#[test]
fn writes_to_the_home_directory_stay_inside() {
    let token = token();
    let bashrc = home().join(".bashrc");
    let before = std::fs::read(&bashrc).ok();
    let planted = home().join(&token);
    let program = format!(
        "import os\nwith open(os.path.expanduser('~/.bashrc'), 'a') as f:\n    f.write('echo pwned\\n')\n\
         print('SANDBOX HOME', os.path.expanduser('~'))\nfor path in [{:?}, {:?}]:\n    try:\n        \
         with open(path, 'a') as f:\n            f.write('pwned\\n')\n        print('WROTE', path)\n    \
         except OSError as e:\n        print('REFUSED', path, type(e).__name__)\n",
        bashrc.display().to_string(),
        planted.display().to_string()
    );
    each(&program, |exec| {
        assert_eq!(exec.outcome, Outcome::Passed, "stderr: {}", exec.stderr);
        assert!(exec.stdout.contains(&format!("SANDBOX HOME {}", exec.workdir.display())), "{}", exec.stdout);
        assert!(!exec.stdout.contains("WROTE"), "wrote into the real home: {}", exec.stdout);
        assert_eq!(std::fs::read(&bashrc).ok(), before, "{} changed", bashrc.display());
        assert!(!planted.exists(), "{} was created", planted.display());
    });
}

#[test]
fn temporary_files_do_not_outlive_the_run_and_shm_is_capped() {
    let token = token();
    let limits = Limits { tmpfs_bytes: 16 << 20, file_size_bytes: 4 << 20, ..Limits::default() };
    let program = format!(
        "import os\nfor d in ['/tmp', '/var/tmp', '/dev/shm']:\n    path = os.path.join(d, '{token}')\n    \
         with open(path, 'w') as f:\n        f.write('left behind')\n    os.makedirs(path + '.d/sub')\n    \
         print('WROTE', path)\ntotal = 0\ntry:\n    for i in range(8):\n        \
         with open(f'/dev/shm/{token}.{{i}}', 'wb') as f:\n            f.write(b'x' * (4 << 20))\n        \
         total += 4\n    print('FULL', total, 0)\nexcept OSError as e:\n    print('FULL', total, e.errno)\n"
    );
    each_with(limits, &program, |exec| {
        assert_eq!(exec.outcome, Outcome::Passed, "stderr: {}", exec.stderr);
        assert_eq!(exec.stdout.matches("WROTE").count(), 3, "{}", exec.stdout);
        for dir in ["/tmp", "/var/tmp", "/dev/shm"] {
            for name in [token.clone(), format!("{token}.d"), format!("{token}.0")] {
                let path = Path::new(dir).join(name);
                assert!(!path.exists(), "{} outlived the run", path.display());
            }
        }
        if exec.isolation == Isolation::Namespaces {
            // the private /dev/shm is a 16 MiB tmpfs: the fifth 4 MiB file does not fit
            let full: Vec<&str> = exec.stdout.lines().last().unwrap().split_whitespace().collect();
            assert_eq!(full[0], "FULL", "{}", exec.stdout);
            assert!(full[1].parse::<u64>().unwrap() <= 16, "{}", exec.stdout);
            assert_eq!(full[2], "28", "expected ENOSPC: {}", exec.stdout);
        }
    });
}

#[test]
fn the_program_cannot_kill_the_evaluator() {
    let program = format!(
        "{LIBC}import os, signal\ntry:\n    os.kill({pid}, signal.SIGKILL)\n    print('GUARD PASSED')\n\
         except PermissionError:\n    print('GUARD REFUSED')\nprint('KILL', libc.kill({pid}, 9), ctypes.get_errno())\n\
         libc.kill(-1, 9)\nprint('ALIVE')\n",
        pid = std::process::id()
    );
    each(&program, |exec| {
        assert_eq!(exec.outcome, Outcome::Passed, "stderr: {}", exec.stderr);
        assert!(exec.stdout.contains("GUARD REFUSED"), "{}", exec.stdout);
        // not in its PID namespace (ESRCH), or not its user's (EPERM)
        let expected = if exec.isolation == Isolation::Namespaces { "KILL -1 3" } else { "KILL -1 1" };
        assert!(exec.stdout.contains(expected), "{}", exec.stdout);
        assert!(exec.stdout.contains("ALIVE"), "{}", exec.stdout);
    });
}

#[test]
fn ctypes_gets_past_the_guard_but_not_the_jail() {
    let dir = tempfile::tempdir().unwrap();
    let victim = dir.path().join("victim.txt");
    std::fs::write(&victim, "keep me").unwrap();
    let program = format!(
        "{LIBC}import os\nfor name, call in [('unlink', lambda: libc.unlink({victim:?}.encode())), \
         ('mount', lambda: libc.mount(b'none', b'/usr', b'tmpfs', 0, None)), ('setuid', lambda: libc.setuid(0)), \
         ('chroot', lambda: libc.chroot(b'/tmp'))]:\n    print(name, call(), ctypes.get_errno())\n\
         print('umount', libc.umount2(b'/usr', 2), ctypes.get_errno())\n",
        victim = victim.display().to_string()
    );
    each(&program, |exec| {
        assert_eq!(exec.outcome, Outcome::Passed, "stderr: {}", exec.stderr);
        for name in ["unlink", "mount", "setuid", "chroot", "umount"] {
            let line = exec.stdout.lines().find(|l| l.starts_with(name)).unwrap_or_default();
            assert!(line.starts_with(&format!("{name} -1 ")), "{name} succeeded: {}", exec.stdout);
        }
        assert!(victim.exists(), "the program deleted a file of the host");
    });
}

#[test]
fn the_guard_refuses_what_a_program_has_no_business_doing() {
    let program = "import os, shutil, subprocess\nfor name, call in [('os.kill', lambda: os.kill(os.getpid(), 9)), \
                   ('os.remove', lambda: os.remove('program.py')), ('subprocess.run', lambda: subprocess.run(['true'])), \
                   ('shutil.rmtree', lambda: shutil.rmtree('.')), ('os.fork', os.fork), ('os._exit', lambda: os._exit(0)), \
                   ('os.chdir', lambda: os.chdir('/'))]:\n    try:\n        call()\n        print('ALLOWED', name)\n    \
                   except PermissionError:\n        print('REFUSED', name)\n";
    each(program, |exec| {
        assert_eq!(exec.outcome, Outcome::Passed, "stderr: {}", exec.stderr);
        assert_eq!(exec.stdout.matches("REFUSED").count(), 7, "{}", exec.stdout);
    });
    // passing means running to the end: an early exit, even with status 0, fails
    each("print('before')\nimport sys\nsys.exit(0)\nprint('after')\n", |exec| {
        assert_eq!(exec.stdout.trim(), "before");
        match &exec.outcome {
            Outcome::Failed { stderr_tail } => assert!(stderr_tail.contains("exited before its end"), "{stderr_tail}"),
            other => panic!("an early exit must fail, got {other:?}"),
        }
    });
}

/// (uid, gid, home) of `name` in /etc/passwd.
fn user(name: &str) -> Option<(u32, u32, PathBuf)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        (fields.len() >= 6 && fields[0] == name)
            .then(|| Some((fields[2].parse().ok()?, fields[3].parse().ok()?, PathBuf::from(fields[5]))))?
    })
}

#[test]
fn every_case_again_as_an_unprivileged_user() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    if !is_root() {
        eprintln!("SKIPPED: this is not root, so it cannot run the cases as another user (it may be that run)");
        return;
    }
    let (name, (uid, gid, home)) = match user("nctest") {
        Some(ids) => ("nctest", ids),
        None => ("nobody", user("nobody").expect("no user nctest or nobody to run the cases as")),
    };
    // the binary, where that user can read and run it
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let binary = dir.path().join("sandbox-test");
    std::fs::copy(std::env::current_exe().unwrap(), &binary).unwrap();
    std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o755)).unwrap();
    // a home the user owns (nobody's does not exist)
    let own_home = home.metadata().is_ok_and(|m| std::os::unix::fs::MetadataExt::uid(&m) == uid);
    let temp_home = dir.path().join("home");
    if !own_home {
        std::fs::create_dir(&temp_home).unwrap();
        std::os::unix::fs::chown(&temp_home, Some(uid), Some(gid)).unwrap();
    }
    let _guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let out = std::process::Command::new(&binary)
        .args(["--test-threads", "1"])
        .env("HOME", if own_home { &home } else { &temp_home })
        .env("USER", name)
        .env("TMPDIR", "/tmp")
        .uid(uid)
        .gid(gid)
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    eprintln!("--- the cases as {name} (uid {uid}) ---\n{stdout}\n{stderr}");
    assert!(out.status.success(), "the cases failed as {name}");
    assert!(stdout.contains("test result: ok"), "{stdout}");
}

/// Set in the environment of [`without_namespaces_a_user_is_refused_with_how_to_allow_them`]'s
/// child, which runs only `refusal_seen_from_inside`.
const REFUSAL_PROBE: &str = "NANOCHAT_SANDBOX_REFUSAL_PROBE";

/// The child side of the refusal test: in a user namespace that may create no further ones, as
/// a user other than root, the sandbox refuses. Does nothing outside that child.
#[test]
fn refusal_seen_from_inside() {
    if std::env::var_os(REFUSAL_PROBE).is_none() {
        return;
    }
    assert!(!is_root());
    let err = format!("{:#}", Sandbox::new(Limits::default()).expect_err("the sandbox must refuse"));
    println!("the refusal: {err}");
    assert!(err.contains("refusing to run untrusted code"), "{err}");
    assert!(err.contains("user.max_user_namespaces=0"), "the message shows the setting: {err}");
    assert!(err.contains("kernel.apparmor_restrict_unprivileged_userns"), "{err}");
}

#[test]
fn without_namespaces_a_user_is_refused_with_how_to_allow_them() {
    use std::os::unix::process::CommandExt;
    // this process's own uid, seen as 1234 inside a new user namespace whose limit of nested user
    // namespaces is 0: a user (not root) on a system that refuses them
    // SAFETY: getuid and getgid have no preconditions.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let (uid_map, gid_map) = (format!("1234 {uid} 1\n"), format!("1234 {gid} 1\n"));
    let mut command = std::process::Command::new(std::env::current_exe().unwrap());
    command.args(["--exact", "refusal_seen_from_inside", "--nocapture"]).env(REFUSAL_PROBE, "1");
    // SAFETY: the closure makes system calls only, on strings built before the fork.
    unsafe {
        command.pre_exec(move || {
            let write = |path: &std::ffi::CStr, data: &[u8]| {
                let fd = libc::open(path.as_ptr(), libc::O_WRONLY);
                let ok = fd >= 0 && libc::write(fd, data.as_ptr().cast(), data.len()) == data.len() as isize;
                libc::close(fd);
                if ok {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            };
            if libc::unshare(libc::CLONE_NEWUSER) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            write(c"/proc/self/setgroups", b"deny")?;
            write(c"/proc/self/uid_map", uid_map.as_bytes())?;
            write(c"/proc/self/gid_map", gid_map.as_bytes())?;
            write(c"/proc/sys/user/max_user_namespaces", b"0")
        });
    }
    let _guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let out = match command.output() {
        Ok(out) => out,
        Err(e) if std::env::var_os("NANOCHAT_REQUIRE_NAMESPACES").is_none() => {
            eprintln!("SKIPPED: cannot make a user namespace without nested ones here ({e})");
            return;
        }
        Err(e) => panic!("NANOCHAT_REQUIRE_NAMESPACES is set, but: {e}"),
    };
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    eprintln!("{stdout}");
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("1 passed"), "the probe did not run: {stdout}");
}
