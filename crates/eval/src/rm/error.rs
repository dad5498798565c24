//! Errors of reward-model scoring and analysis; each names the file, line, field or endpoint.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum RmError {
    #[error(transparent)]
    Data(#[from] safetune_data::DataError),
    #[error(transparent)]
    Model(#[from] safetune_model::ModelError),
    #[error("{path}: {source}", path = path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A bad record in an input file.
    #[error("{path}:{line}: {}{message}", field.as_deref().map(|f| format!("field `{f}`: ")).unwrap_or_default(), path = path.display())]
    Input {
        path: PathBuf,
        line: usize,
        field: Option<String>,
        message: String,
    },
    /// A reward-model spec that cannot be understood.
    #[error("reward model {spec:?}: {message}")]
    Spec { spec: String, message: String },
    /// A backend failure (HTTP error after retries, a model that rejects an input).
    #[error("{0}")]
    Backend(String),
    /// Scoring stopped part way; the finished rows are kept.
    #[error(
        "scoring failed with {finished} of {total} rows finished in {path}: {message}\nhint: the finished rows are kept; rerun the same command to resume", path = path.display()
    )]
    Partial {
        path: PathBuf,
        finished: usize,
        total: usize,
        message: String,
    },
    #[error("{0}")]
    Other(String),
}

impl RmError {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        RmError::Io {
            path: path.into(),
            source,
        }
    }
    pub fn input(
        path: impl Into<PathBuf>,
        line: usize,
        field: Option<&str>,
        message: impl Into<String>,
    ) -> Self {
        RmError::Input {
            path: path.into(),
            line,
            field: field.map(str::to_string),
            message: message.into(),
        }
    }
}

pub type Result<T, E = RmError> = std::result::Result<T, E>;
