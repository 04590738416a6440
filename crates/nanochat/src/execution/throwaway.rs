//! The fallback where namespaces are refused to root: the program runs as a throwaway user id,
//! and afterwards everything of that id goes: its processes (a `setsid` daemon included: it
//! cannot change its id) and its files in the shared temporary directories (the only places
//! outside its scratch directory it can write). A fresh id per run keeps runs apart: each counts
//! only its own processes against the process cap, and a cleanup by id touches nothing else.
//! Unlike namespaces it cannot hide the network or the world-readable files.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use super::filesystem::c_path;

/// Throwaway user ids are drawn from here (root only); a random one per run, so that runs count
/// their processes apart and a cleanup by id never touches anything else.
const THROWAWAY_IDS: std::ops::Range<u32> = 0x6e63_0000..0x6e64_0000;
/// Where a throwaway user may leave files on the host.
const SHARED_TEMP_DIRS: [&str; 3] = ["/tmp", "/var/tmp", "/dev/shm"];

/// A random throwaway (uid, gid) that no process uses now.
pub(super) fn throwaway_ids() -> Result<(u32, u32)> {
    for _ in 0..16 {
        let id = THROWAWAY_IDS.start + rand::random::<u32>() % (THROWAWAY_IDS.end - THROWAWAY_IDS.start);
        if processes_of(id).is_empty() {
            return Ok((id, id));
        }
    }
    bail!("every throwaway user id tried is in use by running processes: is another sandbox leaking?")
}

/// The pids of the processes whose real or effective user id is `uid`.
fn processes_of(uid: u32) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse().ok())
        .filter(|&pid| owned_by(pid, uid))
        .collect()
}

/// Whether the real or effective user id of process `pid` is `uid`.
fn owned_by(pid: i32, uid: u32) -> bool {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else { return false };
    let uid = uid.to_string();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .is_some_and(|ids| ids.split_whitespace().take(2).any(|id| id == uid))
}

/// Removes what a throwaway user left behind: its processes, then its files in the shared
/// temporary directories (it owns nothing else it could write) but `scratch`, which the run
/// removes itself.
pub(super) fn remove_leftovers(uid: u32, scratch: &Path) {
    for _ in 0..100 {
        let pids = processes_of(uid);
        if pids.is_empty() {
            break;
        }
        for pid in pids {
            kill_if_owned(pid, uid);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    for dir in SHARED_TEMP_DIRS {
        let Ok(entries) = std::fs::read_dir(dir) else { continue };
        for entry in entries.flatten() {
            let Ok(meta) = entry.path().symlink_metadata() else { continue };
            if meta.uid() == uid && entry.path() != scratch {
                let path = entry.path();
                let removed = if meta.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
                if let Err(e) = removed {
                    eprintln!("sandbox: could not remove {} left by a program: {e}", path.display());
                }
            }
        }
    }
}

/// Kills process `pid` if `uid` still owns it. Through a pidfd, which pins the process: a pid
/// recycled since it was listed is never signalled (kernels before 5.3: a plain `kill`).
fn kill_if_owned(pid: i32, uid: u32) {
    // SAFETY: pidfd_open takes a pid and flags, and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as libc::c_int;
    if fd < 0 {
        if std::io::Error::last_os_error().raw_os_error() == Some(libc::ENOSYS) && owned_by(pid, uid) {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        return;
    }
    let owned = owned_by(pid, uid);
    // SAFETY: fd is the pidfd opened above, closed right after; no siginfo is passed.
    unsafe {
        if owned {
            libc::syscall(libc::SYS_pidfd_send_signal, fd, libc::SIGKILL, std::ptr::null::<libc::c_void>(), 0);
        }
        libc::close(fd);
    }
}

pub(super) fn chown(path: &Path, uid: u32, gid: u32) -> Result<()> {
    let c_path = c_path(path)?;
    // SAFETY: c_path is a valid NUL-terminated string for the duration of the call.
    if unsafe { libc::chown(c_path.as_ptr(), uid, gid) } < 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("handing {} to the sandbox's user", path.display()));
    }
    Ok(())
}
