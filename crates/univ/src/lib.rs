//! # univ: the CLIP-Driven Universal Model in Rust
//!
//! univ segments CT scans into 25 abdominal organs and 6 tumour types with the CLIP-Driven
//! Universal Model (Liu et al., ICCV 2023). This façade re-exports the layered crates:
//!
//! * [`io`] ([`univ_io`]): NIfTI volumes and the MONAI-faithful preprocessing, with its inverse.
//! * [`clip`] ([`univ_clip`]): the CLIP text encoder that embeds class prompts (issue #3).
//! * [`model`] ([`univ_model`]): backbones, the text-driven head, inference (issues #4, #5).
//! * [`train`] ([`univ_train`]): partial-label training (issue #6).
//!
//! The `univ` command-line program lives in this crate (`univ info`, `univ preprocess`).
//!
//! ## Feature flags
//! * `cuda`: forwarded to every tensor crate (CPU-only by default).
//!
//! ## Basic use
//! ```no_run
//! use univ::prelude::*;
//!
//! let ct = read_image("ct.nii.gz")?;
//! let pre = preprocess(ct, None, &PreprocessOptions::universal_model())?;
//! println!("network input: {:?} voxels", pre.image.shape());
//! # Ok::<(), univ::io::Error>(())
//! ```
#![deny(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod dicom_seg;
pub mod evaluate;
pub mod outputs;
pub mod preview;

pub use univ_clip as clip;
pub use univ_io as io;
pub use univ_model as model;
pub use univ_train as train;

pub use univ_model::segment::{SegmentOptions, Segmentation, segment};

/// The names most programs need.
pub mod prelude {
    pub use univ_io::{
        Interpolation, PreprocessOptions, PreprocessRecord, Preprocessed, Volume, WriteOptions,
        preprocess, read_image, read_label, write_nifti,
    };
}
