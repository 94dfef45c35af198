//! The budget's policy choice against every policy there is: on a two-layer model, for
//! budgets from just under the plain step's peak down to where little fits, the choice
//! fits the budget and costs at most 10% more than the cheapest policy that fits
//! (found by trying all of them), with swap files of several speeds and without.

use ultramoe_model::memory::CostRates;
use ultramoe_model::policy::{LayerPolicy, MemoryOp};
use ultramoe_model::swap::SwapRates;
use ultramoe_model::{Model, ModelConfig, PassOptions};
use ultramoe_schedule::Action;

const CONFIG: &str = r#"{"model_type": "deepseek_v3", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 32,
    "num_hidden_layers": 2, "first_k_dense_replace": 1, "num_attention_heads": 4, "q_lora_rank": 32, "kv_lora_rank": 16,
    "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16, "n_routed_experts": 8, "num_experts_per_tok": 2,
    "n_shared_experts": 1, "max_position_embeddings": 128}"#;

/// Every policy one layer can have: any set of the ops but `full`, or `full` with or
/// without `attention`.
fn layer_policies() -> Vec<LayerPolicy> {
    let ops: Vec<MemoryOp> = MemoryOp::ALL.into_iter().filter(|&o| o != MemoryOp::Full).collect();
    let mut all = vec![];
    for bits in 0..1u32 << ops.len() {
        let mut p = LayerPolicy::default();
        for (i, &op) in ops.iter().enumerate() {
            if bits & (1 << i) != 0 {
                p.set(op);
            }
        }
        all.push(p);
    }
    for attention in [false, true] {
        all.push(LayerPolicy { full: true, attention, ..Default::default() });
    }
    all
}

#[test]
fn the_chosen_policy_fits_and_is_within_ten_percent_of_the_cheapest() {
    let model = Model::new(ModelConfig::from_json_str(CONFIG).unwrap());
    let (b, t) = (16, 128);
    let actions = [Action::Forward { mb: 0, chunk: 0 }, Action::Backward { mb: 0, chunk: 0 }];
    let per_layer = layer_policies();
    let slow_disk = SwapRates { write: 0.5e9, read: 1.0e9, cpu_per_byte: 0.4e-9 };
    let fast_disk = SwapRates { write: 4.0e9, read: 8.0e9, cpu_per_byte: 0.1e-9 };
    // (swapping nearly free: the choice then swaps layers and moments)
    let free_disk = SwapRates { write: 100e9, read: 200e9, cpu_per_byte: 1e-13 };
    for swap in [None, Some(slow_disk), Some(fast_disk), Some(free_disk)] {
        let rates = CostRates { flops: 150e9, attention_flops: 60e9, bytes: 20e9, swap };
        let plain = model.memory_plan_scheduled(b, t, 2, 0, &PassOptions::default(), &actions).peak_bytes;
        for share in [0.95, 0.85, 0.75, 0.65, 0.55] {
            let budget = (plain as f64 * share) as usize;
            let mut cheapest: Option<f64> = None;
            for &p0 in &per_layer {
                for &p1 in &per_layer {
                    for swap_moments in [false, true] {
                        if (p0.swap || p1.swap || swap_moments) && swap.is_none() {
                            continue;
                        }
                        let c = PassOptions { policy: vec![p0, p1], swap_moments, ..PassOptions::default() };
                        if model.memory_plan_scheduled(b, t, 2, 0, &c, &actions).peak_bytes <= budget {
                            let cost = model.policy_cost(b, t, &c, &rates);
                            cheapest = Some(cheapest.map_or(cost, |x: f64| x.min(cost)));
                        }
                    }
                }
            }
            let chosen = model.choose_policy(b, t, 2, 0, budget, &rates, &PassOptions::default(), &actions);
            let case = format!("swap {swap:?}, budget {share} of the plain peak");
            match (cheapest, chosen) {
                (None, Err(_)) => {}
                (Some(best), Ok(c)) => {
                    let peak = model.memory_plan_scheduled(b, t, 2, 0, &c, &actions).peak_bytes;
                    assert!(peak <= budget, "{case}: chose a policy over the budget");
                    let cost = model.policy_cost(b, t, &c, &rates);
                    eprintln!(
                        "{case}: chosen {:.3} ms (moments swapped: {}, {:?}), cheapest {:.3} ms",
                        cost * 1e3,
                        c.swap_moments,
                        c.policy.iter().map(|p| p.describe()).collect::<Vec<_>>(),
                        best * 1e3
                    );
                    assert!(cost <= 1.10 * best + 1e-12, "{case}: chose {:.3} ms where {:.3} ms fits", cost * 1e3, best * 1e3);
                }
                (best, chosen) => panic!("{case}: something fits: {}, the choice: {}", best.is_some(), chosen.is_ok()),
            }
        }
    }
}
