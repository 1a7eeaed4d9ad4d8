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
#[ignore = "needs ../shared (real CT data and golden fixtures)"]
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
#[ignore = "needs ../shared (real CT data and golden fixtures)"]
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
    let cases = [
        (DiceMode::PerSlice, "loss_per_slice", "grad_total_per_slice"),
        (
            DiceMode::PerVolume,
            "loss_per_volume",
            "grad_total_per_volume",
        ),
    ];
    // The fused CPU operation and the composed one (other devices) both match.
    for ((mode, key, grad_key), fused) in cases.into_iter().flat_map(|m| [(m, true), (m, false)]) {
        let parts = if fused {
            partial_label_loss(logits.as_tensor(), target, &lists, mode).unwrap()
        } else {
            univ_train::loss::partial_label_loss_composed(logits.as_tensor(), target, &lists, mode)
                .unwrap()
        };
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

// ---------------------------------------------------------------------------------------------
// Training: data assembly, optimiser, schedule, loop, resume, extension.

mod training {
    use std::path::{Path, PathBuf};

    use candle_core::Device;
    use univ_io::{Volume, WriteOptions, write_nifti};
    use univ_train::{TrainConfig, Trainer};

    /// A small synthetic CT (3 mm voxels): air around a soft-tissue body holding two
    /// "organs" (raw labels 1 and 2) and a "tumour" (raw 3) inside organ 1. `shift` moves the
    /// organs so that cases differ.
    fn synthetic_case(dir: &Path, name: &str, shift: i64) -> (PathBuf, PathBuf) {
        let shape = [24usize, 24, 16];
        let affine = [
            [3.0, 0.0, 0.0, 0.0],
            [0.0, 3.0, 0.0, 0.0],
            [0.0, 0.0, 3.0, 0.0],
            [0.0, 0.0, 0.0, 1.0],
        ];
        let mut img = Vec::new();
        let mut lab = Vec::new();
        for z in 0..shape[2] as i64 {
            for y in 0..shape[1] as i64 {
                for x in 0..shape[0] as i64 {
                    let body = (x - 12).pow(2) + (y - 12).pow(2) < 100;
                    let o1 = (x - 8 - shift).pow(2) + (y - 12).pow(2) + (z - 8).pow(2) < 16;
                    let t = (x - 8 - shift).pow(2) + (y - 12).pow(2) + (z - 8).pow(2) < 3;
                    let o2 = (x - 16).pow(2) + (y - 12 - shift).pow(2) + (z - 8).pow(2) < 9;
                    let (hu, l) = if t {
                        (20.0, 3u8)
                    } else if o1 {
                        (120.0, 1)
                    } else if o2 {
                        (-60.0, 2)
                    } else if body {
                        (40.0, 0)
                    } else {
                        (-1000.0, 0)
                    };
                    img.push(hu);
                    lab.push(l);
                }
            }
        }
        let ip = dir.join(format!("{name}_ct.nii.gz"));
        let lp = dir.join(format!("{name}_seg.nii.gz"));
        let opts = WriteOptions::default();
        write_nifti(&ip, &Volume::from_vec(img, shape, affine).unwrap(), &opts).unwrap();
        write_nifti(&lp, &Volume::from_vec(lab, shape, affine).unwrap(), &opts).unwrap();
        (ip, lp)
    }

    const MANIFEST: &str = r#"
[[dataset]]
name = "synthetic"
root = "data"
images = "case*_ct.nii.gz"
labels = "case*_seg.nii.gz"
label_map = [1, 2]
classes = [1, 2, 3]
tumours = [{ raw = 3, class = 3, merge_into = 1 }]

[[dataset]]
name = "held-out"
role = "validation"
root = "data"
cases = [["val_ct.nii.gz", "val_seg.nii.gz"]]
label_map = [1, 2]
classes = [1, 2, 3]
tumours = [{ raw = 3, class = 3, merge_into = 1 }]
"#;

    fn setup(dir: &Path, train: &str) -> TrainConfig {
        let data = dir.join("data");
        std::fs::create_dir_all(&data).unwrap();
        for (i, s) in [0, 1, 2].iter().enumerate() {
            synthetic_case(&data, &format!("case{i}"), *s);
        }
        synthetic_case(&data, "val", 1);
        std::fs::write(dir.join("datasets.toml"), MANIFEST).unwrap();
        let text = format!(
            r#"
[model]
backbone = "unet"
width = 4
encoding = "learned"
classes = 3

[data]
manifest = "datasets.toml"
cache = "cache"
roi = [32, 32, 32]
num_samples = 2
workers = 2

[train]
output = "run"
{train}
"#
        );
        TrainConfig::parse(&text, dir, &dir.join("train.toml")).unwrap()
    }

    fn weights(t: &Trainer) -> Vec<(String, Vec<f32>)> {
        t.weights()
            .into_iter()
            .map(|(k, v)| (k, v.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
            .collect()
    }

    #[test]
    fn labels_are_mapped_split_and_merged_as_the_rules_say() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = setup(dir.path(), "steps = 1");
        let m = univ_train::data::Manifest::load(&cfg.data.manifest).unwrap();
        assert_eq!(m.datasets.len(), 2);
        assert_eq!(m.datasets[0].cases.len(), 3);
        let d = &m.datasets[0];
        let c = &d.cases[0];
        let case = univ_train::data::prepare_case(
            &c.id,
            0,
            &c.image,
            &c.label,
            &d.rules,
            &univ_io::PreprocessOptions::universal_model(),
            [32; 3],
        )
        .unwrap();
        // 1.5 mm grid, cropped to the body, padded to 32.
        assert!(case.shape.iter().all(|s| *s >= 32), "{:?}", case.shape);
        let n = |f: &dyn Fn(usize) -> bool| (0..case.organ.len()).filter(|i| f(*i)).count();
        let tumour = n(&|i| case.lesion[i] == 3);
        assert!(tumour > 0);
        // The tumour is merged into organ 1: every tumour voxel is also organ 1.
        assert_eq!(n(&|i| case.lesion[i] == 3 && case.organ[i] == 1), tumour);
        assert!(n(&|i| case.organ[i] == 2) > 0);
        assert!(case.image.iter().all(|v| (0.0..=1.0).contains(v)));
    }

    #[test]
    fn rl_split_names_the_component_towards_patient_left() {
        // Two blobs along the RAS first axis: the one at small x (patient left) becomes c+1.
        let shape = [10usize, 3, 3];
        let mut organ = vec![0u8; 90];
        for y in 0..3 {
            for z in 0..3 {
                organ[1 + 10 * (y + 3 * z)] = 2;
                organ[8 + 10 * (y + 3 * z)] = 2;
            }
        }
        organ[5] = 2; // a third, smaller component: erased
        univ_train::data::case::rl_split(&mut organ, shape, 2);
        assert_eq!(organ[1], 3);
        assert_eq!(organ[8], 2);
        assert_eq!(organ[5], 0);
        // One component stays "right".
        let mut one = vec![0u8, 2, 2, 0];
        univ_train::data::case::rl_split(&mut one, [4, 1, 1], 2);
        assert_eq!(one, vec![0, 2, 2, 0]);
    }

    #[test]
    fn manifest_errors_name_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let _ = setup(dir.path(), "steps = 1");
        let base = dir.path();
        let parse = |t: &str| {
            univ_train::data::Manifest::parse(t, base, &base.join("m.toml"))
                .unwrap_err()
                .to_string()
        };
        let e = parse(
            "[[dataset]]\nname = \"x\"\npreset = \"99\"\nroot = \"data\"\ncases = [[\"val_ct.nii.gz\", \"val_seg.nii.gz\"]]",
        );
        assert!(e.contains("unknown preset \"99\""), "{e}");
        let e = parse(
            "[[dataset]]\nname = \"x\"\nroot = \"data\"\ncases = [[\"nope.nii.gz\", \"val_seg.nii.gz\"]]",
        );
        assert!(e.contains("nope.nii.gz does not exist"), "{e}");
        let e = parse(
            "[[dataset]]\nname = \"x\"\nroot = \"data\"\nimages = \"case*_ct.nii.gz\"\nlabels = \"other*.nii.gz\"",
        );
        assert!(e.contains("no label matches"), "{e}");
        let e = parse(
            "[[dataset]]\nname = \"x\"\nroot = \"data\"\nclasses = [0]\ncases = [[\"val_ct.nii.gz\", \"val_seg.nii.gz\"]]",
        );
        assert!(e.contains("background"), "{e}");
        let e = parse("[[dataset]]\nname = \"x\"\nbogus = 1\nroot = \"data\"");
        assert!(e.contains("bogus"), "{e}");
        // A label id the rules do not map is an error naming the case.
        let m = univ_train::data::Manifest::parse(
            "[[dataset]]\nname = \"x\"\nroot = \"data\"\nlabel_map = [1]\nclasses = [1]\ncases = [[\"val_ct.nii.gz\", \"val_seg.nii.gz\"]]",
            base,
            &base.join("m.toml"),
        )
        .unwrap();
        let d = &m.datasets[0];
        let e = univ_train::data::prepare_case(
            &d.cases[0].id,
            0,
            &d.cases[0].image,
            &d.cases[0].label,
            &d.rules,
            &univ_io::PreprocessOptions::universal_model(),
            [32; 3],
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("x/val_ct.nii.gz") && e.contains("label id 2"),
            "{e}"
        );
        // A label on another grid.
        let other = base.join("data/small_seg.nii.gz");
        write_nifti(
            &other,
            &Volume::from_vec(
                vec![0u8; 8],
                [2, 2, 2],
                [
                    [1.0, 0.0, 0.0, 0.0],
                    [0.0, 1.0, 0.0, 0.0],
                    [0.0, 0.0, 1.0, 0.0],
                    [0.0, 0.0, 0.0, 1.0],
                ],
            )
            .unwrap(),
            &WriteOptions::default(),
        )
        .unwrap();
        let e = univ_train::data::prepare_case(
            "x/mismatch",
            0,
            &d.cases[0].image,
            &other,
            &d.rules,
            &univ_io::PreprocessOptions::universal_model(),
            [32; 3],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("x/mismatch"), "{e}");
    }

    #[test]
    fn resumed_training_is_bit_for_bit_the_uninterrupted_run() {
        let dir_a = tempfile::tempdir().unwrap();
        let dir_b = tempfile::tempdir().unwrap();
        let train = "steps = 4\nwarmup = 2\nschedule_unit = \"step\"\ncheckpoint_every = 2\nseed = 7\nlr = 1e-3";
        let cfg_a = setup(dir_a.path(), train);
        let mut a = Trainer::new(cfg_a, Device::Cpu, |_| {}).unwrap();
        let mut losses_a = Vec::new();
        a.run(None, |s| losses_a.push(s.loss), |_| {}).unwrap();
        assert_eq!(a.step(), 4);

        let cfg_b = setup(dir_b.path(), train);
        let mut b = Trainer::new(cfg_b.clone(), Device::Cpu, |_| {}).unwrap();
        let mut losses_b = Vec::new();
        b.run(Some(3), |s| losses_b.push(s.loss), |_| {}).unwrap();
        assert_eq!(b.step(), 3);
        drop(b); // as if the process died after step 3 (last checkpoint: step 2)
        let mut b = Trainer::new(cfg_b, Device::Cpu, |_| {}).unwrap();
        assert_eq!(b.resume().unwrap(), Some(2));
        losses_b.truncate(2);
        b.run(None, |s| losses_b.push(s.loss), |_| {}).unwrap();
        assert_eq!(losses_a, losses_b);
        let (wa, wb) = (weights(&a), weights(&b));
        assert_eq!(wa.len(), wb.len());
        for ((ka, va), (kb, vb)) in wa.iter().zip(&wb) {
            assert_eq!(ka, kb);
            assert!(va == vb, "{ka} differs after resuming");
        }
        // The logs match too (the rows of the abandoned step 3 were dropped on resume).
        let la = std::fs::read_to_string(dir_a.path().join("run/log.csv")).unwrap();
        let lb = std::fs::read_to_string(dir_b.path().join("run/log.csv")).unwrap();
        let strip = |s: &str| -> Vec<String> {
            s.lines()
                .map(|l| {
                    let mut c: Vec<&str> = l.split(',').collect();
                    c.remove(7); // data wait
                    c.remove(6); // seconds
                    c.join(",")
                })
                .collect()
        };
        assert_eq!(strip(&la), strip(&lb));
        assert_eq!(la.lines().count(), 5);
        // The weights file is a checkpoint the model crate loads.
        let ck = univ_model::Checkpoint::load(dir_a.path().join("run/model.safetensors")).unwrap();
        let (_, report) = ck.build(&Device::Cpu).unwrap();
        assert!(report.unexpected.is_empty(), "{report}");
        assert!(dir_a.path().join("run/curves.png").exists());
    }

    #[test]
    fn training_lowers_the_loss_and_validation_reports_dice() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = setup(
            dir.path(),
            "steps = 30\nlr = 3e-3\nwarmup = 3\nschedule_unit = \"step\"\ncheckpoint_every = 0\nvalidate_every = 100",
        );
        let mut t = Trainer::new(cfg, Device::Cpu, |_| {}).unwrap();
        let mut losses = Vec::new();
        let mut vals = Vec::new();
        t.run(None, |s| losses.push(s.loss), |v| vals.push(v.clone()))
            .unwrap();
        let first: f32 = losses[..5].iter().sum::<f32>() / 5.0;
        let last: f32 = losses[25..].iter().sum::<f32>() / 5.0;
        assert!(last < first * 0.9, "loss {first} → {last}");
        // Validation ran at the end, on all three classes.
        assert_eq!(vals.len(), 1);
        let v = &vals[0];
        assert_eq!(v.step, 30);
        assert_eq!(
            v.per_class.iter().map(|c| c.0).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        assert!(v.per_class.iter().all(|(_, d)| (0.0..=1.0).contains(d)));
        let csv = std::fs::read_to_string(dir.path().join("run/validation.csv")).unwrap();
        assert!(csv.starts_with("step,epoch,mean_dice"), "{csv}");
    }

    #[test]
    fn gradient_accumulation_takes_several_batches_per_step() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = setup(
            dir.path(),
            "steps = 2\naccumulate = 3\nschedule_unit = \"step\"\ncheckpoint_every = 0",
        );
        let mut t = Trainer::new(cfg, Device::Cpu, |_| {}).unwrap();
        let mut logs = Vec::new();
        t.run(None, |s| logs.push(s.clone()), |_| {}).unwrap();
        assert_eq!(t.step(), 2);
        // Three micro-batches of two patches each: per-class losses pool 6 pairs per class.
        assert!(
            logs.iter()
                .all(|l| l.loss.is_finite() && l.per_class.len() == 3)
        );
        // The same run without accumulation differs (it sees a third of the data).
        let dir2 = tempfile::tempdir().unwrap();
        let cfg2 = setup(
            dir2.path(),
            "steps = 2\nschedule_unit = \"step\"\ncheckpoint_every = 0",
        );
        let mut t2 = Trainer::new(cfg2, Device::Cpu, |_| {}).unwrap();
        let mut logs2 = Vec::new();
        t2.run(None, |s| logs2.push(s.loss), |_| {}).unwrap();
        assert_ne!(logs[1].loss, logs2[1]);
    }

    /// One rank's outcome: its step logs (or error), final weights and total steps.
    type RankRun = (
        Result<Vec<univ_train::StepLog>, univ_train::Error>,
        Vec<(String, Vec<f32>)>,
        u64,
    );

    /// Runs `train` as ranks 0 and 1 of a two-process run in threads of this process (over
    /// the TCP collectives); returns each rank's step logs or error, and its final weights.
    fn two_ranks(dir: &Path, train: &str) -> Vec<RankRun> {
        let cfg = setup(dir, train);
        let port = std::net::TcpListener::bind(("127.0.0.1", 0))
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let ranks: Vec<_> = (0..2)
            .map(|rank| {
                let cfg = cfg.clone();
                std::thread::spawn(move || {
                    let env = univ_train::WorldEnv {
                        rank,
                        world_size: 2,
                        local_rank: rank,
                        master_addr: "127.0.0.1".into(),
                        master_port: port,
                    };
                    let mut t = Trainer::new(cfg, Device::Cpu, |_| {}).unwrap();
                    let g = univ_train::ProcessGroup::init(
                        env,
                        &Device::Cpu,
                        std::time::Duration::from_secs(60),
                    )
                    .unwrap();
                    t.set_process_group(g).unwrap();
                    assert_eq!(t.is_main(), rank == 0);
                    let mut logs = Vec::new();
                    let r = t.run(None, |s| logs.push(s.clone()), |_| {}).map(|()| logs);
                    (r, weights(&t), t.total_steps())
                })
            })
            .collect();
        ranks.into_iter().map(|h| h.join().unwrap()).collect()
    }

    #[test]
    fn two_ranks_train_as_one_process_accumulating_both_their_batches() {
        // One process, two micro-batches per step ...
        let dir_a = tempfile::tempdir().unwrap();
        let common = "epochs = 1\nschedule_unit = \"step\"\nseed = 5\nlr = 1e-3\nwarmup = 1";
        let cfg = setup(dir_a.path(), &format!("{common}\naccumulate = 2"));
        let mut a = Trainer::new(cfg, Device::Cpu, |_| {}).unwrap();
        let mut logs_a = Vec::new();
        a.run(None, |s| logs_a.push(s.clone()), |_| {}).unwrap();
        // Three cases, one per micro-batch: two steps.
        assert_eq!(a.total_steps(), 2);
        let wa = weights(&a);
        // ... and two ranks of one micro-batch each.
        let dir_b = tempfile::tempdir().unwrap();
        let ranks = two_ranks(dir_b.path(), common);
        for (rank, (logs, wb, total)) in ranks.into_iter().enumerate() {
            let logs = logs.unwrap();
            assert_eq!(
                total, 2,
                "rank {rank}: the epoch is shared between the ranks"
            );
            assert_eq!(logs.len(), 2);
            for (la, lb) in logs_a.iter().zip(&logs) {
                assert!(
                    (la.loss - lb.loss).abs() <= 1e-6,
                    "{} vs {}",
                    la.loss,
                    lb.loss
                );
                assert_eq!(
                    la.per_class.iter().map(|c| c.0).collect::<Vec<_>>(),
                    lb.per_class.iter().map(|c| c.0).collect::<Vec<_>>()
                );
                for ((_, x), (_, y)) in la.per_class.iter().zip(&lb.per_class) {
                    assert!((x - y).abs() <= 1e-5, "per-class loss {x} vs {y}");
                }
            }
            let mut worst = 0f32;
            for ((ka, va), (kb, vb)) in wa.iter().zip(&wb) {
                assert_eq!(ka, kb);
                for (x, y) in va.iter().zip(vb) {
                    worst = worst.max((x - y).abs() / (1.0 + x.abs()));
                }
            }
            assert!(worst <= 1e-6, "rank {rank}: weights differ by {worst}");
        }
        // Only rank 0 wrote the log and the checkpoint.
        let log = std::fs::read_to_string(dir_b.path().join("run/log.csv")).unwrap();
        assert_eq!(log.lines().count(), 3, "{log}");
        assert!(dir_b.path().join("run/model.safetensors").exists());

        // A loss that diverges stops every rank at the same step, none waits for the others.
        let dir_c = tempfile::tempdir().unwrap();
        let ranks = two_ranks(
            dir_c.path(),
            "steps = 6\nlr = 1e30\nschedule_unit = \"step\"\ncheckpoint_every = 0",
        );
        let steps: Vec<u64> = ranks
            .into_iter()
            .map(|(r, _, _)| match r {
                Err(univ_train::Error::Diverged { step, .. }) => step,
                other => panic!("expected Diverged, got {:?}", other.map(|l| l.len())),
            })
            .collect();
        assert_eq!(steps[0], steps[1]);
    }

    #[test]
    fn a_diverging_loss_stops_with_the_step() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = setup(dir.path(), "steps = 6\nlr = 1e30\nschedule_unit = \"step\"");
        let mut t = Trainer::new(cfg, Device::Cpu, |_| {}).unwrap();
        let e = t.run(None, |_| {}, |_| {}).unwrap_err();
        match e {
            univ_train::Error::Diverged { step, value } => {
                assert!(step >= 2 && !value.is_finite(), "{step} {value}");
                assert!(e.to_string().contains(&format!("at step {step}")));
            }
            other => panic!("expected Diverged, got {other}"),
        }
    }

    #[test]
    fn extending_keeps_trained_rows_and_can_freeze_the_backbone() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = setup(dir.path(), "steps = 2\nschedule_unit = \"step\"");
        let mut t = Trainer::new(cfg, Device::Cpu, |_| {}).unwrap();
        t.run(None, |_| {}, |_| {}).unwrap();
        let old = weights(&t);
        let model = dir.path().join("run/model.safetensors");
        // Four classes now; the new one has no data here, the point is the bookkeeping.
        let text = format!(
            "[model]\nbackbone = \"unet\"\nwidth = 4\nclasses = 4\ninit = {:?}\nclass_names = {{ 4 = \"Bone Lesion\" }}\n\n[data]\nmanifest = \"datasets.toml\"\ncache = \"cache\"\nroi = [32, 32, 32]\n\n[train]\noutput = \"run2\"\nsteps = 2\nschedule_unit = \"step\"\nfreeze_backbone = true\n",
            model
        );
        let cfg2 = TrainConfig::parse(&text, dir.path(), &dir.path().join("t2.toml")).unwrap();
        let mut t2 = Trainer::new(cfg2, Device::Cpu, |_| {}).unwrap();
        let r = t2.init_report().clone();
        assert_eq!(r.grown, vec![("organ_embedding.weight".to_string(), 3, 4)]);
        assert!(r.fresh.is_empty() && r.mismatched.is_empty(), "{r:?}");
        assert!(t2.trainable().iter().all(|n| !n.starts_with("backbone.")));
        t2.run(None, |_| {}, |_| {}).unwrap();
        let new = weights(&t2);
        for ((k, a), (_, b)) in old.iter().zip(&new) {
            if k.starts_with("backbone.") {
                assert!(a == b, "{k} changed although the backbone is frozen");
            }
        }
        let emb_old = &old
            .iter()
            .find(|(k, _)| k == "organ_embedding.weight")
            .unwrap()
            .1;
        let emb_new = &new
            .iter()
            .find(|(k, _)| k == "organ_embedding.weight")
            .unwrap()
            .1;
        assert_eq!(emb_new.len(), 4 * 256);
        assert_eq!(emb_old.len(), 3 * 256);
        // The checkpoint names its classes: the three it was extended from, then the new one,
        // so that `univ segment --classes` knows it.
        let ck = univ_model::Checkpoint::load(dir.path().join("run2/model.safetensors")).unwrap();
        let names = ck.class_names().unwrap().unwrap();
        // And the classes it was trained on: those of the first run (its metadata), with
        // this run's; never the new, unsupervised row.
        let first = univ_model::Checkpoint::load(&model).unwrap();
        let trained = ck.trained_classes().unwrap().unwrap();
        assert_eq!(trained, first.trained_classes().unwrap().unwrap());
        assert!(!trained.contains(&4) && !trained.is_empty(), "{trained:?}");
        assert_eq!(
            names,
            ["Spleen", "Right Kidney", "Left Kidney", "Bone Lesion"]
        );
        let (m, _) = ck.build(&Device::Cpu).unwrap();
        assert_eq!(m.classes().parse_list("bone_lesion").unwrap(), vec![4]);
        assert_eq!(
            m.classes().get(4).unwrap().kind,
            univ_model::ClassKind::Tumour
        );
        // A name for a class the model does not have is refused.
        let bad = text.replace("4 = \"Bone Lesion\"", "5 = \"Brain\"");
        let e = TrainConfig::parse(&bad, dir.path(), &dir.path().join("t3.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("t3.toml") && e.contains("class_names"), "{e}");
    }

    #[test]
    fn adamw_step_matches_the_pytorch_update() {
        // p = 1, g = 0.5, lr = 0.1, wd = 0.01, first step: m̂ = 0.5, √v̂ = 0.5 →
        // p = 1·(1 − 0.001) − 0.1·0.5/(0.5 + 1e-8) = 0.899.
        let var = candle_core::Var::new(&[1.0f32], &Device::Cpu).unwrap();
        let loss = (var.as_tensor() * 0.5).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        let mut opt = univ_train::AdamW::new(
            vec![("p".into(), var.clone())],
            univ_train::AdamWConfig {
                lr: 0.1,
                weight_decay: 0.01,
                ..Default::default()
            },
        )
        .unwrap();
        opt.step(&grads).unwrap();
        let p = var.as_tensor().to_vec1::<f32>().unwrap()[0];
        assert!((p - 0.899).abs() < 1e-6, "{p}");
        assert_eq!(opt.step_count(), 1);
    }

    #[test]
    fn schedule_follows_the_closed_form() {
        let s = univ_train::WarmupCosine::official();
        assert_eq!(s.lr(0), 0.0);
        assert!((s.lr(1) - 1e-4 / 99.0).abs() < 1e-18);
        assert!((s.lr(99) - 1e-4).abs() < 1e-18);
        assert!((s.lr(100) - 1e-4).abs() < 1e-18);
        assert!((s.lr(1050) - 0.5e-4).abs() < 1e-15);
        assert_eq!(s.lr(2000), 0.0);
    }
}

#[test]
#[ignore = "needs ../shared (real CT data and golden fixtures)"]
fn presets_match_the_official_tables() {
    let Some(shared) = shared::shared_dir() else {
        return;
    };
    let t: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(shared.join("data/universal_model/templates_and_mappings.json"))
            .unwrap(),
    )
    .unwrap();
    let list = |v: &serde_json::Value| -> Vec<usize> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as usize)
            .collect()
    };
    let sup = t["TEMPLATE_utils (supervised/evaluated universal classes per dataset key)"]
        .as_object()
        .unwrap();
    let maps = t["TEMPLATE_label_transfer (raw label id r -> universal class TEMPLATE[key][r-1]; 0 = dropped)"]
        .as_object()
        .unwrap();
    let tumours = t["POST_TUMOR_DICT_label_transfer ((raw id, universal tumor class))"]
        .as_object()
        .unwrap();
    let mut checked = 0;
    for p in univ_train::data::presets::PRESETS {
        if p.key == "universal" {
            continue;
        }
        assert_eq!(p.supervised, list(&sup[p.key]).as_slice(), "{}", p.key);
        let map_key = if p.key == "01_2" { "01" } else { p.key };
        assert_eq!(p.label_map, list(&maps[map_key]).as_slice(), "{}", p.key);
        let want: Vec<(u8, usize)> = tumours
            .get(p.key)
            .map(|v| {
                v.as_array()
                    .unwrap()
                    .iter()
                    .map(|pair| {
                        let l = list(pair);
                        (l[0] as u8, l[1])
                    })
                    .collect()
            })
            .unwrap_or_default();
        let got: Vec<(u8, usize)> = p.tumours.iter().map(|t| (t.raw, t.class)).collect();
        assert_eq!(got, want, "{}", p.key);
        checked += 1;
    }
    assert_eq!(checked, 17);
    // Key rule of the loss, with its BTCV override.
    use univ_train::data::presets::template_key;
    assert_eq!(
        template_key("01_Multi-Atlas_Labeling/label/label0061").unwrap(),
        "01_2"
    );
    assert_eq!(
        template_key("01_Multi-Atlas_Labeling/label/label0001").unwrap(),
        "01"
    );
    assert_eq!(
        template_key("10_Decathlon/Task07_Pancreas/labelsTr/pancreas_001").unwrap(),
        "10_07"
    );
    assert_eq!(template_key("05_KiTS/label/00001").unwrap(), "05");
}
