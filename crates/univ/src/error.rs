//! The error type of the `univ` library: each layer's error as its source, and the errors of
//! the pipeline itself (inputs, outputs, the demo model).

use std::path::PathBuf;

/// What can go wrong in the façade's pipeline.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Reading, preprocessing or writing a volume.
    #[error(transparent)]
    Io(Box<univ_io::Error>),
    /// Loading or running the model.
    #[error(transparent)]
    Model(Box<univ_model::Error>),
    /// The CLIP text encoder or an embedding file.
    #[error(transparent)]
    Clip(Box<univ_clip::Error>),
    /// Training.
    #[error(transparent)]
    Train(Box<univ_train::Error>),
    /// An input that cannot be used as given.
    #[error("{path}: {reason}")]
    Input {
        /// The input.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The output location is taken, or cannot be written.
    #[error("{path}: {reason}")]
    Output {
        /// The output file or folder.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A cohort manifest that cannot be used: every problem found, with its line.
    #[error("{path}: {}", crate::cohort::list_problems(problems))]
    Manifest {
        /// The manifest.
        path: PathBuf,
        /// What is wrong, one entry per problem.
        problems: Vec<String>,
    },
    /// No demo model was found.
    #[error(
        "the demo model {file} was not found; looked in: {}. Set UNIV_DEMO_MODEL to its path, \
         copy it beside the univ binary, or pass --checkpoint (`unet`, `swinunetr` or a file)",
        looked.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
    )]
    DemoNotFound {
        /// The file name looked for.
        file: &'static str,
        /// Every place looked in, in order.
        looked: Vec<PathBuf>,
    },
}

// The layers' errors are boxed: they are large, and a `Result` should stay small.
macro_rules! from_boxed {
    ($($variant:ident($t:ty)),*) => {$(
        impl From<$t> for Error {
            fn from(e: $t) -> Self {
                Error::$variant(Box::new(e))
            }
        }
    )*};
}
from_boxed!(
    Io(univ_io::Error),
    Model(univ_model::Error),
    Clip(univ_clip::Error),
    Train(univ_train::Error)
);

/// `Result` with [`enum@Error`] as the default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The message with its causes, each cause once: `a: b: c` (what the command line prints,
    /// for logs and other languages' exceptions).
    pub fn full_message(&self) -> String {
        let mut text = self.to_string();
        let mut src = std::error::Error::source(self);
        while let Some(s) = src {
            let t = s.to_string();
            if !text.contains(&t) {
                text.push_str(": ");
                text.push_str(&t);
            }
            src = s.source();
        }
        text
    }

    pub(crate) fn output(path: impl Into<PathBuf>, reason: impl ToString) -> Self {
        Error::Output {
            path: path.into(),
            reason: reason.to_string(),
        }
    }

    pub(crate) fn input(path: impl Into<PathBuf>, reason: impl ToString) -> Self {
        Error::Input {
            path: path.into(),
            reason: reason.to_string(),
        }
    }
}
