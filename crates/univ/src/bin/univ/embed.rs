//! `univ embed`: class embeddings from prompts with a CLIP text encoder, and their inspection.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use candle_core::Device;
use univ::ClassTable;
use univ::clip::{ClassEmbeddings, ClipTextEncoder};
use univ::model::classes::{PROMPT_TEMPLATE, prompt};

/// Arguments of `univ embed`. What is embedded, in output order: the universal bank, then
/// classes, then raw prompts.
#[derive(clap::Args)]
pub struct Args {
    /// A folder with config.json, safetensors weights and tokenizer files, or a Hugging Face
    /// repository id in the local cache (e.g. openai/clip-vit-base-patch32).
    #[arg(long)]
    clip: Option<String>,
    /// A prompt, embedded as given (repeatable).
    #[arg(long = "prompt")]
    prompts: Vec<String>,
    /// A class name, put into "A computerized tomography of a {}" (repeatable).
    #[arg(long = "class")]
    classes: Vec<String>,
    /// The 32 universal classes with the official prompt strings.
    #[arg(long)]
    universal: bool,
    /// Output safetensors file (tensor `embeddings`, (N, D)).
    #[arg(long, short)]
    output: Option<PathBuf>,
    /// Print the classes, norms and similarity table of an embedding file.
    #[arg(long, conflicts_with_all = ["clip", "prompts", "classes", "universal", "output"])]
    inspect: Option<PathBuf>,
}

pub fn run(a: Args) -> Result<()> {
    if let Some(file) = &a.inspect {
        return inspect(file);
    }
    let clip = a
        .clip
        .as_deref()
        .context("--clip DIR_OR_HF_ID is required to embed")?;
    let output = a
        .output
        .as_deref()
        .context("--output FILE.safetensors is required")?;
    if output.extension().is_none_or(|e| e != "safetensors") {
        bail!(
            "{}: the output must be a .safetensors file",
            output.display()
        );
    }
    let mut names = Vec::new();
    let mut prompts = Vec::new();
    if a.universal {
        for c in ClassTable::universal().iter() {
            names.push(c.name.clone());
            prompts.push(c.prompt().context("a universal class without its prompt")?);
        }
    }
    for c in &a.classes {
        names.push(c.clone());
        prompts.push(prompt(c));
    }
    for p in &a.prompts {
        names.push(p.clone());
        prompts.push(p.clone());
    }
    if prompts.is_empty() {
        bail!("nothing to embed: give --prompt, --class or --universal");
    }
    let dir = if Path::new(clip).is_dir() {
        PathBuf::from(clip)
    } else {
        univ::clip::hub::resolve_repo(clip).with_context(|| {
            format!("--clip {clip}: not a folder, and not found as a Hugging Face repository")
        })?
    };
    let encoder = ClipTextEncoder::from_dir(&dir, &Device::Cpu)?;
    let start = std::time::Instant::now();
    let emb = encoder.embed(&prompts)?;
    let mut bank = ClassEmbeddings::new(names, prompts, emb)?;
    bank.provenance.insert(
        "encoder".into(),
        format!("CLIP text encoder from {clip} (encode_text, not normalised)"),
    );
    bank.provenance
        .insert("template".into(), PROMPT_TEMPLATE.to_string());
    bank.save_safetensors(output)?;
    println!(
        "embedded {} prompts ({} values each) in {:.2} s -> {}",
        bank.len(),
        bank.dim(),
        start.elapsed().as_secs_f64(),
        output.display()
    );
    Ok(())
}

fn inspect(file: &Path) -> Result<()> {
    let mut e = ClassEmbeddings::load(file)?;
    // A file without names (the official txt_encoding.pth) with one row per universal class.
    let table = ClassTable::universal();
    if e.names
        .iter()
        .enumerate()
        .all(|(i, n)| *n == format!("class_{}", i + 1))
        && e.len() == table.len()
    {
        e.names = table.iter().map(|c| c.name.clone()).collect();
        e.prompts = table
            .iter()
            .map(|c| c.prompt().unwrap_or_default())
            .collect();
    }
    let norms = e.norms()?;
    println!(
        "{}: {} classes x {} values, sha256 {}",
        file.display(),
        e.len(),
        e.dim(),
        e.sha256()?
    );
    for (k, v) in &e.provenance {
        if k != "sha256" {
            println!("  {k}: {v}");
        }
    }
    println!("{:>3}  {:<30} {:>7}  prompt", "#", "class", "norm");
    for (i, ((name, norm), p)) in e.names.iter().zip(&norms).zip(&e.prompts).enumerate() {
        println!("{:>3}  {:<30} {norm:>7.4}  {p}", i + 1, name);
    }
    let sim = e.cosine_similarity()?;
    println!("\ncosine similarity (row i, column j = class j):");
    print!("{:>4}", "");
    for j in 0..e.len() {
        print!("{:>6}", j + 1);
    }
    println!();
    for (i, row) in sim.iter().enumerate() {
        print!("{:>4}", i + 1);
        for v in row {
            print!("{v:>6.3}");
        }
        println!();
    }
    Ok(())
}
