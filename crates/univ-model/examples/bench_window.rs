//! One 96³ window through the full-size networks on the CPU (U-Net base 32, Swin UNETR feature
//! size 48, 32 classes, random weights): time, FLOPs (2 per multiply-add, counted from the
//! architecture), achieved GFLOP/s, and the machine's measured FMA peak for comparison.
//!
//! `cargo run --release -p univ-model --example bench_window [-- --size 96 --reps 2 --only unet
//! --slab-mb 96 --winograd off --precision bf16 --profile --weights DIR]`
//!
//! With `UNIV_SAVE_RANDOM_MODELS=DIR` the random weights, the input and the f32 logits are saved
//! in `DIR` (for `docs/benchmarks/cpu_anchors.py`, which runs PyTorch and OpenVINO on them);
//! `--weights DIR` times those weights on that input again (so that accuracy figures compare
//! with the anchors' on the same model).
//!
//! With `--precision bf16` (the kernel chosen as `univ` chooses it; `UNIV_BF16_KERNEL` forces
//! one) the window is also run once in f32 on the same weights and input, and the largest
//! logit difference and the share of voxels whose mask (logit > 0) flips are printed.

use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

/// mimalloc, counting the bytes allocated and not yet freed (and their peak), to report the
/// memory a window needs independently of what the allocator keeps mapped.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded to mimalloc unchanged; only counters are updated.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = unsafe { univ_model::runtime::MiMalloc.alloc(l) };
        if !p.is_null() {
            let now = LIVE.fetch_add(l.size(), Ordering::Relaxed) + l.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { univ_model::runtime::MiMalloc.dealloc(p, l) };
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        let p = unsafe { univ_model::runtime::MiMalloc.alloc_zeroed(l) };
        if !p.is_null() {
            let now = LIVE.fetch_add(l.size(), Ordering::Relaxed) + l.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        let q = unsafe { univ_model::runtime::MiMalloc.realloc(p, l, new) };
        if !q.is_null() {
            if new >= l.size() {
                let now = LIVE.fetch_add(new - l.size(), Ordering::Relaxed) + new - l.size();
                PEAK.fetch_max(now, Ordering::Relaxed);
            } else {
                LIVE.fetch_sub(l.size() - new, Ordering::Relaxed);
            }
        }
        q
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Peak resident memory of the process so far (`VmHWM`), in bytes.
fn peak_rss() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use univ_model::nets::{BackboneConfig, SwinUnetrConfig, UnetConfig};
use univ_model::{UniversalConfig, UniversalModel};

/// Multiply-adds of one forward pass of the U-Net model on an `s³` input.
fn unet_macs(b: u64, s: u64, classes: u64) -> u64 {
    let v = |div: u64| (s / div).pow(3);
    let k = 27;
    let mut m = 0;
    m += k * (b + b * 2 * b) * v(1);
    m += k * (4 * b * b + 8 * b * b) * v(2);
    m += k * (16 * b * b + 32 * b * b) * v(4);
    m += k * (64 * b * b + 128 * b * b) * v(8);
    m += 256 * b * b * 8 * v(8) + k * (24 * b * 8 * b + 64 * b * b) * v(4);
    m += 64 * b * b * 8 * v(4) + k * (48 * b * b + 16 * b * b) * v(2);
    m += 16 * b * b * 8 * v(2) + k * (12 * b * b + 4 * b * b) * v(1);
    m + head_macs(2 * b, 16 * b, s, classes)
}

/// Multiply-adds of the Universal head: precls 1×1 conv, GAP conv, controller, dynamic head.
fn head_macs(c_dec: u64, c_deep: u64, s: u64, classes: u64) -> u64 {
    c_dec * 8 * s.pow(3) + c_deep * 256 + classes * 512 * 153 + classes * (64 + 64 + 8) * s.pow(3)
}

/// Multiply-adds of one forward pass of the Swin UNETR model on an `s³` input.
fn swin_macs(fs: u64, s: u64, classes: u64) -> u64 {
    let v = |div: u64| (s / div).pow(3);
    let k = 27;
    let mut m = 8 * fs * v(2); // patch embedding
    for stage in 0..4u32 {
        let dim = fs << stage;
        let side = s / (2 << stage);
        let win = side.min(7);
        let padded = side.div_ceil(win) * win;
        let tp = padded.pow(3);
        let t = side.pow(3);
        let n = win.pow(3);
        // Two blocks: qkv + proj on padded tokens, QKᵀ and AV, MLP on real tokens.
        m += 2 * (4 * dim * dim * tp + 2 * tp * n * dim + 8 * dim * dim * t);
        m += 8 * dim * 2 * dim * t / 8; // patch merging
    }
    m += k * (fs + fs * fs) * v(1) + fs * v(1); // encoder1 (+ 1×1 residual)
    m += k * 2 * fs * fs * v(2);
    m += k * 2 * 4 * fs * fs * v(4);
    m += k * 2 * 16 * fs * fs * v(8);
    m += k * 2 * 256 * fs * fs * v(32);
    for (cin, cout, div) in [(16, 8, 16), (8, 4, 8), (4, 2, 4), (2, 1, 2), (1, 1, 1)] {
        let (ci, co) = (cin * fs, cout * fs);
        m += ci * co * 8 * v(div * 2); // transposed conv on the coarser grid
        m += k * (2 * co * co + co * co) * v(div) + 2 * co * co * v(div);
    }
    m + head_macs(fs, 16 * fs, s, classes)
}

/// The CPU's model name (from /proc/cpuinfo) and which bf16 instruction sets it has.
fn cpu_description() -> String {
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let isa = univ_model::runtime::Bf16Kernel::ALL
        .iter()
        .filter(|k| **k != univ_model::runtime::Bf16Kernel::Reference)
        .map(|k| match k.check() {
            Ok(()) => format!("{k}: yes"),
            Err(_) => format!("{k}: no"),
        })
        .collect::<Vec<_>>()
        .join(", ");
    let ratio = univ_model::runtime::avx512bf16_speedup().map_or(String::new(), |r| {
        format!("; VDPBF16PS/FMA products: {r:.2}x")
    });
    format!("{model} ({isa}{ratio})")
}

/// Measured FMA throughput of this machine (all threads), GFLOP/s.
fn fma_peak() -> f64 {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::*;
        #[target_feature(enable = "avx512f")]
        unsafe fn run512(iters: u64) -> f32 {
            let mut acc = [_mm512_set1_ps(0.0); 12];
            let a = _mm512_set1_ps(0.999_999);
            let b = _mm512_set1_ps(1e-7);
            for _ in 0..iters {
                for x in acc.iter_mut() {
                    *x = _mm512_fmadd_ps(*x, a, b);
                }
            }
            let mut s = 0.0;
            for x in acc {
                s += _mm512_reduce_add_ps(x);
            }
            s
        }
        #[target_feature(enable = "avx2,fma")]
        unsafe fn run256(iters: u64) -> f32 {
            let mut acc = [_mm256_set1_ps(0.0); 12];
            let a = _mm256_set1_ps(0.999_999);
            let b = _mm256_set1_ps(1e-7);
            for _ in 0..iters {
                for x in acc.iter_mut() {
                    *x = _mm256_fmadd_ps(*x, a, b);
                }
            }
            let mut out = [0f32; 8];
            let mut s = 0.0;
            for x in acc {
                unsafe { _mm256_storeu_ps(out.as_mut_ptr(), x) };
                s += out.iter().sum::<f32>();
            }
            s
        }
        let avx512 = is_x86_feature_detected!("avx512f");
        if !(avx512 || is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")) {
            return f64::NAN;
        }
        let lanes = if avx512 { 16.0 } else { 8.0 };
        let threads = rayon::current_num_threads();
        let iters = 50_000_000u64;
        // Best of five runs (the first ones also let the clock ramp up).
        let mut best = 0f64;
        for _ in 0..5 {
            let t = Instant::now();
            let sum: f32 = std::thread::scope(|sc| {
                let hs: Vec<_> = (0..threads)
                    .map(|_| {
                        sc.spawn(move || unsafe {
                            if avx512 { run512(iters) } else { run256(iters) }
                        })
                    })
                    .collect();
                hs.into_iter().map(|h| h.join().unwrap()).sum()
            });
            let secs = t.elapsed().as_secs_f64();
            std::hint::black_box(sum);
            best = best.max((threads as f64 * iters as f64 * 12.0 * lanes * 2.0) / secs / 1e9);
        }
        best
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        f64::NAN
    }
}

#[allow(clippy::too_many_arguments)]
fn bench(
    name: &str,
    cfg: UniversalConfig,
    macs: u64,
    size: usize,
    reps: usize,
    peak: f64,
    profiling: bool,
    weights: Option<&str>,
) -> anyhow::Result<()> {
    if let Some(dir) = weights {
        // The weights and input saved by an earlier run (the ones `cpu_anchors.py` runs).
        let key = cfg.backbone.name();
        let dir = std::path::Path::new(dir);
        let tensors = candle_core::safetensors::load(
            dir.join(format!("random_{key}.safetensors")),
            &Device::Cpu,
        )?;
        let input = candle_core::safetensors::load(
            dir.join(format!("input_{key}_{size}.safetensors")),
            &Device::Cpu,
        )?;
        let x = input
            .get("input")
            .ok_or_else(|| anyhow::anyhow!("no tensor `input` in {}", dir.display()))?
            .clone();
        let model = UniversalModel::new(
            VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu),
            cfg,
        )?;
        return time_model(name, &model, &x, macs, reps, peak, profiling);
    }
    // Random weights, then plain tensors (as from a checkpoint: no autograd tracking).
    let varmap = VarMap::new();
    UniversalModel::new(
        VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
        cfg,
    )?;
    let tensors: std::collections::HashMap<String, Tensor> = varmap
        .data()
        .lock()
        .expect("not poisoned")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
        .collect();
    if let Some(dir) = std::env::var_os("UNIV_SAVE_RANDOM_MODELS") {
        // Keep the random weights (canonical keys) to benchmark whole pipelines with them.
        std::fs::create_dir_all(&dir)?;
        let path =
            std::path::Path::new(&dir).join(format!("random_{}.safetensors", cfg.backbone.name()));
        candle_core::safetensors::save(&tensors, &path)?;
        println!("saved {}", path.display());
    }
    let model = UniversalModel::new(
        VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu),
        cfg,
    )?;
    let x = Tensor::rand(0f32, 1.0, (1, 1, size, size, size), &Device::Cpu)?;
    if let Some(dir) = std::env::var_os("UNIV_SAVE_RANDOM_MODELS") {
        // The input and univ's f32 logits too, for docs/benchmarks/cpu_anchors.py (which runs
        // PyTorch and OpenVINO on the same weights and input).
        let dir = std::path::Path::new(&dir);
        let name = cfg.backbone.name();
        let kernel = univ_model::runtime::active_bf16_kernel();
        univ_model::runtime::set_bf16_kernel(None)?;
        let logits = model.forward(&x)?;
        univ_model::runtime::set_bf16_kernel(kernel)?;
        let input = dir.join(format!("input_{name}_{size}.safetensors"));
        candle_core::safetensors::save(&[("input", x.clone())].into_iter().collect(), &input)?;
        let out = dir.join(format!("logits_{name}_{size}.safetensors"));
        candle_core::safetensors::save(&[("logits", logits)].into_iter().collect(), &out)?;
        println!("saved {} and {}", input.display(), out.display());
    }
    time_model(name, &model, &x, macs, reps, peak, profiling)
}

/// Times `model` on `x` and prints the figures (see the module's documentation).
fn time_model(
    name: &str,
    model: &UniversalModel,
    x: &Tensor,
    macs: u64,
    reps: usize,
    peak: f64,
    profiling: bool,
) -> anyhow::Result<()> {
    let x = x.clone();
    let size = x.dim(4)?;
    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let mut times = Vec::new();
    for _ in 0..reps {
        let t = Instant::now();
        let y = model.forward(&x)?;
        std::hint::black_box(y.dims());
        times.push(t.elapsed().as_secs_f64());
    }
    let best = times.iter().cloned().fold(f64::INFINITY, f64::min);
    // The timed windows' own peak (the profile and the f32 comparison below allocate more:
    // the latter holds the bf16 logits while the f32 window runs).
    let window_peak = PEAK.load(Ordering::Relaxed) - base;
    if profiling {
        // The last window's stages (the earlier ones include the allocator's warm-up).
        univ_model::runtime::reset_profile();
        let t = Instant::now();
        std::hint::black_box(model.forward(&x)?.dims());
        let total = t.elapsed().as_secs_f64();
        println!(
            "{name:<22} profile of one more window ({total:.2} s; stages nest, times include their children):"
        );
        for (stage, secs, calls) in univ_model::runtime::profile() {
            println!(
                "  {stage:<56} {secs:7.3} s {:5.1}%  ({calls} calls)",
                100.0 * secs / total
            );
        }
    }
    let kernel = univ_model::runtime::active_bf16_kernel();
    if let Some(k) = kernel {
        // The same window in f32, for the accuracy of bf16.
        let y16 = model.forward(&x)?.flatten_all()?.to_vec1::<f32>()?;
        univ_model::runtime::set_bf16_kernel(None)?;
        let y32 = model.forward(&x)?.flatten_all()?.to_vec1::<f32>()?;
        univ_model::runtime::set_bf16_kernel(Some(k))?;
        let max_err = y16
            .iter()
            .zip(&y32)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        let max_abs = y32.iter().fold(0f32, |m, v| m.max(v.abs()));
        let flips = y16
            .iter()
            .zip(&y32)
            .filter(|(a, b)| (**a > 0.0) != (**b > 0.0))
            .count();
        println!(
            "{name:<22} bf16 ({k}) against f32: max logit error {max_err:.4} (largest |logit| {max_abs:.2}); masks flipped at {:.4}% of {} voxels",
            100.0 * flips as f64 / y32.len() as f64,
            y32.len()
        );
    }
    let gflop = 2.0 * macs as f64 / 1e9;
    println!(
        "{name:<22} {size}^3 window: best {best:7.2} s of {reps} (all: {times:.2?}); {gflop:7.1} GFLOP; {:6.1} GFLOP/s = {:4.1}% of the measured FMA peak",
        gflop / best,
        100.0 * gflop / best / peak
    );
    let mb = |b: f64| b / 1e6;
    println!(
        "{name:<22} memory: weights + input {:.0} MB; a window allocates at most {:.0} MB more; process peak RSS so far {}",
        mb(base as f64),
        mb(window_peak as f64),
        peak_rss().map_or("unknown".to_string(), |b| format!("{:.0} MB", mb(b as f64)))
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    univ_model::runtime::keep_freed_memory();
    let args: Vec<String> = std::env::args().collect();
    let get = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let size: usize = get("--size").map(|v| v.parse()).transpose()?.unwrap_or(96);
    let reps: usize = get("--reps").map(|v| v.parse()).transpose()?.unwrap_or(2);
    let only = get("--only");
    // `--weights DIR`: the weights and input an earlier run saved (UNIV_SAVE_RANDOM_MODELS).
    let weights = get("--weights");
    // `--profile` times one more window stage by stage.
    let profiling = args.iter().any(|a| a == "--profile");
    univ_model::runtime::set_profiling(profiling);
    if let Some(mb) = get("--slab-mb") {
        univ_model::runtime::set_slab_bytes(mb.parse::<usize>()? << 20);
    }
    // `--winograd off` times the direct implicit GEMM for every convolution.
    if let Some(w) = get("--winograd") {
        univ_model::runtime::set_winograd(w != "off");
    }
    if let Some(p) = get("--precision") {
        let precision: univ_model::runtime::Precision = p.parse()?;
        let kernel = univ_model::runtime::set_precision(precision)?;
        if precision == univ_model::runtime::Precision::Bf16 && kernel.is_none() {
            println!(
                "warning: no bf16 kernel faster than f32 here ({}): timing f32 \
                 (UNIV_BF16_KERNEL=avx512bf16 or reference forces a slower bf16 kernel)",
                univ_model::runtime::bf16_fallback_reason()
            );
        }
    }
    println!("cpu: {}", cpu_description());
    let peak = fma_peak();
    println!(
        "threads: {}; measured FMA peak: {peak:.1} GFLOP/s; convolutions: {}",
        rayon::current_num_threads(),
        univ_model::runtime::active_bf16_kernel()
            .map_or("f32".to_string(), |k| format!("bf16 ({k} kernel)"))
    );
    if only.as_deref().is_none_or(|o| o == "unet") {
        let cfg = UniversalConfig {
            backbone: BackboneConfig::Unet(UnetConfig::universal_model()),
            ..UniversalConfig::universal_unet()
        };
        bench(
            "U-Net (base 32)",
            cfg,
            unet_macs(32, size as u64, 32),
            size,
            reps,
            peak,
            profiling,
            weights.as_deref(),
        )?;
    }
    if only.as_deref().is_none_or(|o| o == "swin") {
        let cfg = UniversalConfig {
            backbone: BackboneConfig::SwinUnetr(SwinUnetrConfig::universal_model()),
            ..UniversalConfig::universal_swin_unetr()
        };
        bench(
            "Swin UNETR (fs 48)",
            cfg,
            swin_macs(48, size as u64, 32),
            size,
            reps,
            peak,
            profiling,
            weights.as_deref(),
        )?;
    }
    Ok(())
}
