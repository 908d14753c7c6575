//! The intercept's lifecycle, written once for every back end: the [`Swap`] a back end
//! implements (put the agent in the original's place, reach it, restore), and [`hold`],
//! which owns the intercept from its first change to its restore: the ownership claim, the
//! checks that need no change, the swap, the tunnel to the laptop, the laptop command,
//! reconnects, and the restore on every way out. Docker's swap is
//! `backend::docker::swap`, Kubernetes' `backend::k8s::swap`.

pub mod refusals;
pub mod shared;

use anyhow::Context;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream};

use futures_util::future::BoxFuture;
use tokio_util::sync::CancellationToken;

use crate::agent_link::Connected;
use crate::ownership;
use crate::ui::{ago, human_ms};

/// The REMOTE of `--port REMOTE:LOCAL`: a port number, or (Kubernetes) a port's name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortRef {
    Number(u16),
    Name(String),
}

impl std::fmt::Display for PortRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PortRef::Number(n) => write!(f, "{n}"),
            PortRef::Name(n) => f.write_str(n),
        }
    }
}

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
    /// Only the requests this filter names (`--header`, `--path`...): a filtered intercept
    /// beside the running original. `None`: the whole service (a replace intercept), unless
    /// `mirror`.
    pub filter: Option<devloop_proxy::route::Filter>,
    /// `--mirror`: a copy of each matching request; callers keep the original's answers.
    pub mirror: bool,
    /// `--key`: the session key, given to the laptop command.
    pub key: Option<String>,
    /// `--quiet`: no line per request.
    pub quiet: bool,
    /// The `[sessions.NAME]` this intercept is part of.
    pub session: Option<String>,
}

/// What `leave` ends.
#[derive(Debug, Clone, Copy, Default)]
pub struct Leave<'a> {
    /// A service (or container, Deployment) name.
    pub target: Option<&'a str>,
    /// Every intercept of this user.
    pub all: bool,
    /// One filtered intercept, whoever holds it.
    pub holder: Option<u64>,
    /// This user's holders of one `[sessions.NAME]`.
    pub session: Option<&'a str>,
    /// The current folder's project, to tell several projects' services of one name apart.
    pub project: Option<&'a str>,
}

/// One intercept in `intercept list`: a replace intercept, or a service's routing agent with
/// its holders.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Listed {
    pub service: String,
    /// "replace" or "filtered".
    pub kind: &'static str,
    /// The line shown.
    pub line: String,
    /// A routing agent's holders, with their counts.
    pub holders: Vec<ListedHolder>,
}

/// A holder as `intercept list --json` shows it: the agent's record, and its filter in words.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ListedHolder {
    #[serde(flatten)]
    pub info: devloop_proxy::msg::HolderInfo,
    pub describe: String,
}

impl From<devloop_proxy::msg::HolderInfo> for ListedHolder {
    fn from(info: devloop_proxy::msg::HolderInfo) -> Self {
        let describe = shared::describe(&info.filter, info.mirror);
        ListedHolder { info, describe }
    }
}

impl Listed {
    pub fn replace(service: &str, line: String) -> Listed {
        Listed {
            service: service.to_string(),
            kind: "replace",
            line,
            holders: Vec::new(),
        }
    }
}

impl InterceptOptions {
    /// A holder beside the running original (a filter, or a mirror) rather than a replace.
    pub fn is_shared(&self) -> bool {
        self.filter.is_some() || self.mirror
    }
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
/// with a container swap ([`crate::backend::docker::swap::DockerSwap`]), Kubernetes with a pod template swap
/// ([`crate::backend::k8s::swap::KubeSwap`]); the tunnel, the laptop command, the exposes, the
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

    // What ended the hold: a reason to restore, or (besides an interruption) an error
    // that is returned once the original is back.
    let (said, failure) = match hold_swapped(swap, opts, &token, &env, &shutdown).await {
        Ok(End::Elsewhere) => {
            let _ = claim.release();
            return Ok(());
        }
        Ok(End::Restore(reason)) => (reason, None),
        Err(e) => {
            let interrupted = e.is::<crate::signals::Interrupted>();
            let what = if interrupted {
                "interrupted".to_string()
            } else {
                format!("{e:#}")
            };
            eprintln!("devloop: {what}; restoring {orig_name}");
            ("interrupted", (!interrupted).then_some(e))
        }
    };
    let t = Instant::now();
    if let Err(restore_err) = swap.restore().await {
        // The claim is kept: the changes are still in place, `leave` finishes the restore.
        let restore_err = restore_err.context(format!(
            "restoring {orig_name} failed too; `devloop leave {service}` tries again"
        ));
        return Err(match failure {
            Some(e) => anyhow::anyhow!("{e:#}; and {restore_err:#}"),
            None => restore_err,
        });
    }
    if let Err(e) = claim.release() {
        tracing::warn!(error = %e, "cannot update the ownership record");
    }
    match failure {
        None => {
            eprintln!(
                "devloop: {said}; {orig_name} restored in {}",
                human_ms(t.elapsed().as_millis() as u64)
            );
            Ok(())
        }
        Some(e) => {
            eprintln!("devloop: {orig_name} restored");
            Err(e)
        }
    }
}

/// `--env-file`: the laptop command's environment (Secret values among it), readable by
/// the user only, written whole or not at all.
pub(crate) fn write_env_file(
    path: &std::path::Path,
    env: &[(String, String)],
) -> anyhow::Result<()> {
    let text: String = env.iter().map(|(k, v)| format!("{k}={v}\n")).collect();
    crate::state::write_atomic(path, text.as_bytes(), 0o600)
        .with_context(|| format!("writing --env-file {}", path.display()))
}

/// The laptop command's program, found as the spawn will find it: a path with a `/` as
/// it is, else through `PATH`. A typo is refused before the service is touched.
pub(crate) fn find_program(program: &str) -> anyhow::Result<()> {
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

/// Starts the laptop command (if any) with the original's environment, less the variables
/// that would break a laptop process; killed when dropped.
pub(crate) fn spawn_laptop_command(
    command: &[String],
    env: &[(String, String)],
) -> anyhow::Result<Option<tokio::process::Child>> {
    let Some(program) = command.first() else {
        return Ok(None);
    };
    let mut c = tokio::process::Command::new(program);
    c.args(&command[1..]).kill_on_drop(true);
    for (k, v) in env
        .iter()
        .filter(|(k, _)| !LAPTOP_KEEPS.contains(&k.as_str()))
    {
        c.env(k, v);
    }
    Ok(Some(c.spawn().with_context(|| {
        format!("starting `{}`", command.join(" "))
    })?))
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

    let mut child = spawn_laptop_command(&opts.command, env)?;

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

pub fn start_tunnel(
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
                        refusals::report(&service, remote, local, &e);
                        stream.reset(&format!("nothing listens on the laptop's port {local}"));
                    }
                }
            });
        }
    });
}

pub async fn expose_loop(
    listener: TcpListener,
    index: u16,
    slot: Arc<Mutex<Option<devloop_proxy::tunnel::Mux>>>,
) {
    loop {
        let mut tcp = match listener.accept().await {
            Ok((tcp, _)) => tcp,
            // Out of descriptors under a burst, say: the listener stays; accepting resumes
            // once some are closed.
            Err(e) => {
                tracing::warn!(index, error = %e, "cannot accept an --expose connection; retrying");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
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
