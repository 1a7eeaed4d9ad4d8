//! `univ evaluate`: metrics between predicted and reference label maps.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use univ::evaluate::{EvalOptions, evaluate_pair, remap, tumour_detection};
use univ::pipeline::{case_name, is_nifti};

/// Arguments of `univ evaluate`.
#[derive(clap::Args)]
pub struct Args {
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
}

pub fn run(a: Args) -> Result<()> {
    let (pred, gt, tolerances) = (a.pred.as_path(), a.gt.as_path(), a.tolerance.as_str());
    let opts = EvalOptions {
        label_map: a
            .label_map
            .as_deref()
            .map(univ::evaluate::read_label_map)
            .transpose()?,
        surface: !a.no_surface,
        tolerances: tolerances
            .split(',')
            .map(|t| t.trim().parse::<f64>())
            .collect::<Result<_, _>>()
            .with_context(|| format!("--tolerance {tolerances:?}: expected numbers in mm"))?,
    };
    if let Some(t) = opts
        .tolerances
        .iter()
        .find(|t| !(t.is_finite() && **t > 0.0))
    {
        bail!("--tolerance {tolerances:?}: {t} is not a positive distance in mm");
    }
    let out = if pred.is_dir() && gt.is_dir() {
        let mut cases = Vec::new();
        let mut per_case = serde_json::Map::new();
        let mut names: Vec<PathBuf> = std::fs::read_dir(gt)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| is_nifti(p))
            .collect();
        names.sort();
        for g in names {
            let name = g.file_name().expect("a file").to_owned();
            // The prediction: same file name, or <case>/segmentation.nii.gz from `univ segment`.
            let stem = case_name(&g);
            let cand = [
                pred.join(&name),
                pred.join(&stem).join("segmentation.nii.gz"),
            ];
            let Some(p) = cand.iter().find(|p| p.exists()) else {
                eprintln!("warning: no prediction for {}", g.display());
                continue;
            };
            let pv = univ::io::read_label(p)?;
            let gv = univ::io::read_label(&g)?;
            per_case.insert(stem, evaluate_pair(&pv, &gv, &opts)?);
            let gv = match &opts.label_map {
                Some(m) => remap(&gv, m),
                None => gv,
            };
            cases.push((pv, gv));
        }
        if cases.is_empty() {
            bail!(
                "no case of {} has a prediction in {}",
                gt.display(),
                pred.display()
            );
        }
        serde_json::json!({"cases": per_case, "tumour_detection": tumour_detection(&cases)})
    } else if pred.is_file() && gt.is_file() {
        evaluate_pair(
            &univ::io::read_label(pred)?,
            &univ::io::read_label(gt)?,
            &opts,
        )?
    } else {
        bail!("--pred and --gt must both be files or both be folders");
    };
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}
