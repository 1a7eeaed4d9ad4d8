//! Tests of the `univ` command-line program: it runs the real binary.

#[path = "common/shared.rs"]
mod shared;

#[path = "cohort_cli.rs"]
mod cohort_cli;
#[path = "fuzz_replay.rs"]
mod fuzz_replay;
#[path = "../examples/segment_ct.rs"]
mod segment_ct_example;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The demo model of the source tree.
fn demo_model() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/demo/univ_demo_unet.safetensors")
}

fn univ(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_univ"))
        .args(args)
        .output()
        .expect("run the univ binary")
}

/// Largest absolute difference between two tensors of the same shape.
fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// A JSON file, parsed.
fn read_json(p: impl AsRef<Path>) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).to_string(),
        String::from_utf8_lossy(&o.stderr).to_string(),
    )
}

#[test]
#[ignore = "needs ../shared (real CT data and golden fixtures)"]
fn info_prints_the_header_summary() {
    let Some(ct) = shared::shared_file("data/ct/example_ct.nii.gz") else {
        return;
    };
    let o = univ(&["info", ct.to_str().unwrap()]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    // Shape, type, spacing and HU range as ../shared/data/README.md lists them; the affine's
    // offset as fixtures/preprocess/meta.json records it (MONAI's reading of the header).
    assert!(out.contains("122 x 101 x 112"), "{out}");
    assert!(out.contains("int32"), "{out}");
    assert!(out.contains("3.0000 x 3.0000 x 3.0000 mm"), "{out}");
    assert!(out.contains("orientation: RAS"), "{out}");
    assert!(out.contains("min -1207 max 3382"), "{out}");
    assert!(out.contains("-177.9563"), "{out}");

    let o = univ(&["info", "--json", ct.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["shape"], serde_json::json!([122, 101, 112]));
    assert_eq!(v["axcodes"], "RAS");
    assert_eq!(v["intensity"]["max"], 3382.0);
}

#[test]
#[ignore = "needs ../shared (real CT data and golden fixtures)"]
fn preprocess_writes_image_label_and_record() {
    let Some(shared) = shared::shared_dir() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("pre.nii.gz");
    let lab = dir.path().join("pre_label.nii.gz");
    let rec = dir.path().join("record.json");
    let o = univ(&[
        "preprocess",
        shared.join("data/ct/example_ct.nii.gz").to_str().unwrap(),
        out.to_str().unwrap(),
        "--label",
        shared
            .join("data/ct/derived_example_ct_seg_fast_um32.nii.gz")
            .to_str()
            .unwrap(),
        "--label-output",
        lab.to_str().unwrap(),
        "--record",
        rec.to_str().unwrap(),
    ]);
    let (stdout, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(stdout.contains("243 x 193 x 223"), "{stdout}");

    let img = univ::io::read_image(&out).unwrap();
    let golden =
        univ::io::read_image(shared.join("fixtures/preprocess/example_ct_image.nii.gz")).unwrap();
    assert_eq!(img.shape(), golden.shape());
    let d = img
        .data()
        .iter()
        .zip(golden.data())
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(d <= 1e-4, "{d}");
    let h = univ::io::read_header(&lab, &univ::io::Limits::default()).unwrap();
    assert_eq!(h.datatype, "uint8");
    assert_eq!(h.shape, [243, 193, 223]);
    let r: univ::io::PreprocessRecord = serde_json::from_value(read_json(&rec)).unwrap();
    assert_eq!(r.resampled_shape, [243, 201, 223]);

    // Options: no crop, 3 mm, another window.
    let o = univ(&[
        "preprocess",
        shared.join("data/ct/example_ct.nii.gz").to_str().unwrap(),
        out.to_str().unwrap(),
        "--no-crop",
        "--spacing",
        "3",
        "--a-min",
        "-1000",
        "--a-max",
        "1000",
    ]);
    assert!(o.status.success(), "{}", text(&o).1);
    let img = univ::io::read_image(&out).unwrap();
    assert_eq!(img.shape(), [122, 101, 112]);
    let raw = univ::io::read_image(shared.join("data/ct/example_ct.nii.gz")).unwrap();
    let want = ((raw.data()[0] + 1000.0) / 2000.0).clamp(0.0, 1.0);
    assert!((img.data()[0] - want).abs() < 1e-6);
}

fn assert_clean_failure(o: &Output, needle: &str) {
    let (_, err) = text(o);
    assert!(!o.status.success());
    assert!(err.starts_with("error: "), "{err}");
    assert!(err.contains(needle), "{err}");
    assert!(
        !err.contains("panicked") && !err.contains("backtrace"),
        "{err}"
    );
}

#[test]
fn bad_input_gives_one_clear_error_and_a_nonzero_exit() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.nii.gz");
    assert_clean_failure(
        &univ(&["info", missing.to_str().unwrap()]),
        "missing.nii.gz",
    );

    let junk = dir.path().join("junk.nii");
    std::fs::write(&junk, vec![7u8; 400]).unwrap();
    assert_clean_failure(
        &univ(&["info", junk.to_str().unwrap()]),
        "not a valid NIfTI-1 file",
    );

    let out = dir.path().join("o.nii.gz");
    assert_clean_failure(
        &univ(&[
            "preprocess",
            junk.to_str().unwrap(),
            out.to_str().unwrap(),
            "--spacing",
            "1,2",
        ]),
        "--spacing",
    );
    assert!(!Path::new(&out).exists());
}

#[test]
#[ignore = "needs ../shared (real CT data and golden fixtures)"]
fn inspect_convert_and_forward_a_checkpoint() {
    let Some(shared) = shared::shared_dir() else {
        return;
    };
    let fx = shared.join("fixtures/model_unet");
    let pth = fx.join("model_official.pth");
    let o = univ(&["inspect", "--json", pth.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o).1);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["backbone"], "unet");
    assert_eq!(v["classes"], 32);
    assert_eq!(v["encoding"], "word_embedding");
    assert_eq!(v["embedding_present"], true);
    assert_eq!(v["sha256"].as_str().unwrap().len(), 64);
    assert_eq!(v["unexpected_keys"].as_array().unwrap().len(), 0);

    let dir = tempfile::tempdir().unwrap();
    let st = dir.path().join("canonical.safetensors");
    let o = univ(&["convert", pth.to_str().unwrap(), st.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o).1);
    let tensors = candle_core::safetensors::load(&st, &candle_core::Device::Cpu).unwrap();
    assert_eq!(tensors.len(), 117);
    assert!(tensors.keys().all(|k| !k.starts_with("module.")));
    assert!(tensors.contains_key("backbone.down_tr64.ops.0.conv1.weight"));

    let out = dir.path().join("logits.safetensors");
    let input = fx.join("input.safetensors");
    let o = univ(&[
        "forward",
        "--checkpoint",
        st.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--reps",
        "2",
        "--timings",
        dir.path().join("timings.json").to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o).1);
    let t = read_json(dir.path().join("timings.json"));
    assert_eq!(t["device"], "cpu", "{t}");
    assert_eq!(t["precision"], "f32", "{t}");
    assert_eq!(t["all_s"].as_array().unwrap().len(), 2, "{t}");
    let best = t["best_s"].as_f64().unwrap();
    assert!(
        t["all_s"]
            .as_array()
            .unwrap()
            .iter()
            .all(|v| v.as_f64().unwrap() >= best && best > 0.0),
        "{t}"
    );
    // Device and precision choices that cannot run here are clear errors.
    let args = |extra: &[&str]| forward_fixture(&fx, &out, &[], extra).0;
    assert_clean_failure(&args(&["--precision", "f16"]), "GPU only");
    assert_clean_failure(&args(&["--device", "cuda:x"]), "cpu, cuda or cuda:N");
    if !cfg!(feature = "cuda") {
        assert_clean_failure(&args(&["--device", "cuda:1"]), "no CUDA device 1");
    }
    let got = candle_core::safetensors::load(&out, &candle_core::Device::Cpu).unwrap();
    let want =
        candle_core::safetensors::load(fx.join("expected.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    let d = max_abs_diff(&got["logits"], &want["logits"]);
    assert!(d < 1e-3, "logits differ by {d}");

    // A file that is not a checkpoint, and a name that is not cached offline.
    let junk = dir.path().join("junk.pth");
    std::fs::write(&junk, b"not a zip").unwrap();
    assert_clean_failure(&univ(&["inspect", junk.to_str().unwrap()]), "junk.pth");
    let o = Command::new(env!("CARGO_BIN_EXE_univ"))
        .args(["inspect", "swinunetr"])
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HOME", dir.path())
        .output()
        .unwrap();
    assert_clean_failure(&o, "clip_driven_universal_swin_unetr.pth");
}

/// `univ forward` on the fixture U-Net with extra environment variables and arguments:
/// (output, logits when it succeeded).
fn forward_fixture(
    fx: &Path,
    out: &Path,
    env: &[(&str, &str)],
    extra: &[&str],
) -> (Output, Option<candle_core::Tensor>) {
    let input = fx.join("input.safetensors");
    let ckpt = fx.join("model.safetensors");
    let mut args = vec![
        "forward",
        "--checkpoint",
        ckpt.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_univ"));
    cmd.args(&args).env_remove("UNIV_BF16_KERNEL");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let o = cmd.output().unwrap();
    let logits = o.status.success().then(|| {
        candle_core::safetensors::load(out, &candle_core::Device::Cpu).unwrap()["logits"].clone()
    });
    (o, logits)
}

#[test]
fn bf16_stays_near_f32_falls_back_with_a_warning_and_fast_is_a_preset() {
    let Some(shared) = shared::shared_dir() else {
        return;
    };
    let fx = shared.join("fixtures/model_unet");
    let want =
        candle_core::safetensors::load(fx.join("expected.safetensors"), &candle_core::Device::Cpu)
            .unwrap()["logits"]
            .clone();
    let scale = want
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("logits.safetensors");

    // The portable bf16 kernel runs anywhere: near f32 (bf16 keeps 8 bits of mantissa), but
    // not equal to it (the bf16 path really ran).
    let (o, got) = forward_fixture(
        &fx,
        &out,
        &[("UNIV_BF16_KERNEL", "reference")],
        &["--precision", "bf16"],
    );
    assert!(o.status.success(), "{}", text(&o).1);
    assert!(
        text(&o).1.contains("bf16, reference kernel"),
        "{}",
        text(&o).1
    );
    let d = max_abs_diff(&got.unwrap(), &want);
    assert!(
        d < 0.02 * scale,
        "bf16 logits differ by {d} (largest |logit| {scale})"
    );
    assert!(
        d > 1e-3,
        "bf16 logits equal f32's within {d}: was bf16 used?"
    );

    // The best kernel of this machine, or f32 with a warning where there is none.
    let (o, got) = forward_fixture(&fx, &out, &[], &["--precision", "bf16"]);
    assert!(o.status.success(), "{}", text(&o).1);
    let d = max_abs_diff(&got.unwrap(), &want);
    match univ::model::runtime::best_bf16_kernel() {
        Some(k) => {
            assert!(
                text(&o).1.contains(&format!("bf16, {k} kernel")),
                "{}",
                text(&o).1
            );
            assert!(d < 0.02 * scale, "{k}: bf16 logits differ by {d}");
        }
        None => {
            assert!(text(&o).1.contains("warning: bf16"), "{}", text(&o).1);
            assert!(d < 1e-3, "f32 fallback logits differ by {d}");
        }
    }

    // A kernel that is not there, or has no such name, is a clear error.
    let (o, _) = forward_fixture(
        &fx,
        &out,
        &[("UNIV_BF16_KERNEL", "sse9")],
        &["--precision", "bf16"],
    );
    assert_clean_failure(&o, "UNIV_BF16_KERNEL");
    if univ::model::runtime::Bf16Kernel::Amx.check().is_err() {
        let (o, _) = forward_fixture(
            &fx,
            &out,
            &[("UNIV_BF16_KERNEL", "amx")],
            &["--precision", "bf16"],
        );
        assert_clean_failure(&o, "bf16 kernel amx");
    }

    // `segment --precision bf16` records what ran in report.json.
    let ct = dir.path().join("ct.nii.gz");
    write_small_ct(&ct, 40);
    let seg = dir.path().join("seg");
    let demo = demo_model();
    let o = Command::new(env!("CARGO_BIN_EXE_univ"))
        .args(["segment", ct.to_str().unwrap(), "-o", seg.to_str().unwrap()])
        .args([
            "--checkpoint",
            demo.to_str().unwrap(),
            "--quiet",
            "--precision",
            "bf16",
        ])
        .env("UNIV_BF16_KERNEL", "reference")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o).1);
    let report = read_json(seg.join("report.json"));
    assert_eq!(report["settings"]["precision"], "bf16", "{report}");
    assert_eq!(report["settings"]["bf16_kernel"], "reference", "{report}");
    assert_eq!(report["settings"]["winograd"], true, "{report}");

    // `--winograd off` is recorded too, and a bad value is refused by name.
    let direct = dir.path().join("direct");
    let o = segment_small(&ct, &direct, &["--precision", "bf16", "--winograd", "off"]);
    assert!(o.status.success(), "{}", text(&o).1);
    assert_eq!(
        read_json(direct.join("report.json"))["settings"]["winograd"],
        false
    );
    let o = segment_small(&ct, &direct, &["--winograd", "maybe", "--overwrite"]);
    assert!(!o.status.success());
    assert!(text(&o).1.contains("--winograd"), "{}", text(&o).1);

    // `--fast`: overlap 0.25 and bf16 where the CPU has it (f32 with a warning elsewhere);
    // `--overlap` still wins.
    let fast = dir.path().join("fast");
    let o = segment_small(&ct, &fast, &["--fast"]);
    assert!(o.status.success(), "{}", text(&o).1);
    let report = read_json(fast.join("report.json"));
    assert_eq!(report["settings"]["overlap"], 0.25, "{report}");
    match univ::model::runtime::best_bf16_kernel() {
        Some(k) => assert_eq!(report["settings"]["bf16_kernel"], k.name(), "{report}"),
        None => {
            assert_eq!(report["settings"]["precision"], "f32", "{report}");
            assert!(text(&o).1.contains("warning: bf16"), "{}", text(&o).1);
        }
    }
    let o = segment_small(&ct, &fast, &["--fast", "--overlap", "0.5", "--overwrite"]);
    assert!(o.status.success(), "{}", text(&o).1);
    assert_eq!(
        read_json(fast.join("report.json"))["settings"]["overlap"],
        0.5
    );
}

#[test]
#[ignore = "needs ../shared (real CT data and golden fixtures)"]
fn embed_the_universal_bank_and_inspect_it() {
    let Some(shared) = shared::shared_dir() else {
        return;
    };
    let fx = shared.join("fixtures/clip_text");
    // A CLIP folder: the fixture's small random text model and its tokenizer.
    let dir = tempfile::tempdir().unwrap();
    let clip = dir.path().join("clip");
    std::fs::create_dir(&clip).unwrap();
    for (from, to) in [
        (fx.join("model/config.json"), "config.json"),
        (fx.join("model/model.safetensors"), "model.safetensors"),
        (fx.join("tokenizer.json"), "tokenizer.json"),
    ] {
        std::fs::copy(from, clip.join(to)).unwrap();
    }
    let out = dir.path().join("bank.safetensors");
    let o = univ(&[
        "embed",
        "--clip",
        clip.to_str().unwrap(),
        "--universal",
        "--class",
        "Superior Mesenteric Artery",
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o).1);
    let bank = univ::clip::ClassEmbeddings::load(&out).unwrap();
    assert_eq!(bank.len(), 33);
    assert_eq!(bank.prompts[7], "A computerized tomography of a Arota");
    assert_eq!(
        bank.prompts[32],
        "A computerized tomography of a Superior Mesenteric Artery"
    );
    // The 32 rows equal Hugging Face transformers' text_embeds for the same model.
    let want =
        candle_core::safetensors::load(fx.join("expected.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    let ours = bank.tensor().narrow(0, 0, 32).unwrap();
    assert!(max_abs_diff(&ours, &want["text_embeds"]) < 1e-4);

    let o = univ(&["embed", "--inspect", out.to_str().unwrap()]);
    let (stdout, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(stdout.contains("33 classes x 16 values"), "{stdout}");
    assert!(stdout.contains("Superior Mesenteric Artery"), "{stdout}");
    assert!(stdout.contains("cosine similarity"), "{stdout}");

    // Nothing to embed, and a bad CLIP folder: clear errors.
    assert_clean_failure(
        &univ(&[
            "embed",
            "--clip",
            clip.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ]),
        "nothing to embed",
    );
    let o = Command::new(env!("CARGO_BIN_EXE_univ"))
        .args([
            "embed",
            "--clip",
            "no/such-repo",
            "--universal",
            "-o",
            out.to_str().unwrap(),
        ])
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HOME", dir.path())
        .output()
        .unwrap();
    assert_clean_failure(&o, "no/such-repo");
}

/// Writes a small CT-like NIfTI: a soft-tissue block in air.
fn write_small_ct(path: &Path, side: usize) {
    let shape = [side, side, side / 2];
    let mut v = univ::io::Volume::filled(-1000f32, shape, univ::io::geometry::IDENTITY).unwrap();
    for z in 1..shape[2] - 1 {
        for y in 2..side - 2 {
            for x in 2..side - 2 {
                let i = v.index([x, y, z]);
                v.data_mut()[i] = 40.0 + (x * 7 % 13) as f32;
            }
        }
    }
    // A bone-bright rod, so that the intensities look like CT Hounsfield units.
    for z in 1..shape[2] - 1 {
        let i = v.index([side / 2, side / 2, z]);
        v.data_mut()[i] = 700.0;
    }
    univ::io::write_nifti(
        path,
        &v.map(|x| x as i16),
        &univ::io::WriteOptions::default(),
    )
    .unwrap();
}

#[test]
#[ignore = "needs ../shared (real CT data and golden fixtures)"]
fn segment_reproduces_monai_sliding_window_end_to_end() {
    let Some(shared) = shared::shared_dir() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("case");
    let ckpt = shared.join("fixtures/model_unet/model.safetensors");
    let ct_sm = shared.join("data/ct/example_ct_sm.nii.gz");
    let o = univ(&[
        "segment",
        ct_sm.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--checkpoint",
        ckpt.to_str().unwrap(),
        "--save-logits",
        "--per-class",
        "--quiet",
    ]);
    assert!(o.status.success(), "{}", text(&o).1);
    // The preprocessed grid is the fixture's input; its stitched logits match MONAI 0.9.0's.
    let logits =
        candle_core::safetensors::load(out.join("logits.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    let l = &logits["logits"];
    assert_eq!(l.dims(), &[32, 241, 191, 59]);
    let fx = candle_core::safetensors::load(
        shared.join("fixtures/sliding_window/logits_selected.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let channels = fx["channels"].to_vec1::<i64>().unwrap();
    let idx: Vec<Vec<i64>> = ["idx_x", "idx_y", "idx_z"]
        .iter()
        .map(|k| fx[*k].to_vec1::<i64>().unwrap())
        .collect();
    let want = fx["logits_sub"]
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let lv = l.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let mut n = 0;
    for c in &channels {
        for x in &idx[0] {
            for y in &idx[1] {
                for z in &idx[2] {
                    let got = lv[(((*c as usize) * 241 + *x as usize) * 191 + *y as usize) * 59
                        + *z as usize];
                    let w = want[n];
                    assert!(
                        (got - w).abs() <= 2e-3 + 1e-3 * w.abs(),
                        "channel {c} at ({x},{y},{z}): {got} vs {w}"
                    );
                    n += 1;
                }
            }
        }
    }
    // Outputs on the input grid with the input's geometry.
    let input_h = univ::io::read_header(
        shared.join("data/ct/example_ct_sm.nii.gz"),
        &univ::io::Limits::default(),
    )
    .unwrap();
    let seg_h = univ::io::read_header(
        out.join("segmentation.nii.gz"),
        &univ::io::Limits::default(),
    )
    .unwrap();
    assert_eq!(seg_h.shape, input_h.shape);
    assert_eq!(seg_h.geometry, input_h.geometry);
    assert!(
        out.join("masks/liver.nii.gz").exists() && out.join("masks/liver_tumor.nii.gz").exists()
    );
    let classes: serde_json::Value = read_json(out.join("classes.json"));
    assert_eq!(classes["classes"].as_array().unwrap().len(), 32);
    let report: serde_json::Value = read_json(out.join("report.json"));
    assert_eq!(report["windows"], 15);
    assert_eq!(report["classes"].as_array().unwrap().len(), 32);
    assert!(report["lesions"]["liver_tumor"]["present"].is_boolean());
    assert_eq!(report["checkpoint"]["sha256"].as_str().unwrap().len(), 64);
    // Time and peak resident memory per stage.
    let stages = [
        "preprocess",
        "sliding window",
        "post-process",
        "map back to the input grid",
    ];
    for stage in stages {
        assert!(
            report["timings_s"][stage].as_f64().unwrap() >= 0.0,
            "{stage}"
        );
        if cfg!(target_os = "linux") {
            assert!(
                report["peak_resident_mb_after"][stage].as_f64().unwrap() > 1.0,
                "{stage}"
            );
        }
    }
    // A CPU run has no GPU memory to report; the key says so rather than being absent.
    assert_eq!(report.get("gpu_memory_mb"), Some(&serde_json::Value::Null));
    // Existing results are not overwritten without --overwrite.
    let o = univ(&[
        "segment",
        ct_sm.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--checkpoint",
        ckpt.to_str().unwrap(),
    ]);
    assert_clean_failure(&o, "--overwrite");
    // With whole probability maps kept, the masks and the lesion report (whose probabilities
    // otherwise come from the voxels over the threshold only) are the same.
    let out2 = dir.path().join("case_probabilities");
    let o = univ(&[
        "segment",
        ct_sm.to_str().unwrap(),
        "-o",
        out2.to_str().unwrap(),
        "--checkpoint",
        ckpt.to_str().unwrap(),
        "--per-class",
        "--probabilities",
        "--quiet",
    ]);
    assert!(o.status.success(), "{}", text(&o).1);
    let report2: serde_json::Value = read_json(out2.join("report.json"));
    assert_eq!(report["lesions"], report2["lesions"]);
    assert_eq!(report["classes"], report2["classes"]);
    let label = univ::io::read_label(out.join("segmentation.nii.gz")).unwrap();
    let mut lesion_voxels = 0;
    for (id, entry) in classes["classes"].as_array().unwrap().iter().enumerate() {
        let id = id + 1;
        let file = entry["file"].as_str().unwrap();
        let m = univ::io::read_label(out.join("masks").join(file)).unwrap();
        let m2 = univ::io::read_label(out2.join("masks").join(file)).unwrap();
        assert_eq!(m.data(), m2.data(), "{file}");
        // The label map shows the class wherever no higher class is painted over it.
        for (v, on) in m.data().iter().enumerate() {
            let l = usize::from(label.data()[v]);
            if *on > 0 {
                assert!(l >= id, "{file}: voxel {v} labelled {l}");
            } else {
                assert_ne!(l, id, "{file}: voxel {v}");
            }
        }
        // Mask voxels are over the 0.5 threshold.
        if id >= 26 {
            let p = univ::io::read_label(out2.join("probabilities").join(file)).unwrap();
            for (on, pv) in m.data().iter().zip(p.data()) {
                if *on > 0 {
                    assert!(*pv >= 127, "{file}: probability {pv} in the mask");
                    lesion_voxels += 1;
                }
            }
        }
    }
    for (name, l) in report["lesions"].as_object().unwrap() {
        for lesion in l["lesions"].as_array().unwrap() {
            let p = lesion["mean_probability"].as_f64().unwrap();
            assert!((0.49..=1.0).contains(&p), "{name}: {p}");
        }
    }
    println!("lesion voxels checked: {lesion_voxels}");
}

#[test]
#[ignore = "needs ../shared (real CT data and golden fixtures)"]
fn segment_a_folder_with_a_broken_case_and_bad_checkpoints() {
    let Some(shared) = shared::shared_dir() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let cases = dir.path().join("cases");
    std::fs::create_dir(&cases).unwrap();
    write_small_ct(&cases.join("a.nii.gz"), 24);
    write_small_ct(&cases.join("c.nii.gz"), 20);
    std::fs::write(cases.join("b.nii.gz"), b"broken").unwrap();
    let out = dir.path().join("out");
    let ckpt = shared.join("fixtures/model_unet/model.safetensors");
    let o = univ(&[
        "segment",
        cases.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--checkpoint",
        ckpt.to_str().unwrap(),
        "--classes",
        "liver,spleen,kidney tumor",
        "--sw-batch",
        "2",
        "--probabilities",
        "--quiet",
    ]);
    let (_, err) = text(&o);
    assert!(!o.status.success());
    assert!(
        err.contains("b.nii.gz") && err.contains("1 of 3 case(s) failed"),
        "{err}"
    );
    for case in ["a", "c"] {
        let c = out.join(case);
        assert!(c.join("segmentation.nii.gz").exists(), "{case}");
        let classes: serde_json::Value = read_json(c.join("classes.json"));
        let names: Vec<&str> = classes["classes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, vec!["Liver", "Spleen", "Kidney Tumor"]);
        assert!(c.join("probabilities/liver.nii.gz").exists());
        let report: serde_json::Value = read_json(c.join("report.json"));
        // Kidney tumours need the kidneys, which were not computed: said in the report.
        assert!(
            report["notes"].to_string().contains("not computed"),
            "{}",
            report["notes"]
        );
    }
    assert!(!out.join("b").exists());
    // No temporary folders are left behind.
    let leftovers: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
        .collect();
    assert!(leftovers.is_empty());

    // A checkpoint whose shapes do not fit: the error names the key.
    let tensors = candle_core::safetensors::load(&ckpt, &candle_core::Device::Cpu).unwrap();
    let mut bad = tensors.clone();
    bad.insert(
        "controller.bias".into(),
        candle_core::Tensor::zeros(7, candle_core::DType::F32, &candle_core::Device::Cpu).unwrap(),
    );
    bad.remove("GAP.3.weight");
    let bad_path = dir.path().join("bad.safetensors");
    candle_core::safetensors::save(&bad, &bad_path).unwrap();
    let o = univ(&[
        "segment",
        cases.join("a.nii.gz").to_str().unwrap(),
        "-o",
        dir.path().join("o2").to_str().unwrap(),
        "--checkpoint",
        bad_path.to_str().unwrap(),
    ]);
    assert_clean_failure(&o, "GAP.3.weight");
    assert!(text(&o).1.contains("controller.bias"));
    // A checkpoint that does not exist: named.
    assert_clean_failure(
        &univ(&[
            "segment",
            cases.join("a.nii.gz").to_str().unwrap(),
            "-o",
            dir.path().join("o3").to_str().unwrap(),
            "--checkpoint",
            dir.path().join("missing.safetensors").to_str().unwrap(),
        ]),
        "missing.safetensors",
    );
}

#[test]
fn label_maps_are_checked_ids_and_all() {
    use univ::evaluate::parse_label_map;
    let m = parse_label_map(r#"{"1": 6, "27": 0}"#).unwrap();
    assert_eq!(m.into_iter().collect::<Vec<_>>(), [(1, 6), (27, 0)]);
    for (text, why) in [
        (r#"{"0": 1}"#, "not a label id"),
        (r#"{"01": 1}"#, "not a label id"),
        (r#"{"256": 1}"#, "not a label id"),
        (r#"{"1": 256}"#, "not a label id"),
        (r#"{"1": -1}"#, "not a label id"),
        (r#"{"1": "2"}"#, "not a label id"),
        ("[1, 2]", "expected a JSON object"),
        ("{", "expected a JSON object"),
    ] {
        let e = parse_label_map(text).unwrap_err();
        assert!(e.contains(why), "{text}: {e}");
    }
}

#[test]
#[ignore = "needs ../shared (real CT data and golden fixtures)"]
fn evaluate_label_maps_and_folders() {
    let Some(shared) = shared::shared_dir() else {
        return;
    };
    let gt = shared.join("data/ct/example_seg.nii.gz");
    let pred = shared.join("data/ct/example_seg_fast.nii.gz");
    let o = univ(&[
        "evaluate",
        "--pred",
        pred.to_str().unwrap(),
        "--gt",
        gt.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o).1);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let labels = v["labels"].as_array().unwrap();
    assert_eq!(labels.len(), 41);
    let l1 = &labels[0];
    assert_eq!(l1["label"], 1);
    assert!((l1["dice"].as_f64().unwrap() - 0.9773608636411277).abs() < 1e-9);
    assert!((l1["nsd_1mm"].as_f64().unwrap() - 0.8392785787582397).abs() < 1e-6);
    assert_eq!(l1["hd95_mm"], 3.0);
    // An empty prediction of a label: Hausdorff is undefined, written as a string.
    let l13 = labels.iter().find(|l| l["label"] == 13).unwrap();
    assert_eq!(l13["hd95_mm"], "NaN");

    // Folders, with a label map, and tumour detection.
    let dir = tempfile::tempdir().unwrap();
    let (p, g) = (dir.path().join("pred"), dir.path().join("gt"));
    std::fs::create_dir_all(&p).unwrap();
    std::fs::create_dir_all(&g).unwrap();
    let base = univ::io::read_label(&gt).unwrap();
    // Case 1: a "liver tumour" (label 27) in both; case 2: only in the reference.
    let with_tumour = base.map(|v| if v == 5 { 27 } else { v });
    let without = base.map(|v| if v == 5 { 0 } else { v });
    let wo = univ::io::WriteOptions::default();
    univ::io::write_nifti(g.join("c1.nii.gz"), &with_tumour, &wo).unwrap();
    univ::io::write_nifti(p.join("c1.nii.gz"), &with_tumour, &wo).unwrap();
    univ::io::write_nifti(g.join("c2.nii.gz"), &with_tumour, &wo).unwrap();
    univ::io::write_nifti(p.join("c2.nii.gz"), &without, &wo).unwrap();
    let map = dir.path().join("map.json");
    std::fs::write(&map, r#"{"27": 27, "1": 1}"#).unwrap();
    let o = univ(&[
        "evaluate",
        "--pred",
        p.to_str().unwrap(),
        "--gt",
        g.to_str().unwrap(),
        "--label-map",
        map.to_str().unwrap(),
        "--no-surface",
    ]);
    assert!(o.status.success(), "{}", text(&o).1);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let det = &v["tumour_detection"]["27"];
    assert_eq!((det["tp"].as_u64(), det["fn"].as_u64()), (Some(1), Some(1)));
    assert_eq!(det["sensitivity"], 0.5);
    // Only the mapped reference ids are compared.
    let c1 = v["cases"]["c1"]["labels"].as_array().unwrap();
    assert!(c1.iter().all(|l| l["voxels_gt"].as_u64().unwrap() == 0
        || [1, 27].contains(&l["label"].as_u64().unwrap())));
    // Grids that differ are a clear error.
    let small = shared.join("data/ct/derived_example_ct_seg_fast_um32.nii.gz");
    assert_clean_failure(
        &univ(&[
            "evaluate",
            "--pred",
            small.to_str().unwrap(),
            "--gt",
            gt.to_str().unwrap(),
        ]),
        "grid",
    );
}

#[test]
#[ignore = "needs ../shared (real CT data and golden fixtures)"]
fn preview_png_of_a_reference_segmentation() {
    let Some(shared) = shared::shared_dir() else {
        return;
    };
    let ct = univ::io::read_image(shared.join("data/ct/example_ct.nii.gz")).unwrap();
    let lab = univ::io::read_label(shared.join("data/ct/derived_example_ct_seg_fast_um32.nii.gz"))
        .unwrap();
    let classes: Vec<univ::ClassResult> = univ::ClassTable::universal()
        .iter()
        .map(|c| univ::ClassResult {
            info: c.clone(),
            mask: univ::io::ClassMask::from_fn(lab.shape(), |v| usize::from(lab.data()[v]) == c.id),
            probabilities: None,
            lesion_probabilities: None,
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("preview.png");
    univ::preview::write_preview(&p, &ct, &classes, Some("DEMO MODEL: NOT FOR CLINICAL USE"))
        .unwrap();
    let bytes = std::fs::read(&p).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    assert_eq!(&bytes[12..16], b"IHDR");
    let w = u32::from_be_bytes(bytes[16..20].try_into().unwrap());
    let h = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
    assert!(w > 300 && h > 200, "{w}x{h}");
    // Every chunk's CRC is valid.
    let mut i = 8;
    while i < bytes.len() {
        let len = u32::from_be_bytes(bytes[i..i + 4].try_into().unwrap()) as usize;
        let crc = u32::from_be_bytes(bytes[i + 8 + len..i + 12 + len].try_into().unwrap());
        assert_eq!(crc32fast::hash(&bytes[i + 4..i + 8 + len]), crc);
        i += 12 + len;
    }
    if let Some(keep) = std::env::var_os("UNIV_PREVIEW_OUT") {
        std::fs::copy(&p, keep).unwrap();
    }
}

#[test]
#[ignore = "needs ../shared (real CT data and golden fixtures)"]
fn info_and_segment_read_a_dicom_series_and_evaluate_aligns_its_reference() {
    let Some(series) = shared::shared_file("data/dicom/example_ct_dicom_j2k") else {
        return;
    };
    let Some(seg) = shared::shared_file("data/ct/derived_example_seg_dicom_um32.nii.gz") else {
        return;
    };
    let o = univ(&["info", series.to_str().unwrap()]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(out.contains("512 x 512 x 20"), "{out}");
    assert!(
        out.contains("(20 slices)") && out.contains("1.2.840.10008.1.2.4.90"),
        "{out}"
    );
    // The reference (a NIfTI in another axis order) scored against itself after reorientation:
    // `evaluate` aligns the grids and every label gets Dice 1.
    let dir = tempfile::tempdir().unwrap();
    let pre = dir.path().join("pre.nii.gz");
    let o = univ(&[
        "preprocess",
        series.to_str().unwrap(),
        pre.to_str().unwrap(),
        "--label",
        seg.to_str().unwrap(),
        "--label-output",
        dir.path().join("pre_seg.nii.gz").to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o).1);
    // The reference put onto the series' own voxel grid (another axis order) and written as a
    // prediction: `evaluate` aligns the two grids and every label scores Dice 1.
    let ct = univ::io::read_volume(&series).unwrap();
    let on_ct = univ::io::align_label_to(univ::io::read_label(&seg).unwrap(), &ct).unwrap();
    assert_ne!(on_ct.affine(), univ::io::read_label(&seg).unwrap().affine());
    let pred = dir.path().join("pred.nii.gz");
    univ::io::write_nifti(&pred, &on_ct, &univ::io::WriteOptions::default()).unwrap();
    let o = univ(&[
        "evaluate",
        "--pred",
        pred.to_str().unwrap(),
        "--gt",
        seg.to_str().unwrap(),
        "--no-surface",
    ]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let labels = v["labels"].as_array().unwrap();
    assert_eq!(labels.len(), 9, "{out}");
    for m in labels {
        assert_eq!(m["dice"], 1.0, "{m}");
    }
}

/// A tiny synthetic CT and label for training through the command line, and `data.toml`, a
/// manifest of that one case (dataset `tiny`, class 6).
fn write_training_case(dir: &Path) {
    let shape = [20usize, 20, 12];
    let aff = [
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
                let body = (x - 10).pow(2) + (y - 10).pow(2) < 64;
                let organ = (x - 8).pow(2) + (y - 10).pow(2) + (z - 6).pow(2) < 12;
                img.push(if organ {
                    120.0
                } else if body {
                    30.0
                } else {
                    -1000.0
                });
                lab.push(u8::from(organ) * 6);
            }
        }
    }
    let o = univ::io::WriteOptions::default();
    univ::io::write_nifti(
        dir.join("ct.nii.gz"),
        &univ::io::Volume::from_vec(img, shape, aff).unwrap(),
        &o,
    )
    .unwrap();
    univ::io::write_nifti(
        dir.join("seg.nii.gz"),
        &univ::io::Volume::from_vec(lab, shape, aff).unwrap(),
        &o,
    )
    .unwrap();
    std::fs::write(
        dir.join("data.toml"),
        "[[dataset]]\nname = \"tiny\"\ncases = [[\"ct.nii.gz\", \"seg.nii.gz\"]]\nclasses = [6]\n",
    )
    .unwrap();
}

#[test]
fn train_in_bf16_follows_the_f32_losses() {
    let dir = tempfile::tempdir().unwrap();
    write_training_case(dir.path());
    // Width 8: the 16- to 128-channel convolutions run in bf16.
    let losses: Vec<Vec<f64>> = ["f32", "bf16"]
        .iter()
        .map(|p| {
            let conf = dir.path().join(format!("train_{p}.toml"));
            std::fs::write(
                &conf,
                format!(
                    "[model]\nbackbone = \"unet\"\nwidth = 8\nclasses = 8\n\n[data]\nmanifest = \"data.toml\"\n\
                     roi = [32, 32, 32]\nnum_samples = 1\n\n[train]\noutput = \"run_{p}\"\nsteps = 3\n\
                     checkpoint_every = 3\nschedule_unit = \"step\"\n"
                ),
            )
            .unwrap();
            let o = Command::new(env!("CARGO_BIN_EXE_univ"))
                .args(["train", "--config", conf.to_str().unwrap(), "--quiet"])
                .args(["--precision", p, "--threads", "2"])
                .env("UNIV_BF16_KERNEL", "reference")
                .output()
                .unwrap();
            assert!(o.status.success(), "{}", text(&o).1);
            let log = std::fs::read_to_string(dir.path().join(format!("run_{p}/log.csv"))).unwrap();
            log.lines()
                .skip(1)
                .map(|l| l.split(',').nth(3).unwrap().parse().unwrap())
                .collect()
        })
        .collect();
    assert_eq!(losses[0].len(), 3);
    for (a, b) in losses[0].iter().zip(&losses[1]) {
        assert!((a - b).abs() < 0.01 * a.abs(), "f32 {a} against bf16 {b}");
    }
    assert_ne!(
        losses[0], losses[1],
        "bf16 training gave f32's losses exactly: was bf16 used?"
    );
}

#[test]
fn train_writes_checkpoints_refuses_to_overwrite_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    write_training_case(dir.path());
    let cfg = |steps: u32| {
        format!(
            "[model]\nbackbone = \"unet\"\nwidth = 4\nclasses = 8\n\n[data]\nmanifest = \"data.toml\"\n\
             roi = [32, 32, 32]\nnum_samples = 1\n\n[train]\noutput = \"run\"\nsteps = {steps}\n\
             checkpoint_every = 1\nschedule_unit = \"step\"\n"
        )
    };
    std::fs::write(dir.path().join("train.toml"), cfg(2)).unwrap();
    let conf = dir.path().join("train.toml");
    let o = univ(&["train", "--config", conf.to_str().unwrap(), "--quiet"]);
    assert!(o.status.success(), "{}", text(&o).1);
    let run = dir.path().join("run");
    for f in [
        "model.safetensors",
        "log.csv",
        "curves.png",
        "checkpoints/latest.json",
    ] {
        assert!(run.join(f).exists(), "{f} missing");
    }
    // The weights segment a CT with `univ segment`.
    let seg = dir.path().join("seg_out");
    let o = univ(&[
        "segment",
        dir.path().join("ct.nii.gz").to_str().unwrap(),
        "-o",
        seg.to_str().unwrap(),
        "--checkpoint",
        run.join("model.safetensors").to_str().unwrap(),
        "--quiet",
    ]);
    assert!(o.status.success(), "{}", text(&o).1);
    // A second run into the same folder is refused without --resume.
    let o = univ(&["train", "--config", conf.to_str().unwrap(), "--quiet"]);
    assert_clean_failure(&o, "--resume");
    // More steps, resumed: the log continues to step 3.
    std::fs::write(&conf, cfg(3)).unwrap();
    let o = univ(&["train", "--config", conf.to_str().unwrap(), "--resume"]);
    let (_, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("resuming after step 2 of 3"), "{err}");
    let log = std::fs::read_to_string(run.join("log.csv")).unwrap();
    assert_eq!(log.lines().count(), 4, "{log}");
    // A configuration error names the file and the field.
    std::fs::write(&conf, cfg(3).replace("width = 4", "width = 4\nbogus = 1")).unwrap();
    let o = univ(&["train", "--config", conf.to_str().unwrap()]);
    assert_clean_failure(&o, "bogus");
}

#[test]
fn train_as_two_ranks_of_a_torchrun_style_launch() {
    let dir = tempfile::tempdir().unwrap();
    write_training_case(dir.path());
    let conf = dir.path().join("train.toml");
    std::fs::write(
        &conf,
        "[model]\nbackbone = \"unet\"\nwidth = 4\nclasses = 8\n\n[data]\nmanifest = \"data.toml\"\n\
         roi = [32, 32, 32]\nnum_samples = 1\n\n[train]\noutput = \"run\"\nsteps = 2\n\
         checkpoint_every = 2\nschedule_unit = \"step\"\n",
    )
    .unwrap();
    let port = std::net::TcpListener::bind(("127.0.0.1", 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
        .to_string();
    let rank = |r: &str, world: &str| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_univ"));
        c.args(["train", "--config", conf.to_str().unwrap()])
            .env("WORLD_SIZE", world)
            .env("RANK", r)
            .env("LOCAL_RANK", r)
            .env("LOCAL_WORLD_SIZE", world)
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", &port)
            .env("UNIV_DIST_TIMEOUT", "120");
        c
    };
    let children: Vec<_> = ["0", "1"]
        .iter()
        .map(|r| {
            rank(r, "2")
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outs: Vec<Output> = children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();
    for o in &outs {
        assert!(o.status.success(), "{}", text(o).1);
    }
    let (out0, err0) = text(&outs[0]);
    assert!(
        err0.contains("distributed run: 2 processes over tcp"),
        "{err0}"
    );
    assert!(out0.contains("trained 2 steps"), "{out0}");
    // Rank 1 trains in silence, and rank 0 alone writes the run.
    let (out1, err1) = text(&outs[1]);
    assert!(out1.is_empty() && err1.is_empty(), "{out1}{err1}");
    let log = std::fs::read_to_string(dir.path().join("run/log.csv")).unwrap();
    assert_eq!(log.lines().count(), 3, "{log}");
    assert!(dir.path().join("run/model.safetensors").exists());
    // A rank whose rank 0 never comes gives up after UNIV_DIST_TIMEOUT, with a clear error.
    let o = rank("1", "2")
        .env("UNIV_DIST_TIMEOUT", "1")
        .arg("--resume")
        .output()
        .unwrap();
    assert_clean_failure(&o, "could not reach rank 0");
    // Incomplete launch variables are refused before any work.
    let o = rank("0", "2").env_remove("RANK").output().unwrap();
    assert_clean_failure(&o, "RANK is not");
}

#[test]
#[ignore = "needs ../shared (real CT data and golden fixtures)"]
fn segment_a_dicom_series_with_the_demo_model_and_write_dicom_seg() {
    let Some(series) = shared::shared_file("data/dicom/example_ct_dicom_j2k") else {
        return;
    };
    let demo =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/demo/univ_demo_unet.safetensors");
    assert!(demo.exists(), "the committed demo model is missing");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    // No --checkpoint: the demo model is used (and said so).
    let o = univ(&[
        "segment",
        series.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--dicom-seg",
        "--classes",
        "liver,spleen,stomach",
    ]);
    let (stdout, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("demo model"), "{err}");
    assert!(
        stdout.contains("segments,") && stdout.contains("frames"),
        "{stdout}"
    );
    let seg = univ::io::read_label(out.join("segmentation.nii.gz")).unwrap();
    assert_eq!(seg.shape(), [512, 512, 20]);
    assert!(seg.data().contains(&6), "the demo model finds some liver");
    let dcm = std::fs::read(out.join("segmentation.dcm")).unwrap();
    assert_eq!(&dcm[128..132], b"DICM");
    let has = |needle: &[u8]| dcm.windows(needle.len()).any(|w| w == needle);
    assert!(has(b"1.2.840.10008.5.1.4.1.1.66.4"), "SEG storage class");
    assert!(
        has(b"Liver") && has(b"10200004"),
        "the liver segment and its SNOMED CT code"
    );
    // A DICOM-SEG that cannot be written (no class has a voxel) leaves no result at all: it is
    // written inside the temporary folder, before the one rename.
    let s = univ::io::dicom::read_dicom_series(&series, &Default::default()).unwrap();
    let empty = univ::Segmentation {
        classes: vec![univ::ClassResult {
            info: univ::ClassTable::universal().get(6).unwrap().clone(),
            mask: univ::io::ClassMask::empty(s.volume.shape()),
            probabilities: None,
            lesion_probabilities: None,
        }],
        label_map: s.volume.map(|_| 0u8),
        logits: None,
        record: None,
        windows: 0,
        timings: Vec::new(),
        peak_memory: Vec::new(),
        gpu_memory: None,
        notes: Vec::new(),
    };
    let failed = dir.path().join("failed");
    let opts = univ::OutputOptions {
        dicom_seg: true,
        ..Default::default()
    };
    let e = univ::write_outputs(&failed, &s.volume, &empty, &opts, Some(&s)).unwrap_err();
    assert!(e.to_string().contains("no segment"), "{e}");
    assert!(!failed.exists(), "a result without its DICOM-SEG was left");
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("univ-tmp"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    // --dicom-seg on NIfTI input is refused.
    let Some(ct) = shared::shared_file("data/ct/example_ct_sm.nii.gz") else {
        return;
    };
    let o = univ(&[
        "segment",
        ct.to_str().unwrap(),
        "-o",
        dir.path().join("x").to_str().unwrap(),
        "--dicom-seg",
    ]);
    assert_clean_failure(&o, "needs a DICOM series");
}

#[test]
fn the_five_line_example_segments_a_ct_from_rust() {
    let dir = tempfile::tempdir().unwrap();
    let ct = dir.path().join("ct.nii.gz");
    write_small_ct(&ct, 40);
    let out = dir.path().join("out");
    let demo = demo_model();
    let seg = segment_ct_example::segment_ct(&ct, &out, Some(demo.to_str().unwrap())).unwrap();
    // Per-class results by name or id, on the input's grid: the 20 classes the demo model
    // was trained on.
    assert_eq!(seg.classes.len(), 20);
    let liver = seg.class("liver").unwrap();
    assert_eq!(liver.id(), 6);
    assert_eq!(seg.class("6").unwrap().name(), "Liver");
    assert_eq!(seg.class("left_lung").unwrap().id(), 17);
    assert!(
        seg.class("Liver Tumor").is_none(),
        "never trained: not computed"
    );
    assert!(seg.class("brain").is_none());
    assert_eq!(liver.mask.shape(), [40, 40, 20]);
    for f in [
        "segmentation.nii.gz",
        "classes.json",
        "report.json",
        "preview.png",
    ] {
        assert!(out.join(f).exists(), "{f}");
    }
    // No temporary folder is left beside the result.
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("univ-tmp"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    // Errors carry their cause.
    let e = segment_ct_example::segment_ct(
        &dir.path().join("missing.nii.gz"),
        &out,
        Some(demo.to_str().unwrap()),
    )
    .unwrap_err();
    assert!(e.to_string().contains("missing.nii.gz"), "{e}");
}

#[test]
fn the_demo_model_is_found_at_run_time_by_an_installed_binary() {
    // The binary alone in another folder, with an empty hf-hub cache: no demo model, and the
    // error says where it looked.
    let dir = tempfile::tempdir().unwrap();
    let bin_dir = dir.path().join("bin");
    std::fs::create_dir_all(&bin_dir).unwrap();
    let bin = bin_dir.join("univ");
    std::fs::copy(env!("CARGO_BIN_EXE_univ"), &bin).unwrap();
    let hf = dir.path().join("hf");
    let ct = dir.path().join("ct.nii.gz");
    write_small_ct(&ct, 32);
    let run = |out: &str, demo_env: Option<&Path>| {
        let mut c = Command::new(&bin);
        c.args(["segment", ct.to_str().unwrap(), "-o"])
            .arg(dir.path().join(out))
            .arg("--quiet")
            .env("HF_HOME", &hf)
            .env_remove("UNIV_DEMO_MODEL");
        if let Some(p) = demo_env {
            c.env("UNIV_DEMO_MODEL", p);
        }
        c.output().unwrap()
    };
    let o = run("a", None);
    assert_clean_failure(&o, "looked in");
    let (_, err) = text(&o);
    assert!(
        err.contains(bin_dir.join("univ_demo_unet.safetensors").to_str().unwrap()),
        "{err}"
    );
    assert!(err.contains("UNIV_DEMO_MODEL"), "{err}");
    // Named by the environment.
    let o = run("b", Some(&demo_model()));
    assert!(o.status.success(), "{}", text(&o).1);
    // In the hf-hub cache, where the official weights go.
    let cached = hf.join("hub/univ/univ_demo_unet.safetensors");
    std::fs::create_dir_all(cached.parent().unwrap()).unwrap();
    std::fs::copy(demo_model(), &cached).unwrap();
    let o = run("c", None);
    assert!(o.status.success(), "{}", text(&o).1);
    std::fs::remove_file(&cached).unwrap();
    // Beside the binary.
    std::fs::copy(demo_model(), bin_dir.join("univ_demo_unet.safetensors")).unwrap();
    let o = run("d", None);
    assert!(o.status.success(), "{}", text(&o).1);
    let report: serde_json::Value = read_json(dir.path().join("d/report.json"));
    assert_eq!(report["checkpoint"]["demo"], true);
}

#[test]
fn classes_added_by_extension_are_known_by_name() {
    // The demo model grown by one learned class row, named in the checkpoint's metadata as
    // `univ train` names it.
    let dir = tempfile::tempdir().unwrap();
    let ck = univ::model::Checkpoint::load(demo_model()).unwrap();
    let mut tensors: Vec<(String, candle_core::Tensor)> = ck.tensors.clone().into_iter().collect();
    for (k, t) in tensors.iter_mut() {
        if k == "organ_embedding.weight" {
            let row = t.narrow(0, 5, 1).unwrap();
            *t = candle_core::Tensor::cat(&[&*t, &row], 0).unwrap();
        }
    }
    let mut names: Vec<String> = univ::ClassTable::universal()
        .iter()
        .map(|c| c.name.clone())
        .collect();
    names.push("Bone Lesion".into());
    let mut meta = std::collections::HashMap::new();
    meta.insert(
        univ::model::checkpoint::CLASS_NAMES_KEY.to_string(),
        serde_json::to_string(&names).unwrap(),
    );
    let path = dir.path().join("extended.safetensors");
    univ::model::checkpoint::save_safetensors(&path, &tensors, meta).unwrap();
    let ct = dir.path().join("ct.nii.gz");
    write_small_ct(&ct, 32);
    let out = dir.path().join("out");
    let o = univ(&[
        "segment",
        ct.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--checkpoint",
        path.to_str().unwrap(),
        "--classes",
        "bone lesion,liver",
        "--per-class",
        "--quiet",
    ]);
    assert!(o.status.success(), "{}", text(&o).1);
    let classes: serde_json::Value = read_json(out.join("classes.json"));
    let c = &classes["classes"];
    assert_eq!(c[0]["label"], 33);
    assert_eq!(c[0]["name"], "Bone Lesion");
    assert_eq!(c[0]["kind"], "tumour");
    assert_eq!(c[1]["name"], "Liver");
    assert!(out.join("masks/bone_lesion.nii.gz").exists());
    // An unknown class is refused, naming the model's classes.
    let o = univ(&[
        "segment",
        ct.to_str().unwrap(),
        "-o",
        dir.path().join("out2").to_str().unwrap(),
        "--checkpoint",
        path.to_str().unwrap(),
        "--classes",
        "brain",
    ]);
    assert_clean_failure(&o, "33 bone_lesion");
}

/// `univ segment` with the demo model on a small synthetic CT, with extra arguments.
fn segment_small(ct: &Path, out: &Path, extra: &[&str]) -> Output {
    let demo = demo_model();
    let mut args = vec![
        "segment",
        ct.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--checkpoint",
        demo.to_str().unwrap(),
        "--quiet",
    ];
    args.extend_from_slice(extra);
    univ(&args)
}

#[test]
fn segment_is_identical_across_runs_and_thread_counts() {
    // Every convolution path (direct, Winograd, fused up-sampling) splits its work by shape,
    // never by thread count, so results must not depend on --threads.
    let dir = tempfile::tempdir().unwrap();
    let ct = dir.path().join("ct.nii.gz");
    write_small_ct(&ct, 40);
    let labels: Vec<Vec<u8>> = ["1", "2", "2"]
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let out = dir.path().join(format!("out{i}"));
            let o = segment_small(&ct, &out, &["--threads", t, "--probabilities"]);
            assert!(o.status.success(), "{}", text(&o).1);
            let mut bytes = univ::io::read_label(out.join("segmentation.nii.gz"))
                .unwrap()
                .data()
                .to_vec();
            let p = univ::io::read_image(out.join("probabilities/liver.nii.gz")).unwrap();
            bytes.extend(p.data().iter().flat_map(|v| v.to_le_bytes()));
            bytes
        })
        .collect();
    assert_eq!(labels[0], labels[1], "1 thread and 2 threads differ");
    assert_eq!(labels[1], labels[2], "two runs differ");
}

#[test]
fn overwrite_replaces_only_univs_own_results_and_never_the_input() {
    let dir = tempfile::tempdir().unwrap();
    let ct = dir.path().join("ct.nii.gz");
    write_small_ct(&ct, 32);
    // A plain file is not "results".
    let file = dir.path().join("a_file");
    std::fs::write(&file, b"keep me").unwrap();
    for extra in [&[][..], &["--overwrite"][..]] {
        let o = segment_small(&ct, &file, extra);
        assert_clean_failure(&o, "is a file");
        assert!(!text(&o).1.contains("already holds"), "{}", text(&o).1);
        assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
    }
    // An unrelated folder is refused with --overwrite too, naming what is in it.
    let other = dir.path().join("other");
    std::fs::create_dir_all(other.join("sub")).unwrap();
    std::fs::write(other.join("notes.txt"), b"mine").unwrap();
    let o = segment_small(&ct, &other, &["--overwrite"]);
    assert_clean_failure(&o, "notes.txt");
    assert!(text(&o).1.contains("not a univ result"), "{}", text(&o).1);
    assert!(other.join("notes.txt").exists() && other.join("sub").is_dir());
    // The input inside the output folder is never deleted.
    let holder = dir.path().join("holder");
    std::fs::create_dir_all(&holder).unwrap();
    let inner = holder.join("ct.nii.gz");
    std::fs::copy(&ct, &inner).unwrap();
    let o = segment_small(&inner, &holder, &["--overwrite"]);
    assert_clean_failure(&o, "lies inside");
    assert_eq!(std::fs::read(&inner).unwrap(), std::fs::read(&ct).unwrap());
    // A univ result is replaced only with --overwrite; the marker is written last.
    let res = dir.path().join("res");
    // What a killed run left beside it: removed (its process is gone); a live one stays.
    let stale = dir.path().join(".res-univ-tmp-999999999-0");
    std::fs::create_dir_all(stale.join("masks")).unwrap();
    let live = dir
        .path()
        .join(format!(".res-univ-tmp-{}-0", std::process::id()));
    std::fs::create_dir_all(&live).unwrap();
    let o = segment_small(&ct, &res, &[]);
    assert!(o.status.success(), "{}", text(&o).1);
    assert!(res.join(".univ-complete").is_file());
    assert!(!stale.exists(), "the stale temporary folder was left");
    assert!(live.exists(), "a live process's folder was removed");
    let o = segment_small(&ct, &res, &[]);
    assert_clean_failure(&o, "--overwrite");
    let o = segment_small(&ct, &res, &["--overwrite"]);
    assert!(o.status.success(), "{}", text(&o).1);
    assert!(res.join("report.json").exists() && res.join(".univ-complete").exists());
    // An output whose parent cannot be made fails before any window runs.
    let start = std::time::Instant::now();
    let o = segment_small(&ct, &file.join("res"), &[]);
    assert_clean_failure(&o, "cannot create");
    assert!(start.elapsed().as_secs_f64() < 30.0);
}

#[test]
fn two_inputs_with_one_case_name_are_refused_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let cases = dir.path().join("cases");
    std::fs::create_dir_all(&cases).unwrap();
    write_small_ct(&cases.join("ct1.nii.gz"), 32);
    let img = univ::io::read_image(cases.join("ct1.nii.gz")).unwrap();
    univ::io::write_nifti(
        cases.join("ct1.nii"),
        &img,
        &univ::io::WriteOptions::default(),
    )
    .unwrap();
    let out = dir.path().join("out");
    let o = segment_small(&cases, &out, &[]);
    assert_clean_failure(&o, "would both write to");
    let (_, err) = text(&o);
    assert!(
        err.contains("ct1.nii.gz") && err.contains("ct1.nii "),
        "{err}"
    );
    assert!(!out.exists(), "nothing is written");
}

#[test]
fn preprocess_refuses_to_write_over_its_input() {
    let dir = tempfile::tempdir().unwrap();
    let ct = dir.path().join("ct.nii.gz");
    write_small_ct(&ct, 32);
    let before = std::fs::read(&ct).unwrap();
    let sub = dir.path().join("sub");
    std::fs::create_dir_all(&sub).unwrap();
    let link = dir.path().join("link.nii.gz");
    #[cfg(unix)]
    std::os::unix::fs::symlink(&ct, &link).unwrap();
    let relative = sub.join("../ct.nii.gz");
    let mut outs = vec![ct.clone(), relative];
    if cfg!(unix) {
        outs.push(link);
    }
    for out in outs {
        let o = univ(&["preprocess", ct.to_str().unwrap(), out.to_str().unwrap()]);
        assert_clean_failure(&o, "is the input");
        assert_eq!(std::fs::read(&ct).unwrap(), before, "{}", out.display());
    }
}

#[test]
fn bounds_on_threads_windows_and_tolerances_and_damaged_weights_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let ct = dir.path().join("ct.nii.gz");
    write_small_ct(&ct, 32);
    let out = |n: &str| dir.path().join(n);
    // Thread counts: 0 and more than 4× the cores are refused at once.
    for t in ["0", "2000"] {
        let o = segment_small(&ct, &out(&format!("t{t}")), &["--threads", t]);
        assert_clean_failure(&o, "--threads");
    }
    // An overlap near 1 asks for more windows than the limit: refused before any runs (a
    // 300 × 300 × 150 mm CT: 200 × 200 × 100 voxels at 1.5 mm, 105 × 105 × 5 windows).
    let big = dir.path().join("big.nii.gz");
    write_small_ct(&big, 300);
    let start = std::time::Instant::now();
    let o = segment_small(&big, &out("w"), &["--overlap", "0.999"]);
    assert_clean_failure(&o, "--max-windows");
    assert!(text(&o).1.contains("windows of"), "{}", text(&o).1);
    assert!(start.elapsed().as_secs_f64() < 30.0);
    assert!(!out("w").exists());
    // Weights with a NaN are refused at load, naming the tensor.
    let ck = univ::model::Checkpoint::load(demo_model()).unwrap();
    let mut tensors: Vec<(String, candle_core::Tensor)> = ck.tensors.clone().into_iter().collect();
    let key = "precls_conv.2.weight";
    for (k, t) in tensors.iter_mut() {
        if k == key {
            let mut v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            v[3] = f32::NAN;
            *t = candle_core::Tensor::from_vec(v, t.shape(), t.device()).unwrap();
        }
    }
    let bad = out("nan.safetensors");
    univ::model::checkpoint::save_safetensors(&bad, &tensors, Default::default()).unwrap();
    let o = univ(&[
        "segment",
        ct.to_str().unwrap(),
        "-o",
        out("n").to_str().unwrap(),
        "--checkpoint",
        bad.to_str().unwrap(),
    ]);
    assert_clean_failure(&o, key);
    assert!(text(&o).1.contains("NaN or infinite"), "{}", text(&o).1);
    // Surface-Dice tolerances must be positive distances.
    for t in ["-1", "nan", "0"] {
        let o = univ(&[
            "evaluate",
            "--pred",
            ct.to_str().unwrap(),
            "--gt",
            ct.to_str().unwrap(),
            &format!("--tolerance={t}"),
        ]);
        assert_clean_failure(&o, "positive distance");
    }
}

#[test]
fn only_trained_classes_are_shown_unless_asked_for_and_the_demo_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let ct = dir.path().join("ct.nii.gz");
    write_small_ct(&ct, 32);
    // By default: the 20 classes the demo model was trained on, no tumour.
    let out = dir.path().join("default");
    let o = segment_small(&ct, &out, &[]);
    assert!(o.status.success(), "{}", text(&o).1);
    let classes = read_json(out.join("classes.json"));
    let ids: Vec<u64> = classes["classes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["label"].as_u64().unwrap())
        .collect();
    assert_eq!(
        ids,
        [
            1, 2, 3, 4, 6, 7, 8, 9, 10, 11, 12, 13, 14, 16, 17, 18, 19, 22, 23, 24
        ]
    );
    let report = read_json(out.join("report.json"));
    assert_eq!(report["checkpoint"]["demo"], true);
    assert_eq!(
        report["checkpoint"]["trained_classes"]
            .as_array()
            .unwrap()
            .len(),
        20
    );
    assert!(report["lesions"].as_object().unwrap().is_empty());
    // Asked for explicitly, an untrained class is computed, with a warning in the output and
    // the report.
    let out = dir.path().join("asked");
    let o = segment_small(&ct, &out, &["--classes", "liver,pancreas_tumor"]);
    let (_, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("Pancreas Tumor) was not trained"), "{err}");
    let report = read_json(out.join("report.json"));
    assert!(
        report["notes"].to_string().contains("was not trained"),
        "{}",
        report["notes"]
    );
}

#[test]
fn derived_grids_are_checked_against_the_limits_before_allocating() {
    let dir = tempfile::tempdir().unwrap();
    let ct = dir.path().join("ct.nii.gz");
    write_small_ct(&ct, 300);
    // A fine resampling of a CT asks for 3000 × 3000 × 1500 voxels: refused, naming the grid
    // and how to raise the limits.
    let o = univ(&[
        "preprocess",
        ct.to_str().unwrap(),
        dir.path().join("p.nii.gz").to_str().unwrap(),
        "--spacing",
        "0.1",
    ]);
    assert_clean_failure(&o, "the resampled grid");
    assert!(text(&o).1.contains("--max-voxels"), "{}", text(&o).1);
    // Voxels of a kilometre (a header's pixdim of 1e6 mm): the same, not an out-of-memory kill.
    let mut huge = univ::io::geometry::IDENTITY;
    for (a, row) in huge.iter_mut().take(3).enumerate() {
        row[a] = 1e6;
    }
    let v = univ::io::Volume::filled(0i16, [8, 8, 8], huge).unwrap();
    let far = dir.path().join("far.nii.gz");
    univ::io::write_nifti(&far, &v, &univ::io::WriteOptions::default()).unwrap();
    let o = univ(&[
        "preprocess",
        far.to_str().unwrap(),
        dir.path().join("q.nii.gz").to_str().unwrap(),
    ]);
    assert_clean_failure(&o, "exceeds the limits");
    // The segmentation's own buffers too (here the blend's slab, under a 1 MB limit).
    let small = dir.path().join("small.nii.gz");
    write_small_ct(&small, 32);
    let o = segment_small(&small, &dir.path().join("s"), &["--max-memory-gb", "0.001"]);
    assert_clean_failure(&o, "exceeds the limits");
    // A training patch size that cannot fit is a configuration error naming the field.
    std::fs::write(dir.path().join("data.toml"), "").unwrap();
    let conf = dir.path().join("train.toml");
    std::fs::write(
        &conf,
        "[model]\nbackbone = \"unet\"\nwidth = 4\n\n[data]\nmanifest = \"data.toml\"\n\
         roi = [4096, 4096, 4096]\n\n[train]\noutput = \"run\"\nsteps = 1\n",
    )
    .unwrap();
    let o = univ(&["train", "--config", conf.to_str().unwrap()]);
    assert_clean_failure(&o, "data.roi");
}

#[test]
#[ignore = "needs ../shared (real CT data and golden fixtures)"]
fn messages_keep_their_cause() {
    let Some(shared) = shared::shared_dir() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // A .pth whose first storage is cut short: the message names the damage, not a missing
    // `state_dict` key.
    let src = shared.join("fixtures/model_unet/model_official.pth");
    let bad = dir.path().join("short.pth");
    {
        let mut zin = zip::ZipArchive::new(std::fs::File::open(&src).unwrap()).unwrap();
        let mut zout = zip::ZipWriter::new(std::fs::File::create(&bad).unwrap());
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored);
        for i in 0..zin.len() {
            let mut f = zin.by_index(i).unwrap();
            let name = f.name().unwrap().to_string();
            let mut bytes = Vec::new();
            std::io::Read::read_to_end(&mut f, &mut bytes).unwrap();
            if name.ends_with("/data/0") {
                bytes.truncate(100);
            }
            zout.start_file(name, opts).unwrap();
            std::io::Write::write_all(&mut zout, &bytes).unwrap();
        }
        zout.finish().unwrap();
    }
    let o = univ(&["inspect", bad.to_str().unwrap()]);
    assert_clean_failure(&o, "its storage");
    // An empty folder is not "Is a directory".
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    for cmd in ["info", "preprocess"] {
        let mut args = vec![cmd, empty.to_str().unwrap()];
        let out = dir.path().join("o.nii.gz");
        if cmd == "preprocess" {
            args.push(out.to_str().unwrap());
        }
        let o = univ(&args);
        assert_clean_failure(&o, "no files");
        assert!(!text(&o).1.contains("Is a directory"), "{}", text(&o).1);
    }
    // No foreground (a CT of air): univ-io's error, not "invalid configuration".
    let air = dir.path().join("air.nii.gz");
    let v = univ::io::Volume::filled(-1000i16, [40, 40, 20], univ::io::geometry::IDENTITY).unwrap();
    univ::io::write_nifti(&air, &v, &univ::io::WriteOptions::default()).unwrap();
    let o = segment_small(&air, &dir.path().join("air_out"), &[]);
    let (_, err) = text(&o);
    assert!(!o.status.success());
    assert!(
        err.contains("foreground") && !err.contains("invalid configuration"),
        "{err}"
    );
}
