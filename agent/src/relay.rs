//! `relay` mode: holds published host ports for a service whose containers come and go
//! (deploys roll out behind it), forwarding each connection to the service's name on the
//! project network, resolved anew per connection so it follows the rollout.

use anyhow::Context;
use std::net::SocketAddr;
use tokio::net::{TcpListener, TcpStream};

/// `LISTEN=HOST:PORT`, e.g. `0.0.0.0:8080=web:8080`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    pub listen: SocketAddr,
    pub target: String,
}

impl std::str::FromStr for Mapping {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (listen, target) = s
            .split_once('=')
            .ok_or_else(|| format!("{s:?}: expected LISTEN_ADDR=HOST:PORT"))?;
        let listen = listen.parse().map_err(|e| format!("{listen:?}: {e}"))?;
        if !target.contains(':') {
            return Err(format!("{target:?}: expected HOST:PORT"));
        }
        Ok(Mapping {
            listen,
            target: target.to_string(),
        })
    }
}

pub async fn run(
    mappings: Vec<Mapping>,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let mut tasks = tokio::task::JoinSet::new();
    for m in mappings {
        let listener = TcpListener::bind(m.listen)
            .await
            .with_context(|| format!("cannot listen on {}", m.listen))?;
        tracing::info!(listen = %m.listen, target = %m.target, "relaying");
        tasks.spawn(accept_loop(listener, m.target));
    }
    tokio::select! {
        _ = shutdown => Ok(()),
        Some(r) = tasks.join_next() => r.context("relay task")?,
    }
}

async fn accept_loop(listener: TcpListener, target: String) -> anyhow::Result<()> {
    let listener = &listener;
    let ended = crate::guard::accept_loop("relay", move || listener.accept(), |mut inbound, peer| {
        let target = target.clone();
        tokio::spawn(async move {
            let _ = inbound.set_nodelay(true);
            match connect_any(&target).await {
                Ok(mut outbound) => {
                    let _ = outbound.set_nodelay(true);
                    match tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await {
                        Ok((up, down)) => tracing::debug!(%peer, %target, up, down, "relay closed"),
                        Err(e) => {
                            tracing::debug!(%peer, %target, error = %e, "relay ended with an error")
                        }
                    }
                }
                // Nothing serves the name right now (between versions, or crashed): the
                // caller sees its connection closed, as with a stopped server.
                Err(e) => tracing::warn!(%peer, %target, error = %e, "cannot reach the service"),
            }
        });
    })
    .await;
    match ended {}
}

/// Connects to the first address of `target` that answers. During a rollout the name
/// resolves to the old and the new version, and a removed container's address swallows
/// SYNs until the kernel gives up (seconds): each address gets a short time, then the next.
async fn connect_any(target: &str) -> std::io::Result<TcpStream> {
    let mut last = std::io::Error::new(
        std::io::ErrorKind::NotFound,
        format!("{target} resolves to nothing"),
    );
    for addr in tokio::net::lookup_host(target).await? {
        match tokio::time::timeout(
            std::time::Duration::from_millis(250),
            TcpStream::connect(addr),
        )
        .await
        {
            Ok(Ok(s)) => return Ok(s),
            Ok(Err(e)) => last = e,
            Err(_) => {
                last = std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("{addr} did not answer"),
                )
            }
        }
    }
    Err(last)
}

/// `probe` mode: exit 0 once `addr` accepts a TCP connection, 1 after `timeout`.
pub async fn probe(addr: &str, timeout: std::time::Duration) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!("{addr} did not accept a connection within {timeout:?}");
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn parses_mappings() {
        let m: Mapping = "0.0.0.0:8080=web:8080".parse().unwrap();
        assert_eq!(m.target, "web:8080");
        assert!("8080=web:8080".parse::<Mapping>().is_err());
        assert!("0.0.0.0:1=web".parse::<Mapping>().is_err());
    }

    #[tokio::test]
    async fn relays_both_ways_with_half_close() {
        let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = server.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            // The probe below connects once too: serve every connection.
            loop {
                let (mut s, _) = server.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let _ = s.read_to_end(&mut buf).await;
                    let _ = s.write_all(&buf).await;
                });
            }
        });
        let probe_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let listen = probe_listener.local_addr().unwrap();
        drop(probe_listener);
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let relay = tokio::spawn(run(vec![Mapping { listen, target }], async move {
            let _ = stop_rx.await;
        }));
        probe(&listen.to_string(), std::time::Duration::from_secs(5))
            .await
            .unwrap();
        let mut c = TcpStream::connect(listen).await.unwrap();
        c.write_all(b"hello").await.unwrap();
        c.shutdown().await.unwrap();
        let mut back = Vec::new();
        c.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"hello");
        let _ = stop_tx.send(());
        relay.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn probe_times_out_on_a_closed_port() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        drop(l);
        assert!(probe(&addr, std::time::Duration::from_millis(100))
            .await
            .is_err());
    }
}
