//! Affine geometry: 4×4 voxel-to-world matrices, orientation codes and the small linear algebra
//! that MONAI (through nibabel) uses to reorient and resample volumes.
//!
//! An [`Affine`] maps a voxel index `(i, j, k, 1)` to world coordinates `(x, y, z, 1)` in
//! millimetres, in the NIfTI/nibabel RAS+ world convention (x grows towards the patient's Right,
//! y towards Anterior, z towards Superior). It is stored row-major: `a[row][col]`.

/// A 4×4 voxel-to-world matrix, row-major, in millimetres (RAS+ world).
pub type Affine = [[f64; 4]; 4];

/// A 3×3 matrix, row-major.
pub type Mat3 = [[f64; 3]; 3];

/// The identity affine.
pub const IDENTITY: Affine = [
    [1.0, 0.0, 0.0, 0.0],
    [0.0, 1.0, 0.0, 0.0],
    [0.0, 0.0, 1.0, 0.0],
    [0.0, 0.0, 0.0, 1.0],
];

/// Matrix product `a · b` of two affines.
pub fn matmul(a: &Affine, b: &Affine) -> Affine {
    let mut out = [[0.0; 4]; 4];
    for (r, row) in out.iter_mut().enumerate() {
        for (c, v) in row.iter_mut().enumerate() {
            *v = (0..4).map(|k| a[r][k] * b[k][c]).sum();
        }
    }
    out
}

/// Applies an affine to a point.
pub fn apply(a: &Affine, p: [f64; 3]) -> [f64; 3] {
    let mut out = [0.0; 3];
    for (r, v) in out.iter_mut().enumerate() {
        *v = a[r][0] * p[0] + a[r][1] * p[1] + a[r][2] * p[2] + a[r][3];
    }
    out
}

/// The upper-left 3×3 block (rotation, zoom and shear).
pub fn linear_part(a: &Affine) -> Mat3 {
    [
        [a[0][0], a[0][1], a[0][2]],
        [a[1][0], a[1][1], a[1][2]],
        [a[2][0], a[2][1], a[2][2]],
    ]
}

/// Builds an affine from a 3×3 block and a translation.
pub fn from_parts(m: &Mat3, t: [f64; 3]) -> Affine {
    [
        [m[0][0], m[0][1], m[0][2], t[0]],
        [m[1][0], m[1][1], m[1][2], t[1]],
        [m[2][0], m[2][1], m[2][2], t[2]],
        [0.0, 0.0, 0.0, 1.0],
    ]
}

/// Determinant of a 3×3 matrix.
pub fn det3(m: &Mat3) -> f64 {
    m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1])
        - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
        + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0])
}

/// Inverse of a 3×3 matrix, `None` when singular.
pub fn inv3(m: &Mat3) -> Option<Mat3> {
    let d = det3(m);
    if d == 0.0 || !d.is_finite() {
        return None;
    }
    let c =
        |r0: usize, r1: usize, c0: usize, c1: usize| m[r0][c0] * m[r1][c1] - m[r0][c1] * m[r1][c0];
    let adj = [
        [c(1, 2, 1, 2), -c(0, 2, 1, 2), c(0, 1, 1, 2)],
        [-c(1, 2, 0, 2), c(0, 2, 0, 2), -c(0, 1, 0, 2)],
        [c(1, 2, 0, 1), -c(0, 2, 0, 1), c(0, 1, 0, 1)],
    ];
    let mut out = [[0.0; 3]; 3];
    for r in 0..3 {
        for col in 0..3 {
            out[r][col] = adj[r][col] / d;
        }
    }
    Some(out)
}

fn mul3(a: &Mat3, b: &Mat3) -> Mat3 {
    let mut out = [[0.0; 3]; 3];
    for r in 0..3 {
        for c in 0..3 {
            out[r][c] = (0..3).map(|k| a[r][k] * b[k][c]).sum();
        }
    }
    out
}

fn transpose3(a: &Mat3) -> Mat3 {
    let mut out = [[0.0; 3]; 3];
    for r in 0..3 {
        for c in 0..3 {
            out[r][c] = a[c][r];
        }
    }
    out
}

/// Inverse of an affine (bottom row `0 0 0 1`), `None` when singular.
pub fn inverse(a: &Affine) -> Option<Affine> {
    let m = inv3(&linear_part(a))?;
    let t = [a[0][3], a[1][3], a[2][3]];
    let mut nt = [0.0; 3];
    for r in 0..3 {
        nt[r] = -(m[r][0] * t[0] + m[r][1] * t[1] + m[r][2] * t[2]);
    }
    Some(from_parts(&m, nt))
}

/// Voxel spacing: the Euclidean norm of each column of the 3×3 block (as MONAI's
/// `affine_to_spacing` and nibabel's zooms computed from an affine).
pub fn spacing(a: &Affine) -> [f64; 3] {
    let mut out = [0.0; 3];
    for (c, v) in out.iter_mut().enumerate() {
        *v = (0..3).map(|r| a[r][c] * a[r][c]).sum::<f64>().sqrt();
    }
    out
}

/// The orthogonal polar factor of a non-singular 3×3 matrix (the `U·Vᵀ` of its SVD), found by
/// Newton's iteration `X ← (X + X⁻ᵀ)/2`.
pub fn polar_orthogonal(m: &Mat3) -> Option<Mat3> {
    let mut x = *m;
    for _ in 0..100 {
        let inv_t = transpose3(&inv3(&x)?);
        let mut next = [[0.0; 3]; 3];
        let mut delta: f64 = 0.0;
        for r in 0..3 {
            for c in 0..3 {
                next[r][c] = 0.5 * (x[r][c] + inv_t[r][c]);
                delta = delta.max((next[r][c] - x[r][c]).abs());
            }
        }
        x = next;
        if delta < 1e-15 {
            break;
        }
    }
    Some(x)
}

/// One voxel axis's direction in the world: which world axis (0 = x L→R, 1 = y P→A,
/// 2 = z I→S) it follows most closely, and whether it runs against that axis.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AxisOrientation {
    /// World axis index: 0 (x), 1 (y) or 2 (z).
    pub world_axis: usize,
    /// `true` when the voxel axis runs towards Left, Posterior or Inferior.
    pub flipped: bool,
}

impl AxisOrientation {
    /// The axis code letter: the direction the voxel index grows towards (`R`, `L`, `A`, `P`,
    /// `S` or `I`).
    pub fn code(self) -> char {
        const CODES: [[char; 2]; 3] = [['R', 'L'], ['A', 'P'], ['S', 'I']];
        CODES[self.world_axis][usize::from(self.flipped)]
    }

    /// Parses one axis code letter (case-insensitive).
    pub fn from_code(c: char) -> Option<Self> {
        let (world_axis, flipped) = match c.to_ascii_uppercase() {
            'R' => (0, false),
            'L' => (0, true),
            'A' => (1, false),
            'P' => (1, true),
            'S' => (2, false),
            'I' => (2, true),
            _ => return None,
        };
        Some(AxisOrientation {
            world_axis,
            flipped,
        })
    }
}

/// The orientation of the three voxel axes of an affine, with nibabel's `io_orientation`
/// semantics: the 3×3 block is normalised by the voxel sizes and replaced by its closest
/// orthogonal matrix; then, voxel axis by voxel axis, the world axis with the largest absolute
/// cosine is chosen and removed from the candidates.
///
/// Returns `None` for a singular or non-finite affine.
pub fn io_orientation(a: &Affine) -> Option<[AxisOrientation; 3]> {
    let zooms = spacing(a);
    if zooms.iter().any(|z| *z == 0.0 || !z.is_finite()) {
        return None;
    }
    let mut rs = linear_part(a);
    for row in rs.iter_mut() {
        for c in 0..3 {
            row[c] /= zooms[c];
        }
    }
    let mut r = polar_orthogonal(&rs)?;
    let mut out = [AxisOrientation {
        world_axis: 0,
        flipped: false,
    }; 3];
    for (in_ax, slot) in out.iter_mut().enumerate() {
        let mut best = 0;
        for w in 1..3 {
            if r[w][in_ax].abs() > r[best][in_ax].abs() {
                best = w;
            }
        }
        if r[best][in_ax] == 0.0 {
            return None;
        }
        *slot = AxisOrientation {
            world_axis: best,
            flipped: r[best][in_ax] < 0.0,
        };
        r[best] = [0.0; 3];
    }
    Some(out)
}

/// The three-letter orientation code of an affine, as nibabel's `aff2axcodes` gives it
/// (for example `"RAS"` or `"LPS"`); `"???"` for a degenerate affine.
pub fn axcodes(a: &Affine) -> String {
    match io_orientation(a) {
        Some(o) => o.iter().map(|x| x.code()).collect(),
        None => "???".to_string(),
    }
}

/// Parses a three-letter orientation code such as `"RAS"`; each world axis must appear once.
pub fn parse_axcodes(codes: &str) -> Option<[AxisOrientation; 3]> {
    let chars: Vec<char> = codes.chars().collect();
    if chars.len() != 3 {
        return None;
    }
    let mut out = [AxisOrientation {
        world_axis: 0,
        flipped: false,
    }; 3];
    let mut seen = [false; 3];
    for (slot, c) in out.iter_mut().zip(chars) {
        let o = AxisOrientation::from_code(c)?;
        if seen[o.world_axis] {
            return None;
        }
        seen[o.world_axis] = true;
        *slot = o;
    }
    Some(out)
}

/// MONAI's `zoom_affine(affine, pixdim, diagonal=False)`: keeps the direction of the voxel axes
/// (the orthogonal factor `Q` of the QR decomposition `RZS = Q·Z` computed through a Cholesky
/// factorisation, as MONAI does) and sets the voxel sizes to `pixdim`. The translation is zero;
/// a zero entry of `pixdim` keeps... nothing: MONAI replaces it by 1, and so do we.
pub fn zoom_affine(a: &Affine, pixdim: [f64; 3]) -> Option<Affine> {
    let rzs = linear_part(a);
    // G = RZSᵀ·RZS = Zᵀ·Z with Z = Lᵀ upper triangular (L: the lower Cholesky factor of G).
    let g = mul3(&transpose3(&rzs), &rzs);
    let l = cholesky3(&g)?;
    let z = transpose3(&l);
    let q = mul3(&rzs, &inv3(&z)?);
    let mut out = [[0.0; 3]; 3];
    for r in 0..3 {
        for c in 0..3 {
            // sign(diag(Z)) is always +1 for a Cholesky factor.
            let s = if pixdim[c] == 0.0 {
                1.0
            } else {
                pixdim[c].abs()
            };
            out[r][c] = q[r][c] * s;
        }
    }
    Some(from_parts(&out, [0.0; 3]))
}

fn cholesky3(g: &Mat3) -> Option<Mat3> {
    let mut l = [[0.0; 3]; 3];
    for i in 0..3 {
        for j in 0..=i {
            let s: f64 = (0..j).map(|k| l[i][k] * l[j][k]).sum();
            if i == j {
                let d = g[i][i] - s;
                if d <= 0.0 || !d.is_finite() {
                    return None;
                }
                l[i][j] = d.sqrt();
            } else {
                l[i][j] = (g[i][j] - s) / l[j][j];
            }
        }
    }
    Some(l)
}

/// MONAI's `compute_shape_offset`: the shape of the output grid that covers the input grid's
/// voxel centres, and the world position of its first voxel (the input corner that is minimal
/// along every output axis, or the first corner when none is).
///
/// `out_linear` is the output affine without translation.
pub fn compute_shape_offset(
    shape: [usize; 3],
    in_affine: &Affine,
    out_linear: &Affine,
) -> Option<([usize; 3], [f64; 3])> {
    let inv = inverse(out_linear)?;
    let mut corners = Vec::with_capacity(8);
    // numpy's meshgrid(..., indexing="ij") order: last axis fastest.
    for a in [0.0, shape[0] as f64 - 1.0] {
        for b in [0.0, shape[1] as f64 - 1.0] {
            for c in [0.0, shape[2] as f64 - 1.0] {
                corners.push(apply(in_affine, [a, b, c]));
            }
        }
    }
    let out_coords: Vec<[f64; 3]> = corners.iter().map(|p| apply(&inv, *p)).collect();
    let mut out_shape = [0usize; 3];
    for (ax, s) in out_shape.iter_mut().enumerate() {
        let lo = out_coords
            .iter()
            .map(|p| p[ax])
            .fold(f64::INFINITY, f64::min);
        let hi = out_coords
            .iter()
            .map(|p| p[ax])
            .fold(f64::NEG_INFINITY, f64::max);
        let v = (hi - lo + 1.0).round_ties_even();
        if !v.is_finite() || v < 1.0 {
            return None;
        }
        *s = v as usize;
    }
    // The linear part alone, as MONAI's `mat @ corners[:-1]`.
    let lin = linear_part(&inv);
    let lin_apply = |p: &[f64; 3]| -> [f64; 3] {
        let mut o = [0.0; 3];
        for r in 0..3 {
            o[r] = lin[r][0] * p[0] + lin[r][1] * p[1] + lin[r][2] * p[2];
        }
        o
    };
    let projected: Vec<[f64; 3]> = corners.iter().map(lin_apply).collect();
    let mut k = 0;
    for (i, pi) in projected.iter().enumerate() {
        let minimal = (0..3).all(|ax| {
            let m = projected
                .iter()
                .map(|p| p[ax] - pi[ax])
                .fold(f64::INFINITY, f64::min);
            m.abs() <= 1e-8
        });
        if minimal {
            k = i;
            break;
        }
    }
    Some((out_shape, corners[k]))
}

/// Decomposes an affine into a NIfTI quaternion (`quatern_b, c, d`), offsets, voxel sizes and
/// `qfac`, as nibabel's `set_qform` does (the 3×3 block is orthogonalised first).
///
/// Returns `None` for a degenerate affine.
pub fn affine_to_quaternion(a: &Affine) -> Option<QuaternionForm> {
    let mut zooms = spacing(a);
    if zooms.iter().any(|z| *z == 0.0 || !z.is_finite()) {
        return None;
    }
    let mut r = linear_part(a);
    for row in r.iter_mut() {
        for c in 0..3 {
            row[c] /= zooms[c];
        }
    }
    let mut qfac = 1.0;
    if det3(&r) < 0.0 {
        qfac = -1.0;
        for row in r.iter_mut() {
            row[2] = -row[2];
        }
    }
    let r = polar_orthogonal(&r)?;
    // Shepperd's method.
    let trace = r[0][0] + r[1][1] + r[2][2];
    let (w, x, y, z);
    if trace > 0.0 {
        let s = (trace + 1.0).sqrt() * 2.0;
        w = 0.25 * s;
        x = (r[2][1] - r[1][2]) / s;
        y = (r[0][2] - r[2][0]) / s;
        z = (r[1][0] - r[0][1]) / s;
    } else if r[0][0] > r[1][1] && r[0][0] > r[2][2] {
        let s = (1.0 + r[0][0] - r[1][1] - r[2][2]).sqrt() * 2.0;
        w = (r[2][1] - r[1][2]) / s;
        x = 0.25 * s;
        y = (r[0][1] + r[1][0]) / s;
        z = (r[0][2] + r[2][0]) / s;
    } else if r[1][1] > r[2][2] {
        let s = (1.0 + r[1][1] - r[0][0] - r[2][2]).sqrt() * 2.0;
        w = (r[0][2] - r[2][0]) / s;
        x = (r[0][1] + r[1][0]) / s;
        y = 0.25 * s;
        z = (r[1][2] + r[2][1]) / s;
    } else {
        let s = (1.0 + r[2][2] - r[0][0] - r[1][1]).sqrt() * 2.0;
        w = (r[1][0] - r[0][1]) / s;
        x = (r[0][2] + r[2][0]) / s;
        y = (r[1][2] + r[2][1]) / s;
        z = 0.25 * s;
    }
    let sign = if w < 0.0 { -1.0 } else { 1.0 };
    for z in zooms.iter_mut() {
        *z = z.abs();
    }
    Some(QuaternionForm {
        b: sign * x,
        c: sign * y,
        d: sign * z,
        offset: [a[0][3], a[1][3], a[2][3]],
        pixdim: zooms,
        qfac,
    })
}

/// The NIfTI qform parameters of an affine.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QuaternionForm {
    /// `quatern_b`.
    pub b: f64,
    /// `quatern_c`.
    pub c: f64,
    /// `quatern_d`.
    pub d: f64,
    /// `qoffset_x, y, z`.
    pub offset: [f64; 3],
    /// `pixdim[1..4]`.
    pub pixdim: [f64; 3],
    /// `pixdim[0]`: −1 for a left-handed voxel frame, else 1.
    pub qfac: f64,
}

/// The affine of a NIfTI qform (nibabel's `get_qform`): rotation from the quaternion
/// (`a = √(1 − b² − c² − d²)`, clamped at 0), scaled by `pixdim` with the third column negated
/// when `qfac` is −1, plus the offsets.
pub fn quaternion_to_affine(q: &QuaternionForm) -> Affine {
    let (b, c, d) = (q.b, q.c, q.d);
    let a = (1.0 - (b * b + c * c + d * d)).max(0.0).sqrt();
    let r = [
        [
            a * a + b * b - c * c - d * d,
            2.0 * (b * c - a * d),
            2.0 * (b * d + a * c),
        ],
        [
            2.0 * (b * c + a * d),
            a * a + c * c - b * b - d * d,
            2.0 * (c * d - a * b),
        ],
        [
            2.0 * (b * d - a * c),
            2.0 * (c * d + a * b),
            a * a + d * d - b * b - c * c,
        ],
    ];
    let mut z = q.pixdim;
    if q.qfac < 0.0 {
        z[2] = -z[2];
    }
    let mut m = [[0.0; 3]; 3];
    for row in 0..3 {
        for col in 0..3 {
            m[row][col] = r[row][col] * z[col];
        }
    }
    from_parts(&m, q.offset)
}

/// Largest absolute difference between two affines.
pub fn max_abs_diff(a: &Affine, b: &Affine) -> f64 {
    let mut m: f64 = 0.0;
    for r in 0..4 {
        for c in 0..4 {
            m = m.max((a[r][c] - b[r][c]).abs());
        }
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inverse_round_trip() {
        let a = [
            [0.0, -2.0, 0.1, 10.0],
            [1.5, 0.0, 0.0, -3.0],
            [0.0, 0.2, 3.0, 7.0],
            [0.0, 0.0, 0.0, 1.0],
        ];
        let i = inverse(&a).unwrap();
        assert!(max_abs_diff(&matmul(&a, &i), &IDENTITY) < 1e-12);
    }

    #[test]
    fn axcodes_of_common_frames() {
        let lps = [
            [-0.8, 0.0, 0.0, 0.0],
            [0.0, -0.8, 0.0, 0.0],
            [0.0, 0.0, 2.0, 0.0],
            [0.0, 0.0, 0.0, 1.0],
        ];
        assert_eq!(axcodes(&lps), "LPS");
        // A permuted frame: voxel axis 0 runs along world z.
        let sal = [
            [0.0, 0.0, -1.0, 0.0],
            [0.0, 1.0, 0.0, 0.0],
            [1.0, 0.0, 0.0, 0.0],
            [0.0, 0.0, 0.0, 1.0],
        ];
        assert_eq!(axcodes(&sal), "SAL");
        assert_eq!(parse_axcodes("ras").unwrap()[2].code(), 'S');
        assert!(parse_axcodes("RRS").is_none());
        assert!(parse_axcodes("RA").is_none());
    }

    #[test]
    fn quaternion_round_trip_oblique() {
        let ang: f64 = 0.3;
        let (s, c) = ang.sin_cos();
        // A rotation about z, zooms (0.7, 0.8, 2.5), left-handed (x flipped).
        let a = [
            [-0.7 * c, -0.8 * s, 0.0, 12.0],
            [-0.7 * s, 0.8 * c, 0.0, -4.0],
            [0.0, 0.0, 2.5, 90.0],
            [0.0, 0.0, 0.0, 1.0],
        ];
        let q = affine_to_quaternion(&a).unwrap();
        // Near-180° rotations lose precision in `a = sqrt(1 - b² - c² - d²)`, as in nibabel.
        assert!(max_abs_diff(&quaternion_to_affine(&q), &a) < 1e-6);
    }

    #[test]
    fn zoom_affine_keeps_directions() {
        let a = [
            [-3.0, 0.0, 0.0, 5.0],
            [0.0, 0.0, 2.0, 1.0],
            [0.0, 1.0, 0.0, 2.0],
            [0.0, 0.0, 0.0, 1.0],
        ];
        let z = zoom_affine(&a, [1.5, 1.5, 1.5]).unwrap();
        let want = [
            [-1.5, 0.0, 0.0, 0.0],
            [0.0, 0.0, 1.5, 0.0],
            [0.0, 1.5, 0.0, 0.0],
            [0.0, 0.0, 0.0, 1.0],
        ];
        assert!(max_abs_diff(&z, &want) < 1e-12);
    }
}
