//! Protocols other than plain HTTP/1.1 through an intercept, end to end on the real engine:
//! a caller connects to the intercepted service's address, the agent tunnels each connection
//! to the cli, and the cli to a server on the laptop. An h2c connection (HTTP/2 with prior
//! knowledge, as gRPC uses it) carries several concurrent bidirectional streams, and a
//! WebSocket upgrade carries an echo of text and binary messages up to 1 MiB.

use bytes::Bytes;
use devloop_tests::*;
use futures_util::{SinkExt, StreamExt};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;

/// h2c server: every request's body is echoed back as the response body, frame by frame,
/// so a stream is open in both directions at once.
async fn h2_echo_server(listener: TcpListener) {
    loop {
        let Ok((sock, _)) = listener.accept().await else {
            return;
        };
        tokio::spawn(async move {
            let Ok(mut conn) = h2::server::handshake(sock).await else {
                return;
            };
            while let Some(Ok((req, mut respond))) = conn.accept().await {
                tokio::spawn(async move {
                    let mut body = req.into_body();
                    let resp = http::Response::builder()
                        .status(200)
                        .header("x-served-by", "laptop")
                        .body(())
                        .unwrap();
                    let mut send = respond.send_response(resp, false).unwrap();
                    while let Some(Ok(chunk)) = body.data().await {
                        let _ = body.flow_control().release_capacity(chunk.len());
                        send.reserve_capacity(chunk.len());
                        if send.send_data(chunk, false).is_err() {
                            return;
                        }
                    }
                    let _ = send.send_data(Bytes::new(), true);
                });
            }
        });
    }
}

async fn ws_echo_server(listener: TcpListener) {
    loop {
        let Ok((sock, _)) = listener.accept().await else {
            return;
        };
        tokio::spawn(async move {
            let Ok(mut ws) = tokio_tungstenite::accept_async(sock).await else {
                return;
            };
            while let Some(Ok(msg)) = ws.next().await {
                if msg.is_close() {
                    let _ = ws.close(None).await;
                    return;
                }
                if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                    return;
                }
            }
        });
    }
}

/// Ten concurrent h2 streams on one connection, each sending 20 chunks and reading its echo.
async fn h2_client(addr: String) -> Result<usize, String> {
    let sock = TcpStream::connect(&addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let (client, conn) = h2::client::handshake(sock)
        .await
        .map_err(|e| format!("h2 handshake: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut tasks = Vec::new();
    for s in 0..10u8 {
        let mut client = client.clone();
        tasks.push(tokio::spawn(async move {
            client = client.ready().await.map_err(|e| e.to_string())?;
            let req = http::Request::builder()
                .method("POST")
                .uri(format!("http://api/echo/{s}"))
                .body(())
                .unwrap();
            let (resp, mut send) = client.send_request(req, false).map_err(|e| e.to_string())?;
            let sent: Vec<u8> = (0..20u32)
                .flat_map(|i| vec![s.wrapping_mul(31).wrapping_add(i as u8); 4096])
                .collect();
            let chunks: Vec<Bytes> = sent.chunks(4096).map(Bytes::copy_from_slice).collect();
            let writer = tokio::spawn(async move {
                for c in chunks {
                    send.reserve_capacity(c.len());
                    send.send_data(c, false).map_err(|e| e.to_string())?;
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                send.send_data(Bytes::new(), true)
                    .map_err(|e| e.to_string())
            });
            let resp = resp.await.map_err(|e| e.to_string())?;
            if resp.headers().get("x-served-by").map(|v| v.as_bytes()) != Some(b"laptop") {
                return Err(format!(
                    "stream {s}: not served by the laptop: {:?}",
                    resp.headers()
                ));
            }
            let mut body = resp.into_body();
            let mut got = Vec::new();
            while let Some(chunk) = body.data().await {
                let chunk = chunk.map_err(|e| e.to_string())?;
                let _ = body.flow_control().release_capacity(chunk.len());
                got.extend_from_slice(&chunk);
            }
            writer.await.map_err(|e| e.to_string())??;
            if got != sent {
                return Err(format!(
                    "stream {s}: echo differs ({} bytes sent, {} back)",
                    sent.len(),
                    got.len()
                ));
            }
            Ok::<usize, String>(got.len())
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.map_err(|e| e.to_string())??;
    }
    Ok(total)
}

async fn ws_client(addr: String) -> Result<usize, String> {
    let sock = TcpStream::connect(&addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let (mut ws, resp) = tokio_tungstenite::client_async(format!("ws://{addr}/echo"), sock)
        .await
        .map_err(|e| format!("upgrade: {e}"))?;
    if resp.status() != 101 {
        return Err(format!("upgrade answered {}", resp.status()));
    }
    let mut sent = 0;
    for i in 0..50u32 {
        let msg = if i % 2 == 0 {
            Message::text(format!("hello {i}"))
        } else {
            Message::binary(vec![(i % 251) as u8; (i as usize) << 15])
        };
        ws.send(msg.clone()).await.map_err(|e| e.to_string())?;
        let back = ws
            .next()
            .await
            .ok_or("the socket closed early")?
            .map_err(|e| e.to_string())?;
        if back != msg {
            return Err(format!("message {i} came back different"));
        }
        sent += msg.len();
    }
    ws.close(None).await.map_err(|e| e.to_string())?;
    Ok(sent)
}

#[test]
fn h2c_and_websocket_pass_through_an_intercept() {
    let _serial = intercept_lock();
    let mut shop = Shop::new("icptproto", false);
    let up = shop.spawn(&["up", "api", "--no-logs"]);
    wait_for_log(&up, "in sync", Duration::from_secs(240));
    shop.interrupt_all();

    let rt = tokio::runtime::Runtime::new().unwrap();
    let (h2_port, ws_port) = rt.block_on(async {
        let h2 = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ws = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ports = (
            h2.local_addr().unwrap().port(),
            ws.local_addr().unwrap().port(),
        );
        tokio::spawn(h2_echo_server(h2));
        tokio::spawn(ws_echo_server(ws));
        ports
    });
    let (h2_spec, ws_spec) = (format!("8000:{h2_port}"), format!("8001:{ws_port}"));
    // Handed over to the agent (the default with a local engine), then through the tunnel.
    for extra in [None, Some("--tunnel")] {
        let mut args = vec!["intercept", "api", "--port", &h2_spec, "--port", &ws_spec];
        args.extend(extra);
        let log = shop.spawn(&args);
        wait_for_log(&log, "intercepted in", Duration::from_secs(60));

        // The caller is this test process, at the agent's address on the service's network.
        let agent = format!("{}-devloop-intercept", shop.container("api"));
        let ip = container_ip(&agent, &format!("devloop-{}", shop.project));
        let h2 = rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(60), h2_client(format!("{ip}:8000"))).await
        });
        assert_eq!(
            h2,
            Ok(Ok(10 * 20 * 4096)),
            "h2c through the intercept ({extra:?}):\n{}",
            std::fs::read_to_string(&log).unwrap()
        );
        let ws = rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(60), ws_client(format!("{ip}:8001"))).await
        });
        let expected: usize = (0..50u32)
            .map(|i| {
                if i % 2 == 0 {
                    format!("hello {i}").len()
                } else {
                    (i as usize) << 15
                }
            })
            .sum();
        assert_eq!(
            ws,
            Ok(Ok(expected)),
            "WebSocket through the intercept ({extra:?}):\n{}",
            std::fs::read_to_string(&log).unwrap()
        );
        let handed = std::fs::read_to_string(&log)
            .unwrap()
            .contains("reach the laptop directly");
        assert_eq!(
            handed,
            extra.is_none(),
            "{}",
            std::fs::read_to_string(&log).unwrap()
        );

        let left = shop.run_ok(&["leave", "api"]);
        assert!(left.contains("restored"), "{left}");
        wait_for_log(&log, "ended elsewhere", Duration::from_secs(15));
    }
    shop.interrupt_all();
}
