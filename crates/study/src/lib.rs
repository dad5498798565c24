//! safetune-study: composes the pipeline stages into studies.
//!
//! - [`config`]: the study config (TOML), checked with field names in errors;
//! - [`plan`]: config -> steps (a factorial over models, dataset variants, seeds, mixing
//!   levels, selections, benchmarks, judges and reward models);
//! - [`power`]: `--dry-run`'s detectable effects and compute estimate;
//! - [`step`]: step kinds, typed settings and outputs, the [`step::Stage`] trait and the
//!   [`step::Registry`] that maps each kind to its stage;
//! - [`stages`]: the model, transform, mix, alignment-set, audit and generate stages, and
//!   [`stages::builtin_registry`], which registers a stage for every kind;
//! - [`judge_stage`], [`rm_stage`], [`train_stage`]: the judge, score/select and align/tune
//!   stages, over the eval and train crates; [`mitigate_stage`]: the `project` arm of
//!   `[mitigations]` and the `utility` stage;
//! - [`store`]: the SQLite store (WAL; rows committed as they finish);
//! - [`runner`]: keyed, resumable execution of a plan;
//! - [`lock`]: one runner per study directory (`study.lock`);
//! - [`report`]: report.html (inline SVG), summary.md, results.json;
//! - [`labels`]: blind labelling files of a study's answers, their import (`human_labels`), and
//!   each judge's accuracy against them per condition;
//! - [`results`]: every answer as one table row (`safetune results`: CSV, JSON Lines,
//!   Parquet through the small writer in [`parquet`]);
//! - [`view`]: `safetune view`, a local web view of a study (progress, results, answers,
//!   labelling);
//! - [`external_train`]: external trainer backends of align/tune steps (LLaMA-Factory,
//!   Axolotl, TRL, any command): the settings mapping, configs, running and validation;
//! - [`export`]: dataset variants and trainer configs for LLaMA-Factory, Axolotl and TRL;
//! - [`quickstart`]: `safetune quickstart`.

#![forbid(unsafe_code)]

pub mod config;
pub mod export;
pub mod external_train;
pub mod hash;
pub mod judge_stage;
pub mod labels;
pub mod lock;
pub mod mitigate_stage;
pub mod parquet;
pub mod plan;
pub mod power;
pub mod quickstart;
pub mod report;
pub mod results;
pub mod rm_stage;
pub mod runner;
pub mod stages;
pub mod step;
pub mod store;
pub mod train_stage;
pub mod view;
