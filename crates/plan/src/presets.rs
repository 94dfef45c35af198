//! Model presets: `config.json` files of the large MoE models people plan for (Hugging
//! Face layout, parsed by the same code as any checkpoint's config).

use ultramoe_config::{Error, ModelConfig, Result};

/// (name, config.json text)
pub const MODELS: [(&str, &str); 4] = [
    ("pangu-ultra-moe-718b", include_str!("../models/pangu-ultra-moe-718b.json")),
    ("deepseek-v3-671b", include_str!("../models/deepseek-v3-671b.json")),
    ("qwen3-235b-a22b", include_str!("../models/qwen3-235b-a22b.json")),
    ("mixtral-8x22b", include_str!("../models/mixtral-8x22b.json")),
];

/// A preset by name, or a `config.json` (or a directory holding one) by path.
pub fn model(name_or_path: &str) -> Result<ModelConfig> {
    if let Some((_, text)) = MODELS.iter().find(|(n, _)| *n == name_or_path) {
        return ModelConfig::from_json_str(text);
    }
    let p = std::path::Path::new(name_or_path);
    let file = if p.is_dir() { p.join("config.json") } else { p.to_path_buf() };
    if !file.exists() {
        let names: Vec<&str> = MODELS.iter().map(|(n, _)| *n).collect();
        return Err(Error::msg(format!("neither a preset ({}) nor a config.json", names.join(", "))).in_file(p));
    }
    ModelConfig::from_file(&file)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ModelCost;

    /// Parameter counts against the published totals.
    #[test]
    fn presets_have_their_published_sizes() {
        for (name, total_b, active_b) in
            [("deepseek-v3-671b", 671.0, 37.0), ("qwen3-235b-a22b", 235.0, 22.0), ("mixtral-8x22b", 141.0, 39.0), ("pangu-ultra-moe-718b", 718.0, 39.0)]
        {
            let c = ModelCost::new(&model(name).unwrap());
            let (p, a) = (c.params() / 1e9, c.active_params() / 1e9);
            eprintln!("{name}: {p:.1} B parameters, {a:.1} B active");
            // DeepSeek's 671 B excludes the 14 B MTP module; Pangu's 718 B is reported
            // likewise. Within 3% of the totals, 8% of the active counts.
            assert!((p / total_b - 1.0).abs() < 0.03, "{name}: {p:.1} B vs {total_b}");
            assert!((a / active_b - 1.0).abs() < 0.08, "{name}: {a:.1} B active vs {active_b}");
        }
    }
}
