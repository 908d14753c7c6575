//! The agent's HTTP engine: the per-request layer that personal intercepts (and later
//! mirroring, recording, mocks and splits) are built on.
//!
//! - [`detect`]: HTTP/1, h2c or something else, from a connection's first bytes.
//! - [`table`]: the routing table of one service (holders, their filters, destinations).
//! - [`dial`]: destinations: the original over TCP, a holder's laptop over its tunnel.
//! - [`engine`]: serves a connection, routes each request, emits one event per request.
//! - [`mirror`]: copies of requests for mirror holders, never slowing the caller.

pub mod detect;
pub mod dial;
pub mod engine;
pub mod mirror;
pub mod table;
