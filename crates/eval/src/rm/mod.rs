//! Reward-model reliability (issue 6): score items and preference pairs with any reward model,
//! and measure how far its preferences can be trusted.
//!
//! - [`backend`]: the [`RewardModel`] trait and the specs naming local sequence-classification
//!   RMs, HTTP endpoints ([`remote`]), trained Bradley-Terry heads ([`bt`]) and implicit rewards;
//! - [`score`]: resumable scoring of items and pairs into JSONL, and reading scores back;
//! - [`analyze`]: separation, agreement with human labels, cross-variant consistency, agreement
//!   between RMs;
//! - [`select`]: RM-guided selection (top k% against a random k%);
//! - [`stats`]: AUC, pairwise accuracy, Kendall tau-b, Spearman rho, bootstrap, Kendall's W.

pub mod analyze;
pub mod backend;
pub mod bt;
pub mod error;
pub mod remote;
pub mod score;
pub mod select;
pub mod stats;

pub use backend::{open_rm, RewardModel, RmInput, RmOptions};
pub use error::{Result, RmError};
