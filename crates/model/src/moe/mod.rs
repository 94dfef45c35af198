//! The MoE block, split by role as Megatron-Core splits it: [`router`] (scores and
//! top-k), [`dispatcher`] (moves token rows to their experts and back; the only place
//! tokens travel), [`experts`] (grouped GEMM over every expert), [`layer`] (composition:
//! route → dispatch → experts → combine, plus shared experts). Dropless: every token
//! reaches all of its top-k experts; there is no capacity factor. Under expert parallelism
//! [`placement`] says which rank holds which expert (with redundant copies of hot ones)
//! and [`replicas`] moves experts between ranks and keeps the copies identical.

pub mod dispatcher;
pub mod hierarchical;
pub mod experts;
pub mod layer;
pub mod placement;
pub mod replicas;
pub mod router;
