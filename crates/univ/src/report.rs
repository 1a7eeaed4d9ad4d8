//! `report.json`: per class its voxels, volume, mean and median HU and bounding box; per lesion
//! class every lesion ([`univ_model::lesions`]); timings, peak memory and notes.

use serde_json::{Map, Value, json};
use univ_io::Volume;
use univ_model::Segmentation;
use univ_model::lesions::lesions;

/// The report of one case: `image` is the CT (HU) on the grid of `seg`'s masks.
pub fn report(image: &Volume<f32>, seg: &Segmentation) -> Value {
    if seg.classes.is_empty() {
        return json!({});
    }
    let vml = seg.voxel_volume_ml();
    let mut classes = Vec::new();
    for c in &seg.classes {
        let mut hu: Vec<f32> = c.mask.voxels().map(|v| image.data()[v]).collect();
        let n = hu.len();
        let mean = (n > 0).then(|| hu.iter().map(|v| f64::from(*v)).sum::<f64>() / n as f64);
        let median = (n > 0).then(|| {
            let mid = n / 2;
            let (_, m, _) = hu.select_nth_unstable_by(mid, |a, b| a.total_cmp(b));
            f64::from(*m)
        });
        classes.push(json!({
            "id": c.id(),
            "name": c.name(),
            "slug": c.info.slug,
            "kind": c.info.kind.as_str(),
            "voxels": n,
            "volume_ml": n as f64 * vml,
            "mean_hu": mean,
            "median_hu": median,
            "bbox_voxels": c.mask.bbox().map(|(lo, hi)| json!({"min": lo, "max": hi})),
        }));
    }
    let mut by_class = Map::new();
    for c in seg.classes.iter().filter(|c| c.info.is_lesion()) {
        let list: Vec<Value> = lesions(seg, c)
            .iter()
            .map(|l| {
                json!({
                    "voxels": l.voxels,
                    "volume_ml": l.volume_ml,
                    "longest_diameter_mm": l.longest_diameter_mm,
                    "centroid_mm": l.centroid_mm,
                    "host_organ": l.host_organ.and_then(|h| seg.class_by_id(h)).map(|h| h.name()),
                    "mean_probability": l.mean_probability,
                })
            })
            .collect();
        by_class.insert(
            c.info.slug.clone(),
            json!({"present": !list.is_empty(), "count": list.len(), "lesions": list}),
        );
    }
    json!({
        "voxel_volume_ml": vml,
        "windows": seg.windows,
        "timings_s": seg.timings.iter().map(|(k, v)| (k.clone(), json!(v))).collect::<Map<_, _>>(),
        "peak_resident_mb_after": seg
            .peak_memory
            .iter()
            .map(|(k, v)| (k.clone(), json!(v.map(|b| (b as f64 / 1e6).round()))))
            .collect::<Map<_, _>>(),
        "gpu_memory_mb": seg.gpu_memory.map(|g| {
            let mb = |b: u64| (b as f64 / 1e6).round();
            json!({
                "pool_peak": mb(g.pool_peak_bytes),
                "pool_in_use": mb(g.pool_in_use_bytes),
                "device_used": mb(g.device_used_bytes),
                "device_total": mb(g.device_total_bytes),
            })
        }),
        "classes": classes,
        "lesions": by_class,
        "notes": seg.notes,
    })
}
