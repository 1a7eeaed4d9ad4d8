//! CT series from DICOM files (with dicom-rs): grouping by series, slice order along the slice
//! normal, Hounsfield units through the rescale slope and intercept, and the voxel → RAS
//! affine from the patient (LPS) geometry.
//!
//! Voxel axes: `i` runs along a row (the first Image Orientation vector, Pixel Spacing's
//! second value), `j` down the columns (second vector, Pixel Spacing's first value), `k` across
//! slices in increasing position along the slice normal (row × column). The affine maps
//! `(i, j, k)` to RAS millimetres (DICOM's LPS with x and y negated).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use dicom_dictionary_std::tags;
use dicom_object::{DefaultDicomObject, OpenFileOptions};
use dicom_pixeldata::{ConvertOptions, ModalityLutOption, PixelDecoder};

use crate::error::{Error, Result};
use crate::geometry::Affine;
use crate::nii::Limits;
use crate::volume::Volume;

/// Options of [`read_dicom_series`].
#[derive(Debug, Clone, PartialEq)]
pub struct DicomReadOptions {
    /// The Series Instance UID to read when the folder holds several series.
    pub series: Option<String>,
    /// Accept a gantry tilt (slices shifted sideways): the affine then has a shear.
    pub allow_tilt: bool,
    /// Largest relative difference between slice gaps accepted as uniform.
    pub spacing_tolerance: f64,
    /// Size limits checked before allocating.
    pub limits: Limits,
    /// Leave out files that look like DICOM (a `.dcm` name or the `DICM` marker) but cannot be
    /// read, with a warning, instead of refusing the series (a slice missing at either end
    /// would otherwise go unnoticed).
    pub skip_unreadable: bool,
}

impl Default for DicomReadOptions {
    fn default() -> Self {
        DicomReadOptions {
            series: None,
            allow_tilt: false,
            spacing_tolerance: 0.01,
            limits: Limits::default(),
            skip_unreadable: false,
        }
    }
}

/// One slice of a series, in volume order.
#[derive(Debug, Clone, PartialEq)]
pub struct SliceInfo {
    /// Its file.
    pub path: PathBuf,
    /// SOP Instance UID.
    pub sop_instance_uid: String,
    /// SOP Class UID.
    pub sop_class_uid: String,
    /// Image Position (Patient), LPS mm.
    pub position: [f64; 3],
    /// Instance Number, when present.
    pub instance_number: Option<i64>,
}

/// A series read into a volume, with what a DICOM writer needs to refer back to it.
#[derive(Debug, Clone)]
pub struct DicomSeries {
    /// Hounsfield units, `(columns, rows, slices)` in Fortran order, affine in RAS.
    pub volume: Volume<f32>,
    /// The slices in volume order (`k`).
    pub slices: Vec<SliceInfo>,
    /// Series Instance UID.
    pub series_uid: String,
    /// Study Instance UID.
    pub study_uid: String,
    /// Frame of Reference UID.
    pub frame_of_reference_uid: String,
    /// Modality.
    pub modality: String,
    /// Transfer syntax UID of the first slice.
    pub transfer_syntax: String,
    /// Patient and study attributes copied into derived objects (keyword → value):
    /// PatientName, PatientID, PatientBirthDate, PatientSex, StudyDate, StudyTime,
    /// AccessionNumber, ReferringPhysicianName, StudyID, SeriesDescription.
    pub attributes: BTreeMap<String, String>,
    /// Smallest and largest gap between neighbouring slices (mm).
    pub slice_gap_range: [f64; 2],
    /// Files skipped and other remarks.
    pub warnings: Vec<String>,
}

/// A series found in a folder.
#[derive(Debug, Clone, PartialEq)]
pub struct SeriesSummary {
    /// Series Instance UID.
    pub uid: String,
    /// Modality.
    pub modality: String,
    /// Series Description.
    pub description: String,
    /// Image files.
    pub files: usize,
}

fn derr(path: &Path, reason: impl Into<String>) -> Error {
    Error::Dicom {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

struct Header {
    path: PathBuf,
    series_uid: String,
    sop_instance_uid: String,
    sop_class_uid: String,
    modality: String,
    description: String,
    has_pixels: bool,
    position: Option<[f64; 3]>,
    orientation: Option<[f64; 6]>,
    spacing: Option<[f64; 2]>,
    rows: u32,
    cols: u32,
    frames: u32,
    instance_number: Option<i64>,
    slice_thickness: Option<f64>,
    spacing_between_slices: Option<f64>,
    transfer_syntax: String,
    attributes: BTreeMap<String, String>,
    study_uid: String,
    frame_of_reference_uid: String,
}

fn text(obj: &DefaultDicomObject, tag: dicom_core::Tag) -> String {
    obj.element_opt(tag)
        .ok()
        .flatten()
        .and_then(|e| {
            e.to_str()
                .ok()
                .map(|s| s.trim().trim_end_matches('\0').to_string())
        })
        .unwrap_or_default()
}

fn clean_uid(u: &str) -> String {
    u.trim().trim_end_matches('\0').to_string()
}

fn floats(obj: &DefaultDicomObject, tag: dicom_core::Tag) -> Option<Vec<f64>> {
    obj.element_opt(tag)
        .ok()
        .flatten()
        .and_then(|e| e.to_multi_float64().ok())
}

fn int(obj: &DefaultDicomObject, tag: dicom_core::Tag) -> Option<i64> {
    obj.element_opt(tag)
        .ok()
        .flatten()
        .and_then(|e| e.to_int::<i64>().ok())
}

/// The Image Pixel attributes the decoder relies on, checked before it runs (dicom-pixeldata
/// asserts on some of them): one sample per pixel, 8, 16 or 32 bits allocated, 1 to that many
/// stored, the high bit inside, and the frames' decoded size within the limits.
fn check_pixel_module(
    obj: &DefaultDicomObject,
    pixels: usize,
    limits: &Limits,
) -> std::result::Result<(), String> {
    // Present but unreadable is an error too: the decoder would read it its own way.
    let int = |tag: dicom_core::Tag, name: &str| -> std::result::Result<Option<i64>, String> {
        match obj.element_opt(tag).ok().flatten() {
            None => Ok(None),
            Some(e) => e
                .to_int::<i64>()
                .map(Some)
                .map_err(|_| format!("{name} is not an integer")),
        }
    };
    let samples = int(tags::SAMPLES_PER_PIXEL, "Samples per Pixel")?.unwrap_or(1);
    if samples != 1 {
        return Err(format!(
            "not a greyscale image ({samples} samples per pixel)"
        ));
    }
    let allocated =
        int(tags::BITS_ALLOCATED, "Bits Allocated")?.ok_or("no Bits Allocated".to_string())?;
    if ![8, 16, 32].contains(&allocated) {
        return Err(format!("Bits Allocated {allocated}: expected 8, 16 or 32"));
    }
    let stored = int(tags::BITS_STORED, "Bits Stored")?.unwrap_or(allocated);
    if !(1..=allocated).contains(&stored) {
        return Err(format!(
            "Bits Stored {stored} with Bits Allocated {allocated}: expected 1 to {allocated}"
        ));
    }
    if let Some(high) = int(tags::HIGH_BIT, "High Bit")?
        && !(0..allocated).contains(&high)
    {
        return Err(format!("High Bit {high} with Bits Allocated {allocated}"));
    }
    if let Some(rep) = int(tags::PIXEL_REPRESENTATION, "Pixel Representation")?
        && rep != 0
        && rep != 1
    {
        return Err(format!("Pixel Representation {rep}: expected 0 or 1"));
    }
    let frames = int(tags::NUMBER_OF_FRAMES, "Number of Frames")?.unwrap_or(1);
    if frames < 1 {
        return Err(format!("Number of Frames {frames}"));
    }
    // The decoder makes all frames, of `allocated` bits each, then one f32 copy of a frame.
    let bytes = (frames as u128) * (pixels as u128) * (allocated as u128 / 8) + pixels as u128 * 4;
    if bytes > u128::from(limits.max_alloc) {
        return Err(format!(
            "{frames} frame(s) of {pixels} pixels decode to {bytes} bytes, more than the limit \
             of {}",
            limits.max_alloc
        ));
    }
    Ok(())
}

fn read_header(path: &Path, max_bytes: u64) -> std::result::Result<Header, String> {
    crate::dicom_structure::check_file(path, max_bytes)
        .map_err(|e| format!("not a usable DICOM file: {e}"))?;
    let obj = OpenFileOptions::new()
        .read_until(tags::PIXEL_DATA)
        .open_file(path)
        .map_err(|e| format!("not a readable DICOM file: {e}"))?;
    let has_pixels = {
        // read_until stops before the pixel data; its presence is implied by the image
        // attributes, and checked again when decoding.
        obj.element_opt(tags::ROWS).ok().flatten().is_some()
            && obj.element_opt(tags::COLUMNS).ok().flatten().is_some()
    };
    let three = |v: Option<Vec<f64>>| v.filter(|v| v.len() >= 3).map(|v| [v[0], v[1], v[2]]);
    let six = |v: Option<Vec<f64>>| {
        v.filter(|v| v.len() >= 6)
            .map(|v| [v[0], v[1], v[2], v[3], v[4], v[5]])
    };
    let mut attributes = BTreeMap::new();
    for (key, tag) in [
        ("PatientName", tags::PATIENT_NAME),
        ("PatientID", tags::PATIENT_ID),
        ("PatientBirthDate", tags::PATIENT_BIRTH_DATE),
        ("PatientSex", tags::PATIENT_SEX),
        ("StudyDate", tags::STUDY_DATE),
        ("StudyTime", tags::STUDY_TIME),
        ("AccessionNumber", tags::ACCESSION_NUMBER),
        ("ReferringPhysicianName", tags::REFERRING_PHYSICIAN_NAME),
        ("StudyID", tags::STUDY_ID),
        ("SeriesDescription", tags::SERIES_DESCRIPTION),
    ] {
        attributes.insert(key.to_string(), text(&obj, tag));
    }
    Ok(Header {
        path: path.to_path_buf(),
        series_uid: text(&obj, tags::SERIES_INSTANCE_UID),
        // Some anonymised files keep these UIDs only in their file meta information.
        sop_instance_uid: Some(text(&obj, tags::SOP_INSTANCE_UID))
            .filter(|u| !u.is_empty())
            .unwrap_or_else(|| clean_uid(obj.meta().media_storage_sop_instance_uid())),
        sop_class_uid: Some(text(&obj, tags::SOP_CLASS_UID))
            .filter(|u| !u.is_empty())
            .unwrap_or_else(|| clean_uid(obj.meta().media_storage_sop_class_uid())),
        modality: text(&obj, tags::MODALITY),
        description: text(&obj, tags::SERIES_DESCRIPTION),
        has_pixels,
        position: three(floats(&obj, tags::IMAGE_POSITION_PATIENT)),
        orientation: six(floats(&obj, tags::IMAGE_ORIENTATION_PATIENT)),
        spacing: floats(&obj, tags::PIXEL_SPACING)
            .filter(|v| v.len() >= 2)
            .map(|v| [v[0], v[1]]),
        rows: int(&obj, tags::ROWS).unwrap_or(0).max(0) as u32,
        cols: int(&obj, tags::COLUMNS).unwrap_or(0).max(0) as u32,
        frames: int(&obj, tags::NUMBER_OF_FRAMES).unwrap_or(1).max(1) as u32,
        instance_number: int(&obj, tags::INSTANCE_NUMBER),
        slice_thickness: floats(&obj, tags::SLICE_THICKNESS).and_then(|v| v.first().copied()),
        spacing_between_slices: floats(&obj, tags::SPACING_BETWEEN_SLICES)
            .and_then(|v| v.first().copied()),
        transfer_syntax: obj
            .meta()
            .transfer_syntax()
            .trim_end_matches('\0')
            .to_string(),
        attributes,
        study_uid: text(&obj, tags::STUDY_INSTANCE_UID),
        frame_of_reference_uid: text(&obj, tags::FRAME_OF_REFERENCE_UID),
    })
}

fn list_files(path: &Path) -> Result<Vec<PathBuf>> {
    if path.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    let rd = std::fs::read_dir(path).map_err(|e| Error::Io {
        path: path.to_path_buf(),
        source: e,
    })?;
    let mut files: Vec<PathBuf> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && !p
                    .file_name()
                    .map(|n| n.to_string_lossy().starts_with('.'))
                    .unwrap_or(true)
                && !p
                    .file_name()
                    .is_some_and(|n| n.eq_ignore_ascii_case("DICOMDIR"))
        })
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(derr(path, "no files"));
    }
    Ok(files)
}

/// `true` for a `.dcm` file or a file with the `DICM` marker.
fn file_is_dicom(p: &Path) -> bool {
    if p.extension().is_some_and(|e| e.eq_ignore_ascii_case("dcm")) {
        return true;
    }
    let mut buf = [0u8; 132];
    std::fs::File::open(p)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut buf))
        .map(|_| &buf[128..132] == b"DICM")
        .unwrap_or(false)
}

/// `true` when `path` looks like DICOM input: a `.dcm` file, a file with the `DICM` marker,
/// or a folder holding such a file.
pub fn is_dicom(path: &Path) -> bool {
    if path.is_dir() {
        std::fs::read_dir(path)
            .map(|rd| {
                rd.filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.is_file())
                    .take(8)
                    .any(|p| file_is_dicom(&p))
            })
            .unwrap_or(false)
    } else {
        file_is_dicom(path)
    }
}

fn read_headers(
    path: &Path,
    skip_unreadable: bool,
    limits: &Limits,
) -> Result<(Vec<Header>, Vec<String>)> {
    let mut headers = Vec::new();
    let mut warnings = Vec::new();
    for f in list_files(path)? {
        match read_header(&f, limits.max_alloc) {
            Ok(h) if h.has_pixels => headers.push(h),
            Ok(h) => warnings.push(format!(
                "{}: skipped: no image (SOP class {})",
                f.display(),
                h.sop_class_uid
            )),
            // A damaged slice of the series: refused, unless asked to leave it out (a slice
            // missing at either end of the series leaves no gap to notice).
            Err(e) if file_is_dicom(&f) && !skip_unreadable => {
                return Err(derr(
                    &f,
                    format!(
                        "{e}; this file looks like DICOM: repair or remove it, or pass \
                         --skip-unreadable to leave it out"
                    ),
                ));
            }
            Err(e) => warnings.push(format!("{}: skipped: {e}", f.display())),
        }
    }
    if headers.is_empty() {
        let why = warnings.first().cloned().unwrap_or_default();
        return Err(derr(path, format!("no DICOM image files ({why})")));
    }
    Ok((headers, warnings))
}

/// The series in a folder (or file), with their image counts.
///
/// # Errors
/// [`Error::Dicom`] when no DICOM image is found.
pub fn list_series(path: &Path) -> Result<Vec<SeriesSummary>> {
    let (headers, _) = read_headers(path, true, &Limits::default())?;
    let mut out: Vec<SeriesSummary> = Vec::new();
    for h in &headers {
        match out.iter_mut().find(|s| s.uid == h.series_uid) {
            Some(s) => s.files += 1,
            None => out.push(SeriesSummary {
                uid: h.series_uid.clone(),
                modality: h.modality.clone(),
                description: h.description.clone(),
                files: 1,
            }),
        }
    }
    Ok(out)
}

fn cross(a: [f64; 3], b: [f64; 3]) -> [f64; 3] {
    [
        a[1] * b[2] - a[2] * b[1],
        a[2] * b[0] - a[0] * b[2],
        a[0] * b[1] - a[1] * b[0],
    ]
}

fn dot(a: [f64; 3], b: [f64; 3]) -> f64 {
    a[0] * b[0] + a[1] * b[1] + a[2] * b[2]
}

fn norm(a: [f64; 3]) -> f64 {
    dot(a, a).sqrt()
}

/// Reads one CT series from a folder (or a single file) into a volume in Hounsfield units.
///
/// # Errors
/// [`Error::Dicom`] naming the file or folder: no images, several series without
/// `opts.series`, missing geometry, differing orientation or size, duplicate slice positions,
/// missing slices or uneven gaps, gantry tilt (unless allowed), multi-frame objects, and pixel
/// data that cannot be decoded (with its transfer syntax).
pub fn read_dicom_series(path: &Path, opts: &DicomReadOptions) -> Result<DicomSeries> {
    let (headers, mut warnings) = read_headers(path, opts.skip_unreadable, &opts.limits)?;
    let mut by_series: BTreeMap<String, Vec<Header>> = BTreeMap::new();
    for h in headers {
        by_series.entry(h.series_uid.clone()).or_default().push(h);
    }
    let uid = match &opts.series {
        Some(u) => {
            if !by_series.contains_key(u) {
                return Err(derr(
                    path,
                    format!(
                        "no series {u}; found: {}",
                        by_series
                            .keys()
                            .map(|k| if k.is_empty() {
                                "(no Series Instance UID)"
                            } else {
                                k
                            })
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ));
            }
            u.clone()
        }
        None if by_series.len() == 1 => by_series.keys().next().expect("one").clone(),
        None => {
            let list: Vec<String> = by_series
                .iter()
                .map(|(u, hs)| {
                    format!(
                        "{u} ({} {} images{})",
                        hs.len(),
                        hs[0].modality,
                        if hs[0].description.is_empty() {
                            String::new()
                        } else {
                            format!(", {:?}", hs[0].description)
                        }
                    )
                })
                .collect();
            return Err(derr(
                path,
                format!(
                    "holds {} series; choose one with --series UID: {}",
                    by_series.len(),
                    list.join("; ")
                ),
            ));
        }
    };
    let mut hs = by_series.remove(&uid).expect("present");
    for (other, v) in &by_series {
        warnings.push(format!("skipped {} file(s) of series {other}", v.len()));
    }
    let first = &hs[0];
    if first.modality != "CT" {
        warnings.push(format!(
            "modality is {:?}, not CT: intensities may not be Hounsfield units",
            first.modality
        ));
    }
    if let Some(h) = hs.iter().find(|h| h.frames > 1) {
        return Err(derr(
            &h.path,
            format!("multi-frame image ({} frames) is not supported", h.frames),
        ));
    }
    let (rows, cols) = (first.rows as usize, first.cols as usize);
    if rows == 0 || cols == 0 {
        return Err(derr(&first.path, "zero rows or columns"));
    }
    let orientation = first
        .orientation
        .ok_or_else(|| derr(&first.path, "no Image Orientation (Patient)"))?;
    let spacing = first
        .spacing
        .ok_or_else(|| derr(&first.path, "no Pixel Spacing"))?;
    if spacing.iter().any(|s| !(*s > 0.0 && s.is_finite())) {
        return Err(derr(
            &first.path,
            format!("invalid Pixel Spacing {spacing:?}"),
        ));
    }
    for h in &hs {
        if h.rows != first.rows || h.cols != first.cols {
            return Err(derr(
                &h.path,
                format!(
                    "{}×{} pixels, but {} has {}×{}",
                    h.cols,
                    h.rows,
                    first.path.display(),
                    first.cols,
                    first.rows
                ),
            ));
        }
        let o = h
            .orientation
            .ok_or_else(|| derr(&h.path, "no Image Orientation (Patient)"))?;
        if o.iter()
            .zip(&orientation)
            .any(|(a, b)| (a - b).abs() > 1e-4)
        {
            return Err(derr(
                &h.path,
                format!("orientation {o:?} differs from {orientation:?} of the other slices"),
            ));
        }
        if h.position.is_none() {
            return Err(derr(&h.path, "no Image Position (Patient)"));
        }
        let finite = |v: &[f64]| v.iter().all(|x| x.is_finite());
        if !finite(&o) || !h.position.is_some_and(|p| finite(&p)) {
            return Err(derr(
                &h.path,
                format!(
                    "Image Orientation (Patient) {o:?} or Image Position (Patient) {:?} holds \
                     a non-finite number",
                    h.position.unwrap_or_default()
                ),
            ));
        }
    }
    let row_dir = [orientation[0], orientation[1], orientation[2]];
    let col_dir = [orientation[3], orientation[4], orientation[5]];
    let normal = cross(row_dir, col_dir);
    if (norm(normal) - 1.0).abs() > 1e-3 || dot(row_dir, col_dir).abs() > 1e-3 {
        return Err(derr(
            &first.path,
            format!("Image Orientation (Patient) {orientation:?} is not two orthonormal vectors"),
        ));
    }
    let pos = |h: &Header| h.position.expect("checked");
    hs.sort_by(|a, b| {
        dot(pos(a), normal)
            .partial_cmp(&dot(pos(b), normal))
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    for w in hs.windows(2) {
        if (dot(pos(&w[1]), normal) - dot(pos(&w[0]), normal)).abs() < 1e-4 {
            return Err(derr(
                &w[1].path,
                format!(
                    "duplicate slice position {:?} (also in {})",
                    pos(&w[1]),
                    w[0].path.display()
                ),
            ));
        }
    }
    let n = hs.len();
    let mut gap_range = [0.0f64; 2];
    let step: [f64; 3] = if n > 1 {
        let gaps: Vec<f64> = hs
            .windows(2)
            .map(|w| dot(pos(&w[1]), normal) - dot(pos(&w[0]), normal))
            .collect();
        let (lo, hi) = gaps
            .iter()
            .fold((f64::INFINITY, 0f64), |(a, b), g| (a.min(*g), b.max(*g)));
        gap_range = [lo, hi];
        let mut sorted = gaps.clone();
        sorted.sort_by(|a, b| a.partial_cmp(b).expect("finite"));
        let median = sorted[sorted.len() / 2];
        if (hi - lo) > opts.spacing_tolerance * median {
            // Name the widest gap: most often a missing slice.
            let (i, g) = gaps
                .iter()
                .enumerate()
                .max_by(|a, b| {
                    ((a.1 - median).abs())
                        .partial_cmp(&(b.1 - median).abs())
                        .expect("finite")
                })
                .expect("at least one gap");
            let missing = (g / median).round() as i64 - 1;
            let what = if missing >= 1 {
                format!(" ({missing} slice(s) missing?)")
            } else {
                String::new()
            };
            return Err(derr(
                path,
                format!(
                    "uneven slice spacing: gaps from {lo:.4} to {hi:.4} mm (median {median:.4}); \
                     {g:.4} mm between {} and {}{what}",
                    hs[i].path.display(),
                    hs[i + 1].path.display()
                ),
            ));
        }
        let total = [0, 1, 2].map(|a| pos(&hs[n - 1])[a] - pos(&hs[0])[a]);
        let step = total.map(|t| t / (n - 1) as f64);
        let along = dot(step, normal);
        let sideways = norm([0, 1, 2].map(|a| step[a] - along * normal[a]));
        let tilt = sideways.atan2(along).to_degrees();
        if tilt.abs() > 0.01 && !opts.allow_tilt {
            return Err(derr(
                path,
                format!(
                    "gantry tilt of {tilt:.3}° (slices shift sideways); pass --allow-tilt to \
                     read it with a sheared affine"
                ),
            ));
        }
        step
    } else {
        // One slice: no gap to measure; the header's slice spacing, else its thickness.
        let ok = |v: Option<f64>| v.filter(|t| t.is_finite() && *t > 0.0);
        let h = &hs[0];
        let (thick, source) = match (ok(h.spacing_between_slices), ok(h.slice_thickness)) {
            (Some(t), _) => (t, "Spacing Between Slices"),
            (None, Some(t)) => (t, "Slice Thickness"),
            (None, None) => (
                spacing[0],
                "the pixel spacing (no slice thickness in the header)",
            ),
        };
        warnings.push(format!(
            "a single slice: its spacing, {thick} mm, is taken from {source}"
        ));
        normal.map(|v| v * thick)
    };
    let voxels = (rows * cols) as u64 * n as u64;
    if voxels > opts.limits.max_voxels || voxels * 4 > opts.limits.max_alloc {
        return Err(Error::LimitExceeded {
            path: path.to_path_buf(),
            what: "voxels",
            requested: voxels as u128,
            limit: opts.limits.max_voxels,
        });
    }
    let mut data = vec![0f32; rows * cols * n];
    let conv = ConvertOptions::new().with_modality_lut(ModalityLutOption::Default);
    for (k, h) in hs.iter().enumerate() {
        let obj = dicom_object::open_file(&h.path)
            .map_err(|e| derr(&h.path, format!("cannot read: {e}")))?;
        check_pixel_module(&obj, rows * cols, &opts.limits).map_err(|e| derr(&h.path, e))?;
        let dec = obj.decode_pixel_data().map_err(|e| {
            derr(
                &h.path,
                format!(
                    "cannot decode the pixel data (transfer syntax {}): {e}",
                    h.transfer_syntax
                ),
            )
        })?;
        if dec.samples_per_pixel() != 1 {
            return Err(derr(&h.path, "not a greyscale image"));
        }
        let px: Vec<f32> = dec
            .to_vec_frame_with_options(0, &conv)
            .map_err(|e| derr(&h.path, format!("cannot convert the pixel data: {e}")))?;
        if px.len() != rows * cols {
            return Err(derr(
                &h.path,
                format!("{} pixels decoded, {} expected", px.len(), rows * cols),
            ));
        }
        data[k * rows * cols..(k + 1) * rows * cols].copy_from_slice(&px);
    }
    // LPS voxel → world, then to RAS by negating x and y.
    let p0 = pos(&hs[0]);
    let cols_lps = row_dir.map(|v| v * spacing[1]);
    let rows_lps = col_dir.map(|v| v * spacing[0]);
    let mut affine: Affine = [[0.0; 4]; 4];
    for a in 0..3 {
        let s = if a < 2 { -1.0 } else { 1.0 };
        affine[a] = [s * cols_lps[a], s * rows_lps[a], s * step[a], s * p0[a]];
    }
    affine[3] = [0.0, 0.0, 0.0, 1.0];
    let volume =
        Volume::from_vec(data, [cols, rows, n], affine)?.with_source(Some(path.to_path_buf()));
    let first = &hs[0];
    Ok(DicomSeries {
        slices: hs
            .iter()
            .map(|h| SliceInfo {
                path: h.path.clone(),
                sop_instance_uid: h.sop_instance_uid.clone(),
                sop_class_uid: h.sop_class_uid.clone(),
                position: pos(h),
                instance_number: h.instance_number,
            })
            .collect(),
        series_uid: uid,
        study_uid: first.study_uid.clone(),
        frame_of_reference_uid: first.frame_of_reference_uid.clone(),
        modality: first.modality.clone(),
        transfer_syntax: first.transfer_syntax.clone(),
        attributes: first.attributes.clone(),
        slice_gap_range: gap_range,
        warnings,
        volume,
    })
}
