//! Helpers shared by the kernel tests: deterministic random data and finite differences.

/// Deterministic pseudo-random values in [-1, 1) (SplitMix64).
pub fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(1);
    (0..n)
        .map(|_| {
            s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            ((z >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// Panics unless `|a - b| <= tol · max(1, |b|)` elementwise.
pub fn assert_close(a: &[f32], b: &[f32], tol: f32, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths differ");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        let bound = tol * y.abs().max(1.0);
        assert!((x - y).abs() <= bound, "{what}[{i}]: {x} vs {y} (tol {bound})");
    }
}

/// Central finite difference of a scalar function `f` at `x` along every coordinate,
/// in f64 arithmetic around an f32 point.
pub fn numeric_grad(x: &[f32], eps: f32, mut f: impl FnMut(&[f32]) -> f64) -> Vec<f32> {
    let mut xp = x.to_vec();
    (0..x.len())
        .map(|i| {
            let orig = xp[i];
            xp[i] = orig + eps;
            let fp = f(&xp);
            xp[i] = orig - eps;
            let fm = f(&xp);
            xp[i] = orig;
            ((fp - fm) / (2.0 * eps as f64)) as f32
        })
        .collect()
}

/// `Σ a·b` in f64: the scalar loss `⟨y, g⟩` used to check a backward pass against
/// finite differences (its gradient with respect to `y` is `g`).
pub fn dot64(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
}

/// Asserts every path's result has the first (portable) path's bits.
pub fn same_bits(results: &[(crate::isa::Isa, Vec<f32>)], what: &str) {
    let (first, want) = &results[0];
    for (isa, got) in &results[1..] {
        assert_eq!(got.len(), want.len(), "{what}");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert_eq!(g.to_bits(), w.to_bits(), "{what}: element {i} on {isa:?} is {g}, on {first:?} {w}");
        }
    }
}
