//! The HumanEval sandbox against hostile programs: each must end in the expected outcome within
//! its limits and leave the host as it was (no process left in its group, no scratch directory,
//! no parent environment seen, no network where a namespace is available).

use std::sync::Mutex;
use std::time::Duration;

use nanochat::execution::{Execution, Limits, Outcome, Sandbox};

/// One run at a time: a fork bomb fills the sandbox user's process cap, which concurrent runs share.
static SERIAL: Mutex<()> = Mutex::new(());

fn run_with(limits: Limits, program: &str) -> Execution {
    let _guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let exec = Sandbox::new(limits).unwrap().run(program).unwrap();
    assert!(!exec.scratch.exists(), "scratch directory {} left behind", exec.scratch.display());
    exec
}

fn run(program: &str) -> Execution {
    run_with(Limits::default(), program)
}

/// Live (not zombie) processes whose process group is `pgid`, read from /proc.
fn live_in_group(pgid: i32) -> Vec<i32> {
    let mut live = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        // fields after the parenthesised command name: state, ppid, pgrp, …
        let Some((_, rest)) = stat.rsplit_once(") ") else { continue };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if fields.get(2).and_then(|g| g.parse::<i32>().ok()) == Some(pgid) && fields[0] != "Z" {
            live.push(pid);
        }
    }
    live
}

#[test]
fn a_correct_program_passes_and_a_failing_assert_fails() {
    let ok = run("def add(a, b):\n    return a + b\n\nassert add(2, 3) == 5\nprint('fine')\n");
    assert_eq!(ok.outcome, Outcome::Passed, "stderr: {}", ok.stderr);
    assert_eq!(ok.stdout.trim(), "fine");

    let bad = run("def add(a, b):\n    return a - b\n\nassert add(2, 3) == 5, 'wrong sum'\n");
    match &bad.outcome {
        Outcome::Failed { stderr_tail } => assert!(stderr_tail.contains("AssertionError: wrong sum"), "{stderr_tail}"),
        other => panic!("expected a failure, got {other:?}"),
    }
}

#[test]
fn an_infinite_loop_times_out_and_its_group_is_gone() {
    let limits = Limits { timeout: Duration::from_millis(1500), cpu_seconds: 30, ..Limits::default() };
    let exec = run_with(limits, "while True:\n    pass\n");
    assert_eq!(exec.outcome, Outcome::Timeout);
    assert!(exec.duration < Duration::from_secs(3), "took {:?}", exec.duration);
    assert!(live_in_group(exec.process_group).is_empty(), "processes left in group {}", exec.process_group);
}

#[test]
fn the_cpu_limit_ends_a_busy_loop_before_the_wall_clock() {
    let limits = Limits { timeout: Duration::from_secs(20), cpu_seconds: 1, ..Limits::default() };
    let exec = run_with(limits, "while True:\n    pass\n");
    assert_eq!(exec.outcome, Outcome::Timeout);
    assert!(exec.duration < Duration::from_secs(10), "took {:?}", exec.duration);
}

#[test]
fn a_memory_hog_is_reported_as_memory_exceeded() {
    let limits = Limits { memory_bytes: 256 << 20, ..Limits::default() };
    let exec = run_with(limits, "hog = []\nwhile True:\n    hog.append(bytearray(1 << 20))\n");
    assert_eq!(exec.outcome, Outcome::MemoryExceeded, "stderr: {}", exec.stderr);
}

#[test]
fn a_fork_bomb_is_contained() {
    let limits = Limits { timeout: Duration::from_secs(2), max_processes: 16, ..Limits::default() };
    let program = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n";
    let exec = run_with(limits, program);
    assert_eq!(exec.outcome, Outcome::Timeout);
    assert!(exec.duration < Duration::from_secs(4), "took {:?}", exec.duration);
    // killed processes may linger as zombies until init reaps them; none may still run
    let mut live = live_in_group(exec.process_group);
    for _ in 0..50 {
        if live.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        live = live_in_group(exec.process_group);
    }
    assert!(live.is_empty(), "fork bomb survivors: {live:?}");
    // the host can still start processes
    assert!(std::process::Command::new("true").status().unwrap().success());
}

#[test]
fn the_process_cap_holds_and_children_left_behind_are_killed() {
    let limits = Limits { max_processes: 8, ..Limits::default() };
    let program = "import os, time\nn = 0\ntry:\n    while n < 100:\n        if os.fork() == 0:\n            \
                   time.sleep(60)\n            os._exit(0)\n        n += 1\nexcept OSError:\n    pass\nprint('FORKED', n)\n";
    let exec = run_with(limits, program);
    assert_eq!(exec.outcome, Outcome::Passed, "stderr: {}", exec.stderr);
    let forked: usize = exec.stdout.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!(forked < 8, "{forked} children under a cap of 8 processes");
    // the sleeping children outlived the program; the sandbox must have killed them
    std::thread::sleep(Duration::from_millis(200));
    assert!(live_in_group(exec.process_group).is_empty(), "sleepers left in group {}", exec.process_group);
}

#[test]
fn the_file_size_limit_stops_a_huge_write() {
    let limits = Limits { file_size_bytes: 1 << 20, ..Limits::default() };
    let program = "import os\ntry:\n    with open('big', 'wb') as f:\n        for _ in range(64):\n            \
                   f.write(b'x' * (1 << 20))\n            f.flush()\n    print('WROTE ALL')\nexcept OSError as e:\n    \
                   print('STOPPED', os.path.getsize('big'), e.errno)\n";
    let exec = run_with(limits, program);
    assert!(!exec.stdout.contains("WROTE ALL"), "stdout: {}", exec.stdout);
    let fields: Vec<&str> = exec.stdout.split_whitespace().collect();
    assert_eq!(fields.first(), Some(&"STOPPED"), "stdout: {} stderr: {}", exec.stdout, exec.stderr);
    let size: u64 = fields[1].parse().unwrap();
    assert!(size <= 1 << 20, "wrote {size} bytes past the 1 MiB limit");
    assert_eq!(fields[2], "27", "expected EFBIG (27, file too large)");
}

#[test]
fn the_parents_environment_is_not_visible_and_home_is_the_scratch_dir() {
    // cargo sets CARGO_* variables in the test's environment: the program must see none of them
    assert!(std::env::vars().any(|(k, _)| k.starts_with("CARGO")));
    let exec = run("import os, json\nprint(json.dumps(dict(os.environ)))\nprint(os.getcwd())\n");
    assert_eq!(exec.outcome, Outcome::Passed, "stderr: {}", exec.stderr);
    let mut lines = exec.stdout.lines();
    let env: serde_json::Map<String, serde_json::Value> = serde_json::from_str(lines.next().unwrap()).unwrap();
    let mut keys: Vec<&str> = env.keys().map(String::as_str).filter(|k| *k != "LC_CTYPE").collect();
    keys.sort_unstable();
    assert_eq!(keys, ["HOME", "LANG", "PATH"]);
    let cwd = lines.next().unwrap();
    assert_eq!(env["HOME"], cwd, "HOME must be the scratch directory the program runs in");
    assert_eq!(std::path::Path::new(cwd), exec.scratch);
}

#[test]
fn a_socket_to_localhost_fails_when_the_network_namespace_is_available() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let program = format!(
        "import socket\ns = socket.socket()\ns.settimeout(2)\ntry:\n    s.connect(('127.0.0.1', {port}))\n    \
         print('CONNECTED')\nexcept OSError as e:\n    print('BLOCKED', e)\n"
    );
    let exec = run(&program);
    assert_eq!(exec.outcome, Outcome::Passed, "stderr: {}", exec.stderr);
    if exec.network_isolated {
        assert!(exec.stdout.starts_with("BLOCKED"), "isolated, yet: {}", exec.stdout);
    } else {
        eprintln!("SKIPPED network assertion: unshare(CLONE_NEWUSER | CLONE_NEWNET) is not permitted here");
        // the report must be truthful: without a namespace the host's loopback is reachable
        assert!(exec.stdout.starts_with("CONNECTED"), "reported not isolated, yet: {}", exec.stdout);
    }
}

#[test]
fn writing_outside_the_scratch_directory_is_refused_when_privileges_are_dropped() {
    let outside = tempfile::tempdir().unwrap();
    let target = outside.path().join("escaped.txt");
    let program = format!("open({:?}, 'w').write('escaped')\n", target.display().to_string());
    let exec = run(&program);
    if exec.dropped_privileges {
        match &exec.outcome {
            Outcome::Failed { stderr_tail } => assert!(stderr_tail.contains("PermissionError"), "{stderr_tail}"),
            other => panic!("expected PermissionError, got {other:?}"),
        }
        assert!(!target.exists());
    } else {
        eprintln!("SKIPPED: not root, so the program runs as this user and may write where this user may");
    }
}
