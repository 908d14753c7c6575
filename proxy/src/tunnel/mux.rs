//! One side's multiplexer of tunnel streams.
//!
//! Data paths, and why nothing waits on a slow stream:
//!
//! - **Incoming frames** go through [`Mux::handle`], a plain function that never waits: `Data`
//!   is appended to the stream's buffer (bounded by the credit this side granted, so at most
//!   the stream's window: [`INITIAL_WINDOW`], grown up to [`MAX_STREAM_WINDOW`] only while
//!   its reader drains the buffer), and the stream's reader is woken.
//! - **Outgoing `Open`, `Data` and `End`** are written by the stream itself straight into the
//!   bounded channel of outgoing frames, each after waiting for a slot. Tokio's channel hands
//!   out slots first come, first served, so a bulk transfer (one [`MAX_DATA_FRAME`] at a time)
//!   cannot starve a small interactive frame. A write never waits for a timer: each write
//!   becomes a frame at once.
//! - **Outgoing `Window` and `Reset`** come from places that must not wait (a read, `Drop`,
//!   [`Mux::handle`]), so they go into an unbounded queue that a task forwards into the
//!   bounded channel. Its length is bounded in practice: one `Window` per half window consumed,
//!   one `Reset` per stream, and `Reset`s for frames naming unknown streams are capped at
//!   [`MAX_PENDING_CONTROL`] (beyond that the peer is flooding and the tunnel shuts down).

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{ready, Context, Poll, Waker};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;

use super::frame::{
    cut_reason, Side, TunnelFrame, CONNECTION_LOST, INITIAL_WINDOW, MAX_DATA_FRAME,
    MAX_STREAM_WINDOW, MAX_WINDOW,
};

/// Streams the peer opened and the application has not accepted yet. Beyond this, a new
/// stream is reset at once.
const ACCEPT_BACKLOG: usize = 1024;

/// Control frames (`Window`, `Reset`) waiting for the connection's writer. Only a peer that
/// keeps sending frames for unknown streams faster than the connection carries the answers
/// can reach it; the tunnel then shuts down.
const MAX_PENDING_CONTROL: usize = 64 * 1024;

type ReserveFuture = Pin<
    Box<
        dyn Future<Output = Result<mpsc::OwnedPermit<TunnelFrame>, mpsc::error::SendError<()>>>
            + Send,
    >,
>;

/// The multiplexer of one side of a tunnel connection. Cheap to clone: clones share the
/// streams. The connection's owner feeds it every received frame with [`Mux::handle`], drains
/// the channel given to [`Mux::new`] into the connection, and calls [`Mux::shutdown`] with
/// [`CONNECTION_LOST`] when the connection ends.
#[derive(Clone)]
pub struct Mux {
    shared: Arc<Shared>,
}

/// Streams the peer opened, in the order it opened them. Ends after [`Mux::shutdown`].
pub struct Incoming {
    rx: mpsc::Receiver<(u16, MuxStream)>,
}

/// One tunnel stream: a byte stream in both directions with TCP-like semantics.
///
/// - A write becomes one `Data` frame of at most [`MAX_DATA_FRAME`] bytes at once (no
///   batching delay); it waits while the stream has no credit or the outgoing channel is full.
///   Flushing does nothing: written bytes are already on their way.
/// - `shutdown` sends `End` (half-close): writes fail afterwards, reads go on.
/// - Reads return end-of-file after the peer's `End` and the data before it.
/// - A reset (by either side, or the connection lost) fails reads and writes with an
///   [`io::Error`] whose message is the reason: kind `ConnectionReset` when the peer reset it,
///   `ConnectionAborted` when this side did.
/// - Dropping the stream before both sides sent `End` resets it (the peer sees the reason);
///   [`MuxStream::reset`] resets it with a reason of the caller's.
pub struct MuxStream {
    id: u64,
    port: u16,
    state: Arc<Mutex<StreamState>>,
    shared: Arc<Shared>,
    reserve: Option<ReserveFuture>,
}

struct Shared {
    side: Side,
    out: mpsc::Sender<TunnelFrame>,
    control_tx: mpsc::UnboundedSender<TunnelFrame>,
    control_pending: Arc<AtomicUsize>,
    inner: Mutex<Inner>,
}

struct Inner {
    /// Streams that have not ended, by id.
    streams: HashMap<u64, Arc<Mutex<StreamState>>>,
    /// The id this side opens next.
    next_id: u64,
    /// The largest id the peer has opened (0: none yet).
    highest_peer_id: u64,
    /// Set by [`Mux::shutdown`]: the reason.
    closed: Option<String>,
    incoming_tx: Option<mpsc::Sender<(u16, MuxStream)>>,
}

struct StreamState {
    id: u64,
    port: u16,
    /// "laptop->agent" for a stream the laptop opened, "agent->laptop" otherwise.
    direction: &'static str,
    /// Received data not read yet, in order; `front_read` bytes of the first chunk are read.
    recv_buf: VecDeque<Vec<u8>>,
    front_read: usize,
    buffered: usize,
    /// How many more bytes the peer may send (the credit it holds, as this side counts it).
    recv_credit: u64,
    /// Bytes the application read that have not been granted back yet.
    unacked: u64,
    /// How much the peer may have in flight: [`INITIAL_WINDOW`], doubled (up to
    /// [`MAX_STREAM_WINDOW`]) each time a grant finds the reader has drained the buffer, i.e.
    /// the window, not the reader, is what holds the stream back (a long round trip, as
    /// through a Kubernetes port-forward).
    window: u64,
    recv_end: bool,
    read_waker: Option<Waker>,
    send_credit: u64,
    send_end: bool,
    write_waker: Option<Waker>,
    /// Why the stream was reset, and whether the peer did it.
    reset: Option<(io::ErrorKind, String)>,
    /// The stream ended (closed or reset) and left the stream table.
    finished: bool,
    bytes_sent: u64,
    bytes_received: u64,
}

impl StreamState {
    fn new(id: u64, port: u16, opener: Side) -> Self {
        StreamState {
            id,
            port,
            direction: match opener {
                Side::Laptop => "laptop->agent",
                Side::Agent => "agent->laptop",
            },
            recv_buf: VecDeque::new(),
            front_read: 0,
            buffered: 0,
            recv_credit: u64::from(INITIAL_WINDOW),
            unacked: 0,
            window: u64::from(INITIAL_WINDOW),
            recv_end: false,
            read_waker: None,
            send_credit: u64::from(INITIAL_WINDOW),
            send_end: false,
            write_waker: None,
            reset: None,
            finished: false,
            bytes_sent: 0,
            bytes_received: 0,
        }
    }

    fn error(&self) -> Option<io::Error> {
        self.reset
            .as_ref()
            .map(|(kind, reason)| io::Error::new(*kind, reason.clone()))
    }

    fn wake(&mut self) {
        if let Some(w) = self.read_waker.take() {
            w.wake();
        }
        if let Some(w) = self.write_waker.take() {
            w.wake();
        }
    }
}

/// How a stream ended.
enum Ending {
    /// Both sides sent `End`.
    Closed,
    /// The peer sent `Reset`.
    ResetByPeer(String),
    /// This side reset it; `send` says whether the peer is told (not when the connection is
    /// gone).
    ResetHere { reason: String, send: bool },
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain data behind (no invariant spans
    // an unlock), so a poisoned lock is still usable.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn lost(reason: &str) -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionAborted, reason.to_string())
}

/// What a frame's stream id refers to.
enum Lookup {
    Live(Arc<Mutex<StreamState>>),
    /// A stream that existed and has ended: late frames are ignored.
    Ended,
    /// An id no one has opened: a protocol violation.
    NeverOpened,
    /// The tunnel is shut down.
    ShutDown,
}

impl Shared {
    fn lookup(&self, id: u64) -> Lookup {
        let inner = lock(&self.inner);
        if inner.closed.is_some() {
            return Lookup::ShutDown;
        }
        if let Some(st) = inner.streams.get(&id) {
            return Lookup::Live(st.clone());
        }
        if self.side.opens(id) {
            if id < inner.next_id {
                return Lookup::Ended;
            }
        } else if self.side.peer().opens(id) && id <= inner.highest_peer_id {
            return Lookup::Ended;
        }
        Lookup::NeverOpened
    }

    /// Queues a `Window` or `Reset` for the connection's writer without waiting.
    fn queue_control(&self, frame: TunnelFrame) {
        self.control_pending.fetch_add(1, Ordering::Relaxed);
        // An error means the forwarder is gone because the outgoing channel closed: the
        // connection is over and nothing can reach the peer anyway.
        let _ = self.control_tx.send(frame);
    }

    /// Ends a stream once: records how, wakes its reader and writer, removes it from the
    /// stream table, tells the peer if needed, and logs the end.
    fn end_stream(&self, state: &Arc<Mutex<StreamState>>, ending: Ending) {
        let (id, port, direction, sent, received, buffered) = {
            let mut st = lock(state);
            if st.finished {
                return;
            }
            st.finished = true;
            match &ending {
                Ending::Closed => {}
                Ending::ResetByPeer(reason) => {
                    st.reset = Some((io::ErrorKind::ConnectionReset, reason.clone()));
                }
                Ending::ResetHere { reason, .. } => {
                    st.reset = Some((io::ErrorKind::ConnectionAborted, reason.clone()));
                }
            }
            let buffered = st.buffered;
            if st.reset.is_some() {
                st.recv_buf.clear();
                st.buffered = 0;
            }
            st.wake();
            (
                st.id,
                st.port,
                st.direction,
                st.bytes_sent,
                st.bytes_received,
                buffered,
            )
        };
        lock(&self.inner).streams.remove(&id);
        let side = self.side;
        match ending {
            Ending::Closed => tracing::debug!(
                %side, stream_id = id, port, direction, end = "closed", bytes_sent = sent,
                bytes_received = received, "tunnel stream ended"
            ),
            Ending::ResetByPeer(reason) => tracing::info!(
                %side, stream_id = id, port, direction, end = "reset by peer", %reason,
                bytes_sent = sent, bytes_received = received, discarded = buffered,
                "tunnel stream ended"
            ),
            Ending::ResetHere { reason, send } => {
                if send {
                    self.queue_control(TunnelFrame::reset(id, &reason));
                    tracing::info!(
                        %side, stream_id = id, port, direction, end = "reset here", %reason,
                        bytes_sent = sent, bytes_received = received, discarded = buffered,
                        "tunnel stream ended"
                    );
                } else {
                    tracing::debug!(
                        %side, stream_id = id, port, direction, end = "connection lost",
                        %reason, bytes_sent = sent, bytes_received = received,
                        "tunnel stream ended"
                    );
                }
            }
        }
    }

    /// The peer broke the protocol on a live stream: reset it on both ends.
    fn violation(&self, state: &Arc<Mutex<StreamState>>, what: String) {
        let reason = format!("protocol violation: {what}");
        let id = lock(state).id;
        tracing::warn!(side = %self.side, peer = %self.side.peer(), stream_id = id, %reason, "tunnel protocol violation");
        self.end_stream(state, Ending::ResetHere { reason, send: true });
    }

    /// The peer broke the protocol on a stream id that has no state here: answer with a
    /// `Reset`, unless the peer floods us with them.
    fn violation_without_stream(&self, id: u64, what: String) {
        let reason = format!("protocol violation: {what}");
        tracing::warn!(side = %self.side, peer = %self.side.peer(), stream_id = id, %reason, "tunnel protocol violation");
        if self.control_pending.load(Ordering::Relaxed) >= MAX_PENDING_CONTROL {
            self.shutdown(&format!(
                "protocol violation: the {} keeps sending frames for unknown streams",
                self.side.peer()
            ));
            return;
        }
        self.queue_control(TunnelFrame::reset(id, &reason));
    }

    fn shutdown(&self, reason: &str) {
        let (streams, incoming_tx): (Vec<_>, _) = {
            let mut inner = lock(&self.inner);
            if inner.closed.is_some() {
                return;
            }
            inner.closed = Some(reason.to_string());
            (
                inner.streams.drain().map(|(_, st)| st).collect(),
                inner.incoming_tx.take(),
            )
        };
        // Dropped outside the lock: streams still queued in it lock the table when they drop.
        drop(incoming_tx);
        tracing::info!(side = %self.side, streams = streams.len(), %reason, "tunnel shut down");
        for st in &streams {
            self.end_stream(
                st,
                Ending::ResetHere {
                    reason: reason.to_string(),
                    send: false,
                },
            );
        }
    }
}

impl Mux {
    /// A multiplexer for `side`. It writes outgoing frames into `out` (give it a small
    /// capacity such as [`super::OUT_QUEUE_FRAMES`]: it is the fairness granularity), and
    /// yields the streams the peer opens through [`Incoming`]. Must be called inside a tokio
    /// runtime: it spawns the task that forwards `Window` and `Reset` frames into `out`, which
    /// ends when the `Mux` and all its streams are dropped, or `out` closes.
    pub fn new(side: Side, out: mpsc::Sender<TunnelFrame>) -> (Mux, Incoming) {
        let (control_tx, mut control_rx) = mpsc::unbounded_channel::<TunnelFrame>();
        let control_pending = Arc::new(AtomicUsize::new(0));
        let (incoming_tx, incoming_rx) = mpsc::channel(ACCEPT_BACKLOG);
        let forward_out = out.clone();
        let forward_pending = control_pending.clone();
        tokio::spawn(async move {
            while let Some(frame) = control_rx.recv().await {
                forward_pending.fetch_sub(1, Ordering::Relaxed);
                if forward_out.send(frame).await.is_err() {
                    break;
                }
            }
        });
        let shared = Arc::new(Shared {
            side,
            out,
            control_tx,
            control_pending,
            inner: Mutex::new(Inner {
                streams: HashMap::new(),
                next_id: side.first_stream_id(),
                highest_peer_id: 0,
                closed: None,
                incoming_tx: Some(incoming_tx),
            }),
        });
        (Mux { shared }, Incoming { rx: incoming_rx })
    }

    /// Whether both handles are the same multiplexer.
    pub fn same_as(&self, other: &Mux) -> bool {
        Arc::ptr_eq(&self.shared, &other.shared)
    }

    pub fn side(&self) -> Side {
        self.shared.side
    }

    /// Opens a stream: sends `Open` and returns at once, without waiting for the peer (data
    /// may follow right away). If the peer cannot connect `port`, the stream is reset with
    /// its reason. Fails only when the tunnel is shut down or the outgoing channel closed.
    pub async fn open(&self, port: u16) -> io::Result<MuxStream> {
        let permit = self
            .shared
            .out
            .reserve()
            .await
            .map_err(|_| lost(CONNECTION_LOST))?;
        let (id, state) = {
            let mut inner = lock(&self.shared.inner);
            if let Some(reason) = &inner.closed {
                return Err(lost(reason));
            }
            let id = inner.next_id;
            inner.next_id += 2;
            let state = Arc::new(Mutex::new(StreamState::new(id, port, self.shared.side)));
            inner.streams.insert(id, state.clone());
            // Sent under the lock, so `Open`s go out in id order.
            permit.send(TunnelFrame::Open { stream: id, port });
            (id, state)
        };
        tracing::debug!(side = %self.shared.side, stream_id = id, port, direction = lock(&state).direction, "tunnel stream opened");
        Ok(MuxStream {
            id,
            port,
            state,
            shared: self.shared.clone(),
            reserve: None,
        })
    }

    /// Takes one frame from the peer. Never waits: data is buffered in its stream (at most
    /// the credit this side granted), and a frame that breaks the protocol resets its stream
    /// (see [`TunnelFrame`]). Frames after [`Mux::shutdown`] are ignored.
    pub fn handle(&self, frame: TunnelFrame) {
        let shared = &self.shared;
        let peer = shared.side.peer();
        match frame {
            TunnelFrame::Open { stream, port } => self.handle_open(stream, port),
            TunnelFrame::Reset { stream, reason } => match shared.lookup(stream) {
                Lookup::Live(st) => shared.end_stream(&st, Ending::ResetByPeer(reason)),
                // Never answer a reset with a reset.
                _ => {
                    tracing::debug!(side = %shared.side, stream_id = stream, %reason, "reset for a stream that is not open: ignored")
                }
            },
            TunnelFrame::Data { stream, data } => {
                let st = match shared.lookup(stream) {
                    Lookup::Live(st) => st,
                    Lookup::NeverOpened => {
                        return shared.violation_without_stream(
                            stream,
                            format!("data for stream {stream}, which was never opened"),
                        )
                    }
                    Lookup::Ended | Lookup::ShutDown => return,
                };
                let mut s = lock(&st);
                if s.finished {
                    return;
                }
                let problem = if s.recv_end {
                    Some(format!("data on stream {stream} after its end"))
                } else if data.len() > MAX_DATA_FRAME {
                    Some(format!(
                        "a data frame of {} bytes on stream {stream}, above the limit of {MAX_DATA_FRAME}",
                        data.len()
                    ))
                } else if data.len() as u64 > s.recv_credit {
                    Some(format!(
                        "{} bytes of data on stream {stream} beyond the window ({} bytes of credit left)",
                        data.len(),
                        s.recv_credit
                    ))
                } else {
                    None
                };
                if let Some(what) = problem {
                    drop(s);
                    return shared.violation(&st, what);
                }
                if data.is_empty() {
                    return;
                }
                s.recv_credit -= data.len() as u64;
                s.buffered += data.len();
                s.bytes_received += data.len() as u64;
                s.recv_buf.push_back(data);
                if let Some(w) = s.read_waker.take() {
                    w.wake();
                }
            }
            TunnelFrame::Window { stream, credit } => {
                let st = match shared.lookup(stream) {
                    Lookup::Live(st) => st,
                    Lookup::NeverOpened => {
                        return shared.violation_without_stream(
                            stream,
                            format!("window for stream {stream}, which was never opened"),
                        )
                    }
                    Lookup::Ended | Lookup::ShutDown => return,
                };
                let mut s = lock(&st);
                if s.finished {
                    return;
                }
                let total = s.send_credit + u64::from(credit);
                if total > MAX_WINDOW {
                    drop(s);
                    return shared.violation(
                        &st,
                        format!("the {peer} granted {total} bytes of credit on stream {stream}, above the limit of {MAX_WINDOW}"),
                    );
                }
                s.send_credit = total;
                if let Some(w) = s.write_waker.take() {
                    w.wake();
                }
            }
            TunnelFrame::End { stream } => {
                let st = match shared.lookup(stream) {
                    Lookup::Live(st) => st,
                    Lookup::NeverOpened => {
                        return shared.violation_without_stream(
                            stream,
                            format!("end of stream {stream}, which was never opened"),
                        )
                    }
                    Lookup::Ended | Lookup::ShutDown => return,
                };
                let mut s = lock(&st);
                if s.finished {
                    return;
                }
                if s.recv_end {
                    drop(s);
                    return shared.violation(&st, format!("stream {stream} ended twice"));
                }
                s.recv_end = true;
                if let Some(w) = s.read_waker.take() {
                    w.wake();
                }
                let closed = s.send_end;
                drop(s);
                if closed {
                    shared.end_stream(&st, Ending::Closed);
                }
            }
        }
    }

    fn handle_open(&self, stream: u64, port: u16) {
        let shared = &self.shared;
        let peer = shared.side.peer();
        enum Verdict {
            Accept(
                Arc<Mutex<StreamState>>,
                Option<mpsc::Sender<(u16, MuxStream)>>,
            ),
            Refuse(String, Option<Arc<Mutex<StreamState>>>),
            Ignore,
        }
        let verdict = {
            let mut inner = lock(&shared.inner);
            if inner.closed.is_some() {
                Verdict::Ignore
            } else if !peer.opens(stream) {
                Verdict::Refuse(
                    format!(
                        "the {peer} opened stream {stream}, an id of the wrong parity (the {peer} opens {} ids)",
                        if peer == Side::Agent { "odd" } else { "even" }
                    ),
                    // The id may be a live stream of this side's: reset it, as the peer
                    // will on receiving the Reset, so that the two ends agree.
                    inner.streams.get(&stream).cloned(),
                )
            } else if stream <= inner.highest_peer_id {
                Verdict::Refuse(
                    format!(
                        "the {peer} opened stream {stream}, not above its previous id {}",
                        inner.highest_peer_id
                    ),
                    inner.streams.get(&stream).cloned(),
                )
            } else {
                inner.highest_peer_id = stream;
                let state = Arc::new(Mutex::new(StreamState::new(stream, port, peer)));
                inner.streams.insert(stream, state.clone());
                Verdict::Accept(state, inner.incoming_tx.clone())
            }
        };
        match verdict {
            Verdict::Ignore => {}
            Verdict::Refuse(what, Some(live)) => shared.violation(&live, what),
            Verdict::Refuse(what, None) => shared.violation_without_stream(stream, what),
            Verdict::Accept(state, incoming_tx) => {
                tracing::debug!(side = %shared.side, stream_id = stream, port, direction = lock(&state).direction, "tunnel stream accepted");
                let ms = MuxStream {
                    id: stream,
                    port,
                    state,
                    shared: shared.clone(),
                    reserve: None,
                };
                let Some(incoming_tx) = incoming_tx else {
                    return ms.reset(&format!("the {} does not accept streams", shared.side));
                };
                match incoming_tx.try_send((port, ms)) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full((_, ms))) => ms.reset(&format!(
                        "the {} has {ACCEPT_BACKLOG} streams waiting to be accepted",
                        shared.side
                    )),
                    Err(mpsc::error::TrySendError::Closed((_, ms))) => {
                        ms.reset(&format!("the {} does not accept streams", shared.side))
                    }
                }
            }
        }
    }

    /// Resets every stream locally with `reason` (use [`CONNECTION_LOST`] when the connection
    /// ended) without sending anything, ends [`Incoming`], and makes later [`Mux::open`]s fail.
    pub fn shutdown(&self, reason: &str) {
        self.shared.shutdown(reason);
    }

    /// Streams that have not ended (opened by either side).
    pub fn live_streams(&self) -> usize {
        lock(&self.shared.inner).streams.len()
    }
}

impl Incoming {
    /// The next stream the peer opened, with the port it asked for; `None` after shutdown.
    /// The caller connects the port and bridges the stream, or calls [`MuxStream::reset`]
    /// with the reason the connect failed.
    pub async fn accept(&mut self) -> Option<(u16, MuxStream)> {
        self.rx.recv().await
    }
}

impl MuxStream {
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The port given to `open`.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Bytes received and not read yet. Never above the stream's window ([`INITIAL_WINDOW`],
    /// grown up to [`MAX_STREAM_WINDOW`] while the reader keeps up).
    pub fn buffered(&self) -> usize {
        lock(&self.state).buffered
    }

    /// Resets the stream in both directions; the peer's reads and writes fail with `reason`
    /// (cut to [`super::MAX_REASON_BYTES`]).
    pub fn reset(self, reason: &str) {
        let reason = cut_reason(reason).to_string();
        self.shared
            .end_stream(&self.state, Ending::ResetHere { reason, send: true });
    }

    /// Carries bytes both ways between `io` (a TCP connection, usually) and this stream until
    /// both directions have ended, cutting writes to [`MAX_DATA_FRAME`]. Returns the bytes
    /// copied (from `io` to the stream, from the stream to `io`). On an error of `io`, the
    /// stream is reset with that error as the reason; on a reset of the stream, `io` is
    /// dropped by the caller as it sees the error.
    pub async fn bridge<T>(mut self, io: &mut T) -> io::Result<(u64, u64)>
    where
        T: AsyncRead + AsyncWrite + Unpin + ?Sized,
    {
        let result = {
            let (mut io_read, mut io_write) = tokio::io::split(&mut *io);
            let (mut mux_read, mut mux_write) = tokio::io::split(&mut self);
            tokio::try_join!(
                pump(&mut io_read, &mut mux_write, MAX_DATA_FRAME),
                pump(&mut mux_read, &mut io_write, MAX_DATA_FRAME)
            )
        };
        match result {
            Ok(copied) => Ok(copied),
            Err(e) => {
                // A no-op when the error is the stream's own reset.
                let reason = format!("socket error on the {}: {e}", self.shared.side);
                self.reset(&reason);
                Err(e)
            }
        }
    }

    /// Registers the task to be woken by a reset while it waits for a slot or for credit.
    fn register_writer(st: &mut StreamState, cx: &Context<'_>) {
        if !matches!(&st.write_waker, Some(w) if w.will_wake(cx.waker())) {
            st.write_waker = Some(cx.waker().clone());
        }
    }

    /// A slot in the outgoing channel, waiting in line (first come, first served) when it is
    /// full.
    fn poll_permit(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<mpsc::OwnedPermit<TunnelFrame>>> {
        if self.reserve.is_none() {
            match self.shared.out.clone().try_reserve_owned() {
                Ok(permit) => return Poll::Ready(Ok(permit)),
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    return Poll::Ready(Err(lost(CONNECTION_LOST)))
                }
                Err(mpsc::error::TrySendError::Full(_)) => {}
            }
        }
        let out = &self.shared.out;
        let fut = self
            .reserve
            .get_or_insert_with(|| Box::pin(out.clone().reserve_owned()));
        let result = ready!(fut.as_mut().poll(cx));
        self.reserve = None;
        Poll::Ready(result.map_err(|_| lost(CONNECTION_LOST)))
    }
}

/// Copies until EOF, then half-closes the writer. The buffer starts at 4 KiB and doubles
/// (up to `max`: one data frame for a tunnel stream) only while reads fill it: a thousand
/// request/response streams hold 4 KiB each, a bulk transfer still moves large reads. A
/// fixed 32 KiB per direction (tokio's `copy_bidirectional_with_sizes`) made 1,000 idle
/// streams cost 64 MB.
pub async fn pump<R, W>(r: &mut R, w: &mut W, max: usize) -> io::Result<u64>
where
    R: AsyncRead + Unpin + ?Sized,
    W: AsyncWrite + Unpin + ?Sized,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 4096];
    let mut total = 0u64;
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            w.shutdown().await?;
            return Ok(total);
        }
        w.write_all(&buf[..n]).await?;
        total += n as u64;
        if n == buf.len() && buf.len() < max {
            buf.resize((buf.len() * 2).min(max), 0);
        }
    }
}

impl AsyncRead for MuxStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let mut st = lock(&this.state);
        if let Some(e) = st.error() {
            return Poll::Ready(Err(e));
        }
        if st.buffered == 0 {
            if st.recv_end {
                return Poll::Ready(Ok(()));
            }
            st.read_waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let mut n = 0;
        while buf.remaining() > 0 {
            let off = st.front_read;
            let Some(front) = st.recv_buf.front() else {
                break;
            };
            let take = (front.len() - off).min(buf.remaining());
            buf.put_slice(&front[off..off + take]);
            n += take;
            if off + take == front.len() {
                st.recv_buf.pop_front();
                st.front_read = 0;
            } else {
                st.front_read = off + take;
            }
        }
        st.buffered -= n;
        st.unacked += n as u64;
        // Credit goes back in batches, so a stream read in small pieces does not send a
        // window per read; the peer still has at least half a window to go on.
        if !st.recv_end && !st.finished && st.unacked >= st.window / 2 {
            let mut credit = st.unacked;
            st.unacked = 0;
            if st.buffered == 0 && st.window < MAX_STREAM_WINDOW {
                // The reader keeps up: the window limits the stream. Let more be in flight.
                credit += st.window;
                st.window *= 2;
            }
            st.recv_credit += credit;
            let id = st.id;
            drop(st);
            // `credit` < 2.5 * MAX_STREAM_WINDOW (less than half a window before this read,
            // plus at most the buffer, which never holds more than a window, plus the
            // growth): it fits in a u32.
            let credit = u32::try_from(credit).unwrap_or(u32::MAX);
            this.shared
                .queue_control(TunnelFrame::Window { stream: id, credit });
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for MuxStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        {
            let mut st = lock(&this.state);
            if let Some(e) = st.error() {
                return Poll::Ready(Err(e));
            }
            if st.send_end {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    "write on a tunnel stream after its shutdown",
                )));
            }
            if buf.is_empty() {
                return Poll::Ready(Ok(0));
            }
            Self::register_writer(&mut st, cx);
            if st.send_credit == 0 {
                return Poll::Pending;
            }
        }
        let permit = ready!(this.poll_permit(cx))?;
        let mut st = lock(&this.state);
        if let Some(e) = st.error() {
            return Poll::Ready(Err(e));
        }
        // Only this writer takes credit, so it is still > 0.
        let n = buf
            .len()
            .min(MAX_DATA_FRAME)
            .min(usize::try_from(st.send_credit).unwrap_or(MAX_DATA_FRAME));
        st.send_credit -= n as u64;
        st.bytes_sent += n as u64;
        permit.send(TunnelFrame::Data {
            stream: this.id,
            data: buf[..n].to_vec(),
        });
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        {
            let mut st = lock(&this.state);
            if let Some(e) = st.error() {
                return Poll::Ready(Err(e));
            }
            if st.send_end {
                return Poll::Ready(Ok(()));
            }
            Self::register_writer(&mut st, cx);
        }
        let permit = ready!(this.poll_permit(cx))?;
        let mut st = lock(&this.state);
        if let Some(e) = st.error() {
            return Poll::Ready(Err(e));
        }
        if st.send_end {
            return Poll::Ready(Ok(()));
        }
        st.send_end = true;
        permit.send(TunnelFrame::End { stream: this.id });
        let closed = st.recv_end;
        drop(st);
        if closed {
            this.shared.end_stream(&this.state, Ending::Closed);
        }
        Poll::Ready(Ok(()))
    }
}

impl Drop for MuxStream {
    fn drop(&mut self) {
        let reason = {
            let st = lock(&self.state);
            if st.finished {
                return;
            }
            if !st.send_end {
                format!(
                    "the {} dropped the stream without shutting it down",
                    self.shared.side
                )
            } else {
                format!(
                    "the {} dropped the stream before reading to its end",
                    self.shared.side
                )
            }
        };
        self.shared
            .end_stream(&self.state, Ending::ResetHere { reason, send: true });
    }
}

impl std::fmt::Debug for MuxStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MuxStream")
            .field("id", &self.id)
            .field("port", &self.port)
            .finish()
    }
}
