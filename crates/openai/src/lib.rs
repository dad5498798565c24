//! safetune-openai: the OpenAI-compatible protocol, spoken both ways.
//!
//! - [`server`]: `safetune serve`, an OpenAI-compatible HTTP server over any [`Generator`], with
//!   request batching, server-sent-event streaming, a bounded queue (429 when full) and graceful
//!   shutdown;
//! - [`client`]: [`OpenAiClient`], a [`Generator`] for `openai:BASE_URL#MODEL` specs, with
//!   concurrency, retries with backoff and jitter, a request timeout and an API key from the
//!   environment that is never shown;
//! - [`retry`]: backoff with jitter and a defensive `Retry-After`, shared with the HTTP reward
//!   models of safetune-eval;
//! - [`rows`]: a resumable row runner writing JSONL, for judges and other stages;
//! - [`protocol`]: the serde wire types.
//!
//! [`load_generator`] turns any model spec into a generator: remote specs become an
//! [`OpenAiClient`], local ones a [`LocalEngine`].
//!
//! ```no_run
//! use std::sync::Arc;
//! use safetune_model::{GenRequest, Generator, LoadOptions, ModelSpec, Prompt, Sampling};
//! use safetune_openai::*;
//!
//! // Serve a local model on a free port...
//! let spec = ModelSpec::parse("model.gguf")?;
//! let model = load_generator(&spec, &LoadOptions::default(), &ClientConfig::default())?;
//! let server = start(model, ServeConfig { port: 0, ..Default::default() })?;
//!
//! // ...and use it (or any OpenAI-compatible server) as a Generator.
//! let client = OpenAiClient::from_spec(&format!("openai:{}#model", server.base_url()), ClientConfig::default())?;
//! let rows = vec![RowInput {
//!     id: "q1".into(),
//!     request: GenRequest { prompt: Prompt::Chat(vec![safetune_data::Message::user("Hi!")]), sampling: Sampling::default() },
//! }];
//! // Resumable: rerunning skips ids already in out.jsonl.
//! run_rows(&client, &rows, "out.jsonl".as_ref(), &RunOptions::default(),
//!     &mut |_, out| serde_json::json!({"response": out.text}), &mut |_| {})?;
//! server.shutdown()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![forbid(unsafe_code)]

pub mod access;
pub mod client;
pub mod pool;
pub mod protocol;
pub mod retry;
pub mod rows;
pub mod server;
pub mod testing;

use std::sync::Arc;

pub use client::{ClientConfig, LoraLoad, OpenAiClient, OpenAiSpec};
pub use pool::EndpointPool;
pub use rows::{run_rows, RowInput, RunError, RunOptions, RunProgress};
pub use server::{
    serve, start, start_with_loras, LoraLoadError, LoraLoader, Loras, ServeConfig, ServeError,
    ServerHandle, ServerStats,
};

use safetune_model::backend::Generator;
use safetune_model::{LoadOptions, LocalEngine, ModelError, ModelSpec};

/// A generator for any model spec: `openai:` specs get an [`OpenAiClient`] with `client`,
/// local ones are loaded with [`LocalEngine::load`] and `load`.
pub fn load_generator(
    spec: &ModelSpec,
    load: &LoadOptions,
    client: &ClientConfig,
) -> Result<Arc<dyn Generator>, ModelError> {
    match OpenAiSpec::from_model_spec(spec) {
        Some(remote) => Ok(Arc::new(OpenAiClient::try_new(remote, client.clone())?)),
        None => Ok(Arc::new(LocalEngine::load(spec, load)?)),
    }
}

/// A random number from the standard library's per-process hash keys and a counter: enough
/// for retry jitter, request ids and default seeds, without a `rand` dependency.
pub(crate) fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    if let Ok(d) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        h.write_u128(d.as_nanos());
    }
    h.finish()
}
