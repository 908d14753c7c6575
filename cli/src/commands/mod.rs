//! One module per command; shared set-up lives here.

pub mod deploy;
pub mod dev_k8s;
pub mod doctor;
pub mod down;
pub mod intercept;
pub mod intercept_k8s;
pub mod refusals;
pub mod status;
pub mod up;
pub mod watch;

use anyhow::Context;
use bollard::Docker;
use futures_util::future::BoxFuture;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::agent_link::{AgentLink, Connected};
use crate::backend::docker;
use crate::backend::engine::{self, EngineChoice};
use crate::config::Project;
use crate::state::TokenStore;
use crate::sync::engine::Connector;

/// Options every command shares.
#[derive(Debug, Clone, Default)]
pub struct Global {
    /// The folder to start looking for the project from.
    pub dir: PathBuf,
    /// `--context`: a kubeconfig context (selects the Kubernetes target).
    pub context: Option<String>,
    /// `-n`: a Kubernetes namespace (selects the Kubernetes target).
    pub namespace: Option<String>,
}

/// Where a command acts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetChoice {
    Docker,
    Kubernetes {
        settings: crate::backend::k8s::KubeSettings,
        /// `[target] registry`.
        registry: Option<String>,
    },
}

/// `--context` or `-n` select Kubernetes (like kubectl's flags); else devloop.toml's
/// `[target]`; else Docker.
pub fn choose_target(global: &Global, project: Option<&Project>) -> TargetChoice {
    use crate::config::file::TargetKind;
    let section = project.map(|p| p.target.clone()).unwrap_or_default();
    let kube = global.context.is_some()
        || global.namespace.is_some()
        || section.kind == Some(TargetKind::Kubernetes);
    if !kube {
        return TargetChoice::Docker;
    }
    TargetChoice::Kubernetes {
        settings: crate::backend::k8s::KubeSettings {
            context: global.context.clone().or(section.context),
            namespace: global.namespace.clone().or(section.namespace),
        },
        registry: section.registry,
    }
}

pub fn load_project(global: &Global) -> anyhow::Result<Project> {
    let dir = crate::config::find_project_dir(&global.dir)?;
    Ok(crate::config::load(&dir)?)
}

pub async fn connect_engine() -> anyhow::Result<(Docker, EngineChoice)> {
    let choice = engine::choose();
    let docker = engine::connect(&choice).await?;
    Ok((docker, choice))
}

/// Reaches a dev container's agent, by the fastest route that works.
pub struct DockerConnector {
    pub docker: Docker,
    pub engine: EngineChoice,
    pub container: String,
    pub project: String,
}

impl DockerConnector {
    pub async fn open(&self) -> anyhow::Result<(Connected, String)> {
        let opened =
            docker::open_transport(&self.docker, &self.engine, &self.container, &self.project)
                .await;
        let (io, route) = match opened {
            Ok(o) => o,
            // A container that exited says why (its agent's last words), not just that
            // nothing answers.
            Err(e) => match docker::not_running_reason(&self.docker, &self.container).await {
                Some(reason) => anyhow::bail!("{reason}"),
                None => return Err(e.into()),
            },
        };
        let tokens = TokenStore::new();
        let token = match tokens.read(&self.container) {
            Some(t) => t,
            None => {
                let t = docker::fetch_token(&self.docker, &self.container).await?;
                tokens
                    .write(&self.container, &t)
                    .context("saving the session token")?;
                t
            }
        };
        let route = match route {
            docker::AgentRoute::Direct => "direct".to_string(),
            docker::AgentRoute::Exec => "docker exec".to_string(),
        };
        match AgentLink::connect(io, &token).await {
            Ok(connected) => Ok((connected, route)),
            // The container was recreated from another shell or machine: its token is not
            // the one saved here. Read the current one back once and retry.
            Err(crate::agent_link::LinkError::Refused(reason)) if reason.contains("token") => {
                let fresh = docker::fetch_token(&self.docker, &self.container).await?;
                if fresh == token {
                    anyhow::bail!(
                        "the agent in {} refused its own token: {reason}",
                        self.container
                    );
                }
                tokens
                    .write(&self.container, &fresh)
                    .context("saving the session token")?;
                let (io, _) = docker::open_transport(
                    &self.docker,
                    &self.engine,
                    &self.container,
                    &self.project,
                )
                .await?;
                let connected = AgentLink::connect(io, &fresh)
                    .await
                    .with_context(|| format!("connecting to the agent in {}", self.container))?;
                Ok((connected, route))
            }
            Err(e) => Err(anyhow::Error::new(e)
                .context(format!("connecting to the agent in {}", self.container))),
        }
    }
}

impl Connector for DockerConnector {
    fn connect(&self) -> BoxFuture<'_, anyhow::Result<(Connected, String)>> {
        Box::pin(self.open())
    }
}

pub fn connector(
    docker: &Docker,
    engine: &EngineChoice,
    project: &str,
    service: &str,
) -> Arc<DockerConnector> {
    Arc::new(DockerConnector {
        docker: docker.clone(),
        engine: engine.clone(),
        container: docker::container_name(project, service),
        project: project.to_string(),
    })
}

pub fn read_agent_binary() -> anyhow::Result<(PathBuf, Vec<u8>)> {
    let path = docker::find_agent_binary().map_err(anyhow::Error::msg)?;
    let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    Ok((path, bytes))
}

pub fn display(p: &Path) -> String {
    p.display().to_string()
}
