//! The effective settings of a project: devloop.toml and docker-compose.yml read, checked and
//! merged into one [`Project`]. Reading the files and resolving them are separate steps so the
//! merge rules are tested without touching the disk.

pub mod compose;
pub mod file;

use globset::{Glob, GlobSet, GlobSetBuilder};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use self::compose::ComposeFile;
use self::file::{DevloopFile, OnExit, RuleAction, ServiceSection};

pub const CONFIG_FILE: &str = "devloop.toml";
pub const COMPOSE_FILES: [&str; 4] = [
    "docker-compose.yml",
    "docker-compose.yaml",
    "compose.yml",
    "compose.yaml",
];

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("no {CONFIG_FILE} or docker-compose.yml in {0} or any folder above it; run devloop in a project folder")]
    NotFound(PathBuf),
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: service `{service}`: {message}")]
    Invalid {
        path: PathBuf,
        service: String,
        message: String,
    },
    #[error("unknown service `{0}`; the project has: {1}")]
    UnknownService(String, String),
}

/// A whole project, ready to act on.
#[derive(Debug, Clone)]
pub struct Project {
    pub name: String,
    /// The folder holding devloop.toml (or docker-compose.yml).
    pub dir: PathBuf,
    /// Where the settings came from, for messages.
    pub sources: Vec<PathBuf>,
    pub on_exit: OnExit,
    /// Versions of each service `deploy` keeps.
    pub keep_versions: usize,
    /// `[target]`: where the services run.
    pub target: file::TargetSection,
    /// Services, dependencies before their dependents.
    pub services: Vec<Service>,
    /// `[sessions.NAME]`: filtered intercepts of several services at once.
    pub sessions: std::collections::BTreeMap<String, file::SessionSection>,
}

#[derive(Debug, Clone)]
pub struct Service {
    pub name: String,
    pub image: ImageSource,
    pub workdir: Option<String>,
    pub command: Option<Vec<String>>,
    pub entrypoint: Option<Vec<String>>,
    pub ports: Vec<PortMapping>,
    pub environment: BTreeMap<String, String>,
    pub depends_on: Vec<String>,
    pub sync: Option<SyncMapping>,
    pub excludes: Vec<String>,
    pub include_node_modules: bool,
    /// Build inputs of the snapshot base, relative to the build context.
    pub build_inputs: Vec<String>,
    pub rules: Rules,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageSource {
    Image(String),
    Build {
        context: PathBuf,
        dockerfile: PathBuf,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PortMapping {
    pub host_ip: Option<String>,
    pub host_port: Option<u16>,
    pub container_port: u16,
}

impl PortMapping {
    /// Parses `8080`, `8080:80`, `127.0.0.1:8080:80` and an optional `/tcp` suffix.
    pub fn parse(spec: &str) -> Result<Self, String> {
        let spec = spec.strip_suffix("/tcp").unwrap_or(spec);
        if spec.ends_with("/udp") {
            return Err(format!("port {spec:?}: udp ports are not supported"));
        }
        let port = |s: &str| {
            s.parse::<u16>()
                .map_err(|_| format!("port {spec:?}: {s:?} is not a port number"))
        };
        let parts: Vec<&str> = spec.split(':').collect();
        match parts.as_slice() {
            [c] => Ok(PortMapping {
                host_ip: None,
                host_port: None,
                container_port: port(c)?,
            }),
            [h, c] => Ok(PortMapping {
                host_ip: None,
                host_port: Some(port(h)?),
                container_port: port(c)?,
            }),
            [ip, h, c] => Ok(PortMapping {
                host_ip: Some(ip.to_string()),
                host_port: if h.is_empty() { None } else { Some(port(h)?) },
                container_port: port(c)?,
            }),
            _ => Err(format!("port {spec:?}: expected [HOST_IP:]HOST:CONTAINER")),
        }
    }
}

#[derive(Debug, Clone)]
pub struct SyncMapping {
    /// Absolute laptop folder.
    pub laptop_dir: PathBuf,
    /// Absolute container folder.
    pub container_dir: String,
}

/// Live-update rules: for each changed path the first rule whose globs match decides.
/// A path no rule matches is synced and restarts the process (the safe default).
#[derive(Debug, Clone, Default)]
pub struct Rules {
    rules: Vec<Rule>,
}

#[derive(Debug, Clone)]
pub struct Rule {
    pub globs: GlobSet,
    pub patterns: Vec<String>,
    pub action: RuleAction,
    pub run: Option<Vec<String>>,
}

/// What a set of changes asks of the process, strongest first: a command to run and a
/// restart, a restart, or nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reaction {
    None,
    Restart,
    RunThenRestart(Vec<Vec<String>>),
    /// A new version: snapshot and roll out (strongest; the files are not synced first).
    Redeploy,
}

impl Rules {
    pub fn new(rules: Vec<Rule>) -> Self {
        Rules { rules }
    }

    pub fn reaction<'a>(&self, changed: impl IntoIterator<Item = &'a str>) -> Reaction {
        let mut restart = false;
        let mut redeploy = false;
        let mut runs: Vec<Vec<String>> = Vec::new();
        for path in changed {
            match self.rules.iter().find(|r| r.globs.is_match(path)) {
                Some(Rule {
                    action: RuleAction::Sync,
                    ..
                }) => {}
                Some(Rule {
                    action: RuleAction::Redeploy,
                    ..
                }) => redeploy = true,
                Some(Rule {
                    action: RuleAction::Run,
                    run: Some(cmd),
                    ..
                }) => {
                    restart = true;
                    if !runs.contains(cmd) {
                        runs.push(cmd.clone());
                    }
                }
                _ => restart = true,
            }
        }
        if redeploy {
            return Reaction::Redeploy;
        }
        match (runs.is_empty(), restart) {
            (false, _) => Reaction::RunThenRestart(runs),
            (true, true) => Reaction::Restart,
            (true, false) => Reaction::None,
        }
    }
}

/// Finds the project folder: the nearest folder at or above `start` holding devloop.toml or a
/// compose file.
pub fn find_project_dir(start: &Path) -> Result<PathBuf, ConfigError> {
    let mut dir = Some(start);
    while let Some(d) = dir {
        if d.join(CONFIG_FILE).is_file() || COMPOSE_FILES.iter().any(|f| d.join(f).is_file()) {
            return Ok(d.to_path_buf());
        }
        dir = d.parent();
    }
    Err(ConfigError::NotFound(start.to_path_buf()))
}

/// Reads and resolves the project in `dir`.
pub fn load(dir: &Path) -> Result<Project, ConfigError> {
    let dir = dir.canonicalize().map_err(|source| ConfigError::Read {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut sources = Vec::new();
    let devloop_path = dir.join(CONFIG_FILE);
    let devloop = if devloop_path.is_file() {
        let text = read(&devloop_path)?;
        sources.push(devloop_path.clone());
        parse_devloop(&devloop_path, &text)?
    } else {
        DevloopFile::default()
    };
    let mut compose = None;
    for name in COMPOSE_FILES {
        let path = dir.join(name);
        if path.is_file() {
            let text = read(&path)?;
            compose = Some(parse_compose(&path, &text)?);
            sources.push(path);
            break;
        }
    }
    resolve(&dir, sources, devloop, compose.unwrap_or_default())
}

fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })
}

pub fn parse_devloop(path: &Path, text: &str) -> Result<DevloopFile, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError::Parse {
        path: path.to_path_buf(),
        message: e.to_string().trim_end().to_string(),
    })
}

pub fn parse_compose(path: &Path, text: &str) -> Result<ComposeFile, ConfigError> {
    serde_yaml_ng::from_str(text).map_err(|e| ConfigError::Parse {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// Merges devloop.toml over the compose file: compose says what runs, devloop.toml adds what
/// compose cannot say (sync, rules) and may override the rest.
pub fn resolve(
    dir: &Path,
    sources: Vec<PathBuf>,
    devloop: DevloopFile,
    compose: ComposeFile,
) -> Result<Project, ConfigError> {
    let config_path = sources
        .first()
        .cloned()
        .unwrap_or_else(|| dir.join(CONFIG_FILE));
    let name = devloop.project.clone().unwrap_or_else(|| {
        dir.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "project".into())
    });
    let name = sanitize_name(&name);

    let mut names: Vec<String> = compose.services.keys().cloned().collect();
    for n in devloop.services.keys() {
        if !names.contains(n) {
            names.push(n.clone());
        }
    }
    let empty = ServiceSection::default();
    let mut services = Vec::new();
    for svc in &names {
        let d = devloop.services.get(svc).unwrap_or(&empty);
        let c = compose.services.get(svc);
        let invalid = |message: String| ConfigError::Invalid {
            path: config_path.clone(),
            service: svc.clone(),
            message,
        };

        let image = if let Some(b) = &d.build {
            let context = dir.join(&b.context);
            let dockerfile = context.join(b.dockerfile.as_deref().unwrap_or("Dockerfile"));
            ImageSource::Build {
                context,
                dockerfile,
            }
        } else if let Some(i) = &d.image {
            ImageSource::Image(i.clone())
        } else if let Some(b) = c.and_then(|c| c.build.as_ref()) {
            let (ctx, df) = match b {
                compose::ComposeBuild::Context(ctx) => (ctx.clone(), None),
                compose::ComposeBuild::Full {
                    context,
                    dockerfile,
                } => (
                    context.clone().unwrap_or_else(|| ".".into()),
                    dockerfile.clone(),
                ),
            };
            let context = dir.join(ctx);
            let dockerfile = context.join(df.as_deref().unwrap_or("Dockerfile"));
            ImageSource::Build {
                context,
                dockerfile,
            }
        } else if let Some(i) = c.and_then(|c| c.image.clone()) {
            ImageSource::Image(i)
        } else {
            return Err(invalid(
                "no `image` or `build`: add one to devloop.toml or docker-compose.yml".into(),
            ));
        };

        let command = match d.command.as_ref().or(c.and_then(|c| c.command.as_ref())) {
            Some(cmd) => Some(
                cmd.to_argv()
                    .map_err(|e| invalid(format!("command: {e}")))?,
            ),
            None => None,
        };
        let entrypoint = match d
            .entrypoint
            .as_ref()
            .or(c.and_then(|c| c.entrypoint.as_ref()))
        {
            Some(cmd) => Some(
                cmd.to_argv()
                    .map_err(|e| invalid(format!("entrypoint: {e}")))?,
            ),
            None => None,
        };
        let port_specs: Vec<String> = match &d.ports {
            Some(p) => p.clone(),
            None => c
                .map(|c| c.ports.iter().map(|p| p.to_short()).collect())
                .unwrap_or_default(),
        };
        let ports = port_specs
            .iter()
            .map(|p| PortMapping::parse(p).map_err(|e| invalid(format!("ports: {e}"))))
            .collect::<Result<Vec<_>, _>>()?;
        let mut environment = c
            .and_then(|c| c.environment.as_ref())
            .map(|e| e.to_map())
            .unwrap_or_default();
        if let Some(env) = &d.environment {
            environment.extend(env.clone());
        }
        let depends_on = d
            .depends_on
            .clone()
            .or_else(|| c.and_then(|c| c.depends_on.as_ref()).map(|d| d.names()))
            .unwrap_or_default();
        for dep in &depends_on {
            if !names.contains(dep) {
                return Err(invalid(format!(
                    "depends_on names `{dep}`, which is not a service"
                )));
            }
        }
        let workdir = d
            .workdir
            .clone()
            .or_else(|| c.and_then(|c| c.working_dir.clone()));
        let sync = match &d.sync {
            Some(s) => {
                if !s.to.starts_with('/') {
                    return Err(invalid(format!(
                        "sync.to must be an absolute container path, not {:?}",
                        s.to
                    )));
                }
                if s.to.trim_end_matches('/').is_empty() {
                    return Err(invalid("sync.to cannot be the container's root `/`: name the folder the service's files live in".into()));
                }
                let laptop_dir = dir.join(&s.from);
                Some(SyncMapping {
                    laptop_dir,
                    container_dir: s.to.trim_end_matches('/').to_string(),
                })
            }
            None => None,
        };
        let mut rules = Vec::new();
        for (i, r) in d.on_change.iter().enumerate() {
            let mut b = GlobSetBuilder::new();
            for p in &r.paths {
                let glob =
                    Glob::new(p).map_err(|e| invalid(format!("on_change[{i}].paths: {e}")))?;
                b.add(glob);
            }
            let globs = b
                .build()
                .map_err(|e| invalid(format!("on_change[{i}].paths: {e}")))?;
            let run = match (&r.action, &r.run) {
                (RuleAction::Run, Some(cmd)) => Some(
                    cmd.to_argv()
                        .map_err(|e| invalid(format!("on_change[{i}].run: {e}")))?,
                ),
                (RuleAction::Run, None) => {
                    return Err(invalid(format!(
                        "on_change[{i}]: action \"run\" needs `run = [...]`"
                    )))
                }
                (_, Some(_)) => {
                    return Err(invalid(format!(
                        "on_change[{i}]: `run` only goes with action = \"run\""
                    )))
                }
                (_, None) => None,
            };
            rules.push(Rule {
                globs,
                patterns: r.paths.clone(),
                action: r.action,
                run,
            });
        }
        services.push(Service {
            name: svc.clone(),
            image,
            workdir,
            command,
            entrypoint,
            ports,
            environment,
            depends_on,
            sync,
            excludes: d.exclude.clone(),
            include_node_modules: d.include_node_modules,
            build_inputs: d.build_inputs.clone(),
            rules: Rules::new(rules),
        });
    }
    let services = order_by_dependencies(services).map_err(|cycle| ConfigError::Invalid {
        path: config_path.clone(),
        service: cycle,
        message: "depends_on forms a cycle".into(),
    })?;
    Ok(Project {
        name,
        dir: dir.to_path_buf(),
        sources,
        on_exit: devloop.up.on_exit.unwrap_or(OnExit::Keep),
        keep_versions: devloop.deploy.keep.unwrap_or(5).max(1),
        target: devloop.target.clone(),
        services,
        sessions: devloop.sessions.clone(),
    })
}

/// Dependencies first; otherwise in name order (the files are read into sorted maps).
/// Err names a service in a cycle.
fn order_by_dependencies(mut pending: Vec<Service>) -> Result<Vec<Service>, String> {
    let mut done: Vec<Service> = Vec::new();
    while !pending.is_empty() {
        let ready = pending.iter().position(|s| {
            s.depends_on
                .iter()
                .all(|d| done.iter().any(|x| &x.name == d))
        });
        match ready {
            Some(i) => done.push(pending.remove(i)),
            None => return Err(pending[0].name.clone()),
        }
    }
    Ok(done)
}

/// Docker names allow `[a-zA-Z0-9][a-zA-Z0-9_.-]`; compose lower-cases project names.
pub fn sanitize_name(name: &str) -> String {
    let s: String = name
        .to_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .collect();
    let s = s.trim_matches(|c| c == '-' || c == '_').to_string();
    if s.is_empty() {
        "project".into()
    } else {
        s
    }
}

impl Project {
    /// The named services, or every service when `names` is empty.
    pub fn select(&self, names: &[String]) -> Result<Vec<&Service>, ConfigError> {
        if names.is_empty() {
            Ok(self.services.iter().collect())
        } else {
            names.iter().map(|n| self.service(n)).collect()
        }
    }

    pub fn service(&self, name: &str) -> Result<&Service, ConfigError> {
        self.services
            .iter()
            .find(|s| s.name == name)
            .ok_or_else(|| {
                ConfigError::UnknownService(
                    name.into(),
                    self.services
                        .iter()
                        .map(|s| s.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn project(devloop: &str, compose: &str) -> Result<Project, ConfigError> {
        let dir = Path::new("/work/shop");
        let d = parse_devloop(&dir.join(CONFIG_FILE), devloop)?;
        let c = parse_compose(&dir.join("docker-compose.yml"), compose)?;
        resolve(dir, vec![dir.join(CONFIG_FILE)], d, c)
    }

    const COMPOSE: &str = r#"
services:
  web:
    build: ./web
    ports: ["8080:8080"]
    environment:
      API_URL: http://api:8000
    depends_on: [api]
  api:
    build:
      context: ./api
    environment: ["PORT=8000"]
    command: python3 app.py --port 8000
"#;

    #[test]
    fn compose_gives_services_and_devloop_adds_sync() {
        let p = project(
            r#"
[services.api]
sync = { from = "api", to = "/app/" }
on_change = [{ paths = ["**/*.py"], action = "restart" }, { paths = ["static/**"], action = "sync" }]
[services.web.environment]
EXTRA = "1"
"#,
            COMPOSE,
        )
        .unwrap();
        assert_eq!(p.name, "shop");
        // api first: web depends on it.
        assert_eq!(
            p.services
                .iter()
                .map(|s| s.name.as_str())
                .collect::<Vec<_>>(),
            ["api", "web"]
        );
        let api = p.service("api").unwrap();
        assert_eq!(
            api.command.as_deref().unwrap(),
            ["python3", "app.py", "--port", "8000"]
        );
        assert_eq!(api.environment["PORT"], "8000");
        let sync = api.sync.as_ref().unwrap();
        assert_eq!(sync.laptop_dir, Path::new("/work/shop/api"));
        assert_eq!(sync.container_dir, "/app");
        assert_eq!(
            api.image,
            ImageSource::Build {
                context: "/work/shop/./api".into(),
                dockerfile: "/work/shop/./api/Dockerfile".into()
            }
        );
        let web = p.service("web").unwrap();
        assert_eq!(
            web.ports,
            vec![PortMapping {
                host_ip: None,
                host_port: Some(8080),
                container_port: 8080
            }]
        );
        assert_eq!(web.environment["API_URL"], "http://api:8000");
        assert_eq!(web.environment["EXTRA"], "1");
        assert_eq!(api.rules.reaction(["static/x.css"]), Reaction::None);
        assert_eq!(
            api.rules.reaction(["static/x.css", "a/b.py"]),
            Reaction::Restart
        );
        assert_eq!(api.rules.reaction(["README"]), Reaction::Restart);
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let err = project(
            "[services.api]\nsync = { from = \"api\", to = \"/app\" }\nrestrat = true\n",
            COMPOSE,
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("/work/shop/devloop.toml"), "{msg}");
        assert!(msg.contains("line 3"), "{msg}");
        assert!(msg.contains("restrat"), "{msg}");
    }

    #[test]
    fn bad_values_are_reported_per_service() {
        let err = project("[services.api]\nports = [\"80:http\"]\n", COMPOSE)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("service `api`") && err.contains("http"),
            "{err}"
        );
        let err = project(
            "[services.api]\nsync = { from = \"api\", to = \"app\" }\n",
            COMPOSE,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("absolute"), "{err}");
        let err = project(
            "[services.api]\non_change = [{ paths = [\"x\"], action = \"run\" }]\n",
            COMPOSE,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("needs `run"), "{err}");
        let err = project("[services.solo]\n", "services: {}")
            .unwrap_err()
            .to_string();
        assert!(err.contains("no `image` or `build`"), "{err}");
    }

    #[test]
    fn dependency_cycle_is_an_error() {
        let err = project(
            "",
            "services:\n  a: {image: x, depends_on: [b]}\n  b: {image: x, depends_on: [a]}\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("cycle"), "{err}");
    }

    #[test]
    fn run_rule_runs_then_restarts() {
        let p = project(
            "[services.api]\non_change = [{ paths = [\"requirements.txt\"], action = \"run\", run = \"pip install -r requirements.txt\" }]\n",
            COMPOSE,
        )
        .unwrap();
        let r = p
            .service("api")
            .unwrap()
            .rules
            .reaction(["requirements.txt"]);
        assert_eq!(
            r,
            Reaction::RunThenRestart(vec![vec![
                "pip".into(),
                "install".into(),
                "-r".into(),
                "requirements.txt".into()
            ]])
        );
    }

    #[test]
    fn compose_long_ports() {
        let p = project("", "services:\n  a:\n    image: x\n    ports:\n      - target: 80\n        published: 8080\n        host_ip: 127.0.0.1\n").unwrap();
        assert_eq!(
            p.services[0].ports[0],
            PortMapping {
                host_ip: Some("127.0.0.1".into()),
                host_port: Some(8080),
                container_port: 80
            }
        );
        let err = project("", "services:\n  a:\n    image: x\n    ports:\n      - target: 53\n        protocol: udp\n").unwrap_err();
        assert!(err.to_string().contains("udp"), "{err}");
    }

    #[test]
    fn redeploy_is_the_strongest_reaction() {
        let p = project("[services.api]\non_change = [{ paths = [\"Dockerfile\", \"*.lock\"], action = \"redeploy\" }, { paths = [\"*.css\"], action = \"sync\" }]\n", COMPOSE).unwrap();
        let rules = &p.service("api").unwrap().rules;
        assert_eq!(
            rules.reaction(["a.css", "x.lock", "b.py"]),
            Reaction::Redeploy
        );
        assert_eq!(rules.reaction(["a.css"]), Reaction::None);
    }

    #[test]
    fn ports_parse() {
        assert_eq!(
            PortMapping::parse("127.0.0.1:80:8080/tcp")
                .unwrap()
                .host_ip
                .as_deref(),
            Some("127.0.0.1")
        );
        assert_eq!(PortMapping::parse("3000").unwrap().host_port, None);
        assert!(PortMapping::parse("1:2:3:4").is_err());
        assert!(PortMapping::parse("53/udp").is_err());
    }
}
