//! # ultramoe-report
//!
//! Pictures of runs and plans: [`chart`] describes charts as data and draws them as PNG
//! or SVG through plotters; [`run`] turns a run directory's metrics into a report.
#![deny(missing_docs)]

pub mod chart;
pub mod run;
