//! The error type of `univ-clip`.

use std::path::PathBuf;

/// What can go wrong while tokenizing, loading weights or embedding.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An error from candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A file is missing or unreadable.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A prompt does not fit the context length.
    #[error(
        "prompt {prompt:?} needs {tokens} tokens with start and end, more than the context of \
         {context}; shorten it or enable truncation"
    )]
    PromptTooLong {
        /// The prompt.
        prompt: String,
        /// Its token count (with the start and end tokens).
        tokens: usize,
        /// The context length.
        context: usize,
    },
    /// The tokenizer failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A weight has the wrong shape or is missing.
    #[error("{path}: weights do not fit the configuration: {reason}")]
    Weights {
        /// The weight file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Invalid embeddings or arguments.
    #[error("{0}")]
    Invalid(String),
}

/// `Result` with [`enum@Error`] as the default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn file(path: impl Into<PathBuf>, reason: impl std::fmt::Display) -> Self {
        Error::File {
            path: path.into(),
            reason: reason.to_string(),
        }
    }
}
