//! Errors of the model crate. Every variant names the file, tensor or field it is about.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("config field `{field}`: {message}")]
    Config { field: String, message: String },
    #[error("{path}: tensor `{tensor}` not found{hint}")]
    MissingTensor {
        path: PathBuf,
        tensor: String,
        hint: String,
    },
    #[error("{path}: tensor `{tensor}` has shape {actual:?}, expected {expected:?}")]
    ShapeMismatch {
        path: PathBuf,
        tensor: String,
        expected: Vec<usize>,
        actual: Vec<usize>,
    },
    #[error("{path}: {message}")]
    Format { path: PathBuf, message: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error("model spec {spec:?}: {message}")]
    Spec { spec: String, message: String },
    #[error("{context}: {source}")]
    Candle {
        context: String,
        source: candle_core::Error,
    },
    #[error("{0}")]
    Other(String),
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;

impl ModelError {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        ModelError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
    pub fn format(path: &Path, message: impl Into<String>) -> Self {
        ModelError::Format {
            path: path.to_path_buf(),
            message: message.into(),
        }
    }
}

impl From<candle_core::Error> for ModelError {
    fn from(source: candle_core::Error) -> Self {
        ModelError::Candle {
            context: "tensor op".into(),
            source,
        }
    }
}

/// Adds context to candle errors: `.ctx("layer 3 attention")?`.
pub trait CandleContext<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> CandleContext<T> for std::result::Result<T, candle_core::Error> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| ModelError::Candle {
            context: context(),
            source,
        })
    }
}
