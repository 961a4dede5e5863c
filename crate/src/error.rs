//! One error type for the crate; each variant says which file or value failed.
use std::path::PathBuf;

/// Everything that can go wrong in `d2l`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or directory could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// libtorch refused an operation.
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    /// An image could not be encoded or decoded.
    #[error("image: {0}")]
    Image(#[from] image::ImageError),
    /// A download failed (HTTP error, refused or cut connection).
    #[error("downloading {url}: {msg}")]
    Download { url: String, msg: String },
    /// A downloaded file is not the file it should be; nothing was kept.
    #[error("{url}: expected {expected}, got {actual}; nothing was kept (check the URL or mirror, then retry)")]
    Checksum {
        url: String,
        expected: String,
        actual: String,
    },
    /// An archive is truncated or corrupt.
    #[error("{}: {msg}", path.display())]
    Archive { path: PathBuf, msg: String },
    /// An archive entry would be written outside the target folder (`../`, an absolute path, a link).
    #[error("{}: refusing entry {entry:?}: it would be written outside the target folder", archive.display())]
    UnsafeEntry { archive: PathBuf, entry: String },
    /// A weights file cannot be read or does not fit the model.
    #[error("{}: {msg}", path.display())]
    Weights { path: PathBuf, msg: String },
    /// A data set folder or one of its files cannot be used.
    #[error("{}: {msg}", path.display())]
    Dataset { path: PathBuf, msg: String },
    /// A figure could not be drawn.
    #[error("plot: {0}")]
    Plot(String),
    /// Training was stopped by Ctrl-C (or `d2l::train::request_stop`) between two steps.
    #[error("interrupted at epoch {epoch}, batch {batch}: the model holds the weights of the last finished step; nothing half-written was kept")]
    Interrupted { epoch: usize, batch: usize },
    /// The disk (or a quota, or a file-size limit) is full while writing `path`; the partial
    /// file was removed.
    #[error("{}: {source}: the disk is full; free space there (or point D2L_DATA_DIR, D2L_HOME or TORCH_HOME at a larger disk) and retry; nothing partial was kept", path.display())]
    DiskFull {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Checked before writing: what is to be written needs more room than the disk has.
    #[error("{}: needs {needed} bytes but only {available} are free there; free space (or point D2L_DATA_DIR, D2L_HOME or TORCH_HOME at a larger disk) and retry; nothing was kept", path.display())]
    NoSpace {
        path: PathBuf,
        needed: u64,
        available: u64,
    },
    /// An archive goes past a bound on extraction (an archive bomb, or a genuinely huge
    /// archive); nothing of it was kept.
    #[error("{}: refusing to extract{}: {what}; nothing was kept{}", archive.display(), entry.as_ref().map(|e| format!(" {e:?}")).unwrap_or_default(), setting.map(|s| format!(" (if the archive is genuine, set {s} higher)")).unwrap_or_default())]
    ExtractLimit {
        archive: PathBuf,
        /// The entry where the bound was crossed, if one.
        entry: Option<String>,
        /// Which bound and by how much.
        what: String,
        /// The environment variable that raises the bound, where raising it can help.
        setting: Option<&'static str>,
    },
    /// A file is not an archive this crate extracts (zip, tar.gz, tgz).
    #[error("{}: only zip and tar.gz archives can be extracted", path.display())]
    UnsupportedArchive { path: PathBuf },
    /// `download`/`download_extract` of a name that `DATA_HUB` does not have.
    #[error("{name:?} is not in DATA_HUB (it has {known:?}): add it with d2l::DATA_HUB.insert(name, url, sha1)")]
    UnknownDataset { name: String, known: Vec<String> },
    /// A settings profile that does not exist.
    #[error("unknown settings {name:?}: use book, offline or ci (D2L_PROFILE)")]
    UnknownProfile { name: String },
    /// An index past the end of a data set.
    #[error("index {index} is out of range for {len} images")]
    IndexOutOfRange { index: i64, len: usize },
    /// Data that could not be written or read as JSON.
    #[error("{what}: {source}")]
    Json {
        /// The file or value.
        what: String,
        source: serde_json::Error,
    },
    /// A worker thread panicked; the message names the work.
    #[error("{what}: a worker thread panicked")]
    Panicked { what: String },
    /// A data loader's workers could not deliver a batch.
    #[error("DataLoader: batch {batch}: {msg}")]
    Loader { batch: usize, msg: String },
    /// The operating system refused a request that has no file (a signal handler).
    #[error("{what}: {source}")]
    Os {
        what: &'static str,
        source: std::io::Error,
    },
    /// A collective or the rendezvous of distributed training failed (a rank stopped, the
    /// master is unreachable, a timeout); the message says what to check.
    #[error("{what}: {msg}")]
    Distributed { what: String, msg: String },
    /// This libtorch or machine cannot do what was asked.
    #[error("{what}")]
    Unsupported { what: String },
    /// An argument is outside what the function accepts; the message says what to pass instead.
    #[error("{function}: {msg}")]
    InvalidArgument { function: &'static str, msg: String },
}

/// `Result` with the crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// The exit status a command reports for this error: 130 (the shell's status for Ctrl-C)
    /// for [`Error::Interrupted`], 1 for the rest.
    pub fn exit_status(&self) -> u8 {
        match self {
            Error::Interrupted { .. } => 130,
            _ => 1,
        }
    }

    /// Wraps an I/O error with the path it happened on: a full disk, quota or file-size limit
    /// becomes [`Error::DiskFull`].
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        let path = path.into();
        if is_disk_full(&source) {
            Error::DiskFull { path, source }
        } else {
            Error::Io { path, source }
        }
    }

    /// An argument error of `function`.
    pub fn arg(function: &'static str, msg: impl Into<String>) -> Self {
        Error::InvalidArgument {
            function,
            msg: msg.into(),
        }
    }

    /// A JSON error about `what` (a file or a value).
    pub(crate) fn json(what: impl std::fmt::Display, source: serde_json::Error) -> Self {
        Error::Json {
            what: what.to_string(),
            source,
        }
    }
}

/// Whether an I/O error says the disk, a quota or the file-size limit is full.
pub(crate) fn is_disk_full(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EFBIG)
    )
}

/// Ends a command-line program: `Ok` is success; an error is printed on stderr as `error: ...`
/// (a stop by Ctrl-C as `stopped: ...`) with its [`Error::exit_status`].
///
/// ```no_run
/// fn run() -> d2l::Result<()> {
///     Ok(())
/// }
/// fn main() -> std::process::ExitCode {
///     d2l::exit_code(run())
/// }
/// ```
pub fn exit_code(result: Result<()>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            let what = match e {
                Error::Interrupted { .. } => "stopped",
                _ => "error",
            };
            eprintln!("{what}: {e}");
            std::process::ExitCode::from(e.exit_status())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stop_by_ctrl_c_exits_with_130_and_other_errors_with_1() {
        let stop = Error::Interrupted { epoch: 1, batch: 2 };
        assert_eq!(stop.exit_status(), 130);
        assert_eq!(Error::arg("f", "x").exit_status(), 1);
        assert_eq!(exit_code(Err(stop)), std::process::ExitCode::from(130));
        assert_eq!(exit_code(Ok(())), std::process::ExitCode::SUCCESS);
    }
}
