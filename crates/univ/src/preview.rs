//! `preview.png`: axial, coronal and sagittal slices through the largest organ, with coloured
//! outlines of every class and a legend, drawn with [`univ_io::png::Canvas`].

use std::path::Path;

use univ_io::png::Canvas;
use univ_io::{ClassMask, OrientTransform, Volume};
use univ_model::segment::ClassResult;

/// A 2-D slice: values at (col, row), with the physical size of a pixel along each.
struct Slice<T> {
    w: usize,
    h: usize,
    at: Vec<T>,
    mm: [f64; 2],
}

/// Extracts the three orthogonal slices of an RAS-oriented volume through `c`, displayed in
/// the radiological convention: the patient's right on the image's left, anterior and
/// superior up; the sagittal view has anterior on the left.
fn slices<T: Copy + Default>(
    v: &[T],
    shape: [usize; 3],
    sp: [f64; 3],
    c: [usize; 3],
) -> [Slice<T>; 3] {
    let [nx, ny, nz] = shape;
    let idx = |x: usize, y: usize, z: usize| x + nx * (y + ny * z);
    // RAS x grows towards the patient's right, which the radiological view puts on the
    // image's left: column 0 is the largest x.
    let mut axial = Vec::with_capacity(nx * ny);
    for row in 0..ny {
        for col in 0..nx {
            axial.push(v[idx(nx - 1 - col, ny - 1 - row, c[2])]);
        }
    }
    let mut coronal = Vec::with_capacity(nx * nz);
    for row in 0..nz {
        for col in 0..nx {
            coronal.push(v[idx(nx - 1 - col, c[1], nz - 1 - row)]);
        }
    }
    let mut sagittal = Vec::with_capacity(ny * nz);
    for row in 0..nz {
        for col in 0..ny {
            sagittal.push(v[idx(c[0], ny - 1 - col, nz - 1 - row)]);
        }
    }
    [
        Slice {
            w: nx,
            h: ny,
            at: axial,
            mm: [sp[0], sp[1]],
        },
        Slice {
            w: nx,
            h: nz,
            at: coronal,
            mm: [sp[0], sp[2]],
        },
        Slice {
            w: ny,
            h: nz,
            at: sagittal,
            mm: [sp[1], sp[2]],
        },
    ]
}

/// Writes `preview.png` for a CT and its classes' masks (on the CT's grid), with each class's
/// colour and name, and `banner` (such as a demo model's warning) in red under the legend.
///
/// # Errors
/// I/O errors, or masks on another grid.
pub fn write_preview(
    path: &Path,
    ct: &Volume<f32>,
    classes: &[ClassResult],
    banner: Option<&str>,
) -> std::io::Result<()> {
    let masks: Vec<(usize, &ClassResult, &ClassMask)> =
        classes.iter().map(|c| (c.id(), c, &c.mask)).collect();
    let bad = |e: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, e);
    if let Some((_, _, m)) = masks.iter().find(|(_, _, m)| m.shape() != ct.shape()) {
        return Err(bad(format!(
            "a mask of shape {:?} for a CT of shape {:?}",
            m.shape(),
            ct.shape()
        )));
    }
    let orient = OrientTransform::to_axcodes(ct.affine(), ct.shape(), "RAS")
        .map_err(|e| bad(e.to_string()))?;
    // One class at a time in RAS order (a full-grid copy each, released at once).
    let to_ras = |m: &ClassMask| -> std::io::Result<Volume<u8>> {
        let v = ct.with_data(m.to_u8()).map_err(|e| bad(e.to_string()))?;
        orient.apply(v).map_err(|e| bad(e.to_string()))
    };
    let ct = orient.apply(ct.clone()).map_err(|e| bad(e.to_string()))?;
    let shape = ct.shape();
    let sp = ct.spacing();
    // Centre on the largest organ, else the volume's centre.
    let largest = masks
        .iter()
        .filter(|(_, c, m)| !c.info.is_lesion() && !m.is_empty())
        .max_by_key(|(_, _, m)| m.count());
    let mut centre = shape.map(|s| s / 2);
    let largest_ras = largest
        .map(|(id, _, m)| to_ras(m).map(|r| (*id, r)))
        .transpose()?;
    if let Some((_, m)) = &largest_ras {
        let (mut s, mut n) = ([0f64; 3], 0f64);
        for (i, v) in m.data().iter().enumerate() {
            if *v > 0 {
                let p = m.unravel(i);
                for a in 0..3 {
                    s[a] += p[a] as f64;
                }
                n += 1.0;
            }
        }
        if n > 0.0 {
            centre = [0, 1, 2].map(|a| (s[a] / n).round() as usize);
        }
    }
    let gray: Vec<u8> = ct
        .data()
        .iter()
        .map(|v| (((v + 175.0) / 425.0).clamp(0.0, 1.0) * 255.0) as u8)
        .collect();
    let ct_slices = slices(&gray, shape, sp, centre);
    let present: Vec<&(usize, &ClassResult, &ClassMask)> =
        masks.iter().filter(|(_, _, m)| !m.is_empty()).collect();
    let mut mask_slices: Vec<([u8; 3], [Slice<u8>; 3])> = Vec::new();
    for (id, c, m) in &present {
        let sl = match &largest_ras {
            Some((lid, r)) if lid == id => slices(r.data(), shape, sp, centre),
            _ => slices(to_ras(m)?.data(), shape, sp, centre),
        };
        mask_slices.push((c.info.colour, sl));
    }
    // Each panel is drawn at a common pixel size: the finest spacing, at most 400 px a side.
    let px_mm = sp.iter().cloned().fold(f64::INFINITY, f64::min);
    let size = |s: &Slice<u8>| {
        [
            (s.w as f64 * s.mm[0] / px_mm) as usize,
            (s.h as f64 * s.mm[1] / px_mm) as usize,
        ]
    };
    let sizes: Vec<[usize; 2]> = ct_slices.iter().map(size).collect();
    let fit = sizes
        .iter()
        .map(|s| 400.0 / s[0].max(s[1]) as f64)
        .fold(f64::INFINITY, f64::min)
        .min(2.0);
    let dims: Vec<[usize; 2]> = sizes
        .iter()
        .map(|s| {
            [
                ((s[0] as f64) * fit) as usize,
                ((s[1] as f64) * fit) as usize,
            ]
        })
        .collect();
    let legend_h = 16 + 12 * present.len().div_ceil(3);
    let w = dims.iter().map(|d| d[0]).sum::<usize>() + 40;
    let banner_h = if banner.is_some() { 14 } else { 0 };
    let h = dims.iter().map(|d| d[1]).max().unwrap_or(1) + 30 + legend_h + banner_h;
    let mut cv = Canvas::new(w.max(300), h);
    let mut x0 = 10;
    for (p, title) in ["AXIAL", "CORONAL", "SAGITTAL"].iter().enumerate() {
        let [pw, ph] = dims[p];
        let s = &ct_slices[p];
        let src = |px: usize, py: usize| -> (usize, usize) {
            (
                (px * s.w / pw.max(1)).min(s.w - 1),
                (py * s.h / ph.max(1)).min(s.h - 1),
            )
        };
        for py in 0..ph {
            for px in 0..pw {
                let (sx, sy) = src(px, py);
                let g = s.at[sy * s.w + sx];
                cv.set(x0 + px, 20 + py, [g, g, g]);
            }
        }
        // Outlines: pixels whose class differs from a 4-neighbour's.
        for (col, ms) in &mask_slices {
            let m = &ms[p];
            let on = |px: usize, py: usize| {
                let (sx, sy) = src(px, py);
                m.at[sy * m.w + sx] > 0
            };
            let col = *col;
            for py in 0..ph {
                for px in 0..pw {
                    if !on(px, py) {
                        continue;
                    }
                    let edge = px == 0
                        || py == 0
                        || px + 1 == pw
                        || py + 1 == ph
                        || !on(px - 1, py)
                        || !on(px + 1, py)
                        || !on(px, py - 1)
                        || !on(px, py + 1);
                    if edge {
                        cv.set(x0 + px, 20 + py, col);
                    }
                }
            }
        }
        cv.text(x0, 6, title, [255, 255, 255], 1);
        x0 += pw + 10;
    }
    let top = dims.iter().map(|d| d[1]).max().unwrap_or(1) + 30;
    for (i, (id, c, _)) in present.iter().enumerate() {
        let (cx, cy) = (10 + (i % 3) * ((w.max(300) - 20) / 3), top + (i / 3) * 12);
        for dy in 0..8 {
            for dx in 0..8 {
                cv.set(cx + dx, cy + dy, c.info.colour);
            }
        }
        cv.text(
            cx + 12,
            cy,
            &format!("{id} {}", c.name()),
            [230, 230, 230],
            1,
        );
    }
    if let Some(b) = banner {
        cv.text(10, h - 12, b, [255, 64, 64], 1);
    }
    cv.write_png(path)
}
