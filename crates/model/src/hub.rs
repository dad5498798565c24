//! `hf:ORG/NAME[@REVISION]`: downloads a Hugging Face model repository (config, tokenizer,
//! safetensors shards) through the `hf-hub` crate, honouring `HF_ENDPOINT` (e.g. a mirror or a
//! local test server) and `HF_HOME` (the cache), and returns the local snapshot directory.

use std::path::PathBuf;

use hf_hub::api::sync::{ApiBuilder, ApiRepo};
use hf_hub::{Repo, RepoType};

use crate::error::{ModelError, Result};

fn hub_err(repo: &str, file: &str, e: impl std::fmt::Display) -> ModelError {
    let endpoint = std::env::var("HF_ENDPOINT").unwrap_or_else(|_| "https://huggingface.co".into());
    ModelError::Spec {
        spec: format!("hf:{repo}"),
        message: format!("cannot download {file} from {endpoint}: {e} (hint: set HF_ENDPOINT for a mirror; HF_HOME holds the cache)"),
    }
}

/// A client for one model repository at a revision (default `main`), from the environment
/// (`HF_ENDPOINT`, `HF_HOME`).
fn repo_handle(repo: &str, revision: Option<&str>) -> Result<ApiRepo> {
    let api = ApiBuilder::from_env()
        .with_progress(false)
        .build()
        .map_err(|e| hub_err(repo, "(client setup)", e))?;
    Ok(api.repo(Repo::with_revision(
        repo.to_string(),
        RepoType::Model,
        revision.unwrap_or("main").to_string(),
    )))
}

/// Downloads (or finds in the cache) one file of a model repository; `Ok(None)` if the
/// repository has no such file.
pub fn download_file(repo: &str, revision: Option<&str>, file: &str) -> Result<Option<PathBuf>> {
    let handle = repo_handle(repo, revision)?;
    match handle.get(file) {
        Ok(p) => Ok(Some(p)),
        // ureq reports an HTTP status as "URL: status code 404".
        Err(hf_hub::api::sync::ApiError::RequestError(e))
            if e.to_string().ends_with("status code 404") =>
        {
            Ok(None)
        }
        Err(e) => Err(hub_err(repo, file, e)),
    }
}

/// Downloads (or finds in the cache) what a Llama-family model needs: `config.json`,
/// `tokenizer.json`, `tokenizer_config.json` if present, and `model.safetensors` or the shards
/// listed in `model.safetensors.index.json`. Returns the snapshot directory holding them.
pub fn download_model(repo: &str, revision: Option<&str>) -> Result<PathBuf> {
    let handle = repo_handle(repo, revision)?;
    let get = |file: &str| handle.get(file).map_err(|e| hub_err(repo, file, e));
    let config = get("config.json")?;
    get("tokenizer.json")?;
    // Optional files: absent is fine.
    for optional in ["tokenizer_config.json", "generation_config.json"] {
        let _ = handle.get(optional);
    }
    match handle.get("model.safetensors.index.json") {
        Ok(index_path) => {
            let text =
                std::fs::read_to_string(&index_path).map_err(|e| ModelError::io(&index_path, e))?;
            let json: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| ModelError::Json {
                    path: index_path.clone(),
                    source: e,
                })?;
            let mut shards: Vec<String> = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| ModelError::format(&index_path, "no `weight_map` object"))?
                .values()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect();
            shards.sort();
            shards.dedup();
            for s in &shards {
                get(s)?;
            }
        }
        Err(index_err) => {
            handle.get("model.safetensors").map_err(|e| {
                hub_err(
                    repo,
                    "model.safetensors",
                    format!("{e}; and model.safetensors.index.json: {index_err}"),
                )
            })?;
        }
    }
    config.parent().map(|p| p.to_path_buf()).ok_or_else(|| {
        ModelError::Other(format!(
            "hf:{repo}: the cache path {} has no parent",
            config.display()
        ))
    })
}
