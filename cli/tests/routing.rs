//! The in-process tier of filtered intercepts: the real routing agent (`route` mode, in this
//! process on loopback, without the redirect: callers connect to its port directly) and the
//! cli's own `AgentLink`, with a plain HTTP original and laptop servers. What is checked here
//! is the protocol between them: holders registered and listed with their counts, overlaps
//! reported, a filter that cannot work refused with nothing added, `Release` from another
//! connection, a holder that ends with its connection, and the agent leaving once no holder
//! and no cli are left.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use devloop::agent_link::{AgentEvent, AgentLink, Connected};
use devloop_proxy::msg::HoldSpec;
use devloop_proxy::route::{Filter, HeaderMatch, PathMatch};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const TOKEN: &str = "route-test-token";

/// An HTTP/1.1 server on loopback that answers every request with `name` (keep-alive).
async fn http_server(name: &'static str) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                    buf.drain(..end);
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{name}",
                        name.len()
                    );
                    if s.write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    port
}

/// One GET on a fresh connection; the body.
async fn get(port: u16, path: &str, header: Option<&str>) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let extra = header.map(|h| format!("{h}\r\n")).unwrap_or_default();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: t\r\n{extra}Connection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out))
        .await
        .unwrap()
        .unwrap();
    out.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or(out)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn header(arg: &str) -> Filter {
    Filter {
        headers: vec![HeaderMatch::parse(arg).unwrap()],
        ..Filter::default()
    }
}

/// A cli's connection holding `filter`, its tunnel streams answered by a laptop server.
async fn holder(
    control: SocketAddr,
    service_port: u16,
    laptop: u16,
    who: &str,
    filter: Filter,
) -> (Connected, u64, Vec<u64>) {
    let c = AgentLink::connect(TcpStream::connect(control).await.unwrap(), TOKEN)
        .await
        .unwrap();
    let slot = Arc::new(Mutex::new(None));
    let locals: HashMap<u16, u16> = [(service_port, laptop)].into();
    devloop::intercept::start_tunnel(&c, &locals, &slot, "api");
    let (id, overlaps) = c
        .link
        .hold(HoldSpec {
            ports: vec![service_port],
            filter,
            mirror: false,
            who: who.into(),
            handoff: None,
            lines: true,
            session: None,
        })
        .await
        .unwrap();
    (c, id, overlaps.iter().map(|o| o.id).collect())
}

#[tokio::test]
async fn holders_share_a_service_and_end_with_their_connection() {
    let original = http_server("original").await;
    let alice = http_server("alice").await;
    let bob = http_server("bob").await;
    let dir = tempfile::tempdir().unwrap();
    let ports_file = dir.path().join("ports");
    let control: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    // The agent's view of the service port is `original`: with no redirect, the engine's
    // original is 127.0.0.1:<service port>, which is where the original listens.
    let agent = tokio::spawn(devloop_agent::routing::run(
        devloop_agent::routing::RouteConfig {
            token: TOKEN.into(),
            control,
            ports: vec![original],
            original_hosts: Vec::new(),
            handoff_dir: None,
            linger: Duration::from_millis(300),
            first_wait: Duration::from_secs(30),
            redirect: false,
            ports_file: Some(ports_file.clone()),
        },
        std::future::pending(),
    ));
    let mut agent_port = None;
    for _ in 0..100 {
        if let Ok(p) = devloop_agent::routing::read_ports_file(&ports_file) {
            if let Some((_, a)) = p.first() {
                agent_port = Some(*a);
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let at = agent_port.expect("the agent wrote its port");
    tokio::time::sleep(Duration::from_millis(100)).await;

    let (a, a_id, a_over) =
        holder(control, original, alice, "alice@one", header("x-dev=alice")).await;
    assert!(a_over.is_empty());
    let (mut b, b_id, b_over) =
        holder(control, original, bob, "bob@two", header("x-dev=bob")).await;
    assert!(
        b_over.is_empty(),
        "x-dev=alice and x-dev=bob cannot both match: {b_over:?}"
    );
    // A path-only filter may take alice's requests too: reported, and alice's header wins.
    let (c, _c_id, c_over) = holder(
        control,
        original,
        bob,
        "carol@three",
        Filter {
            path: Some(PathMatch::Prefix("/v2/".into())),
            ..Filter::default()
        },
    )
    .await;
    assert!(
        c_over.contains(&a_id) && c_over.contains(&b_id),
        "{c_over:?}"
    );

    assert_eq!(get(at, "/x", Some("x-dev: alice")).await, "alice");
    assert_eq!(get(at, "/x", Some("x-dev: bob")).await, "bob");
    assert_eq!(get(at, "/x", Some("x-dev: carol")).await, "original");
    assert_eq!(get(at, "/x", None).await, "original");
    assert_eq!(get(at, "/v2/y", Some("x-dev: alice")).await, "alice");
    assert_eq!(
        get(at, "/v2/y", None).await,
        "bob",
        "carol's path filter (served by bob's server)"
    );

    // A filter that cannot work is refused, and nothing is added.
    let bad = AgentLink::connect(TcpStream::connect(control).await.unwrap(), TOKEN)
        .await
        .unwrap();
    let refused = bad
        .link
        .hold(HoldSpec {
            ports: vec![original],
            filter: Filter {
                path: Some(PathMatch::Regex("/v[".into())),
                ..Filter::default()
            },
            mirror: false,
            who: "x@y".into(),
            handoff: None,
            lines: true,
            session: None,
        })
        .await;
    assert!(refused.unwrap_err().to_string().contains("regex"));
    let refused = bad
        .link
        .hold(HoldSpec {
            ports: vec![1],
            filter: header("x-dev=zed"),
            mirror: false,
            who: "x@y".into(),
            handoff: None,
            lines: true,
            session: None,
        })
        .await;
    assert!(refused.unwrap_err().to_string().contains("not routed"));
    let listed = bad.link.holders().await.unwrap();
    assert_eq!(listed.len(), 3);
    let alice_info = listed.iter().find(|h| h.id == a_id).unwrap();
    assert_eq!(alice_info.who, "alice@one");
    assert_eq!(alice_info.requests, 2);

    // Alice's request lines reach alice's connection only.
    let mut a = a;
    let line = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            if let Some(AgentEvent::Request(l)) = a.events.recv().await {
                return l;
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(
        (line.holder, line.status, line.method.as_str()),
        (a_id, 200, "GET")
    );

    // Bob's holder, released from another connection: bob's connection is told who, and
    // closed; bob's requests reach the original from the next one.
    bad.link.release(b_id, "ops@desk").await.unwrap();
    let by = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            match b.events.recv().await {
                Some(AgentEvent::Released { by }) => return Some(by),
                Some(_) => continue,
                None => return None,
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(by.as_deref(), Some("ops@desk"));
    tokio::time::timeout(Duration::from_secs(2), b.link.closed())
        .await
        .expect("the released holder's connection closes");
    assert_eq!(get(at, "/x", Some("x-dev: bob")).await, "original");
    assert!(
        bad.link.release(b_id, "ops@desk").await.is_err(),
        "released twice"
    );

    // Alice's connection ends: her holder with it.
    a.link.close();
    let gone = async {
        loop {
            if get(at, "/x", Some("x-dev: alice")).await == "original" {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(2), gone)
        .await
        .unwrap();

    // No holder and no cli for the linger: the agent drains and returns.
    c.link.close();
    bad.link.close();
    let ended = tokio::time::timeout(Duration::from_secs(10), agent)
        .await
        .expect("the agent leaves once nobody holds")
        .unwrap();
    assert!(ended.is_ok(), "{ended:?}");
}
