//! `devloop-agent bridge`: stdin -> TCP and TCP -> stdout, so the cli can reach the agent
//! through `docker exec` when it cannot reach the container's address.

use std::net::SocketAddr;

use anyhow::Context;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

const BUF_BYTES: usize = 64 * 1024;

/// Copies until the socket side ends. On stdin EOF the socket's write side is shut down and
/// the socket is still read to its end.
pub async fn run(to: SocketAddr) -> anyhow::Result<()> {
    let socket = TcpStream::connect(to)
        .await
        .with_context(|| format!("cannot connect to the agent at {to}"))?;
    let _ = socket.set_nodelay(true);
    let (mut socket_rx, mut socket_tx) = socket.into_split();
    let upstream = tokio::spawn(async move {
        let mut stdin = tokio::io::stdin();
        let copied = copy_flushing(&mut stdin, &mut socket_tx).await;
        let _ = socket_tx.shutdown().await;
        copied
    });
    let mut stdout = tokio::io::stdout();
    let downstream = copy_flushing(&mut socket_rx, &mut stdout).await;
    upstream.abort();
    downstream.context("copying from the agent to stdout")?;
    Ok(())
}

/// Copies `from` to `to`, flushing after every write so nothing waits in a buffer.
pub async fn copy_flushing(
    from: &mut (impl AsyncRead + Unpin),
    to: &mut (impl AsyncWrite + Unpin),
) -> std::io::Result<u64> {
    let mut buf = vec![0u8; BUF_BYTES];
    let mut total = 0u64;
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            return Ok(total);
        }
        to.write_all(&buf[..n]).await?;
        to.flush().await?;
        total += n as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn copies_and_flushes() {
        let (mut a, mut b) = tokio::io::duplex(16);
        let data: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
        let expected = data.clone();
        let writer = tokio::spawn(async move {
            let mut src = &data[..];
            copy_flushing(&mut src, &mut a).await.unwrap()
        });
        let mut got = Vec::new();
        b.read_to_end(&mut got).await.unwrap();
        assert_eq!(writer.await.unwrap(), expected.len() as u64);
        assert_eq!(got, expected);
    }
}
