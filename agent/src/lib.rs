//! The devloop agent: one static binary that runs inside any linux container. It applies file
//! operations under a sync root (confined: no `..`, no writes through symlinks), supervises
//! the service's process and forwards its logs, all over one WebSocket per cli that presents
//! the session token. See docs/ARCHITECTURE.md for the whole picture.
#![forbid(unsafe_code)]

pub mod apply;
pub mod bridge;
pub mod dev;
pub mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod guard;
pub mod http;
pub mod index;
pub mod intercept;
pub mod lease;
pub mod logs;
pub mod netlink;
pub mod redirect;
pub mod relay;
pub mod resets;
pub mod routing;
pub mod seed;
pub mod server;
pub mod supervisor;
pub mod tarstream;

pub use dev::{DevAgent, DevConfig};
pub use error::AgentError;
