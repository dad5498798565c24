//! One module per subcommand: its clap arguments (doc comments are the help text) and a `run`.

pub mod audit;
pub mod classifier;
pub mod common;
pub mod compare;
pub mod debug_decode_bench;
pub mod debug_logits;
pub mod eval;
pub mod export;
pub mod generate;
pub mod judge;
pub mod judge_eval;
pub mod label;
pub mod merge;
pub mod mitigate;
pub mod prompts;
pub mod quickstart;
pub mod report;
pub mod results;
pub mod rm;
pub mod serve;
pub mod study;
pub mod transform;
pub mod tune;
pub mod utility;
pub mod view;
