//! `devloop deploy`, `history` and `rollback`: snapshot each service's tree into an image,
//! roll it out, and keep the last versions to go back to.

use anyhow::Context;
use std::time::{Duration, Instant};

use super::{connect_engine, load_project, read_agent_binary, Global};
use crate::config::{Project, Service};
use crate::deploy::{self, history, Snapshot};
use crate::deploy::{Rollout, RolloutTarget};
use crate::target::docker_deploy::RolloutContext;
use crate::ui::{ago, human_ms, Ui};

#[derive(Debug, Clone, Default)]
pub struct DeployOptions {
    pub services: Vec<String>,
    pub health_timeout: Option<Duration>,
}

pub(crate) struct Env {
    pub(crate) docker: bollard::Docker,
    pub(crate) engine: crate::target::engine::EngineChoice,
    agent: Vec<u8>,
    tokens: crate::state::TokenStore,
    health_timeout: Duration,
}

impl Env {
    pub(crate) async fn new(health_timeout: Option<Duration>) -> anyhow::Result<Env> {
        let (docker, engine) = connect_engine().await?;
        let (_, agent) = read_agent_binary()?;
        Ok(Env {
            docker,
            engine,
            agent,
            tokens: crate::state::TokenStore::new(),
            health_timeout: health_timeout.unwrap_or(Duration::from_secs(30)),
        })
    }
    fn ctx(&self) -> RolloutContext<'_> {
        RolloutContext {
            docker: &self.docker,
            engine: &self.engine,
            agent_binary: &self.agent,
            tokens: &self.tokens,
            health_timeout: self.health_timeout,
        }
    }
}

pub async fn deploy(global: &Global, opts: DeployOptions) -> anyhow::Result<()> {
    let project = load_project(global)?;
    let selected = project.select(&opts.services)?;
    let ui = Ui::new(selected.iter().map(|s| s.name.as_str()));
    let env = Env::new(opts.health_timeout).await?;

    // In waves: a service goes once the services it depends on (among those deployed now)
    // are done; the services of one wave go in parallel.
    let mut pending: Vec<&Service> = selected.clone();
    let mut done: Vec<String> = Vec::new();
    let mut failures = Vec::new();
    while !pending.is_empty() {
        let (wave, rest): (Vec<&Service>, Vec<&Service>) = pending.into_iter().partition(|s| {
            s.depends_on
                .iter()
                .all(|d| done.contains(d) || !selected.iter().any(|x| &x.name == d))
        });
        pending = rest;
        if wave.is_empty() {
            // Only possible when a dependency failed: the rest waits for nothing more.
            for s in pending.drain(..) {
                ui.warn(&s.name, "not deployed: a service it depends on failed");
                failures.push(s.name.clone());
            }
            break;
        }
        let results =
            futures_util::future::join_all(wave.iter().map(|s| deploy_one(&env, &project, s, &ui)))
                .await;
        for (s, r) in wave.iter().zip(results) {
            match r {
                Ok(()) => done.push(s.name.clone()),
                Err(e) => {
                    ui.warn(&s.name, format!("deploy failed: {e:#}"));
                    failures.push(s.name.clone());
                }
            }
        }
        // What depends on a failure waits for nothing more: it is not deployed. Repeated
        // until nothing changes, so dependents of dependents follow.
        loop {
            let (blocked, rest): (Vec<&Service>, Vec<&Service>) = pending
                .into_iter()
                .partition(|s| s.depends_on.iter().any(|d| failures.contains(d)));
            pending = rest;
            if blocked.is_empty() {
                break;
            }
            for s in blocked {
                ui.warn(&s.name, "not deployed: a service it depends on failed");
                failures.push(s.name.clone());
            }
        }
    }
    if failures.is_empty() {
        Ok(())
    } else {
        anyhow::bail!("deploy failed for {}", failures.join(", "))
    }
}

async fn deploy_one(
    env: &Env,
    project: &Project,
    service: &Service,
    ui: &Ui,
) -> anyhow::Result<()> {
    if service.sync.is_none() {
        ui.info(
            &service.name,
            "no `sync` in devloop.toml: nothing to snapshot, skipped",
        );
        return Ok(());
    }
    let line = snapshot_and_roll_out(env, project, service, ui).await?;
    ui.info(&service.name, line);
    Ok(())
}

/// The whole deploy of one service; Ok(the line that reports it).
pub(crate) async fn snapshot_and_roll_out(
    env: &Env,
    project: &Project,
    service: &Service,
    ui: &Ui,
) -> anyhow::Result<String> {
    let started = Instant::now();
    let base = deploy::ensure_base(&env.docker, project, service, ui).await?;
    let snap = deploy::snapshot(&env.docker, project, service, &base).await?;
    let target: &dyn RolloutTarget = &env.ctx();
    let rollout = target.roll_out(project, service, &snap).await?;
    if let Rollout::Replaced { .. } = rollout {
        remember(env, project, service, &snap).await;
    }
    Ok(report(&snap, &rollout, started))
}

fn report(snap: &Snapshot, rollout: &Rollout, started: Instant) -> String {
    let total = human_ms(started.elapsed().as_millis() as u64);
    match rollout {
        Rollout::Unchanged => format!("unchanged: {} already runs ({total})", snap.image),
        Rollout::Replaced {
            healthy_ms,
            switch_ms,
            port_gap_ms,
        } => {
            let snap_what = if snap.reused {
                "snapshot reused"
            } else {
                "snapshot"
            };
            let gap = port_gap_ms
                .map(|g| format!(", host ports handed to the relay in {}", human_ms(g)))
                .unwrap_or_default();
            format!(
                "deployed {} in {total} ({snap_what} {}, {} paths; start to healthy {}; switch {}{gap})",
                snap.image,
                human_ms(snap.millis),
                snap.files,
                human_ms(*healthy_ms),
                human_ms(*switch_ms)
            )
        }
    }
}

/// Records the version and prunes what is beyond `keep` (images no container uses).
async fn remember(env: &Env, project: &Project, service: &Service, snap: &Snapshot) {
    let mut h = history::load(&project.name, &service.name);
    h.record(
        &snap.tag,
        &snap.image,
        snap.digest.clone(),
        crate::state::now_ms(),
    );
    let old = h.beyond(project.keep_versions);
    let mut pruned = Vec::new();
    for v in &old {
        match env
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
    h.forget(&pruned);
    if let Err(e) = history::save(&project.name, &service.name, &h) {
        tracing::warn!(error = %e, "cannot save the deploy history");
    }
}

pub async fn history_cmd(global: &Global, service: &str) -> anyhow::Result<()> {
    let project = load_project(global)?;
    project.service(service)?;
    let (docker, engine) = connect_engine().await?;
    let docker = &docker;
    let tokens = crate::state::TokenStore::new();
    // Reading which version runs needs no agent binary.
    let ctx = RolloutContext {
        docker,
        engine: &engine,
        agent_binary: &[],
        tokens: &tokens,
        health_timeout: Duration::ZERO,
    };
    let target: &dyn RolloutTarget = &ctx;
    let running = target.running_version(&project.name, service).await?;
    let h = history::load(&project.name, service);
    if h.versions.is_empty() {
        println!("no versions of `{service}` deployed from this machine yet (`devloop deploy {service}` makes one)");
        return Ok(());
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
        let present = if docker.inspect_image(&v.image).await.is_ok() {
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
    crate::ui::print_to_pipe(&out);
    Ok(())
}

pub async fn rollback(
    global: &Global,
    service_name: &str,
    health_timeout: Option<Duration>,
) -> anyhow::Result<()> {
    let project = load_project(global)?;
    let service = project.service(service_name)?;
    let ui = Ui::new([service_name]);
    let env = Env::new(health_timeout).await?;
    let target: &dyn RolloutTarget = &env.ctx();
    let current = target
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
    env.docker
        .inspect_image(&prev.image)
        .await
        .with_context(|| {
            format!(
                "the image {} of the previous version is gone from the engine",
                prev.image
            )
        })?;
    let started = Instant::now();
    let digest = h.last_tree.clone();
    let snap = Snapshot {
        image: prev.image.clone(),
        tag: prev.tag.clone(),
        reused: true,
        files: 0,
        millis: 0,
        digest,
    };
    let target: &dyn RolloutTarget = &env.ctx();
    let rollout = target.roll_out(&project, service, &snap).await?;
    ui.info(
        service_name,
        format!(
            "rolled back from {current} to {} ({})",
            prev.tag,
            human_ms(started.elapsed().as_millis() as u64)
        ),
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
    Ok(())
}
