//! The one error type of config parsing, the model and the planner: what went wrong,
//! where (file, field), and why.

use std::fmt;
use std::path::{Path, PathBuf};

/// An error a user can cause (bad config, checkpoint, input), with its context.
#[derive(Debug, Clone)]
pub struct Error {
    /// the file involved, if any
    pub file: Option<PathBuf>,
    /// the field or tensor name involved, if any
    pub field: Option<String>,
    /// what is wrong
    pub reason: String,
}

impl Error {
    /// An error with only a reason.
    pub fn msg(reason: impl Into<String>) -> Self {
        Error { file: None, field: None, reason: reason.into() }
    }
    /// An error about a field (config key or tensor name).
    pub fn field(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Error { file: None, field: Some(field.into()), reason: reason.into() }
    }
    /// Attaches the file, unless one is already set.
    pub fn in_file(mut self, file: &Path) -> Self {
        if self.file.is_none() {
            self.file = Some(file.to_path_buf());
        }
        self
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(p) = &self.file {
            write!(f, "{}: ", p.display())?;
        }
        if let Some(field) = &self.field {
            write!(f, "`{field}`: ")?;
        }
        write!(f, "{}", self.reason)
    }
}

impl std::error::Error for Error {}

/// Result with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
