//! safetune-model: Llama-family models (configs, weights, tokenizers, chat templates, decoder,
//! generation) and the `Generator` interface that every text backend implements.
//!
//! Load a model and generate:
//! ```no_run
//! use safetune_model::{LocalEngine, LoadOptions, ModelSpec, Generator, GenRequest, Prompt, Sampling};
//! let spec = ModelSpec::parse("model.gguf")?;
//! let engine = LocalEngine::load(&spec, &LoadOptions::default())?;
//! let out = engine.generate(&[GenRequest {
//!     prompt: Prompt::Chat(vec![safetune_data::Message::user("Hi!")]),
//!     sampling: Sampling::default(),
//! }])?;
//! println!("{}", out[0].text);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod adapter;
pub mod backend;
pub mod bench;
pub mod bert;
pub mod bf16;
pub mod config;
mod decode;
pub mod engine;
pub mod error;
pub mod export;
pub mod generate;
pub mod gguf;
pub mod hub;
pub mod isa;
pub mod job;
pub mod llama;
pub mod pool;
pub mod quant;
pub mod reward;
pub mod spec;
pub mod template;
pub mod testing;
pub mod tokenizer;
pub mod vecmath;
pub mod weights;

pub use backend::{
    BackendError, CancelCheck, FinishReason, GenOutput, GenRequest, Generator, Prompt, RequestFeed,
    Sampling, TokenSink,
};
pub use config::{Config, HfConfig};
pub use decode::SlotCache;
pub use engine::{LoadOptions, LocalEngine};
pub use error::{ModelError, Result};
pub use llama::{KvCache, Llama};
pub use spec::ModelSpec;
pub use template::ChatTemplate;
pub use tokenizer::Tok;
pub use weights::{Linear, LinearWeight, Weights};

/// `$SAFETUNE_HOME` or `~/.cache/safetune`: where assets (models, datasets) are cached.
pub use safetune_data::assets::safetune_home;
