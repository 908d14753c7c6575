//! How the cli reaches an agent in a container: its address on the project network, a
//! published port, or `docker exec` when neither is reachable; and where the agent binary is.

use bollard::exec::{CreateExecOptions, StartExecResults};
use bollard::Docker;
use futures_util::StreamExt;
use std::net::SocketAddr;
use std::time::Duration;

use super::*;
use crate::agent_link::Transport;

/// How the cli reaches the agent of a container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentRoute {
    /// TCP straight to the container's address on the project network.
    Direct,
    /// `docker exec devloop-agent bridge` through the engine's API.
    Exec,
}

/// The container's address on the project network.
pub async fn agent_address(
    docker: &Docker,
    container: &str,
    project: &str,
) -> Result<Option<SocketAddr>, DockerError> {
    let info = docker
        .inspect_container(container, None)
        .await
        .map_err(api(format!("inspecting {container}")))?;
    let nets = info
        .network_settings
        .and_then(|n| n.networks)
        .unwrap_or_default();
    let ip = nets
        .get(&network_name(project))
        .or_else(|| nets.values().next())
        .and_then(|n| n.ip_address.clone())
        .filter(|ip| !ip.is_empty());
    Ok(ip
        .and_then(|ip| ip.parse().ok())
        .map(|ip| SocketAddr::new(ip, devloop_proxy::AGENT_PORT)))
}

/// Opens a byte stream to the agent: directly when the engine is local and the address
/// answers quickly, else through `docker exec`.
pub async fn open_transport(
    docker: &Docker,
    engine: &EngineChoice,
    container: &str,
    project: &str,
) -> Result<(Box<dyn TransportBox>, AgentRoute), DockerError> {
    if engine.is_local() && std::env::var("DEVLOOP_AGENT_PATH").as_deref() != Ok("exec") {
        if let Some(addr) = agent_address(docker, container, project).await? {
            match tokio::time::timeout(
                Duration::from_millis(300),
                tokio::net::TcpStream::connect(addr),
            )
            .await
            {
                Ok(Ok(s)) => {
                    let _ = s.set_nodelay(true);
                    return Ok((Box::new(s), AgentRoute::Direct));
                }
                // The address answers but nothing listens yet: the agent is still starting.
                // Retrying the fast route beats settling for the slow one.
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    return Err(DockerError::Other(format!(
                        "the agent at {addr} is not listening yet"
                    )));
                }
                _ => tracing::info!(%addr, "container address unreachable; using docker exec"),
            }
        }
    }
    Ok((
        Box::new(exec_transport(docker, container).await?),
        AgentRoute::Exec,
    ))
}

/// Object-safe form of [`Transport`] so both paths fit one type.
pub trait TransportBox: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> TransportBox for T {}

pub async fn exec_transport(
    docker: &Docker,
    container: &str,
) -> Result<impl Transport, DockerError> {
    exec_transport_with(docker, container, AGENT_PATH).await
}

/// [`exec_transport`] for an agent installed at `agent_path` (the agent image has it at
/// `/devloop-agent`).
pub async fn exec_transport_with(
    docker: &Docker,
    container: &str,
    agent_path: &str,
) -> Result<impl Transport, DockerError> {
    exec_bridge(docker, container, agent_path, devloop_proxy::AGENT_PORT).await
}

/// The `docker exec ... bridge` stream to an agent listening on the container's loopback at
/// `port`.
pub async fn exec_bridge(
    docker: &Docker,
    container: &str,
    agent_path: &str,
    port: u16,
) -> Result<impl Transport, DockerError> {
    let exec = docker
        .create_exec(
            container,
            CreateExecOptions {
                attach_stdin: Some(true),
                attach_stdout: Some(true),
                attach_stderr: Some(true),
                tty: Some(false),
                cmd: Some(vec![
                    agent_path.to_string(),
                    "bridge".into(),
                    "--to".into(),
                    format!("127.0.0.1:{port}"),
                ]),
                ..Default::default()
            },
        )
        .await
        .map_err(api(format!("exec into {container}")))?;
    match docker
        .start_exec(&exec.id, None)
        .await
        .map_err(api(format!("starting exec in {container}")))?
    {
        StartExecResults::Attached { output, input } => {
            let reader = tokio_util::io::StreamReader::new(output.filter_map(|item| async move {
                match item {
                    Ok(bollard::container::LogOutput::StdOut { message }) => Some(Ok(message)),
                    Ok(bollard::container::LogOutput::StdErr { message }) => {
                        tracing::debug!(stderr = %String::from_utf8_lossy(&message), "agent bridge");
                        None
                    }
                    Ok(_) => None,
                    Err(e) => Some(Err(std::io::Error::other(e))),
                }
            }));
            Ok(tokio::io::join(Box::pin(reader), input))
        }
        StartExecResults::Detached => {
            Err(DockerError::Other("docker exec started detached".into()))
        }
    }
}

/// Reads the session token of a container from the container itself (for a laptop that lost
/// its copy, e.g. another shell user or a wiped state folder). Only someone who can already
/// run commands in the container can do this.
pub async fn fetch_token(docker: &Docker, container: &str) -> Result<String, DockerError> {
    Ok(read_container_file(docker, container, TOKEN_PATH)
        .await
        .map_err(|e| match e {
            DockerError::Other(m) if m.contains("holds no") => {
                DockerError::Other(format!("{container} holds no token"))
            }
            e => e,
        })?
        .trim()
        .to_string())
}
