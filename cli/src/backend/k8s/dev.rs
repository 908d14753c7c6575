//! Dev environments on Kubernetes: `up` switches each service's Deployment to a dev pod (see
//! [`super::devpod`]), `sync` attaches to one, `down` and `--stop-on-exit` switch them back.
//! The sync, logs and restarts are the Docker ones (`sync::engine`), reaching the agent
//! through a [`KubeConnector`] (a port-forward) instead of the container network.

use anyhow::Context;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::connector::{connector_for, KubeConnector};
use super::devpod::{self, DevRecord, DevSpec};
use super::intercept as ki;
use super::registry::{self, Pusher, Registry};
use super::rollout::{deployment_of, service_container};
use super::swap::agent_image;
use super::Cluster;
use crate::backend::DevEnv;
use crate::config::{Project, Service};
use crate::state::now_ms;
use crate::ui::{human_ms, Ui};

/// The command and working directory the container's image declares: from the local
/// engine when it has the image, else from the registry.
async fn image_command(
    image: &str,
    reg: Option<&Registry>,
) -> anyhow::Result<(Vec<String>, Vec<String>, Option<String>)> {
    let strings = |v: &serde_json::Value| -> Vec<String> {
        v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|x| x.as_str().map(String::from))
            .collect()
    };
    if let Ok(docker) = crate::engine::connect(&crate::engine::choose()).await {
        if let Ok(i) = docker.inspect_image(image).await {
            let c = i.config.unwrap_or_default();
            return Ok((
                c.entrypoint.unwrap_or_default(),
                c.cmd.unwrap_or_default(),
                c.working_dir.filter(|w| !w.is_empty()),
            ));
        }
    }
    let (host, repo, reference) = registry::parse_reference(image);
    // The cluster's name for its registry may not be this machine's (kind: kind-registry:5000
    // inside, localhost:5001 outside).
    let host = match reg {
        Some(r) if host == r.pull => r.push.clone(),
        _ => host,
    };
    let config = Pusher::new(&host)?
        .image_config(&repo, &reference)
        .await
        .with_context(|| format!("reading the command of image {image} (or give the container a `command` in its Deployment)"))?;
    let c = &config["config"];
    Ok((
        strings(&c["Entrypoint"]),
        strings(&c["Cmd"]),
        c["WorkingDir"]
            .as_str()
            .filter(|w| !w.is_empty())
            .map(String::from),
    ))
}

/// Puts one service's Deployment in dev mode (or finds it there); returns the connector to
/// its agent and what was done.
async fn ensure_dev_pod(
    cluster: &Cluster,
    reg: Option<&Registry>,
    agent: &str,
    project_name: &str,
    service: &Service,
) -> anyhow::Result<(KubeConnector, String)> {
    let sync = service.sync.as_ref().context("no `sync` in devloop.toml")?;
    let d = deployment_of(cluster, &service.name).await?.with_context(|| {
        format!(
            "no Deployment or Service named `{}` in namespace `{}`; `devloop deploy {}` creates it from [target] manifests",
            service.name, cluster.namespace, service.name
        )
    })?;
    let name = d["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    if let Some(r) = ki::record_of(&d) {
        anyhow::bail!(
            "deployment/{name} is intercepted (by {}); `devloop leave {}` first",
            r.holder,
            r.service
        );
    }
    if let Some(r) = devpod::record_of(&d) {
        return Ok((
            connector_for(cluster, &r).await?,
            format!("deployment/{name} already in dev mode"),
        ));
    }
    let template = d["spec"]["template"].clone();
    // A version `devloop watch` left under the agent: dev mode wraps its plain form (and
    // `down` brings back the template as it is now).
    let plain = devpod::unwatched(&template).unwrap_or_else(|| template.clone());
    let index = service_container(&plain, &service.name)?;
    let container = &plain["spec"]["containers"][index];
    let image = container["image"]
        .as_str()
        .context("the container has no image")?;
    let needs_image = container["command"].is_null() || container["workingDir"].is_null();
    let (entrypoint, cmd, image_workdir) = if needs_image {
        image_command(image, reg).await?
    } else {
        (Vec::new(), Vec::new(), None)
    };
    let command = devpod::effective_command(container, &entrypoint, &cmd);
    if command.is_empty() {
        anyhow::bail!(
            "the container of deployment/{name} has no command and its image declares none"
        );
    }
    let workdir = container["workingDir"]
        .as_str()
        .map(String::from)
        .or(image_workdir);
    let session = crate::state::new_token()[..12].to_string();
    let token = crate::state::new_token();
    let record = DevRecord {
        deployment: name.clone(),
        service: service.name.clone(),
        container: container["name"].as_str().unwrap_or_default().to_string(),
        template: template.clone(),
        replicas: d["spec"]["replicas"].clone(),
        session: session.clone(),
        secret: devpod::secret_name(&name),
        started_ms: now_ms(),
        holder: crate::ownership::whoami(),
        project: project_name.to_string(),
    };
    devpod::create_token_secret(cluster, &record.secret, &token).await?;
    let spec = DevSpec {
        agent_image: agent,
        sync_to: &sync.container_dir,
        command: &command,
        workdir: workdir.as_deref(),
        session: &session,
        secret: &record.secret,
    };
    let dev = devpod::dev_template(&plain, index, &spec);
    if let Err(e) = devpod::swap_in(cluster, &d, &record, &dev).await {
        let _ = cluster
            .delete(&cluster.path("v1", "secrets", Some(&record.secret)))
            .await;
        return Err(e);
    }
    Ok((
        KubeConnector {
            cluster: cluster.clone(),
            deployment: name.clone(),
            label: devpod::SESSION_LABEL,
            session,
            token,
        },
        format!("deployment/{name} switched to dev mode"),
    ))
}

pub async fn up(
    cluster: &Cluster,
    configured_registry: Option<&str>,
    project: &Project,
    services: &[&Service],
    ui: &Ui,
) -> anyhow::Result<Vec<DevEnv>> {
    let selected: Vec<&Service> = services
        .iter()
        .copied()
        .filter(|s| s.sync.is_some())
        .collect();
    if selected.is_empty() {
        anyhow::bail!("no service has `sync` in devloop.toml: nothing to run in dev mode");
    }
    let route = registry::route(cluster, configured_registry).await?;
    let agent = agent_image(&route, &crate::backend::read_agent_binary()?).await?;
    let reg = match route {
        registry::ImageRoute::Registry(r) => Some(r),
        registry::ImageRoute::Load { .. } => None,
    };
    let mut envs = Vec::new();
    for service in &selected {
        let t = Instant::now();
        let (conn, what) = ensure_dev_pod(cluster, reg.as_ref(), &agent, &project.name, service)
            .await
            .with_context(|| format!("dev mode for `{}`", service.name))?;
        let pod = ki::wait_session_pod(
            cluster,
            devpod::SESSION_LABEL,
            &conn.session,
            Duration::from_secs(180),
        )
        .await?;
        ui.info(
            &service.name,
            format!(
                "{what}; pod {pod} ready ({})",
                human_ms(t.elapsed().as_millis() as u64)
            ),
        );
        envs.push(DevEnv {
            service: service.name.clone(),
            connector: Arc::new(conn),
        });
    }
    Ok(envs)
}

/// `--stop-on-exit`: a dev pod stopped is a Deployment back to its original, what `down`
/// does, for the services `up` switched.
pub async fn stop(cluster: &Cluster, project: &Project, services: &[String]) -> anyhow::Result<()> {
    let names: Vec<&str> = services.iter().map(String::as_str).collect();
    restore_dev_modes(cluster, &project.name, &names).await?;
    Ok(())
}

/// `down` on Kubernetes: the project's Deployments in dev mode back to their originals
/// (another project's, in the same namespace, are left alone), and their sync status and
/// locks cleared as on Docker.
pub async fn down(cluster: &Cluster, project: &Project) -> anyhow::Result<()> {
    let services: Vec<&str> = project.services.iter().map(|s| s.name.as_str()).collect();
    let restored = restore_dev_modes(cluster, &project.name, &services).await?;
    for s in &services {
        let _ = crate::state::remove_sync_status(&project.name, s);
    }
    if restored == 0 {
        eprintln!(
            "devloop: no Deployment of project {} in namespace {} is in dev mode",
            project.name, cluster.namespace
        );
    }
    Ok(())
}

/// Restores the dev modes of `services` of `project`; how many it restored.
async fn restore_dev_modes(
    cluster: &Cluster,
    project: &str,
    services: &[&str],
) -> anyhow::Result<usize> {
    let mut restored = 0;
    for r in devpod::in_dev_mode(cluster).await? {
        if !r.belongs_to(project, services) {
            continue;
        }
        if devpod::restore(cluster, &r).await? {
            restored += 1;
            eprintln!(
                "devloop: deployment/{} restored (dev mode since {})",
                r.deployment,
                crate::ui::ago(r.started_ms)
            );
        }
    }
    Ok(restored)
}

/// `sync SERVICE` on Kubernetes: a pod already in dev mode.
pub async fn attach(cluster: &Cluster, service: &Service) -> anyhow::Result<DevEnv> {
    let name = &service.name;
    let d = deployment_of(cluster, name).await?.with_context(|| {
        format!(
            "no Deployment or Service named `{name}` in namespace `{}`",
            cluster.namespace
        )
    })?;
    let r = devpod::record_of(&d)
        .with_context(|| format!("`{name}` is not in dev mode; `devloop up {name}` switches it"))?;
    Ok(DevEnv {
        service: name.clone(),
        connector: Arc::new(connector_for(cluster, &r).await?),
    })
}
