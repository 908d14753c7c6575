//! `devloop deploy`, `history` and `rollback`: snapshot each service's tree into an image,
//! roll it out, and keep the last versions to go back to. The flow is [`crate::deploy::run`];
//! the back end's [`Deployer`](crate::deploy::Deployer) rolls out and keeps the versions.

use std::time::Duration;

use super::{load_project, Global};
use crate::ui::Ui;

#[derive(Debug, Clone, Default)]
pub struct DeployOptions {
    pub services: Vec<String>,
    pub health_timeout: Option<Duration>,
}

pub async fn deploy(global: &Global, opts: DeployOptions) -> anyhow::Result<()> {
    let project = load_project(global)?;
    let selected = project.select(&opts.services)?;
    let ui = Ui::new(selected.iter().map(|s| s.name.as_str()));
    let deployer = super::backend(global, Some(&project))
        .deployer(&project, opts.health_timeout, false)
        .await?;
    crate::deploy::run_waves(deployer.as_ref(), &project, &selected, &ui).await
}

pub async fn history_cmd(global: &Global, service: &str) -> anyhow::Result<()> {
    let project = load_project(global)?;
    project.service(service)?;
    let deployer = super::backend(global, Some(&project))
        .deployer(&project, None, false)
        .await?;
    crate::ui::print_to_pipe(&deployer.history(&project, service).await?);
    Ok(())
}

pub async fn rollback(
    global: &Global,
    service_name: &str,
    to_revision: Option<u64>,
    health_timeout: Option<Duration>,
) -> anyhow::Result<()> {
    let project = load_project(global)?;
    let service = project.service(service_name)?;
    let ui = Ui::new([service_name]);
    let deployer = super::backend(global, Some(&project))
        .deployer(&project, health_timeout, false)
        .await?;
    let line = deployer.rollback(&project, service, to_revision).await?;
    ui.info(service_name, line);
    Ok(())
}
