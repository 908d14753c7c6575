//! `devloop doctor`: checks what devloop needs and says how to fix what is wrong.

use super::{load_project, Global};
use crate::config::ImageSource;
use crate::engine;
use crate::status::Outcome;

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
            Some(d)
        }
        Err(e) => {
            r.fail("docker engine", e.to_string(), "start Docker (`sudo systemctl start docker`) or point DOCKER_HOST / `docker context use` at a running engine");
            None
        }
    };

    match crate::backend::agent::find_agent_binary() {
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
    }

    // The back end's own checks (Docker: the project's host ports; Kubernetes: the context,
    // the registry, the permissions).
    for check in super::backend(global, project.as_ref())
        .doctor(project.as_ref())
        .await
    {
        match check.outcome {
            Outcome::Ok(found) => r.ok(&check.what, found),
            Outcome::Note(found) => r.note(&check.what, found),
            Outcome::Fail { found, fix } => r.fail(&check.what, found, fix),
        }
    }

    if r.failures == 0 {
        println!("all checks passed");
        Ok(())
    } else {
        anyhow::bail!("{} check(s) failed", r.failures)
    }
}
