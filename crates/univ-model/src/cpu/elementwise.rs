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
