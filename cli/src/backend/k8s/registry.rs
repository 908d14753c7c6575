//! Getting images to a cluster with no manual step: find the registry (devloop.toml or
//! DEVLOOP_REGISTRY, else the one the cluster advertises in the `local-registry-hosting`
//! ConfigMap of `kube-public`, KEP-1755, as kind, k3d and minikube set-ups publish), then push
//! layers straight to its HTTP API (OCI distribution): a blob the registry already holds is
//! not sent again, so pushing the agent or a one-file snapshot layer costs one small upload.
//! Without a registry, the image is loaded with the tool the context belongs to (kind, k3d,
//! minikube), see [`load_command`].

use serde::Deserialize;
use sha2::Digest;

use super::Cluster;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";

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
    #[error("registry {registry}: {message}")]
    Push { registry: String, message: String },
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

/// One layer: an uncompressed tar, as OCI allows (no time spent compressing a layer that
/// crosses a local network once).
pub struct Layer {
    pub tar: Vec<u8>,
}

pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{:x}", sha2::Sha256::digest(bytes))
}

/// What a push did, for the user's line and the benchmark.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PushReport {
    pub blobs_sent: usize,
    pub blobs_present: usize,
    pub bytes_sent: u64,
}

/// A client of one registry's HTTP API (distribution v2), with the user's Docker credentials
/// when it asks for them.
pub struct Pusher {
    http: reqwest::Client,
    base: String,
    registry: String,
    basic: Option<String>,
    bearer: tokio::sync::Mutex<Option<String>>,
}

fn is_loopback_host(host: &str) -> bool {
    let name = host.rsplit_once(':').map(|(h, _)| h).unwrap_or(host);
    name == "localhost" || name.starts_with("127.") || name == "[::1]"
}

/// `auths.HOST.auth` of ~/.docker/config.json (base64 of user:password), if present.
fn docker_basic_auth(registry: &str) -> Option<String> {
    let dir = std::env::var_os("DOCKER_CONFIG")
        .map(std::path::PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".docker"))
        })?;
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).ok()?).ok()?;
    let auths = v["auths"].as_object()?;
    auths
        .iter()
        .find(|(k, _)| {
            k.trim_start_matches("https://")
                .trim_start_matches("http://")
                .trim_end_matches('/')
                == registry
        })
        .and_then(|(_, a)| a["auth"].as_str().map(String::from))
}

impl Pusher {
    pub fn new(registry: &str) -> Result<Pusher, RegistryError> {
        // Like Docker: plain HTTP only for a registry on this machine's loopback.
        let scheme = if is_loopback_host(registry) {
            "http"
        } else {
            "https"
        };
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(4)
            .build()
            .map_err(|e| RegistryError::Push {
                registry: registry.into(),
                message: e.to_string(),
            })?;
        Ok(Pusher {
            http,
            base: format!("{scheme}://{registry}"),
            registry: registry.into(),
            basic: docker_basic_auth(registry),
            bearer: Default::default(),
        })
    }

    fn err(&self, message: impl Into<String>) -> RegistryError {
        RegistryError::Push {
            registry: self.registry.clone(),
            message: message.into(),
        }
    }

    /// Sends a request, answering one authentication challenge (Basic, or a Bearer token
    /// fetched from the realm with the Docker credentials) if the registry asks.
    async fn send(
        &self,
        make: impl Fn() -> reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, RegistryError> {
        let with_auth =
            |rb: reqwest::RequestBuilder, bearer: &Option<String>| match (bearer, &self.basic) {
                (Some(t), _) => rb.bearer_auth(t),
                (None, Some(b)) => rb.header(reqwest::header::AUTHORIZATION, format!("Basic {b}")),
                (None, None) => rb,
            };
        let bearer = self.bearer.lock().await.clone();
        let resp = with_auth(make(), &bearer)
            .send()
            .await
            .map_err(|e| self.err(format!("{e}")))?;
        if resp.status() != reqwest::StatusCode::UNAUTHORIZED {
            return Ok(resp);
        }
        let challenge = resp
            .headers()
            .get(reqwest::header::WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let Some(params) = challenge.strip_prefix("Bearer ") else {
            return Err(self.err("unauthorized; log in with `docker login` (devloop reads ~/.docker/config.json; credential helpers are not supported yet)"));
        };
        let get = |key: &str| {
            params.split(',').find_map(|kv| {
                let (k, v) = kv.trim().split_once('=')?;
                (k == key).then(|| v.trim_matches('"').to_string())
            })
        };
        let realm = get("realm").ok_or_else(|| self.err("a Bearer challenge without a realm"))?;
        let mut q = Vec::new();
        if let Some(s) = get("service") {
            q.push(("service", s));
        }
        if let Some(s) = get("scope") {
            q.push(("scope", s));
        }
        let mut rb = self.http.get(&realm).query(&q);
        if let Some(b) = &self.basic {
            rb = rb.header(reqwest::header::AUTHORIZATION, format!("Basic {b}"));
        }
        let tok: serde_json::Value = rb
            .send()
            .await
            .map_err(|e| self.err(format!("token from {realm}: {e}")))?
            .bytes()
            .await
            .map_err(|e| self.err(format!("token from {realm}: {e}")))
            .and_then(|b| {
                serde_json::from_slice(&b).map_err(|e| self.err(format!("token from {realm}: {e}")))
            })?;
        let token = tok["token"]
            .as_str()
            .or(tok["access_token"].as_str())
            .map(String::from);
        *self.bearer.lock().await = token.clone();
        with_auth(make(), &token)
            .send()
            .await
            .map_err(|e| self.err(format!("{e}")))
    }

    /// The size of a blob the registry holds in `repo`, or None when it has none.
    pub async fn blob_size(&self, repo: &str, digest: &str) -> Result<Option<u64>, RegistryError> {
        let head = self
            .send(|| {
                self.http
                    .head(format!("{}/v2/{repo}/blobs/{digest}", self.base))
            })
            .await?;
        if !head.status().is_success() {
            return Ok(None);
        }
        let size = head
            .headers()
            .get(reqwest::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| {
                self.err(format!(
                    "{repo}@{digest}: a HEAD answer without Content-Length"
                ))
            })?;
        Ok(Some(size))
    }

    /// True when REPO:TAG exists (a manifest under that tag).
    pub async fn has_manifest(&self, repo: &str, tag: &str) -> Result<bool, RegistryError> {
        let head = self
            .send(|| {
                self.http
                    .head(format!("{}/v2/{repo}/manifests/{tag}", self.base))
                    .header(reqwest::header::ACCEPT, OCI_MANIFEST)
            })
            .await?;
        Ok(head.status().is_success())
    }

    /// Uploads a blob in one request (the registry checks `digest`).
    pub async fn upload_blob(
        &self,
        repo: &str,
        digest: &str,
        body: bytes::Bytes,
    ) -> Result<(), RegistryError> {
        let start = self
            .send(|| {
                self.http
                    .post(format!("{}/v2/{repo}/blobs/uploads/", self.base))
            })
            .await?;
        if start.status() != reqwest::StatusCode::ACCEPTED {
            return Err(self.err(format!("starting an upload to {repo}: {}", start.status())));
        }
        let location = start
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| self.err("upload answer without a Location"))?
            .to_string();
        let url = if location.starts_with("http://") || location.starts_with("https://") {
            location
        } else {
            format!("{}{location}", self.base)
        };
        let sep = if url.contains('?') { '&' } else { '?' };
        let url = format!("{url}{sep}digest={digest}");
        // Bytes: the retry after an auth challenge shares the buffer instead of copying it.
        let put = self
            .send(|| {
                self.http
                    .put(&url)
                    .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
                    .body(body.clone())
            })
            .await?;
        if put.status() != reqwest::StatusCode::CREATED {
            let status = put.status();
            let text = put.text().await.unwrap_or_default();
            return Err(self.err(format!("uploading {digest} to {repo}: {status} {text}")));
        }
        Ok(())
    }

    /// Uploads a blob unless the registry has it. Ok(true) when it was sent.
    pub async fn put_blob(&self, repo: &str, bytes: &[u8]) -> Result<bool, RegistryError> {
        let digest = sha256_digest(bytes);
        if self.blob_size(repo, &digest).await?.is_some() {
            return Ok(false);
        }
        self.upload_blob(repo, &digest, bytes::Bytes::copy_from_slice(bytes))
            .await?;
        Ok(true)
    }

    /// Tags an image whose blobs are all in `repo`: the OCI manifest of `config` and `layers`
    /// (bottom first) put as REPO:TAG.
    pub async fn put_manifest(
        &self,
        repo: &str,
        tag: &str,
        config: &Descriptor,
        layers: &[Descriptor],
    ) -> Result<(), RegistryError> {
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": config.digest, "size": config.size},
            "layers": layers.iter().map(|l| serde_json::json!({"mediaType": OCI_LAYER_TAR, "digest": l.digest, "size": l.size})).collect::<Vec<_>>(),
        });
        let body =
            bytes::Bytes::from(serde_json::to_vec(&manifest).map_err(|e| self.err(e.to_string()))?);
        let resp = self
            .send(|| {
                self.http
                    .put(format!("{}/v2/{repo}/manifests/{tag}", self.base))
                    .header(reqwest::header::CONTENT_TYPE, OCI_MANIFEST)
                    .body(body.clone())
            })
            .await?;
        if resp.status() != reqwest::StatusCode::CREATED {
            let status = resp.status();
            let text = resp.text().await.unwrap_or_default();
            return Err(self.err(format!(
                "pushing the manifest of {repo}:{tag}: {status} {text}"
            )));
        }
        Ok(())
    }

    /// Pushes an image made of `layers` (bottom first) and `config` (the OCI image config,
    /// whose rootfs.diff_ids must list the layers) as REPO:TAG. Returns what was sent.
    pub async fn push_image(
        &self,
        repo: &str,
        tag: &str,
        layers: &[Layer],
        config: &serde_json::Value,
    ) -> Result<PushReport, RegistryError> {
        let mut report = PushReport::default();
        let mut descriptors = Vec::new();
        for l in layers {
            report.count(self.put_blob(repo, &l.tar).await?, l.tar.len());
            descriptors.push(Descriptor {
                digest: sha256_digest(&l.tar),
                size: l.tar.len() as u64,
            });
        }
        let config_bytes = serde_json::to_vec(config).map_err(|e| self.err(e.to_string()))?;
        report.count(
            self.put_blob(repo, &config_bytes).await?,
            config_bytes.len(),
        );
        let config = Descriptor {
            digest: sha256_digest(&config_bytes),
            size: config_bytes.len() as u64,
        };
        self.put_manifest(repo, tag, &config, &descriptors).await?;
        Ok(report)
    }
}

impl Pusher {
    /// The image config (OCI/Docker JSON) of REPO:REFERENCE, following a multi-platform
    /// index to its linux/amd64 manifest.
    pub async fn image_config(
        &self,
        repo: &str,
        reference: &str,
    ) -> Result<serde_json::Value, RegistryError> {
        const ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json";
        let get_json = |url: String, accept: &'static str| async move {
            let resp = self
                .send(|| self.http.get(&url).header(reqwest::header::ACCEPT, accept))
                .await?;
            if !resp.status().is_success() {
                return Err(self.err(format!("GET {url}: {}", resp.status())));
            }
            let bytes = resp.bytes().await.map_err(|e| self.err(e.to_string()))?;
            serde_json::from_slice::<serde_json::Value>(&bytes)
                .map_err(|e| self.err(format!("{url}: {e}")))
        };
        let mut manifest = get_json(
            format!("{}/v2/{repo}/manifests/{reference}", self.base),
            ACCEPT,
        )
        .await?;
        if let Some(list) = manifest["manifests"].as_array() {
            let pick = list
                .iter()
                .find(|m| {
                    m["platform"]["os"] == "linux" && m["platform"]["architecture"] == "amd64"
                })
                .and_then(|m| m["digest"].as_str())
                .ok_or_else(|| self.err(format!("{repo}:{reference} has no linux/amd64 image")))?
                .to_string();
            manifest =
                get_json(format!("{}/v2/{repo}/manifests/{pick}", self.base), ACCEPT).await?;
        }
        let digest = manifest["config"]["digest"]
            .as_str()
            .ok_or_else(|| self.err(format!("{repo}:{reference}: a manifest without a config")))?
            .to_string();
        get_json(format!("{}/v2/{repo}/blobs/{digest}", self.base), "*/*").await
    }
}

/// An image reference split as a registry sees it: (registry host, repository, tag or
/// digest). Docker Hub's short names get its host and `library/`.
pub fn parse_reference(image: &str) -> (String, String, String) {
    let (name, reference) = match image.split_once('@') {
        Some((n, d)) => (n, d.to_string()),
        None => match image.rsplit_once(':') {
            Some((n, t)) if !t.contains('/') => (n, t.to_string()),
            _ => (image, "latest".to_string()),
        },
    };
    let (host, repo) = match name.split_once('/') {
        Some((h, r)) if h.contains('.') || h.contains(':') || h == "localhost" => {
            (h.to_string(), r.to_string())
        }
        _ => (
            "registry-1.docker.io".to_string(),
            if name.contains('/') {
                name.to_string()
            } else {
                format!("library/{name}")
            },
        ),
    };
    (host, repo, reference)
}

/// A blob as a manifest names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Descriptor {
    /// `sha256:HEX`.
    pub digest: String,
    pub size: u64,
}

impl PushReport {
    /// Counts one blob: sent (with its size) or already present.
    pub fn count(&mut self, sent: bool, size: usize) {
        if sent {
            self.blobs_sent += 1;
            self.bytes_sent += size as u64;
        } else {
            self.blobs_present += 1;
        }
    }
}

/// A one-file layer: `name` at the root of the image with `mode`, owned by root, mtime 0
/// (so the same content always makes the same digest).
pub fn one_file_layer(name: &str, mode: u32, content: &[u8]) -> std::io::Result<Layer> {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(content.len() as u64);
    h.set_mode(mode);
    h.set_mtime(0);
    h.set_uid(0);
    h.set_gid(0);
    h.set_entry_type(tar::EntryType::Regular);
    b.append_data(&mut h, name, content)?;
    Ok(Layer {
        tar: b.into_inner()?,
    })
}

/// The OCI config of a linux/amd64 image with these layers and this entry point.
pub fn image_config(layers: &[Layer], entrypoint: &[&str]) -> serde_json::Value {
    serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Entrypoint": entrypoint},
        "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|l| sha256_digest(&l.tar)).collect::<Vec<_>>()},
    })
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

    #[test]
    fn references_split_like_docker_does() {
        let p = |s: &str| parse_reference(s);
        assert_eq!(
            p("127.0.0.1:5000/shop/api:1"),
            ("127.0.0.1:5000".into(), "shop/api".into(), "1".into())
        );
        assert_eq!(
            p("localhost/api"),
            ("localhost".into(), "api".into(), "latest".into())
        );
        assert_eq!(
            p("python:3.11"),
            (
                "registry-1.docker.io".into(),
                "library/python".into(),
                "3.11".into()
            )
        );
        assert_eq!(
            p("team/app"),
            (
                "registry-1.docker.io".into(),
                "team/app".into(),
                "latest".into()
            )
        );
        assert_eq!(
            p("reg.io/a@sha256:00"),
            ("reg.io".into(), "a".into(), "sha256:00".into())
        );
    }

    #[test]
    fn loopback_registries_use_plain_http() {
        assert!(is_loopback_host("127.0.0.1:5000"));
        assert!(is_loopback_host("localhost:5001"));
        assert!(!is_loopback_host("registry.example.com"));
        assert!(!is_loopback_host("10.0.0.1:5000"));
    }

    #[test]
    fn layers_are_deterministic_and_configs_list_them() {
        let a = one_file_layer("devloop-agent", 0o755, b"binary").unwrap();
        let b = one_file_layer("devloop-agent", 0o755, b"binary").unwrap();
        assert_eq!(sha256_digest(&a.tar), sha256_digest(&b.tar));
        let c = image_config(&[a], &["/devloop-agent"]);
        assert_eq!(c["rootfs"]["diff_ids"][0], sha256_digest(&b.tar));
        assert_eq!(c["config"]["Entrypoint"][0], "/devloop-agent");
    }
}
