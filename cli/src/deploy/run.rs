//! One deploy of one service, and a deploy of several in waves: the same on every back end,
//! which only rolls out and keeps versions ([`Deployer`]).

use std::time::Instant;

use super::{Deployer, Rollout, Snapshot};
use crate::config::{Project, Service};
use crate::ui::{human_ms, Ui};

/// Deploys `selected` in waves: a service goes once the services it depends on (among those
/// deployed now) are done; the services of one wave go in parallel. What depends on a
/// failure is not deployed.
pub async fn run_waves(
    deployer: &dyn Deployer,
    project: &Project,
    selected: &[&Service],
    ui: &Ui,
) -> anyhow::Result<()> {
    let mut pending: Vec<&Service> = selected.to_vec();
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
        let results = futures_util::future::join_all(
            wave.iter().map(|s| deploy_one(deployer, project, s, ui)),
        )
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
    deployer: &dyn Deployer,
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
    let line = run(deployer, project, service, ui).await?;
    ui.info(&service.name, line);
    Ok(())
}

/// The whole deploy of one service: base, snapshot, delivery, rollout, history; Ok(the line
/// that reports it).
pub async fn run(
    deployer: &dyn Deployer,
    project: &Project,
    service: &Service,
    ui: &Ui,
) -> anyhow::Result<String> {
    let started = Instant::now();
    let engine = deployer.engine()?;
    let destination = deployer.destination()?;
    let base = super::ensure_base(engine, project, service, ui).await?;
    let snap = super::snapshot(engine, project, service, &base, &destination).await?;
    deployer.deliver(&snap).await?;
    let rollout = deployer.roll_out(project, service, &snap).await?;
    if !matches!(rollout, Rollout::Unchanged) {
        deployer.remember(project, service, &snap).await;
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
        Rollout::Ready {
            ready_ms,
            revision,
            created,
        } => {
            let all = started.elapsed().as_millis() as u64;
            let share = (*ready_ms as f64 * 100.0 / all.max(1) as f64).round();
            let image_part = match (&snap.pushed, snap.reused) {
                (_, true) => format!(
                    "snapshot in the registry already ({})",
                    human_ms(snap.millis)
                ),
                (Some(p), false) => format!(
                    "snapshot pushed in {}: {} blobs, {}, {} already there",
                    human_ms(snap.millis),
                    p.blobs_sent,
                    human_bytes(p.bytes_sent),
                    p.blobs_present
                ),
                (None, false) => format!("snapshot {}", human_ms(snap.millis)),
            };
            let created = if created.is_empty() {
                String::new()
            } else {
                format!("; created {}", created.join(", "))
            };
            let revision = revision
                .map(|r| format!(", revision {r}"))
                .unwrap_or_default();
            format!(
                "deployed {} in {total} ({image_part}, {} paths; rollout to ready {} = {share:.0}% of it{revision}{created})",
                snap.image,
                snap.files,
                human_ms(*ready_ms),
            )
        }
    }
}

fn human_bytes(n: u64) -> String {
    if n >= 1 << 20 {
        format!("{:.1} MiB", n as f64 / (1 << 20) as f64)
    } else if n >= 1 << 10 {
        format!("{:.1} KiB", n as f64 / 1024.0)
    } else {
        format!("{n} B")
    }
}
