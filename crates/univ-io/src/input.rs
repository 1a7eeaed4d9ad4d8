//! One entry point for CT input: a NIfTI file or (with the `dicom` feature) a DICOM series,
//! and a label map aligned onto the image's voxel axes.

use std::path::Path;

use crate::error::{Error, Result};
use crate::geometry;
use crate::nii::{ReadOptions, read_label};
use crate::transforms::spatial::OrientTransform;
use crate::volume::Volume;

/// Largest affine difference (mm) accepted when a label map from another source (say a NIfTI
/// made from a DICOM series) is aligned onto an image: NIfTI stores its affine in f32.
pub const ALIGN_TOLERANCE_MM: f64 = 1e-3;

/// `true` when `path` is DICOM input (a `.dcm` file, a file with the DICM marker, or a folder
/// of them).
pub fn is_dicom(path: &Path) -> bool {
    #[cfg(feature = "dicom")]
    {
        crate::dicom::is_dicom(path)
    }
    #[cfg(not(feature = "dicom"))]
    {
        let _ = path;
        false
    }
}

/// Reads a CT: a NIfTI file, or a DICOM series (a folder holding one series, or one file).
///
/// # Errors
/// The reader's errors; [`Error::Unsupported`] for DICOM input in a build without the `dicom`
/// feature.
pub fn read_volume(path: impl AsRef<Path>) -> Result<Volume<f32>> {
    read_volume_with(path, &crate::nii::Limits::default())
}

/// [`read_volume`] within `limits` (checked against the header before any voxel is read).
///
/// # Errors
/// As [`read_volume`].
pub fn read_volume_with(
    path: impl AsRef<Path>,
    limits: &crate::nii::Limits,
) -> Result<Volume<f32>> {
    let path = path.as_ref();
    // A folder is a DICOM series or nothing: its reader says what it found in it.
    if is_dicom(path) || path.is_dir() {
        #[cfg(feature = "dicom")]
        {
            let opts = crate::dicom::DicomReadOptions {
                limits: *limits,
                ..Default::default()
            };
            let s = crate::dicom::read_dicom_series(path, &opts)?;
            return Ok(s.volume);
        }
        #[cfg(not(feature = "dicom"))]
        return Err(Error::Unsupported {
            path: path.to_path_buf(),
            reason: "a folder (DICOM input needs the `dicom` feature)".into(),
        });
    }
    ReadOptions {
        limits: *limits,
        ..ReadOptions::default()
    }
    .read_image(path)
}

/// Puts a label map onto the image's grid when the two grids are the same up to the order and
/// direction of the voxel axes (a DICOM series and a NIfTI made from it, say): the label is
/// reoriented and takes the image's affine.
///
/// # Errors
/// [`Error::GridMismatch`] when the grids differ beyond [`ALIGN_TOLERANCE_MM`].
pub fn align_label_to<T: crate::volume::Voxel>(
    label: Volume<u8>,
    image: &Volume<T>,
) -> Result<Volume<u8>> {
    let mismatch = |label: &Volume<u8>, reason: String| Error::GridMismatch {
        image: image.name(),
        label: label.name(),
        reason,
    };
    let t = OrientTransform::to_axcodes(label.affine(), label.shape(), &image.axcodes())?;
    let name = label.source().map(Path::to_path_buf);
    let l = if t.is_identity() {
        label
    } else {
        t.apply(label)?
    };
    if l.shape() != image.shape() {
        return Err(mismatch(
            &l,
            format!(
                "shape {:?} (after reorienting) vs {:?}",
                l.shape(),
                image.shape()
            ),
        ));
    }
    let d = geometry::max_abs_diff(l.affine(), image.affine());
    if d > ALIGN_TOLERANCE_MM {
        return Err(mismatch(
            &l,
            format!("affines differ by up to {d:.3e} mm after reorienting"),
        ));
    }
    Ok(Volume::from_vec(l.into_data(), image.shape(), *image.affine())?.with_source(name))
}

/// Reads an image (NIfTI or DICOM) and its label map (NIfTI), aligned onto the image's grid.
///
/// # Errors
/// As [`read_volume`] and [`read_label`], plus [`Error::GridMismatch`].
pub fn read_image_and_label_any(
    image: impl AsRef<Path>,
    label: impl AsRef<Path>,
) -> Result<(Volume<f32>, Volume<u8>)> {
    let image = image.as_ref();
    if !is_dicom(image) {
        return crate::nii::read_image_and_label(image, label);
    }
    let img = read_volume(image)?;
    let lab = read_label(label)?;
    let lab = align_label_to(lab, &img)?;
    Ok((img, lab))
}
