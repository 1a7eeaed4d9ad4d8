//! One training step (forward + backward + AdamW) on a 96³ patch with the full-size U-Net
//! Universal Model (32 classes) and the partial-label loss over all classes; prints the time of
//! each step and the peak resident memory. Baseline: `docs/benchmarks/pytorch_train_step.py`.
//!
//! ```text
//! cargo run --release -p univ-train --example bench_train_step -- [--size 96] [--steps 3] [--threads 2]
//! ```

use std::collections::HashMap;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use univ_model::UniversalConfig;
use univ_train::vars::VarStore;
use univ_train::{AdamW, AdamWConfig, DiceMode, Rng, partial_label_loss};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn peak_rss_gb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
        })
        .map(|kb| kb / 1e6)
        .unwrap_or(f64::NAN)
}

fn rss_gb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
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
    // SAFETY: setting an option is thread-safe.
    unsafe { libmimalloc_sys::mi_option_set(15, -1) };
    let size = arg("--size", 96);
    let steps = arg("--steps", 3);
    let threads = arg("--threads", 2);
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()?;
    let dev = Device::Cpu;
    let cfg = UniversalConfig::universal_unet();
    let store = VarStore::new(0, HashMap::new());
    let model = univ_model::UniversalModel::new(store.var_builder(&dev), cfg)?;
    let trainable: Vec<_> = store
        .vars()
        .into_iter()
        .filter(|(n, _)| n != "organ_embedding")
        .collect();
    let mut opt = AdamW::new(trainable, AdamWConfig::default())?;
    let mut rng = Rng::new(1);
    let v = size * size * size;
    let x: Vec<f32> = (0..v).map(|_| rng.uniform() as f32).collect();
    let x = Tensor::from_vec(x, (1, 1, size, size, size), &dev)?;
    let t: Vec<f32> = (0..32 * v)
        .map(|_| (rng.uniform() > 0.5) as u8 as f32)
        .collect();
    let t = Tensor::from_vec(t, (1, 32, size, size, size), &dev)?;
    let classes = vec![(1..=32).collect::<Vec<usize>>()];
    let mut times = Vec::new();
    let mut last = 0f32;
    for _ in 0..steps {
        let t0 = Instant::now();
        let logits = model.forward(&x)?;
        let verbose = std::env::var_os("UNIV_BENCH_VERBOSE").is_some();
        if verbose {
            eprintln!(
                "after forward: rss {:.2} GB peak {:.2} GB",
                rss_gb(),
                peak_rss_gb()
            );
        }
        let parts = partial_label_loss(&logits, &t, &classes, DiceMode::PerSlice)?;
        last = parts.total.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        if verbose {
            eprintln!(
                "after loss: rss {:.2} GB peak {:.2} GB",
                rss_gb(),
                peak_rss_gb()
            );
        }
        let grads = parts.total.backward()?;
        if verbose {
            eprintln!(
                "after backward: rss {:.2} GB peak {:.2} GB",
                rss_gb(),
                peak_rss_gb()
            );
        }
        opt.step(&grads)?;
        times.push(t0.elapsed().as_secs_f64());
    }
    let best = times.iter().cloned().fold(f64::INFINITY, f64::min);
    println!(
        "univ U-Net (base 32) train step {size}^3, {threads} threads: best {best:.2} s of {steps} (all: {:?}); loss {last:.4}; peak RSS {:.2} GB",
        times
            .iter()
            .map(|t| (t * 100.0).round() / 100.0)
            .collect::<Vec<_>>(),
        peak_rss_gb()
    );
    Ok(())
}
