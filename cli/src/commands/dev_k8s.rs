//! `up`, `sync` and `down` on Kubernetes: dev pods (see `backend::k8s::devpod`). The sync,
//! logs and restarts are the Docker ones (`sync::engine`), reaching the agent through a
//! [`KubeConnector`](crate::backend::k8s::connector::KubeConnector) (a port-forward) instead of the container network.

use anyhow::Context;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::backend::k8s::connector::{connector_for, KubeConnector};
use crate::backend::k8s::devpod::{self, DevRecord, DevSpec};
use crate::backend::k8s::intercept as ki;
use crate::backend::k8s::registry::{self, Pusher, Registry};
use crate::backend::k8s::rollout::{deployment_of, service_container};
use crate::backend::k8s::swap::agent_image;
use crate::backend::k8s::{Cluster, KubeSettings};
use crate::config::{Project, Service};
use crate::state::now_ms;
use crate::sync::engine::{self, SyncSettings};
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
    if let Ok((docker, _)) = super::connect_engine().await {
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
    project: &Project,
    settings: &KubeSettings,
    configured_registry: Option<&str>,
    services: &[String],
    no_logs: bool,
    on_exit: crate::config::file::OnExit,
) -> anyhow::Result<()> {
    let selected: Vec<&Service> = project
        .select(services)?
        .into_iter()
        .filter(|s| s.sync.is_some())
        .collect();
    if selected.is_empty() {
        anyhow::bail!("no service has `sync` in devloop.toml: nothing to run in dev mode");
    }
    let ui = Ui::new(selected.iter().map(|s| s.name.as_str()));
    let cluster = Cluster::connect(settings).await?;
    let route = registry::route(&cluster, configured_registry).await?;
    let agent = agent_image(&route, &super::read_agent_binary()?.1).await?;
    let reg = match route {
        registry::ImageRoute::Registry(r) => Some(r),
        registry::ImageRoute::Load { .. } => None,
    };
    let mut connectors = Vec::new();
    for service in &selected {
        let t = Instant::now();
        let (conn, what) = ensure_dev_pod(&cluster, reg.as_ref(), &agent, &project.name, service)
            .await
            .with_context(|| format!("dev mode for `{}`", service.name))?;
        let pod = ki::wait_session_pod(
            &cluster,
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
        connectors.push((service.name.clone(), Arc::new(conn)));
    }
    let mut syncs: Vec<(SyncSettings, Arc<dyn engine::Connector>)> = Vec::new();
    for (name, conn) in connectors {
        let service = project.service(&name)?;
        syncs.push((
            SyncSettings::for_service(&project.name, service, !no_logs, None),
            conn,
        ));
    }
    eprintln!(
        "devloop: syncing {} into their dev pods in namespace {}; Ctrl-C stops syncing ({})",
        selected
            .iter()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        cluster.namespace,
        match on_exit {
            crate::config::file::OnExit::Stop => "and switches the Deployments back",
            crate::config::file::OnExit::Keep =>
                "the pods stay in dev mode; `devloop down` or --stop-on-exit switches them back",
        }
    );
    let ended = engine::run_all(syncs, ui.clone(), "sync", crate::signals::shutdown()).await;
    if on_exit == crate::config::file::OnExit::Stop {
        // A dev pod stopped is a Deployment back to its original: what `down` does, for the
        // services this `up` switched.
        let names: Vec<&str> = selected.iter().map(|s| s.name.as_str()).collect();
        restore_dev_modes(&cluster, &project.name, &names).await?;
    } else {
        eprintln!("devloop: sync stopped; the dev pods keep running, but their files no longer follow your edits until `devloop up` runs again");
    }
    ended
}

/// `down` on Kubernetes: the project's Deployments in dev mode back to their originals
/// (another project's, in the same namespace, are left alone), and their sync status and
/// locks cleared as on Docker.
pub async fn down(project: &Project, settings: &KubeSettings) -> anyhow::Result<()> {
    let cluster = Cluster::connect(settings).await?;
    let services: Vec<&str> = project.services.iter().map(|s| s.name.as_str()).collect();
    let restored = restore_dev_modes(&cluster, &project.name, &services).await?;
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

/// `sync SERVICE` on Kubernetes: only the sync (and logs) of a pod already in dev mode.
pub async fn sync(
    project: &Project,
    settings: &KubeSettings,
    service: &str,
    no_logs: bool,
) -> anyhow::Result<()> {
    let svc = project.service(service)?;
    let cluster = Cluster::connect(settings).await?;
    let d = deployment_of(&cluster, service).await?.with_context(|| {
        format!(
            "no Deployment or Service named `{service}` in namespace `{}`",
            cluster.namespace
        )
    })?;
    let r = devpod::record_of(&d).with_context(|| {
        format!("`{service}` is not in dev mode; `devloop up {service}` switches it")
    })?;
    let conn = Arc::new(connector_for(&cluster, &r).await?);
    let ui = Ui::new([service]);
    let settings = SyncSettings::for_service(&project.name, svc, !no_logs, None);
    engine::run_all(
        vec![(settings, conn)],
        ui,
        "sync",
        crate::signals::shutdown(),
    )
    .await?;
    eprintln!(
        "devloop: sync of `{service}` stopped; the dev pod's files no longer follow your edits"
    );
    Ok(())
}
