//! The agent every back end runs: its static binary (found beside the cli, or
//! DEVLOOP_AGENT_BIN), and its own image (FROM scratch, just the binary), the same on every
//! back end: built in the local engine, pushed or loaded from there.

use futures_util::StreamExt;
use std::path::Path;

use crate::engine::{api, DockerError};
use crate::labels;

/// The tag of the agent's own image (FROM scratch, just the binary), the same on every
/// back end: the crate version and a hash of the binary.
pub fn agent_image_tag(agent_binary: &[u8]) -> String {
    let hash = devloop_proxy::tree::hex(&devloop_proxy::tree::hash_bytes(agent_binary));
    format!("{}-{}", devloop_proxy::CRATE_VERSION, &hash[..12])
}

/// The agent binary's bytes (found beside the cli, or DEVLOOP_AGENT_BIN).
pub fn read_agent_binary() -> anyhow::Result<Vec<u8>> {
    use anyhow::Context;
    let path = find_agent_binary().map_err(anyhow::Error::msg)?;
    std::fs::read(&path).with_context(|| format!("reading {}", path.display()))
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

/// The agent as an image of its own (FROM scratch: just the static binary), for relays,
/// intercepts and the Kubernetes routes that load images from the engine.
pub async fn ensure_agent_image(
    docker: &bollard::Docker,
    agent_binary: &[u8],
) -> Result<String, DockerError> {
    let tag = agent_image_tag(agent_binary);
    let image = format!("devloop-agent:{tag}");
    if docker.inspect_image(&image).await.is_ok() {
        return Ok(image);
    }
    let archive = crate::engine::one_file_tar("devloop-agent", 0o755, agent_binary)?;
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
