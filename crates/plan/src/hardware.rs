//! A machine described in TOML: devices per node, each device's peak dense FLOP/s per
//! data type, memory capacity and bandwidth, the links between devices inside a node and
//! between nodes, and efficiency curves (the fraction of peak that GEMMs of a given size
//! actually reach). Presets ship in `crates/plan/hardware/`; `ultramoe calibrate`
//! measures this machine into the same format.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;
use ultramoe_config::{Error, Result};

/// One machine type.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hardware {
    /// what it is
    pub name: String,
    /// where the figures come from
    pub source: String,
    /// accelerators (or CPU ranks) per node
    pub devices_per_node: usize,
    /// one device
    pub device: Device,
    /// links
    pub network: Network,
    /// achieved fractions of peak
    pub efficiency: Efficiency,
}

/// One device.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Device {
    /// peak dense FLOP/s per data type (`bf16`, `fp16`, `fp8`, `fp32`)
    pub peak_flops: BTreeMap<String, f64>,
    /// memory capacity, bytes
    pub memory_bytes: f64,
    /// memory bandwidth, bytes/s
    pub memory_bandwidth: f64,
    /// memory training cannot use (runtime context, communication buffers,
    /// fragmentation), bytes; absent: a tenth of `memory_bytes`
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_reserved: Option<f64>,
}

impl Device {
    /// Bytes a layout may not use: `memory_reserved`, or a tenth of the capacity.
    pub fn reserved_bytes(&self) -> f64 {
        self.memory_reserved.unwrap_or(0.1 * self.memory_bytes)
    }
}

/// The links a device sends on (unidirectional bytes/s per device, latency in s).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Network {
    /// to devices of the same node
    pub intra_node_bandwidth: f64,
    /// per message inside a node
    pub intra_node_latency: f64,
    /// to devices of other nodes
    pub inter_node_bandwidth: f64,
    /// per message between nodes
    pub inter_node_latency: f64,
}

/// Achieved fractions of peak.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Efficiency {
    /// dense GEMM: `[FLOPs of one call, fraction of peak]` points, interpolated in
    /// log10(FLOPs) and held flat beyond the ends
    pub gemm: Vec<[f64; 2]>,
    /// grouped GEMM (all experts of a layer in one call), same form
    pub grouped_gemm: Vec<[f64; 2]>,
    /// attention core (scores, softmax, weighted values), fraction of peak
    pub attention: f64,
    /// FP8 GEMMs' achieved fraction of the FP8 peak relative to what `gemm` and
    /// `grouped_gemm` give BF16 GEMMs of the BF16 peak (fine-grained scaling and
    /// higher-precision accumulation cost FP8 kernels part of their peak)
    #[serde(default = "one")]
    pub fp8_gemm: f64,
    /// fraction of memory bandwidth elementwise kernels reach
    pub memory: f64,
    /// fraction of memory bandwidth the optimizer step (gradient norm, clipping, AdamW)
    /// reaches, counting 28 bytes per parameter
    #[serde(default = "one")]
    pub optimizer: f64,
    /// fraction of links' bandwidth collectives reach
    #[serde(default = "one")]
    pub network: f64,
    /// fraction of expert-parallel all-to-all time hidden behind computation
    #[serde(default)]
    pub ep_overlap: f64,
    /// fraction of data-parallel gradient traffic hidden behind the backward pass
    #[serde(default)]
    pub dp_overlap: f64,
    /// fraction of tensor-parallel collective time hidden
    #[serde(default)]
    pub tp_overlap: f64,
    /// share of the device's compute units the all-to-all kernels occupy while a
    /// pipeline schedule runs micro-batches in overlapped pairs (DeepSeek-V3: 20 of an
    /// H800's 132 SMs)
    #[serde(default)]
    pub comm_sm_share: f64,
    /// fixed host overhead per training step, seconds (launches, Python, logging)
    #[serde(default)]
    pub step_overhead: f64,
    /// fixed cost per decoder layer per micro-batch, forward and backward, seconds
    /// (kernel launches and dispatch: what a layer costs with nothing to compute)
    #[serde(default)]
    pub layer_overhead: f64,
    /// host time one decoder layer's forward and backward take to issue, per
    /// micro-batch, seconds: a device fed by a slower host waits for it, so a layer
    /// takes at least this (framework dispatch, kernel launches, dropless routing's
    /// host synchronisation); 0: never host-bound
    #[serde(default)]
    pub host_layer: f64,
}

fn one() -> f64 {
    1.0
}

/// The presets: (name, TOML text).
pub const PRESETS: [(&str, &str); 5] = [
    ("atlas-800t-a2", include_str!("../hardware/atlas-800t-a2.toml")),
    ("cloudmatrix384", include_str!("../hardware/cloudmatrix384.toml")),
    ("h800", include_str!("../hardware/h800.toml")),
    ("h100", include_str!("../hardware/h100.toml")),
    ("this-machine", include_str!("../hardware/this-machine.toml")),
];

impl Hardware {
    /// Parses a hardware description.
    pub fn from_toml(text: &str) -> Result<Self> {
        let hw: Hardware = toml::from_str(text).map_err(|e| Error::msg(format!("not a hardware description: {e}")))?;
        hw.validate()?;
        Ok(hw)
    }

    /// A preset by name, or a TOML file by path.
    pub fn load(name_or_path: &str) -> Result<Self> {
        if let Some((_, text)) = PRESETS.iter().find(|(n, _)| *n == name_or_path) {
            return Self::from_toml(text).map_err(|e| e.in_file(Path::new(name_or_path)));
        }
        let p = Path::new(name_or_path);
        let text = std::fs::read_to_string(p).map_err(|e| {
            let names: Vec<&str> = PRESETS.iter().map(|(n, _)| *n).collect();
            Error::msg(format!("neither a preset ({}) nor a readable file: {e}", names.join(", "))).in_file(p)
        })?;
        Self::from_toml(&text).map_err(|e| e.in_file(p))
    }

    /// The TOML text of this description.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("hardware serialises")
    }

    fn validate(&self) -> Result<()> {
        if self.devices_per_node == 0 {
            return Err(Error::field("devices_per_node", "must be at least 1"));
        }
        if self.device.peak_flops.is_empty() || self.device.peak_flops.values().any(|&f| f <= 0.0) {
            return Err(Error::field("device.peak_flops", "needs at least one positive entry"));
        }
        for (field, v) in [
            ("device.memory_bytes", self.device.memory_bytes),
            ("device.memory_bandwidth", self.device.memory_bandwidth),
            ("network.intra_node_bandwidth", self.network.intra_node_bandwidth),
            ("network.inter_node_bandwidth", self.network.inter_node_bandwidth),
        ] {
            if v <= 0.0 {
                return Err(Error::field(field, "must be positive"));
            }
        }
        for (field, curve) in [("efficiency.gemm", &self.efficiency.gemm), ("efficiency.grouped_gemm", &self.efficiency.grouped_gemm)] {
            if curve.is_empty() || curve.iter().any(|p| p[0] <= 0.0 || !(0.0..=1.0).contains(&p[1])) || curve.windows(2).any(|w| w[1][0] <= w[0][0]) {
                return Err(Error::field(field, "needs [FLOPs, fraction] points with increasing FLOPs and fractions in [0, 1]"));
            }
        }
        Ok(())
    }

    /// The data type a job computes in when none is asked for: `bf16` where the device
    /// has a figure for it (accelerators), else `fp32` (CPUs), else its first entry.
    pub fn default_dtype(&self) -> &str {
        let p = &self.device.peak_flops;
        ["bf16", "fp32"].into_iter().find(|d| p.contains_key(*d)).or_else(|| p.keys().next().map(String::as_str)).unwrap_or("bf16")
    }

    /// Peak FLOP/s for `dtype`.
    pub fn peak(&self, dtype: &str) -> Result<f64> {
        self.device.peak_flops.get(dtype).copied().ok_or_else(|| {
            let have: Vec<&str> = self.device.peak_flops.keys().map(String::as_str).collect();
            Error::field("device.peak_flops", format!("no `{dtype}` entry (has {})", have.join(", ")))
        })
    }
}

/// Linear interpolation of `curve` in log10 of `x`, flat beyond the ends.
pub fn interpolate(curve: &[[f64; 2]], x: f64) -> f64 {
    let lx = x.max(1.0).log10();
    let first = curve[0];
    if lx <= first[0].log10() {
        return first[1];
    }
    for w in curve.windows(2) {
        let (a, b) = (w[0][0].log10(), w[1][0].log10());
        if lx <= b {
            let t = (lx - a) / (b - a);
            return w[0][1] + t * (w[1][1] - w[0][1]);
        }
    }
    curve[curve.len() - 1][1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_parse() {
        for (name, _) in PRESETS {
            let hw = Hardware::load(name).unwrap();
            assert!(hw.devices_per_node >= 1, "{name}");
            let back = Hardware::from_toml(&hw.to_toml()).unwrap();
            assert_eq!(back.device.memory_bytes, hw.device.memory_bytes);
        }
        let e = Hardware::load("no-such-machine").unwrap_err().to_string();
        assert!(e.contains("neither a preset"), "{e}");
    }

    #[test]
    fn curves_interpolate_in_log_space() {
        let c = [[1e6, 0.2], [1e8, 0.6]];
        assert_eq!(interpolate(&c, 1e3), 0.2);
        assert!((interpolate(&c, 1e7) - 0.4).abs() < 1e-12);
        assert_eq!(interpolate(&c, 1e12), 0.6);
    }
}
