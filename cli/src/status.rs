//! What `status` and `doctor` report, the same for every back end: a service's environment,
//! agent, process and sync (a service nobody syncs says since when its files may be stale),
//! and a doctor's check.

use serde::Serialize;

use crate::state::{read_sync_status, SyncLock};
use crate::ui::{ago, human_bytes};
use devloop_proxy::msg::{ProcessState, ProcessStatus};

/// One check of `doctor`: what was checked, and what was found or how to fix it.
#[derive(Debug, Clone)]
pub struct Check {
    pub what: String,
    pub outcome: Outcome,
}

#[derive(Debug, Clone)]
pub enum Outcome {
    Ok(String),
    Note(String),
    Fail { found: String, fix: String },
}

impl Check {
    pub fn ok(what: impl Into<String>, found: impl Into<String>) -> Check {
        Check {
            what: what.into(),
            outcome: Outcome::Ok(found.into()),
        }
    }
    pub fn note(what: impl Into<String>, found: impl Into<String>) -> Check {
        Check {
            what: what.into(),
            outcome: Outcome::Note(found.into()),
        }
    }
    pub fn fail(
        what: impl Into<String>,
        found: impl Into<String>,
        fix: impl Into<String>,
    ) -> Check {
        Check {
            what: what.into(),
            outcome: Outcome::Fail {
                found: found.into(),
                fix: fix.into(),
            },
        }
    }
}

#[derive(Debug, Serialize)]
pub struct ServiceReport {
    pub service: String,
    pub container: Option<String>,
    pub state: String,
    pub intercepted: bool,
    pub agent_version: Option<String>,
    pub process: Option<String>,
    pub sync: String,
    pub stale: bool,
    pub files: Option<u64>,
    pub bytes: Option<u64>,
    pub last_sync_ms: Option<u64>,
    pub pending: Option<u64>,
    pub errors: Vec<String>,
}

impl ServiceReport {
    pub fn new(service: &str, state: String) -> ServiceReport {
        ServiceReport {
            service: service.to_string(),
            container: None,
            state,
            intercepted: false,
            agent_version: None,
            process: None,
            sync: String::new(),
            stale: false,
            files: None,
            bytes: None,
            last_sync_ms: None,
            pending: None,
            errors: Vec::new(),
        }
    }
}

/// The sync part of a report, from the state folder: who syncs, or since when the files
/// may be stale. `has_target`: the service has a dev container or dev pod to sync into.
pub fn sync_state(
    project: &str,
    svc: &crate::config::Service,
    has_target: bool,
    r: &mut ServiceReport,
) {
    let syncing = SyncLock::is_held(project, &svc.name);
    let saved = read_sync_status(project, &svc.name);
    if let Some(s) = &saved {
        r.files = Some(s.files);
        r.bytes = Some(s.bytes);
        r.last_sync_ms = s.last_sync_ms;
        r.pending = Some(s.pending);
        r.errors = s.errors.clone();
    }
    r.sync = if svc.sync.is_none() {
        "no sync configured".into()
    } else if !has_target {
        "-".into()
    } else if syncing {
        let s = saved.unwrap_or_default();
        let link = if s.connected {
            format!("connected ({})", s.route)
        } else {
            "reconnecting".into()
        };
        format!(
            "syncing (pid {}, {link}): {} files, {}, last sync {}, {} pending",
            s.pid,
            s.files,
            human_bytes(s.bytes),
            s.last_sync_ms.map(ago).unwrap_or_else(|| "never".into()),
            s.pending
        )
    } else {
        r.stale = true;
        let since = saved
            .as_ref()
            .and_then(|s| s.stopped_at_ms.or(s.last_sync_ms));
        match since {
            Some(t) => format!(
                "NOT SYNCING: the container's files may be stale since {} (run `devloop sync {}`)",
                ago(t),
                svc.name
            ),
            None => format!(
                "NOT SYNCING: never synced; files are the image's (run `devloop sync {}`)",
                svc.name
            ),
        }
    };
}

pub fn describe_process(p: &ProcessStatus) -> String {
    let exit = p
        .last_exit
        .as_ref()
        .map(|e| match (e.code, e.signal) {
            (Some(c), _) => format!(", last exit code {c}"),
            (None, Some(s)) => format!(", last killed by signal {s}"),
            _ => String::new(),
        })
        .unwrap_or_default();
    match &p.state {
        ProcessState::NoCommand => "no command (sync only)".into(),
        ProcessState::Running { pid } if p.quick_exits > 0 => {
            format!(
                "running (pid {pid}) after {} quick exits in a row{exit}; {} starts",
                p.quick_exits, p.starts
            )
        }
        ProcessState::Running { pid } => format!("running (pid {pid}), {} starts{exit}", p.starts),
        ProcessState::BackingOff { retry_in_ms } => {
            format!(
                "CRASH LOOP: {} quick exits in a row{exit}; next start in {} ms",
                p.quick_exits, retry_in_ms
            )
        }
        ProcessState::Stopped => format!("stopped{exit}"),
    }
}
