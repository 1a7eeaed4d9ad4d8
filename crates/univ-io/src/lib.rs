#![doc = include_str!("../README.md")]
#![deny(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]
// Index loops read better than iterator chains in 3×3/4×4 matrix and grid code.
#![allow(clippy::needless_range_loop)]

pub mod atomic;
#[cfg(feature = "dicom")]
pub mod dicom;
#[cfg(feature = "dicom")]
pub mod dicom_seg;
#[cfg(feature = "dicom")]
mod dicom_structure;
pub mod error;
pub mod geometry;
pub mod input;
pub mod mask;
pub mod nii;
pub(crate) mod parallel;
pub mod png;
pub mod preprocess;
pub mod transforms;
pub mod volume;

pub use error::{Error, Result};
pub use geometry::Affine;
pub use input::{
    align_label_to, is_dicom, read_image_and_label_any, read_volume, read_volume_with,
};
pub use mask::ClassMask;
pub use nii::{
    Limits, NiftiInfo, NiftiWritable, ReadOptions, WriteOptions, read_header, read_image,
    read_image_and_label, read_label, write_nifti,
};
pub use preprocess::{PreprocessOptions, PreprocessRecord, Preprocessed, preprocess};
pub use transforms::croppad::{CropBox, CropForeground, SpatialPad};
pub use transforms::intensity::ScaleIntensityRange;
pub use transforms::spatial::{Interpolation, OrientTransform, Orientation, Spacing};
pub use volume::{NiftiGeometry, Volume, Voxel};
