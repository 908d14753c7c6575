//! What a socket may cost the agent before it has presented the session token, and accept
//! loops that outlive accept errors.
//!
//! Until its hello is checked a connection is anyone's: a process in another container on
//! the project network, a port scanner. So it gets little: one of [`PRE_HELLO_CONNECTIONS`]
//! places (a connection beyond them is closed at once), [`PRE_HELLO_BYTES`] of reading
//! ([`Budgeted`]: the upgrade request and the hello together), and
//! [`crate::server::HANDSHAKE_TIMEOUT`] to send them. Only an accepted hello lifts the budget
//! to the protocol's full message size and gives the place back.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// Connections at once that have not yet presented the token. A cli holds one for a round
/// trip or two after connecting, and several clis of one session connect at the same time
/// at most a handful at once (one per synced service plus `status`); 16 leaves room for
/// those while 16 idle sockets cost little (a 128 KiB read buffer each at most).
pub const PRE_HELLO_CONNECTIONS: usize = 16;

/// Bytes read from a socket before its hello is accepted: the HTTP upgrade request (the cli's
/// is about 200 bytes, a browser's rarely passes 2 KiB) and the hello message (about 150
/// bytes with the cli's 64-character token). Without it, one unauthenticated socket could
/// make the agent buffer a message of the full protocol limit (16 MiB).
pub const PRE_HELLO_BYTES: usize = 8 * 1024;

/// The largest hello accepted. The cli's is about 150 bytes; capabilities may grow, but not
/// by kilobytes.
pub const MAX_HELLO_BYTES: usize = 4 * 1024;

/// How often, at most, the agent logs connections it closed for want of a place.
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(5);

/// The wait after a failed accept (EMFILE, ENFILE, ECONNABORTED, ENOBUFS...). Out of
/// descriptors, an immediate retry fails again at once and spins a core; 50 ms lets
/// connections end and free theirs, and delays a caller by no more than that.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// A stream that reads at most `budget` bytes until [`Budgeted::lift`]; a read past the
/// budget fails, so the peer cannot make the agent take in more. Writes are unlimited.
#[derive(Debug)]
pub struct Budgeted<S> {
    inner: S,
    /// Bytes that may still be read; `None` once lifted.
    left: Option<usize>,
    budget: usize,
}

impl<S> Budgeted<S> {
    pub fn new(inner: S, budget: usize) -> Self {
        Budgeted {
            inner,
            left: Some(budget),
            budget,
        }
    }

    /// No limit from now on: the peer is authenticated.
    pub fn lift(&mut self) {
        self.left = None;
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Budgeted<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let Some(left) = this.left else {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        };
        if left == 0 {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "more than {} bytes before the hello was accepted",
                    this.budget
                ),
            )));
        }
        // Read into a bounded buffer of our own, so not a byte past the budget is taken from
        // the socket (and without unsafe code to limit the caller's buffer).
        let mut scratch = [0u8; 2048];
        let want = left.min(buf.remaining()).min(scratch.len());
        let mut limited = ReadBuf::new(&mut scratch[..want]);
        match Pin::new(&mut this.inner).poll_read(cx, &mut limited) {
            Poll::Ready(Ok(())) => {
                let got = limited.filled();
                buf.put_slice(got);
                this.left = Some(left - got.len());
                Poll::Ready(Ok(()))
            }
            other => other,
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Budgeted<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, data)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// The places for connections that have not presented the token yet.
pub struct Gate {
    places: Arc<Semaphore>,
    /// Connections closed for want of a place since the last log line.
    refused: u64,
    last_log: Option<Instant>,
    listener: &'static str,
}

impl Gate {
    pub fn new(listener: &'static str) -> Self {
        Gate {
            places: Arc::new(Semaphore::new(PRE_HELLO_CONNECTIONS)),
            refused: 0,
            last_log: None,
            listener,
        }
    }

    /// A place for a new connection, held until its hello is accepted (or it ends); `None`:
    /// all are taken, close the connection. Refusals are counted and logged at most once per
    /// [`REFUSAL_LOG_INTERVAL`], not once per connection.
    pub fn admit(&mut self) -> Option<OwnedSemaphorePermit> {
        match self.places.clone().try_acquire_owned() {
            Ok(permit) => {
                if self.refused > 0 {
                    self.log_refused();
                }
                Some(permit)
            }
            Err(_) => {
                self.refused += 1;
                if self
                    .last_log
                    .is_none_or(|t| t.elapsed() >= REFUSAL_LOG_INTERVAL)
                {
                    self.log_refused();
                }
                None
            }
        }
    }

    fn log_refused(&mut self) {
        tracing::warn!(
            listener = self.listener,
            closed = self.refused,
            limit = PRE_HELLO_CONNECTIONS,
            "closed connections at once: too many connections have not sent their hello yet"
        );
        self.refused = 0;
        self.last_log = Some(Instant::now());
    }
}

/// Accepts connections with `accept` and hands each to `handle`, forever. An accept error
/// (out of descriptors, a connection aborted before it was accepted) does not end the loop:
/// the first of a burst is logged, the loop waits [`ACCEPT_BACKOFF`] and goes on, and the
/// end of the burst is logged with the number of failures.
pub async fn accept_loop<C, F>(
    listener: &'static str,
    mut accept: impl FnMut() -> F,
    mut handle: impl FnMut(C, SocketAddr),
) -> std::convert::Infallible
where
    F: Future<Output = io::Result<(C, SocketAddr)>>,
{
    let mut failures = 0u64;
    loop {
        match accept().await {
            Ok((conn, peer)) => {
                if failures > 0 {
                    tracing::info!(listener, failures, "accepting connections again");
                    failures = 0;
                }
                handle(conn, peer);
            }
            Err(e) => {
                if failures == 0 {
                    tracing::warn!(listener, error = %e, backoff = ?ACCEPT_BACKOFF, "accept failed; retrying");
                }
                failures += 1;
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;
    use std::sync::Mutex;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn a_budgeted_stream_reads_no_byte_past_its_budget_until_lifted() {
        let (mut peer, ours) = tokio::io::duplex(64 * 1024);
        peer.write_all(&[7u8; 10_000]).await.unwrap();
        let mut ours = Budgeted::new(ours, 3000);
        let mut got = Vec::new();
        let err = ours.read_to_end(&mut got).await.unwrap_err();
        assert_eq!(got.len(), 3000);
        assert!(err.to_string().contains("more than 3000 bytes"), "{err}");
        ours.lift();
        let mut rest = vec![0u8; 7000];
        ours.read_exact(&mut rest).await.unwrap();
        assert!(rest.iter().all(|&b| b == 7));
    }

    #[tokio::test]
    async fn the_gate_closes_connections_beyond_its_places_and_reopens() {
        let mut gate = Gate::new("test");
        let held: Vec<_> = (0..PRE_HELLO_CONNECTIONS)
            .map(|_| gate.admit().expect("a free place"))
            .collect();
        assert!(gate.admit().is_none());
        assert_eq!(gate.refused, 0, "the first refusal is logged at once");
        assert!(gate.admit().is_none());
        assert_eq!(
            gate.refused, 1,
            "the next ones are counted for a later line"
        );
        drop(held);
        assert!(gate.admit().is_some());
        assert_eq!(
            gate.refused, 0,
            "the count is logged when places are free again"
        );
    }

    /// Accepts that fail like a process out of descriptors, then succeed: the loop must go
    /// on to the connections after the errors.
    #[tokio::test(start_paused = true)]
    async fn the_accept_loop_outlives_accept_errors() {
        let script: Arc<Mutex<VecDeque<io::Result<u32>>>> = Arc::new(Mutex::new(
            [
                Err(io::Error::from_raw_os_error(nix::libc::EMFILE)),
                Err(io::Error::from_raw_os_error(nix::libc::EMFILE)),
                Ok(1),
                Err(io::Error::from_raw_os_error(nix::libc::ECONNABORTED)),
                Err(io::Error::from_raw_os_error(nix::libc::ENFILE)),
                Ok(2),
                Ok(3),
            ]
            .into(),
        ));
        let peer: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let (conn_tx, mut conn_rx) = tokio::sync::mpsc::unbounded_channel();
        let began = Instant::now();
        let looping = tokio::spawn(accept_loop(
            "test",
            move || {
                let next = script.lock().unwrap().pop_front();
                async move {
                    match next {
                        Some(result) => result.map(|c| (c, peer)),
                        // The script is done: wait like an idle listener.
                        None => std::future::pending().await,
                    }
                }
            },
            move |conn, _| {
                let _ = conn_tx.send(conn);
            },
        ));
        let mut got = Vec::new();
        for _ in 0..3 {
            got.push(conn_rx.recv().await.expect("the loop ended"));
        }
        assert_eq!(got, [1, 2, 3]);
        // Each error waited for the back-off (paused time: exact).
        assert_eq!(began.elapsed(), ACCEPT_BACKOFF * 4);
        assert!(!looping.is_finished());
        looping.abort();
    }
}
