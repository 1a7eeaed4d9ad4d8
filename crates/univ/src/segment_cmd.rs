//! `univ segment`: CT in, masks and report out.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use univ::model::checkpoint::Checkpoint;
use univ::model::hub::resolve_checkpoint;
use univ::model::inferers::{BlendMode, SlidingWindowOptions};
use univ::model::postprocess::PostprocessOptions;
use univ::outputs::{OutputOptions, class_name, write_outputs};
use univ::{SegmentOptions, segment};

/// Options of `univ segment`.
pub struct SegmentArgs {
    pub input: PathBuf,
    pub output: PathBuf,
    pub checkpoint: Option<String>,
    pub classes: Option<String>,
    pub overlap: f64,
    pub sw_batch: usize,
    pub constant_blend: bool,
    pub device: String,
    pub per_class: bool,
    pub probabilities: bool,
    pub no_postprocess: bool,
    pub no_preprocess: bool,
    pub save_logits: bool,
    pub overwrite: bool,
    pub quiet: bool,
    pub dicom_seg: bool,
    pub dicom: crate::DicomArgs,
}

fn parse_classes(spec: &str, k: usize) -> Result<Vec<usize>> {
    let mut out = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let id = if let Ok(n) = part.parse::<usize>() {
            n
        } else {
            univ::clip::find_class(part)
                .map(|c| c.index)
                .or_else(|| {
                    (1..=32)
                        .find(|i| univ::outputs::slug(&class_name(*i)) == univ::outputs::slug(part))
                })
                .with_context(|| format!("--classes: unknown class {part:?}"))?
        };
        if id == 0 || id > k {
            bail!("--classes: class {part:?} is not one of the model's {k} classes");
        }
        if !out.contains(&id) {
            out.push(id);
        }
    }
    if out.is_empty() {
        bail!("--classes: no class given");
    }
    Ok(out)
}

/// The demo checkpoint made by `univ train --config models/demo/train.toml` (issue #6).
pub fn demo_checkpoint() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/demo/univ_demo_unet.safetensors")
}

/// `true` for a `.nii` or `.nii.gz` file name.
pub fn is_nifti(p: &Path) -> bool {
    let n = p
        .file_name()
        .map(|n| n.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    n.ends_with(".nii") || n.ends_with(".nii.gz")
}

fn case_name(p: &Path) -> String {
    let n = p
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    n.trim_end_matches(".gz")
        .trim_end_matches(".nii")
        .to_string()
}

pub fn run(a: SegmentArgs) -> Result<()> {
    if a.dicom_seg && !a.input.is_dir() && !univ::io::is_dicom(&a.input) {
        bail!(
            "{}: --dicom-seg needs a DICOM series as input",
            a.input.display()
        );
    }
    let demo = demo_checkpoint();
    let spec = match a.checkpoint.as_deref() {
        Some(s) => s.to_string(),
        None if demo.exists() => {
            if !a.quiet {
                eprintln!(
                    "note: no --checkpoint given: using the small demo model {} (trained on one CT; \
                     see its model card); pass `unet` or `swinunetr` for the official weights",
                    demo.display()
                );
            }
            demo.display().to_string()
        }
        None => bail!(
            "no --checkpoint given and the demo model {} is not there: pass a .pth/.safetensors \
             file or `unet`/`swinunetr` (the official weights)",
            demo.display()
        ),
    };
    let resolved = resolve_checkpoint(&spec)?;
    let ckpt = Checkpoint::load(&resolved.path)?;
    let device = crate::model_cmds::device(&a.device)?;
    let (model, _) = ckpt.build(&device)?;
    let k = model.config().num_classes;
    let classes = match &a.classes {
        Some(s) => parse_classes(s, k)?,
        None => (1..=k).collect(),
    };
    let mut opts = SegmentOptions::default();
    opts.window = SlidingWindowOptions {
        overlap: a.overlap,
        sw_batch_size: a.sw_batch,
        mode: if a.constant_blend {
            BlendMode::Constant
        } else {
            BlendMode::Gaussian { sigma_scale: 0.125 }
        },
        ..SlidingWindowOptions::default()
    };
    opts.classes = classes;
    opts.postprocess = if a.no_postprocess {
        PostprocessOptions::none()
    } else {
        PostprocessOptions::default()
    };
    opts.keep_probabilities = a.probabilities;
    opts.keep_logits = a.save_logits;
    opts.device = device;
    if a.no_preprocess {
        opts.preprocess = None;
    }
    let mut extra = std::collections::BTreeMap::new();
    extra.insert(
        "checkpoint".to_string(),
        serde_json::json!({"file": resolved.path, "sha256": resolved.sha256}),
    );
    if let Ok(s) = univ::model::hub::sha256_of_tensor(model.class_embeddings()) {
        extra.insert("class_embedding_sha256".to_string(), serde_json::json!(s));
    }
    extra.insert(
        "settings".to_string(),
        serde_json::json!({
            "overlap": a.overlap,
            "sw_batch_size": a.sw_batch,
            "blend": if a.constant_blend { "constant" } else { "gaussian" },
            "classes": opts.classes,
            "postprocess": !a.no_postprocess,
            "preprocess": !a.no_preprocess,
            "device": a.device,
        }),
    );
    let mut out_opts = OutputOptions::default();
    out_opts.per_class = a.per_class;
    out_opts.probabilities = a.probabilities;
    out_opts.save_logits = a.save_logits;
    out_opts.overwrite = a.overwrite;
    out_opts.report_extra = extra;
    // One case (a NIfTI file or a DICOM series folder), or every NIfTI file and DICOM series
    // folder of a folder (one output folder per case).
    let cases: Vec<(PathBuf, PathBuf)> = if a.input.is_dir() && !univ::io::is_dicom(&a.input) {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&a.input)
            .with_context(|| format!("{}: cannot list", a.input.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| is_nifti(p) || (p.is_dir() && univ::io::is_dicom(p)))
            .collect();
        files.sort();
        if files.is_empty() {
            bail!(
                "{}: no .nii or .nii.gz files or DICOM series folders",
                a.input.display()
            );
        }
        files
            .into_iter()
            .map(|f| (a.output.join(case_name(&f)), f))
            .collect()
    } else {
        vec![(a.output.clone(), a.input.clone())]
    };
    let mut failed = Vec::new();
    for (out, input) in &cases {
        let dicom = DicomInput {
            write_seg: a.dicom_seg,
            options: a.dicom.options(),
        };
        if let Err(e) = one_case(input, out, &model, &opts, &out_opts, &dicom, a.quiet) {
            eprintln!("error: {}: {e:#}", input.display());
            failed.push(input.clone());
        }
    }
    if !failed.is_empty() {
        bail!("{} of {} case(s) failed", failed.len(), cases.len());
    }
    Ok(())
}

/// What to do with DICOM input.
struct DicomInput {
    write_seg: bool,
    options: univ::io::dicom::DicomReadOptions,
}

fn one_case(
    input: &Path,
    out: &Path,
    model: &univ::model::UniversalModel,
    opts: &SegmentOptions,
    out_opts: &OutputOptions,
    dicom: &DicomInput,
    quiet: bool,
) -> Result<()> {
    let is_dicom = univ::io::is_dicom(input);
    if dicom.write_seg && !is_dicom {
        bail!("--dicom-seg needs a DICOM series as input");
    }
    if out.exists()
        && std::fs::read_dir(out)
            .map(|mut d| d.next().is_some())
            .unwrap_or(true)
        && !out_opts.overwrite
    {
        bail!(
            "{}: the output folder already holds results; use --overwrite to replace them",
            out.display()
        );
    }
    let start = std::time::Instant::now();
    let series = if is_dicom {
        let s = univ::io::dicom::read_dicom_series(input, &dicom.options)?;
        for w in &s.warnings {
            eprintln!("warning: {w}");
        }
        Some(s)
    } else {
        None
    };
    let image = match &series {
        Some(s) => s.volume.clone(),
        None => univ::io::read_volume(input)?,
    };
    let (lo, hi) = image.min_max();
    if opts.preprocess.is_some() && (hi < 100.0 || lo > -500.0) {
        eprintln!(
            "warning: {}: intensities {lo}..{hi} do not look like CT Hounsfield units",
            input.display()
        );
    }
    let tty = std::io::stderr().is_terminal() && !quiet;
    let label = case_name(input);
    let seg = segment(&image, model, opts, |done, total| {
        if tty {
            let w = 30;
            let f = done * w / total.max(1);
            eprint!(
                "\r{label}: [{}{}] {done}/{total} windows",
                "#".repeat(f),
                " ".repeat(w - f)
            );
            if done == total {
                eprintln!();
            }
        }
    })?;
    for n in &seg.notes {
        eprintln!("note: {}: {n}", input.display());
    }
    write_outputs(out, &image, &seg, out_opts)?;
    if let (true, Some(s)) = (dicom.write_seg, &series) {
        let path = out.join("segmentation.dcm");
        let (n, frames) = univ::dicom_seg::write_seg_for(&path, s, &seg)?;
        if !quiet {
            println!("{}: {n} segments, {frames} frames", path.display());
        }
    }
    if !quiet {
        println!(
            "{} -> {}: {} classes, {} windows, {:.1} s",
            input.display(),
            out.display(),
            seg.classes.len(),
            seg.windows,
            start.elapsed().as_secs_f64()
        );
    }
    Ok(())
}
