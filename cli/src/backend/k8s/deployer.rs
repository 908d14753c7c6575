//! Deploys on Kubernetes ([`Deployer`]): snapshots go to the cluster's registry (or are
//! loaded with the local cluster's tool), the Deployment rolls out to them ([`super::rollout`]),
//! and its revisions are the versions for `history` and `rollback`. Under `watch`, versions
//! run under the agent, reached over a port-forward, so saves are synced into them.

use anyhow::Context;
use bollard::Docker;
use futures_util::future::BoxFuture;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::connector::watched_connector;
use super::registry::{self, Pusher};
use super::rollout::{
    self, deployment_of, service_container, snapshot_tag, KubeRollout, WatchWrap,
};
use super::{devpod, intercept as ki, Cluster};
use crate::config::{Project, Service};
use crate::deploy::{history, Deployer, Destination, Snapshot};
use crate::sync::engine::Connector;
use crate::ui::{ago, human_ms, Ui};

pub struct KubeDeployer {
    /// Snapshots are built in the local engine; `history` and `rollback` do without it.
    docker: Result<Docker, String>,
    rollout: KubeRollout,
    /// The registry's client and its name for the nodes; None: images are loaded with the
    /// local cluster's tool (kind, k3d, minikube) from the engine. An error when the cluster
    /// has neither (said when a snapshot needs it: `history` and `rollback` do without).
    registry: Result<Option<(Pusher, String)>, String>,
}

impl KubeDeployer {
    /// `watch`: versions run under the agent, so that `devloop watch` can sync into them.
    pub async fn new(
        cluster: Cluster,
        configured_registry: Option<&str>,
        project: &Project,
        health_timeout: Option<Duration>,
        watch: bool,
    ) -> anyhow::Result<KubeDeployer> {
        let docker = crate::engine::connect(&crate::engine::choose())
            .await
            .map_err(|e| e.to_string());
        let route = registry::route(&cluster, configured_registry).await;
        let watch_agent = match (&route, watch) {
            (Ok(route), true) => {
                Some(super::swap::agent_image(route, &crate::backend::read_agent_binary()?).await?)
            }
            (Err(e), true) => anyhow::bail!("{e:#}"),
            (_, false) => None,
        };
        let registry = match route {
            Ok(registry::ImageRoute::Registry(reg)) => Pusher::new(&reg.push)
                .map(|p| Some((p, reg.pull)))
                .map_err(|e| e.to_string()),
            Ok(registry::ImageRoute::Load { .. }) => Ok(None),
            Err(e) => Err(format!("{e:#}")),
        };
        Ok(KubeDeployer {
            docker,
            registry,
            rollout: KubeRollout {
                cluster,
                manifests: project
                    .target
                    .manifests
                    .as_ref()
                    .map(|m| project.dir.join(m)),
                // A rollout also pulls the image and starts pods one after another.
                timeout: health_timeout.unwrap_or(Duration::from_secs(60)),
                watch_agent,
            },
        })
    }

    fn cluster(&self) -> &Cluster {
        &self.rollout.cluster
    }
}

impl Deployer for KubeDeployer {
    fn engine(&self) -> anyhow::Result<&Docker> {
        self.docker.as_ref().map_err(|e| anyhow::anyhow!("{e}"))
    }

    fn destination(&self) -> anyhow::Result<Destination<'_>> {
        match &self.registry {
            Ok(Some((pusher, pull))) => Ok(Destination::Registry { pusher, pull }),
            Ok(None) => Ok(Destination::Engine),
            Err(e) => anyhow::bail!("{e}"),
        }
    }

    fn deliver<'a>(&'a self, snapshot: &'a Snapshot) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move {
            if matches!(self.registry, Ok(None)) {
                // No registry: the snapshot made in the engine goes to the cluster with its tool.
                registry::load_into_cluster(&self.cluster().context, &snapshot.image).await?;
            }
            Ok(())
        })
    }

    fn roll_out<'a>(
        &'a self,
        _project: &'a crate::config::Project,
        service: &'a crate::config::Service,
        snapshot: &'a crate::deploy::Snapshot,
    ) -> futures_util::future::BoxFuture<'a, anyhow::Result<crate::deploy::Rollout>> {
        Box::pin(async move {
            let watch = match (&self.rollout.watch_agent, &service.sync) {
                (Some(agent), Some(sync)) => Some(WatchWrap {
                    agent_image: agent.clone(),
                    sync_to: sync.container_dir.clone(),
                }),
                _ => None,
            };
            let done = rollout::deploy_image(
                &self.rollout.cluster,
                &service.name,
                &snapshot.image,
                snapshot.command.as_ref(),
                watch.as_ref(),
                self.rollout.manifests.as_deref(),
                self.rollout.timeout,
            )
            .await?;
            Ok(match done {
                None => crate::deploy::Rollout::Unchanged,
                Some(r) => crate::deploy::Rollout::Ready {
                    ready_ms: r.ready_ms,
                    revision: r.revision,
                    created: r.created,
                },
            })
        })
    }

    fn running_version<'a>(
        &'a self,
        project: &'a str,
        service: &'a str,
    ) -> futures_util::future::BoxFuture<'a, anyhow::Result<Option<String>>> {
        Box::pin(async move {
            let Some(d) = deployment_of(&self.rollout.cluster, service).await? else {
                return Ok(None);
            };
            let template = &d["spec"]["template"];
            let index = service_container(template, service)?;
            let repo = crate::deploy::snapshot_repo(project, service);
            Ok(template["spec"]["containers"][index]["image"]
                .as_str()
                .and_then(|i| snapshot_tag(i, &repo)))
        })
    }

    fn remember<'a>(
        &'a self,
        project: &'a Project,
        service: &'a Service,
        snapshot: &'a Snapshot,
    ) -> BoxFuture<'a, ()> {
        remember(project, service, snapshot);
        Box::pin(async {})
    }

    fn history<'a>(
        &'a self,
        project: &'a Project,
        service: &'a str,
    ) -> BoxFuture<'a, anyhow::Result<String>> {
        Box::pin(history(self.cluster(), project, service))
    }

    fn rollback<'a>(
        &'a self,
        _project: &'a Project,
        service: &'a Service,
        to_revision: Option<u64>,
    ) -> BoxFuture<'a, anyhow::Result<String>> {
        Box::pin(async move {
            let started = Instant::now();
            let (from, to, done) = rollout::rollback(
                self.cluster(),
                &service.name,
                to_revision,
                self.rollout.timeout,
            )
            .await?;
            Ok(format!(
                "rolled back from revision {from} to {to} (now revision {}) in {}; rollout to ready {}",
                done.revision.map(|r| r.to_string()).unwrap_or_else(|| "?".into()),
                human_ms(started.elapsed().as_millis() as u64),
                human_ms(done.ready_ms)
            ))
        })
    }

    fn watched<'a>(
        &'a self,
        _project: &'a Project,
        service: &'a Service,
        ui: &'a Ui,
        deploy: &'a (dyn Fn() -> BoxFuture<'a, anyhow::Result<String>> + Send + Sync),
    ) -> BoxFuture<'a, anyhow::Result<Option<Arc<dyn Connector>>>> {
        Box::pin(watched(self.cluster(), service, ui, deploy))
    }
}

/// Records what changed in the version just rolled out to a cluster (for `history`), with
/// no image pruning: the cluster keeps its revisions.
fn remember(project: &Project, service: &Service, snap: &Snapshot) {
    let h = history::with_rollout(&project.name, &service.name, snap);
    let old: Vec<String> = h
        .beyond(project.keep_versions.max(10))
        .into_iter()
        .map(|v| v.tag)
        .collect();
    history::forget_and_save(&project.name, &service.name, h, &old);
}

/// `history` on Kubernetes: the Deployment's revisions (its ReplicaSets), newest first,
/// with what changed when the version was deployed from this machine.
async fn history(cluster: &Cluster, project: &Project, service: &str) -> anyhow::Result<String> {
    let d = rollout::deployment_of(cluster, service).await?.with_context(|| {
        format!(
            "no Deployment or Service named `{service}` in namespace `{}` (`devloop deploy {service}` creates it when [target] names the manifests)",
            cluster.namespace
        )
    })?;
    let (revs, current) = rollout::revisions(cluster, &d).await?;
    let repo = crate::deploy::snapshot_repo(&project.name, service);
    let local = history::load(&project.name, service);
    let mut out = format!(
        "revisions of deployment/{} in {}, newest first (* runs now; the Deployment keeps {}):\n",
        d["metadata"]["name"].as_str().unwrap_or(service),
        cluster.namespace,
        d["spec"]["revisionHistoryLimit"].as_u64().unwrap_or(10) + 1
    );
    for r in revs.iter().rev() {
        let mark = if Some(r.number) == current { "*" } else { " " };
        let tag = r
            .images
            .iter()
            .find_map(|i| rollout::snapshot_tag(i, &repo));
        let what = match &tag {
            Some(t) => local
                .versions
                .iter()
                .find(|v| &v.tag == t)
                .map(|v| format!("{t}  {}", v.changes))
                .unwrap_or_else(|| t.clone()),
            None => r.images.join(", "),
        };
        let cause = r
            .cause
            .as_deref()
            .filter(|c| !c.starts_with("devloop deploy"))
            .map(|c| format!("  ({c})"))
            .unwrap_or_default();
        let failed = if r.failed {
            "  [rollout failed, undone]"
        } else {
            ""
        };
        let when = humantime::parse_rfc3339(&r.created)
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| ago(d.as_millis() as u64))
            .unwrap_or_default();
        out.push_str(&format!(
            "{mark} {:>3}  {:<12}  {what}{cause}{failed}\n",
            r.number, when
        ));
    }
    Ok(out)
}

/// Kubernetes: the service's Deployment switched to the current snapshot running under the
/// agent (created from the manifests first when missing; nothing rolls out when it already
/// runs so); None when it is intercepted or in dev mode.
async fn watched<'a>(
    cluster: &'a Cluster,
    service: &'a Service,
    ui: &'a Ui,
    deploy: &'a (dyn Fn() -> BoxFuture<'a, anyhow::Result<String>> + Send + Sync),
) -> anyhow::Result<Option<Arc<dyn Connector>>> {
    let name = &service.name;
    if let Some(d) = deployment_of(cluster, name).await? {
        if let Some(r) = ki::record_of(&d) {
            ui.warn(
                name,
                format!(
                    "intercepted (by {}): left alone (end it with `devloop leave {name}`)",
                    r.holder
                ),
            );
            return Ok(None);
        }
        if let Some(r) = devpod::record_of(&d) {
            ui.warn(name, format!("in dev mode (by {}): left alone (`devloop down` switches it back; `devloop up` syncs into it)", r.holder));
            return Ok(None);
        }
    }
    let line = deploy().await?;
    ui.info(name, line);
    let d = deployment_of(cluster, name)
        .await?
        .with_context(|| format!("the Deployment of `{name}` is gone"))?;
    let conn = watched_connector(cluster, &d).await?.with_context(|| {
        format!(
            "deployment/{} does not run under the agent after the rollout (changed meanwhile?)",
            d["metadata"]["name"].as_str().unwrap_or_default()
        )
    })?;
    Ok(Some(Arc::new(conn)))
}
