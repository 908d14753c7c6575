//! Tunnel streams: many byte streams (one per proxied TCP connection) multiplexed over the one
//! WebSocket connection between the cli and the agent, with per-stream flow control.
//!
//! [`TunnelFrame`] is the wire format (carried as `LaptopMsg::Tunnel` and `AgentMsg::Tunnel`);
//! [`Mux`] is one side's multiplexer, independent of the WebSocket: the connection's reader
//! feeds it frames ([`Mux::handle`], which never waits), and it writes frames into a bounded
//! channel that the connection's writer drains. Streams are [`MuxStream`]s, which implement
//! tokio's `AsyncRead` and `AsyncWrite`.
//!
//! The stream lifecycle (every way a stream ends) is documented on [`TunnelFrame`] and in
//! docs/PROTOCOL.md, section "Tunnel streams".

mod frame;
mod mux;

pub use frame::{
    Side, TunnelFrame, CONNECTION_LOST, INITIAL_WINDOW, MAX_DATA_FRAME, MAX_REASON_BYTES,
    MAX_STREAM_WINDOW, MAX_WINDOW, OUT_QUEUE_FRAMES,
};
pub use mux::{pump, Incoming, Mux, MuxStream};

/// Raises this process's soft limit of open files to its hard limit. Every tunnelled
/// connection holds a socket at both ends of the tunnel, and a soft limit of 1,024 (the usual
/// default) would refuse the 1,000th concurrent connection. Returns the new soft limit.
pub fn raise_open_files_limit() -> Option<u64> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).ok()?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).ok()?;
    }
    Some(hard.max(soft))
}
