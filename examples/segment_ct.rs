//! Segment a CT from a Rust program: the five lines of [`segment_ct`].
//!
//! ```text
//! cargo run --release --example segment_ct -- CT.nii.gz OUT_FOLDER [CHECKPOINT]
//! ```
//!
//! `CHECKPOINT` is a `.pth`/`.safetensors` file or `unet`/`swinunetr` (the official weights);
//! without it the demo model is used. The test suite runs [`segment_ct`] itself.

use std::path::Path;
use std::process::ExitCode;

use univ::{OutputOptions, SegmentOptions, Segmentation, load_model, segment, write_outputs};

/// Loads a model, reads a CT, segments it, prints the liver's volume and writes every output
/// (label map, class table, report, preview) to `out`.
///
/// # Errors
/// Any error of the pipeline, with its cause.
pub fn segment_ct(ct: &Path, out: &Path, checkpoint: Option<&str>) -> univ::Result<Segmentation> {
    let model = load_model(checkpoint, &candle_core::Device::Cpu)?;
    let image = univ::io::read_volume(ct)?;
    let seg = segment(&image, &model.model, &SegmentOptions::default(), |_, _| {})?;
    println!("liver: {:.1} mL", seg.volume_ml("liver").unwrap_or(0.0));
    write_outputs(out, &image, &seg, &OutputOptions::default(), None)?;
    Ok(seg)
}

#[allow(dead_code)]
fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(ct), Some(out)) = (args.first(), args.get(1)) else {
        eprintln!("usage: segment_ct CT.nii.gz OUT_FOLDER [CHECKPOINT]");
        return ExitCode::FAILURE;
    };
    match segment_ct(ct.as_ref(), out.as_ref(), args.get(2).map(String::as_str)) {
        Ok(seg) => {
            println!("{} classes written to {out}", seg.classes.len());
            ExitCode::SUCCESS
        }
        Err(e) => {
            // The whole chain of causes, without a backtrace.
            let mut msg = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                msg.push_str(&format!(": {s}"));
                source = s.source();
            }
            eprintln!("error: {msg}");
            ExitCode::FAILURE
        }
    }
}
