//! The error type of `univ-io`.

use std::path::PathBuf;

/// Everything that can go wrong while reading, writing or transforming a volume.
///
/// Variants are grouped by fault: I/O, format, parameter, unsupported input and limits. Every
/// variant that concerns a file names it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    // ----- I/O -----
    /// The operating system refused an operation on a file.
    #[error("{path}: {source}")]
    Io {
        /// The file concerned.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    // ----- format -----
    /// The file is not a NIfTI-1 file, or its header is damaged.
    #[error("{path}: not a valid NIfTI-1 file: {reason}")]
    InvalidNifti {
        /// The file concerned.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The file ends before all voxels announced by the header were read, or its compressed
    /// stream is corrupt.
    #[error("{path}: truncated or corrupt file: {reason}")]
    Truncated {
        /// The file concerned.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A header field holds a value that cannot describe a volume.
    #[error("{path}: bad header field {field}: {reason}")]
    BadHeader {
        /// The file concerned.
        path: PathBuf,
        /// The header field (for example `pixdim[2]`).
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// Voxels are NaN or infinite.
    #[error("{path}: {count} voxel(s) are NaN or infinite (first at voxel {first:?})")]
    NonFinite {
        /// The file concerned (or a description of the volume).
        path: PathBuf,
        /// How many voxels are not finite.
        count: usize,
        /// The (i, j, k) index of the first one.
        first: [usize; 3],
    },
    /// A label map holds values that are not integers in 0..=255.
    #[error(
        "{path}: not a label map: voxel {index:?} holds {value}, expected an integer in 0..=255"
    )]
    InvalidLabel {
        /// The file concerned.
        path: PathBuf,
        /// The first offending voxel.
        index: [usize; 3],
        /// Its value.
        value: f64,
    },

    // ----- parameters -----
    /// Two volumes that must share a voxel grid do not.
    #[error("{label}: its grid differs from that of {image}: {reason}")]
    GridMismatch {
        /// The image.
        image: PathBuf,
        /// The label map (or second volume).
        label: PathBuf,
        /// Shapes or affines that differ.
        reason: String,
    },
    /// A parameter given to a transform or a writer is invalid.
    #[error("invalid parameter {name}: {reason}")]
    InvalidParameter {
        /// The parameter.
        name: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// An affine matrix is singular or not finite.
    #[error("{path}: degenerate affine: {reason}")]
    DegenerateAffine {
        /// The file concerned (or a description of the volume).
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Foreground cropping found no voxel above the threshold.
    #[error(
        "{path}: no foreground: no voxel is above the intensity window's lower bound; is this a CT?"
    )]
    EmptyForeground {
        /// The file concerned (or a description of the volume).
        path: PathBuf,
    },

    // ----- unsupported -----
    /// A DICOM file or series that cannot be read as one CT volume.
    #[error("{path}: {reason}")]
    Dicom {
        /// The file or folder.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A valid file that this crate does not handle (real 4-D data, complex voxels, ...).
    #[error("{path}: unsupported: {reason}")]
    Unsupported {
        /// The file concerned.
        path: PathBuf,
        /// What is not supported.
        reason: String,
    },

    // ----- limits -----
    /// The header announces more voxels or bytes than the configured [`Limits`](crate::Limits)
    /// allow, or than this machine can address.
    #[error("{path}: {what} ({requested}) exceeds the limit ({limit}); raise Limits to read it")]
    LimitExceeded {
        /// The file concerned.
        path: PathBuf,
        /// What was counted (voxels or bytes).
        what: &'static str,
        /// The amount requested by the header (`u128` so that overflowing products are exact).
        requested: u128,
        /// The configured limit.
        limit: u64,
    },
    /// A grid that would be made (resampling, padding, mapping back, inference buffers) is
    /// larger than the configured limits.
    #[error(
        "{what} of {shape:?} voxels ({voxels} voxels, {bytes} bytes) exceeds the limits \
         ({max_voxels} voxels, {max_alloc} bytes): use a coarser spacing or a smaller input, \
         or raise the limits (Limits; `--max-voxels` and `--max-memory-gb` on the command line)"
    )]
    GridTooLarge {
        /// The grid.
        what: String,
        /// Its shape.
        shape: [usize; 3],
        /// Its voxel count.
        voxels: u128,
        /// Its size in bytes.
        bytes: u128,
        /// The voxel limit.
        max_voxels: u64,
        /// The byte limit.
        max_alloc: u64,
    },
    /// Memory for the voxels could not be reserved.
    #[error("{path}: cannot allocate {bytes} bytes for the voxels")]
    OutOfMemory {
        /// The file concerned.
        path: PathBuf,
        /// Bytes requested.
        bytes: usize,
    },
}

/// `Result` with [`enum@Error`] as the default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn param(name: &'static str, reason: impl Into<String>) -> Self {
        Error::InvalidParameter {
            name,
            reason: reason.into(),
        }
    }
}
