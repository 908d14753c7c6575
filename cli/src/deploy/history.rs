//! What `history` and `rollback` work from: the versions devloop deployed for a service,
//! newest last, with when and what changed, in the state folder; the images themselves stay
//! on the engine (the last `keep` of them, the rest are pruned).

use devloop_proxy::tree::{hex, Entry, Tree};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Version {
    pub tag: String,
    pub image: String,
    pub at_ms: u64,
    /// e.g. "2 changed, 1 added, 1 deleted: app.py, new.txt, old.txt".
    pub changes: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct History {
    pub versions: Vec<Version>,
    /// The tree of the newest version, to tell what the next one changes: path -> digest.
    pub last_tree: BTreeMap<String, String>,
}

fn path(project: &str, service: &str) -> PathBuf {
    crate::state::state_dir()
        .join("deploys")
        .join(project)
        .join(format!("{service}.json"))
}

pub fn load(project: &str, service: &str) -> History {
    std::fs::read_to_string(path(project, service))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default()
}

pub fn save(project: &str, service: &str, history: &History) -> std::io::Result<()> {
    let p = path(project, service);
    if let Some(dir) = p.parent() {
        std::fs::create_dir_all(dir)?;
    }
    crate::state::write_atomic(
        &p,
        &serde_json::to_vec(history).map_err(std::io::Error::other)?,
        0o644,
    )
}

/// The service's history with `snap` recorded as the version that runs now (not saved yet:
/// the back end first decides which old versions it drops, see [`forget_and_save`]).
pub fn with_rollout(project: &str, service: &str, snap: &super::Snapshot) -> History {
    let mut h = load(project, service);
    h.record(
        &snap.tag,
        &snap.image,
        snap.digest.clone(),
        crate::state::now_ms(),
    );
    h
}

/// Forgets the versions tagged `gone` and saves the history. A history that cannot be saved
/// is logged, not an error: the deploy it describes succeeded.
pub fn forget_and_save(project: &str, service: &str, mut h: History, gone: &[String]) {
    h.forget(gone);
    if let Err(e) = save(project, service, &h) {
        tracing::warn!(error = %e, "cannot save the deploy history");
    }
}

/// A digest per path, enough to compare two trees.
pub fn digest(tree: &Tree) -> BTreeMap<String, String> {
    tree.iter()
        .map(|(p, e)| {
            let d = match e {
                Entry::File { mode, hash, .. } => {
                    format!("f{:o}{}", mode & 0o777, &hex(hash)[..16])
                }
                Entry::Dir { .. } => "d".to_string(),
                Entry::Symlink { target } => format!("l{target}"),
            };
            (p.as_str().to_string(), d)
        })
        .collect()
}

/// "2 changed, 1 added, 1 deleted: a, b, c (+N more)", or "first version" / "no change".
pub fn summarize(
    before: &BTreeMap<String, String>,
    after: &BTreeMap<String, String>,
    first: bool,
) -> String {
    if first {
        return format!("first version ({} paths)", after.len());
    }
    let mut changed = Vec::new();
    let mut added = Vec::new();
    let mut deleted = Vec::new();
    for (p, d) in after {
        match before.get(p) {
            None => added.push(p.as_str()),
            Some(b) if b != d => changed.push(p.as_str()),
            _ => {}
        }
    }
    for p in before.keys() {
        if !after.contains_key(p) {
            deleted.push(p.as_str());
        }
    }
    if changed.is_empty() && added.is_empty() && deleted.is_empty() {
        return "no file change (settings or base changed)".into();
    }
    let mut counts = Vec::new();
    for (n, what) in [
        (changed.len(), "changed"),
        (added.len(), "added"),
        (deleted.len(), "deleted"),
    ] {
        if n > 0 {
            counts.push(format!("{n} {what}"));
        }
    }
    let names: Vec<&str> = changed
        .iter()
        .chain(&added)
        .chain(&deleted)
        .copied()
        .collect();
    let shown = names.iter().take(5).copied().collect::<Vec<_>>().join(", ");
    let more = if names.len() > 5 {
        format!(" (+{} more)", names.len() - 5)
    } else {
        String::new()
    };
    format!("{}: {shown}{more}", counts.join(", "))
}

impl History {
    /// Records a newly rolled-out version; a version deployed again (a rollback, or the
    /// same tree as an older version) moves to the end.
    pub fn record(&mut self, tag: &str, image: &str, tree: BTreeMap<String, String>, at_ms: u64) {
        let changes = summarize(&self.last_tree, &tree, self.versions.is_empty());
        self.versions.retain(|v| v.tag != tag);
        self.versions.push(Version {
            tag: tag.into(),
            image: image.into(),
            at_ms,
            changes,
        });
        self.last_tree = tree;
    }

    /// Versions beyond the newest `keep`, oldest first: what to prune.
    pub fn beyond(&self, keep: usize) -> Vec<Version> {
        let n = self.versions.len().saturating_sub(keep.max(1));
        self.versions[..n].to_vec()
    }

    pub fn forget(&mut self, tags: &[String]) {
        self.versions.retain(|v| !tags.contains(&v.tag));
    }

    /// The version before `current` (the one running).
    pub fn previous(&self, current: &str) -> Option<&Version> {
        let at = self.versions.iter().position(|v| v.tag == current)?;
        at.checked_sub(1).map(|i| &self.versions[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn summaries() {
        let a = t(&[("app.py", "1"), ("old.txt", "1"), ("same", "1")]);
        let b = t(&[("app.py", "2"), ("new.txt", "1"), ("same", "1")]);
        assert_eq!(
            summarize(&a, &b, false),
            "1 changed, 1 added, 1 deleted: app.py, new.txt, old.txt"
        );
        assert_eq!(
            summarize(&a, &a, false),
            "no file change (settings or base changed)"
        );
        assert_eq!(
            summarize(&BTreeMap::new(), &a, true),
            "first version (3 paths)"
        );
    }

    #[test]
    fn record_previous_and_prune() {
        let mut h = History::default();
        h.record("a", "img:a", t(&[("x", "1")]), 1);
        h.record("b", "img:b", t(&[("x", "2")]), 2);
        h.record("c", "img:c", t(&[("x", "3")]), 3);
        assert_eq!(h.previous("c").unwrap().tag, "b");
        assert!(h.previous("a").is_none());
        assert_eq!(
            h.beyond(2)
                .iter()
                .map(|v| v.tag.as_str())
                .collect::<Vec<_>>(),
            ["a"]
        );
        // Rolling back to b makes b the newest; its predecessor is then c.
        h.record("b", "img:b", t(&[("x", "2")]), 4);
        assert_eq!(
            h.versions
                .iter()
                .map(|v| v.tag.as_str())
                .collect::<Vec<_>>(),
            ["a", "c", "b"]
        );
        assert_eq!(h.versions[2].changes, "1 changed: x");
    }
}
