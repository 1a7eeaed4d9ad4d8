//! NIfTI-1 reading and writing (`.nii`, `.nii.gz`) through the `nifti` crate.
//!
//! Reading checks the header before any voxel memory is allocated: magic, dimensions (3-D, or
//! 4-D and above with singleton extra axes), data type, voxel sizes, the voxel and byte budget of
//! [`Limits`]; then reads exactly the announced bytes, applies `scl_slope`/`scl_inter` (when the
//! slope is non-zero, as NIfTI prescribes) and rejects NaN and infinite voxels.
//!
//! Writing goes to a temporary file in the destination folder, which is synced and renamed over
//! the destination, so a crash never leaves half a file behind.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use flate2::read::MultiGzDecoder;
use nifti::{IntoNdArray, NiftiHeader, NiftiType};

use crate::error::{Error, Result};
use crate::geometry::{self, Affine};
use crate::volume::{NiftiGeometry, Volume, Voxel, check_affine, grid_difference};

/// Budget for what a header may ask to allocate.
///
/// Defaults: 2²⁹ voxels (a 512 × 512 × 2048 CT; eight times a large abdominal CT) and 8 GiB
/// for the voxel buffers of one grid (the raw bytes plus the decoded `f32` copy).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Limits {
    /// Largest number of voxels accepted.
    pub max_voxels: u64,
    /// Largest number of bytes of voxel buffers accepted.
    pub max_alloc: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_voxels: 1 << 29,
            max_alloc: 8 << 30,
        }
    }
}

impl Limits {
    /// Checks a grid about to be allocated (`what` names it in the error): its voxels and its
    /// bytes (`bytes_per_voxel` each) must be within the limits. Products are in `u128`,
    /// saturating, so an overflowing shape is refused too.
    ///
    /// # Errors
    /// [`Error::GridTooLarge`] naming the grid, its size and the limits.
    pub fn check_grid(&self, what: &str, shape: [usize; 3], bytes_per_voxel: usize) -> Result<()> {
        let voxels = shape
            .iter()
            .fold(1u128, |a, s| a.saturating_mul(*s as u128));
        let bytes = voxels.saturating_mul(bytes_per_voxel as u128);
        if voxels > u128::from(self.max_voxels)
            || bytes > u128::from(self.max_alloc)
            || bytes > isize::MAX as u128
        {
            return Err(Error::GridTooLarge {
                what: what.to_string(),
                shape,
                voxels,
                bytes,
                max_voxels: self.max_voxels,
                max_alloc: self.max_alloc,
            });
        }
        Ok(())
    }

    /// No limit beyond what the machine can address.
    pub fn unlimited() -> Self {
        Limits {
            max_voxels: u64::MAX,
            max_alloc: u64::MAX,
        }
    }

    /// Sets the voxel budget.
    pub fn max_voxels(mut self, n: u64) -> Self {
        self.max_voxels = n;
        self
    }

    /// Sets the byte budget.
    pub fn max_alloc(mut self, bytes: u64) -> Self {
        self.max_alloc = bytes;
        self
    }
}

/// What a NIfTI header says, checked and summarised (see [`read_header`]).
#[derive(Debug, Clone, PartialEq)]
pub struct NiftiInfo {
    /// The file.
    pub path: PathBuf,
    /// `(nx, ny, nz)`.
    pub shape: [usize; 3],
    /// The on-disk voxel type (`"int16"`, `"float32"`, ...).
    pub datatype: &'static str,
    /// Voxel sizes from the affine, mm.
    pub spacing: [f64; 3],
    /// `pixdim[1..4]` as stored.
    pub pixdim: [f32; 3],
    /// The affine (sform > qform > pixdim fallback).
    pub affine: Affine,
    /// Which of the three gave the affine: `"sform"`, `"qform"` or `"pixdim"`.
    pub affine_source: &'static str,
    /// Orientation codes such as `"RAS"`.
    pub axcodes: String,
    /// `scl_slope` and `scl_inter`.
    pub scaling: (f32, f32),
    /// The exact geometry fields.
    pub geometry: NiftiGeometry,
    /// The header description field.
    pub description: String,
    /// `vox_offset`.
    pub vox_offset: f32,
    /// Size of the 4th axis (1 for a 3-D volume).
    pub channels: usize,
}

fn datatype_name(t: NiftiType) -> Option<(&'static str, usize)> {
    Some(match t {
        NiftiType::Uint8 => ("uint8", 1),
        NiftiType::Int8 => ("int8", 1),
        NiftiType::Uint16 => ("uint16", 2),
        NiftiType::Int16 => ("int16", 2),
        NiftiType::Uint32 => ("uint32", 4),
        NiftiType::Int32 => ("int32", 4),
        NiftiType::Float32 => ("float32", 4),
        NiftiType::Float64 => ("float64", 8),
        _ => return None,
    })
}

fn is_gz(path: &Path) -> bool {
    path.file_name()
        .is_some_and(|n| n.to_string_lossy().to_ascii_lowercase().ends_with(".gz"))
}

fn open(path: &Path) -> Result<Box<dyn Read>> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let reader = BufReader::with_capacity(1 << 20, file);
    Ok(if is_gz(path) {
        Box::new(MultiGzDecoder::new(reader))
    } else {
        Box::new(reader)
    })
}

fn bad(path: &Path, field: &'static str, reason: impl Into<String>) -> Error {
    Error::BadHeader {
        path: path.to_path_buf(),
        field,
        reason: reason.into(),
    }
}

fn parse_header(path: &Path, reader: &mut dyn Read) -> Result<NiftiHeader> {
    // Read the 348 header bytes ourselves so that a short or undecodable file is told apart
    // from a header with a wrong magic.
    let mut raw = [0u8; 348];
    read_full(reader, &mut raw).map_err(|e| match e {
        ReadFail::Short(n) => Error::InvalidNifti {
            path: path.to_path_buf(),
            reason: format!("file holds {n} bytes, a NIfTI-1 header needs 348"),
        },
        ReadFail::Io(e) if e.kind() == std::io::ErrorKind::InvalidInput => Error::InvalidNifti {
            path: path.to_path_buf(),
            reason: format!("not a gzip stream: {e}"),
        },
        ReadFail::Io(e) => Error::Truncated {
            path: path.to_path_buf(),
            reason: format!("cannot decode the header: {e}"),
        },
    })?;
    let sizeof_hdr_le = i32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]);
    let sizeof_hdr_be = i32::from_be_bytes([raw[0], raw[1], raw[2], raw[3]]);
    if sizeof_hdr_le != 348 && sizeof_hdr_be != 348 {
        let reason = if sizeof_hdr_le == 540 || sizeof_hdr_be == 540 {
            "NIfTI-2 files are not supported yet".to_string()
        } else {
            format!("sizeof_hdr is {sizeof_hdr_le}, expected 348")
        };
        return Err(Error::InvalidNifti {
            path: path.to_path_buf(),
            reason,
        });
    }
    let magic = &raw[344..348];
    if magic != b"n+1\0" {
        let reason = if magic == b"ni1\0" {
            "a header-only file (.hdr/.img pair) is not supported; convert it to .nii".to_string()
        } else {
            format!("wrong magic {magic:?}, expected \"n+1\\0\"")
        };
        return Err(Error::InvalidNifti {
            path: path.to_path_buf(),
            reason,
        });
    }
    NiftiHeader::from_reader(&raw[..]).map_err(|e| Error::InvalidNifti {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

enum ReadFail {
    Short(usize),
    Io(std::io::Error),
}

fn read_full(reader: &mut dyn Read, buf: &mut [u8]) -> std::result::Result<(), ReadFail> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => return Err(ReadFail::Short(filled)),
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ReadFail::Io(e)),
        }
    }
    Ok(())
}

/// nibabel's affine choice: sform when `sform_code > 0`, else qform when `qform_code > 0`, else
/// the "base" affine from `pixdim` (x flipped, origin at the volume centre).
fn header_affine(h: &NiftiHeader, shape: [usize; 3]) -> (Affine, &'static str) {
    if h.sform_code > 0 {
        let s = [h.srow_x, h.srow_y, h.srow_z];
        let mut a = geometry::IDENTITY;
        for r in 0..3 {
            for c in 0..4 {
                a[r][c] = f64::from(s[r][c]);
            }
        }
        (a, "sform")
    } else if h.qform_code > 0 {
        let q = geometry::QuaternionForm {
            b: f64::from(h.quatern_b),
            c: f64::from(h.quatern_c),
            d: f64::from(h.quatern_d),
            offset: [
                f64::from(h.quatern_x),
                f64::from(h.quatern_y),
                f64::from(h.quatern_z),
            ],
            pixdim: [
                f64::from(h.pixdim[1]),
                f64::from(h.pixdim[2]),
                f64::from(h.pixdim[3]),
            ],
            qfac: if h.pixdim[0] == -1.0 { -1.0 } else { 1.0 },
        };
        (geometry::quaternion_to_affine(&q), "qform")
    } else {
        let mut a = geometry::IDENTITY;
        for ax in 0..3 {
            let mut z = f64::from(h.pixdim[ax + 1]);
            if ax == 0 {
                z = -z;
            }
            a[ax][ax] = z;
            a[ax][3] = -(shape[ax] as f64 - 1.0) / 2.0 * z;
        }
        (a, "pixdim")
    }
}

fn geometry_of(h: &NiftiHeader) -> NiftiGeometry {
    NiftiGeometry {
        qform_code: h.qform_code,
        sform_code: h.sform_code,
        pixdim: h.pixdim,
        quatern: [h.quatern_b, h.quatern_c, h.quatern_d],
        qoffset: [h.quatern_x, h.quatern_y, h.quatern_z],
        srow: [h.srow_x, h.srow_y, h.srow_z],
        xyzt_units: h.xyzt_units,
    }
}

/// Checks a parsed header; returns the summary and the on-disk element size.
fn check_header(
    path: &Path,
    h: &NiftiHeader,
    limits: &Limits,
    allow_channels: bool,
) -> Result<(NiftiInfo, usize)> {
    let ndim = usize::from(h.dim[0]);
    if !(1..=7).contains(&ndim) {
        return Err(bad(
            path,
            "dim[0]",
            format!("{ndim} dimensions, expected 1 to 7"),
        ));
    }
    let mut shape = [1usize; 3];
    let mut channels = 1usize;
    let mut voxels: u128 = 1;
    for ax in 1..=ndim {
        let d = h.dim[ax];
        // NIfTI-1 stores dims as signed 16-bit integers.
        if d == 0 || d > i16::MAX as u16 {
            return Err(bad(
                path,
                DIM_NAMES[ax],
                format!("{} is not a positive size", d as i16),
            ));
        }
        voxels *= u128::from(d);
        if ax <= 3 {
            shape[ax - 1] = usize::from(d);
        } else if ax == 4 && allow_channels {
            channels = usize::from(d);
        } else if d != 1 {
            return Err(Error::Unsupported {
                path: path.to_path_buf(),
                reason: format!(
                    "{ndim}-D data with dim[{ax}] = {d}; only 3-D volumes (extra axes of size 1) \
                     are supported"
                ),
            });
        }
    }
    let dtype = h
        .data_type()
        .map_err(|_| bad(path, "datatype", format!("unknown code {}", h.datatype)))?;
    let (dname, elem) = datatype_name(dtype).ok_or_else(|| Error::Unsupported {
        path: path.to_path_buf(),
        reason: format!("voxel type {dtype:?}; supported: u8, i8, u16, i16, u32, i32, f32, f64"),
    })?;
    if usize::try_from(h.bitpix).ok() != Some(elem * 8) {
        return Err(bad(
            path,
            "bitpix",
            format!(
                "{} does not match datatype {dname} ({} bits)",
                h.bitpix,
                elem * 8
            ),
        ));
    }
    for ax in 1..=ndim.min(3) {
        let p = h.pixdim[ax];
        if !(p.is_finite() && p > 0.0) {
            return Err(bad(
                path,
                PIXDIM_NAMES[ax],
                format!("voxel size {p} is not a positive number"),
            ));
        }
    }
    if !(h.scl_slope.is_finite() && h.scl_inter.is_finite()) {
        return Err(bad(
            path,
            "scl_slope/scl_inter",
            format!("{} / {} are not finite", h.scl_slope, h.scl_inter),
        ));
    }
    if !(h.vox_offset.is_finite() && h.vox_offset >= 348.0 && h.vox_offset < (1u32 << 30) as f32) {
        return Err(bad(
            path,
            "vox_offset",
            format!("{} is out of range", h.vox_offset),
        ));
    }
    if voxels > u128::from(limits.max_voxels) {
        return Err(Error::LimitExceeded {
            path: path.to_path_buf(),
            what: "voxel count",
            requested: voxels,
            limit: limits.max_voxels,
        });
    }
    // Raw bytes plus the decoded f32 buffer.
    let bytes = voxels * (elem as u128 + 4);
    if bytes > u128::from(limits.max_alloc) || usize::try_from(bytes).is_err() {
        return Err(Error::LimitExceeded {
            path: path.to_path_buf(),
            what: "voxel buffer bytes",
            requested: bytes,
            limit: limits.max_alloc,
        });
    }
    let (affine, affine_source) = header_affine(h, shape);
    if affine_source == "qform" {
        // nibabel's rule: b² + c² + d² may exceed 1 only by rounding (3 float32 epsilons);
        // beyond that the quaternion is not a rotation and nibabel refuses the qform.
        let (b, c, d) = (
            f64::from(h.quatern_b),
            f64::from(h.quatern_c),
            f64::from(h.quatern_d),
        );
        let w2 = 1.0 - (b * b + c * c + d * d);
        if w2.is_nan() || w2 < -3.0 * f64::from(f32::EPSILON) {
            return Err(bad(
                path,
                "quatern_b/c/d",
                format!(
                    "the qform quaternion ({b}, {c}, {d}) has b² + c² + d² = {:.6} > 1: it is \
                     not a rotation, so the voxel axes are unknown",
                    1.0 - w2
                ),
            ));
        }
    }
    check_affine(&affine, path)?;
    let description = String::from_utf8_lossy(&h.descrip)
        .trim_end_matches('\0')
        .to_string();
    Ok((
        NiftiInfo {
            path: path.to_path_buf(),
            shape,
            datatype: dname,
            spacing: geometry::spacing(&affine),
            pixdim: [h.pixdim[1], h.pixdim[2], h.pixdim[3]],
            axcodes: geometry::axcodes(&affine),
            affine,
            affine_source,
            scaling: (h.scl_slope, h.scl_inter),
            geometry: geometry_of(h),
            description,
            vox_offset: h.vox_offset,
            channels,
        },
        elem,
    ))
}

const DIM_NAMES: [&str; 8] = [
    "dim[0]", "dim[1]", "dim[2]", "dim[3]", "dim[4]", "dim[5]", "dim[6]", "dim[7]",
];
const PIXDIM_NAMES: [&str; 4] = ["pixdim[0]", "pixdim[1]", "pixdim[2]", "pixdim[3]"];

/// Reads and checks a header only; no voxel memory is allocated.
///
/// # Errors
/// Any header problem, named with the file (see the module docs).
pub fn read_header(path: impl AsRef<Path>, limits: &Limits) -> Result<NiftiInfo> {
    let path = path.as_ref();
    let mut reader = open(path)?;
    let h = parse_header(path, &mut *reader)?;
    Ok(check_header(path, &h, limits, true)?.0)
}

/// Options for reading a NIfTI volume.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct ReadOptions {
    /// The allocation budget.
    pub limits: Limits,
    /// Accept NaN and infinite voxels (default: refuse them with [`Error::NonFinite`]).
    pub allow_non_finite: bool,
}

impl ReadOptions {
    /// Default options.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the allocation budget.
    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Accepts or refuses NaN and infinite voxels.
    pub fn allow_non_finite(mut self, allow: bool) -> Self {
        self.allow_non_finite = allow;
        self
    }

    /// Reads an image as `f32` (any supported on-disk type; scaling applied).
    ///
    /// # Errors
    /// A typed error naming the file for every header or data problem.
    pub fn read_image(&self, path: impl AsRef<Path>) -> Result<Volume<f32>> {
        let mut v = self.read_inner(path.as_ref(), false)?;
        Ok(v.remove(0))
    }

    /// Reads a 4-D file whose 4th axis holds channels (a stack of masks, say) as one volume
    /// per channel; a 3-D file gives one volume.
    ///
    /// # Errors
    /// As [`read_image`](Self::read_image); data of 5 or more dimensions is unsupported.
    pub fn read_channels(&self, path: impl AsRef<Path>) -> Result<Vec<Volume<f32>>> {
        self.read_inner(path.as_ref(), true)
    }

    fn read_inner(&self, path: &Path, allow_channels: bool) -> Result<Vec<Volume<f32>>> {
        let mut reader = open(path)?;
        let h = parse_header(path, &mut *reader)?;
        let (info, elem) = check_header(path, &h, &self.limits, allow_channels)?;
        // Skip the extensions between the header and the voxels.
        let skip = h.vox_offset as u64 - 348;
        let skipped =
            std::io::copy(&mut (&mut reader).take(skip), &mut std::io::sink()).map_err(|e| {
                Error::Truncated {
                    path: path.to_path_buf(),
                    reason: e.to_string(),
                }
            })?;
        if skipped != skip {
            return Err(Error::Truncated {
                path: path.to_path_buf(),
                reason: format!(
                    "file ends inside the header extensions ({skipped} of {skip} bytes)"
                ),
            });
        }
        let n: usize = info.shape.iter().product::<usize>() * info.channels;
        let nbytes = n * elem;
        let mut raw = Vec::new();
        raw.try_reserve_exact(nbytes)
            .map_err(|_| Error::OutOfMemory {
                path: path.to_path_buf(),
                bytes: nbytes,
            })?;
        raw.resize(nbytes, 0);
        read_full(&mut *reader, &mut raw).map_err(|e| Error::Truncated {
            path: path.to_path_buf(),
            reason: match e {
                ReadFail::Short(got) => {
                    format!("the header announces {nbytes} bytes of voxels, the file holds {got}")
                }
                ReadFail::Io(e) => e.to_string(),
            },
        })?;
        // Nothing may follow the voxels, and reading on to the end makes the gzip decoder
        // check the stream's CRC and length (it stops after one byte of trailing data, so a
        // stream that inflates without end costs nothing).
        let mut one = [0u8; 1];
        match reader.read(&mut one) {
            Ok(0) => {}
            Ok(_) => {
                return Err(Error::Truncated {
                    path: path.to_path_buf(),
                    reason: format!(
                        "data follows the {nbytes} bytes of voxels the header announces"
                    ),
                });
            }
            Err(e) => {
                return Err(Error::Truncated {
                    path: path.to_path_buf(),
                    reason: format!("after the voxels: {e}"),
                });
            }
        }
        // Header with the extra singleton axes folded away, so the ndarray is 3-D or 4-D.
        let mut hd = h.clone();
        hd.dim = [
            if info.channels > 1 { 4 } else { 3 },
            info.shape[0] as u16,
            info.shape[1] as u16,
            info.shape[2] as u16,
            info.channels as u16,
            1,
            1,
            1,
        ];
        let vol =
            nifti::InMemNiftiVolume::from_raw_data(&hd, raw).map_err(|e| Error::InvalidNifti {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?;
        let arr = vol.into_ndarray::<f32>().map_err(|e| Error::InvalidNifti {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        // The nifti crate returns a Fortran-order array; its buffer is our memory order, with
        // the channels as the slowest axis.
        debug_assert!(arr.t().is_standard_layout());
        let (data, offset) = arr.into_raw_vec_and_offset();
        debug_assert!(offset.unwrap_or(0) == 0);
        let per = info.shape.iter().product::<usize>();
        let mut out = Vec::with_capacity(info.channels);
        if info.channels == 1 {
            out.push(data);
        } else {
            for c in 0..info.channels {
                out.push(data[c * per..(c + 1) * per].to_vec());
            }
        }
        let vols: Vec<Volume<f32>> = out
            .into_iter()
            .map(|d| {
                Volume::from_parts(
                    d,
                    info.shape,
                    info.affine,
                    Some(info.geometry),
                    Some(path.to_path_buf()),
                )
            })
            .collect();
        if !self.allow_non_finite {
            for v in &vols {
                v.check_finite()?;
            }
        }
        Ok(vols)
    }

    /// Reads a label map: every voxel must be an integer in `0..=255` after scaling.
    ///
    /// # Errors
    /// As [`read_image`](Self::read_image), plus [`Error::InvalidLabel`].
    pub fn read_label(&self, path: impl AsRef<Path>) -> Result<Volume<u8>> {
        self.read_image(path)?.to_labels()
    }
}

/// Reads an image as `f32` with the default [`ReadOptions`].
///
/// # Errors
/// See [`ReadOptions::read_image`].
pub fn read_image(path: impl AsRef<Path>) -> Result<Volume<f32>> {
    ReadOptions::default().read_image(path)
}

/// Reads a label map with the default [`ReadOptions`].
///
/// # Errors
/// See [`ReadOptions::read_label`].
pub fn read_label(path: impl AsRef<Path>) -> Result<Volume<u8>> {
    ReadOptions::default().read_label(path)
}

/// Reads an image and its label map and checks that they share one grid.
///
/// # Errors
/// As [`read_image`] and [`read_label`], plus [`Error::GridMismatch`].
pub fn read_image_and_label(
    image: impl AsRef<Path>,
    label: impl AsRef<Path>,
) -> Result<(Volume<f32>, Volume<u8>)> {
    let opts = ReadOptions::default();
    let limits = opts.limits;
    // Compare the headers before reading any voxels.
    let hi = read_header(&image, &limits)?;
    let hl = read_header(&label, &limits)?;
    if let Some(reason) = grid_difference(hi.shape, &hi.affine, hl.shape, &hl.affine) {
        return Err(Error::GridMismatch {
            image: hi.path,
            label: hl.path,
            reason,
        });
    }
    let img = opts.read_image(image)?;
    let lab = opts.read_label(label)?;
    img.check_same_grid(&lab)?;
    Ok((img, lab))
}

/// Element types that can be written: `f32`, `u8` and `i16`.
pub trait NiftiWritable: Voxel + sealed::Sealed {
    #[doc(hidden)]
    fn write_view(
        w: &nifti::writer::WriterOptions<'_>,
        v: &ndarray::ArrayView3<'_, Self>,
    ) -> nifti::Result<()>;
}

mod sealed {
    pub trait Sealed {}
}

macro_rules! writable {
    ($($t:ty),*) => {$(
        impl sealed::Sealed for $t {}
        impl NiftiWritable for $t {
            fn write_view(
                w: &nifti::writer::WriterOptions<'_>,
                v: &ndarray::ArrayView3<'_, Self>,
            ) -> nifti::Result<()> {
                w.write_nifti(v)
            }
        }
    )*};
}
writable!(f32, u8, i16);

/// Options for writing a NIfTI file.
#[derive(Debug, Clone, PartialEq)]
pub struct WriteOptions {
    /// Text for the header's `descrip` field (at most 80 bytes; longer is cut).
    pub description: String,
    /// gzip level 0–9 for `.nii.gz` (default 1: fast, as nibabel's default is 6 but far slower).
    pub compression_level: u32,
}

impl Default for WriteOptions {
    fn default() -> Self {
        WriteOptions {
            description: "univ".to_string(),
            compression_level: 1,
        }
    }
}

/// Builds the header geometry for a volume: its attached NIfTI fields when they still describe
/// its affine, else an sform and a qform made from the affine (codes 2, "aligned", as nibabel).
fn header_for<T: Voxel>(vol: &Volume<T>, opts: &WriteOptions) -> NiftiHeader {
    let mut h = NiftiHeader::default();
    let a = vol.affine();
    let kept = vol.nifti_geometry().filter(|g| {
        let mut hh = NiftiHeader::default();
        apply_geometry(&mut hh, g);
        let (b, _) = header_affine(&hh, vol.shape());
        geometry::max_abs_diff(&b, a) < 1e-4
    });
    match kept {
        Some(g) => apply_geometry(&mut h, g),
        None => {
            h.sform_code = 2;
            let mut srow = [[0f32; 4]; 3];
            for (r, row) in srow.iter_mut().enumerate() {
                for (c, v) in row.iter_mut().enumerate() {
                    *v = a[r][c] as f32;
                }
            }
            h.srow_x = srow[0];
            h.srow_y = srow[1];
            h.srow_z = srow[2];
            let sp = vol.spacing();
            h.pixdim = [
                1.0,
                sp[0] as f32,
                sp[1] as f32,
                sp[2] as f32,
                1.0,
                1.0,
                1.0,
                1.0,
            ];
            if let Some(q) = geometry::affine_to_quaternion(a) {
                // The qform can only hold a rotation; keep it only when the affine is one.
                let back = geometry::quaternion_to_affine(&q);
                if geometry::max_abs_diff(&back, a) < 1e-4 {
                    h.qform_code = 2;
                    h.quatern_b = q.b as f32;
                    h.quatern_c = q.c as f32;
                    h.quatern_d = q.d as f32;
                    h.quatern_x = q.offset[0] as f32;
                    h.quatern_y = q.offset[1] as f32;
                    h.quatern_z = q.offset[2] as f32;
                    h.pixdim[0] = q.qfac as f32;
                }
            }
            h.xyzt_units = 2 | 8; // mm, s
        }
    }
    let mut desc = [0u8; 80];
    let bytes = opts.description.as_bytes();
    let n = bytes.len().min(79);
    desc[..n].copy_from_slice(&bytes[..n]);
    h.descrip = desc.to_vec();
    h
}

fn apply_geometry(h: &mut NiftiHeader, g: &NiftiGeometry) {
    h.qform_code = g.qform_code;
    h.sform_code = g.sform_code;
    h.pixdim = g.pixdim;
    h.quatern_b = g.quatern[0];
    h.quatern_c = g.quatern[1];
    h.quatern_d = g.quatern[2];
    h.quatern_x = g.qoffset[0];
    h.quatern_y = g.qoffset[1];
    h.quatern_z = g.qoffset[2];
    h.srow_x = g.srow[0];
    h.srow_y = g.srow[1];
    h.srow_z = g.srow[2];
    h.xyzt_units = g.xyzt_units;
}

/// Writes a volume as NIfTI-1 (`.nii`, or gzip-compressed `.nii.gz` by extension), atomically.
///
/// The geometry written is the volume's own NIfTI fields when it carries them (a volume read
/// from a file, or mapped back onto its grid), so sform and qform round-trip exactly; otherwise
/// an sform and qform made from its affine.
///
/// # Errors
/// [`Error::InvalidParameter`] for a name that does not end in `.nii` or `.nii.gz`;
/// [`Error::Io`] when the folder cannot be written.
pub fn write_nifti<T: NiftiWritable>(
    path: impl AsRef<Path>,
    vol: &Volume<T>,
    opts: &WriteOptions,
) -> Result<()> {
    let path = path.as_ref();
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let lower = name.to_ascii_lowercase();
    let ext = if lower.ends_with(".nii.gz") {
        "nii.gz"
    } else if lower.ends_with(".nii") {
        "nii"
    } else {
        return Err(Error::param(
            "path",
            format!(
                "{}: a NIfTI file name must end in .nii or .nii.gz",
                path.display()
            ),
        ));
    };
    let header = header_for(vol, opts);
    crate::atomic::write_atomic_with(
        path,
        |tmp| {
            let level = opts.compression_level.min(9);
            let mut w = nifti::writer::WriterOptions::new(tmp).reference_header(&header);
            if ext == "nii.gz" {
                w = w.compression_level(flate2::Compression::new(level));
            }
            T::write_view(&w, &vol.view()).map_err(|e| match e {
                nifti::NiftiError::Io(e) => Error::io(path, e),
                other => Error::InvalidNifti {
                    path: path.to_path_buf(),
                    reason: other.to_string(),
                },
            })
        },
        |e| Error::io(path, e),
    )
}
