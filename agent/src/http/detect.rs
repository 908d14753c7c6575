//! Telling HTTP/1.1, HTTP/2 with prior knowledge (h2c) and anything else apart from a
//! connection's first bytes.
//!
//! The caller speaks first in all three: an HTTP/2 client sends the 24-byte connection
//! preface, an HTTP/1 client a request line (`METHOD SP target`), a TLS client a handshake
//! record (first byte 0x16). At most [`PREFACE`]`.len()` bytes decide. A connection that
//! sends nothing is not guessed at: it waits for its first bytes as a server would (a client
//! pool may open connections early), so a protocol in which the server speaks first cannot
//! share a filtered port.

use std::io;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};

/// The HTTP/2 connection preface (RFC 9113, section 3.4).
pub const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The longest method an HTTP/1 request line may start with here (the registered ones are
/// at most 17 bytes: `VERSION-CONTROL`, `BASELINE-CONTROL`...).
const MAX_METHOD: usize = 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
    /// Not HTTP (TLS, or another protocol): the connection goes to the original as bytes.
    Other,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detect {
    Is(Protocol),
    NeedMore,
}

/// What the first bytes of a connection say. Never asks for more than [`PREFACE`]`.len()`
/// bytes in all.
pub fn classify(prefix: &[u8]) -> Detect {
    if prefix.is_empty() {
        return Detect::NeedMore;
    }
    let n = prefix.len().min(PREFACE.len());
    if prefix[..n] == PREFACE[..n] {
        return if n == PREFACE.len() {
            Detect::Is(Protocol::Http2)
        } else {
            Detect::NeedMore
        };
    }
    // `METHOD SP`: a token, then one space, then the request target's first byte.
    let token = prefix.iter().take_while(|&&b| is_tchar(b)).count();
    if token == 0 || token > MAX_METHOD {
        return Detect::Is(Protocol::Other);
    }
    match prefix.get(token) {
        None => Detect::NeedMore,
        Some(b' ') => match prefix.get(token + 1) {
            None => Detect::NeedMore,
            Some(b) if b.is_ascii_graphic() => Detect::Is(Protocol::Http1),
            Some(_) => Detect::Is(Protocol::Other),
        },
        Some(_) => Detect::Is(Protocol::Other),
    }
}

/// RFC 9110's `tchar`.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Reads a connection's first bytes until [`classify`] decides, and returns the protocol with
/// the bytes read (to be replayed in front of the rest). `idle` bounds the wait for each
/// read; a connection that sends nothing for that long, or closes, is an error.
pub async fn detect<S: AsyncRead + Unpin>(
    stream: &mut S,
    idle: Duration,
) -> io::Result<(Protocol, Vec<u8>)> {
    let mut buf = Vec::with_capacity(PREFACE.len());
    loop {
        if let Detect::Is(p) = classify(&buf) {
            return Ok((p, buf));
        }
        let mut chunk = [0u8; PREFACE.len()];
        let want = PREFACE.len() - buf.len();
        let n = tokio::time::timeout(idle, stream.read(&mut chunk[..want]))
            .await
            .map_err(|_| {
                io::Error::new(io::ErrorKind::TimedOut, "no request within the idle time")
            })??;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "closed before a request",
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_bytes_decide() {
        use Protocol::*;
        for (bytes, want) in [
            (&b"GET / HTTP/1.1\r\n"[..], Detect::Is(Http1)),
            (b"POST /v2/orders HTTP/1.1", Detect::Is(Http1)),
            (b"OPTIONS * HTTP/1.1", Detect::Is(Http1)),
            (b"CONNECT example:443 HTTP/1.1", Detect::Is(Http1)),
            (b"GET http://x/ HTTP/1.1", Detect::Is(Http1)),
            (PREFACE, Detect::Is(Http2)),
            (
                b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00",
                Detect::Is(Http2),
            ),
            (b"\x16\x03\x01\x02\x00", Detect::Is(Other)),
            (b"*1\r\n$4\r\nPING\r\n", Detect::Is(Other)),
            (b"\x00\x00\x00\x08\x04\xd2\x16\x2f", Detect::Is(Other)),
            (b"GET  /", Detect::Is(Other)),
            (b"GET\t/", Detect::Is(Other)),
            (b"SSH-2.0-OpenSSH_9.2\r\n", Detect::Is(Other)),
            (b"", Detect::NeedMore),
            (b"G", Detect::NeedMore),
            (b"GET", Detect::NeedMore),
            (b"GET ", Detect::NeedMore),
            (b"PRI * HTTP/2", Detect::NeedMore),
            // `PRI` that leaves the preface is a request line of its own.
            (b"PRI /x HTTP/1.1", Detect::Is(Http1)),
            (b"ABCDEFGHIJKLMNOPQRSTUVWXYZ /", Detect::Is(Other)),
        ] {
            assert_eq!(
                classify(bytes),
                want,
                "{:?}",
                String::from_utf8_lossy(bytes)
            );
        }
    }

    #[test]
    fn classify_never_needs_more_than_the_preface() {
        // Every 24-byte prefix decides.
        for b in 0..=255u8 {
            let mut buf = [b; PREFACE.len()];
            assert_ne!(classify(&buf), Detect::NeedMore, "{b}");
            buf[..3].copy_from_slice(b"GET");
            assert_ne!(classify(&buf), Detect::NeedMore, "{b}");
        }
    }

    #[tokio::test]
    async fn detect_reads_in_pieces_and_returns_what_it_read() {
        let (mut client, mut server) = tokio::io::duplex(64);
        let task = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            for piece in [&b"PRI * HT"[..], b"TP/2.0\r\n\r\nSM", b"\r\n\r\n", b"rest"] {
                client.write_all(piece).await.unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            client
        });
        let (p, read) = detect(&mut server, Duration::from_secs(5)).await.unwrap();
        assert_eq!(p, Protocol::Http2);
        assert_eq!(read, PREFACE);
        let _client = task.await.unwrap();

        let (client, mut server) = tokio::io::duplex(64);
        drop(client);
        let err = detect(&mut server, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);

        let (_client, mut server) = tokio::io::duplex(64);
        let err = detect(&mut server, Duration::from_millis(50))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }
}
