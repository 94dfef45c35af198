//! The search: every TP × PP × VPP × EP × DP layout of the devices, with every
//! micro-batch size and recomputation policy, simulated; infeasible ones kept with the
//! reason, the rest ranked by predicted step time.

use crate::hardware::Hardware;
use crate::model_cost::{ModelCost, Recompute};
use crate::pipeline::PipeSchedule;
use crate::simulate::{simulate, Job, Layout, Prediction};
use std::collections::BTreeMap;

/// Values a search dimension may be pinned to (`--fix tp=8,pp=16`).
#[derive(Clone, Debug, Default)]
pub struct Fixed {
    /// tensor parallel
    pub tp: Option<usize>,
    /// pipeline parallel
    pub pp: Option<usize>,
    /// virtual pipeline stages
    pub vpp: Option<usize>,
    /// expert parallel
    pub ep: Option<usize>,
    /// data parallel
    pub dp: Option<usize>,
    /// micro-batch
    pub micro_batch: Option<usize>,
    /// recomputation
    pub recompute: Option<Recompute>,
    /// pipeline schedule
    pub schedule: Option<PipeSchedule>,
}

impl Fixed {
    /// Parses `tp=8,pp=16,ep=32,dp=12,vpp=2,mb=1,recompute=full,schedule=dualpipe`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut f = Fixed::default();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = part.split_once('=').ok_or_else(|| format!("`{part}`: expected key=value"))?;
            if k == "recompute" {
                f.recompute = Some(Recompute::parse(v).ok_or_else(|| format!("recompute `{v}`: one of {}", Recompute::names()))?);
                continue;
            }
            if k == "schedule" {
                f.schedule = Some(PipeSchedule::parse(v).ok_or_else(|| format!("schedule `{v}`: one of {}", PipeSchedule::names()))?);
                continue;
            }
            let n: usize = v.parse().map_err(|_| format!("`{part}`: not a positive integer"))?;
            if n == 0 {
                return Err(format!("`{part}`: must be at least 1"));
            }
            match k {
                "tp" => f.tp = Some(n),
                "pp" => f.pp = Some(n),
                "vpp" => f.vpp = Some(n),
                "ep" => f.ep = Some(n),
                "dp" => f.dp = Some(n),
                "mb" | "micro_batch" => f.micro_batch = Some(n),
                _ => return Err(format!("`{k}`: unknown (tp, pp, vpp, ep, dp, mb, recompute, schedule)")),
            }
        }
        Ok(f)
    }
}

/// What a search found.
pub struct Outcome {
    /// feasible layouts, fastest first
    pub ranked: Vec<Prediction>,
    /// infeasible layouts and why
    pub rejected: Vec<(Layout, String)>,
}

impl Outcome {
    /// Rejection reasons with how many layouts each one ruled out (numbers in a reason
    /// replaced by `N`, so reasons of one kind count together).
    pub fn reasons(&self) -> BTreeMap<String, usize> {
        let mut out = BTreeMap::new();
        for (_, why) in &self.rejected {
            let mut kind = String::with_capacity(why.len());
            let mut in_number = false;
            for c in why.chars() {
                let digit = c.is_ascii_digit() || (in_number && c == '.');
                if digit && !in_number {
                    kind.push('N');
                }
                if !digit {
                    kind.push(c);
                }
                in_number = digit;
            }
            *out.entry(kind).or_insert(0) += 1;
        }
        out
    }
}

fn divisors(n: usize) -> Vec<usize> {
    (1..=n).filter(|d| n.is_multiple_of(*d)).collect()
}

/// Searches every layout of `job` (within `fixed`), with ZeRO-1 when `zero1`. Pipelines
/// are searched under the schedules the trainer runs (1F1B and the overlapped 1F1B);
/// DualPipe and DualPipeV only when `fixed` names them.
pub fn search(m: &ModelCost, hw: &Hardware, job: &Job, fixed: &Fixed, zero1: bool) -> Outcome {
    let n = job.devices;
    let pick = |f: Option<usize>, all: Vec<usize>| -> Vec<usize> {
        match f {
            Some(v) => vec![v],
            None => all,
        }
    };
    let tps = pick(fixed.tp, (0..).map(|i| 1usize << i).take_while(|&t| t <= hw.devices_per_node.min(n)).collect());
    let mbs = pick(fixed.micro_batch, vec![1, 2, 4, 8, 16]);
    let policies: Vec<Recompute> = fixed.recompute.map_or(Recompute::ALL.to_vec(), |r| vec![r]);
    let (mut ranked, mut rejected) = (vec![], vec![]);
    for &tp in &tps {
        for &pp in &pick(fixed.pp, divisors(n / tp.max(1)).into_iter().filter(|&p| p <= m.layers).collect()) {
            if !n.is_multiple_of(tp * pp) {
                rejected.push((Layout { tp, pp, vpp: 1, ep: 1, dp: 0, micro_batch: 1, recompute: Recompute::None, zero1, schedule: PipeSchedule::OneFOneB }, format!("tp {tp} × pp {pp} does not divide {n} devices")));
                continue;
            }
            let dp = n / (tp * pp);
            if fixed.dp.is_some_and(|d| d != dp) {
                continue;
            }
            let vpps = pick(fixed.vpp, if pp > 1 { vec![1, 2, 3, 4] } else { vec![1] });
            let eps = pick(fixed.ep, if m.moe_layers > 0 { divisors(m.experts).into_iter().filter(|&e| (dp * tp).is_multiple_of(e)).collect() } else { vec![1] });
            let schedules = match fixed.schedule {
                Some(s) => vec![s],
                None if pp > 1 => PipeSchedule::ALL.into_iter().filter(|s| s.runs_in_trainer()).collect(),
                None => vec![PipeSchedule::OneFOneB],
            };
            for &vpp in &vpps {
                for &ep in &eps {
                    for &mb in &mbs {
                        for &recompute in &policies {
                            for &schedule in &schedules {
                                let l = Layout { tp, pp, vpp, ep, dp, micro_batch: mb, recompute, zero1, schedule };
                                match simulate(m, hw, job, &l) {
                                    Ok(p) => ranked.push(p),
                                    Err(why) => rejected.push((l, why)),
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    ranked.sort_by(|a, b| a.step_s.total_cmp(&b.step_s));
    Outcome { ranked, rejected }
}
