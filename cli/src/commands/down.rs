//! `devloop down`: removes exactly what devloop created for the project (Docker: containers,
//! volumes, networks; Kubernetes: Deployments back from dev mode), and its sync status.

use super::Global;

pub async fn down(global: &Global, keep_volumes: bool) -> anyhow::Result<()> {
    let project = super::load_project(global)?;
    super::backend(global, Some(&project))
        .down(&project, keep_volumes)
        .await
}
