//! `univ info`: a volume's header summary.

use std::path::{Path, PathBuf};

use anyhow::Result;
use univ::io::{self, Limits};

use crate::args::{DicomArgs, LimitArgs};

/// Arguments of `univ info`.
#[derive(clap::Args)]
pub struct Args {
    /// A NIfTI file (.nii or .nii.gz), or a DICOM series (folder or file).
    file: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    dicom: DicomArgs,
    #[command(flatten)]
    limits: LimitArgs,
}

pub fn run(a: Args) -> Result<()> {
    let (path, json, dicom) = (a.file.as_path(), a.json, &a.dicom);
    let limits = a.limits.limits()?;
    if io::is_dicom(path) || path.is_dir() {
        return dicom_info(path, json, dicom, limits);
    }
    let h = io::read_header(path, &limits)?;
    let vol = io::read_volume_with(path, &limits)?;
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

fn dicom_info(path: &Path, json: bool, dicom: &DicomArgs, limits: Limits) -> Result<()> {
    let opts = io::dicom::DicomReadOptions {
        limits,
        ..dicom.options()
    };
    let s = io::dicom::read_dicom_series(path, &opts)?;
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
