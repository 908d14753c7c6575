//! `intercept` mode: the agent stands in for a service. It accepts the service's
//! connections on the service's ports and tunnels each one, as a stream of the protocol's
//! multiplexer, over the one WebSocket of the cli that holds the intercept; the cli connects
//! it to a process on the laptop. Streams the cli opens (`--expose`) are connected to
//! services of the system, so the laptop process can call them.
//!
//! Where the cli runs on the engine's own machine, it hands the agent each connection to the
//! laptop over a Unix socket instead (`devloop_proxy::handoff`), and the agent copies
//! between the caller and that socket itself; a connection the cli does not hand over is
//! tunnelled.
//!
//! The control listener answers only on the devloop control network (and loopback, for the
//! `docker exec` bridge): callers on the service's own networks reach the service's ports
//! and nothing else.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use devloop_proxy::codec::{decode, encode};
use devloop_proxy::handoff;
use devloop_proxy::msg::{AgentMsg, LaptopMsg, ProcessState, ProcessStatus, Welcome};
use devloop_proxy::tunnel::{Mux, Side, TunnelFrame};
use devloop_proxy::{caps, PROTOCOL_VERSION};
use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

use crate::guard::{accept_loop, Gate};
use crate::server::control_handshake;

/// An IPv4 network, `a.b.c.d/len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subnet {
    base: u32,
    mask: u32,
}

impl std::str::FromStr for Subnet {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (ip, len) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?}: expected A.B.C.D/LEN"))?;
        let ip: std::net::Ipv4Addr = ip.parse().map_err(|e| format!("{s:?}: {e}"))?;
        let len: u32 = len.parse().map_err(|e| format!("{s:?}: {e}"))?;
        if len > 32 {
            return Err(format!("{s:?}: prefix length over 32"));
        }
        let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
        Ok(Subnet {
            base: u32::from(ip) & mask,
            mask,
        })
    }
}

impl Subnet {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(v4) => u32::from(v4) & self.mask == self.base,
            IpAddr::V6(_) => false,
        }
    }
}

pub struct InterceptConfig {
    pub token: String,
    pub control: SocketAddr,
    /// Where control connections may arrive (besides loopback); None: anywhere.
    pub control_subnet: Option<Subnet>,
    /// The service's ports, in the container.
    pub ports: Vec<u16>,
    /// `HOST:PORT` targets of streams the laptop opens, by index (the Open frame's port).
    pub expose: Vec<String>,
    /// Kubernetes: restore the workload when no cli has been connected for this long.
    pub lease: Option<crate::lease::LeaseConfig>,
    /// A local engine: the cli's handoff socket, which hands over connections to the laptop
    /// so that callers' connections skip the tunnel (`devloop_proxy::handoff`).
    pub handoff: Option<std::path::PathBuf>,
}

/// The tunnel of the cli connected now, if any.
type Current = Arc<Mutex<Option<Mux>>>;

fn current(c: &Current) -> Option<Mux> {
    c.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

pub async fn run(
    config: InterceptConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let config = Arc::new(config);
    let tunnel: Current = Arc::default();
    let control = TcpListener::bind(config.control).await?;
    let mut tasks = tokio::task::JoinSet::new();
    for port in &config.ports {
        let listener = TcpListener::bind((std::net::Ipv4Addr::UNSPECIFIED, *port)).await?;
        tracing::info!(port, "accepting the service's connections");
        tasks.spawn(accept_service(
            listener,
            *port,
            tunnel.clone(),
            config.clone(),
        ));
    }
    tasks.spawn(accept_control(control, config.clone(), tunnel.clone()));
    if let Some(lease) = config.lease.clone() {
        let watched = tunnel.clone();
        tasks.spawn(async move {
            crate::lease::keep(lease, move || current(&watched).is_some()).await;
            // Restored: the workload's rollout replaces this pod; serve until then.
            std::future::pending::<()>().await;
            Ok(())
        });
    }
    tokio::select! {
        _ = shutdown => {}
        Some(r) = tasks.join_next() => r??,
    }
    if let Some(mux) = current(&tunnel) {
        mux.shutdown("the agent is stopping");
    }
    Ok(())
}

async fn accept_service(
    listener: TcpListener,
    port: u16,
    tunnel: Current,
    config: Arc<InterceptConfig>,
) -> anyhow::Result<()> {
    let handoff_failed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let listener = &listener;
    let ended = accept_loop("service", move || listener.accept(), |tcp, peer| {
        let _ = tcp.set_nodelay(true);
        let (tunnel, config, handoff_failed) =
            (tunnel.clone(), config.clone(), handoff_failed.clone());
        tokio::spawn(async move {
            if let Some(socket) = &config.handoff {
                match handoff::request(socket, &config.token, port).await {
                    Ok(handoff::Answer::Connected(laptop)) => {
                        if handoff_failed.swap(false, Ordering::Relaxed) {
                            tracing::info!(port, "the cli hands over connections again");
                        }
                        return relay_direct(tcp, laptop, peer, port).await;
                    }
                    // The cli answered: nothing to reach on the laptop. The caller sees a
                    // closed connection, as with a stopped server.
                    Ok(handoff::Answer::Refused(why)) => {
                        tracing::warn!(%peer, port, why, "the laptop refused the connection");
                        return;
                    }
                    Err(e) => {
                        if !handoff_failed.swap(true, Ordering::Relaxed) {
                            tracing::warn!(%peer, port, error = %e, "the cli does not hand over connections; tunnelling them");
                        }
                    }
                }
            }
            tunnel_stream(tcp, peer, port, &tunnel).await
        });
    })
    .await;
    match ended {}
}

/// The largest read of a handed-over connection: reads grow to it only during a bulk
/// transfer (a request/response connection keeps 4 KiB per direction).
const DIRECT_MAX_READ: usize = 256 * 1024;

/// A caller's connection copied to the laptop's, both in this process: one relay.
async fn relay_direct(mut caller: TcpStream, mut laptop: TcpStream, peer: SocketAddr, port: u16) {
    let (mut caller_r, mut caller_w) = caller.split();
    let (mut laptop_r, mut laptop_w) = laptop.split();
    let copied = tokio::try_join!(
        devloop_proxy::tunnel::pump(&mut caller_r, &mut laptop_w, DIRECT_MAX_READ),
        devloop_proxy::tunnel::pump(&mut laptop_r, &mut caller_w, DIRECT_MAX_READ),
    );
    match copied {
        Ok((up, down)) => tracing::debug!(%peer, port, up, down, "direct connection closed"),
        Err(e) => tracing::debug!(%peer, port, error = %e, "direct connection ended"),
    }
}

async fn tunnel_stream(mut tcp: TcpStream, peer: SocketAddr, port: u16, tunnel: &Current) {
    let Some(mux) = current(tunnel) else {
        // No laptop connected: the caller sees a closed connection, as with a stopped
        // server, rather than a hang.
        tracing::warn!(%peer, port, "no laptop connected; closing the connection");
        return;
    };
    match mux.open(port).await {
        Ok(stream) => {
            let id = stream.id();
            match stream.bridge(&mut tcp).await {
                Ok((up, down)) => {
                    tracing::debug!(stream_id = id, %peer, port, up, down, "stream closed")
                }
                Err(e) => {
                    tracing::debug!(stream_id = id, %peer, port, error = %e, "stream ended")
                }
            }
        }
        Err(e) => tracing::warn!(%peer, port, error = %e, "cannot open a tunnel stream"),
    }
}

/// The tunnel connection's read buffer. tungstenite zero-fills the free part of its buffer
/// before every read, and a read of the tunnel returns about one 32 KiB frame: the default
/// 128 KiB buffer spent 8 % of the agent's time on that fill during a 100 MiB transfer.
pub(crate) const TUNNEL_READ_BUFFER: usize = 32 * 1024;

async fn accept_control(
    listener: TcpListener,
    config: Arc<InterceptConfig>,
    tunnel: Current,
) -> anyhow::Result<()> {
    let mut conn_id = 0u64;
    let mut gate = Gate::new("control");
    let listener = &listener;
    let ended = accept_loop("control", move || listener.accept(), |tcp, peer| {
        conn_id += 1;
        let local = tcp
            .local_addr()
            .map(|a| a.ip())
            .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED));
        let allowed =
            local.is_loopback() || config.control_subnet.is_none_or(|s| s.contains(local));
        if !allowed {
            tracing::warn!(conn_id, %peer, %local, "control connection on a service network refused");
            return;
        }
        // Beyond the places for unauthenticated sockets: closed at once (dropped).
        let Some(place) = gate.admit() else {
            return;
        };
        let (config, tunnel) = (config.clone(), tunnel.clone());
        tokio::spawn(async move { serve_control(tcp, peer, conn_id, place, config, tunnel).await });
    })
    .await;
    match ended {}
}

/// One control connection. `place` is its place among those not authenticated yet, given
/// back once the hello is accepted.
async fn serve_control(
    tcp: TcpStream,
    peer: SocketAddr,
    conn_id: u64,
    place: tokio::sync::OwnedSemaphorePermit,
    config: Arc<InterceptConfig>,
    tunnel: Current,
) {
    let Some(mut ws) = control_handshake(
        tcp,
        peer,
        conn_id,
        &config.token,
        TUNNEL_READ_BUFFER,
        caps::TUNNEL,
        "this agent intercepts a service: the cli must support tunnels",
    )
    .await
    else {
        return;
    };
    drop(place);
    let welcome = AgentMsg::Welcome(Welcome {
        protocol_version: PROTOCOL_VERSION,
        agent_version: devloop_proxy::CRATE_VERSION.to_string(),
        capabilities: vec![caps::TUNNEL.to_string()],
        root: String::new(),
        process: ProcessStatus::initial(ProcessState::NoCommand),
        recent_logs: Vec::new(),
    });
    if ws
        .send(Message::Binary(encode(&welcome).into()))
        .await
        .is_err()
    {
        return;
    }
    tracing::info!(conn_id, %peer, "laptop connected; tunnelling");
    let (mut sink, mut stream) = ws.split();
    let (frames_tx, mut frames_rx) =
        mpsc::channel::<TunnelFrame>(devloop_proxy::tunnel::OUT_QUEUE_FRAMES);
    let (pong_tx, mut pong_rx) = mpsc::channel::<u64>(8);
    let (mux, mut incoming) = Mux::new(Side::Agent, frames_tx);
    // The newest cli holds the intercept; an older connection gives way.
    if let Some(old) = tunnel
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .replace(mux.clone())
    {
        old.shutdown("another cli took over the intercept");
    }
    let writer = tokio::spawn(async move {
        loop {
            let mut next = Some(tokio::select! {
                f = frames_rx.recv() => match f { Some(f) => AgentMsg::Tunnel(f), None => break },
                n = pong_rx.recv() => match n { Some(nonce) => AgentMsg::Pong { nonce }, None => break },
            });
            // Frames already queued go out in the same write; the flush comes as soon as the
            // queue is empty, so nothing waits for more.
            while let Some(msg) = next.take() {
                if sink
                    .feed(Message::Binary(encode(&msg).into()))
                    .await
                    .is_err()
                {
                    return;
                }
                next = frames_rx.try_recv().ok().map(AgentMsg::Tunnel);
            }
            if sink.flush().await.is_err() {
                break;
            }
        }
    });
    let expose = config.expose.clone();
    let opener = tokio::spawn(async move {
        while let Some((index, stream)) = incoming.accept().await {
            let Some(target) = expose.get(index as usize).cloned() else {
                stream.reset(&format!("no exposed service number {index}"));
                continue;
            };
            tokio::spawn(async move {
                match tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(&target))
                    .await
                {
                    Ok(Ok(mut tcp)) => {
                        let _ = tcp.set_nodelay(true);
                        let _ = stream.bridge(&mut tcp).await;
                    }
                    Ok(Err(e)) => stream.reset(&format!("cannot connect to {target}: {e}")),
                    Err(_) => stream.reset(&format!("connecting to {target} timed out")),
                }
            });
        }
    });
    while let Some(Ok(message)) = stream.next().await {
        let Message::Binary(bytes) = message else {
            continue;
        };
        match decode::<LaptopMsg>(&bytes) {
            Ok(LaptopMsg::Tunnel(frame)) => mux.handle(frame),
            Ok(LaptopMsg::Ping { nonce }) => {
                let _ = pong_tx.try_send(nonce);
            }
            Ok(other) => {
                tracing::warn!(
                    conn_id,
                    ?other,
                    "request not served in intercept mode; closing"
                );
                break;
            }
            Err(e) => {
                tracing::warn!(conn_id, error = %e, "undecodable message; closing");
                break;
            }
        }
    }
    mux.shutdown(devloop_proxy::tunnel::CONNECTION_LOST);
    {
        let mut cur = tunnel.lock().unwrap_or_else(|e| e.into_inner());
        if cur.as_ref().is_some_and(|m| m.same_as(&mux)) {
            *cur = None;
        }
    }
    writer.abort();
    opener.abort();
    tracing::info!(conn_id, %peer, "laptop disconnected");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnets() {
        let s: Subnet = "172.30.0.0/16".parse().unwrap();
        assert!(s.contains("172.30.4.5".parse().unwrap()));
        assert!(!s.contains("172.31.0.1".parse().unwrap()));
        assert!("172.30.0.0".parse::<Subnet>().is_err());
        assert!("1.2.3.4/33".parse::<Subnet>().is_err());
    }
}
