//! LoRA adapters served beside the base model, as vLLM serves them: each adapter answers under
//! its own name (a request's `model`), `/v1/models` lists it with `root` (its directory) and
//! `parent` (the base), and with [`ServeConfig::allow_runtime_lora`] (and an API key) two
//! endpoints add and remove adapters while the server runs:
//!
//! - `POST /v1/load_lora_adapter` `{"lora_name": NAME, "lora_path": DIR}`: 200 with the text
//!   `Success: LoRA adapter 'NAME' added successfully.`; 400 (`InvalidUserInput`) when a field is
//!   missing or NAME is loaded already; 404 (`NotFoundError`) when DIR does not exist; 400
//!   (`BadRequestError`) when the adapter cannot be applied to the base (the message names the
//!   file: a bad `adapter_config.json`, a full checkpoint, a layer or shape that does not fit).
//! - `POST /v1/unload_lora_adapter` `{"lora_name": NAME}`: 200 with the text
//!   `Success: LoRA adapter 'NAME' removed successfully.`; 404 (`NotFoundError`) for a name that
//!   is not loaded.
//!
//! Without the setting neither route exists (404, as vLLM answers when runtime updating is not
//! allowed). Error bodies keep this server's OpenAI shape (`{"error": {...}}`) with vLLM's
//! `type` names.
//!
//! Each adapter is its own [`Generator`] (for the local engine: the base's shared weights with
//! the adapter's low-rank path, [`LocalEngine::with_adapter`]); the scheduler never puts
//! requests of different adapters (or an adapter and the base) in one batch. A job keeps the
//! generator it was queued with, so unloading an adapter does not fail requests already queued.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use safetune_model::backend::Generator;
use safetune_model::{LocalEngine, ModelError};
use serde::Deserialize;

use super::http::Request;
use super::routes::{parse_body, Handled, HttpError};
use super::Shared;
use crate::protocol::ErrorResponse;

/// Why an adapter could not be loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoraLoadError {
    /// The adapter's directory does not exist (404, as vLLM's "No adapter found").
    NotFound(String),
    /// It exists but cannot be applied to the base (400); the message names the file.
    Invalid(String),
}

impl std::fmt::Display for LoraLoadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LoraLoadError::NotFound(m) | LoraLoadError::Invalid(m) => f.write_str(m),
        }
    }
}

/// Makes the generator that answers for one adapter.
pub trait LoraLoader: Send + Sync {
    /// The base with the adapter at `path` applied, answering as `name`.
    fn load_lora(&self, name: &str, path: &Path) -> Result<Arc<dyn Generator>, LoraLoadError>;
}

impl LoraLoader for LocalEngine {
    fn load_lora(&self, name: &str, path: &Path) -> Result<Arc<dyn Generator>, LoraLoadError> {
        if !path.exists() {
            return Err(LoraLoadError::NotFound(format!(
                "No adapter found at {}",
                path.display()
            )));
        }
        match self.with_adapter(path, name) {
            Ok(e) => Ok(Arc::new(e)),
            Err(e @ ModelError::Io { .. }) => Err(LoraLoadError::NotFound(e.to_string())),
            Err(e) => Err(LoraLoadError::Invalid(e.to_string())),
        }
    }
}

/// The adapters a server starts with and how it loads more.
#[derive(Clone)]
pub struct Loras {
    pub loader: Arc<dyn LoraLoader>,
    /// `(name, directory)` pairs loaded at start (`safetune serve --lora NAME=DIR`).
    pub modules: Vec<(String, PathBuf)>,
}

impl std::fmt::Debug for Loras {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loras")
            .field("modules", &self.modules)
            .finish()
    }
}

/// One adapter being served.
#[derive(Clone)]
pub(super) struct Served {
    pub(super) path: PathBuf,
    pub(super) generator: Arc<dyn Generator>,
}

/// The adapters a running server answers for, by name.
#[derive(Default)]
pub(super) struct Adapters {
    loader: Option<Arc<dyn LoraLoader>>,
    by_name: RwLock<BTreeMap<String, Served>>,
}

impl Adapters {
    /// Loads every module of `loras`; the first failure is an error naming the adapter.
    pub(super) fn start(loras: Option<Loras>, base_name: &str) -> Result<Adapters, String> {
        let Some(loras) = loras else {
            return Ok(Adapters::default());
        };
        let mut by_name = BTreeMap::new();
        for (name, path) in &loras.modules {
            check_name(name, base_name)?;
            if by_name.contains_key(name) {
                return Err(format!("adapter `{name}` is given twice"));
            }
            let generator = loras
                .loader
                .load_lora(name, path)
                .map_err(|e| format!("adapter `{name}` ({}): {e}", path.display()))?;
            by_name.insert(
                name.clone(),
                Served {
                    path: path.clone(),
                    generator,
                },
            );
        }
        Ok(Adapters {
            loader: Some(loras.loader),
            by_name: RwLock::new(by_name),
        })
    }

    /// Whether the server can serve adapters at all.
    pub(super) fn enabled(&self) -> bool {
        self.loader.is_some()
    }

    pub(super) fn get(&self, name: &str) -> Option<Served> {
        self.by_name
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }

    /// `(name, directory)` of every adapter, by name.
    pub(super) fn list(&self) -> Vec<(String, PathBuf)> {
        self.by_name
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(n, s)| (n.clone(), s.path.clone()))
            .collect()
    }
}

fn check_name(name: &str, base_name: &str) -> Result<(), String> {
    if name.trim().is_empty() {
        return Err("an adapter name must not be empty".into());
    }
    if name == base_name {
        return Err(format!(
            "adapter name `{name}` is the base model's own name; pick another"
        ));
    }
    Ok(())
}

#[derive(Deserialize)]
struct LoadRequest {
    #[serde(default)]
    lora_name: Option<String>,
    #[serde(default)]
    lora_path: Option<String>,
}

#[derive(Deserialize)]
struct UnloadRequest {
    #[serde(default)]
    lora_name: Option<String>,
}

fn vllm_error(status: u16, kind: &str, message: String) -> HttpError {
    HttpError::new(status, ErrorResponse::new(message, kind))
}

fn success(request: &mut Request<'_>, text: &str) -> Handled {
    request.respond(
        200,
        &[("Content-Type", "text/plain; charset=utf-8")],
        text.as_bytes(),
    );
    Ok(())
}

/// `POST /v1/load_lora_adapter`.
pub(super) fn load(request: &mut Request<'_>, body: &[u8], shared: &Shared) -> Handled {
    let req: LoadRequest = parse_body(body)?;
    let (Some(name), Some(path)) = (
        req.lora_name.filter(|n| !n.is_empty()),
        req.lora_path.filter(|p| !p.is_empty()),
    ) else {
        return Err(vllm_error(
            400,
            "InvalidUserInput",
            "Both 'lora_name' and 'lora_path' must be provided.".into(),
        ));
    };
    let adapters = &shared.adapters;
    let Some(loader) = &adapters.loader else {
        return Err(vllm_error(
            400,
            "BadRequestError",
            "this server cannot load adapters".into(),
        ));
    };
    let already = || {
        vllm_error(
            400,
            "InvalidUserInput",
            format!("The lora adapter '{name}' has already been loaded."),
        )
    };
    if adapters.get(&name).is_some() {
        return Err(already());
    }
    check_name(&name, &shared.model_name).map_err(|m| vllm_error(400, "InvalidUserInput", m))?;
    let path = PathBuf::from(path);
    let generator = loader.load_lora(&name, &path).map_err(|e| match e {
        LoraLoadError::NotFound(m) => vllm_error(404, "NotFoundError", m),
        LoraLoadError::Invalid(m) => vllm_error(400, "BadRequestError", m),
    })?;
    {
        let mut map = adapters.by_name.write().unwrap_or_else(|e| e.into_inner());
        if map.contains_key(&name) {
            return Err(already());
        }
        map.insert(name.clone(), Served { path, generator });
    }
    success(
        request,
        &format!("Success: LoRA adapter '{name}' added successfully."),
    )
}

/// `POST /v1/unload_lora_adapter`.
pub(super) fn unload(request: &mut Request<'_>, body: &[u8], shared: &Shared) -> Handled {
    let req: UnloadRequest = parse_body(body)?;
    let Some(name) = req.lora_name.filter(|n| !n.is_empty()) else {
        return Err(vllm_error(
            400,
            "InvalidUserInput",
            "'lora_name' must be provided.".into(),
        ));
    };
    let removed = shared
        .adapters
        .by_name
        .write()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&name);
    if removed.is_none() {
        return Err(vllm_error(
            404,
            "NotFoundError",
            format!("The lora adapter '{name}' cannot be found."),
        ));
    }
    success(
        request,
        &format!("Success: LoRA adapter '{name}' removed successfully."),
    )
}
