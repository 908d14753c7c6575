//! `devloop status`: each service's container, agent, process and sync, told honestly: a
//! service nobody syncs says since when its files may be stale.

use serde::Serialize;
use std::time::Duration;

use super::{connect_engine, connector, load_project, Global};
use crate::backend::docker;
use crate::backend::labels;
use crate::state::{read_sync_status, SyncLock};
use crate::ui::{ago, human_bytes};
use devloop_proxy::msg::{ProcessState, ProcessStatus};

#[derive(Debug, Serialize)]
pub struct ServiceReport {
    pub service: String,
    pub container: Option<String>,
    pub state: String,
    pub intercepted: bool,
    pub agent_version: Option<String>,
    pub process: Option<String>,
    pub sync: String,
    pub stale: bool,
    pub files: Option<u64>,
    pub bytes: Option<u64>,
    pub last_sync_ms: Option<u64>,
    pub pending: Option<u64>,
    pub errors: Vec<String>,
}

impl ServiceReport {
    fn new(service: &str, state: String) -> ServiceReport {
        ServiceReport {
            service: service.to_string(),
            container: None,
            state,
            intercepted: false,
            agent_version: None,
            process: None,
            sync: String::new(),
            stale: false,
            files: None,
            bytes: None,
            last_sync_ms: None,
            pending: None,
            errors: Vec::new(),
        }
    }
}

pub async fn status(global: &Global, json: bool) -> anyhow::Result<()> {
    let project = load_project(global)?;
    if let super::TargetChoice::Kubernetes { settings, .. } =
        super::choose_target(global, Some(&project))
    {
        let reports = kube_reports(&project, &settings).await?;
        return print(&project, &reports, json);
    }
    let (docker, engine_choice) = connect_engine().await?;
    let containers = docker::list_project_containers(&docker, &project.name, None).await?;
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
                let conn = connector(&docker, &engine_choice, &project.name, &svc.name);
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
    print(&project, &reports, json)
}

/// On Kubernetes: each service's Deployment (its mode: dev pod, intercepted, a deployed
/// snapshot, or its own image), the dev pod's agent and process, and the sync.
async fn kube_reports(
    project: &crate::config::Project,
    settings: &crate::backend::k8s::KubeSettings,
) -> anyhow::Result<Vec<ServiceReport>> {
    use crate::backend::k8s::{devpod, intercept as ki, rollout, Cluster};
    let cluster = Cluster::connect(settings).await?;
    let mut reports = Vec::new();
    for svc in &project.services {
        let mut r = ServiceReport::new(
            &svc.name,
            format!("no Deployment in namespace {}", cluster.namespace),
        );
        let d = rollout::deployment_of(&cluster, &svc.name)
            .await
            .ok()
            .flatten();
        let dev = d.as_ref().and_then(devpod::record_of);
        let mut has_agent = dev.is_some();
        if let Some(d) = &d {
            let name = d["metadata"]["name"].as_str().unwrap_or_default();
            r.container = Some(format!("deployment/{name}"));
            let ready = format!(
                "{}/{} ready",
                d["status"]["readyReplicas"].as_u64().unwrap_or(0),
                d["spec"]["replicas"].as_u64().unwrap_or(1)
            );
            r.intercepted = ki::record_of(d).is_some();
            r.state = if let Some(rec) = &dev {
                format!("dev pod since {}, {ready}", ago(rec.started_ms))
            } else if r.intercepted {
                format!("agent in place of the service, {ready}")
            } else {
                let repo = crate::deploy::snapshot_repo(&project.name, &svc.name);
                let template = &d["spec"]["template"];
                let image = rollout::service_container(template, &svc.name)
                    .ok()
                    .and_then(|i| {
                        template["spec"]["containers"][i]["image"]
                            .as_str()
                            .map(String::from)
                    })
                    .unwrap_or_default();
                let watched = if devpod::is_watched(template) {
                    " under the agent (devloop watch)"
                } else {
                    ""
                };
                match rollout::snapshot_tag(&image, &repo) {
                    Some(tag) => format!("deployed version {tag}{watched}, {ready}"),
                    None => format!("image {image}{watched}, {ready}"),
                }
            };
            let conn = match &dev {
                Some(rec) => {
                    Some(crate::backend::k8s::connector::connector_for(&cluster, rec).await)
                }
                None if !r.intercepted => {
                    crate::backend::k8s::connector::watched_connector(&cluster, d)
                        .await
                        .transpose()
                }
                None => None,
            };
            if let Some(conn) = conn {
                has_agent = true;
                r.process = Some(match conn {
                    Ok(conn) => match tokio::time::timeout(
                        Duration::from_secs(5),
                        crate::sync::engine::Connector::connect(&conn),
                    )
                    .await
                    {
                        Ok(Ok((c, _))) => {
                            c.link.close();
                            r.agent_version = Some(c.welcome.agent_version.clone());
                            describe_process(&c.welcome.process)
                        }
                        Ok(Err(e)) => format!("agent unreachable: {e:#}"),
                        Err(_) => "agent did not answer within 5 s".into(),
                    },
                    Err(e) => format!("agent unreachable: {e:#}"),
                });
            }
        }
        sync_state(&project.name, svc, has_agent, &mut r);
        reports.push(r);
    }
    Ok(reports)
}

fn print(
    project: &crate::config::Project,
    reports: &[ServiceReport],
    json: bool,
) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(reports)?);
        return Ok(());
    }
    println!("project {} ({})", project.name, project.dir.display());
    for r in reports {
        println!("{}", r.service);
        if r.intercepted {
            println!(
                "  INTERCEPTED: traffic goes to a laptop process; `devloop leave {}` restores it",
                r.service
            );
        }
        match &r.container {
            Some(c) => println!(
                "  container  {c} ({}), agent {}",
                r.state,
                r.agent_version.as_deref().unwrap_or("?")
            ),
            None => println!("  container  none (start it with `devloop up`)"),
        }
        if let Some(p) = &r.process {
            println!("  process    {p}");
        }
        println!("  sync       {}", r.sync);
        for e in r.errors.iter().take(3) {
            println!("  error      {e}");
        }
    }
    Ok(())
}

/// The sync part of a report, from the state folder: who syncs, or since when the files
/// may be stale. `has_target`: the service has a dev container or dev pod to sync into.
fn sync_state(
    project: &str,
    svc: &crate::config::Service,
    has_target: bool,
    r: &mut ServiceReport,
) {
    let syncing = SyncLock::is_held(project, &svc.name);
    let saved = read_sync_status(project, &svc.name);
    if let Some(s) = &saved {
        r.files = Some(s.files);
        r.bytes = Some(s.bytes);
        r.last_sync_ms = s.last_sync_ms;
        r.pending = Some(s.pending);
        r.errors = s.errors.clone();
    }
    r.sync = if svc.sync.is_none() {
        "no sync configured".into()
    } else if !has_target {
        "-".into()
    } else if syncing {
        let s = saved.unwrap_or_default();
        let link = if s.connected {
            format!("connected ({})", s.route)
        } else {
            "reconnecting".into()
        };
        format!(
            "syncing (pid {}, {link}): {} files, {}, last sync {}, {} pending",
            s.pid,
            s.files,
            human_bytes(s.bytes),
            s.last_sync_ms.map(ago).unwrap_or_else(|| "never".into()),
            s.pending
        )
    } else {
        r.stale = true;
        let since = saved
            .as_ref()
            .and_then(|s| s.stopped_at_ms.or(s.last_sync_ms));
        match since {
            Some(t) => format!(
                "NOT SYNCING: the container's files may be stale since {} (run `devloop sync {}`)",
                ago(t),
                svc.name
            ),
            None => format!(
                "NOT SYNCING: never synced; files are the image's (run `devloop sync {}`)",
                svc.name
            ),
        }
    };
}

pub fn describe_process(p: &ProcessStatus) -> String {
    let exit = p
        .last_exit
        .as_ref()
        .map(|e| match (e.code, e.signal) {
            (Some(c), _) => format!(", last exit code {c}"),
            (None, Some(s)) => format!(", last killed by signal {s}"),
            _ => String::new(),
        })
        .unwrap_or_default();
    match &p.state {
        ProcessState::NoCommand => "no command (sync only)".into(),
        ProcessState::Running { pid } if p.quick_exits > 0 => {
            format!(
                "running (pid {pid}) after {} quick exits in a row{exit}; {} starts",
                p.quick_exits, p.starts
            )
        }
        ProcessState::Running { pid } => format!("running (pid {pid}), {} starts{exit}", p.starts),
        ProcessState::BackingOff { retry_in_ms } => {
            format!(
                "CRASH LOOP: {} quick exits in a row{exit}; next start in {} ms",
                p.quick_exits, retry_in_ms
            )
        }
        ProcessState::Stopped => format!("stopped{exit}"),
    }
}
