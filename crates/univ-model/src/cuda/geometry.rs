//! The shapes of a stride-1 3-D convolution and of its two gradients, as cuDNN's descriptors
//! take them (plain arithmetic, built and tested without the `cuda` feature).
// Used by the cuDNN bodies only, which need the `cuda` feature.
#![cfg_attr(not(feature = "cuda"), allow(dead_code))]

/// The geometry of one stride-1 convolution: `x (N, C, D, H, W)`, `w (O, C, kd, kh, kw)`,
/// `y (N, O, D', H', W')` with `D' = D + 2·pad − kd + 1`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Geometry {
    /// Input dimensions.
    pub x: [usize; 5],
    /// Weight dimensions.
    pub w: [usize; 5],
    /// Zero padding on both sides of each spatial axis.
    pub pad: [usize; 3],
}

impl Geometry {
    /// The output dimensions.
    pub(crate) fn y(&self) -> [usize; 5] {
        let (x, w, p) = (self.x, self.w, self.pad);
        [
            x[0],
            w[0],
            x[2] + 2 * p[0] + 1 - w[2],
            x[3] + 2 * p[1] + 1 - w[3],
            x[4] + 2 * p[2] + 1 - w[4],
        ]
    }

    /// The geometry of the forward convolution whose input gradient is the correlation of an
    /// output gradient `g` with weight `w` flipped and transposed, padded by `back_pad`: its
    /// input is that correlation's output.
    pub(crate) fn of_input_grad(g: [usize; 5], w: [usize; 5], back_pad: [usize; 3]) -> Self {
        let k = [w[2], w[3], w[4]];
        let pad = [0, 1, 2].map(|a| k[a] - 1 - back_pad[a]);
        let x = [
            g[0],
            w[1],
            g[2] + 2 * back_pad[0] + 1 - k[0],
            g[3] + 2 * back_pad[1] + 1 - k[1],
            g[4] + 2 * back_pad[2] + 1 - k[2],
        ];
        Geometry { x, w, pad }
    }
}

#[cfg(test)]
mod tests {
    use super::Geometry;

    /// The input gradient is the correlation of the output gradient with the flipped,
    /// transposed weight padded by `k − 1 − pad`: the geometry found from it must be the
    /// forward convolution it came from.
    #[test]
    fn the_input_gradient_geometry_is_the_forward_one() {
        for (x, w, pad) in [
            ([2, 3, 10, 9, 8], [5, 3, 3, 3, 3], [1, 1, 1]),
            ([1, 4, 7, 7, 7], [2, 4, 3, 3, 3], [0, 0, 0]),
            ([1, 2, 6, 5, 4], [3, 2, 1, 1, 1], [0, 0, 0]),
            ([1, 1, 9, 9, 9], [4, 1, 5, 3, 1], [2, 0, 0]),
        ] {
            let fwd = Geometry { x, w, pad };
            let y = fwd.y();
            let k = [w[2], w[3], w[4]];
            let back_pad = [0, 1, 2].map(|a| k[a] - 1 - pad[a]);
            assert_eq!(Geometry::of_input_grad(y, w, back_pad), fwd);
        }
        assert_eq!(
            Geometry {
                x: [2, 3, 10, 9, 8],
                w: [5, 3, 3, 3, 3],
                pad: [1, 1, 1]
            }
            .y(),
            [2, 5, 10, 9, 8]
        );
    }
}
