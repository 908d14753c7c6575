//! `intercept list` and `leave` on Kubernetes: the intercepts the namespace's Deployments
//! record (see [`super::intercept`]), after sweeping what expired leases left.

use std::time::Instant;

use super::intercept::{self as ki, Record};
use super::swap::sweep;
use super::Cluster;
use crate::ui::{ago, human_ms};

/// One line per intercept in the namespace.
pub async fn list(cluster: &Cluster) -> anyhow::Result<Vec<String>> {
    sweep(cluster).await;
    let records = ki::intercepted(cluster).await?;
    let mut lines = Vec::new();
    for r in records {
        let ports: Vec<String> = r.ports.iter().map(|(a, b)| format!("{a}->{b}")).collect();
        lines.push(format!(
            "{}  (deployment/{}, namespace {})  ports {}  since {}  held by {}",
            r.service,
            r.deployment,
            cluster.namespace,
            ports.join(","),
            ago(r.started_ms),
            r.holder
        ));
    }
    Ok(lines)
}

/// Ends `target`'s intercept (or all of them in the namespace).
pub async fn leave(cluster: &Cluster, target: Option<&str>, all: bool) -> anyhow::Result<()> {
    sweep(cluster).await;
    let records = ki::intercepted(cluster).await?;
    let chosen: Vec<Record> = match (target, all) {
        (_, true) => records,
        (Some(t), false) => {
            let named: Vec<Record> = records
                .into_iter()
                .filter(|r| r.service == t || r.deployment == t)
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
        ki::restore(cluster, &r).await?;
        println!(
            "{} restored (deployment/{}) in {}",
            r.service,
            r.deployment,
            human_ms(t.elapsed().as_millis() as u64)
        );
    }
    Ok(())
}
