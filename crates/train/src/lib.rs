//! safetune-train: supervised fine-tuning (LoRA and full) of Llama-family models on CPU.
//!
//! - [`config`]: [`TuneConfig`], every setting of a run (TOML file + flags).
//! - [`sft`]: chat-template rendering, assistant-only labels, truncation, length-grouped batches
//!   and packing.
//! - [`model`]: the trainable decoder (candle `Var`s, LoRA adapters), from differentiable ops
//!   ([`kernels`]); [`loss`]: the chunked lm_head + cross-entropy.
//! - [`ops`]: the training kernels behind them (fused CPU kernels with forward and backward
//!   passes, and an unfused reference from candle primitives) and [`ops::AdamW`].
//! - [`recipe`]: the training loop, top to bottom; [`checkpoint`]: exact resume.
//! - [`rng`]: the checkpointable random generator.
//! - [`qlinear`]: frozen linears kept in GGUF blocks under LoRA (`tune --quantized`).
//! - [`project`]: Safe LoRA style projection of a tuned adapter onto the alignment subspace.

pub mod checkpoint;
pub mod config;
pub mod error;
pub mod kernels;
pub mod loss;
pub mod model;
pub mod ops;
pub mod peft;
pub mod project;
pub mod qlinear;
pub mod recipe;
pub mod rng;
pub mod sft;

pub use config::{Schedule, SettingsError, TuneConfig, RUN_KEYS};
pub use error::{Result, TrainError};
pub use model::{LoraSettings, Mode, Target, TrainModel};
pub use recipe::{tune, Event, RunOptions, Status, TokenCounts, TuneSummary};
