//! Where services run. Docker is the one target so far; the sync engine reaches agents only
//! through [`crate::sync::engine::Connector`], so another target adds its own connector.

pub mod docker;
pub mod docker_deploy;
pub mod docker_intercept;
pub mod engine;
pub mod labels;
