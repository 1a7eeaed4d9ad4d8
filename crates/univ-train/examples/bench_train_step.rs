//! One training step (forward + backward + AdamW) of the U-Net Universal Model (32 classes)
//! with the partial-label loss over all classes; prints the time of each step and the peak
//! resident memory. Baseline: `docs/benchmarks/pytorch_train_step.py`.
//!
//! ```text
//! cargo run --release -p univ-train --example bench_train_step -- \
//!     [--size 96] [--steps 3] [--threads 2] [--base 32] [--batch 1]
//! ```
//! `UNIV_BENCH_VERBOSE=1` also prints the time and memory after the forward pass, the loss and
//! the backward pass of each step.

use std::collections::HashMap;
use std::time::Instant;

use candle_core::{Device, Tensor};
use univ_model::UniversalConfig;
use univ_model::nets::{BackboneConfig, UnetConfig};
use univ_train::vars::VarStore;
use univ_train::{AdamW, AdamWConfig, DiceMode, Rng, partial_label_loss};

#[global_allocator]
static GLOBAL: univ_model::runtime::MiMalloc = univ_model::runtime::MiMalloc;

fn status_gb(key: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
        })
        .map(|kb| kb / 1e6)
        .unwrap_or(f64::NAN)
}

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() -> anyhow::Result<()> {
    // Keep freed pages mapped: every step allocates and frees the same large buffers.
    univ_model::runtime::keep_freed_memory();
    let size = arg("--size", 96);
    let steps = arg("--steps", 3);
    let threads = arg("--threads", 2);
    let base = arg("--base", 32);
    let batch = arg("--batch", 1);
    univ_model::runtime::init_threads(Some(threads));
    let verbose = std::env::var_os("UNIV_BENCH_VERBOSE").is_some();
    let dev = Device::Cpu;
    let mut cfg = UniversalConfig::universal_unet();
    cfg.backbone = BackboneConfig::Unet(UnetConfig { base });
    let store = VarStore::new(0, HashMap::new());
    let model = univ_model::UniversalModel::new(store.var_builder(&dev), cfg)?;
    // The CLIP rows are a buffer, not trained.
    let trainable: Vec<_> = store
        .vars()
        .into_iter()
        .filter(|(n, _)| n != "organ_embedding")
        .collect();
    let mut opt = AdamW::new(trainable, AdamWConfig::default())?;
    let mut rng = Rng::new(1);
    let v = size * size * size;
    let x: Vec<f32> = (0..batch * v).map(|_| rng.uniform() as f32).collect();
    let x = Tensor::from_vec(x, (batch, 1, size, size, size), &dev)?;
    let t: Vec<f32> = (0..batch * 32 * v)
        .map(|_| (rng.uniform() > 0.5) as u8 as f32)
        .collect();
    let t = Tensor::from_vec(t, (batch, 32, size, size, size), &dev)?;
    let classes = vec![(1..=32).collect::<Vec<usize>>(); batch];
    let mut times = Vec::new();
    let mut last = 0f32;
    for _ in 0..steps {
        let t0 = Instant::now();
        let logits = model.forward(&x)?;
        let parts = partial_label_loss(&logits, &t, &classes, DiceMode::PerSlice)?;
        last = parts.total.to_scalar::<f32>()?;
        let t1 = t0.elapsed().as_secs_f64();
        let grads = parts.total.backward()?;
        let t2 = t0.elapsed().as_secs_f64();
        opt.step(&grads)?;
        times.push(t0.elapsed().as_secs_f64());
        if verbose {
            eprintln!(
                "forward + loss {t1:.2} s, backward {:.2} s, AdamW {:.2} s; rss {:.2} GB, peak {:.2} GB",
                t2 - t1,
                times.last().unwrap_or(&0.0) - t2,
                status_gb("VmRSS:"),
                status_gb("VmHWM:")
            );
        }
    }
    let best = times.iter().cloned().fold(f64::INFINITY, f64::min);
    println!(
        "univ U-Net (base {base}) train step {batch}x{size}^3, {threads} threads: best {best:.2} s of {steps} (all: {:?}); loss {last:.4}; peak RSS {:.2} GB",
        times
            .iter()
            .map(|t| (t * 100.0).round() / 100.0)
            .collect::<Vec<_>>(),
        status_gb("VmHWM:")
    );
    Ok(())
}
