//! `devloop up` and `devloop sync`: dev environments, then one sync per service until Ctrl-C.

use super::{load_project, Global};
use crate::backend::DevEnv;
use crate::config::file::OnExit;
use crate::config::Project;
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
    let backend = super::backend(global, Some(&project));
    let selected = project.select(&opts.services)?;
    let ui = Ui::new(selected.iter().map(|s| s.name.as_str()));
    let envs = backend.up(&project, &selected, opts.build, &ui).await?;
    if envs.is_empty() {
        return Ok(());
    }
    let started: Vec<String> = envs.iter().map(|e| e.service.clone()).collect();
    let on_exit = opts.on_exit.unwrap_or(project.on_exit);
    let words = backend.words();
    eprintln!(
        "devloop: syncing {} into their {}; Ctrl-C stops syncing and {}",
        started.join(", "),
        &words.envs,
        match on_exit {
            OnExit::Keep => words.on_keep,
            OnExit::Stop => words.on_stop,
        }
    );
    let ended = sync_until_cancelled(&project, envs, !opts.no_logs, &ui).await;
    match on_exit {
        OnExit::Stop => backend.stop(&project, &started).await?,
        OnExit::Keep => eprintln!(
            "devloop: sync stopped; the {} keep running, but their files no longer follow your edits until `devloop up` or `devloop sync` runs again",
            words.envs
        ),
    }
    ended
}

/// `devloop sync SERVICE`: only the sync (and logs) of one running dev environment.
pub async fn sync(global: &Global, service: &str, no_logs: bool) -> anyhow::Result<()> {
    let project = load_project(global)?;
    let svc = project.service(service)?;
    let backend = super::backend(global, Some(&project));
    let env = backend.attach(&project, svc).await?;
    let ui = Ui::new([service]);
    sync_until_cancelled(&project, vec![env], !no_logs, &ui).await?;
    eprintln!("devloop: sync of `{service}` stopped; its files no longer follow your edits");
    Ok(())
}

async fn sync_until_cancelled(
    project: &Project,
    envs: Vec<DevEnv>,
    logs: bool,
    ui: &Ui,
) -> anyhow::Result<()> {
    let mut syncs = Vec::new();
    for env in envs {
        let service = project.service(&env.service)?;
        syncs.push((
            SyncSettings::for_service(&project.name, service, logs, None),
            env.connector,
        ));
    }
    engine::run_all(syncs, ui.clone(), "sync", crate::signals::shutdown()).await
}
