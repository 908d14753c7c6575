//! The sync engine's [`Connector`] on Kubernetes: the ready pod of a dev-mode session (or
//! of a watched version), reached through a port-forward to the agent's port on the pod's
//! loopback; [`Gone`] once the Deployment no longer runs that session.

use anyhow::Context;
use futures_util::future::BoxFuture;
use std::time::Duration;

use super::devpod::{self, DevRecord};
use super::intercept as ki;
use super::{portforward, Cluster};
use crate::agent_link::{AgentLink, Connected};
use crate::sync::engine::{Connector, Gone};

/// Reaches the agent of a dev pod (or of a watched version): the ready pod labelled with the
/// session, a port-forward to the agent's port.
pub struct KubeConnector {
    pub cluster: Cluster,
    pub deployment: String,
    /// [`devpod::SESSION_LABEL`] or [`devpod::WATCH_LABEL`].
    pub label: &'static str,
    pub session: String,
    pub token: String,
}

impl Connector for KubeConnector {
    fn connect(&self) -> BoxFuture<'_, anyhow::Result<(Connected, String)>> {
        Box::pin(async move {
            self.still_there().await?;
            let pod = ki::wait_session_pod(
                &self.cluster,
                self.label,
                &self.session,
                Duration::from_secs(60),
            )
            .await?;
            let stream = portforward::open(&self.cluster, &pod, devloop_proxy::AGENT_PORT).await?;
            let connected = AgentLink::connect(stream, &self.token)
                .await
                .with_context(|| format!("connecting to the agent in pod {pod}"))?;
            Ok((connected, format!("port-forward to {pod}")))
        })
    }
}

impl KubeConnector {
    /// Fails with [`Gone`] when the Deployment no longer runs this session's agent: pods of
    /// the session will not come back, so waiting for one would only end in a timeout.
    pub(crate) async fn still_there(&self) -> anyhow::Result<()> {
        let path = self
            .cluster
            .path("apps/v1", "deployments", Some(&self.deployment));
        let d = match self.cluster.get_opt(&path).await {
            Ok(Some(d)) => d,
            Ok(None) => {
                return Err(Gone(format!("deployment/{} was deleted", self.deployment)).into())
            }
            // The API is unreachable for now: the reconnect loop retries.
            Err(e) => {
                return Err(self
                    .cluster
                    .err(
                        e,
                        "get",
                        "deployments",
                        format!("reading deployment/{}", self.deployment),
                    )
                    .into())
            }
        };
        let carries = |template: &serde_json::Value| {
            template["metadata"]["labels"][self.label].as_str() == Some(self.session.as_str())
        };
        if carries(&d["spec"]["template"]) {
            return Ok(());
        }
        // An intercept or dev mode of a watched version saved its template, and `leave` /
        // `down` bring the session back: wait for that, as for any unreachable agent.
        let saved = ki::record_of(&d)
            .map(|r| (r.template, "intercepted"))
            .or_else(|| devpod::record_of(&d).map(|r| (r.template, "in dev mode")));
        if let Some((_, held)) = saved.filter(|(template, _)| carries(template)) {
            anyhow::bail!(
                "deployment/{} is {held} for now; syncing resumes when that ends",
                self.deployment
            );
        }
        let why = if self.label == devpod::WATCH_LABEL {
            "no longer runs under this `devloop watch` (a plain `deploy` or `rollback` replaced it); run `devloop watch` again to go on"
        } else {
            "left dev mode (`devloop down`, or another `devloop up` switched it again); run `devloop up` again to go on"
        };
        Err(Gone(format!("deployment/{} {why}", self.deployment)).into())
    }
}

/// The connector to the agent of a Deployment in dev mode (its token read from its Secret).
pub async fn connector_for(cluster: &Cluster, record: &DevRecord) -> anyhow::Result<KubeConnector> {
    let token = devpod::read_token(cluster, record).await?;
    Ok(KubeConnector {
        cluster: cluster.clone(),
        deployment: record.deployment.clone(),
        label: devpod::SESSION_LABEL,
        session: record.session.clone(),
        token,
    })
}

/// The connector to the agent of a version `devloop watch` runs under the agent (its session
/// from the template, its token from its Secret); None when the Deployment is not one.
pub async fn watched_connector(
    cluster: &Cluster,
    d: &serde_json::Value,
) -> anyhow::Result<Option<KubeConnector>> {
    let Some(session) = d["spec"]["template"]["metadata"]["labels"][devpod::WATCH_LABEL].as_str()
    else {
        return Ok(None);
    };
    let deployment = d["metadata"]["name"].as_str().unwrap_or_default();
    let secret = devpod::watch_secret_name(deployment);
    let token = devpod::read_token_opt(cluster, &secret)
        .await?
        .with_context(|| {
            format!("the token Secret {secret} of the watched deployment/{deployment} is gone")
        })?;
    Ok(Some(KubeConnector {
        cluster: cluster.clone(),
        deployment: deployment.to_string(),
        label: devpod::WATCH_LABEL,
        session: session.to_string(),
        token,
    }))
}
