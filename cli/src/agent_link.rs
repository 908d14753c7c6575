//! The cli's end of the connection to one agent: the WebSocket handshake, requests matched
//! to their answers by id, and the agent's logs and process events as a stream.

use devloop_proxy::codec::{decode, encode};
use devloop_proxy::msg::{
    AgentMsg, FileOp, Hello, HoldSpec, HolderInfo, LaptopMsg, LogLine, Outcome, ProcessStatus,
    RequestLine, Welcome,
};
use devloop_proxy::tree::Tree;
use devloop_proxy::tunnel::{Incoming, Mux, Side, TunnelFrame};
use futures_util::{SinkExt, StreamExt};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;

/// Any byte stream to the agent: a TCP socket or a `docker exec` stream.
pub trait Transport: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Transport for T {}

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("the agent refused the connection: {0}")]
    Refused(String),
    #[error("websocket handshake with the agent failed: {0}")]
    Handshake(String),
    #[error("the connection to the agent closed")]
    Closed,
    #[error("the agent did not answer within {0:?}")]
    Timeout(Duration),
    #[error("unexpected answer from the agent: {0}")]
    Protocol(String),
    #[error("the agent failed the request: {0}")]
    Failed(String),
}

/// What the agent sends on its own.
#[derive(Debug, Clone)]
pub enum AgentEvent {
    Log(LogLine),
    Process(ProcessStatus),
    /// A routing agent: a request this connection's holder took or got a copy of.
    Request(RequestLine),
    /// A routing agent: this connection's holder was ended by `by`.
    Released {
        by: String,
    },
}

enum Pending {
    Ack(oneshot::Sender<Outcome>),
    Index(Tree, oneshot::Sender<Result<Tree, String>>),
    Pong(oneshot::Sender<()>),
    Held(oneshot::Sender<Result<(u64, Vec<HolderInfo>), String>>),
    Holders(oneshot::Sender<Vec<HolderInfo>>),
}

/// A connected, authenticated agent. Cheap to clone; all clones share the connection.
#[derive(Clone)]
pub struct AgentLink {
    out_tx: mpsc::Sender<Message>,
    pending: Arc<Mutex<HashMap<u64, Pending>>>,
    next_req: Arc<AtomicU64>,
    closed: tokio_util::sync::CancellationToken,
    /// The tunnel multiplexer, once [`AgentLink::open_tunnel`] made one.
    tunnel: Arc<Mutex<Option<Mux>>>,
    /// Tunnel frames go straight to the writer task (no forwarding task in between: every
    /// task a frame passes adds to each tunnelled round trip).
    tunnel_tx: mpsc::Sender<TunnelFrame>,
    limits: Limits,
}

pub struct Connected {
    pub link: AgentLink,
    pub welcome: Welcome,
    pub events: mpsc::Receiver<AgentEvent>,
}

pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a request waits for its answer before the connection is given up (closed, so
/// the sync reconnects and reconciles in full): long enough for the slowest honest answer
/// on a loaded machine, short enough that a connection that died without a close (a
/// network cut) does not hold a sync forever.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(120);
/// An index walks and hashes the whole tree (100,000 files, 200 MB: seconds here).
pub const INDEX_TIMEOUT: Duration = Duration::from_secs(600);
/// A `Run` is a command of the user's (`pip install ...`), which may take minutes.
pub const RUN_TIMEOUT: Duration = Duration::from_secs(1800);

/// How long each kind of wait may take on one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub handshake: Duration,
    pub answer: Duration,
    pub index: Duration,
    pub run: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            handshake: HANDSHAKE_TIMEOUT,
            answer: ANSWER_TIMEOUT,
            index: INDEX_TIMEOUT,
            run: RUN_TIMEOUT,
        }
    }
}

impl AgentLink {
    /// Runs the WebSocket and devloop handshakes over `io`.
    pub async fn connect(io: impl Transport, token: &str) -> Result<Connected, LinkError> {
        AgentLink::connect_with(io, token, Limits::default()).await
    }

    /// [`AgentLink::connect`] with other limits (the tests' short ones).
    pub async fn connect_with(
        io: impl Transport,
        token: &str,
        limits: Limits,
    ) -> Result<Connected, LinkError> {
        let handshake = limits.handshake;
        let mut config = WebSocketConfig::default();
        config.max_message_size = Some(devloop_proxy::MAX_MESSAGE_BYTES + 4096);
        config.max_frame_size = Some(devloop_proxy::MAX_MESSAGE_BYTES + 4096);
        let url = format!("ws://agent{}", devloop_proxy::WS_PATH);
        let (ws, _) = tokio::time::timeout(
            handshake,
            tokio_tungstenite::client_async_with_config(url, io, Some(config)),
        )
        .await
        .map_err(|_| LinkError::Timeout(handshake))?
        .map_err(|e| LinkError::Handshake(e.to_string()))?;
        let (mut sink, mut stream) = ws.split();
        let hello = LaptopMsg::Hello(Hello {
            magic: devloop_proxy::MAGIC,
            protocol_version: devloop_proxy::PROTOCOL_VERSION,
            cli_version: devloop_proxy::CRATE_VERSION.into(),
            capabilities: vec![
                devloop_proxy::caps::FILES.into(),
                devloop_proxy::caps::TAR.into(),
                devloop_proxy::caps::PROCESS.into(),
                devloop_proxy::caps::TUNNEL.into(),
                devloop_proxy::caps::ROUTE.into(),
            ],
            token: token.into(),
        });
        sink.send(Message::Binary(encode(&hello).into()))
            .await
            .map_err(|e| LinkError::Handshake(e.to_string()))?;
        let welcome = loop {
            let msg = tokio::time::timeout(handshake, stream.next())
                .await
                .map_err(|_| LinkError::Timeout(handshake))?;
            match msg {
                Some(Ok(Message::Binary(b))) => match decode::<AgentMsg>(&b) {
                    Ok(AgentMsg::Welcome(w)) => break w,
                    Ok(AgentMsg::Refused { reason }) => return Err(LinkError::Refused(reason)),
                    Ok(other) => {
                        return Err(LinkError::Protocol(format!(
                            "expected a welcome, got {other:?}"
                        )))
                    }
                    Err(e) => return Err(LinkError::Protocol(e.to_string())),
                },
                Some(Ok(Message::Close(frame))) => {
                    return Err(LinkError::Refused(
                        frame
                            .map(|f| f.reason.to_string())
                            .unwrap_or_else(|| "closed".into()),
                    ))
                }
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(LinkError::Handshake(e.to_string())),
                None => return Err(LinkError::Closed),
            }
        };

        let (out_tx, mut out_rx) = mpsc::channel::<Message>(64);
        let (tunnel_tx, mut tunnel_rx) =
            mpsc::channel::<TunnelFrame>(devloop_proxy::tunnel::OUT_QUEUE_FRAMES);
        let (event_tx, events) = mpsc::channel::<AgentEvent>(1024);
        let pending: Arc<Mutex<HashMap<u64, Pending>>> = Arc::default();
        let closed = tokio_util::sync::CancellationToken::new();

        let writer_closed = closed.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    msg = out_rx.recv() => match msg {
                        Some(m) => {
                            if sink.send(m).await.is_err() { break; }
                        }
                        None => { let _ = sink.close().await; break; }
                    },
                    Some(frame) = tunnel_rx.recv() => {
                        // Frames already queued behind this one go out in the same write (one
                        // port-forward frame, one syscall); the flush comes as soon as the
                        // queue is empty, so nothing waits for more.
                        let mut next = Some(frame);
                        let mut ok = true;
                        while let Some(frame) = next.take() {
                            let m = Message::Binary(encode(&LaptopMsg::Tunnel(frame)).into());
                            if sink.feed(m).await.is_err() { ok = false; break; }
                            next = tunnel_rx.try_recv().ok();
                        }
                        if !ok || sink.flush().await.is_err() { break; }
                    },
                    _ = writer_closed.cancelled() => {
                        let frame = CloseFrame { code: CloseCode::Normal, reason: "devloop cli closing".into() };
                        let _ = tokio::time::timeout(Duration::from_millis(200), sink.send(Message::Close(Some(frame)))).await;
                        break;
                    }
                }
            }
            writer_closed.cancel();
        });

        let tunnel: Arc<Mutex<Option<Mux>>> = Arc::default();
        let reader_tunnel = tunnel.clone();
        let reader_pending = pending.clone();
        let reader_closed = closed.clone();
        tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    m = stream.next() => m,
                    _ = reader_closed.cancelled() => None,
                };
                let bytes = match next {
                    Some(Ok(Message::Binary(b))) => b,
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                    Some(Ok(_)) => continue,
                };
                let msg = match decode::<AgentMsg>(&bytes) {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::warn!(error = %e, "undecodable message from the agent; closing");
                        break;
                    }
                };
                match msg {
                    AgentMsg::Log(line) => {
                        // A full event queue drops log lines rather than stalling acks.
                        let _ = event_tx.try_send(AgentEvent::Log(line));
                    }
                    AgentMsg::Process(p) => {
                        let _ = event_tx.try_send(AgentEvent::Process(p));
                    }
                    AgentMsg::Ack { req, outcome } => match lock(&reader_pending).remove(&req) {
                        Some(Pending::Ack(tx)) => {
                            let _ = tx.send(outcome);
                        }
                        Some(Pending::Held(tx)) => {
                            let error = match outcome {
                                Outcome::Failed { error } => error,
                                other => format!("unexpected answer to a hold: {other:?}"),
                            };
                            let _ = tx.send(Err(error));
                        }
                        // An index request the agent could not answer (its root unreadable).
                        Some(Pending::Index(_, tx)) => {
                            let error = match outcome {
                                Outcome::Failed { error } => error,
                                other => {
                                    format!("unexpected answer to an index request: {other:?}")
                                }
                            };
                            let _ = tx.send(Err(error));
                        }
                        _ => {}
                    },
                    AgentMsg::Index { req, entries, last } => {
                        let mut map = lock(&reader_pending);
                        if let Some(Pending::Index(tree, _)) = map.get_mut(&req) {
                            tree.extend(entries);
                        }
                        if last {
                            if let Some(Pending::Index(tree, tx)) = map.remove(&req) {
                                let _ = tx.send(Ok(tree));
                            }
                        }
                    }
                    AgentMsg::Pong { nonce } => {
                        if let Some(Pending::Pong(tx)) = lock(&reader_pending).remove(&nonce) {
                            let _ = tx.send(());
                        }
                    }
                    AgentMsg::Tunnel(frame) => {
                        if let Some(mux) = lock(&reader_tunnel).as_ref() {
                            mux.handle(frame);
                        }
                    }
                    AgentMsg::Held {
                        req,
                        holder,
                        overlaps,
                    } => {
                        if let Some(Pending::Held(tx)) = lock(&reader_pending).remove(&req) {
                            let _ = tx.send(Ok((holder, overlaps)));
                        }
                    }
                    AgentMsg::Holders { req, holders } => {
                        if let Some(Pending::Holders(tx)) = lock(&reader_pending).remove(&req) {
                            let _ = tx.send(holders);
                        }
                    }
                    AgentMsg::Request(line) => {
                        // Lines are dropped rather than stalling the connection.
                        let _ = event_tx.try_send(AgentEvent::Request(line));
                    }
                    AgentMsg::Released { by } => {
                        let _ = event_tx.try_send(AgentEvent::Released { by });
                    }
                    AgentMsg::Welcome(_) | AgentMsg::Refused { .. } => {}
                }
            }
            reader_closed.cancel();
            // Waiters see their sender dropped and report the connection as closed.
            lock(&reader_pending).clear();
            if let Some(mux) = lock(&reader_tunnel).take() {
                mux.shutdown(devloop_proxy::tunnel::CONNECTION_LOST);
            }
        });

        Ok(Connected {
            link: AgentLink {
                out_tx,
                pending,
                next_req: Arc::new(AtomicU64::new(1)),
                closed,
                tunnel,
                tunnel_tx,
                limits,
            },
            welcome,
            events,
        })
    }

    /// The laptop end of the tunnel: streams the agent opens arrive on the `Incoming`, and
    /// the `Mux` opens streams towards the agent (`--expose`). One per connection.
    pub fn open_tunnel(&self) -> (Mux, Incoming) {
        let (mux, incoming) = Mux::new(Side::Laptop, self.tunnel_tx.clone());
        *lock(&self.tunnel) = Some(mux.clone());
        if self.closed.is_cancelled() {
            mux.shutdown(devloop_proxy::tunnel::CONNECTION_LOST);
        }
        (mux, incoming)
    }

    fn req_id(&self) -> u64 {
        self.next_req.fetch_add(1, Ordering::Relaxed)
    }

    async fn send(&self, msg: &LaptopMsg) -> Result<(), LinkError> {
        if self.closed.is_cancelled() {
            return Err(LinkError::Closed);
        }
        self.out_tx
            .send(Message::Binary(encode(msg).into()))
            .await
            .map_err(|_| LinkError::Closed)
    }

    async fn request_ack(
        &self,
        req: u64,
        msg: &LaptopMsg,
        limit: Duration,
    ) -> Result<Outcome, LinkError> {
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(req, Pending::Ack(tx));
        self.send(msg).await?;
        self.answer(req, rx, limit).await
    }

    /// The answer to `req`, or `Timeout` after `limit`: the request is forgotten and the
    /// connection closed, since what the agent did with it is unknown.
    async fn answer<T>(
        &self,
        req: u64,
        rx: oneshot::Receiver<T>,
        limit: Duration,
    ) -> Result<T, LinkError> {
        match tokio::time::timeout(limit, rx).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(_)) => Err(LinkError::Closed),
            Err(_) => {
                lock(&self.pending).remove(&req);
                tracing::warn!(
                    req,
                    ?limit,
                    "no answer from the agent; closing the connection"
                );
                self.close();
                Err(LinkError::Timeout(limit))
            }
        }
    }

    pub async fn index(&self) -> Result<Tree, LinkError> {
        let req = self.req_id();
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(req, Pending::Index(Tree::new(), tx));
        self.send(&LaptopMsg::Index { req }).await?;
        self.answer(req, rx, self.limits.index)
            .await?
            .map_err(LinkError::Failed)
    }

    /// Applies `ops` in order; Ok(number applied).
    pub async fn batch(&self, ops: Vec<FileOp>) -> Result<u64, LinkError> {
        let req = self.req_id();
        expect_ok(
            self.request_ack(req, &LaptopMsg::Batch { req, ops }, self.limits.answer)
                .await?,
        )
    }

    /// Sends a tar stream chunk by chunk; returns the number of entries applied.
    pub async fn tar(
        &self,
        mut chunks: mpsc::Receiver<std::io::Result<Vec<u8>>>,
        mut on_chunk: impl FnMut(usize),
    ) -> Result<u64, LinkError> {
        let req = self.req_id();
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(req, Pending::Ack(tx));
        let mut held: Option<Vec<u8>> = None;
        loop {
            let next = chunks.recv().await;
            match next {
                Some(Ok(data)) => {
                    if let Some(prev) = held.replace(data) {
                        let n = prev.len();
                        self.send(&LaptopMsg::TarChunk {
                            req,
                            data: prev,
                            last: false,
                        })
                        .await?;
                        on_chunk(n);
                    }
                }
                Some(Err(e)) => {
                    lock(&self.pending).remove(&req);
                    // Tell the agent the stream is over; what it applied so far is valid.
                    let _ = self
                        .send(&LaptopMsg::TarChunk {
                            req,
                            data: Vec::new(),
                            last: true,
                        })
                        .await;
                    return Err(LinkError::Failed(format!(
                        "reading laptop files for the tar stream: {e}"
                    )));
                }
                None => break,
            }
        }
        let last = held.unwrap_or_default();
        let n = last.len();
        self.send(&LaptopMsg::TarChunk {
            req,
            data: last,
            last: true,
        })
        .await?;
        on_chunk(n);
        expect_ok(self.answer(req, rx, self.limits.index).await?)
    }

    pub async fn restart(&self) -> Result<(), LinkError> {
        let req = self.req_id();
        expect_ok(
            self.request_ack(req, &LaptopMsg::Restart { req }, self.limits.answer)
                .await?,
        )
        .map(|_| ())
    }

    /// Runs a command in the container; Ok(exit code).
    pub async fn run(&self, argv: Vec<String>) -> Result<Option<i32>, LinkError> {
        let req = self.req_id();
        match self
            .request_ack(req, &LaptopMsg::Run { req, argv }, self.limits.run)
            .await?
        {
            Outcome::Exited { code } => Ok(code),
            Outcome::Failed { error } => Err(LinkError::Failed(error)),
            other => Err(LinkError::Protocol(format!("{other:?}"))),
        }
    }

    pub async fn ping(&self, timeout: Duration) -> Result<Duration, LinkError> {
        let nonce = self.req_id();
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(nonce, Pending::Pong(tx));
        let start = std::time::Instant::now();
        self.send(&LaptopMsg::Ping { nonce }).await?;
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(())) => Ok(start.elapsed()),
            Ok(Err(_)) => Err(LinkError::Closed),
            Err(_) => Err(LinkError::Timeout(timeout)),
        }
    }

    /// A routing agent: registers this connection's holder. Err: the agent refused it (the
    /// reason), or the connection failed.
    pub async fn hold(&self, hold: HoldSpec) -> Result<(u64, Vec<HolderInfo>), LinkError> {
        let req = self.req_id();
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(req, Pending::Held(tx));
        self.send(&LaptopMsg::Hold { req, hold }).await?;
        match tokio::time::timeout(self.limits.answer, rx).await {
            Ok(Ok(Ok(held))) => Ok(held),
            Ok(Ok(Err(reason))) => Err(LinkError::Failed(reason)),
            Ok(Err(_)) => Err(LinkError::Closed),
            Err(_) => Err(LinkError::Timeout(self.limits.answer)),
        }
    }

    /// A routing agent: every holder, with its counts.
    pub async fn holders(&self) -> Result<Vec<HolderInfo>, LinkError> {
        let req = self.req_id();
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(req, Pending::Holders(tx));
        self.send(&LaptopMsg::ListHolders { req }).await?;
        match tokio::time::timeout(self.limits.answer, rx).await {
            Ok(Ok(holders)) => Ok(holders),
            Ok(Err(_)) => Err(LinkError::Closed),
            Err(_) => Err(LinkError::Timeout(self.limits.answer)),
        }
    }

    /// A routing agent: ends holder `holder` (anyone's), saying it was `by`.
    pub async fn release(&self, holder: u64, by: &str) -> Result<(), LinkError> {
        let req = self.req_id();
        let msg = LaptopMsg::Release {
            req,
            holder,
            by: by.to_string(),
        };
        expect_ok(self.request_ack(req, &msg, self.limits.answer).await?).map(|_| ())
    }

    /// Resolves when the connection is gone.
    pub async fn closed(&self) {
        self.closed.cancelled().await
    }

    pub fn close(&self) {
        self.closed.cancel();
    }
}

fn expect_ok(outcome: Outcome) -> Result<u64, LinkError> {
    match outcome {
        Outcome::Ok { applied } => Ok(applied),
        Outcome::Failed { error } => Err(LinkError::Failed(error)),
        Outcome::Exited { code } => Err(LinkError::Protocol(format!(
            "unexpected exit status {code:?}"
        ))),
    }
}

/// The maps are only held for a few instructions and never across an await; a panic while
/// holding one would be a bug elsewhere, so a poisoned lock is still used.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
