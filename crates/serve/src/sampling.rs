//! Choosing the next token from logits: repetition penalty, temperature, top-k, top-p
//! (nucleus), min-p, then a draw from a seeded generator — or the argmax (greedy) at
//! temperature 0.
//!
//! In order, on a copy of the logits `z`:
//! 1. repetition penalty `r` (CTRL, Keskar et al. 2019), for every token already in the
//!    prompt or the output: `z ← z / r` if `z > 0`, else `z · r`;
//! 2. temperature `τ`: `p = softmax(z / τ)`;
//! 3. top-k: only the `k` most probable tokens stay;
//! 4. top-p: the smallest most-probable set whose mass reaches `p` stays;
//! 5. min-p: tokens below `min_p · max p` go;
//! 6. a draw from what stays, renormalised.
//!
//! The same seed and the same logits give the same token.

use ultramoe_model::init::Rng;

/// How a request's tokens are chosen.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// softmax temperature; 0 picks the most probable token
    pub temperature: f32,
    /// keep the k most probable tokens (0: all)
    pub top_k: usize,
    /// keep the most probable tokens whose mass reaches this (1: all)
    pub top_p: f32,
    /// drop tokens below this fraction of the most probable one's probability (0: none)
    pub min_p: f32,
    /// divide positive / multiply negative logits of tokens already seen (1: off)
    pub repetition_penalty: f32,
    /// generator seed (`None`: a fresh one per request)
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams { temperature: 0.0, top_k: 0, top_p: 1.0, min_p: 0.0, repetition_penalty: 1.0, seed: None }
    }
}

impl SamplingParams {
    /// The first out-of-range field and why, if any.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        let t = self.temperature;
        if !(t.is_finite() && (0.0..=100.0).contains(&t)) {
            return Err(("temperature", format!("{t} is not in [0, 100]")));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(("top_p", format!("{} is not in (0, 1]", self.top_p)));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(("min_p", format!("{} is not in [0, 1]", self.min_p)));
        }
        let r = self.repetition_penalty;
        if !(r.is_finite() && r > 0.0 && r <= 100.0) {
            return Err(("repetition_penalty", format!("{r} is not in (0, 100]")));
        }
        Ok(())
    }
}

/// A request's sampler: its parameters and its generator.
#[derive(Clone, Debug)]
pub struct Sampler {
    /// the parameters
    pub params: SamplingParams,
    rng: Rng,
}

/// The index of the largest value (the first of equals).
pub fn argmax(z: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in z.iter().enumerate() {
        if *v > z[best] {
            best = i;
        }
    }
    best as u32
}

impl Sampler {
    /// A sampler; without a seed, one from the clock and a counter.
    pub fn new(params: SamplingParams) -> Self {
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let seed = params.seed.unwrap_or_else(|| {
            let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
            t ^ COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        });
        Sampler { params, rng: Rng::new(seed) }
    }

    /// The next token from `logits` (changed in place), `seen` the prompt and output so far.
    pub fn sample(&mut self, logits: &mut [f32], seen: &[u32]) -> u32 {
        let p = &self.params;
        if p.repetition_penalty != 1.0 {
            let mut done = std::collections::HashSet::new();
            for &t in seen {
                if let Some(z) = logits.get_mut(t as usize) {
                    if done.insert(t) {
                        *z = if *z > 0.0 { *z / p.repetition_penalty } else { *z * p.repetition_penalty };
                    }
                }
            }
        }
        if p.temperature == 0.0 {
            return argmax(logits);
        }
        // Probabilities, most probable first.
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut probs: Vec<(u32, f64)> =
            logits.iter().enumerate().map(|(i, &z)| (i as u32, (((z - max) / p.temperature) as f64).exp())).collect();
        let total: f64 = probs.iter().map(|x| x.1).sum();
        probs.iter_mut().for_each(|x| x.1 /= total);
        probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let mut keep = probs.len();
        if p.top_k > 0 {
            keep = keep.min(p.top_k);
        }
        if p.top_p < 1.0 {
            let mut mass = 0.0;
            for (i, x) in probs[..keep].iter().enumerate() {
                mass += x.1;
                if mass >= p.top_p as f64 {
                    keep = i + 1;
                    break;
                }
            }
        }
        if p.min_p > 0.0 {
            let floor = p.min_p as f64 * probs[0].1;
            keep = probs[..keep].iter().take_while(|x| x.1 >= floor).count().max(1);
        }
        let kept = &probs[..keep];
        let mass: f64 = kept.iter().map(|x| x.1).sum();
        let mut u = self.rng.uniform() * mass;
        for x in kept {
            u -= x.1;
            if u < 0.0 {
                return x.0;
            }
        }
        kept[keep - 1].0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32) -> SamplingParams {
        SamplingParams { temperature, seed: Some(7), ..Default::default() }
    }

    fn histogram(p: SamplingParams, logits: &[f32], draws: usize) -> Vec<usize> {
        let mut s = Sampler::new(p);
        let mut h = vec![0; logits.len()];
        for _ in 0..draws {
            h[s.sample(&mut logits.to_vec(), &[]) as usize] += 1;
        }
        h
    }

    #[test]
    fn greedy_takes_the_argmax() {
        let mut s = Sampler::new(params(0.0));
        assert_eq!(s.sample(&mut [0.1, 2.0, -1.0, 1.9], &[]), 1);
    }

    #[test]
    fn draws_follow_the_softmax() {
        // softmax([ln 1, ln 2, ln 3, ln 4]) = [0.1, 0.2, 0.3, 0.4]
        let logits: Vec<f32> = [1.0f32, 2.0, 3.0, 4.0].iter().map(|x| x.ln()).collect();
        let n = 40_000;
        let h = histogram(params(1.0), &logits, n);
        for (i, c) in h.iter().enumerate() {
            let want = 0.1 * (i + 1) as f64;
            assert!((*c as f64 / n as f64 - want).abs() < 0.01, "token {i}: {c} of {n}, want {want}");
        }
    }

    #[test]
    fn truncations_keep_what_they_should() {
        let logits: Vec<f32> = [1.0f32, 2.0, 3.0, 4.0].iter().map(|x| x.ln()).collect();
        // top-k 2: only tokens 3 and 2 (0.4 : 0.3).
        let h = histogram(SamplingParams { top_k: 2, ..params(1.0) }, &logits, 7000);
        assert_eq!(h[0] + h[1], 0);
        assert!((h[3] as f64 / 7000.0 - 4.0 / 7.0).abs() < 0.03);
        // top-p 0.65: 0.4 + 0.3 reaches it.
        let h = histogram(SamplingParams { top_p: 0.65, ..params(1.0) }, &logits, 2000);
        assert_eq!(h[0] + h[1], 0);
        assert!(h[2] > 0 && h[3] > 0);
        // min-p 0.6: keeps p ≥ 0.24 (tokens 2, 3).
        let h = histogram(SamplingParams { min_p: 0.6, ..params(1.0) }, &logits, 2000);
        assert_eq!(h[0] + h[1], 0);
        // a temperature near 0 is nearly greedy
        let h = histogram(params(0.01), &logits, 500);
        assert_eq!(h[3], 500);
    }

    #[test]
    fn repetition_penalty_lowers_seen_tokens() {
        let mut s = Sampler::new(SamplingParams { repetition_penalty: 2.0, ..params(0.0) });
        // token 1 (seen, 2.0 → 1.0) loses to token 3 (1.5); a seen negative logit doubles.
        let mut z = [0.0, 2.0, -1.0, 1.5];
        assert_eq!(s.sample(&mut z, &[1, 1, 2]), 3);
        assert_eq!(z, [0.0, 1.0, -2.0, 1.5]);
    }

    #[test]
    fn a_seed_repeats_its_draws() {
        let logits = vec![0.3f32; 50];
        assert_eq!(histogram(params(1.0), &logits, 200), histogram(params(1.0), &logits, 200));
        let mut a = Sampler::new(params(1.0));
        let mut b = Sampler::new(SamplingParams { seed: Some(8), ..params(1.0) });
        let da: Vec<u32> = (0..20).map(|_| a.sample(&mut logits.clone(), &[])).collect();
        let db: Vec<u32> = (0..20).map(|_| b.sample(&mut logits.clone(), &[])).collect();
        assert_ne!(da, db);
    }

    #[test]
    fn out_of_range_parameters_are_named() {
        assert_eq!(SamplingParams { top_p: 0.0, ..Default::default() }.check().unwrap_err().0, "top_p");
        assert_eq!(SamplingParams { temperature: -1.0, ..Default::default() }.check().unwrap_err().0, "temperature");
        assert_eq!(SamplingParams { temperature: f32::NAN, ..Default::default() }.check().unwrap_err().0, "temperature");
        assert!(SamplingParams::default().check().is_ok());
    }
}
