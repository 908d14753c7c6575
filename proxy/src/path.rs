//! Relative paths inside a sync root, validated when they are made and when they are decoded.

use serde::{Deserialize, Serialize};
use std::fmt;

use crate::ProtoError;

/// Longest path accepted, in bytes (Linux's PATH_MAX).
pub const MAX_PATH_BYTES: usize = 4096;

/// A path relative to the sync root: `/`-separated, no empty, `.` or `..` components, not
/// absolute, no NUL byte. The invariant holds for every value, including decoded ones
/// (deserialisation goes through [`RelPath::new`]), so a peer cannot name anything outside
/// the root by the path's spelling. Symlinks are the agent's side of confinement.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RelPath(String);

impl RelPath {
    pub fn new(path: impl Into<String>) -> Result<Self, ProtoError> {
        let path = path.into();
        let bad = |reason| ProtoError::InvalidPath {
            path: path.clone(),
            reason,
        };
        if path.is_empty() {
            return Err(bad("empty"));
        }
        if path.len() > MAX_PATH_BYTES {
            return Err(bad("too long"));
        }
        if path.starts_with('/') {
            return Err(bad("absolute"));
        }
        if path.contains('\0') {
            return Err(bad("contains a NUL byte"));
        }
        for component in path.split('/') {
            match component {
                "" => return Err(bad("empty component")),
                "." => return Err(bad("`.` component")),
                ".." => return Err(bad("`..` component")),
                _ => {}
            }
        }
        Ok(RelPath(path))
    }

    /// Builds a path from a `std::path::Path` relative to a root (laptop side).
    pub fn from_path(path: &std::path::Path) -> Result<Self, ProtoError> {
        let mut parts = Vec::new();
        for c in path.components() {
            match c {
                std::path::Component::Normal(s) => match s.to_str() {
                    Some(s) => parts.push(s),
                    None => {
                        return Err(ProtoError::InvalidPath {
                            path: path.to_string_lossy().into_owned(),
                            reason: "not valid UTF-8",
                        })
                    }
                },
                std::path::Component::CurDir => {}
                _ => {
                    return Err(ProtoError::InvalidPath {
                        path: path.to_string_lossy().into_owned(),
                        reason: "not a plain relative path",
                    })
                }
            }
        }
        RelPath::new(parts.join("/"))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The components, first to last.
    pub fn components(&self) -> impl DoubleEndedIterator<Item = &str> {
        self.0.split('/')
    }

    /// The parent directory, or `None` for a top-level entry.
    pub fn parent(&self) -> Option<RelPath> {
        self.0.rsplit_once('/').map(|(p, _)| RelPath(p.to_string()))
    }

    /// True when `self` is `other` or lies below it.
    pub fn starts_with(&self, other: &RelPath) -> bool {
        self.0 == other.0
            || (self.0.starts_with(&other.0) && self.0.as_bytes().get(other.0.len()) == Some(&b'/'))
    }

    pub fn join(&self, name: &str) -> Result<RelPath, ProtoError> {
        RelPath::new(format!("{}/{}", self.0, name))
    }
}

impl TryFrom<String> for RelPath {
    type Error = ProtoError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        RelPath::new(s)
    }
}

impl From<RelPath> for String {
    fn from(p: RelPath) -> String {
        p.0
    }
}

impl fmt::Display for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_relative_paths() {
        for ok in ["a", "a/b", "a/b.c", ".hidden/x", "a/..b", "...", "sp ace/ü"] {
            assert!(RelPath::new(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn refuses_escapes_and_odd_spellings() {
        for bad in [
            "",
            "/etc/passwd",
            "..",
            "../x",
            "a/../../x",
            "a/..",
            "./a",
            "a//b",
            "a/",
            "a\0b",
        ] {
            assert!(RelPath::new(bad).is_err(), "{bad:?}");
        }
        assert!(RelPath::new("x".repeat(MAX_PATH_BYTES + 1)).is_err());
    }

    #[test]
    fn decoding_validates_too() {
        let bytes = postcard::to_stdvec(&"../etc/shadow".to_string()).unwrap();
        assert!(postcard::from_bytes::<RelPath>(&bytes).is_err());
    }

    #[test]
    fn parent_and_prefix() {
        let p = RelPath::new("a/b/c").unwrap();
        assert_eq!(p.parent().unwrap().as_str(), "a/b");
        assert!(RelPath::new("a").unwrap().parent().is_none());
        assert!(p.starts_with(&RelPath::new("a/b").unwrap()));
        assert!(!RelPath::new("a/bc")
            .unwrap()
            .starts_with(&RelPath::new("a/b").unwrap()));
        assert_eq!(
            RelPath::from_path(std::path::Path::new("./x/y"))
                .unwrap()
                .as_str(),
            "x/y"
        );
        assert!(RelPath::from_path(std::path::Path::new("../x")).is_err());
    }
}
