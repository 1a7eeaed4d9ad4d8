//! Timing of the non-convolution operations on full-size shapes (for profiling).
//!
//! `cargo run --release -p univ-model --example op_speed`

use std::time::Instant;

#[global_allocator]
static GLOBAL: univ_model::runtime::MiMalloc = univ_model::runtime::MiMalloc;

use candle_core::{Device, Tensor};
use univ_model::ops;

fn time<T>(name: &str, f: impl Fn() -> T) {
    let _ = f();
    let t = Instant::now();
    let _ = f();
    println!("{name:<40} {:8.3} s", t.elapsed().as_secs_f64());
}

fn main() -> anyhow::Result<()> {
    univ_model::runtime::keep_freed_memory();
    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 1.0, (1, 64, 96, 96, 96), &dev)?;
    let w = Tensor::randn(0f32, 1.0, 64, &dev)?;
    time("batch_norm_batch_stats 64@96^3", || {
        ops::batch_norm_batch_stats(&x, Some(&w), Some(&w), 1e-5).unwrap()
    });
    time("instance_norm 64@96^3", || {
        ops::instance_norm(&x, 1e-5).unwrap()
    });
    time("group_norm(16) 64@96^3", || {
        ops::group_norm(&x, 16, Some(&w), Some(&w), 1e-5).unwrap()
    });
    time("relu 64@96^3", || x.relu().unwrap());
    time("leaky_relu 64@96^3", || ops::leaky_relu(&x, 0.01).unwrap());
    time("max_pool3d_2 64@96^3", || ops::max_pool3d_2(&x).unwrap());
    time("cat 64+64 @96^3", || Tensor::cat(&[&x, &x], 1).unwrap());
    let h = Tensor::randn(0f32, 1.0, (1, 128, 48, 48, 48), &dev)?;
    let wt = Tensor::randn(0f32, 1.0, (128, 128, 2, 2, 2), &dev)?;
    time("conv_transpose 128->128 @48^3", || {
        ops::conv_transpose3d_k_eq_s(&h, &wt).unwrap()
    });
    let f = Tensor::randn(0f32, 1.0, (1, 8, 96, 96, 96), &dev)?;
    let p = Tensor::randn(0f32, 0.1, (1, 32, 153), &dev)?;
    time("dynamic head 32 classes @96^3", || {
        univ_model::ops::dynamic_head(&f, &p).unwrap()
    });
    let w1 = Tensor::randn(0f32, 0.1, (8, 64, 1, 1, 1), &dev)?;
    time("conv 1x1 64->8 @96^3", || {
        ops::conv3d(&x, &w1, [0; 3]).unwrap()
    });
    let x1 = Tensor::randn(0f32, 1.0, (1, 1, 96, 96, 96), &dev)?;
    let wf = Tensor::randn(0f32, 1.0, (32, 1, 3, 3, 3), &dev)?;
    time("conv 1->32 @96^3", || {
        ops::conv3d(&x1, &wf, [1; 3]).unwrap()
    });
    let x32 = Tensor::randn(0f32, 1.0, (1, 32, 96, 96, 96), &dev)?;
    let w32 = Tensor::randn(0f32, 1.0, (64, 32, 3, 3, 3), &dev)?;
    time("conv 32->64 @96^3", || {
        ops::conv3d(&x32, &w32, [1; 3]).unwrap()
    });
    let x192 = Tensor::randn(0f32, 1.0, (1, 192, 96, 96, 96), &dev)?;
    let w192 = Tensor::randn(0f32, 1.0, (64, 192, 3, 3, 3), &dev)?;
    time("conv 192->64 @96^3", || {
        ops::conv3d(&x192, &w192, [1; 3]).unwrap()
    });
    let v = candle_core::Var::from_tensor(&w192)?;
    time("conv 192->64 @96^3 (weight is a Var)", || {
        ops::conv3d(&x192, &v, [1; 3]).unwrap()
    });
    Ok(())
}
