//! One module per command; shared set-up lives here.

pub mod deploy;
pub mod dev_k8s;
pub mod doctor;
pub mod down;
pub mod intercept;
pub mod intercept_k8s;
pub mod status;
pub mod up;
pub mod watch;

use anyhow::Context;
use bollard::Docker;
use std::path::{Path, PathBuf};

use crate::backend::docker;
pub use crate::backend::docker_connector::{connector, DockerConnector};
use crate::backend::engine::{self, EngineChoice};
use crate::config::Project;

/// Options every command shares.
#[derive(Debug, Clone, Default)]
pub struct Global {
    /// The folder to start looking for the project from.
    pub dir: PathBuf,
    /// `--context`: a kubeconfig context (selects the Kubernetes target).
    pub context: Option<String>,
    /// `-n`: a Kubernetes namespace (selects the Kubernetes target).
    pub namespace: Option<String>,
}

/// Where a command acts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetChoice {
    Docker,
    Kubernetes {
        settings: crate::backend::k8s::KubeSettings,
        /// `[target] registry`.
        registry: Option<String>,
    },
}

/// `--context` or `-n` select Kubernetes (like kubectl's flags); else devloop.toml's
/// `[target]`; else Docker.
pub fn choose_target(global: &Global, project: Option<&Project>) -> TargetChoice {
    use crate::config::file::TargetKind;
    let section = project.map(|p| p.target.clone()).unwrap_or_default();
    let kube = global.context.is_some()
        || global.namespace.is_some()
        || section.kind == Some(TargetKind::Kubernetes);
    if !kube {
        return TargetChoice::Docker;
    }
    TargetChoice::Kubernetes {
        settings: crate::backend::k8s::KubeSettings {
            context: global.context.clone().or(section.context),
            namespace: global.namespace.clone().or(section.namespace),
        },
        registry: section.registry,
    }
}

pub fn load_project(global: &Global) -> anyhow::Result<Project> {
    let dir = crate::config::find_project_dir(&global.dir)?;
    Ok(crate::config::load(&dir)?)
}

pub async fn connect_engine() -> anyhow::Result<(Docker, EngineChoice)> {
    let choice = engine::choose();
    let docker = engine::connect(&choice).await?;
    Ok((docker, choice))
}

pub fn read_agent_binary() -> anyhow::Result<(PathBuf, Vec<u8>)> {
    let path = docker::find_agent_binary().map_err(anyhow::Error::msg)?;
    let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    Ok((path, bytes))
}

pub fn display(p: &Path) -> String {
    p.display().to_string()
}
