//! Transforms with MONAI's semantics, in MONAI's three families.
//!
//! * [`spatial`] holds [`Orientation`](spatial::Orientation), [`Spacing`](spatial::Spacing)
//!   and resampling onto any grid.
//! * [`intensity`] holds [`ScaleIntensityRange`](intensity::ScaleIntensityRange).
//! * [`croppad`] holds [`CropForeground`](croppad::CropForeground) and
//!   [`SpatialPad`](croppad::SpatialPad).
//!
//! Each transform is a small struct of options with an `apply` method that consumes or borrows
//! a [`Volume`](crate::Volume) and, where the transform is invertible, also returns what it did
//! so that [`PreprocessRecord`](crate::PreprocessRecord) can undo it.

pub mod croppad;
pub mod intensity;
pub mod spatial;
