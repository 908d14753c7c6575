//! `deploy`: one-file change -> new version serving, devloop's snapshot + rollout against
//! `docker build` (classic builder, warm cache) of the same Dockerfile followed by the same
//! container replacement (start beside the old one with the service's alias, wait for its
//! port, remove the old one); plus `deploy` of an unchanged service. Both are observed on the
//! same path: HTTP through the published host port (devloop's relay, which reaches the
//! service by its name on the project network) until the new version answers.

use anyhow::{bail, Context, Result};
use std::io::{Read, Write};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::harness::{
    docker_ok, fmt_ms, median, ms, pct, row, run_ok, summary, Cleanup, Ctx, Project, Row,
    TEST_RUN_LABEL,
};

fn get_version(addr: &str) -> Option<String> {
    let sock: std::net::SocketAddr = addr.parse().ok()?;
    let mut s = std::net::TcpStream::connect_timeout(&sock, Duration::from_millis(300)).ok()?;
    // Short: a poll stuck on a connection into a container being removed would otherwise
    // hide the moment the new version starts answering.
    s.set_read_timeout(Some(Duration::from_millis(500))).ok()?;
    s.write_all(b"GET /items HTTP/1.0\r\nHost: bench\r\n\r\n")
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let at = out.find("\"version\": \"")? + "\"version\": \"".len();
    out[at..].split('"').next().map(String::from)
}

fn wait_version(addr: &str, version: &str, timeout: Duration) -> Result<Instant> {
    let deadline = Instant::now() + timeout;
    loop {
        if get_version(addr).as_deref() == Some(version) {
            return Ok(Instant::now());
        }
        if Instant::now() > deadline {
            bail!("{addr} did not serve version {version} within {timeout:?}");
        }
        // Each poll is a new connection through the relay (a DNS lookup and a connect);
        // polling faster would load the two cores the rollouts themselves need.
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub(crate) fn copy_dir(from: &std::path::Path, to: &std::path::Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        if e.file_type()?.is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()))?;
        } else {
            std::fs::copy(e.path(), to.join(e.file_name()))?;
        }
    }
    Ok(())
}

/// A project with one service `api` (the example's), published on a free host port.
fn api_project(ctx: &Ctx, scenario: &str) -> Result<(Project, String)> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let p = Project::new(
        ctx,
        scenario,
        &format!(
            "[services.api]\nbuild = {{ context = \"api\" }}\nports = [\"127.0.0.1:{port}:8000\"]\nenvironment = {{ PORT = \"8000\" }}\nsync = {{ from = \"api\", to = \"/app\" }}\nexclude = [\"__pycache__/\", \"*.pyc\"]\n"
        ),
    )?;
    copy_dir(&ctx.workspace.join("examples/shop/api"), &p.dir.join("api"))?;
    // The relay on the host port, the base and the first version.
    p.run(ctx, &["deploy", "api"]).context("first deploy")?;
    let addr = format!("127.0.0.1:{port}");
    wait_version(&addr, "1", Duration::from_secs(30))?;
    Ok((p, addr))
}

pub fn deploy(ctx: &Ctx, cleanup: &Cleanup) -> Result<(Vec<Row>, serde_json::Value)> {
    let rounds = if ctx.quick { 2 } else { 7 };
    // Two projects, so each path replaces only its own previous version; both are observed
    // the same way, through a relay on a host port that reaches `api` by name.
    let (p, addr) = api_project(ctx, "deploy")?;
    let (alt_p, alt_addr) = api_project(ctx, "deploy-alt")?;
    let original = std::fs::read_to_string(p.dir.join("api/app.py"))?;
    let with_version = |v: &str| original.replace("VERSION = \"1\"", &format!("VERSION = \"{v}\""));
    if with_version("x") == original {
        bail!("examples/shop/api/app.py has no `VERSION = \"1\"` line to edit");
    }
    let alt_repo = format!("bench{}-deploy-built", ctx.pid);
    cleanup
        .images
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(alt_repo.clone());
    run_ok(
        Command::new("docker")
            .env("DOCKER_BUILDKIT", "0")
            .args(["build", "-q", "-t", &format!("{alt_repo}:warm")])
            .arg(alt_p.dir.join("api")),
    )?;
    let alt_network = format!("devloop-{}", alt_p.name);
    // What serves `api` in the alternative's project now: devloop's first version, then the
    // alternative's containers.
    let mut alt_current: Vec<String> = vec![alt_p.container("api")];

    let (mut dl, mut alt, mut dl_cmd) = (Vec::new(), Vec::new(), Vec::new());
    for r in 0..rounds {
        let devloop_round = |dl: &mut Vec<f64>, dl_cmd: &mut Vec<f64>| -> Result<()> {
            // Unique per run: a version seen before would be served from caches (devloop's
            // same-tree tag, docker build's layer cache) and measure nothing.
            let v = format!("d{r}-{}", ctx.pid);
            std::fs::write(p.dir.join("api/app.py"), with_version(&v))?;
            let t0 = Instant::now();
            let mut cmd = p.cmd(ctx, &["deploy", "api"]);
            let child = std::thread::spawn(move || cmd.output());
            let seen = wait_version(&addr, &v, Duration::from_secs(60))?;
            let out = child
                .join()
                .map_err(|_| anyhow::anyhow!("deploy thread panicked"))??;
            if !out.status.success() {
                bail!(
                    "devloop deploy failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            dl_cmd.push(ms(t0.elapsed()));
            let text = String::from_utf8_lossy(&out.stdout).to_string()
                + &String::from_utf8_lossy(&out.stderr);
            if let Some(line) = text.lines().find(|l| l.contains("deployed")) {
                eprintln!("    {}", line.trim());
            }
            dl.push(ms(seen - t0));
            Ok(())
        };
        let mut alt_round = |alt: &mut Vec<f64>| -> Result<()> {
            let v = format!("a{r}-{}", ctx.pid);
            std::fs::write(alt_p.dir.join("api/app.py"), with_version(&v))?;
            let t0 = Instant::now();
            let image = format!("{alt_repo}:{v}");
            run_ok(
                Command::new("docker")
                    .env("DOCKER_BUILDKIT", "0")
                    .args(["build", "-q", "-t", &image])
                    .arg(alt_p.dir.join("api")),
            )?;
            let name = format!("bench{}-deploy-alt-{v}", ctx.pid);
            docker_ok(&[
                "run",
                "-d",
                "--name",
                &name,
                "--label",
                &format!("{TEST_RUN_LABEL}={}", ctx.run),
                "--network",
                &alt_network,
                "--network-alias",
                "api",
                "-e",
                "PORT=8000",
                &image,
            ])?;
            let ip = docker_ok(&[
                "inspect",
                "-f",
                &format!("{{{{(index .NetworkSettings.Networks \"{alt_network}\").IPAddress}}}}"),
                &name,
            ])?;
            wait_version(&format!("{ip}:8000"), &v, Duration::from_secs(60))?;
            for old in alt_current.drain(..) {
                docker_ok(&["rm", "-f", &old])?;
            }
            alt_current.push(name);
            let seen = wait_version(&alt_addr, &v, Duration::from_secs(60))?;
            alt.push(ms(seen - t0));
            Ok(())
        };
        if r % 2 == 0 {
            devloop_round(&mut dl, &mut dl_cmd)?;
            alt_round(&mut alt)?;
        } else {
            alt_round(&mut alt)?;
            devloop_round(&mut dl, &mut dl_cmd)?;
        }
        eprintln!(
            "  deploy round {r}: devloop {} (command {}), docker build + replace {}",
            fmt_ms(dl[r]),
            fmt_ms(dl_cmd[r]),
            fmt_ms(alt[r])
        );
    }

    // An unchanged service: the same tree again.
    let mut unchanged = Vec::new();
    for _ in 0..rounds.max(5) {
        let t0 = Instant::now();
        let out = p.run(ctx, &["deploy", "api"])?;
        unchanged.push(ms(t0.elapsed()));
        if !String::from_utf8_lossy(&out.stdout).contains("unchanged")
            && !String::from_utf8_lossy(&out.stderr).contains("unchanged")
        {
            bail!(
                "deploy of an unchanged tree did something: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    let (m_dl, m_alt, m_un) = (median(&dl), median(&alt), median(&unchanged));
    let ratio = m_alt / m_dl;
    let rows = vec![
        row(
            "deploy",
            "one-file change -> new version serving, devloop (median)",
            fmt_ms(m_dl),
            "<= 1000 ms",
            Some(m_dl <= 1000.0),
        ),
        row(
            "deploy",
            "same, docker build (warm cache) + same replacement",
            fmt_ms(m_alt),
            "",
            None,
        ),
        row(
            "deploy",
            "docker build path / devloop",
            format!("{ratio:.1}x"),
            ">= 4x",
            Some(ratio >= 4.0),
        ),
        row(
            "deploy",
            "devloop deploy command, whole (median)",
            fmt_ms(median(&dl_cmd)),
            "",
            None,
        ),
        row(
            "deploy",
            "deploy of an unchanged service (median)",
            fmt_ms(m_un),
            "<= 200 ms",
            Some(m_un <= 200.0),
        ),
        row(
            "deploy",
            "p90 devloop / docker build path",
            format!("{} / {}", fmt_ms(pct(&dl, 90.0)), fmt_ms(pct(&alt, 90.0))),
            "",
            None,
        ),
    ];
    Ok((
        rows,
        serde_json::json!({
            "rounds": rounds,
            "devloop_ms": summary(&dl),
            "devloop_command_ms": summary(&dl_cmd),
            "docker_build_and_replace_ms": summary(&alt),
            "ratio": ratio,
            "unchanged_ms": summary(&unchanged),
        }),
    ))
}
