//! DICOM-SEG output for a segmentation made on a DICOM series: one segment per class present,
//! coded with the class table's SNOMED CT concept where it has one (a local `99UNIV` code
//! otherwise), in the class's colour.

use std::path::Path;

use univ_io::dicom::DicomSeries;
use univ_io::dicom_seg::{Code, SegOptions, Segment, write_dicom_seg};
use univ_model::ClassInfo;
use univ_model::Segmentation;

/// The segmented property (type) of a class.
pub fn class_code(c: &ClassInfo) -> Code {
    match c.snomed {
        Some(s) => Code::new(s.code, "SCT", s.meaning),
        None => Code::new(&format!("UNIV{:03}", c.id), "99UNIV", &c.name),
    }
}

/// The segmented property category of a class: a morphologically altered structure for
/// tumours and cysts, an anatomical structure otherwise.
pub fn class_category(c: &ClassInfo) -> Code {
    if c.is_lesion() {
        Code::new("49755003", "SCT", "Morphologically Altered Structure")
    } else {
        Code::new("123037004", "SCT", "Anatomical Structure")
    }
}

/// Writes `path` (a DICOM Segmentation) for a segmentation of `series` (made on its volume);
/// returns (segments, frames).
///
/// # Errors
/// Masks not on the series' grid, an empty segmentation, or a write failure.
pub fn write_seg_for(
    path: &Path,
    series: &DicomSeries,
    seg: &Segmentation,
) -> Result<(usize, usize), univ_io::Error> {
    let segments: Vec<Segment> = seg
        .classes
        .iter()
        .map(|c| Segment {
            label: c.name().to_string(),
            category: class_category(&c.info),
            property: class_code(&c.info),
            colour: c.info.colour,
            mask: c.mask.clone(),
        })
        .collect();
    write_dicom_seg(path, series, &segments, &SegOptions::default())
}
