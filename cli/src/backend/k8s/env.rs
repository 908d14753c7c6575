//! The environment of an intercepted container, for the laptop process: literal `env`
//! values, values from Secrets and ConfigMaps (`valueFrom`, `envFrom`, with their prefixes
//! and `optional`), the namespace from `fieldRef`, and `$(VAR)` references expanded as the
//! kubelet does. What only a running pod knows (its IP, its node, resource limits) is left
//! out and named, so the user sees what the laptop process lacks.

use base64::Engine;
use serde_json::Value;
use std::collections::BTreeMap;

use super::Cluster;

/// A Secret's or ConfigMap's data, by (kind, name); None when it does not exist.
pub type Sources = BTreeMap<(Kind, String), Option<BTreeMap<String, String>>>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Secret,
    ConfigMap,
}

impl Kind {
    fn resource(self) -> &'static str {
        match self {
            Kind::Secret => "secrets",
            Kind::ConfigMap => "configmaps",
        }
    }
}

/// The resolved environment and a note per variable that could not be given.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Resolved {
    pub vars: Vec<(String, String)>,
    pub skipped: Vec<String>,
}

/// The Secrets and ConfigMaps the container's environment refers to.
pub fn references(container: &Value) -> Vec<(Kind, String)> {
    let mut out = Vec::new();
    for e in container["envFrom"].as_array().into_iter().flatten() {
        if let Some(n) = e["secretRef"]["name"].as_str() {
            out.push((Kind::Secret, n.to_string()));
        }
        if let Some(n) = e["configMapRef"]["name"].as_str() {
            out.push((Kind::ConfigMap, n.to_string()));
        }
    }
    for e in container["env"].as_array().into_iter().flatten() {
        if let Some(n) = e["valueFrom"]["secretKeyRef"]["name"].as_str() {
            out.push((Kind::Secret, n.to_string()));
        }
        if let Some(n) = e["valueFrom"]["configMapKeyRef"]["name"].as_str() {
            out.push((Kind::ConfigMap, n.to_string()));
        }
    }
    out.sort();
    out.dedup();
    out
}

/// Reads what the container refers to. A permission the user lacks is named in the
/// error, as everywhere else.
pub async fn fetch(
    cluster: &Cluster,
    refs: &[(Kind, String)],
) -> Result<Sources, super::KubeError> {
    let mut out = Sources::new();
    for (kind, name) in refs {
        let path = cluster.path("v1", kind.resource(), Some(name));
        let v = cluster.get_opt(&path).await.map_err(|e| {
            cluster.err(
                e,
                "get",
                kind.resource(),
                format!(
                    "reading {}/{name} for the laptop's environment",
                    kind.resource()
                ),
            )
        })?;
        let data = v.map(|v| {
            let mut m = BTreeMap::new();
            for (k, val) in v["data"].as_object().into_iter().flatten() {
                let Some(s) = val.as_str() else { continue };
                let text = match kind {
                    Kind::Secret => base64::engine::general_purpose::STANDARD
                        .decode(s)
                        .ok()
                        .and_then(|b| String::from_utf8(b).ok()),
                    Kind::ConfigMap => Some(s.to_string()),
                };
                if let Some(t) = text {
                    m.insert(k.clone(), t);
                }
            }
            m
        });
        out.insert((*kind, name.clone()), data);
    }
    Ok(out)
}

/// The container's environment as the kubelet would give it: `envFrom` first, then `env`
/// in order (later wins), each `$(VAR)` replaced by a variable defined before it.
pub fn resolve(container: &Value, namespace: &str, sources: &Sources) -> Resolved {
    let mut vars: Vec<(String, String)> = Vec::new();
    let mut skipped = Vec::new();
    let set = |vars: &mut Vec<(String, String)>, k: String, v: String| match vars
        .iter_mut()
        .find(|(n, _)| *n == k)
    {
        Some(slot) => slot.1 = v,
        None => vars.push((k, v)),
    };
    for e in container["envFrom"].as_array().into_iter().flatten() {
        let prefix = e["prefix"].as_str().unwrap_or_default();
        let (kind, r) = if e["secretRef"].is_object() {
            (Kind::Secret, &e["secretRef"])
        } else {
            (Kind::ConfigMap, &e["configMapRef"])
        };
        let Some(name) = r["name"].as_str() else {
            continue;
        };
        match sources.get(&(kind, name.to_string())).cloned().flatten() {
            Some(data) => {
                for (k, v) in data {
                    set(&mut vars, format!("{prefix}{k}"), v);
                }
            }
            None if r["optional"].as_bool() == Some(true) => {}
            None => skipped.push(format!("envFrom {}/{name}: not found", kind.resource())),
        }
    }
    for e in container["env"].as_array().into_iter().flatten() {
        let Some(name) = e["name"].as_str() else {
            continue;
        };
        if let Some(v) = e["value"].as_str() {
            let expanded = expand(v, &vars);
            set(&mut vars, name.to_string(), expanded);
            continue;
        }
        let from = &e["valueFrom"];
        let by_key = |kind: Kind, r: &Value| -> Result<Option<String>, String> {
            let (Some(src), Some(key)) = (r["name"].as_str(), r["key"].as_str()) else {
                return Err("a reference without name or key".into());
            };
            match sources
                .get(&(kind, src.to_string()))
                .cloned()
                .flatten()
                .and_then(|d| d.get(key).cloned())
            {
                Some(v) => Ok(Some(v)),
                None if r["optional"].as_bool() == Some(true) => Ok(None),
                None => Err(format!("{}/{src} has no key `{key}`", kind.resource())),
            }
        };
        let value = if from["secretKeyRef"].is_object() {
            by_key(Kind::Secret, &from["secretKeyRef"])
        } else if from["configMapKeyRef"].is_object() {
            by_key(Kind::ConfigMap, &from["configMapKeyRef"])
        } else if from["fieldRef"]["fieldPath"].as_str() == Some("metadata.namespace") {
            Ok(Some(namespace.to_string()))
        } else if let Some(path) = from["fieldRef"]["fieldPath"].as_str() {
            Err(format!("fieldRef {path} is known only inside a pod"))
        } else if from["resourceFieldRef"].is_object() {
            Err("resourceFieldRef is known only inside a pod".into())
        } else {
            Err("an unknown valueFrom".into())
        };
        match value {
            Ok(Some(v)) => set(&mut vars, name.to_string(), v),
            Ok(None) => {}
            Err(why) => skipped.push(format!("{name}: {why}")),
        }
    }
    Resolved { vars, skipped }
}

/// `$(VAR)` -> VAR's value when defined earlier; `$$(VAR)` -> `$(VAR)`; anything else stays.
fn expand(value: &str, vars: &[(String, String)]) -> String {
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let tail = &rest[at..];
        if let Some(after) = tail.strip_prefix("$$") {
            out.push('$');
            rest = after;
        } else if let Some(inner) = tail.strip_prefix("$(") {
            match inner.find(')') {
                Some(end) => {
                    let name = &inner[..end];
                    match vars.iter().find(|(k, _)| k == name) {
                        Some((_, v)) => out.push_str(v),
                        None => {
                            out.push_str("$(");
                            out.push_str(name);
                            out.push(')');
                        }
                    }
                    rest = &inner[end + 1..];
                }
                None => {
                    out.push_str(tail);
                    rest = "";
                }
            }
        } else {
            out.push('$');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sources() -> Sources {
        let mut s = Sources::new();
        s.insert(
            (Kind::Secret, "db".into()),
            Some(
                [
                    ("password".to_string(), "s3cret".to_string()),
                    ("user".into(), "shop".into()),
                ]
                .into(),
            ),
        );
        s.insert(
            (Kind::ConfigMap, "settings".into()),
            Some(
                [
                    ("LEVEL".to_string(), "debug".to_string()),
                    ("PORT".into(), "1".into()),
                ]
                .into(),
            ),
        );
        s.insert((Kind::ConfigMap, "gone".into()), None);
        s
    }

    #[test]
    fn env_from_then_env_with_refs_fields_and_expansion() {
        let c = json!({
            "envFrom": [
                {"configMapRef": {"name": "settings"}},
                {"secretRef": {"name": "db"}, "prefix": "DB_"},
                {"configMapRef": {"name": "gone", "optional": true}},
            ],
            "env": [
                {"name": "PORT", "value": "8000"},
                {"name": "URL", "value": "http://$(DB_user)@db:$(PORT)/$(NOPE) $$(PORT)"},
                {"name": "PASSWORD", "valueFrom": {"secretKeyRef": {"name": "db", "key": "password"}}},
                {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                {"name": "OPT", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "missing", "optional": true}}},
                {"name": "REQ", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "missing"}}},
            ],
        });
        let r = resolve(&c, "team-a", &sources());
        let get = |k: &str| r.vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("LEVEL"), Some("debug"));
        // env overrides envFrom, keeping its place.
        assert_eq!(get("PORT"), Some("8000"));
        assert_eq!(get("DB_password"), Some("s3cret"));
        assert_eq!(get("URL"), Some("http://shop@db:8000/$(NOPE) $(PORT)"));
        assert_eq!(get("PASSWORD"), Some("s3cret"));
        assert_eq!(get("NS"), Some("team-a"));
        assert_eq!(get("IP"), None);
        assert_eq!(get("OPT"), None);
        assert_eq!(r.skipped.len(), 2, "{:?}", r.skipped);
        assert!(r.skipped[0].starts_with("IP: fieldRef status.podIP"));
        assert!(r.skipped[1].contains("configmaps/settings has no key `missing`"));
    }

    #[test]
    fn references_are_listed_once() {
        let c = json!({
            "envFrom": [{"secretRef": {"name": "db"}}],
            "env": [{"name": "A", "valueFrom": {"secretKeyRef": {"name": "db", "key": "x"}}}, {"name": "B", "valueFrom": {"configMapKeyRef": {"name": "c", "key": "y"}}}],
        });
        assert_eq!(
            references(&c),
            vec![(Kind::Secret, "db".into()), (Kind::ConfigMap, "c".into())]
        );
    }

    #[test]
    fn a_missing_required_source_is_named() {
        let c = json!({"envFrom": [{"configMapRef": {"name": "gone"}}]});
        let r = resolve(&c, "ns", &sources());
        assert_eq!(
            r.skipped,
            vec!["envFrom configmaps/gone: not found".to_string()]
        );
    }
}
