//! The Kubernetes back end ([`KubeBackend`]): which cluster and namespace (kubeconfig
//! context, `--context`, `-n`, `[target]`), the API client, and errors that name what was
//! wrong. The workflows are in the submodules: [`dev`] and [`devpod`] run dev pods,
//! [`registry`] gets images to the cluster, [`deployer`] and [`rollout`] deploy snapshots,
//! [`swap`] and [`intercept`] put the agent in a workload's place.

mod backend;
pub mod connector;
pub mod deployer;
mod dev;
pub mod devpod;
pub mod env;
pub mod intercept;
mod intercepts;
pub mod manifests;
#[cfg(test)]
mod mock_tests;
pub mod portforward;
mod readiness;
pub mod registry;
mod revisions;
pub mod rollout;
pub mod spdy;
mod status;
pub mod swap;

pub use backend::KubeBackend;

use kube::config::{KubeConfigOptions, Kubeconfig};

/// Where the user pointed devloop: flags first, then devloop.toml's `[target]`, then the
/// kubeconfig's current context and that context's namespace (as kubectl does).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KubeSettings {
    pub context: Option<String>,
    pub namespace: Option<String>,
}

/// A connection to one namespace of one cluster.
#[derive(Clone)]
pub struct Cluster {
    pub client: kube::Client,
    pub namespace: String,
    pub context: String,
}

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("cannot read a kubeconfig ({0}); set KUBECONFIG or create ~/.kube/config")]
    NoKubeconfig(String),
    #[error("the kubeconfig has no current context; say which with --context (contexts: {0})")]
    NoContext(String),
    #[error("no context `{name}` in the kubeconfig (contexts: {known})")]
    UnknownContext { name: String, known: String },
    #[error("context `{context}`: {message}")]
    Config { context: String, message: String },
    #[error(
        "no namespace `{namespace}` in context `{context}` (`kubectl get namespaces` lists them)"
    )]
    UnknownNamespace { namespace: String, context: String },
    #[error("cannot reach the cluster of context `{context}`: {message}")]
    Unreachable { context: String, message: String },
    #[error("forbidden: devloop needs `{verb}` on `{resource}` in namespace `{namespace}` (docs/KUBERNETES.md has a Role that grants what devloop uses); the API server said: {message}")]
    Forbidden {
        verb: String,
        resource: String,
        namespace: String,
        message: String,
    },
    #[error("{what}: {message}")]
    Api { what: String, message: String },
}

impl Cluster {
    /// Connects to the context and namespace the settings name and checks both exist.
    pub async fn connect(settings: &KubeSettings) -> Result<Cluster, KubeError> {
        let kubeconfig = Kubeconfig::read().map_err(|e| KubeError::NoKubeconfig(e.to_string()))?;
        let known = || {
            let names: Vec<&str> = kubeconfig
                .contexts
                .iter()
                .map(|c| c.name.as_str())
                .collect();
            if names.is_empty() {
                "none".to_string()
            } else {
                names.join(", ")
            }
        };
        let context = match settings
            .context
            .clone()
            .or_else(|| kubeconfig.current_context.clone())
        {
            Some(c) => c,
            None => return Err(KubeError::NoContext(known())),
        };
        if !kubeconfig.contexts.iter().any(|c| c.name == context) {
            return Err(KubeError::UnknownContext {
                name: context,
                known: known(),
            });
        }
        let options = KubeConfigOptions {
            context: Some(context.clone()),
            ..Default::default()
        };
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &options)
            .await
            .map_err(|e| KubeError::Config {
                context: context.clone(),
                message: e.to_string(),
            })?;
        let namespace = settings
            .namespace
            .clone()
            .unwrap_or_else(|| config.default_namespace.clone());
        let client = client_with_nodelay(config).map_err(|e| KubeError::Config {
            context: context.clone(),
            message: e.to_string(),
        })?;
        let cluster = Cluster {
            client,
            namespace,
            context,
        };
        cluster.check_namespace().await?;
        Ok(cluster)
    }

    /// A missing namespace is named; a user who may not read namespaces (a namespaced Role)
    /// is not stopped here: the first real request tells.
    async fn check_namespace(&self) -> Result<(), KubeError> {
        let path = format!("/api/v1/namespaces/{}", self.namespace);
        match self.get_json(&path).await {
            Ok(_) => Ok(()),
            Err(e) => match status_of(&e) {
                Some(404) => Err(KubeError::UnknownNamespace { namespace: self.namespace.clone(), context: self.context.clone() }),
                Some(401) => Err(KubeError::Unreachable { context: self.context.clone(), message: format!("the API server refused the context's credentials (401: expired or wrong?): {e}") }),
                // 403 (may not read namespaces) and the rest: the first real request says more.
                Some(_) => Ok(()),
                None => Err(KubeError::Unreachable { context: self.context.clone(), message: e.to_string() }),
            },
        }
    }

    /// GET of any API path, as JSON (no typed round trip: fields this client's types do
    /// not know survive a read-modify-write).
    pub async fn get_json(&self, path: &str) -> Result<serde_json::Value, kube::Error> {
        let req = http::Request::get(path)
            .body(Vec::new())
            .map_err(kube::Error::HttpError)?;
        self.client.request::<serde_json::Value>(req).await
    }

    /// GET that maps 404 to None.
    pub async fn get_opt(&self, path: &str) -> Result<Option<serde_json::Value>, kube::Error> {
        match self.get_json(path).await {
            Ok(v) => Ok(Some(v)),
            Err(e) if status_of(&e) == Some(404) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// A JSON patch (RFC 6902) of any API path.
    pub async fn json_patch(
        &self,
        path: &str,
        ops: &serde_json::Value,
    ) -> Result<serde_json::Value, kube::Error> {
        let req = http::Request::patch(path)
            .header(http::header::CONTENT_TYPE, "application/json-patch+json")
            .body(serde_json::to_vec(ops).map_err(kube::Error::SerdeError)?)
            .map_err(kube::Error::HttpError)?;
        self.client.request::<serde_json::Value>(req).await
    }

    pub async fn post_json(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<serde_json::Value, kube::Error> {
        let req = http::Request::post(path)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(serde_json::to_vec(body).map_err(kube::Error::SerdeError)?)
            .map_err(kube::Error::HttpError)?;
        self.client.request::<serde_json::Value>(req).await
    }

    /// DELETE that treats "already gone" as done.
    pub async fn delete(&self, path: &str) -> Result<(), kube::Error> {
        let req = http::Request::delete(path)
            .body(Vec::new())
            .map_err(kube::Error::HttpError)?;
        match self.client.request::<serde_json::Value>(req).await {
            Ok(_) => Ok(()),
            Err(e) if status_of(&e) == Some(404) => Ok(()),
            Err(e) => Err(e),
        }
    }

    pub fn path(&self, group_version: &str, resource: &str, name: Option<&str>) -> String {
        let base = if group_version == "v1" {
            "/api/v1".to_string()
        } else {
            format!("/apis/{group_version}")
        };
        match name {
            Some(n) => format!("{base}/namespaces/{}/{resource}/{n}", self.namespace),
            None => format!("{base}/namespaces/{}/{resource}", self.namespace),
        }
    }

    /// Turns an API error into one that says what devloop was doing; a 403 names the verb
    /// and the resource, so the user knows which permission to ask for.
    pub fn err(
        &self,
        e: kube::Error,
        verb: &str,
        resource: &str,
        what: impl Into<String>,
    ) -> KubeError {
        match &e {
            kube::Error::Api(s) if s.code == 403 => KubeError::Forbidden {
                verb: verb.into(),
                resource: resource.into(),
                namespace: self.namespace.clone(),
                message: s.message.clone(),
            },
            kube::Error::Api(s) => KubeError::Api {
                what: what.into(),
                message: s.message.clone(),
            },
            _ => KubeError::Api {
                what: what.into(),
                message: e.to_string(),
            },
        }
    }
}

/// kube's client with TCP_NODELAY on its connections to the API server. kube's default
/// connector leaves Nagle on: small port-forward messages then wait for the server's delayed
/// ACK, which put a 44 ms p99 on requests through an intercept. A config with a proxy keeps
/// kube's default stack, which knows proxies.
fn client_with_nodelay(config: kube::Config) -> Result<kube::Client, kube::Error> {
    use kube::client::ConfigExt;
    if config.proxy_url.is_some() {
        return kube::Client::try_from(config);
    }
    let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    let https = config.rustls_https_connector_with_connector(http)?;
    let service = tower::ServiceBuilder::new()
        .layer(config.base_uri_layer())
        .option_layer(config.auth_layer()?)
        .layer(config.extra_headers_layer()?)
        .map_err(tower::BoxError::from)
        .service(
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build(https),
        );
    Ok(kube::Client::new(service, config.default_namespace))
}

/// What devloop's Kubernetes commands use in a namespace: (API group, resource,
/// subresource, verb). docs/kubernetes-role.yaml grants exactly these; `doctor` checks them.
pub const PERMISSIONS: &[(&str, &str, &str, &str)] = &[
    ("apps", "deployments", "", "get"),
    ("apps", "deployments", "", "list"),
    ("apps", "deployments", "", "patch"),
    ("", "services", "", "get"),
    ("", "secrets", "", "create"),
    ("", "secrets", "", "delete"),
    ("", "serviceaccounts", "", "create"),
    ("", "serviceaccounts", "", "delete"),
    ("", "serviceaccounts", "", "list"),
    ("rbac.authorization.k8s.io", "roles", "", "create"),
    ("rbac.authorization.k8s.io", "roles", "", "delete"),
    ("rbac.authorization.k8s.io", "rolebindings", "", "create"),
    ("rbac.authorization.k8s.io", "rolebindings", "", "delete"),
    ("", "pods", "", "list"),
    ("", "pods", "portforward", "get"),
    ("", "pods", "portforward", "create"),
    // deploy, history, rollback
    ("apps", "deployments", "", "create"),
    ("", "services", "", "create"),
    ("apps", "replicasets", "", "list"),
    ("", "events", "", "list"),
    ("", "pods", "log", "get"),
    // intercept: the laptop's environment from the Secrets and ConfigMaps the container uses
    ("", "secrets", "", "get"),
    ("", "configmaps", "", "get"),
    // deploy: what the pod refers to, created from the manifests with the service
    ("", "configmaps", "", "create"),
    ("", "persistentvolumeclaims", "", "create"),
];

impl Cluster {
    /// Asks the API server whether this user may do `verb` on the resource in the namespace
    /// (a SelfSubjectAccessReview, which every authenticated user may create).
    pub async fn can(
        &self,
        group: &str,
        resource: &str,
        subresource: &str,
        verb: &str,
    ) -> Result<bool, kube::Error> {
        let review = serde_json::json!({
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SelfSubjectAccessReview",
            "spec": {"resourceAttributes": {
                "namespace": self.namespace, "verb": verb, "group": group,
                "resource": resource, "subresource": subresource,
            }},
        });
        let answer = self
            .post_json(
                "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews",
                &review,
            )
            .await?;
        Ok(answer["status"]["allowed"].as_bool().unwrap_or(false))
    }

    /// The permissions of [`PERMISSIONS`] this user lacks, as `verb resource` strings.
    pub async fn missing_permissions(&self) -> Result<Vec<String>, kube::Error> {
        let mut missing = Vec::new();
        for (group, resource, sub, verb) in PERMISSIONS {
            if !self.can(group, resource, sub, verb).await? {
                let what = if sub.is_empty() {
                    resource.to_string()
                } else {
                    format!("{resource}/{sub}")
                };
                missing.push(format!("{verb} {what}"));
            }
        }
        Ok(missing)
    }
}

pub fn status_of(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(s) => Some(s.code),
        _ => None,
    }
}

/// `a/b` -> `a~1b`: a key as one JSON-pointer token (RFC 6901).
pub fn pointer_token(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pointer_tokens_escape_slash_and_tilde() {
        assert_eq!(
            pointer_token("devloop.dev/intercept"),
            "devloop.dev~1intercept"
        );
        assert_eq!(pointer_token("a~b"), "a~0b");
    }
}
