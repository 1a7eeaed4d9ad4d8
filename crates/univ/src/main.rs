//! The `univ` command: inspect and preprocess CT volumes (more subcommands arrive with the
//! model). Errors are printed as one readable message, without a backtrace, with exit code 1.

mod embed_cmd;
mod evaluate_cmd;
mod model_cmds;
mod segment_cmd;
mod train_cmd;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use univ::io::{
    self, CropForeground, Limits, PreprocessOptions, ScaleIntensityRange, WriteOptions,
};

#[derive(Parser)]
#[command(
    name = "univ",
    version,
    about = "CLIP-Driven Universal Model for CT segmentation"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// How a DICOM series is read.
#[derive(clap::Args, Clone, Default)]
pub struct DicomArgs {
    /// The Series Instance UID to read when a DICOM folder holds several series.
    #[arg(long)]
    pub series: Option<String>,
    /// Accept a gantry tilt (slices shifted sideways); the affine then has a shear.
    #[arg(long)]
    pub allow_tilt: bool,
}

impl DicomArgs {
    /// The reader options.
    pub fn options(&self) -> io::dicom::DicomReadOptions {
        io::dicom::DicomReadOptions {
            series: self.series.clone(),
            allow_tilt: self.allow_tilt,
            ..Default::default()
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Print a volume's header summary: shape, voxel type, spacing, orientation, affine and
    /// intensity range.
    Info {
        /// A NIfTI file (.nii or .nii.gz), or a DICOM series (folder or file).
        file: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        dicom: DicomArgs,
    },
    /// Preprocess a CT as the official pipeline does (RAS, 1.5 mm, −175..250 HU → 0..1,
    /// foreground crop) and write the result (f32) and, optionally, its label map (u8).
    Preprocess {
        /// Input CT (NIfTI, or a DICOM series folder).
        input: PathBuf,
        /// Output file for the preprocessed image (.nii or .nii.gz).
        output: PathBuf,
        /// A label map on the input's grid to preprocess alongside (nearest neighbour).
        #[arg(long, requires = "label_output")]
        label: Option<PathBuf>,
        /// Where to write the preprocessed label map.
        #[arg(long, requires = "label")]
        label_output: Option<PathBuf>,
        /// Target voxel size in mm, `X,Y,Z` or one value for all axes.
        #[arg(long, default_value = "1.5,1.5,1.5")]
        spacing: String,
        /// Lower end of the intensity window (HU).
        #[arg(long, default_value_t = -175.0, allow_hyphen_values = true)]
        a_min: f64,
        /// Upper end of the intensity window (HU).
        #[arg(long, default_value_t = 250.0, allow_hyphen_values = true)]
        a_max: f64,
        /// Keep the whole resampled grid instead of cropping to the foreground.
        #[arg(long)]
        no_crop: bool,
        /// Also write what was done (JSON), to map results back onto the input grid later.
        #[arg(long)]
        record: Option<PathBuf>,
        #[command(flatten)]
        dicom: DicomArgs,
    },
    /// Segment a CT (a NIfTI file, or a folder of them): label map, class table, report, and
    /// optionally per-class masks, probabilities and logits, on the input's grid.
    Segment {
        /// A NIfTI file or DICOM series folder, or a folder of them (one output folder per
        /// case).
        input: PathBuf,
        /// Output folder.
        #[arg(long, short)]
        output: PathBuf,
        /// A .pth/.safetensors checkpoint, or `unet` / `swinunetr` (official weights); default:
        /// the small demo model in models/demo.
        #[arg(long)]
        checkpoint: Option<String>,
        /// Only these classes, by name or id (e.g. `liver,spleen` or `6,1`).
        #[arg(long)]
        classes: Option<String>,
        /// Overlap of neighbouring windows.
        #[arg(long, default_value_t = 0.5)]
        overlap: f64,
        /// Windows per network call (1 as the official code; the U-Net's batch statistics
        /// then pool over the batch).
        #[arg(long, default_value_t = 1)]
        sw_batch: usize,
        /// Blend windows with equal weights instead of the Gaussian.
        #[arg(long)]
        constant_blend: bool,
        /// Worker threads (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
        /// cpu or cuda.
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Also write masks/<class>.nii.gz.
        #[arg(long)]
        per_class: bool,
        /// Also write probabilities/<class>.nii.gz (sigmoid × 255).
        #[arg(long)]
        probabilities: bool,
        /// Skip the organ post-processing.
        #[arg(long)]
        no_postprocess: bool,
        /// The input is already preprocessed (RAS, 1.5 mm, 0..1); outputs stay on its grid.
        #[arg(long)]
        no_preprocess: bool,
        /// Also write the stitched logits (K, X, Y, Z) as logits.safetensors.
        #[arg(long)]
        save_logits: bool,
        /// Replace existing results.
        #[arg(long)]
        overwrite: bool,
        /// No progress bar or summary.
        #[arg(long)]
        quiet: bool,
        /// For a DICOM series input, also write segmentation.dcm: a DICOM Segmentation with
        /// one segment per class present, referencing the source images.
        #[arg(long)]
        dicom_seg: bool,
        #[command(flatten)]
        dicom: DicomArgs,
    },
    /// Compare predicted label maps with references: Dice, official Dice, surface Dice, HD95
    /// per label (JSON); for two folders also case-level tumour detection.
    Evaluate {
        /// A label map, or a folder of them (or of `univ segment` outputs).
        #[arg(long)]
        pred: PathBuf,
        /// The reference label map, or a folder of them.
        #[arg(long)]
        gt: PathBuf,
        /// JSON object mapping reference ids to prediction ids (others are ignored).
        #[arg(long)]
        label_map: Option<PathBuf>,
        /// Surface-Dice tolerances in mm.
        #[arg(long, default_value = "1,3")]
        tolerance: String,
        /// Dice only (skip NSD and HD95).
        #[arg(long)]
        no_surface: bool,
    },
    /// Train a model with the partial-label loss from a configuration file (see the
    /// univ-train docs for train.toml and the dataset manifest).
    Train {
        /// The training configuration (TOML).
        #[arg(long)]
        config: PathBuf,
        /// Continue from the newest checkpoint in the output folder.
        #[arg(long)]
        resume: bool,
        /// Start from this trained checkpoint and add classes (model.classes larger than its
        /// class count); reports validation Dice before and after in extend_report.json.
        #[arg(long)]
        extend: Option<PathBuf>,
        /// Train only the head and class encodings.
        #[arg(long)]
        freeze_backbone: bool,
        /// Worker threads (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
        /// cpu or cuda.
        #[arg(long, default_value = "cpu")]
        device: String,
        /// No progress output.
        #[arg(long)]
        quiet: bool,
    },
    /// Describe a checkpoint: backbone, widths, classes, parameter count, embedding, keys.
    Inspect {
        /// A .pth or .safetensors file, or a named official checkpoint (unet, swinunetr).
        checkpoint: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Embed class prompts with a CLIP text encoder (`--universal` for the 32-class bank), or
    /// inspect an embedding file (`--inspect FILE`).
    Embed {
        /// A folder with config.json, safetensors weights and tokenizer files, or a Hugging
        /// Face repository id in the local cache (e.g. openai/clip-vit-base-patch32).
        #[arg(long)]
        clip: Option<String>,
        /// A prompt, embedded as given (repeatable).
        #[arg(long = "prompt")]
        prompts: Vec<String>,
        /// A class name, put into "A computerized tomography of a {}" (repeatable).
        #[arg(long = "class")]
        classes: Vec<String>,
        /// The 32 universal classes with the official prompt strings.
        #[arg(long)]
        universal: bool,
        /// Output safetensors file (tensor `embeddings`, (N, D)).
        #[arg(long, short)]
        output: Option<PathBuf>,
        /// Print the classes, norms and similarity table of an embedding file.
        #[arg(long, conflicts_with_all = ["clip", "prompts", "classes", "universal", "output"])]
        inspect: Option<PathBuf>,
    },
    /// Rewrite a checkpoint as safetensors with canonical keys (no `module.`, `backbone.`).
    Convert {
        /// A .pth or .safetensors file, or a named official checkpoint.
        input: String,
        /// The output .safetensors file.
        output: PathBuf,
    },
    /// Run the model on the tensor `input` (B, 1, D, H, W) of a safetensors file and write
    /// `logits` (B, K, D, H, W): for checking parity with PyTorch.
    Forward {
        /// A .pth or .safetensors file, or a named official checkpoint.
        #[arg(long)]
        checkpoint: String,
        /// Safetensors file holding `input`.
        #[arg(long)]
        input: PathBuf,
        /// Safetensors file to write `logits` to.
        #[arg(long)]
        output: PathBuf,
        /// cpu or cuda.
        #[arg(long, default_value = "cpu")]
        device: String,
    },
}

/// mimalloc's option number for `purge_delay` (see mimalloc.h).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Keeps freed memory mapped: every window allocates and frees the same large buffers, and
/// returning them to the OS would make each new window fault in (and zero) fresh pages.
fn keep_freed_memory() {
    // SAFETY: setting an option is thread-safe and valid at any time.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
}

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    keep_freed_memory();
    let cli = Cli::parse();
    let threads = match &cli.command {
        Command::Segment { threads, .. } | Command::Train { threads, .. } => *threads,
        _ => None,
    };
    match threads {
        Some(n) => set_threads(n),
        None => univ::model::runtime::init_threads(None),
    }
    let result = match cli.command {
        Command::Info { file, json, dicom } => info(&file, json, &dicom),
        Command::Preprocess {
            input,
            output,
            label,
            label_output,
            spacing,
            a_min,
            a_max,
            no_crop,
            record,
            dicom,
        } => preprocess(PreprocessArgs {
            dicom,
            input,
            output,
            label,
            label_output,
            spacing,
            a_min,
            a_max,
            no_crop,
            record,
        }),
        Command::Inspect { checkpoint, json } => model_cmds::inspect(&checkpoint, json),
        Command::Evaluate {
            pred,
            gt,
            label_map,
            tolerance,
            no_surface,
        } => evaluate_cmd::run(&pred, &gt, label_map.as_ref(), &tolerance, no_surface),
        Command::Segment {
            input,
            output,
            checkpoint,
            classes,
            overlap,
            sw_batch,
            constant_blend,
            threads,
            device,
            per_class,
            probabilities,
            no_postprocess,
            no_preprocess,
            save_logits,
            overwrite,
            quiet,
            dicom_seg,
            dicom,
        } => {
            let _ = threads;
            segment_cmd::run(segment_cmd::SegmentArgs {
                dicom_seg,
                dicom,
                input,
                output,
                checkpoint,
                classes,
                overlap,
                sw_batch,
                constant_blend,
                device,
                per_class,
                probabilities,
                no_postprocess,
                no_preprocess,
                save_logits,
                overwrite,
                quiet,
            })
        }
        Command::Embed {
            clip,
            prompts,
            classes,
            universal,
            output,
            inspect,
        } => embed_cmd::run(embed_cmd::EmbedArgs {
            clip,
            prompts,
            classes,
            universal,
            output,
            inspect,
        }),
        Command::Train {
            config,
            resume,
            extend,
            freeze_backbone,
            threads,
            device,
            quiet,
        } => {
            let _ = threads;
            train_cmd::run(train_cmd::TrainArgs {
                config,
                resume,
                extend,
                freeze_backbone,
                device,
                quiet,
            })
        }
        Command::Convert { input, output } => model_cmds::convert(&input, &output),
        Command::Forward {
            checkpoint,
            input,
            output,
            device,
        } => model_cmds::forward(&checkpoint, &input, &output, &device),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Sets the worker thread count for every pool (rayon, candle, univ-io).
fn set_threads(n: usize) {
    let n = n.max(1);
    // SAFETY: called on the main thread before any other thread is started.
    unsafe {
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        std::env::set_var("UNIV_NUM_THREADS", n.to_string());
    }
    univ::model::runtime::init_threads(Some(n));
}

fn info(path: &Path, json: bool, dicom: &DicomArgs) -> Result<()> {
    if io::is_dicom(path) {
        return dicom_info(path, json, dicom);
    }
    let h = io::read_header(path, &Limits::default())?;
    let vol = io::read_image(path)?;
    let (lo, hi) = vol.min_max();
    let mean = vol.data().iter().map(|v| f64::from(*v)).sum::<f64>() / vol.len() as f64;
    if json {
        let v = serde_json::json!({
            "file": path,
            "shape": h.shape,
            "datatype": h.datatype,
            "spacing": h.spacing,
            "pixdim": h.pixdim,
            "axcodes": h.axcodes,
            "affine_source": h.affine_source,
            "affine": h.affine,
            "qform_code": h.geometry.qform_code,
            "sform_code": h.geometry.sform_code,
            "scl_slope": h.scaling.0,
            "scl_inter": h.scaling.1,
            "description": h.description,
            "intensity": {"min": lo, "max": hi, "mean": mean},
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("file:        {}", path.display());
    println!(
        "shape:       {} x {} x {}",
        h.shape[0], h.shape[1], h.shape[2]
    );
    println!("datatype:    {}", h.datatype);
    println!(
        "spacing:     {:.4} x {:.4} x {:.4} mm",
        h.spacing[0], h.spacing[1], h.spacing[2]
    );
    println!("orientation: {}", h.axcodes);
    println!(
        "affine:      from {} (qform_code {}, sform_code {})",
        h.affine_source, h.geometry.qform_code, h.geometry.sform_code
    );
    for row in &h.affine {
        println!(
            "             [{:>10.4} {:>10.4} {:>10.4} {:>10.4}]",
            row[0], row[1], row[2], row[3]
        );
    }
    println!("scaling:     slope {} inter {}", h.scaling.0, h.scaling.1);
    println!("intensity:   min {lo} max {hi} mean {mean:.3}");
    if !h.description.is_empty() {
        println!("description: {}", h.description);
    }
    Ok(())
}

fn dicom_info(path: &Path, json: bool, dicom: &DicomArgs) -> Result<()> {
    let s = io::dicom::read_dicom_series(path, &dicom.options())?;
    let v = &s.volume;
    let (lo, hi) = v.min_max();
    let spacing = v.spacing();
    if json {
        let j = serde_json::json!({
            "path": path,
            "series_uid": s.series_uid,
            "study_uid": s.study_uid,
            "modality": s.modality,
            "transfer_syntax": s.transfer_syntax,
            "slices": s.slices.len(),
            "shape": v.shape(),
            "spacing": spacing,
            "slice_gap_range": s.slice_gap_range,
            "axcodes": v.axcodes(),
            "affine": v.affine(),
            "intensity": {"min": lo, "max": hi},
            "series_description": s.attributes.get("SeriesDescription"),
            "warnings": s.warnings,
        });
        println!("{}", serde_json::to_string_pretty(&j)?);
        return Ok(());
    }
    let sh = v.shape();
    println!(
        "DICOM:       {} ({} slices)",
        path.display(),
        s.slices.len()
    );
    println!("series:      {} ({})", s.series_uid, s.modality);
    println!("syntax:      {}", s.transfer_syntax);
    println!("shape:       {} x {} x {}", sh[0], sh[1], sh[2]);
    println!(
        "spacing:     {:.4} x {:.4} x {:.4} mm (slice gaps {:.4}..{:.4} mm)",
        spacing[0], spacing[1], spacing[2], s.slice_gap_range[0], s.slice_gap_range[1]
    );
    println!("orientation: {}", v.axcodes());
    for row in v.affine() {
        println!(
            "             [{:>10.4} {:>10.4} {:>10.4} {:>10.4}]",
            row[0], row[1], row[2], row[3]
        );
    }
    println!("intensity:   min {lo} max {hi} (HU)");
    for w in &s.warnings {
        println!("warning:     {w}");
    }
    Ok(())
}

struct PreprocessArgs {
    dicom: DicomArgs,
    input: PathBuf,
    output: PathBuf,
    label: Option<PathBuf>,
    label_output: Option<PathBuf>,
    spacing: String,
    a_min: f64,
    a_max: f64,
    no_crop: bool,
    record: Option<PathBuf>,
}

fn parse_spacing(s: &str) -> Result<[f64; 3]> {
    let parts: Vec<f64> = s
        .split(',')
        .map(|p| p.trim().parse::<f64>())
        .collect::<Result<_, _>>()
        .with_context(|| format!("--spacing {s:?}: expected numbers like 1.5,1.5,1.5"))?;
    let v = match parts.as_slice() {
        [a] => [*a; 3],
        [a, b, c] => [*a, *b, *c],
        _ => bail!("--spacing {s:?}: give one value or three (X,Y,Z)"),
    };
    if v.iter().any(|x| !(x.is_finite() && *x > 0.0)) {
        bail!("--spacing {s:?}: voxel sizes must be positive");
    }
    Ok(v)
}

fn preprocess(a: PreprocessArgs) -> Result<()> {
    let pixdim = parse_spacing(&a.spacing)?;
    let window = ScaleIntensityRange {
        a_min: a.a_min,
        a_max: a.a_max,
        ..ScaleIntensityRange::universal_model()
    };
    window.validate()?;
    let opts = PreprocessOptions::universal_model()
        .pixdim(pixdim)
        .intensity(Some(window))
        .crop((!a.no_crop).then(CropForeground::default));
    let image = if io::is_dicom(&a.input) {
        let s = io::dicom::read_dicom_series(&a.input, &a.dicom.options())?;
        for w in &s.warnings {
            eprintln!("warning: {w}");
        }
        s.volume
    } else {
        io::read_volume(&a.input)?
    };
    let label = match &a.label {
        // A label map on the image's grid, or on the same grid with other axis order.
        Some(l) => Some(io::align_label_to(io::read_label(l)?, &image)?),
        None => None,
    };
    let pre = io::preprocess(image, label, &opts)?;
    let wopts = WriteOptions::default();
    io::write_nifti(&a.output, &pre.image, &wopts)?;
    if let (Some(l), Some(out)) = (&pre.label, &a.label_output) {
        io::write_nifti(out, l, &wopts)?;
    }
    if let Some(rec) = &a.record {
        let json = serde_json::to_string_pretty(&pre.record)?;
        write_atomic(rec, json.as_bytes())?;
    }
    let s = pre.image.shape();
    let b = pre.record.crop;
    println!(
        "{} -> {}: {} x {} x {} voxels at {:?} mm{}",
        a.input.display(),
        a.output.display(),
        s[0],
        s[1],
        s[2],
        pixdim,
        match b {
            Some(b) => format!(
                ", cropped to [{:?}, {:?}) of {:?}",
                b.start, b.end, pre.record.resampled_shape
            ),
            None => String::new(),
        }
    );
    Ok(())
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path.file_name().context("record path has no file name")?;
    let tmp = dir.join(format!(
        ".{}-tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let res = std::fs::write(&tmp, bytes)
        .and_then(|()| std::fs::File::open(&tmp)?.sync_all())
        .and_then(|()| std::fs::rename(&tmp, path))
        .with_context(|| format!("{}: cannot write", path.display()));
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}
