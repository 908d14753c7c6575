//! The Docker target: dev containers that run the service under the agent, with the synced
//! tree in a volume, on a project network where each container answers to its service name.

use bollard::exec::{CreateExecOptions, StartExecResults};
use bollard::models::{
    ContainerCreateBody, ContainerSummary, EndpointSettings, HostConfig, Mount, MountType,
    NetworkCreateRequest, NetworkingConfig, PortBinding, VolumeCreateRequest,
};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, ListContainersOptionsBuilder, ListNetworksOptionsBuilder,
    ListVolumesOptionsBuilder, RemoveContainerOptionsBuilder, StopContainerOptionsBuilder,
    UploadToContainerOptionsBuilder,
};
use bollard::Docker;
use futures_util::StreamExt;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use super::engine::EngineChoice;
use super::labels;
use crate::agent_link::Transport;
use crate::config::{Project, Service};

/// Where the agent binary and the session token go in every container.
pub const AGENT_DIR: &str = "/.devloop";
/// The agent binary comes from a shared read-only volume mounted here (one per agent
/// build), so starting a container copies only the token into it.
pub const AGENT_BIN_DIR: &str = "/.devloop/bin";
pub const AGENT_PATH: &str = "/.devloop/bin/devloop-agent";
pub const TOKEN_PATH: &str = "/.devloop/token";

#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    /// The engine's answer is part of the message, not a source of its own: an error
    /// printed with its chain (`{:#}`) would say it twice.
    #[error("docker: {action}: {cause}")]
    Api {
        action: String,
        cause: bollard::errors::Error,
    },
    #[error("{0}")]
    Other(String),
}

pub fn api(action: impl Into<String>) -> impl FnOnce(bollard::errors::Error) -> DockerError {
    let action = action.into();
    move |cause| DockerError::Api { action, cause }
}

pub fn network_name(project: &str) -> String {
    format!("devloop-{project}")
}
pub fn container_name(project: &str, service: &str) -> String {
    format!("devloop-{project}-{service}")
}
pub fn volume_name(project: &str, service: &str) -> String {
    format!("devloop-{project}-{service}-tree")
}

/// What `docker inspect` of an image tells devloop.
#[derive(Debug, Clone, Default)]
pub struct ImageFacts {
    pub id: String,
    pub cmd: Vec<String>,
    pub entrypoint: Vec<String>,
    pub workdir: Option<String>,
    /// `EXPOSE`d ports, lowest first.
    pub exposed: Vec<u16>,
    /// The image's HEALTHCHECK as a command to exec (`CMD` or `CMD-SHELL`), if it has one.
    pub healthcheck: Option<Vec<String>>,
}

pub async fn image_facts(docker: &Docker, image: &str) -> Result<ImageFacts, DockerError> {
    let i = docker
        .inspect_image(image)
        .await
        .map_err(api(format!("inspecting image {image}")))?;
    let cfg = i.config.unwrap_or_default();
    Ok(ImageFacts {
        id: i.id.unwrap_or_default(),
        cmd: cfg.cmd.unwrap_or_default(),
        entrypoint: cfg.entrypoint.unwrap_or_default(),
        workdir: cfg.working_dir.filter(|w| !w.is_empty()),
        healthcheck: cfg
            .healthcheck
            .as_ref()
            .and_then(|h| h.test.clone())
            .and_then(|test| match test.first().map(String::as_str) {
                Some("CMD") => Some(test[1..].to_vec()),
                Some("CMD-SHELL") => Some(vec!["/bin/sh".into(), "-c".into(), test[1..].join(" ")]),
                // "NONE" or empty: no health check.
                _ => None,
            }),
        exposed: {
            let mut ports: Vec<u16> = cfg
                .exposed_ports
                .unwrap_or_default()
                .iter()
                .filter(|p| !p.ends_with("/udp"))
                .filter_map(|p| p.split('/').next().and_then(|n| n.parse().ok()))
                .collect();
            ports.sort_unstable();
            ports
        },
    })
}

/// The settings of one dev container, resolved from the service and its image.
#[derive(Debug, Clone)]
pub struct DevSpec {
    pub project: String,
    pub service: String,
    pub image: String,
    pub argv: Vec<String>,
    pub workdir: String,
    pub root: String,
    pub has_sync: bool,
    pub env: Vec<String>,
    pub ports: Vec<crate::config::PortMapping>,
}

impl DevSpec {
    pub fn new(project: &Project, service: &Service, image: &str, facts: &ImageFacts) -> Self {
        // Docker's rule: overriding the entrypoint drops the image's cmd.
        let entrypoint = service
            .entrypoint
            .clone()
            .unwrap_or_else(|| facts.entrypoint.clone());
        let cmd = match (&service.command, &service.entrypoint) {
            (Some(c), _) => c.clone(),
            (None, Some(_)) => Vec::new(),
            (None, None) => facts.cmd.clone(),
        };
        let argv: Vec<String> = entrypoint.into_iter().chain(cmd).collect();
        let root = service
            .sync
            .as_ref()
            .map(|s| s.container_dir.clone())
            .unwrap_or_else(|| format!("{AGENT_DIR}/no-sync"));
        let workdir = service
            .workdir
            .clone()
            .or_else(|| facts.workdir.clone())
            .or_else(|| service.sync.as_ref().map(|s| s.container_dir.clone()))
            .unwrap_or_else(|| "/".into());
        DevSpec {
            project: project.name.clone(),
            service: service.name.clone(),
            image: if facts.id.is_empty() {
                image.to_string()
            } else {
                facts.id.clone()
            },
            argv,
            workdir,
            root,
            has_sync: service.sync.is_some(),
            env: service
                .environment
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect(),
            ports: service.ports.clone(),
        }
    }

    /// Changes to any of these settings recreate the container.
    pub fn hash(&self) -> String {
        let text = format!(
            "{}\0{:?}\0{}\0{}\0{}\0{:?}\0{:?}\0{} bin-volume",
            self.image,
            self.argv,
            self.workdir,
            self.root,
            self.has_sync,
            self.env,
            self.ports,
            // With the layout of /.devloop ("bin-volume"): a change recreates containers
            // made with the old one.
            devloop_proxy::CRATE_VERSION
        );
        devloop_proxy::tree::hex(&devloop_proxy::tree::hash_bytes(text.as_bytes()))[..16]
            .to_string()
    }

    fn agent_cmd(&self) -> Vec<String> {
        let mut cmd: Vec<String> = vec![
            "dev".into(),
            "--root".into(),
            self.root.clone(),
            "--listen".into(),
            format!("0.0.0.0:{}", devloop_proxy::AGENT_PORT),
            "--token-file".into(),
            TOKEN_PATH.into(),
            "--workdir".into(),
            self.workdir.clone(),
        ];
        if !self.argv.is_empty() {
            cmd.push("--".into());
            cmd.extend(self.argv.iter().cloned());
        }
        cmd
    }
}

/// The networks labelled with the project.
async fn project_networks(
    docker: &Docker,
    project: &str,
) -> Result<Vec<bollard::models::Network>, DockerError> {
    docker
        .list_networks(Some(
            ListNetworksOptionsBuilder::new()
                .filters(&labels::filter(&[(labels::PROJECT, project)]))
                .build(),
        ))
        .await
        .map_err(api("listing networks"))
}

pub async fn ensure_network(docker: &Docker, project: &str) -> Result<String, DockerError> {
    let name = network_name(project);
    let existing = project_networks(docker, project).await?;
    if existing
        .iter()
        .any(|n| n.name.as_deref() == Some(name.as_str()))
    {
        return Ok(name);
    }
    docker
        .create_network(NetworkCreateRequest {
            name: name.clone(),
            driver: Some("bridge".into()),
            labels: Some(labels::base(project)),
            ..Default::default()
        })
        .await
        .map_err(api(format!("creating network {name}")))?;
    Ok(name)
}

/// Containers of the project (all states), optionally of one kind.
pub async fn list_project_containers(
    docker: &Docker,
    project: &str,
    kind: Option<&str>,
) -> Result<Vec<ContainerSummary>, DockerError> {
    let mut pairs = vec![(labels::PROJECT, project)];
    if let Some(k) = kind {
        pairs.push((labels::KIND, k));
    }
    docker
        .list_containers(Some(
            ListContainersOptionsBuilder::new()
                .all(true)
                .filters(&labels::filter(&pairs))
                .build(),
        ))
        .await
        .map_err(api("listing containers"))
}

pub fn label<'a>(c: &'a ContainerSummary, key: &str) -> Option<&'a str> {
    c.labels
        .as_ref()
        .and_then(|l| l.get(key))
        .map(|s| s.as_str())
}

/// A listed container's name, without the leading `/`.
pub fn name_of(c: &ContainerSummary) -> String {
    c.names
        .as_ref()
        .and_then(|n| n.first())
        .map(|n| n.trim_start_matches('/').to_string())
        .unwrap_or_default()
}

pub fn is_running(c: &ContainerSummary) -> bool {
    c.state
        .as_ref()
        .map(|s| s.to_string() == "running")
        .unwrap_or(false)
}

/// What `ensure_dev_container` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ensured {
    Created,
    Started,
    AlreadyRunning,
}

/// Makes the service's dev container exist, match `spec` and run. Returns the container name.
pub async fn ensure_dev_container(
    docker: &Docker,
    spec: &DevSpec,
    agent_binary: &[u8],
    token_store: &crate::state::TokenStore,
) -> Result<(String, Ensured), DockerError> {
    let name = container_name(&spec.project, &spec.service);
    let hash = spec.hash();
    let existing = list_project_containers(docker, &spec.project, Some(labels::KIND_DEV)).await?;
    if let Some(c) = existing
        .iter()
        .find(|c| label(c, labels::SERVICE) == Some(spec.service.as_str()))
    {
        let id = c.id.clone().unwrap_or_default();
        let same = label(c, labels::SPEC_HASH) == Some(hash.as_str());
        if same && token_store.read(&name).is_some() {
            if is_running(c) {
                return Ok((name, Ensured::AlreadyRunning));
            }
            docker
                .start_container(&id, None)
                .await
                .map_err(api(format!("starting {name}")))?;
            return Ok((name, Ensured::Started));
        }
        tracing::info!(container = %name, "settings changed; recreating the dev container");
        remove_container(docker, &id).await?;
    }

    // A deployed version (and the relay holding its ports) gives way to the dev container.
    for c in list_project_containers(docker, &spec.project, None).await? {
        let kind = label(&c, labels::KIND);
        if label(&c, labels::SERVICE) == Some(spec.service.as_str())
            && (kind == Some(labels::KIND_DEPLOY) || kind == Some(labels::KIND_PORTS))
        {
            remove_container(docker, c.id.as_deref().unwrap_or_default()).await?;
        }
    }
    let placement = Placement {
        name: name.clone(),
        kind: labels::KIND_DEV,
        volume: spec.has_sync,
        publish: true,
        extra_labels: vec![(labels::SPEC_HASH.into(), hash)],
    };
    create_agent_container(docker, spec, &placement, agent_binary, token_store).await?;
    Ok((name, Ensured::Created))
}

/// How a container running the service under the agent is placed.
pub struct Placement {
    pub name: String,
    pub kind: &'static str,
    /// Mount the service's tree volume at the sync root (dev containers).
    pub volume: bool,
    /// Publish the service's host ports on this container (otherwise a relay holds them).
    pub publish: bool,
    pub extra_labels: Vec<(String, String)>,
}

/// Creates the container with the agent as its entry point, copies the agent and a fresh
/// token in, and starts it. Returns the container id.
pub async fn create_agent_container(
    docker: &Docker,
    spec: &DevSpec,
    placement: &Placement,
    agent_binary: &[u8],
    token_store: &crate::state::TokenStore,
) -> Result<String, DockerError> {
    let name = &placement.name;
    let network = ensure_network(docker, &spec.project).await?;
    let mut container_labels = labels::base(&spec.project);
    container_labels.insert(labels::SERVICE.into(), spec.service.clone());
    container_labels.insert(labels::KIND.into(), placement.kind.into());
    container_labels.insert(
        labels::AGENT_VERSION.into(),
        devloop_proxy::CRATE_VERSION.into(),
    );
    for (k, v) in &placement.extra_labels {
        container_labels.insert(k.clone(), v.clone());
    }

    let agent_volume = ensure_agent_volume(docker, agent_binary, false).await?;
    let mut mounts = vec![Mount {
        target: Some(AGENT_BIN_DIR.into()),
        source: Some(agent_volume),
        typ: Some(MountType::VOLUME),
        read_only: Some(true),
        ..Default::default()
    }];
    if placement.volume {
        let volume = volume_name(&spec.project, &spec.service);
        let mut vlabels = labels::base(&spec.project);
        vlabels.insert(labels::SERVICE.into(), spec.service.clone());
        docker
            .create_volume(VolumeCreateRequest {
                name: Some(volume.clone()),
                labels: Some(vlabels),
                ..Default::default()
            })
            .await
            .map_err(api(format!("creating volume {volume}")))?;
        mounts.push(Mount {
            target: Some(spec.root.clone()),
            source: Some(volume),
            typ: Some(MountType::VOLUME),
            ..Default::default()
        });
    }
    let mut exposed = Vec::new();
    for p in &spec.ports {
        exposed.push(format!("{}/tcp", p.container_port));
    }
    let port_bindings = if placement.publish {
        port_bindings(&spec.ports)
    } else {
        HashMap::new()
    };
    let mut endpoints = HashMap::new();
    endpoints.insert(
        network.clone(),
        EndpointSettings {
            aliases: Some(vec![spec.service.clone()]),
            ..Default::default()
        },
    );
    let body = ContainerCreateBody {
        image: Some(spec.image.clone()),
        entrypoint: Some(vec![AGENT_PATH.into()]),
        cmd: Some(spec.agent_cmd()),
        env: Some(spec.env.clone()),
        working_dir: Some(spec.workdir.clone()),
        labels: Some(container_labels),
        exposed_ports: Some(exposed),
        host_config: Some(HostConfig {
            init: Some(true),
            mounts: Some(mounts),
            port_bindings: Some(port_bindings),
            network_mode: Some(network.clone()),
            ..Default::default()
        }),
        networking_config: Some(NetworkingConfig {
            endpoints_config: Some(endpoints),
        }),
        ..Default::default()
    };
    let created = docker
        .create_container(
            Some(CreateContainerOptionsBuilder::new().name(name).build()),
            body,
        )
        .await
        .map_err(api(format!("creating container {name}")))?;

    let token = crate::state::new_token();
    token_store
        .write(name, &token)
        .map_err(|e| DockerError::Other(format!("saving the session token: {e}")))?;
    let owner = container_user(docker, &created.id).await?;
    upload_token(docker, &created.id, name, &token, owner).await?;
    if placement.volume && owner != (0, 0) {
        give_dir_to(docker, &created.id, &spec.root, owner).await?;
    }
    if let Err(e) = docker.start_container(&created.id, None).await {
        // An agent volume left empty by an interrupted first fill: fill it and try once more.
        if e.to_string().contains(AGENT_PATH) {
            ensure_agent_volume(docker, agent_binary, true).await?;
            docker
                .start_container(&created.id, None)
                .await
                .map_err(api(format!("starting {name}")))?;
        } else {
            return Err(api(format!("starting {name}"))(e));
        }
    }
    Ok(created.id)
}

/// The volume holding this agent build (named by its hash), filled once through a container
/// that is created, never started, and removed.
pub async fn ensure_agent_volume(
    docker: &Docker,
    agent_binary: &[u8],
    refill: bool,
) -> Result<String, DockerError> {
    let hash = devloop_proxy::tree::hex(&devloop_proxy::tree::hash_bytes(agent_binary));
    let name = format!(
        "devloop-agent-{}-{}",
        devloop_proxy::CRATE_VERSION,
        &hash[..12]
    );
    // Two devloop processes of this machine must not fill it at once, nor one start a
    // container while the other is still writing: the check and the fill hold a lock.
    let lock_path = std::env::temp_dir().join("devloop-agent-volume.lock");
    let _lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .ok()
        .and_then(|f| nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive).ok());
    if !refill && docker.inspect_volume(&name).await.is_ok() {
        return Ok(name);
    }
    let mut l = HashMap::new();
    l.insert(labels::MANAGED.to_string(), "true".to_string());
    l.insert(labels::KIND.to_string(), "agent".to_string());
    docker
        .create_volume(VolumeCreateRequest {
            name: Some(name.clone()),
            labels: Some(l),
            ..Default::default()
        })
        .await
        .map_err(api(format!("creating volume {name}")))?;
    let image = ensure_agent_image(docker, agent_binary).await?;
    let filler = format!("{name}-fill-{}", std::process::id());
    let body = ContainerCreateBody {
        image: Some(image),
        host_config: Some(HostConfig {
            mounts: Some(vec![Mount {
                target: Some("/fill".into()),
                source: Some(name.clone()),
                typ: Some(MountType::VOLUME),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    };
    let created = docker
        .create_container(
            Some(CreateContainerOptionsBuilder::new().name(&filler).build()),
            body,
        )
        .await
        .map_err(api("creating the agent volume's filler"))?;
    let archive = one_file_tar("devloop-agent", 0o755, agent_binary)?;
    let uploaded = docker
        .upload_to_container(
            &created.id,
            Some(UploadToContainerOptionsBuilder::new().path("/fill").build()),
            bollard::body_full(archive.into()),
        )
        .await;
    remove_container(docker, &created.id).await?;
    uploaded.map_err(api(format!("filling volume {name}")))?;
    Ok(name)
}

/// Host port bindings; a mapping without a host port gets one the engine picks, as in compose.
pub fn port_bindings(
    ports: &[crate::config::PortMapping],
) -> HashMap<String, Option<Vec<PortBinding>>> {
    let mut bindings: HashMap<String, Option<Vec<PortBinding>>> = HashMap::new();
    for p in ports {
        let host_port = p.host_port.map(|hp| hp.to_string()).unwrap_or_default();
        bindings
            .entry(format!("{}/tcp", p.container_port))
            .or_insert_with(|| Some(Vec::new()))
            .get_or_insert_with(Vec::new)
            .push(PortBinding {
                host_ip: p.host_ip.clone(),
                host_port: Some(host_port),
            });
    }
    bindings
}

/// A tar of one file, for the engine's archive and import endpoints.
pub fn one_file_tar(name: &str, mode: u32, data: &[u8]) -> Result<Vec<u8>, DockerError> {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_mode(mode);
    h.set_size(data.len() as u64);
    b.append_data(&mut h, name, data)
        .map_err(|e| DockerError::Other(e.to_string()))?;
    b.into_inner()
        .map_err(|e| DockerError::Other(e.to_string()))
}

/// Copies the session token to [`TOKEN_PATH`] in a created container, readable by its root
/// only.
pub async fn upload_token(
    docker: &Docker,
    id: &str,
    name: &str,
    token: &str,
    owner: (u32, u32),
) -> Result<(), DockerError> {
    let mut b = tar::Builder::new(Vec::new());
    let mut dir = tar::Header::new_gnu();
    dir.set_entry_type(tar::EntryType::Directory);
    dir.set_mode(0o711);
    dir.set_size(0);
    let mut file = tar::Header::new_gnu();
    file.set_mode(0o600);
    file.set_size(token.len() as u64);
    // The agent runs as the container's user: the token is that user's, readable by no one
    // else (a root-owned 0600 file would stop an agent of an image with a non-root USER).
    file.set_uid(owner.0 as u64);
    file.set_gid(owner.1 as u64);
    let archive = b
        .append_data(&mut dir, ".devloop/", std::io::empty())
        .and_then(|()| b.append_data(&mut file, ".devloop/token", token.as_bytes()))
        .and_then(|()| b.into_inner())
        .map_err(|e| DockerError::Other(format!("packing the token: {e}")))?;
    docker
        .upload_to_container(
            id,
            Some(UploadToContainerOptionsBuilder::new().path("/").build()),
            bollard::body_full(archive.into()),
        )
        .await
        .map_err(api(format!("copying the token into {name}")))
}

/// Makes `dir` (a volume's mount point in a created container) belong to `owner`, so an
/// agent running as the image's non-root user can write the synced tree into it. Docker
/// creates a new volume owned by root unless the image has that folder.
pub async fn give_dir_to(
    docker: &Docker,
    id: &str,
    dir: &str,
    owner: (u32, u32),
) -> Result<(), DockerError> {
    let mut b = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::Directory);
    header.set_mode(0o755);
    header.set_size(0);
    header.set_uid(owner.0 as u64);
    header.set_gid(owner.1 as u64);
    // The engine leaves a `./` entry's owner alone, but applies a named entry's to the
    // folder that exists already: the folder goes in under its own name, into its parent.
    let path = Path::new(dir);
    let (parent, name) = match (path.parent(), path.file_name()) {
        (Some(p), Some(n)) => (
            p.to_string_lossy().into_owned(),
            n.to_string_lossy().into_owned(),
        ),
        _ => return Ok(()),
    };
    let archive = b
        .append_data(&mut header, format!("{name}/"), std::io::empty())
        .and_then(|()| b.into_inner())
        .map_err(|e| DockerError::Other(format!("packing {dir}: {e}")))?;
    docker
        .upload_to_container(
            id,
            Some(UploadToContainerOptionsBuilder::new().path(&parent).build()),
            bollard::body_full(archive.into()),
        )
        .await
        .map_err(api(format!("giving {dir} to uid {}", owner.0)))
}

/// The uid and gid a created container's process runs as: its `User` (the image's, or
/// one compose set), numbers as they are, names looked up in the container's own
/// `/etc/passwd` and `/etc/group`.
pub async fn container_user(docker: &Docker, id: &str) -> Result<(u32, u32), DockerError> {
    let info = docker
        .inspect_container(id, None)
        .await
        .map_err(api(format!("inspecting {id}")))?;
    let spec = info.config.and_then(|c| c.user).unwrap_or_default();
    if spec.is_empty() || spec == "root" || spec == "0" || spec == "0:0" {
        return Ok((0, 0));
    }
    let needs_names = spec.split(':').any(|p| p.parse::<u32>().is_err());
    let (passwd, group) = if needs_names {
        (
            read_container_file(docker, id, "/etc/passwd").await.ok(),
            read_container_file(docker, id, "/etc/group").await.ok(),
        )
    } else {
        (None, None)
    };
    resolve_user(&spec, passwd.as_deref(), group.as_deref()).map_err(DockerError::Other)
}

/// `USER` as Docker reads it: `user[:group]`, each a number or a name. A user given alone
/// takes its primary group from passwd (gid = uid when passwd does not list a number).
pub fn resolve_user(
    spec: &str,
    passwd: Option<&str>,
    group: Option<&str>,
) -> Result<(u32, u32), String> {
    let (user, grp) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let passwd_line = |name: &str| {
        passwd.and_then(|p| {
            p.lines()
                .map(|l| l.split(':').collect::<Vec<_>>())
                .find(|f| f.len() >= 4 && f[0] == name)
                .and_then(|f| Some((f[2].parse::<u32>().ok()?, f[3].parse::<u32>().ok()?)))
        })
    };
    let (uid, primary) = match user.parse::<u32>() {
        Ok(n) => (
            n,
            passwd.and_then(|p| {
                p.lines()
                    .map(|l| l.split(':').collect::<Vec<_>>())
                    .find(|f| f.len() >= 4 && f[2] == user)
                    .and_then(|f| f[3].parse::<u32>().ok())
            }),
        ),
        Err(_) => {
            let (u, g) = passwd_line(user)
                .ok_or_else(|| format!("the image's USER `{user}` is not in its /etc/passwd"))?;
            (u, Some(g))
        }
    };
    let gid = match grp {
        None | Some("") => primary.unwrap_or(uid),
        Some(g) => match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => group
                .and_then(|gr| {
                    gr.lines()
                        .map(|l| l.split(':').collect::<Vec<_>>())
                        .find(|f| f.len() >= 3 && f[0] == g)
                        .and_then(|f| f[2].parse::<u32>().ok())
                })
                .ok_or_else(|| format!("the image's USER group `{g}` is not in its /etc/group"))?,
        },
    };
    Ok((uid, gid))
}

/// The agent as an image of its own (FROM scratch: just the static binary), for relays,
/// intercepts and the Kubernetes routes that load images from the engine.
pub async fn ensure_agent_image(
    docker: &Docker,
    agent_binary: &[u8],
) -> Result<String, DockerError> {
    let tag = super::agent_image_tag(agent_binary);
    let image = format!("devloop-agent:{tag}");
    if docker.inspect_image(&image).await.is_ok() {
        return Ok(image);
    }
    let archive = one_file_tar("devloop-agent", 0o755, agent_binary)?;
    let mut stream = docker.create_image(
        Some(
            bollard::query_parameters::CreateImageOptionsBuilder::new()
                .from_src("-")
                .repo("devloop-agent")
                .tag(&tag)
                .changes(vec![
                    "ENTRYPOINT [\"/devloop-agent\"]".into(),
                    format!("LABEL {}=true", labels::MANAGED),
                ])
                .build(),
        ),
        Some(bollard::body_full(archive.into())),
        None,
    );
    while let Some(item) = stream.next().await {
        item.map_err(api("importing the agent image"))?;
    }
    Ok(image)
}

/// The last `lines` lines a container printed (stdout and stderr).
pub async fn last_logs(docker: &Docker, id: &str, lines: usize) -> String {
    let mut stream = docker.logs(
        id,
        Some(
            bollard::query_parameters::LogsOptionsBuilder::new()
                .stdout(true)
                .stderr(true)
                .tail(&lines.to_string())
                .build(),
        ),
    );
    let mut out = String::new();
    while let Some(Ok(chunk)) = stream.next().await {
        out.push_str(&String::from_utf8_lossy(&chunk.into_bytes()));
    }
    out
}

/// Why a container's agent cannot be reached, when the container is not running: its exit
/// code and what it printed last. None while it runs (or cannot be inspected).
pub async fn not_running_reason(docker: &Docker, container: &str) -> Option<String> {
    let info = docker.inspect_container(container, None).await.ok()?;
    let state = info.state?;
    if state.running == Some(true) {
        return None;
    }
    let logs = last_logs(docker, container, 5).await;
    let logs = logs.trim();
    Some(format!(
        "{container} is not running (exit code {}){}",
        state.exit_code.unwrap_or_default(),
        if logs.is_empty() {
            String::new()
        } else {
            format!("; its last output:\n{logs}")
        }
    ))
}

/// One file of a (created or running) container, read through the engine.
async fn read_container_file(
    docker: &Docker,
    container: &str,
    path: &str,
) -> Result<String, DockerError> {
    let mut stream = docker.download_from_container(
        container,
        Some(
            bollard::query_parameters::DownloadFromContainerOptionsBuilder::new()
                .path(path)
                .build(),
        ),
    );
    let mut bytes = Vec::new();
    while let Some(chunk) = stream.next().await {
        bytes.extend_from_slice(&chunk.map_err(api(format!("reading {path} of {container}")))?);
    }
    let mut archive = tar::Archive::new(&bytes[..]);
    let mut entries = archive
        .entries()
        .map_err(|e| DockerError::Other(e.to_string()))?;
    let Some(entry) = entries.next() else {
        return Err(DockerError::Other(format!("{container} holds no {path}")));
    };
    let mut entry = entry.map_err(|e| DockerError::Other(e.to_string()))?;
    let mut s = String::new();
    std::io::Read::read_to_string(&mut entry, &mut s)
        .map_err(|e| DockerError::Other(e.to_string()))?;
    Ok(s)
}

pub async fn remove_container(docker: &Docker, id: &str) -> Result<(), DockerError> {
    match docker
        .remove_container(
            id,
            Some(
                RemoveContainerOptionsBuilder::new()
                    .force(true)
                    .v(false)
                    .build(),
            ),
        )
        .await
    {
        Ok(()) => Ok(()),
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => Ok(()),
        Err(e) => Err(api(format!("removing container {id}"))(e)),
    }
}

pub async fn stop_container(docker: &Docker, id: &str) -> Result<(), DockerError> {
    docker
        .stop_container(id, Some(StopContainerOptionsBuilder::new().t(5).build()))
        .await
        .map_err(api(format!("stopping container {id}")))
}

/// What `down` removed.
#[derive(Debug, Default)]
pub struct Removed {
    pub containers: Vec<String>,
    pub volumes: Vec<String>,
    pub networks: Vec<String>,
    /// Networks left in place because containers devloop did not make are attached: each
    /// with their names.
    pub kept_networks: Vec<(String, Vec<String>)>,
}

/// Removes every container, volume and network labelled with the project (all but
/// intercepts, which `leave` ends).
pub async fn down(
    docker: &Docker,
    project: &str,
    keep_volumes: bool,
) -> Result<Removed, DockerError> {
    let mut removed = Removed::default();
    for c in list_project_containers(docker, project, None).await? {
        // Intercepts are ended with `leave`, which restores what they replaced.
        if label(&c, labels::KIND) == Some(labels::KIND_INTERCEPT) {
            continue;
        }
        let id = c.id.clone().unwrap_or_default();
        remove_container(docker, &id).await?;
        removed.containers.push(
            c.names
                .and_then(|n| n.first().cloned())
                .unwrap_or(id)
                .trim_start_matches('/')
                .to_string(),
        );
    }
    if !keep_volumes {
        let vols = docker
            .list_volumes(Some(
                ListVolumesOptionsBuilder::new()
                    .filters(&labels::filter(&[(labels::PROJECT, project)]))
                    .build(),
            ))
            .await
            .map_err(api("listing volumes"))?;
        for v in vols.volumes.unwrap_or_default() {
            docker
                .remove_volume(
                    &v.name,
                    None::<bollard::query_parameters::RemoveVolumeOptions>,
                )
                .await
                .map_err(api(format!("removing volume {}", v.name)))?;
            removed.volumes.push(v.name);
        }
    }
    let nets = project_networks(docker, project).await?;
    let others = list_project_containers(docker, project, None).await?;
    if others.is_empty() {
        for n in nets {
            let name = n.name.unwrap_or_default();
            // A container of the user's own (`docker run --network devloop-P`) keeps the
            // network: say so instead of failing after everything else is gone.
            let attached: Vec<String> = docker
                .inspect_network(
                    &name,
                    None::<bollard::query_parameters::InspectNetworkOptions>,
                )
                .await
                .map_err(api(format!("inspecting network {name}")))?
                .containers
                .unwrap_or_default()
                .into_values()
                .map(|c| c.name.unwrap_or_default())
                .collect();
            if !attached.is_empty() {
                removed.kept_networks.push((name, attached));
                continue;
            }
            docker
                .remove_network(&name)
                .await
                .map_err(api(format!("removing network {name}")))?;
            removed.networks.push(name);
        }
    }
    Ok(removed)
}

/// How the cli reaches the agent of a container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentRoute {
    /// TCP straight to the container's address on the project network.
    Direct,
    /// `docker exec devloop-agent bridge` through the engine's API.
    Exec,
}

/// The container's address on the project network.
pub async fn agent_address(
    docker: &Docker,
    container: &str,
    project: &str,
) -> Result<Option<SocketAddr>, DockerError> {
    let info = docker
        .inspect_container(container, None)
        .await
        .map_err(api(format!("inspecting {container}")))?;
    let nets = info
        .network_settings
        .and_then(|n| n.networks)
        .unwrap_or_default();
    let ip = nets
        .get(&network_name(project))
        .or_else(|| nets.values().next())
        .and_then(|n| n.ip_address.clone())
        .filter(|ip| !ip.is_empty());
    Ok(ip
        .and_then(|ip| ip.parse().ok())
        .map(|ip| SocketAddr::new(ip, devloop_proxy::AGENT_PORT)))
}

/// Opens a byte stream to the agent: directly when the engine is local and the address
/// answers quickly, else through `docker exec`.
pub async fn open_transport(
    docker: &Docker,
    engine: &EngineChoice,
    container: &str,
    project: &str,
) -> Result<(Box<dyn TransportBox>, AgentRoute), DockerError> {
    if engine.is_local() && std::env::var("DEVLOOP_AGENT_PATH").as_deref() != Ok("exec") {
        if let Some(addr) = agent_address(docker, container, project).await? {
            match tokio::time::timeout(
                Duration::from_millis(300),
                tokio::net::TcpStream::connect(addr),
            )
            .await
            {
                Ok(Ok(s)) => {
                    let _ = s.set_nodelay(true);
                    return Ok((Box::new(s), AgentRoute::Direct));
                }
                // The address answers but nothing listens yet: the agent is still starting.
                // Retrying the fast route beats settling for the slow one.
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    return Err(DockerError::Other(format!(
                        "the agent at {addr} is not listening yet"
                    )));
                }
                _ => tracing::info!(%addr, "container address unreachable; using docker exec"),
            }
        }
    }
    Ok((
        Box::new(exec_transport(docker, container).await?),
        AgentRoute::Exec,
    ))
}

/// Object-safe form of [`Transport`] so both paths fit one type.
pub trait TransportBox: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> TransportBox for T {}

pub async fn exec_transport(
    docker: &Docker,
    container: &str,
) -> Result<impl Transport, DockerError> {
    exec_transport_with(docker, container, AGENT_PATH).await
}

/// [`exec_transport`] for an agent installed at `agent_path` (the agent image has it at
/// `/devloop-agent`).
pub async fn exec_transport_with(
    docker: &Docker,
    container: &str,
    agent_path: &str,
) -> Result<impl Transport, DockerError> {
    let exec = docker
        .create_exec(
            container,
            CreateExecOptions {
                attach_stdin: Some(true),
                attach_stdout: Some(true),
                attach_stderr: Some(true),
                tty: Some(false),
                cmd: Some(vec![
                    agent_path.to_string(),
                    "bridge".into(),
                    "--to".into(),
                    format!("127.0.0.1:{}", devloop_proxy::AGENT_PORT),
                ]),
                ..Default::default()
            },
        )
        .await
        .map_err(api(format!("exec into {container}")))?;
    match docker
        .start_exec(&exec.id, None)
        .await
        .map_err(api(format!("starting exec in {container}")))?
    {
        StartExecResults::Attached { output, input } => {
            let reader = tokio_util::io::StreamReader::new(output.filter_map(|item| async move {
                match item {
                    Ok(bollard::container::LogOutput::StdOut { message }) => Some(Ok(message)),
                    Ok(bollard::container::LogOutput::StdErr { message }) => {
                        tracing::debug!(stderr = %String::from_utf8_lossy(&message), "agent bridge");
                        None
                    }
                    Ok(_) => None,
                    Err(e) => Some(Err(std::io::Error::other(e))),
                }
            }));
            Ok(tokio::io::join(Box::pin(reader), input))
        }
        StartExecResults::Detached => {
            Err(DockerError::Other("docker exec started detached".into()))
        }
    }
}

/// Reads the session token of a container from the container itself (for a laptop that lost
/// its copy, e.g. another shell user or a wiped state folder). Only someone who can already
/// run commands in the container can do this.
pub async fn fetch_token(docker: &Docker, container: &str) -> Result<String, DockerError> {
    Ok(read_container_file(docker, container, TOKEN_PATH)
        .await
        .map_err(|e| match e {
            DockerError::Other(m) if m.contains("holds no") => {
                DockerError::Other(format!("{container} holds no token"))
            }
            e => e,
        })?
        .trim()
        .to_string())
}

/// The static agent binary to copy into containers.
pub fn find_agent_binary() -> Result<std::path::PathBuf, String> {
    if let Ok(p) = std::env::var("DEVLOOP_AGENT_BIN") {
        let path = std::path::PathBuf::from(&p);
        return match crate::elf::is_static(&path) {
            Ok(true) => Ok(path),
            Ok(false) => Err(format!("DEVLOOP_AGENT_BIN={p} is not a static linux binary; build one with `scripts/build-agent.sh`")),
            Err(e) => Err(format!("DEVLOOP_AGENT_BIN={p}: {e}")),
        };
    }
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut candidates = Vec::new();
    if let Some(dir) = exe.parent() {
        candidates.push(dir.join("devloop-agent"));
        // In a cargo target folder: target/{debug,release}[/deps]/devloop -> target/x86_64-.../release.
        for up in [dir.parent(), dir.parent().and_then(Path::parent)]
            .into_iter()
            .flatten()
        {
            candidates.push(up.join("x86_64-unknown-linux-gnu/release/devloop-agent"));
        }
    }
    for c in &candidates {
        if c.is_file() && crate::elf::is_static(c).unwrap_or(false) {
            return Ok(c.clone());
        }
    }
    Err(format!(
        "no static devloop-agent binary found (looked in {}); build it with `scripts/build-agent.sh` or set DEVLOOP_AGENT_BIN",
        candidates.iter().map(|c| c.display().to_string()).collect::<Vec<_>>().join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_user_is_read_as_docker_reads_it() {
        let passwd = "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1001::/home/app:/bin/sh\n";
        let group = "root:x:0:\nstaff:x:50:\napp:x:1001:\n";
        let r = |s: &str| resolve_user(s, Some(passwd), Some(group));
        assert_eq!(r("1000:1000"), Ok((1000, 1000)));
        assert_eq!(
            r("1000"),
            Ok((1000, 1001)),
            "a uid alone takes its passwd group"
        );
        assert_eq!(resolve_user("4242", None, None), Ok((4242, 4242)));
        assert_eq!(r("app"), Ok((1000, 1001)));
        assert_eq!(r("app:staff"), Ok((1000, 50)));
        assert_eq!(r("app:7"), Ok((1000, 7)));
        assert!(r("nobody").unwrap_err().contains("`nobody`"));
        assert!(r("app:wheel").unwrap_err().contains("`wheel`"));
    }

    #[test]
    fn an_engine_error_is_said_once() {
        let cause = bollard::errors::Error::DockerResponseServerError {
            status_code: 403,
            message: "network has active endpoints".into(),
        };
        let e = anyhow::Error::new(api("removing network n")(cause));
        let text = format!("{e:#}");
        assert_eq!(text.matches("active endpoints").count(), 1, "{text}");
        assert!(text.starts_with("docker: removing network n: "), "{text}");
    }
}
