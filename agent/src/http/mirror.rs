//! Copies of requests for mirror holders.
//!
//! A mirror gets a copy of each request it matches, whoever takes the request, and its
//! answer is thrown away. The caller never waits for a mirror: the copy's body is fed from
//! the caller's body as it streams to its own destination, through a bounded queue
//! ([`QUEUE_FRAMES`]) that is only ever offered to, never waited on. A copy that falls
//! behind, whose laptop cannot be reached, or that would exceed [`MAX_IN_FLIGHT`] copies of
//! one holder is dropped and counted; a dropped copy's body ends in an error, so the laptop
//! never sees a cut body as a whole one.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::Frame;
use tokio::sync::mpsc;

use super::table::Counts;

/// Frames of one copy's body queued for its laptop at most.
pub const QUEUE_FRAMES: usize = 32;

/// Copies of one holder's requests under way at once at most; more are dropped.
pub const MAX_IN_FLIGHT: u64 = 64;

/// The caller's end of one copy: offered each frame of the caller's body.
pub struct Tee {
    tx: Option<mpsc::Sender<Frame<Bytes>>>,
    broken: Arc<AtomicBool>,
    counts: Arc<Counts>,
}

/// The laptop's end of one copy: the body of the copied request.
pub struct CopyBody {
    rx: mpsc::Receiver<Frame<Bytes>>,
    broken: Arc<AtomicBool>,
}

/// A new copy of one request for a holder whose counters are `counts`.
pub fn copy(counts: Arc<Counts>) -> (Tee, CopyBody) {
    let (tx, rx) = mpsc::channel(QUEUE_FRAMES);
    let broken = Arc::new(AtomicBool::new(false));
    (
        Tee {
            tx: Some(tx),
            broken: broken.clone(),
            counts,
        },
        CopyBody { rx, broken },
    )
}

impl Tee {
    /// Offers one frame of the caller's body; a full queue drops the copy.
    pub fn offer(&mut self, frame: &Frame<Bytes>) {
        let Some(tx) = &self.tx else { return };
        let copied = if let Some(data) = frame.data_ref() {
            Frame::data(data.clone())
        } else if let Some(trailers) = frame.trailers_ref() {
            Frame::trailers(trailers.clone())
        } else {
            return;
        };
        if tx.try_send(copied).is_err() {
            self.drop_copy();
        }
    }

    /// The caller's body ended: the copy's ends too.
    pub fn finish(&mut self) {
        self.tx = None;
    }

    /// The copy cannot be whole: its body ends in an error, and the holder counts it.
    pub fn drop_copy(&mut self) {
        if self.tx.take().is_some() {
            mark_dropped(&self.broken, &self.counts);
        }
    }
}

impl Drop for Tee {
    /// Dropped before the caller's body ended (the caller went away, or its destination
    /// stopped reading): the copy is not whole.
    fn drop(&mut self) {
        self.drop_copy();
    }
}

/// Marks a copy dropped and counts it, once however many parts notice.
pub fn mark_dropped(broken: &AtomicBool, counts: &Counts) {
    if !broken.swap(true, Ordering::Relaxed) {
        counts.dropped.fetch_add(1, Ordering::Relaxed);
    }
}

impl CopyBody {
    /// The flag that says this copy was dropped.
    pub fn broken(&self) -> Arc<AtomicBool> {
        self.broken.clone()
    }
}

impl hyper::body::Body for CopyBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(frame)) => Poll::Ready(Some(Ok(frame))),
            Poll::Ready(None) if self.broken.load(Ordering::Relaxed) => Poll::Ready(Some(Err(
                io::Error::other("the copy was dropped: its laptop fell behind the caller"),
            ))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}
