//! The `univ` command: a thin layer over the `univ` library. Each subcommand is a module with
//! its clap arguments and a `run`; this file only dispatches. Errors are printed as one
//! readable message (with their causes), without a backtrace, with exit code 1.

mod args;
mod cohort;
mod embed;
mod evaluate;
mod info;
mod model;
mod preprocess;
mod segment;
mod train;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[global_allocator]
static GLOBAL: univ::model::runtime::MiMalloc = univ::model::runtime::MiMalloc;

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

#[derive(Subcommand)]
enum Command {
    /// Print a volume's header summary: shape, voxel type, spacing, orientation, affine and
    /// intensity range.
    Info(info::Args),
    /// Preprocess a CT as the official pipeline does (RAS, 1.5 mm, −175..250 HU → 0..1,
    /// foreground crop) and write the result (f32) and, optionally, its label map (u8).
    Preprocess(preprocess::Args),
    /// Segment a CT (a NIfTI file or DICOM series, or a folder of them): label map, class
    /// table, report, preview, and optionally per-class masks, probabilities, logits and
    /// DICOM-SEG, on the input's grid.
    Segment(segment::Args),
    /// Merge a cohort's results (`univ segment --manifest`) into OUT/cohort.csv (one row per
    /// case and class), OUT/cohort-summary.json (done, failed, missing, time) and
    /// OUT/cohort-volumes.png. Exit code 3 when some cases failed or are missing.
    Cohort(cohort::Args),
    /// Compare predicted label maps with references: Dice, official Dice, surface Dice, HD95
    /// per label (JSON); for two folders also case-level tumour detection.
    Evaluate(evaluate::Args),
    /// Train a model with the partial-label loss from a configuration file (see
    /// docs/training.md for train.toml and the dataset manifest).
    Train(train::Args),
    /// Describe a checkpoint: backbone, widths, classes, parameter count, embedding, keys.
    Inspect(model::InspectArgs),
    /// Embed class prompts with a CLIP text encoder (`--universal` for the 32-class bank), or
    /// inspect an embedding file (`--inspect FILE`).
    Embed(embed::Args),
    /// Rewrite a checkpoint as safetensors with canonical keys (no `module.`, `backbone.`).
    Convert(model::ConvertArgs),
    /// Run the model on the tensor `input` (B, 1, D, H, W) of a safetensors file and write
    /// `logits` (B, K, D, H, W): for checking parity with PyTorch.
    Forward(model::ForwardArgs),
}

fn main() -> ExitCode {
    univ::model::runtime::keep_freed_memory();
    let cli = Cli::parse();
    let runtime = match &cli.command {
        Command::Segment(a) => Some(&a.runtime),
        Command::Train(a) => Some(&a.runtime),
        Command::Forward(a) => Some(&a.runtime),
        _ => None,
    };
    let threads = match runtime.map(|r| r.threads()).transpose() {
        Ok(t) => t.flatten(),
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    univ::model::runtime::init_threads(threads);
    let default_precision = match &cli.command {
        Command::Segment(a) if a.fast => args::PrecisionArg::Bf16,
        _ => args::PrecisionArg::F32,
    };
    if let Some(Err(e)) = runtime.map(|r| r.apply_precision(default_precision)) {
        eprintln!("error: {e:#}");
        return ExitCode::FAILURE;
    }
    let result = match cli.command {
        Command::Info(a) => info::run(a),
        Command::Preprocess(a) => preprocess::run(a),
        Command::Segment(a) => segment::run(a),
        Command::Evaluate(a) => evaluate::run(a),
        Command::Cohort(a) => cohort::run(a),
        Command::Train(a) => train::run(a),
        Command::Inspect(a) => model::inspect(a),
        Command::Embed(a) => embed::run(a),
        Command::Convert(a) => model::convert(a),
        Command::Forward(a) => model::forward(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            match e.downcast_ref::<args::CodedError>() {
                Some(c) => ExitCode::from(c.code),
                None => ExitCode::FAILURE,
            }
        }
    }
}
