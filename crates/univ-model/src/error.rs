//! The error type of `univ-model`.

use std::path::PathBuf;

/// What can go wrong while building, loading or running a model.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The work was cancelled through its [`Cancel`](crate::segment::Cancel) token.
    #[error("cancelled")]
    Cancelled,
    /// An error from candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// An error reading, preprocessing or mapping a volume (its source is univ-io's error).
    #[error(transparent)]
    Io(#[from] univ_io::Error),
    /// A tensor has the wrong shape for an operation.
    #[error("{op}: {reason}")]
    Shape {
        /// The operation.
        op: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// A checkpoint cannot be read or does not fit the model.
    #[error("{path}: {reason}")]
    Checkpoint {
        /// The checkpoint file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// An invalid configuration.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A size or count beyond a limit (the message names the limit and how to raise it).
    #[error("{0}")]
    Limit(String),
    /// NaN or infinite values where there must be none.
    #[error("{0}")]
    NonFinite(String),
}

/// `Result` with [`enum@Error`] as the default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn shape(op: &'static str, reason: impl Into<String>) -> Self {
        Error::Shape {
            op,
            reason: reason.into(),
        }
    }
}
