//! Spatial transforms: reorientation and resampling, with MONAI's (0.9.0 and 1.x agree here)
//! semantics.

use crate::error::{Error, Result};
use crate::geometry::{self, Affine, AxisOrientation};
use crate::parallel::for_each_slab;
use crate::volume::{Volume, Voxel};

/// How voxel values are interpolated when resampling.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Interpolation {
    /// Trilinear (`grid_sample` "bilinear" on 3-D data), for images.
    Linear,
    /// Nearest neighbour with ties rounded half to even (`grid_sample` "nearest"), for labels.
    Nearest,
}

/// A pure axis permutation and flip that reorients a grid.
///
/// Output axis `k` is input axis `perm[k]`, read backwards when `flip[k]` is set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct OrientTransform {
    /// Input axis feeding each output axis.
    pub perm: [usize; 3],
    /// Whether each output axis runs backwards along its input axis.
    pub flip: [bool; 3],
    /// Shape of the input grid.
    pub in_shape: [usize; 3],
}

impl OrientTransform {
    /// The transform that reorients a grid of `shape` with `affine` to the axis codes `target`
    /// (for example `"RAS"`), as MONAI's `Orientation` (nibabel's `io_orientation` and
    /// `ornt_transform`).
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for bad codes; [`Error::DegenerateAffine`] for a singular
    /// affine.
    pub fn to_axcodes(affine: &Affine, shape: [usize; 3], target: &str) -> Result<Self> {
        let dst = geometry::parse_axcodes(target).ok_or_else(|| {
            Error::param(
                "axcodes",
                format!("{target:?} is not three distinct codes out of R/L, A/P, S/I"),
            )
        })?;
        let src = geometry::io_orientation(affine).ok_or_else(|| Error::DegenerateAffine {
            path: "<volume>".into(),
            reason: format!("cannot orient {affine:?}"),
        })?;
        Ok(Self::between(&src, &dst, shape))
    }

    fn between(src: &[AxisOrientation; 3], dst: &[AxisOrientation; 3], shape: [usize; 3]) -> Self {
        let mut perm = [0; 3];
        let mut flip = [false; 3];
        for k in 0..3 {
            let i = (0..3)
                .find(|&i| src[i].world_axis == dst[k].world_axis)
                .expect("both orientations cover the three world axes");
            perm[k] = i;
            flip[k] = src[i].flipped != dst[k].flipped;
        }
        OrientTransform {
            perm,
            flip,
            in_shape: shape,
        }
    }

    /// `true` when the transform changes nothing.
    pub fn is_identity(&self) -> bool {
        self.perm == [0, 1, 2] && self.flip == [false; 3]
    }

    /// Shape of the output grid.
    pub fn out_shape(&self) -> [usize; 3] {
        [
            self.in_shape[self.perm[0]],
            self.in_shape[self.perm[1]],
            self.in_shape[self.perm[2]],
        ]
    }

    /// The matrix taking an output voxel index to the input voxel index (nibabel's
    /// `inv_ornt_aff`).
    pub fn out_to_in(&self) -> Affine {
        let mut m = [[0.0; 4]; 4];
        m[3][3] = 1.0;
        for k in 0..3 {
            let i = self.perm[k];
            if self.flip[k] {
                m[i][k] = -1.0;
                m[i][3] = self.in_shape[i] as f64 - 1.0;
            } else {
                m[i][k] = 1.0;
            }
        }
        m
    }

    /// The affine of the output grid given the input affine.
    pub fn out_affine(&self, in_affine: &Affine) -> Affine {
        geometry::matmul(in_affine, &self.out_to_in())
    }

    /// The transform that undoes this one.
    pub fn inverse(&self) -> Self {
        let mut perm = [0; 3];
        let mut flip = [false; 3];
        for k in 0..3 {
            perm[self.perm[k]] = k;
            flip[self.perm[k]] = self.flip[k];
        }
        OrientTransform {
            perm,
            flip,
            in_shape: self.out_shape(),
        }
    }

    /// Applies the transform (the affine is updated; the NIfTI geometry fields are kept only
    /// for the identity).
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] when the volume's shape is not `in_shape`.
    pub fn apply<T: Voxel>(&self, vol: Volume<T>) -> Result<Volume<T>> {
        if vol.shape() != self.in_shape {
            return Err(Error::param(
                "volume",
                format!(
                    "shape {:?}, the orientation was made for {:?}",
                    vol.shape(),
                    self.in_shape
                ),
            ));
        }
        if self.is_identity() {
            return Ok(vol);
        }
        let os = self.out_shape();
        let s = self.in_shape;
        let in_strides = [1usize, s[0], s[0] * s[1]];
        // Start offset and signed step along each output axis, in input elements.
        let mut start = 0isize;
        let mut step = [0isize; 3];
        for k in 0..3 {
            let i = self.perm[k];
            let st = in_strides[i] as isize;
            if self.flip[k] {
                start += (s[i] as isize - 1) * st;
                step[k] = -st;
            } else {
                step[k] = st;
            }
        }
        let src = vol.data();
        let mut out = vec![T::default(); vol.len()];
        for_each_slab(&mut out, os[0] * os[1], |z, slab| {
            for y in 0..os[1] {
                let base = start + step[2] * z as isize + step[1] * y as isize;
                let row = &mut slab[y * os[0]..(y + 1) * os[0]];
                for (x, v) in row.iter_mut().enumerate() {
                    *v = src[(base + step[0] * x as isize) as usize];
                }
            }
        });
        let affine = self.out_affine(vol.affine());
        Ok(Volume::from_parts(
            out,
            os,
            affine,
            None,
            vol.source().map(Into::into),
        ))
    }
}

/// MONAI's `Orientation(axcodes)`: reorders and flips the axes so that they follow `axcodes`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Orientation {
    /// Target codes, `"RAS"` for the Universal Model.
    pub axcodes: String,
}

impl Orientation {
    /// Orientation to the given codes.
    pub fn new(axcodes: impl Into<String>) -> Self {
        Orientation {
            axcodes: axcodes.into(),
        }
    }

    /// Reorients a volume; returns it with the transform applied.
    ///
    /// # Errors
    /// See [`OrientTransform::to_axcodes`].
    pub fn apply<T: Voxel>(&self, vol: Volume<T>) -> Result<(Volume<T>, OrientTransform)> {
        let t = OrientTransform::to_axcodes(vol.affine(), vol.shape(), &self.axcodes)?;
        Ok((t.apply(vol)?, t))
    }
}

/// The output grid of MONAI's `Spacing(pixdim, diagonal=False)` for a grid of `shape` and
/// `affine`: voxel directions kept (see [`geometry::zoom_affine`]), voxel sizes `pixdim`, shape
/// and origin from [`geometry::compute_shape_offset`].
///
/// # Errors
/// [`Error::InvalidParameter`] for a non-positive `pixdim`; [`Error::DegenerateAffine`].
pub fn spacing_grid(
    shape: [usize; 3],
    affine: &Affine,
    pixdim: [f64; 3],
) -> Result<([usize; 3], Affine)> {
    if pixdim.iter().any(|p| !(p.is_finite() && *p > 0.0)) {
        return Err(Error::param(
            "pixdim",
            format!("{pixdim:?} must be positive"),
        ));
    }
    let degenerate = || Error::DegenerateAffine {
        path: "<volume>".into(),
        reason: format!("cannot resample {affine:?}"),
    };
    let mut out = geometry::zoom_affine(affine, pixdim).ok_or_else(degenerate)?;
    let (out_shape, offset) =
        geometry::compute_shape_offset(shape, affine, &out).ok_or_else(degenerate)?;
    for r in 0..3 {
        out[r][3] = offset[r];
    }
    Ok((out_shape, out))
}

/// Resamples a volume onto the grid `(out_shape, out_affine)`: each output voxel `j` reads the
/// input at voxel coordinates `inv(A_in)·A_out·j` (voxel-centre convention), with coordinates
/// outside the input clamped to its border, as `grid_sample(padding_mode="border",
/// align_corners=False)` does for MONAI's `Spacing` and `SpatialResample`. Arithmetic is in
/// `f64`.
///
/// # Errors
/// [`Error::DegenerateAffine`] for a singular input affine; [`Error::InvalidParameter`] for an
/// empty output shape.
pub fn resample_to_grid<T: Voxel>(
    vol: &Volume<T>,
    out_shape: [usize; 3],
    out_affine: &Affine,
    interp: Interpolation,
) -> Result<Volume<T>> {
    if out_shape.contains(&0) {
        return Err(Error::param(
            "out_shape",
            format!("{out_shape:?} has an empty side"),
        ));
    }
    let inv = geometry::inverse(vol.affine()).ok_or_else(|| Error::DegenerateAffine {
        path: vol.name(),
        reason: format!("singular affine {:?}", vol.affine()),
    })?;
    let t = geometry::matmul(&inv, out_affine);
    let n: usize = out_shape
        .iter()
        .try_fold(1usize, |a, &s| a.checked_mul(s))
        .ok_or_else(|| Error::param("out_shape", format!("{out_shape:?} overflows")))?;
    let identity =
        out_shape == vol.shape() && geometry::max_abs_diff(&t, &geometry::IDENTITY) < 1e-12;
    if identity {
        return Ok(Volume::from_parts(
            vol.data().to_vec(),
            out_shape,
            *out_affine,
            vol.nifti_geometry().copied(),
            vol.source().map(Into::into),
        ));
    }
    let mut out = vec![T::default(); n];
    let separable = (0..3).all(|r| (0..3).all(|c| r == c || t[r][c] == 0.0));
    if separable {
        resample_separable(vol, &mut out, out_shape, &t, interp);
    } else {
        resample_general(vol, &mut out, out_shape, &t, interp);
    }
    Ok(Volume::from_parts(
        out,
        out_shape,
        *out_affine,
        None,
        vol.source().map(Into::into),
    ))
}

/// Per-axis lookup: lower index, upper index and weight of the upper one.
struct AxisTable {
    lo: Vec<usize>,
    hi: Vec<usize>,
    w: Vec<f64>,
}

fn axis_table(
    n_out: usize,
    n_in: usize,
    scale: f64,
    offset: f64,
    interp: Interpolation,
) -> AxisTable {
    let mut t = AxisTable {
        lo: Vec::with_capacity(n_out),
        hi: Vec::with_capacity(n_out),
        w: Vec::with_capacity(n_out),
    };
    let max = n_in as f64 - 1.0;
    for j in 0..n_out {
        let u = (scale * j as f64 + offset).clamp(0.0, max);
        match interp {
            Interpolation::Linear => {
                let f = u.floor();
                let lo = f as usize;
                t.lo.push(lo);
                t.hi.push((lo + 1).min(n_in - 1));
                t.w.push(u - f);
            }
            Interpolation::Nearest => {
                let i = u.round_ties_even() as usize;
                t.lo.push(i);
                t.hi.push(i);
                t.w.push(0.0);
            }
        }
    }
    t
}

fn resample_separable<T: Voxel>(
    vol: &Volume<T>,
    out: &mut [T],
    os: [usize; 3],
    t: &Affine,
    interp: Interpolation,
) {
    let s = vol.shape();
    let tabs: Vec<AxisTable> = (0..3)
        .map(|a| axis_table(os[a], s[a], t[a][a], t[a][3], interp))
        .collect();
    let (tx, ty, tz) = (&tabs[0], &tabs[1], &tabs[2]);
    let src = vol.data();
    let sx = s[0];
    let sxy = s[0] * s[1];
    for_each_slab(out, os[0] * os[1], |z, slab| {
        let (z0, z1, wz) = (tz.lo[z] * sxy, tz.hi[z] * sxy, tz.w[z]);
        for y in 0..os[1] {
            let (y0, y1, wy) = (ty.lo[y] * sx, ty.hi[y] * sx, ty.w[y]);
            let row = &mut slab[y * os[0]..(y + 1) * os[0]];
            match interp {
                Interpolation::Nearest => {
                    let base = z0 + y0;
                    for (x, v) in row.iter_mut().enumerate() {
                        *v = src[base + tx.lo[x]];
                    }
                }
                Interpolation::Linear => {
                    let p00 = z0 + y0;
                    let p01 = z0 + y1;
                    let p10 = z1 + y0;
                    let p11 = z1 + y1;
                    let (w00, w01, w10, w11) = (
                        (1.0 - wz) * (1.0 - wy),
                        (1.0 - wz) * wy,
                        wz * (1.0 - wy),
                        wz * wy,
                    );
                    for (x, v) in row.iter_mut().enumerate() {
                        let (x0, x1, wx) = (tx.lo[x], tx.hi[x], tx.w[x]);
                        let lerp = |p: usize| {
                            src[p + x0].to_f64() * (1.0 - wx) + src[p + x1].to_f64() * wx
                        };
                        *v = T::from_f64(
                            w00 * lerp(p00) + w01 * lerp(p01) + w10 * lerp(p10) + w11 * lerp(p11),
                        );
                    }
                }
            }
        }
    });
}

fn resample_general<T: Voxel>(
    vol: &Volume<T>,
    out: &mut [T],
    os: [usize; 3],
    t: &Affine,
    interp: Interpolation,
) {
    let s = vol.shape();
    let src = vol.data();
    let max = [s[0] as f64 - 1.0, s[1] as f64 - 1.0, s[2] as f64 - 1.0];
    let idx = |i: usize, j: usize, k: usize| i + s[0] * (j + s[1] * k);
    for_each_slab(out, os[0] * os[1], |z, slab| {
        for y in 0..os[1] {
            for x in 0..os[0] {
                let p = geometry::apply(t, [x as f64, y as f64, z as f64]);
                let u = [
                    p[0].clamp(0.0, max[0]),
                    p[1].clamp(0.0, max[1]),
                    p[2].clamp(0.0, max[2]),
                ];
                let v = match interp {
                    Interpolation::Nearest => {
                        let r = u.map(|c| c.round_ties_even() as usize);
                        src[idx(r[0], r[1], r[2])]
                    }
                    Interpolation::Linear => {
                        let lo = u.map(|c| c.floor() as usize);
                        let hi = [
                            (lo[0] + 1).min(s[0] - 1),
                            (lo[1] + 1).min(s[1] - 1),
                            (lo[2] + 1).min(s[2] - 1),
                        ];
                        let w = [
                            u[0] - lo[0] as f64,
                            u[1] - lo[1] as f64,
                            u[2] - lo[2] as f64,
                        ];
                        let mut acc = 0.0;
                        for (kz, wz) in [(lo[2], 1.0 - w[2]), (hi[2], w[2])] {
                            for (ky, wy) in [(lo[1], 1.0 - w[1]), (hi[1], w[1])] {
                                for (kx, wx) in [(lo[0], 1.0 - w[0]), (hi[0], w[0])] {
                                    acc += wz * wy * wx * src[idx(kx, ky, kz)].to_f64();
                                }
                            }
                        }
                        T::from_f64(acc)
                    }
                };
                slab[y * os[0] + x] = v;
            }
        }
    });
}

/// MONAI's `Spacing(pixdim, diagonal=False, padding_mode="border", align_corners=False)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spacing {
    /// Target voxel sizes in mm (1.5 mm isotropic for the Universal Model).
    pub pixdim: [f64; 3],
    /// Interpolation.
    pub mode: Interpolation,
    /// Limits on the resampled grid.
    pub limits: crate::nii::Limits,
}

impl Spacing {
    /// Resampling to `pixdim` with `mode`, within the default limits.
    pub fn new(pixdim: [f64; 3], mode: Interpolation) -> Self {
        Spacing {
            pixdim,
            mode,
            limits: crate::nii::Limits::default(),
        }
    }

    /// Resamples a volume to the target spacing.
    ///
    /// # Errors
    /// See [`spacing_grid`] and [`resample_to_grid`].
    pub fn apply<T: Voxel>(&self, vol: &Volume<T>) -> Result<Volume<T>> {
        let (shape, affine) = spacing_grid(vol.shape(), vol.affine(), self.pixdim)?;
        self.limits
            .check_grid("the resampled grid", shape, std::mem::size_of::<T>())?;
        resample_to_grid(vol, shape, &affine, self.mode)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp(shape: [usize; 3], affine: Affine) -> Volume<f32> {
        let n = shape.iter().product();
        Volume::from_vec((0..n).map(|i| i as f32).collect(), shape, affine).unwrap()
    }

    #[test]
    fn orientation_round_trip_and_affine() {
        let lps = [
            [-2.0, 0.0, 0.0, 10.0],
            [0.0, -1.0, 0.0, 20.0],
            [0.0, 0.0, 3.0, 30.0],
            [0.0, 0.0, 0.0, 1.0],
        ];
        let v = ramp([4, 3, 2], lps);
        let (r, t) = Orientation::new("RAS").apply(v.clone()).unwrap();
        assert_eq!(r.axcodes(), "RAS");
        // World position of every voxel is unchanged.
        for idx in 0..r.len() {
            let ijk = r.unravel(idx);
            let w = geometry::apply(r.affine(), ijk.map(|c| c as f64));
            let src = geometry::apply(&geometry::inverse(v.affine()).unwrap(), w);
            let s = src.map(|c| c.round() as usize);
            assert_eq!(r.data()[idx], v.get(s));
        }
        let back = t.inverse().apply(r).unwrap();
        assert_eq!(back.data(), v.data());
        assert!(geometry::max_abs_diff(back.affine(), v.affine()) < 1e-12);
    }

    #[test]
    fn permuted_axes() {
        // Voxel axis 0 runs along z (S), 1 along y (A), 2 along x backwards (L).
        let a = [
            [0.0, 0.0, -1.0, 0.0],
            [0.0, 1.0, 0.0, 0.0],
            [1.0, 0.0, 0.0, 0.0],
            [0.0, 0.0, 0.0, 1.0],
        ];
        let v = ramp([2, 3, 4], a);
        assert_eq!(v.axcodes(), "SAL");
        let (r, _) = Orientation::new("RAS").apply(v).unwrap();
        assert_eq!(r.shape(), [4, 3, 2]);
        assert_eq!(r.axcodes(), "RAS");
    }

    #[test]
    fn halving_the_spacing_interpolates_midpoints() {
        let a = [
            [2.0, 0.0, 0.0, 0.0],
            [0.0, 2.0, 0.0, 0.0],
            [0.0, 0.0, 2.0, 0.0],
            [0.0, 0.0, 0.0, 1.0],
        ];
        let v = ramp([3, 2, 2], a);
        let out = Spacing::new([1.0; 3], Interpolation::Linear)
            .apply(&v)
            .unwrap();
        assert_eq!(out.shape(), [5, 3, 3]);
        // Along x: 0, 0.5, 1, 1.5, 2.
        let row: Vec<f32> = (0..5).map(|x| out.get([x, 0, 0])).collect();
        assert_eq!(row, vec![0.0, 0.5, 1.0, 1.5, 2.0]);
        // Centre of the volume along y and z.
        assert!((out.get([0, 1, 1]) - (1.5 + 3.0)).abs() < 1e-6);
    }

    #[test]
    fn general_and_separable_paths_agree() {
        let a = [
            [1.0, 0.0, 0.0, 0.0],
            [0.0, 1.0, 0.0, 0.0],
            [0.0, 0.0, 1.0, 0.0],
            [0.0, 0.0, 0.0, 1.0],
        ];
        let v = ramp([5, 4, 3], a);
        let out_aff = [
            [0.7, 0.0, 0.0, 0.3],
            [0.0, 0.6, 0.0, -0.2],
            [0.0, 0.0, 0.9, 0.1],
            [0.0, 0.0, 0.0, 1.0],
        ];
        for mode in [Interpolation::Linear, Interpolation::Nearest] {
            let sep = resample_to_grid(&v, [7, 6, 4], &out_aff, mode).unwrap();
            let mut gen_out = vec![0f32; sep.len()];
            let t = geometry::matmul(&geometry::inverse(v.affine()).unwrap(), &out_aff);
            resample_general(&v, &mut gen_out, [7, 6, 4], &t, mode);
            for (a, b) in sep.data().iter().zip(&gen_out) {
                assert!((a - b).abs() < 1e-5, "{a} vs {b}");
            }
        }
    }
}
