//! safetune-eval: see DESIGN.md section 2.

pub mod error;
pub mod judge;
pub mod labels;
pub mod metrics;
pub mod rm;
pub mod run;
