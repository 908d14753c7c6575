//! [`Backend`] on a Docker engine: connects on first use (DOCKER_HOST, the docker context,
//! else the local socket) and hands each call to the module that holds it.

use bollard::Docker;
use futures_util::future::BoxFuture;
use std::sync::Arc;
use std::time::Duration;

use super::deploy::DockerDeployer;
use super::routing::{self, DockerRouter};
use super::swap::DockerSwap;
use super::{env, intercepts};
use crate::backend::{Backend, DevEnv, Fut, Words};
use crate::config::{Project, Service};
use crate::deploy::Deployer;
use crate::engine::{self, EngineChoice};
use crate::intercept::shared::Router;
use crate::intercept::{InterceptOptions, Leave, Listed, Swap};
use crate::status::{Check, ServiceReport};
use crate::ui::Ui;

#[derive(Default)]
pub struct DockerBackend {
    conn: tokio::sync::OnceCell<(Docker, EngineChoice)>,
}

impl DockerBackend {
    pub fn new() -> DockerBackend {
        DockerBackend::default()
    }

    async fn engine(&self) -> anyhow::Result<(&Docker, &EngineChoice)> {
        let (d, c) = self
            .conn
            .get_or_try_init(|| async {
                let choice = engine::choose();
                let docker = engine::connect(&choice).await?;
                anyhow::Ok((docker, choice))
            })
            .await?;
        Ok((d, c))
    }
}

impl Backend for DockerBackend {
    fn words(&self) -> Words {
        Words {
            envs: "containers".into(),
            on_stop: "stops the containers",
            on_keep: "leaves the containers running (--stop-on-exit stops them)",
            place: String::new(),
        }
    }

    fn up<'a>(
        &'a self,
        project: &'a Project,
        services: &'a [&'a Service],
        build: bool,
        ui: &'a Ui,
    ) -> Fut<'a, Vec<DevEnv>> {
        Box::pin(async move {
            let (docker, engine) = self.engine().await?;
            env::up(docker, engine, project, services, build, ui).await
        })
    }

    fn attach<'a>(&'a self, project: &'a Project, service: &'a Service) -> Fut<'a, DevEnv> {
        Box::pin(async move {
            let (docker, engine) = self.engine().await?;
            env::attach(docker, engine, project, service).await
        })
    }

    fn stop<'a>(&'a self, project: &'a Project, services: &'a [String]) -> Fut<'a, ()> {
        Box::pin(async move { env::stop(self.engine().await?.0, project, services).await })
    }

    fn down<'a>(&'a self, project: &'a Project, keep_volumes: bool) -> Fut<'a, ()> {
        Box::pin(async move { env::down(self.engine().await?.0, project, keep_volumes).await })
    }

    fn deployer<'a>(
        &'a self,
        _project: &'a Project,
        health_timeout: Option<Duration>,
        _watch: bool,
    ) -> Fut<'a, Arc<dyn Deployer>> {
        Box::pin(async move {
            let (docker, engine) = self.engine().await?;
            let d = DockerDeployer::new(
                docker.clone(),
                engine.clone(),
                health_timeout.unwrap_or(Duration::from_secs(30)),
            );
            Ok(Arc::new(d) as Arc<dyn Deployer>)
        })
    }

    fn swap<'a>(
        &'a self,
        opts: &'a InterceptOptions,
        project: Option<&'a Project>,
    ) -> Fut<'a, Box<dyn Swap>> {
        Box::pin(async move {
            let (docker, engine) = self.engine().await?;
            let agent = crate::backend::read_agent_binary()?;
            let swap = DockerSwap::new(
                docker.clone(),
                engine.clone(),
                agent,
                opts,
                project.map(|p| p.name.clone()),
            )
            .await?;
            Ok(Box::new(swap) as Box<dyn Swap>)
        })
    }

    fn router<'a>(
        &'a self,
        opts: &'a InterceptOptions,
        project: Option<&'a Project>,
    ) -> Fut<'a, Box<dyn Router>> {
        Box::pin(async move {
            let (docker, engine) = self.engine().await?;
            let agent = crate::backend::read_agent_binary()?;
            let router = DockerRouter::new(
                docker.clone(),
                engine,
                agent,
                opts,
                project.map(|p| p.name.clone()),
            )
            .await?;
            Ok(Box::new(router) as Box<dyn Router>)
        })
    }

    fn intercepts(&self) -> Fut<'_, Vec<Listed>> {
        Box::pin(async move {
            let docker = self.engine().await?.0;
            let mut all: Vec<Listed> = intercepts::list(docker)
                .await?
                .into_iter()
                .map(|line| {
                    let service = line
                        .split_whitespace()
                        .next()
                        .unwrap_or_default()
                        .to_string();
                    Listed::replace(&service, line)
                })
                .collect();
            all.extend(routing::list(docker).await?);
            Ok(all)
        })
    }

    fn leave<'a>(&'a self, leave: Leave<'a>) -> Fut<'a, ()> {
        Box::pin(async move {
            let docker = self.engine().await?.0;
            let routed = routing::leave(docker, &leave).await?;
            if let Some(id) = leave.holder {
                if !routed {
                    anyhow::bail!("no filtered intercept has holder {id} (`devloop intercept list` shows them)");
                }
                return Ok(());
            }
            if let Some(session) = leave.session {
                if !routed {
                    println!("no intercept of session {session} is held by you");
                }
                return Ok(());
            }
            intercepts::leave(docker, leave.target, leave.all, leave.project, routed).await
        })
    }

    fn status<'a>(&'a self, project: &'a Project) -> Fut<'a, Vec<ServiceReport>> {
        Box::pin(async move {
            let (docker, engine) = self.engine().await?;
            env::status(docker, engine, project).await
        })
    }

    /// The project's host ports (the engine's own checks are `doctor`'s: every back end
    /// builds images in it).
    fn doctor<'a>(&'a self, project: Option<&'a Project>) -> BoxFuture<'a, Vec<Check>> {
        Box::pin(async move {
            let Ok((docker, engine)) = self.engine().await else {
                return Vec::new(); // `doctor` reports the engine itself
            };
            let mut checks = Vec::new();
            if !engine.is_local() {
                checks.push(Check::note(
                    "agent route",
                    "remote engine: the cli reaches agents through `docker exec` streams",
                ));
            }
            if let Some(project) = project {
                checks.extend(env::doctor(docker, engine, project).await);
            }
            checks
        })
    }
}
