//! What devloop learns from a docker-compose.yml: services, images, builds, ports,
//! environment, commands and dependencies. Only the parts devloop uses are read; the rest of
//! the file is left to compose.

use serde::Deserialize;
use std::collections::BTreeMap;

use super::file::CommandLine;

#[derive(Debug, Default, Deserialize)]
pub struct ComposeFile {
    #[serde(default)]
    pub services: BTreeMap<String, ComposeService>,
}

#[derive(Debug, Default, Deserialize)]
pub struct ComposeService {
    pub image: Option<String>,
    pub build: Option<ComposeBuild>,
    pub command: Option<CommandLine>,
    pub entrypoint: Option<CommandLine>,
    pub working_dir: Option<String>,
    #[serde(default)]
    pub ports: Vec<ComposePort>,
    pub environment: Option<ComposeEnv>,
    pub depends_on: Option<ComposeDependsOn>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum ComposeBuild {
    Context(String),
    Full {
        context: Option<String>,
        dockerfile: Option<String>,
    },
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum ComposePort {
    Number(u32),
    Short(String),
    Long {
        target: u32,
        published: Option<serde_yaml_ng::Value>,
        host_ip: Option<String>,
        protocol: Option<String>,
    },
}

impl ComposePort {
    /// The short `[host_ip:]host:container` form devloop.toml uses too.
    pub fn to_short(&self) -> String {
        match self {
            ComposePort::Number(n) => n.to_string(),
            ComposePort::Short(s) => s.clone(),
            ComposePort::Long {
                target,
                published,
                host_ip,
                protocol,
            } => {
                let published = match published {
                    Some(serde_yaml_ng::Value::Number(n)) => Some(n.to_string()),
                    Some(serde_yaml_ng::Value::String(s)) => Some(s.clone()),
                    _ => None,
                };
                let short = match (host_ip, published) {
                    (Some(ip), Some(p)) => format!("{ip}:{p}:{target}"),
                    (None, Some(p)) => format!("{p}:{target}"),
                    _ => target.to_string(),
                };
                match protocol {
                    Some(proto) => format!("{short}/{proto}"),
                    None => short,
                }
            }
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum ComposeEnv {
    Map(BTreeMap<String, Option<serde_yaml_ng::Value>>),
    List(Vec<String>),
}

impl ComposeEnv {
    pub fn to_map(&self) -> BTreeMap<String, String> {
        match self {
            ComposeEnv::Map(m) => m
                .iter()
                .map(|(k, v)| {
                    let v = match v {
                        // As compose does: a name without a value takes the laptop's.
                        None | Some(serde_yaml_ng::Value::Null) => {
                            std::env::var(k).unwrap_or_default()
                        }
                        Some(serde_yaml_ng::Value::String(s)) => s.clone(),
                        Some(serde_yaml_ng::Value::Number(n)) => n.to_string(),
                        Some(serde_yaml_ng::Value::Bool(b)) => b.to_string(),
                        Some(other) => serde_yaml_ng::to_string(other)
                            .unwrap_or_default()
                            .trim()
                            .to_string(),
                    };
                    (k.clone(), v)
                })
                .collect(),
            ComposeEnv::List(l) => l
                .iter()
                .map(|kv| match kv.split_once('=') {
                    Some((k, v)) => (k.to_string(), v.to_string()),
                    None => (kv.clone(), std::env::var(kv).unwrap_or_default()),
                })
                .collect(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum ComposeDependsOn {
    List(Vec<String>),
    Map(BTreeMap<String, serde_yaml_ng::Value>),
}

impl ComposeDependsOn {
    pub fn names(&self) -> Vec<String> {
        match self {
            ComposeDependsOn::List(l) => l.clone(),
            ComposeDependsOn::Map(m) => m.keys().cloned().collect(),
        }
    }
}
