//! The message types. Their postcard encoding is the wire format: enum variants are encoded by
//! index, so new variants go at the end of an enum and are only sent to a peer that announced
//! the capability that guards them (docs/PROTOCOL.md).

use serde::{Deserialize, Serialize};

use crate::tree::Entry;
use crate::tunnel::TunnelFrame;
use crate::RelPath;

/// First message of the laptop side. Nothing else is accepted before it, and a wrong magic,
/// version or token ends the connection with [`AgentMsg::Refused`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    pub magic: [u8; 8],
    pub protocol_version: u16,
    pub cli_version: String,
    pub capabilities: Vec<String>,
    /// The per-session secret the cli created and handed to the agent in a file.
    pub token: String,
}

/// The agent's answer to an accepted [`Hello`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Welcome {
    pub protocol_version: u16,
    pub agent_version: String,
    pub capabilities: Vec<String>,
    /// The agent's sync root inside the container.
    pub root: String,
    /// The supervised process as it is now.
    pub process: ProcessStatus,
    /// Recent output of the process, so a cli that connects late sees why it crashed.
    pub recent_logs: Vec<LogLine>,
}

/// Laptop -> agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum LaptopMsg {
    Hello(Hello),
    /// Ask for the agent's view of the root; answered by [`AgentMsg::Index`].
    Index {
        req: u64,
    },
    /// Apply file operations in order; answered by one [`AgentMsg::Ack`].
    Batch {
        req: u64,
        ops: Vec<FileOp>,
    },
    /// A piece of a tar stream. The agent applies entries as they arrive (with the same
    /// confinement as [`FileOp`]s) and acknowledges the stream once, after the `last` chunk.
    TarChunk {
        req: u64,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
        last: bool,
    },
    /// Restart the supervised process (stop it, then start it again); acknowledged.
    Restart {
        req: u64,
    },
    /// Run a command to completion in the working directory, then acknowledge with its exit
    /// status. Its output arrives as log lines.
    Run {
        req: u64,
        argv: Vec<String>,
    },
    /// Liveness probe; answered by [`AgentMsg::Pong`].
    Ping {
        nonce: u64,
    },
    /// A frame of a tunnel stream (capability [`crate::caps::TUNNEL`]).
    Tunnel(TunnelFrame),
    /// Route the requests `hold` names to this connection's laptop (capability
    /// [`crate::caps::ROUTE`]); answered by [`AgentMsg::Held`], or an [`AgentMsg::Ack`]
    /// with [`Outcome::Failed`] when the filter cannot work. The holder ends with the
    /// connection.
    Hold {
        req: u64,
        hold: HoldSpec,
    },
    /// Every holder of the agent, with its counts; answered by [`AgentMsg::Holders`].
    ListHolders {
        req: u64,
    },
    /// End a holder (any connection's, `leave --holder`); acknowledged. The holder's own
    /// connection is told with [`AgentMsg::Released`] and closed.
    Release {
        req: u64,
        holder: u64,
        /// `user@host` of who asks, told to the holder.
        by: String,
    },
}

/// Agent -> laptop.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum AgentMsg {
    Welcome(Welcome),
    /// The handshake failed; the agent closes the connection after this.
    Refused {
        reason: String,
    },
    Ack {
        req: u64,
        outcome: Outcome,
    },
    /// The agent's tree. Large trees come in several parts; `last` marks the final one.
    Index {
        req: u64,
        entries: Vec<(RelPath, Entry)>,
        last: bool,
    },
    Log(LogLine),
    Process(ProcessStatus),
    Pong {
        nonce: u64,
    },
    /// A frame of a tunnel stream (capability [`crate::caps::TUNNEL`]).
    Tunnel(TunnelFrame),
    /// The holder [`LaptopMsg::Hold`] asked for is in the routing table.
    Held {
        req: u64,
        holder: u64,
        /// Holders whose filters may take some of the same requests; the documented
        /// precedence decides between them.
        overlaps: Vec<HolderInfo>,
    },
    Holders {
        req: u64,
        holders: Vec<HolderInfo>,
    },
    /// A request this connection's holder took or got a copy of, once its answer ended.
    Request(RequestLine),
    /// This connection's holder was ended by `by` (`leave --holder`); the connection closes.
    Released {
        by: String,
    },
}

/// A filtered intercept: which requests of which ports go to the laptop.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HoldSpec {
    /// Service ports; the filter applies on each.
    pub ports: Vec<u16>,
    pub filter: crate::route::Filter,
    /// A copy of each matching request; callers keep the answers of the route that took it.
    pub mirror: bool,
    /// `user@host`, for `intercept list` and `leave`.
    pub who: String,
    /// A local engine: the file name of the cli's handoff socket in the agent's handoff
    /// folder; connections to the laptop are asked for there instead of tunnelled.
    pub handoff: Option<String>,
    /// Send this connection a [`RequestLine`] per request (`--quiet` asks for none: each
    /// line costs the agent and the connection a message).
    pub lines: bool,
    /// The `[sessions.NAME]` the holder belongs to, for `leave --session`.
    pub session: Option<String>,
}

/// One holder, as `intercept list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HolderInfo {
    pub id: u64,
    pub who: String,
    pub ports: Vec<u16>,
    pub filter: crate::route::Filter,
    pub mirror: bool,
    /// Milliseconds since the Unix epoch, on the agent's clock.
    pub since_ms: u64,
    /// Requests taken (a mirror: copies started).
    pub requests: u64,
    /// A mirror's copies dropped because the laptop was slow or gone.
    pub dropped: u64,
    pub session: Option<String>,
}

/// One request that reached a laptop (or was copied to it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestLine {
    pub holder: u64,
    pub port: u16,
    /// When the request arrived, milliseconds since the Unix epoch on the agent's clock.
    pub at_ms: u64,
    pub method: String,
    pub path: String,
    /// The answer's status; 0 when there was none.
    pub status: u16,
    /// Microseconds from the request to the answer's head.
    pub answer_us: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub error: Option<String>,
    /// A mirror's copy (its answer went nowhere).
    pub copy: bool,
}

/// How a request ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// Done; `applied` counts file operations (or tar entries) applied.
    Ok { applied: u64 },
    /// A `Run` finished with this exit code (None: killed by a signal).
    Exited { code: Option<i32> },
    /// Nothing after the failing operation was applied; `error` says which and why.
    Failed { error: String },
}

/// One file operation. Paths are confined to the root by [`RelPath`]'s invariant and by the
/// agent refusing to write through symlinks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum FileOp {
    /// Create or replace a regular file (atomically: written aside, then renamed).
    Put {
        path: RelPath,
        mode: u32,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// Create a directory (and missing parents).
    Mkdir { path: RelPath, mode: u32 },
    /// Create or replace a symlink. The target is stored as given; the agent never follows it.
    Symlink { path: RelPath, target: String },
    /// Remove a file, symlink or directory tree. Removing what is not there succeeds.
    Delete { path: RelPath },
    /// Change permission bits.
    Chmod { path: RelPath, mode: u32 },
}

impl FileOp {
    pub fn path(&self) -> &RelPath {
        match self {
            FileOp::Put { path, .. }
            | FileOp::Mkdir { path, .. }
            | FileOp::Symlink { path, .. }
            | FileOp::Delete { path }
            | FileOp::Chmod { path, .. } => path,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LogStream {
    Stdout,
    Stderr,
    /// Messages of the agent itself (starts, exits, restarts).
    Agent,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLine {
    pub stream: LogStream,
    /// Milliseconds since the Unix epoch, on the agent's clock.
    pub at_ms: u64,
    #[serde(with = "serde_bytes")]
    pub line: Vec<u8>,
}

/// The state of the supervised process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessStatus {
    pub state: ProcessState,
    /// How many times the process has been started.
    pub starts: u64,
    /// Exits that came less than the crash window after their start, in a row.
    pub quick_exits: u32,
    pub last_exit: Option<ExitInfo>,
}

impl ProcessStatus {
    /// A process not started yet, in `state` (no command at all, or stopped).
    pub fn initial(state: ProcessState) -> Self {
        ProcessStatus {
            state,
            starts: 0,
            quick_exits: 0,
            last_exit: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ProcessState {
    /// No command configured: the agent only syncs.
    NoCommand,
    Running {
        pid: u32,
    },
    /// Exited and waiting `retry_in_ms` before the next start (crash loop back-off).
    BackingOff {
        retry_in_ms: u64,
    },
    /// Stopped on request and not restarted.
    Stopped,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitInfo {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub ran_ms: u64,
    pub at_ms: u64,
}
