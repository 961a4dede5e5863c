//! The one place for file safety: where the caches live, writing so that a reader never sees
//! half a file or folder, and locks so that processes sharing a cache take turns.
//!
//! Rules every writer in the crate follows:
//! - **Paths.** The caches are [`d2l_home`], [`torch_home`], [`data_dir`] and [`figures_dir`];
//!   each reads its environment variable here, and an empty value counts as unset.
//! - **Atomic writes.** A file is written to a temporary beside it, named
//!   `.<name>.<pid>.<random>.part`, synced, then renamed over the real name ([`write_atomically`],
//!   [`AtomicFile`]). A folder is made as `.<name>.<pid>.<random>.staging` and renamed into place
//!   ([`AtomicDir`]). A reader sees the old version or the new one; a killed writer leaves only
//!   a temporary, which is never taken for the real thing.
//! - **Locks.** A cache entry (a download, an extracted archive, a generated data set, a
//!   pre-trained model) is made while holding [`lock`] on it: an advisory `flock` on
//!   `.<name>.lock` beside it, which the kernel releases when its holder exits, even by `kill -9`.
//!   Others wait, then find the entry made.
//! - **Leftovers.** Whoever takes an entry's lock removes that entry's temporaries (their writers
//!   are gone: a live one would hold the lock); [`AtomicFile`] also removes its target's
//!   temporaries whose process is dead.
//! - **A full disk** (`ENOSPC`, a quota, a file-size limit) is [`Error::DiskFull`] naming the
//!   path, and the temporary is removed.
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The value of an environment variable, `None` when unset or empty (so that `VAR=` means "not
/// set" everywhere, as it does for the URL mirrors).
pub(crate) fn env_nonempty(var: &str) -> Option<String> {
    std::env::var(var).ok().filter(|v| !v.trim().is_empty())
}

fn env_path(var: &str) -> Option<PathBuf> {
    std::env::var_os(var)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// The user's cache folder: `$XDG_CACHE_HOME`, else `~/.cache`.
fn user_cache() -> Option<PathBuf> {
    env_path("XDG_CACHE_HOME").or_else(|| env_path("HOME").map(|h| h.join(".cache")))
}

/// The project's cache (`D2L_HOME`, else `$XDG_CACHE_HOME/d2l-rs`, else `~/.cache/d2l-rs`): the
/// stand-in's generated data and source models live under `chapter/` there.
pub fn d2l_home() -> PathBuf {
    env_path("D2L_HOME")
        .or_else(|| user_cache().map(|c| c.join("d2l-rs")))
        .unwrap_or_else(|| std::env::temp_dir().join("d2l-rs"))
}

/// torch.hub's cache: `$TORCH_HOME`, else `$XDG_CACHE_HOME/torch`, else `~/.cache/torch`.
pub fn torch_home() -> PathBuf {
    env_path("TORCH_HOME")
        .or_else(|| user_cache().map(|c| c.join("torch")))
        .unwrap_or_else(|| PathBuf::from(".cache/torch"))
}

/// The data cache: `D2L_DATA_DIR`, else `../data` as in the book.
pub fn data_dir() -> PathBuf {
    env_path("D2L_DATA_DIR").unwrap_or_else(|| PathBuf::from("../data"))
}

static FIGURES_DIR: std::sync::RwLock<Option<PathBuf>> = std::sync::RwLock::new(None);

/// Where `show` saves figures outside a notebook: the folder given to [`set_figures_dir`], else
/// `$D2L_FIGURES_DIR`, else `figures` in the working directory.
pub fn figures_dir() -> PathBuf {
    if let Some(dir) = FIGURES_DIR.read().ok().and_then(|d| d.clone()) {
        return dir;
    }
    env_path("D2L_FIGURES_DIR").unwrap_or_else(|| PathBuf::from("figures"))
}

/// Sets the folder `show` saves figures into outside a notebook.
pub fn set_figures_dir(dir: impl Into<PathBuf>) {
    if let Ok(mut d) = FIGURES_DIR.write() {
        *d = Some(dir.into());
    }
}

/// The folder `path` is in (`.` for a bare name), created if missing.
fn parent_dir(path: &Path) -> Result<PathBuf> {
    let dir = match path.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(dir) => dir.to_owned(),
        None => PathBuf::from("."),
    };
    fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    Ok(dir)
}

fn file_name(path: &Path) -> Result<String> {
    path.file_name()
        .and_then(|n| n.to_str())
        .map(str::to_owned)
        .ok_or_else(|| Error::InvalidArgument {
            function: "files",
            msg: format!("{} has no UTF-8 file name", path.display()),
        })
}

/// The two kinds of temporaries: files and folders.
const PART: &str = "part";
const STAGING: &str = "staging";

/// The prefix `.<name>.<pid>.` of this process's temporaries for `name`.
fn temp_prefix(name: &str) -> String {
    format!(".{name}.{}.", std::process::id())
}

/// A temporary of `kind` ([`PART`] or [`STAGING`]) for `target`, beside it:
/// `.<name>.<pid>.<random>.<kind>`, made by `make` (a file or a folder).
fn temporary<T>(
    target: &Path,
    kind: &str,
    make: impl FnOnce(&tempfile::Builder, &Path) -> std::io::Result<T>,
) -> Result<T> {
    let dir = parent_dir(target)?;
    let prefix = temp_prefix(&file_name(target)?);
    let suffix = format!(".{kind}");
    let mut builder = tempfile::Builder::new();
    builder.prefix(&prefix).suffix(&suffix).rand_bytes(8);
    make(&builder, &dir).map_err(|e| Error::io(&dir, e))
}

/// Whether process `pid` is alive (a zombie counts as alive until it is reaped).
fn process_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: signal 0 only checks that the process exists.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Removes the temporaries of `target` (`.<name>.<pid>.<random>.part|staging`) that a dead
/// process left; with `all`, those of live processes too (the caller holds the entry's lock, so
/// no one else can be writing them). Also removes the `.<name>.<random>.part` files of earlier
/// versions when `all`. Returns how many it removed.
pub(crate) fn remove_leftovers(target: &Path, all: bool) -> usize {
    let (Some(dir), Ok(name)) = (target.parent(), file_name(target)) else {
        return 0;
    };
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    let prefix = format!(".{name}.");
    let mut removed = 0;
    for entry in entries.flatten() {
        let file = entry.file_name();
        let Some(rest) = file.to_str().and_then(|f| f.strip_prefix(&prefix)) else {
            continue;
        };
        let parts: Vec<&str> = rest.split('.').collect();
        let dead = match parts[..] {
            [pid, random, kind]
                if (kind == PART || kind == STAGING)
                    && !random.is_empty()
                    && random.chars().all(|c| c.is_ascii_alphanumeric()) =>
            {
                match pid.parse::<u32>() {
                    Ok(pid) => all || !process_alive(pid),
                    Err(_) => false,
                }
            }
            // A download temporary of an earlier version (no process id in the name).
            [random, PART]
                if all
                    && random.len() == 6
                    && random.chars().all(|c| c.is_ascii_alphanumeric()) =>
            {
                true
            }
            _ => false,
        };
        if dead {
            let path = entry.path();
            let gone = if path.is_dir() {
                fs::remove_dir_all(&path)
            } else {
                fs::remove_file(&path)
            };
            if gone.is_ok() {
                removed += 1;
            }
        }
    }
    removed
}

/// A file being written under a temporary name beside `path`; [`commit`](AtomicFile::commit)
/// renames it into place. Dropped without a commit (an error, a panic), the temporary is removed.
pub(crate) struct AtomicFile {
    tmp: tempfile::NamedTempFile,
    path: PathBuf,
}

impl AtomicFile {
    /// Starts writing `path`; removes temporaries for it that dead processes left.
    pub(crate) fn create(path: &Path) -> Result<AtomicFile> {
        remove_leftovers(path, false);
        let tmp = temporary(path, PART, |b, dir| b.tempfile_in(dir))?;
        Ok(AtomicFile {
            tmp,
            path: path.to_owned(),
        })
    }

    /// The temporary's path (for writers that take a path).
    pub(crate) fn temp_path(&self) -> &Path {
        self.tmp.path()
    }

    /// The temporary, to write to.
    pub(crate) fn file(&mut self) -> &mut File {
        self.tmp.as_file_mut()
    }

    /// Writes all of `bytes`.
    pub(crate) fn write_all(&mut self, bytes: &[u8]) -> Result<()> {
        let path = self.tmp.path().to_owned();
        self.tmp
            .as_file_mut()
            .write_all(bytes)
            .map_err(|e| Error::io(path, e))
    }

    /// Syncs the temporary to disk and renames it over the real name.
    pub(crate) fn commit(self) -> Result<PathBuf> {
        self.tmp
            .as_file()
            .sync_all()
            .map_err(|e| Error::io(self.tmp.path(), e))?;
        let path = self.path;
        self.tmp
            .persist(&path)
            .map_err(|e| Error::io(&path, e.error))?;
        Ok(path)
    }
}

/// Writes `bytes` to `path` through an [`AtomicFile`]: a reader sees the old file or the new
/// one, never half of one, even if the process is killed.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut file = AtomicFile::create(path)?;
    file.write_all(bytes)?;
    file.commit().map(drop)
}

/// A folder being made under a temporary name beside `target`; [`commit`](AtomicDir::commit)
/// puts it in place of `target` (replacing an older one). Dropped without a commit, the
/// temporary folder is removed.
pub(crate) struct AtomicDir {
    staging: tempfile::TempDir,
    target: PathBuf,
}

impl AtomicDir {
    /// Starts making `target`. The caller holds [`lock`] on `target`.
    pub(crate) fn create(target: &Path) -> Result<AtomicDir> {
        let staging = temporary(target, STAGING, |b, dir| b.tempdir_in(dir))?;
        Ok(AtomicDir {
            staging,
            target: target.to_owned(),
        })
    }

    /// The temporary folder, to write into.
    pub(crate) fn path(&self) -> &Path {
        self.staging.path()
    }

    /// Puts the temporary folder (or its sub-folder `inner`) in place of the target.
    pub(crate) fn commit(self, inner: Option<&Path>) -> Result<PathBuf> {
        let from = match inner {
            Some(rel) => self.staging.path().join(rel),
            None => self.staging.path().to_owned(),
        };
        let target = self.target;
        if fs::symlink_metadata(&target).is_ok() {
            // Move the old one aside under a temporary name first: renaming onto a folder that
            // is not empty fails, and a kill between the steps leaves only temporaries.
            let old = temporary(&target, STAGING, |b, dir| b.tempdir_in(dir))?;
            let aside = old.path().join("old");
            fs::rename(&target, &aside).map_err(|e| Error::io(&target, e))?;
            fs::rename(&from, &target).map_err(|e| Error::io(&target, e))?;
            drop(old);
        } else {
            fs::rename(&from, &target).map_err(|e| Error::io(&target, e))?;
        }
        // What is left of the staging folder (nothing, or the shell around `inner`) goes.
        drop(self.staging);
        Ok(target)
    }
}

/// An exclusive lock on a cache entry, released when dropped or when the process exits.
#[derive(Debug)]
pub struct CacheLock {
    _file: File,
    path: PathBuf,
}

impl CacheLock {
    /// The lock file (`.<name>.lock` beside the entry).
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Takes the lock on the cache entry `target` (a file or folder that may not exist yet),
/// waiting for another process (or thread) that holds it, saying so once. Holding it, removes
/// the temporaries that a killed maker of `target` left.
pub fn lock(target: &Path) -> Result<CacheLock> {
    let dir = parent_dir(target)?;
    let path = dir.join(format!(".{}.lock", file_name(target)?));
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| Error::io(&path, e))?;
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    let flock = |op: libc::c_int| loop {
        // SAFETY: `fd` is an open file descriptor owned by `file`.
        if unsafe { libc::flock(fd, op) } == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    if let Err(e) = flock(libc::LOCK_EX | libc::LOCK_NB) {
        if e.kind() != std::io::ErrorKind::WouldBlock {
            return Err(Error::io(&path, e));
        }
        println!(
            "waiting: another process is making {} (it holds {})",
            target.display(),
            path.display()
        );
        flock(libc::LOCK_EX).map_err(|e| Error::io(&path, e))?;
    }
    remove_leftovers(target, true);
    Ok(CacheLock { _file: file, path })
}

/// Bytes free for this user on the file system holding `path` (which must exist).
pub(crate) fn available_bytes(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c` is a NUL-terminated path and `st` a buffer of the right type.
    let r = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if r != 0 {
        return None;
    }
    // SAFETY: statvfs succeeded, so it filled `st`.
    let st = unsafe { st.assume_init() };
    // The field types differ between platforms (u64 here, u32 on some).
    #[allow(clippy::unnecessary_cast)]
    Some((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leftovers_of_dead_processes_go_and_live_ones_stay() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("hotdog.zip");
        // Process ids above the kernel's maximum (4194304) are never alive.
        let dead = dir.path().join(".hotdog.zip.4194399.abcdefgh.part");
        let live = dir
            .path()
            .join(format!(".hotdog.zip.{}.abcdefgh.part", std::process::id()));
        let old = dir.path().join(".hotdog.zip.a1B2c3.part");
        let other = dir.path().join(".hotdog.4194399.abcdefgh.staging");
        for f in [&dead, &live, &old] {
            fs::write(f, b"x").unwrap();
        }
        fs::create_dir(&other).unwrap();
        assert_eq!(remove_leftovers(&target, false), 1);
        assert!(!dead.exists() && live.exists() && old.exists() && other.exists());
        assert_eq!(remove_leftovers(&target, true), 2);
        assert!(!live.exists() && !old.exists() && other.exists());
        assert_eq!(remove_leftovers(&dir.path().join("hotdog"), true), 1);
        assert!(!other.exists());
    }

    #[test]
    fn an_atomic_dir_replaces_a_full_folder() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("set");
        fs::create_dir_all(target.join("a")).unwrap();
        fs::write(target.join("a/old.txt"), b"old").unwrap();
        let made = AtomicDir::create(&target).unwrap();
        fs::create_dir_all(made.path().join("set/b")).unwrap();
        fs::write(made.path().join("set/b/new.txt"), b"new").unwrap();
        made.commit(Some(Path::new("set"))).unwrap();
        assert_eq!(fs::read(target.join("b/new.txt")).unwrap(), b"new");
        assert!(!target.join("a").exists());
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["set"]);
    }

    #[test]
    fn empty_variables_count_as_unset() {
        // Only this test touches D2L_FIGURES_DIR in the library's unit tests.
        std::env::set_var("D2L_FIGURES_DIR", "");
        assert_eq!(figures_dir(), PathBuf::from("figures"));
        std::env::remove_var("D2L_FIGURES_DIR");
    }
}
