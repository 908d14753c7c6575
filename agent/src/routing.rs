//! `route` mode: the agent beside a running original, in its network namespace, taking only
//! the requests that a holder's filter names.
//!
//! ```text
//! caller -> service port --(nftables redirect)--> agent port -> Engine (per port)
//!                                   the original on 127.0.0.1 <-/      \-> a holder's laptop
//! cli (one control WebSocket per holder) <-> Hold / ListHolders / Release, request lines
//! ```
//!
//! On start the agent listens on a free port per service port, installs the redirect
//! ([`crate::redirect`]; its table goes with the agent however the agent ends) and ends the
//! connections that were open before it ([`crate::resets`]), so that their next requests come
//! through it. Each cli that connects registers one holder (its filter, its ports); the
//! holder's requests go to that cli's laptop, over a handoff socket when the cli shares the
//! engine's machine, else over streams of the connection's tunnel. The holder ends with its
//! connection, or with `Release` from any cli (`leave --holder`).
//!
//! With no holder and no cli for `linger`, the agent removes the redirect (new connections
//! reach the original directly), lets the connections it serves finish what is under way,
//! and exits; its container is removed with it.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devloop_proxy::codec::{decode, encode};
use devloop_proxy::handoff;
use devloop_proxy::msg::{
    AgentMsg, HoldSpec, HolderInfo, LaptopMsg, Outcome, ProcessState, ProcessStatus, RequestLine,
    Welcome,
};
use devloop_proxy::tunnel::{Mux, Side, TunnelFrame};
use devloop_proxy::{caps, PROTOCOL_VERSION};
use futures_util::future::BoxFuture;
use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{broadcast, mpsc};
use tokio_tungstenite::tungstenite::Message;

use crate::guard::{accept_loop, Gate};
use crate::http::dial::TunnelDialer;
use crate::http::engine::{Engine, Event};
use crate::http::table::{BoxIo, Dialer, Mode, Table};
use crate::intercept::TUNNEL_READ_BUFFER;
use crate::redirect::{PortRedirect, Redirect};
use crate::server::control_handshake;

/// The nftables table of the redirect.
pub const TABLE: &str = "devloop-route";

/// How long connections get to finish once the agent drains.
pub const DRAIN_DEADLINE: Duration = Duration::from_secs(5);

/// How long connections open before the redirect may stay busy before they are ended anyway.
pub const RESET_DEADLINE: Duration = Duration::from_millis(800);

pub struct RouteConfig {
    pub token: String,
    /// The control listener (the cli arrives through `docker exec ... bridge`, so loopback).
    pub control: SocketAddr,
    /// The service's ports.
    pub ports: Vec<u16>,
    /// Addresses of the original besides 127.0.0.1, tried in order when loopback refuses.
    pub original_hosts: Vec<IpAddr>,
    /// The folder of the clis' handoff sockets, when they share the engine's machine.
    pub handoff_dir: Option<PathBuf>,
    /// Exit after this long with no holder and no cli.
    pub linger: Duration,
    /// ... and, until a first cli connected, not before this long after the start (the
    /// first cli is on its way).
    pub first_wait: Duration,
    /// Install the redirect (false only in tests that send to the agent ports directly).
    pub redirect: bool,
    /// Where the agent ports are told (tests): one line "SERVICE=AGENT" per port.
    pub ports_file: Option<PathBuf>,
}

/// One registered holder.
struct Entry {
    info: HolderInfo,
    /// The connection that holds it.
    conn: u64,
    /// Tells that connection it was released, and by whom.
    release: mpsc::Sender<String>,
    counts: Vec<Arc<crate::http::table::Counts>>,
}

struct Router {
    config: RouteConfig,
    /// (service port, its engine).
    engines: Vec<(u16, Arc<Engine>)>,
    holders: Mutex<HashMap<u64, Entry>>,
    next_holder: AtomicU64,
    /// Authenticated control connections.
    clis: AtomicUsize,
    /// Whether any cli has been connected yet.
    joined: std::sync::atomic::AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The original: 127.0.0.1 first, then the other addresses; the one that answered last is
/// tried first next time.
struct OriginalDialer {
    addrs: Vec<SocketAddr>,
    last: AtomicUsize,
}

impl Dialer for OriginalDialer {
    fn dial(&self) -> BoxFuture<'_, io::Result<BoxIo>> {
        Box::pin(async move {
            let first = self.last.load(Ordering::Relaxed);
            let mut error = None;
            for i in 0..self.addrs.len() {
                let at = (first + i) % self.addrs.len();
                match TcpStream::connect(self.addrs[at]).await {
                    Ok(s) => {
                        s.set_nodelay(true)?;
                        self.last.store(at, Ordering::Relaxed);
                        return Ok(Box::pin(s) as BoxIo);
                    }
                    Err(e) => error = Some(e),
                }
            }
            Err(error.unwrap_or_else(|| io::Error::other("the original has no address")))
        })
    }

    fn name(&self) -> String {
        format!("the original (port {})", self.addrs[0].port())
    }
}

/// A holder's laptop on this machine: each connection asked for over the cli's handoff
/// socket; the tunnel when the socket does not answer.
struct HandoffDialer {
    socket: PathBuf,
    token: String,
    port: u16,
    tunnel: TunnelDialer,
}

impl Dialer for HandoffDialer {
    fn dial(&self) -> BoxFuture<'_, io::Result<BoxIo>> {
        Box::pin(async move {
            match handoff::request(&self.socket, &self.token, self.port).await {
                Ok(handoff::Answer::Connected(tcp)) => {
                    tcp.set_nodelay(true)?;
                    Ok(Box::pin(tcp) as BoxIo)
                }
                Ok(handoff::Answer::Refused(why)) => Err(io::Error::other(why)),
                Err(e) => {
                    tracing::debug!(error = %e, "handoff failed; tunnelling");
                    self.tunnel.dial().await
                }
            }
        })
    }

    fn name(&self) -> String {
        self.tunnel.label.clone()
    }
}

/// A handoff socket's file name: one plain name in the handoff folder.
fn plain_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        && !name.starts_with('.')
}

pub async fn run(
    config: RouteConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let mut listeners = Vec::new();
    let mut engines = Vec::new();
    let mut redirects = Vec::new();
    for &port in &config.ports {
        let listener = TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0)).await?;
        let agent = listener.local_addr()?.port();
        let mut addrs = vec![SocketAddr::from((Ipv4Addr::LOCALHOST, port))];
        addrs.extend(
            config
                .original_hosts
                .iter()
                .map(|ip| SocketAddr::new(*ip, port)),
        );
        let original = Arc::new(OriginalDialer {
            addrs,
            last: AtomicUsize::new(0),
        });
        engines.push((port, Engine::new(Arc::new(Table::new(original)))));
        listeners.push(listener);
        redirects.push(PortRedirect {
            service: port,
            agent,
        });
    }
    if let Some(path) = &config.ports_file {
        let text: String = redirects
            .iter()
            .map(|r| format!("{}={}\n", r.service, r.agent))
            .collect();
        std::fs::write(path, text)?;
    }
    let control = TcpListener::bind(config.control).await?;
    let router = Arc::new(Router {
        config,
        engines,
        holders: Mutex::default(),
        next_holder: AtomicU64::new(1),
        clis: AtomicUsize::new(0),
        joined: std::sync::atomic::AtomicBool::new(false),
    });
    let mut tasks = tokio::task::JoinSet::new();
    for (listener, (port, engine)) in listeners.into_iter().zip(router.engines.clone()) {
        tasks.spawn(accept_callers(listener, port, engine));
    }
    // The redirect, then the connections that were open before it.
    let redirect = if router.config.redirect {
        let r = Redirect::install(TABLE, &redirects).map_err(|e| {
            anyhow::anyhow!(
                "cannot redirect the service's ports (does the agent have NET_ADMIN?): {e}"
            )
        })?;
        for &port in &router.config.ports {
            tokio::task::spawn_blocking(move || {
                match crate::resets::reset(port, RESET_DEADLINE, Duration::from_millis(20)) {
                    Ok(done) => tracing::info!(
                        port,
                        idle = done.idle,
                        busy = done.busy,
                        "connections opened before the redirect ended"
                    ),
                    Err(e) => {
                        tracing::warn!(port, error = %e, "cannot end the connections opened before the redirect")
                    }
                }
            });
        }
        Some(r)
    } else {
        None
    };
    for r in &redirects {
        tracing::info!(
            service = r.service,
            agent = r.agent,
            "routing the service port's requests"
        );
    }
    tasks.spawn(accept_control(control, router.clone()));
    let started = Instant::now();
    let unused = async {
        let mut idle_since: Option<Instant> = None;
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let busy = router.clis.load(Ordering::Relaxed) > 0 || !lock(&router.holders).is_empty();
            if busy {
                idle_since = None;
                continue;
            }
            let since = *idle_since.get_or_insert_with(Instant::now);
            let waited = router.joined.load(Ordering::Relaxed)
                || started.elapsed() >= router.config.first_wait;
            if since.elapsed() >= router.config.linger && waited {
                tracing::info!("no holder left; draining");
                return;
            }
        }
    };
    tokio::select! {
        _ = shutdown => tracing::info!("SIGTERM received; draining"),
        _ = unused => {}
        Some(r) = tasks.join_next() => r??,
    }
    // New connections reach the original directly from here; those under way finish.
    drop(redirect);
    for (_, engine) in &router.engines {
        engine.drain();
    }
    let open: usize = router
        .engines
        .iter()
        .map(|(_, e)| e.open_connections())
        .sum();
    let idle = futures_util::future::join_all(router.engines.iter().map(|(_, e)| e.idle()));
    if tokio::time::timeout(DRAIN_DEADLINE, idle).await.is_err() {
        tracing::warn!("connections still open after {DRAIN_DEADLINE:?}; closing them");
    } else {
        tracing::info!(connections = open, "drained");
    }
    Ok(())
}

async fn accept_callers(
    listener: TcpListener,
    port: u16,
    engine: Arc<Engine>,
) -> anyhow::Result<()> {
    let listener = &listener;
    let ended = accept_loop(
        "service",
        move || listener.accept(),
        |tcp, peer| {
            let _ = tcp.set_nodelay(true);
            tracing::trace!(%peer, port, "caller connected");
            tokio::spawn(engine.clone().serve(tcp, peer.to_string()));
        },
    )
    .await;
    match ended {}
}

async fn accept_control(listener: TcpListener, router: Arc<Router>) -> anyhow::Result<()> {
    let mut conn_id = 0u64;
    let mut gate = Gate::new("control");
    let listener = &listener;
    let ended = accept_loop(
        "control",
        move || listener.accept(),
        |tcp, peer| {
            conn_id += 1;
            let Some(place) = gate.admit() else {
                return;
            };
            let router = router.clone();
            tokio::spawn(async move { serve_control(tcp, peer, conn_id, place, router).await });
        },
    )
    .await;
    match ended {}
}

/// What a control connection's writer sends.
enum Out {
    Msg(AgentMsg),
    Frame(TunnelFrame),
}

async fn serve_control(
    tcp: TcpStream,
    peer: SocketAddr,
    conn_id: u64,
    place: tokio::sync::OwnedSemaphorePermit,
    router: Arc<Router>,
) {
    let Some(mut ws) = control_handshake(
        tcp,
        peer,
        conn_id,
        &router.config.token,
        TUNNEL_READ_BUFFER,
        caps::ROUTE,
        "this agent routes requests: the cli must support the route capability",
    )
    .await
    else {
        return;
    };
    drop(place);
    router.clis.fetch_add(1, Ordering::Relaxed);
    router.joined.store(true, Ordering::Relaxed);
    let welcome = AgentMsg::Welcome(Welcome {
        protocol_version: PROTOCOL_VERSION,
        agent_version: devloop_proxy::CRATE_VERSION.to_string(),
        capabilities: vec![caps::ROUTE.to_string(), caps::TUNNEL.to_string()],
        root: String::new(),
        process: ProcessStatus::initial(ProcessState::NoCommand),
        recent_logs: Vec::new(),
    });
    if ws
        .send(Message::Binary(encode(&welcome).into()))
        .await
        .is_ok()
    {
        tracing::info!(conn_id, %peer, "cli connected");
        session(ws, conn_id, &router).await;
        tracing::info!(conn_id, %peer, "cli disconnected");
    }
    router.clis.fetch_sub(1, Ordering::Relaxed);
}

async fn session(ws: crate::server::Ws, conn_id: u64, router: &Arc<Router>) {
    let (mut sink, mut stream) = ws.split();
    let (frames_tx, mut frames_rx) =
        mpsc::channel::<TunnelFrame>(devloop_proxy::tunnel::OUT_QUEUE_FRAMES);
    let (out_tx, mut out_rx) = mpsc::channel::<AgentMsg>(256);
    let (mux, mut incoming) = Mux::new(Side::Agent, frames_tx);
    let writer = tokio::spawn(async move {
        loop {
            let mut next = Some(tokio::select! {
                f = frames_rx.recv() => match f { Some(f) => Out::Frame(f), None => break },
                m = out_rx.recv() => match m { Some(m) => Out::Msg(m), None => break },
            });
            while let Some(out) = next.take() {
                let msg = match out {
                    Out::Frame(f) => AgentMsg::Tunnel(f),
                    Out::Msg(m) => m,
                };
                if sink
                    .feed(Message::Binary(encode(&msg).into()))
                    .await
                    .is_err()
                {
                    return;
                }
                next = frames_rx.try_recv().ok().map(Out::Frame);
            }
            if sink.flush().await.is_err() {
                break;
            }
        }
        let _ = sink.close().await;
    });
    // The laptop opens no streams towards a routing agent.
    let refuser = tokio::spawn(async move {
        while let Some((_, stream)) = incoming.accept().await {
            stream.reset("a routing agent exposes no services");
        }
    });
    let (release_tx, mut release_rx) = mpsc::channel::<String>(1);
    let mut lines: Option<tokio::task::JoinHandle<()>> = None;
    let mut mine: Vec<u64> = Vec::new();
    loop {
        let message = tokio::select! {
            m = stream.next() => m,
            by = release_rx.recv() => {
                let by = by.unwrap_or_default();
                tracing::info!(conn_id, %by, "holder released");
                let _ = out_tx.send(AgentMsg::Released { by }).await;
                break;
            }
        };
        let Some(Ok(message)) = message else { break };
        let Message::Binary(bytes) = message else {
            continue;
        };
        let msg = match decode::<LaptopMsg>(&bytes) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(conn_id, error = %e, "undecodable message; closing");
                break;
            }
        };
        match msg {
            LaptopMsg::Tunnel(frame) => mux.handle(frame),
            LaptopMsg::Ping { nonce } => {
                let _ = out_tx.send(AgentMsg::Pong { nonce }).await;
            }
            LaptopMsg::Hold { req, hold } => {
                let answer = match router.hold(conn_id, &hold, &mux, release_tx.clone()) {
                    Ok((id, overlaps)) => {
                        mine.push(id);
                        if lines.is_none() && hold.lines {
                            lines = Some(tokio::spawn(request_lines(
                                router.clone(),
                                conn_id,
                                out_tx.clone(),
                            )));
                        }
                        AgentMsg::Held {
                            req,
                            holder: id,
                            overlaps,
                        }
                    }
                    Err(error) => AgentMsg::Ack {
                        req,
                        outcome: Outcome::Failed { error },
                    },
                };
                let _ = out_tx.send(answer).await;
            }
            LaptopMsg::ListHolders { req } => {
                let holders = router.list();
                let _ = out_tx.send(AgentMsg::Holders { req, holders }).await;
            }
            LaptopMsg::Release { req, holder, by } => {
                let outcome = match router.release(holder, &by) {
                    true => Outcome::Ok { applied: 1 },
                    false => Outcome::Failed {
                        error: format!("no holder {holder}"),
                    },
                };
                let _ = out_tx.send(AgentMsg::Ack { req, outcome }).await;
            }
            other => {
                tracing::warn!(conn_id, ?other, "request not served in route mode; closing");
                break;
            }
        }
    }
    for id in mine {
        router.remove(id);
    }
    if let Some(l) = lines {
        l.abort();
    }
    mux.shutdown(devloop_proxy::tunnel::CONNECTION_LOST);
    refuser.abort();
    drop(out_tx);
    // Whatever is queued (a Released notice) still goes out.
    let _ = tokio::time::timeout(Duration::from_secs(1), writer).await;
}

/// Sends the connection's holders their request lines, as events come.
async fn request_lines(router: Arc<Router>, conn_id: u64, out: mpsc::Sender<AgentMsg>) {
    let mut receivers: Vec<_> = router
        .engines
        .iter()
        .map(|(port, e)| (*port, e.subscribe()))
        .collect();
    loop {
        let next = futures_util::future::select_all(
            receivers
                .iter_mut()
                .map(|(_, rx)| Box::pin(async move { rx.recv().await })),
        );
        let (got, i, _) = next.await;
        let port = receivers[i].0;
        match got {
            Ok(Event::Request(e)) => {
                let Some(holder) = e.holder else { continue };
                let mine = lock(&router.holders)
                    .get(&holder)
                    .is_some_and(|h| h.conn == conn_id);
                if !mine {
                    continue;
                }
                let line = RequestLine {
                    holder,
                    port,
                    at_ms: now_ms().saturating_sub(e.total.as_millis() as u64),
                    method: e.method,
                    path: e.path,
                    status: e.status,
                    answer_us: e.elapsed.as_micros() as u64,
                    bytes_in: e.bytes_in,
                    bytes_out: e.bytes_out,
                    error: e.error,
                    copy: e.copy,
                };
                // A cli that cannot keep up loses lines, never slows requests.
                let _ = out.try_send(AgentMsg::Request(line));
            }
            Ok(Event::NotHttp { .. }) => {}
            Err(broadcast::error::RecvError::Lagged(n)) => {
                tracing::debug!(conn_id, skipped = n, "request lines skipped");
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

impl Router {
    fn hold(
        &self,
        conn: u64,
        spec: &HoldSpec,
        mux: &Mux,
        release: mpsc::Sender<String>,
    ) -> Result<(u64, Vec<HolderInfo>), String> {
        if spec.ports.is_empty() {
            return Err("no port to hold".into());
        }
        let mut engines = Vec::new();
        for port in &spec.ports {
            match self.engines.iter().find(|(p, _)| p == port) {
                Some((_, e)) => engines.push((*port, e.clone())),
                None => {
                    return Err(format!(
                        "port {port} is not routed by this agent (it routes {:?}); leave every intercept of the service to route other ports",
                        self.config.ports
                    ))
                }
            }
        }
        // Refused before anything is added.
        spec.filter.compile().map_err(|e| e.to_string())?;
        let handoff = match (&spec.handoff, &self.config.handoff_dir) {
            (Some(name), Some(dir)) if plain_name(name) => Some(dir.join(name)),
            (Some(name), _) => return Err(format!("bad handoff socket name {name:?}")),
            (None, _) => None,
        };
        let id = self.next_holder.fetch_add(1, Ordering::Relaxed);
        let mode = if spec.mirror {
            Mode::Mirror
        } else {
            Mode::Take
        };
        let mut overlaps: Vec<u64> = Vec::new();
        let mut counts = Vec::new();
        for (port, engine) in &engines {
            let tunnel = TunnelDialer {
                mux: mux.clone(),
                port: *port,
                label: format!("{}'s laptop", spec.who),
            };
            let dialer: Arc<dyn Dialer> = match &handoff {
                Some(socket) => Arc::new(HandoffDialer {
                    socket: socket.clone(),
                    token: self.config.token.clone(),
                    port: *port,
                    tunnel,
                }),
                None => Arc::new(tunnel),
            };
            match engine.table().add(id, mode, &spec.filter, dialer) {
                Ok((holder, over)) => {
                    counts.push(holder.counts.clone());
                    overlaps.extend(over.iter().map(|h| h.id));
                }
                Err(e) => {
                    for (_, e) in &engines {
                        e.table().remove(id);
                    }
                    return Err(e.to_string());
                }
            }
        }
        overlaps.sort_unstable();
        overlaps.dedup();
        let info = HolderInfo {
            id,
            who: spec.who.clone(),
            ports: spec.ports.clone(),
            filter: spec.filter.clone(),
            mirror: spec.mirror,
            since_ms: now_ms(),
            requests: 0,
            dropped: 0,
            session: spec.session.clone(),
        };
        tracing::info!(
            holder = id,
            who = %spec.who,
            filter = %spec.filter.describe(),
            mirror = spec.mirror,
            "holder added"
        );
        let mut holders = lock(&self.holders);
        holders.insert(
            id,
            Entry {
                info,
                conn,
                release,
                counts,
            },
        );
        let overlaps = overlaps
            .iter()
            .filter_map(|o| holders.get(o).map(Entry::snapshot))
            .collect();
        Ok((id, overlaps))
    }

    fn list(&self) -> Vec<HolderInfo> {
        let mut all: Vec<_> = lock(&self.holders).values().map(Entry::snapshot).collect();
        all.sort_by_key(|h| h.id);
        all
    }

    /// Ends a holder at once: its requests go elsewhere from the next one on.
    fn remove(&self, id: u64) -> Option<Entry> {
        for (_, e) in &self.engines {
            e.table().remove(id);
        }
        let entry = lock(&self.holders).remove(&id);
        if entry.is_some() {
            tracing::info!(holder = id, "holder removed");
        }
        entry
    }

    fn release(&self, id: u64, by: &str) -> bool {
        match self.remove(id) {
            Some(entry) => {
                let _ = entry.release.try_send(by.to_string());
                true
            }
            None => false,
        }
    }
}

impl Entry {
    fn snapshot(&self) -> HolderInfo {
        let mut info = self.info.clone();
        info.requests = self
            .counts
            .iter()
            .map(|c| c.requests.load(Ordering::Relaxed))
            .sum();
        info.dropped = self
            .counts
            .iter()
            .map(|c| c.dropped.load(Ordering::Relaxed))
            .sum();
        info
    }
}

/// Reads `path`'s "SERVICE=AGENT" lines (tests).
pub fn read_ports_file(path: &Path) -> io::Result<Vec<(u16, u16)>> {
    let text = std::fs::read_to_string(path)?;
    text.lines()
        .map(|l| {
            let (s, a) = l
                .split_once('=')
                .ok_or_else(|| io::Error::other(format!("bad line {l:?}")))?;
            Ok((
                s.parse().map_err(io::Error::other)?,
                a.parse().map_err(io::Error::other)?,
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handoff_names_are_plain() {
        assert!(plain_name("a1b2c3.sock"));
        assert!(!plain_name("../x"));
        assert!(!plain_name("a/b"));
        assert!(!plain_name(".hidden"));
        assert!(!plain_name(""));
        assert!(!plain_name(&"x".repeat(65)));
    }
}
