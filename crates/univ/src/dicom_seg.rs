//! DICOM-SEG output for a segmentation made on a DICOM series: one segment per class present,
//! coded with SNOMED CT where the structure has a well-known concept (a local `99UNIV` code
//! otherwise), with the class colours of the preview.

use std::path::Path;

use univ_io::dicom::DicomSeries;
use univ_io::dicom_seg::{Code, SegOptions, Segment, write_dicom_seg};
use univ_model::segment::{LESION_CLASSES, Segmentation};

use crate::outputs::class_name;
use crate::preview::class_colour;

/// The segmented property (type) of a universal class, and whether it is a lesion.
pub fn class_code(id: usize) -> Code {
    let sct = |v: &str, m: &str| Code::new(v, "SCT", m);
    match id {
        1 => sct("78961009", "Spleen"),
        2 => sct("9846003", "Right kidney"),
        3 => sct("18639004", "Left kidney"),
        4 => sct("28231008", "Gallbladder"),
        5 => sct("32849002", "Esophagus"),
        6 => sct("10200004", "Liver"),
        7 => sct("69695003", "Stomach"),
        8 => sct("15825003", "Aorta"),
        9 => sct("64131007", "Inferior vena cava"),
        11 => sct("15776009", "Pancreas"),
        12 | 13 => sct("23451007", "Adrenal gland"),
        14 => sct("38848004", "Duodenum"),
        16 => sct("3341006", "Right lung"),
        17 => sct("44029006", "Left lung"),
        18 => sct("71854001", "Colon"),
        19 => sct("113276009", "Intestinal structure"),
        20 => sct("34402009", "Rectum"),
        21 => sct("89837001", "Urinary bladder"),
        22 => sct("41216001", "Prostate"),
        23 | 24 => sct("68367000", "Head of femur"),
        25 => sct("57850000", "Celiac trunk"),
        26..=31 => sct("108369006", "Neoplasm"),
        32 => sct("441457006", "Cyst"),
        other => Code::new(&format!("UNIV{other:03}"), "99UNIV", &class_name(other)),
    }
}

/// The segmented property category of a universal class.
pub fn class_category(id: usize) -> Code {
    if LESION_CLASSES.contains(&id) {
        Code::new("49755003", "SCT", "Morphologically Altered Structure")
    } else {
        Code::new("123037004", "SCT", "Anatomical Structure")
    }
}

/// Writes `OUT/segmentation.dcm` for a segmentation of `series` (made on its volume); returns
/// (segments, frames).
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
        .zip(&seg.masks)
        .map(|(id, m)| Segment {
            label: class_name(*id),
            category: class_category(*id),
            property: class_code(*id),
            colour: class_colour(*id),
            mask: m.clone(),
        })
        .collect();
    write_dicom_seg(path, series, &segments, &SegOptions::default())
}
