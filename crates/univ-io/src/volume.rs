//! The [`Volume`] type: a 3-D voxel array with its geometry.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::geometry::{self, Affine};

/// A voxel element type that volumes can hold.
///
/// Conversions go through `f64`, which represents every supported type exactly.
pub trait Voxel:
    Copy + Default + PartialEq + PartialOrd + Send + Sync + std::fmt::Debug + 'static
{
    /// A short name of the type (`"f32"`, `"u8"`, ...).
    const NAME: &'static str;
    /// Widens to `f64`.
    fn to_f64(self) -> f64;
    /// Narrows from `f64`: floats convert with rounding to the nearest representable value;
    /// integer types round half to even and saturate at their range.
    fn from_f64(v: f64) -> Self;
}

impl Voxel for f32 {
    const NAME: &'static str = "f32";
    fn to_f64(self) -> f64 {
        f64::from(self)
    }
    fn from_f64(v: f64) -> Self {
        v as f32
    }
}

impl Voxel for f64 {
    const NAME: &'static str = "f64";
    fn to_f64(self) -> f64 {
        self
    }
    fn from_f64(v: f64) -> Self {
        v
    }
}

macro_rules! int_voxel {
    ($t:ty, $name:literal) => {
        impl Voxel for $t {
            const NAME: &'static str = $name;
            fn to_f64(self) -> f64 {
                self as f64
            }
            fn from_f64(v: f64) -> Self {
                // `as` saturates and maps NaN to 0.
                v.round_ties_even() as $t
            }
        }
    };
}
int_voxel!(u8, "u8");
int_voxel!(i8, "i8");
int_voxel!(u16, "u16");
int_voxel!(i16, "i16");
int_voxel!(u32, "u32");
int_voxel!(i32, "i32");

/// The exact geometry fields of the NIfTI header a volume was read from.
///
/// A volume keeps them while its voxel grid is unchanged, so that writing it back reproduces the
/// sform and qform of the source file bit for bit (codes, quaternion, offsets, `pixdim`,
/// units); a transform that changes the grid drops them.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct NiftiGeometry {
    /// `qform_code`.
    pub qform_code: i16,
    /// `sform_code`.
    pub sform_code: i16,
    /// `pixdim[0..8]`.
    pub pixdim: [f32; 8],
    /// `quatern_b, c, d`.
    pub quatern: [f32; 3],
    /// `qoffset_x, y, z`.
    pub qoffset: [f32; 3],
    /// `srow_x`, `srow_y`, `srow_z`.
    pub srow: [[f32; 4]; 3],
    /// `xyzt_units`.
    pub xyzt_units: u8,
}

/// A 3-D voxel array with its voxel-to-world affine.
///
/// # Memory order and axes
/// Voxels are stored in one `Vec<T>` in **Fortran (column-major) order**, the order of a NIfTI
/// file: the first axis is fastest. The array is indexed `(X, Y, Z)` = the NIfTI voxel axes
/// `(i, j, k)`, and the element at `(i, j, k)` is `data[i + nx·(j + ny·k)]`. The same buffer
/// viewed as a C-order `(D, H, W) = (Z, Y, X)` array (a candle tensor, say) needs no copy.
///
/// # Geometry
/// [`affine`](Self::affine) maps `(i, j, k, 1)` to RAS+ world millimetres. For a volume read
/// from NIfTI it is the sform when `sform_code > 0`, else the qform when `qform_code > 0`, else
/// nibabel's fallback built from `pixdim` (x flipped, centred). Spacing and orientation codes
/// are derived from the affine.
#[derive(Debug, Clone, PartialEq)]
pub struct Volume<T = f32> {
    data: Vec<T>,
    shape: [usize; 3],
    affine: Affine,
    nifti: Option<NiftiGeometry>,
    source: Option<PathBuf>,
}

impl<T: Voxel> Volume<T> {
    /// Builds a volume from voxels in Fortran order (see the type's docs).
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] when `data.len()` is not the product of `shape`, a side is 0,
    /// or the affine is singular or not finite.
    pub fn from_vec(data: Vec<T>, shape: [usize; 3], affine: Affine) -> Result<Self> {
        let n = shape
            .iter()
            .try_fold(1usize, |acc, &s| acc.checked_mul(s))
            .ok_or_else(|| Error::param("shape", format!("{shape:?} overflows")))?;
        if shape.contains(&0) {
            return Err(Error::param(
                "shape",
                format!("{shape:?} has an empty side"),
            ));
        }
        if data.len() != n {
            return Err(Error::param(
                "data",
                format!(
                    "{} voxels given for shape {shape:?} ({n} voxels)",
                    data.len()
                ),
            ));
        }
        check_affine(&affine, Path::new("<volume>"))?;
        Ok(Volume {
            data,
            shape,
            affine,
            nifti: None,
            source: None,
        })
    }

    /// A volume of `shape` filled with `value`.
    ///
    /// # Errors
    /// As [`from_vec`](Self::from_vec).
    pub fn filled(value: T, shape: [usize; 3], affine: Affine) -> Result<Self> {
        let n = shape
            .iter()
            .try_fold(1usize, |acc, &s| acc.checked_mul(s))
            .ok_or_else(|| Error::param("shape", format!("{shape:?} overflows")))?;
        Self::from_vec(vec![value; n], shape, affine)
    }

    /// The voxels in Fortran order.
    pub fn data(&self) -> &[T] {
        &self.data
    }

    /// The voxels in Fortran order, mutable.
    pub fn data_mut(&mut self) -> &mut [T] {
        &mut self.data
    }

    /// Takes the voxels out.
    pub fn into_data(self) -> Vec<T> {
        self.data
    }

    /// `(nx, ny, nz)`.
    pub fn shape(&self) -> [usize; 3] {
        self.shape
    }

    /// Number of voxels.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// Always `false`: a volume has at least one voxel.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// The voxel-to-world affine (RAS+, mm).
    pub fn affine(&self) -> &Affine {
        &self.affine
    }

    /// Voxel sizes in mm (column norms of the affine).
    pub fn spacing(&self) -> [f64; 3] {
        geometry::spacing(&self.affine)
    }

    /// Orientation codes such as `"RAS"` (nibabel's `aff2axcodes`).
    pub fn axcodes(&self) -> String {
        geometry::axcodes(&self.affine)
    }

    /// The NIfTI geometry fields of the file this grid came from, if any.
    pub fn nifti_geometry(&self) -> Option<&NiftiGeometry> {
        self.nifti.as_ref()
    }

    /// Attaches NIfTI geometry fields to write verbatim (used when a result is mapped back onto
    /// the grid of a file).
    pub fn with_nifti_geometry(mut self, g: Option<NiftiGeometry>) -> Self {
        self.nifti = g;
        self
    }

    /// The file this volume was read from, if any.
    pub fn source(&self) -> Option<&Path> {
        self.source.as_deref()
    }

    /// Sets the file name used in error messages.
    pub fn with_source(mut self, p: Option<PathBuf>) -> Self {
        self.source = p;
        self
    }

    /// A name for error messages: the source file, or `<memory>`.
    pub fn name(&self) -> PathBuf {
        self.source
            .clone()
            .unwrap_or_else(|| PathBuf::from("<memory>"))
    }

    /// Linear index of `(i, j, k)`.
    #[inline]
    pub fn index(&self, ijk: [usize; 3]) -> usize {
        ijk[0] + self.shape[0] * (ijk[1] + self.shape[1] * ijk[2])
    }

    /// `(i, j, k)` of a linear index.
    #[inline]
    pub fn unravel(&self, idx: usize) -> [usize; 3] {
        let i = idx % self.shape[0];
        let r = idx / self.shape[0];
        [i, r % self.shape[1], r / self.shape[1]]
    }

    /// The voxel at `(i, j, k)`.
    ///
    /// # Panics
    /// When the index is out of bounds.
    pub fn get(&self, ijk: [usize; 3]) -> T {
        assert!(
            ijk.iter().zip(self.shape).all(|(a, s)| *a < s),
            "index {ijk:?} out of bounds for shape {:?}",
            self.shape
        );
        self.data[self.index(ijk)]
    }

    /// An ndarray view indexed `(X, Y, Z)`.
    pub fn view(&self) -> ndarray::ArrayView3<'_, T> {
        use ndarray::ShapeBuilder;
        ndarray::ArrayView3::from_shape(self.shape.f(), &self.data)
            .expect("shape and length are checked at construction")
    }

    /// A new volume with other voxels on the same grid (the geometry and source are kept).
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] when the length differs.
    pub fn with_data<U: Voxel>(&self, data: Vec<U>) -> Result<Volume<U>> {
        if data.len() != self.data.len() {
            return Err(Error::param(
                "data",
                format!("{} voxels for a grid of {}", data.len(), self.data.len()),
            ));
        }
        Ok(Volume {
            data,
            shape: self.shape,
            affine: self.affine,
            nifti: self.nifti,
            source: self.source.clone(),
        })
    }

    /// Converts every voxel with [`Voxel::from_f64`].
    pub fn map<U: Voxel>(&self, f: impl Fn(T) -> U) -> Volume<U> {
        self.with_data(self.data.iter().map(|v| f(*v)).collect())
            .expect("same length")
    }

    /// Minimum and maximum voxel value (as `f64`).
    pub fn min_max(&self) -> (f64, f64) {
        self.data
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
                let v = v.to_f64();
                (lo.min(v), hi.max(v))
            })
    }

    /// Checks that `other` lies on the same voxel grid (same shape, affines within `1e-4` mm).
    ///
    /// # Errors
    /// [`Error::GridMismatch`] naming both volumes.
    pub fn check_same_grid<U: Voxel>(&self, other: &Volume<U>) -> Result<()> {
        let reason = grid_difference(other.shape, &other.affine, self.shape, &self.affine);
        match reason {
            None => Ok(()),
            Some(reason) => Err(Error::GridMismatch {
                image: self.name(),
                label: other.name(),
                reason,
            }),
        }
    }

    pub(crate) fn from_parts(
        data: Vec<T>,
        shape: [usize; 3],
        affine: Affine,
        nifti: Option<NiftiGeometry>,
        source: Option<PathBuf>,
    ) -> Self {
        debug_assert_eq!(data.len(), shape.iter().product::<usize>());
        Volume {
            data,
            shape,
            affine,
            nifti,
            source,
        }
    }
}

impl Volume<f32> {
    /// Counts NaN and infinite voxels.
    ///
    /// # Errors
    /// [`Error::NonFinite`] with the count and the first index when there are any.
    pub fn check_finite(&self) -> Result<()> {
        let mut count = 0usize;
        let mut first = None;
        for (i, v) in self.data.iter().enumerate() {
            if !v.is_finite() {
                count += 1;
                first.get_or_insert(i);
            }
        }
        match first {
            None => Ok(()),
            Some(i) => Err(Error::NonFinite {
                path: self.name(),
                count,
                first: self.unravel(i),
            }),
        }
    }

    /// Converts to a label map.
    ///
    /// # Errors
    /// [`Error::InvalidLabel`] at the first voxel that is not an integer in `0..=255`.
    pub fn to_labels(&self) -> Result<Volume<u8>> {
        let mut out = Vec::with_capacity(self.data.len());
        for (i, &v) in self.data.iter().enumerate() {
            if !(0.0..=255.0).contains(&v) || v.fract() != 0.0 {
                return Err(Error::InvalidLabel {
                    path: self.name(),
                    index: self.unravel(i),
                    value: f64::from(v),
                });
            }
            out.push(v as u8);
        }
        self.with_data(out)
    }
}

pub(crate) fn check_affine(a: &Affine, path: &Path) -> Result<()> {
    if a.iter().flatten().any(|v| !v.is_finite()) {
        return Err(Error::DegenerateAffine {
            path: path.to_path_buf(),
            reason: format!("non-finite entries in {a:?}"),
        });
    }
    if geometry::det3(&geometry::linear_part(a)).abs() < 1e-12 {
        return Err(Error::DegenerateAffine {
            path: path.to_path_buf(),
            reason: format!("singular 3x3 block in {a:?}"),
        });
    }
    Ok(())
}

/// Describes how two grids differ (shape, or affines by more than `1e-4` mm); `None` when they
/// are the same. `a` is named first in the message.
pub(crate) fn grid_difference(
    shape_a: [usize; 3],
    aff_a: &Affine,
    shape_b: [usize; 3],
    aff_b: &Affine,
) -> Option<String> {
    if shape_a != shape_b {
        return Some(format!("shape {shape_a:?} vs {shape_b:?}"));
    }
    let d = geometry::max_abs_diff(aff_a, aff_b);
    (d > 1e-4).then(|| format!("affines differ by up to {d:.3e} mm ({aff_a:?} vs {aff_b:?})"))
}
