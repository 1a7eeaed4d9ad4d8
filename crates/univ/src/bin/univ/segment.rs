//! `univ segment`: CT in, result folder out, through [`univ::segment_case`]; or a cohort
//! manifest in, one result folder per case out, through [`univ::cohort::run_cohort`].

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use univ::cohort::{
    CaseStatus, CohortEvent, CohortOptions, EXIT_NOTHING_RAN, Manifest, Shard, run_cohort,
};
use univ::model::inferers::{BlendMode, SlidingWindowOptions};
use univ::model::postprocess::PostprocessOptions;
use univ::{CaseOptions, Event, OutputOptions, SegmentOptions};

use crate::args::{CodedError, DicomArgs, LimitArgs, Progress, RuntimeArgs};

/// The window overlap of `--fast`.
const FAST_OVERLAP: f64 = 0.25;

/// Arguments of `univ segment`.
#[derive(clap::Args)]
pub struct Args {
    /// A NIfTI file or DICOM series folder, or a folder of them (one output folder per case).
    #[arg(required_unless_present = "manifest", conflicts_with = "manifest")]
    input: Option<PathBuf>,
    /// Output folder (for a manifest: OUT/<case id>/ per case, and the cohort's logs).
    #[arg(long, short)]
    output: PathBuf,
    /// A cohort manifest instead of an input: CSV with a header row and the columns `id`,
    /// `input` and optionally `series` and `reference`, or the same as JSON lines (see
    /// docs/cohort.md). Complete results are kept (resume); exit code 3 when some cases
    /// failed, 4 when none could run.
    #[arg(long)]
    manifest: Option<PathBuf>,
    /// Only shard K of N (0-based) of the manifest [default: from a Slurm job array or a
    /// Kubernetes Indexed Job, else the whole manifest].
    #[arg(long, value_parser = parse_shard, requires = "manifest")]
    shard: Option<Shard>,
    /// The number of shards of a Kubernetes Indexed Job (its completions; or set UNIV_SHARDS).
    #[arg(long, requires = "manifest")]
    shards: Option<usize>,
    /// A .pth/.safetensors checkpoint, or `unet` / `swinunetr` (official weights); default:
    /// the small demo model (see the README for where it is looked for).
    #[arg(long)]
    checkpoint: Option<String>,
    /// Only these classes, by name or id (e.g. `liver,spleen` or `6,1`).
    #[arg(long)]
    classes: Option<String>,
    /// Overlap of neighbouring windows [default: 0.5; 0.25 with --fast].
    #[arg(long)]
    overlap: Option<f64>,
    /// A preset for CPUs: bf16 convolutions (on CPUs with AMX-BF16, or AVX512-BF16 where it
    /// beats f32 as on AMD Zen 4/5; f32 elsewhere, with a warning) and windows overlapping by 0.25 instead of 0.5 (on
    /// example_ct 36 windows instead of 80). `--precision` and `--overlap` override it. See
    /// the README for what it costs in agreement with the default.
    #[arg(long)]
    pub fast: bool,
    /// Windows per network call (1 as the official code; the U-Net's batch statistics then
    /// pool over the batch).
    #[arg(long, default_value_t = 1)]
    sw_batch: usize,
    /// Blend windows with equal weights instead of the Gaussian.
    #[arg(long)]
    constant_blend: bool,
    /// Most windows one CT may take (more is refused before any runs).
    #[arg(long, default_value_t = univ::model::inferers::DEFAULT_MAX_WINDOWS)]
    max_windows: usize,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
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
    /// For a DICOM series input, also write segmentation.dcm: a DICOM Segmentation with one
    /// segment per class present, referencing the source images.
    #[arg(long)]
    dicom_seg: bool,
    #[command(flatten)]
    dicom: DicomArgs,
    #[command(flatten)]
    limits: LimitArgs,
}

impl Args {
    /// The library's options for these arguments (classes parsed with the model's table).
    fn options(&self, classes: &univ::ClassTable) -> Result<CaseOptions> {
        let segment = SegmentOptions {
            window: SlidingWindowOptions {
                overlap: self.overlap.unwrap_or(if self.fast {
                    FAST_OVERLAP
                } else {
                    SlidingWindowOptions::default().overlap
                }),
                sw_batch_size: self.sw_batch,
                max_windows: self.max_windows,
                mode: if self.constant_blend {
                    BlendMode::Constant
                } else {
                    BlendMode::Gaussian { sigma_scale: 0.125 }
                },
                ..SlidingWindowOptions::default()
            },
            classes: match &self.classes {
                Some(s) => classes
                    .parse_list(s)
                    .map_err(|e| anyhow::anyhow!("--classes: {e}"))?,
                None => Vec::new(),
            },
            postprocess: if self.no_postprocess {
                PostprocessOptions::none()
            } else {
                PostprocessOptions::default()
            },
            keep_probabilities: self.probabilities,
            keep_logits: self.save_logits,
            device: self.runtime.device()?,
            preprocess: if self.no_preprocess {
                None
            } else {
                SegmentOptions::default().preprocess
            },
            limits: self.limits.limits()?,
            ..SegmentOptions::default()
        };
        Ok(CaseOptions {
            segment,
            output: OutputOptions {
                per_class: self.per_class,
                probabilities: self.probabilities,
                save_logits: self.save_logits,
                dicom_seg: self.dicom_seg,
                overwrite: self.overwrite,
                ..OutputOptions::default()
            },
            dicom: self.dicom.options(),
            ..CaseOptions::default()
        })
    }
}

fn parse_shard(s: &str) -> Result<Shard, String> {
    Shard::parse(s)
}

/// Loads the model named by the arguments, saying where it came from.
fn load(a: &Args) -> Result<univ::LoadedModel> {
    let model = univ::load_model(a.checkpoint.as_deref(), &a.runtime.device()?)?;
    if model.downloaded {
        eprintln!("downloaded {}", model.path.display());
    }
    if model.demo && !a.quiet {
        eprintln!(
            "note: no --checkpoint given: using the small demo model {} (trained on one CT; \
             see its model card); pass `unet` or `swinunetr` for the official weights",
            model.path.display()
        );
    }
    Ok(model)
}

/// `univ segment --manifest`: this process's shard of a cohort.
fn run_manifest(a: &Args, manifest: &std::path::Path) -> Result<()> {
    let nothing = |e: anyhow::Error| CodedError::new(EXIT_NOTHING_RAN, e);
    let m = Manifest::read(manifest).map_err(|e| nothing(e.into()))?;
    let (shard, source) = Shard::resolve(a.shard, a.shards, |k| std::env::var(k).ok())
        .map_err(|e| nothing(anyhow::anyhow!(e)))?;
    m.check_files().map_err(|e| nothing(e.into()))?;
    univ::cohort::prepare_output(&m, &a.output).map_err(|e| nothing(e.into()))?;
    let model = load(a).map_err(nothing)?;
    let opts = CohortOptions {
        case: a.options(model.model.classes()).map_err(nothing)?,
        shard,
        shard_source: source,
    };
    let n = shard.select(&m.cases).len();
    if !a.quiet {
        eprintln!(
            "{}: shard {shard} ({}): {n} of {} cases",
            manifest.display(),
            source.as_str(),
            m.cases.len()
        );
    }
    let mut bar = Progress::new("", a.quiet);
    let (mut current, mut at) = (String::new(), String::new());
    let run = run_cohort(&m, &a.output, &model, &opts, |e| match e {
        CohortEvent::Begin { id, position, of } => {
            at = format!("{}/{of}", position + 1);
            bar = Progress::new(format!("{id} ({at})"), a.quiet);
            current = id;
        }
        CohortEvent::Case(univ::Event::Warning(w)) => eprintln!("warning: case {current}: {w}"),
        CohortEvent::Case(univ::Event::Windows { done, total }) => bar.draw(done, total, "windows"),
        CohortEvent::End(r) => {
            let msg = r
                .message
                .as_deref()
                .map(|m| format!(": {m}"))
                .unwrap_or_default();
            match r.status {
                CaseStatus::Failed => eprintln!("error: case {} ({at}){msg}", r.id),
                CaseStatus::Done if !a.quiet => {
                    eprintln!("case {} ({at}): done ({:.1} s){msg}", r.id, r.total_seconds)
                }
                CaseStatus::Skipped if !a.quiet => {
                    eprintln!("case {} ({at}): already done", r.id)
                }
                _ => {}
            }
        }
    })
    .map_err(|e| nothing(e.into()))?;
    let (done, skipped, failed) = (
        run.count(CaseStatus::Done),
        run.count(CaseStatus::Skipped),
        run.count(CaseStatus::Failed),
    );
    if !a.quiet {
        println!(
            "shard {shard}: {done} done, {skipped} already done, {failed} failed in {:.1} s (log: {})",
            run.seconds,
            run.log.display()
        );
    }
    if failed > 0 {
        return Err(CodedError::new(
            run.exit_code(),
            anyhow::anyhow!(
                "{failed} of {} case(s) of shard {shard} failed (see {})",
                run.records.len(),
                run.log.display()
            ),
        )
        .into());
    }
    Ok(())
}

pub fn run(a: Args) -> Result<()> {
    if let Some(m) = a.manifest.clone() {
        return run_manifest(&a, &m);
    }
    let input = a.input.clone().context("give an input or --manifest")?;
    if a.dicom_seg && !input.is_dir() && !univ::io::is_dicom(&input) {
        bail!(
            "{}: --dicom-seg needs a DICOM series as input",
            input.display()
        );
    }
    let cases = univ::case_list(&input, &a.output)?;
    // Every output location is checked before any work.
    for (input, out) in &cases {
        univ::outputs::check_output(out, a.overwrite, Some(input))?;
    }
    let model = load(&a)?;
    let opts = a.options(model.model.classes())?;
    let mut failed = 0;
    for (input, out) in &cases {
        let bar = Progress::new(univ::pipeline::case_name(input), a.quiet);
        let result = univ::segment_case(input, out, &model, &opts, |e| match e {
            Event::Warning(w) => eprintln!("warning: {}: {w}", input.display()),
            Event::Windows { done, total } => bar.draw(done, total, "windows"),
        });
        match result {
            Ok(s) => {
                for n in &s.notes {
                    eprintln!("note: {}: {n}", input.display());
                }
                if !a.quiet {
                    if let Some((n, frames)) = s.dicom_seg {
                        println!(
                            "{}: {n} segments, {frames} frames",
                            out.join("segmentation.dcm").display()
                        );
                    }
                    println!(
                        "{} -> {}: {} classes, {} windows, {:.1} s",
                        input.display(),
                        out.display(),
                        s.classes,
                        s.windows,
                        s.seconds
                    );
                }
            }
            Err(e) => {
                eprintln!("error: {}: {:#}", input.display(), anyhow::Error::from(e));
                failed += 1;
            }
        }
    }
    if failed > 0 {
        bail!("{failed} of {} case(s) failed", cases.len());
    }
    Ok(())
}
