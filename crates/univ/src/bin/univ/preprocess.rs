//! `univ preprocess`: the official preprocessing of a CT (and its label map), written out.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use univ::io::{self, CropForeground, PreprocessOptions, ScaleIntensityRange, WriteOptions};

use crate::args::{DicomArgs, LimitArgs};

/// Arguments of `univ preprocess`.
#[derive(clap::Args)]
pub struct Args {
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
    #[command(flatten)]
    limits: LimitArgs,
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

/// Refuses outputs that are one of the inputs (or each other), also through links or
/// relative paths: writing them would replace the input.
fn check_distinct(a: &Args) -> Result<()> {
    let inputs: Vec<&std::path::Path> = std::iter::once(a.input.as_path())
        .chain(a.label.as_deref())
        .collect();
    let outputs: Vec<&std::path::Path> = std::iter::once(a.output.as_path())
        .chain(a.label_output.as_deref())
        .chain(a.record.as_deref())
        .collect();
    for (i, o) in outputs.iter().enumerate() {
        if let Some(inp) = inputs.iter().find(|p| io::atomic::same_file(p, o)) {
            bail!(
                "{}: this output is the input {}: writing it would replace the input; choose \
                 another output file",
                o.display(),
                inp.display()
            );
        }
        if let Some(other) = outputs[..i].iter().find(|p| io::atomic::same_file(p, o)) {
            bail!(
                "{}: given as two outputs ({})",
                o.display(),
                other.display()
            );
        }
    }
    Ok(())
}

pub fn run(a: Args) -> Result<()> {
    check_distinct(&a)?;
    let pixdim = parse_spacing(&a.spacing)?;
    let window = ScaleIntensityRange {
        a_min: a.a_min,
        a_max: a.a_max,
        ..ScaleIntensityRange::universal_model()
    };
    window.validate()?;
    let opts = PreprocessOptions {
        pixdim,
        intensity: Some(window),
        crop: (!a.no_crop).then(CropForeground::default),
        limits: a.limits.limits()?,
        ..PreprocessOptions::universal_model()
    };
    let image = if io::is_dicom(&a.input) || a.input.is_dir() {
        let dicom = io::dicom::DicomReadOptions {
            limits: opts.limits,
            ..a.dicom.options()
        };
        let s = io::dicom::read_dicom_series(&a.input, &dicom)?;
        for w in &s.warnings {
            eprintln!("warning: {w}");
        }
        s.volume
    } else {
        io::read_volume_with(&a.input, &opts.limits)?
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
        io::atomic::write_atomic(rec, json.as_bytes())?;
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
