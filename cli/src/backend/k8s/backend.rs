//! [`Backend`] on a Kubernetes cluster: the context and namespace from `--context`, `-n` or
//! devloop.toml's `[target]`, connected on first use; each call goes to the module that
//! holds it.

use futures_util::future::BoxFuture;
use std::sync::Arc;
use std::time::Duration;

use super::deployer::KubeDeployer;
use super::swap::KubeSwap;
use super::{dev, intercepts, registry, status, Cluster, KubeSettings};
use crate::backend::{Backend, DevEnv, Fut, Words};
use crate::config::{Project, Service};
use crate::deploy::Deployer;
use crate::intercept::{InterceptOptions, Swap};
use crate::status::{Check, ServiceReport};
use crate::ui::Ui;

pub struct KubeBackend {
    settings: KubeSettings,
    /// `[target] registry`.
    registry: Option<String>,
    cluster: tokio::sync::OnceCell<Cluster>,
}

impl KubeBackend {
    pub fn new(settings: KubeSettings, registry: Option<String>) -> KubeBackend {
        KubeBackend {
            settings,
            registry,
            cluster: Default::default(),
        }
    }

    async fn cluster(&self) -> anyhow::Result<&Cluster> {
        Ok(self
            .cluster
            .get_or_try_init(|| Cluster::connect(&self.settings))
            .await?)
    }
}

impl Backend for KubeBackend {
    fn words(&self) -> Words {
        Words {
            envs: match self.cluster.get() {
                Some(c) => format!("dev pods in namespace {}", c.namespace),
                None => "dev pods".into(),
            },
            on_stop: "switches the Deployments back",
            on_keep:
                "leaves the pods in dev mode (`devloop down` or --stop-on-exit switches them back)",
            place: match self.cluster.get() {
                Some(c) => format!("in namespace {} (context {})", c.namespace, c.context),
                None => String::new(),
            },
        }
    }

    fn up<'a>(
        &'a self,
        project: &'a Project,
        services: &'a [&'a Service],
        build: bool,
        ui: &'a Ui,
    ) -> Fut<'a, Vec<DevEnv>> {
        Box::pin(async move {
            if build {
                anyhow::bail!("`up --build` builds images in the local engine; on Kubernetes a dev pod runs its Deployment's own image with your files synced into it, so there is nothing to build: drop --build (`devloop deploy` builds and rolls out a new image)");
            }
            let cluster = self.cluster().await?;
            dev::up(cluster, self.registry.as_deref(), project, services, ui).await
        })
    }

    fn attach<'a>(&'a self, _project: &'a Project, service: &'a Service) -> Fut<'a, DevEnv> {
        Box::pin(async move { dev::attach(self.cluster().await?, service).await })
    }

    fn stop<'a>(&'a self, project: &'a Project, services: &'a [String]) -> Fut<'a, ()> {
        Box::pin(async move { dev::stop(self.cluster().await?, project, services).await })
    }

    fn down<'a>(&'a self, project: &'a Project, _keep_volumes: bool) -> Fut<'a, ()> {
        Box::pin(async move { dev::down(self.cluster().await?, project).await })
    }

    fn deployer<'a>(
        &'a self,
        project: &'a Project,
        health_timeout: Option<Duration>,
        watch: bool,
    ) -> Fut<'a, Arc<dyn Deployer>> {
        Box::pin(async move {
            let cluster = self.cluster().await?.clone();
            let d = KubeDeployer::new(
                cluster,
                self.registry.as_deref(),
                project,
                health_timeout,
                watch,
            )
            .await?;
            Ok(Arc::new(d) as Arc<dyn Deployer>)
        })
    }

    fn swap<'a>(
        &'a self,
        opts: &'a InterceptOptions,
        _project: Option<&'a Project>,
    ) -> Fut<'a, Box<dyn Swap>> {
        Box::pin(async move {
            let agent = crate::backend::read_agent_binary()?;
            let swap =
                KubeSwap::new(&self.settings, self.registry.as_deref(), &agent, opts).await?;
            Ok(Box::new(swap) as Box<dyn Swap>)
        })
    }

    fn router<'a>(
        &'a self,
        _opts: &'a InterceptOptions,
        _project: Option<&'a Project>,
    ) -> Fut<'a, Box<dyn crate::intercept::shared::Router>> {
        Box::pin(async move {
            anyhow::bail!("filtered intercepts and mirrors (--header, --path..., --key, --mirror) work on Docker; on Kubernetes they are not built yet. Nothing was changed")
        })
    }

    fn intercepts(&self) -> Fut<'_, Vec<crate::intercept::Listed>> {
        Box::pin(async move {
            let lines = intercepts::list(self.cluster().await?).await?;
            Ok(lines
                .into_iter()
                .map(|l| {
                    let service = l.split_whitespace().next().unwrap_or_default().to_string();
                    crate::intercept::Listed::replace(&service, l)
                })
                .collect())
        })
    }

    fn leave<'a>(&'a self, leave: crate::intercept::Leave<'a>) -> Fut<'a, ()> {
        Box::pin(async move {
            if leave.holder.is_some() || leave.session.is_some() {
                anyhow::bail!(
                    "--holder names a filtered intercept; on Kubernetes there are none yet"
                );
            }
            intercepts::leave(self.cluster().await?, leave.target, leave.all).await
        })
    }

    fn status<'a>(&'a self, project: &'a Project) -> Fut<'a, Vec<ServiceReport>> {
        Box::pin(async move { status::status(self.cluster().await?, project).await })
    }

    /// The context and namespace, the registry, the permissions.
    fn doctor<'a>(&'a self, _project: Option<&'a Project>) -> BoxFuture<'a, Vec<Check>> {
        Box::pin(async move {
            let cluster = match self.cluster().await {
                Ok(c) => c,
                Err(e) => {
                    return vec![Check::fail(
                        "kubernetes",
                        e.to_string(),
                        "check `kubectl config get-contexts` and the --context / -n flags",
                    )]
                }
            };
            let mut checks = vec![Check::ok(
                "kubernetes",
                format!(
                    "context {}, namespace {}",
                    cluster.context, cluster.namespace
                ),
            )];
            checks.push(match registry::discover(cluster, self.registry.as_deref()).await {
                Ok(Some(found)) => Check::ok("registry", format!("push to {}, nodes pull from {} ({})", found.push, found.pull, found.source)),
                Ok(None) => Check::fail(
                    "registry",
                    format!("context {} advertises none (ConfigMap kube-public/local-registry-hosting)", cluster.context),
                    "set `registry = \"HOST:PORT\"` under [target] in devloop.toml, or DEVLOOP_REGISTRY (docs/KUBERNETES.md)",
                ),
                Err(e) => Check::fail("registry", e.to_string(), "see docs/KUBERNETES.md"),
            });
            checks.push(match cluster.missing_permissions().await {
                Ok(missing) if missing.is_empty() => Check::ok("permissions", format!("everything devloop uses in namespace {}", cluster.namespace)),
                Ok(missing) => Check::fail(
                    "permissions",
                    format!("missing in namespace {}: {}", cluster.namespace, missing.join(", ")),
                    format!("kubectl -n {} apply -f docs/kubernetes-role.yaml, then bind the Role `devloop` to your user (docs/KUBERNETES.md)", cluster.namespace),
                ),
                Err(e) => Check::fail("permissions", e.to_string(), "see docs/KUBERNETES.md"),
            });
            checks
        })
    }
}
