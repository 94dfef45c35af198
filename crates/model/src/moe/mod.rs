//! The MoE block, split by role as Megatron-Core splits it: [`router`] (scores and
//! top-k), [`dispatcher`] (moves token rows to their experts and back; the only place
//! tokens travel), [`experts`] (grouped GEMM over every expert), [`layer`] (composition:
//! route → dispatch → experts → combine, plus shared experts). Dropless: every token
//! reaches all of its top-k experts; there is no capacity factor.

pub mod dispatcher;
pub mod hierarchical;
pub mod experts;
pub mod layer;
pub mod router;
