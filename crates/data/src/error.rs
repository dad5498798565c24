//! Errors of the dataset layer. Every message names the file, and where it applies the line
//! (1-based) and the field, so a user can jump straight to the problem.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {source}", path = path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },

    /// A record that cannot be turned into a conversation.
    #[error("{path}:{line}: {}{message}", field.as_deref().map(|f| format!("field `{f}`: ")).unwrap_or_default(), path = path.display())]
    Record {
        path: PathBuf,
        line: usize,
        field: Option<String>,
        message: String,
    },

    /// A problem with the file as a whole (unknown format, bad header, unreadable Parquet).
    #[error("{path}: {message}", path = path.display())]
    File { path: PathBuf, message: String },

    #[error("{0}")]
    Other(String),
}

impl DataError {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DataError::Io {
            path: path.into(),
            source,
        }
    }

    pub fn record(
        path: impl Into<PathBuf>,
        line: usize,
        field: Option<&str>,
        message: impl Into<String>,
    ) -> Self {
        DataError::Record {
            path: path.into(),
            line,
            field: field.map(str::to_string),
            message: message.into(),
        }
    }

    pub fn file(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        DataError::File {
            path: path.into(),
            message: message.into(),
        }
    }

    /// True for errors confined to one record, which `--skip-invalid` may skip.
    pub fn is_record_error(&self) -> bool {
        matches!(self, DataError::Record { .. })
    }
}

pub type Result<T, E = DataError> = std::result::Result<T, E>;
