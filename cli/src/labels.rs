//! The labels on everything devloop creates in Docker, so `down` and test cleanup find exactly
//! that and nothing else.

pub const MANAGED: &str = "dev.devloop.managed";
pub const PROJECT: &str = "dev.devloop.project";
pub const SERVICE: &str = "dev.devloop.service";
/// `dev`, `deploy`, `ports`, `intercept` or `route`.
pub const KIND: &str = "dev.devloop.kind";
pub const AGENT_VERSION: &str = "dev.devloop.agent-version";
/// A hash of the settings the container was made from; a different hash means recreate.
pub const SPEC_HASH: &str = "dev.devloop.spec-hash";
/// Set by a test run on what it creates, so its cleanup removes only its own objects.
pub const TEST_RUN: &str = "dev.devloop.test-run";

pub const KIND_DEV: &str = "dev";
pub const KIND_INTERCEPT: &str = "intercept";
/// A deployed version (a snapshot image, run under the agent).
pub const KIND_DEPLOY: &str = "deploy";
/// The relay that holds a deployed service's published ports.
pub const KIND_PORTS: &str = "ports";
/// The routing agent of filtered intercepts, beside a running original.
pub const KIND_ROUTE: &str = "route";
/// The snapshot tag a deployed container runs.
pub const VERSION: &str = "dev.devloop.version";

use std::collections::HashMap;

/// The labels every object of a project carries (plus the test run's, when set in
/// DEVLOOP_TEST_RUN).
pub fn base(project: &str) -> HashMap<String, String> {
    let mut l = HashMap::new();
    l.insert(MANAGED.into(), "true".into());
    l.insert(PROJECT.into(), project.into());
    if let Ok(run) = std::env::var("DEVLOOP_TEST_RUN") {
        l.insert(TEST_RUN.into(), run);
    }
    l
}

/// A label filter for list calls: `key=value` pairs, all of which must match.
pub fn filter(pairs: &[(&str, &str)]) -> HashMap<String, Vec<String>> {
    let mut f = HashMap::new();
    f.insert(
        "label".to_string(),
        pairs.iter().map(|(k, v)| format!("{k}={v}")).collect(),
    );
    f
}
