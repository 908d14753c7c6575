//! What the fuzz targets in `fuzz/` run, one function per target, so that `cargo test`
//! replays the saved corpus through exactly the same code (`tests/fuzz_corpus.rs`).
//!
//! Each function takes untrusted bytes and checks properties that must hold for *any* input;
//! it panics when one does not, since a panic is how a fuzzer or a test reports. Not part of
//! the protocol's API.

use std::collections::HashMap;
use std::fmt::Debug;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use serde::{de::DeserializeOwned, Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;

use crate::codec::{decode, encode};
use crate::handoff::{self, AnswerHead, Parsed};
use crate::msg::{AgentMsg, LaptopMsg};
use crate::path::MAX_PATH_BYTES;
use crate::tunnel::{
    Incoming, Mux, MuxStream, Side, TunnelFrame, CONNECTION_LOST, INITIAL_WINDOW, MAX_DATA_FRAME,
    MAX_REASON_BYTES, MAX_STREAM_WINDOW, OUT_QUEUE_FRAMES,
};
use crate::RelPath;

/// Target `laptop_msg`: what the agent does with a WebSocket message from a cli.
pub fn laptop_msg(data: &[u8]) {
    if let Some(LaptopMsg::Batch { ops, .. }) = round_trip::<LaptopMsg>(data) {
        for op in &ops {
            check_path(op.path());
        }
    }
}

/// Target `agent_msg`: what the cli does with a WebSocket message from an agent.
pub fn agent_msg(data: &[u8]) {
    if let Some(AgentMsg::Index { entries, .. }) = round_trip::<AgentMsg>(data) {
        for (path, _) in &entries {
            check_path(path);
        }
    }
}

/// Decodes; when that succeeds, encodes the value again and decodes that: the same value
/// must come back, from no more bytes than the input (the encoder writes the shortest form).
fn round_trip<T>(data: &[u8]) -> Option<T>
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let msg = decode::<T>(data).ok()?;
    let again = encode(&msg);
    assert!(
        again.len() <= data.len(),
        "{msg:?} re-encodes to {} bytes, from {}",
        again.len(),
        data.len()
    );
    match decode::<T>(&again) {
        Ok(back) => assert_eq!(back, msg, "the round trip changed the message"),
        Err(e) => panic!("{msg:?} re-encoded does not decode: {e}"),
    }
    Some(msg)
}

/// The `RelPath` invariant, written out again independently of `RelPath::new`.
fn path_is_valid(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_PATH_BYTES
        && !s.starts_with('/')
        && !s.contains('\0')
        && s.split('/').all(|c| !c.is_empty() && c != "." && c != "..")
}

/// Parents checked per path: enough for every case, without making a path of thousands of
/// components cost a quadratic walk per input.
const PARENTS_CHECKED: usize = 8;

fn check_path(p: &RelPath) {
    assert!(path_is_valid(p.as_str()), "invalid decoded path {p:?}");
    // Parents are valid paths too, and prefixes of it.
    let mut at = p.clone();
    for _ in 0..PARENTS_CHECKED {
        let Some(parent) = at.parent() else {
            break;
        };
        assert!(path_is_valid(parent.as_str()), "invalid parent {parent:?}");
        assert!(at.starts_with(&parent), "{at:?} is not under {parent:?}");
        at = parent;
    }
}

/// Target `rel_path`: `RelPath`'s deserialiser, its constructor and what is built from it.
pub fn rel_path(data: &[u8]) {
    if let Ok(p) = decode::<RelPath>(data) {
        check_path(&p);
        assert_eq!(decode::<RelPath>(&encode(&p)).ok(), Some(p.clone()));
    }
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    match RelPath::new(s) {
        Ok(p) => {
            assert!(path_is_valid(s), "RelPath::new accepted {s:?}");
            check_path(&p);
        }
        Err(_) => assert!(!path_is_valid(s), "RelPath::new refused {s:?}"),
    }
    if let Ok(p) = RelPath::from_path(std::path::Path::new(s)) {
        check_path(&p);
    }
    // The input's first line as a base and the rest as a name to join.
    if let Some((base, name)) = s.split_once('\n') {
        if let Ok(base) = RelPath::new(base) {
            if let Ok(joined) = base.join(name) {
                check_path(&joined);
                assert!(
                    joined.starts_with(&base),
                    "{joined:?} is not under {base:?}"
                );
            }
        }
    }
}

/// Target `tunnel_frame`: one tunnel frame on its own.
pub fn tunnel_frame(data: &[u8]) {
    // A reset made here never carries more than the limit, whatever reason it is given.
    if let Some(TunnelFrame::Reset { stream, reason }) = round_trip::<TunnelFrame>(data) {
        match TunnelFrame::reset(stream, &reason) {
            TunnelFrame::Reset { reason: cut, .. } => {
                assert!(cut.len() <= MAX_REASON_BYTES && reason.starts_with(&cut));
            }
            other => panic!("TunnelFrame::reset made {other:?}"),
        }
    }
}

/// Target `handoff`: the handoff request the cli reads from an agent, and the answer the
/// agent reads from the cli, fed the way `read_request` and `request` feed them (exactly the
/// bytes asked for). The same input is tried as both.
pub fn handoff(data: &[u8]) {
    // The request, as the cli reads it.
    let mut have = 0;
    loop {
        match handoff::parse_request(&data[..have]) {
            Err(_) => break,
            Ok(Parsed::Need(n)) => {
                assert!(n > have && n <= 4 + 1 + 255 + 2, "asked for {n} at {have}");
                if n > data.len() {
                    break;
                }
                have = n;
            }
            Ok(Parsed::Done(req, used)) => {
                assert_eq!(used, have, "a request must use every byte it asked for");
                // A valid UTF-8 token encodes back to the same bytes.
                if std::str::from_utf8(&data[5..used - 2]).is_ok() {
                    match handoff::encode_request(&req.token, req.port) {
                        Ok(bytes) => assert_eq!(bytes, &data[..used]),
                        Err(e) => panic!("{req:?} does not encode: {e}"),
                    }
                }
                break;
            }
        }
    }
    // The answer, as the agent reads it: the first byte arrives with or without a descriptor.
    let Some((&flag, data)) = data.split_first() else {
        return;
    };
    let with_fd = flag & 1 == 1;
    let mut have = data.len().min(1);
    loop {
        match handoff::parse_answer(&data[..have], with_fd) {
            Err(_) => break,
            Ok(Parsed::Need(n)) => {
                assert!(n > have && n <= 3 + 65_535, "asked for {n} at {have}");
                if n > data.len() {
                    break;
                }
                have = n;
            }
            Ok(Parsed::Done(answer, used)) => {
                assert_eq!(used, have, "an answer must use every byte it asked for");
                match answer {
                    AnswerHead::Connected => assert!(with_fd && used == 1),
                    AnswerHead::Refused(why) => {
                        if std::str::from_utf8(&data[3..used]).is_ok() {
                            assert_eq!(handoff::encode_refusal(&why), &data[..used]);
                        }
                    }
                }
                break;
            }
        }
    }
}

/// One step of [`tunnel_mux`]: a frame from the peer, or something the application or the
/// connection does. The input is a sequence of these, postcard-encoded back to back.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum MuxOp {
    /// The connection's reader hands the multiplexer a frame from the peer.
    Peer(TunnelFrame),
    /// The application opens a stream to `port`.
    Open(u16),
    /// The application accepts every stream the peer opened.
    Accept,
    /// The application reads up to `max` bytes from one of its streams.
    Read { stream: u8, max: u16 },
    /// The application writes `len` bytes to one of its streams.
    Write { stream: u8, len: u16 },
    /// The application shuts one of its streams down (sends `End`).
    Shutdown(u8),
    /// The application drops one of its streams.
    Drop(u8),
    /// The application resets one of its streams.
    Reset(u8),
    /// The connection's writer takes what the multiplexer sent.
    Drain,
    /// The connection ends.
    ConnectionLost,
}

/// The most steps one input runs.
const MAX_MUX_OPS: usize = 512;

/// What the fuzzer, as the peer, knows about one stream id.
struct PeerView {
    /// Data bytes the peer sent on the stream, in order.
    sent: Vec<u8>,
    sent_end: bool,
    /// Data bytes the application read, in order.
    read: usize,
    read_eof: bool,
    /// Credit the peer granted to the multiplexer (an upper bound: `INITIAL_WINDOW` plus every
    /// `Window` the peer sent for the id).
    granted: u64,
    /// Data bytes the multiplexer sent to the peer.
    received: u64,
    received_end: bool,
    received_reset: bool,
}

impl Default for PeerView {
    fn default() -> Self {
        PeerView {
            sent: Vec::new(),
            sent_end: false,
            read: 0,
            read_eof: false,
            granted: u64::from(INITIAL_WINDOW),
            received: 0,
            received_end: false,
            received_reset: false,
        }
    }
}

/// Target `tunnel_mux`: one side's multiplexer fed a sequence of peer frames and
/// application actions (first byte: which side; then [`MuxOp`]s). Checks, after every step,
/// what the multiplexer sent and what the application saw:
///
/// - it never sends more data on a stream than the peer granted, nor a data frame above
///   [`MAX_DATA_FRAME`], nor anything but once on a stream after its `End`/`Reset`;
/// - the streams it opens have its parity and increasing ids;
/// - a `Reset` from the peer is never answered with a frame;
/// - the application reads exactly the peer's bytes, in order, end-of-file only after the
///   peer's `End` and all its data, and never finds more buffered than [`MAX_STREAM_WINDOW`];
/// - after the connection is lost, nothing more is sent.
pub fn tunnel_mux(data: &[u8]) {
    let Some((&first, mut rest)) = data.split_first() else {
        return;
    };
    let side = if first & 1 == 0 {
        Side::Laptop
    } else {
        Side::Agent
    };
    let mut ops = Vec::new();
    while !rest.is_empty() && ops.len() < MAX_MUX_OPS {
        match postcard::take_from_bytes::<MuxOp>(rest) {
            Ok((op, tail)) => {
                ops.push(op);
                rest = tail;
            }
            Err(_) => break,
        }
    }
    let runtime = match tokio::runtime::Builder::new_current_thread().build() {
        Ok(rt) => rt,
        Err(e) => panic!("the harness's runtime: {e}"),
    };
    runtime.block_on(MuxHarness::run(side, ops));
}

struct MuxHarness {
    side: Side,
    mux: Mux,
    incoming: Incoming,
    out_rx: mpsc::Receiver<TunnelFrame>,
    /// The application's streams.
    streams: Vec<Option<MuxStream>>,
    peers: HashMap<u64, PeerView>,
    last_local_open: u64,
    highest_peer_open: u64,
    lost: bool,
}

impl MuxHarness {
    async fn run(side: Side, ops: Vec<MuxOp>) {
        let (out_tx, out_rx) = mpsc::channel(OUT_QUEUE_FRAMES);
        let (mux, incoming) = Mux::new(side, out_tx);
        let mut h = MuxHarness {
            side,
            mux,
            incoming,
            out_rx,
            streams: Vec::new(),
            peers: HashMap::new(),
            last_local_open: 0,
            highest_peer_open: 0,
            lost: false,
        };
        for op in ops {
            h.step(op).await;
            h.check_buffers();
        }
        h.drain().await;
        h.mux.shutdown(CONNECTION_LOST);
        h.lost = true;
        h.streams.clear();
        h.drain().await;
    }

    fn stream(&mut self, i: u8) -> Option<&mut MuxStream> {
        let n = self.streams.len();
        if n == 0 {
            return None;
        }
        self.streams[usize::from(i) % n].as_mut()
    }

    fn take_stream(&mut self, i: u8) -> Option<MuxStream> {
        let n = self.streams.len();
        if n == 0 {
            return None;
        }
        self.streams[usize::from(i) % n].take()
    }

    async fn step(&mut self, op: MuxOp) {
        let waker = Waker::noop();
        let mut cx = Context::from_waker(waker);
        match op {
            MuxOp::Peer(frame) => {
                let is_reset = matches!(frame, TunnelFrame::Reset { .. });
                let id = frame.stream();
                let opens = match frame {
                    TunnelFrame::Open { stream, .. } => {
                        self.side.peer().opens(stream) && stream > self.highest_peer_open
                    }
                    _ => false,
                };
                if is_reset || opens {
                    // Frames queued before this one must not be taken for its answers, nor
                    // (for an Open) for frames of the new stream.
                    self.drain().await;
                }
                if opens {
                    // The multiplexer accepts it: a fresh stream, whatever the peer sent on
                    // the id before (which was refused as a frame for an unopened stream).
                    self.highest_peer_open = id;
                    self.peers.insert(id, PeerView::default());
                }
                let view = self.peers.entry(id).or_default();
                match &frame {
                    // Data after End is a violation, never delivered.
                    TunnelFrame::Data { data, .. } if !view.sent_end => {
                        view.sent.extend_from_slice(data)
                    }
                    TunnelFrame::End { .. } => view.sent_end = true,
                    TunnelFrame::Window { credit, .. } => view.granted += u64::from(*credit),
                    _ => {}
                }
                self.mux.handle(frame);
                if is_reset {
                    let answered = self.drain().await;
                    assert_eq!(answered, 0, "a peer's reset was answered");
                }
            }
            MuxOp::Open(port) => {
                // Resets already queued for the id (the peer sent frames for it before it
                // was opened) go out first.
                self.drain().await;
                let opened = {
                    let mut open = Box::pin(self.mux.open(port));
                    open.as_mut().poll(&mut cx)
                };
                if let Poll::Ready(Ok(stream)) = opened {
                    // A fresh stream: what the peer sent for the id before was refused.
                    self.peers.insert(stream.id(), PeerView::default());
                    self.streams.push(Some(stream));
                }
            }
            MuxOp::Accept => loop {
                let accepted = {
                    let mut accept = Box::pin(self.incoming.accept());
                    accept.as_mut().poll(&mut cx)
                };
                match accepted {
                    Poll::Ready(Some((_, stream))) => self.streams.push(Some(stream)),
                    _ => break,
                }
            },
            MuxOp::Read { stream, max } => {
                let Some(s) = self.stream(stream) else { return };
                let id = s.id();
                let mut buf = vec![0u8; usize::from(max).max(1)];
                let mut rb = ReadBuf::new(&mut buf);
                let result = Pin::new(s).poll_read(&mut cx, &mut rb);
                let got = rb.filled().to_vec();
                let view = self.peers.entry(id).or_default();
                if let Poll::Ready(Ok(())) = result {
                    assert!(!view.read_eof || got.is_empty(), "data after end-of-file");
                    if got.is_empty() {
                        assert!(view.sent_end, "end-of-file without the peer's End on {id}");
                        assert_eq!(view.read, view.sent.len(), "end-of-file before all data");
                        view.read_eof = true;
                    } else {
                        let want = view.sent.get(view.read..view.read + got.len());
                        assert_eq!(want, Some(&got[..]), "stream {id} read other bytes");
                        view.read += got.len();
                    }
                }
            }
            MuxOp::Write { stream, len } => {
                let Some(s) = self.stream(stream) else { return };
                let buf = vec![0x5a; usize::from(len)];
                let _ = Pin::new(s).poll_write(&mut cx, &buf);
            }
            MuxOp::Shutdown(i) => {
                if let Some(s) = self.stream(i) {
                    let _ = Pin::new(s).poll_shutdown(&mut cx);
                }
            }
            MuxOp::Drop(i) => drop(self.take_stream(i)),
            MuxOp::Reset(i) => {
                if let Some(s) = self.take_stream(i) {
                    s.reset("reset by the fuzzer");
                }
            }
            MuxOp::Drain => {
                self.drain().await;
            }
            MuxOp::ConnectionLost => {
                self.drain().await;
                self.mux.shutdown(CONNECTION_LOST);
                self.lost = true;
                assert_eq!(self.mux.live_streams(), 0, "streams live after shutdown");
            }
        }
    }

    /// Lets the control forwarder run and takes every frame the multiplexer sent, checking
    /// each. Returns how many there were.
    async fn drain(&mut self) -> usize {
        let mut total = 0;
        loop {
            tokio::task::yield_now().await;
            let mut round = 0;
            while let Ok(frame) = self.out_rx.try_recv() {
                self.check_sent(frame);
                round += 1;
            }
            if round == 0 {
                return total;
            }
            total += round;
        }
    }

    fn check_sent(&mut self, frame: TunnelFrame) {
        assert!(!self.lost, "{frame:?} sent after the connection was lost");
        let id = frame.stream();
        if let TunnelFrame::Open { stream, .. } = frame {
            assert!(self.side.opens(stream), "{} opened {stream}", self.side);
            assert!(stream > self.last_local_open, "stream id {stream} reused");
            self.last_local_open = stream;
        }
        let view = self.peers.entry(id).or_default();
        // Every frame for a stream id with no state is answered with a Reset, so Resets may
        // repeat; nothing else may follow one.
        let is_reset = matches!(frame, TunnelFrame::Reset { .. });
        assert!(
            is_reset || !view.received_reset,
            "{frame:?} after a reset of its stream"
        );
        match frame {
            TunnelFrame::Data { data, .. } => {
                assert!(!view.received_end, "data on stream {id} after its End");
                assert!(
                    data.len() <= MAX_DATA_FRAME,
                    "a data frame of {}",
                    data.len()
                );
                view.received += data.len() as u64;
                assert!(
                    view.received <= view.granted,
                    "{} bytes sent on stream {id}, {} granted",
                    view.received,
                    view.granted
                );
            }
            TunnelFrame::End { .. } => {
                assert!(!view.received_end, "stream {id} ended twice");
                view.received_end = true;
            }
            TunnelFrame::Reset { reason, .. } => {
                assert!(reason.len() <= MAX_REASON_BYTES);
                view.received_reset = true;
            }
            TunnelFrame::Open { .. } | TunnelFrame::Window { .. } => {}
        }
    }

    fn check_buffers(&self) {
        for s in self.streams.iter().flatten() {
            assert!(
                s.buffered() as u64 <= MAX_STREAM_WINDOW,
                "stream {} holds {} bytes",
                s.id(),
                s.buffered()
            );
        }
        if self.lost {
            assert_eq!(self.mux.live_streams(), 0);
        }
    }
}

/// Target `route_filter`: two filters as a cli may send them (postcard) and a request.
/// Compiling and matching never panic; a filter that compiles still compiles after a round
/// trip and matches alike; what an exact condition accepts really carries that header, path
/// or method; two filters judged disjoint never both match a request that carries at most
/// one field of each name (the one case `Filter::disjoint` documents as outside its rule).
pub fn route_filter(data: &[u8]) {
    use crate::route::{Filter, PathMatch, ValueMatch};
    let Ok((a, rest)) = postcard::take_from_bytes::<Filter>(data) else {
        return;
    };
    let Ok((b, rest)) = postcard::take_from_bytes::<Filter>(rest) else {
        return;
    };
    let Ok((req, _)) = postcard::take_from_bytes::<crate::route::PlainHead>(rest) else {
        return;
    };
    let _ = a.describe();
    let (Ok(ma), mb) = (a.compile(), b.compile()) else {
        return;
    };
    let hit = ma.matches(&req);
    let again: Filter = match postcard::to_allocvec(&a).map(|v| postcard::from_bytes(&v)) {
        Ok(Ok(f)) => f,
        other => panic!("a filter that compiled does not round-trip: {other:?}"),
    };
    match again.compile() {
        Ok(m) => assert_eq!(m.matches(&req), hit, "a round trip changed the match"),
        Err(e) => panic!("a filter that compiled fails after a round trip: {e}"),
    }
    if hit {
        if let Some(m) = &a.method {
            assert_eq!(&req.method, m, "the method condition");
        }
        match &a.path {
            Some(PathMatch::Exact(p)) => assert_eq!(&req.path, p, "the exact path"),
            Some(PathMatch::Prefix(p)) => assert!(req.path.starts_with(p.as_str()), "the prefix"),
            _ => {}
        }
        for h in &a.headers {
            if let ValueMatch::Exact(v) = &h.value {
                assert!(
                    req.headers
                        .iter()
                        .any(|(n, got)| n.eq_ignore_ascii_case(&h.name) && got == v.as_bytes()),
                    "matched without header {}: {v:?}",
                    h.name
                );
            }
        }
    }
    if let Ok(mb) = mb {
        let mut names: Vec<String> = req
            .headers
            .iter()
            .map(|(n, _)| n.to_ascii_lowercase())
            .collect();
        names.sort();
        let single = names.windows(2).all(|w| w[0] != w[1]);
        if single && a.disjoint(&b) {
            assert!(
                !(hit && mb.matches(&req)),
                "filters judged disjoint both match: {a:?} {b:?} {req:?}"
            );
        }
    }
}

/// Replays every input saved under `corpus/<target>/` through `run` (the tests of the
/// proxy and the agent crates call this with their fuzz targets' functions), and fails on
/// a missing or empty corpus folder, so it cannot pass by finding nothing. Returns how many
/// inputs it replayed; panics naming every input whose run panicked.
pub fn replay_corpus(corpus: &std::path::Path, target: &str, run: impl Fn(&[u8])) -> usize {
    use std::panic::{catch_unwind, AssertUnwindSafe};
    let dir = corpus.join(target);
    let files: Vec<std::path::PathBuf> = match std::fs::read_dir(&dir) {
        Ok(entries) => entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_file())
            .collect(),
        Err(e) => panic!("the corpus {}: {e}", dir.display()),
    };
    assert!(!files.is_empty(), "the corpus {} is empty", dir.display());
    let mut failed = Vec::new();
    for file in &files {
        let data = std::fs::read(file).unwrap_or_default();
        if catch_unwind(AssertUnwindSafe(|| run(&data))).is_err() {
            failed.push(file.display().to_string());
        }
    }
    assert!(
        failed.is_empty(),
        "{target}: these inputs fail: {failed:#?}"
    );
    files.len()
}

/// Writes `seeds` as `corpus/<target>/seed-NN` (the seed generators of both crates' fuzz
/// targets); returns how many.
pub fn write_seeds(
    corpus: &std::path::Path,
    target: &str,
    seeds: Vec<Vec<u8>>,
) -> std::io::Result<usize> {
    let dir = corpus.join(target);
    std::fs::create_dir_all(&dir)?;
    let n = seeds.len();
    for (i, seed) in seeds.into_iter().enumerate() {
        std::fs::write(dir.join(format!("seed-{i:02}")), seed)?;
    }
    Ok(n)
}
