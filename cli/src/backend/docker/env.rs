//! Dev environments on Docker: `up` makes or starts each service's dev container (finishing
//! an interrupted deploy first), `sync` attaches to a running one, `down` removes what devloop
//! made for the project, and `status` reads each service's container, agent and sync.

use anyhow::Context;
use bollard::Docker;
use std::time::{Duration, Instant};

use super::connector::connector;
use super::{EngineChoice, Ensured};
use crate::backend::docker;
use crate::backend::DevEnv;
use crate::config::{Project, Service};
use crate::labels;
use crate::state::{remove_sync_status, TokenStore};
use crate::status::{describe_process, sync_state, Check, ServiceReport};
use crate::ui::Ui;

pub async fn up(
    docker: &Docker,
    engine: &EngineChoice,
    project: &Project,
    services: &[&Service],
    build: bool,
    ui: &Ui,
) -> anyhow::Result<Vec<DevEnv>> {
    let agent = crate::backend::read_agent_binary()?;
    let tokens = TokenStore::new();
    let intercepted: Vec<String> =
        docker::list_project_containers(docker, &project.name, Some(labels::KIND_INTERCEPT))
            .await?
            .iter()
            .filter_map(|c| docker::label(c, labels::SERVICE).map(String::from))
            .collect();

    let mut started = Vec::new();
    for service in services {
        if let Some(found) =
            super::deploy::recover_interrupted(docker, &project.name, &service.name).await?
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
        let image = crate::image::ensure_service_image(docker, project, service, build, ui).await?;
        let facts = docker::image_facts(docker, &image).await?;
        let spec = docker::DevSpec::new(project, service, &image, &facts);
        let (name, what) = docker::ensure_dev_container(docker, &spec, &agent, &tokens)
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
        started.push(DevEnv {
            service: service.name.clone(),
            connector: connector(docker, engine, &project.name, &service.name),
        });
    }
    Ok(started)
}

pub async fn attach(
    docker: &Docker,
    engine: &EngineChoice,
    project: &Project,
    service: &Service,
) -> anyhow::Result<DevEnv> {
    let name = &service.name;
    let containers = docker::list_project_containers(docker, &project.name, None).await?;
    let Some(c) = containers.iter().find(|c| {
        docker::label(c, labels::SERVICE) == Some(name.as_str())
            && matches!(
                docker::label(c, labels::KIND),
                Some(labels::KIND_DEV) | Some(labels::KIND_DEPLOY)
            )
    }) else {
        anyhow::bail!("`{name}` has no dev container; start it with `devloop up {name}`");
    };
    if !docker::is_running(c) {
        anyhow::bail!(
            "the dev container of `{name}` is not running; start it with `devloop up {name}`"
        );
    }
    Ok(DevEnv {
        service: name.clone(),
        connector: connector(docker, engine, &project.name, name),
    })
}

pub async fn stop(docker: &Docker, project: &Project, services: &[String]) -> anyhow::Result<()> {
    for name in services {
        let c = docker::container_name(&project.name, name);
        docker::stop_container(docker, &c).await?;
    }
    eprintln!(
        "devloop: stopped {} (start again with `devloop up`, remove with `devloop down`)",
        services.join(", ")
    );
    Ok(())
}

pub async fn down(docker: &Docker, project: &Project, keep_volumes: bool) -> anyhow::Result<()> {
    let removed = docker::down(docker, &project.name, keep_volumes).await?;
    let tokens = TokenStore::new();
    for svc in &project.services {
        tokens.remove(&docker::container_name(&project.name, &svc.name));
        let _ = remove_sync_status(&project.name, &svc.name);
    }
    if removed.containers.is_empty()
        && removed.volumes.is_empty()
        && removed.networks.is_empty()
        && removed.kept_networks.is_empty()
    {
        println!("nothing to remove for project {}", project.name);
    }
    for (what, list) in [
        ("container", &removed.containers),
        ("volume", &removed.volumes),
        ("network", &removed.networks),
    ] {
        for name in list {
            println!("removed {what} {name}");
        }
    }
    for (name, attached) in &removed.kept_networks {
        println!(
            "kept network {name}: {} not made by devloop {} attached (`docker network disconnect {name} NAME`, then `devloop down` again)",
            attached.join(", "),
            if attached.len() == 1 { "is" } else { "are" }
        );
    }
    Ok(())
}

pub async fn status(
    docker: &Docker,
    engine: &EngineChoice,
    project: &Project,
) -> anyhow::Result<Vec<ServiceReport>> {
    let containers = docker::list_project_containers(docker, &project.name, None).await?;
    let mut reports = Vec::new();
    for svc in &project.services {
        // The service's container (under its own name): a dev container, or a deployed
        // version.
        let canonical = docker::container_name(&project.name, &svc.name);
        let dev = containers.iter().find(|c| {
            docker::label(c, labels::SERVICE) == Some(svc.name.as_str())
                && docker::name_of(c) == canonical
                && matches!(
                    docker::label(c, labels::KIND),
                    Some(labels::KIND_DEV) | Some(labels::KIND_DEPLOY)
                )
        });
        // A version a killed deploy started beside it under a staging name.
        let leftovers: Vec<String> = containers
            .iter()
            .filter(|c| {
                docker::label(c, labels::SERVICE) == Some(svc.name.as_str())
                    && docker::label(c, labels::KIND) == Some(labels::KIND_DEPLOY)
                    && docker::name_of(c) != canonical
            })
            .map(docker::name_of)
            .collect();
        let intercepted = containers.iter().any(|c| {
            docker::label(c, labels::SERVICE) == Some(svc.name.as_str())
                && docker::label(c, labels::KIND) == Some(labels::KIND_INTERCEPT)
        });
        let mut r = ServiceReport::new(&svc.name, "no dev container".into());
        r.intercepted = intercepted;
        if let Some(c) = dev {
            r.container = Some(docker::name_of(c));
            r.state = c.status.clone().unwrap_or_default();
            if let Some(version) = docker::label(c, labels::VERSION) {
                r.state = format!("deployed version {version}, {}", r.state);
            }
            r.agent_version = docker::label(c, labels::AGENT_VERSION).map(String::from);
            if docker::is_running(c) {
                let conn = connector(docker, engine, &project.name, &svc.name);
                r.process = match tokio::time::timeout(Duration::from_secs(3), conn.open()).await {
                    Ok(Ok((c, _))) => {
                        c.link.close();
                        Some(describe_process(&c.welcome.process))
                    }
                    Ok(Err(e)) => Some(format!("agent unreachable: {e:#}")),
                    Err(_) => Some("agent did not answer within 3 s".into()),
                };
            }
        }
        sync_state(&project.name, svc, dev.is_some(), &mut r);
        if !leftovers.is_empty() {
            r.errors.push(format!(
                "an interrupted deploy left {} beside it; the next `devloop deploy {}` or `devloop up {}` finishes or removes it",
                leftovers.join(", "),
                svc.name,
                svc.name
            ));
        }
        reports.push(r);
    }
    Ok(reports)
}

/// `doctor` on Docker: each published host port is free, or held by the project's own dev
/// container.
pub async fn doctor(docker: &Docker, engine: &EngineChoice, project: &Project) -> Vec<Check> {
    let mut checks = Vec::new();
    let ours: Vec<u16> =
        docker::list_project_containers(docker, &project.name, Some(labels::KIND_DEV))
            .await
            .unwrap_or_default()
            .iter()
            .filter(|c| docker::is_running(c))
            .flat_map(|c| c.ports.clone().unwrap_or_default())
            .filter_map(|p| p.public_port)
            .collect();
    for svc in &project.services {
        for p in &svc.ports {
            let Some(hp) = p.host_port else { continue };
            let what = format!("{} port {hp}", svc.name);
            if ours.contains(&hp) {
                checks.push(Check::ok(what, "published by its dev container"));
                continue;
            }
            if !engine.is_local() {
                checks.push(Check::note(
                    what,
                    "remote engine: cannot check its host's ports from here",
                ));
                continue;
            }
            let ip = p.host_ip.clone().unwrap_or_else(|| "0.0.0.0".into());
            checks.push(match std::net::TcpListener::bind((ip.as_str(), hp)) {
                Ok(_) => Check::ok(what, "free"),
                Err(e) => Check::fail(
                    what,
                    format!("in use ({e})"),
                    format!("stop what listens on {hp} (`ss -ltnp 'sport = :{hp}'`, `docker ps`), or change `ports` of `{}`", svc.name),
                ),
            });
        }
    }
    checks
}
