//! The Docker back end ([`DockerBackend`]): dev containers that run the service under the agent, with the synced
//! tree in a volume, on a project network where each container answers to its service name.

use bollard::models::ContainerSummary;
use bollard::query_parameters::{
    ListContainersOptionsBuilder, ListVolumesOptionsBuilder, RemoveContainerOptionsBuilder,
    StopContainerOptionsBuilder,
};
use bollard::Docker;
use futures_util::StreamExt;

pub use crate::engine::{api, one_file_tar, DockerError, EngineChoice};

mod backend;
pub mod connector;
mod containers;
pub mod deploy;
mod env;
mod files;
pub mod intercept;
mod intercepts;
mod route;
pub mod routing;
pub mod swap;
mod versions;

use crate::labels;
pub use backend::DockerBackend;
pub use containers::*;
pub use files::*;
pub use route::*;

/// Where the agent binary and the session token go in every container.
pub const AGENT_DIR: &str = "/.devloop";
/// The agent binary comes from a shared read-only volume mounted here (one per agent
/// build), so starting a container copies only the token into it.
pub const AGENT_BIN_DIR: &str = "/.devloop/bin";
pub const AGENT_PATH: &str = "/.devloop/bin/devloop-agent";
pub const TOKEN_PATH: &str = "/.devloop/token";

pub fn network_name(project: &str) -> String {
    format!("devloop-{project}")
}
pub fn container_name(project: &str, service: &str) -> String {
    format!("devloop-{project}-{service}")
}
pub fn volume_name(project: &str, service: &str) -> String {
    format!("devloop-{project}-{service}-tree")
}

/// Containers of the project (all states), optionally of one kind.
pub async fn list_project_containers(
    docker: &Docker,
    project: &str,
    kind: Option<&str>,
) -> Result<Vec<ContainerSummary>, DockerError> {
    let mut pairs = vec![(labels::PROJECT, project)];
    if let Some(k) = kind {
        pairs.push((labels::KIND, k));
    }
    docker
        .list_containers(Some(
            ListContainersOptionsBuilder::new()
                .all(true)
                .filters(&labels::filter(&pairs))
                .build(),
        ))
        .await
        .map_err(api("listing containers"))
}

pub fn label<'a>(c: &'a ContainerSummary, key: &str) -> Option<&'a str> {
    c.labels
        .as_ref()
        .and_then(|l| l.get(key))
        .map(|s| s.as_str())
}

/// A listed container's name, without the leading `/`.
pub fn name_of(c: &ContainerSummary) -> String {
    c.names
        .as_ref()
        .and_then(|n| n.first())
        .map(|n| n.trim_start_matches('/').to_string())
        .unwrap_or_default()
}

pub fn is_running(c: &ContainerSummary) -> bool {
    c.state
        .as_ref()
        .map(|s| s.to_string() == "running")
        .unwrap_or(false)
}

/// The last `lines` lines a container printed (stdout and stderr).
pub async fn last_logs(docker: &Docker, id: &str, lines: usize) -> String {
    let mut stream = docker.logs(
        id,
        Some(
            bollard::query_parameters::LogsOptionsBuilder::new()
                .stdout(true)
                .stderr(true)
                .tail(&lines.to_string())
                .build(),
        ),
    );
    let mut out = String::new();
    while let Some(Ok(chunk)) = stream.next().await {
        out.push_str(&String::from_utf8_lossy(&chunk.into_bytes()));
    }
    out
}

/// Why a container's agent cannot be reached, when the container is not running: its exit
/// code and what it printed last. None while it runs (or cannot be inspected).
pub async fn not_running_reason(docker: &Docker, container: &str) -> Option<String> {
    let info = docker.inspect_container(container, None).await.ok()?;
    let state = info.state?;
    if state.running == Some(true) {
        return None;
    }
    let logs = last_logs(docker, container, 5).await;
    let logs = logs.trim();
    Some(format!(
        "{container} is not running (exit code {}){}",
        state.exit_code.unwrap_or_default(),
        if logs.is_empty() {
            String::new()
        } else {
            format!("; its last output:\n{logs}")
        }
    ))
}

/// One file of a (created or running) container, read through the engine.
async fn read_container_file(
    docker: &Docker,
    container: &str,
    path: &str,
) -> Result<String, DockerError> {
    let mut stream = docker.download_from_container(
        container,
        Some(
            bollard::query_parameters::DownloadFromContainerOptionsBuilder::new()
                .path(path)
                .build(),
        ),
    );
    let mut bytes = Vec::new();
    while let Some(chunk) = stream.next().await {
        bytes.extend_from_slice(&chunk.map_err(api(format!("reading {path} of {container}")))?);
    }
    let mut archive = tar::Archive::new(&bytes[..]);
    let mut entries = archive
        .entries()
        .map_err(|e| DockerError::Other(e.to_string()))?;
    let Some(entry) = entries.next() else {
        return Err(DockerError::Other(format!("{container} holds no {path}")));
    };
    let mut entry = entry.map_err(|e| DockerError::Other(e.to_string()))?;
    let mut s = String::new();
    std::io::Read::read_to_string(&mut entry, &mut s)
        .map_err(|e| DockerError::Other(e.to_string()))?;
    Ok(s)
}

pub async fn remove_container(docker: &Docker, id: &str) -> Result<(), DockerError> {
    match docker
        .remove_container(
            id,
            Some(
                RemoveContainerOptionsBuilder::new()
                    .force(true)
                    .v(false)
                    .build(),
            ),
        )
        .await
    {
        Ok(()) => Ok(()),
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => Ok(()),
        Err(e) => Err(api(format!("removing container {id}"))(e)),
    }
}

pub async fn stop_container(docker: &Docker, id: &str) -> Result<(), DockerError> {
    docker
        .stop_container(id, Some(StopContainerOptionsBuilder::new().t(5).build()))
        .await
        .map_err(api(format!("stopping container {id}")))
}

/// What `down` removed.
#[derive(Debug, Default)]
pub struct Removed {
    pub containers: Vec<String>,
    pub volumes: Vec<String>,
    pub networks: Vec<String>,
    /// Networks left in place because containers devloop did not make are attached: each
    /// with their names.
    pub kept_networks: Vec<(String, Vec<String>)>,
}

/// Removes every container, volume and network labelled with the project (all but
/// intercepts, which `leave` ends).
pub async fn down(
    docker: &Docker,
    project: &str,
    keep_volumes: bool,
) -> Result<Removed, DockerError> {
    let mut removed = Removed::default();
    for c in list_project_containers(docker, project, None).await? {
        // Intercepts are ended with `leave`, which restores what they replaced.
        if label(&c, labels::KIND) == Some(labels::KIND_INTERCEPT) {
            continue;
        }
        let id = c.id.clone().unwrap_or_default();
        remove_container(docker, &id).await?;
        removed.containers.push(
            c.names
                .and_then(|n| n.first().cloned())
                .unwrap_or(id)
                .trim_start_matches('/')
                .to_string(),
        );
    }
    if !keep_volumes {
        let vols = docker
            .list_volumes(Some(
                ListVolumesOptionsBuilder::new()
                    .filters(&labels::filter(&[(labels::PROJECT, project)]))
                    .build(),
            ))
            .await
            .map_err(api("listing volumes"))?;
        for v in vols.volumes.unwrap_or_default() {
            docker
                .remove_volume(
                    &v.name,
                    None::<bollard::query_parameters::RemoveVolumeOptions>,
                )
                .await
                .map_err(api(format!("removing volume {}", v.name)))?;
            removed.volumes.push(v.name);
        }
    }
    let nets = project_networks(docker, project).await?;
    let others = list_project_containers(docker, project, None).await?;
    if others.is_empty() {
        for n in nets {
            let name = n.name.unwrap_or_default();
            // A container of the user's own (`docker run --network devloop-P`) keeps the
            // network: say so instead of failing after everything else is gone.
            let attached: Vec<String> = docker
                .inspect_network(
                    &name,
                    None::<bollard::query_parameters::InspectNetworkOptions>,
                )
                .await
                .map_err(api(format!("inspecting network {name}")))?
                .containers
                .unwrap_or_default()
                .into_values()
                .map(|c| c.name.unwrap_or_default())
                .collect();
            if !attached.is_empty() {
                removed.kept_networks.push((name, attached));
                continue;
            }
            docker
                .remove_network(&name)
                .await
                .map_err(api(format!("removing network {name}")))?;
            removed.networks.push(name);
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_user_is_read_as_docker_reads_it() {
        let passwd = "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1001::/home/app:/bin/sh\n";
        let group = "root:x:0:\nstaff:x:50:\napp:x:1001:\n";
        let r = |s: &str| resolve_user(s, Some(passwd), Some(group));
        assert_eq!(r("1000:1000"), Ok((1000, 1000)));
        assert_eq!(
            r("1000"),
            Ok((1000, 1001)),
            "a uid alone takes its passwd group"
        );
        assert_eq!(resolve_user("4242", None, None), Ok((4242, 4242)));
        assert_eq!(r("app"), Ok((1000, 1001)));
        assert_eq!(r("app:staff"), Ok((1000, 50)));
        assert_eq!(r("app:7"), Ok((1000, 7)));
        assert!(r("nobody").unwrap_err().contains("`nobody`"));
        assert!(r("app:wheel").unwrap_err().contains("`wheel`"));
    }

    #[test]
    fn an_engine_error_is_said_once() {
        let cause = bollard::errors::Error::DockerResponseServerError {
            status_code: 403,
            message: "network has active endpoints".into(),
        };
        let e = anyhow::Error::new(api("removing network n")(cause));
        let text = format!("{e:#}");
        assert_eq!(text.matches("active endpoints").count(), 1, "{text}");
        assert!(text.starts_with("docker: removing network n: "), "{text}");
    }
}
