//! The real agent server, in-process on 127.0.0.1:0, driven by a WebSocket client speaking the
//! protocol crate's messages.

use std::net::SocketAddr;
use std::time::Duration;

use devloop_agent::guard::PRE_HELLO_CONNECTIONS;
use devloop_agent::server::HANDSHAKE_TIMEOUT;
use devloop_agent::{DevAgent, DevConfig};
use devloop_proxy::codec::{decode, encode};
use devloop_proxy::msg::{AgentMsg, FileOp, Hello, LaptopMsg, LogStream, Outcome, ProcessState};
use devloop_proxy::tree::{hash_bytes, Entry};
use devloop_proxy::{caps, RelPath, MAGIC, PROTOCOL_VERSION};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

const TOKEN: &str = "s3cret-token";

type Ws = WebSocketStream<TcpStream>;

struct Running {
    addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: JoinHandle<anyhow::Result<()>>,
}

async fn start(root: &std::path::Path, command: &[&str]) -> Running {
    let agent = DevAgent::start(DevConfig {
        root: root.to_path_buf(),
        listen: "127.0.0.1:0".parse().unwrap(),
        token: TOKEN.into(),
        workdir: None,
        grace: Duration::from_millis(500),
        command: command.iter().map(|s| s.to_string()).collect(),
        mirror_output: false,
    })
    .await
    .unwrap();
    let addr = agent.local_addr().unwrap();
    let (stop, stop_rx) = oneshot::channel::<()>();
    let task = tokio::spawn(agent.serve(async move {
        let _ = stop_rx.await;
    }));
    Running { addr, stop, task }
}

impl Running {
    async fn shutdown(self) {
        let _ = self.stop.send(());
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
}

async fn connect(addr: SocketAddr) -> Ws {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (ws, _) = tokio_tungstenite::client_async(format!("ws://{addr}/devloop"), tcp)
        .await
        .unwrap();
    ws
}

fn hello(token: &str) -> LaptopMsg {
    LaptopMsg::Hello(Hello {
        magic: MAGIC,
        protocol_version: PROTOCOL_VERSION,
        cli_version: "test".into(),
        capabilities: vec![caps::FILES.into(), caps::TAR.into(), caps::PROCESS.into()],
        token: token.into(),
    })
}

async fn send(ws: &mut Ws, msg: &LaptopMsg) {
    ws.send(Message::Binary(encode(msg).into())).await.unwrap();
}

/// The next protocol message, or `None` when the agent closed the connection.
async fn next_msg(ws: &mut Ws) -> Option<AgentMsg> {
    loop {
        let message = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("agent is silent");
        match message {
            Some(Ok(Message::Binary(bytes))) => return Some(decode(&bytes).unwrap()),
            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return None,
            Some(Ok(_)) => {}
        }
    }
}

/// The next reply, skipping pushed logs and status changes.
async fn reply(ws: &mut Ws) -> AgentMsg {
    loop {
        match next_msg(ws)
            .await
            .expect("connection closed while waiting for a reply")
        {
            AgentMsg::Log(_) | AgentMsg::Process(_) => {}
            other => return other,
        }
    }
}

async fn connect_and_welcome(addr: SocketAddr) -> (Ws, devloop_proxy::msg::Welcome) {
    let mut ws = connect(addr).await;
    send(&mut ws, &hello(TOKEN)).await;
    match next_msg(&mut ws).await {
        Some(AgentMsg::Welcome(w)) => (ws, w),
        other => panic!("expected a welcome, got {other:?}"),
    }
}

fn put(path: &str, data: &[u8]) -> FileOp {
    FileOp::Put {
        path: RelPath::new(path).unwrap(),
        mode: 0o644,
        data: data.to_vec(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_token_is_refused_and_nothing_is_applied() {
    let dir = tempfile::tempdir().unwrap();
    let agent = start(dir.path(), &[]).await;
    let mut ws = connect(agent.addr).await;
    send(&mut ws, &hello("not-the-token")).await;
    // Sent right after the hello, before the refusal could arrive.
    send(
        &mut ws,
        &LaptopMsg::Batch {
            req: 1,
            ops: vec![put("pwned.txt", b"x")],
        },
    )
    .await;
    match next_msg(&mut ws).await {
        Some(AgentMsg::Refused { reason }) => assert_eq!(reason, "wrong token"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(
        next_msg(&mut ws).await.is_none(),
        "the agent closes after refusing"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!dir.path().join("pwned.txt").exists());

    // Bad magic and an unknown version are refused with their own reasons.
    for (magic, version, expected) in [
        (*b"GARBAGE!", PROTOCOL_VERSION, "bad magic"),
        (MAGIC, PROTOCOL_VERSION + 1, "unsupported protocol version"),
    ] {
        let mut ws = connect(agent.addr).await;
        let LaptopMsg::Hello(mut h) = hello(TOKEN) else {
            unreachable!()
        };
        h.magic = magic;
        h.protocol_version = version;
        send(&mut ws, &LaptopMsg::Hello(h)).await;
        match next_msg(&mut ws).await {
            Some(AgentMsg::Refused { reason }) => assert!(reason.starts_with(expected), "{reason}"),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    // A first message that is not a hello is refused too.
    let mut ws = connect(agent.addr).await;
    send(
        &mut ws,
        &LaptopMsg::Batch {
            req: 1,
            ops: vec![put("pwned2.txt", b"x")],
        },
    )
    .await;
    assert!(matches!(
        next_msg(&mut ws).await,
        Some(AgentMsg::Refused { .. })
    ));
    assert!(!dir.path().join("pwned2.txt").exists());

    // Another path than /devloop is not upgraded.
    let tcp = TcpStream::connect(agent.addr).await.unwrap();
    assert!(
        tokio_tungstenite::client_async(format!("ws://{}/other", agent.addr), tcp)
            .await
            .is_err()
    );
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_index_and_tar_over_one_connection() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("app");
    let agent = start(&root, &[]).await;
    assert!(root.is_dir(), "the root is created");
    let (mut ws, welcome) = connect_and_welcome(agent.addr).await;
    assert_eq!(welcome.protocol_version, PROTOCOL_VERSION);
    for cap in [caps::FILES, caps::TAR, caps::PROCESS] {
        assert!(welcome.capabilities.iter().any(|c| c == cap), "{cap}");
    }
    assert_eq!(
        welcome.root,
        root.canonicalize().unwrap().display().to_string()
    );
    assert_eq!(welcome.process.state, ProcessState::NoCommand);

    send(
        &mut ws,
        &LaptopMsg::Batch {
            req: 1,
            ops: vec![put("src/app.py", b"print(1)\n")],
        },
    )
    .await;
    assert_eq!(
        reply(&mut ws).await,
        AgentMsg::Ack {
            req: 1,
            outcome: Outcome::Ok { applied: 1 }
        }
    );
    assert_eq!(
        std::fs::read(root.join("src/app.py")).unwrap(),
        b"print(1)\n"
    );

    send(&mut ws, &LaptopMsg::Index { req: 2 }).await;
    match reply(&mut ws).await {
        AgentMsg::Index {
            req: 2,
            entries,
            last: true,
        } => {
            let file = entries
                .iter()
                .find(|(p, _)| p.as_str() == "src/app.py")
                .unwrap();
            assert_eq!(
                file.1,
                Entry::File {
                    mode: 0o644,
                    size: 9,
                    hash: hash_bytes(b"print(1)\n")
                }
            );
            assert!(entries
                .iter()
                .any(|(p, e)| p.as_str() == "src" && matches!(e, Entry::Dir { .. })));
        }
        other => panic!("{other:?}"),
    }

    // A tar stream in several chunks, with a batch in the middle that must apply after the
    // entries sent before it.
    let mut builder = tar::Builder::new(Vec::new());
    let big: Vec<u8> = (0..300_000u32).map(|i| (i % 241) as u8).collect();
    let mut h = tar::Header::new_gnu();
    h.set_mode(0o755);
    h.set_size(big.len() as u64);
    builder.append_data(&mut h, "bin/tool", &big[..]).unwrap();
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_size(0);
    builder.append_link(&mut h, "tool", "bin/tool").unwrap();
    let archive = builder.into_inner().unwrap();
    let chunks: Vec<&[u8]> = archive.chunks(100_000).collect();
    let n = chunks.len();
    for (i, chunk) in chunks.iter().enumerate() {
        send(
            &mut ws,
            &LaptopMsg::TarChunk {
                req: 3,
                data: chunk.to_vec(),
                last: i + 1 == n,
            },
        )
        .await;
        if i == n - 1 {
            break;
        }
        if i == 0 {
            send(&mut ws, &LaptopMsg::Ping { nonce: 42 }).await;
            assert_eq!(reply(&mut ws).await, AgentMsg::Pong { nonce: 42 });
        }
    }
    assert_eq!(
        reply(&mut ws).await,
        AgentMsg::Ack {
            req: 3,
            outcome: Outcome::Ok { applied: 2 }
        }
    );
    assert_eq!(std::fs::read(root.join("bin/tool")).unwrap(), big);
    assert_eq!(
        std::fs::read_link(root.join("tool")).unwrap(),
        std::path::Path::new("bin/tool")
    );

    // A new stream while one is open fails the old one.
    send(
        &mut ws,
        &LaptopMsg::TarChunk {
            req: 4,
            data: archive[..1024].to_vec(),
            last: false,
        },
    )
    .await;
    send(
        &mut ws,
        &LaptopMsg::TarChunk {
            req: 5,
            data: Vec::new(),
            last: true,
        },
    )
    .await;
    assert!(matches!(
        reply(&mut ws).await,
        AgentMsg::Ack {
            req: 4,
            outcome: Outcome::Failed { .. }
        }
    ));
    assert_eq!(
        reply(&mut ws).await,
        AgentMsg::Ack {
            req: 5,
            outcome: Outcome::Ok { applied: 0 }
        }
    );

    // A second connection works alongside the first.
    let (mut other, _) = connect_and_welcome(agent.addr).await;
    send(&mut other, &LaptopMsg::Ping { nonce: 7 }).await;
    assert_eq!(reply(&mut other).await, AgentMsg::Pong { nonce: 7 });

    // Garbage closes the connection (nothing applied, no panic); the agent keeps serving.
    ws.send(Message::Binary(vec![0xff; 64].into()))
        .await
        .unwrap();
    assert!(next_msg(&mut ws).await.is_none());
    send(&mut other, &LaptopMsg::Ping { nonce: 8 }).await;
    assert_eq!(reply(&mut other).await, AgentMsg::Pong { nonce: 8 });
    let (mut third, _) = connect_and_welcome(agent.addr).await;
    send(&mut third, &LaptopMsg::Ping { nonce: 9 }).await;
    assert_eq!(reply(&mut third).await, AgentMsg::Pong { nonce: 9 });
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_logs_restart_and_run() {
    let dir = tempfile::tempdir().unwrap();
    let agent = start(
        dir.path(),
        &["sh", "-c", "echo hello from $$; exec sleep 1000"],
    )
    .await;
    // Let the process print before connecting, so the line comes in the welcome's recent logs.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (mut ws, welcome) = connect_and_welcome(agent.addr).await;
    let ProcessState::Running { pid } = welcome.process.state else {
        panic!("{:?}", welcome.process)
    };
    let expected = format!("hello from {pid}");
    assert!(
        welcome
            .recent_logs
            .iter()
            .any(|l| l.stream == LogStream::Stdout && l.line == expected.as_bytes()),
        "{:?}",
        welcome.recent_logs
    );

    send(&mut ws, &LaptopMsg::Restart { req: 1 }).await;
    // The ack, the new status and the new process's output may come in any order (replies and
    // pushed events travel separately).
    let (mut acked, mut new_pid, mut lines) = (false, None, Vec::new());
    let greeted = |new_pid: Option<u32>, lines: &[Vec<u8>]| {
        new_pid.is_some_and(|p| {
            lines
                .iter()
                .any(|l| l == format!("hello from {p}").as_bytes())
        })
    };
    while !(acked && greeted(new_pid, &lines)) {
        match next_msg(&mut ws).await.expect("connection closed") {
            AgentMsg::Process(s) => {
                if let ProcessState::Running { pid: p } = s.state {
                    assert_ne!(p, pid);
                    new_pid = Some(p);
                }
            }
            AgentMsg::Ack { req: 1, outcome } => {
                assert_eq!(outcome, Outcome::Ok { applied: 0 });
                acked = true;
            }
            AgentMsg::Log(l) => lines.push(l.line),
            other => panic!("{other:?}"),
        }
    }

    send(
        &mut ws,
        &LaptopMsg::Run {
            req: 2,
            argv: vec!["sh".into(), "-c".into(), "echo ran; exit 5".into()],
        },
    )
    .await;
    let mut saw_output = false;
    loop {
        match next_msg(&mut ws).await.unwrap() {
            AgentMsg::Log(l) if l.line == b"ran" => saw_output = true,
            AgentMsg::Ack { req: 2, outcome } => {
                assert_eq!(outcome, Outcome::Exited { code: Some(5) });
                break;
            }
            _ => {}
        }
    }
    assert!(saw_output);
    agent.shutdown().await;
}

/// Reads from a raw socket until the agent closes it (EOF or reset).
async fn until_closed(tcp: &mut TcpStream) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match tcp.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_big_first_message_is_refused_before_the_agent_has_read_it() {
    let dir = tempfile::tempdir().unwrap();
    let agent = start(dir.path(), &[]).await;
    let mut ws = connect(agent.addr).await;
    // A binary frame that announces 1 MiB, of which 64 KiB is sent: the agent must give up
    // after its pre-hello budget, not wait for the rest (or for the handshake deadline).
    let mut frame = vec![0x82u8, 0x80 | 127];
    frame.extend_from_slice(&(1u64 << 20).to_be_bytes());
    frame.extend_from_slice(&[0, 0, 0, 0]);
    frame.resize(frame.len() + 64 * 1024, b'x');
    let tcp = ws.get_mut();
    tcp.write_all(&frame).await.unwrap();
    let began = tokio::time::Instant::now();
    tokio::time::timeout(HANDSHAKE_TIMEOUT / 2, until_closed(tcp))
        .await
        .expect("the agent waited for the rest of an unauthenticated 1 MiB message");
    assert!(began.elapsed() < HANDSHAKE_TIMEOUT / 2);
    // A hello bigger than the hello limit is refused with the reason.
    let mut ws = connect(agent.addr).await;
    let LaptopMsg::Hello(mut big) = hello(TOKEN) else {
        unreachable!()
    };
    big.capabilities = vec!["c".repeat(1000); 5];
    send(&mut ws, &LaptopMsg::Hello(big)).await;
    match next_msg(&mut ws).await {
        Some(AgentMsg::Refused { reason }) => assert!(reason.contains("bytes"), "{reason}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    // The agent goes on serving, and an authenticated connection has the full limit.
    let (mut ws, _) = connect_and_welcome(agent.addr).await;
    let big = vec![7u8; 600_000];
    send(
        &mut ws,
        &LaptopMsg::Batch {
            req: 1,
            ops: vec![put("big.bin", &big)],
        },
    )
    .await;
    assert_eq!(
        reply(&mut ws).await,
        AgentMsg::Ack {
            req: 1,
            outcome: Outcome::Ok { applied: 1 }
        }
    );
    assert_eq!(std::fs::read(dir.path().join("big.bin")).unwrap(), big);
    agent.shutdown().await;
}

/// Connects and says hello like the cli; `None` when the agent closed the socket first.
async fn try_connect_and_welcome(addr: SocketAddr) -> Option<Ws> {
    let tcp = TcpStream::connect(addr).await.ok()?;
    let (mut ws, _) = tokio_tungstenite::client_async(format!("ws://{addr}/devloop"), tcp)
        .await
        .ok()?;
    ws.send(Message::Binary(encode(&hello(TOKEN)).into()))
        .await
        .ok()?;
    match next_msg(&mut ws).await? {
        AgentMsg::Welcome(_) => Some(ws),
        other => panic!("expected a welcome, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sockets_are_capped_and_closed_at_the_deadline_and_a_cli_still_gets_in() {
    let dir = tempfile::tempdir().unwrap();
    let agent = start(dir.path(), &[]).await;
    let began = tokio::time::Instant::now();
    let mut idle = Vec::new();
    for _ in 0..PRE_HELLO_CONNECTIONS + 24 {
        idle.push(TcpStream::connect(agent.addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Those beyond the places were closed at once; the others wait for their hello.
    let mut held = Vec::new();
    for mut tcp in idle {
        let mut byte = [0u8; 1];
        match tokio::time::timeout(Duration::from_millis(20), tcp.read(&mut byte)).await {
            Ok(Ok(0) | Err(_)) => {}
            Ok(Ok(_)) => panic!("the agent sent something to an idle socket"),
            Err(_) => held.push(tcp),
        }
    }
    assert_eq!(held.len(), PRE_HELLO_CONNECTIONS);
    // A cli that retries as the real one does gets in (at the latest when the idle sockets'
    // deadline frees their places) and is served.
    let mut ws = tokio::time::timeout(HANDSHAKE_TIMEOUT + Duration::from_secs(3), async {
        loop {
            if let Some(ws) = try_connect_and_welcome(agent.addr).await {
                return ws;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("idle sockets kept the cli out");
    send(&mut ws, &LaptopMsg::Ping { nonce: 1 }).await;
    assert_eq!(reply(&mut ws).await, AgentMsg::Pong { nonce: 1 });
    // Sockets that send nothing are closed at the deadline, not before.
    for mut tcp in held {
        tokio::time::timeout(Duration::from_secs(2), until_closed(&mut tcp))
            .await
            .expect("an idle socket outlived the handshake deadline");
    }
    let closed_after = began.elapsed();
    assert!(
        closed_after >= HANDSHAKE_TIMEOUT,
        "closed after {closed_after:?}"
    );
    assert!(
        closed_after < HANDSHAKE_TIMEOUT + Duration::from_secs(2),
        "closed after {closed_after:?}"
    );
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_is_acknowledged_through_a_flood_of_log_lines() {
    let dir = tempfile::tempdir().unwrap();
    // The supervised process floods the log broadcast for the whole test, with lines long
    // enough that the socket's buffers hold only a few hundred of them.
    let agent = start(
        dir.path(),
        &["sh", "-c", "yes \"$(head -c 4000 /dev/zero | tr '\\0' f)\""],
    )
    .await;
    // A small receive buffer, so that the agent's queue for this connection fills soon.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let tcp = socket.connect(agent.addr).await.unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async(format!("ws://{}/devloop", agent.addr), tcp)
        .await
        .unwrap();
    send(&mut ws, &hello(TOKEN)).await;
    assert!(matches!(
        next_msg(&mut ws).await,
        Some(AgentMsg::Welcome(_))
    ));
    let marker = dir.path().join("ran");
    send(
        &mut ws,
        &LaptopMsg::Run {
            req: 1,
            argv: vec!["touch".into(), marker.display().to_string()],
        },
    )
    .await;
    // Not reading: the flood overruns this connection's backlog while the run ends and
    // long after it.
    let waited = tokio::time::Instant::now();
    while !marker.exists() {
        assert!(
            waited.elapsed() < Duration::from_secs(20),
            "the run did not run"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut lines = 0u64;
    let outcome = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match next_msg(&mut ws).await.expect("connection closed") {
                AgentMsg::Ack { req: 1, outcome } => return outcome,
                AgentMsg::Log(_) => lines += 1,
                _ => {}
            }
        }
    })
    .await
    .expect("the run's acknowledgement was lost in the flood");
    assert_eq!(outcome, Outcome::Exited { code: Some(0) });
    println!("{lines} log lines before the acknowledgement");
    assert!(lines > 0);
    agent.shutdown().await;
}
