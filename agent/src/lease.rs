//! The intercept's lease on Kubernetes: when no cli has been connected for the lease time,
//! the agent restores the workload itself, with one API request: the JSON patch the cli
//! prepared (`restore.json`, for the API path in `restore-path`, both in the token Secret),
//! sent with the pod's ServiceAccount token over HTTPS to the in-cluster API address. The
//! ServiceAccount may patch only that one Deployment. No Kubernetes client library: one
//! hand-written HTTP/1.1 request over rustls.

use anyhow::Context;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::rustls;

const SERVICE_ACCOUNT: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// The most of the API server's answer the agent reads.
const MAX_ANSWER_BYTES: u64 = 64 * 1024;

#[derive(Debug, Clone)]
pub struct LeaseConfig {
    /// How long the agent waits without a cli before it restores.
    pub after: Duration,
    /// The folder holding `restore.json` and `restore-path`.
    pub restore_dir: PathBuf,
}

/// Waits until no cli has been connected for the lease time, then restores (retrying
/// every 5 s on failure). Returns after a successful restore.
pub async fn keep(config: LeaseConfig, connected: impl Fn() -> bool) {
    let mut last_seen = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if connected() {
            last_seen = Instant::now();
            continue;
        }
        if last_seen.elapsed() < config.after {
            continue;
        }
        tracing::warn!(
            after_secs = config.after.as_secs(),
            "no cli connected for the lease time: restoring the workload"
        );
        match restore(&config.restore_dir, Path::new(SERVICE_ACCOUNT)).await {
            Ok(status) => {
                tracing::info!(status, "workload restored by the lease");
                return;
            }
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "restoring failed; retrying in 5 s");
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        }
    }
}

/// Sends the restore patch. Ok(status) also when the Deployment no longer carries this
/// intercept (the patch's test fails with 422: someone ran `leave` meanwhile).
pub async fn restore(dir: &Path, service_account: &Path) -> anyhow::Result<u16> {
    let token = std::fs::read_to_string(service_account.join("token"))
        .context("reading the ServiceAccount token")?;
    let ca = std::fs::read(service_account.join("ca.crt")).context("reading the cluster CA")?;
    let path = std::fs::read_to_string(dir.join("restore-path")).context("reading restore-path")?;
    let body = std::fs::read(dir.join("restore.json")).context("reading restore.json")?;
    let host = std::env::var("KUBERNETES_SERVICE_HOST")
        .context("KUBERNETES_SERVICE_HOST is not set: not in a pod")?;
    let port: u16 = std::env::var("KUBERNETES_SERVICE_PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(443);

    let mut roots = rustls::RootCertStore::empty();
    use rustls::pki_types::pem::PemObject;
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(&ca) {
        roots
            .add(cert.context("parsing ca.crt")?)
            .context("adding the cluster CA")?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from(host.clone())
        .context("the API server's address")?;
    let tcp = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::net::TcpStream::connect((host.as_str(), port)),
    )
    .await
    .context("connecting to the API server timed out")??;
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .context("TLS with the API server")?;
    let head = format!(
        "PATCH {} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {}\r\nContent-Type: application/json-patch+json\r\nAccept: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        path.trim(),
        token.trim(),
        body.len()
    );
    tls.write_all(head.as_bytes()).await?;
    tls.write_all(&body).await?;
    tls.flush().await?;
    let mut response = Vec::new();
    // The server closes after the response (Connection: close); a TLS close without
    // close_notify is not an error here, the status line is what counts.
    // Only the status line and the start of the body are used: the rest is not held.
    let _ = tokio::time::timeout(
        Duration::from_secs(20),
        (&mut tls).take(MAX_ANSWER_BYTES).read_to_end(&mut response),
    )
    .await;
    answer_status(&response)
}

/// The status of the API server's answer to the restore request: Ok for success and for the
/// answers that mean there is nothing left to restore (422, 409, 404), an error that quotes
/// the answer otherwise.
pub fn answer_status(response: &[u8]) -> anyhow::Result<u16> {
    let text = String::from_utf8_lossy(response);
    let status: u16 = text
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .with_context(|| {
            format!(
                "no HTTP status in the API server's answer: {:?}",
                text.chars().take(200).collect::<String>()
            )
        })?;
    match status {
        200 | 422 | 409 | 404 => Ok(status),
        _ => anyhow::bail!(
            "the API server answered {status}: {}",
            text.split("\r\n\r\n")
                .nth(1)
                .unwrap_or("")
                .chars()
                .take(500)
                .collect::<String>()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_give_their_status() {
        assert_eq!(answer_status(b"HTTP/1.1 200 OK\r\n\r\n{}").unwrap(), 200);
        assert_eq!(
            answer_status(b"HTTP/1.1 422 Unprocessable\r\n").unwrap(),
            422
        );
        let err = answer_status(b"HTTP/1.1 403 Forbidden\r\n\r\nno").unwrap_err();
        assert_eq!(err.to_string(), "the API server answered 403: no");
        assert!(answer_status(b"").is_err());
        assert!(answer_status(b"HTTP/1.1 99999 x").is_err());
    }
}
