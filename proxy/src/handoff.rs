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
    let token = token.as_bytes();
    let len = u8::try_from(token.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "session token too long"))?;
    let mut req = Vec::with_capacity(REQUEST_MAGIC.len() + 1 + token.len() + 2);
    req.extend_from_slice(&REQUEST_MAGIC);
    req.push(len);
    req.extend_from_slice(token);
    req.extend_from_slice(&port.to_be_bytes());
    unix.write_all(&req).await?;
    let (status, fd) = unix
        .async_io(Interest::READABLE, || recv_status(unix.as_raw_fd()))
        .await?;
    match (status, fd) {
        (Some(STATUS_CONNECTED), Some(fd)) => {
            let std = std::net::TcpStream::from(fd);
            std.set_nonblocking(true)?;
            Ok(Answer::Connected(TcpStream::from_std(std)?))
        }
        (Some(STATUS_REFUSED), _) => {
            let len = unix.read_u16().await?;
            let mut text = vec![0; len as usize];
            unix.read_exact(&mut text).await?;
            Ok(Answer::Refused(String::from_utf8_lossy(&text).into_owned()))
        }
        (None, _) => Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the handoff socket closed without an answer",
        )),
        (Some(other), _) => Err(io::Error::new(
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

/// Reads one request.
pub async fn read_request(unix: &mut UnixStream) -> io::Result<Request> {
    let mut magic = [0u8; 4];
    unix.read_exact(&mut magic).await?;
    if magic != REQUEST_MAGIC {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "not a handoff request",
        ));
    }
    let len = unix.read_u8().await?;
    let mut token = vec![0; len as usize];
    unix.read_exact(&mut token).await?;
    let port = unix.read_u16().await?;
    Ok(Request {
        token: String::from_utf8_lossy(&token).into_owned(),
        port,
    })
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
    let text = &why.as_bytes()[..why.len().min(u16::MAX as usize)];
    let mut answer = Vec::with_capacity(3 + text.len());
    answer.push(STATUS_REFUSED);
    answer.extend_from_slice(&(text.len() as u16).to_be_bytes());
    answer.extend_from_slice(text);
    unix.write_all(&answer).await
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
    fn tokens_compare_whole() {
        assert!(token_matches("abc", "abc"));
        assert!(!token_matches("abd", "abc"));
        assert!(!token_matches("ab", "abc"));
    }
}
