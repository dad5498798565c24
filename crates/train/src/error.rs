//! Errors of the training crate: each names the file, field, tensor or step it is about.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Model(#[from] safetune_model::ModelError),
    #[error(transparent)]
    Data(#[from] safetune_data::error::DataError),
    #[error("{path}: {source}", path = path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{context}: {source}")]
    Tensor {
        context: String,
        source: candle_core::Error,
    },
    #[error("config {origin}: {message}")]
    Config { origin: String, message: String },
    #[error("checkpoint {path}: {message}", path = path.display())]
    Checkpoint { path: PathBuf, message: String },
    #[error("dataset: {0}")]
    Dataset(String),
    #[error("training diverged at step {step}: loss is {loss}")]
    Diverged { step: usize, loss: f32 },
}

pub type Result<T, E = TrainError> = std::result::Result<T, E>;

impl TrainError {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        TrainError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
    pub fn config(origin: impl Into<String>, message: impl Into<String>) -> Self {
        TrainError::Config {
            origin: origin.into(),
            message: message.into(),
        }
    }
    pub fn checkpoint(path: &Path, message: impl Into<String>) -> Self {
        TrainError::Checkpoint {
            path: path.to_path_buf(),
            message: message.into(),
        }
    }
}

impl From<candle_core::Error> for TrainError {
    fn from(source: candle_core::Error) -> Self {
        TrainError::Tensor {
            context: "tensor op".into(),
            source,
        }
    }
}

/// Adds context to candle results.
pub trait TensorContext<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> TensorContext<T> for candle_core::Result<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| TrainError::Tensor {
            context: what(),
            source,
        })
    }
}
