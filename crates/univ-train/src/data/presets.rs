//! The label conventions of the official training datasets (the official
//! repository's offline `label_transfer.py` and the `TEMPLATE` table of its `utils/utils.py`), as data: raw label
//! id → universal class, the classes each dataset supervises, which paired organs are split into
//! right and left, which tumours are merged into their organ, and the dataset's crop rule.

/// How training patches are centred.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CropRule {
    /// Foreground : background centres 2 : 1 (`RandCropByPosNegLabeld`).
    #[default]
    PosNeg,
    /// Background : organ : tumour centres 1 : 1 : 5 (`RandCropByLabelClassesd`; the tumour
    /// datasets 04, 10_03, 10_07, 10_08).
    LabelClasses,
}

/// A tumour (or cyst) label of a dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
pub struct TumourRule {
    /// Raw label id.
    pub raw: u8,
    /// Universal class of the tumour channel.
    pub class: usize,
    /// The organ class the tumour voxels also count as (the organ channel then includes its
    /// tumours), or none.
    pub merge_into: Option<usize>,
}

/// The label conventions of one dataset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatasetPreset {
    /// The dataset key of the official code (`01`, `10_03`, …) or `universal`.
    pub key: &'static str,
    /// What the dataset is.
    pub title: &'static str,
    /// `map[r - 1]` = universal class of raw id `r` (0 drops it).
    pub label_map: &'static [usize],
    /// Supervised (and evaluated) classes, in the official order.
    pub supervised: &'static [usize],
    /// Organs whose single label is split into right (the class) and left (class + 1) by
    /// their two largest 26-connected components.
    pub rl_split: &'static [usize],
    /// Tumour labels.
    pub tumours: &'static [TumourRule],
    /// Crop rule.
    pub crop: CropRule,
    /// `RandZoomd` (p 0.3, 1.3–1.5×) applies (the MSD tasks).
    pub zoom: bool,
}

const fn t(raw: u8, class: usize, merge_into: Option<usize>) -> TumourRule {
    TumourRule {
        raw,
        class,
        merge_into,
    }
}

const ALL_32: [usize; 32] = [
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26,
    27, 28, 29, 30, 31, 32,
];

macro_rules! preset {
    ($key:expr, $title:expr, $map:expr, $sup:expr, $split:expr, $tum:expr, $crop:expr, $zoom:expr) => {
        DatasetPreset {
            key: $key,
            title: $title,
            label_map: &$map,
            supervised: &$sup,
            rl_split: &$split,
            tumours: &$tum,
            crop: $crop,
            zoom: $zoom,
        }
    };
}

use CropRule::{LabelClasses, PosNeg};

/// Every preset: the official datasets and `universal` (label ids are already universal
/// classes 1–32, e.g. our TotalSegmentator-derived maps).
pub const PRESETS: &[DatasetPreset] = &[
    preset!(
        "01",
        "BTCV (Multi-Atlas Labeling)",
        [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14],
        [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14],
        [],
        [],
        PosNeg,
        false
    ),
    preset!(
        "01_2",
        "BTCV test cases with the 8-organ labels",
        [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14],
        [1, 3, 4, 5, 6, 7, 11, 14],
        [],
        [],
        PosNeg,
        false
    ),
    preset!(
        "02",
        "TCIA Pancreas-CT multi-organ",
        [1, 0, 3, 4, 5, 6, 7, 0, 0, 0, 11, 0, 0, 14],
        [1, 3, 4, 5, 6, 7, 11, 14],
        [],
        [],
        PosNeg,
        false
    ),
    preset!("03", "CHAOS CT liver", [6], [6], [], [], PosNeg, false),
    preset!(
        "04",
        "LiTS",
        [6, 27],
        [6, 27],
        [],
        [t(2, 27, Some(6))],
        LabelClasses,
        false
    ),
    preset!(
        "05",
        "KiTS",
        [2, 26, 32],
        [2, 3, 26, 32],
        [2],
        [t(2, 26, Some(2)), t(3, 32, Some(2))],
        PosNeg,
        false
    ),
    preset!(
        "07",
        "WORD",
        [6, 1, 3, 2, 7, 4, 5, 11, 14, 18, 19, 12, 20, 21, 23, 24],
        [6, 1, 3, 2, 7, 4, 5, 11, 14, 18, 19, 12, 13, 20, 21, 23, 24],
        [12],
        [],
        PosNeg,
        false
    ),
    preset!(
        "08",
        "AbdomenCT-1K",
        [6, 2, 1, 11],
        [6, 2, 3, 1, 11],
        [2],
        [],
        PosNeg,
        false
    ),
    preset!(
        "09",
        "AMOS",
        [1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13, 14, 21, 22],
        [1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13, 14, 21, 22],
        [],
        [],
        PosNeg,
        false
    ),
    preset!(
        "12",
        "CT-ORG",
        [6, 21, 16, 2],
        [6, 21, 16, 17, 2, 3],
        [16, 2],
        [],
        PosNeg,
        false
    ),
    preset!(
        "13",
        "AbdomenCT-12organ",
        [6, 2, 1, 11, 8, 9, 7, 4, 5, 12, 13, 25],
        [6, 2, 3, 1, 11, 8, 9, 7, 4, 5, 12, 13, 25],
        [2],
        [],
        PosNeg,
        false
    ),
    preset!(
        "10_03",
        "MSD Task03 Liver",
        [6, 27],
        [6, 27],
        [],
        [t(2, 27, Some(6))],
        LabelClasses,
        true
    ),
    preset!("10_06", "MSD Task06 Lung", [30], [30], [], [], PosNeg, true),
    preset!(
        "10_07",
        "MSD Task07 Pancreas",
        [11, 28],
        [11, 28],
        [],
        [t(2, 28, Some(11))],
        LabelClasses,
        true
    ),
    preset!(
        "10_08",
        "MSD Task08 HepaticVessel",
        [15, 29],
        [15, 29],
        [],
        [],
        LabelClasses,
        true
    ),
    preset!("10_09", "MSD Task09 Spleen", [1], [1], [], [], PosNeg, true),
    preset!(
        "10_10",
        "MSD Task10 Colon",
        [31],
        [31],
        [],
        [],
        PosNeg,
        true
    ),
    preset!(
        "universal",
        "label ids are universal classes 1-32",
        ALL_32,
        ALL_32,
        [],
        [],
        PosNeg,
        false
    ),
];

/// The preset of a dataset key.
pub fn preset(key: &str) -> Option<&'static DatasetPreset> {
    PRESETS.iter().find(|p| p.key == key)
}

/// The template key of an official case name (the label path without extension, e.g.
/// `10_Decathlon/Task03_Liver/labelsTr/liver_0`), as the official loss derives it: `10_` plus
/// the task number for MSD; for BTCV `01_2` when the last two characters read as a number
/// ≥ 60, else `01`; otherwise the first two characters.
pub fn template_key(name: &str) -> Option<String> {
    let head = name.get(0..2)?;
    if head == "10" {
        return Some(format!("10_{}", name.get(17..19)?));
    }
    if head == "01" {
        let tail = name.get(name.len().checked_sub(2)?..)?;
        let n: u32 = tail.parse().ok()?;
        return Some(if n >= 60 { "01_2" } else { "01" }.to_string());
    }
    Some(head.to_string())
}

/// The supervised classes of an official case name (see [`template_key`]).
pub fn supervised_for_name(name: &str) -> Option<Vec<usize>> {
    let key = template_key(name)?;
    preset(&key).map(|p| p.supervised.to_vec())
}
