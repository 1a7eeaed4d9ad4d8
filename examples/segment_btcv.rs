//! Segment a BTCV-style abdominal CT and, given its label map, print a per-organ Dice table.
//!
//! ```text
//! cargo run --release --example segment_btcv -- --image IMG [--label LABEL] --checkpoint CKPT
//! cargo run --release --example segment_btcv     # example_ct from ../shared with the demo model
//! ```
//!
//! BTCV label ids 1–13 are universal classes 1–13 (spleen … left adrenal gland). The outputs
//! (label map, report) go to `--output` (default: a folder beside the image's name in the
//! system's temporary folder).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Parser;
use univ::{OutputOptions, SegmentOptions, load_model, segment, write_outputs};

#[global_allocator]
static GLOBAL: univ::model::runtime::MiMalloc = univ::model::runtime::MiMalloc;

#[derive(Parser)]
#[command(about = "Segment a BTCV-style CT and print per-organ Dice against its label")]
struct Args {
    /// CT image (NIfTI). Default: ../shared/data/ct/example_ct.nii.gz.
    #[arg(long)]
    image: Option<PathBuf>,
    /// Reference label map with BTCV ids 1–13 (or universal ids).
    #[arg(long)]
    label: Option<PathBuf>,
    /// Checkpoint (.pth, .safetensors, `unet`, `swinunetr`). Default: the demo model.
    #[arg(long)]
    checkpoint: Option<String>,
    /// Output folder.
    #[arg(long)]
    output: Option<PathBuf>,
}

fn main() -> ExitCode {
    univ::model::runtime::keep_freed_memory();
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(a: Args) -> Result<()> {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let root = manifest
        .parent()
        .and_then(|p| p.parent())
        .unwrap_or(&manifest)
        .to_path_buf();
    let shared = root.join("../shared/data/ct");
    let (image, label) = match a.image {
        Some(i) => (i, a.label),
        None => (
            shared.join("example_ct.nii.gz"),
            a.label
                .or_else(|| Some(shared.join("derived_example_ct_seg_fast_um32.nii.gz"))),
        ),
    };
    // Without --checkpoint: the demo model, found as `univ segment` finds it.
    let loaded = load_model(a.checkpoint.as_deref(), &candle_core::Device::Cpu)?;
    println!("model: {}", loaded.path.display());
    let model = loaded.model;
    let ct = univ::io::read_image(&image)?;
    println!(
        "{}: {:?} voxels at {:?} mm",
        image.display(),
        ct.shape(),
        ct.spacing()
    );
    let t = std::time::Instant::now();
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let seg = segment(&ct, &model, &SegmentOptions::default(), |d, n| {
        if tty {
            eprint!("\rwindow {d}/{n}");
            if d == n {
                eprintln!();
            }
        }
    })?;
    println!(
        "segmented in {:.1} s ({} windows)",
        t.elapsed().as_secs_f64(),
        seg.windows
    );
    let out = a.output.unwrap_or_else(|| {
        std::env::temp_dir().join(format!(
            "segment_btcv_{}",
            image
                .file_name()
                .map(|n| n
                    .to_string_lossy()
                    .replace(".nii.gz", "")
                    .replace(".nii", ""))
                .unwrap_or_default()
        ))
    });
    let oo = OutputOptions {
        overwrite: true,
        ..OutputOptions::default()
    };
    write_outputs(&out, &ct, &seg, &oo, None)?;
    println!("outputs in {}", out.display());
    let Some(label) = label else { return Ok(()) };
    let gt = univ::io::read_label(&label)
        .with_context(|| format!("{}: reference label", label.display()))?;
    ct.check_same_grid(&gt)?;
    println!(
        "\n{:<3} {:<30} {:>10} {:>10} {:>7}",
        "id", "organ", "reference", "predicted", "Dice"
    );
    let mut dices = Vec::new();
    for id in 1..=13usize {
        let Some(c) = seg.class_by_id(id) else {
            continue;
        };
        let g: Vec<bool> = gt.data().iter().map(|v| usize::from(*v) == id).collect();
        let p = c.mask.to_bools();
        let o = univ::train::metrics::overlap(&p, &g);
        if o.gt == 0 {
            continue;
        }
        dices.push(o.dice());
        println!(
            "{id:<3} {:<30} {:>10} {:>10} {:>7.4}",
            c.name(),
            o.gt,
            o.pred,
            o.dice()
        );
    }
    if !dices.is_empty() {
        println!(
            "mean Dice over {} organs: {:.4}",
            dices.len(),
            dices.iter().sum::<f64>() / dices.len() as f64
        );
    }
    Ok(())
}
