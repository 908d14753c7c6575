//! Where services run: a Docker engine ([`docker`] and its siblings) or a Kubernetes
//! cluster ([`k8s`]). The sync engine reaches agents only through
//! [`crate::sync::engine::Connector`], deploys through [`crate::deploy::RolloutTarget`], and
//! intercepts through [`crate::intercept::Swap`], so each target adds its own.

pub mod docker;
pub mod docker_connector;
pub mod docker_deploy;
pub mod docker_intercept;
pub mod docker_swap;
pub mod engine;
pub mod k8s;
pub mod labels;

/// The tag of the agent's own image (FROM scratch, just the binary), the same on every
/// target: the crate version and a hash of the binary.
pub fn agent_image_tag(agent_binary: &[u8]) -> String {
    let hash = devloop_proxy::tree::hex(&devloop_proxy::tree::hash_bytes(agent_binary));
    format!("{}-{}", devloop_proxy::CRATE_VERSION, &hash[..12])
}
