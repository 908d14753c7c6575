//! The agent in a real dev container refuses wrong tokens and every path escape, and
//! applies nothing it refused.

use devloop::agent_link::{AgentLink, LinkError};
use devloop_proxy::codec::encode;
use devloop_proxy::msg::{FileOp, Hello, LaptopMsg};
use devloop_proxy::RelPath;
use devloop_tests::*;
use futures_util::{SinkExt, StreamExt};
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

fn hello(token: &str) -> LaptopMsg {
    LaptopMsg::Hello(Hello {
        magic: devloop_proxy::MAGIC,
        protocol_version: devloop_proxy::PROTOCOL_VERSION,
        cli_version: "test".into(),
        capabilities: vec![],
        token: token.into(),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_token_and_path_escapes_are_refused() {
    let mut shop = Shop::new("security", false);
    let log = shop.spawn(&["up", "api", "--no-logs"]);
    tokio::task::block_in_place(|| wait_for_log(&log, "in sync", Duration::from_secs(240)));
    let addr = agent_addr(&shop, "api");

    // A wrong token: refused, with the reason.
    let s = tokio::net::TcpStream::connect(addr).await.unwrap();
    match AgentLink::connect(s, "not-the-token").await {
        Err(LinkError::Refused(reason)) => assert!(reason.contains("token"), "{reason}"),
        Err(e) => panic!("expected a refusal, got {e}"),
        Ok(_) => panic!("a wrong token was accepted"),
    }
    // A wrong token followed at once by a batch: nothing of it is applied.
    let s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async("ws://agent/devloop", s)
        .await
        .unwrap();
    ws.send(Message::Binary(encode(&hello("wrong")).into()))
        .await
        .unwrap();
    let put = LaptopMsg::Batch {
        req: 1,
        ops: vec![FileOp::Put {
            path: RelPath::new("pwned.txt").unwrap(),
            mode: 0o644,
            data: b"x".to_vec(),
        }],
    };
    let _ = ws.send(Message::Binary(encode(&put).into())).await;
    while let Some(Ok(_)) = ws.next().await {}
    // No hello at all, just a batch.
    let s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async("ws://agent/devloop", s)
        .await
        .unwrap();
    let _ = ws.send(Message::Binary(encode(&put).into())).await;
    while let Some(Ok(_)) = ws.next().await {}
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !shop
            .exec("api", &["test", "-e", "/app/pwned.txt"])
            .status
            .success(),
        "a refused connection applied a file"
    );
    let agent_log = docker_ok(&["logs", &shop.container("api")]);
    let agent_log =
        agent_log + &String::from_utf8_lossy(&docker(&["logs", &shop.container("api")]).stderr);
    assert!(
        agent_log.contains("token"),
        "the refusal is not logged:\n{agent_log}"
    );

    // The right token, and a symlink that leaves the root: writes through it are refused.
    let token = token_of(&shop, "api");
    let s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let c = AgentLink::connect(s, &token).await.expect("right token");
    let p = |s: &str| RelPath::new(s).unwrap();
    c.link
        .batch(vec![FileOp::Symlink {
            path: p("out"),
            target: "/etc".into(),
        }])
        .await
        .expect("a symlink itself is fine");
    for op in [
        FileOp::Put {
            path: p("out/evil"),
            mode: 0o644,
            data: b"x".to_vec(),
        },
        FileOp::Mkdir {
            path: p("out/evil"),
            mode: 0o755,
        },
        FileOp::Symlink {
            path: p("out/evil"),
            target: "x".into(),
        },
        FileOp::Delete {
            path: p("out/hostname"),
        },
        FileOp::Chmod {
            path: p("out/hostname"),
            mode: 0o777,
        },
    ] {
        let what = format!("{op:?}");
        assert!(
            c.link.batch(vec![op]).await.is_err(),
            "{what} went through a symlink out of the root"
        );
    }
    assert!(!shop
        .exec("api", &["test", "-e", "/etc/evil"])
        .status
        .success());
    assert!(shop
        .exec("api", &["test", "-f", "/etc/hostname"])
        .status
        .success());
    // Even a symlink to a folder inside the root is not written through.
    c.link
        .batch(vec![FileOp::Symlink {
            path: p("inside"),
            target: "/app".into(),
        }])
        .await
        .unwrap();
    assert!(c
        .link
        .batch(vec![FileOp::Put {
            path: p("inside/x"),
            mode: 0o644,
            data: vec![]
        }])
        .await
        .is_err());
    // Replacing the symlink itself is allowed and leaves its target alone.
    c.link
        .batch(vec![FileOp::Put {
            path: p("out"),
            mode: 0o644,
            data: b"now a file".to_vec(),
        }])
        .await
        .unwrap();
    assert!(shop.exec("api", &["test", "-d", "/etc"]).status.success());
    c.link.close();

    // `..` cannot be spelled by RelPath; a peer that encodes it anyway is cut off and nothing
    // is applied.
    #[derive(serde::Serialize)]
    enum Raw {
        _Hello(()),
        _Index(()),
        Batch { req: u64, ops: Vec<RawOp> },
    }
    #[derive(serde::Serialize)]
    enum RawOp {
        Put {
            path: String,
            mode: u32,
            data: Vec<u8>,
        },
    }
    for evil in ["../escape.txt", "/escape.txt", "a/../../escape.txt"] {
        let s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut ws, _) = tokio_tungstenite::client_async("ws://agent/devloop", s)
            .await
            .unwrap();
        ws.send(Message::Binary(encode(&hello(&token)).into()))
            .await
            .unwrap();
        let _welcome = ws.next().await;
        let raw = Raw::Batch {
            req: 9,
            ops: vec![RawOp::Put {
                path: evil.into(),
                mode: 0o644,
                data: b"x".to_vec(),
            }],
        };
        let _ = ws.send(Message::Binary(postcard_encode(&raw).into())).await;
        while let Some(Ok(_)) = ws.next().await {}
    }
    assert!(!shop
        .exec("api", &["sh", "-c", "ls /escape.txt /app/../escape.txt"])
        .status
        .success());
    shop.interrupt_all();
}

fn postcard_encode<T: serde::Serialize>(v: &T) -> Vec<u8> {
    devloop_proxy::codec::encode(v)
}

/// A burst of edits, the agent killed in the middle of it (container restart), and after
/// the reconnect the container's tree equals the laptop's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_cut_mid_burst_converges() {
    let mut shop = Shop::new("cut", false);
    let log = shop.spawn(&["up", "api", "--no-logs"]);
    tokio::task::block_in_place(|| wait_for_log(&log, "in sync", Duration::from_secs(240)));
    let root = shop.path().join("api/burst");
    std::fs::create_dir_all(&root).unwrap();
    let container = shop.container("api");
    let writer = std::thread::spawn(move || {
        for i in 0..1000 {
            std::fs::write(root.join(format!("f{}.txt", i % 100)), format!("edit {i}")).unwrap();
            if i % 10 == 0 {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    docker_ok(&["restart", "-t", "0", &container]);
    writer.join().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (laptop, agent) = tree_hashes(&shop, "api").await;
        if laptop == agent {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "trees never converged; log:\n{}",
            std::fs::read_to_string(&log).unwrap()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("reconnect"),
        "the cut was not noticed:\n{text}"
    );
    shop.interrupt_all();
}

/// A checkout-sized burst (20,000 new files in 200 folders, written as fast as the disk
/// takes them, which can overflow inotify's queue): the container ends up equal to the
/// laptop either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkout_sized_burst_converges() {
    let mut shop = Shop::new("checkout", false);
    let log = shop.spawn(&["up", "api", "--no-logs"]);
    tokio::task::block_in_place(|| wait_for_log(&log, "in sync", Duration::from_secs(240)));
    let root = shop.path().join("api/vendor");
    for d in 0..200 {
        let dir = root.join(format!("pkg{d}"));
        std::fs::create_dir_all(&dir).unwrap();
        for f in 0..100 {
            std::fs::write(dir.join(format!("m{f}.py")), format!("# {d}/{f}\n")).unwrap();
        }
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (laptop, agent) = tree_hashes(&shop, "api").await;
        if laptop == agent {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "trees never converged; log:\n{}",
            std::fs::read_to_string(&log).unwrap()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    shop.interrupt_all();
}
