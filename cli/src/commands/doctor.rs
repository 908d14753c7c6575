//! `devloop doctor`: checks what devloop needs and says how to fix what is wrong.

use super::{load_project, Global};
use crate::backend::{docker, engine, labels};
use crate::config::ImageSource;

struct Report {
    failures: usize,
}

impl Report {
    fn ok(&self, what: &str, detail: impl AsRef<str>) {
        println!("  ok    {what}: {}", detail.as_ref());
    }
    fn fail(&mut self, what: &str, detail: impl AsRef<str>, fix: impl AsRef<str>) {
        self.failures += 1;
        println!(
            "  FAIL  {what}: {}\n        fix: {}",
            detail.as_ref(),
            fix.as_ref()
        );
    }
    fn note(&self, what: &str, detail: impl AsRef<str>) {
        println!("  note  {what}: {}", detail.as_ref());
    }
}

pub async fn doctor(global: &Global) -> anyhow::Result<()> {
    let mut r = Report { failures: 0 };
    println!("devloop {}", devloop_proxy::CRATE_VERSION);

    let choice = engine::choose();
    let docker = match engine::connect(&choice).await {
        Ok(d) => {
            match d.version().await {
                Ok(v) => r.ok(
                    "docker engine",
                    format!(
                        "{} (API {}) at {} ({})",
                        v.version.unwrap_or_default(),
                        v.api_version.unwrap_or_default(),
                        choice.host,
                        choice.source
                    ),
                ),
                Err(e) => r.fail("docker engine", e.to_string(), "check `docker version`"),
            }
            if !choice.is_local() {
                r.note(
                    "agent route",
                    "remote engine: the cli reaches agents through `docker exec` streams",
                );
            }
            Some(d)
        }
        Err(e) => {
            r.fail("docker engine", e.to_string(), "start Docker (`sudo systemctl start docker`) or point DOCKER_HOST / `docker context use` at a running engine");
            None
        }
    };

    match docker::find_agent_binary() {
        Ok(p) => r.ok("agent binary", format!("{} (static)", p.display())),
        Err(e) => r.fail(
            "agent binary",
            e,
            "run scripts/build-agent.sh, or set DEVLOOP_AGENT_BIN to a static devloop-agent",
        ),
    }

    match std::fs::read_to_string("/proc/sys/fs/inotify/max_user_watches") {
        Ok(n) => {
            let n: u64 = n.trim().parse().unwrap_or(0);
            if n < 65536 {
                r.fail(
                    "file watching",
                    format!("fs.inotify.max_user_watches is {n}, one per synced folder"),
                    "sudo sysctl fs.inotify.max_user_watches=524288",
                );
            } else {
                r.ok("file watching", format!("{n} inotify watches per user"));
            }
        }
        Err(_) => r.note("file watching", "cannot read the inotify limit"),
    }

    let project = match load_project(global) {
        Ok(p) => {
            r.ok(
                "config",
                format!(
                    "project {} from {}",
                    p.name,
                    p.sources
                        .iter()
                        .map(|s| s.display().to_string())
                        .collect::<Vec<_>>()
                        .join(" + ")
                ),
            );
            Some(p)
        }
        Err(e) => {
            r.fail(
                "config",
                format!("{e:#}"),
                "fix the file named above (docs/CONFIG.md lists every key)",
            );
            None
        }
    };

    if let Some(project) = &project {
        for svc in &project.services {
            if let Some(s) = &svc.sync {
                if !s.laptop_dir.is_dir() {
                    r.fail(
                        &format!("{} sync", svc.name),
                        format!("{} does not exist", s.laptop_dir.display()),
                        "fix `sync.from` in devloop.toml",
                    );
                }
            }
            if let (Some(d), ImageSource::Build { dockerfile, .. }) = (&docker, &svc.image) {
                if let Ok(text) = std::fs::read_to_string(dockerfile) {
                    for base in crate::image::base_images(&text) {
                        if d.inspect_image(&base).await.is_ok() {
                            continue;
                        }
                        if crate::image::has_offline_recipe(&base) {
                            r.note(&format!("{} base image", svc.name), format!("{base} is not on the engine; `devloop up` pulls it or, with no registry, builds it from Debian packages"));
                        } else {
                            r.note(
                                &format!("{} base image", svc.name),
                                format!("{base} is not on the engine; `devloop up` will pull it"),
                            );
                        }
                    }
                } else {
                    r.fail(
                        &format!("{} build", svc.name),
                        format!("cannot read {}", dockerfile.display()),
                        "fix `build` in docker-compose.yml or devloop.toml",
                    );
                }
            }
        }
        // Ports: free, or held by this project's own dev containers.
        let ours: Vec<String> = match &docker {
            Some(d) => docker::list_project_containers(d, &project.name, Some(labels::KIND_DEV))
                .await
                .unwrap_or_default()
                .iter()
                .filter(|c| docker::is_running(c))
                .flat_map(|c| c.ports.clone().unwrap_or_default())
                .filter_map(|p| p.public_port.map(|p| p.to_string()))
                .collect(),
            None => Vec::new(),
        };
        for svc in &project.services {
            for p in &svc.ports {
                let Some(hp) = p.host_port else { continue };
                if ours.contains(&hp.to_string()) {
                    r.ok(
                        &format!("{} port {hp}", svc.name),
                        "published by its dev container",
                    );
                    continue;
                }
                if !choice.is_local() {
                    r.note(
                        &format!("{} port {hp}", svc.name),
                        "remote engine: cannot check its host's ports from here",
                    );
                    continue;
                }
                let ip = p.host_ip.clone().unwrap_or_else(|| "0.0.0.0".into());
                match std::net::TcpListener::bind((ip.as_str(), hp)) {
                    Ok(_) => r.ok(&format!("{} port {hp}", svc.name), "free"),
                    Err(e) => r.fail(
                        &format!("{} port {hp}", svc.name),
                        format!("in use ({e})"),
                        format!("stop what listens on {hp} (`ss -ltnp 'sport = :{hp}'`, `docker ps`), or change `ports` of `{}`", svc.name),
                    ),
                }
            }
        }
    }

    if let super::TargetChoice::Kubernetes { settings, registry } =
        super::choose_target(global, project.as_ref())
    {
        kubernetes(&mut r, &settings, registry.as_deref()).await;
    }

    if r.failures == 0 {
        println!("all checks passed");
        Ok(())
    } else {
        anyhow::bail!("{} check(s) failed", r.failures)
    }
}

/// The Kubernetes target: the context and namespace, the registry, the permissions.
async fn kubernetes(
    r: &mut Report,
    settings: &crate::backend::k8s::KubeSettings,
    registry: Option<&str>,
) {
    use crate::backend::k8s::{registry as reg, Cluster};
    let cluster = match Cluster::connect(settings).await {
        Ok(c) => {
            r.ok(
                "kubernetes",
                format!("context {}, namespace {}", c.context, c.namespace),
            );
            c
        }
        Err(e) => {
            r.fail(
                "kubernetes",
                e.to_string(),
                "check `kubectl config get-contexts` and the --context / -n flags",
            );
            return;
        }
    };
    match reg::discover(&cluster, registry).await {
        Ok(Some(found)) => r.ok("registry", format!("push to {}, nodes pull from {} ({})", found.push, found.pull, found.source)),
        Ok(None) => r.fail(
            "registry",
            format!("context {} advertises none (ConfigMap kube-public/local-registry-hosting)", cluster.context),
            "set `registry = \"HOST:PORT\"` under [target] in devloop.toml, or DEVLOOP_REGISTRY (docs/KUBERNETES.md)",
        ),
        Err(e) => r.fail("registry", e.to_string(), "see docs/KUBERNETES.md"),
    }
    match cluster.missing_permissions().await {
        Ok(missing) if missing.is_empty() => r.ok("permissions", format!("everything devloop uses in namespace {}", cluster.namespace)),
        Ok(missing) => r.fail(
            "permissions",
            format!("missing in namespace {}: {}", cluster.namespace, missing.join(", ")),
            format!("kubectl -n {} apply -f docs/kubernetes-role.yaml, then bind the Role `devloop` to your user (docs/KUBERNETES.md)", cluster.namespace),
        ),
        Err(e) => r.fail("permissions", e.to_string(), "see docs/KUBERNETES.md"),
    }
}
