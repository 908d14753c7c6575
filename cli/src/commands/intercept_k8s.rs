//! `intercept`, `intercept list` and `leave` on Kubernetes: the [`Swap`] of a Deployment's
//! pod template (see `backend::k8s::intercept`), with the agent image pushed to the
//! cluster's registry and the tunnel carried over a port-forward.

use std::time::Instant;

use crate::backend::k8s::intercept::{self as ki, Record};
use crate::backend::k8s::swap::sweep;
use crate::backend::k8s::{Cluster, KubeSettings};
use crate::ui::{ago, human_ms};

pub async fn list(settings: &KubeSettings) -> anyhow::Result<()> {
    let cluster = Cluster::connect(settings).await?;
    sweep(&cluster).await;
    let records = ki::intercepted(&cluster).await?;
    if records.is_empty() {
        println!(
            "no active intercepts in namespace {} (context {})",
            cluster.namespace, cluster.context
        );
        return Ok(());
    }
    for r in records {
        let ports: Vec<String> = r.ports.iter().map(|(a, b)| format!("{a}->{b}")).collect();
        println!(
            "{}  (deployment/{}, namespace {})  ports {}  since {}  held by {}",
            r.service,
            r.deployment,
            cluster.namespace,
            ports.join(","),
            ago(r.started_ms),
            r.holder
        );
    }
    Ok(())
}

pub async fn leave(
    settings: &KubeSettings,
    target: Option<String>,
    all: bool,
) -> anyhow::Result<()> {
    let cluster = Cluster::connect(settings).await?;
    sweep(&cluster).await;
    let records = ki::intercepted(&cluster).await?;
    let chosen: Vec<Record> = match (&target, all) {
        (_, true) => records,
        (Some(t), false) => {
            let named: Vec<Record> = records
                .into_iter()
                .filter(|r| &r.service == t || &r.deployment == t)
                .collect();
            if named.is_empty() {
                anyhow::bail!("`{t}` is not intercepted in namespace {} (`devloop intercept list` shows what is)", cluster.namespace);
            }
            named
        }
        (None, false) => {
            anyhow::bail!("say which intercept to end (`devloop leave SERVICE`), or --all")
        }
    };
    if chosen.is_empty() {
        println!("no active intercepts in namespace {}", cluster.namespace);
        return Ok(());
    }
    for r in chosen {
        let t = Instant::now();
        ki::restore(&cluster, &r).await?;
        println!(
            "{} restored (deployment/{}) in {}",
            r.service,
            r.deployment,
            human_ms(t.elapsed().as_millis() as u64)
        );
    }
    Ok(())
}
