//! safetune-eval: see DESIGN.md section 2.
pub mod bench;
pub mod classifier;
pub mod compare;
pub mod error;
pub mod judge;
pub mod labels;
pub mod metrics;
pub mod rm;
pub mod run;
pub mod utility;
pub mod validate;
