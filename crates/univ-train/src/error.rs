//! The error type of `univ-train`.

use std::path::PathBuf;

/// What can go wrong while assembling data or training.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An error from candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// An error from the model crate.
    #[error(transparent)]
    Model(#[from] univ_model::Error),
    /// An error reading or preprocessing a volume.
    #[error(transparent)]
    Volume(#[from] univ_io::Error),
    /// A file that cannot be read or written.
    #[error("{path}: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A manifest or training configuration that is invalid.
    #[error("{path}: {reason}")]
    Config {
        /// The configuration file (empty when built in code).
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A training case that cannot be used.
    #[error("case {case}: {reason}")]
    Case {
        /// The case (dataset and image path).
        case: String,
        /// What is wrong.
        reason: String,
    },
    /// A tensor of the wrong shape.
    #[error("{op}: {reason}")]
    Shape {
        /// The operation.
        op: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// A training checkpoint that cannot be resumed.
    #[error("{path}: {reason}")]
    Checkpoint {
        /// The checkpoint.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A distributed run that cannot start or go on: its environment, the connections
    /// between the ranks, NCCL.
    #[error("distributed training: {0}")]
    Distributed(String),
    /// The loss became NaN or infinite.
    #[error(
        "the loss is {value} at step {step}: training stopped (lower the learning rate or check the data)"
    )]
    Diverged {
        /// The optimiser step (1-based) whose loss was not finite.
        step: u64,
        /// The loss value.
        value: f32,
    },
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

    pub(crate) fn config(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Error::Config {
            path: path.into(),
            reason: reason.into(),
        }
    }

    pub(crate) fn case(case: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Case {
            case: case.into(),
            reason: reason.into(),
        }
    }

    pub(crate) fn file(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::File {
            path: path.into(),
            source,
        }
    }
}
