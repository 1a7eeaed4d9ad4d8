//! `univ inspect`, `univ convert` and `univ forward`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor};
use univ::model::checkpoint::{Checkpoint, official_layout};
use univ::model::hub::resolve_checkpoint;
use univ::model::nets::{BackboneConfig, Encoding};

use crate::args::RuntimeArgs;

/// Arguments of `univ inspect`.
#[derive(clap::Args)]
pub struct InspectArgs {
    /// A .pth or .safetensors file, or a named official checkpoint (unet, swinunetr).
    checkpoint: String,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

/// Arguments of `univ convert`.
#[derive(clap::Args)]
pub struct ConvertArgs {
    /// A .pth or .safetensors file, or a named official checkpoint.
    input: String,
    /// The output .safetensors file.
    output: PathBuf,
}

/// Arguments of `univ forward`.
#[derive(clap::Args)]
pub struct ForwardArgs {
    /// A .pth or .safetensors file, or a named official checkpoint.
    #[arg(long)]
    checkpoint: String,
    /// Safetensors file holding `input`.
    #[arg(long)]
    input: PathBuf,
    /// Safetensors file to write `logits` to.
    #[arg(long)]
    output: PathBuf,
    /// Run the network this many times (the logits of the last run are written) and report
    /// each run's time and the best; on a GPU each run ends with a device synchronisation.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1000))]
    reps: u32,
    /// Also write the timings as JSON: `{"device", "precision", "input", "all_s", "best_s"}`.
    #[arg(long)]
    timings: Option<PathBuf>,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

/// Loads a checkpoint given as a path or a name, saying which file it is.
fn load(spec: &str) -> Result<(Checkpoint, String)> {
    let r = resolve_checkpoint(spec)?;
    if r.downloaded {
        eprintln!("downloaded {}", r.path.display());
    }
    let ckpt = Checkpoint::load(&r.path)?;
    Ok((ckpt, r.sha256))
}

pub fn inspect(a: InspectArgs) -> Result<()> {
    let (spec, json) = (a.checkpoint.as_str(), a.json);
    let (ckpt, sha) = load(spec)?;
    let cfg = ckpt.detect_config()?;
    let (model, report) = ckpt.build(&Device::Cpu)?;
    let layout = official_layout(&cfg)?;
    let params: usize = layout
        .iter()
        .filter(|t| t.parameter)
        .map(|t| t.shape.iter().product::<usize>())
        .sum();
    let (backbone, width) = match cfg.backbone {
        BackboneConfig::Unet(c) => ("unet", format!("base width {}", c.base)),
        BackboneConfig::SwinUnetr(c) => (
            "swinunetr",
            format!(
                "feature size {}, depths {:?}, heads {:?}, window {}",
                c.feature_size, c.depths, c.num_heads, c.window
            ),
        ),
    };
    let encoding = match cfg.encoding {
        Encoding::WordEmbedding => "word_embedding (CLIP text embeddings, organ_embedding buffer)",
        Encoding::RandEmbedding => "rand_embedding (learned organ_embedding.weight)",
    };
    let has_embedding = ckpt.tensors.contains_key("organ_embedding")
        || ckpt.tensors.contains_key("organ_embedding.weight");
    if json {
        let v = serde_json::json!({
            "file": ckpt.path,
            "sha256": sha,
            "backbone": backbone,
            "widths": width,
            "encoding": match cfg.encoding { Encoding::WordEmbedding => "word_embedding", Encoding::RandEmbedding => "rand_embedding" },
            "classes": cfg.num_classes,
            "trained_classes": model.classes().trained_ids(),
            "demo": ckpt.is_demo(),
            "parameters": params,
            "embedding_present": has_embedding,
            "tensors": ckpt.tensors.len(),
            "unexpected_keys": report.unexpected,
            "ignored_keys": report.ignored.len(),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("file:       {}", ckpt.path.display());
    println!("sha256:     {sha}");
    println!("backbone:   {backbone} ({width})");
    println!("encoding:   {encoding}");
    println!("classes:    {}", cfg.num_classes);
    let table = model.classes();
    if table.trained_ids().len() < table.len() {
        println!(
            "trained on: {} of them ({})",
            table.trained_ids().len(),
            table
                .iter()
                .filter(|c| c.trained)
                .map(|c| c.slug.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    if ckpt.is_demo() {
        println!("demo:       yes (a demonstration model, not for clinical use)");
    }
    println!("parameters: {params}");
    println!(
        "embedding:  {}",
        if has_embedding { "present" } else { "absent" }
    );
    println!("load:       {report}");
    Ok(())
}

/// Writes tensors as safetensors (dtypes kept), atomically, readable like any other output
/// (candle's writer creates the file owner-only).
fn write_safetensors(path: &Path, tensors: &HashMap<String, Tensor>) -> Result<()> {
    univ::io::atomic::write_atomic_with(
        path,
        |tmp| {
            candle_core::safetensors::save(tensors, tmp)?;
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(tmp, std::fs::Permissions::from_mode(0o644))?;
            }
            Ok(())
        },
        anyhow::Error::from,
    )
    .with_context(|| format!("{}: cannot write", path.display()))
}

pub fn convert(a: ConvertArgs) -> Result<()> {
    let (input, output) = (a.input.as_str(), a.output.as_path());
    if output.extension().is_none_or(|e| e != "safetensors") {
        bail!(
            "{}: the output must be a .safetensors file",
            output.display()
        );
    }
    let (ckpt, _) = load(input)?;
    // Check that it is a model we know before writing anything.
    ckpt.build(&Device::Cpu)?;
    write_safetensors(output, &ckpt.tensors)?;
    println!(
        "{} -> {} ({} tensors, canonical keys)",
        ckpt.path.display(),
        output.display(),
        ckpt.tensors.len()
    );
    Ok(())
}

pub fn forward(a: ForwardArgs) -> Result<()> {
    let (spec, input, output) = (a.checkpoint.as_str(), a.input.as_path(), a.output.as_path());
    let dev = a.runtime.device()?;
    let (ckpt, _) = load(spec)?;
    let (model, _) = ckpt.build(&dev)?;
    let mut t = candle_core::safetensors::load(input, &dev)
        .with_context(|| format!("{}: cannot read safetensors", input.display()))?;
    let x = t
        .remove("input")
        .with_context(|| format!("{}: no tensor named `input`", input.display()))?
        .to_dtype(DType::F32)?;
    if x.rank() != 5 || x.dim(1)? != 1 {
        bail!(
            "{}: `input` must be (B, 1, D, H, W), got {:?}",
            input.display(),
            x.dims()
        );
    }
    let precision = if dev.is_cpu() {
        univ::model::runtime::active_bf16_kernel()
            .map_or("f32".to_string(), |k| format!("bf16, {k} kernel"))
    } else {
        format!("{:?}, cuDNN", univ::model::runtime::gpu_conv_dtype()).to_lowercase()
    };
    let mut times = Vec::new();
    let mut logits = None;
    for _ in 0..a.reps {
        let start = std::time::Instant::now();
        let y = model.forward(&x)?;
        dev.synchronize()?;
        times.push(start.elapsed().as_secs_f64());
        logits = Some(y);
    }
    let logits = logits
        .expect("reps is at least 1")
        .to_device(&Device::Cpu)?;
    let best = times.iter().copied().fold(f64::INFINITY, f64::min);
    eprintln!(
        "forward: {:?} -> {:?} in {best:.4} s, best of {} (all: {times:.4?}; convolutions: \
         {precision})",
        x.dims(),
        logits.dims(),
        times.len(),
    );
    if let Some(path) = &a.timings {
        let json = serde_json::json!({
            "device": if dev.is_cpu() { "cpu".to_string() } else { format!("{:?}", dev.location()) },
            "precision": precision,
            "input": x.dims(),
            "all_s": times,
            "best_s": best,
        });
        univ::io::atomic::write_atomic(path, serde_json::to_string_pretty(&json)?.as_bytes())
            .with_context(|| format!("{}: cannot write", path.display()))?;
    }
    let mut out = HashMap::new();
    out.insert("logits".to_string(), logits);
    write_safetensors(output, &out)
}
