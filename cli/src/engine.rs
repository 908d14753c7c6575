//! Which Docker engine to talk to: DOCKER_HOST, else the current docker context, else the
//! local socket; and whether container addresses can be reached from here.

use bollard::Docker;
use std::path::PathBuf;

#[derive(Debug, Clone)]
pub struct EngineChoice {
    /// `unix:///var/run/docker.sock`, `tcp://host:2375`, `ssh://user@host`.
    pub host: String,
    /// Where the choice came from, for `doctor` and errors.
    pub source: String,
}

impl EngineChoice {
    /// A unix socket means the engine runs on this machine (or in a VM of it, where container
    /// addresses may still be unreachable: the agent connection then falls back).
    pub fn is_local(&self) -> bool {
        self.host.starts_with("unix://")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("cannot use the Docker engine at {host} (from {source_name}): {message}; check that it runs (`docker info`) or set DOCKER_HOST")]
    Connect {
        host: String,
        source_name: String,
        message: String,
    },
}

pub fn choose() -> EngineChoice {
    if let Ok(host) = std::env::var("DOCKER_HOST") {
        if !host.is_empty() {
            return EngineChoice {
                host,
                source: "DOCKER_HOST".into(),
            };
        }
    }
    if let Some((name, host)) = current_context() {
        return EngineChoice {
            host,
            source: format!("docker context `{name}`"),
        };
    }
    EngineChoice {
        host: "unix:///var/run/docker.sock".into(),
        source: "the default socket".into(),
    }
}

fn docker_config_dir() -> Option<PathBuf> {
    std::env::var_os("DOCKER_CONFIG")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker")))
}

/// The endpoint of the current docker context, when it is not "default". Context metadata
/// lives in `contexts/meta/<sha256 of name>/meta.json`; instead of hashing the name, every
/// meta file is read and matched by its `Name`.
fn current_context() -> Option<(String, String)> {
    let dir = docker_config_dir()?;
    let name = std::env::var("DOCKER_CONTEXT")
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| {
            let cfg: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).ok()?)
                    .ok()?;
            cfg.get("currentContext")?.as_str().map(String::from)
        })?;
    if name == "default" {
        return None;
    }
    for entry in std::fs::read_dir(dir.join("contexts/meta")).ok()?.flatten() {
        let Ok(text) = std::fs::read_to_string(entry.path().join("meta.json")) else {
            continue;
        };
        let Ok(meta) = serde_json::from_str::<serde_json::Value>(&text) else {
            continue;
        };
        if meta.get("Name").and_then(|n| n.as_str()) == Some(name.as_str()) {
            let host = meta
                .pointer("/Endpoints/docker/Host")?
                .as_str()?
                .to_string();
            return Some((name, host));
        }
    }
    None
}

pub async fn connect(choice: &EngineChoice) -> Result<Docker, EngineError> {
    let err = |message: String| EngineError::Connect {
        host: choice.host.clone(),
        source_name: choice.source.clone(),
        message,
    };
    let docker = Docker::connect_with_host(&choice.host).map_err(|e| err(e.to_string()))?;
    // The engine may speak an older API than bollard's default (20.10 speaks 1.41).
    let docker = docker
        .negotiate_version()
        .await
        .map_err(|e| err(e.to_string()))?;
    docker.ping().await.map_err(|e| err(e.to_string()))?;
    Ok(docker)
}

/// An engine request that failed, with what devloop was doing.
#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    /// The engine's answer is part of the message, not a source of its own: an error
    /// printed with its chain (`{:#}`) would say it twice.
    #[error("docker: {action}: {cause}")]
    Api {
        action: String,
        cause: bollard::errors::Error,
    },
    #[error("{0}")]
    Other(String),
}

pub fn api(action: impl Into<String>) -> impl FnOnce(bollard::errors::Error) -> DockerError {
    let action = action.into();
    move |cause| DockerError::Api { action, cause }
}

/// A tar of one file, for the engine's archive and import endpoints.
pub fn one_file_tar(name: &str, mode: u32, data: &[u8]) -> Result<Vec<u8>, DockerError> {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_mode(mode);
    h.set_size(data.len() as u64);
    b.append_data(&mut h, name, data)
        .map_err(|e| DockerError::Other(e.to_string()))?;
    b.into_inner()
        .map_err(|e| DockerError::Other(e.to_string()))
}
