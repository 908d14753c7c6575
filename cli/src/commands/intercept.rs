//! `devloop intercept`, `intercept list` and `leave`: a service's traffic to a process on the
//! laptop, for as long as `intercept` runs; the original back, exactly, when it ends.

use anyhow::Context;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream};

use futures_util::future::BoxFuture;
use tokio_util::sync::CancellationToken;

use super::connect_engine;
use crate::agent_link::{AgentLink, Connected};
use crate::backend::docker;
use crate::backend::docker_intercept::{self as di, Record};
use crate::backend::engine::EngineChoice;
use crate::backend::PortRef;
use crate::ownership;
use crate::state::{now_ms, TokenStore};
use crate::ui::{ago, human_ms};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expose {
    pub name: String,
    pub port: u16,
    pub local: u16,
}

impl std::str::FromStr for Expose {
    type Err = String;
    /// `NAME:PORT[:LOCAL]`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parts: Vec<&str> = s.split(':').collect();
        let port = |p: &str| {
            p.parse::<u16>()
                .map_err(|_| format!("{s:?}: {p:?} is not a port"))
        };
        match parts.as_slice() {
            [name, p] if !name.is_empty() => Ok(Expose {
                name: name.to_string(),
                port: port(p)?,
                local: port(p)?,
            }),
            [name, p, l] if !name.is_empty() => Ok(Expose {
                name: name.to_string(),
                port: port(p)?,
                local: port(l)?,
            }),
            _ => Err(format!("{s:?}: expected NAME:PORT[:LOCAL]")),
        }
    }
}

/// `REMOTE:LOCAL` (or one port for both). REMOTE may be a port's name (Kubernetes: a
/// container port's or a Service port's), which needs an explicit LOCAL.
pub fn parse_port(s: &str) -> Result<(PortRef, u16), String> {
    let port = |p: &str| {
        p.parse::<u16>()
            .map_err(|_| format!("{s:?}: {p:?} is not a port"))
    };
    let remote = |r: &str| match r.parse::<u16>() {
        Ok(n) => Ok(PortRef::Number(n)),
        Err(_) if !r.is_empty() && r.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') => {
            Ok(PortRef::Name(r.to_string()))
        }
        Err(_) => Err(format!(
            "{s:?}: {r:?} is neither a port number nor a port name"
        )),
    };
    match s.split_once(':') {
        Some((r, l)) => Ok((remote(r)?, port(l)?)),
        None => Ok((PortRef::Number(port(s)?), port(s)?)),
    }
}

pub struct InterceptOptions {
    pub target: String,
    /// Kubernetes: how long the intercept outlives a vanished cli (default 15 min).
    pub lease: Option<Duration>,
    pub ports: Vec<(PortRef, u16)>,
    pub env_file: Option<PathBuf>,
    pub expose: Vec<Expose>,
    /// Docker: tunnel every connection even where a handoff would work.
    pub tunnel: bool,
    pub command: Vec<String>,
}

/// Environment values naming an exposed service (`http://db:5432`, `db:5432`) point at its
/// laptop address instead.
pub fn rewrite_env(env: &[(String, String)], expose: &[Expose]) -> Vec<(String, String)> {
    env.iter()
        .map(|(k, v)| {
            let mut v = v.clone();
            for e in expose {
                v = v.replace(
                    &format!("{}:{}", e.name, e.port),
                    &format!("127.0.0.1:{}", e.local),
                );
            }
            (k.clone(), v)
        })
        .collect()
}

/// Variables of the container that would break a laptop process.
const LAPTOP_KEEPS: &[&str] = &[
    "PATH", "HOME", "HOSTNAME", "TERM", "USER", "SHELL", "LANG", "PWD",
];

/// One intercept on some target: what the lifecycle in [`hold`] needs. Docker implements it
/// with a container swap ([`DockerSwap`]), Kubernetes with a pod template swap
/// ([`super::intercept_k8s::KubeSwap`]); the tunnel, the laptop command, the exposes, the
/// reconnects and the restore on exit are the same code for both.
pub trait Swap: Send + Sync {
    /// The original's name, for messages.
    fn original(&self) -> String;
    /// The name `leave` takes.
    fn service(&self) -> String;
    /// The resource's key in the ownership records ([`crate::ownership`]).
    fn owner_key(&self) -> String;
    /// (port in the container, laptop port), names resolved.
    fn ports(&self) -> Vec<(u16, u16)>;
    /// The original's environment, for the laptop command.
    fn env(&self) -> Vec<(String, String)>;
    /// Persists the restore record, then puts the agent in the original's place. Runs to its
    /// end once started (no request is cut off halfway); waits inside it return early on
    /// shutdown, and [`hold`] restores whatever it changed.
    fn swap_in<'a>(
        &'a self,
        token: &'a str,
        expose: &'a [Expose],
    ) -> BoxFuture<'a, anyhow::Result<()>>;
    /// A fresh control connection to the agent.
    fn connect<'a>(&'a self, token: &'a str) -> BoxFuture<'a, anyhow::Result<Connected>>;
    /// True when `leave` (from any shell) ended this intercept.
    fn ended_elsewhere(&self) -> BoxFuture<'_, bool>;
    /// Puts the original back and removes what the swap added; also when the swap stopped
    /// halfway or never started (then it changes nothing that was not this session's).
    fn restore(&self) -> BoxFuture<'_, anyhow::Result<()>>;
    /// Where the swap's time went, for the "intercepted in" line.
    fn detail(&self) -> Option<String> {
        None
    }
}

pub async fn intercept(global: &super::Global, opts: InterceptOptions) -> anyhow::Result<()> {
    devloop_proxy::tunnel::raise_open_files_limit();
    if opts.ports.is_empty() {
        anyhow::bail!("say which port to intercept: --port REMOTE:LOCAL (REMOTE is the port the service listens on in its container)");
    }
    let project = super::load_project(global).ok();
    match super::choose_target(global, project.as_ref()) {
        super::TargetChoice::Docker => {
            let swap = DockerSwap::new(&opts, project.map(|p| p.name)).await?;
            hold(&swap, &opts, crate::signals::shutdown()).await
        }
        super::TargetChoice::Kubernetes { settings, registry } => {
            let swap =
                super::intercept_k8s::KubeSwap::new(&settings, registry.as_deref(), &opts).await?;
            hold(&swap, &opts, crate::signals::shutdown()).await
        }
    }
}

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
    async fn new(opts: &InterceptOptions, here: Option<String>) -> anyhow::Result<DockerSwap> {
        let (docker, engine) = connect_engine().await?;
        // In a project folder, its own service is meant when several projects have one so named.
        if let Some(r) = di::load_records().into_iter().find(|r| {
            (r.service == opts.target && here.as_deref().is_none_or(|h| h == r.project))
                || r.original_name == opts.target
        }) {
            return Err(already_intercepted(&r));
        }
        let original = di::find_target(&docker, &opts.target, here.as_deref()).await?;
        let orig_name = di::container_name(&original);
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
        let (_, agent) = super::read_agent_binary()?;
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
async fn same_machine(docker: &bollard::Docker) -> bool {
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
async fn serve_handoffs(
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
                    super::refusals::report(&service, req.port, local, &e);
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

/// How an intercept's hold ended without an error.
enum End {
    /// `leave` from another shell restored it already.
    Elsewhere,
    /// Restore now; the reason is said with it.
    Restore(&'static str),
}

/// The intercept's lifetime, on any target: a guard from its first change. The ownership
/// claim comes first (a cli that loses it changes nothing); then swap, tunnel, the laptop
/// command; and whatever ends it (the command's exit, a signal at any step, any error) ends
/// with the original restored and the claim released, or `leave` from another shell having
/// done that already. `shutdown` ends it as Ctrl-C does (the cli passes the one its signal
/// handler cancels, [`crate::signals::shutdown`]).
pub async fn hold(
    swap: &dyn Swap,
    opts: &InterceptOptions,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let (orig_name, service) = (swap.original(), swap.service());
    let token = crate::state::new_token();
    let holder = ownership::Holder::new(&token[..16], ownership::Kind::Replace);
    let claim = ownership::Claim::acquire(&swap.owner_key(), &orig_name, holder).map_err(|e| match e {
        ownership::ClaimError::Held { holder, .. } => anyhow::anyhow!(
            "{orig_name} is already intercepted (by {}, {}); end that with `devloop leave {service}`",
            holder.who,
            ago(holder.started_ms)
        ),
        e => e.into(),
    })?;
    // What can fail before anything changes fails here, with nothing to undo.
    let env = rewrite_env(&swap.env(), &opts.expose);
    if let Some(path) = &opts.env_file {
        write_env_file(path, &env)?;
        eprintln!(
            "devloop: wrote the environment of {orig_name} to {}",
            path.display()
        );
    }
    if let Some(program) = opts.command.first() {
        find_program(program)?;
    }
    if shutdown.is_cancelled() {
        let _ = claim.release();
        return Ok(());
    }

    let outcome = hold_swapped(swap, opts, &token, &env, &shutdown).await;
    let t = Instant::now();
    let said = match &outcome {
        Ok(End::Elsewhere) => {
            let _ = claim.release();
            return Ok(());
        }
        Ok(End::Restore(reason)) => reason.to_string(),
        Err(e) if e.is::<crate::signals::Interrupted>() => "interrupted".to_string(),
        Err(e) => format!("{e:#}"),
    };
    if outcome.is_err() {
        eprintln!("devloop: {said}; restoring {orig_name}");
    }
    if let Err(restore_err) = swap.restore().await {
        // The claim is kept: the changes are still in place, `leave` finishes the restore.
        let restore_err = restore_err.context(format!(
            "restoring {orig_name} failed too; `devloop leave {service}` tries again"
        ));
        return Err(match outcome {
            Err(e) if !e.is::<crate::signals::Interrupted>() => {
                anyhow::anyhow!("{e:#}; and {restore_err:#}")
            }
            _ => restore_err,
        });
    }
    if let Err(e) = claim.release() {
        tracing::warn!(error = %e, "cannot update the ownership record");
    }
    match outcome {
        Ok(_) => {
            eprintln!(
                "devloop: {said}; {orig_name} restored in {}",
                human_ms(t.elapsed().as_millis() as u64)
            );
            Ok(())
        }
        Err(e) if e.is::<crate::signals::Interrupted>() => {
            eprintln!(
                "devloop: interrupted; {orig_name} restored in {}",
                human_ms(t.elapsed().as_millis() as u64)
            );
            Ok(())
        }
        Err(e) => {
            eprintln!("devloop: {orig_name} restored");
            Err(e)
        }
    }
}

/// `--env-file`: the laptop command's environment (Secret values among it), readable by
/// the user only, written whole or not at all.
fn write_env_file(path: &std::path::Path, env: &[(String, String)]) -> anyhow::Result<()> {
    let text: String = env.iter().map(|(k, v)| format!("{k}={v}\n")).collect();
    crate::state::write_atomic(path, text.as_bytes(), 0o600)
        .with_context(|| format!("writing --env-file {}", path.display()))
}

/// The laptop command's program, found as the spawn will find it: a path with a `/` as
/// it is, else through `PATH`. A typo is refused before the service is touched.
fn find_program(program: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let runnable = |p: &std::path::Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    let found = if program.contains('/') {
        runnable(std::path::Path::new(program))
    } else {
        std::env::var_os("PATH")
            .map(|path| std::env::split_paths(&path).any(|d| runnable(&d.join(program))))
            .unwrap_or(false)
    };
    if found {
        Ok(())
    } else {
        anyhow::bail!(
            "cannot run `{program}`: no such executable{}; nothing was changed",
            if program.contains('/') {
                ""
            } else {
                " on PATH"
            }
        )
    }
}

/// The part of [`hold`] during which the service may be changed: every error and every
/// interruption returns to `hold`, which restores.
async fn hold_swapped(
    swap: &dyn Swap,
    opts: &InterceptOptions,
    token: &str,
    env: &[(String, String)],
    shutdown: &CancellationToken,
) -> anyhow::Result<End> {
    use crate::signals::{check, unless_cancelled};
    let (orig_name, service) = (swap.original(), swap.service());
    let started = Instant::now();
    swap.swap_in(token, &opts.expose)
        .await
        .context("the swap failed")?;
    check(shutdown)?;

    // Listeners for exposed services on the laptop.
    let mux_slot: Arc<Mutex<Option<devloop_proxy::tunnel::Mux>>> = Arc::default();
    for (i, e) in opts.expose.iter().enumerate() {
        let listener = TcpListener::bind(("127.0.0.1", e.local))
            .await
            .with_context(|| {
                format!(
                    "listening on 127.0.0.1:{} for --expose {}:{}",
                    e.local, e.name, e.port
                )
            })?;
        tokio::spawn(expose_loop(listener, i as u16, mux_slot.clone()));
    }
    let resolved = swap.ports();
    let locals: HashMap<u16, u16> = resolved.iter().copied().collect();
    let link = unless_cancelled(shutdown, swap.connect(token))
        .await?
        .context("cannot reach the agent")?;
    start_tunnel(&link, &locals, &mux_slot, &service);
    let mut ports: Vec<String> = resolved
        .iter()
        .map(|(r, l)| format!("{r} -> laptop {l}"))
        .collect();
    ports.extend(swap.detail());
    eprintln!(
        "devloop: {orig_name} intercepted in {} ({}); `devloop leave {service}` or Ctrl-C restores it",
        human_ms(started.elapsed().as_millis() as u64),
        ports.join(", ")
    );

    let mut child = if opts.command.is_empty() {
        None
    } else {
        let mut c = tokio::process::Command::new(&opts.command[0]);
        c.args(&opts.command[1..]).kill_on_drop(true);
        for (k, v) in env
            .iter()
            .filter(|(k, _)| !LAPTOP_KEEPS.contains(&k.as_str()))
        {
            c.env(k, v);
        }
        Some(
            c.spawn()
                .with_context(|| format!("starting `{}`", opts.command.join(" ")))?,
        )
    };

    let mut link = link;
    let end = loop {
        tokio::select! {
            _ = shutdown.cancelled() => break End::Restore("interrupted"),
            status = async { match child.as_mut() { Some(c) => c.wait().await.ok(), None => std::future::pending().await } } => {
                eprintln!("devloop: `{}` exited ({})", opts.command.join(" "), status.map(|s| s.to_string()).unwrap_or_default());
                break End::Restore("the command exited");
            }
            _ = link.link.closed() => {
                if swap.ended_elsewhere().await {
                    eprintln!("devloop: the intercept was ended elsewhere (`devloop leave`); exiting");
                    break End::Elsewhere;
                }
                eprintln!("devloop: the tunnel to the agent is down; reconnecting (callers of {service} get closed connections meanwhile)");
                loop {
                    match unless_cancelled(shutdown, swap.connect(token)).await? {
                        Ok(l) => {
                            link = l;
                            start_tunnel(&link, &locals, &mux_slot, &service);
                            eprintln!("devloop: tunnel back up");
                            break;
                        }
                        Err(_) if swap.ended_elsewhere().await => break,
                        Err(e) => eprintln!("devloop: cannot reach the agent yet: {e:#}"),
                    }
                }
            }
        }
    };
    if let Some(c) = child.as_mut() {
        let _ = c.kill().await;
    }
    link.link.close();
    Ok(end)
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

fn start_tunnel(
    link: &Connected,
    locals: &HashMap<u16, u16>,
    slot: &Arc<Mutex<Option<devloop_proxy::tunnel::Mux>>>,
    service: &str,
) {
    let (mux, mut incoming) = link.link.open_tunnel();
    // A connection that dies silently (a network cut, a laptop asleep) sends no close: a
    // ping every second that goes unanswered for two ends it, so the reconnect starts.
    let watched = link.link.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            tokio::select! {
                r = watched.ping(Duration::from_secs(2)) => if r.is_err() { watched.close(); break; },
                _ = watched.closed() => break,
            }
        }
    });
    *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(mux);
    let locals = locals.clone();
    let service = service.to_string();
    tokio::spawn(async move {
        while let Some((remote, stream)) = incoming.accept().await {
            let Some(local) = locals.get(&remote).copied() else {
                stream.reset(&format!("port {remote} is not intercepted"));
                continue;
            };
            let service = service.clone();
            tokio::spawn(async move {
                match TcpStream::connect(("127.0.0.1", local)).await {
                    Ok(mut tcp) => {
                        let _ = tcp.set_nodelay(true);
                        let _ = stream.bridge(&mut tcp).await;
                    }
                    Err(e) => {
                        super::refusals::report(&service, remote, local, &e);
                        stream.reset(&format!("nothing listens on the laptop's port {local}"));
                    }
                }
            });
        }
    });
}

async fn expose_loop(
    listener: TcpListener,
    index: u16,
    slot: Arc<Mutex<Option<devloop_proxy::tunnel::Mux>>>,
) {
    while let Ok((mut tcp, _)) = listener.accept().await {
        let mux = slot.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let Some(mux) = mux else { continue };
        tokio::spawn(async move {
            let _ = tcp.set_nodelay(true);
            if let Ok(stream) = mux.open(index).await {
                let _ = stream.bridge(&mut tcp).await;
            }
        });
    }
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

pub async fn list(global: &super::Global) -> anyhow::Result<()> {
    let project = super::load_project(global).ok();
    if let super::TargetChoice::Kubernetes { settings, .. } =
        super::choose_target(global, project.as_ref())
    {
        return super::intercept_k8s::list(&settings).await;
    }
    let (docker, _) = connect_engine().await?;
    let agents = di::agents(&docker).await?;
    let records = di::load_records();
    if agents.is_empty() && records.is_empty() {
        println!("no active intercepts");
        return Ok(());
    }
    let mut seen = Vec::new();
    for r in &records {
        let agent = agents
            .iter()
            .find(|a| docker::label(a, di::INTERCEPT_OF) == Some(r.original_id.as_str()));
        let alive =
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(r.cli_pid as i32), None).is_ok();
        let state = match (agent.map(docker::is_running), alive) {
            (Some(true), true) => format!("active, held by pid {}", r.cli_pid),
            (Some(true), false) => {
                "ORPHANED: its cli is gone; `devloop leave` restores the original".to_string()
            }
            _ => {
                "BROKEN: the agent is missing and the original stopped; `devloop leave` restores it"
                    .to_string()
            }
        };
        let ports: Vec<String> = r.ports.iter().map(|(a, b)| format!("{a}->{b}")).collect();
        // The agent's command says how connections travel (`--handoff`: handed over).
        let path = match agent.and_then(|a| a.command.as_deref()) {
            Some(c) if c.contains("--handoff") => " (handed over)",
            Some(_) => " (tunnelled)",
            None => "",
        };
        println!(
            "{}  ({})  ports {}{path}  since {}  {state}",
            r.service,
            r.original_name,
            ports.join(","),
            ago(r.started_ms)
        );
        seen.push(r.original_id.clone());
    }
    for a in agents.iter().filter(|a| {
        !seen
            .iter()
            .any(|s| Some(s.as_str()) == docker::label(a, di::INTERCEPT_OF))
    }) {
        println!(
            "{}  ({})  ORPHANED: no restore record on this machine; `devloop leave {}` restores it from the agent's labels",
            docker::label(a, crate::backend::labels::SERVICE).unwrap_or("?"),
            docker::label(a, di::INTERCEPT_OF_NAME).unwrap_or("?"),
            docker::label(a, crate::backend::labels::SERVICE).unwrap_or("?")
        );
    }
    Ok(())
}

pub async fn leave(
    global: &super::Global,
    target: Option<String>,
    all: bool,
) -> anyhow::Result<()> {
    let project = super::load_project(global).ok();
    if let super::TargetChoice::Kubernetes { settings, .. } =
        super::choose_target(global, project.as_ref())
    {
        return super::intercept_k8s::leave(&settings, target, all).await;
    }
    let (docker, _) = connect_engine().await?;
    let mut records = di::load_records();
    // Intercepts known only from an agent container's labels (another machine's, or a lost
    // state folder) are restored from those labels.
    for a in di::agents(&docker).await? {
        let (Some(id), Some(name)) = (
            docker::label(&a, di::INTERCEPT_OF),
            docker::label(&a, di::INTERCEPT_OF_NAME),
        ) else {
            continue;
        };
        if !records.iter().any(|r| r.original_id == id) {
            records.push(Record {
                original_id: id.to_string(),
                original_name: name.to_string(),
                service: docker::label(&a, crate::backend::labels::SERVICE)
                    .unwrap_or(name)
                    .to_string(),
                project: docker::label(&a, crate::backend::labels::PROJECT)
                    .unwrap_or_default()
                    .to_string(),
                agent_container: a
                    .names
                    .as_ref()
                    .and_then(|n| n.first())
                    .map(|n| n.trim_start_matches('/').to_string())
                    .unwrap_or_default(),
                ports: Vec::new(),
                started_ms: 0,
                cli_pid: 0,
            });
        }
    }
    let chosen: Vec<Record> = match (&target, all) {
        (_, true) => records,
        (Some(t), false) => {
            let named: Vec<Record> = records
                .into_iter()
                .filter(|r| &r.service == t || &r.original_name == t)
                .collect();
            // Several projects' `api`: the current folder's project is meant.
            let here = project.as_ref().map(|p| p.name.clone());
            match here {
                Some(h) if named.len() > 1 && named.iter().any(|r| r.project == h) => {
                    named.into_iter().filter(|r| r.project == h).collect()
                }
                _ if named.len() > 1 => anyhow::bail!(
                    "`{t}` names several intercepts ({}); name the container instead",
                    named
                        .iter()
                        .map(|r| r.original_name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                _ => named,
            }
        }
        (None, false) => {
            anyhow::bail!("say which intercept to end (`devloop leave SERVICE`), or --all")
        }
    };
    if chosen.is_empty() {
        match target {
            Some(t) if !all => {
                anyhow::bail!("`{t}` is not intercepted (`devloop intercept list` shows what is)")
            }
            _ => {
                println!("no active intercepts");
                return Ok(());
            }
        }
    }
    for r in chosen {
        let t = Instant::now();
        di::restore(&docker, &r).await?;
        ownership::clear(&di::owner_key(&r.original_name));
        println!(
            "{} restored ({}) in {}",
            r.service,
            r.original_name,
            human_ms(t.elapsed().as_millis() as u64)
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_and_exposes_parse() {
        assert_eq!(parse_port("8080:3000"), Ok((PortRef::Number(8080), 3000)));
        assert_eq!(parse_port("8080"), Ok((PortRef::Number(8080), 8080)));
        assert_eq!(
            parse_port("http:3000"),
            Ok((PortRef::Name("http".into()), 3000))
        );
        assert!(parse_port("http").is_err());
        assert!(parse_port("a/b:1").is_err());
        assert!(parse_port("8080:x").is_err());
        assert_eq!(
            "db:5432".parse::<Expose>(),
            Ok(Expose {
                name: "db".into(),
                port: 5432,
                local: 5432
            })
        );
        assert_eq!(
            "db:5432:15432".parse::<Expose>(),
            Ok(Expose {
                name: "db".into(),
                port: 5432,
                local: 15432
            })
        );
        assert!(":1".parse::<Expose>().is_err());
    }

    #[test]
    fn env_values_pointing_at_exposed_services_are_rewritten() {
        let env = vec![
            ("DB".into(), "postgres://u@db:5432/x".into()),
            ("API".into(), "http://api:8000".into()),
            ("N".into(), "db".into()),
        ];
        let out = rewrite_env(
            &env,
            &[Expose {
                name: "db".into(),
                port: 5432,
                local: 15432,
            }],
        );
        assert_eq!(out[0].1, "postgres://u@127.0.0.1:15432/x");
        assert_eq!(out[1].1, "http://api:8000");
        assert_eq!(out[2].1, "db");
    }
}
