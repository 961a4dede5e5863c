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
    /// A value is outside what the function accepts; the message says what to pass instead.
    #[error("{0}")]
    Invalid(String),
}

/// `Result` with the crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Wraps an I/O error with the path it happened on.
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
