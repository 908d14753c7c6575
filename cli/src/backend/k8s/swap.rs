//! Kubernetes' [`Swap`]: a Deployment's pod template swapped for the agent's (see
//! [`super::intercept`]), with the agent image pushed to the cluster's registry and the
//! tunnel carried over a port-forward.

use anyhow::Context;
use futures_util::future::BoxFuture;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::env as k8s_env;
use super::intercept::{self as ki, Record};
use super::registry::{self, Pusher};
use super::{Cluster, KubeSettings};
use crate::agent_link::{AgentLink, Connected};
use crate::intercept::{Expose, InterceptOptions, Swap};
use crate::state::now_ms;
use crate::ui::ago;

pub struct KubeSwap {
    cluster: Cluster,
    deployment: serde_json::Value,
    record: Record,
    index: usize,
    image: String,
    /// The agent's pod once it is ready (a reconnect looks it up again if it went away).
    pod: Mutex<Option<String>>,
    /// When the template was swapped, and how long the agent's pod took to become ready.
    swapped_at: Mutex<Option<Instant>>,
    ready_after: Mutex<Option<Duration>>,
    /// How long the intercept outlives a vanished cli before the agent restores it.
    lease: Duration,
    /// The intercepted container's environment, resolved for the laptop process.
    env: Vec<(String, String)>,
}

/// The lease when neither `--lease` nor `[target] lease` says otherwise.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(15 * 60);

/// Removes what agents that restored their workload by the lease left behind, saying so.
/// What it cannot remove is a warning: it blocks nothing.
pub async fn sweep(cluster: &Cluster) {
    let (cleaned, failed) = ki::sweep_lease_leftovers(cluster).await;
    for d in cleaned {
        eprintln!("devloop: deployment/{d} was restored by its agent's lease (its cli had gone); removed the lease's account and secret");
    }
    for e in failed {
        eprintln!("devloop: warning: {e:#}");
    }
}

/// Gets the agent image (FROM scratch: the static binary) to the cluster: pushed to its
/// registry, or built in the local engine and loaded with kind/k3d/minikube; returns the
/// reference the nodes use. `route` is [`registry::route`]'s answer, which callers that
/// push other images too look up once.
pub async fn agent_image(route: &registry::ImageRoute, binary: &[u8]) -> anyhow::Result<String> {
    let tag = crate::backend::agent_image_tag(binary);
    let reg = match route {
        registry::ImageRoute::Registry(r) => r,
        registry::ImageRoute::Load { context } => {
            let docker = crate::engine::connect(&crate::engine::choose()).await?;
            let image = crate::backend::agent::ensure_agent_image(&docker, binary).await?;
            registry::load_into_cluster(context, &image).await?;
            return Ok(image);
        }
    };
    let t = Instant::now();
    let layer = crate::oci::one_file_layer("devloop-agent", 0o755, binary)?;
    let config = crate::oci::image_config(std::slice::from_ref(&layer), &["/devloop-agent"]);
    let report = Pusher::new(&reg.push)?
        .push_image("devloop-agent", &tag, &[layer], &config)
        .await?;
    tracing::info!(
        "agent image pushed to {} ({}): {} blobs sent ({} bytes), {} present, {} ms",
        reg.push,
        reg.source,
        report.blobs_sent,
        report.bytes_sent,
        report.blobs_present,
        t.elapsed().as_millis()
    );
    Ok(format!("{}/devloop-agent:{tag}", reg.pull))
}

impl KubeSwap {
    pub async fn new(
        settings: &KubeSettings,
        registry: Option<&str>,
        agent_binary: &[u8],
        opts: &InterceptOptions,
    ) -> anyhow::Result<KubeSwap> {
        let cluster = Cluster::connect(settings).await?;
        sweep(&cluster).await;
        let (deployment, service) = ki::find_deployment(&cluster, &opts.target).await?;
        let name = deployment["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        if let Some(r) = ki::record_of(&deployment) {
            anyhow::bail!(
                "deployment {name} is already intercepted (by {}, {}); end that with `devloop leave {}`",
                r.holder,
                ago(r.started_ms),
                r.service
            );
        }
        let template = deployment["spec"]["template"].clone();
        let mut ports = Vec::new();
        for (r, l) in &opts.ports {
            let n = ki::resolve_port(&template, service.as_ref(), r)
                .with_context(|| format!("--port {r}:{l}"))?;
            ports.push((n, *l));
        }
        let remote: Vec<u16> = ports.iter().map(|(r, _)| *r).collect();
        let index = ki::container_for(&template, &remote)?;
        let container = template["spec"]["containers"][index]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        // The laptop process gets the container's environment, Secrets and ConfigMaps included.
        let spec = &template["spec"]["containers"][index];
        let sources = k8s_env::fetch(&cluster, &k8s_env::references(spec)).await?;
        let env = k8s_env::resolve(spec, &cluster.namespace, &sources);
        for s in &env.skipped {
            eprintln!("devloop: not in the laptop's environment: {s}");
        }
        let image = agent_image(&registry::route(&cluster, registry).await?, agent_binary).await?;
        let session = crate::state::new_token()[..12].to_string();
        let record = Record {
            deployment: name.clone(),
            service: opts.target.clone(),
            container,
            template,
            replicas: deployment["spec"]["replicas"].clone(),
            ports,
            session: session.clone(),
            secret: ki::secret_name(&name, &session),
            account: ki::lease_account(&name, &session),
            started_ms: now_ms(),
            holder: crate::ownership::whoami(),
        };
        Ok(KubeSwap {
            cluster,
            deployment,
            record,
            index,
            image,
            pod: Mutex::new(None),
            swapped_at: Mutex::new(None),
            ready_after: Mutex::new(None),
            lease: opts.lease.unwrap_or(DEFAULT_LEASE),
            env: env.vars,
        })
    }

    async fn pod(&self) -> anyhow::Result<String> {
        if let Some(p) = self.pod.lock().unwrap_or_else(|e| e.into_inner()).clone() {
            return Ok(p);
        }
        let p = ki::wait_agent_pod(
            &self.cluster,
            &self.record.session,
            Duration::from_secs(120),
        )
        .await?;
        *self.pod.lock().unwrap_or_else(|e| e.into_inner()) = Some(p.clone());
        let mut ready = self.ready_after.lock().unwrap_or_else(|e| e.into_inner());
        if ready.is_none() {
            *ready = self
                .swapped_at
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .map(|t| t.elapsed());
        }
        Ok(p)
    }
}

impl Swap for KubeSwap {
    fn original(&self) -> String {
        format!("deployment/{}", self.record.deployment)
    }

    fn service(&self) -> String {
        self.record.service.clone()
    }

    fn owner_key(&self) -> String {
        format!(
            "k8s/{}/{}/{}",
            self.cluster.context, self.cluster.namespace, self.record.deployment
        )
    }

    fn ports(&self) -> Vec<(u16, u16)> {
        self.record.ports.clone()
    }

    fn env(&self) -> Vec<(String, String)> {
        self.env.clone()
    }

    fn swap_in<'a>(
        &'a self,
        token: &'a str,
        expose: &'a [Expose],
    ) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move {
            // Exposed services are found through the API (their ClusterIP), so this works
            // without cluster DNS.
            let mut targets = Vec::new();
            for e in expose {
                let svc = self
                    .cluster
                    .get_opt(&self.cluster.path("v1", "services", Some(&e.name)))
                    .await
                    .map_err(|err| {
                        self.cluster.err(
                            err,
                            "get",
                            "services",
                            format!("reading service {}", e.name),
                        )
                    })?
                    .with_context(|| {
                        format!(
                            "--expose {}: no Service `{}` in namespace `{}`",
                            e.name, e.name, self.cluster.namespace
                        )
                    })?;
                let ip = svc["spec"]["clusterIP"]
                    .as_str()
                    .filter(|ip| !ip.is_empty() && *ip != "None");
                targets.push(format!("{}:{}", ip.unwrap_or(&e.name), e.port));
            }
            ki::create_token_secret(&self.cluster, &self.record.secret, &self.record, token)
                .await?;
            let account = self.record.account();
            ki::create_lease_account(&self.cluster, &self.record).await?;
            let remote: Vec<u16> = self.record.ports.iter().map(|(r, _)| *r).collect();
            let spec = ki::AgentSpec {
                image: &self.image,
                ports: &remote,
                expose: &targets,
                session: &self.record.session,
                secret: &self.record.secret,
                lease: Some((self.lease.as_secs().max(1), &account)),
            };
            // A version `devloop watch` runs under the agent: the intercept replaces its plain
            // form (leave restores the template as it was).
            let plain = crate::backend::k8s::devpod::unwatched(&self.record.template);
            let template = ki::agent_template(
                plain.as_ref().unwrap_or(&self.record.template),
                self.index,
                &spec,
            );
            ki::swap_in(&self.cluster, &self.deployment, &self.record, &template).await?;
            *self.swapped_at.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
            Ok(())
        })
    }

    fn connect<'a>(&'a self, token: &'a str) -> BoxFuture<'a, anyhow::Result<Connected>> {
        Box::pin(async move {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let attempt = async {
                    let pod = self.pod().await?;
                    let stream = crate::backend::k8s::portforward::open(
                        &self.cluster,
                        &pod,
                        devloop_proxy::AGENT_PORT,
                    )
                    .await?;
                    anyhow::Ok(AgentLink::connect(stream, token).await?)
                }
                .await;
                match attempt {
                    Ok(c) => return Ok(c),
                    Err(e) if Instant::now() > deadline => {
                        return Err(e.context("connecting to the agent through a port-forward"))
                    }
                    Err(_) => {
                        // The pod may have been replaced: look it up again.
                        *self.pod.lock().unwrap_or_else(|e| e.into_inner()) = None;
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
        })
    }

    fn ended_elsewhere(&self) -> BoxFuture<'_, bool> {
        Box::pin(async move {
            match self
                .cluster
                .get_opt(&self.cluster.path(
                    "apps/v1",
                    "deployments",
                    Some(&self.record.deployment),
                ))
                .await
            {
                Ok(Some(d)) => {
                    ki::record_of(&d).map(|r| r.session) != Some(self.record.session.clone())
                }
                Ok(None) => true,
                Err(_) => false,
            }
        })
    }

    fn restore(&self) -> BoxFuture<'_, anyhow::Result<()>> {
        Box::pin(async move {
            ki::restore(&self.cluster, &self.record).await?;
            Ok(())
        })
    }

    fn detail(&self) -> Option<String> {
        let d = (*self.ready_after.lock().unwrap_or_else(|e| e.into_inner()))?;
        Some(format!("agent pod ready after {} ms", d.as_millis()))
    }
}
