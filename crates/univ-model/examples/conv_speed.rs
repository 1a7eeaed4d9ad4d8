//! Throughput of the 3×3×3 convolution kernels (direct implicit GEMM and Winograd F(2,3)) on
//! shapes of the full-size networks.
//!
//! `cargo run --release -p univ-model --example conv_speed`

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use univ_model::ops::conv3d;

fn main() -> anyhow::Result<()> {
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
    ] {
        let x = Tensor::randn(0f32, 1.0, (1, c, s, s, s), &dev)?;
        let w = (Tensor::randn(0f32, 1.0, (o, c, 3, 3, 3), &dev)? * 0.05)?;
        let gflop = 2.0 * (o * c * 27 * s * s * s) as f64 / 1e9;
        // The direct implicit GEMM, then Winograd F(2,3), each after a warm-up run.
        for (name, winograd) in [("direct", false), ("winograd", true)] {
            univ_model::runtime::set_winograd(winograd);
            let _ = conv3d(&x, &w, [1; 3])?;
            let reps = 2;
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
        }
    }
    Ok(())
}
