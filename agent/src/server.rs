//! One connection from a cli: the WebSocket upgrade on [`WS_PATH`], the handshake (magic,
//! protocol version, token), then requests handled in order while log lines and process
//! status changes are pushed alongside.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use devloop_proxy::codec::{decode, encode};
use devloop_proxy::msg::{AgentMsg, Hello, LaptopMsg, Outcome, Welcome};
use devloop_proxy::{caps, MAGIC, MAX_MESSAGE_BYTES, PROTOCOL_VERSION, WS_PATH};
use futures_util::{SinkExt, StreamExt};
use subtle::ConstantTimeEq;
use tokio::net::TcpStream;
use tokio::sync::{broadcast, mpsc, OwnedSemaphorePermit};
use tokio::time::{timeout, timeout_at, Instant};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::StatusCode;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::apply::{apply_ops, Root};
use crate::guard::{Budgeted, MAX_HELLO_BYTES, PRE_HELLO_BYTES};
use crate::index;
use crate::logs::{Event, Hub, Position};
use crate::supervisor::{run_once, Supervisor};
use crate::tarstream::TarSession;

/// The upgrade and the hello must both arrive within this time. The cli sends them right
/// after connecting: two round trips, well under a second even through a Kubernetes
/// port-forward. A socket that sends nothing holds one of the
/// [`PRE_HELLO_CONNECTIONS`](crate::guard::PRE_HELLO_CONNECTIONS) places no longer than this.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);
/// Room above the largest encoded message for the WebSocket's own limits.
const MESSAGE_SLACK: usize = 64 * 1024;
/// Index parts: at most this many entries and about this many bytes each.
const INDEX_PART_ENTRIES: usize = 10_000;
const INDEX_PART_BYTES: usize = 8 * 1024 * 1024;
/// Messages queued for one connection's socket.
const OUTGOING_QUEUE: usize = 256;
/// After refusing or closing, how long the agent keeps reading (and dropping) what the peer
/// still sends, so the peer receives the reason before the socket goes away.
const CLOSE_LINGER: Duration = Duration::from_secs(2);
/// Longest close reason a WebSocket close frame can carry.
const MAX_CLOSE_REASON: usize = 123;

/// What every connection shares.
pub struct Shared {
    pub root: Root,
    pub workdir: std::path::PathBuf,
    pub token: String,
    pub hub: Arc<Hub>,
    pub supervisor: Supervisor,
    pub mirror_output: bool,
}

/// A connection's WebSocket; its reads are limited to [`PRE_HELLO_BYTES`] until the hello is
/// accepted.
pub(crate) type Ws = WebSocketStream<Budgeted<TcpStream>>;

/// A `Run` that ended: its acknowledgement goes out once the connection's forwarder has
/// passed `after`, the hub's position when the run's output was complete, so the cli gets
/// every output line (or its skip) before the acknowledgement.
struct RunDone {
    req: u64,
    outcome: Outcome,
    after: Position,
}

enum Outgoing {
    Msg(AgentMsg),
    /// Send a close frame with this reason and stop writing.
    Close(String),
}

pub fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(MAX_MESSAGE_BYTES + MESSAGE_SLACK))
        .max_frame_size(Some(MAX_MESSAGE_BYTES + MESSAGE_SLACK))
}

/// The WebSocket upgrade on [`WS_PATH`] (another path gets a 404), reading no more than
/// [`PRE_HELLO_BYTES`] until the caller lifts the budget.
pub(crate) async fn upgrade(
    stream: TcpStream,
    config: WebSocketConfig,
) -> Result<Ws, tokio_tungstenite::tungstenite::Error> {
    // The signature is tungstenite's callback type; the large error is its HTTP response.
    #[allow(clippy::result_large_err)]
    let check_path = |request: &Request, response: Response| -> Result<Response, ErrorResponse> {
        if request.uri().path() == WS_PATH {
            Ok(response)
        } else {
            let mut refusal =
                ErrorResponse::new(Some(format!("devloop agent: the endpoint is {WS_PATH}\n")));
            *refusal.status_mut() = StatusCode::NOT_FOUND;
            Err(refusal)
        }
    };
    let stream = Budgeted::new(stream, PRE_HELLO_BYTES);
    tokio_tungstenite::accept_hdr_async_with_config(stream, check_path, Some(config)).await
}

/// Serves one accepted TCP connection until it ends. Never panics on peer input. `place` is
/// the connection's place among those not authenticated yet, given back once the hello is
/// accepted.
pub async fn serve_connection(
    shared: Arc<Shared>,
    stream: TcpStream,
    peer: SocketAddr,
    conn_id: u64,
    place: OwnedSemaphorePermit,
) {
    let _ = stream.set_nodelay(true);
    let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    let mut ws = match timeout_at(deadline, upgrade(stream, ws_config())).await {
        Ok(Ok(ws)) => ws,
        Ok(Err(e)) => {
            tracing::warn!(conn_id, %peer, error = %e, "connection refused: websocket upgrade failed");
            return;
        }
        Err(_) => {
            tracing::warn!(conn_id, %peer, "connection refused: no websocket upgrade within {HANDSHAKE_TIMEOUT:?}");
            return;
        }
    };
    let hello = match timeout_at(deadline, read_hello(&mut ws)).await {
        Ok(Ok(hello)) => hello,
        Ok(Err(reason)) => return refuse(ws, peer, conn_id, reason).await,
        Err(_) => {
            return refuse(
                ws,
                peer,
                conn_id,
                format!("no hello within {HANDSHAKE_TIMEOUT:?}"),
            )
            .await
        }
    };
    if let Err(reason) = check_hello(&hello, &shared.token) {
        return refuse(ws, peer, conn_id, reason).await;
    }
    ws.get_mut().lift();
    drop(place);
    tracing::info!(conn_id, %peer, cli_version = %hello.cli_version, "cli connected");
    serve_session(shared, ws, peer, conn_id).await;
    tracing::info!(conn_id, %peer, "cli disconnected");
}

/// The handshake of a tunnelling mode's control connection (intercept, route): the upgrade
/// and the hello within one deadline, the token, and the capability the mode needs (refused
/// with `missing` otherwise). Returns the authenticated socket, its pre-hello budget lifted;
/// `None` when it was refused (the peer has been told why).
pub(crate) async fn control_handshake(
    tcp: TcpStream,
    peer: SocketAddr,
    conn_id: u64,
    token: &str,
    read_buffer: usize,
    capability: &str,
    missing: &str,
) -> Option<Ws> {
    let _ = tcp.set_nodelay(true);
    // One deadline for the upgrade and the hello together, as in dev mode.
    let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    let Ok(Ok(mut ws)) = timeout_at(
        deadline,
        upgrade(tcp, ws_config().read_buffer_size(read_buffer)),
    )
    .await
    else {
        tracing::warn!(conn_id, %peer, "control connection refused: no websocket upgrade");
        return None;
    };
    let hello = match timeout_at(deadline, read_hello(&mut ws)).await {
        Ok(Ok(h)) => h,
        Ok(Err(reason)) => {
            refuse(ws, peer, conn_id, reason).await;
            return None;
        }
        Err(_) => {
            refuse(ws, peer, conn_id, "no hello in time".into()).await;
            return None;
        }
    };
    if let Err(reason) = check_hello(&hello, token) {
        refuse(ws, peer, conn_id, reason).await;
        return None;
    }
    if !hello.capabilities.iter().any(|c| c == capability) {
        refuse(ws, peer, conn_id, missing.into()).await;
        return None;
    }
    ws.get_mut().lift();
    Some(ws)
}

/// Reads the first data message, which must be a hello.
pub(crate) async fn read_hello(ws: &mut Ws) -> Result<Hello, String> {
    loop {
        let message = match ws.next().await {
            None => return Err("connection closed before the hello".into()),
            Some(Err(e)) => return Err(format!("websocket error before the hello: {e}")),
            Some(Ok(message)) => message,
        };
        match message {
            Message::Binary(bytes) if bytes.len() > MAX_HELLO_BYTES => {
                return Err(format!(
                    "a hello of {} bytes: the limit is {MAX_HELLO_BYTES}",
                    bytes.len()
                ))
            }
            Message::Binary(bytes) => {
                return match decode::<LaptopMsg>(&bytes) {
                    Ok(LaptopMsg::Hello(hello)) => Ok(hello),
                    Ok(_) => Err("the first message must be a hello".into()),
                    Err(e) => Err(format!(
                        "undecodable hello ({e}): not a devloop client of this protocol"
                    )),
                };
            }
            Message::Text(_) => return Err("expected a binary hello, got a text message".into()),
            Message::Close(_) => return Err("connection closed before the hello".into()),
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
        }
    }
}

/// The handshake's checks; the error is the reason told to the peer and logged.
pub fn check_hello(hello: &Hello, token: &str) -> Result<(), String> {
    if hello.magic != MAGIC {
        return Err("bad magic: this is a devloop agent, and the peer is not a devloop cli".into());
    }
    if hello.protocol_version != PROTOCOL_VERSION {
        return Err(format!(
            "unsupported protocol version {}, this agent speaks {PROTOCOL_VERSION}: use a devloop cli and agent of the same release",
            hello.protocol_version
        ));
    }
    if hello.token.is_empty() {
        return Err("missing token".into());
    }
    if !tokens_match(hello.token.as_bytes(), token.as_bytes()) {
        return Err("wrong token".into());
    }
    Ok(())
}

/// Compares in time that depends only on the lengths, not on where the first difference is
/// (`subtle`'s `ConstantTimeEq`).
fn tokens_match(given: &[u8], expected: &[u8]) -> bool {
    given.ct_eq(expected).into()
}

fn close_frame(reason: &str) -> Message {
    let mut end = reason.len().min(MAX_CLOSE_REASON);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    Message::Close(Some(CloseFrame {
        code: CloseCode::Policy,
        reason: reason[..end].to_string().into(),
    }))
}

/// Tells the peer why, closes, and reads (and drops) whatever it still sends for a moment.
/// Nothing it sent is applied.
pub(crate) async fn refuse(mut ws: Ws, peer: SocketAddr, conn_id: u64, reason: String) {
    tracing::warn!(conn_id, %peer, %reason, "connection refused");
    let refused = Message::Binary(
        encode(&AgentMsg::Refused {
            reason: reason.clone(),
        })
        .into(),
    );
    let _ = timeout(CLOSE_LINGER, async {
        let _ = ws.send(refused).await;
        let _ = ws.send(close_frame(&reason)).await;
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
}

async fn serve_session(shared: Arc<Shared>, ws: Ws, peer: SocketAddr, conn_id: u64) {
    let (mut sink, mut stream) = ws.split();
    let (out_tx, mut out_rx) = mpsc::channel::<Outgoing>(OUTGOING_QUEUE);

    let subscription = shared.hub.subscribe();
    let welcome = Welcome {
        protocol_version: PROTOCOL_VERSION,
        agent_version: devloop_proxy::CRATE_VERSION.to_string(),
        capabilities: [caps::FILES, caps::TAR, caps::PROCESS]
            .map(String::from)
            .to_vec(),
        root: shared.root.path().display().to_string(),
        process: subscription.status,
        recent_logs: subscription.recent_logs,
    };
    let writer = tokio::spawn(async move {
        while let Some(outgoing) = out_rx.recv().await {
            let sent = match outgoing {
                Outgoing::Msg(msg) => sink.send(Message::Binary(encode(&msg).into())).await,
                Outgoing::Close(reason) => {
                    let _ = sink.send(close_frame(&reason)).await;
                    break;
                }
            };
            if let Err(e) = sent {
                tracing::debug!(conn_id, error = %e, "send failed");
                break;
            }
        }
    });
    let _ = out_tx.send(Outgoing::Msg(AgentMsg::Welcome(welcome))).await;
    let (run_done_tx, run_done_rx) = mpsc::channel::<RunDone>(OUTGOING_QUEUE);
    let forwarder = tokio::spawn(forward_events(
        subscription.event_rx,
        subscription.position,
        run_done_rx,
        out_tx.clone(),
        conn_id,
    ));

    let mut session = Session {
        shared,
        out_tx: out_tx.clone(),
        run_done_tx,
        tar: None,
        conn_id,
    };
    let mut close_reason = None;
    while let Some(message) = stream.next().await {
        let bytes = match message {
            Ok(Message::Binary(bytes)) => bytes,
            Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)) => continue,
            Ok(Message::Close(_)) => break,
            Ok(Message::Text(_)) => {
                close_reason =
                    Some("text messages are not part of the devloop protocol".to_string());
                break;
            }
            Err(e) => {
                tracing::warn!(conn_id, %peer, error = %e, "connection failed");
                break;
            }
        };
        match decode::<LaptopMsg>(&bytes) {
            Ok(msg) => {
                if let Err(reason) = session.handle(msg).await {
                    close_reason = Some(reason);
                    break;
                }
            }
            Err(e) => {
                tracing::warn!(conn_id, %peer, error = %e, "undecodable message, closing the connection");
                close_reason = Some(format!("undecodable message: {e}"));
                break;
            }
        }
    }
    forwarder.abort();
    if let Some(tar) = session.tar.take() {
        let req = tar.req;
        let outcome = tar.finish().await;
        tracing::warn!(
            conn_id,
            req,
            ?outcome,
            "connection ended inside a tar stream"
        );
    }
    if let Some(reason) = &close_reason {
        let _ = out_tx.send(Outgoing::Close(reason.clone())).await;
    }
    drop(out_tx);
    drop(session);
    // Runs still in progress hold a sender; do not wait for them.
    if timeout(CLOSE_LINGER, writer).await.is_err() {
        tracing::debug!(conn_id, "writer did not finish in time");
    }
    if close_reason.is_some() {
        let _ = timeout(CLOSE_LINGER, async {
            while let Some(Ok(_)) = stream.next().await {}
        })
        .await;
    }
}

/// Forwards the hub's events to one connection, and the acknowledgements of its runs after
/// their output. Events may be skipped when the cli reads too slowly (the broadcast keeps a
/// bounded backlog); acknowledgements never are: they come on the connection's own channel
/// (`run_done_rx`) and wait only until the events before them are sent or skipped.
async fn forward_events(
    mut event_rx: broadcast::Receiver<Event>,
    mut position: Position,
    mut run_done_rx: mpsc::Receiver<RunDone>,
    out_tx: mpsc::Sender<Outgoing>,
    conn_id: u64,
) {
    let mut waiting: Vec<RunDone> = Vec::new();
    let mut runs_open = true;
    loop {
        // Runs whose output has all been forwarded (or skipped) are acknowledged now.
        let mut i = 0;
        while i < waiting.len() {
            if waiting[i].after <= position {
                let done = waiting.swap_remove(i);
                let ack = AgentMsg::Ack {
                    req: done.req,
                    outcome: done.outcome,
                };
                if out_tx.send(Outgoing::Msg(ack)).await.is_err() {
                    return;
                }
            } else {
                i += 1;
            }
        }
        let msg = tokio::select! {
            done = run_done_rx.recv(), if runs_open => {
                match done {
                    Some(done) => waiting.push(done),
                    None => runs_open = false,
                }
                continue;
            }
            event = event_rx.recv() => match event {
                Ok(Event::Log(line)) => AgentMsg::Log(line),
                Ok(Event::Process(status)) => AgentMsg::Process(status),
                Err(broadcast::error::RecvError::Lagged(skipped)) => {
                    position += skipped;
                    tracing::warn!(
                        conn_id,
                        skipped,
                        "cli reads too slowly, skipped log lines and status events"
                    );
                    continue;
                }
                Err(broadcast::error::RecvError::Closed) => break,
            },
        };
        position += 1;
        if out_tx.send(Outgoing::Msg(msg)).await.is_err() {
            break;
        }
    }
}

struct Session {
    shared: Arc<Shared>,
    out_tx: mpsc::Sender<Outgoing>,
    /// Ends of runs, to the forwarder, which acknowledges them after their output.
    run_done_tx: mpsc::Sender<RunDone>,
    tar: Option<TarSession>,
    conn_id: u64,
}

impl Session {
    async fn send(&self, msg: AgentMsg) {
        let _ = self.out_tx.send(Outgoing::Msg(msg)).await;
    }

    async fn ack(&self, req: u64, outcome: Outcome) {
        self.send(AgentMsg::Ack { req, outcome }).await;
    }

    /// Handles one request; an error closes the connection with that reason.
    async fn handle(&mut self, msg: LaptopMsg) -> Result<(), String> {
        // Whatever came before in an open tar stream is applied before anything that follows.
        if !matches!(msg, LaptopMsg::TarChunk { .. }) {
            if let Some(tar) = self.tar.as_mut() {
                tar.settle().await;
            }
        }
        match msg {
            LaptopMsg::Hello(_) => return Err("hello sent twice".into()),
            // Dev mode announces no tunnel capability, so a peer must not send this.
            LaptopMsg::Tunnel(_) => return Err("tunnel frames are not served in dev mode".into()),
            LaptopMsg::Hold { .. } | LaptopMsg::ListHolders { .. } | LaptopMsg::Release { .. } => {
                return Err("routing requests are not served in dev mode".into())
            }
            LaptopMsg::Ping { nonce } => self.send(AgentMsg::Pong { nonce }).await,
            LaptopMsg::Index { req } => self.index(req).await,
            LaptopMsg::Batch { req, ops } => {
                let root = self.shared.root.clone();
                let count = ops.len();
                let outcome = tokio::task::spawn_blocking(move || apply_ops(&root, &ops))
                    .await
                    .unwrap_or_else(|e| Outcome::Failed {
                        error: format!("apply task failed: {e}"),
                    });
                if let Outcome::Failed { error } = &outcome {
                    tracing::warn!(conn_id = self.conn_id, req, %error, "batch failed");
                } else {
                    tracing::debug!(conn_id = self.conn_id, req, count, "batch applied");
                }
                self.ack(req, outcome).await;
            }
            LaptopMsg::TarChunk { req, data, last } => {
                if let Some(open) = self.tar.take_if(|open| open.req != req) {
                    let old = open.req;
                    let _ = open.finish().await;
                    let error = format!(
                        "tar stream {old} abandoned: stream {req} began before its last chunk"
                    );
                    tracing::warn!(conn_id = self.conn_id, %error);
                    self.ack(old, Outcome::Failed { error }).await;
                }
                let root = &self.shared.root;
                let session = self
                    .tar
                    .get_or_insert_with(|| TarSession::start(root.clone(), req));
                session.feed(data).await;
                if last {
                    if let Some(done) = self.tar.take() {
                        let outcome = done.finish().await;
                        if let Outcome::Failed { error } = &outcome {
                            tracing::warn!(conn_id = self.conn_id, req, %error, "tar stream failed");
                        }
                        self.ack(req, outcome).await;
                    }
                }
            }
            LaptopMsg::Restart { req } => {
                let outcome = match self.shared.supervisor.restart("requested by the cli").await {
                    Ok(_) => Outcome::Ok { applied: 0 },
                    Err(error) => Outcome::Failed { error },
                };
                self.ack(req, outcome).await;
            }
            LaptopMsg::Run { req, argv } => {
                // Runs may take minutes (a dependency install): they go on in the background
                // so pings and file operations keep flowing; the ack comes when it ends.
                let hub = self.shared.hub.clone();
                let workdir = self.shared.workdir.clone();
                let mirror = self.shared.mirror_output;
                let run_done_tx = self.run_done_tx.clone();
                tokio::spawn(async move {
                    let outcome = if argv.is_empty() {
                        Outcome::Failed {
                            error: "run: empty command".into(),
                        }
                    } else {
                        run_once(&argv, &workdir, &hub, mirror).await
                    };
                    // The output is all published: the acknowledgement follows it.
                    let after = hub.position();
                    let _ = run_done_tx
                        .send(RunDone {
                            req,
                            outcome,
                            after,
                        })
                        .await;
                });
            }
        }
        Ok(())
    }

    /// Streams the index: the walk hands over parts as it fills them, so the agent never
    /// holds a large tree whole (the last part is held back until the walk ends, to mark it).
    async fn index(&self, req: u64) {
        let root = self.shared.root.path().to_path_buf();
        let (part_tx, mut part_rx) =
            mpsc::channel::<Vec<(devloop_proxy::RelPath, devloop_proxy::tree::Entry)>>(1);
        let walker = tokio::task::spawn_blocking(move || {
            let mut builder = index::PartBuilder::new(INDEX_PART_ENTRIES, INDEX_PART_BYTES);
            index::walk_with(&root, |entry| match builder.push(entry) {
                Some(part) => part_tx.blocking_send(part).is_ok(),
                None => true,
            })?;
            let last = builder.finish();
            if !last.is_empty() {
                let _ = part_tx.blocking_send(last);
            }
            Ok::<(), std::io::Error>(())
        });
        let mut held = None;
        while let Some(part) = part_rx.recv().await {
            if let Some(previous) = held.replace(part) {
                self.send(AgentMsg::Index {
                    req,
                    entries: previous,
                    last: false,
                })
                .await;
            }
        }
        match walker.await {
            Ok(Ok(())) => {
                self.send(AgentMsg::Index {
                    req,
                    entries: held.unwrap_or_default(),
                    last: true,
                })
                .await;
            }
            Ok(Err(e)) => {
                let error = format!("index of {}: {e}", self.shared.root.path().display());
                self.ack(req, Outcome::Failed { error }).await;
            }
            Err(e) => {
                self.ack(
                    req,
                    Outcome::Failed {
                        error: format!("index task failed: {e}"),
                    },
                )
                .await
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(token: &str) -> Hello {
        Hello {
            magic: MAGIC,
            protocol_version: PROTOCOL_VERSION,
            cli_version: "test".into(),
            capabilities: vec![],
            token: token.into(),
        }
    }

    #[test]
    fn hello_checks_name_the_reason() {
        assert!(check_hello(&hello("secret"), "secret").is_ok());
        assert_eq!(
            check_hello(&hello("secreT"), "secret").unwrap_err(),
            "wrong token"
        );
        assert_eq!(
            check_hello(&hello("secret2"), "secret").unwrap_err(),
            "wrong token"
        );
        assert_eq!(
            check_hello(&hello(""), "secret").unwrap_err(),
            "missing token"
        );
        let mut h = hello("secret");
        h.magic = *b"HTTP/1.1";
        assert!(check_hello(&h, "secret")
            .unwrap_err()
            .starts_with("bad magic"));
        let mut h = hello("secret");
        h.protocol_version = 9;
        assert!(check_hello(&h, "secret")
            .unwrap_err()
            .starts_with("unsupported protocol version 9, this agent speaks 1"));
    }

    #[test]
    fn close_reason_is_cut_on_a_char_boundary() {
        let long = "é".repeat(100);
        match close_frame(&long) {
            Message::Close(Some(frame)) => assert!(frame.reason.len() <= MAX_CLOSE_REASON),
            other => panic!("{other:?}"),
        }
    }
}
