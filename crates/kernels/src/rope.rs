//! Rotary position embedding (RoPE), with default, linear and YaRN frequency schedules.
//!
//! A rotary dimension pair `(a, b)` at position `p` with inverse frequency `f_i` becomes
//! `(a·cos θ − b·sin θ, b·cos θ + a·sin θ)` with `θ = p·f_i`, and both `cos` and `sin` are
//! multiplied by an attention factor (YaRN's `mscale`, else 1).
//!
//! Two pairings occur in checkpoints:
//! - [`RopeLayout::Half`] pairs `(i, i + d/2)` (Llama/Qwen/Mixtral "rotate_half");
//! - [`RopeLayout::Interleaved`] pairs `(2i, 2i + 1)` (DeepSeek-V3 `rope_interleave`).
//!   Transformers de-interleaves and then applies the half layout; the rotated vector is
//!   the same up to a fixed permutation of coordinates, applied to both q and k, so every
//!   q·k dot product — the only place the rotated values are used — is identical.

use rayon::prelude::*;

/// How rotary coordinates are paired within a head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeLayout {
    /// pairs `(i, i + d/2)`
    Half,
    /// pairs `(2i, 2i + 1)`
    Interleaved,
}

/// YaRN parameters (Peng et al. 2023, as transformers computes them).
#[derive(Clone, Debug)]
pub struct Yarn {
    /// context extension factor `s`
    pub factor: f64,
    /// `beta_fast` (default 32): rotations above which a dimension extrapolates
    pub beta_fast: f64,
    /// `beta_slow` (default 1): rotations below which a dimension interpolates
    pub beta_slow: f64,
    /// pre-extension context length
    pub original_max_position: f64,
    /// multiplier on cos/sin
    pub attention_factor: f64,
    /// round the correction range outward to whole dimensions
    pub truncate: bool,
}

/// Inverse frequencies `f_i = θ^(−2i/d)` for `i < d/2`.
pub fn default_inv_freq(dim: usize, theta: f64) -> Vec<f64> {
    (0..dim / 2).map(|i| 1.0 / theta.powf((2 * i) as f64 / dim as f64)).collect()
}

/// YaRN inverse frequencies: each dimension blends interpolation `f_i / s` and
/// extrapolation `f_i` by a linear ramp over the dimensions whose wavelength lies between
/// `beta_fast` and `beta_slow` rotations of the original context:
/// `f'_i = f_i/s · (1 − m_i) + f_i · m_i`, `m_i = 1 − clamp((i − lo)/(hi − lo), 0, 1)`,
/// with `corr(r) = d · ln(L / (2π r)) / (2 ln θ)`, `lo = corr(beta_fast)`, `hi = corr(beta_slow)`.
pub fn yarn_inv_freq(dim: usize, theta: f64, y: &Yarn) -> Vec<f64> {
    let corr = |rot: f64| dim as f64 * (y.original_max_position / (rot * 2.0 * std::f64::consts::PI)).ln() / (2.0 * theta.ln());
    let (mut lo, mut hi) = (corr(y.beta_fast), corr(y.beta_slow));
    if y.truncate {
        lo = lo.floor();
        hi = hi.ceil();
    }
    let lo = lo.max(0.0);
    let mut hi = hi.min(dim as f64 - 1.0);
    if lo == hi {
        hi += 0.001;
    }
    default_inv_freq(dim, theta)
        .into_iter()
        .enumerate()
        .map(|(i, f)| {
            let ramp = ((i as f64 - lo) / (hi - lo)).clamp(0.0, 1.0);
            let extrapolate = 1.0 - ramp;
            f / y.factor * (1.0 - extrapolate) + f * extrapolate
        })
        .collect()
}

/// Positions whose `cos`/`sin` are tabulated up front; later ones (up to `max_pos`) are
/// formed when a row needs them, with the same formula and so the same bits. A model
/// whose config allows millions of positions does not allocate for all of them.
pub const TABULATED_POSITIONS: usize = 8192;

/// `cos`/`sin` tables `[min(max_pos, TABULATED_POSITIONS), dim/2]`, attention factor
/// included.
#[derive(Clone, Debug)]
pub struct RopeTable {
    /// rotary dimensions per head
    pub dim: usize,
    /// positions covered
    pub max_pos: usize,
    /// pairing of rotary coordinates
    pub layout: RopeLayout,
    inv_freq: Vec<f64>,
    attention_factor: f64,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

/// `cos(p·fᵢ)·a` and `sin(p·fᵢ)·a` for every frequency `fᵢ`, angles formed in f64.
fn angles(p: usize, inv_freq: &[f64], a: f64, cos: &mut [f32], sin: &mut [f32]) {
    for (i, f) in inv_freq.iter().enumerate() {
        let ang = p as f64 * f;
        cos[i] = (ang.cos() * a) as f32;
        sin[i] = (ang.sin() * a) as f32;
    }
}

impl RopeTable {
    /// Builds the tables from inverse frequencies; angles are formed in f64.
    pub fn new(inv_freq: &[f64], max_pos: usize, attention_factor: f64, layout: RopeLayout) -> Self {
        let half = inv_freq.len();
        let rows = max_pos.min(TABULATED_POSITIONS);
        let mut cos = vec![0.0; rows * half];
        let mut sin = vec![0.0; rows * half];
        for p in 0..rows {
            angles(p, inv_freq, attention_factor, &mut cos[p * half..(p + 1) * half], &mut sin[p * half..(p + 1) * half]);
        }
        RopeTable { dim: 2 * half, max_pos, layout, inv_freq: inv_freq.to_vec(), attention_factor, cos, sin }
    }

    fn pair(&self, i: usize) -> (usize, usize) {
        match self.layout {
            RopeLayout::Half => (i, i + self.dim / 2),
            RopeLayout::Interleaved => (2 * i, 2 * i + 1),
        }
    }

    /// Rotates, in place, the rotary slice `[offset, offset + dim)` of every head of every
    /// row. `x: [N, row_len]` with `heads` heads of `head_stride` elements starting at
    /// column 0; the row `r` is at position `r % seq_len`. `inverse` rotates by `−θ`,
    /// which is the backward (the rotation is orthogonal).
    #[allow(clippy::too_many_arguments)]
    pub fn apply(
        &self,
        x: &mut [f32],
        row_len: usize,
        seq_len: usize,
        heads: usize,
        head_stride: usize,
        offset: usize,
        inverse: bool,
    ) {
        assert!(seq_len <= self.max_pos, "sequence length {seq_len} exceeds RoPE table ({})", self.max_pos);
        self.rotate(x, row_len, &|r| r % seq_len, heads, head_stride, offset, inverse);
    }

    /// [`Self::apply`] forward with each row's position given: row `r` at `positions[r]`
    /// (decoding, where new rows continue a cached prefix).
    pub fn apply_at(&self, x: &mut [f32], row_len: usize, positions: &[usize], heads: usize, head_stride: usize, offset: usize) {
        assert_eq!(x.len(), positions.len() * row_len, "one position per row");
        if let Some(&p) = positions.iter().max() {
            assert!(p < self.max_pos, "position {p} exceeds RoPE table ({})", self.max_pos);
        }
        self.rotate(x, row_len, &|r| positions[r], heads, head_stride, offset, false);
    }

    /// [`Self::apply`] with each row's position given as a `u32` (packed rows, where
    /// positions restart at every document), forward or `inverse`.
    #[allow(clippy::too_many_arguments)]
    pub fn apply_positions(&self, x: &mut [f32], row_len: usize, positions: &[u32], heads: usize, head_stride: usize, offset: usize, inverse: bool) {
        assert_eq!(x.len(), positions.len() * row_len, "one position per row");
        if let Some(&p) = positions.iter().max() {
            assert!((p as usize) < self.max_pos, "position {p} exceeds RoPE table ({})", self.max_pos);
        }
        self.rotate(x, row_len, &|r| positions[r] as usize, heads, head_stride, offset, inverse);
    }

    #[allow(clippy::too_many_arguments)]
    fn rotate(
        &self,
        x: &mut [f32],
        row_len: usize,
        position: &(dyn Fn(usize) -> usize + Sync),
        heads: usize,
        head_stride: usize,
        offset: usize,
        inverse: bool,
    ) {
        let half = self.dim / 2;
        let sign = if inverse { -1.0 } else { 1.0 };
        let tabulated = self.cos.len() / half.max(1);
        x.par_chunks_mut(row_len).enumerate().for_each(|(r, row)| {
            let p = position(r);
            let mut formed;
            let (cos, sin) = if p < tabulated {
                (&self.cos[p * half..(p + 1) * half], &self.sin[p * half..(p + 1) * half])
            } else {
                formed = vec![0.0f32; 2 * half];
                let (c, s) = formed.split_at_mut(half);
                angles(p, &self.inv_freq, self.attention_factor, c, s);
                (&*c, &*s)
            };
            for h in 0..heads {
                let base = h * head_stride + offset;
                for i in 0..half {
                    let (ia, ib) = self.pair(i);
                    let (a, b) = (row[base + ia], row[base + ib]);
                    let (c, s) = (cos[i], sign * sin[i]);
                    row[base + ia] = a * c - b * s;
                    row[base + ib] = b * c + a * s;
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;

    #[test]
    fn inverse_undoes_forward_and_backward_is_transpose() {
        for layout in [RopeLayout::Half, RopeLayout::Interleaved] {
            let t = RopeTable::new(&default_inv_freq(4, 10000.0), 8, 1.0, layout);
            let x = rand_vec(5 * 2 * 6, 1);
            let mut y = x.clone();
            t.apply(&mut y, 12, 5, 2, 6, 2, false);
            assert!(y.iter().zip(&x).any(|(a, b)| (a - b).abs() > 1e-3), "rotation changed nothing");
            let mut z = y.clone();
            t.apply(&mut z, 12, 5, 2, 6, 2, true);
            assert_close(&z, &x, 1e-5, "inverse");
            // <R x, g> = <x, Rᵀ g>
            let g = rand_vec(x.len(), 2);
            let mut gt = g.clone();
            t.apply(&mut gt, 12, 5, 2, 6, 2, true);
            assert!((dot64(&y, &g) - dot64(&x, &gt)).abs() < 1e-4);
        }
    }

    #[test]
    fn positions_past_the_table_rotate_as_tabulated_ones() {
        // Rows at positions T-2, T-1 (tabulated) and T, T+1 (formed on demand), against
        // the rotation written out from its definition.
        let (inv, a) = (default_inv_freq(4, 10000.0), 1.25);
        let t = RopeTable::new(&inv, 1 << 30, a, RopeLayout::Half);
        assert_eq!(t.cos.len(), TABULATED_POSITIONS * 2, "only the prefix is tabulated");
        let seq = TABULATED_POSITIONS + 2;
        let mut x = vec![0.0f32; seq * 4];
        for p in [seq - 4, seq - 3, seq - 2, seq - 1] {
            x[p * 4..p * 4 + 4].copy_from_slice(&[0.3, -0.7, 1.1, 0.5]);
        }
        let orig = x.clone();
        t.apply(&mut x, 4, seq, 1, 4, 0, false);
        for p in [seq - 4, seq - 3, seq - 2, seq - 1] {
            for i in 0..2 {
                let ang = p as f64 * inv[i];
                let (c, s) = ((ang.cos() * a) as f32, (ang.sin() * a) as f32);
                let (xa, xb) = (orig[p * 4 + i], orig[p * 4 + i + 2]);
                assert_eq!(x[p * 4 + i].to_bits(), (xa * c - xb * s).to_bits(), "position {p}");
                assert_eq!(x[p * 4 + i + 2].to_bits(), (xb * c + xa * s).to_bits(), "position {p}");
            }
        }
    }

    #[test]
    fn yarn_blends_between_interpolation_and_extrapolation() {
        let y = Yarn {
            factor: 40.0,
            beta_fast: 32.0,
            beta_slow: 1.0,
            original_max_position: 4096.0,
            attention_factor: 1.0,
            truncate: true,
        };
        let base = default_inv_freq(64, 10000.0);
        let f = yarn_inv_freq(64, 10000.0, &y);
        // High-frequency dimensions extrapolate (unchanged), low ones interpolate (÷ s).
        assert!((f[0] - base[0]).abs() < 1e-12);
        assert!((f[31] - base[31] / 40.0).abs() < 1e-12);
        assert!(f.iter().zip(&base).all(|(a, b)| *a <= *b + 1e-15 && *a >= b / 40.0 - 1e-15));
    }
}
