//! The decision step of the sync, with no IO: given the laptop's tree and what the agent
//! holds, which changes make the agent's equal to the laptop's.

use devloop_proxy::tree::{Entry, Tree, MODE_MASK};
use devloop_proxy::RelPath;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Remove a path (and everything below it).
    Delete(RelPath),
    Mkdir(RelPath, u32),
    /// Send the file's content (its size, for planning).
    Put(RelPath, u32, u64),
    Symlink(RelPath, String),
    Chmod(RelPath, u32),
}

impl Change {
    pub fn path(&self) -> &RelPath {
        match self {
            Change::Delete(p)
            | Change::Mkdir(p, _)
            | Change::Put(p, _, _)
            | Change::Symlink(p, _)
            | Change::Chmod(p, _) => p,
        }
    }
}

/// Changes that turn `agent` into `laptop`, limited to `scope` (paths and everything below
/// them; `None` for the whole tree). Deletions come first, then creations parents-first.
pub fn diff(laptop: &Tree, agent: &Tree, scope: Option<&[RelPath]>) -> Vec<Change> {
    let in_scope = |p: &RelPath| scope.is_none_or(|s| s.iter().any(|root| p.starts_with(root)));
    let mut deletes: Vec<RelPath> = Vec::new();
    let mut creates = Vec::new();

    for (path, have) in agent.iter().filter(|(p, _)| in_scope(p)) {
        let gone = match laptop.get(path) {
            None => true,
            Some(want) => kind(want) != kind(have),
        };
        // A deleted folder takes its children with it.
        if gone && !deletes.last().is_some_and(|d| path.starts_with(d)) {
            deletes.push(path.clone());
        }
    }
    for (path, want) in laptop.iter().filter(|(p, _)| in_scope(p)) {
        let have = agent.get(path).filter(|h| kind(h) == kind(want));
        match (want, have) {
            (Entry::Dir { mode }, None) => creates.push(Change::Mkdir(path.clone(), *mode)),
            (Entry::Dir { .. }, Some(_)) => {}
            (Entry::File { mode, size, .. }, None) => {
                creates.push(Change::Put(path.clone(), *mode, *size))
            }
            (
                Entry::File { mode, size, hash },
                Some(Entry::File {
                    mode: hm, hash: hh, ..
                }),
            ) => {
                if hash != hh {
                    creates.push(Change::Put(path.clone(), *mode, *size));
                } else if mode & MODE_MASK != hm & MODE_MASK {
                    creates.push(Change::Chmod(path.clone(), *mode));
                }
            }
            (Entry::Symlink { target }, Some(Entry::Symlink { target: ht })) if target == ht => {}
            (Entry::Symlink { target }, _) => {
                creates.push(Change::Symlink(path.clone(), target.clone()))
            }
            (Entry::File { mode, size, .. }, Some(_)) => {
                creates.push(Change::Put(path.clone(), *mode, *size))
            }
        }
    }
    deletes
        .into_iter()
        .map(Change::Delete)
        .chain(creates)
        .collect()
}

fn kind(e: &Entry) -> u8 {
    match e {
        Entry::File { .. } => 0,
        Entry::Dir { .. } => 1,
        Entry::Symlink { .. } => 2,
    }
}

/// Applies a change to the model of the agent's tree, as the agent will once it acks.
/// `laptop` supplies the entry that a Put or Mkdir creates.
pub fn apply_to_model(model: &mut Tree, change: &Change, entry: Option<&Entry>) {
    match change {
        Change::Delete(p) => {
            let doomed: Vec<RelPath> = model
                .range(p.clone()..)
                .take_while(|(k, _)| k.starts_with(p))
                .map(|(k, _)| k.clone())
                .collect();
            for k in doomed {
                model.remove(&k);
            }
        }
        Change::Chmod(p, mode) => {
            if let Some(Entry::File { mode: m, .. }) = model.get_mut(p) {
                *m = *mode;
            }
        }
        Change::Mkdir(p, _) | Change::Put(p, _, _) | Change::Symlink(p, _) => {
            if let Some(e) = entry {
                model.insert(p.clone(), e.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> RelPath {
        RelPath::new(s).unwrap()
    }
    fn file(mode: u32, content: &[u8]) -> Entry {
        Entry::File {
            mode,
            size: content.len() as u64,
            hash: devloop_proxy::tree::hash_bytes(content),
        }
    }
    fn tree(entries: &[(&str, Entry)]) -> Tree {
        entries.iter().map(|(k, v)| (p(k), v.clone())).collect()
    }

    #[test]
    fn equal_trees_need_nothing() {
        let t = tree(&[
            ("a", Entry::Dir { mode: 0o755 }),
            ("a/b", file(0o644, b"x")),
        ]);
        assert!(diff(&t, &t, None).is_empty());
    }

    #[test]
    fn content_not_mtime_decides_and_modes_are_chmods() {
        let laptop = tree(&[("a", file(0o755, b"x")), ("b", file(0o644, b"new"))]);
        let agent = tree(&[("a", file(0o644, b"x")), ("b", file(0o644, b"old"))]);
        assert_eq!(
            diff(&laptop, &agent, None),
            vec![Change::Chmod(p("a"), 0o755), Change::Put(p("b"), 0o644, 3)]
        );
    }

    #[test]
    fn deletes_first_and_only_the_topmost() {
        let laptop = tree(&[
            ("new", Entry::Dir { mode: 0o755 }),
            ("new/f", file(0o644, b"1")),
        ]);
        let agent = tree(&[
            ("old", Entry::Dir { mode: 0o755 }),
            ("old/f", file(0o644, b"1")),
            ("old/g", file(0o644, b"2")),
        ]);
        assert_eq!(
            diff(&laptop, &agent, None),
            vec![
                Change::Delete(p("old")),
                Change::Mkdir(p("new"), 0o755),
                Change::Put(p("new/f"), 0o644, 1)
            ]
        );
    }

    #[test]
    fn kind_changes_delete_then_create() {
        let laptop = tree(&[
            ("x", Entry::Symlink { target: "y".into() }),
            ("d", file(0o644, b"")),
        ]);
        let agent = tree(&[
            ("x", file(0o644, b"1")),
            ("d", Entry::Dir { mode: 0o755 }),
            ("d/c", file(0o644, b"1")),
        ]);
        assert_eq!(
            diff(&laptop, &agent, None),
            vec![
                Change::Delete(p("d")),
                Change::Delete(p("x")),
                Change::Put(p("d"), 0o644, 0),
                Change::Symlink(p("x"), "y".into()),
            ]
        );
    }

    #[test]
    fn scope_limits_the_diff() {
        let laptop = tree(&[("a/1", file(0o644, b"1")), ("b/1", file(0o644, b"1"))]);
        let agent = Tree::new();
        let scope = [p("a")];
        assert_eq!(
            diff(&laptop, &agent, Some(&scope)),
            vec![Change::Put(p("a/1"), 0o644, 1)]
        );
    }

    #[test]
    fn model_follows_changes() {
        let laptop = tree(&[
            ("d", Entry::Dir { mode: 0o755 }),
            ("d/f", file(0o644, b"1")),
        ]);
        let mut model = tree(&[
            ("gone", Entry::Dir { mode: 0o755 }),
            ("gone/x", file(0o644, b"1")),
            ("gonez", file(0o644, b"1")),
        ]);
        for c in diff(&laptop, &model.clone(), None) {
            apply_to_model(&mut model, &c, laptop.get(c.path()));
        }
        assert_eq!(model, laptop);
    }
}
