//! `devloop watch`: every save syncs, restarts or redeploys, as each service's rules say.
//! The back end's [`Deployer`](crate::deploy::Deployer) gives the running version to sync
//! into (deploying it first where needed; on Kubernetes watched versions run under the
//! agent), and a redeploy rolls out the next version.

use futures_util::future::BoxFuture;
use std::sync::Arc;
use std::time::Duration;

use super::{load_project, Global};
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
    let deployer = super::backend(global, Some(&project))
        .deployer(&project, health_timeout, true)
        .await?;

    // Each service to watch, with the way to reach the agent of the version that runs it.
    let mut watched: Vec<(String, Arc<dyn Connector>)> = Vec::new();
    for name in &selected {
        let service = project.service(name)?;
        if service.sync.is_none() {
            ui.info(name, "no `sync` in devloop.toml: nothing to watch");
            continue;
        }
        let deploy = || -> BoxFuture<'_, anyhow::Result<String>> {
            Box::pin(crate::deploy::run(
                deployer.as_ref(),
                &project,
                service,
                &ui,
            ))
        };
        if let Some(conn) = deployer.watched(&project, service, &ui, &deploy).await? {
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
            let (deployer, project, ui, name) =
                (deployer.clone(), project.clone(), ui.clone(), name.clone());
            Arc::new(move || {
                let (deployer, project, ui, name) =
                    (deployer.clone(), project.clone(), ui.clone(), name.clone());
                Box::pin(async move {
                    let service = project.service(&name)?;
                    crate::deploy::run(deployer.as_ref(), &project, service, &ui).await
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
