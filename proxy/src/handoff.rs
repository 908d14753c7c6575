//! Handing laptop connections to an intercept's agent directly, when the agent's container
//! runs on the same machine as the cli (a local Docker engine).
//!
//! The tunnel carries a caller's connection over two relays: the agent, then the cli. When
//! the engine shares the cli's kernel, the cli can instead connect to the laptop port itself
//! and pass the connected socket to the agent over a Unix socket (`SCM_RIGHTS`) in a folder
//! bind-mounted into the agent's container. The agent then copies between the caller and
//! that socket: one relay, like a plain TCP proxy in the service's place, and the laptop
//! side of it on the host's loopback.
//!
//! One handoff per caller connection, on a fresh Unix connection:
//! - agent -> cli: [`REQUEST_MAGIC`], the session token's length (one byte) and bytes, then
//!   the service port (u16, big-endian);
//! - cli -> agent: one status byte. `0` carries the connected socket as its ancillary data;
//!   `1` is followed by a message (u16 big-endian length, UTF-8) saying why there is none.
//!
//! The agent treats any failure to get an answer (no socket, refused, a peer that is not the
//! cli) as "no handoff" and tunnels the connection instead.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use subtle::ConstantTimeEq;
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::{TcpStream, UnixListener, UnixStream};

/// The first bytes of a handoff request.
pub const REQUEST_MAGIC: [u8; 4] = *b"DLH1";
/// The socket's file name in its folder.
pub const SOCKET_NAME: &str = "handoff.sock";
/// Where the cli mounts the socket's folder in the agent's container.
pub const CONTAINER_DIR: &str = "/.devloop-handoff";

const STATUS_CONNECTED: u8 = 0;
const STATUS_REFUSED: u8 = 1;

/// What the cli answered.
#[derive(Debug)]
pub enum Answer {
    /// A socket connected to the laptop port.
    Connected(TcpStream),
    /// No connection, and why (nothing listens on the laptop port, say).
    Refused(String),
}

/// The agent's side: asks the cli at `socket` for a connection to the laptop process that
/// serves the service's `port`.
pub async fn request(socket: &Path, token: &str, port: u16) -> io::Result<Answer> {
    let mut unix = UnixStream::connect(socket).await?;
    let req = encode_request(token, port)?;
    unix.write_all(&req).await?;
    let (status, fd) = unix
        .async_io(Interest::READABLE, || recv_status(unix.as_raw_fd()))
        .await?;
    let Some(status) = status else {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the handoff socket closed without an answer",
        ));
    };
    let mut answer = vec![status];
    loop {
        match parse_answer(&answer, fd.is_some())? {
            Parsed::Need(total) => read_to(&mut unix, &mut answer, total).await?,
            Parsed::Done(AnswerHead::Refused(why), _) => return Ok(Answer::Refused(why)),
            Parsed::Done(AnswerHead::Connected, _) => {
                let Some(fd) = fd else {
                    // parse_answer only says Connected when a descriptor came with the status.
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("unexpected handoff answer {status}"),
                    ));
                };
                let std = std::net::TcpStream::from(fd);
                std.set_nonblocking(true)?;
                return Ok(Answer::Connected(TcpStream::from_std(std)?));
            }
        }
    }
}

/// How far a parser of a handoff message got with the bytes it was given.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed<T> {
    /// The message, and how many bytes it took.
    Done(T, usize),
    /// The message is longer: read until there are this many bytes (always more than given).
    Need(usize),
}

/// Reads from `unix` until `buf` holds `total` bytes.
async fn read_to(unix: &mut UnixStream, buf: &mut Vec<u8>, total: usize) -> io::Result<()> {
    let have = buf.len();
    buf.resize(total, 0);
    unix.read_exact(&mut buf[have..]).await?;
    Ok(())
}

/// The bytes of a request (see the module's description).
pub fn encode_request(token: &str, port: u16) -> io::Result<Vec<u8>> {
    let token = token.as_bytes();
    let len = u8::try_from(token.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "session token too long"))?;
    let mut req = Vec::with_capacity(REQUEST_MAGIC.len() + 1 + token.len() + 2);
    req.extend_from_slice(&REQUEST_MAGIC);
    req.push(len);
    req.extend_from_slice(token);
    req.extend_from_slice(&port.to_be_bytes());
    Ok(req)
}

/// What an answer says, apart from the descriptor a `Connected` one carries.
#[derive(Debug, PartialEq, Eq)]
pub enum AnswerHead {
    Connected,
    Refused(String),
}

/// Parses the cli's answer from its first bytes (the status byte first; `with_fd` says
/// whether a descriptor came with it). Never asks for more than 3 + 65,535 bytes.
pub fn parse_answer(bytes: &[u8], with_fd: bool) -> io::Result<Parsed<AnswerHead>> {
    let Some(&status) = bytes.first() else {
        return Ok(Parsed::Need(1));
    };
    match status {
        STATUS_CONNECTED if with_fd => Ok(Parsed::Done(AnswerHead::Connected, 1)),
        STATUS_REFUSED => {
            let Some(len) = bytes.get(1..3) else {
                return Ok(Parsed::Need(3));
            };
            let total = 3 + usize::from(u16::from_be_bytes([len[0], len[1]]));
            match bytes.get(3..total) {
                Some(text) => Ok(Parsed::Done(
                    AnswerHead::Refused(String::from_utf8_lossy(text).into_owned()),
                    total,
                )),
                None => Ok(Parsed::Need(total)),
            }
        }
        other => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unexpected handoff answer {other}"),
        )),
    }
}

/// Reads one status byte and the descriptor sent with it, if any.
#[allow(unsafe_code)]
fn recv_status(fd: RawFd) -> io::Result<(Option<u8>, Option<OwnedFd>)> {
    let mut byte = [0u8; 1];
    let mut space = nix::cmsg_space!(RawFd);
    let (read, mut fds) = {
        let mut iov = [io::IoSliceMut::new(&mut byte)];
        let msg = recvmsg::<()>(fd, &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)
            .map_err(io::Error::from)?;
        let mut fds = Vec::new();
        for c in msg.cmsgs().map_err(io::Error::from)? {
            if let ControlMessageOwned::ScmRights(received) = c {
                fds.extend(received);
            }
        }
        (msg.bytes, fds)
    };
    // SAFETY: the kernel installed these descriptors in this process for this message; no
    // one else holds them, so each is owned exactly once here.
    let mut owned: Vec<OwnedFd> = fds
        .drain(..)
        .map(|f| unsafe { OwnedFd::from_raw_fd(f) })
        .collect();
    if read == 0 {
        return Ok((None, None));
    }
    // More than one descriptor is not the protocol: keep the first, close the rest.
    let first = if owned.is_empty() {
        None
    } else {
        Some(owned.remove(0))
    };
    Ok((Some(byte[0]), first))
}

/// The cli's side: a listener for the agent's requests, with a backlog that holds a burst of
/// a thousand connections arriving at once.
pub fn listen(socket: &Path) -> io::Result<UnixListener> {
    let _ = std::fs::remove_file(socket);
    let sock = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None)?;
    sock.bind(&socket2::SockAddr::unix(socket)?)?;
    sock.listen(4096)?;
    sock.set_nonblocking(true)?;
    UnixListener::from_std(std::os::unix::net::UnixListener::from(OwnedFd::from(sock)))
}

/// A request read by the cli: the token the agent presented, and the service port.
#[derive(Debug, PartialEq, Eq)]
pub struct Request {
    pub token: String,
    pub port: u16,
}

/// Reads one request (and not a byte more).
pub async fn read_request(unix: &mut UnixStream) -> io::Result<Request> {
    let mut buf = Vec::new();
    loop {
        match parse_request(&buf)? {
            Parsed::Done(request, _) => return Ok(request),
            Parsed::Need(total) => read_to(unix, &mut buf, total).await?,
        }
    }
}

/// Parses a request from its first bytes. Asks for the magic first, so a peer that is not an
/// agent is refused before anything else is read; never asks for more than 4 + 1 + 255 + 2
/// bytes.
pub fn parse_request(bytes: &[u8]) -> io::Result<Parsed<Request>> {
    let Some(magic) = bytes.get(..REQUEST_MAGIC.len()) else {
        return Ok(Parsed::Need(REQUEST_MAGIC.len()));
    };
    if magic != REQUEST_MAGIC {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "not a handoff request",
        ));
    }
    let Some(&len) = bytes.get(REQUEST_MAGIC.len()) else {
        return Ok(Parsed::Need(REQUEST_MAGIC.len() + 1));
    };
    let token_at = REQUEST_MAGIC.len() + 1;
    let port_at = token_at + usize::from(len);
    let total = port_at + 2;
    let (Some(token), Some(port)) = (bytes.get(token_at..port_at), bytes.get(port_at..total))
    else {
        return Ok(Parsed::Need(total));
    };
    Ok(Parsed::Done(
        Request {
            token: String::from_utf8_lossy(token).into_owned(),
            port: u16::from_be_bytes([port[0], port[1]]),
        },
        total,
    ))
}

/// True when `given` is the session token. The comparison takes time that depends on the
/// lengths only, not on where the first difference is (`subtle`'s `ConstantTimeEq`).
pub fn token_matches(given: &str, expected: &str) -> bool {
    given.as_bytes().ct_eq(expected.as_bytes()).into()
}

/// Answers with `conn`: the agent receives its own descriptor of the socket, and the caller
/// may drop `conn` afterwards (the connection stays open in the agent).
pub async fn send_connection(unix: &UnixStream, conn: &TcpStream) -> io::Result<()> {
    let passed = [conn.as_raw_fd()];
    unix.async_io(Interest::WRITABLE, || {
        let iov = [io::IoSlice::new(&[STATUS_CONNECTED])];
        sendmsg::<()>(
            unix.as_raw_fd(),
            &iov,
            &[ControlMessage::ScmRights(&passed)],
            MsgFlags::MSG_NOSIGNAL,
            None,
        )
        .map(|_| ())
        .map_err(io::Error::from)
    })
    .await
}

/// Answers with no connection, saying why.
pub async fn send_refusal(unix: &mut UnixStream, why: &str) -> io::Result<()> {
    unix.write_all(&encode_refusal(why)).await
}

/// The bytes of a refusal: the status, then `why` cut to 65,535 bytes with its length.
pub fn encode_refusal(why: &str) -> Vec<u8> {
    let text = &why.as_bytes()[..why.len().min(u16::MAX as usize)];
    let mut answer = Vec::with_capacity(3 + text.len());
    answer.push(STATUS_REFUSED);
    answer.extend_from_slice(&(text.len() as u16).to_be_bytes());
    answer.extend_from_slice(text);
    answer
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// A cli that answers every request for port 80 with a connection to `laptop`, and
    /// refuses other ports.
    async fn serve(listener: UnixListener, token: &'static str, laptop: std::net::SocketAddr) {
        loop {
            let (mut unix, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let req = read_request(&mut unix).await.unwrap();
                if !token_matches(&req.token, token) {
                    return;
                }
                if req.port != 80 {
                    send_refusal(&mut unix, "port not intercepted")
                        .await
                        .unwrap();
                    return;
                }
                let conn = TcpStream::connect(laptop).await.unwrap();
                send_connection(&unix, &conn).await.unwrap();
            });
        }
    }

    #[tokio::test]
    async fn a_connection_crosses_the_socket_and_carries_data() {
        let dir = std::env::temp_dir().join(format!("devloop-handoff-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join(SOCKET_NAME);
        let laptop = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let laptop_addr = laptop.local_addr().unwrap();
        tokio::spawn(serve(listen(&socket).unwrap(), "secret", laptop_addr));
        tokio::spawn(async move {
            loop {
                let (mut s, _) = laptop.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut buf = [0u8; 5];
                    s.read_exact(&mut buf).await.unwrap();
                    buf.reverse();
                    s.write_all(&buf).await.unwrap();
                });
            }
        });

        let Answer::Connected(mut conn) = request(&socket, "secret", 80).await.unwrap() else {
            panic!("no connection handed over");
        };
        assert_eq!(conn.peer_addr().unwrap(), laptop_addr);
        conn.write_all(b"hello").await.unwrap();
        let mut back = [0u8; 5];
        conn.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"olleh");

        match request(&socket, "secret", 81).await.unwrap() {
            Answer::Refused(why) => assert_eq!(why, "port not intercepted"),
            other => panic!("expected a refusal, got {other:?}"),
        }
        // A wrong token gets no answer at all: the agent tunnels instead.
        assert!(request(&socket, "wrong!", 80).await.is_err());
        std::fs::remove_dir_all(&dir).unwrap();
        // No socket: an error, not a hang.
        assert!(request(&socket, "secret", 80).await.is_err());
    }

    #[test]
    fn requests_parse_back_and_every_cut_asks_for_more() {
        let bytes = encode_request("secret", 8080).unwrap();
        let want = Request {
            token: "secret".into(),
            port: 8080,
        };
        assert_eq!(
            parse_request(&bytes).unwrap(),
            Parsed::Done(want, bytes.len())
        );
        for cut in 0..bytes.len() {
            match parse_request(&bytes[..cut]).unwrap() {
                Parsed::Need(n) => assert!(n > cut && n <= bytes.len(), "cut {cut}: {n}"),
                done => panic!("cut {cut}: {done:?}"),
            }
        }
        assert!(parse_request(b"DLH2\x00\x00\x50").is_err());
        assert!(encode_request(&"x".repeat(256), 80).is_err());
    }

    #[test]
    fn answers_parse_back_and_every_cut_asks_for_more() {
        let bytes = encode_refusal("port not intercepted");
        let want = AnswerHead::Refused("port not intercepted".into());
        assert_eq!(
            parse_answer(&bytes, false).unwrap(),
            Parsed::Done(want, bytes.len())
        );
        for cut in 0..bytes.len() {
            match parse_answer(&bytes[..cut], false).unwrap() {
                Parsed::Need(n) => assert!(n > cut && n <= bytes.len(), "cut {cut}: {n}"),
                done => panic!("cut {cut}: {done:?}"),
            }
        }
        assert_eq!(
            parse_answer(&[STATUS_CONNECTED], true).unwrap(),
            Parsed::Done(AnswerHead::Connected, 1)
        );
        // Connected without a descriptor, or an unknown status, is not an answer.
        assert!(parse_answer(&[STATUS_CONNECTED], false).is_err());
        assert!(parse_answer(&[7], true).is_err());
        // A refusal longer than its length field can say is cut.
        let long = encode_refusal(&"y".repeat(70_000));
        assert_eq!(long.len(), 3 + usize::from(u16::MAX));
    }

    #[test]
    fn tokens_compare_whole() {
        assert!(token_matches("abc", "abc"));
        assert!(!token_matches("abd", "abc"));
        assert!(!token_matches("ab", "abc"));
    }
}
