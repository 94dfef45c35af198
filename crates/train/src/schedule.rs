//! Learning-rate schedule: linear warmup, then cosine decay to a floor.
//!
//! `lr(s) = η·(s+1)/W` for `s < W`; afterwards, with `p = (s − W)/(S − W)` clamped to
//! [0, 1], `lr(s) = η_min + ½(η − η_min)(1 + cos(πp))`.

/// Warmup + cosine.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Schedule {
    /// peak `η`
    pub peak: f32,
    /// floor `η_min`
    pub min: f32,
    /// warmup steps `W`
    pub warmup: u64,
    /// total steps `S`
    pub total: u64,
}

impl Schedule {
    /// Learning rate at step `s` (0-based).
    pub fn lr(&self, s: u64) -> f32 {
        if s < self.warmup {
            return self.peak * (s + 1) as f32 / self.warmup as f32;
        }
        let span = self.total.saturating_sub(self.warmup).max(1);
        let p = ((s - self.warmup) as f64 / span as f64).clamp(0.0, 1.0);
        self.min + 0.5 * (self.peak - self.min) * (1.0 + (std::f64::consts::PI * p).cos()) as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine() {
        let s = Schedule { peak: 1.0, min: 0.1, warmup: 10, total: 110 };
        assert!((s.lr(0) - 0.1).abs() < 1e-6);
        assert!((s.lr(9) - 1.0).abs() < 1e-6);
        assert!((s.lr(10) - 1.0).abs() < 1e-6);
        assert!((s.lr(60) - 0.55).abs() < 1e-6);
        assert!((s.lr(110) - 0.1).abs() < 1e-6);
        assert!(s.lr(200) >= 0.1 - 1e-6);
    }
}
