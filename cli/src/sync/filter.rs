//! Which laptop paths are synced. One [`Filter`] answers for both the full scan and single
//! watcher events, so the two can never disagree.
//!
//! Rules, in gitignore syntax: built-in defaults, then the root's .gitignore, .dockerignore and
//! .devloopignore, then the config's `exclude`; .gitignore and .devloopignore files in
//! sub-folders apply below them. Later and deeper rules win, as in git.

use ignore::gitignore::{Gitignore, GitignoreBuilder};
use ignore::Match;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Always excluded: version control, editors' swap and backup files.
pub const DEFAULT_EXCLUDES: &[&str] = &[
    ".git/",
    ".hg/",
    ".svn/",
    ".DS_Store",
    "*.swp",
    "*.swo",
    "*.swx",
    "*~",
    ".#*",
    "#*#",
    "4913",
    "*___jb_tmp___",
    "*___jb_old___",
    ".idea/",
    ".devloop-tmp-*",
];

/// Ignore files read at the root; the ones marked nested are read in sub-folders too.
const ROOT_IGNORE_FILES: &[(&str, bool)] = &[
    (".gitignore", true),
    (".dockerignore", false),
    (".devloopignore", true),
];

#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    #[error("{file}: {message}")]
    Rule { file: String, message: String },
}

#[derive(Debug, Clone)]
pub struct FilterSettings {
    pub excludes: Vec<String>,
    pub include_node_modules: bool,
}

/// Matchers by folder (relative; "" is the root).
#[derive(Clone)]
pub struct Filter {
    root: PathBuf,
    settings: FilterSettings,
    matchers: BTreeMap<PathBuf, Gitignore>,
}

impl Filter {
    /// Reads the root's rules. Nested ignore files are added by [`Filter::load_dir`] as the scan
    /// meets them.
    pub fn new(root: &Path, settings: FilterSettings) -> Result<Self, FilterError> {
        let mut b = GitignoreBuilder::new(root);
        for (name, _) in ROOT_IGNORE_FILES {
            let path = root.join(name);
            if path.is_file() {
                if let Some(err) = b.add(&path) {
                    return Err(FilterError::Rule {
                        file: path.display().to_string(),
                        message: err.to_string(),
                    });
                }
            }
        }
        for rule in &settings.excludes {
            add_line(&mut b, rule, "devloop.toml exclude")?;
        }
        // Last, so they win: no `!` line in an ignore file can bring .git back, and the
        // config's node_modules switch beats a .gitignore that lists node_modules.
        for rule in DEFAULT_EXCLUDES {
            add_line(&mut b, rule, "built-in excludes")?;
        }
        let node_modules = if settings.include_node_modules {
            "!node_modules/"
        } else {
            "node_modules/"
        };
        add_line(&mut b, node_modules, "built-in excludes")?;
        let root_matcher = b.build().map_err(|e| FilterError::Rule {
            file: root.display().to_string(),
            message: e.to_string(),
        })?;
        let mut matchers = BTreeMap::new();
        matchers.insert(PathBuf::new(), root_matcher);
        Ok(Filter {
            root: root.to_path_buf(),
            settings,
            matchers,
        })
    }

    /// Reads the nested ignore files of `dir` (relative), if any.
    pub fn load_dir(&mut self, dir: &Path) {
        if dir.as_os_str().is_empty() {
            return;
        }
        let abs = self.root.join(dir);
        let mut b = GitignoreBuilder::new(&abs);
        let mut any = false;
        for (name, nested) in ROOT_IGNORE_FILES {
            let path = abs.join(name);
            if *nested && path.is_file() {
                // A broken nested rule file is skipped rather than stopping the sync; its
                // valid lines still apply (the builder keeps them).
                let _ = b.add(&path);
                any = true;
            }
        }
        if any {
            if let Ok(m) = b.build() {
                self.matchers.insert(dir.to_path_buf(), m);
            }
        } else {
            self.matchers.remove(dir);
        }
    }

    /// True when an ignore file's name is `name`: a change to it changes the rules.
    pub fn is_rule_file(name: &str) -> bool {
        ROOT_IGNORE_FILES.iter().any(|(n, _)| *n == name)
    }

    pub fn settings(&self) -> &FilterSettings {
        &self.settings
    }

    /// Whether `rel` (relative to the root) is excluded, itself or through a parent folder.
    pub fn is_ignored(&self, rel: &Path, is_dir: bool) -> bool {
        let mut prefix = PathBuf::new();
        let components: Vec<_> = rel.components().collect();
        for (i, c) in components.iter().enumerate() {
            prefix.push(c);
            let last = i + 1 == components.len();
            if self.matches(&prefix, if last { is_dir } else { true }) {
                return true;
            }
        }
        false
    }

    /// Whether the rules exclude `rel` itself (not looking at its parents).
    fn matches(&self, rel: &Path, is_dir: bool) -> bool {
        let mut verdict = Match::None;
        // Shallow to deep: a deeper folder's rules are applied last and win.
        for (dir, m) in &self.matchers {
            if rel.starts_with(dir) && rel != dir.as_path() {
                let abs = self.root.join(rel);
                match m.matched(&abs, is_dir) {
                    Match::None => {}
                    other => verdict = other,
                }
            }
        }
        verdict.is_ignore()
    }
}

fn add_line(b: &mut GitignoreBuilder, line: &str, from: &str) -> Result<(), FilterError> {
    b.add_line(None, line)
        .map(|_| ())
        .map_err(|e| FilterError::Rule {
            file: from.to_string(),
            message: e.to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter(dir: &Path, excludes: &[&str]) -> Filter {
        Filter::new(
            dir,
            FilterSettings {
                excludes: excludes.iter().map(|s| s.to_string()).collect(),
                include_node_modules: false,
            },
        )
        .unwrap()
    }

    #[test]
    fn defaults_and_files_and_config() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join(".gitignore"), "*.log\n!keep.log\nbuild/\n").unwrap();
        std::fs::write(d.path().join(".dockerignore"), "secret.txt\n").unwrap();
        std::fs::write(d.path().join(".devloopignore"), "big/\n").unwrap();
        let f = filter(d.path(), &["*.pyc", "__pycache__/"]);
        let ig = |p: &str, dir: bool| f.is_ignored(Path::new(p), dir);
        assert!(ig(".git", true));
        assert!(ig(".git/HEAD", false));
        assert!(ig("src/.app.py.swp", false));
        assert!(ig("node_modules/x/index.js", false));
        assert!(ig("a.log", false));
        assert!(!ig("keep.log", false));
        assert!(ig("build/out.o", false));
        assert!(ig("secret.txt", false));
        assert!(ig("big/blob", false));
        assert!(ig("x/y.pyc", false));
        assert!(ig("pkg/__pycache__/m.cpython-311.pyc", false));
        assert!(!ig("src/app.py", false));
        assert!(!ig(".gitignore", false));
    }

    #[test]
    fn nested_gitignore_applies_below_its_folder() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("sub/deeper")).unwrap();
        std::fs::write(d.path().join("sub/.gitignore"), "*.tmp\n").unwrap();
        let mut f = filter(d.path(), &[]);
        f.load_dir(Path::new("sub"));
        assert!(f.is_ignored(Path::new("sub/a.tmp"), false));
        assert!(f.is_ignored(Path::new("sub/deeper/a.tmp"), false));
        assert!(!f.is_ignored(Path::new("a.tmp"), false));
    }

    #[test]
    fn built_in_rules_win_over_ignore_files() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join(".gitignore"), "!.git/\nnode_modules/\n").unwrap();
        let f = filter(d.path(), &[]);
        assert!(f.is_ignored(Path::new(".git/HEAD"), false));
        let f = Filter::new(
            d.path(),
            FilterSettings {
                excludes: vec![],
                include_node_modules: true,
            },
        )
        .unwrap();
        assert!(!f.is_ignored(Path::new("node_modules/x.js"), false));
    }

    #[test]
    fn node_modules_when_asked() {
        let d = tempfile::tempdir().unwrap();
        let f = Filter::new(
            d.path(),
            FilterSettings {
                excludes: vec![],
                include_node_modules: true,
            },
        )
        .unwrap();
        assert!(!f.is_ignored(Path::new("node_modules/x.js"), false));
    }
}
