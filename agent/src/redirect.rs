//! Redirecting a service's TCP ports to the agent inside the service's own network namespace,
//! so that a filtered intercept on Docker leaves the original container running and serving.
//!
//! The agent shares the original's network namespace (`--network container:ORIG`, with
//! NET_ADMIN) and installs one nftables table there over netlink:
//!
//! ```text
//! table inet devloop-<id> {            # flags owner
//!   chain prerouting { type nat hook prerouting priority dstnat;
//!     tcp dport SERVICE redirect to :AGENT   # one rule per port
//!   }
//! }
//! ```
//!
//! Only connections that arrive from outside the namespace pass `prerouting` (other
//! containers, and the published host ports, which Docker forwards to the container's
//! address); the original calling itself, and the agent calling the original on
//! `127.0.0.1`, are not redirected. The table carries `NFT_TABLE_F_OWNER` (Linux 5.12): the
//! kernel removes it when the netlink socket that made it closes, so the redirect ends with
//! the agent however the agent ends, SIGKILL included, and nothing is left to restore.
//! Connections already open are not moved by a new rule (conntrack keeps them).

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

use nix::sys::socket::{recv, MsgFlags, SockProtocol};

use crate::netlink::{self, NLM_F_ACK, NLM_F_REQUEST};

// netlink and nfnetlink (linux/netlink.h, linux/netfilter/nfnetlink.h)
const NLM_F_CREATE: u16 = 0x400;
const NLA_F_NESTED: u16 = 0x8000;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFPROTO_UNSPEC: u8 = 0;
const NFPROTO_INET: u8 = 1;

// nf_tables (linux/netfilter/nf_tables.h)
const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_NEWRULE: u16 = 6;
const NFTA_TABLE_NAME: u16 = 1;
const NFTA_TABLE_FLAGS: u16 = 2;
const NFT_TABLE_F_OWNER: u32 = 0x2;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_CHAIN_TYPE: u16 = 7;
const NFTA_HOOK_HOOKNUM: u16 = 1;
const NFTA_HOOK_PRIORITY: u16 = 2;
const NF_INET_PRE_ROUTING: u32 = 0;
/// `dstnat`, where Docker's own DNAT and `nft`'s default for nat prerouting sit.
const NF_IP_PRI_NAT_DST: i32 = -100;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_META_DREG: u16 = 1;
const NFTA_META_KEY: u16 = 2;
const NFT_META_L4PROTO: u32 = 16;
const NFT_REG_1: u32 = 1;
const NFTA_CMP_SREG: u16 = 1;
const NFTA_CMP_OP: u16 = 2;
const NFTA_CMP_DATA: u16 = 3;
const NFT_CMP_EQ: u32 = 0;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_PAYLOAD_DREG: u16 = 1;
const NFTA_PAYLOAD_BASE: u16 = 2;
const NFTA_PAYLOAD_OFFSET: u16 = 3;
const NFTA_PAYLOAD_LEN: u16 = 4;
const NFT_PAYLOAD_TRANSPORT_HEADER: u32 = 2;
const NFTA_IMMEDIATE_DREG: u16 = 1;
const NFTA_IMMEDIATE_DATA: u16 = 2;
const NFTA_REDIR_REG_PROTO_MIN: u16 = 1;
const NFTA_REDIR_FLAGS: u16 = 3;
const NF_NAT_RANGE_PROTO_SPECIFIED: u32 = 0x2;
const IPPROTO_TCP: u8 = 6;

const CHAIN: &str = "prerouting";

/// A service port and the agent port its callers are sent to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRedirect {
    pub service: u16,
    pub agent: u16,
}

/// The installed redirect. Dropping it (or the agent ending in any way) closes the netlink
/// socket, and the kernel removes the table.
#[derive(Debug)]
pub struct Redirect {
    table: String,
    _owner: OwnedFd,
}

impl Redirect {
    /// Installs the table `table` in the calling thread's network namespace.
    pub fn install(table: &str, ports: &[PortRedirect]) -> io::Result<Redirect> {
        let sock = netlink::socket(SockProtocol::NetlinkNetFilter)?;
        let batch = batch(table, ports);
        netlink::send_all(&sock, &batch.bytes)?;
        read_acks(&sock, batch.acks)?;
        Ok(Redirect {
            table: table.into(),
            _owner: sock,
        })
    }

    pub fn table(&self) -> &str {
        &self.table
    }
}

/// A netlink message being built.
struct Msg {
    buf: Vec<u8>,
}

impl Msg {
    fn new(kind: u16, flags: u16, seq: u32, family: u8, res_id: u16) -> Msg {
        let mut buf = netlink::header(kind, flags, seq);
        buf.push(family);
        buf.push(0); // NFNETLINK_V0
        buf.extend_from_slice(&res_id.to_be_bytes());
        Msg { buf }
    }

    fn attr(&mut self, kind: u16, payload: &[u8]) -> &mut Self {
        let len = 4 + payload.len();
        self.buf.extend_from_slice(&(len as u16).to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(payload);
        self.pad();
        self
    }

    fn str(&mut self, kind: u16, s: &str) -> &mut Self {
        let mut v = s.as_bytes().to_vec();
        v.push(0);
        self.attr(kind, &v)
    }

    fn u32(&mut self, kind: u16, v: u32) -> &mut Self {
        self.attr(kind, &v.to_be_bytes())
    }

    /// A nested attribute whose contents `fill` writes.
    fn nest(&mut self, kind: u16, fill: impl FnOnce(&mut Msg)) -> &mut Self {
        let at = self.buf.len();
        self.buf.extend_from_slice(&[0, 0]);
        self.buf
            .extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
        fill(self);
        let len = (self.buf.len() - at) as u16;
        self.buf[at..at + 2].copy_from_slice(&len.to_ne_bytes());
        self
    }

    /// One expression of a rule: `name` and its data.
    fn expr(&mut self, name: &str, data: impl FnOnce(&mut Msg)) -> &mut Self {
        self.nest(NFTA_LIST_ELEM, |m| {
            m.str(NFTA_EXPR_NAME, name);
            m.nest(NFTA_EXPR_DATA, data);
        })
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    fn done(mut self, out: &mut Vec<u8>) {
        netlink::set_len(&mut self.buf);
        out.extend_from_slice(&self.buf);
    }
}

struct Batch {
    bytes: Vec<u8>,
    /// Sequence numbers that asked for an acknowledgement.
    acks: Vec<u32>,
}

fn nft_kind(msg: u16) -> u16 {
    (NFNL_SUBSYS_NFTABLES << 8) | msg
}

/// The whole transaction: the table (owner flag), its nat chain, one rule per port.
fn batch(table: &str, ports: &[PortRedirect]) -> Batch {
    let mut out = Vec::new();
    let mut acks = Vec::new();
    let mut seq = 1u32;
    let create = NLM_F_REQUEST | NLM_F_CREATE | NLM_F_ACK;
    Msg::new(
        NFNL_MSG_BATCH_BEGIN,
        NLM_F_REQUEST,
        seq,
        NFPROTO_UNSPEC,
        NFNL_SUBSYS_NFTABLES,
    )
    .done(&mut out);

    seq += 1;
    let mut m = Msg::new(nft_kind(NFT_MSG_NEWTABLE), create, seq, NFPROTO_INET, 0);
    m.str(NFTA_TABLE_NAME, table)
        .u32(NFTA_TABLE_FLAGS, NFT_TABLE_F_OWNER);
    m.done(&mut out);
    acks.push(seq);

    seq += 1;
    let mut m = Msg::new(nft_kind(NFT_MSG_NEWCHAIN), create, seq, NFPROTO_INET, 0);
    m.str(NFTA_CHAIN_TABLE, table)
        .str(NFTA_CHAIN_NAME, CHAIN)
        .nest(NFTA_CHAIN_HOOK, |h| {
            h.u32(NFTA_HOOK_HOOKNUM, NF_INET_PRE_ROUTING)
                .u32(NFTA_HOOK_PRIORITY, NF_IP_PRI_NAT_DST as u32);
        })
        .str(NFTA_CHAIN_TYPE, "nat");
    m.done(&mut out);
    acks.push(seq);

    for p in ports {
        seq += 1;
        let mut m = Msg::new(nft_kind(NFT_MSG_NEWRULE), create, seq, NFPROTO_INET, 0);
        m.str(NFTA_RULE_TABLE, table)
            .str(NFTA_RULE_CHAIN, CHAIN)
            .nest(NFTA_RULE_EXPRESSIONS, |e| {
                // meta l4proto tcp
                e.expr("meta", |d| {
                    d.u32(NFTA_META_DREG, NFT_REG_1)
                        .u32(NFTA_META_KEY, NFT_META_L4PROTO);
                })
                .expr("cmp", |d| {
                    d.u32(NFTA_CMP_SREG, NFT_REG_1)
                        .u32(NFTA_CMP_OP, NFT_CMP_EQ)
                        .nest(NFTA_CMP_DATA, |v| {
                            v.attr(NFTA_DATA_VALUE, &[IPPROTO_TCP]);
                        });
                })
                // tcp dport SERVICE
                .expr("payload", |d| {
                    d.u32(NFTA_PAYLOAD_DREG, NFT_REG_1)
                        .u32(NFTA_PAYLOAD_BASE, NFT_PAYLOAD_TRANSPORT_HEADER)
                        .u32(NFTA_PAYLOAD_OFFSET, 2)
                        .u32(NFTA_PAYLOAD_LEN, 2);
                })
                .expr("cmp", |d| {
                    d.u32(NFTA_CMP_SREG, NFT_REG_1)
                        .u32(NFTA_CMP_OP, NFT_CMP_EQ)
                        .nest(NFTA_CMP_DATA, |v| {
                            v.attr(NFTA_DATA_VALUE, &p.service.to_be_bytes());
                        });
                })
                // redirect to :AGENT
                .expr("immediate", |d| {
                    d.u32(NFTA_IMMEDIATE_DREG, NFT_REG_1)
                        .nest(NFTA_IMMEDIATE_DATA, |v| {
                            v.attr(NFTA_DATA_VALUE, &p.agent.to_be_bytes());
                        });
                })
                .expr("redir", |d| {
                    d.u32(NFTA_REDIR_REG_PROTO_MIN, NFT_REG_1)
                        .u32(NFTA_REDIR_FLAGS, NF_NAT_RANGE_PROTO_SPECIFIED);
                });
            });
        m.done(&mut out);
        acks.push(seq);
    }

    seq += 1;
    Msg::new(
        NFNL_MSG_BATCH_END,
        NLM_F_REQUEST,
        seq,
        NFPROTO_UNSPEC,
        NFNL_SUBSYS_NFTABLES,
    )
    .done(&mut out);
    Batch { bytes: out, acks }
}

/// Reads the kernel's answers until every message that asked for one is acknowledged; the
/// first error names the errno (the batch is one transaction: nothing of it stays).
fn read_acks(sock: &OwnedFd, mut waiting: Vec<u32>) -> io::Result<()> {
    let mut buf = vec![0u8; 16 * 1024];
    while !waiting.is_empty() {
        let n = recv(sock.as_raw_fd(), &mut buf, MsgFlags::empty())?;
        for m in netlink::messages(&buf[..n]) {
            let m = m?;
            match m.errno() {
                Some(0) => waiting.retain(|s| *s != m.seq),
                Some(errno) => return Err(io::Error::from_raw_os_error(errno)),
                None => {}
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_batch_is_what_nft_sends() {
        let b = batch(
            "devloop-t",
            &[PortRedirect {
                service: 8080,
                agent: 9090,
            }],
        );
        // begin, table, chain, one rule, end; three of them acknowledged.
        assert_eq!(b.acks, vec![2, 3, 4]);
        let mut at = 0;
        let mut kinds = Vec::new();
        while at < b.bytes.len() {
            let len = u32::from_ne_bytes(b.bytes[at..at + 4].try_into().unwrap()) as usize;
            assert!(len.is_multiple_of(4));
            kinds.push(u16::from_ne_bytes([b.bytes[at + 4], b.bytes[at + 5]]));
            at += len;
        }
        assert_eq!(at, b.bytes.len());
        assert_eq!(kinds, vec![0x10, 0x0a00, 0x0a03, 0x0a06, 0x11]);
        // The port values travel in network order: 8080 = 0x1f90, 9090 = 0x2382.
        let rule = &b.bytes;
        assert!(rule.windows(2).any(|w| w == [0x1f, 0x90]));
        assert!(rule.windows(2).any(|w| w == [0x23, 0x82]));
    }
}
