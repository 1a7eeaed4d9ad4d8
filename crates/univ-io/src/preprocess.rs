//! The Universal Model's inference preprocessing, recorded so that it can be undone.
//!
//! Order, as in the official MONAI pipeline (the validation transforms of the official
//! repository's `dataset/dataloader.py`): `Orientation(RAS)` →
//! `Spacing(1.5 mm; trilinear image, nearest label)` → `ScaleIntensityRange(−175..250 → 0..1,
//! clip)` → `CropForeground(image > 0)`. [`PreprocessRecord::invert`] maps a result in the
//! preprocessed frame back onto the input grid, like MONAI's `Invertd`: pad back what the crop
//! removed, resample to the oriented input grid, undo the orientation.

use std::path::PathBuf;

use crate::error::{Error, Result};
use crate::geometry::{self, Affine};
use crate::transforms::croppad::{self, CropBox, CropForeground};
use crate::transforms::intensity::ScaleIntensityRange;
use crate::transforms::spatial::{self, Interpolation, OrientTransform};
use crate::volume::{NiftiGeometry, Volume, Voxel};

/// Settings of [`preprocess`]; [`Default`] gives the official ones.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PreprocessOptions {
    /// Target orientation codes (`"RAS"`).
    pub axcodes: String,
    /// Target voxel size in mm (`[1.5, 1.5, 1.5]`).
    pub pixdim: [f64; 3],
    /// Interpolation of the image (trilinear).
    pub image_interp: Interpolation,
    /// Interpolation of the label map (nearest).
    pub label_interp: Interpolation,
    /// Intensity window (−175..250 HU → 0..1, clipped); `None` keeps raw values.
    pub intensity: Option<ScaleIntensityRange>,
    /// Foreground crop on the scaled image (`> 0`, margin 0); `None` keeps the whole grid.
    pub crop: Option<CropForeground>,
    /// Limits on the grids made (the resampled grid, the grids of the inverse mapping).
    #[serde(default)]
    pub limits: crate::nii::Limits,
}

impl Default for PreprocessOptions {
    fn default() -> Self {
        PreprocessOptions {
            axcodes: "RAS".to_string(),
            pixdim: [1.5; 3],
            image_interp: Interpolation::Linear,
            label_interp: Interpolation::Nearest,
            intensity: Some(ScaleIntensityRange::universal_model()),
            crop: Some(CropForeground::default()),
            limits: crate::nii::Limits::default(),
        }
    }
}

impl PreprocessOptions {
    /// The official settings.
    pub fn universal_model() -> Self {
        Self::default()
    }
}

/// Everything [`preprocess`] did, enough to map results back onto the input grid.
/// Serialisable (JSON) so that it can travel with a preprocessed file.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PreprocessRecord {
    /// The input file, when known.
    pub input_path: Option<PathBuf>,
    /// Input grid shape.
    pub input_shape: [usize; 3],
    /// Input affine.
    pub input_affine: Affine,
    /// Input orientation codes.
    pub input_axcodes: String,
    /// The input file's NIfTI geometry fields, written back verbatim on inversion.
    pub input_nifti: Option<NiftiGeometry>,
    /// The reorientation.
    pub orientation: OrientTransform,
    /// Affine after reorientation.
    pub oriented_affine: Affine,
    /// Grid after resampling (before the crop).
    pub resampled_shape: [usize; 3],
    /// Affine after resampling.
    pub resampled_affine: Affine,
    /// Foreground box in the resampled grid, when cropped.
    pub crop: Option<CropBox>,
    /// Output grid shape.
    pub output_shape: [usize; 3],
    /// Output affine (the crop moves the origin to the box's first voxel).
    pub output_affine: Affine,
    /// The settings used.
    pub options: PreprocessOptions,
}

/// A preprocessed image, its label map if one was given, and the record.
#[derive(Debug, Clone)]
pub struct Preprocessed {
    /// The image: oriented, resampled, scaled, cropped.
    pub image: Volume<f32>,
    /// The label map on the same grid.
    pub label: Option<Volume<u8>>,
    /// What was done.
    pub record: PreprocessRecord,
}

/// Runs the preprocessing of the Universal Model (see the module docs) on an image and,
/// optionally, its label map.
///
/// # Errors
/// [`Error::GridMismatch`] when the label's grid differs from the image's;
/// [`Error::NonFinite`] for NaN voxels; [`Error::EmptyForeground`] when cropping finds nothing;
/// parameter errors for bad options.
pub fn preprocess(
    image: Volume<f32>,
    label: Option<Volume<u8>>,
    opts: &PreprocessOptions,
) -> Result<Preprocessed> {
    image.check_finite()?;
    if let Some(l) = &label {
        image.check_same_grid(l)?;
    }
    if let Some(w) = &opts.intensity {
        w.validate()?;
    }
    let input_shape = image.shape();
    let input_affine = *image.affine();
    let input_nifti = image.nifti_geometry().copied();
    let input_path = image.source().map(PathBuf::from);

    let orientation = OrientTransform::to_axcodes(&input_affine, input_shape, &opts.axcodes)?;
    let image = orientation.apply(image)?;
    let label = label.map(|l| orientation.apply(l)).transpose()?;
    let oriented_affine = *image.affine();

    let (resampled_shape, resampled_affine) =
        spatial::spacing_grid(image.shape(), image.affine(), opts.pixdim)?;
    // The resampled image (f32), and its label (u8) when there is one.
    let per_voxel = 4 + usize::from(label.is_some());
    opts.limits
        .check_grid("the resampled grid", resampled_shape, per_voxel)?;
    let mut image = spatial::resample_to_grid(
        &image,
        resampled_shape,
        &resampled_affine,
        opts.image_interp,
    )?;
    let mut label = label
        .map(|l| {
            spatial::resample_to_grid(&l, resampled_shape, &resampled_affine, opts.label_interp)
        })
        .transpose()?;

    if let Some(w) = &opts.intensity {
        image = w.apply(image)?;
    }

    let mut crop = None;
    if let Some(c) = &opts.crop {
        let b = c
            .compute_box(&image)
            .ok_or_else(|| Error::EmptyForeground { path: image.name() })?;
        image = croppad::crop(&image, &b)?;
        label = label.map(|l| croppad::crop(&l, &b)).transpose()?;
        crop = Some(b);
    }

    let record = PreprocessRecord {
        input_path,
        input_shape,
        input_axcodes: geometry::axcodes(&input_affine),
        input_affine,
        input_nifti,
        orientation,
        oriented_affine,
        resampled_shape,
        resampled_affine,
        crop,
        output_shape: image.shape(),
        output_affine: *image.affine(),
        options: opts.clone(),
    };
    Ok(Preprocessed {
        image,
        label,
        record,
    })
}

impl PreprocessRecord {
    /// Maps a volume on the preprocessed grid back onto the input grid, like MONAI's `Invertd`:
    /// the crop is undone by padding with `T::default()` (0), the grid is resampled back to the
    /// oriented input grid with `interp` (nearest for labels), and the orientation is undone.
    /// The result carries the input's affine and NIfTI geometry exactly.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] when the volume is not on the output grid.
    pub fn invert<T: Voxel>(&self, vol: &Volume<T>, interp: Interpolation) -> Result<Volume<T>> {
        let bytes = std::mem::size_of::<T>();
        let limits = &self.options.limits;
        limits.check_grid(
            "the resampled grid of the inverse",
            self.resampled_shape,
            bytes,
        )?;
        limits.check_grid("the input grid of the inverse", self.input_shape, bytes)?;
        if vol.shape() != self.output_shape {
            return Err(Error::param(
                "volume",
                format!(
                    "shape {:?} is not the preprocessed shape {:?}",
                    vol.shape(),
                    self.output_shape
                ),
            ));
        }
        let on_output = Volume::from_parts(
            vol.data().to_vec(),
            self.output_shape,
            self.output_affine,
            None,
            vol.source().map(Into::into),
        );
        let full = match &self.crop {
            Some(b) => croppad::pad(&on_output, b.start, self.resampled_shape, T::default())?,
            None => on_output,
        };
        let full = Volume::from_parts(
            full.into_data(),
            self.resampled_shape,
            self.resampled_affine,
            None,
            vol.source().map(Into::into),
        );
        let oriented = spatial::resample_to_grid(
            &full,
            self.orientation.out_shape(),
            &self.oriented_affine,
            interp,
        )?;
        let back = self.orientation.inverse().apply(oriented)?;
        Ok(Volume::from_parts(
            back.into_data(),
            self.input_shape,
            self.input_affine,
            self.input_nifti,
            self.input_path.clone(),
        ))
    }
}
