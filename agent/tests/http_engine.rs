//! The HTTP engine on real sockets with a real client (curl): requests of one connection
//! routed one by one, HTTP/1.1 and h2c, upgrades, a connection that is not HTTP, and a holder
//! whose laptop is gone.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use devloop_agent::http::detect::{detect, Protocol};
use devloop_agent::http::dial::{TcpDialer, TunnelDialer};
use devloop_agent::http::engine::{Engine, Event, Limits, Replay};
use devloop_agent::http::table::{Mode, Table};
use devloop_proxy::route::{Filter, HeaderMatch, PathMatch};
use futures_util::{SinkExt, StreamExt};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;

/// A destination: answers every request with `NAME METHOD PATH`, echoes a WebSocket's
/// messages with `NAME: ` in front, and echoes the bytes of a connection that is not HTTP.
async fn backend(name: &'static str) -> SocketAddr {
    backend_counted(name).await.0
}

/// [`backend`], also counting the connections it accepted.
async fn backend_counted(name: &'static str) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let conns = Arc::new(AtomicUsize::new(0));
    let counted = conns.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            counted.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let Ok((p, first)) = detect(&mut s, Duration::from_secs(10)).await else {
                    return;
                };
                let io = Replay::new(first, s);
                let svc = service_fn(move |req| answer(name, req));
                match p {
                    Protocol::Http1 => {
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(io), svc)
                            .with_upgrades()
                            .await;
                    }
                    Protocol::Http2 => {
                        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                            .serve_connection(TokioIo::new(io), svc)
                            .await;
                    }
                    Protocol::Other => {
                        let (mut r, mut w) = tokio::io::split(io);
                        let _ = w.write_all(format!("{name} echoes: ").as_bytes()).await;
                        let _ = tokio::io::copy(&mut r, &mut w).await;
                    }
                }
            });
        }
    });
    (addr, conns)
}

type AnswerBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

fn full(b: impl Into<Bytes>) -> AnswerBody {
    use http_body_util::BodyExt;
    Full::new(b.into()).boxed()
}

async fn answer(
    name: &'static str,
    mut req: Request<Incoming>,
) -> Result<Response<AnswerBody>, Infallible> {
    use http_body_util::BodyExt;
    if let Some(key) = req.headers().get("sec-websocket-key") {
        let accept = derive_accept_key(key.as_bytes());
        let upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            let Ok(up) = upgrade.await else { return };
            let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
                TokioIo::new(up),
                Role::Server,
                None,
            )
            .await;
            while let Some(Ok(Message::Text(t))) = ws.next().await {
                let _ = ws.send(Message::text(format!("{name}: {t}"))).await;
            }
        });
        return Ok(Response::builder()
            .status(101)
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-accept", accept)
            .body(full(Bytes::new()))
            .unwrap());
    }
    let trailers = req.headers().contains_key("x-want-trailers");
    let (head, body) = req.into_parts();
    let read = body
        .collect()
        .await
        .map(|b| b.to_bytes().len())
        .unwrap_or(0);
    let size = if read > 0 {
        format!(" {read}")
    } else {
        String::new()
    };
    let text = format!("{name} {} {}{size}\n", head.method, head.uri.path());
    if trailers {
        // As a gRPC server ends a call: data, then trailers (and END_STREAM on them).
        let mut t = hyper::HeaderMap::new();
        t.insert("grpc-status", "0".parse().unwrap());
        t.insert("x-served-by", name.parse().unwrap());
        let frames = futures_util::stream::iter(vec![
            Ok::<_, Infallible>(hyper::body::Frame::data(Bytes::from(text))),
            Ok(hyper::body::Frame::trailers(t)),
        ]);
        return Ok(Response::new(BodyExt::boxed(
            http_body_util::StreamBody::new(frames),
        )));
    }
    Ok(Response::new(full(text)))
}

struct Setup {
    engine: Arc<Engine>,
    addr: SocketAddr,
    /// Connections the original accepted.
    original_conns: Arc<AtomicUsize>,
}

/// The engine on a listener, the original behind it, and no holder yet.
async fn engine() -> Setup {
    engine_with(Limits::default()).await
}

async fn engine_with(limits: Limits) -> Setup {
    let (original, original_conns) = backend_counted("original").await;
    let table = Arc::new(Table::new(Arc::new(TcpDialer {
        addr: original,
        label: "the original".into(),
    })));
    let engine = Engine::with_limits(table, limits);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let e = engine.clone();
    tokio::spawn(async move {
        loop {
            let Ok((s, peer)) = listener.accept().await else {
                return;
            };
            tokio::spawn(e.clone().serve(s, peer.to_string()));
        }
    });
    Setup {
        engine,
        addr,
        original_conns,
    }
}

async fn hold(setup: &Setup, id: u64, name: &'static str, filter: Filter) {
    let laptop = backend(name).await;
    setup
        .engine
        .table()
        .add(
            id,
            Mode::Take,
            &filter,
            Arc::new(TcpDialer {
                addr: laptop,
                label: name.into(),
            }),
        )
        .unwrap();
}

fn header(arg: &str) -> Filter {
    Filter {
        headers: vec![HeaderMatch::parse(arg).unwrap()],
        ..Filter::default()
    }
}

/// Runs curl (blocking, off the runtime) and returns its standard output.
async fn curl(args: Vec<String>) -> String {
    tokio::task::spawn_blocking(move || {
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "10"])
            .args(&args)
            .output()
            .expect("curl runs");
        assert!(
            out.status.success(),
            "curl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    })
    .await
    .unwrap()
}

fn url(setup: &Setup, path: &str) -> String {
    format!("http://{}{path}", setup.addr)
}

#[tokio::test]
async fn each_request_of_one_keep_alive_connection_is_routed_on_its_own() {
    let s = engine().await;
    hold(&s, 1, "alice", header("x-dev=alice")).await;
    hold(&s, 2, "bob", header("x-dev=bob")).await;
    let mut events = s.engine.subscribe();
    // Four requests on one connection (curl reuses it across --next; -w counts connects).
    let out = curl(vec![
        url(&s, "/one"),
        "-H".into(),
        "x-dev: alice".into(),
        "--next".into(),
        url(&s, "/two"),
        "--next".into(),
        url(&s, "/three"),
        "-H".into(),
        "x-dev: bob".into(),
        "--next".into(),
        url(&s, "/four"),
        "-H".into(),
        "x-dev: alice".into(),
        "-w".into(),
        "connects=%{num_connects}\n".into(),
    ])
    .await;
    assert_eq!(
        out,
        "alice GET /one\noriginal GET /two\nbob GET /three\nalice GET /four\nconnects=0\n"
    );
    let mut holders = Vec::new();
    for _ in 0..4 {
        match events.recv().await.unwrap() {
            Event::Request(r) => holders.push((r.holder, r.path, r.status)),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(
        holders,
        vec![
            (Some(1), "/one".to_string(), 200),
            (None, "/two".to_string(), 200),
            (Some(2), "/three".to_string(), 200),
            (Some(1), "/four".to_string(), 200),
        ]
    );
}

/// Runs nghttp (nghttp2's client; every URI of one run goes as a stream of one connection)
/// and returns the bodies it printed, sorted (streams finish in any order).
async fn nghttp(args: Vec<String>) -> Vec<String> {
    tokio::task::spawn_blocking(move || {
        let out = Command::new("nghttp")
            .args(["-t", "10"])
            .args(&args)
            .output()
            .expect("nghttp runs (Debian's nghttp2-client)");
        assert!(
            out.status.success(),
            "nghttp {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut lines: Vec<String> = String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect();
        lines.sort();
        lines
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn h2c_streams_of_one_connection_are_routed_on_their_own() {
    let s = engine().await;
    hold(&s, 1, "alice", header("x-dev=alice")).await;
    hold(
        &s,
        2,
        "v2",
        Filter {
            path: Some(PathMatch::Prefix("/v2/".into())),
            ..Filter::default()
        },
    )
    .await;
    let mut events = s.engine.subscribe();
    // Three streams on one connection, no header: by path.
    let out = nghttp(vec![url(&s, "/v2/x"), url(&s, "/v1/y"), url(&s, "/v2/z")]).await;
    assert_eq!(out, ["original GET /v1/y", "v2 GET /v2/x", "v2 GET /v2/z"]);
    // With alice's header: a header filter beats a path filter.
    let out = nghttp(vec![
        "-H".into(),
        "x-dev: alice".into(),
        url(&s, "/v2/x"),
        url(&s, "/v1/y"),
    ])
    .await;
    assert_eq!(out, ["alice GET /v1/y", "alice GET /v2/x"]);
    let mut routed = Vec::new();
    for _ in 0..5 {
        if let Event::Request(r) = events.recv().await.unwrap() {
            routed.push((r.path, r.holder));
        }
    }
    routed.sort();
    assert_eq!(
        routed,
        [
            ("/v1/y".to_string(), None),
            ("/v1/y".to_string(), Some(1)),
            ("/v2/x".to_string(), Some(1)),
            ("/v2/x".to_string(), Some(2)),
            ("/v2/z".to_string(), Some(2)),
        ]
    );
}

#[tokio::test]
async fn a_websocket_upgrade_goes_where_its_request_goes() {
    let s = engine().await;
    hold(&s, 1, "alice", header("x-dev=alice")).await;
    for (dev, who) in [("alice", "alice"), ("carol", "original")] {
        let mut req =
            tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
                format!("ws://{}/ws", s.addr),
            )
            .unwrap();
        req.headers_mut().insert("x-dev", dev.parse().unwrap());
        let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
        for n in 0..3 {
            ws.send(Message::text(format!("m{n}"))).await.unwrap();
            let got = ws.next().await.unwrap().unwrap();
            assert_eq!(got.into_text().unwrap().as_str(), format!("{who}: m{n}"));
        }
    }
}

#[tokio::test]
async fn a_connection_that_is_not_http_goes_to_the_original_as_bytes() {
    let s = engine().await;
    hold(&s, 1, "alice", Filter::default()).await;
    let mut events = s.engine.subscribe();
    let mut c = TcpStream::connect(s.addr).await.unwrap();
    c.write_all(b"\x16\x03\x01 hello").await.unwrap();
    c.shutdown().await.unwrap();
    let mut got = Vec::new();
    c.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"original echoes: \x16\x03\x01 hello");
    assert!(matches!(
        events.recv().await.unwrap(),
        Event::NotHttp { .. }
    ));
}

#[tokio::test]
async fn a_holder_whose_laptop_is_gone_gets_a_502_and_the_others_are_unaffected() {
    let s = engine().await;
    let gone = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gone_addr = gone.local_addr().unwrap();
    drop(gone);
    s.engine
        .table()
        .add(
            7,
            Mode::Take,
            &header("x-dev=alice"),
            Arc::new(TcpDialer {
                addr: gone_addr,
                label: "alice@laptop".into(),
            }),
        )
        .unwrap();
    let out = curl(vec![
        url(&s, "/a"),
        "-H".into(),
        "x-dev: alice".into(),
        "-w".into(),
        "status=%{http_code}\n".into(),
        "--next".into(),
        url(&s, "/b"),
    ])
    .await;
    assert!(
        out.contains("devloop: alice@laptop did not answer"),
        "{out}"
    );
    assert!(out.contains("status=502"), "{out}");
    assert!(out.ends_with("original GET /b\n"), "{out}");
    // Leaving: the same request reaches the original.
    assert!(s.engine.table().remove(7));
    let out = curl(vec![url(&s, "/a"), "-H".into(), "x-dev: alice".into()]).await;
    assert_eq!(out, "original GET /a\n");
}

/// Sends `bytes` on a fresh connection, then reads until the engine closes it (or 5 s).
async fn raw(s: &Setup, bytes: &[u8]) -> String {
    let mut c = TcpStream::connect(s.addr).await.unwrap();
    c.write_all(bytes).await.unwrap();
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut got)).await;
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test]
async fn bad_input_reaches_no_destination_and_the_engine_goes_on() {
    let s = engine().await;
    let (laptop, laptop_conns) = backend_counted("alice").await;
    s.engine
        .table()
        .add(
            1,
            Mode::Take,
            &Filter::default(),
            Arc::new(TcpDialer {
                addr: laptop,
                label: "alice".into(),
            }),
        )
        .unwrap();
    // A malformed head, a request line without a version, too many fields, a head too large.
    let many: String = (0..150).map(|i| format!("x-{i}: v\r\n")).collect();
    let huge = format!("x-big: {}\r\n", "a".repeat(100 * 1024));
    for (bad, status) in [
        (
            "GET / HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n".to_string(),
            "400",
        ),
        ("GET /\r\n\r\n".to_string(), "400"),
        (format!("GET / HTTP/1.1\r\nHost: x\r\n{many}\r\n"), "431"),
        (format!("GET / HTTP/1.1\r\nHost: x\r\n{huge}\r\n"), "431"),
        (
            "GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello"
                .to_string(),
            "400",
        ),
        (
            "GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n".to_string(),
            "",
        ),
    ] {
        let answer = raw(&s, bad.as_bytes()).await;
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status}")) || status.is_empty(),
            "{:?}: {answer:?}",
            &bad[..bad.len().min(60)]
        );
    }
    // An HTTP/2 connection that breaks the protocol after the preface (a DATA frame on
    // stream 0) is ended with a GOAWAY.
    let mut h2 = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    h2.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]); // empty SETTINGS
    h2.extend_from_slice(&[0, 0, 3, 0, 0, 0, 0, 0, 0, b'b', b'a', b'd']); // DATA on stream 0
    let answer = raw(&s, &h2).await;
    // A GOAWAY frame: length 8, type 7, flags 0, stream 0, then the last stream id and the
    // error code PROTOCOL_ERROR (1).
    let goaway = [0u8, 0, 8, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    assert!(
        answer.as_bytes().windows(goaway.len()).any(|w| w == goaway),
        "no GOAWAY with PROTOCOL_ERROR: {answer:?}"
    );
    // The chunked body was cut, so that one request did go through; nothing else did.
    assert_eq!(s.original_conns.load(Ordering::SeqCst), 0);
    assert!(laptop_conns.load(Ordering::SeqCst) <= 1);
    // The engine goes on serving.
    let out = curl(vec![url(&s, "/after")]).await;
    assert_eq!(out, "alice GET /after\n");
}

#[tokio::test]
async fn a_slow_loris_caller_is_cut_off() {
    let s = engine_with(Limits {
        header_read: Duration::from_millis(300),
        ..Limits::default()
    })
    .await;
    let mut c = TcpStream::connect(s.addr).await.unwrap();
    c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    let started = std::time::Instant::now();
    let trickle = async {
        for _ in 0..50 {
            if c.write_all(b"x-a: b\r\n").await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(4), trickle).await;
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), c.read_to_end(&mut got)).await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "still connected after {:?}",
        started.elapsed()
    );
    assert_eq!(s.original_conns.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn events_count_both_bodies_and_trailers_pass_through() {
    let s = engine().await;
    hold(&s, 1, "alice", header("x-dev=alice")).await;
    let mut events = s.engine.subscribe();
    let body = "x".repeat(100_000);
    let out = curl(vec![
        url(&s, "/upload"),
        "-H".into(),
        "x-dev: alice".into(),
        "--data-binary".into(),
        body,
    ])
    .await;
    assert_eq!(out, "alice POST /upload 100000\n");
    match events.recv().await.unwrap() {
        Event::Request(r) => {
            assert_eq!((r.holder, r.status), (Some(1), 200));
            assert_eq!(r.bytes_in, 100_000);
            assert_eq!(r.bytes_out, out.len() as u64);
            assert!(r.total >= r.elapsed, "{r:?}");
        }
        other => panic!("{other:?}"),
    }
    // h2c answers that end in trailers (as gRPC's do) keep them, on both routes.
    for (dev, who) in [("alice", "alice"), ("carol", "original")] {
        let raw = tokio::task::spawn_blocking({
            let u = url(&s, "/rpc");
            move || {
                Command::new("nghttp")
                    .args([
                        "-v",
                        "-t",
                        "10",
                        "-H",
                        &format!("x-dev: {dev}"),
                        "-H",
                        "x-want-trailers: 1",
                        &u,
                    ])
                    .output()
                    .unwrap()
            }
        })
        .await
        .unwrap();
        let text = String::from_utf8_lossy(&raw.stdout);
        assert!(text.contains("grpc-status: 0"), "{text}");
        assert!(text.contains(&format!("x-served-by: {who}")), "{text}");
        assert!(text.contains(&format!("{who} GET /rpc")), "{text}");
        // The trailers' HEADERS frame carries END_STREAM (flags 0x05: END_STREAM | END_HEADERS).
        assert!(
            text.contains("recv HEADERS frame <length=") && text.contains("flags=0x05"),
            "{text}"
        );
    }
}

/// Waits until `holder` has no copy under way (copies run on their own tasks).
async fn copies_settled(s: &Setup, holder: u64) -> (u64, u64) {
    for _ in 0..500 {
        let holders = s.engine.table().holders();
        let h = holders.iter().find(|h| h.id == holder).unwrap();
        if h.counts.in_flight.load(Ordering::SeqCst) == 0 {
            return (
                h.counts.requests.load(Ordering::SeqCst),
                h.counts.dropped.load(Ordering::SeqCst),
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("copies of holder {holder} still under way after 5 s");
}

async fn mirror(s: &Setup, id: u64, addr: SocketAddr, filter: Filter) {
    s.engine
        .table()
        .add(
            id,
            Mode::Mirror,
            &filter,
            Arc::new(TcpDialer {
                addr,
                label: "mirror".into(),
            }),
        )
        .unwrap();
}

#[tokio::test]
async fn a_mirror_gets_a_copy_whoever_takes_the_request() {
    let s = engine().await;
    hold(&s, 1, "alice", header("x-dev=alice")).await;
    let (copies, copy_conns) = backend_counted("mirror").await;
    mirror(&s, 9, copies, Filter::default()).await;
    let mut events = s.engine.subscribe();
    let body = "y".repeat(100_000);
    let out = curl(vec![
        url(&s, "/m"),
        "--data-binary".into(),
        body.clone(),
        "--next".into(),
        url(&s, "/m"),
        "-H".into(),
        "x-dev: alice".into(),
        "--data-binary".into(),
        body,
        "--next".into(),
        url(&s, "/get"),
    ])
    .await;
    // Callers get the answers of their routes, never the mirror's.
    assert_eq!(
        out,
        "original POST /m 100000\nalice POST /m 100000\noriginal GET /get\n"
    );
    assert_eq!(copies_settled(&s, 9).await, (3, 0));
    let mut copies_seen = Vec::new();
    while copies_seen.len() < 3 {
        if let Event::Request(r) = events.recv().await.unwrap() {
            if r.copy {
                copies_seen.push((r.path, r.status, r.bytes_in, r.bytes_out));
            }
        }
    }
    copies_seen.sort();
    // The mirror read each whole body (its answer says how much, 25 or 17 bytes).
    assert_eq!(
        copies_seen,
        [
            ("/get".to_string(), 200, 0, "mirror GET /get\n".len() as u64),
            (
                "/m".to_string(),
                200,
                100_000,
                "mirror POST /m 100000\n".len() as u64
            ),
            (
                "/m".to_string(),
                200,
                100_000,
                "mirror POST /m 100000\n".len() as u64
            ),
        ]
    );
    assert!(copy_conns.load(Ordering::SeqCst) >= 1);
}

#[tokio::test]
async fn a_mirror_that_is_gone_or_slow_never_fails_or_holds_the_caller() {
    let s = engine().await;
    // Gone: nothing listens.
    let gone = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gone_addr = gone.local_addr().unwrap();
    drop(gone);
    mirror(&s, 8, gone_addr, Filter::default()).await;
    let out = curl(vec![url(&s, "/a"), "--data-binary".into(), "abc".into()]).await;
    assert_eq!(out, "original POST /a 3\n");
    assert_eq!(copies_settled(&s, 8).await, (1, 1));
    assert!(s.engine.table().remove(8));

    // Slow: accepts, then never reads. A 50 MB upload fills the copy's queue and the
    // socket's buffers; the copy is dropped and the caller's request goes through whole.
    let slow = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let slow_addr = slow.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut kept = Vec::new();
        while let Ok((c, _)) = slow.accept().await {
            kept.push(c);
        }
    });
    mirror(&s, 7, slow_addr, Filter::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("big");
    std::fs::write(&file, vec![b'z'; 50_000_000]).unwrap();
    let started = std::time::Instant::now();
    let out = curl(vec![
        url(&s, "/big"),
        "--data-binary".into(),
        format!("@{}", file.display()),
    ])
    .await;
    assert_eq!(out, "original POST /big 50000000\n");
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "the caller took {:?}",
        started.elapsed()
    );
    let holders = s.engine.table().holders();
    let h = holders.iter().find(|h| h.id == 7).unwrap();
    assert_eq!(h.counts.dropped.load(Ordering::SeqCst), 1);
    held.abort();
}

/// A holder's laptop behind a real tunnel: the agent's end dials streams of a `Mux`, the
/// laptop's end (what the cli does) connects each stream it accepts to a local server.
async fn tunnelled_laptop(name: &'static str, port: u16) -> devloop_proxy::tunnel::Mux {
    use devloop_proxy::tunnel::{Mux, Side, CONNECTION_LOST, OUT_QUEUE_FRAMES};
    let laptop_server = backend(name).await;
    let (laptop_tx, mut laptop_rx) = tokio::sync::mpsc::channel(OUT_QUEUE_FRAMES);
    let (agent_tx, mut agent_rx) = tokio::sync::mpsc::channel(OUT_QUEUE_FRAMES);
    let (laptop, mut laptop_in) = Mux::new(Side::Laptop, laptop_tx);
    let (agent, _agent_in) = Mux::new(Side::Agent, agent_tx);
    let to_agent = agent.clone();
    tokio::spawn(async move {
        while let Some(f) = laptop_rx.recv().await {
            to_agent.handle(f);
        }
        to_agent.shutdown(CONNECTION_LOST);
    });
    let to_laptop = laptop.clone();
    tokio::spawn(async move {
        while let Some(f) = agent_rx.recv().await {
            to_laptop.handle(f);
        }
        to_laptop.shutdown(CONNECTION_LOST);
    });
    tokio::spawn(async move {
        let _keep = laptop;
        while let Some((p, stream)) = laptop_in.accept().await {
            assert_eq!(p, port);
            tokio::spawn(async move {
                let mut tcp = TcpStream::connect(laptop_server).await.unwrap();
                let _ = stream.bridge(&mut tcp).await;
            });
        }
    });
    agent
}

#[tokio::test]
async fn a_holder_reached_through_the_tunnel_gets_its_requests_in_both_versions() {
    let s = engine().await;
    let mux = tunnelled_laptop("alice-laptop", 8000).await;
    s.engine
        .table()
        .add(
            1,
            Mode::Take,
            &header("x-dev=alice"),
            Arc::new(TunnelDialer {
                mux,
                port: 8000,
                label: "alice@laptop".into(),
            }),
        )
        .unwrap();
    // A body larger than a stream's first window, so flow control is exercised.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("body");
    std::fs::write(&file, vec![b'x'; 300_000]).unwrap();
    let out = curl(vec![
        url(&s, "/one"),
        "-H".into(),
        "x-dev: alice".into(),
        "--data-binary".into(),
        format!("@{}", file.display()),
        "--next".into(),
        url(&s, "/two"),
    ])
    .await;
    assert_eq!(out, "alice-laptop POST /one 300000\noriginal GET /two\n");
    let out = nghttp(vec![
        "-H".into(),
        "x-dev: alice".into(),
        url(&s, "/h2/a"),
        url(&s, "/h2/b"),
    ])
    .await;
    assert_eq!(out, ["alice-laptop GET /h2/a", "alice-laptop GET /h2/b"]);
}
