use thiserror::Error;

/// Everything the engine can fail with. Messages are meant for end users.
#[derive(Debug, Error)]
pub enum EngineError {
    #[error("unsupported or unsafe model format: {0}")]
    UnsafeFormat(String),
    #[error("invalid safetensors file: {0}")]
    InvalidSafetensors(String),
    #[error("unrecognised checkpoint: {0}")]
    UnknownModel(String),
    #[error("unknown scheduler {name:?}; valid: {valid}")]
    UnknownScheduler { name: String, valid: String },
    #[error("invalid parameter: {0}")]
    InvalidParam(String),
    #[error("no checkpoint loaded")]
    NoCheckpoint,
    #[error("cancelled")]
    Cancelled,
    #[error("io error: {0}")]
    Io(#[from] std::io::Error),
    #[error("tensor error: {0}")]
    Tensor(#[from] candle_core::Error),
}

pub type Result<T, E = EngineError> = std::result::Result<T, E>;
