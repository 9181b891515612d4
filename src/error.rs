//! The crate's one error type. Messages are one line, name the file or field at fault,
//! and put paths last so that long paths do not hide the reason.

use std::path::{Path, PathBuf};

/// Every error the library returns.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor operation failed (shape mismatch, device error, ...).
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// Reading or writing a file failed where no more specific variant applies.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// A JSON value could not be encoded or decoded.
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    /// A path given by the user does not exist.
    #[error("no such file or folder: {}", path.display())]
    NotFound {
        /// The missing path.
        path: PathBuf,
    },
    /// A file exists but could not be read as what it should be.
    #[error("{message}: {}", path.display())]
    BadFile {
        /// The file at fault.
        path: PathBuf,
        /// What is wrong with it, in plain words.
        message: String,
    },
    /// A required configuration field is absent or has the wrong type.
    #[error("missing or invalid field `{field}` in {}", path.display())]
    BadField {
        /// The file that should hold the field.
        path: PathBuf,
        /// The field name, as spelled in the file.
        field: String,
    },
    /// The checkpoint's architecture is not one tunelens can run.
    #[error("unsupported architecture `{arch}` (supported: llama, mistral, qwen2, qwen3, phi3, gemma2, gemma3, olmo2 and their fine-tunes): {}", path.display())]
    UnsupportedArchitecture {
        /// The architecture named by the checkpoint.
        arch: String,
        /// The checkpoint file or folder.
        path: PathBuf,
    },
    /// A tokenizer could not be built or failed on an input.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A chat template failed to parse or render.
    #[error("chat template: {0}")]
    ChatTemplate(String),
    /// The prompt has no tokens.
    #[error("the prompt is empty")]
    EmptyPrompt,
    /// The prompt (plus requested new tokens) does not fit the model's context.
    #[error("{len} tokens exceed the model's context of {max} tokens")]
    PromptTooLong {
        /// Tokens requested.
        len: usize,
        /// The context length.
        max: usize,
    },
    /// A setting or argument is out of range.
    #[error("invalid {name}: {message}")]
    InvalidArgument {
        /// The setting's name.
        name: String,
        /// Why it is invalid.
        message: String,
    },
    /// The user cancelled the job.
    #[error("cancelled")]
    Cancelled,
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A file that could not be read as what it should be.
    pub fn bad_file(path: &Path, message: impl std::fmt::Display) -> Self {
        Self::BadFile {
            path: path.to_path_buf(),
            message: message.to_string(),
        }
    }

    /// A configuration field that is missing or malformed.
    pub fn bad_field(path: &Path, field: impl Into<String>) -> Self {
        Self::BadField {
            path: path.to_path_buf(),
            field: field.into(),
        }
    }

    /// An argument that is out of range.
    pub fn invalid(name: impl Into<String>, message: impl Into<String>) -> Self {
        Self::InvalidArgument {
            name: name.into(),
            message: message.into(),
        }
    }
}

/// A serde_json error's message without its "at line L column C" suffix, which means nothing to
/// a user reading about a config file (the message already names the field).
pub(crate) fn json_message(err: &serde_json::Error) -> String {
    let message = err.to_string();
    message
        .split(" at line")
        .next()
        .unwrap_or(&message)
        .to_owned()
}
