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

fn load_st(path: std::path::PathBuf) -> std::collections::HashMap<String, candle_core::Tensor> {
    candle_core::safetensors::load(&path, &candle_core::Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn assert_close(name: &str, got: &[f32], want: &[f32], atol: f32, rtol: f32) {
    assert_eq!(got.len(), want.len(), "{name}: length");
    let mut worst = 0f32;
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let err = (g - w).abs();
        assert!(
            err <= atol + rtol * w.abs(),
            "{name}[{i}]: got {g}, want {w} (|Δ| {err})"
        );
        worst = worst.max(err);
    }
    eprintln!("{name}: max |Δ| {worst:e}");
}

#[test]
fn partial_label_loss_matches_the_official_loss_and_its_gradient() {
    use univ_train::{DiceMode, partial_label_loss};
    let Some(shared) = shared::shared_dir() else {
        return;
    };
    let fx = shared.join("fixtures/loss");
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fx.join("meta.json")).unwrap()).unwrap();
    let inputs = load_st(fx.join("inputs.safetensors"));
    let expected = load_st(fx.join("expected.safetensors"));
    let names: Vec<String> = meta["names"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    // Class lists from the official file names (the template-key rule, with its 01_2 case).
    let lists: Vec<Vec<usize>> = names
        .iter()
        .map(|n| univ_train::data::presets::supervised_for_name(n).unwrap())
        .collect();
    let want_lists: Vec<Vec<usize>> = meta["organ_lists"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            l.as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as usize)
                .collect()
        })
        .collect();
    assert_eq!(lists, want_lists);
    let logits = candle_core::Var::from_tensor(&inputs["logits"]).unwrap();
    let target = &inputs["target"];
    for (mode, key, grad_key) in [
        (DiceMode::PerSlice, "loss_per_slice", "grad_total_per_slice"),
        (
            DiceMode::PerVolume,
            "loss_per_volume",
            "grad_total_per_volume",
        ),
    ] {
        let parts = partial_label_loss(logits.as_tensor(), target, &lists, mode).unwrap();
        let got: Vec<f32> = [&parts.bce, &parts.dice, &parts.total]
            .iter()
            .map(|t| t.to_scalar::<f32>().unwrap())
            .collect();
        let want = expected[key].to_vec1::<f32>().unwrap();
        assert_close(key, &got, &want, 1e-6, 1e-5);
        let m = &meta["results"][if mode == DiceMode::PerSlice {
            "per_slice"
        } else {
            "per_volume"
        }];
        let per: Vec<f32> = m["dice_per_pair"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        assert_close(
            "dice per pair",
            &parts.dice_per_pair.to_vec1::<f32>().unwrap(),
            &per,
            1e-6,
            1e-5,
        );
        assert_eq!(parts.pairs.len(), 16);
        let grads = parts.total.backward().unwrap();
        let g = grads.get(logits.as_tensor()).unwrap();
        let g = g.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let w = expected[grad_key]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_close(grad_key, &g, &w, 1e-7, 1e-4);
    }
}
