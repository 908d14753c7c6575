//! Tunnel streams between two multiplexers, over two transports: cross-wired channels (the
//! cheap tier) and a real WebSocket on 127.0.0.1 with the real codec. Streams are bridged to
//! real TCP sockets the way an intercept uses them: the laptop side accepts TCP connections
//! and opens a stream for each; the agent side connects each stream it accepts to
//! 127.0.0.1:PORT, where PORT is the one given to `open`.
//! Run with `RUST_LOG=devloop_proxy=debug` to see each stream's lifecycle.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use devloop_proxy::codec::{decode, encode};
use devloop_proxy::msg::{AgentMsg, LaptopMsg};
use devloop_proxy::tunnel::{
    Incoming, Mux, MuxStream, Side, TunnelFrame, CONNECTION_LOST, INITIAL_WINDOW, MAX_DATA_FRAME,
    OUT_QUEUE_FRAMES,
};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::Message;

const LONG: Duration = Duration::from_secs(60);

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

// ---------------------------------------------------------------------------------------
// Transports

/// Two multiplexers whose frames travel through channels.
struct Pair {
    laptop: Mux,
    agent: Mux,
    laptop_in: Option<Incoming>,
    agent_in: Option<Incoming>,
}

fn channel_pair() -> Pair {
    init_tracing();
    let (laptop_tx, mut laptop_rx) = mpsc::channel(OUT_QUEUE_FRAMES);
    let (agent_tx, mut agent_rx) = mpsc::channel(OUT_QUEUE_FRAMES);
    let (laptop, laptop_in) = Mux::new(Side::Laptop, laptop_tx);
    let (agent, agent_in) = Mux::new(Side::Agent, agent_tx);
    let to_agent = agent.clone();
    tokio::spawn(async move {
        while let Some(frame) = laptop_rx.recv().await {
            to_agent.handle(frame);
        }
        to_agent.shutdown(CONNECTION_LOST);
    });
    let to_laptop = laptop.clone();
    tokio::spawn(async move {
        while let Some(frame) = agent_rx.recv().await {
            to_laptop.handle(frame);
        }
        to_laptop.shutdown(CONNECTION_LOST);
    });
    Pair {
        laptop,
        agent,
        laptop_in: Some(laptop_in),
        agent_in: Some(agent_in),
    }
}

/// Two multiplexers connected by a WebSocket on 127.0.0.1 (the agent serves, the laptop
/// dials), each frame one binary message `LaptopMsg::Tunnel` / `AgentMsg::Tunnel` encoded by
/// the real codec. Sending on the returned channel drops the agent's connection abruptly.
async fn websocket_pair() -> (Pair, oneshot::Sender<()>) {
    init_tracing();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        tcp.set_nodelay(true).unwrap();
        tokio_tungstenite::accept_async(tcp).await.unwrap()
    });
    let tcp = TcpStream::connect(addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let (laptop_ws, _) = tokio_tungstenite::client_async(format!("ws://{addr}/devloop"), tcp)
        .await
        .unwrap();
    let agent_ws = server.await.unwrap();

    let (laptop_tx, laptop_rx) = mpsc::channel(OUT_QUEUE_FRAMES);
    let (agent_tx, agent_rx) = mpsc::channel(OUT_QUEUE_FRAMES);
    let (laptop, laptop_in) = Mux::new(Side::Laptop, laptop_tx);
    let (agent, agent_in) = Mux::new(Side::Agent, agent_tx);
    let (kill, agent_kill) = oneshot::channel();
    drive(
        laptop_ws,
        laptop.clone(),
        laptop_rx,
        None,
        |f| encode(&LaptopMsg::Tunnel(f)),
        |b| match decode::<AgentMsg>(b) {
            Ok(AgentMsg::Tunnel(f)) => Ok(f),
            other => Err(format!("{other:?}")),
        },
    );
    drive(
        agent_ws,
        agent.clone(),
        agent_rx,
        Some(agent_kill),
        |f| encode(&AgentMsg::Tunnel(f)),
        |b| match decode::<LaptopMsg>(b) {
            Ok(LaptopMsg::Tunnel(f)) => Ok(f),
            other => Err(format!("{other:?}")),
        },
    );
    (
        Pair {
            laptop,
            agent,
            laptop_in: Some(laptop_in),
            agent_in: Some(agent_in),
        },
        kill,
    )
}

/// One side's connection: a writer that sends every queued frame at once (flushing when the
/// queue is empty, so nothing waits for more), and a reader that feeds the multiplexer.
fn drive<S>(
    ws: tokio_tungstenite::WebSocketStream<S>,
    mux: Mux,
    mut out_rx: mpsc::Receiver<TunnelFrame>,
    kill: Option<oneshot::Receiver<()>>,
    enc: fn(TunnelFrame) -> Vec<u8>,
    dec: fn(&[u8]) -> Result<TunnelFrame, String>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sink, mut stream) = ws.split();
    let writer = tokio::spawn(async move {
        while let Some(frame) = out_rx.recv().await {
            if sink.feed(Message::Binary(enc(frame).into())).await.is_err() {
                return;
            }
            while let Ok(frame) = out_rx.try_recv() {
                if sink.feed(Message::Binary(enc(frame).into())).await.is_err() {
                    return;
                }
            }
            if sink.flush().await.is_err() {
                return;
            }
        }
    });
    tokio::spawn(async move {
        let read = async {
            while let Some(Ok(msg)) = stream.next().await {
                if let Message::Binary(bytes) = msg {
                    match dec(&bytes) {
                        Ok(frame) => mux.handle(frame),
                        Err(e) => panic!("not a tunnel frame: {e}"),
                    }
                }
            }
        };
        let killed = async {
            let killed = match kill {
                Some(kill) => kill.await.is_ok(),
                None => false,
            };
            if !killed {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            _ = read => {}
            _ = killed => {}
        }
        // The connection is gone (or killed): both halves of the socket drop here.
        writer.abort();
        mux.shutdown(CONNECTION_LOST);
    });
}

// ---------------------------------------------------------------------------------------
// Bridges to TCP, as an intercept uses them

/// The laptop side of the tests: accepts TCP connections and opens a stream to `port` for each.
async fn listen_and_open(mux: Mux, port: u16) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tcp.set_nodelay(true).unwrap();
            let mux = mux.clone();
            tokio::spawn(async move {
                let Ok(stream) = mux.open(port).await else {
                    return;
                };
                bridge(&mut tcp, stream).await;
            });
        }
    });
    addr
}

/// The agent side of the tests: connects every accepted stream to 127.0.0.1:PORT.
fn connect_accepted(mut incoming: Incoming) {
    tokio::spawn(async move {
        while let Some((port, stream)) = incoming.accept().await {
            tokio::spawn(async move {
                match TcpStream::connect(("127.0.0.1", port)).await {
                    Err(e) => stream.reset(&format!("connect to 127.0.0.1:{port}: {e}")),
                    Ok(mut tcp) => {
                        tcp.set_nodelay(true).unwrap();
                        bridge(&mut tcp, stream).await;
                    }
                }
            });
        }
    });
}

async fn bridge(tcp: &mut TcpStream, stream: MuxStream) {
    // A socket error resets the stream; a reset drops `tcp` when this returns.
    let _ = stream.bridge(tcp).await;
}

/// A pair with TCP bridges: connect to the returned address on the laptop side to reach
/// `server_port` on the agent side.
async fn bridged(mut pair: Pair, server_port: u16) -> (Pair, SocketAddr) {
    connect_accepted(pair.agent_in.take().unwrap());
    let addr = listen_and_open(pair.laptop.clone(), server_port).await;
    (pair, addr)
}

// ---------------------------------------------------------------------------------------
// Servers behind the agent side

async fn serve(handler: fn(TcpStream) -> tokio::task::JoinHandle<()>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tcp.set_nodelay(true).unwrap();
            handler(tcp);
        }
    });
    port
}

/// Echoes everything, then closes its write side after the client's.
async fn echo_server() -> u16 {
    serve(|tcp| {
        tokio::spawn(async move {
            let (mut rd, mut wr) = tcp.into_split();
            let _ = tokio::io::copy(&mut rd, &mut wr).await;
            let _ = wr.shutdown().await;
        })
    })
    .await
}

/// Reads to the end, hashing, then answers with the hash and the byte count (like a
/// request / response over HTTP/1.0).
async fn hash_server() -> u16 {
    serve(|mut tcp| {
        tokio::spawn(async move {
            let mut hasher = blake3::Hasher::new();
            let mut buf = vec![0u8; 64 * 1024];
            let mut n = 0u64;
            loop {
                let got = tcp.read(&mut buf).await.unwrap();
                if got == 0 {
                    break;
                }
                n += got as u64;
                hasher.update(&buf[..got]);
            }
            tcp.write_all(hasher.finalize().as_bytes()).await.unwrap();
            tcp.write_all(&n.to_le_bytes()).await.unwrap();
            tcp.shutdown().await.unwrap();
        })
    })
    .await
}

/// Writes 16 MiB as fast as it is let, ignoring what it receives.
async fn firehose_server() -> u16 {
    serve(|mut tcp| {
        tokio::spawn(async move {
            let chunk = vec![7u8; 64 * 1024];
            for _ in 0..256 {
                if tcp.write_all(&chunk).await.is_err() {
                    return;
                }
            }
        })
    })
    .await
}

/// A port on which nothing listens.
async fn closed_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap().port()
}

// ---------------------------------------------------------------------------------------
// Helpers

fn pseudo_random(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Sends `data` to the hash server through the tunnel; returns the time taken.
async fn upload_and_check(addr: SocketAddr, data: &[u8]) -> Duration {
    let start = Instant::now();
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    tcp.write_all(data).await.unwrap();
    tcp.shutdown().await.unwrap();
    let mut answer = Vec::new();
    tcp.read_to_end(&mut answer).await.unwrap();
    let elapsed = start.elapsed();
    assert_eq!(answer.len(), 40, "answer {answer:?}");
    assert_eq!(&answer[..32], blake3::hash(data).as_bytes(), "hash differs");
    assert_eq!(
        u64::from_le_bytes(answer[32..].try_into().unwrap()),
        data.len() as u64
    );
    elapsed
}

/// Writes `data` and reads the echo concurrently, checking it byte for byte.
async fn echo_and_check(addr: SocketAddr, data: Vec<u8>) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let (mut rd, mut wr) = tcp.into_split();
    let expected = blake3::hash(&data);
    let len = data.len();
    let writer = tokio::spawn(async move {
        wr.write_all(&data).await.unwrap();
        wr.shutdown().await.unwrap();
    });
    let mut back = Vec::with_capacity(len);
    rd.read_to_end(&mut back).await.unwrap();
    writer.await.unwrap();
    assert_eq!(back.len(), len);
    assert_eq!(blake3::hash(&back), expected);
}

/// Waits until both sides have no live streams: every stream ended and left the tables.
async fn all_streams_ended(pair: &Pair) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while pair.laptop.live_streams() + pair.agent.live_streams() > 0 {
        assert!(
            Instant::now() < deadline,
            "streams still live: laptop {}, agent {}",
            pair.laptop.live_streams(),
            pair.agent.live_streams()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Round trips of 64 bytes on one connection; returns the latencies, sorted.
async fn round_trips(addr: SocketAddr, count: usize) -> Vec<Duration> {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let mut buf = [0u8; 64];
    let mut times = Vec::with_capacity(count);
    for i in 0..count {
        let msg = [i as u8; 64];
        let start = Instant::now();
        tcp.write_all(&msg).await.unwrap();
        tcp.read_exact(&mut buf).await.unwrap();
        times.push(start.elapsed());
        assert_eq!(buf, msg);
    }
    times.sort();
    times
}

fn percentile(sorted: &[Duration], p: usize) -> Duration {
    sorted[(sorted.len() - 1) * p / 100]
}

fn expect_error_with(result: io::Result<usize>, needle: &str) -> io::Error {
    match result {
        Ok(n) => panic!("expected an error with {needle:?}, read {n} bytes"),
        Err(e) => {
            assert!(
                e.to_string().contains(needle),
                "error {e:?} does not say {needle:?}"
            );
            e
        }
    }
}

// ---------------------------------------------------------------------------------------
// Through channels

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_round_trip() {
    let (pair, addr) = bridged(channel_pair(), echo_server().await).await;
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"hello through the tunnel").await.unwrap();
    let mut buf = [0u8; 24];
    tcp.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"hello through the tunnel");
    tcp.shutdown().await.unwrap();
    let mut rest = Vec::new();
    tcp.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());
    drop(tcp);
    all_streams_ended(&pair).await;
}

/// The `--expose` direction: the agent accepts TCP connections and opens the streams (odd
/// ids), the laptop connects them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_opened_by_the_agent() {
    let mut pair = channel_pair();
    let echo_port = echo_server().await;
    connect_accepted(pair.laptop_in.take().unwrap());
    let addr = listen_and_open(pair.agent.clone(), echo_port).await;
    let tasks: Vec<_> = (0..10u64)
        .map(|i| tokio::spawn(echo_and_check(addr, pseudo_random(i, 100_000))))
        .collect();
    for t in tasks {
        timeout(LONG, t).await.expect("stream stalled").unwrap();
    }
    let mut stream = pair.agent.open(echo_port).await.unwrap();
    assert_eq!(stream.id() % 2, 1, "the agent opens odd ids");
    stream.write_all(b"x").await.unwrap();
    stream.shutdown().await.unwrap();
    let mut back = Vec::new();
    stream.read_to_end(&mut back).await.unwrap();
    assert_eq!(back, b"x");
    all_streams_ended(&pair).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_concurrent_streams_of_a_mebibyte_each() {
    let (pair, addr) = bridged(channel_pair(), echo_server().await).await;
    let start = Instant::now();
    let tasks: Vec<_> = (0..100u64)
        .map(|i| {
            tokio::spawn(echo_and_check(
                addr,
                pseudo_random(i, 1024 * 1024 + i as usize),
            ))
        })
        .collect();
    for t in tasks {
        timeout(LONG, t).await.expect("stream stalled").unwrap();
    }
    let elapsed = start.elapsed();
    println!(
        "100 streams x 1 MiB echoed (200 MiB through the tunnel) in {elapsed:.2?}: {:.0} MiB/s",
        200.0 / elapsed.as_secs_f64()
    );
    all_streams_ended(&pair).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_transfer_arrives_intact() {
    let (pair, addr) = bridged(channel_pair(), hash_server().await).await;
    let data = pseudo_random(64, 64 * 1024 * 1024);
    let elapsed = timeout(LONG, upload_and_check(addr, &data)).await.unwrap();
    println!(
        "64 MiB through the tunnel (channels) in {elapsed:.2?}: {:.0} MiB/s",
        64.0 / elapsed.as_secs_f64()
    );
    all_streams_ended(&pair).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_lets_the_server_answer_after_the_request_ends() {
    let (pair, addr) = bridged(channel_pair(), hash_server().await).await;
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
    // Like `nc -N`: the request ends with a half-close, and the answer still comes back.
    tcp.shutdown().await.unwrap();
    let mut answer = Vec::new();
    timeout(LONG, tcp.read_to_end(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        &answer[..32],
        blake3::hash(b"GET / HTTP/1.0\r\n\r\n").as_bytes()
    );
    assert_eq!(u64::from_le_bytes(answer[32..].try_into().unwrap()), 18);
    drop(tcp);
    all_streams_ended(&pair).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_at_the_stream_level() {
    let mut pair = channel_pair();
    let mut agent_in = pair.agent_in.take().unwrap();
    let mut laptop_stream = pair.laptop.open(80).await.unwrap();
    laptop_stream.write_all(b"request").await.unwrap();
    laptop_stream.shutdown().await.unwrap();
    let (port, mut agent_stream) = agent_in.accept().await.unwrap();
    assert_eq!(port, 80);
    let mut request = Vec::new();
    agent_stream.read_to_end(&mut request).await.unwrap();
    assert_eq!(request, b"request");
    agent_stream.write_all(b"response").await.unwrap();
    agent_stream.shutdown().await.unwrap();
    let mut response = Vec::new();
    laptop_stream.read_to_end(&mut response).await.unwrap();
    assert_eq!(response, b"response");
    // Writing after the own shutdown is refused locally.
    assert_eq!(
        laptop_stream.write(b"x").await.unwrap_err().kind(),
        io::ErrorKind::BrokenPipe
    );
    all_streams_ended(&pair).await;
    // Both ended cleanly: dropping them now sends nothing and resets nothing.
    drop(laptop_stream);
    drop(agent_stream);
    assert_eq!(pair.laptop.live_streams() + pair.agent.live_streams(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_far_side_refusing_resets_the_stream_with_its_reason() {
    let (pair, _) = bridged(channel_pair(), 0).await;
    let port = closed_port().await;
    let mut stream = pair.laptop.open(port).await.unwrap();
    let mut buf = [0u8; 16];
    let err = expect_error_with(
        timeout(LONG, stream.read(&mut buf)).await.unwrap(),
        &format!("connect to 127.0.0.1:{port}"),
    );
    assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
    assert!(err.to_string().to_lowercase().contains("refused"), "{err}");
    expect_error_with(stream.write(b"x").await, "refused");
    all_streams_ended(&pair).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_far_side_refusing_closes_the_tcp_client() {
    let (pair, addr) = bridged(channel_pair(), closed_port().await).await;
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let mut buf = [0u8; 16];
    // The laptop's bridge sees the reset and drops the client connection.
    match timeout(LONG, tcp.read(&mut buf)).await.unwrap() {
        Ok(0) | Err(_) => {}
        Ok(n) => panic!("read {n} bytes from a refused connection"),
    }
    all_streams_ended(&pair).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_stream_resets_the_peers() {
    let mut pair = channel_pair();
    let mut agent_in = pair.agent_in.take().unwrap();
    let mut laptop_stream = pair.laptop.open(1).await.unwrap();
    laptop_stream.write_all(b"partial").await.unwrap();
    let (_, mut agent_stream) = agent_in.accept().await.unwrap();
    drop(laptop_stream);
    let mut buf = Vec::new();
    let err = expect_error_with(
        timeout(LONG, agent_stream.read_to_end(&mut buf))
            .await
            .unwrap(),
        "the laptop dropped the stream without shutting it down",
    );
    assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
    // And the other way round, with a reason of the caller's.
    let mut laptop_stream = pair.laptop.open(2).await.unwrap();
    let (_, agent_stream) = agent_in.accept().await.unwrap();
    agent_stream.reset("local socket error: broken pipe");
    let err = expect_error_with(
        timeout(LONG, laptop_stream.read(&mut [0u8; 4]))
            .await
            .unwrap(),
        "local socket error: broken pipe",
    );
    assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
    all_streams_ended(&pair).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_error_resets_the_stream_with_the_error() {
    let mut pair = channel_pair();
    let mut agent_in = pair.agent_in.take().unwrap();
    let addr = listen_and_open(pair.laptop.clone(), 80).await;
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"x").await.unwrap();
    let (_, mut agent_stream) = agent_in.accept().await.unwrap();
    let mut buf = [0u8; 1];
    agent_stream.read_exact(&mut buf).await.unwrap();
    // The client aborts its connection (RST): the laptop's bridge fails to read from it.
    tcp.set_zero_linger().unwrap();
    drop(tcp);
    let err = expect_error_with(
        timeout(LONG, agent_stream.read(&mut buf)).await.unwrap(),
        "socket error on the laptop",
    );
    assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
    all_streams_ended(&pair).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_fails_every_open_stream_with_connection_lost() {
    let mut pair = channel_pair();
    let mut agent_in = pair.agent_in.take().unwrap();
    let mut laptop_streams = Vec::new();
    let mut agent_streams = Vec::new();
    for port in 0..5 {
        laptop_streams.push(pair.laptop.open(port).await.unwrap());
        agent_streams.push(agent_in.accept().await.unwrap().1);
    }
    // A reader waiting when the connection drops is woken with the error.
    let mut waiting = laptop_streams.pop().unwrap();
    let waiter = tokio::spawn(async move { waiting.read(&mut [0u8; 8]).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    // Both sides notice the connection ending and shut down their multiplexer.
    pair.laptop.shutdown(CONNECTION_LOST);
    pair.agent.shutdown(CONNECTION_LOST);
    expect_error_with(
        timeout(LONG, waiter).await.unwrap().unwrap(),
        CONNECTION_LOST,
    );
    for mut s in laptop_streams.into_iter().chain(agent_streams) {
        let err = expect_error_with(s.read(&mut [0u8; 8]).await, CONNECTION_LOST);
        assert_eq!(err.kind(), io::ErrorKind::ConnectionAborted);
        expect_error_with(s.write(b"x").await, CONNECTION_LOST);
    }
    assert_eq!(
        pair.laptop.open(9).await.unwrap_err().to_string(),
        CONNECTION_LOST
    );
    assert!(
        agent_in.accept().await.is_none(),
        "incoming ends after shutdown"
    );
    assert_eq!(pair.laptop.live_streams() + pair.agent.live_streams(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_reader_holds_at_most_its_window_and_the_writer_waits() {
    let mut pair = channel_pair();
    let mut agent_in = pair.agent_in.take().unwrap();
    let mut laptop_stream = pair.laptop.open(1).await.unwrap();
    let (_, mut agent_stream) = agent_in.accept().await.unwrap();
    let data = pseudo_random(1, INITIAL_WINDOW as usize * 3);
    let writer = tokio::spawn(async move {
        laptop_stream.write_all(&data).await.unwrap();
        laptop_stream.shutdown().await.unwrap();
        (laptop_stream, data)
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!writer.is_finished(), "the writer went past the window");
    assert_eq!(
        agent_stream.buffered(),
        INITIAL_WINDOW as usize,
        "the window filled, no more"
    );
    let mut got = Vec::new();
    timeout(LONG, agent_stream.read_to_end(&mut got))
        .await
        .unwrap()
        .unwrap();
    let (_laptop_stream, data) = writer.await.unwrap();
    assert!(got == data, "data differs");
}

// ---------------------------------------------------------------------------------------
// Through a real WebSocket

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_echo_large_transfer_and_latency() {
    let (pair, _kill) = websocket_pair().await;
    let echo_port = echo_server().await;
    let hash_port = hash_server().await;
    let mut pair = pair;
    connect_accepted(pair.agent_in.take().unwrap());
    let echo_addr = listen_and_open(pair.laptop.clone(), echo_port).await;
    let hash_addr = listen_and_open(pair.laptop.clone(), hash_port).await;

    let times = round_trips(echo_addr, 1000).await;
    println!(
        "websocket tunnel, 64-byte round trips: p50 {:?}, p99 {:?}, max {:?}",
        percentile(&times, 50),
        percentile(&times, 99),
        times[times.len() - 1]
    );
    let direct_port = echo_server().await;
    let direct = round_trips(SocketAddr::from(([127, 0, 0, 1], direct_port)), 1000).await;
    println!(
        "plain loopback TCP, 64-byte round trips: p50 {:?}, p99 {:?}",
        percentile(&direct, 50),
        percentile(&direct, 99)
    );

    let data = pseudo_random(7, 64 * 1024 * 1024);
    let elapsed = timeout(LONG, upload_and_check(hash_addr, &data))
        .await
        .unwrap();
    println!(
        "64 MiB through the websocket tunnel in {elapsed:.2?}: {:.0} MiB/s",
        64.0 / elapsed.as_secs_f64()
    );
    let tasks: Vec<_> = (0..20u64)
        .map(|i| tokio::spawn(echo_and_check(echo_addr, pseudo_random(i, 1024 * 1024))))
        .collect();
    for t in tasks {
        timeout(LONG, t).await.expect("stream stalled").unwrap();
    }
    all_streams_ended(&pair).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_a_stalled_stream_does_not_delay_the_others() {
    let (mut pair, _kill) = websocket_pair().await;
    let firehose_port = firehose_server().await;
    let echo_port = echo_server().await;
    connect_accepted(pair.agent_in.take().unwrap());
    let echo_addr = listen_and_open(pair.laptop.clone(), echo_port).await;

    // A stream whose reader never reads, while the far side writes as fast as it can.
    let stalled = pair.laptop.open(firehose_port).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while stalled.buffered() < INITIAL_WINDOW as usize {
        assert!(
            Instant::now() < deadline,
            "window never filled: {}",
            stalled.buffered()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // And a bulk upload going on all the while, competing for the connection: it sends
    // until the round trips are done, then checks that everything arrived.
    let hash_port = hash_server().await;
    let hash_addr = listen_and_open(pair.laptop.clone(), hash_port).await;
    let sent = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let bulk = {
        let (sent, stop) = (sent.clone(), stop.clone());
        tokio::spawn(async move {
            let mut tcp = TcpStream::connect(hash_addr).await.unwrap();
            let mut hasher = blake3::Hasher::new();
            // Made beforehand: generating data here would take the CPU the others need.
            let chunks: Vec<_> = (0..8).map(|i| pseudo_random(i, 1024 * 1024)).collect();
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let chunk = &chunks[i % chunks.len()];
                i += 1;
                tcp.write_all(chunk).await.unwrap();
                hasher.update(chunk);
                sent.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            }
            tcp.shutdown().await.unwrap();
            let mut answer = Vec::new();
            tcp.read_to_end(&mut answer).await.unwrap();
            assert_eq!(
                &answer[..32],
                hasher.finalize().as_bytes(),
                "bulk upload differs"
            );
            assert_eq!(
                u64::from_le_bytes(answer[32..].try_into().unwrap()),
                sent.load(Ordering::Relaxed)
            );
        })
    };
    while sent.load(Ordering::Relaxed) < 4 * 1024 * 1024 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }

    let before = sent.load(Ordering::Relaxed);
    let start = Instant::now();
    let times = round_trips(echo_addr, 100).await;
    let total = start.elapsed();
    let during = sent.load(Ordering::Relaxed) - before;
    stop.store(true, Ordering::Relaxed);
    println!(
        "100 round trips beside a stalled stream and a bulk upload ({} KiB uploaded meanwhile): {total:?} in all, p50 {:?}, p99 {:?}, max {:?}",
        during / 1024,
        percentile(&times, 50),
        percentile(&times, 99),
        times[times.len() - 1]
    );
    assert!(total < Duration::from_secs(2), "round trips took {total:?}");
    assert!(
        during > 0,
        "the upload made no progress during the round trips"
    );
    timeout(LONG, bulk).await.unwrap().unwrap();
    assert_eq!(
        stalled.buffered(),
        INITIAL_WINDOW as usize,
        "the stalled stream holds its window, no more"
    );
    drop(stalled);
    all_streams_ended(&pair).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_connection_drop_fails_every_stream_on_both_sides() {
    let (mut pair, kill) = websocket_pair().await;
    let mut agent_in = pair.agent_in.take().unwrap();
    let echo_port = echo_server().await;
    let mut laptop_streams = Vec::new();
    let mut agent_streams = Vec::new();
    for _ in 0..3 {
        let mut s = pair.laptop.open(echo_port).await.unwrap();
        s.write_all(b"ping").await.unwrap();
        laptop_streams.push(s);
        let (_, mut a) = agent_in.accept().await.unwrap();
        let mut buf = [0u8; 4];
        a.read_exact(&mut buf).await.unwrap();
        agent_streams.push(a);
    }
    kill.send(()).unwrap();
    for mut s in laptop_streams.into_iter().chain(agent_streams) {
        expect_error_with(
            timeout(LONG, s.read(&mut [0u8; 8])).await.unwrap(),
            CONNECTION_LOST,
        );
    }
    assert!(pair.laptop.open(1).await.is_err());
    assert_eq!(pair.laptop.live_streams() + pair.agent.live_streams(), 0);
}

// ---------------------------------------------------------------------------------------
// A fake peer at the frame boundary: protocol violations

/// An agent-side multiplexer fed frames by hand; returns it, its incoming streams and the
/// frames it sends.
fn agent_with_fake_laptop() -> (Mux, Incoming, mpsc::Receiver<TunnelFrame>) {
    init_tracing();
    let (tx, rx) = mpsc::channel(OUT_QUEUE_FRAMES);
    let (mux, incoming) = Mux::new(Side::Agent, tx);
    (mux, incoming, rx)
}

async fn next_frame(rx: &mut mpsc::Receiver<TunnelFrame>) -> TunnelFrame {
    timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("no frame sent")
        .expect("channel closed")
}

async fn expect_reset(rx: &mut mpsc::Receiver<TunnelFrame>, id: u64, needle: &str) {
    match next_frame(rx).await {
        TunnelFrame::Reset { stream, reason } => {
            assert_eq!(stream, id);
            assert!(
                reason.contains(needle),
                "reason {reason:?} does not say {needle:?}"
            );
        }
        other => panic!("expected a reset of {id}, got {other:?}"),
    }
}

#[tokio::test]
async fn data_beyond_the_window_resets_the_stream() {
    let (agent, mut incoming, mut rx) = agent_with_fake_laptop();
    agent.handle(TunnelFrame::Open {
        stream: 2,
        port: 80,
    });
    let (_, mut stream) = incoming.accept().await.unwrap();
    for _ in 0..INITIAL_WINDOW as usize / MAX_DATA_FRAME {
        agent.handle(TunnelFrame::Data {
            stream: 2,
            data: vec![1; MAX_DATA_FRAME],
        });
    }
    assert_eq!(stream.buffered(), INITIAL_WINDOW as usize);
    agent.handle(TunnelFrame::Data {
        stream: 2,
        data: vec![1],
    });
    expect_reset(&mut rx, 2, "beyond the window").await;
    let err = expect_error_with(stream.read(&mut [0u8; 8]).await, "protocol violation");
    assert_eq!(err.kind(), io::ErrorKind::ConnectionAborted);
    assert_eq!(agent.live_streams(), 0);
    // Late frames for the ended stream are ignored, not answered.
    agent.handle(TunnelFrame::Data {
        stream: 2,
        data: vec![1],
    });
    agent.handle(TunnelFrame::End { stream: 2 });
    assert!(
        timeout(Duration::from_millis(100), rx.recv())
            .await
            .is_err(),
        "late frames were answered"
    );
}

#[tokio::test]
async fn frames_for_streams_never_opened_are_answered_with_a_reset() {
    let (agent, _incoming, mut rx) = agent_with_fake_laptop();
    agent.handle(TunnelFrame::Data {
        stream: 4,
        data: b"x".to_vec(),
    });
    expect_reset(&mut rx, 4, "never opened").await;
    agent.handle(TunnelFrame::Window {
        stream: 1,
        credit: 5,
    });
    expect_reset(&mut rx, 1, "never opened").await;
    agent.handle(TunnelFrame::End { stream: 6 });
    expect_reset(&mut rx, 6, "never opened").await;
    // A reset is never answered with a reset.
    agent.handle(TunnelFrame::Reset {
        stream: 8,
        reason: "whatever".into(),
    });
    assert!(timeout(Duration::from_millis(100), rx.recv())
        .await
        .is_err());
}

#[tokio::test]
async fn opens_with_a_wrong_or_reused_id_are_refused() {
    let (agent, mut incoming, mut rx) = agent_with_fake_laptop();
    // The laptop opens even ids; 3 is the agent's.
    agent.handle(TunnelFrame::Open {
        stream: 3,
        port: 80,
    });
    expect_reset(&mut rx, 3, "wrong parity").await;
    agent.handle(TunnelFrame::Open {
        stream: 0,
        port: 80,
    });
    expect_reset(&mut rx, 0, "wrong parity").await;
    agent.handle(TunnelFrame::Open {
        stream: 4,
        port: 80,
    });
    let (_, mut first) = incoming.accept().await.unwrap();
    agent.handle(TunnelFrame::Open {
        stream: 2,
        port: 80,
    });
    expect_reset(&mut rx, 2, "not above its previous id 4").await;
    // Reusing a live id resets that stream too.
    agent.handle(TunnelFrame::Open {
        stream: 4,
        port: 80,
    });
    expect_reset(&mut rx, 4, "not above").await;
    expect_error_with(first.read(&mut [0u8; 1]).await, "protocol violation");
    assert_eq!(agent.live_streams(), 0);
}

#[tokio::test]
async fn oversized_frames_data_after_end_and_excess_credit_reset_the_stream() {
    let (agent, mut incoming, mut rx) = agent_with_fake_laptop();
    agent.handle(TunnelFrame::Open {
        stream: 2,
        port: 80,
    });
    agent.handle(TunnelFrame::Data {
        stream: 2,
        data: vec![0; MAX_DATA_FRAME + 1],
    });
    expect_reset(&mut rx, 2, "above the limit").await;

    agent.handle(TunnelFrame::Open {
        stream: 4,
        port: 80,
    });
    agent.handle(TunnelFrame::Data {
        stream: 4,
        data: b"ok".to_vec(),
    });
    agent.handle(TunnelFrame::End { stream: 4 });
    agent.handle(TunnelFrame::Data {
        stream: 4,
        data: b"late".to_vec(),
    });
    expect_reset(&mut rx, 4, "after its end").await;

    agent.handle(TunnelFrame::Open {
        stream: 6,
        port: 80,
    });
    for _ in 0..5000 {
        agent.handle(TunnelFrame::Window {
            stream: 6,
            credit: u32::MAX,
        });
    }
    expect_reset(&mut rx, 6, "credit").await;

    agent.handle(TunnelFrame::Open {
        stream: 8,
        port: 80,
    });
    agent.handle(TunnelFrame::End { stream: 8 });
    agent.handle(TunnelFrame::End { stream: 8 });
    expect_reset(&mut rx, 8, "ended twice").await;
    for _ in 0..4 {
        assert!(incoming.accept().await.is_some());
    }
    assert_eq!(agent.live_streams(), 0);
}

#[tokio::test]
async fn a_small_write_is_sent_at_once_and_credit_comes_back_in_batches() {
    let (agent, _incoming, mut rx) = agent_with_fake_laptop();
    let mut stream = agent.open(8080).await.unwrap();
    assert_eq!(
        next_frame(&mut rx).await,
        TunnelFrame::Open {
            stream: 1,
            port: 8080
        }
    );
    stream.write_all(b"hi").await.unwrap();
    assert_eq!(
        next_frame(&mut rx).await,
        TunnelFrame::Data {
            stream: 1,
            data: b"hi".to_vec()
        }
    );
    // A big write is cut into frames of at most MAX_DATA_FRAME.
    let big = vec![9u8; MAX_DATA_FRAME * 2 + 10];
    let writer = {
        let big = big.clone();
        tokio::spawn(async move {
            stream.write_all(&big).await.unwrap();
            stream
        })
    };
    let mut sizes = Vec::new();
    while sizes.iter().sum::<usize>() < big.len() {
        match next_frame(&mut rx).await {
            TunnelFrame::Data { data, .. } => sizes.push(data.len()),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(sizes, [MAX_DATA_FRAME, MAX_DATA_FRAME, 10]);
    let mut stream = writer.await.unwrap();

    // Reading: no window for small reads, one grant once half the window is consumed. The
    // reader is behind (a frame still buffered): the window stays as it is.
    let half = INITIAL_WINDOW as usize / 2;
    for _ in 0..half / MAX_DATA_FRAME + 1 {
        agent.handle(TunnelFrame::Data {
            stream: 1,
            data: vec![5; MAX_DATA_FRAME],
        });
    }
    let mut buf = vec![0u8; half - 1];
    stream.read_exact(&mut buf).await.unwrap();
    assert!(
        timeout(Duration::from_millis(100), rx.recv())
            .await
            .is_err(),
        "window sent too early"
    );
    stream.read_exact(&mut [0u8; 1]).await.unwrap();
    assert_eq!(
        next_frame(&mut rx).await,
        TunnelFrame::Window {
            stream: 1,
            credit: half as u32
        }
    );
    // A reader that drains everything: the window, not the reader, limits the stream, so the
    // grant doubles it.
    for _ in 0..half / MAX_DATA_FRAME - 1 {
        agent.handle(TunnelFrame::Data {
            stream: 1,
            data: vec![5; MAX_DATA_FRAME],
        });
    }
    let mut buf = vec![0u8; half];
    stream.read_exact(&mut buf).await.unwrap();
    assert_eq!(stream.buffered(), 0);
    assert_eq!(
        next_frame(&mut rx).await,
        TunnelFrame::Window {
            stream: 1,
            credit: (half + INITIAL_WINDOW as usize) as u32
        }
    );
    // The peer's End then reads as end-of-file.
    agent.handle(TunnelFrame::End { stream: 1 });
    assert_eq!(stream.read(&mut [0u8; 1]).await.unwrap(), 0);
}
