//! The destinations the engine dials: the original over TCP, a holder's laptop over a
//! stream of the tunnel its cli holds open.

use std::io;
use std::net::SocketAddr;

use devloop_proxy::tunnel::Mux;
use futures_util::future::BoxFuture;

use super::table::{BoxIo, Dialer};

/// The original (or anything else) reached over TCP.
pub struct TcpDialer {
    pub addr: SocketAddr,
    pub label: String,
}

impl Dialer for TcpDialer {
    fn dial(&self) -> BoxFuture<'_, io::Result<BoxIo>> {
        Box::pin(async move {
            let s = tokio::net::TcpStream::connect(self.addr).await?;
            s.set_nodelay(true)?;
            Ok(Box::pin(s) as BoxIo)
        })
    }

    fn name(&self) -> String {
        self.label.clone()
    }
}

/// A holder's laptop: each connection is a new stream of the tunnel of the holder's cli,
/// opened for `port` (the cli connects it to the laptop process, as for a replace intercept).
pub struct TunnelDialer {
    pub mux: Mux,
    pub port: u16,
    pub label: String,
}

impl Dialer for TunnelDialer {
    fn dial(&self) -> BoxFuture<'_, io::Result<BoxIo>> {
        Box::pin(async move {
            let stream = self.mux.open(self.port).await?;
            Ok(Box::pin(stream) as BoxIo)
        })
    }

    fn name(&self) -> String {
        self.label.clone()
    }
}
