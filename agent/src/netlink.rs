//! The netlink plumbing the agent's kernel-facing modules share: `redirect.rs` (nftables)
//! and `resets.rs` (sock_diag). A bound socket, the 16-byte message header, and walks over
//! the messages and attributes the kernel answers with, which never read past what a length
//! field allows.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

use nix::sys::socket::{
    bind, send, socket as nl_socket, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol,
    SockType,
};

pub const NLM_F_REQUEST: u16 = 0x1;
pub const NLM_F_ACK: u16 = 0x4;
pub const NLMSG_ERROR: u16 = 0x2;
pub const NLMSG_DONE: u16 = 0x3;

/// `struct nlmsghdr`: length, type, flags, sequence number, port id.
pub const HEADER: usize = 16;

/// A netlink socket of `protocol`, bound (the kernel picks the port id).
pub fn socket(protocol: SockProtocol) -> io::Result<OwnedFd> {
    let sock = nl_socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        protocol,
    )?;
    bind(sock.as_raw_fd(), &NetlinkAddr::new(0, 0))?;
    Ok(sock)
}

/// A message header whose length [`set_len`] fills in once the payload is written.
pub fn header(kind: u16, flags: u16, seq: u32) -> Vec<u8> {
    let mut m = Vec::with_capacity(256);
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(&kind.to_ne_bytes());
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
    m
}

/// Writes the message's length into its header.
pub fn set_len(msg: &mut [u8]) {
    let len = msg.len() as u32;
    msg[0..4].copy_from_slice(&len.to_ne_bytes());
}

/// Sends `bytes` as one datagram, all of it.
pub fn send_all(sock: &OwnedFd, bytes: &[u8]) -> io::Result<()> {
    if send(sock.as_raw_fd(), bytes, MsgFlags::empty())? != bytes.len() {
        return Err(io::Error::other("netlink: a message was sent in part"));
    }
    Ok(())
}

/// One message the kernel sent.
#[derive(Debug, Clone, Copy)]
pub struct Message<'a> {
    pub kind: u16,
    pub seq: u32,
    pub payload: &'a [u8],
}

impl Message<'_> {
    /// For an `NLMSG_ERROR` message, the errno it carries (0 for an acknowledgement).
    pub fn errno(&self) -> Option<i32> {
        if self.kind != NLMSG_ERROR || self.payload.len() < 4 {
            return None;
        }
        Some(-i32::from_ne_bytes(self.payload[..4].try_into().ok()?))
    }
}

/// The messages of one datagram; a length that does not fit ends the walk with an error.
pub fn messages(buf: &[u8]) -> impl Iterator<Item = io::Result<Message<'_>>> {
    let mut at = 0;
    std::iter::from_fn(move || {
        if at + HEADER > buf.len() {
            return None;
        }
        let len = u32_at(buf, at) as usize;
        if len < HEADER || at + len > buf.len() {
            at = buf.len();
            return Some(Err(io::Error::other("netlink: a malformed answer")));
        }
        let m = Message {
            kind: u16::from_ne_bytes([buf[at + 4], buf[at + 5]]),
            seq: u32_at(buf, at + 8),
            payload: &buf[at + HEADER..at + len],
        };
        at += align(len);
        Some(Ok(m))
    })
}

/// The attributes (`struct nlattr` / `rtattr`: length, type, payload) in `buf`; the walk
/// stops at one whose length does not fit.
pub fn attributes(buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    let mut at = 0;
    std::iter::from_fn(move || {
        if at + 4 > buf.len() {
            return None;
        }
        let len = u16::from_ne_bytes([buf[at], buf[at + 1]]) as usize;
        let kind = u16::from_ne_bytes([buf[at + 2], buf[at + 3]]);
        if len < 4 || at + len > buf.len() {
            return None;
        }
        let payload = &buf[at + 4..at + len];
        at += align(len);
        Some((kind, payload))
    })
}

/// Netlink's 4-byte alignment.
pub fn align(len: usize) -> usize {
    (len + 3) & !3
}

/// The native-endian u32 at `at`, or 0 past the end.
pub fn u32_at(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .and_then(|s| s.try_into().ok())
        .map(u32::from_ne_bytes)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(kind: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
        let mut m = header(kind, 0, seq);
        m.extend_from_slice(payload);
        while !m.len().is_multiple_of(4) {
            m.push(0);
        }
        let len = HEADER + payload.len();
        m[0..4].copy_from_slice(&(len as u32).to_ne_bytes());
        m
    }

    #[test]
    fn messages_and_errors_are_read_within_their_lengths() {
        let mut buf = msg(NLMSG_ERROR, 2, &0i32.to_ne_bytes());
        buf.extend(msg(NLMSG_ERROR, 3, &(-17i32).to_ne_bytes()));
        buf.extend(msg(20, 4, b"abc"));
        let got: Vec<_> = messages(&buf).map(|m| m.unwrap()).collect();
        assert_eq!(got.len(), 3);
        assert_eq!((got[0].seq, got[0].errno()), (2, Some(0)));
        assert_eq!((got[1].seq, got[1].errno()), (3, Some(17)));
        assert_eq!(
            (got[2].kind, got[2].payload, got[2].errno()),
            (20, &b"abc"[..], None)
        );

        // A length past the end is an error, and the walk ends.
        let mut bad = msg(20, 5, b"abcd");
        bad[0..4].copy_from_slice(&100u32.to_ne_bytes());
        let got: Vec<_> = messages(&bad).collect();
        assert_eq!(got.len(), 1);
        assert!(got[0].is_err());
    }

    #[test]
    fn attributes_stop_at_a_length_that_does_not_fit() {
        let mut buf = Vec::new();
        buf.extend_from_slice(&7u16.to_ne_bytes());
        buf.extend_from_slice(&2u16.to_ne_bytes());
        buf.extend_from_slice(b"xyz\0");
        buf.extend_from_slice(&40u16.to_ne_bytes());
        buf.extend_from_slice(&3u16.to_ne_bytes());
        let got: Vec<_> = attributes(&buf).collect();
        assert_eq!(got, vec![(2, &b"xyz"[..])]);
    }
}
