//! Writing one case's results: label map, class table, per-class masks, probabilities, logits,
//! preview, report and DICOM-SEG, all into a temporary folder that one rename turns into the
//! result folder, so a result appears only when complete.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use univ_io::dicom::DicomSeries;
use univ_io::{Volume, WriteOptions, write_nifti};
use univ_model::Segmentation;

use crate::error::{Error, Result};

/// What to write besides the label map, class table, preview and report; [`Default`] writes
/// only those.
#[derive(Debug, Clone, Default)]
pub struct OutputOptions {
    /// `masks/<class>.nii.gz`, one 0/1 file per class.
    pub per_class: bool,
    /// `probabilities/<class>.nii.gz`, sigmoid × 255 (needs probabilities in the segmentation).
    pub probabilities: bool,
    /// `logits.safetensors` (needs logits in the segmentation).
    pub save_logits: bool,
    /// `segmentation.dcm`, a DICOM Segmentation referencing the source series (needs one).
    pub dicom_seg: bool,
    /// Replace an existing output folder (only a complete univ result).
    pub overwrite: bool,
    /// A line drawn across the top of the preview (`DEMO MODEL: NOT FOR CLINICAL USE` for a
    /// demonstration model).
    pub banner: Option<String>,
    /// Extra entries for the report (checkpoint, embedding, settings...).
    pub report_extra: BTreeMap<String, serde_json::Value>,
}

/// What [`write_outputs`] wrote besides the fixed files.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Written {
    /// DICOM-SEG `(segments, frames)`, when written.
    pub dicom_seg: Option<(usize, usize)>,
}

/// The file univ writes last into every result folder: a folder holding it is a complete
/// univ result, the only kind of folder `--overwrite` may replace.
pub const RESULT_MARKER: &str = ".univ-complete";

/// What is at an output location.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutputState {
    /// Nothing.
    Absent,
    /// An empty folder.
    Empty,
    /// A complete univ result (it holds [`RESULT_MARKER`]).
    UnivResult,
    /// A file, not a folder.
    File,
    /// A folder holding something else: its first few entries.
    Other(Vec<String>),
}

/// What is at `out`.
pub fn output_state(out: &Path) -> OutputState {
    let Ok(meta) = std::fs::metadata(out) else {
        return OutputState::Absent;
    };
    if !meta.is_dir() {
        return OutputState::File;
    }
    if out.join(RESULT_MARKER).is_file() {
        return OutputState::UnivResult;
    }
    let mut names: Vec<String> = match std::fs::read_dir(out) {
        Ok(d) => d
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .take(4)
            .collect(),
        Err(e) => vec![format!("(unreadable: {e})")],
    };
    if names.is_empty() {
        return OutputState::Empty;
    }
    names.sort();
    OutputState::Other(names)
}

/// Checks, before any work is done, that results can go to `out`: nothing is there, or an
/// empty folder, or a complete univ result and `overwrite` is set; `input` (the CT) does not
/// lie inside `out`; the parent folder exists or can be made, and files can be written in it.
///
/// # Errors
/// [`Error::Output`] saying what is in the way.
pub fn check_output(out: &Path, overwrite: bool, input: Option<&Path>) -> Result<()> {
    let state = output_state(out);
    if let Some(i) = input
        && state != OutputState::Absent
        && let (Ok(i), Ok(o)) = (i.canonicalize(), out.canonicalize())
        && i.starts_with(&o)
    {
        return Err(Error::output(
            out,
            format!(
                "the input {} lies inside this output folder: choose another output folder",
                i.display()
            ),
        ));
    }
    match state {
        OutputState::Absent | OutputState::Empty => {}
        OutputState::UnivResult if overwrite => {}
        OutputState::UnivResult => {
            return Err(Error::output(
                out,
                "holds an earlier univ result; use --overwrite to replace it",
            ));
        }
        OutputState::File => {
            return Err(Error::output(
                out,
                "is a file: the output must be a folder (give a folder name that does not exist)",
            ));
        }
        OutputState::Other(names) => {
            return Err(Error::output(
                out,
                format!(
                    "is a folder that is not a univ result (it holds {}{}): choose another \
                     output folder; --overwrite replaces only univ's own results",
                    names.join(", "),
                    if names.len() >= 4 { ", ..." } else { "" }
                ),
            ));
        }
    }
    check_writable(out)
}

/// Makes `out`'s parent folder if needed and checks that a file can be created in it.
fn check_writable(out: &Path) -> Result<()> {
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent)
        .map_err(|e| Error::output(out, format!("cannot create {}: {e}", parent.display())))?;
    let probe = univ_io::atomic::temp_sibling(out);
    std::fs::write(&probe, b"")
        .map_err(|e| Error::output(out, format!("cannot write in {}: {e}", parent.display())))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

fn werr(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::output(path, e)
}

/// Writes every output of one case into `out`: `image` is the CT the segmentation was made on
/// (HU, on the masks' grid), `series` its DICOM series when it came from one (needed for
/// `dicom_seg`). Files go to a sibling temporary folder renamed to `out` at the end, so a
/// failure leaves nothing behind.
///
/// What an earlier univ process left when it was killed beside `out` (temporary folders of
/// this name from processes that no longer run) is removed first, and nothing else.
///
/// # Errors
/// [`Error::Output`] when `out` is taken (see [`check_output`]), DICOM-SEG is asked for
/// without a series, or a file cannot be written.
pub fn write_outputs(
    out: &Path,
    image: &Volume<f32>,
    seg: &Segmentation,
    opts: &OutputOptions,
    series: Option<&DicomSeries>,
) -> Result<Written> {
    check_output(out, opts.overwrite, None)?;
    if opts.dicom_seg && series.is_none() {
        return Err(Error::output(
            out,
            "DICOM-SEG output needs a DICOM series as input",
        ));
    }
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| werr(parent, e))?;
    univ_io::atomic::remove_stale_temps(out);
    let tmp = univ_io::atomic::temp_sibling(out);
    let result = (|| -> Result<Written> {
        std::fs::create_dir_all(&tmp).map_err(|e| werr(&tmp, e))?;
        let written = write_files(&tmp, image, seg, opts, series)?;
        swap_in(&tmp, out)?;
        Ok(written)
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

/// Renames the finished folder `tmp` to `out`, replacing what is there.
fn swap_in(tmp: &Path, out: &Path) -> Result<()> {
    if out.exists() {
        let old = univ_io::atomic::temp_sibling(out);
        std::fs::rename(out, &old).map_err(|e| werr(out, e))?;
        std::fs::rename(tmp, out).map_err(|e| werr(out, e))?;
        let _ = std::fs::remove_dir_all(&old);
    } else {
        std::fs::rename(tmp, out).map_err(|e| werr(out, e))?;
    }
    Ok(())
}

/// The files of one case, written into the folder `dir`.
fn write_files(
    dir: &Path,
    image: &Volume<f32>,
    seg: &Segmentation,
    opts: &OutputOptions,
    series: Option<&DicomSeries>,
) -> Result<Written> {
    let wo = WriteOptions::default();
    let nifti = |p: PathBuf, v: &Volume<u8>| write_nifti(&p, v, &wo).map_err(|e| werr(&p, e));
    let json = |p: PathBuf, v: &serde_json::Value| {
        let text = serde_json::to_string_pretty(v).map_err(|e| werr(&p, e))?;
        std::fs::write(&p, text).map_err(|e| werr(&p, e))
    };
    if !seg.classes.is_empty() {
        nifti(dir.join("segmentation.nii.gz"), &seg.label_map)?;
    }
    let table: Vec<serde_json::Value> = seg
        .classes
        .iter()
        .map(|c| {
            serde_json::json!({
                "label": c.id(),
                "name": c.name(),
                "kind": c.info.kind.as_str(),
                "file": format!("{}.nii.gz", c.info.slug),
            })
        })
        .collect();
    json(
        dir.join("classes.json"),
        &serde_json::json!({"background": 0, "classes": table}),
    )?;
    if opts.per_class {
        let d = dir.join("masks");
        std::fs::create_dir_all(&d).map_err(|e| werr(&d, e))?;
        for c in &seg.classes {
            let p = d.join(format!("{}.nii.gz", c.info.slug));
            let m = seg
                .label_map
                .with_data(c.mask.to_u8())
                .map_err(|e| werr(&p, e))?;
            nifti(p, &m)?;
        }
    }
    if opts.probabilities {
        let d = dir.join("probabilities");
        std::fs::create_dir_all(&d).map_err(|e| werr(&d, e))?;
        for c in &seg.classes {
            if let Some(pv) = &c.probabilities {
                nifti(d.join(format!("{}.nii.gz", c.info.slug)), pv)?;
            }
        }
    }
    if opts.save_logits
        && let Some(l) = &seg.logits
    {
        let p = dir.join("logits.safetensors");
        let bytes: Vec<u8> = l.data.iter().flat_map(|v| v.to_le_bytes()).collect();
        let view =
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, l.shape.to_vec(), &bytes)
                .map_err(|e| werr(&p, e))?;
        let mut meta = std::collections::HashMap::new();
        meta.insert(
            "classes".to_string(),
            serde_json::to_string(&seg.ids()).map_err(|e| werr(&p, e))?,
        );
        meta.insert(
            "layout".to_string(),
            "(K, X, Y, Z) on the grid the network saw, Z fastest".to_string(),
        );
        let data =
            safetensors::serialize([("logits", view)], Some(meta)).map_err(|e| werr(&p, e))?;
        std::fs::write(&p, data).map_err(|e| werr(&p, e))?;
    }
    let p = dir.join("preview.png");
    crate::preview::write_preview(&p, image, &seg.classes, opts.banner.as_deref())
        .map_err(|e| werr(&p, e))?;
    let mut rep = crate::report::report(image, seg);
    if let serde_json::Value::Object(m) = &mut rep {
        for (k, v) in &opts.report_extra {
            m.insert(k.clone(), v.clone());
        }
    }
    json(dir.join("report.json"), &rep)?;
    let mut written = Written::default();
    if let (true, Some(s)) = (opts.dicom_seg, series) {
        let p = dir.join("segmentation.dcm");
        written.dicom_seg = Some(crate::dicom_seg::write_seg_for(&p, s, seg)?);
    }
    // Last: the marker that makes this a complete result.
    let marker = serde_json::json!({"univ": env!("CARGO_PKG_VERSION"), "complete": true});
    json(dir.join(RESULT_MARKER), &marker)?;
    Ok(written)
}
