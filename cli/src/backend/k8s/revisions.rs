//! A Deployment's revisions (its ReplicaSets) for `history`, without the ones devloop's own
//! intercepts, dev modes and watched versions made, and `rollback` to one of them.

use anyhow::Context;
use serde_json::Value;
use std::time::Duration;

use super::rollout::*;
use super::Cluster;

/// One revision of a Deployment: a ReplicaSet it owns.
#[derive(Debug, Clone)]
pub struct Revision {
    pub number: u64,
    /// A rollout of this revision did not become ready and devloop undid it.
    pub failed: bool,
    pub images: Vec<String>,
    pub cause: Option<String>,
    pub created: String,
    pub template: Value,
}

/// Whether a pod template is one devloop put in place for a while (an intercept's agent, a
/// dev pod, a watched version) rather than a version of the service: such revisions are
/// not listed by `history` and never chosen by `rollback`.
pub fn is_devloop_own(template: &Value) -> bool {
    let labels = &template["metadata"]["labels"];
    [
        super::intercept::SESSION_LABEL,
        super::devpod::SESSION_LABEL,
        super::devpod::WATCH_LABEL,
    ]
    .iter()
    .any(|l| labels[*l].is_string())
}

/// The Deployment's revisions that are versions of the service (not devloop's own
/// intercepts, dev pods or watched versions), oldest first, and the one it runs now.
pub async fn revisions(
    cluster: &Cluster,
    d: &Value,
) -> anyhow::Result<(Vec<Revision>, Option<u64>)> {
    let uid = d["metadata"]["uid"].as_str().unwrap_or_default();
    let failed = failed_hashes(d);
    let path = selected_by(cluster, d, "apps/v1", "replicasets");
    let list = cluster.get_json(&path).await.map_err(|e| {
        cluster.err(
            e,
            "list",
            "replicasets",
            "listing the deployment's revisions",
        )
    })?;
    let mut out: Vec<Revision> = list["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|rs| {
            rs["metadata"]["ownerReferences"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|o| o["uid"].as_str() == Some(uid))
        })
        .filter(|rs| !is_devloop_own(&rs["spec"]["template"]))
        .filter_map(|rs| {
            let number = rs["metadata"]["annotations"][REVISION]
                .as_str()?
                .parse()
                .ok()?;
            let template = rs["spec"]["template"].clone();
            Some(Revision {
                number,
                failed: rs["metadata"]["labels"][TEMPLATE_HASH]
                    .as_str()
                    .is_some_and(|h| failed.iter().any(|f| f == h)),
                images: template["spec"]["containers"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|c| c["image"].as_str().map(String::from))
                    .collect(),
                cause: rs["metadata"]["annotations"][CHANGE_CAUSE]
                    .as_str()
                    .map(String::from),
                created: rs["metadata"]["creationTimestamp"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                template,
            })
        })
        .collect();
    out.sort_by_key(|r| r.number);
    let current = d["metadata"]["annotations"][REVISION]
        .as_str()
        .and_then(|r| r.parse().ok());
    Ok((out, current))
}

/// Rolls the Deployment back to `revision` (default: the one before the current), as
/// `kubectl rollout undo` does: its ReplicaSet's template becomes the Deployment's again.
pub async fn rollback(
    cluster: &Cluster,
    service: &str,
    revision: Option<u64>,
    timeout: Duration,
) -> anyhow::Result<(u64, u64, RolledOut)> {
    let d = deployment_of(cluster, service).await?.with_context(|| {
        format!(
            "no Deployment or Service named `{service}` in namespace `{}`",
            cluster.namespace
        )
    })?;
    refuse_intercepted(&d)?;
    let (revs, current) = revisions(cluster, &d).await?;
    let current = current.context("the Deployment has no revision yet")?;
    let target = match revision {
        Some(n) => revs.iter().find(|r| r.number == n).with_context(|| {
            format!(
                "deployment/{} has no revision {n} (it keeps {}; `devloop history {service}` lists them)",
                name_of(&d),
                revs.iter().map(|r| r.number.to_string()).collect::<Vec<_>>().join(", ")
            )
        })?,
        // The newest earlier revision that ran: not one whose rollout failed, nor one with the
        // images that run now (a failed deploy that was undone leaves both behind).
        None => {
            let running = revs.iter().find(|r| r.number == current).map(|r| r.images.clone());
            revs.iter()
                .rev()
                .find(|r| r.number < current && !r.failed && Some(&r.images) != running.as_ref())
                .with_context(|| format!("deployment/{} has no earlier revision that ran to go back to (`devloop history {service}`)", name_of(&d)))?
        }
    };
    if target.number == current {
        anyhow::bail!("deployment/{} already runs revision {current}", name_of(&d));
    }
    let mut template = target.template.clone();
    if let Some(labels) = template["metadata"]["labels"].as_object_mut() {
        labels.remove(TEMPLATE_HASH);
    }
    let cause = target
        .cause
        .clone()
        .unwrap_or_else(|| format!("rollback to revision {}", target.number));
    let done = switch_template(cluster, &d, template, &cause, timeout).await?;
    Ok((current, target.number, done))
}
