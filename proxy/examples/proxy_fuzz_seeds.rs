//! Writes the seed inputs of the protocol's fuzz targets: real encoded messages of every
//! variant, handoff requests and answers, and tunnel sessions, one file each under
//! `DIR/<target>/seed-*` (DIR defaults to `fuzz/corpus`). Run from the repository root:
//!
//! ```text
//! cargo run -p devloop-proxy --example proxy_fuzz_seeds -- fuzz/corpus
//! ```

use std::path::{Path, PathBuf};

use devloop_proxy::codec::encode;
use devloop_proxy::fuzzing::MuxOp;
use devloop_proxy::handoff;
use devloop_proxy::msg::*;
use devloop_proxy::tree::Entry;
use devloop_proxy::tunnel::{TunnelFrame, INITIAL_WINDOW, MAX_DATA_FRAME};
use devloop_proxy::{RelPath, MAGIC, PROTOCOL_VERSION};

fn path(s: &str) -> RelPath {
    RelPath::new(s).unwrap_or_else(|e| panic!("{e}"))
}

fn frames() -> Vec<TunnelFrame> {
    vec![
        TunnelFrame::Open {
            stream: 1,
            port: 8080,
        },
        TunnelFrame::Open {
            stream: 2,
            port: u16::MAX,
        },
        TunnelFrame::Data {
            stream: 1,
            data: b"GET / HTTP/1.1\r\nHost: api\r\n\r\n".to_vec(),
        },
        TunnelFrame::Data {
            stream: 3,
            data: Vec::new(),
        },
        TunnelFrame::Window {
            stream: 1,
            credit: INITIAL_WINDOW / 2,
        },
        TunnelFrame::Window {
            stream: 2,
            credit: u32::MAX,
        },
        TunnelFrame::End { stream: 1 },
        TunnelFrame::Reset {
            stream: 5,
            reason: "connect to 127.0.0.1:8080: Connection refused".into(),
        },
    ]
}

fn status() -> ProcessStatus {
    ProcessStatus {
        state: ProcessState::Running { pid: 42 },
        starts: 3,
        quick_exits: 1,
        last_exit: Some(ExitInfo {
            code: Some(-1),
            signal: Some(9),
            ran_ms: 10,
            at_ms: 1_700_000_000_000,
        }),
    }
}

fn laptop_msgs() -> Vec<LaptopMsg> {
    let mut msgs = vec![
        LaptopMsg::Hello(Hello {
            magic: MAGIC,
            protocol_version: PROTOCOL_VERSION,
            cli_version: "0.1.0".into(),
            capabilities: vec!["files".into(), "tar".into(), "process".into()],
            token: "0123456789abcdef".into(),
        }),
        LaptopMsg::Index { req: 1 },
        LaptopMsg::Batch {
            req: 2,
            ops: vec![
                FileOp::Put {
                    path: path("api/app.py"),
                    mode: 0o644,
                    data: b"print('hi')\n".to_vec(),
                },
                FileOp::Mkdir {
                    path: path("api/static"),
                    mode: 0o755,
                },
                FileOp::Symlink {
                    path: path("api/current"),
                    target: "../releases/1".into(),
                },
                FileOp::Delete {
                    path: path("old.txt"),
                },
                FileOp::Chmod {
                    path: path("run.sh"),
                    mode: 0o755,
                },
            ],
        },
        LaptopMsg::TarChunk {
            req: 3,
            data: vec![0; 1024],
            last: true,
        },
        LaptopMsg::Restart { req: 4 },
        LaptopMsg::Run {
            req: 5,
            argv: vec![
                "pip".into(),
                "install".into(),
                "-r".into(),
                "req.txt".into(),
            ],
        },
        LaptopMsg::Ping { nonce: u64::MAX },
    ];
    msgs.extend(frames().into_iter().map(LaptopMsg::Tunnel));
    msgs
}

fn agent_msgs() -> Vec<AgentMsg> {
    let mut msgs = vec![
        AgentMsg::Welcome(Welcome {
            protocol_version: PROTOCOL_VERSION,
            agent_version: "0.1.0".into(),
            capabilities: vec!["tunnel".into()],
            root: "/app".into(),
            process: status(),
            recent_logs: vec![LogLine {
                stream: LogStream::Stderr,
                at_ms: 1,
                line: b"Traceback (most recent call last):".to_vec(),
            }],
        }),
        AgentMsg::Refused {
            reason: "wrong token".into(),
        },
        AgentMsg::Ack {
            req: 2,
            outcome: Outcome::Ok { applied: 5 },
        },
        AgentMsg::Ack {
            req: 5,
            outcome: Outcome::Exited { code: Some(1) },
        },
        AgentMsg::Ack {
            req: 3,
            outcome: Outcome::Failed {
                error: "tar entry \"../x\" refused".into(),
            },
        },
        AgentMsg::Index {
            req: 1,
            entries: vec![
                (
                    path("api/app.py"),
                    Entry::File {
                        mode: 0o644,
                        size: 12,
                        hash: [7; 32],
                    },
                ),
                (path("api"), Entry::Dir { mode: 0o755 }),
                (
                    path("api/current"),
                    Entry::Symlink {
                        target: "../releases/1".into(),
                    },
                ),
            ],
            last: true,
        },
        AgentMsg::Log(LogLine {
            stream: LogStream::Agent,
            at_ms: 5,
            line: b"started".to_vec(),
        }),
        AgentMsg::Process(ProcessStatus {
            state: ProcessState::BackingOff { retry_in_ms: 800 },
            ..status()
        }),
        AgentMsg::Process(ProcessStatus {
            state: ProcessState::Stopped,
            last_exit: None,
            ..status()
        }),
        AgentMsg::Pong { nonce: 7 },
    ];
    msgs.extend(frames().into_iter().map(AgentMsg::Tunnel));
    msgs
}

/// Tunnel sessions: the side byte, then steps.
fn mux_sessions() -> Vec<Vec<u8>> {
    use MuxOp::*;
    let data = |stream, n: usize| {
        Peer(TunnelFrame::Data {
            stream,
            data: vec![b'x'; n],
        })
    };
    let sessions: Vec<(u8, Vec<MuxOp>)> = vec![
        // The laptop opens a stream, writes, gets credit and the agent's answer, both end.
        (
            0,
            vec![
                Open(8080),
                Write {
                    stream: 0,
                    len: 100,
                },
                Drain,
                Peer(TunnelFrame::Window {
                    stream: 2,
                    credit: 100,
                }),
                data(2, 50),
                Read { stream: 0, max: 64 },
                Shutdown(0),
                Peer(TunnelFrame::End { stream: 2 }),
                Read { stream: 0, max: 64 },
                Read { stream: 0, max: 64 },
                Drain,
            ],
        ),
        // The agent accepts a stream the laptop opened, reads, answers, the laptop resets.
        (
            1,
            vec![
                Peer(TunnelFrame::Open {
                    stream: 2,
                    port: 80,
                }),
                Accept,
                data(2, 300),
                Read {
                    stream: 0,
                    max: 1000,
                },
                Write { stream: 0, len: 10 },
                Peer(TunnelFrame::Reset {
                    stream: 2,
                    reason: "bye".into(),
                }),
                Read { stream: 0, max: 10 },
                Drain,
            ],
        ),
        // Frames for unknown streams, wrong parity, data beyond the window, a lost connection.
        (
            0,
            vec![
                data(9, 1),
                Peer(TunnelFrame::Window {
                    stream: 4,
                    credit: 1,
                }),
                Peer(TunnelFrame::Open { stream: 2, port: 1 }),
                Peer(TunnelFrame::Open { stream: 3, port: 1 }),
                Peer(TunnelFrame::Open { stream: 1, port: 1 }),
                data(3, MAX_DATA_FRAME),
                data(3, 1),
                Peer(TunnelFrame::End { stream: 3 }),
                Peer(TunnelFrame::End { stream: 3 }),
                Accept,
                Drain,
                ConnectionLost,
                Open(1),
                Drain,
            ],
        ),
        // Many writes with no drain: the outgoing queue fills.
        (
            0,
            std::iter::once(Open(7))
                .chain((0..40).map(|_| Write {
                    stream: 0,
                    len: 4096,
                }))
                .chain([Drain, Drop(0), Drain])
                .collect(),
        ),
    ];
    sessions
        .into_iter()
        .map(|(side, ops)| {
            let mut bytes = vec![side];
            for op in &ops {
                bytes.extend(encode(op));
            }
            bytes
        })
        .collect()
}

fn handoff_seeds() -> Vec<Vec<u8>> {
    let request =
        |token: &str, port| handoff::encode_request(token, port).unwrap_or_else(|e| panic!("{e}"));
    let mut refusal = vec![0];
    refusal.extend(handoff::encode_refusal("nothing listens on 127.0.0.1:8080"));
    vec![
        request("0123456789abcdef", 8080),
        request("", 0),
        request(&"t".repeat(255), u16::MAX),
        // The answers are read from the second byte (the first says whether a descriptor came).
        refusal,
        vec![1, 0],
    ]
}

fn rel_path_seeds() -> Vec<Vec<u8>> {
    let mut seeds: Vec<Vec<u8>> = ["api/app.py", "a", ".hidden/x", "a/..b", "sp ace/ü"]
        .iter()
        .map(|p| encode(&p.to_string()))
        .collect();
    seeds.extend(
        [
            "a/b",
            "../etc/passwd",
            "/etc",
            "a//b",
            "./a",
            "a\0b",
            "dir\nname",
            "dir\n../x",
        ]
        .iter()
        .map(|s| s.as_bytes().to_vec()),
    );
    seeds
}

/// Two filters and a request each, encoded as the `route_filter` target reads them.
fn route_seeds() -> Vec<Vec<u8>> {
    use devloop_proxy::route::{Filter, HeaderMatch, PathMatch, PlainHead};
    let header = |a: &str| Filter {
        headers: vec![HeaderMatch::parse(a).expect("a seed's header")],
        ..Filter::default()
    };
    let path = |p: PathMatch| Filter {
        path: Some(p),
        ..Filter::default()
    };
    let key = Filter {
        headers: vec![HeaderMatch::session_key("alice").expect("a seed's key")],
        method: Some("POST".into()),
        ..Filter::default()
    };
    let req = |method: &str, p: &str, headers: &[(&str, &str)]| PlainHead {
        method: method.into(),
        path: p.into(),
        headers: headers
            .iter()
            .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
            .collect(),
    };
    let cases = vec![
        (
            header("x-dev=alice"),
            header("x-dev=bob"),
            req("GET", "/", &[("x-dev", "alice")]),
        ),
        (
            header("x-dev~al.*"),
            path(PathMatch::Prefix("/v2/".into())),
            req("GET", "/v2/x", &[("X-Dev", "alex")]),
        ),
        (
            path(PathMatch::Exact("/a".into())),
            path(PathMatch::Regex("/a|/b".into())),
            req("GET", "/b", &[]),
        ),
        (
            key.clone(),
            Filter::default(),
            req(
                "POST",
                "/",
                &[("baggage", "k=v, devloop-session=alice;p=1")],
            ),
        ),
        (
            key,
            header("baggage~.*"),
            req("POST", "/", &[("baggage", "devloop-session=%61lice")]),
        ),
        (header("x-dev~("), Filter::default(), req("GET", "/", &[])),
    ];
    cases
        .into_iter()
        .map(|(a, b, r)| {
            let mut out = postcard::to_allocvec(&a).expect("encoding a seed");
            out.extend(postcard::to_allocvec(&b).expect("encoding a seed"));
            out.extend(postcard::to_allocvec(&r).expect("encoding a seed"));
            out
        })
        .collect()
}

fn write(dir: &Path, target: &str, seeds: Vec<Vec<u8>>) {
    match devloop_proxy::fuzzing::write_seeds(dir, target, seeds) {
        Ok(n) => println!("{target}: {n} seeds in {}", dir.join(target).display()),
        Err(e) => panic!("{}: {e}", dir.join(target).display()),
    }
}

fn main() {
    let dir = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("fuzz/corpus"));
    write(
        &dir,
        "laptop_msg",
        laptop_msgs().iter().map(encode).collect(),
    );
    write(&dir, "agent_msg", agent_msgs().iter().map(encode).collect());
    write(&dir, "tunnel_frame", frames().iter().map(encode).collect());
    write(&dir, "tunnel_mux", mux_sessions());
    write(&dir, "handoff", handoff_seeds());
    write(&dir, "rel_path", rel_path_seeds());
    write(&dir, "route_filter", route_seeds());
}
