//! The per-request engine: serves one accepted connection of an intercepted service.
//!
//! ```text
//! accept -> detect (HTTP/1 | h2c | other)
//!        -> per request: Table::route -> the original, or the holder that takes it
//!        -> one event per request (Event), for the request line and later consumers
//! ```
//!
//! HTTP/1.1 and HTTP/2 are served by hyper, and forwarded with hyper's client over a
//! connection of the same version to the chosen destination. Each caller connection keeps its
//! own upstream connection per destination, so a keep-alive connection to a destination
//! never carries requests of two routes, and HTTP/1 requests stay in order. Bodies and
//! trailers stream through as frames (nothing is buffered whole), so gRPC's trailers and
//! streaming calls pass as they are. An upgrade (WebSocket) goes where its request goes,
//! and the rest of the connection is copied as bytes both ways. A connection that is not
//! HTTP goes to the original as bytes.

use std::collections::HashMap;
use std::convert::Infallible;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use devloop_proxy::route::RequestHead;
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::client::conn::{http1 as client1, http2 as client2};
use hyper::server::conn::{http1 as server1, http2 as server2};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::{broadcast, watch, Mutex};

use super::detect::{detect, Protocol};
use super::mirror::{self, CopyBody, Tee};
use super::table::{Dialer, Holder, Table};

/// How long a connection may stay silent before its first request (nginx's
/// `client_header_timeout` default).
pub const FIRST_REQUEST_IDLE: Duration = Duration::from_secs(60);

/// Events kept for a slow consumer before it starts missing some (it is told how many).
pub const EVENT_BUFFER: usize = 4096;

/// What a caller may cost the engine before its request reaches anyone.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Silence allowed before a connection's first bytes.
    pub first_request_idle: Duration,
    /// Time to send a whole HTTP/1 request head (a slow-loris caller is cut off at this).
    pub header_read: Duration,
    /// Fields in one HTTP/1 request head (more is answered 431).
    pub max_headers: usize,
    /// Bytes of one HTTP/1 request head buffered at most (more is answered 431).
    pub max_head_bytes: usize,
    /// Bytes of header fields in one HTTP/2 request (more resets the stream).
    pub max_h2_header_list: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            first_request_idle: FIRST_REQUEST_IDLE,
            // nginx's client_header_timeout is 60 s; hyper's default 30 s.
            header_read: Duration::from_secs(30),
            max_headers: 100,
            max_head_bytes: 64 * 1024,
            max_h2_header_list: 64 * 1024,
        }
    }
}

/// What a caller gets back: the destination's answer, or the engine's own (a 502).
type Body = Counted<Either<Incoming, Full<Bytes>>>;

/// What goes to a destination: the caller's body, or a mirror's copy of it, counted.
type UpBody = Either<Counted<Incoming>, Counted<CopyBody>>;

/// What the engine reports: one event per request, and notices.
#[derive(Debug, Clone)]
pub enum Event {
    Request(RequestEvent),
    /// The first connection of a filtered port that was not HTTP (it went to the original).
    NotHttp {
        peer: String,
    },
}

/// One request, once its answer ended (or it failed).
#[derive(Debug, Clone)]
pub struct RequestEvent {
    /// The holder that took it; `None`: the original.
    pub holder: Option<u64>,
    pub method: String,
    pub path: String,
    /// The answer's status; 502 when the destination could not be reached.
    pub status: u16,
    /// From the request's head to the answer's head.
    pub elapsed: Duration,
    /// From the request's head to the end of the answer (for an upgrade: to the 101).
    pub total: Duration,
    /// Body bytes of the request and of the answer.
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// `Some` when the destination failed: what happened.
    pub error: Option<String>,
    /// A mirror's copy (its answer went nowhere).
    pub copy: bool,
}

/// The engine of one service: its routing table and its event stream.
pub struct Engine {
    table: Arc<Table>,
    limits: Limits,
    events: broadcast::Sender<Event>,
    told_not_http: AtomicBool,
    /// Set once by [`Engine::drain`]: connections finish what is under way and close.
    draining: watch::Sender<bool>,
    /// Caller connections (and upgraded ones) still open.
    live: watch::Sender<usize>,
}

/// Resolves once the engine drains.
async fn until_draining(draining: &mut watch::Receiver<bool>) {
    let _ = draining.wait_for(|d| *d).await;
}

/// One open caller connection, counted while it lives.
struct Live(Arc<Engine>);

impl Live {
    fn new(engine: &Arc<Engine>) -> Live {
        engine.live.send_modify(|n| *n += 1);
        Live(engine.clone())
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        self.0.live.send_modify(|n| *n = n.saturating_sub(1));
    }
}

impl Engine {
    pub fn new(table: Arc<Table>) -> Arc<Self> {
        Self::with_limits(table, Limits::default())
    }

    pub fn with_limits(table: Arc<Table>, limits: Limits) -> Arc<Self> {
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        Arc::new(Engine {
            table,
            limits,
            events,
            told_not_http: AtomicBool::new(false),
            draining: watch::Sender::new(false),
            live: watch::Sender::new(0),
        })
    }

    /// Ends every connection gracefully: HTTP/1 ones close once their request under way is
    /// answered (idle ones at once), HTTP/2 ones get a GOAWAY and finish their streams, and
    /// connections accepted from now on serve one request. Returns at once; [`Engine::idle`]
    /// tells when they are gone.
    pub fn drain(&self) {
        self.draining.send_replace(true);
    }

    /// Resolves when no caller connection is open.
    pub async fn idle(&self) {
        let mut live = self.live.subscribe();
        let _ = live.wait_for(|n| *n == 0).await;
    }

    /// Caller connections open now.
    pub fn open_connections(&self) -> usize {
        *self.live.borrow()
    }

    pub fn table(&self) -> &Arc<Table> {
        &self.table
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    fn emit(&self, event: Event) {
        // No receiver is not an error: nobody is looking.
        let _ = self.events.send(event);
    }

    /// Serves one caller connection until it closes.
    pub async fn serve<S>(self: Arc<Self>, mut stream: S, peer: String)
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let live = Live::new(&self);
        let limits = self.limits;
        let (protocol, first) = match detect(&mut stream, limits.first_request_idle).await {
            Ok(found) => found,
            Err(e) => {
                tracing::debug!(%peer, "connection ended before a request: {e}");
                return;
            }
        };
        let io = Replay::new(first, stream);
        let mut draining = self.draining.subscribe();
        // A connection that comes while draining serves its one request and closes.
        let drained_already = *draining.borrow_and_update();
        let conn = Arc::new(Conn {
            engine: self.clone(),
            upstream: Mutex::new(HashMap::new()),
        });
        match protocol {
            Protocol::Http1 => {
                let svc = service_fn(move |req| {
                    let conn = conn.clone();
                    async move { Ok::<_, Infallible>(conn.forward(req, Version::Http1).await) }
                });
                let served = server1::Builder::new()
                    .preserve_header_case(true)
                    .timer(TokioTimer::new())
                    .header_read_timeout(limits.header_read)
                    .max_headers(limits.max_headers)
                    .max_buf_size(limits.max_head_bytes.max(8192))
                    .keep_alive(!drained_already)
                    .serve_connection(TokioIo::new(io), svc)
                    .with_upgrades();
                tokio::pin!(served);
                let served = tokio::select! {
                    r = served.as_mut() => r,
                    _ = until_draining(&mut draining), if !drained_already => {
                        served.as_mut().graceful_shutdown();
                        served.await
                    }
                };
                if let Err(e) = served {
                    tracing::debug!(%peer, "HTTP/1 connection: {e}");
                }
            }
            Protocol::Http2 => {
                let svc = service_fn(move |req| {
                    let conn = conn.clone();
                    async move { Ok::<_, Infallible>(conn.forward(req, Version::Http2).await) }
                });
                let served = server2::Builder::new(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    .max_header_list_size(limits.max_h2_header_list)
                    .serve_connection(TokioIo::new(io), svc);
                tokio::pin!(served);
                let served = tokio::select! {
                    r = served.as_mut() => r,
                    _ = until_draining(&mut draining) => {
                        served.as_mut().graceful_shutdown();
                        served.await
                    }
                };
                if let Err(e) = served {
                    tracing::debug!(%peer, "HTTP/2 connection: {e}");
                }
            }
            Protocol::Other => {
                if !self.told_not_http.swap(true, Ordering::Relaxed) {
                    tracing::warn!(%peer, "a connection that is not HTTP goes to the original as bytes (said once)");
                    self.emit(Event::NotHttp { peer: peer.clone() });
                }
                self.relay_bytes(io, &peer).await;
            }
        }
        drop(live);
    }

    /// A connection that is not HTTP: to the original, as bytes.
    async fn relay_bytes<S: AsyncRead + AsyncWrite + Unpin>(&self, mut io: S, peer: &str) {
        let mut upstream = match self.table.original().dial().await {
            Ok(up) => up,
            Err(e) => {
                tracing::warn!(%peer, "the original did not answer: {e}");
                return;
            }
        };
        let _ = tokio::io::copy_bidirectional(&mut io, &mut upstream).await;
        let _ = upstream.shutdown().await;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Version {
    Http1,
    Http2,
}

/// Where one request is sent: the original (`None`) or a holder's id.
type Dest = Option<u64>;

enum Upstream {
    Http1(client1::SendRequest<UpBody>),
    Http2(client2::SendRequest<UpBody>),
}

/// One caller connection's state: its upstream connections, one per destination.
struct Conn {
    engine: Arc<Engine>,
    upstream: Mutex<HashMap<Dest, Upstream>>,
}

/// A request's head as the filters see it.
struct Head<'a>(&'a Request<Incoming>);

impl RequestHead for Head<'_> {
    fn method(&self) -> &str {
        self.0.method().as_str()
    }

    fn path(&self) -> &str {
        self.0.uri().path()
    }

    fn header_values<'a>(&'a self, name: &str) -> Box<dyn Iterator<Item = &'a [u8]> + 'a> {
        Box::new(
            self.0
                .headers()
                .get_all(name)
                .into_iter()
                .map(|v| v.as_bytes()),
        )
    }
}

impl Conn {
    async fn forward(
        self: &Arc<Self>,
        mut req: Request<Incoming>,
        version: Version,
    ) -> Response<Body> {
        let started = Instant::now();
        let decision = self.engine.table.route(&Head(&req));
        let holder: Option<Arc<Holder>> = decision.taker;
        let dest = holder.as_ref().map(|h| h.id);
        if let Some(h) = &holder {
            h.counts.requests.fetch_add(1, Ordering::Relaxed);
        }
        let dialer: Arc<dyn Dialer> = match &holder {
            Some(h) => h.dialer.clone(),
            None => self.engine.table.original().clone(),
        };
        let upgrade = (version == Version::Http1
            && req.headers().contains_key(hyper::header::UPGRADE))
        .then(|| hyper::upgrade::on(&mut req));
        let tally = Tally::new(&self.engine, started, dest, &req, false);
        // Copies for mirrors (never of an upgrade: its rest is not HTTP).
        let mut tees = Vec::new();
        if upgrade.is_none() {
            for m in &decision.mirrors {
                if let Some(tee) = self.copy_for(m, &req, version) {
                    tees.push(tee);
                }
            }
        }
        let req = req.map(|b| Either::Left(Counted::new(b, tally.clone(), Way::In).with(tees)));
        let answer = self.send(dest, &*dialer, req, version).await;
        let (response, error) = match answer {
            Ok(mut resp) => {
                if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
                    if let Some(down) = upgrade {
                        let up = hyper::upgrade::on(&mut resp);
                        let live = Live::new(&self.engine);
                        tokio::spawn(async move {
                            let _live = live;
                            if let (Ok(down), Ok(up)) = (down.await, up.await) {
                                let mut down = TokioIo::new(down);
                                let mut up = TokioIo::new(up);
                                let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                            }
                        });
                    }
                }
                (resp.map(Either::Left), None)
            }
            Err(e) => {
                let text = format!("devloop: {} did not answer: {e}\n", dialer.name());
                let resp = Response::builder()
                    .status(StatusCode::BAD_GATEWAY)
                    .header(hyper::header::CONTENT_TYPE, "text/plain; charset=utf-8")
                    .body(Either::Right(Full::new(Bytes::from(text))))
                    .unwrap_or_else(|_| Response::new(Either::Right(Full::default())));
                (resp, Some(e.to_string()))
            }
        };
        tally.answered(response.status().as_u16(), error);
        // The event leaves once both bodies are done with (the tally's last holder drops).
        response.map(|b| Counted::new(b, tally, Way::Out))
    }

    /// Starts a copy of `req` for the mirror `m`, unless it has too many under way; returns
    /// the caller's end, to be fed the caller's body.
    fn copy_for(
        self: &Arc<Self>,
        m: &Arc<Holder>,
        req: &Request<Incoming>,
        version: Version,
    ) -> Option<Tee> {
        let counts = &m.counts;
        if counts.in_flight.fetch_add(1, Ordering::Relaxed) >= mirror::MAX_IN_FLIGHT {
            counts.in_flight.fetch_sub(1, Ordering::Relaxed);
            counts.dropped.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        counts.requests.fetch_add(1, Ordering::Relaxed);
        let (tee, body) = mirror::copy(counts.clone());
        let mut copy = Request::new(());
        *copy.method_mut() = req.method().clone();
        *copy.uri_mut() = req.uri().clone();
        *copy.version_mut() = req.version();
        *copy.headers_mut() = req.headers().clone();
        let (conn, m) = (self.clone(), m.clone());
        tokio::spawn(async move {
            conn.send_copy(&m, copy, body, version).await;
            m.counts.in_flight.fetch_sub(1, Ordering::Relaxed);
        });
        Some(tee)
    }

    /// Sends one copy to its mirror and throws the answer away.
    async fn send_copy(&self, m: &Holder, head: Request<()>, body: CopyBody, version: Version) {
        use http_body_util::BodyExt;
        let tally = Tally::new(&self.engine, Instant::now(), Some(m.id), &head, true);
        let broken = body.broken();
        let req = head.map(|()| Either::Right(Counted::new(body, tally.clone(), Way::In)));
        let (status, error) = match self.send(Some(m.id), &*m.dialer, req, version).await {
            Ok(resp) => {
                let status = resp.status().as_u16();
                let drained = Counted::new(resp.into_body(), tally.clone(), Way::Out)
                    .collect()
                    .await;
                (status, drained.err().map(|e| e.to_string()))
            }
            Err(e) => {
                mirror::mark_dropped(&broken, &m.counts);
                (StatusCode::BAD_GATEWAY.as_u16(), Some(e.to_string()))
            }
        };
        tally.answered(status, error);
    }

    /// Sends `req` to `dest` over this connection's upstream connection to it, opening one
    /// (or a new one, when the last has closed) as needed.
    async fn send(
        &self,
        dest: Dest,
        dialer: &dyn Dialer,
        req: Request<UpBody>,
        version: Version,
    ) -> io::Result<Response<Incoming>> {
        let taken = self.upstream.lock().await.remove(&dest);
        let mut upstream = match taken {
            Some(Upstream::Http1(mut s)) if version == Version::Http1 => match s.ready().await {
                Ok(()) => Upstream::Http1(s),
                Err(_) => connect(dialer, version).await?,
            },
            Some(Upstream::Http2(mut s)) if version == Version::Http2 => match s.ready().await {
                Ok(()) => Upstream::Http2(s),
                Err(_) => connect(dialer, version).await?,
            },
            _ => connect(dialer, version).await?,
        };
        let upgrading = req.headers().contains_key(hyper::header::UPGRADE);
        let sent = match &mut upstream {
            Upstream::Http1(s) => s.send_request(req).await,
            Upstream::Http2(s) => {
                // HTTP/2 multiplexes: the connection serves other requests meanwhile.
                let mut s2 = s.clone();
                self.upstream
                    .lock()
                    .await
                    .insert(dest, Upstream::Http2(s.clone()));
                return s2
                    .send_request(req)
                    .await
                    .map_err(|e| io::Error::other(e.to_string()));
            }
        };
        let resp = sent.map_err(|e| io::Error::other(e.to_string()))?;
        // An upgraded connection carries no more requests.
        if !(upgrading && resp.status() == StatusCode::SWITCHING_PROTOCOLS) {
            self.upstream.lock().await.insert(dest, upstream);
        }
        Ok(resp)
    }
}

async fn connect(dialer: &dyn Dialer, version: Version) -> io::Result<Upstream> {
    let io = TokioIo::new(dialer.dial().await?);
    match version {
        Version::Http1 => {
            let (sender, conn) = client1::Builder::new()
                .preserve_header_case(true)
                .handshake::<_, UpBody>(io)
                .await
                .map_err(|e| io::Error::other(e.to_string()))?;
            tokio::spawn(async move {
                let _ = conn.with_upgrades().await;
            });
            Ok(Upstream::Http1(sender))
        }
        Version::Http2 => {
            let (sender, conn) = client2::Builder::new(TokioExecutor::new())
                .handshake::<_, UpBody>(io)
                .await
                .map_err(|e| io::Error::other(e.to_string()))?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            Ok(Upstream::Http2(sender))
        }
    }
}

/// One request's tally: what it was, its answer, and the bytes of both bodies. Its event
/// leaves when both bodies are done (the last `Arc` drops), if an answer was recorded.
struct Tally {
    engine: Arc<Engine>,
    started: Instant,
    holder: Option<u64>,
    method: String,
    path: String,
    copy: bool,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    answer: std::sync::Mutex<Option<Answer>>,
}

/// The answer's head (or the failure), when it came.
struct Answer {
    status: u16,
    elapsed: Duration,
    error: Option<String>,
}

impl Tally {
    fn new<B>(
        engine: &Arc<Engine>,
        started: Instant,
        holder: Option<u64>,
        req: &Request<B>,
        copy: bool,
    ) -> Arc<Self> {
        Arc::new(Tally {
            engine: engine.clone(),
            started,
            holder,
            method: req.method().to_string(),
            path: req.uri().path().to_string(),
            copy,
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            answer: std::sync::Mutex::new(None),
        })
    }

    /// The answer's head came back with `status`, or the destination failed with `error`.
    fn answered(&self, status: u16, error: Option<String>) {
        *self.answer.lock().unwrap_or_else(|e| e.into_inner()) = Some(Answer {
            status,
            elapsed: self.started.elapsed(),
            error,
        });
    }
}

impl Drop for Tally {
    fn drop(&mut self) {
        let answer = self
            .answer
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(a) = answer {
            self.engine.emit(Event::Request(RequestEvent {
                holder: self.holder,
                method: std::mem::take(&mut self.method),
                path: std::mem::take(&mut self.path),
                status: a.status,
                elapsed: a.elapsed,
                total: self.started.elapsed(),
                bytes_in: *self.bytes_in.get_mut(),
                bytes_out: *self.bytes_out.get_mut(),
                error: a.error,
                copy: self.copy,
            }));
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Way {
    In,
    Out,
}

/// A body passed through frame by frame (trailers included), its data bytes counted.
pub struct Counted<B> {
    inner: B,
    tally: Arc<Tally>,
    way: Way,
    /// Mirrors' copies, offered every frame.
    tees: Vec<Tee>,
}

impl<B: hyper::body::Body> Counted<B> {
    fn new(inner: B, tally: Arc<Tally>, way: Way) -> Self {
        Counted {
            inner,
            tally,
            way,
            tees: Vec::new(),
        }
    }

    fn with(mut self, mut tees: Vec<Tee>) -> Self {
        // A body that is empty may never be polled: its copies end now.
        if self.inner.is_end_stream() {
            tees.iter_mut().for_each(Tee::finish);
        }
        self.tees = tees;
        self
    }
}

impl<B> hyper::body::Body for Counted<B>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let n = data.len() as u64;
                    match self.way {
                        Way::In => self.tally.bytes_in.fetch_add(n, Ordering::Relaxed),
                        Way::Out => self.tally.bytes_out.fetch_add(n, Ordering::Relaxed),
                    };
                }
                if !self.tees.is_empty() {
                    let end = self.inner.is_end_stream();
                    for tee in self.tees.iter_mut() {
                        tee.offer(frame);
                        if end {
                            tee.finish();
                        }
                    }
                }
            }
            Poll::Ready(None) => self.tees.iter_mut().for_each(Tee::finish),
            Poll::Ready(Some(Err(_))) => self.tees.iter_mut().for_each(Tee::drop_copy),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// A stream with bytes already read from it (by [`detect`]) put back in front.
pub struct Replay<S> {
    first: Vec<u8>,
    at: usize,
    inner: S,
}

impl<S> Replay<S> {
    pub fn new(first: Vec<u8>, inner: S) -> Self {
        Replay {
            first,
            at: 0,
            inner,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Replay<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.at < self.first.len() {
            let n = (self.first.len() - self.at).min(buf.remaining());
            let at = self.at;
            buf.put_slice(&self.first[at..at + n]);
            self.at += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Replay<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
