//! Intercept on Docker: the service's container is stopped (the very same one comes back on
//! `leave`) and an agent container takes its place on every network, with its aliases, its
//! name as an alias, its exposed and published ports. The cli reaches the agent over a
//! network of devloop's own (`devloop-control`), which the service's callers are not on.
//!
//! Crash safety: the restore record is written to the state folder before anything changes,
//! and the agent container carries labels naming the original, so `leave` works from any
//! shell after the cli was killed.

use bollard::models::{
    ContainerCreateBody, ContainerInspectResponse, EndpointSettings, HostConfig,
    NetworkCreateRequest, NetworkingConfig,
};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, ListContainersOptionsBuilder, StopContainerOptionsBuilder,
};
use bollard::Docker;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

use crate::backend::docker::{self, api, DockerError};
use crate::labels;

pub const CONTROL_NETWORK: &str = "devloop-control";
pub const INTERCEPT_OF: &str = "dev.devloop.intercept-of";
pub const INTERCEPT_OF_NAME: &str = "dev.devloop.intercept-of-name";
const COMPOSE_SERVICE: &str = "com.docker.compose.service";
const COMPOSE_PROJECT: &str = "com.docker.compose.project";

/// What `leave` needs, written before anything changes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Record {
    pub original_id: String,
    pub original_name: String,
    pub service: String,
    pub project: String,
    pub agent_container: String,
    /// (container port, laptop port).
    pub ports: Vec<(u16, u16)>,
    pub started_ms: u64,
    pub cli_pid: u32,
}

/// The folder of an intercept's handoff socket (mounted into the agent's container): short,
/// since a Unix socket's path has at most 107 bytes, and derived from the agent container's
/// name, so `leave` from any shell removes it.
pub fn handoff_dir(agent_container: &str) -> std::path::PathBuf {
    let hash = blake3::hash(agent_container.as_bytes()).to_hex();
    crate::state::state_dir()
        .join("handoff")
        .join(&hash.as_str()[..16])
}

/// The key of a container's ownership record ([`crate::ownership`]).
pub fn owner_key(original_name: &str) -> String {
    format!("docker/{original_name}")
}

fn records_dir() -> std::path::PathBuf {
    crate::state::state_dir().join("intercepts")
}

pub fn save_record(r: &Record) -> std::io::Result<()> {
    let dir = records_dir();
    crate::state::ensure_private_dir(&dir)?;
    crate::state::write_atomic(
        &dir.join(format!("{}.json", r.original_name)),
        &serde_json::to_vec_pretty(r).map_err(std::io::Error::other)?,
        0o600,
    )
}

pub fn load_records() -> Vec<Record> {
    let Ok(rd) = std::fs::read_dir(records_dir()) else {
        return Vec::new();
    };
    rd.flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
        .filter_map(|e| serde_json::from_slice(&std::fs::read(e.path()).ok()?).ok())
        .collect()
}

pub fn remove_record(original_name: &str) {
    let _ = std::fs::remove_file(records_dir().join(format!("{original_name}.json")));
}

/// The running container to intercept: by container name, else by compose service label,
/// else a devloop container of that service.
pub async fn find_target(
    docker: &Docker,
    name: &str,
    prefer_project: Option<&str>,
) -> Result<ContainerInspectResponse, DockerError> {
    if let Ok(c) = docker.inspect_container(name, None).await {
        if c.state.as_ref().and_then(|s| s.running) == Some(true) {
            return Ok(c);
        }
    }
    let mut found = Vec::new();
    for label in [
        format!("{COMPOSE_SERVICE}={name}"),
        format!("{}={name}", labels::SERVICE),
    ] {
        let mut filters = HashMap::new();
        filters.insert("label".to_string(), vec![label]);
        let list = docker
            .list_containers(Some(
                ListContainersOptionsBuilder::new()
                    .all(true)
                    .filters(&filters)
                    .build(),
            ))
            .await
            .map_err(api("listing containers"))?;
        found.extend(list.into_iter().filter(|c| {
            let kind = docker::label(c, labels::KIND);
            kind != Some(labels::KIND_PORTS)
                && kind != Some(labels::KIND_INTERCEPT)
                && kind != Some(labels::KIND_ROUTE)
        }));
    }
    // Several projects run a service of that name: the project of the current folder is
    // meant, running or not (a stopped one is not silently swapped for another project's).
    if let Some(p) = prefer_project {
        let mine: Vec<_> = found
            .iter()
            .filter(|c| {
                docker::label(c, labels::PROJECT) == Some(p)
                    || docker::label(c, COMPOSE_PROJECT) == Some(p)
            })
            .cloned()
            .collect();
        if !mine.is_empty() {
            found = mine;
        }
    }
    let all = found.len();
    found.retain(docker::is_running);
    if found.is_empty() && all > 0 {
        return Err(DockerError::Other(format!(
            "`{name}` is not running (is it intercepted? `devloop intercept list`); start it first"
        )));
    }
    match found.len() {
        0 => Err(DockerError::Other(format!("no running container is named `{name}` or runs the compose or devloop service `{name}`; `docker ps` lists what runs"))),
        1 => docker.inspect_container(found[0].id.as_deref().unwrap_or_default(), None).await.map_err(api(format!("inspecting {name}"))),
        _ => Err(DockerError::Other(format!(
            "`{name}` is ambiguous: {}; name the container instead",
            found.iter().map(docker::name_of).collect::<Vec<_>>().join(", ")
        ))),
    }
}

pub fn container_name(c: &ContainerInspectResponse) -> String {
    c.name
        .clone()
        .unwrap_or_default()
        .trim_start_matches('/')
        .to_string()
}

pub fn service_of(c: &ContainerInspectResponse) -> (String, String) {
    let l = c
        .config
        .as_ref()
        .and_then(|c| c.labels.clone())
        .unwrap_or_default();
    let name = container_name(c);
    let service = l
        .get(COMPOSE_SERVICE)
        .or_else(|| l.get(labels::SERVICE))
        .cloned()
        .unwrap_or_else(|| name.clone());
    let project = l
        .get(COMPOSE_PROJECT)
        .or_else(|| l.get(labels::PROJECT))
        .cloned()
        .unwrap_or_default();
    (service, project)
}

pub fn env_of(c: &ContainerInspectResponse) -> Vec<(String, String)> {
    c.config
        .as_ref()
        .and_then(|c| c.env.clone())
        .unwrap_or_default()
        .into_iter()
        .filter_map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect()
}

/// The agent containers of active intercepts.
pub async fn agents(
    docker: &Docker,
) -> Result<Vec<bollard::models::ContainerSummary>, DockerError> {
    docker
        .list_containers(Some(
            ListContainersOptionsBuilder::new()
                .all(true)
                .filters(&labels::filter(&[(labels::KIND, labels::KIND_INTERCEPT)]))
                .build(),
        ))
        .await
        .map_err(api("listing intercepts"))
}

/// devloop's control network and its subnet.
pub async fn ensure_control_network(
    docker: &Docker,
) -> Result<(String, Option<String>), DockerError> {
    if docker.inspect_network(CONTROL_NETWORK, None).await.is_err() {
        let mut l = HashMap::new();
        l.insert(labels::MANAGED.to_string(), "true".to_string());
        l.insert(labels::KIND.to_string(), "control".to_string());
        let created = docker
            .create_network(NetworkCreateRequest {
                name: CONTROL_NETWORK.into(),
                driver: Some("bridge".into()),
                labels: Some(l),
                ..Default::default()
            })
            .await;
        if let Err(e) = created {
            // Another devloop made it meanwhile.
            if docker.inspect_network(CONTROL_NETWORK, None).await.is_err() {
                return Err(api("creating the devloop-control network")(e));
            }
        }
    }
    let net = docker
        .inspect_network(CONTROL_NETWORK, None)
        .await
        .map_err(api("inspecting devloop-control"))?;
    let subnet = net
        .ipam
        .and_then(|i| i.config)
        .and_then(|c| c.into_iter().find_map(|c| c.subnet))
        .filter(|s| !s.contains(':'));
    Ok((CONTROL_NETWORK.into(), subnet))
}

/// Stops the original and starts the agent in its place. Returns the agent container's name.
pub async fn swap_in(
    docker: &Docker,
    original: &ContainerInspectResponse,
    record: &Record,
    agent_binary: &[u8],
    token: &str,
    expose: &[String],
    handoff: Option<&std::path::Path>,
) -> Result<(), DockerError> {
    let orig_name = container_name(original);
    let (control, subnet) = ensure_control_network(docker).await?;
    let image = crate::backend::agent::ensure_agent_image(docker, agent_binary).await?;
    let networks: Vec<(String, EndpointSettings)> = original
        .network_settings
        .as_ref()
        .and_then(|n| n.networks.clone())
        .unwrap_or_default()
        .into_iter()
        .collect();

    docker
        .stop_container(
            &record.original_id,
            Some(StopContainerOptionsBuilder::new().t(2).build()),
        )
        .await
        .map_err(api(format!("stopping {orig_name}")))?;

    let mut l = HashMap::new();
    l.insert(labels::MANAGED.to_string(), "true".to_string());
    l.insert(labels::KIND.to_string(), labels::KIND_INTERCEPT.to_string());
    l.insert(labels::SERVICE.to_string(), record.service.clone());
    l.insert(labels::PROJECT.to_string(), record.project.clone());
    l.insert(INTERCEPT_OF.to_string(), record.original_id.clone());
    l.insert(INTERCEPT_OF_NAME.to_string(), orig_name.clone());
    if let Ok(run) = std::env::var("DEVLOOP_TEST_RUN") {
        l.insert(labels::TEST_RUN.to_string(), run);
    }
    let mut cmd = vec![
        "intercept".to_string(),
        "--token-file".into(),
        "/.devloop/token".into(),
    ];
    if let Some(s) = &subnet {
        cmd.extend(["--control-subnet".to_string(), s.clone()]);
    }
    for (remote, _) in &record.ports {
        cmd.extend(["--port".to_string(), remote.to_string()]);
    }
    for e in expose {
        cmd.extend(["--expose".to_string(), e.clone()]);
    }
    let binds = handoff.map(|dir| {
        let inside = devloop_proxy::handoff::CONTAINER_DIR;
        cmd.extend([
            "--handoff".to_string(),
            format!("{inside}/{}", devloop_proxy::handoff::SOCKET_NAME),
        ]);
        vec![format!("{}:{inside}", dir.display())]
    });
    let mut endpoints = HashMap::new();
    let first = networks.first().map(|(n, _)| n.clone());
    for (net, ep) in &networks {
        let mut aliases = ep.aliases.clone().unwrap_or_default();
        for extra in [orig_name.clone(), record.service.clone()] {
            if !aliases.contains(&extra) {
                aliases.push(extra);
            }
        }
        endpoints.insert(
            net.clone(),
            EndpointSettings {
                aliases: Some(aliases),
                ..Default::default()
            },
        );
    }
    endpoints.insert(control.clone(), EndpointSettings::default());
    let host = original.host_config.clone().unwrap_or_default();
    let body = ContainerCreateBody {
        image: Some(image),
        cmd: Some(cmd),
        labels: Some(l),
        exposed_ports: original
            .config
            .as_ref()
            .and_then(|c| c.exposed_ports.clone()),
        host_config: Some(HostConfig {
            port_bindings: host.port_bindings.clone(),
            network_mode: first.clone().or(Some(control.clone())),
            binds,
            ..Default::default()
        }),
        // Docker takes one network at create; the others are connected before the start.
        networking_config: Some(NetworkingConfig {
            endpoints_config: Some(
                endpoints
                    .clone()
                    .into_iter()
                    .filter(|(n, _)| Some(n) == first.as_ref())
                    .collect(),
            ),
        }),
        ..Default::default()
    };
    let created = docker
        .create_container(
            Some(
                CreateContainerOptionsBuilder::new()
                    .name(&record.agent_container)
                    .build(),
            ),
            body,
        )
        .await
        .map_err(api(format!(
            "creating the agent container {}",
            record.agent_container
        )))?;
    for (net, ep) in endpoints
        .into_iter()
        .filter(|(n, _)| Some(n) != first.as_ref())
    {
        docker
            .connect_network(
                &net,
                bollard::models::NetworkConnectRequest {
                    container: created.id.clone(),
                    endpoint_config: Some(ep),
                },
            )
            .await
            .map_err(api(format!("connecting the agent to {net}")))?;
    }
    docker::upload_token(docker, &created.id, &record.agent_container, token, (0, 0)).await?;
    docker
        .start_container(&created.id, None)
        .await
        .map_err(api(format!("starting {}", record.agent_container)))?;
    Ok(())
}

/// Removes the agent and starts the very same original container again.
pub async fn restore(docker: &Docker, record: &Record) -> Result<(), DockerError> {
    // Written back if the restore fails, so a later `leave` can try again.
    remove_record(&record.original_name);
    if let Err(e) = docker::remove_container(docker, &record.agent_container).await {
        let _ = save_record(record);
        return Err(e);
    }
    match docker.start_container(&record.original_id, None).await {
        Ok(()) => {}
        // Already running (a second leave): nothing to do.
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 304, ..
        }) => {}
        Err(e) => {
            let _ = save_record(record);
            return Err(api(format!("starting {} again", record.original_name))(e));
        }
    }
    crate::state::TokenStore::new().remove(&record.agent_container);
    let _ = std::fs::remove_dir_all(handoff_dir(&record.agent_container));
    Ok(())
}
