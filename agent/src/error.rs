//! The one error type of the agent's library code. The binary's edge wraps it in `anyhow`.

use std::path::PathBuf;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum AgentError {
    /// A parent component of an operation's path is a symlink: writing through it could
    /// leave the root, so the operation is refused even when the link points inside.
    #[error("refused {op} {path}: parent {parent} is a symlink, and the agent never writes through symlinks")]
    ParentIsSymlink {
        op: &'static str,
        path: String,
        parent: String,
    },

    #[error("refused {op} {path}: parent {parent} is not a directory")]
    ParentNotDir {
        op: &'static str,
        path: String,
        parent: String,
    },

    #[error("refused chmod {path}: it is a symlink, and the agent never changes what a symlink points to")]
    ChmodSymlink { path: String },

    #[error("{op} {path}: no such file or directory")]
    NotFound { op: &'static str, path: String },

    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },

    #[error("tar entry {entry:?} refused: {reason}")]
    TarEntry { entry: String, reason: String },

    #[error("tar stream: {0}")]
    Tar(#[source] std::io::Error),

    #[error("token file {path}: {reason}; the cli writes the session token there before it starts the agent")]
    Token { path: PathBuf, reason: String },
}

impl AgentError {
    pub fn io(op: &'static str, path: impl std::fmt::Display, source: std::io::Error) -> Self {
        AgentError::Io {
            op,
            path: path.to_string(),
            source,
        }
    }
}
