//! Docker's [`Swap`]: the original container is stopped and an agent container takes its
//! place on every network, with its aliases and ports (`docker_intercept`); on an engine of
//! this machine the cli hands each caller's connection to the agent over a Unix socket
//! instead of tunnelling it.

use anyhow::Context;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

use futures_util::future::BoxFuture;

use super::intercept::{self as di, Record};
use crate::agent_link::{AgentLink, Connected};
use crate::backend::docker;
use crate::engine::EngineChoice;
use crate::intercept::{refusals, Expose, InterceptOptions, PortRef, Swap};
use crate::ownership;
use crate::state::{now_ms, TokenStore};
use crate::ui::ago;

/// A container swapped for an agent container on the same networks.
pub struct DockerSwap {
    docker: bollard::Docker,
    engine: EngineChoice,
    original: bollard::models::ContainerInspectResponse,
    record: Record,
    agent: Vec<u8>,
    /// A local engine: the listener that hands the agent connections to the laptop, from the
    /// swap on (made only once the claim is held: its socket path is the service's).
    handoff: Mutex<Option<tokio::net::UnixListener>>,
    /// Whether connections are handed over (false once the handoff socket cannot be made).
    handing_off: std::sync::atomic::AtomicBool,
}

impl DockerSwap {
    /// Finds the container `opts.target` names (the project `here`'s first) and prepares
    /// its swap; changes nothing.
    pub async fn new(
        docker: bollard::Docker,
        engine: EngineChoice,
        agent: Vec<u8>,
        opts: &InterceptOptions,
        here: Option<String>,
    ) -> anyhow::Result<DockerSwap> {
        // In a project folder, its own service is meant when several projects have one so named.
        if let Some(r) = di::load_records().into_iter().find(|r| {
            (r.service == opts.target && here.as_deref().is_none_or(|h| h == r.project))
                || r.original_name == opts.target
        }) {
            return Err(already_intercepted(&r));
        }
        let original = di::find_target(&docker, &opts.target, here.as_deref()).await?;
        let orig_name = di::container_name(&original);
        super::routing::refuse_if_routed(&docker, &orig_name).await?;
        let orig_id = original.id.clone().unwrap_or_default();
        if let Some(r) = di::load_records()
            .into_iter()
            .find(|r| r.original_id == orig_id || r.original_name == orig_name)
        {
            return Err(already_intercepted(&r));
        }
        let (service, project) = di::service_of(&original);
        let mut ports = Vec::new();
        for (r, l) in &opts.ports {
            match r {
                PortRef::Number(n) => ports.push((*n, *l)),
                PortRef::Name(n) => anyhow::bail!("--port {n}:{l}: on Docker, REMOTE is the port number the service listens on in its container (port names are Kubernetes')"),
            }
        }
        let record = Record {
            original_id: orig_id,
            original_name: orig_name.clone(),
            service,
            project,
            agent_container: format!("{orig_name}-devloop-intercept"),
            ports,
            started_ms: now_ms(),
            cli_pid: std::process::id(),
        };
        let handing_off = !opts.tunnel && engine.is_local() && same_machine(&docker).await;
        Ok(DockerSwap {
            docker,
            engine,
            original,
            record,
            agent,
            handoff: Mutex::new(None),
            handing_off: std::sync::atomic::AtomicBool::new(handing_off),
        })
    }
}

/// The refusal for a service that a restore record says is intercepted: by a live cli, or
/// left by one that is gone (then `leave` restores it).
fn already_intercepted(r: &Record) -> anyhow::Error {
    let live = ownership::holders(&di::owner_key(&r.original_name))
        .into_iter()
        .find(|(_, alive)| *alive);
    match live {
        Some((h, _)) => anyhow::anyhow!(
            "{} is already intercepted (by {}, {}); end that with `devloop leave {}`",
            r.original_name,
            h.who,
            ago(h.started_ms),
            r.service
        ),
        None => anyhow::anyhow!(
            "{} is already intercepted, by a devloop that is gone (pid {}, {}); `devloop leave {}` restores it",
            r.original_name,
            r.cli_pid,
            ago(r.started_ms),
            r.service
        ),
    }
}

/// True when the engine runs on this machine's own kernel and host name: then a folder of
/// this machine mounted into a container is the same folder, and a socket passed through it
/// is usable on both sides. An engine in a VM (Docker Desktop), or a cli in a container of
/// its own, differs in one of the two.
pub(super) async fn same_machine(docker: &bollard::Docker) -> bool {
    let Ok(info) = docker.info().await else {
        return false;
    };
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .map(|s| s.trim().to_string())
            .ok()
    };
    let (host, kernel) = (
        read("/proc/sys/kernel/hostname"),
        read("/proc/sys/kernel/osrelease"),
    );
    host.is_some() && info.name == host && kernel.is_some() && info.kernel_version == kernel
}

fn listen_for_handoffs(agent_container: &str) -> std::io::Result<tokio::net::UnixListener> {
    let dir = di::handoff_dir(agent_container);
    crate::state::ensure_private_dir(&dir)?;
    devloop_proxy::handoff::listen(&dir.join(devloop_proxy::handoff::SOCKET_NAME))
}

/// Answers the agent's handoff requests: each gets a fresh connection to the laptop port of
/// the service port it names, passed over the Unix socket.
pub(super) async fn serve_handoffs(
    listener: tokio::net::UnixListener,
    token: String,
    locals: HashMap<u16, u16>,
    service: String,
) {
    use devloop_proxy::handoff;
    let announced = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let locals = Arc::new(locals);
    loop {
        let mut unix = match listener.accept().await {
            Ok((unix, _)) => unix,
            // Out of descriptors under a burst of callers, say: the agent tunnels what it
            // cannot hand over meanwhile, and accepting resumes once some are closed.
            Err(e) => {
                tracing::warn!(error = %e, "cannot accept a handoff request; retrying");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let (token, service, announced, locals) = (
            token.clone(),
            service.clone(),
            announced.clone(),
            locals.clone(),
        );
        tokio::spawn(async move {
            let Ok(Ok(req)) =
                tokio::time::timeout(Duration::from_secs(5), handoff::read_request(&mut unix))
                    .await
            else {
                return;
            };
            if !handoff::token_matches(&req.token, &token) {
                tracing::warn!("a handoff request with a wrong token; ignored");
                return;
            }
            let Some(local) = locals.get(&req.port).copied() else {
                let _ = handoff::send_refusal(
                    &mut unix,
                    &format!("port {} is not intercepted", req.port),
                )
                .await;
                return;
            };
            match TcpStream::connect(("127.0.0.1", local)).await {
                Ok(tcp) => {
                    let _ = tcp.set_nodelay(true);
                    if handoff::send_connection(&unix, &tcp).await.is_ok()
                        && !announced.swap(true, std::sync::atomic::Ordering::Relaxed)
                    {
                        eprintln!("devloop: calls to {service} reach the laptop directly (the engine runs on this machine: one relay, no tunnel)");
                    }
                }
                Err(e) => {
                    refusals::report(&service, req.port, local, &e);
                    let _ = handoff::send_refusal(
                        &mut unix,
                        &format!("nothing listens on the laptop's port {local}"),
                    )
                    .await;
                }
            }
        });
    }
}

impl Swap for DockerSwap {
    fn original(&self) -> String {
        self.record.original_name.clone()
    }

    fn service(&self) -> String {
        self.record.service.clone()
    }

    fn owner_key(&self) -> String {
        di::owner_key(&self.record.original_name)
    }

    fn ports(&self) -> Vec<(u16, u16)> {
        self.record.ports.clone()
    }

    fn env(&self) -> Vec<(String, String)> {
        di::env_of(&self.original)
    }

    fn swap_in<'a>(
        &'a self,
        token: &'a str,
        expose: &'a [Expose],
    ) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move {
            // Crash safety: the record is on disk before anything changes.
            di::save_record(&self.record).context("saving the restore record")?;
            TokenStore::new()
                .write(&self.record.agent_container, token)
                .context("saving the session token")?;
            let targets: Vec<String> = expose
                .iter()
                .map(|e| format!("{}:{}", e.name, e.port))
                .collect();
            use std::sync::atomic::Ordering;
            if self.handing_off.load(Ordering::Relaxed) {
                match listen_for_handoffs(&self.record.agent_container) {
                    Ok(l) => *self.handoff.lock().unwrap_or_else(|e| e.into_inner()) = Some(l),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot make the handoff socket; tunnelling every connection");
                        self.handing_off.store(false, Ordering::Relaxed);
                    }
                }
            }
            let listener = self
                .handoff
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take();
            let dir = listener
                .as_ref()
                .map(|_| di::handoff_dir(&self.record.agent_container));
            di::swap_in(
                &self.docker,
                &self.original,
                &self.record,
                &self.agent,
                token,
                &targets,
                dir.as_deref(),
            )
            .await?;
            if let Some(listener) = listener {
                let locals = self.record.ports.iter().copied().collect();
                tokio::spawn(serve_handoffs(
                    listener,
                    token.to_string(),
                    locals,
                    self.record.service.clone(),
                ));
            }
            Ok(())
        })
    }

    fn connect<'a>(&'a self, token: &'a str) -> BoxFuture<'a, anyhow::Result<Connected>> {
        Box::pin(connect_agent(
            &self.docker,
            &self.engine,
            &self.record.agent_container,
            token,
        ))
    }

    fn ended_elsewhere(&self) -> BoxFuture<'_, bool> {
        Box::pin(ended_elsewhere(&self.docker, &self.record))
    }

    fn restore(&self) -> BoxFuture<'_, anyhow::Result<()>> {
        Box::pin(async move { Ok(di::restore(&self.docker, &self.record).await?) })
    }

    fn detail(&self) -> Option<String> {
        self.handing_off
            .load(std::sync::atomic::Ordering::Relaxed)
            .then(|| "connections handed to the laptop directly".to_string())
    }
}

/// `leave` from another shell removes the record, then the agent container.
async fn ended_elsewhere(docker: &bollard::Docker, record: &Record) -> bool {
    !di::load_records()
        .iter()
        .any(|r| r.original_id == record.original_id)
        || matches!(
            docker
                .inspect_container(&record.agent_container, None)
                .await,
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404,
                ..
            })
        )
}

/// The agent over devloop-control when its address answers, else through `docker exec`.
async fn connect_agent(
    docker: &bollard::Docker,
    engine: &EngineChoice,
    container: &str,
    token: &str,
) -> anyhow::Result<Connected> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let attempt: anyhow::Result<Connected> = async {
            let info = docker.inspect_container(container, None).await?;
            let ip = info
                .network_settings
                .and_then(|n| n.networks)
                .and_then(|n| {
                    n.get(di::CONTROL_NETWORK)
                        .and_then(|e| e.ip_address.clone())
                })
                .filter(|ip| !ip.is_empty());
            if engine.is_local() {
                if let Some(ip) = ip {
                    let addr: SocketAddr = format!("{ip}:{}", devloop_proxy::AGENT_PORT).parse()?;
                    match tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(addr))
                        .await
                    {
                        Ok(Ok(s)) => {
                            let _ = s.set_nodelay(true);
                            return Ok(AgentLink::connect(s, token).await?);
                        }
                        // The address answers but the agent is not listening yet: retry the
                        // fast route rather than settle for the slow one.
                        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                            anyhow::bail!("the agent at {addr} is not listening yet")
                        }
                        _ => {}
                    }
                }
            }
            let io = docker::exec_transport_with(docker, container, "/devloop-agent").await?;
            Ok(AgentLink::connect(io, token).await?)
        }
        .await;
        match attempt {
            Ok(c) => return Ok(c),
            Err(e) if Instant::now() > deadline => {
                return Err(e.context(format!("connecting to the agent in {container}")))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}
