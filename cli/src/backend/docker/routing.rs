//! Filtered intercepts on Docker: the routing agent runs in a container of its own inside
//! the original container's network namespace (`--network container:ORIGINAL`), with
//! NET_ADMIN for its nftables redirect of the service's ports. The original is neither
//! stopped nor changed: callers by network alias and through published host ports all
//! arrive in that namespace and are routed alike. The cli reaches the agent over
//! `docker exec ... bridge` (its control port listens on the namespace's loopback only).
//!
//! Nothing here needs a restore record: the agent container is removed by the engine when
//! the agent exits (`AutoRemove`), which it does once its last holder has been gone for a
//! second; its redirect is a table the kernel drops with the agent's socket. A killed cli
//! ends its holder (the exec's connection closes with it).

use anyhow::Context;
use bollard::models::{ContainerCreateBody, ContainerInspectResponse, HostConfig};
use bollard::query_parameters::{CreateContainerOptionsBuilder, ListContainersOptionsBuilder};
use bollard::Docker;
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;

use super::intercept as di;
use crate::agent_link::{AgentLink, Connected};
use crate::backend::docker::{self, api, DockerError};
use crate::engine::EngineChoice;
use crate::intercept::shared::{self, Joined, Router};
use crate::intercept::{InterceptOptions, Leave, Listed, PortRef};
use crate::labels;
use crate::state::TokenStore;
use crate::ui::ago;

/// Where the agent image keeps the agent.
const IMAGE_AGENT_PATH: &str = "/devloop-agent";

/// How long joining may take: installing, or waiting for an agent that is draining to go.
const JOIN_DEADLINE: Duration = Duration::from_secs(30);

/// The routing agent's container of an original.
pub fn route_container(original_name: &str) -> String {
    format!("{original_name}-devloop-route")
}

pub struct DockerRouter {
    docker: Docker,
    original: ContainerInspectResponse,
    name: String,
    service: String,
    project: String,
    ports: Vec<(u16, u16)>,
    agent: Vec<u8>,
    /// The engine runs on this machine and `--tunnel` was not given.
    handing_off: bool,
    /// What the agent this cli installed printed, for when it stops as it starts (its
    /// container is removed with it, and its logs too).
    start_logs: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    /// This cli's handoff sockets, removed when it is done.
    sockets: std::sync::Mutex<Vec<std::path::PathBuf>>,
}

impl Drop for DockerRouter {
    fn drop(&mut self) {
        for s in self
            .sockets
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            let _ = std::fs::remove_file(s);
        }
    }
}

impl DockerRouter {
    /// Finds the running container `opts.target` names; changes nothing.
    pub async fn new(
        docker: Docker,
        engine: &EngineChoice,
        agent: Vec<u8>,
        opts: &InterceptOptions,
        here: Option<String>,
    ) -> anyhow::Result<DockerRouter> {
        if let Some(r) = di::load_records().into_iter().find(|r| {
            (r.service == opts.target && here.as_deref().is_none_or(|h| h == r.project))
                || r.original_name == opts.target
        }) {
            anyhow::bail!(
                "{} is intercepted whole (since {}): a filtered intercept needs that to end first (`devloop leave {}`); nothing was changed",
                r.original_name,
                ago(r.started_ms),
                r.service
            );
        }
        let original = di::find_target(&docker, &opts.target, here.as_deref()).await?;
        let name = di::container_name(&original);
        let (service, project) = di::service_of(&original);
        let mut ports = Vec::new();
        for (r, l) in &opts.ports {
            match r {
                PortRef::Number(n) => ports.push((*n, *l)),
                PortRef::Name(n) => anyhow::bail!("--port {n}:{l}: on Docker, REMOTE is the port number the service listens on in its container"),
            }
        }
        let handing_off =
            !opts.tunnel && engine.is_local() && super::swap::same_machine(&docker).await;
        Ok(DockerRouter {
            docker,
            original,
            name,
            service,
            project,
            ports,
            agent,
            handing_off,
            start_logs: Default::default(),
            sockets: Default::default(),
        })
    }

    /// Keeps the last lines the agent container prints, from its start.
    fn follow_logs(&self, id: &str) {
        use futures_util::StreamExt;
        let (docker, id, lines) = (self.docker.clone(), id.to_string(), self.start_logs.clone());
        tokio::spawn(async move {
            let mut stream = docker.logs(
                &id,
                Some(
                    bollard::query_parameters::LogsOptionsBuilder::new()
                        .follow(true)
                        .stdout(true)
                        .stderr(true)
                        .build(),
                ),
            );
            while let Some(Ok(chunk)) = stream.next().await {
                let text = String::from_utf8_lossy(&chunk.into_bytes()).into_owned();
                let mut l = lines.lock().unwrap_or_else(|e| e.into_inner());
                l.extend(text.lines().map(String::from));
                let extra = l.len().saturating_sub(12);
                l.drain(..extra);
            }
        });
    }

    fn container(&self) -> String {
        route_container(&self.name)
    }

    /// Creates and starts the agent container; false when another cli made it first.
    async fn install(&self, token: &str) -> anyhow::Result<bool> {
        let image = crate::backend::agent::ensure_agent_image(&self.docker, &self.agent).await?;
        let orig_id = self.original.id.clone().unwrap_or_default();
        let mut cmd = vec![
            "route".to_string(),
            "--token-file".into(),
            docker::TOKEN_PATH.into(),
        ];
        let mut seen = Vec::new();
        for (remote, _) in &self.ports {
            if !seen.contains(remote) {
                seen.push(*remote);
                cmd.extend(["--port".to_string(), remote.to_string()]);
            }
        }
        // The original may listen on its own addresses only, not on loopback.
        let addresses = self
            .original
            .network_settings
            .as_ref()
            .and_then(|n| n.networks.clone())
            .unwrap_or_default()
            .into_values()
            .filter_map(|e| e.ip_address)
            .filter(|ip| !ip.is_empty());
        for ip in addresses {
            cmd.extend(["--original-host".to_string(), ip]);
        }
        let binds = if self.handing_off {
            let dir = di::handoff_dir(&self.container());
            crate::state::ensure_private_dir(&dir)?;
            cmd.extend([
                "--handoff-dir".to_string(),
                devloop_proxy::handoff::CONTAINER_DIR.to_string(),
            ]);
            Some(vec![format!(
                "{}:{}",
                dir.display(),
                devloop_proxy::handoff::CONTAINER_DIR
            )])
        } else {
            None
        };
        let mut l = labels::base(&self.project);
        l.insert(labels::KIND.to_string(), labels::KIND_ROUTE.to_string());
        l.insert(labels::SERVICE.to_string(), self.service.clone());
        l.insert(di::INTERCEPT_OF.to_string(), orig_id.clone());
        l.insert(di::INTERCEPT_OF_NAME.to_string(), self.name.clone());
        let body = ContainerCreateBody {
            image: Some(image),
            cmd: Some(cmd),
            labels: Some(l),
            host_config: Some(HostConfig {
                network_mode: Some(format!("container:{orig_id}")),
                cap_add: Some(vec!["NET_ADMIN".into()]),
                auto_remove: Some(true),
                binds,
                ..Default::default()
            }),
            ..Default::default()
        };
        let created = self
            .docker
            .create_container(
                Some(
                    CreateContainerOptionsBuilder::new()
                        .name(&self.container())
                        .build(),
                ),
                body,
            )
            .await;
        let created = match created {
            Ok(c) => c,
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 409, ..
            }) => return Ok(false),
            Err(e) => {
                return Err(
                    api(format!("creating the routing agent {}", self.container()))(e).into(),
                )
            }
        };
        let started: anyhow::Result<()> = async {
            docker::upload_token(&self.docker, &created.id, &self.container(), token, (0, 0))
                .await?;
            TokenStore::new()
                .write(&self.container(), token)
                .context("saving the session token")?;
            self.docker
                .start_container(&created.id, None)
                .await
                .map_err(api(format!("starting {}", self.container())))?;
            self.follow_logs(&created.id);
            Ok(())
        }
        .await;
        if let Err(e) = started {
            // Not started: nothing routes yet, and nothing is left behind.
            let _ = docker::remove_container(&self.docker, &created.id).await;
            return Err(e);
        }
        Ok(true)
    }

    /// Serves this cli's handoff socket in the agent's handoff folder.
    fn serve_handoff(&self, session: &str, token: &str) -> Option<String> {
        if !self.handing_off {
            return None;
        }
        let dir = di::handoff_dir(&self.container());
        let (path, name) = shared::handoff_socket(&dir, session);
        let listener = crate::state::ensure_private_dir(&dir)
            .and_then(|()| devloop_proxy::handoff::listen(&path));
        match listener {
            Ok(listener) => {
                self.sockets
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(path.clone());
                tokio::spawn(super::swap::serve_handoffs(
                    listener,
                    token.to_string(),
                    self.ports.iter().copied().collect(),
                    self.service.clone(),
                ));
                Some(name)
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot make the handoff socket; tunnelling");
                None
            }
        }
    }
}

/// Connects to a running routing agent with `token`.
async fn connect(docker: &Docker, container: &str, token: &str) -> anyhow::Result<Connected> {
    let io = docker::exec_bridge(
        docker,
        container,
        IMAGE_AGENT_PATH,
        devloop_proxy::ROUTE_CONTROL_PORT,
    )
    .await?;
    Ok(AgentLink::connect(io, token).await?)
}

/// The token of a running routing agent: this machine's copy, else read from the container.
async fn token_of(docker: &Docker, container: &str) -> anyhow::Result<String> {
    let store = TokenStore::new();
    if let Some(t) = store.read(container) {
        return Ok(t);
    }
    let t = docker::fetch_token(docker, container).await?;
    let _ = store.write(container, &t);
    Ok(t)
}

/// Connects to a routing agent, reading its token back from the container once when the
/// saved one is refused (the agent was installed again from elsewhere).
async fn connect_any(docker: &Docker, container: &str) -> anyhow::Result<(Connected, String)> {
    let token = token_of(docker, container).await?;
    match connect(docker, container, &token).await {
        Ok(c) => Ok((c, token)),
        Err(e) if format!("{e:#}").contains("token") => {
            let fresh = docker::fetch_token(docker, container).await?;
            let _ = TokenStore::new().write(container, &fresh);
            Ok((connect(docker, container, &fresh).await?, fresh))
        }
        Err(e) => Err(e),
    }
}

enum State {
    Running,
    /// Left from an original of this name that is gone (removed and made again): it routes
    /// nothing that exists.
    Stale,
    /// Exited or exiting (auto-removal under way).
    Going,
    Absent,
}

/// The routing container's state; `original_id`: the original it must route for.
async fn state(
    docker: &Docker,
    container: &str,
    original_id: Option<&str>,
) -> anyhow::Result<State> {
    match docker.inspect_container(container, None).await {
        Ok(c) => {
            let of = c
                .config
                .as_ref()
                .and_then(|c| c.labels.as_ref())
                .and_then(|l| l.get(di::INTERCEPT_OF))
                .map(String::as_str);
            if original_id.is_some_and(|id| of != Some(id)) {
                return Ok(State::Stale);
            }
            Ok(
                match c.state.as_ref().and_then(|s| s.running) == Some(true) {
                    true => State::Running,
                    false => State::Going,
                },
            )
        }
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => Ok(State::Absent),
        Err(e) => Err(api(format!("inspecting {container}"))(e).into()),
    }
}

impl Router for DockerRouter {
    fn original(&self) -> String {
        self.name.clone()
    }

    fn service(&self) -> String {
        self.service.clone()
    }

    fn owner_key(&self) -> String {
        di::owner_key(&self.name)
    }

    fn ports(&self) -> Vec<(u16, u16)> {
        self.ports.clone()
    }

    fn env(&self) -> Vec<(String, String)> {
        di::env_of(&self.original)
    }

    fn join<'a>(&'a self, session: &'a str) -> BoxFuture<'a, anyhow::Result<Joined>> {
        Box::pin(async move {
            let container = self.container();
            let deadline = Instant::now() + JOIN_DEADLINE;
            let mut installed = false;
            let mut last_error: Option<anyhow::Error> = None;
            let orig_id = self.original.id.clone().unwrap_or_default();
            while Instant::now() < deadline {
                match state(&self.docker, &container, Some(&orig_id)).await? {
                    State::Stale => {
                        tracing::info!(%container, "removing a routing agent left from an earlier container of this name");
                        docker::remove_container(&self.docker, &container).await?;
                        continue;
                    }
                    State::Running => match connect_any(&self.docker, &container).await {
                        Ok((link, token)) => {
                            let handoff = self.serve_handoff(session, &token);
                            return Ok(Joined {
                                link,
                                installed,
                                handoff,
                            });
                        }
                        // Starting (not listening yet) or draining: try again shortly.
                        Err(e) => last_error = Some(e),
                    },
                    State::Going | State::Absent if installed => {
                        // Give the log follower a moment to catch the last words.
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        let said = self
                            .start_logs
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .join("\n");
                        anyhow::bail!(
                            "the routing agent of {} stopped as it started; nothing was changed{}",
                            self.name,
                            if said.is_empty() {
                                String::new()
                            } else {
                                format!(". It said:\n{said}")
                            }
                        );
                    }
                    State::Going => {}
                    State::Absent => {
                        let token = crate::state::new_token();
                        if self.install(&token).await? {
                            installed = true;
                        }
                        continue;
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let why = last_error.map(|e| format!(": {e:#}")).unwrap_or_default();
            anyhow::bail!(
                "the routing agent of {} did not answer within {JOIN_DEADLINE:?}{why}",
                self.name
            )
        })
    }
}

/// The routing agents on the engine (every state).
async fn agents(docker: &Docker) -> Result<Vec<bollard::models::ContainerSummary>, DockerError> {
    docker
        .list_containers(Some(
            ListContainersOptionsBuilder::new()
                .all(true)
                .filters(&labels::filter(&[(labels::KIND, labels::KIND_ROUTE)]))
                .build(),
        ))
        .await
        .map_err(api("listing routing agents"))
}

/// A routing agent as `list` and `leave` see it.
struct Routed {
    service: String,
    project: String,
    original: String,
    container: String,
}

async fn routed(docker: &Docker) -> anyhow::Result<Vec<Routed>> {
    Ok(agents(docker)
        .await?
        .iter()
        .filter(|a| docker::is_running(a))
        .map(|a| Routed {
            service: docker::label(a, labels::SERVICE).unwrap_or("?").to_string(),
            project: docker::label(a, labels::PROJECT).unwrap_or("").to_string(),
            original: docker::label(a, di::INTERCEPT_OF_NAME)
                .unwrap_or("?")
                .to_string(),
            container: docker::name_of(a),
        })
        .collect())
}

/// Refuses a replace intercept of an original that filtered intercepts hold.
pub async fn refuse_if_routed(docker: &Docker, original_name: &str) -> anyhow::Result<()> {
    let container = route_container(original_name);
    if let State::Absent = state(docker, &container, None).await? {
        return Ok(());
    }
    let holders = match connect_any(docker, &container).await {
        Ok((c, _)) => {
            let h = c.link.holders().await.unwrap_or_default();
            c.link.close();
            h
        }
        Err(_) => Vec::new(),
    };
    let names: Vec<String> = holders
        .iter()
        .map(|h| format!("holder {} ({})", h.id, h.who))
        .collect();
    anyhow::bail!(
        "{original_name} has filtered intercepts{}; a replace intercept takes every request, so it waits until they end (`devloop intercept list`); nothing was changed",
        if names.is_empty() {
            String::new()
        } else {
            format!(": {}", names.join(", "))
        }
    )
}

/// `intercept list`'s filtered part: each routing agent with its holders.
pub async fn list(docker: &Docker) -> anyhow::Result<Vec<Listed>> {
    let mut out = Vec::new();
    for r in routed(docker).await? {
        let holders = match connect_any(docker, &r.container).await {
            Ok((c, _)) => {
                let h = c.link.holders().await;
                c.link.close();
                h.map_err(anyhow::Error::from)
            }
            Err(e) => Err(e),
        };
        let (line, holders) = match holders {
            Ok(h) => (
                format!(
                    "{}  ({})  filtered: {} holder{}, the original serves the rest",
                    r.service,
                    r.original,
                    h.len(),
                    if h.len() == 1 { "" } else { "s" }
                ),
                h,
            ),
            Err(e) => (
                format!(
                    "{}  ({})  filtered: its routing agent does not answer ({e:#})",
                    r.service, r.original
                ),
                Vec::new(),
            ),
        };
        out.push(Listed {
            service: r.service,
            kind: "filtered",
            line,
            holders: holders.into_iter().map(Into::into).collect(),
        });
    }
    Ok(out)
}

/// `leave`'s filtered part: releases this user's holders of `target` (all services with
/// `all`), or the holder `--holder` names. Returns whether it found something to act on.
pub async fn leave(docker: &Docker, leave: &Leave<'_>) -> anyhow::Result<bool> {
    let me = shared::who();
    let mut acted = false;
    let mut others = Vec::new();
    for r in routed(docker).await? {
        let named = match leave.target {
            Some(t) => {
                (r.service == t || r.original == t)
                    && leave
                        .project
                        .is_none_or(|p| p == r.project || r.project.is_empty())
            }
            None => true,
        };
        if !named {
            continue;
        }
        let (c, _) = connect_any(docker, &r.container).await?;
        let holders = c.link.holders().await?;
        for h in holders {
            let chosen = match (leave.holder, leave.session) {
                (Some(id), _) => h.id == id,
                (None, Some(session)) => h.who == me && h.session.as_deref() == Some(session),
                (None, None) => h.who == me,
            };
            if chosen {
                c.link.release(h.id, &me).await?;
                println!(
                    "{}: holder {} ({}, {}) ended; the original serves its requests",
                    r.service,
                    h.id,
                    h.who,
                    shared::describe(&h.filter, h.mirror)
                );
                acted = true;
            } else if leave.holder.is_none() {
                others.push(format!("{}: holder {} ({})", r.service, h.id, h.who));
            }
        }
        c.link.close();
    }
    if !acted && !others.is_empty() && leave.target.is_some() {
        anyhow::bail!(
            "you hold no intercept of {}; others do ({}): `devloop leave {} --holder ID` ends one of theirs",
            leave.target.unwrap_or_default(),
            others.join(", "),
            leave.target.unwrap_or_default()
        );
    }
    Ok(acted)
}
