//! What the parity tests share.

use std::collections::HashMap;

/// Every tensor of `got` within 1e-5 of `want`'s (relative L2 per tensor:
/// `‖w − w_ref‖₂ ≤ 1e-5 · ‖w_ref‖₂`), the worst printed.
pub fn assert_weights_close(label: &str, got: &HashMap<String, Vec<f32>>, want: &HashMap<String, Vec<f32>>) {
    assert_eq!(got.len(), want.len(), "{label}: tensors");
    let mut worst = (0.0f64, String::new());
    for (name, w1) in want {
        let w2 = &got[name];
        let diff: f64 = w2.iter().zip(w1).map(|(a, b)| ((a - b) as f64).powi(2)).sum::<f64>().sqrt();
        let norm: f64 = w1.iter().map(|&b| (b as f64).powi(2)).sum::<f64>().sqrt().max(1e-12);
        if diff / norm > worst.0 {
            worst = (diff / norm, name.clone());
        }
    }
    eprintln!("{label}: worst relative weight difference {:.2e} ({})", worst.0, worst.1);
    assert!(worst.0 <= 1e-5, "{label}: {} differs by {:.2e} (relative L2)", worst.1, worst.0);
}
