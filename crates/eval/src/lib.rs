//! safetune-eval: judging answers and measuring what they say about a model.
//!
//! - [`judge`]: the [`judge::Judge`] interface from (prompt, response) to a verdict, `refusal` or
//!   `compliance` (the words of ARCHITECTURE.md section 8), with a score, the raw output and a
//!   parse status; the keyword, rubric (LLM) and guard judges, [`judge::build_judge`] by name,
//!   and [`judge::clauses`], the identity statements, disclaimers and caveats every phrase judge
//!   sets aside before it decides;
//! - [`classifier`]: the classifier judge (MiniLM embeddings and a logistic head fitted only on
//!   this project's train data), and the fitting of its head;
//! - [`labels`], [`validate`]: human-labelled sets with their train/dev/test role, and a judge's
//!   accuracy, kappa and confusion against them (per condition for a study's own answers);
//! - [`bench`](mod@crate::bench), [`run`], [`metrics`], [`compare`]: benchmark prompts,
//!   resumable judging of JSONL rows, safety and over-refusal rates with Wilson intervals,
//!   bootstrap intervals and McNemar's test between two runs;
//! - [`nonanswer`]: responses without content (empty Markdown skeletons, repetition loops),
//!   counted apart so a model that degenerates does not look safer;
//! - [`utility`]: held-out loss, perplexity and multiple-choice accuracy;
//! - [`rm`]: reward models (local, HTTP, Bradley-Terry heads, implicit rewards), scoring, and
//!   how far their preferences can be trusted.
//!
//! LLM judges reach their model through [`safetune_model::Generator`], so they run on a local
//! model or an OpenAI-compatible server alike.

#![forbid(unsafe_code)]

pub mod bench;
pub mod bootstrap;
pub mod classifier;
pub mod compare;
pub mod effects;
pub mod error;
pub mod judge;
pub mod labels;
pub mod metrics;
pub mod nonanswer;
pub mod probe;
pub mod rm;
pub mod run;
pub mod utility;
pub mod validate;
