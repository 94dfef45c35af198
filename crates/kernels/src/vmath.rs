//! Vectorised elementwise math. Hot loops are compiled three times — AVX-512, AVX2+FMA
//! and baseline — and the widest the CPU supports is chosen at run time, so one binary
//! runs everywhere and uses all of this machine's vector width.
//!
//! `exp` is computed as `2^n · e^r` with `n = round(x·log₂e)` and `r = x − n·ln2`
//! (`|r| ≤ ln2/2`), `e^r` by its degree-6 Taylor polynomial: relative error below
//! 2·10⁻⁷, close to f32 rounding, with no table lookups so it vectorises.

/// Defines `pub fn NAME(args) -> ret` whose body is compiled for AVX-512, AVX2 and the
/// baseline, dispatching at run time (within [`crate::isa`]'s cap, which only this
/// crate's tests lower). The three give the same bits: Rust never fuses a multiply and an
/// add on its own, and the reductions keep their lanes explicit (tested).
macro_rules! multiversion {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn imp($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx512dq,avx2,fma")]
                unsafe fn v4($($arg: $ty),*) $(-> $ret)? { imp($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn v3($($arg: $ty),*) $(-> $ret)? { imp($($arg),*) }
                let usable = $crate::isa::usable();
                if usable >= $crate::isa::Isa::Avx512 {
                    // SAFETY: the CPU supports the features v4 was compiled for.
                    return unsafe { v4($($arg),*) };
                }
                if usable >= $crate::isa::Isa::Avx2 {
                    // SAFETY: as above, for v3.
                    return unsafe { v3($($arg),*) };
                }
            }
            imp($($arg),*)
        }
    };
}
pub(crate) use multiversion;

/// `e^x` for `x` in [−87, 88] (clamped outside), branch-free so loops over it vectorise.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    const ROUND: f32 = 12_582_912.0; // 1.5·2²³: adding and subtracting rounds to an integer
    let x = x.max(-87.0).min(88.0);
    // t + 1.5·2²³ holds round(t) in its low mantissa bits: the integer comes straight
    // from the bit pattern, with no float→int conversion to block vectorisation.
    let shifted = x * LOG2E + ROUND;
    let n = shifted - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.0 + r * (1.0 + r * (0.5 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    let n_int = shifted.to_bits().wrapping_sub(ROUND.to_bits());
    let scale = f32::from_bits(n_int.wrapping_add(127) << 23);
    p * scale
}

/// `σ(x) = 1/(1 + e^(−x))`.
#[inline(always)]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

/// Lanes of the manual reductions: float sums and maxima are not reassociated by the
/// compiler, so a reduction vectorises only when written as independent partial results.
const LANES: usize = 16;

#[inline(always)]
fn sum_lanes(x: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            acc[i] += c[i];
        }
    }
    acc.iter().sum::<f32>() + rest.iter().sum::<f32>()
}

multiversion! {
    /// In place `x ← e^(x − m)`; returns `Σ e^(x − m)`.
    pub fn exp_shifted_sum(x: &mut [f32], m: f32) -> f32 {
        for v in x.iter_mut() {
            *v = exp(*v - m);
        }
        sum_lanes(x)
    }
}

multiversion! {
    /// `max(x)` (−∞ for an empty slice).
    pub fn max(x: &[f32]) -> f32 {
        let mut acc = [f32::NEG_INFINITY; LANES];
        let chunks = x.chunks_exact(LANES);
        let rest = chunks.remainder();
        for c in chunks {
            for i in 0..LANES {
                acc[i] = if c[i] > acc[i] { c[i] } else { acc[i] };
            }
        }
        let m = acc.iter().fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a });
        rest.iter().fold(m, |a, &b| if b > a { b } else { a })
    }
}

multiversion! {
    /// In place `x ← a·x`.
    pub fn scale(x: &mut [f32], a: f32) {
        for v in x.iter_mut() {
            *v *= a;
        }
    }
}

multiversion! {
    /// `a ← a + b`.
    pub fn add_assign(a: &mut [f32], b: &[f32]) {
        for (x, y) in a.iter_mut().zip(b) {
            *x += y;
        }
    }
}

multiversion! {
    /// `Σ a·b`.
    pub fn dot(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let (a, b) = (&a[..n], &b[..n]);
        let mut acc = [0.0f32; LANES];
        let full = n / LANES * LANES;
        for (ca, cb) in a[..full].chunks_exact(LANES).zip(b[..full].chunks_exact(LANES)) {
            for i in 0..LANES {
                acc[i] += ca[i] * cb[i];
            }
        }
        let mut s: f32 = acc.iter().sum();
        for i in full..n {
            s += a[i] * b[i];
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_accurate_over_the_softmax_range() {
        let mut worst = 0.0f64;
        let mut x = -80.0f32;
        while x < 80.0 {
            let e = exp(x) as f64;
            let r = (x as f64).exp();
            worst = worst.max(((e - r) / r).abs());
            x += 0.0137;
        }
        assert!(worst < 3e-7, "relative error {worst}");
        assert!(exp(-1000.0) < 1e-37 && exp(-1000.0) >= 0.0);
        let mut v = vec![0.0, 1.0, 2.0];
        let s = exp_shifted_sum(&mut v, 2.0);
        assert!((s - (1.0 + (-1f32).exp() + (-2f32).exp())).abs() < 1e-6);
        let a: Vec<f32> = (0..37).map(|i| i as f32 * 0.5).collect();
        assert!((dot(&a, &a) - a.iter().map(|x| x * x).sum::<f32>()).abs() < 1e-2);
    }

    #[test]
    fn every_vector_path_gives_the_same_bits() {
        use crate::isa::on_every_path;
        use crate::testutil::{rand_vec, same_bits};
        // lengths around and between whole vectors, so tails run too
        for n in [1, 7, 15, 16, 17, 31, 33, 100, 1000] {
            let x: Vec<f32> = rand_vec(n, 11).iter().map(|v| 20.0 * v).collect();
            let y = rand_vec(n, 12);
            let m = x.iter().cloned().fold(f32::MIN, f32::max);
            let runs = on_every_path(|| {
                let mut e = x.clone();
                let sum = exp_shifted_sum(&mut e, m);
                let mut scaled = x.clone();
                scale(&mut scaled, 0.37);
                let mut added = x.clone();
                add_assign(&mut added, &y);
                let mut all = vec![sum, max(&x), dot(&x, &y)];
                all.extend(e.iter().chain(&scaled).chain(&added));
                all
            });
            same_bits(&runs, &format!("elementwise math, n = {n}"));
            let r = &runs[0].1;
            let want_dot: f64 = x.iter().zip(&y).map(|(a, b)| *a as f64 * *b as f64).sum();
            assert!((r[2] as f64 - want_dot).abs() <= 1e-5 * (1.0 + want_dot.abs()) * n as f64, "dot, n = {n}");
            assert_eq!(r[1], m, "max, n = {n}");
        }
    }
}
