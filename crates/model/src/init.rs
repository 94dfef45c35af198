//! Fresh weights for a model: each tensor from its [`Init`], from a seeded generator so a
//! seed always gives the same model.

use crate::params::{Init, ParamLayout};

/// A small, fast, seedable generator (SplitMix64) with Gaussian samples (Box–Muller).
#[derive(Clone, Debug)]
pub struct Rng {
    state: u64,
}

impl Rng {
    /// Generator from a seed.
    pub fn new(seed: u64) -> Self {
        Rng { state: seed ^ 0x5DEE_CE66_D1CE_4E5B }
    }
    /// The raw state, for checkpointing.
    pub fn state(&self) -> u64 {
        self.state
    }
    /// Restores a generator from [`Rng::state`].
    pub fn from_state(state: u64) -> Self {
        Rng { state }
    }
    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Uniform integer in `lo..=hi`.
    pub fn range(&mut self, lo: i64, hi: i64) -> i64 {
        lo + (self.next_u64() % (hi - lo + 1) as u64) as i64
    }
    /// Standard normal.
    pub fn normal(&mut self) -> f64 {
        let u1 = self.uniform().max(1e-300);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
}

/// Allocates and initialises a weight buffer for `layout`. Tensors draw from one stream
/// in the whole model's registration order; tensors held by other expert-parallel ranks
/// consume their draws too, so every rank's share equals the single-rank model's (a
/// tensor-parallel rank's slices too).
pub fn init_weights(layout: &ParamLayout, seed: u64) -> Vec<f32> {
    let mut w = vec![0.0f32; layout.total];
    let mut rng = Rng::new(seed);
    for t in &layout.logical {
        let n: usize = t.shape.iter().product();
        match (t.init, t.local.then(|| layout.get(&t.name)).flatten()) {
            (Init::Constant(c), Some(spec)) => w[spec.range()].fill(c),
            // A tensor-parallel slice draws the whole tensor and keeps its part.
            (Init::Normal(std), Some(spec)) if spec.split.is_some() => {
                let whole: Vec<f32> = (0..n).map(|_| (rng.normal() * std as f64) as f32).collect();
                w[spec.range()].copy_from_slice(&spec.split.expect("split").take(&whole, &t.shape));
            }
            (Init::Normal(std), Some(spec)) => w[spec.range()].iter_mut().for_each(|x| *x = (rng.normal() * std as f64) as f32),
            (Init::Normal(_), None) => (0..n).for_each(|_| {
                rng.normal();
            }),
            (Init::Constant(_), None) => {}
        }
    }
    w
}
