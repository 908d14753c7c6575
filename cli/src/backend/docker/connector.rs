//! The sync engine's [`Connector`] on Docker: a dev container's agent, straight over the
//! container's address when the engine is on this machine, else through `docker exec`;
//! the session token from the state folder, else read back from the container.

use anyhow::Context;
use bollard::Docker;
use futures_util::future::BoxFuture;
use std::sync::Arc;

use crate::agent_link::{AgentLink, Connected};
use crate::backend::docker;
use crate::engine::EngineChoice;
use crate::state::TokenStore;
use crate::sync::engine::Connector;

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
