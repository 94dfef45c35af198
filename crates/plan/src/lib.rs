//! # ultramoe-plan
//!
//! Plans MoE training before anything expensive runs: a hardware description
//! ([`hardware`]), what a model costs per token ([`model_cost`]), a simulated training
//! step for one parallel layout ([`simulate`]) under a pipeline schedule ([`pipeline`]),
//! a search over layouts ([`search`]), model
//! presets ([`presets`]) and validation against runs that finished ([`validate`]). Pure
//! computation: it reads configs through `ultramoe-config` and never touches a kernel.
#![deny(missing_docs)]

pub mod hardware;
pub mod model_cost;
pub mod pipeline;
pub mod presets;
pub mod search;
pub mod simulate;
pub mod validate;

pub use hardware::Hardware;
pub use model_cost::{ModelCost, Recompute};
pub use pipeline::PipeSchedule;
pub use search::{search, Fixed, Outcome};
pub use simulate::{simulate, Breakdown, Job, Layout, Prediction};
