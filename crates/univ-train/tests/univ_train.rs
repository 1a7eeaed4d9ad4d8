//! Metrics against MONAI's values on real TotalSegmentator label maps.

#[path = "../../../tests/common/shared.rs"]
mod shared;

use univ_train::metrics::{hausdorff, overlap, surface_dice};

fn num(v: &serde_json::Value) -> f64 {
    match v {
        serde_json::Value::String(s) if s == "nan" => f64::NAN,
        serde_json::Value::String(s) if s == "inf" => f64::INFINITY,
        other => other.as_f64().unwrap(),
    }
}

fn same(a: f64, b: f64, tol: f64) -> bool {
    (a.is_nan() && b.is_nan()) || a == b || (a - b).abs() <= tol
}

#[test]
fn metrics_match_monai_on_totalsegmentator_maps() {
    let Some(shared) = shared::shared_dir() else {
        return;
    };
    let m: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(shared.join("fixtures/metrics/metrics.json")).unwrap(),
    )
    .unwrap();
    let t = &m["tables"]["example_seg_vs_fast"];
    let gt = univ_io::read_label(shared.join("data/ct/example_seg.nii.gz")).unwrap();
    let pred = univ_io::read_label(shared.join("data/ct/example_seg_fast.nii.gz")).unwrap();
    let shape = gt.shape();
    let spacing = gt.spacing();
    assert_eq!(spacing, [3.0, 3.0, 3.0]);
    let labels = t["labels"].as_array().unwrap();
    assert_eq!(labels.len(), 41);
    for l in labels {
        let id = l["label"].as_u64().unwrap() as u8;
        let p: Vec<bool> = pred.data().iter().map(|v| *v == id).collect();
        let g: Vec<bool> = gt.data().iter().map(|v| *v == id).collect();
        let o = overlap(&p, &g);
        assert_eq!(
            (o.pred, o.gt, o.tp),
            (
                l["voxels_pred"].as_u64().unwrap() as usize,
                l["voxels_gt"].as_u64().unwrap() as usize,
                l["tp"].as_u64().unwrap() as usize
            )
        );
        assert!(
            same(o.dice(), num(&l["dice_standard"]), 1e-6),
            "label {id} dice"
        );
        assert!(
            same(o.dice_official(), num(&l["dice_official_plus1"]), 1e-6),
            "label {id} official dice"
        );
        assert!(
            same(o.dice_monai(), num(&l["monai_compute_dice"]), 1e-6),
            "label {id} MONAI dice"
        );
        for (tol, key) in [(1.0, "monai_nsd_tol1mm"), (3.0, "monai_nsd_tol3mm")] {
            let nsd = surface_dice(&p, &g, shape, spacing, tol);
            assert!(
                same(nsd, num(&l[key]), 1e-6),
                "label {id} {key}: {nsd} vs {}",
                l[key]
            );
        }
        let hd95 = hausdorff(&p, &g, shape, spacing, Some(95.0));
        assert!(
            same(hd95, num(&l["monai_hd95_mm"]), 1e-4),
            "label {id} hd95: {hd95} vs {}",
            l["monai_hd95_mm"]
        );
        let hd = hausdorff(&p, &g, shape, spacing, None);
        assert!(
            same(hd, num(&l["monai_hd_max_mm"]), 1e-4),
            "label {id} hd: {hd} vs {}",
            l["monai_hd_max_mm"]
        );
    }
}
