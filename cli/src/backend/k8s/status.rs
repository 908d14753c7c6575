//! `status` on Kubernetes: each service's Deployment (its mode: dev pod, intercepted, a
//! deployed snapshot, or its own image), the agent and process where one runs, and the sync.

use std::time::Duration;

use super::connector::{connector_for, watched_connector};
use super::{devpod, intercept as ki, rollout, Cluster};
use crate::config::Project;
use crate::status::{describe_process, sync_state, ServiceReport};
use crate::ui::ago;

/// On Kubernetes: each service's Deployment (its mode: dev pod, intercepted, a deployed
/// snapshot, or its own image), the dev pod's agent and process, and the sync.
pub async fn status(cluster: &Cluster, project: &Project) -> anyhow::Result<Vec<ServiceReport>> {
    let mut reports = Vec::new();
    for svc in &project.services {
        let mut r = ServiceReport::new(
            &svc.name,
            format!("no Deployment in namespace {}", cluster.namespace),
        );
        let d = rollout::deployment_of(cluster, &svc.name)
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
                Some(rec) => Some(connector_for(cluster, rec).await),
                None if !r.intercepted => watched_connector(cluster, d).await.transpose(),
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
