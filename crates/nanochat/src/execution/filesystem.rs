//! What the program sees of the filesystem: a whitelist, prepared on the host before the fork
//! and built by the jail ([`RootFs`]).
//!
//! - read-only: `/usr`, `/etc` and the `/bin`, `/sbin`, `/lib*` directories (or the symlinks a
//!   merged-`/usr` system has there), plus the interpreter's own prefix when it lives elsewhere
//!   (a pyenv build, a virtualenv): what Python needs to start and import its standard library;
//! - `/dev/null`, `zero`, `full`, `random`, `urandom`, and the `/dev/fd` links;
//! - writable and private: `/tmp` (also the working directory and `HOME`), `/var/tmp` and
//!   `/dev/shm`, each a tmpfs capped at [`Limits::tmpfs_bytes`], gone with the program;
//! - a `/proc` of the program's own PID namespace.
//!
//! Nothing else exists inside: not the user's home, not the evaluator's files, not `/tmp` of the
//! host. Every bind is `nosuid`, and read-only binds keep the source mount's locked flags
//! (`noexec`, atime), which a user namespace may not clear.

use std::collections::BTreeSet;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::jail::{Bind, RootFs};
use super::Limits;

/// The system directories shown read-only, when they exist.
const SYSTEM_PATHS: [&str; 8] = ["/usr", "/etc", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"];
const DEVICES: [&str; 5] = ["/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom"];
const DEV_LINKS: [(&str, &str); 4] = [
    ("/proc/self/fd", "/dev/fd"),
    ("/proc/self/fd/0", "/dev/stdin"),
    ("/proc/self/fd/1", "/dev/stdout"),
    ("/proc/self/fd/2", "/dev/stderr"),
];
/// The private writable directories.
const WRITABLE: [&str; 3] = ["/tmp", "/var/tmp", "/dev/shm"];
/// The program's working directory and `HOME` inside.
pub(super) const WORKDIR: &str = "/tmp";
/// The root tmpfs holds only directories, links and empty mount points.
const ROOT_OPTIONS: &str = "size=1m,mode=0755";

/// The interpreter to run and the host directories it needs beyond the system ones.
#[derive(Debug, Clone)]
pub(super) struct Interpreter {
    /// The path to exec (the same inside and outside).
    pub path: PathBuf,
    /// (host directory, path inside) pairs to show read-only.
    pub dirs: Vec<(PathBuf, PathBuf)>,
}

impl Interpreter {
    /// The interpreter at `given`. A virtualenv's python is run as given (Python finds the
    /// environment from that path) with the environment's directory shown; any other is run by
    /// its real path. The real interpreter's prefix is shown when outside the system directories,
    /// unless that would show the user's home.
    pub(super) fn locate(given: &Path) -> Result<Interpreter> {
        let real = std::fs::canonicalize(given)
            .with_context(|| format!("{} does not exist: install python3 or set NANOCHAT_PYTHON", given.display()))?;
        let mut dirs = Vec::new();
        let venv = prefix(given).filter(|p| p.join("pyvenv.cfg").is_file());
        let path = match venv {
            Some(venv) => {
                let source = std::fs::canonicalize(&venv).with_context(|| format!("resolving {}", venv.display()))?;
                dirs.push((source, venv));
                given.to_path_buf()
            }
            None => real.clone(),
        };
        if let Some(prefix) = prefix(&real) {
            dirs.push((prefix.clone(), prefix));
        }
        dirs.retain(|(_, inside)| !SYSTEM_PATHS.iter().any(|system| inside.starts_with(system)));
        let home = std::env::var_os("HOME").map(PathBuf::from).filter(|h| h.is_absolute());
        for (_, inside) in &dirs {
            if inside == Path::new("/") || home.as_ref().is_some_and(|h| h.starts_with(inside)) {
                bail!(
                    "the interpreter {} lives in {}, which the sandbox would have to show to the program whole \
                     (your home directory with it): point NANOCHAT_PYTHON at an interpreter installed elsewhere \
                     (e.g. /usr/bin/python3, a pyenv version, a virtualenv)",
                    given.display(),
                    inside.display()
                );
            }
        }
        Ok(Interpreter { path, dirs })
    }
}

/// The installation prefix of an interpreter binary: the parent of its `bin` directory, else
/// its directory.
fn prefix(binary: &Path) -> Option<PathBuf> {
    let dir = binary.parent()?;
    let prefix = if dir.file_name().is_some_and(|n| n == "bin") { dir.parent()? } else { dir };
    Some(prefix.to_path_buf())
}

pub(super) fn c_path(path: &Path) -> Result<CString> {
    CString::new(path.as_os_str().as_bytes()).with_context(|| format!("{} contains a NUL byte", path.display()))
}

/// The private root for `program`, to be mounted on the empty host directory `stage`.
pub(super) fn root_fs(stage: &Path, interpreter: &Interpreter, limits: &Limits, program: &[u8]) -> Result<RootFs> {
    let inside = |path: &Path| stage.join(path.strip_prefix("/").unwrap_or(path));
    // every directory to create, with its parents (the set's order puts parents first)
    let mut dirs = BTreeSet::new();
    let mut add_dir = |path: &Path| {
        for ancestor in path.ancestors().filter(|a| *a != Path::new("/")) {
            dirs.insert(ancestor.to_path_buf());
        }
    };
    let (mut symlinks, mut binds) = (Vec::new(), Vec::new());
    let shown =
        SYSTEM_PATHS.iter().map(|p| (PathBuf::from(p), PathBuf::from(p))).chain(interpreter.dirs.iter().cloned());
    for (source, path) in shown {
        let meta = match std::fs::symlink_metadata(&source) {
            Ok(meta) => meta,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("inspecting {}", source.display())),
        };
        if meta.file_type().is_symlink() {
            let target =
                std::fs::read_link(&source).with_context(|| format!("reading the link {}", source.display()))?;
            add_dir(path.parent().unwrap_or(Path::new("/")));
            symlinks.push((c_path(&target)?, c_path(&inside(&path))?));
        } else if meta.is_dir() {
            add_dir(&path);
            let read_only = Some(read_only_flags(&source)?);
            binds.push(Bind { source: c_path(&source)?, target: c_path(&inside(&path))?, file: false, read_only });
        }
    }
    add_dir(Path::new("/dev"));
    for device in DEVICES.iter().map(Path::new).filter(|d| d.exists()) {
        binds.push(Bind { source: c_path(device)?, target: c_path(&inside(device))?, file: true, read_only: None });
    }
    for (target, link) in DEV_LINKS {
        symlinks.push((c_path(Path::new(target))?, c_path(&inside(Path::new(link)))?));
    }
    for dir in WRITABLE.iter().chain(&["/proc", "/.old"]) {
        add_dir(Path::new(dir));
    }
    let dirs = dirs.iter().map(|d| c_path(&inside(d))).collect::<Result<Vec<_>>>()?;
    let tmpfs = WRITABLE.iter().map(|d| c_path(&inside(Path::new(d)))).collect::<Result<Vec<_>>>()?;
    Ok(RootFs {
        stage: c_path(stage)?,
        root_options: CString::new(ROOT_OPTIONS)?,
        tmpfs_options: CString::new(format!("size={},mode=1777", limits.tmpfs_bytes))?,
        dirs,
        symlinks,
        tmpfs,
        binds,
        proc: c_path(&inside(Path::new("/proc")))?,
        program_path: c_path(&inside(&Path::new(WORKDIR).join("program.py")))?,
        program: program.to_vec(),
        old_root: c_path(&inside(Path::new("/.old")))?,
    })
}

/// The flags that remount a bind of `source` read-only, `nosuid` and `nodev`, keeping the flags
/// of the source's mount that a user namespace may not clear (`noexec`, the atime mode).
fn read_only_flags(source: &Path) -> Result<libc::c_ulong> {
    let path = c_path(source)?;
    // SAFETY: an all-zero statvfs is valid, and statvfs writes only into it.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: path is NUL-terminated and st valid for the duration of the call.
    if unsafe { libc::statvfs(path.as_ptr(), &mut st) } < 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("inspecting the mount of {}", source.display()));
    }
    let mut flags = libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV;
    let kept = [
        (libc::ST_NOEXEC, libc::MS_NOEXEC),
        (libc::ST_NOATIME, libc::MS_NOATIME),
        (libc::ST_NODIRATIME, libc::MS_NODIRATIME),
    ];
    for (st_flag, ms_flag) in kept {
        if st.f_flag & st_flag != 0 {
            flags |= ms_flag;
        }
    }
    // without an atime flag a remount means relatime: a strictatime source must say so
    if st.f_flag & (libc::ST_NOATIME | libc::ST_RELATIME) == 0 {
        flags |= libc::MS_STRICTATIME;
    }
    Ok(flags)
}
