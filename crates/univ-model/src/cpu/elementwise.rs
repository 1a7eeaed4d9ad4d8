//! Activations applied element by element, and the residual add + activation of Swin UNETR's
//! blocks.

use rayon::prelude::*;

/// The activation applied after the normalisation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Act {
    /// None.
    Identity,
    /// `max(x, 0)`.
    Relu,
    /// `max(x, slope·x)`.
    LeakyRelu(f32),
}

impl Act {
    /// `dy · act'(z)` computed from the output `y = act(z)` (its sign tells the branch).
    #[inline(always)]
    pub(crate) fn grad_from_output(self, y: f32, g: f32) -> f32 {
        match self {
            Act::Identity => g,
            Act::Relu => {
                if y > 0.0 {
                    g
                } else {
                    0.0
                }
            }
            Act::LeakyRelu(s) => {
                if y >= 0.0 {
                    g
                } else {
                    g * s
                }
            }
        }
    }
}

/// `x ← act(x + r)`, element by element, in parallel.
pub(crate) fn add_act_in_place(x: &mut [f32], r: &[f32], act: Act) {
    x.par_chunks_mut(1 << 16)
        .zip(r.par_chunks(1 << 16))
        .for_each(|(xs, rs)| add_act_chunk(xs, rs, act));
}

/// One chunk of [`add_act_in_place`], with the activation chosen outside the loop and the
/// loop compiled for the CPU's best vector instructions.
fn add_act_chunk(x: &mut [f32], r: &[f32], act: Act) {
    #[inline(always)]
    fn body(x: &mut [f32], r: &[f32], act: Act) {
        let it = x.iter_mut().zip(r);
        match act {
            Act::Identity => it.for_each(|(v, r)| *v += r),
            Act::Relu => it.for_each(|(v, r)| *v = (*v + r).max(0.0)),
            Act::LeakyRelu(s) => it.for_each(|(v, r)| {
                let y = *v + r;
                *v = if y >= 0.0 { y } else { y * s };
            }),
        }
    }
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f")]
        fn avx512(x: &mut [f32], r: &[f32], act: Act) {
            body(x, r, act)
        }
        #[target_feature(enable = "avx2")]
        fn avx2(x: &mut [f32], r: &[f32], act: Act) {
            body(x, r, act)
        }
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F.
            return unsafe { avx512(x, r, act) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2.
            return unsafe { avx2(x, r, act) };
        }
    }
    body(x, r, act)
}

/// `erf(x)` for f32 (Abramowitz & Stegun 7.1.26: absolute error below 1.5e-7), written so that
/// the compiler vectorises it (the `exp` is [`crate::cpu::attention::exp_approx`]).
#[inline(always)]
fn erf_approx(x: f32) -> f32 {
    const P: f32 = 0.327_591_1;
    const A: [f32; 5] = [
        0.254_829_6,
        -0.284_496_74,
        1.421_413_8,
        -1.453_152,
        1.061_405_4,
    ];
    let a = x.abs();
    let t = 1.0 / (1.0 + P * a);
    let poly = t * (A[0] + t * (A[1] + t * (A[2] + t * (A[3] + t * A[4]))));
    let e = 1.0 - poly * crate::cpu::attention::exp_approx(-a * a);
    e.copysign(x)
}

/// The exact (erf) GELU, `0.5·x·(1 + erf(x/√2))`, of `x` into `out`, in parallel, compiled for
/// the CPU's best vector instructions (candle's own runs one scalar `erf` at a time on one
/// thread).
pub(crate) fn gelu_into(x: &[f32], out: &mut [f32]) {
    #[inline(always)]
    fn body(x: &[f32], out: &mut [f32]) {
        for (o, v) in out.iter_mut().zip(x) {
            *o = 0.5 * v * (1.0 + erf_approx(v * std::f32::consts::FRAC_1_SQRT_2));
        }
    }
    fn chunk(x: &[f32], out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx512f")]
            fn avx512(x: &[f32], out: &mut [f32]) {
                body(x, out)
            }
            #[target_feature(enable = "avx2,fma")]
            fn avx2(x: &[f32], out: &mut [f32]) {
                body(x, out)
            }
            if std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: the CPU has AVX-512F.
                return unsafe { avx512(x, out) };
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                // SAFETY: the CPU has AVX2 and FMA.
                return unsafe { avx2(x, out) };
            }
        }
        body(x, out)
    }
    assert_eq!(x.len(), out.len());
    out.par_chunks_mut(1 << 15)
        .zip(x.par_chunks(1 << 15))
        .for_each(|(o, x)| chunk(x, o));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against candle's scalar `gelu_erf` on a grid from -8 to 8 (and the extremes).
    #[test]
    fn gelu_matches_candle_erf_gelu() {
        let mut x: Vec<f32> = (0..16001).map(|i| -8.0 + i as f32 * 0.001).collect();
        x.extend([0.0, -0.0, 30.0, -30.0, 1e-30, -1e-30, 1e4, -1e4]);
        let want = candle_core::Tensor::new(x.as_slice(), &candle_core::Device::Cpu)
            .and_then(|t| t.gelu_erf())
            .and_then(|t| t.to_vec1::<f32>())
            .expect("candle gelu");
        let mut got = vec![f32::NAN; x.len()];
        gelu_into(&x, &mut got);
        for ((x, g), w) in x.iter().zip(&got).zip(&want) {
            let tol = 3e-7 * x.abs().max(1.0);
            assert!((g - w).abs() <= tol, "gelu({x}) = {g}, candle {w}");
        }
    }
}
