//! Ending a service's connections that were open before its redirect, so that their next
//! requests come back through the agent.
//!
//! A new nftables rule does not move a connection that already exists (conntrack keeps its
//! translation), so a keep-alive connection opened before an intercept would reach the
//! original for as long as it lives. The agent, in the service's network namespace with
//! NET_ADMIN, lists the service port's established TCP sockets (`sock_diag`) and ends them
//! with `SOCK_DESTROY` (the kernel resets the connection, as `ss -K` does). A connection is
//! ended between two requests where it can be: when nothing is queued either way and the
//! last data went out after the last data came in (the answer left after the request came).
//! One that looks busy is asked about again until a deadline, then ended anyway. HTTP clients
//! retry a request that finds its idle keep-alive connection reset before anything was sent.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::sys::socket::{recv, MsgFlags, SockProtocol};

use crate::netlink::{self, u32_at, NLMSG_DONE, NLM_F_ACK, NLM_F_REQUEST};

const NLM_F_DUMP: u16 = 0x300;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const IPPROTO_TCP: u8 = 6;
const TCP_ESTABLISHED: u32 = 1;
const INET_DIAG_INFO: u16 = 2;
/// The size of `struct inet_diag_sockid`.
const SOCKID: usize = 48;
/// `struct inet_diag_msg`: family, state, timer, retrans, the socket id, then five u32.
const DIAG_MSG: usize = 4 + SOCKID + 20;

/// One established connection of the service port.
#[derive(Debug, Clone)]
pub struct Conn {
    family: u8,
    /// `struct inet_diag_sockid` as the kernel gave it (ports, addresses, interface, cookie).
    id: [u8; SOCKID],
    /// Nothing queued and the last data went out after the last data came in.
    pub idle: bool,
}

/// What [`reset`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Resets {
    /// Connections ended between two requests.
    pub idle: usize,
    /// Connections still busy at the deadline, ended anyway.
    pub busy: usize,
}

fn diag_socket() -> io::Result<OwnedFd> {
    netlink::socket(SockProtocol::NetlinkSockDiag)
}

/// `struct inet_diag_req_v2` in a netlink message.
fn request(kind: u16, flags: u16, family: u8, ext: u8, id: &[u8; SOCKID]) -> Vec<u8> {
    let mut m = netlink::header(kind, flags, 1);
    m.push(family);
    m.push(IPPROTO_TCP);
    m.push(ext);
    m.push(0);
    m.extend_from_slice(&(1u32 << TCP_ESTABLISHED).to_ne_bytes());
    m.extend_from_slice(id);
    netlink::set_len(&mut m);
    m
}

/// The established TCP connections whose local port is `port`, both address families.
pub fn connections(port: u16) -> io::Result<Vec<Conn>> {
    let sock = diag_socket()?;
    let mut found = Vec::new();
    for family in [libc_af::INET, libc_af::INET6] {
        let req = request(
            SOCK_DIAG_BY_FAMILY,
            NLM_F_REQUEST | NLM_F_DUMP,
            family,
            1 << (INET_DIAG_INFO - 1),
            &[0; SOCKID],
        );
        netlink::send_all(&sock, &req)?;
        let mut buf = vec![0u8; 64 * 1024];
        'dump: loop {
            let n = recv(sock.as_raw_fd(), &mut buf, MsgFlags::empty())?;
            for m in netlink::messages(&buf[..n]) {
                let m = m?;
                if m.kind == NLMSG_DONE {
                    break 'dump;
                }
                if let Some(errno) = m.errno() {
                    return Err(io::Error::from_raw_os_error(errno));
                }
                if let Some(c) = parse(m.payload) {
                    if c.local_port() == port {
                        found.push(c);
                    }
                }
            }
        }
    }
    Ok(found)
}

mod libc_af {
    pub const INET: u8 = 2;
    pub const INET6: u8 = 10;
}

/// One `inet_diag_msg` and its attributes; `None` when it is too short.
fn parse(msg: &[u8]) -> Option<Conn> {
    if msg.len() < DIAG_MSG {
        return None;
    }
    let family = msg[0];
    let id: [u8; SOCKID] = msg[4..4 + SOCKID].try_into().ok()?;
    let rqueue = u32_at(msg, 4 + SOCKID + 4);
    let wqueue = u32_at(msg, 4 + SOCKID + 8);
    let mut idle = rqueue == 0 && wqueue == 0;
    let mut saw_info = false;
    for (kind, info) in netlink::attributes(&msg[DIAG_MSG..]) {
        if kind != INET_DIAG_INFO || info.len() < 128 {
            continue;
        }
        // struct tcp_info: tcpi_last_data_sent at 44 and tcpi_last_data_recv at 52 (ms
        // ago), tcpi_bytes_acked at 120 (bytes sent and acknowledged).
        saw_info = true;
        let sent_ago = u32_at(info, 44);
        let recv_ago = u32_at(info, 52);
        let sent_any = info
            .get(120..128)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_ne_bytes)
            .unwrap_or_default()
            > 0;
        // The answer left after the request came; within the same millisecond counts too,
        // once the connection has sent anything at all.
        idle &= sent_ago < recv_ago || (sent_ago == recv_ago && sent_any);
    }
    Some(Conn {
        family,
        id,
        idle: idle && saw_info,
    })
}

impl Conn {
    pub fn local_port(&self) -> u16 {
        u16::from_be_bytes([self.id[0], self.id[1]])
    }

    /// Ends the connection (the kernel resets it); one already gone is not an error.
    pub fn destroy(&self) -> io::Result<()> {
        let sock = diag_socket()?;
        let req = request(
            SOCK_DESTROY,
            NLM_F_REQUEST | NLM_F_ACK,
            self.family,
            0,
            &self.id,
        );
        netlink::send_all(&sock, &req)?;
        let mut buf = [0u8; 512];
        let n = recv(sock.as_raw_fd(), &mut buf, MsgFlags::empty())?;
        for m in netlink::messages(&buf[..n]) {
            match m?.errno() {
                Some(errno) if errno != 0 && errno != nix::libc::ENOENT => {
                    return Err(io::Error::from_raw_os_error(errno));
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// Ends every established connection of `port`: idle ones at once, busy ones as soon as they
/// are idle, and what is still busy at `deadline` anyway. Checks every `every`.
pub fn reset(port: u16, deadline: Duration, every: Duration) -> io::Result<Resets> {
    let started = Instant::now();
    let mut done = Resets::default();
    loop {
        let conns = connections(port)?;
        let late = started.elapsed() >= deadline;
        let mut busy = 0;
        for c in &conns {
            if c.idle {
                c.destroy()?;
                done.idle += 1;
            } else if late {
                c.destroy()?;
                done.busy += 1;
            } else {
                busy += 1;
            }
        }
        if busy == 0 {
            return Ok(done);
        }
        std::thread::sleep(every);
    }
}
