//! `devloop down`: removes exactly what devloop created for the project.

use super::{connect_engine, Global};
use crate::backend::docker;
use crate::state::{remove_sync_status, TokenStore};

pub async fn down(global: &Global, keep_volumes: bool) -> anyhow::Result<()> {
    let project = super::load_project(global)?;
    if let super::TargetChoice::Kubernetes { settings, .. } =
        super::choose_target(global, Some(&project))
    {
        return super::dev_k8s::down(&project, &settings).await;
    }
    let (docker, _) = connect_engine().await?;
    let removed = docker::down(&docker, &project.name, keep_volumes).await?;
    let tokens = TokenStore::new();
    for svc in &project.services {
        tokens.remove(&docker::container_name(&project.name, &svc.name));
        let _ = remove_sync_status(&project.name, &svc.name);
    }
    if removed.containers.is_empty()
        && removed.volumes.is_empty()
        && removed.networks.is_empty()
        && removed.kept_networks.is_empty()
    {
        println!("nothing to remove for project {}", project.name);
    }
    for (what, list) in [
        ("container", &removed.containers),
        ("volume", &removed.volumes),
        ("network", &removed.networks),
    ] {
        for name in list {
            println!("removed {what} {name}");
        }
    }
    for (name, attached) in &removed.kept_networks {
        println!(
            "kept network {name}: {} not made by devloop {} attached (`docker network disconnect {name} NAME`, then `devloop down` again)",
            attached.join(", "),
            if attached.len() == 1 { "is" } else { "are" }
        );
    }
    Ok(())
}
