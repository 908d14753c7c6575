//! A client of an image registry's HTTP API (OCI distribution v2): push layers, configs and
//! manifests, skipping a blob the registry already holds, and read an image's config. Used by
//! deploy's snapshots and by the agent's image on Kubernetes; where the registry is comes
//! from the back end (`backend::k8s::registry`).

use sha2::Digest;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";

/// A registry refused or could not be reached.
#[derive(Debug, thiserror::Error)]
#[error("registry {registry}: {message}")]
pub struct PushError {
    pub registry: String,
    pub message: String,
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
    pub fn new(registry: &str) -> Result<Pusher, PushError> {
        // Like Docker: plain HTTP only for a registry on this machine's loopback.
        let scheme = if is_loopback_host(registry) {
            "http"
        } else {
            "https"
        };
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(4)
            .build()
            .map_err(|e| PushError {
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

    fn err(&self, message: impl Into<String>) -> PushError {
        PushError {
            registry: self.registry.clone(),
            message: message.into(),
        }
    }

    /// Sends a request, answering one authentication challenge (Basic, or a Bearer token
    /// fetched from the realm with the Docker credentials) if the registry asks.
    async fn send(
        &self,
        make: impl Fn() -> reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, PushError> {
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
    pub async fn blob_size(&self, repo: &str, digest: &str) -> Result<Option<u64>, PushError> {
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
    pub async fn has_manifest(&self, repo: &str, tag: &str) -> Result<bool, PushError> {
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
    ) -> Result<(), PushError> {
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
    pub async fn put_blob(&self, repo: &str, bytes: &[u8]) -> Result<bool, PushError> {
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
    ) -> Result<(), PushError> {
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
    ) -> Result<PushReport, PushError> {
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
    ) -> Result<serde_json::Value, PushError> {
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
