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
    /// A value is outside what the function accepts; the message says what to pass instead.
    #[error("{0}")]
    Invalid(String),
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

    /// Wraps an I/O error with the path it happened on.
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
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
        assert_eq!(Error::Invalid("x".into()).exit_status(), 1);
        assert_eq!(exit_code(Err(stop)), std::process::ExitCode::from(130));
        assert_eq!(exit_code(Ok(())), std::process::ExitCode::SUCCESS);
    }
}
