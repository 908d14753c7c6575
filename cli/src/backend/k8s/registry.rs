//! Getting images to a cluster with no manual step: find the registry (devloop.toml or
//! DEVLOOP_REGISTRY, else the one the cluster advertises in the `local-registry-hosting`
//! ConfigMap of `kube-public`, KEP-1755, as kind, k3d and minikube set-ups publish), then push
//! layers straight to its HTTP API (OCI distribution): a blob the registry already holds is
//! not sent again, so pushing the agent or a one-file snapshot layer costs one small upload.
//! Without a registry, the image is loaded with the tool the context belongs to (kind, k3d,
//! minikube), see [`load_command`].

use serde::Deserialize;

use super::Cluster;
pub use crate::oci::{parse_reference, Pusher};

/// A registry as devloop pushes to it and as the cluster's nodes pull from it (the two
/// differ for a registry in a container beside a kind cluster: localhost:5001 vs kind-registry:5000).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registry {
    pub push: String,
    pub pull: String,
    /// Where the setting came from, for errors and `doctor`.
    pub source: String,
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("no image registry for context `{context}`: the cluster advertises none (ConfigMap kube-public/local-registry-hosting) and the context is not a kind, k3d or minikube one; set `registry = \"HOST:PORT\"` under [target] in devloop.toml (or DEVLOOP_REGISTRY), a registry the cluster's nodes can pull from")]
    None { context: String },
}

/// The KEP-1755 document (`localRegistryHosting.v1`).
#[derive(Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
struct LocalRegistryHosting {
    host: Option<String>,
    host_from_container_runtime: Option<String>,
    host_from_cluster_network: Option<String>,
}

/// Reads the ConfigMap's document into a registry; None when it names no host.
pub fn parse_local_registry_hosting(doc: &str) -> Option<Registry> {
    let v: LocalRegistryHosting = serde_yaml_ng::from_str(doc).ok()?;
    let push = v.host.filter(|h| !h.is_empty())?;
    let pull = v
        .host_from_container_runtime
        .or(v.host_from_cluster_network)
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| push.clone());
    Some(Registry {
        push,
        pull,
        source: "ConfigMap kube-public/local-registry-hosting".into(),
    })
}

/// The registry to use: configured, else advertised by the cluster.
pub async fn discover(
    cluster: &Cluster,
    configured: Option<&str>,
) -> Result<Option<Registry>, super::KubeError> {
    if let Ok(r) = std::env::var("DEVLOOP_REGISTRY") {
        if !r.is_empty() {
            return Ok(Some(Registry {
                push: r.clone(),
                pull: r,
                source: "DEVLOOP_REGISTRY".into(),
            }));
        }
    }
    if let Some(r) = configured {
        return Ok(Some(Registry {
            push: r.into(),
            pull: r.into(),
            source: "[target] registry in devloop.toml".into(),
        }));
    }
    match cluster
        .get_opt("/api/v1/namespaces/kube-public/configmaps/local-registry-hosting")
        .await
    {
        Ok(Some(cm)) => Ok(cm["data"]["localRegistryHosting.v1"]
            .as_str()
            .and_then(parse_local_registry_hosting)),
        Ok(None) => Ok(None),
        // Reading kube-public is allowed to every authenticated user by default; a cluster
        // that forbids it simply advertises nothing to this user.
        Err(e) if super::status_of(&e) == Some(403) => Ok(None),
        Err(e) => Err(cluster.err(
            e,
            "get",
            "configmaps (kube-public)",
            "reading the advertised registry",
        )),
    }
}

/// How images reach the cluster: pushed to a registry, or (a kind, k3d or minikube cluster
/// with none) loaded from the local engine with that tool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageRoute {
    Registry(Registry),
    /// Images are loaded with [`load_command`] for this context.
    Load {
        context: String,
    },
}

/// The registry if there is one, else the local cluster tool's load, else the error that
/// names the setting to add.
pub async fn route(cluster: &Cluster, configured: Option<&str>) -> anyhow::Result<ImageRoute> {
    if let Some(r) = discover(cluster, configured).await? {
        return Ok(ImageRoute::Registry(r));
    }
    if load_command(&cluster.context, "x").is_some() {
        return Ok(ImageRoute::Load {
            context: cluster.context.clone(),
        });
    }
    Err(RegistryError::None {
        context: cluster.context.clone(),
    }
    .into())
}

/// Loads an image of the local engine into the context's cluster with its tool.
pub async fn load_into_cluster(context: &str, image: &str) -> anyhow::Result<()> {
    let cmd = load_command(context, image).ok_or_else(|| RegistryError::None {
        context: context.into(),
    })?;
    let out = tokio::process::Command::new(&cmd[0])
        .args(&cmd[1..])
        .output()
        .await
        .map_err(|e| anyhow::anyhow!("`{}` cannot run ({e}); context `{context}` has no registry, so devloop loads images with it: install it, or give the cluster a registry (`registry` under [target])", cmd[0]))?;
    if !out.status.success() {
        anyhow::bail!(
            "`{}` failed: {}",
            cmd.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The command that loads a `docker save` archive into a local cluster without a registry,
/// judged from the context's name as each tool names its contexts. None: not such a cluster.
pub fn load_command(context: &str, image: &str) -> Option<Vec<String>> {
    let s = |v: &[&str]| Some(v.iter().map(|x| x.to_string()).collect());
    if let Some(cluster) = context.strip_prefix("kind-") {
        s(&["kind", "load", "docker-image", image, "--name", cluster])
    } else if let Some(cluster) = context.strip_prefix("k3d-") {
        s(&["k3d", "image", "import", image, "--cluster", cluster])
    } else if context == "minikube" {
        s(&["minikube", "image", "load", image])
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_kep_1755_document() {
        let doc = "host: \"localhost:5001\"\nhostFromContainerRuntime: \"kind-registry:5000\"\nhelp: \"https://kind.sigs.k8s.io/docs/user/local-registry/\"\n";
        assert_eq!(
            parse_local_registry_hosting(doc),
            Some(Registry {
                push: "localhost:5001".into(),
                pull: "kind-registry:5000".into(),
                source: "ConfigMap kube-public/local-registry-hosting".into()
            })
        );
        let only_host = "host: \"127.0.0.1:5000\"\n";
        assert_eq!(
            parse_local_registry_hosting(only_host).map(|r| r.pull),
            Some("127.0.0.1:5000".into())
        );
        assert_eq!(parse_local_registry_hosting("help: x\n"), None);
        assert_eq!(parse_local_registry_hosting(": not yaml ["), None);
    }

    #[test]
    fn load_commands_per_local_cluster_tool() {
        assert_eq!(
            load_command("kind-dev", "img:1").unwrap().join(" "),
            "kind load docker-image img:1 --name dev"
        );
        assert_eq!(
            load_command("k3d-team", "img:1").unwrap().join(" "),
            "k3d image import img:1 --cluster team"
        );
        assert_eq!(
            load_command("minikube", "img:1").unwrap().join(" "),
            "minikube image load img:1"
        );
        assert_eq!(load_command("prod-eu", "img:1"), None);
    }
}
