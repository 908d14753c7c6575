//! A port-forward to one port of a pod, as a byte stream: SPDY first ([`super::spdy`], what
//! kubectl speaks, the faster route), else the API server's WebSocket protocol (`v4.channel.k8s.io`: each binary message starts with a channel byte, 0 for the
//! port's data and 1 for its errors; the first message on each channel carries the port
//! number) over kube's upgraded connection.
//!
//! Not kube's `Portforwarder`: it cuts the laptop -> pod direction into 4 KiB messages
//! through a channel of one, which held a 100 MiB transfer through an intercept to 48 MiB/s
//! here; this sends what one read gives, up to 256 KiB per message.

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio_tungstenite::tungstenite::Message;

use super::Cluster;
use crate::agent_link::Transport;

const CHUNK: usize = 256 * 1024;

/// Opens the port-forward: over SPDY, or over the WebSocket when the server refuses SPDY
/// (or `DEVLOOP_PORTFORWARD=websocket` says so; `spdy` forbids the fallback).
pub async fn open(
    cluster: &Cluster,
    pod: &str,
    port: u16,
) -> Result<Box<dyn Transport>, super::KubeError> {
    let choice = std::env::var("DEVLOOP_PORTFORWARD").unwrap_or_default();
    if choice == "websocket" {
        return Ok(Box::new(open_websocket(cluster, pod, port).await?));
    }
    match super::spdy::open(cluster, pod, port).await {
        Ok(s) => Ok(Box::new(s)),
        Err(super::spdy::SpdyError::Refused(why)) if choice != "spdy" => {
            tracing::info!(
                pod,
                why,
                "SPDY port-forward refused; using the WebSocket one"
            );
            Ok(Box::new(open_websocket(cluster, pod, port).await?))
        }
        Err(super::spdy::SpdyError::Refused(why)) => Err(super::KubeError::Api {
            what: format!("port-forward to pod {pod}"),
            message: why,
        }),
        Err(super::spdy::SpdyError::Failed(e)) => Err(e),
    }
}

/// The port-forward over the API server's WebSocket (`v4.channel.k8s.io`).
pub async fn open_websocket(
    cluster: &Cluster,
    pod: &str,
    port: u16,
) -> Result<DuplexStream, super::KubeError> {
    let req = kube::core::Request::new(format!("/api/v1/namespaces/{}/pods", cluster.namespace))
        .portforward(pod, &[port])
        .map_err(|e| super::KubeError::Api {
            what: format!("port-forward to pod {pod}"),
            message: e.to_string(),
        })?;
    let conn = cluster.client.connect(req).await.map_err(|e| {
        cluster.err(
            e,
            "get",
            "pods/portforward",
            format!("port-forward to pod {pod}"),
        )
    })?;
    let (mut sink, mut stream) = conn.into_stream().split();
    let (mine, theirs) = tokio::io::duplex(4 * CHUNK);
    let (mut from_laptop, mut to_laptop) = tokio::io::split(theirs);
    tokio::spawn(async move {
        let mut buf = vec![0u8; CHUNK + 1];
        loop {
            // buf[0] stays 0: the data channel of the first (only) port.
            let n = match from_laptop.read(&mut buf[1..]).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if sink
                .send(Message::binary(buf[..=n].to_vec()))
                .await
                .is_err()
            {
                break;
            }
        }
        let _ = sink.send(Message::Close(None)).await;
    });
    let pod = pod.to_string();
    tokio::spawn(async move {
        let mut port_frame_seen = [false; 2];
        while let Some(Ok(msg)) = stream.next().await {
            match msg {
                Message::Binary(b) if !b.is_empty() => {
                    let (ch, data) = (b[0] as usize, &b[1..]);
                    if ch > 1 {
                        continue;
                    }
                    if !port_frame_seen[ch] {
                        port_frame_seen[ch] = true;
                        if data.len() == 2 {
                            continue;
                        }
                    }
                    if ch == 0 {
                        if to_laptop.write_all(data).await.is_err() {
                            break;
                        }
                    } else if !data.is_empty() {
                        tracing::warn!(pod, error = %String::from_utf8_lossy(data), "the port-forward reported an error");
                        break;
                    }
                }
                Message::Close(_) => break,
                _ => {}
            }
        }
        let _ = to_laptop.shutdown().await;
    });
    Ok(mine)
}
