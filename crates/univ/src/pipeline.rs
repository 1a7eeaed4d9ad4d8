//! The whole job for one CT, owned by the library: read the input (a NIfTI file or a DICOM
//! series), segment it, build the report and write every output (DICOM-SEG included) into a
//! temporary folder that one rename turns into the result. The `univ segment` command only
//! parses its arguments and calls [`segment_case`].

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Device;
use univ_io::Volume;
use univ_io::dicom::{DicomReadOptions, DicomSeries};
use univ_model::hub::resolve_checkpoint;
use univ_model::inferers::BlendMode;
use univ_model::{Checkpoint, LoadReport, SegmentOptions, UniversalModel, segment};

use crate::error::{Error, Result};
use crate::outputs::{OutputOptions, check_output, write_outputs};
use univ_model::Segmentation;

/// A model with where it came from.
#[derive(Debug, Clone)]
pub struct LoadedModel {
    /// The model.
    pub model: UniversalModel,
    /// The checkpoint file.
    pub path: PathBuf,
    /// Its SHA-256 (hex).
    pub sha256: String,
    /// `true` for a demonstration model (the demo model chosen because no checkpoint was
    /// named, or a checkpoint marked as one): its results are labelled as such.
    pub demo: bool,
    /// `true` when the file was downloaded by this call.
    pub downloaded: bool,
    /// What loading read.
    pub report: LoadReport,
}

/// Loads a model: `spec` is a `.pth`/`.safetensors` path, or `unet` / `swinunetr` (the
/// official weights through the hf-hub cache); `None` is the demo model ([`crate::demo`]).
///
/// # Errors
/// A checkpoint that cannot be found, read or built; no demo model.
pub fn load_model(spec: Option<&str>, device: &Device) -> Result<LoadedModel> {
    let (spec, demo) = match spec {
        Some(s) => (s.to_string(), false),
        None => (crate::demo::find()?.display().to_string(), true),
    };
    let resolved = resolve_checkpoint(&spec)?;
    let ck = Checkpoint::load(&resolved.path)?;
    let (model, report) = ck.build(device)?;
    Ok(LoadedModel {
        model,
        path: resolved.path,
        sha256: resolved.sha256,
        demo: demo || ck.is_demo(),
        downloaded: resolved.downloaded,
        report,
    })
}

/// One CT as read: the volume in HU and, for a DICOM series, the series.
#[derive(Debug, Clone)]
pub struct CaseInput {
    /// The file or folder it was read from.
    pub path: PathBuf,
    /// The voxels (HU) with their geometry.
    pub image: Volume<f32>,
    /// The DICOM series, when the input is one.
    pub series: Option<DicomSeries>,
}

impl CaseInput {
    /// Reads a NIfTI file or a DICOM series (folder or file) within `dicom.limits`.
    ///
    /// # Errors
    /// The input cannot be read.
    pub fn read(path: &Path, dicom: &DicomReadOptions) -> Result<Self> {
        if univ_io::is_dicom(path) || path.is_dir() {
            let s = univ_io::dicom::read_dicom_series(path, dicom)?;
            Ok(CaseInput {
                path: path.to_path_buf(),
                image: s.volume.clone(),
                series: Some(s),
            })
        } else {
            Ok(CaseInput {
                path: path.to_path_buf(),
                image: univ_io::read_volume_with(path, &dicom.limits)?,
                series: None,
            })
        }
    }

    /// Warnings about the input: the DICOM reader's, and intensities that do not look like
    /// Hounsfield units.
    pub fn warnings(&self) -> Vec<String> {
        let mut w: Vec<String> = self
            .series
            .as_ref()
            .map(|s| s.warnings.clone())
            .unwrap_or_default();
        let (lo, hi) = self.image.min_max();
        if hi < 100.0 || lo > -500.0 {
            w.push(format!(
                "intensities {lo}..{hi} do not look like CT Hounsfield units"
            ));
        }
        w
    }
}

/// Settings of [`segment_case`]; [`Default`] is the official pipeline with the default outputs.
#[derive(Debug, Clone, Default)]
pub struct CaseOptions {
    /// Segmentation.
    pub segment: SegmentOptions,
    /// Outputs.
    pub output: OutputOptions,
    /// How a DICOM series is read (its limits are those of
    /// [`SegmentOptions::limits`](univ_model::SegmentOptions::limits)).
    pub dicom: DicomReadOptions,
    /// A reference label map (univ's class ids, or ids mapped by
    /// [`EvalOptions::label_map`](crate::evaluate::EvalOptions::label_map)): it is read before
    /// the segmentation starts, and the report gains an `evaluation` entry with Dice per label
    /// (see [`crate::evaluate::evaluate_pair`]).
    pub reference: Option<PathBuf>,
    /// How the segmentation is compared with [`reference`](Self::reference); the default
    /// computes Dice and the official Dice only (surface metrics are slower: set
    /// [`EvalOptions::surface`](crate::evaluate::EvalOptions::surface) for them).
    pub evaluation: Option<crate::evaluate::EvalOptions>,
}

/// What [`segment_case`] reports while it runs.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A warning about the input, known before the segmentation starts.
    Warning(String),
    /// Windows done of the total.
    Windows {
        /// Windows done.
        done: usize,
        /// Windows in all.
        total: usize,
    },
}

/// What [`segment_case`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct CaseSummary {
    /// The input.
    pub input: PathBuf,
    /// The result folder.
    pub output: PathBuf,
    /// Classes computed.
    pub classes: usize,
    /// Windows run.
    pub windows: usize,
    /// Seconds from start to written outputs.
    pub seconds: f64,
    /// DICOM-SEG `(segments, frames)`, when written.
    pub dicom_seg: Option<(usize, usize)>,
    /// The segmentation's notes (rules that could not apply, suspicious input).
    pub notes: Vec<String>,
    /// Seconds per stage, in order: `read`, the segmentation's stages (preprocess, sliding
    /// window, post-process, map back to the input grid), `evaluate` with a reference, `write`.
    pub timings: Vec<(String, f64)>,
    /// The process's peak resident memory (bytes) when the outputs were written (`None`
    /// where the system does not report it).
    pub peak_memory: Option<u64>,
}

/// The report entries that describe the run: checkpoint, class embedding, settings.
fn run_entries(
    model: &LoadedModel,
    opts: &CaseOptions,
) -> std::collections::BTreeMap<String, serde_json::Value> {
    let mut extra = std::collections::BTreeMap::new();
    extra.insert(
        "checkpoint".to_string(),
        serde_json::json!({
            "file": model.path,
            "sha256": model.sha256,
            "demo": model.demo,
            "trained_classes": model.model.classes().trained_ids(),
        }),
    );
    if let Ok(s) = univ_model::hub::sha256_of_tensor(model.model.class_embeddings()) {
        extra.insert("class_embedding_sha256".to_string(), serde_json::json!(s));
    }
    let s = &opts.segment;
    let classes = if s.classes.is_empty() {
        model.model.classes().ids()
    } else {
        s.classes.clone()
    };
    extra.insert(
        "settings".to_string(),
        serde_json::json!({
            "overlap": s.window.overlap,
            "sw_batch_size": s.window.sw_batch_size,
            "blend": match s.window.mode {
                BlendMode::Constant => "constant",
                BlendMode::Gaussian { .. } => "gaussian",
            },
            "classes": classes,
            "postprocess": s.postprocess != univ_model::postprocess::PostprocessOptions::none(),
            "preprocess": s.preprocess.is_some(),
            "device": if s.device.is_cpu() { "cpu" } else { "cuda" },
            "precision": match univ_model::runtime::active_bf16_kernel() {
                Some(_) if s.device.is_cpu() => "bf16",
                _ => "f32",
            },
            "bf16_kernel": univ_model::runtime::active_bf16_kernel()
                .filter(|_| s.device.is_cpu())
                .map(|k| k.name()),
            "winograd": s.device.is_cpu() && univ_model::runtime::winograd_enabled(),
        }),
    );
    extra
}

/// One CT segmented, not yet written: the input, the segmentation and everything its report
/// says besides the segmentation (checkpoint, settings, warnings, evaluation).
#[derive(Debug, Clone)]
pub struct CaseResult {
    /// The input as read (the CT the masks lie on, and its DICOM series when it is one).
    pub input: CaseInput,
    /// The segmentation.
    pub segmentation: Segmentation,
    /// The report's entries besides the segmentation's own (see [`crate::report::report`]).
    pub report_extra: std::collections::BTreeMap<String, serde_json::Value>,
    /// Seconds per stage so far: `read`, the segmentation's stages, `evaluate`.
    pub timings: Vec<(String, f64)>,
    /// `true` when made by a demonstration model (its outputs say so).
    pub demo: bool,
}

impl CaseResult {
    /// The content of `report.json`, as [`write`](Self::write) writes it.
    pub fn report(&self) -> serde_json::Value {
        let mut rep = crate::report::report(&self.input.image, &self.segmentation);
        if let serde_json::Value::Object(m) = &mut rep {
            for (k, v) in &self.report_extra {
                m.insert(k.clone(), v.clone());
            }
        }
        rep
    }

    /// Writes the outputs into `out` ([`write_outputs`]) with this result's report entries
    /// (before those of `output.report_extra`) and, for a demo model, its banner.
    ///
    /// # Errors
    /// As [`write_outputs`].
    pub fn write(&self, out: &Path, output: &OutputOptions) -> Result<crate::outputs::Written> {
        let mut output = output.clone();
        let mut extra = self.report_extra.clone();
        extra.append(&mut output.report_extra);
        output.report_extra = extra;
        if self.demo && output.banner.is_none() {
            output.banner = Some("DEMO MODEL: NOT FOR CLINICAL USE".into());
        }
        write_outputs(
            out,
            &self.input.image,
            &self.segmentation,
            &output,
            self.input.series.as_ref(),
        )
    }
}

/// Reads `opts.reference`, checked against the input's grid (reoriented onto it when it
/// differs only by axis order and direction).
fn read_reference(opts: &CaseOptions, image: &Volume<f32>) -> Result<Option<Volume<u8>>> {
    let Some(r) = opts.reference.as_deref() else {
        return Ok(None);
    };
    let v = univ_io::ReadOptions {
        limits: opts.segment.limits,
        ..Default::default()
    }
    .read_label(r)?;
    if v.check_same_grid(image).is_ok() {
        return Ok(Some(v));
    }
    univ_io::align_label_to(v, image)
        .map(Some)
        .map_err(|e| Error::input(r, format!("the reference does not fit the input: {e}")))
}

/// Segments a CT already read (see [`CaseInput::read`], or build one from a volume): the
/// reference of `opts` is read and checked first, then the segmentation runs and, with a
/// reference, is evaluated. `events` hears warnings about the input and the progress of the
/// windows. Nothing is written.
///
/// # Errors
/// A reference that cannot be read or does not fit; model errors.
pub fn segment_input(
    input: CaseInput,
    model: &LoadedModel,
    opts: &CaseOptions,
    mut events: impl FnMut(Event),
) -> Result<CaseResult> {
    let t = Instant::now();
    let reference = read_reference(opts, &input.image)?;
    let mut timings = vec![("read reference".to_string(), t.elapsed().as_secs_f64())];
    let warnings: Vec<String> = if opts.segment.preprocess.is_some() {
        input.warnings()
    } else {
        input
            .series
            .as_ref()
            .map(|s| s.warnings.clone())
            .unwrap_or_default()
    };
    for w in &warnings {
        events(Event::Warning(w.clone()));
    }
    let seg = segment(&input.image, &model.model, &opts.segment, |done, total| {
        events(Event::Windows { done, total })
    })?;
    timings.extend(seg.timings.iter().cloned());
    let mut extra = run_entries(model, opts);
    extra.insert("input_warnings".into(), serde_json::json!(warnings));
    if let (Some(gt), Some(path)) = (&reference, &opts.reference) {
        let t = Instant::now();
        let eval = opts
            .evaluation
            .clone()
            .unwrap_or(crate::evaluate::EvalOptions {
                surface: false,
                ..Default::default()
            });
        let mut e = crate::evaluate::evaluate_pair(&seg.label_map, gt, &eval)
            .map_err(|e| Error::input(path, format!("cannot be compared with the result: {e}")))?;
        e["reference"] = serde_json::json!(path);
        extra.insert("evaluation".into(), e);
        timings.push(("evaluate".to_string(), t.elapsed().as_secs_f64()));
    }
    Ok(CaseResult {
        input,
        segmentation: seg,
        report_extra: extra,
        timings,
        demo: model.demo,
    })
}

/// Segments one CT and writes its results to `out` (see the module docs): the output location
/// is checked before any work, the input read ([`CaseInput::read`]), segmented
/// ([`segment_input`]) and written ([`CaseResult::write`]). `events` hears warnings about the
/// input and the progress of the windows.
///
/// # Errors
/// An output location that is taken (checked before any work), an unreadable input, model
/// and write errors.
pub fn segment_case(
    input: &Path,
    out: &Path,
    model: &LoadedModel,
    opts: &CaseOptions,
    events: impl FnMut(Event),
) -> Result<CaseSummary> {
    let start = Instant::now();
    check_output(out, opts.output.overwrite, Some(input))?;
    if opts.output.dicom_seg && !univ_io::is_dicom(input) {
        return Err(Error::input(
            input,
            "DICOM-SEG output (--dicom-seg) needs a DICOM series as input",
        ));
    }
    // One set of limits for reading and for everything the segmentation makes.
    let dicom = DicomReadOptions {
        limits: opts.segment.limits,
        ..opts.dicom.clone()
    };
    let t = Instant::now();
    let case = CaseInput::read(input, &dicom)?;
    let read = t.elapsed().as_secs_f64();
    let result = segment_input(case, model, opts, events)?;
    let mut timings = result.timings.clone();
    // Reading the reference is part of reading.
    timings[0] = ("read".to_string(), read + timings[0].1);
    let t = Instant::now();
    let written = result.write(out, &opts.output)?;
    timings.push(("write".to_string(), t.elapsed().as_secs_f64()));
    let seg = result.segmentation;
    Ok(CaseSummary {
        input: input.to_path_buf(),
        output: out.to_path_buf(),
        classes: seg.classes.len(),
        windows: seg.windows,
        seconds: start.elapsed().as_secs_f64(),
        dicom_seg: written.dicom_seg,
        notes: seg.notes,
        timings,
        peak_memory: univ_model::runtime::peak_resident_bytes(),
    })
}

/// `true` for a `.nii` or `.nii.gz` file name.
pub fn is_nifti(p: &Path) -> bool {
    let n = p
        .file_name()
        .map(|n| n.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    n.ends_with(".nii") || n.ends_with(".nii.gz")
}

/// A case's name: the file name without `.nii` / `.nii.gz` (a folder's name as it is).
pub fn case_name(p: &Path) -> String {
    let n = p
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let lower = n.to_ascii_lowercase();
    for ext in [".nii.gz", ".nii"] {
        if lower.ends_with(ext) {
            return n[..n.len() - ext.len()].to_string();
        }
    }
    n
}

/// The cases of an input: one (a NIfTI file or a DICOM series) written to `out`, or every
/// NIfTI file and DICOM series folder of a folder, each written to `out/<case name>`, sorted.
///
/// # Errors
/// [`Error::Input`] for a folder without cases, or two inputs with one case name (such as
/// `ct1.nii` and `ct1.nii.gz`), which would write to one folder.
pub fn case_list(input: &Path, out: &Path) -> Result<Vec<(PathBuf, PathBuf)>> {
    if !input.is_dir() || univ_io::is_dicom(input) {
        return Ok(vec![(input.to_path_buf(), out.to_path_buf())]);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(input)
        .map_err(|e| Error::input(input, format!("cannot list: {e}")))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| is_nifti(p) || (p.is_dir() && univ_io::is_dicom(p)))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(Error::input(
            input,
            "no .nii or .nii.gz files or DICOM series folders",
        ));
    }
    let mut cases: Vec<(PathBuf, PathBuf)> = Vec::with_capacity(files.len());
    for f in files {
        let o = out.join(case_name(&f));
        if let Some((other, _)) = cases.iter().find(|(_, p)| *p == o) {
            return Err(Error::input(
                input,
                format!(
                    "{} and {} would both write to {}: rename one of them",
                    other.display(),
                    f.display(),
                    o.display()
                ),
            ));
        }
        cases.push((f, o));
    }
    Ok(cases)
}
