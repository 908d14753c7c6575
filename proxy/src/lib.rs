//! The devloop wire protocol: the one crate the laptop cli and the in-container agent share.
//!
//! The types in [`msg`] *are* the wire format: every WebSocket binary message carries exactly
//! one [`msg::LaptopMsg`] (laptop -> agent) or [`msg::AgentMsg`] (agent -> laptop), encoded by
//! [`codec`]. docs/PROTOCOL.md lists which changes keep compatibility and which need a new
//! [`PROTOCOL_VERSION`].
// One function takes ownership of descriptors received over a Unix socket (`handoff`).
#![deny(unsafe_code)]

pub mod codec;
pub mod error;
#[cfg(unix)]
#[doc(hidden)]
pub mod fuzzing;
#[cfg(unix)]
pub mod handoff;
pub mod msg;
pub mod path;
pub mod route;
pub mod tree;
pub mod tunnel;

pub use error::ProtoError;
pub use path::RelPath;

/// Eight bytes at the start of every handshake, so that a stray client of another protocol
/// is told apart from a devloop peer of another version.
pub const MAGIC: [u8; 8] = *b"DEVLOOP\x01";

/// Bumped on every breaking change of the message types (see docs/PROTOCOL.md).
pub const PROTOCOL_VERSION: u16 = 1;

/// The largest message either side accepts. File contents above [`MAX_INLINE_FILE`] travel as
/// tar chunks, so no single message needs to be larger than this.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// Files up to this size may ride inline in a [`msg::FileOp::Put`]; larger ones go in a tar stream.
pub const MAX_INLINE_FILE: u64 = 1024 * 1024;

/// Size of the chunks a tar stream is cut into, small enough that a large upload never
/// holds the connection long enough to delay a restart or a log line noticeably.
pub const TAR_CHUNK_BYTES: usize = 256 * 1024;

/// The path of the WebSocket endpoint the agent serves.
pub const WS_PATH: &str = "/devloop";

/// The port an agent takes control connections on, in its container or pod (the one
/// declaration: the cli's back ends and the agent's defaults use it).
pub const AGENT_PORT: u16 = 7717;

/// Where a routing agent (`devloop-agent route`) listens for the cli, on the loopback of the
/// service's network namespace: not [`AGENT_PORT`], which a dev container's own agent holds
/// in that same namespace.
pub const ROUTE_CONTROL_PORT: u16 = 7719;

/// Capability names a peer may announce in its handshake.
pub mod caps {
    /// File operations (`Batch`) and index requests.
    pub const FILES: &str = "files";
    /// Tar streams (`TarChunk`).
    pub const TAR: &str = "tar";
    /// Process supervision: `Restart`, `Run`, process events and logs.
    pub const PROCESS: &str = "process";
    /// Tunnel streams (`LaptopMsg::Tunnel`, `AgentMsg::Tunnel`): multiplexed byte streams
    /// with per-stream flow control, see [`crate::tunnel`].
    pub const TUNNEL: &str = "tunnel";
    /// Per-request routing (`Hold`, `ListHolders`, `Release`, request lines): an agent
    /// beside a running original that takes only the requests a holder's filter names.
    pub const ROUTE: &str = "route";
}

/// The version of this crate, sent in the handshake by both peers.
pub const CRATE_VERSION: &str = env!("CARGO_PKG_VERSION");
