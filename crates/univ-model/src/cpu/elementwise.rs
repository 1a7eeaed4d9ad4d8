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
    /// The activation of one value.
    #[inline(always)]
    pub(crate) fn apply(self, v: f32) -> f32 {
        match self {
            Act::Identity => v,
            Act::Relu => v.max(0.0),
            Act::LeakyRelu(s) => {
                if v >= 0.0 {
                    v
                } else {
                    v * s
                }
            }
        }
    }
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
        .for_each(|(xs, rs)| {
            for (v, r) in xs.iter_mut().zip(rs) {
                *v = act.apply(*v + r);
            }
        });
}
