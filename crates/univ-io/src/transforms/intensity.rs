//! Intensity transforms.

use crate::error::{Error, Result};
use crate::volume::Volume;

/// MONAI's `ScaleIntensityRange`: `v' = (v − a_min) / (a_max − a_min) · (b_max − b_min) + b_min`,
/// then clipped to `[b_min, b_max]` when `clip` is set.
///
/// The Universal Model uses `a_min = −175`, `a_max = 250` (HU), `b_min = 0`, `b_max = 1`,
/// `clip = true` ([`ScaleIntensityRange::universal_model`]).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ScaleIntensityRange {
    /// Input value mapped to `b_min`.
    pub a_min: f64,
    /// Input value mapped to `b_max`.
    pub a_max: f64,
    /// Output low end.
    pub b_min: f64,
    /// Output high end.
    pub b_max: f64,
    /// Clip the result to `[b_min, b_max]`.
    pub clip: bool,
}

impl ScaleIntensityRange {
    /// The Universal Model's CT window: −175..250 HU → 0..1, clipped.
    pub fn universal_model() -> Self {
        ScaleIntensityRange {
            a_min: -175.0,
            a_max: 250.0,
            b_min: 0.0,
            b_max: 1.0,
            clip: true,
        }
    }

    /// Checks the parameters.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] when a value is not finite or `a_min == a_max`.
    pub fn validate(&self) -> Result<()> {
        let all = [self.a_min, self.a_max, self.b_min, self.b_max];
        if all.iter().any(|v| !v.is_finite()) {
            return Err(Error::param(
                "a_min/a_max/b_min/b_max",
                format!("{all:?} must be finite"),
            ));
        }
        if self.a_min == self.a_max {
            return Err(Error::param(
                "a_max",
                format!("a_min and a_max are both {}", self.a_min),
            ));
        }
        Ok(())
    }

    /// Scales one value.
    #[inline]
    pub fn scale(&self, v: f32) -> f32 {
        let s = ((f64::from(v) - self.a_min) / (self.a_max - self.a_min))
            * (self.b_max - self.b_min)
            + self.b_min;
        let s = if self.clip {
            s.clamp(self.b_min.min(self.b_max), self.b_max.max(self.b_min))
        } else {
            s
        };
        s as f32
    }

    /// Scales a volume in place.
    ///
    /// # Errors
    /// See [`validate`](Self::validate).
    pub fn apply(&self, mut vol: Volume<f32>) -> Result<Volume<f32>> {
        self.validate()?;
        let this = *self;
        crate::parallel::for_each_slab(vol.data_mut(), 1 << 16, |_, s| {
            for v in s {
                *v = this.scale(*v);
            }
        });
        Ok(vol)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_ends_and_clip() {
        let t = ScaleIntensityRange::universal_model();
        assert_eq!(t.scale(-175.0), 0.0);
        assert_eq!(t.scale(250.0), 1.0);
        assert_eq!(t.scale(-1000.0), 0.0);
        assert_eq!(t.scale(3000.0), 1.0);
        assert!((t.scale(37.5) - 0.5).abs() < 1e-7);
        let unclipped = ScaleIntensityRange { clip: false, ..t };
        assert!((unclipped.scale(675.0) - 2.0).abs() < 1e-6);
        let bad = ScaleIntensityRange { a_max: -175.0, ..t };
        assert!(bad.validate().is_err());
    }
}
