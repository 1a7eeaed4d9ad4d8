//! Evaluation of label maps: per-label Dice, surface Dice and HD95, and case-level tumour
//! detection over folders.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::json;
use univ_io::Volume;
use univ_train::metrics::{hausdorff, overlap, surface_dice};

/// Settings of [`evaluate_pair`].
#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// Surface-Dice tolerances in mm.
    pub tolerances: Vec<f64>,
    /// Reference label id → prediction label id; ids not listed are ignored. `None` compares
    /// ids as they are.
    pub label_map: Option<BTreeMap<u8, u8>>,
    /// Compute the surface metrics (NSD, HD95), slower than Dice.
    pub surface: bool,
}

impl Default for EvalOptions {
    fn default() -> Self {
        EvalOptions {
            tolerances: vec![1.0, 3.0],
            label_map: None,
            surface: true,
        }
    }
}

fn jnum(v: f64) -> serde_json::Value {
    if v.is_finite() {
        json!(v)
    } else {
        json!(v.to_string())
    }
}

/// Reads a label map for [`EvalOptions::label_map`]: a JSON object
/// `{"reference id": prediction id}` with ids from 1 to 255 (`{"1": 6, "2": 3}`).
///
/// # Errors
/// [`Error::Input`](crate::Error::Input) naming the file: unreadable, not such an object, or an
/// id that is not a label id.
pub fn read_label_map(path: &std::path::Path) -> crate::Result<BTreeMap<u8, u8>> {
    let bad = |reason: String| crate::Error::Input {
        path: path.to_path_buf(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| bad(format!("cannot read: {e}")))?;
    parse_label_map(&text).map_err(bad)
}

/// Parses the text of a label map (see [`read_label_map`]); the error says what is wrong.
///
/// # Errors
/// Text that is not such an object.
pub fn parse_label_map(text: &str) -> Result<BTreeMap<u8, u8>, String> {
    let raw: serde_json::Map<String, serde_json::Value> = serde_json::from_str(text)
        .map_err(|e| format!("expected a JSON object {{\"reference id\": prediction id}}: {e}"))?;
    let id = |v: &str| match v.parse::<u8>() {
        Ok(n) if n > 0 && v == n.to_string() => Ok(n),
        _ => Err(format!("{v:?} is not a label id (1 to 255)")),
    };
    let mut map = BTreeMap::new();
    for (k, v) in &raw {
        let from = id(k)?;
        let to = match v.as_u64() {
            Some(n) => {
                u8::try_from(n).map_err(|_| format!("{k:?}: {n} is not a label id (0 to 255)"))?
            }
            None => return Err(format!("{k:?}: {v} is not a label id (0 to 255)")),
        };
        map.insert(from, to);
    }
    Ok(map)
}

/// Maps the reference's ids through the label map (unlisted ids become 0).
pub fn remap(gt: &Volume<u8>, map: &BTreeMap<u8, u8>) -> Volume<u8> {
    gt.map(|v| {
        if v == 0 {
            0
        } else {
            map.get(&v).copied().unwrap_or(0)
        }
    })
}

/// Metrics per label between a prediction and a reference on the same grid (or one that differs
/// only by the order and direction of its axes): every id > 0
/// present in either (after the label map). Infinite or undefined values are written as
/// strings (`"inf"`, `"NaN"`).
///
/// # Errors
/// The grids differ.
pub fn evaluate_pair(
    pred: &Volume<u8>,
    gt: &Volume<u8>,
    opts: &EvalOptions,
) -> Result<serde_json::Value, univ_io::Error> {
    // A reference on the same grid up to axis order/direction (say a NIfTI made from the DICOM
    // series the prediction was made on) is reoriented onto the prediction's grid.
    let gt = if gt.check_same_grid(pred).is_ok() {
        gt.clone()
    } else {
        univ_io::align_label_to(gt.clone(), pred)?
    };
    let gt = match &opts.label_map {
        Some(m) => remap(&gt, m),
        None => gt,
    };
    let ids: BTreeSet<u8> = pred
        .data()
        .iter()
        .chain(gt.data())
        .copied()
        .filter(|v| *v > 0)
        .collect();
    let shape = gt.shape();
    let spacing = gt.spacing();
    let mut labels = Vec::new();
    for id in ids {
        let p: Vec<bool> = pred.data().iter().map(|v| *v == id).collect();
        let g: Vec<bool> = gt.data().iter().map(|v| *v == id).collect();
        let o = overlap(&p, &g);
        let mut row = json!({
            "label": id,
            "voxels_pred": o.pred,
            "voxels_gt": o.gt,
            "tp": o.tp,
            "dice": jnum(o.dice()),
            "dice_official": jnum(o.dice_official()),
        });
        if opts.surface {
            for t in &opts.tolerances {
                row[format!("nsd_{t}mm")] = jnum(surface_dice(&p, &g, shape, spacing, *t));
            }
            row["hd95_mm"] = jnum(hausdorff(&p, &g, shape, spacing, Some(95.0)));
        }
        labels.push(row);
    }
    Ok(json!({"spacing_mm": spacing, "labels": labels}))
}

/// Case-level tumour detection, as the paper evaluates it: for each tumour class of the
/// universal table, a case is positive when any voxel of the class is there. Returns
/// sensitivity and specificity over `cases` of (prediction, reference) label maps.
pub fn tumour_detection(cases: &[(Volume<u8>, Volume<u8>)]) -> serde_json::Value {
    let mut out = serde_json::Map::new();
    let tumours = univ_model::ClassTable::universal().ids_of(univ_model::ClassKind::Tumour);
    for t in tumours.into_iter().filter_map(|t| u8::try_from(t).ok()) {
        let (mut tp, mut fn_, mut tn, mut fp) = (0usize, 0usize, 0usize, 0usize);
        for (p, g) in cases {
            let pp = p.data().contains(&t);
            let gp = g.data().contains(&t);
            match (gp, pp) {
                (true, true) => tp += 1,
                (true, false) => fn_ += 1,
                (false, false) => tn += 1,
                (false, true) => fp += 1,
            }
        }
        let ratio = |a: usize, b: usize| {
            if a + b == 0 {
                f64::NAN
            } else {
                a as f64 / (a + b) as f64
            }
        };
        out.insert(
            t.to_string(),
            json!({"tp": tp, "fn": fn_, "tn": tn, "fp": fp, "sensitivity": jnum(ratio(tp, fn_)), "specificity": jnum(ratio(tn, fp))}),
        );
    }
    serde_json::Value::Object(out)
}
