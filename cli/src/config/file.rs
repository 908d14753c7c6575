//! The schema of devloop.toml, as serde reads it. Unknown keys are errors, so a typo is
//! reported with the file, line and key instead of being silently ignored.

use serde::Deserialize;
use std::collections::BTreeMap;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DevloopFile {
    /// Project name; default: the name of the folder that holds devloop.toml.
    pub project: Option<String>,
    /// Settings of `devloop up`.
    #[serde(default)]
    pub up: UpSection,
    /// Settings of `devloop deploy`.
    #[serde(default)]
    pub deploy: DeploySection,
    /// Where services run: Docker (default) or a Kubernetes context and namespace.
    #[serde(default)]
    pub target: TargetSection,
    #[serde(default)]
    pub services: BTreeMap<String, ServiceSection>,
    /// Filtered intercepts of several services at once (`devloop intercept --session NAME`).
    #[serde(default)]
    pub sessions: BTreeMap<String, SessionSection>,
}

/// `[sessions.NAME]`: services intercepted together, sharing one key.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionSection {
    /// The key every request of the session carries as `baggage: devloop-session=KEY`
    /// (default: NAME-USER).
    pub key: Option<String>,
    /// The services, each with its ports and, optionally, more filters and a laptop command.
    pub services: Vec<SessionService>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionService {
    pub service: String,
    /// REMOTE:LOCAL, as `--port` (at least one).
    pub ports: Vec<String>,
    /// More filters, ANDed with the key: as `--header`, `--path-prefix`, `--method`.
    #[serde(default)]
    pub headers: Vec<String>,
    pub path_prefix: Option<String>,
    pub method: Option<String>,
    /// The laptop command for this service.
    pub command: Option<CommandLine>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpSection {
    /// What Ctrl-C does to the dev containers: "keep" (default) or "stop".
    pub on_exit: Option<OnExit>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeploySection {
    /// How many versions of each service to keep for `history` and `rollback` (default 5).
    pub keep: Option<usize>,
}

#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetSection {
    /// "docker" (default) or "kubernetes".
    pub kind: Option<TargetKind>,
    /// kubeconfig context (default: the current one).
    pub context: Option<String>,
    /// Namespace (default: the context's).
    pub namespace: Option<String>,
    /// Registry the cluster pulls devloop's images from, HOST[:PORT] (default: the one the
    /// cluster advertises).
    pub registry: Option<String>,
    /// Folder of Kubernetes manifests (relative to devloop.toml) that `deploy` creates a
    /// service's missing Deployment and Service from.
    pub manifests: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TargetKind {
    Docker,
    Kubernetes,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnExit {
    Keep,
    Stop,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSection {
    pub image: Option<String>,
    pub build: Option<BuildSection>,
    pub workdir: Option<String>,
    pub command: Option<CommandLine>,
    pub entrypoint: Option<CommandLine>,
    pub ports: Option<Vec<String>>,
    pub environment: Option<BTreeMap<String, String>>,
    pub depends_on: Option<Vec<String>>,
    pub sync: Option<SyncSection>,
    #[serde(default)]
    pub exclude: Vec<String>,
    /// Sync node_modules too (excluded by default).
    #[serde(default)]
    pub include_node_modules: bool,
    /// Files (relative to the build context) the snapshot base is built from besides the
    /// Dockerfile, e.g. a lock file a `RUN` installs from: a change rebuilds the base.
    #[serde(default)]
    pub build_inputs: Vec<String>,
    #[serde(default)]
    pub on_change: Vec<RuleSection>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BuildSection {
    pub context: String,
    pub dockerfile: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncSection {
    /// Laptop folder, relative to the folder of devloop.toml.
    pub from: String,
    /// Absolute folder in the container.
    pub to: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSection {
    pub paths: Vec<String>,
    pub action: RuleAction,
    /// With action = "run": the command to run before the restart.
    pub run: Option<CommandLine>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuleAction {
    /// Copy the files only (for code the process reloads by itself, or static files).
    Sync,
    /// Copy, then restart the process.
    Restart,
    /// Copy, run a command in the container, then restart.
    Run,
    /// Snapshot the tree and roll out a new version (under `devloop watch`; `up` restarts).
    Redeploy,
}

/// A command as a list (`["python3", "app.py"]`) or as one string split like a shell would.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum CommandLine {
    List(Vec<String>),
    Shell(String),
}

impl CommandLine {
    pub fn to_argv(&self) -> Result<Vec<String>, String> {
        match self {
            CommandLine::List(v) => Ok(v.clone()),
            CommandLine::Shell(s) => {
                shell_words::split(s).map_err(|e| format!("cannot split {s:?}: {e}"))
            }
        }
    }
}
