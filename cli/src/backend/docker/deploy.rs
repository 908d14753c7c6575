//! Rolling a snapshot out on Docker: the new version starts beside the old one (same
//! network alias, no published ports), must answer on its port, and only then replaces the
//! old container. Published host ports are held by a small relay container devloop owns
//! (the agent's `relay` mode), so a rollout never has to move them; only the first deploy
//! after a dev container, which published the ports itself, has a gap while the relay
//! takes them over.

use bollard::models::{ContainerCreateBody, EndpointSettings, HostConfig, NetworkingConfig};
use bollard::query_parameters::{CreateContainerOptionsBuilder, RenameContainerOptionsBuilder};
use bollard::Docker;
use futures_util::future::BoxFuture;
use futures_util::StreamExt;
use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::backend::docker::{self, api, DevSpec, DockerError, Placement};
use crate::config::{Project, Service};
use crate::deploy::Snapshot;
use crate::engine::EngineChoice;
use crate::labels;
use crate::state::TokenStore;

pub use crate::deploy::Rollout;

#[derive(Debug, thiserror::Error)]
pub enum RolloutError {
    #[error(transparent)]
    Docker(#[from] DockerError),
    #[error("the new version of `{service}` did not become healthy: {reason}; the old version keeps serving.\nlast lines of its output:\n{logs}")]
    Unhealthy {
        service: String,
        reason: String,
        logs: String,
    },
}

pub fn relay_name(project: &str, service: &str) -> String {
    format!("devloop-{project}-{service}-ports")
}

/// Deploys on Docker: the snapshot runs under the agent beside the old version, takes its
/// name once healthy, and a relay holds the published ports across the switch.
pub struct DockerDeployer {
    pub docker: Docker,
    pub engine: EngineChoice,
    /// Read on the first rollout (`history` needs none).
    pub agent_binary: std::sync::OnceLock<Result<Vec<u8>, String>>,
    pub tokens: TokenStore,
    pub health_timeout: Duration,
}

impl DockerDeployer {
    pub fn new(docker: Docker, engine: EngineChoice, health_timeout: Duration) -> DockerDeployer {
        DockerDeployer {
            docker,
            engine,
            agent_binary: Default::default(),
            tokens: TokenStore::new(),
            health_timeout,
        }
    }

    fn agent(&self) -> Result<&[u8], DockerError> {
        self.agent_binary
            .get_or_init(|| crate::backend::read_agent_binary().map_err(|e| format!("{e:#}")))
            .as_deref()
            .map_err(|e| DockerError::Other(e.clone()))
    }
}

impl crate::deploy::Deployer for DockerDeployer {
    fn engine(&self) -> anyhow::Result<&Docker> {
        Ok(&self.docker)
    }

    fn destination(&self) -> anyhow::Result<crate::deploy::Destination<'_>> {
        Ok(crate::deploy::Destination::Engine)
    }

    fn remember<'a>(
        &'a self,
        project: &'a Project,
        service: &'a Service,
        snapshot: &'a Snapshot,
    ) -> BoxFuture<'a, ()> {
        Box::pin(super::versions::remember(self, project, service, snapshot))
    }

    fn history<'a>(
        &'a self,
        project: &'a Project,
        service: &'a str,
    ) -> BoxFuture<'a, anyhow::Result<String>> {
        Box::pin(super::versions::history(self, project, service))
    }

    fn rollback<'a>(
        &'a self,
        project: &'a Project,
        service: &'a Service,
        to_revision: Option<u64>,
    ) -> BoxFuture<'a, anyhow::Result<String>> {
        Box::pin(super::versions::rollback(
            self,
            project,
            service,
            to_revision,
        ))
    }

    fn watched<'a>(
        &'a self,
        project: &'a Project,
        service: &'a Service,
        ui: &'a crate::ui::Ui,
        deploy: &'a (dyn Fn() -> BoxFuture<'a, anyhow::Result<String>> + Send + Sync),
    ) -> BoxFuture<'a, anyhow::Result<Option<std::sync::Arc<dyn crate::sync::engine::Connector>>>>
    {
        Box::pin(super::versions::watched(self, project, service, ui, deploy))
    }

    fn roll_out<'a>(
        &'a self,
        project: &'a Project,
        service: &'a Service,
        snapshot: &'a Snapshot,
    ) -> BoxFuture<'a, anyhow::Result<Rollout>> {
        Box::pin(async move { Ok(roll_out(self, project, service, snapshot).await?) })
    }

    fn running_version<'a>(
        &'a self,
        project: &'a str,
        service: &'a str,
    ) -> BoxFuture<'a, anyhow::Result<Option<String>>> {
        Box::pin(async move {
            Ok(
                docker::list_project_containers(&self.docker, project, Some(labels::KIND_DEPLOY))
                    .await?
                    .iter()
                    .find(|c| {
                        docker::label(c, labels::SERVICE) == Some(service) && docker::is_running(c)
                    })
                    .and_then(|c| docker::label(c, labels::VERSION).map(String::from)),
            )
        })
    }
}

pub async fn roll_out(
    ctx: &DockerDeployer,
    project: &Project,
    service: &Service,
    snapshot: &Snapshot,
) -> Result<Rollout, RolloutError> {
    let docker = &ctx.docker;
    let mut mine = service_containers(docker, &project.name, &service.name).await?;
    if let Some(found) =
        recover_interrupted_in(docker, &ctx.tokens, &mine, &project.name, &service.name).await?
    {
        eprintln!("devloop: {found}");
        mine = service_containers(docker, &project.name, &service.name).await?;
    }
    let facts = docker::image_facts(docker, &snapshot.image).await?;
    let spec = DevSpec::new(project, service, &snapshot.image, &facts);
    let canonical = docker::container_name(&project.name, &service.name);
    let current: Vec<_> = mine
        .into_iter()
        .filter(|c| {
            matches!(
                docker::label(c, labels::KIND),
                Some(labels::KIND_DEV) | Some(labels::KIND_DEPLOY)
            )
        })
        .collect();
    // Unchanged only when that version serves under the service's own name.
    if current.iter().any(|c| {
        docker::name_of(c) == canonical
            && docker::label(c, labels::KIND) == Some(labels::KIND_DEPLOY)
            && docker::label(c, labels::VERSION) == Some(snapshot.tag.as_str())
            && docker::is_running(c)
    }) && relay_ok(ctx, project, service).await?
    {
        return Ok(Rollout::Unchanged);
    }

    let staging = format!("{canonical}-{}", &snapshot.tag[..8.min(snapshot.tag.len())]);
    let _ = docker::remove_container(docker, &staging).await;
    let placement = Placement {
        name: staging.clone(),
        kind: labels::KIND_DEPLOY,
        volume: false,
        publish: false,
        extra_labels: vec![(labels::VERSION.into(), snapshot.tag.clone())],
    };
    let started = Instant::now();
    let id = docker::create_agent_container(docker, &spec, &placement, ctx.agent()?, &ctx.tokens)
        .await?;
    let port = service
        .ports
        .first()
        .map(|p| p.container_port)
        .or_else(|| facts.exposed.first().copied());
    let check = match &facts.healthcheck {
        Some(cmd) => Health::Command(cmd.clone()),
        None => Health::Port(port),
    };
    if let Err(reason) = wait_healthy(ctx, &id, &project.name, &check).await {
        let logs = docker::last_logs(docker, &id, 20).await;
        let _ = docker::remove_container(docker, &id).await;
        ctx.tokens.remove(&staging);
        return Err(RolloutError::Unhealthy {
            service: service.name.clone(),
            reason,
            logs,
        });
    }
    let healthy_ms = started.elapsed().as_millis() as u64;
    crate::failpoint::pause("deploy:healthy");

    // Switch: the old version goes, the new one takes its name.
    let switch = Instant::now();
    let held_ports = current
        .iter()
        .any(|c| docker::label(c, labels::KIND) == Some(labels::KIND_DEV));
    for c in &current {
        docker::remove_container(docker, c.id.as_deref().unwrap_or_default()).await?;
    }
    crate::failpoint::pause("deploy:old-removed");
    take_name(docker, &ctx.tokens, &id, &staging, &canonical).await?;
    let switch_ms = switch.elapsed().as_millis() as u64;
    crate::failpoint::pause("deploy:renamed");
    let gap = Instant::now();
    ensure_relay(ctx, project, service).await?;
    let port_gap_ms = (held_ports && service.ports.iter().any(|p| p.host_port.is_some()))
        .then(|| gap.elapsed().as_millis() as u64 + switch_ms);
    Ok(Rollout::Replaced {
        healthy_ms,
        switch_ms,
        port_gap_ms,
    })
}

/// Finishes or undoes what a deploy killed halfway left of `service` (a version started
/// beside the current one under a staging name `devloop-P-S-<tag8>`): while a container
/// holds the service's own name, a staging leftover is removed (the rollout did not happen;
/// it would otherwise share the service's network alias and answer some of its calls);
/// with none, the newest running leftover was healthy and the old one already gone, so it
/// takes the name (the rollout is finished). Says what it found, if anything.
pub async fn recover_interrupted(
    docker: &Docker,
    project: &str,
    service: &str,
) -> Result<Option<String>, DockerError> {
    let mine = service_containers(docker, project, service).await?;
    recover_interrupted_in(docker, &TokenStore::new(), &mine, project, service).await
}

/// [`recover_interrupted`] on the service's containers as listed (`mine`).
async fn recover_interrupted_in(
    docker: &Docker,
    tokens: &TokenStore,
    mine: &[bollard::models::ContainerSummary],
    project: &str,
    service: &str,
) -> Result<Option<String>, DockerError> {
    let canonical = docker::container_name(project, service);
    let staged: Vec<_> = mine
        .iter()
        .filter(|c| {
            docker::label(c, labels::KIND) == Some(labels::KIND_DEPLOY)
                && docker::name_of(c) != canonical
        })
        .collect();
    if staged.is_empty() {
        return Ok(None);
    }
    let has_canonical = mine.iter().any(|c| docker::name_of(c) == canonical);
    let mut keep = None;
    if !has_canonical {
        keep = staged
            .iter()
            .filter(|c| docker::is_running(c))
            .max_by_key(|c| c.created.unwrap_or_default())
            .copied();
    }
    let mut removed = Vec::new();
    for c in &staged {
        if keep.is_some_and(|k| k.id == c.id) {
            continue;
        }
        docker::remove_container(docker, c.id.as_deref().unwrap_or_default()).await?;
        removed.push(docker::name_of(c));
    }
    let mut said = Vec::new();
    if !removed.is_empty() {
        said.push(format!(
            "removed what an interrupted deploy of `{service}` left beside it ({})",
            removed.join(", ")
        ));
    }
    if let Some(k) = keep {
        let name = docker::name_of(k);
        take_name(
            docker,
            tokens,
            k.id.as_deref().unwrap_or_default(),
            &name,
            &canonical,
        )
        .await?;
        said.push(format!(
            "finished an interrupted deploy of `{service}`: {name} (healthy, the old version already gone) now serves as {canonical}"
        ));
    }
    Ok(Some(said.join("; ")))
}

/// Every container of `service` in `project` (dev, deployed, staged, intercept, ports).
async fn service_containers(
    docker: &Docker,
    project: &str,
    service: &str,
) -> Result<Vec<bollard::models::ContainerSummary>, DockerError> {
    Ok(docker::list_project_containers(docker, project, None)
        .await?
        .into_iter()
        .filter(|c| docker::label(c, labels::SERVICE) == Some(service))
        .collect())
}

/// A version started under the staging name `from` becomes the service's container `to`:
/// renamed, its session token saved under the new name.
async fn take_name(
    docker: &Docker,
    tokens: &TokenStore,
    id: &str,
    from: &str,
    to: &str,
) -> Result<(), DockerError> {
    docker
        .rename_container(id, RenameContainerOptionsBuilder::new().name(to).build())
        .await
        .map_err(api(format!("renaming {from} to {to}")))?;
    if let Some(token) = tokens.read(from) {
        tokens
            .write(to, &token)
            .map_err(|e| DockerError::Other(format!("saving the session token: {e}")))?;
        tokens.remove(from);
    }
    Ok(())
}

/// What tells that a new version is ready.
enum Health {
    /// The image's HEALTHCHECK, run by devloop at a short interval during the rollout (the
    /// engine's own interval, 30 s by default, would make every rollout slow).
    Command(Vec<String>),
    /// The service's first port answering; with no port, running a moment without exiting.
    Port(Option<u16>),
}

/// Running, and healthy by `check`, within the timeout.
async fn wait_healthy(
    ctx: &DockerDeployer,
    id: &str,
    project: &str,
    check: &Health,
) -> Result<(), String> {
    let deadline = Instant::now() + ctx.health_timeout;
    let mut running_since: Option<Instant> = None;
    loop {
        let info = ctx
            .docker
            .inspect_container(id, None)
            .await
            .map_err(|e| e.to_string())?;
        let state = info.state.clone().unwrap_or_default();
        if state.running != Some(true) {
            return Err(format!(
                "it exited with code {}",
                state.exit_code.unwrap_or(-1)
            ));
        }
        let ok = match check {
            Health::Command(cmd) => run_exec(&ctx.docker, id, cmd.clone()).await == Some(0),
            Health::Port(Some(port)) => probe(ctx, id, project, *port).await,
            Health::Port(None) => {
                running_since.get_or_insert_with(Instant::now).elapsed()
                    > Duration::from_millis(500)
            }
        };
        if ok {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(match check {
                Health::Command(cmd) => format!(
                    "its health check `{}` did not pass within {:?}",
                    cmd.join(" "),
                    ctx.health_timeout
                ),
                Health::Port(Some(p)) => format!(
                    "nothing answered on port {p} within {:?}",
                    ctx.health_timeout
                ),
                Health::Port(None) => {
                    format!("not running steadily within {:?}", ctx.health_timeout)
                }
            });
        }
        tokio::time::sleep(Duration::from_millis(
            if matches!(check, Health::Command(_)) {
                100
            } else {
                20
            },
        ))
        .await;
    }
}

async fn probe(ctx: &DockerDeployer, id: &str, project: &str, port: u16) -> bool {
    if ctx.engine.is_local() {
        if let Ok(Some(addr)) = docker::agent_address(&ctx.docker, id, project).await {
            let addr = std::net::SocketAddr::new(addr.ip(), port);
            return matches!(
                tokio::time::timeout(
                    Duration::from_millis(200),
                    tokio::net::TcpStream::connect(addr)
                )
                .await,
                Ok(Ok(_))
            );
        }
    }
    // Remote engine: ask the agent inside the container to try.
    let cmd = vec![
        docker::AGENT_PATH.to_string(),
        "probe".into(),
        format!("127.0.0.1:{port}"),
        "--timeout-ms".into(),
        "1".into(),
    ];
    run_exec(&ctx.docker, id, cmd).await == Some(0)
}

async fn run_exec(docker: &Docker, id: &str, cmd: Vec<String>) -> Option<i64> {
    let exec = docker
        .create_exec(
            id,
            bollard::exec::CreateExecOptions {
                cmd: Some(cmd),
                attach_stdout: Some(true),
                attach_stderr: Some(true),
                ..Default::default()
            },
        )
        .await
        .ok()?;
    if let Ok(bollard::exec::StartExecResults::Attached { mut output, .. }) =
        docker.start_exec(&exec.id, None).await
    {
        while output.next().await.is_some() {}
    }
    docker.inspect_exec(&exec.id).await.ok()?.exit_code
}

fn relay_maps(service: &Service) -> Vec<String> {
    service
        .ports
        .iter()
        .filter(|p| p.host_port.is_some())
        .map(|p| {
            format!(
                "0.0.0.0:{}={}:{}",
                p.container_port, service.name, p.container_port
            )
        })
        .collect()
}

async fn relay_ok(
    ctx: &DockerDeployer,
    project: &Project,
    service: &Service,
) -> Result<bool, DockerError> {
    if relay_maps(service).is_empty() {
        return Ok(true);
    }
    Ok(
        match ctx
            .docker
            .inspect_container(&relay_name(&project.name, &service.name), None)
            .await
        {
            Ok(info) => info.state.and_then(|s| s.running) == Some(true),
            Err(_) => false,
        },
    )
}

/// Makes the relay holding the service's published ports run (recreating it when the
/// mapping changed).
pub async fn ensure_relay(
    ctx: &DockerDeployer,
    project: &Project,
    service: &Service,
) -> Result<(), DockerError> {
    let maps = relay_maps(service);
    let name = relay_name(&project.name, &service.name);
    if maps.is_empty() {
        return docker::remove_container(&ctx.docker, &name).await;
    }
    let spec_hash = devloop_proxy::tree::hex(&devloop_proxy::tree::hash_bytes(
        format!("{maps:?}{:?}", service.ports).as_bytes(),
    ))[..16]
        .to_string();
    if let Ok(info) = ctx.docker.inspect_container(&name, None).await {
        let same = info
            .config
            .as_ref()
            .and_then(|c| c.labels.as_ref())
            .and_then(|l| l.get(labels::SPEC_HASH))
            == Some(&spec_hash);
        if same && info.state.as_ref().and_then(|s| s.running) == Some(true) {
            return Ok(());
        }
        docker::remove_container(&ctx.docker, &name).await?;
    }
    let image = crate::backend::agent::ensure_agent_image(&ctx.docker, ctx.agent()?).await?;
    let network = docker::ensure_network(&ctx.docker, &project.name).await?;
    let mut l = labels::base(&project.name);
    l.insert(labels::SERVICE.into(), service.name.clone());
    l.insert(labels::KIND.into(), labels::KIND_PORTS.into());
    l.insert(labels::SPEC_HASH.into(), spec_hash);
    let mut cmd = vec!["relay".to_string()];
    for m in maps {
        cmd.push("--map".into());
        cmd.push(m);
    }
    let mut endpoints = HashMap::new();
    endpoints.insert(network.clone(), EndpointSettings::default());
    let body = ContainerCreateBody {
        image: Some(image),
        cmd: Some(cmd),
        labels: Some(l),
        exposed_ports: Some(
            service
                .ports
                .iter()
                .map(|p| format!("{}/tcp", p.container_port))
                .collect(),
        ),
        host_config: Some(HostConfig {
            port_bindings: Some(docker::port_bindings(&service.ports)),
            network_mode: Some(network),
            ..Default::default()
        }),
        networking_config: Some(NetworkingConfig {
            endpoints_config: Some(endpoints),
        }),
        ..Default::default()
    };
    let created = ctx
        .docker
        .create_container(
            Some(CreateContainerOptionsBuilder::new().name(&name).build()),
            body,
        )
        .await
        .map_err(api(format!("creating the port relay {name}")))?;
    ctx.docker
        .start_container(&created.id, None)
        .await
        .map_err(api(format!("starting the port relay {name}")))?;
    // A relay that cannot bind (a port taken meanwhile) exits at once: say so now.
    tokio::time::sleep(Duration::from_millis(150)).await;
    let info = ctx
        .docker
        .inspect_container(&created.id, None)
        .await
        .map_err(api(format!("inspecting {name}")))?;
    if info.state.and_then(|s| s.running) != Some(true) {
        let logs = docker::last_logs(&ctx.docker, &created.id, 10).await;
        return Err(DockerError::Other(format!(
            "the port relay {name} stopped at once:\n{logs}"
        )));
    }
    Ok(())
}
