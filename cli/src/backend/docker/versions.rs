//! The versions of a service deployed on Docker: the local history (the engine keeps the
//! images, devloop prunes the ones beyond `keep_versions`), `history`, `rollback` to the
//! version before the running one, and the version `watch` syncs into.

use anyhow::Context;
use bollard::models::ContainerSummary;
use futures_util::future::BoxFuture;
use std::sync::Arc;
use std::time::Instant;

use super::connector::connector;
use super::deploy::DockerDeployer;
use crate::backend::docker;
use crate::config::{Project, Service};
use crate::deploy::{history, Deployer, Rollout, Snapshot};
use crate::labels;
use crate::sync::engine::Connector;
use crate::ui::{ago, human_ms, Ui};

/// Records the version and prunes what is beyond `keep` (images no container uses).
pub async fn remember(d: &DockerDeployer, project: &Project, service: &Service, snap: &Snapshot) {
    let h = history::with_rollout(&project.name, &service.name, snap);
    let old = h.beyond(project.keep_versions);
    let mut pruned = Vec::new();
    for v in &old {
        match d
            .docker
            .remove_image(
                &v.image,
                None::<bollard::query_parameters::RemoveImageOptions>,
                None,
            )
            .await
        {
            Ok(_) => pruned.push(v.tag.clone()),
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => pruned.push(v.tag.clone()),
            Err(e) => tracing::info!(image = %v.image, error = %e, "kept an old version (in use?)"),
        }
    }
    history::forget_and_save(&project.name, &service.name, h, &pruned);
}

pub async fn history(
    d: &DockerDeployer,
    project: &Project,
    service: &str,
) -> anyhow::Result<String> {
    let running = d.running_version(&project.name, service).await?;
    let h = history::load(&project.name, service);
    if h.versions.is_empty() {
        return Ok(format!("no versions of `{service}` deployed from this machine yet (`devloop deploy {service}` makes one)\n"));
    }
    let mut out = format!(
        "versions of {service}, newest first (* runs now; the last {} are kept):\n",
        project.keep_versions
    );
    for v in h.versions.iter().rev() {
        let mark = if running.as_deref() == Some(v.tag.as_str()) {
            "*"
        } else {
            " "
        };
        let present = if d.docker.inspect_image(&v.image).await.is_ok() {
            ""
        } else {
            " [image gone]"
        };
        out.push_str(&format!(
            "{mark} {}  {:<12}  {}{present}\n",
            v.tag,
            ago(v.at_ms),
            v.changes
        ));
    }
    Ok(out)
}

pub async fn rollback(
    d: &DockerDeployer,
    project: &Project,
    service: &Service,
    to_revision: Option<u64>,
) -> anyhow::Result<String> {
    let service_name = &service.name;
    if to_revision.is_some() {
        anyhow::bail!("--to-revision is for the Kubernetes target (a Deployment's revisions); on Docker, rollback goes to the version before the running one");
    }
    let current = d
        .running_version(&project.name, service_name)
        .await?
        .with_context(|| {
            format!(
                "`{service_name}` runs no deployed version (`devloop deploy {service_name}` first)"
            )
        })?;
    let h = history::load(&project.name, service_name);
    let prev = h
        .previous(&current)
        .with_context(|| format!("no version of `{service_name}` before {current} in the history (`devloop history {service_name}`)"))?
        .clone();
    d.docker.inspect_image(&prev.image).await.with_context(|| {
        format!(
            "the image {} of the previous version is gone from the engine",
            prev.image
        )
    })?;
    let started = Instant::now();
    let snap = Snapshot {
        image: prev.image.clone(),
        tag: prev.tag.clone(),
        reused: true,
        files: 0,
        millis: 0,
        digest: h.last_tree.clone(),
        pushed: None,
        command: None,
    };
    let rollout = d.roll_out(project, service, &snap).await?;
    let line = format!(
        "rolled back from {current} to {} ({})",
        prev.tag,
        human_ms(started.elapsed().as_millis() as u64)
    );
    if let Rollout::Replaced { .. } = rollout {
        let mut h = h;
        // The previous version's tree is not stored; its entry keeps its own description.
        let at = crate::state::now_ms();
        h.versions.retain(|v| v.tag != prev.tag);
        h.versions.push(history::Version {
            at_ms: at,
            changes: format!("rollback from {current}: {}", prev.changes),
            ..prev
        });
        h.last_tree.clear();
        let _ = history::save(&project.name, service_name, &h);
    }
    Ok(line)
}

/// The service's dev or deployed container (deployed first when none runs); None when it is
/// intercepted.
pub async fn watched<'a>(
    d: &'a DockerDeployer,
    project: &'a Project,
    service: &'a Service,
    ui: &'a Ui,
    deploy: &'a (dyn Fn() -> BoxFuture<'a, anyhow::Result<String>> + Send + Sync),
) -> anyhow::Result<Option<Arc<dyn Connector>>> {
    let name = &service.name;
    let containers = docker::list_project_containers(&d.docker, &project.name, None).await?;
    let kind = |c: &&ContainerSummary| docker::label(c, labels::KIND).map(String::from);
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
        let line = deploy().await?;
        ui.info(name, line);
    }
    Ok(Some(connector(&d.docker, &d.engine, &project.name, name)))
}
