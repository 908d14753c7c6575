//! `devloop deploy`: snapshot each service's tree into an image and roll it out.

use std::time::{Duration, Instant};

use super::{connect_engine, load_project, read_agent_binary, Global};
use crate::deploy;
use crate::target::docker_deploy::{self, Rollout, RolloutContext};
use crate::ui::{human_ms, Ui};

#[derive(Debug, Clone, Default)]
pub struct DeployOptions {
    pub services: Vec<String>,
    pub health_timeout: Option<Duration>,
}

pub async fn deploy(global: &Global, opts: DeployOptions) -> anyhow::Result<()> {
    let project = load_project(global)?;
    let selected: Vec<&crate::config::Service> = if opts.services.is_empty() {
        project.services.iter().collect()
    } else {
        opts.services.iter().map(|s| project.service(s)).collect::<Result<_, _>>()?
    };
    let ui = Ui::new(selected.iter().map(|s| s.name.as_str()));
    let (docker, engine) = connect_engine().await?;
    let (_, agent) = read_agent_binary()?;
    let tokens = crate::state::TokenStore::new();
    let ctx = RolloutContext {
        docker: &docker,
        engine: &engine,
        agent_binary: &agent,
        tokens: &tokens,
        health_timeout: opts.health_timeout.unwrap_or(Duration::from_secs(30)),
    };
    let mut failures = Vec::new();
    for service in selected {
        if service.sync.is_none() {
            ui.info(&service.name, "no `sync` in devloop.toml: nothing to snapshot, skipped");
            continue;
        }
        let started = Instant::now();
        let result: anyhow::Result<()> = async {
            let base = deploy::ensure_base(&docker, &project, service, &ui).await?;
            let snap = deploy::snapshot(&docker, &project, service, &base).await?;
            let rollout = docker_deploy::roll_out(&ctx, &project, service, &snap).await?;
            let total = human_ms(started.elapsed().as_millis() as u64);
            match rollout {
                Rollout::Unchanged => ui.info(&service.name, format!("unchanged: {} already runs ({total})", snap.image)),
                Rollout::Replaced { healthy_ms, switch_ms, port_gap_ms } => {
                    let snap_what = if snap.reused { "snapshot reused" } else { "snapshot" };
                    let gap = port_gap_ms.map(|g| format!(", host ports handed to the relay in {}", human_ms(g))).unwrap_or_default();
                    ui.info(
                        &service.name,
                        format!(
                            "deployed {} in {total} ({snap_what} {}, {} files; start to healthy {}; switch {}{gap})",
                            snap.image,
                            human_ms(snap.millis),
                            snap.files,
                            human_ms(healthy_ms),
                            human_ms(switch_ms)
                        ),
                    );
                }
            }
            Ok(())
        }
        .await;
        if let Err(e) = result {
            ui.warn(&service.name, format!("deploy failed: {e:#}"));
            failures.push(service.name.clone());
        }
    }
    if failures.is_empty() {
        Ok(())
    } else {
        anyhow::bail!("deploy failed for {}", failures.join(", "))
    }
}
