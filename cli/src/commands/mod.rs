//! One module per command; shared set-up lives here.

pub mod deploy;
pub mod doctor;
pub mod down;
pub mod intercept;
pub mod status;
pub mod up;
pub mod watch;

use std::path::PathBuf;

use crate::backend::{self, Backend};
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

/// The back end `global` and the project choose (see [`backend::choose`]).
pub fn backend(global: &Global, project: Option<&Project>) -> Box<dyn Backend> {
    backend::open(backend::choose(
        global.context.as_deref(),
        global.namespace.as_deref(),
        project,
    ))
}

pub fn load_project(global: &Global) -> anyhow::Result<Project> {
    let dir = crate::config::find_project_dir(&global.dir)?;
    Ok(crate::config::load(&dir)?)
}
