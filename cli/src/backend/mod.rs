//! Where services run: a Docker engine ([`docker`]) or a Kubernetes cluster ([`k8s`]),
//! behind one interface, [`Backend`], so that each command is written once. What the
//! commands share below it is each seam's own trait: the sync engine reaches agents through
//! [`crate::sync::engine::Connector`], deploys go through [`crate::deploy::Deployer`], and
//! intercepts through [`crate::intercept::Swap`]; a back end hands out its implementations.
//!
//! Imports flow one way: `commands` -> `backend` -> (`deploy`, `intercept`, `sync`, `image`,
//! `engine`, `oci`, `state`, `config`, `ui`); nothing below a back end imports it.

pub mod agent;
pub mod docker;
pub mod k8s;

pub use agent::{agent_image_tag, read_agent_binary};

use futures_util::future::BoxFuture;
use std::sync::Arc;
use std::time::Duration;

use crate::config::{Project, Service};
use crate::deploy::Deployer;
use crate::intercept::shared::Router;
use crate::intercept::{InterceptOptions, Leave, Listed, Swap};
use crate::status::{Check, ServiceReport};
use crate::sync::engine::Connector;
use crate::ui::Ui;

/// What every back-end call returns.
pub type Fut<'a, T> = BoxFuture<'a, anyhow::Result<T>>;

/// A service's dev environment (a dev container, a dev pod), reached through its agent.
pub struct DevEnv {
    pub service: String,
    pub connector: Arc<dyn Connector>,
}

/// What the messages of `up` and `sync` call a back end's things.
pub struct Words {
    /// "containers", "dev pods in namespace shop".
    pub envs: String,
    /// What `up --stop-on-exit` does on Ctrl-C ("stops the containers").
    pub on_stop: &'static str,
    /// What Ctrl-C leaves otherwise.
    pub on_keep: &'static str,
    /// Where the back end acts, for messages that name no service ("in namespace shop
    /// (context kind)"); empty when that is this machine's Docker engine.
    pub place: String,
}

/// What a back end does. Docker implements it in [`docker::DockerBackend`], Kubernetes in
/// [`k8s::KubeBackend`]; the commands choose one with [`open`] and never ask which.
pub trait Backend: Send + Sync {
    fn words(&self) -> Words;

    // ---- dev environments (`up`, `sync`, `down`)

    /// Starts (or finds) the dev environment of each service, saying what it did on `ui`;
    /// the ones to sync. A service it leaves alone (intercepted) is warned about and left out.
    fn up<'a>(
        &'a self,
        project: &'a Project,
        services: &'a [&'a Service],
        build: bool,
        ui: &'a Ui,
    ) -> Fut<'a, Vec<DevEnv>>;

    /// The running dev environment of one service (`devloop sync SERVICE`).
    fn attach<'a>(&'a self, project: &'a Project, service: &'a Service) -> Fut<'a, DevEnv>;

    /// Stops the dev environments `up` started (`--stop-on-exit`).
    fn stop<'a>(&'a self, project: &'a Project, services: &'a [String]) -> Fut<'a, ()>;

    /// Removes what devloop made for the project (and only that), clearing its sync status;
    /// prints what it did.
    fn down<'a>(&'a self, project: &'a Project, keep_volumes: bool) -> Fut<'a, ()>;

    // ---- deploys (`deploy`, `watch`, `history`, `rollback`)

    /// The back end's side of a deploy. `watch`: versions run under the agent where the back
    /// end needs that to sync into them.
    fn deployer<'a>(
        &'a self,
        project: &'a Project,
        health_timeout: Option<Duration>,
        watch: bool,
    ) -> Fut<'a, Arc<dyn Deployer>>;

    // ---- intercepts (`intercept`, `intercept list`, `leave`)

    /// The swap [`crate::intercept::hold`] runs; nothing changes until it does.
    fn swap<'a>(
        &'a self,
        opts: &'a InterceptOptions,
        project: Option<&'a Project>,
    ) -> Fut<'a, Box<dyn Swap>>;

    /// The routing agent of a filtered intercept or a mirror ([`crate::intercept::shared`]);
    /// nothing changes until it joins.
    fn router<'a>(
        &'a self,
        opts: &'a InterceptOptions,
        project: Option<&'a Project>,
    ) -> Fut<'a, Box<dyn Router>>;

    /// Every intercept (and leftover of one), filtered ones with their holders; empty when
    /// there is none.
    fn intercepts(&self) -> Fut<'_, Vec<Listed>>;

    /// Ends intercepts: replace ones are restored, filtered ones' holders released (this
    /// user's, or the one `--holder` names); prints each.
    fn leave<'a>(&'a self, leave: Leave<'a>) -> Fut<'a, ()>;

    // ---- `status`, `doctor`

    /// Each service's environment, agent, process and sync.
    fn status<'a>(&'a self, project: &'a Project) -> Fut<'a, Vec<ServiceReport>>;

    /// The back end's own checks, for the project when there is one (the engine's are
    /// `doctor`'s, as every back end builds images in it).
    fn doctor<'a>(&'a self, project: Option<&'a Project>) -> BoxFuture<'a, Vec<Check>>;
}

/// Which back end a command acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Choice {
    Docker,
    Kubernetes {
        settings: k8s::KubeSettings,
        /// `[target] registry`.
        registry: Option<String>,
    },
}

/// `--context` or `-n` select Kubernetes (like kubectl's flags); else devloop.toml's
/// `[target]`; else Docker.
pub fn choose(context: Option<&str>, namespace: Option<&str>, project: Option<&Project>) -> Choice {
    use crate::config::file::TargetKind;
    let section = project.map(|p| p.target.clone()).unwrap_or_default();
    let kube =
        context.is_some() || namespace.is_some() || section.kind == Some(TargetKind::Kubernetes);
    if !kube {
        return Choice::Docker;
    }
    Choice::Kubernetes {
        settings: k8s::KubeSettings {
            context: context.map(String::from).or(section.context),
            namespace: namespace.map(String::from).or(section.namespace),
        },
        registry: section.registry,
    }
}

/// The back end chosen. Nothing is connected yet: each connects on its first call.
pub fn open(choice: Choice) -> Box<dyn Backend> {
    match choice {
        Choice::Docker => Box::new(docker::DockerBackend::new()),
        Choice::Kubernetes { settings, registry } => {
            Box::new(k8s::KubeBackend::new(settings, registry))
        }
    }
}
