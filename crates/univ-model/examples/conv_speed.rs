//! Throughput of the 3×3×3 convolution kernels (direct implicit GEMM and Winograd F(2,3)) on
//! shapes of the full-size networks.
//!
//! `cargo run --release -p univ-model --example conv_speed [-- --precision bf16] [--reps N]
//! [--shape I] [--profile]`: `--shape` runs the I-th shape of the list alone, `--profile`
//! prints the time of each stage (stages inside parallel work count thread-seconds).
//!
//! With `--precision bf16` it times the bf16 kernel that `univ` picks (or the one
//! `UNIV_BF16_KERNEL` names) instead, against the machine's bf16 dot-product peak where it
//! has AVX512-BF16 (the measured FMA peak times the `VDPBF16PS`/FMA ratio).

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use univ_model::ops::conv3d;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let get = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let reps: usize = get("--reps").map(|v| v.parse()).transpose()?.unwrap_or(2);
    let bf16 = match get("--precision") {
        Some(p) => {
            let precision: univ_model::runtime::Precision = p.parse()?;
            let kernel = univ_model::runtime::set_precision(precision)?;
            if precision == univ_model::runtime::Precision::Bf16 && kernel.is_none() {
                anyhow::bail!(
                    "no bf16 kernel is chosen here ({}); UNIV_BF16_KERNEL forces one",
                    univ_model::runtime::bf16_fallback_reason()
                );
            }
            kernel
        }
        None => None,
    };
    let profile = args.iter().any(|a| a == "--profile");
    univ_model::runtime::set_profiling(profile);
    let only: Option<usize> = get("--shape").map(|v| v.parse()).transpose()?;
    let dev = Device::Cpu;
    for (c, o, s) in [
        (64usize, 64usize, 96usize),
        (192, 64, 96),
        (48, 48, 96),
        (96, 48, 96),
        (384, 128, 48),
        (256, 256, 24),
        (768, 256, 24),
        (256, 512, 12),
        (512, 512, 12),
    ]
    .into_iter()
    .enumerate()
    .filter(|(i, _)| only.is_none_or(|o| o == *i))
    .map(|(_, shape)| shape)
    {
        let x = Tensor::randn(0f32, 1.0, (1, c, s, s, s), &dev)?;
        let w = (Tensor::randn(0f32, 1.0, (o, c, 3, 3, 3), &dev)? * 0.05)?;
        let gflop = 2.0 * (o * c * 27 * s * s * s) as f64 / 1e9;
        // The direct implicit GEMM, then Winograd F(2,3) where it applies, each after a
        // warm-up run (in bf16: the bf16 kernel's direct and Winograd paths).
        let modes: &[(&str, bool)] = if bf16.is_some() {
            &[("bf16", false), ("bf16 win", true)]
        } else {
            &[("direct", false), ("winograd", true)]
        };
        for &(name, winograd) in modes {
            univ_model::runtime::set_winograd(winograd);
            let _ = conv3d(&x, &w, [1; 3])?;
            univ_model::runtime::reset_profile();
            let t = Instant::now();
            for _ in 0..reps {
                let y = conv3d(&x, &w, [1; 3])?;
                assert_eq!(y.dtype(), DType::F32);
            }
            let secs = t.elapsed().as_secs_f64() / reps as f64;
            println!(
                "conv3d {c:>3}->{o:<3} @ {s}^3 {name:<8}: {secs:6.3} s, {gflop:7.1} GFLOP \
                 (direct count), {:6.1} GFLOP/s equivalent",
                gflop / secs
            );
            if profile {
                for (stage, s, n) in univ_model::runtime::profile() {
                    println!(
                        "    {stage:<40} {:8.3} s per run ({n} calls)",
                        s / reps as f64
                    );
                }
            }
        }
    }
    Ok(())
}
