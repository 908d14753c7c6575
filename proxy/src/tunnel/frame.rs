//! The tunnel's frames: the wire format of multiplexed streams.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The largest `data` a sender puts in one [`TunnelFrame::Data`]. Streams take turns on the
/// connection one frame at a time, so this bounds how long a bulk transfer can hold the
/// connection before an interactive stream's frame goes out (32 KiB is about 30 µs of a
/// 1 GB/s link). A larger frame is a protocol violation and resets its stream.
pub const MAX_DATA_FRAME: usize = 32 * 1024;

/// The credit each side holds for each stream when it is opened, in each direction, without
/// any [`TunnelFrame::Window`]. It is also the most a receiver ever buffers for one stream:
/// a receiver grants credit back only as its application consumes data.
pub const INITIAL_WINDOW: u32 = 256 * 1024;
/// The most a receiver lets one stream have in flight once it has grown the window (a
/// receiver grants beyond [`INITIAL_WINDOW`] only while its reader keeps up).
pub const MAX_STREAM_WINDOW: u64 = 4 * 1024 * 1024;

/// The most credit a sender may hold for one stream. Credit beyond it (a peer granting more
/// than it could ever buffer) is a protocol violation and resets the stream.
pub const MAX_WINDOW: u64 = 1 << 30;

/// Reasons in [`TunnelFrame::Reset`] are cut to this many bytes (on a character boundary)
/// before they are sent.
pub const MAX_REASON_BYTES: usize = 1024;

/// The reason every open stream ends with when the connection under the tunnel drops.
pub const CONNECTION_LOST: &str = "connection lost";

/// A good capacity for the channel of outgoing frames that a [`super::Mux`] writes into.
/// Streams waiting to send queue fairly (first come, first served) for a slot in it, so the
/// capacity is how many frames (at most `OUT_QUEUE_FRAMES * MAX_DATA_FRAME` bytes, 512 KiB)
/// an interactive frame may have to wait behind.
pub const OUT_QUEUE_FRAMES: usize = 16;

/// Which end of the connection a multiplexer runs at. The side that opens a stream picks its
/// id: the agent uses odd ids (1, 3, 5, …), the laptop even ids (2, 4, 6, …), so the two can
/// never pick the same id. Id 0 is never used. Each side's ids strictly increase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    /// The cli on the developer's laptop.
    Laptop,
    /// The agent in the container or pod.
    Agent,
}

impl Side {
    /// The other end of the connection.
    pub fn peer(self) -> Side {
        match self {
            Side::Laptop => Side::Agent,
            Side::Agent => Side::Laptop,
        }
    }

    /// The first stream id this side opens.
    pub fn first_stream_id(self) -> u64 {
        match self {
            Side::Laptop => 2,
            Side::Agent => 1,
        }
    }

    /// Whether `stream` is an id that this side opens.
    pub fn opens(self, stream: u64) -> bool {
        stream != 0 && (stream % 2 == 1) == (self == Side::Agent)
    }
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Side::Laptop => "laptop",
            Side::Agent => "agent",
        })
    }
}

/// One frame of a tunnel stream, sent by either side (as `LaptopMsg::Tunnel` or
/// `AgentMsg::Tunnel`). Every frame names its stream.
///
/// # Stream lifecycle
///
/// 1. **Open.** The opener sends `Open` with a new id of its parity (see [`Side`]) and may
///    send `Data` right after it, without waiting: each side starts with
///    [`INITIAL_WINDOW`] bytes of credit per direction. The peer connects `port` (its meaning
///    is the caller's: for an intercept, the key of the laptop's port mapping).
/// 2. **Data** flows both ways, each `Data` at most [`MAX_DATA_FRAME`] bytes and never more
///    than the sender's credit; every byte sent uses up a byte of credit, and the receiver
///    returns credit with `Window` as its application consumes data (in batches of at least
///    half the initial window).
/// 3. **End** is a half-close, like TCP's FIN: the sender of `End` sends no more `Data` on that
///    stream, and the receiver's reads return end-of-file once the data before it is read.
///    The other direction stays open until its own `End`.
///
/// A stream ends in exactly one of these ways:
///
/// - **Closed**: both sides have sent `End`. Nothing is sent after that.
/// - **Reset by either side** with a reason, which aborts both directions at once: data not
///   yet read is discarded and reads and writes on both ends fail with the reason. Reasons:
///   the peer could not connect `port` (`connect to 127.0.0.1:8080: Connection refused …`),
///   a local socket error, the application dropped its stream without shutting it down or
///   before reading to the end, or a protocol violation (data beyond the window, data after
///   `End`, a frame for a stream that was never opened, an id of the wrong parity or not
///   above the previous one, a frame above [`MAX_DATA_FRAME`], credit above
///   [`MAX_WINDOW`]). A `Reset` is never answered with a `Reset`.
/// - **Connection lost**: when the connection under the tunnel ends, each side resets all
///   its streams locally with the reason [`CONNECTION_LOST`]; nothing is sent.
///
/// Frames for a stream that has ended (they cross a `Reset` or the final `End` on the wire)
/// are ignored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TunnelFrame {
    /// Asks the peer to connect `port` and to carry the stream's bytes to it.
    Open { stream: u64, port: u16 },
    /// Bytes of the stream, in order, at most [`MAX_DATA_FRAME`] and within the sender's credit.
    Data {
        stream: u64,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// The receiver of the stream's data grants `credit` more bytes to the sender.
    Window { stream: u64, credit: u32 },
    /// No more `Data` from the sender of `End` on this stream (half-close).
    End { stream: u64 },
    /// Aborts both directions; `reason` says why, for the peer's logs and errors.
    Reset { stream: u64, reason: String },
}

impl TunnelFrame {
    /// The stream the frame belongs to.
    pub fn stream(&self) -> u64 {
        match self {
            TunnelFrame::Open { stream, .. }
            | TunnelFrame::Data { stream, .. }
            | TunnelFrame::Window { stream, .. }
            | TunnelFrame::End { stream }
            | TunnelFrame::Reset { stream, .. } => *stream,
        }
    }

    /// A `Reset` whose reason is cut to [`MAX_REASON_BYTES`].
    pub fn reset(stream: u64, reason: &str) -> TunnelFrame {
        TunnelFrame::Reset {
            stream,
            reason: cut_reason(reason).to_string(),
        }
    }
}

/// `reason` cut to at most [`MAX_REASON_BYTES`] bytes on a character boundary.
pub(crate) fn cut_reason(reason: &str) -> &str {
    if reason.len() <= MAX_REASON_BYTES {
        return reason;
    }
    let mut end = MAX_REASON_BYTES;
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    &reason[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parity_never_collides() {
        for id in 0..100u64 {
            assert!(!(Side::Laptop.opens(id) && Side::Agent.opens(id)), "{id}");
        }
        assert!(!Side::Laptop.opens(0) && !Side::Agent.opens(0));
        assert!(Side::Agent.opens(Side::Agent.first_stream_id()));
        assert!(Side::Laptop.opens(Side::Laptop.first_stream_id()));
        assert!(Side::Agent.opens(7) && Side::Laptop.opens(8));
    }

    #[test]
    fn reasons_are_cut_on_a_character_boundary() {
        let long = "é".repeat(MAX_REASON_BYTES);
        let cut = cut_reason(&long);
        assert!(cut.len() <= MAX_REASON_BYTES && cut.len() >= MAX_REASON_BYTES - 1);
        assert_eq!(cut_reason("short"), "short");
        match TunnelFrame::reset(3, &long) {
            TunnelFrame::Reset { stream: 3, reason } => assert_eq!(reason, cut),
            other => panic!("{other:?}"),
        }
    }
}
