//! `devloop-agent dev`: the sync root, the supervised process and the listener, started from
//! one [`DevConfig`] so that tests can run the real thing in-process.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::apply::Root;
use crate::error::AgentError;
use crate::guard::{accept_loop, Gate};
use crate::logs::Hub;
use crate::server::{serve_connection, Shared};
use crate::supervisor::{Supervisor, SupervisorConfig};

#[derive(Debug, Clone)]
pub struct DevConfig {
    /// The sync root; created if missing.
    pub root: PathBuf,
    pub listen: SocketAddr,
    /// The session token every connection must present.
    pub token: String,
    /// Working directory of the process; the root when `None`.
    pub workdir: Option<PathBuf>,
    /// SIGTERM to SIGKILL on stop and restart.
    pub grace: Duration,
    /// The supervised command (no shell); empty: sync only.
    pub command: Vec<String>,
    /// Copy the process's output to the agent's stdout/stderr too (for `docker logs`).
    pub mirror_output: bool,
}

/// Reads the token file: surrounding whitespace is dropped; missing or empty is an error.
pub fn read_token(path: &Path) -> Result<String, AgentError> {
    let text = std::fs::read_to_string(path).map_err(|e| AgentError::Token {
        path: path.to_path_buf(),
        reason: format!("cannot read it: {e}"),
    })?;
    let token = text.trim();
    if token.is_empty() {
        return Err(AgentError::Token {
            path: path.to_path_buf(),
            reason: "it is empty".into(),
        });
    }
    Ok(token.to_string())
}

/// A started agent: listening, process running.
pub struct DevAgent {
    listener: TcpListener,
    shared: Arc<Shared>,
    supervisor_task: JoinHandle<()>,
}

impl DevAgent {
    pub async fn start(config: DevConfig) -> anyhow::Result<DevAgent> {
        if config.token.is_empty() {
            anyhow::bail!("the session token is empty; pass --token-file with the cli's token");
        }
        std::fs::create_dir_all(&config.root)
            .with_context(|| format!("cannot create the sync root {}", config.root.display()))?;
        let root_dir = config
            .root
            .canonicalize()
            .with_context(|| format!("cannot resolve the sync root {}", config.root.display()))?;
        let workdir = config.workdir.clone().unwrap_or_else(|| root_dir.clone());
        let root = Root::open(root_dir)
            .with_context(|| format!("cannot open the sync root {}", config.root.display()))?;
        let listener = TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot listen on {} (--listen)", config.listen))?;
        let hub = Arc::new(Hub::new());
        let (supervisor, supervisor_task) = Supervisor::spawn(
            SupervisorConfig {
                argv: config.command.clone(),
                workdir: workdir.clone(),
                grace: config.grace,
                mirror_output: config.mirror_output,
            },
            hub.clone(),
        );
        let shared = Arc::new(Shared {
            root,
            workdir,
            token: config.token,
            hub,
            supervisor,
            mirror_output: config.mirror_output,
        });
        Ok(DevAgent {
            listener,
            shared,
            supervisor_task,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Accepts connections until `shutdown` resolves, then stops the process (grace, then
    /// kill) and returns.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        tracing::info!(
            listen = %self.local_addr()?,
            root = %self.shared.root.path().display(),
            "agent ready"
        );
        let mut conn_id = 0u64;
        let mut gate = Gate::new("dev");
        let listener = &self.listener;
        let shared = &self.shared;
        tokio::select! {
            () = shutdown => {}
            _ = accept_loop("dev", move || listener.accept(), |stream, peer| {
                conn_id += 1;
                // Beyond the places for unauthenticated sockets: closed at once (dropped).
                if let Some(place) = gate.admit() {
                    tokio::spawn(serve_connection(shared.clone(), stream, peer, conn_id, place));
                }
            }) => {}
        }
        tracing::info!("shutting down");
        self.shared.supervisor.shutdown().await;
        self.supervisor_task
            .await
            .context("the supervisor task failed")?;
        Ok(())
    }
}
