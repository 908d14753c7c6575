//! `devloop watch`: every save syncs, restarts or redeploys, as each service's rules say.
//! Services with nothing running are deployed first.

use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

use super::deploy::{snapshot_and_roll_out, Env};
use super::{connector, load_project, Global};
use crate::sync::engine::{self, Redeploy, SyncSettings};
use crate::target::{docker, labels};
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
    let env = Arc::new(Env::new(global, &project, health_timeout).await?);

    let containers = docker::list_project_containers(&env.docker, &project.name, None).await?;
    for name in &selected {
        let service = project.service(name)?;
        let kind = |c: &&bollard::models::ContainerSummary| {
            docker::label(c, labels::KIND).map(String::from)
        };
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
            continue;
        }
        let running = mine.iter().any(|c| {
            matches!(
                kind(c).as_deref(),
                Some(labels::KIND_DEV) | Some(labels::KIND_DEPLOY)
            ) && docker::is_running(c)
        });
        if !running {
            ui.info(name, "nothing runs yet: deploying first");
            let line = snapshot_and_roll_out(&env, &project, service, &ui).await?;
            ui.info(name, line);
        }
    }

    let shutdown = CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();
    for name in &selected {
        let service = project.service(name)?;
        if service.sync.is_none() {
            ui.info(name, "no `sync` in devloop.toml: nothing to watch");
            continue;
        }
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
        let conn = connector(&env.docker, &env.engine, &project.name, name);
        let (ui, shutdown, name) = (ui.clone(), shutdown.clone(), name.clone());
        tasks.spawn(async move { (name, engine::run(settings, conn, ui, shutdown).await) });
    }
    eprintln!(
        "devloop: watching {}; Ctrl-C stops (a rollout under way finishes first)",
        selected.join(", ")
    );
    let mut failed = None;
    tokio::select! {
        _ = super::up::wait_for_signal() => {}
        Some(res) = tasks.join_next() => {
            if let Ok((name, Err(e))) = res {
                failed = Some(e.context(format!("watch of `{name}` stopped")));
            }
        }
    }
    shutdown.cancel();
    while let Some(res) = tasks.join_next().await {
        if let Ok((name, Err(e))) = res {
            ui.warn(&name, format!("watch ended with an error: {e:#}"));
        }
    }
    eprintln!("devloop: watch stopped; what runs stays as it is");
    match failed {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
