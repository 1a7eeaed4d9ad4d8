//! # univ: the CLIP-Driven Universal Model in Rust
//!
//! univ segments CT scans into 25 abdominal organs and 6 tumour types (and the kidney cyst)
//! with the CLIP-Driven Universal Model (Liu et al., ICCV 2023). This façade re-exports the
//! layered crates and owns the whole job for one CT:
//!
//! * [`io`] ([`univ_io`]): NIfTI and DICOM volumes, the MONAI-faithful preprocessing and its
//!   inverse, DICOM-SEG, atomic writes.
//! * [`clip`] ([`univ_clip`]): the CLIP text encoder that embeds class prompts.
//! * [`model`] ([`univ_model`]): the class table, backbones, the text-driven head, sliding-window
//!   inference, post-processing, lesions.
//! * [`train`] ([`univ_train`]): partial-label training and the evaluation metrics.
//! * here: [`load_model`] (a path, `unet`/`swinunetr`, or the [`demo`] model),
//!   [`segment_case`] (input to written result folder), [`write_outputs`], the [`report`],
//!   the [`preview`], [`dicom_seg`] and [`evaluate`]; [`cohort`] for manifests of many CTs
//!   split between the tasks of a Slurm or Kubernetes job, resumed, and merged into one table.
//!
//! The `univ` command (the `cli` feature, on by default) is a thin layer over these:
//! `univ info`, `preprocess`, `segment`, `evaluate`, `train`, `inspect`, `embed`, `convert`
//! and `forward`. The library itself does not depend on its argument parser or allocator:
//! depend on `univ` with `default-features = false` to leave them out.
//!
//! ## Segment a CT in five lines
//! ```no_run
//! use univ::{OutputOptions, SegmentOptions, load_model, segment, write_outputs};
//!
//! let model = load_model(Some("unet"), &candle_core::Device::Cpu)?; // None: the demo model
//! let ct = univ::io::read_volume("ct.nii.gz")?;
//! let seg = segment(&ct, &model.model, &SegmentOptions::default(), |_, _| {})?;
//! println!("liver: {:.0} mL", seg.volume_ml("liver").unwrap_or(0.0));
//! write_outputs("out".as_ref(), &ct, &seg, &OutputOptions::default(), None)?;
//! # Ok::<(), univ::Error>(())
//! ```
//! or, reading the input and writing every output in one call,
//! `univ::segment_case("ct.nii.gz".as_ref(), "out".as_ref(), &model, &Default::default(),
//! |_| {})`.
//!
//! ## Feature flags
//! * `cli` (default): the `univ` binary (clap, anyhow, mimalloc).
//! * `download` (default): named official checkpoints are downloaded into the hf-hub cache.
//! * `cuda`: forwarded to every tensor crate (CPU-only by default).
#![deny(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod cohort;
pub mod demo;
pub mod dicom_seg;
pub mod error;
pub mod evaluate;
pub mod outputs;
pub mod pipeline;
pub mod preview;
pub mod report;

pub use univ_clip as clip;
pub use univ_io as io;
pub use univ_model as model;
pub use univ_train as train;

pub use error::{Error, Result};
pub use outputs::{OutputOptions, write_outputs};
pub use pipeline::{
    CaseInput, CaseOptions, CaseResult, CaseSummary, Event, LoadedModel, case_list, load_model,
    segment_case, segment_input,
};
pub use univ_model::segment::{ClassResult, SegmentOptions, Segmentation, segment};
pub use univ_model::{ClassInfo, ClassKind, ClassTable};

/// The names most programs need.
pub mod prelude {
    pub use crate::{
        CaseOptions, OutputOptions, SegmentOptions, Segmentation, load_model, segment,
        segment_case, write_outputs,
    };
    pub use univ_io::{
        Interpolation, PreprocessOptions, PreprocessRecord, Preprocessed, Volume, WriteOptions,
        preprocess, read_image, read_label, read_volume, write_nifti,
    };
}
