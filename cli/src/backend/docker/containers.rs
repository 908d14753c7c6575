//! Dev containers and agent containers: their settings from the service and its image,
//! the project network, the shared agent volume and image, and creating them.

use bollard::models::{
    ContainerCreateBody, EndpointSettings, HostConfig, Mount, MountType, NetworkCreateRequest,
    NetworkingConfig, PortBinding, VolumeCreateRequest,
};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, ListNetworksOptionsBuilder, UploadToContainerOptionsBuilder,
};
use bollard::Docker;
use std::collections::HashMap;

use super::*;
use crate::config::{Project, Service};
use crate::labels;

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
pub(super) async fn project_networks(
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
    let image = crate::backend::agent::ensure_agent_image(docker, agent_binary).await?;
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
