//! Errors of the evaluation stages: each names the file, line or field at fault.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: line {line}: {message}")]
    Record {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("judge `{judge}`: {message}")]
    Judge { judge: String, message: String },
    #[error(transparent)]
    Model(#[from] safetune_model::ModelError),
    #[error(transparent)]
    Data(#[from] safetune_data::DataError),
    #[error(transparent)]
    Run(#[from] safetune_openai::RunError),
    #[error("tensor: {0}")]
    Tensor(#[from] candle_core::Error),
    #[error("{0}")]
    Other(String),
}

impl EvalError {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        EvalError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
    pub fn record(path: &Path, line: usize, message: impl Into<String>) -> Self {
        EvalError::Record {
            path: path.to_path_buf(),
            line,
            message: message.into(),
        }
    }
    pub fn file(path: &Path, message: impl Into<String>) -> Self {
        EvalError::File {
            path: path.to_path_buf(),
            message: message.into(),
        }
    }
}

pub type Result<T, E = EvalError> = std::result::Result<T, E>;
