//! Writing a segmentation: label map, class table, per-class masks, probabilities, logits and
//! the report, all into one folder that appears only when everything is written.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use univ_io::{ClassMask, Volume, WriteOptions, write_nifti};
use univ_model::postprocess::label_components;
use univ_model::segment::{LESION_CLASSES, Segmentation};

/// Errors while writing outputs.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OutputError {
    /// The folder already holds results.
    #[error("{0}: the output folder already holds results; use --overwrite to replace them")]
    Exists(PathBuf),
    /// A file could not be written.
    #[error("{path}: {reason}")]
    Write {
        /// The file or folder.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
}

fn werr(path: &Path, e: impl std::fmt::Display) -> OutputError {
    OutputError::Write {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

/// The display name of a universal class: the official names, with 'Celiac Truck' written
/// 'Celiac Trunk'; `class_<id>` beyond the 32 known classes.
pub fn class_name(id: usize) -> String {
    match univ_clip::UNIVERSAL_CLASSES.get(id.wrapping_sub(1)) {
        Some(c) if c.name == "Celiac Truck" => "Celiac Trunk".to_string(),
        Some(c) => c.name.to_string(),
        None => format!("class_{id}"),
    }
}

/// A file-name slug: `Liver Tumor` → `liver_tumor`.
pub fn slug(name: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    s.split('_')
        .filter(|p| !p.is_empty())
        .collect::<Vec<_>>()
        .join("_")
}

/// What to write besides the label map, class table and report.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct OutputOptions {
    /// `masks/<class>.nii.gz`, one 0/1 file per class.
    pub per_class: bool,
    /// `probabilities/<class>.nii.gz`, sigmoid × 255 (needs probabilities in the segmentation).
    pub probabilities: bool,
    /// `logits.safetensors` (needs logits in the segmentation).
    pub save_logits: bool,
    /// Replace an existing output folder.
    pub overwrite: bool,
    /// Extra entries for the report (checkpoint, embedding, settings...).
    pub report_extra: BTreeMap<String, serde_json::Value>,
}

fn voxel_volume_ml(v: &Volume<u8>) -> f64 {
    let a = v.affine();
    let m = univ_io::geometry::linear_part(a);
    univ_io::geometry::det3(&m).abs() / 1000.0
}

/// The report of one case (see the README for its fields).
pub fn report(image: &Volume<f32>, seg: &Segmentation) -> serde_json::Value {
    use serde_json::json;
    if seg.masks.is_empty() {
        return json!({});
    }
    let first = &seg.label_map;
    let vml = voxel_volume_ml(first);
    let shape = first.shape();
    let mut classes = Vec::new();
    for (i, id) in seg.classes.iter().enumerate() {
        let mut hu: Vec<f32> = seg.masks[i].voxels().map(|v| image.data()[v]).collect();
        let bbox = seg.masks[i].bbox();
        let n = hu.len();
        let mean = (n > 0).then(|| hu.iter().map(|v| f64::from(*v)).sum::<f64>() / n as f64);
        let median = (n > 0).then(|| {
            let mid = n / 2;
            let (_, m, _) = hu.select_nth_unstable_by(mid, |a, b| a.total_cmp(b));
            f64::from(*m)
        });
        classes.push(json!({
            "id": id,
            "name": class_name(*id),
            "voxels": n,
            "volume_ml": n as f64 * vml,
            "mean_hu": mean,
            "median_hu": median,
            "bbox_voxels": bbox.map(|(lo, hi)| json!({"min": lo, "max": hi})),
        }));
    }
    // Lesions of the tumour and cyst classes.
    let mut lesions = serde_json::Map::new();
    for (i, id) in seg.classes.iter().enumerate() {
        if !LESION_CLASSES.contains(id) {
            continue;
        }
        // Streamed per lesion: labels, one flat list of voxel indices grouped by lesion, and
        // a few numbers per lesion; no per-voxel coordinates are kept.
        let (labels, sizes) = label_components(&seg.masks[i].to_bools(), shape);
        let nl = sizes.len();
        let mut start = vec![0usize; nl + 1];
        for l in 1..nl {
            start[l + 1] = start[l] + sizes[l];
        }
        let mut flat = vec![0usize; start[nl]];
        let mut fill = start.clone();
        let mut sum_ijk = vec![[0f64; 3]; nl];
        // Probability sums per lesion, from the probabilities at the mask's voxels (given in
        // the same order as the voxels).
        let probs = seg.lesion_probabilities[i].as_deref();
        let mut prob_sums = probs.map(|_| vec![0f64; nl]);
        for (j, v) in seg.masks[i].voxels().enumerate() {
            let l = labels[v] as usize;
            flat[fill[l]] = v;
            fill[l] += 1;
            let ijk = first.unravel(v);
            for a in 0..3 {
                sum_ijk[l][a] += ijk[a] as f64;
            }
            if let (Some(s), Some(p)) = (prob_sums.as_mut(), probs) {
                s[l] += f64::from(p[j]);
            }
        }
        // Host organ: the computed organ (1–25) overlapping the lesion most (the first in
        // class order on ties).
        let mut host = vec![(0usize, 0usize); nl];
        let mut overlap = vec![0usize; nl];
        for (j, oid) in seg.classes.iter().enumerate() {
            if *oid > 25 {
                continue;
            }
            overlap.fill(0);
            for v in seg.masks[j].voxels() {
                overlap[labels[v] as usize] += 1;
            }
            for l in 1..nl {
                if overlap[l] > host[l].1 {
                    host[l] = (*oid, overlap[l]);
                }
            }
        }
        drop(labels);
        let world =
            |v: usize| univ_io::geometry::apply(first.affine(), first.unravel(v).map(|c| c as f64));
        let mut list = Vec::new();
        for lab in 1..nl {
            let voxels = &flat[start[lab]..start[lab + 1]];
            let n = voxels.len() as f64;
            let centroid = univ_io::geometry::apply(first.affine(), sum_ijk[lab].map(|s| s / n));
            // Longest diameter over at most 2000 evenly spaced voxels (exact for small lesions).
            let step = voxels.len().div_ceil(2000).max(1);
            let pts: Vec<[f64; 3]> = voxels.iter().step_by(step).map(|v| world(*v)).collect();
            let mut diam = 0f64;
            for a in 0..pts.len() {
                for b in a + 1..pts.len() {
                    let d = (0..3)
                        .map(|k| (pts[a][k] - pts[b][k]).powi(2))
                        .sum::<f64>()
                        .sqrt();
                    diam = diam.max(d);
                }
            }
            let mean_p = prob_sums.as_ref().map(|s| s[lab] / n / 255.0);
            list.push(json!({
                "voxels": voxels.len(),
                "volume_ml": n * vml,
                "longest_diameter_mm": diam,
                "centroid_mm": centroid,
                "host_organ": (host[lab].0 > 0).then(|| class_name(host[lab].0)),
                "mean_probability": mean_p,
            }));
        }
        lesions.insert(
            slug(&class_name(*id)),
            json!({"present": !list.is_empty(), "count": list.len(), "lesions": list}),
        );
    }
    json!({
        "voxel_volume_ml": vml,
        "windows": seg.windows,
        "timings_s": seg.timings.iter().map(|(k, v)| (k.clone(), json!(v))).collect::<serde_json::Map<_, _>>(),
        "peak_resident_mb_after": seg
            .peak_memory
            .iter()
            .map(|(k, v)| (k.clone(), json!(v.map(|b| (b as f64 / 1e6).round()))))
            .collect::<serde_json::Map<_, _>>(),
        "classes": classes,
        "lesions": lesions,
        "notes": seg.notes,
    })
}

/// Writes every output of one case into `out` (see [`OutputOptions`]). Files go to a sibling
/// temporary folder that is renamed to `out` at the end, so a failure leaves nothing behind.
///
/// # Errors
/// [`OutputError::Exists`] when `out` holds files and `overwrite` is off; write errors.
pub fn write_outputs(
    out: &Path,
    image: &Volume<f32>,
    seg: &Segmentation,
    opts: &OutputOptions,
) -> Result<(), OutputError> {
    if out.exists()
        && std::fs::read_dir(out)
            .map(|mut d| d.next().is_some())
            .unwrap_or(true)
        && !opts.overwrite
    {
        return Err(OutputError::Exists(out.to_path_buf()));
    }
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| werr(parent, e))?;
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "out".into());
    let tmp = parent.join(format!(".{name}.partial-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let result = (|| -> Result<(), OutputError> {
        std::fs::create_dir_all(&tmp).map_err(|e| werr(&tmp, e))?;
        let wo = WriteOptions::default();
        if !seg.masks.is_empty() {
            let p = tmp.join("segmentation.nii.gz");
            write_nifti(&p, &seg.label_map, &wo).map_err(|e| werr(&p, e))?;
        }
        let table: Vec<serde_json::Value> = seg
            .classes
            .iter()
            .map(|id| serde_json::json!({"label": id, "name": class_name(*id), "file": format!("{}.nii.gz", slug(&class_name(*id)))}))
            .collect();
        let p = tmp.join("classes.json");
        std::fs::write(
            &p,
            serde_json::to_string_pretty(&serde_json::json!({"background": 0, "classes": table}))
                .expect("json"),
        )
        .map_err(|e| werr(&p, e))?;
        if opts.per_class {
            let d = tmp.join("masks");
            std::fs::create_dir_all(&d).map_err(|e| werr(&d, e))?;
            for (i, id) in seg.classes.iter().enumerate() {
                let p = d.join(format!("{}.nii.gz", slug(&class_name(*id))));
                let m = seg
                    .label_map
                    .with_data(seg.masks[i].to_u8())
                    .map_err(|e| werr(&p, e))?;
                write_nifti(&p, &m, &wo).map_err(|e| werr(&p, e))?;
            }
        }
        if opts.probabilities {
            let d = tmp.join("probabilities");
            std::fs::create_dir_all(&d).map_err(|e| werr(&d, e))?;
            for (i, id) in seg.classes.iter().enumerate() {
                if let Some(pv) = &seg.probabilities[i] {
                    let p = d.join(format!("{}.nii.gz", slug(&class_name(*id))));
                    write_nifti(&p, pv, &wo).map_err(|e| werr(&p, e))?;
                }
            }
        }
        if opts.save_logits
            && let Some(l) = &seg.logits
        {
            let p = tmp.join("logits.safetensors");
            let bytes: Vec<u8> = l.data.iter().flat_map(|v| v.to_le_bytes()).collect();
            let view = safetensors::tensor::TensorView::new(
                safetensors::Dtype::F32,
                l.shape.to_vec(),
                &bytes,
            )
            .map_err(|e| werr(&p, e))?;
            let mut meta = std::collections::HashMap::new();
            meta.insert(
                "classes".to_string(),
                serde_json::to_string(&seg.classes).expect("json"),
            );
            meta.insert(
                "layout".to_string(),
                "(K, X, Y, Z) on the grid the network saw, Z fastest".to_string(),
            );
            let data =
                safetensors::serialize([("logits", view)], Some(meta)).map_err(|e| werr(&p, e))?;
            std::fs::write(&p, data).map_err(|e| werr(&p, e))?;
        }
        let named: Vec<(usize, String, &ClassMask)> = seg
            .classes
            .iter()
            .zip(&seg.masks)
            .map(|(id, m)| (*id, class_name(*id), m))
            .collect();
        let p = tmp.join("preview.png");
        crate::preview::write_preview(&p, image, &named).map_err(|e| werr(&p, e))?;
        let mut rep = report(image, seg);
        if let serde_json::Value::Object(m) = &mut rep {
            for (k, v) in &opts.report_extra {
                m.insert(k.clone(), v.clone());
            }
        }
        let p = tmp.join("report.json");
        std::fs::write(&p, serde_json::to_string_pretty(&rep).expect("json"))
            .map_err(|e| werr(&p, e))?;
        // Swap the finished folder in.
        if out.exists() {
            let old = parent.join(format!(".{name}.old-{}", std::process::id()));
            std::fs::rename(out, &old).map_err(|e| werr(out, e))?;
            std::fs::rename(&tmp, out).map_err(|e| werr(out, e))?;
            let _ = std::fs::remove_dir_all(&old);
        } else {
            std::fs::rename(&tmp, out).map_err(|e| werr(out, e))?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}
