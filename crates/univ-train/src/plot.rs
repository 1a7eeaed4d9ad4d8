//! The training curves picture.

use univ_io::png::Canvas;

const W: usize = 900;
const H: usize = 320;
const PANEL: usize = 420;

fn panel(
    cv: &mut Canvas,
    x0: usize,
    title: &str,
    points: &[(u64, f64)],
    colour: [u8; 3],
    smooth: bool,
    fixed: Option<(f64, f64)>,
) {
    let (top, bottom) = (30usize, H - 30);
    let (left, right) = (x0 + 50, x0 + PANEL);
    let axis = [160, 160, 160];
    cv.line(
        (left as i64, top as i64),
        (left as i64, bottom as i64),
        axis,
    );
    cv.line(
        (left as i64, bottom as i64),
        (right as i64, bottom as i64),
        axis,
    );
    cv.text(x0 + 50, 10, title, [255, 255, 255], 1);
    let pts: Vec<(u64, f64)> = points
        .iter()
        .copied()
        .filter(|(_, v)| v.is_finite())
        .collect();
    if pts.is_empty() {
        cv.text(left + 10, top + 20, "NO DATA YET", [200, 200, 200], 1);
        return;
    }
    let xmax = pts.iter().map(|p| p.0).max().unwrap_or(1).max(1) as f64;
    let xmin = pts.iter().map(|p| p.0).min().unwrap_or(0) as f64;
    let mut ymin = pts.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
    let mut ymax = pts.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
    if let Some((lo, hi)) = fixed {
        (ymin, ymax) = (lo, hi);
    }
    if ymax - ymin < 1e-9 {
        ymin -= 0.5;
        ymax += 0.5;
    }
    cv.text(x0, top, &format!("{ymax:.3}"), axis, 1);
    cv.text(x0, bottom - 7, &format!("{ymin:.3}"), axis, 1);
    cv.text(left, bottom + 8, &format!("{}", xmin as u64), axis, 1);
    cv.text(right - 40, bottom + 8, &format!("{}", xmax as u64), axis, 1);
    let px = |x: f64| {
        let span = (xmax - xmin).max(1.0);
        left as i64 + ((x - xmin) / span * (right - left) as f64) as i64
    };
    let py = |y: f64| bottom as i64 - ((y - ymin) / (ymax - ymin) * (bottom - top) as f64) as i64;
    let dim = [colour[0] / 3, colour[1] / 3, colour[2] / 3];
    let raw_colour = if smooth { dim } else { colour };
    for w in pts.windows(2) {
        cv.line(
            (px(w[0].0 as f64), py(w[0].1)),
            (px(w[1].0 as f64), py(w[1].1)),
            raw_colour,
        );
    }
    if !smooth {
        // Markers: a 5×5 square per point.
        for p in &pts {
            let (cx, cy) = (px(p.0 as f64), py(p.1));
            for dy in -2..=2 {
                for dx in -2..=2 {
                    if cx + dx >= 0 && cy + dy >= 0 {
                        cv.set((cx + dx) as usize, (cy + dy) as usize, colour);
                    }
                }
            }
        }
    }
    if smooth && pts.len() > 2 {
        let k = (pts.len() / 20).max(2);
        let avg: Vec<(u64, f64)> = (0..pts.len())
            .map(|i| {
                let lo = i.saturating_sub(k);
                let s: f64 = pts[lo..=i].iter().map(|p| p.1).sum();
                (pts[i].0, s / (i + 1 - lo) as f64)
            })
            .collect();
        for w in avg.windows(2) {
            cv.line(
                (px(w[0].0 as f64), py(w[0].1)),
                (px(w[1].0 as f64), py(w[1].1)),
                colour,
            );
        }
    }
}

/// Two panels: training loss per step (raw and a moving average) and validation mean Dice.
pub fn curves(loss: &[(u64, f32)], val: &[(u64, f64)]) -> Canvas {
    let mut cv = Canvas::new(W, H);
    let l: Vec<(u64, f64)> = loss.iter().map(|(s, v)| (*s, *v as f64)).collect();
    panel(
        &mut cv,
        10,
        "TRAINING LOSS (BCE + DICE) PER STEP",
        &l,
        [255, 160, 40],
        true,
        None,
    );
    panel(
        &mut cv,
        470,
        "VALIDATION MEAN DICE",
        val,
        [80, 200, 255],
        false,
        Some((0.0, 1.0)),
    );
    cv
}

#[cfg(test)]
mod tests {
    #[test]
    fn curves_draw_both_panels() {
        let loss: Vec<(u64, f32)> = (1..50).map(|s| (s, 2.0 / s as f32)).collect();
        let cv = super::curves(&loss, &[(10, 0.2), (40, 0.6)]);
        let has = |c: [u8; 3]| cv.px.contains(&c);
        assert!(has([255, 160, 40]), "loss curve");
        assert!(has([80, 200, 255]), "validation markers");
        assert!(cv.encode_png().unwrap().starts_with(b"\x89PNG"));
    }
}
