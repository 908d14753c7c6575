//! `devloop up` and `devloop sync`: dev containers, then one sync per service until Ctrl-C.

use anyhow::Context;
use std::time::Instant;

use super::{
    choose_target, connect_engine, connector, load_project, read_agent_binary, Global, TargetChoice,
};
use crate::backend::docker::{self, Ensured};
use crate::backend::labels;
use crate::config::file::OnExit;
use crate::sync::engine::{self, SyncSettings};
use crate::ui::Ui;

#[derive(Debug, Clone, Default)]
pub struct UpOptions {
    /// Only these services (default: all).
    pub services: Vec<String>,
    /// Rebuild images from their Dockerfiles even when they exist.
    pub build: bool,
    /// Override the config's `up.on_exit`.
    pub on_exit: Option<OnExit>,
    pub no_logs: bool,
}

pub async fn up(global: &Global, opts: UpOptions) -> anyhow::Result<()> {
    let project = load_project(global)?;
    if let TargetChoice::Kubernetes { settings, registry } = choose_target(global, Some(&project)) {
        if opts.build {
            anyhow::bail!("`up --build` builds images in the local engine; on Kubernetes a dev pod runs its Deployment's own image with your files synced into it, so there is nothing to build: drop --build (`devloop deploy` builds and rolls out a new image)");
        }
        let on_exit = opts.on_exit.unwrap_or(project.on_exit);
        return super::dev_k8s::up(
            &project,
            &settings,
            registry.as_deref(),
            &opts.services,
            opts.no_logs,
            on_exit,
        )
        .await;
    }
    let selected = project.select(&opts.services)?;
    let ui = Ui::new(selected.iter().map(|s| s.name.as_str()));
    let (docker, engine_choice) = connect_engine().await?;
    let (_, agent) = read_agent_binary()?;
    let tokens = crate::state::TokenStore::new();

    let intercepted: Vec<String> =
        docker::list_project_containers(&docker, &project.name, Some(labels::KIND_INTERCEPT))
            .await?
            .iter()
            .filter_map(|c| docker::label(c, labels::SERVICE).map(String::from))
            .collect();

    let mut started = Vec::new();
    for service in &selected {
        if let Some(found) = crate::backend::docker_deploy::recover_interrupted(
            &docker,
            &project.name,
            &service.name,
        )
        .await?
        {
            ui.warn(&service.name, found);
        }
        if intercepted.contains(&service.name) {
            ui.warn(
                &service.name,
                "intercepted: left alone (end it with `devloop leave`)",
            );
            continue;
        }
        let t = Instant::now();
        let image =
            crate::image::ensure_service_image(&docker, &project, service, opts.build, &ui).await?;
        let facts = docker::image_facts(&docker, &image).await?;
        let spec = docker::DevSpec::new(&project, service, &image, &facts);
        let (name, what) = docker::ensure_dev_container(&docker, &spec, &agent, &tokens)
            .await
            .with_context(|| format!("starting the dev container of `{}`", service.name))?;
        let verb = match what {
            Ensured::Created => "created",
            Ensured::Started => "started",
            Ensured::AlreadyRunning => "running",
        };
        let ports: Vec<String> = service
            .ports
            .iter()
            .filter_map(|p| {
                p.host_port
                    .map(|h| format!("http://{}:{h}", p.host_ip.as_deref().unwrap_or("127.0.0.1")))
            })
            .collect();
        let at = if ports.is_empty() {
            String::new()
        } else {
            format!(", serving at {}", ports.join(" "))
        };
        ui.info(
            &service.name,
            format!(
                "container {name} {verb} ({:.1} s){at}",
                t.elapsed().as_secs_f64()
            ),
        );
        started.push(service.name.clone());
    }

    let on_exit = opts.on_exit.unwrap_or(project.on_exit);
    let mut syncs: Vec<(SyncSettings, std::sync::Arc<dyn engine::Connector>)> = Vec::new();
    for name in &started {
        let service = project.service(name)?;
        let settings = SyncSettings::for_service(&project.name, service, !opts.no_logs, None);
        syncs.push((
            settings,
            connector(&docker, &engine_choice, &project.name, &service.name),
        ));
    }
    if started.is_empty() {
        return Ok(());
    }
    eprintln!(
        "devloop: syncing {}; Ctrl-C stops syncing and {}",
        started.join(", "),
        match on_exit {
            OnExit::Keep => "leaves the containers running (--stop-on-exit stops them)",
            OnExit::Stop => "stops the containers",
        }
    );
    let ended = engine::run_all(syncs, ui.clone(), "sync", crate::signals::shutdown()).await;
    match on_exit {
        OnExit::Stop => {
            for name in &started {
                let c = docker::container_name(&project.name, name);
                docker::stop_container(&docker, &c).await?;
            }
            eprintln!("devloop: stopped {} (start again with `devloop up`, remove with `devloop down`)", started.join(", "));
        }
        OnExit::Keep => eprintln!(
            "devloop: sync stopped; containers keep running, but their files no longer follow your edits until `devloop up` or `devloop sync` runs again"
        ),
    }
    ended
}

/// `devloop sync SERVICE`: only the sync (and logs) of one existing dev container.
pub async fn sync(global: &Global, service: &str, no_logs: bool) -> anyhow::Result<()> {
    let project = load_project(global)?;
    if let TargetChoice::Kubernetes { settings, .. } = choose_target(global, Some(&project)) {
        return super::dev_k8s::sync(&project, &settings, service, no_logs).await;
    }
    let svc = project.service(service)?;
    let (docker, engine_choice) = connect_engine().await?;
    let containers = docker::list_project_containers(&docker, &project.name, None).await?;
    let Some(c) = containers.iter().find(|c| {
        docker::label(c, labels::SERVICE) == Some(service)
            && matches!(
                docker::label(c, labels::KIND),
                Some(labels::KIND_DEV) | Some(labels::KIND_DEPLOY)
            )
    }) else {
        anyhow::bail!("`{service}` has no dev container; start it with `devloop up {service}`");
    };
    if !docker::is_running(c) {
        anyhow::bail!(
            "the dev container of `{service}` is not running; start it with `devloop up {service}`"
        );
    }
    let ui = Ui::new([service]);
    let settings = SyncSettings::for_service(&project.name, svc, !no_logs, None);
    let conn = connector(&docker, &engine_choice, &project.name, service);
    engine::run_all(
        vec![(settings, conn)],
        ui,
        "sync",
        crate::signals::shutdown(),
    )
    .await?;
    eprintln!(
        "devloop: sync of `{service}` stopped; the container's files no longer follow your edits"
    );
    Ok(())
}
