//! `devloop deploy`, `history` and `rollback`: snapshot each service's tree into an image,
//! roll it out, and keep the last versions to go back to.

use anyhow::Context;
use std::time::{Duration, Instant};

use super::{choose_target, connect_engine, load_project, read_agent_binary, Global, TargetChoice};
use crate::backend::docker_deploy::RolloutContext;
use crate::backend::k8s::registry::{self, Pusher};
use crate::backend::k8s::rollout::{self as kube_rollout, KubeRollout};
use crate::backend::k8s::Cluster;
use crate::config::{Project, Service};
use crate::deploy::{self, history, Destination, Snapshot};
use crate::deploy::{Rollout, RolloutTarget};
use crate::ui::{ago, human_ms, Ui};

#[derive(Debug, Clone, Default)]
pub struct DeployOptions {
    pub services: Vec<String>,
    pub health_timeout: Option<Duration>,
}

pub(crate) struct Env {
    pub(crate) docker: bollard::Docker,
    pub(crate) engine: crate::backend::engine::EngineChoice,
    agent: Vec<u8>,
    tokens: crate::state::TokenStore,
    health_timeout: Duration,
    /// Set when the target is Kubernetes: snapshots go to its registry, rollouts to its
    /// Deployments.
    kube: Option<KubeEnv>,
}

struct KubeEnv {
    rollout: KubeRollout,
    /// The registry's client and its name for the nodes; None: images are loaded with the
    /// local cluster's tool (kind, k3d, minikube) from the engine.
    registry: Option<(Pusher, String)>,
}

impl Env {
    /// The engine (which builds bases and, on Docker, runs the services) and the target
    /// that devloop.toml, `--context` and `-n` choose. `watch`: versions on Kubernetes run
    /// under the agent, so that `devloop watch` can sync into them.
    pub(crate) async fn new(
        global: &Global,
        project: &Project,
        health_timeout: Option<Duration>,
        watch: bool,
    ) -> anyhow::Result<Env> {
        let (docker, engine) = connect_engine().await?;
        let kube = match choose_target(global, Some(project)) {
            TargetChoice::Docker => None,
            TargetChoice::Kubernetes { settings, registry } => {
                let cluster = Cluster::connect(&settings).await?;
                let route = registry::route(&cluster, registry.as_deref()).await?;
                let watch_agent = if watch {
                    Some(
                        crate::backend::k8s::swap::agent_image(
                            &route,
                            &super::read_agent_binary()?.1,
                        )
                        .await?,
                    )
                } else {
                    None
                };
                let registry = match route {
                    registry::ImageRoute::Registry(reg) => {
                        Some((Pusher::new(&reg.push)?, reg.pull))
                    }
                    registry::ImageRoute::Load { .. } => None,
                };
                Some(KubeEnv {
                    registry,
                    rollout: KubeRollout {
                        cluster,
                        manifests: project
                            .target
                            .manifests
                            .as_ref()
                            .map(|m| project.dir.join(m)),
                        // A rollout also pulls the image and starts pods one after another.
                        timeout: health_timeout.unwrap_or(Duration::from_secs(60)),
                        watch_agent,
                    },
                })
            }
        };
        // Only Docker's rollout starts the agent (the relay of published ports).
        let agent = if kube.is_none() {
            read_agent_binary()?.1
        } else {
            Vec::new()
        };
        Ok(Env {
            docker,
            engine,
            agent,
            tokens: crate::state::TokenStore::new(),
            health_timeout: health_timeout.unwrap_or(Duration::from_secs(30)),
            kube,
        })
    }

    /// The cluster, when the target is Kubernetes.
    pub(crate) fn cluster(&self) -> Option<&Cluster> {
        self.kube.as_ref().map(|k| &k.rollout.cluster)
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

    fn destination(&self) -> Destination<'_> {
        match &self.kube {
            Some(KubeEnv {
                registry: Some((pusher, pull)),
                ..
            }) => Destination::Registry { pusher, pull },
            _ => Destination::Engine,
        }
    }
}

pub async fn deploy(global: &Global, opts: DeployOptions) -> anyhow::Result<()> {
    let project = load_project(global)?;
    let selected = project.select(&opts.services)?;
    let ui = Ui::new(selected.iter().map(|s| s.name.as_str()));
    let env = Env::new(global, &project, opts.health_timeout, false).await?;

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
    let snap = deploy::snapshot(&env.docker, project, service, &base, &env.destination()).await?;
    if let Some(KubeEnv {
        registry: None,
        rollout,
    }) = &env.kube
    {
        // No registry: the snapshot made in the engine goes to the cluster with its tool.
        registry::load_into_cluster(&rollout.cluster.context, &snap.image).await?;
    }
    let docker_target = env.ctx();
    let target: &dyn RolloutTarget = match &env.kube {
        Some(k) => &k.rollout,
        None => &docker_target,
    };
    let rollout = target.roll_out(project, service, &snap).await?;
    match rollout {
        Rollout::Replaced { .. } => remember(env, project, service, &snap).await,
        // The cluster keeps the revisions; the local history only describes them.
        Rollout::Ready { .. } => describe(project, service, &snap),
        Rollout::Unchanged => {}
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

/// Records what changed in the version just rolled out to a cluster (for `history`), with
/// no image pruning: the cluster keeps its revisions.
fn describe(project: &Project, service: &Service, snap: &Snapshot) {
    let mut h = history::load(&project.name, &service.name);
    h.record(
        &snap.tag,
        &snap.image,
        snap.digest.clone(),
        crate::state::now_ms(),
    );
    let old = h.beyond(project.keep_versions.max(10));
    h.forget(&old.iter().map(|v| v.tag.clone()).collect::<Vec<_>>());
    if let Err(e) = history::save(&project.name, &service.name, &h) {
        tracing::warn!(error = %e, "cannot save the deploy history");
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
    if let TargetChoice::Kubernetes { settings, .. } = choose_target(global, Some(&project)) {
        let cluster = Cluster::connect(&settings).await?;
        return kube_history(&cluster, &project, service).await;
    }
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
    to_revision: Option<u64>,
    health_timeout: Option<Duration>,
) -> anyhow::Result<()> {
    let project = load_project(global)?;
    let service = project.service(service_name)?;
    let ui = Ui::new([service_name]);
    if let TargetChoice::Kubernetes { settings, .. } = choose_target(global, Some(&project)) {
        let cluster = Cluster::connect(&settings).await?;
        let started = Instant::now();
        let (from, to, done) = kube_rollout::rollback(
            &cluster,
            service_name,
            to_revision,
            health_timeout.unwrap_or(Duration::from_secs(60)),
        )
        .await?;
        ui.info(
            service_name,
            format!(
                "rolled back from revision {from} to {to} (now revision {}) in {}; rollout to ready {}",
                done.revision.map(|r| r.to_string()).unwrap_or_else(|| "?".into()),
                human_ms(started.elapsed().as_millis() as u64),
                human_ms(done.ready_ms)
            ),
        );
        return Ok(());
    }
    if to_revision.is_some() {
        anyhow::bail!("--to-revision is for the Kubernetes target (a Deployment's revisions); on Docker, rollback goes to the version before the running one");
    }
    let env = Env::new(global, &project, health_timeout, false).await?;
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
        pushed: None,
        command: None,
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

/// `history` on Kubernetes: the Deployment's revisions (its ReplicaSets), newest first,
/// with what changed when the version was deployed from this machine.
async fn kube_history(cluster: &Cluster, project: &Project, service: &str) -> anyhow::Result<()> {
    let d = kube_rollout::deployment_of(cluster, service).await?.with_context(|| {
        format!(
            "no Deployment or Service named `{service}` in namespace `{}` (`devloop deploy {service}` creates it when [target] names the manifests)",
            cluster.namespace
        )
    })?;
    let (revs, current) = kube_rollout::revisions(cluster, &d).await?;
    let repo = deploy::snapshot_repo(&project.name, service);
    let local = history::load(&project.name, service);
    let mut out = format!(
        "revisions of deployment/{} in {}, newest first (* runs now; the Deployment keeps {}):\n",
        d["metadata"]["name"].as_str().unwrap_or(service),
        cluster.namespace,
        d["spec"]["revisionHistoryLimit"].as_u64().unwrap_or(10) + 1
    );
    for r in revs.iter().rev() {
        let mark = if Some(r.number) == current { "*" } else { " " };
        let tag = r
            .images
            .iter()
            .find_map(|i| kube_rollout::snapshot_tag(i, &repo));
        let what = match &tag {
            Some(t) => local
                .versions
                .iter()
                .find(|v| &v.tag == t)
                .map(|v| format!("{t}  {}", v.changes))
                .unwrap_or_else(|| t.clone()),
            None => r.images.join(", "),
        };
        let cause = r
            .cause
            .as_deref()
            .filter(|c| !c.starts_with("devloop deploy"))
            .map(|c| format!("  ({c})"))
            .unwrap_or_default();
        let failed = if r.failed {
            "  [rollout failed, undone]"
        } else {
            ""
        };
        let when = humantime::parse_rfc3339(&r.created)
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| ago(d.as_millis() as u64))
            .unwrap_or_default();
        out.push_str(&format!(
            "{mark} {:>3}  {:<12}  {what}{cause}{failed}\n",
            r.number, when
        ));
    }
    crate::ui::print_to_pipe(&out);
    Ok(())
}
