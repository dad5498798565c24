//! Model specs: how a user names a model anywhere in safetune.
//!
//! - `path/to/model.gguf`: a GGUF file (weights, config, tokenizer and chat template inside);
//! - `path/to/dir`: a Hugging Face directory (config.json, tokenizer.json,
//!   tokenizer_config.json, *.safetensors, sharded or not);
//! - `hf:ORG/NAME[@REVISION]`: a Hugging Face hub repository;
//! - `openai:BASE_URL#MODEL`: a model behind an OpenAI-compatible server.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::error::ModelError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSpec {
    Gguf(PathBuf),
    HfDir(PathBuf),
    Hub {
        repo: String,
        revision: Option<String>,
    },
    OpenAi {
        base_url: String,
        model: String,
    },
}

impl ModelSpec {
    /// Parses a spec. Local paths must exist; the error for a missing one says which forms exist.
    pub fn parse(s: &str) -> Result<ModelSpec, ModelError> {
        let err = |message: String| ModelError::Spec {
            spec: s.to_string(),
            message,
        };
        if let Some(rest) = s.strip_prefix("hf:") {
            let (repo, revision) = match rest.split_once('@') {
                Some((r, rev)) if !rev.is_empty() => (r, Some(rev.to_string())),
                Some(_) => return Err(err("empty revision after `@`".into())),
                None => (rest, None),
            };
            let parts: Vec<&str> = repo.split('/').collect();
            if parts.len() != 2 || parts.iter().any(|p| p.is_empty()) {
                return Err(err("expected hf:ORG/NAME[@REVISION]".into()));
            }
            return Ok(ModelSpec::Hub {
                repo: repo.to_string(),
                revision,
            });
        }
        if let Some(rest) = s.strip_prefix("openai:") {
            let (base_url, model) = rest.rsplit_once('#').ok_or_else(|| {
                err("expected openai:BASE_URL#MODEL (the model name after `#`)".into())
            })?;
            if !(base_url.starts_with("http://") || base_url.starts_with("https://")) {
                return Err(err(
                    "the base URL must start with http:// or https://".into()
                ));
            }
            if model.is_empty() {
                return Err(err("empty model name after `#`".into()));
            }
            return Ok(ModelSpec::OpenAi {
                base_url: base_url.trim_end_matches('/').to_string(),
                model: model.to_string(),
            });
        }
        let path = Path::new(s);
        if path.is_dir() {
            return Ok(ModelSpec::HfDir(path.to_path_buf()));
        }
        if path.is_file() {
            if is_gguf(path) {
                return Ok(ModelSpec::Gguf(path.to_path_buf()));
            }
            return Err(err(
                "the file is not a GGUF file (hint: for safetensors, name the model's directory)"
                    .into(),
            ));
        }
        Err(err(
            "no such file or directory (hint: a model is a .gguf file, a Hugging Face directory, hf:ORG/NAME[@REVISION] or openai:BASE_URL#MODEL)"
                .into(),
        ))
    }

    /// A short name for logs and `/v1/models`: the file stem, directory name, repo or model.
    pub fn model_id(&self) -> String {
        match self {
            ModelSpec::Gguf(p) => p
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default(),
            ModelSpec::HfDir(p) => std::fs::canonicalize(p)
                .ok()
                .and_then(|p| p.file_name().map(|s| s.to_string_lossy().into_owned()))
                .unwrap_or_else(|| p.display().to_string()),
            ModelSpec::Hub { repo, .. } => repo.clone(),
            ModelSpec::OpenAi { model, .. } => model.clone(),
        }
    }
}

fn is_gguf(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    match std::fs::File::open(path).and_then(|mut f| f.read_exact(&mut magic)) {
        Ok(()) => &magic == b"GGUF",
        Err(_) => path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("gguf")),
    }
}

impl FromStr for ModelSpec {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ModelSpec::parse(s)
    }
}

impl fmt::Display for ModelSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ModelSpec::Gguf(p) | ModelSpec::HfDir(p) => write!(f, "{}", p.display()),
            ModelSpec::Hub {
                repo,
                revision: None,
            } => write!(f, "hf:{repo}"),
            ModelSpec::Hub {
                repo,
                revision: Some(r),
            } => write!(f, "hf:{repo}@{r}"),
            ModelSpec::OpenAi { base_url, model } => write!(f, "openai:{base_url}#{model}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_form() {
        assert_eq!(
            ModelSpec::parse("hf:HuggingFaceTB/SmolLM2-135M-Instruct@main").unwrap(),
            ModelSpec::Hub {
                repo: "HuggingFaceTB/SmolLM2-135M-Instruct".into(),
                revision: Some("main".into())
            }
        );
        assert_eq!(
            ModelSpec::parse("hf:org/name").unwrap(),
            ModelSpec::Hub {
                repo: "org/name".into(),
                revision: None
            }
        );
        let o = ModelSpec::parse("openai:http://127.0.0.1:8000/v1/#smol").unwrap();
        assert_eq!(
            o,
            ModelSpec::OpenAi {
                base_url: "http://127.0.0.1:8000/v1".into(),
                model: "smol".into()
            }
        );
        assert_eq!(o.to_string(), "openai:http://127.0.0.1:8000/v1#smol");
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            ModelSpec::parse(dir.path().to_str().unwrap()).unwrap(),
            ModelSpec::HfDir(_)
        ));
        let g = dir.path().join("m.gguf");
        std::fs::write(&g, b"GGUF....").unwrap();
        assert!(matches!(
            ModelSpec::parse(g.to_str().unwrap()).unwrap(),
            ModelSpec::Gguf(_)
        ));
    }

    #[test]
    fn bad_specs_say_what_is_expected() {
        for bad in [
            "hf:nope",
            "hf:a/b@",
            "openai:http://x",
            "openai:ftp://x#m",
            "/no/such/model.gguf",
        ] {
            let e = ModelSpec::parse(bad).unwrap_err().to_string();
            assert!(e.contains(bad), "{e}");
        }
    }
}
