//! A port-forward over SPDY/3.1 (`portforward.k8s.io`), the protocol `kubectl
//! port-forward` speaks. The API server's WebSocket port-forward relays client data at a
//! third of the speed here (65 against 190 MiB/s laptop -> pod), so this is the route tried
//! first; [`super::portforward`] falls back to the WebSocket when a server refuses the
//! SPDY upgrade.
//!
//! Only what a port-forward uses is implemented: two client streams per port (`error`,
//! then `data`), DATA frames both ways, FIN for half-close, PING answered, RST_STREAM and
//! GOAWAY end it. Header blocks are sent as zlib *stored* blocks (the zlib stream SPDY
//! requires, uncompressed, without a preset dictionary, which a zlib reader accepts), and
//! the server's header blocks are skipped unread, so no compressor is needed. The peer
//! (Go's spdystream) keeps no flow-control windows, and none are kept here.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

use super::{Cluster, KubeError};

const VERSION: u16 = 3;
const SYN_STREAM: u16 = 1;
const RST_STREAM: u16 = 3;
const PING: u16 = 6;
const GOAWAY: u16 = 7;
const FLAG_FIN: u8 = 0x01;
const ERROR_STREAM: u32 = 1;
const DATA_STREAM: u32 = 3;

/// Why the SPDY route was not taken: the server said no to the upgrade (so the WebSocket
/// may work), or something else failed.
#[derive(Debug)]
pub enum SpdyError {
    Refused(String),
    Failed(KubeError),
}

/// SPDY header blocks as one zlib stream of stored blocks (the first one carries the zlib
/// header), each ended like a sync flush.
#[derive(Default)]
pub struct HeaderBlocks {
    started: bool,
}

impl HeaderBlocks {
    /// The compressed form of `pairs` for the next SYN_STREAM.
    pub fn block(&mut self, pairs: &[(&str, &str)]) -> Vec<u8> {
        let mut raw = Vec::new();
        raw.extend_from_slice(&(pairs.len() as u32).to_be_bytes());
        for (k, v) in pairs {
            raw.extend_from_slice(&(k.len() as u32).to_be_bytes());
            raw.extend_from_slice(k.as_bytes());
            raw.extend_from_slice(&(v.len() as u32).to_be_bytes());
            raw.extend_from_slice(v.as_bytes());
        }
        let mut out = Vec::with_capacity(raw.len() + 7);
        if !self.started {
            // CMF 0x78 (deflate, 32 KiB window), FLG 0x01: no preset dictionary, check ok.
            out.extend_from_slice(&[0x78, 0x01]);
            self.started = true;
        }
        // A non-final stored block: BFINAL 0, BTYPE 00, then LEN and its complement.
        let len = raw.len() as u16;
        out.push(0x00);
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&(!len).to_le_bytes());
        out.extend_from_slice(&raw);
        // An empty stored block, as a zlib sync flush ends: a reader hands out what it has
        // at this mark, instead of reading on for a next block the frame does not hold.
        out.extend_from_slice(&[0x00, 0x00, 0x00, 0xff, 0xff]);
        out
    }
}

fn control(kind: u16, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(8 + payload.len());
    f.extend_from_slice(&(0x8000 | VERSION).to_be_bytes());
    f.extend_from_slice(&kind.to_be_bytes());
    f.push(flags);
    f.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
    f.extend_from_slice(payload);
    f
}

pub fn syn_stream(id: u32, flags: u8, header_block: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(10 + header_block.len());
    p.extend_from_slice(&id.to_be_bytes());
    p.extend_from_slice(&0u32.to_be_bytes());
    // Priority 0 (highest), slot 0.
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(header_block);
    control(SYN_STREAM, flags, &p)
}

pub fn data_frame_header(id: u32, flags: u8, len: usize) -> [u8; 8] {
    let mut h = [0u8; 8];
    h[..4].copy_from_slice(&(id & 0x7fff_ffff).to_be_bytes());
    h[4] = flags;
    h[5..].copy_from_slice(&(len as u32).to_be_bytes()[1..]);
    h
}

/// One frame as read from the server (what the tests' fake server reads).
#[cfg(test)]
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    Data {
        stream: u32,
        fin: bool,
        data: Vec<u8>,
    },
    Control {
        kind: u16,
        flags: u8,
        payload: Vec<u8>,
    },
}

#[cfg(test)]
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<Frame> {
    use tokio::io::AsyncReadExt;
    let mut h = [0u8; 8];
    r.read_exact(&mut h).await?;
    let len = u32::from_be_bytes([0, h[5], h[6], h[7]]) as usize;
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).await?;
    if h[0] & 0x80 != 0 {
        Ok(Frame::Control {
            kind: u16::from_be_bytes([h[2], h[3]]),
            flags: h[4],
            payload,
        })
    } else {
        let stream = u32::from_be_bytes([h[0], h[1], h[2], h[3]]) & 0x7fff_ffff;
        Ok(Frame::Data {
            stream,
            fin: h[4] & FLAG_FIN != 0,
            data: payload,
        })
    }
}

/// Opens the port-forward to `pod`:`port` over SPDY; the returned stream carries the port's
/// bytes (EOF when the pod's side ends).
pub async fn open(
    cluster: &Cluster,
    pod: &str,
    port: u16,
) -> Result<SpdyStream<hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>>, SpdyError> {
    let failed = |message: String| {
        SpdyError::Failed(KubeError::Api {
            what: format!("port-forward to pod {pod}"),
            message,
        })
    };
    let path = format!(
        "/api/v1/namespaces/{}/pods/{pod}/portforward",
        cluster.namespace
    );
    let req = http::Request::post(&path)
        .header(http::header::CONNECTION, "Upgrade")
        .header(http::header::UPGRADE, "SPDY/3.1")
        .header("X-Stream-Protocol-Version", "portforward.k8s.io")
        .body(kube::client::Body::empty())
        .map_err(|e| failed(e.to_string()))?;
    let res = cluster.client.send(req).await.map_err(|e| {
        SpdyError::Failed(cluster.err(
            e,
            "create",
            "pods/portforward",
            format!("port-forward to pod {pod}"),
        ))
    })?;
    let status = res.status();
    if status == http::StatusCode::FORBIDDEN {
        return Err(SpdyError::Failed(KubeError::Forbidden {
            verb: "create".into(),
            resource: "pods/portforward".into(),
            namespace: cluster.namespace.clone(),
            message: format!("port-forward to pod {pod} refused"),
        }));
    }
    if status != http::StatusCode::SWITCHING_PROTOCOLS {
        return Err(SpdyError::Refused(format!(
            "the API server answered {status} to the SPDY upgrade"
        )));
    }
    let upgraded = hyper::upgrade::on(res)
        .await
        .map_err(|e| failed(format!("upgrading to SPDY: {e}")))?;
    let mut io = hyper_util::rt::TokioIo::new(upgraded);
    // kubectl's order: the error stream (closed for writing at once), then the data stream.
    let mut headers = HeaderBlocks::default();
    let port_s = port.to_string();
    let err_block = headers.block(&[
        ("port", &port_s),
        ("requestid", "0"),
        ("streamtype", "error"),
    ]);
    let data_block = headers.block(&[
        ("port", &port_s),
        ("requestid", "0"),
        ("streamtype", "data"),
    ]);
    let mut opening = syn_stream(ERROR_STREAM, 0, &err_block);
    opening.extend_from_slice(&data_frame_header(ERROR_STREAM, FLAG_FIN, 0));
    opening.extend_from_slice(&syn_stream(DATA_STREAM, 0, &data_block));
    io.write_all(&opening)
        .await
        .map_err(|e| failed(e.to_string()))?;
    io.flush().await.map_err(|e| failed(e.to_string()))?;
    Ok(SpdyStream::new(io, pod))
}

/// The port's data stream of a SPDY port-forward, framed and unframed in place: a write
/// becomes one DATA frame (header, then the caller's bytes handed straight to the
/// connection), a read hands out a DATA frame's payload read straight into the caller's
/// buffer. No task and no copy between the connection and the tunnel, which is what the
/// 100 MiB transfer through an intercept spends its time on besides the relays themselves.
///
/// Frames of other streams are skipped; a message on the error stream fails the read with
/// it; RST_STREAM, GOAWAY or a FIN on the data stream end it (EOF). A PING is answered with
/// the next write or flush (an intercept's link pings its agent every second), never from a
/// read: a read must not take over the write side's wake-up.
pub struct SpdyStream<T> {
    io: T,
    /// The header of the frame being read, `hdr_len` bytes of it so far.
    hdr: [u8; 8],
    hdr_len: usize,
    /// What the rest of the current frame is.
    body: Body,
    /// Bytes owed to the connection before anything new is written (a frame the connection
    /// took only in part, a PING's answer).
    pending: Vec<u8>,
    pending_at: usize,
    /// The data stream ended (FIN, RST_STREAM, GOAWAY): reads return EOF.
    ended: bool,
    fin_sent: bool,
    pod: String,
}

enum Body {
    /// Between frames: the next bytes are a header.
    None,
    /// Payload of the data stream, this many bytes left: the caller's.
    Data { left: usize, fin: bool },
    /// A payload to collect (a control frame, the error stream's message).
    Collect {
        left: usize,
        buf: Vec<u8>,
        kind: Collected,
    },
    /// A payload to drop (another stream's data).
    Skip { left: usize },
}

#[derive(Clone, Copy)]
enum Collected {
    Control(u16),
    Error,
}

/// The error of a connection that ended inside `what`.
fn cut_short(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        format!("the port-forward ended inside {what}"),
    )
}

/// The largest DATA frame written: the size of the tunnel's WebSocket messages and more.
const MAX_WRITE_FRAME: usize = 256 * 1024;

/// Frames up to this size are copied behind their header and written with it; larger ones
/// are written as they are, after a header of their own (the copy would cost more than the
/// one small record it saves per 64 KiB or more).
const COALESCE_MAX: usize = 64 * 1024;

impl<T> SpdyStream<T> {
    fn new(io: T, pod: &str) -> Self {
        SpdyStream {
            io,
            hdr: [0; 8],
            hdr_len: 0,
            body: Body::None,
            pending: Vec::new(),
            pending_at: 0,
            ended: false,
            fin_sent: false,
            pod: pod.to_string(),
        }
    }
}

impl<T: AsyncWrite + Unpin> SpdyStream<T> {
    /// Writes what is owed to the connection.
    fn poll_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.pending_at < self.pending.len() {
            let n =
                ready!(Pin::new(&mut self.io).poll_write(cx, &self.pending[self.pending_at..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.pending_at += n;
        }
        self.pending.clear();
        self.pending_at = 0;
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for SpdyStream<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.ended || buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            match &mut this.body {
                Body::Data { left, fin } => {
                    if *left == 0 {
                        let fin = *fin;
                        this.body = Body::None;
                        if fin {
                            this.ended = true;
                        }
                        continue;
                    }
                    let want = (*left).min(buf.remaining());
                    // Straight into the caller's buffer (already initialised when it is a
                    // Vec's, as tungstenite's is: then this costs nothing).
                    let mut part = ReadBuf::new(buf.initialize_unfilled_to(want));
                    ready!(Pin::new(&mut this.io).poll_read(cx, &mut part))?;
                    let n = part.filled().len();
                    if n == 0 {
                        return Poll::Ready(Err(cut_short("a frame")));
                    }
                    buf.advance(n);
                    *left -= n;
                    return Poll::Ready(Ok(()));
                }
                Body::Skip { left } if *left > 0 => {
                    let mut scratch = [0u8; 4096];
                    let want = (*left).min(scratch.len());
                    let mut rb = ReadBuf::new(&mut scratch[..want]);
                    ready!(Pin::new(&mut this.io).poll_read(cx, &mut rb))?;
                    if rb.filled().is_empty() {
                        return Poll::Ready(Err(cut_short("a frame")));
                    }
                    *left -= rb.filled().len();
                }
                Body::Skip { .. } => this.body = Body::None,
                Body::Collect {
                    left, buf: payload, ..
                } if *left > 0 => {
                    let start = payload.len();
                    payload.resize(start + *left, 0);
                    let mut rb = ReadBuf::new(&mut payload[start..]);
                    let polled = Pin::new(&mut this.io).poll_read(cx, &mut rb);
                    let n = rb.filled().len();
                    payload.truncate(start + n);
                    ready!(polled)?;
                    if n == 0 {
                        return Poll::Ready(Err(cut_short("a frame")));
                    }
                    *left -= n;
                }
                Body::Collect {
                    buf: payload, kind, ..
                } => {
                    let (payload, kind) = (std::mem::take(payload), *kind);
                    this.body = Body::None;
                    match kind {
                        Collected::Error => {
                            if !payload.is_empty() {
                                let message = String::from_utf8_lossy(&payload).into_owned();
                                tracing::warn!(pod = this.pod, error = %message, "the port-forward reported an error");
                                this.ended = true;
                                return Poll::Ready(Err(io::Error::other(format!(
                                    "the port-forward to pod {} failed: {message}",
                                    this.pod
                                ))));
                            }
                        }
                        Collected::Control(PING) => {
                            this.pending.extend_from_slice(&control(PING, 0, &payload));
                        }
                        Collected::Control(RST_STREAM | GOAWAY) => this.ended = true,
                        // SYN_REPLY, SETTINGS, WINDOW_UPDATE, HEADERS: nothing to do.
                        Collected::Control(_) => {}
                    }
                }
                Body::None => {
                    while this.hdr_len < 8 {
                        let mut rb = ReadBuf::new(&mut this.hdr[this.hdr_len..]);
                        ready!(Pin::new(&mut this.io).poll_read(cx, &mut rb))?;
                        let n = rb.filled().len();
                        if n == 0 {
                            if this.hdr_len == 0 {
                                // The connection ended between frames.
                                this.ended = true;
                                return Poll::Ready(Ok(()));
                            }
                            return Poll::Ready(Err(cut_short("a frame header")));
                        }
                        this.hdr_len += n;
                    }
                    this.hdr_len = 0;
                    let h = this.hdr;
                    let left = u32::from_be_bytes([0, h[5], h[6], h[7]]) as usize;
                    this.body = if h[0] & 0x80 != 0 {
                        Body::Collect {
                            left,
                            buf: Vec::with_capacity(left.min(4096)),
                            kind: Collected::Control(u16::from_be_bytes([h[2], h[3]])),
                        }
                    } else {
                        match u32::from_be_bytes([h[0], h[1], h[2], h[3]]) & 0x7fff_ffff {
                            DATA_STREAM => Body::Data {
                                left,
                                fin: h[4] & FLAG_FIN != 0,
                            },
                            ERROR_STREAM => Body::Collect {
                                left,
                                buf: Vec::with_capacity(left.min(4096)),
                                kind: Collected::Error,
                            },
                            _ => Body::Skip { left },
                        }
                    };
                }
            }
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for SpdyStream<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_pending(cx))?;
        if this.fin_sent {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "write on a port-forward after its shutdown",
            )));
        }
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        // From here the frame is committed: what the connection does not take now is owed.
        let len = buf.len().min(MAX_WRITE_FRAME);
        this.pending
            .extend_from_slice(&data_frame_header(DATA_STREAM, 0, len));
        let data = &buf[..len];
        if len <= COALESCE_MAX {
            // Header and payload in one write: the TLS layer makes a record per write, and
            // each record is a read, a forward and a wake-up in the API server, the kubelet
            // and the runtime. A lone 8-byte header record ahead of every small message
            // (a request, a response) doubles that work on the latency path.
            this.pending.extend_from_slice(data);
            if let Poll::Ready(Err(e)) = this.poll_pending(cx) {
                return Poll::Ready(Err(e));
            }
            return Poll::Ready(Ok(len));
        }
        match this.poll_pending(cx) {
            Poll::Ready(Ok(())) => match Pin::new(&mut this.io).poll_write(cx, data) {
                Poll::Ready(Ok(n)) => this.pending.extend_from_slice(&data[n..]),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => this.pending.extend_from_slice(data),
            },
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => this.pending.extend_from_slice(data),
        }
        Poll::Ready(Ok(len))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_pending(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    /// Half-closes: a FIN on the data stream. The connection stays open for the pod's side.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.fin_sent {
            ready!(this.poll_pending(cx))?;
            this.pending
                .extend_from_slice(&data_frame_header(DATA_STREAM, FLAG_FIN, 0));
            this.fin_sent = true;
        }
        ready!(this.poll_pending(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[test]
    fn header_blocks_are_one_zlib_stream_of_stored_blocks() {
        let mut h = HeaderBlocks::default();
        let first = h.block(&[("port", "80")]);
        // zlib header, then BFINAL=0/BTYPE=00, LEN, NLEN.
        assert_eq!(&first[..3], &[0x78, 0x01, 0x00]);
        assert_eq!((0x78u16 * 256 + 0x01) % 31, 0, "a valid zlib header check");
        let raw_len = 4 + 4 + 4 + 4 + 2;
        assert_eq!(u16::from_le_bytes([first[3], first[4]]) as usize, raw_len);
        assert_eq!(u16::from_le_bytes([first[5], first[6]]), !(raw_len as u16));
        assert_eq!(&first[7..11], &1u32.to_be_bytes());
        assert_eq!(&first[11..15], &4u32.to_be_bytes());
        assert_eq!(&first[15..19], b"port");
        // Later blocks continue the stream: no second zlib header.
        assert_eq!(
            &first[first.len() - 5..],
            &[0x00, 0x00, 0x00, 0xff, 0xff],
            "each block ends as a sync flush does"
        );
        let second = h.block(&[]);
        assert_eq!(
            second,
            vec![
                0x00,
                4,
                0,
                !4u16 as u8,
                (!4u16 >> 8) as u8,
                0,
                0,
                0,
                0,
                0x00,
                0x00,
                0x00,
                0xff,
                0xff
            ]
        );
    }

    #[tokio::test]
    async fn frames_round_trip() {
        let syn = syn_stream(3, FLAG_FIN, b"hb");
        assert_eq!(&syn[..4], &[0x80, 0x03, 0x00, 0x01]);
        assert_eq!(syn[4], FLAG_FIN);
        let mut r = &syn[..];
        match read_frame(&mut r).await.unwrap() {
            Frame::Control {
                kind,
                flags,
                payload,
            } => {
                assert_eq!((kind, flags), (SYN_STREAM, FLAG_FIN));
                assert_eq!(&payload[..4], &3u32.to_be_bytes());
                assert_eq!(&payload[10..], b"hb");
            }
            other => panic!("{other:?}"),
        }
        let mut bytes = data_frame_header(DATA_STREAM, 0, 5).to_vec();
        bytes.extend_from_slice(b"hello");
        bytes.extend_from_slice(&data_frame_header(DATA_STREAM, FLAG_FIN, 0));
        let mut r = &bytes[..];
        assert_eq!(
            read_frame(&mut r).await.unwrap(),
            Frame::Data {
                stream: 3,
                fin: false,
                data: b"hello".to_vec()
            }
        );
        assert_eq!(
            read_frame(&mut r).await.unwrap(),
            Frame::Data {
                stream: 3,
                fin: true,
                data: vec![]
            }
        );
    }

    /// A frame as the server side writes it.
    fn data(stream: u32, flags: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = data_frame_header(stream, flags, payload.len()).to_vec();
        f.extend_from_slice(payload);
        f
    }

    #[tokio::test]
    async fn the_stream_frames_writes_and_unframes_reads() {
        let (client, mut server) = tokio::io::duplex(1 << 20);
        let mut s = SpdyStream::new(client, "p");
        // Writes: one DATA frame each on the data stream, then FIN on shutdown.
        s.write_all(b"hello").await.unwrap();
        s.write_all(&vec![7u8; MAX_WRITE_FRAME + 10]).await.unwrap();
        s.shutdown().await.unwrap();
        assert_eq!(
            read_frame(&mut server).await.unwrap(),
            Frame::Data {
                stream: DATA_STREAM,
                fin: false,
                data: b"hello".to_vec()
            }
        );
        assert_eq!(
            read_frame(&mut server).await.unwrap(),
            Frame::Data {
                stream: DATA_STREAM,
                fin: false,
                data: vec![7; MAX_WRITE_FRAME]
            }
        );
        assert_eq!(
            read_frame(&mut server).await.unwrap(),
            Frame::Data {
                stream: DATA_STREAM,
                fin: false,
                data: vec![7; 10]
            }
        );
        assert_eq!(
            read_frame(&mut server).await.unwrap(),
            Frame::Data {
                stream: DATA_STREAM,
                fin: true,
                data: vec![]
            }
        );
        assert!(s.write_all(b"x").await.is_err(), "no writes after the FIN");

        // Reads: the data stream's payloads in order; other frames skipped or answered.
        let mut from_server = control(2, 0, &[0, 0, 0, 3, 0, 0]); // SYN_REPLY
        from_server.extend(data(DATA_STREAM, 0, b"abc"));
        from_server.extend(data(5, 0, &[9; 5000])); // another stream's: skipped
        from_server.extend(control(PING, 0, &42u32.to_be_bytes()));
        from_server.extend(data(ERROR_STREAM, FLAG_FIN, b""));
        from_server.extend(data(DATA_STREAM, 0, &[1; 70_000]));
        from_server.extend(data(DATA_STREAM, FLAG_FIN, b"z"));
        from_server.extend(data(DATA_STREAM, 0, b"after the FIN: never read"));
        server.write_all(&from_server).await.unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        let mut want = b"abc".to_vec();
        want.extend([1; 70_000]);
        want.push(b'z');
        assert_eq!(got.len(), want.len());
        assert!(got == want);
        // The PING is answered with the next flush.
        s.flush().await.unwrap();
        assert_eq!(
            read_frame(&mut server).await.unwrap(),
            Frame::Control {
                kind: PING,
                flags: 0,
                payload: 42u32.to_be_bytes().to_vec()
            }
        );
    }

    /// A connection that records the size of every write it is given.
    #[derive(Default)]
    struct Writes(Vec<usize>);

    impl AsyncWrite for Writes {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.get_mut().0.push(buf.len());
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn a_small_message_goes_out_in_one_write_with_its_header() {
        let mut s = SpdyStream::new(Writes::default(), "p");
        s.write_all(&[1; 300]).await.unwrap();
        s.write_all(&vec![2; COALESCE_MAX]).await.unwrap();
        assert_eq!(
            s.io.0,
            vec![8 + 300, 8 + COALESCE_MAX],
            "one write per small frame, header included"
        );
        s.io.0.clear();
        s.write_all(&vec![3; COALESCE_MAX + 1]).await.unwrap();
        assert_eq!(
            s.io.0,
            vec![8, COALESCE_MAX + 1],
            "a large frame is not copied"
        );
    }

    #[tokio::test]
    async fn an_error_stream_message_fails_the_read_with_it() {
        let (client, mut server) = tokio::io::duplex(4096);
        let mut s = SpdyStream::new(client, "web-1");
        let mut from_server = data(DATA_STREAM, 0, b"ok");
        from_server.extend(data(
            ERROR_STREAM,
            0,
            b"failed to connect to localhost:7700: connection refused",
        ));
        server.write_all(&from_server).await.unwrap();
        let mut buf = [0u8; 16];
        assert_eq!(s.read(&mut buf).await.unwrap(), 2);
        let e = s.read(&mut buf).await.unwrap_err();
        assert!(
            e.to_string().contains("pod web-1") && e.to_string().contains("connection refused"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn a_connection_cut_inside_a_frame_is_an_error_and_between_frames_an_eof() {
        let (client, mut server) = tokio::io::duplex(4096);
        let mut s = SpdyStream::new(client, "p");
        let mut cut = data(DATA_STREAM, 0, b"hello");
        cut.truncate(10);
        server.write_all(&cut).await.unwrap();
        drop(server);
        let mut got = Vec::new();
        assert!(s.read_to_end(&mut got).await.is_err());
        assert_eq!(got, b"he");

        let (client, mut server) = tokio::io::duplex(4096);
        let mut s = SpdyStream::new(client, "p");
        server
            .write_all(&data(DATA_STREAM, 0, b"hello"))
            .await
            .unwrap();
        drop(server);
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"hello");
    }
}
