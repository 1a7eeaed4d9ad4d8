//! DICOM Segmentation (binary SEG) objects for a source CT series: one segment per class, one
//! frame per (segment, source slice that holds any of it), each frame referencing its source
//! image, in the source's frame of reference. Written with dicom-rs, explicit VR little endian.

use crate::mask::ClassMask;
use std::path::Path;

use dicom_core::value::{DataSetSequence, PrimitiveValue};
use dicom_core::{DataElement, Tag, VR};
use dicom_dictionary_std::{tags, uids};
use dicom_object::{FileMetaTableBuilder, InMemDicomObject};

use crate::dicom::DicomSeries;
use crate::error::{Error, Result};

/// A coded concept (code value, coding scheme, meaning), e.g. `("10200004", "SCT", "Liver")`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Code {
    /// Code value.
    pub value: String,
    /// Coding scheme designator (`SCT`, `DCM`, or a local `99…` scheme).
    pub scheme: String,
    /// Code meaning.
    pub meaning: String,
}

impl Code {
    /// A code.
    pub fn new(value: &str, scheme: &str, meaning: &str) -> Self {
        Code {
            value: value.into(),
            scheme: scheme.into(),
            meaning: meaning.into(),
        }
    }
}

/// One segment: its description and its mask on the source series' voxel grid (the
/// [`DicomSeries::volume`] grid, Fortran order: column fastest, then row, then slice).
#[derive(Debug, Clone)]
pub struct Segment {
    /// Segment label shown by viewers.
    pub label: String,
    /// Segmented property category (e.g. Anatomical Structure).
    pub category: Code,
    /// Segmented property type (e.g. Liver).
    pub property: Code,
    /// Display colour (sRGB), written as CIELab.
    pub colour: [u8; 3],
    /// The mask.
    pub mask: ClassMask,
}

/// Settings of [`write_dicom_seg`].
#[derive(Debug, Clone)]
pub struct SegOptions {
    /// Algorithm name written into every segment.
    pub algorithm: String,
    /// Software version.
    pub software_version: String,
    /// Series description of the new series.
    pub series_description: String,
    /// Series number of the new series.
    pub series_number: i32,
}

impl Default for SegOptions {
    fn default() -> Self {
        SegOptions {
            algorithm: "univ CLIP-Driven Universal Model".into(),
            software_version: env!("CARGO_PKG_VERSION").into(),
            series_description: "univ segmentation".into(),
            series_number: 900,
        }
    }
}

/// A new UID under the `2.25` root (a 128-bit number from the time, the process and a hash of
/// `salt`).
pub fn new_uid(salt: &str) -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let mut h: u128 = 0x6c62_272e_07bb_0142_62b8_2175_6295_c58d;
    for b in format!("{t}:{}:{salt}", std::process::id()).bytes() {
        h ^= u128::from(b);
        h = h.wrapping_mul(0x0000_0000_0100_0000_0000_0000_0000_013B);
    }
    format!("2.25.{}", h >> 1)
}

fn s(obj: &mut InMemDicomObject, tag: Tag, vr: VR, v: impl Into<String>) {
    obj.put(DataElement::new(tag, vr, PrimitiveValue::from(v.into())));
}

fn strs(obj: &mut InMemDicomObject, tag: Tag, vr: VR, v: Vec<String>) {
    obj.put(DataElement::new(tag, vr, PrimitiveValue::Strs(v.into())));
}

fn us(obj: &mut InMemDicomObject, tag: Tag, v: &[u16]) {
    obj.put(DataElement::new(
        tag,
        VR::US,
        PrimitiveValue::U16(v.to_vec().into()),
    ));
}

fn seq(obj: &mut InMemDicomObject, tag: Tag, items: Vec<InMemDicomObject>) {
    obj.put(DataElement::new(tag, VR::SQ, DataSetSequence::from(items)));
}

fn code_item(c: &Code) -> InMemDicomObject {
    let mut o = InMemDicomObject::new_empty();
    s(&mut o, tags::CODE_VALUE, VR::SH, c.value.clone());
    s(
        &mut o,
        tags::CODING_SCHEME_DESIGNATOR,
        VR::SH,
        c.scheme.clone(),
    );
    s(&mut o, tags::CODE_MEANING, VR::LO, c.meaning.clone());
    o
}

fn ds(v: f64) -> String {
    // DS holds at most 16 characters.
    let t = format!("{v:.6}");
    let t = t.trim_end_matches('0').trim_end_matches('.').to_string();
    if t.len() > 16 { format!("{v:.4e}") } else { t }
}

/// sRGB → DICOM's scaled CIELab (0..65535).
fn cielab(rgb: [u8; 3]) -> [u16; 3] {
    let lin = |c: u8| {
        let c = f64::from(c) / 255.0;
        if c <= 0.04045 {
            c / 12.92
        } else {
            ((c + 0.055) / 1.055).powf(2.4)
        }
    };
    let (r, g, b) = (lin(rgb[0]), lin(rgb[1]), lin(rgb[2]));
    let x = (0.4124 * r + 0.3576 * g + 0.1805 * b) / 0.95047;
    let y = 0.2126 * r + 0.7152 * g + 0.0722 * b;
    let z = (0.0193 * r + 0.1192 * g + 0.9505 * b) / 1.08883;
    let f = |t: f64| {
        if t > 0.008856 {
            t.cbrt()
        } else {
            7.787 * t + 16.0 / 116.0
        }
    };
    let (fx, fy, fz) = (f(x), f(y), f(z));
    let l = 116.0 * fy - 16.0;
    let a = 500.0 * (fx - fy);
    let bb = 200.0 * (fy - fz);
    [
        (l / 100.0 * 65535.0).round().clamp(0.0, 65535.0) as u16,
        ((a + 128.0) / 255.0 * 65535.0).round().clamp(0.0, 65535.0) as u16,
        ((bb + 128.0) / 255.0 * 65535.0).round().clamp(0.0, 65535.0) as u16,
    ]
}

/// Writes a binary DICOM Segmentation of `segments` (empty masks are left out) for the source
/// series, atomically. Returns the number of segments and frames written.
///
/// # Errors
/// [`Error::Dicom`] when a mask does not fit the series' grid, no segment has any voxel, or the
/// file cannot be written.
pub fn write_dicom_seg(
    path: &Path,
    source: &DicomSeries,
    segments: &[Segment],
    opts: &SegOptions,
) -> Result<(usize, usize)> {
    let err = |reason: String| Error::Dicom {
        path: path.to_path_buf(),
        reason,
    };
    let [cols, rows, nslices] = source.volume.shape();
    let plane = rows * cols;
    if nslices != source.slices.len() {
        return Err(err("the series' slices do not match its volume".into()));
    }
    for sgm in segments {
        if sgm.mask.shape() != [cols, rows, nslices] {
            return Err(err(format!(
                "mask of {:?} has shape {:?}, the series {:?}",
                sgm.label,
                sgm.mask.shape(),
                [cols, rows, nslices]
            )));
        }
    }
    let kept: Vec<&Segment> = segments.iter().filter(|s| !s.mask.is_empty()).collect();
    if kept.is_empty() {
        return Err(err("no segment has any voxel: nothing to write".into()));
    }
    let a = source.volume.affine();
    // Back to DICOM's LPS: negate the first two rows of the RAS affine.
    let col_step = [-a[0][0], -a[1][0], a[2][0]];
    let row_step = [-a[0][1], -a[1][1], a[2][1]];
    let slice_step = [-a[0][2], -a[1][2], a[2][2]];
    let norm = |v: [f64; 3]| (v[0] * v[0] + v[1] * v[1] + v[2] * v[2]).sqrt();
    let (dc, dr, dz) = (norm(col_step), norm(row_step), norm(slice_step));
    let iop: Vec<String> = [
        col_step[0] / dc,
        col_step[1] / dc,
        col_step[2] / dc,
        row_step[0] / dr,
        row_step[1] / dr,
        row_step[2] / dr,
    ]
    .iter()
    .map(|v| ds(*v))
    .collect();
    // Type 1 identifiers that anonymised series sometimes lack are made up (and said so).
    let study_uid = if source.study_uid.is_empty() {
        new_uid("study")
    } else {
        source.study_uid.clone()
    };
    let frame_uid = if source.frame_of_reference_uid.is_empty() {
        new_uid("frame-of-reference")
    } else {
        source.frame_of_reference_uid.clone()
    };
    if let Some(sl) = source.slices.iter().find(|s| s.sop_instance_uid.is_empty()) {
        return Err(err(format!(
            "{} has no SOP Instance UID to refer to",
            sl.path.display()
        )));
    }
    let sop_uid = new_uid(&format!("sop:{}", source.series_uid));
    let series_uid = new_uid(&format!("series:{}", source.series_uid));
    let dim_uid = new_uid("dimension");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (date, time) = civil(now);

    let mut o = InMemDicomObject::new_empty();
    s(&mut o, tags::SPECIFIC_CHARACTER_SET, VR::CS, "ISO_IR 192");
    strs(
        &mut o,
        tags::IMAGE_TYPE,
        VR::CS,
        vec!["DERIVED".into(), "PRIMARY".into()],
    );
    s(
        &mut o,
        tags::SOP_CLASS_UID,
        VR::UI,
        uids::SEGMENTATION_STORAGE,
    );
    s(&mut o, tags::SOP_INSTANCE_UID, VR::UI, sop_uid.clone());
    for (kw, tag, vr) in [
        ("PatientName", tags::PATIENT_NAME, VR::PN),
        ("PatientID", tags::PATIENT_ID, VR::LO),
        ("PatientBirthDate", tags::PATIENT_BIRTH_DATE, VR::DA),
        ("PatientSex", tags::PATIENT_SEX, VR::CS),
        ("StudyDate", tags::STUDY_DATE, VR::DA),
        ("StudyTime", tags::STUDY_TIME, VR::TM),
        ("AccessionNumber", tags::ACCESSION_NUMBER, VR::SH),
        (
            "ReferringPhysicianName",
            tags::REFERRING_PHYSICIAN_NAME,
            VR::PN,
        ),
        ("StudyID", tags::STUDY_ID, VR::SH),
    ] {
        s(
            &mut o,
            tag,
            vr,
            source.attributes.get(kw).cloned().unwrap_or_default(),
        );
    }
    s(&mut o, tags::STUDY_INSTANCE_UID, VR::UI, study_uid);
    s(&mut o, tags::MODALITY, VR::CS, "SEG");
    s(&mut o, tags::SERIES_INSTANCE_UID, VR::UI, series_uid);
    s(
        &mut o,
        tags::SERIES_NUMBER,
        VR::IS,
        opts.series_number.to_string(),
    );
    s(
        &mut o,
        tags::SERIES_DESCRIPTION,
        VR::LO,
        opts.series_description.clone(),
    );
    s(&mut o, tags::FRAME_OF_REFERENCE_UID, VR::UI, frame_uid);
    s(&mut o, tags::POSITION_REFERENCE_INDICATOR, VR::LO, "");
    s(&mut o, tags::MANUFACTURER, VR::LO, "univ");
    s(&mut o, tags::MANUFACTURER_MODEL_NAME, VR::LO, "univ");
    s(&mut o, tags::DEVICE_SERIAL_NUMBER, VR::LO, "1");
    s(
        &mut o,
        tags::SOFTWARE_VERSIONS,
        VR::LO,
        opts.software_version.clone(),
    );
    s(&mut o, tags::INSTANCE_NUMBER, VR::IS, "1");
    s(&mut o, tags::CONTENT_DATE, VR::DA, date.clone());
    s(&mut o, tags::CONTENT_TIME, VR::TM, time.clone());
    s(&mut o, tags::CONTENT_LABEL, VR::CS, "SEGMENTATION");
    s(
        &mut o,
        tags::CONTENT_DESCRIPTION,
        VR::LO,
        opts.series_description.clone(),
    );
    s(&mut o, tags::CONTENT_CREATOR_NAME, VR::PN, "univ");
    s(&mut o, tags::SEGMENTATION_TYPE, VR::CS, "BINARY");
    s(&mut o, tags::LOSSY_IMAGE_COMPRESSION, VR::CS, "00");
    // Image pixel module.
    us(&mut o, tags::SAMPLES_PER_PIXEL, &[1]);
    s(
        &mut o,
        tags::PHOTOMETRIC_INTERPRETATION,
        VR::CS,
        "MONOCHROME2",
    );
    us(&mut o, tags::ROWS, &[rows as u16]);
    us(&mut o, tags::COLUMNS, &[cols as u16]);
    us(&mut o, tags::BITS_ALLOCATED, &[1]);
    us(&mut o, tags::BITS_STORED, &[1]);
    us(&mut o, tags::HIGH_BIT, &[0]);
    us(&mut o, tags::PIXEL_REPRESENTATION, &[0]);
    // Segments.
    let mut seg_items = Vec::new();
    for (i, sgm) in kept.iter().enumerate() {
        let mut it = InMemDicomObject::new_empty();
        us(&mut it, tags::SEGMENT_NUMBER, &[(i + 1) as u16]);
        s(&mut it, tags::SEGMENT_LABEL, VR::LO, sgm.label.clone());
        s(&mut it, tags::SEGMENT_ALGORITHM_TYPE, VR::CS, "AUTOMATIC");
        s(
            &mut it,
            tags::SEGMENT_ALGORITHM_NAME,
            VR::LO,
            opts.algorithm.clone(),
        );
        seq(
            &mut it,
            tags::SEGMENTED_PROPERTY_CATEGORY_CODE_SEQUENCE,
            vec![code_item(&sgm.category)],
        );
        seq(
            &mut it,
            tags::SEGMENTED_PROPERTY_TYPE_CODE_SEQUENCE,
            vec![code_item(&sgm.property)],
        );
        us(
            &mut it,
            tags::RECOMMENDED_DISPLAY_CIE_LAB_VALUE,
            &cielab(sgm.colour),
        );
        seg_items.push(it);
    }
    seq(&mut o, tags::SEGMENT_SEQUENCE, seg_items);
    // Dimensions: segment number, then position.
    let mut d1 = InMemDicomObject::new_empty();
    s(
        &mut d1,
        tags::DIMENSION_ORGANIZATION_UID,
        VR::UI,
        dim_uid.clone(),
    );
    let mut d2 = d1.clone();
    s(
        &mut d1,
        tags::DIMENSION_DESCRIPTION_LABEL,
        VR::LO,
        "ReferencedSegmentNumber",
    );
    d1.put(DataElement::new(
        tags::DIMENSION_INDEX_POINTER,
        VR::AT,
        PrimitiveValue::Tags(vec![tags::REFERENCED_SEGMENT_NUMBER].into()),
    ));
    d1.put(DataElement::new(
        tags::FUNCTIONAL_GROUP_POINTER,
        VR::AT,
        PrimitiveValue::Tags(vec![tags::SEGMENT_IDENTIFICATION_SEQUENCE].into()),
    ));
    s(
        &mut d2,
        tags::DIMENSION_DESCRIPTION_LABEL,
        VR::LO,
        "ImagePositionPatient",
    );
    d2.put(DataElement::new(
        tags::DIMENSION_INDEX_POINTER,
        VR::AT,
        PrimitiveValue::Tags(vec![tags::IMAGE_POSITION_PATIENT].into()),
    ));
    d2.put(DataElement::new(
        tags::FUNCTIONAL_GROUP_POINTER,
        VR::AT,
        PrimitiveValue::Tags(vec![tags::PLANE_POSITION_SEQUENCE].into()),
    ));
    let mut org = InMemDicomObject::new_empty();
    s(&mut org, tags::DIMENSION_ORGANIZATION_UID, VR::UI, dim_uid);
    seq(&mut o, tags::DIMENSION_ORGANIZATION_SEQUENCE, vec![org]);
    seq(&mut o, tags::DIMENSION_INDEX_SEQUENCE, vec![d1, d2]);
    // Shared functional groups: pixel measures and orientation.
    let mut pm = InMemDicomObject::new_empty();
    strs(&mut pm, tags::PIXEL_SPACING, VR::DS, vec![ds(dr), ds(dc)]);
    s(&mut pm, tags::SLICE_THICKNESS, VR::DS, ds(dz));
    s(&mut pm, tags::SPACING_BETWEEN_SLICES, VR::DS, ds(dz));
    let mut po = InMemDicomObject::new_empty();
    strs(&mut po, tags::IMAGE_ORIENTATION_PATIENT, VR::DS, iop);
    let mut shared = InMemDicomObject::new_empty();
    seq(&mut shared, tags::PIXEL_MEASURES_SEQUENCE, vec![pm]);
    seq(&mut shared, tags::PLANE_ORIENTATION_SEQUENCE, vec![po]);
    seq(
        &mut o,
        tags::SHARED_FUNCTIONAL_GROUPS_SEQUENCE,
        vec![shared],
    );
    // Frames: per segment, per source slice holding any of it.
    let mut frames = Vec::new();
    let mut bits: Vec<u8> = Vec::new();
    let mut nbit = 0usize;
    for (si, sgm) in kept.iter().enumerate() {
        let Some((lo, hi)) = sgm.mask.bbox() else {
            continue;
        };
        for k in lo[2]..=hi[2] {
            let slab: Vec<bool> = (0..plane)
                .map(|i| sgm.mask.contains(k * plane + i))
                .collect();
            if !slab.iter().any(|v| *v) {
                continue;
            }
            for v in slab {
                if nbit.is_multiple_of(8) {
                    bits.push(0);
                }
                if v {
                    *bits.last_mut().expect("pushed") |= 1 << (nbit % 8);
                }
                nbit += 1;
            }
            let src = &source.slices[k];
            let mut fc = InMemDicomObject::new_empty();
            obj_u32s(
                &mut fc,
                tags::DIMENSION_INDEX_VALUES,
                &[(si + 1) as u32, (k + 1) as u32],
            );
            let mut pp = InMemDicomObject::new_empty();
            strs(
                &mut pp,
                tags::IMAGE_POSITION_PATIENT,
                VR::DS,
                src.position.iter().map(|v| ds(*v)).collect(),
            );
            let mut sid = InMemDicomObject::new_empty();
            us(
                &mut sid,
                tags::REFERENCED_SEGMENT_NUMBER,
                &[(si + 1) as u16],
            );
            let mut srcimg = InMemDicomObject::new_empty();
            s(
                &mut srcimg,
                tags::REFERENCED_SOP_CLASS_UID,
                VR::UI,
                src.sop_class_uid.clone(),
            );
            s(
                &mut srcimg,
                tags::REFERENCED_SOP_INSTANCE_UID,
                VR::UI,
                src.sop_instance_uid.clone(),
            );
            s(
                &mut srcimg,
                tags::SPATIAL_LOCATIONS_PRESERVED,
                VR::CS,
                "YES",
            );
            seq(
                &mut srcimg,
                tags::PURPOSE_OF_REFERENCE_CODE_SEQUENCE,
                vec![code_item(&Code::new(
                    "121322",
                    "DCM",
                    "Source image for image processing operation",
                ))],
            );
            let mut der = InMemDicomObject::new_empty();
            seq(&mut der, tags::SOURCE_IMAGE_SEQUENCE, vec![srcimg]);
            seq(
                &mut der,
                tags::DERIVATION_CODE_SEQUENCE,
                vec![code_item(&Code::new("113076", "DCM", "Segmentation"))],
            );
            let mut f = InMemDicomObject::new_empty();
            seq(&mut f, tags::DERIVATION_IMAGE_SEQUENCE, vec![der]);
            seq(&mut f, tags::FRAME_CONTENT_SEQUENCE, vec![fc]);
            seq(&mut f, tags::PLANE_POSITION_SEQUENCE, vec![pp]);
            seq(&mut f, tags::SEGMENT_IDENTIFICATION_SEQUENCE, vec![sid]);
            frames.push(f);
        }
    }
    let nframes = frames.len();
    s(&mut o, tags::NUMBER_OF_FRAMES, VR::IS, nframes.to_string());
    seq(&mut o, tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE, frames);
    // Every source image is referenced.
    let mut inst = Vec::new();
    for sl in &source.slices {
        let mut r = InMemDicomObject::new_empty();
        s(
            &mut r,
            tags::REFERENCED_SOP_CLASS_UID,
            VR::UI,
            sl.sop_class_uid.clone(),
        );
        s(
            &mut r,
            tags::REFERENCED_SOP_INSTANCE_UID,
            VR::UI,
            sl.sop_instance_uid.clone(),
        );
        inst.push(r);
    }
    let mut rs = InMemDicomObject::new_empty();
    s(
        &mut rs,
        tags::SERIES_INSTANCE_UID,
        VR::UI,
        source.series_uid.clone(),
    );
    seq(&mut rs, tags::REFERENCED_INSTANCE_SEQUENCE, inst);
    seq(&mut o, tags::REFERENCED_SERIES_SEQUENCE, vec![rs]);
    if bits.len() % 2 == 1 {
        bits.push(0);
    }
    o.put(DataElement::new(
        tags::PIXEL_DATA,
        VR::OB,
        PrimitiveValue::U8(bits.into()),
    ));
    let file = o
        .with_meta(FileMetaTableBuilder::new().transfer_syntax(uids::EXPLICIT_VR_LITTLE_ENDIAN))
        .map_err(|e| err(format!("cannot build the file meta table: {e}")))?;
    crate::atomic::write_atomic_with(
        path,
        |tmp| {
            file.write_to_file(tmp)
                .map_err(|e| err(format!("cannot write: {e}")))
        },
        |e| Error::Io {
            path: path.to_path_buf(),
            source: e,
        },
    )?;
    Ok((kept.len(), nframes))
}

fn obj_u32s(obj: &mut InMemDicomObject, tag: Tag, v: &[u32]) {
    obj.put(DataElement::new(
        tag,
        VR::UL,
        PrimitiveValue::U32(v.to_vec().into()),
    ));
}

/// UTC date (`YYYYMMDD`) and time (`HHMMSS`) of a Unix time.
fn civil(secs: u64) -> (String, String) {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's days-to-civil algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    (
        format!("{y:04}{m:02}{d:02}"),
        format!("{:02}{:02}{:02}", rem / 3600, (rem / 60) % 60, rem % 60),
    )
}
