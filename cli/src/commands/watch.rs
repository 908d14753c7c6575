//! `devloop watch`: every save syncs, restarts or redeploys, as each service's rules say.
//! Services with nothing running are deployed first. On Kubernetes the watched versions run
//! under the agent (`devpod::watch_template`), reached over a port-forward, so saves are
//! synced into them as into a dev pod, and a redeploy rolls out the next version.

use anyhow::Context;
use std::sync::Arc;
use std::time::Duration;

use super::deploy::{snapshot_and_roll_out, Env};
use super::{connector, load_project, Global};
use crate::backend::k8s::connector::watched_connector;
use crate::backend::k8s::rollout::deployment_of;
use crate::backend::k8s::{devpod, intercept as ki, Cluster};
use crate::backend::{docker, labels};
use crate::config::{Project, Service};
use crate::sync::engine::{self, Connector, Redeploy, SyncSettings};
use crate::ui::Ui;

pub async fn watch(
    global: &Global,
    services: Vec<String>,
    health_timeout: Option<Duration>,
    no_logs: bool,
) -> anyhow::Result<()> {
    let project = Arc::new(load_project(global)?);
    let selected: Vec<String> = if services.is_empty() {
        project
            .services
            .iter()
            .filter(|s| s.sync.is_some())
            .map(|s| s.name.clone())
            .collect()
    } else {
        services
            .iter()
            .map(|s| project.service(s).map(|s| s.name.clone()))
            .collect::<Result<_, _>>()?
    };
    let ui = Ui::new(selected.iter().map(String::as_str));
    let env = Arc::new(Env::new(global, &project, health_timeout, true).await?);

    // Docker: what runs of the project, listed once for all services.
    let containers = match env.cluster() {
        None => docker::list_project_containers(&env.docker, &project.name, None).await?,
        Some(_) => Vec::new(),
    };
    // Each service to watch, with the way to reach the agent of the version that runs it.
    let mut watched: Vec<(String, Arc<dyn Connector>)> = Vec::new();
    for name in &selected {
        let service = project.service(name)?;
        if service.sync.is_none() {
            ui.info(name, "no `sync` in devloop.toml: nothing to watch");
            continue;
        }
        let conn = match env.cluster() {
            None => docker_version(&env, &containers, &project, service, &ui).await?,
            Some(cluster) => kube_version(&env, cluster, &project, service, &ui).await?,
        };
        if let Some(conn) = conn {
            watched.push((name.clone(), conn));
        }
    }
    if watched.is_empty() {
        anyhow::bail!("nothing to watch");
    }
    let names: Vec<&str> = watched.iter().map(|(n, _)| n.as_str()).collect();
    eprintln!(
        "devloop: watching {}; Ctrl-C stops (a rollout under way finishes first)",
        names.join(", ")
    );

    let mut syncs: Vec<(SyncSettings, Arc<dyn engine::Connector>)> = Vec::new();
    for (name, conn) in watched {
        let service = project.service(&name)?;
        let redeploy: Redeploy = {
            let (env, project, ui, name) = (env.clone(), project.clone(), ui.clone(), name.clone());
            Arc::new(move || {
                let (env, project, ui, name) =
                    (env.clone(), project.clone(), ui.clone(), name.clone());
                Box::pin(async move {
                    let service = project.service(&name)?;
                    snapshot_and_roll_out(&env, &project, service, &ui).await
                })
            })
        };
        let settings = SyncSettings::for_service(&project.name, service, !no_logs, Some(redeploy));
        syncs.push((settings, conn));
    }
    let ended = engine::run_all(syncs, ui.clone(), "watch", crate::signals::shutdown()).await;
    eprintln!("devloop: watch stopped; what runs stays as it is");
    ended
}

/// Docker: the service's dev or deployed container (deployed first when none runs); None
/// when it is intercepted.
async fn docker_version(
    env: &Env,
    containers: &[bollard::models::ContainerSummary],
    project: &Project,
    service: &Service,
    ui: &Ui,
) -> anyhow::Result<Option<Arc<dyn Connector>>> {
    let name = &service.name;
    let kind =
        |c: &&bollard::models::ContainerSummary| docker::label(c, labels::KIND).map(String::from);
    let mine: Vec<_> = containers
        .iter()
        .filter(|c| docker::label(c, labels::SERVICE) == Some(name.as_str()))
        .collect();
    if mine
        .iter()
        .any(|c| kind(c).as_deref() == Some(labels::KIND_INTERCEPT))
    {
        ui.warn(
            name,
            "intercepted: left alone (end it with `devloop leave`)",
        );
        return Ok(None);
    }
    let running = mine.iter().any(|c| {
        matches!(
            kind(c).as_deref(),
            Some(labels::KIND_DEV) | Some(labels::KIND_DEPLOY)
        ) && docker::is_running(c)
    });
    if !running {
        ui.info(name, "nothing runs yet: deploying first");
        let line = snapshot_and_roll_out(env, project, service, ui).await?;
        ui.info(name, line);
    }
    Ok(Some(connector(
        &env.docker,
        &env.engine,
        &project.name,
        name,
    )))
}

/// Kubernetes: the service's Deployment switched to the current snapshot running under the
/// agent (created from the manifests first when missing; nothing rolls out when it already
/// runs so); None when it is intercepted or in dev mode.
async fn kube_version(
    env: &Env,
    cluster: &Cluster,
    project: &Project,
    service: &Service,
    ui: &Ui,
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
    let line = snapshot_and_roll_out(env, project, service, ui).await?;
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
