use thiserror::Error;

/// Everything that can go wrong while decoding or validating protocol data.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ProtoError {
    #[error("message of {0} bytes is larger than the limit of {limit} bytes", limit = crate::MAX_MESSAGE_BYTES)]
    TooLarge(usize),
    #[error("malformed message: {0}")]
    Malformed(String),
    #[error("message has {0} trailing bytes")]
    TrailingBytes(usize),
    #[error("invalid path {path:?}: {reason}")]
    InvalidPath { path: String, reason: &'static str },
}
