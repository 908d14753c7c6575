//! `intercept`: the path users have, a caller container on the service's network -> the
//! intercepted service's name and port -> the process on the laptop, against a socat relay
//! standing in the agent's place (a container with the service's name on its own network
//! that forwards each connection to the laptop port), with the caller -> laptop port path
//! with no relay as the floor. One client and one server on every path: devloop-loadgen
//! (static; the client runs in a FROM-scratch caller container, the server on the host).
//! Also: `intercept` until the first tunnelled request, `leave` until the original serves,
//! and 1,000 concurrent connections sharing 100,000 requests with the agent's peak RSS.

use anyhow::{bail, Context, Result};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::harness::{
    docker_ok, fmt_ms, median, now_ns, pct, row, run_ok, summary, Cleanup, Ctx, Proc, Project, Row,
    TEST_RUN_LABEL,
};

const IMAGE: &str = "python:3.11-slim-bookworm";
const BULK: u64 = 100 << 20;

pub fn loadgen_bin(ctx: &Ctx) -> Result<PathBuf> {
    let p = std::env::var_os("DEVLOOP_BENCH_LOADGEN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            ctx.workspace
                .join("target/x86_64-unknown-linux-gnu/release/devloop-loadgen")
        });
    if !p.is_file() {
        bail!(
            "{} is missing: run scripts/build-loadgen.sh (scripts/bench.sh does)",
            p.display()
        );
    }
    Ok(p)
}

/// Builds a FROM-scratch image holding `files` (host path -> path in the image).
pub fn scratch_image(
    ctx: &Ctx,
    cleanup: &Cleanup,
    tag: &str,
    files: &[(PathBuf, String)],
    entry: &[&str],
) -> Result<()> {
    let dir = ctx
        .tmp
        .path()
        .join(format!("image-{}", tag.replace([':', '/'], "-")));
    let mut dockerfile = String::from("FROM scratch\n");
    for (i, (from, to)) in files.iter().enumerate() {
        let name = format!("f{i}");
        std::fs::create_dir_all(&dir)?;
        std::fs::copy(from, dir.join(&name))
            .with_context(|| format!("copying {}", from.display()))?;
        dockerfile.push_str(&format!("COPY {name} {to}\n"));
    }
    let entry: Vec<String> = entry.iter().map(|a| format!("\"{a}\"")).collect();
    dockerfile.push_str(&format!("ENTRYPOINT [{}]\n", entry.join(", ")));
    std::fs::write(dir.join("Dockerfile"), dockerfile)?;
    cleanup
        .images
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(tag.to_string());
    run_ok(
        Command::new("docker")
            .env("DOCKER_BUILDKIT", "0")
            .args(["build", "-q", "-t", tag])
            .arg(&dir),
    )?;
    Ok(())
}

/// socat and the shared libraries it loads (as `ldd` lists them), for a FROM-scratch image:
/// the engine has no registry to pull an image with socat from.
pub fn socat_files() -> Result<Vec<(PathBuf, String)>> {
    let socat = which("socat").context(
        "socat is not installed on the host (apt-get install socat; scripts/bench.sh does)",
    )?;
    binary_with_libs(&socat, "/socat")
}

/// A host binary at `dest` and the shared libraries it loads at their own paths, for a
/// FROM-scratch image.
pub fn binary_with_libs(binary: &std::path::Path, dest: &str) -> Result<Vec<(PathBuf, String)>> {
    let out = run_ok(Command::new("ldd").arg(binary))?;
    let mut files = vec![(binary.to_path_buf(), dest.to_string())];
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        // "libssl.so.3 => /lib/x86_64-linux-gnu/libssl.so.3 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line
                .split_whitespace()
                .next()
                .filter(|p| p.starts_with('/')),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            files.push((PathBuf::from(p), p.to_string()));
        }
    }
    Ok(files)
}

pub fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

fn gateway(network: &str) -> Result<String> {
    docker_ok(&[
        "network",
        "inspect",
        "-f",
        "{{(index .IPAM.Config 0).Gateway}}",
        network,
    ])
}

/// Runs the loadgen in a caller container and parses its one JSON line.
fn loadgen(caller: &str, args: &[&str]) -> Result<serde_json::Value> {
    let mut full = vec!["exec", caller, "/loadgen"];
    full.extend_from_slice(args);
    let out = docker_ok(&full).with_context(|| format!("loadgen {args:?} in {caller}"))?;
    let line = out.lines().last().unwrap_or("");
    serde_json::from_str(line).with_context(|| format!("loadgen printed `{out}`"))
}

/// Starts `wait-for` in the caller, returns once it polls, and the Proc to read `seen NS` from.
fn waiter(ctx: &Ctx, caller: &str, text: &str, tag: &str) -> Result<Proc> {
    let mut cmd = Command::new("docker");
    cmd.args([
        "exec", caller, "/loadgen", "wait-for", "api:8000", text, "30000",
    ]);
    let mut p = Proc::spawn(
        cmd,
        ctx.tmp
            .path()
            .join(format!("waiter-{tag}-{}.log", now_ns())),
    )?;
    p.wait_line(0, Duration::from_secs(20), |l| l == "ready")?;
    Ok(p)
}

/// The time a `wait-for` printed as `seen NS`.
pub fn seen_ns(p: &mut Proc, timeout: Duration) -> Result<i128> {
    let (_, _, line) = p.wait_line(0, timeout, |l| l.starts_with("seen "))?;
    Ok(line["seen ".len()..].trim().parse()?)
}

/// The laptop process: `devloop-loadgen serve` on every address of the host (so paths
/// without devloop reach it too), and the port it took.
pub fn laptop_server(ctx: &Ctx, lg: &std::path::Path, log: &str) -> Result<(Proc, u16)> {
    let mut cmd = Command::new(lg);
    cmd.args(["serve", "0", "laptop"]);
    let mut server = Proc::spawn(cmd, ctx.tmp.path().join(log))?;
    let (_, _, line) =
        server.wait_line(0, Duration::from_secs(10), |l| l.starts_with("listening "))?;
    let port = line["listening ".len()..].trim().parse()?;
    Ok((server, port))
}

struct NetPath {
    name: &'static str,
    caller: String,
    addr: String,
}

pub fn intercept(ctx: &Ctx, cleanup: &Cleanup) -> Result<(Vec<Row>, serde_json::Value)> {
    let rounds = if ctx.quick { 2 } else { 6 };
    let requests = if ctx.quick { 1000 } else { 3000 };
    let (load_conns, load_reqs) = if ctx.quick {
        (200, 10_000)
    } else {
        (1000, 100_000)
    };
    let lg = loadgen_bin(ctx)?;
    let lg_image = format!("bench{}-loadgen:latest", ctx.pid);
    scratch_image(
        ctx,
        cleanup,
        &lg_image,
        &[(lg.clone(), "/loadgen".into())],
        &["/loadgen"],
    )?;
    let socat_image = format!("bench{}-socat:latest", ctx.pid);
    scratch_image(ctx, cleanup, &socat_image, &socat_files()?, &["/socat"])?;

    // The service: the example api as a dev container (any running container would do).
    let p = Project::new(
        ctx,
        "intercept",
        // api2, the same service, is intercepted with `--tunnel` beside it: the path every
        // connection takes where the cli cannot hand connections over (a remote engine).
        &["api", "api2"]
            .map(|s| format!("[services.{s}]\nimage = \"{IMAGE}\"\nsync = {{ from = \"api\", to = \"/app\" }}\nenvironment = {{ PORT = \"8000\" }}\ncommand = [\"python3\", \"app.py\"]\n"))
            .concat(),
    )?;
    std::fs::create_dir_all(p.dir.join("api"))?;
    std::fs::copy(
        ctx.workspace.join("examples/shop/api/app.py"),
        p.dir.join("api/app.py"),
    )?;
    let mut up = p.spawn(ctx, &["up", "--no-logs"])?;
    up.wait_line(0, Duration::from_secs(300), |l| l.contains("in sync"))?;
    up.interrupt();
    let network = format!("devloop-{}", p.name);

    // The laptop process, on every address so the no-relay and socat paths reach it too.
    let (server, port) = laptop_server(ctx, &lg, "laptop-server.log")?;

    let label = format!("{TEST_RUN_LABEL}={}", ctx.run);
    let socat_net = format!("bench{}-socat", ctx.pid);
    docker_ok(&["network", "create", "--label", &label, &socat_net])?;
    let socat_target = format!("TCP:{}:{port}", gateway(&socat_net)?);
    docker_ok(&[
        "run",
        "-d",
        "--name",
        &format!("bench{}-socat-api", ctx.pid),
        "--label",
        &label,
        "--network",
        &socat_net,
        "--network-alias",
        "api",
        &socat_image,
        "TCP-LISTEN:8000,fork,reuseaddr",
        &socat_target,
    ])?;
    // Diagnosis: two socat relays in a row, a container and then the host, the shape of
    // the agent and the cli with no framing: what two hops cost on this machine.
    let hop_port = std::net::TcpListener::bind("0.0.0.0:0")?
        .local_addr()?
        .port();
    let socat_bin = which("socat").context("socat is not installed on the host")?;
    let _host_socat = Proc::spawn(
        {
            let mut c = Command::new(&socat_bin);
            c.args([
                format!("TCP-LISTEN:{hop_port},fork,reuseaddr"),
                format!("TCP:127.0.0.1:{port}"),
            ]);
            c
        },
        ctx.tmp.path().join("host-socat.log"),
    )?;
    let two_hop_target = format!("TCP:{}:{hop_port}", gateway(&socat_net)?);
    docker_ok(&[
        "run",
        "-d",
        "--name",
        &format!("bench{}-socat-api2", ctx.pid),
        "--label",
        &label,
        "--network",
        &socat_net,
        "--network-alias",
        "api2",
        &socat_image,
        "TCP-LISTEN:8000,fork,reuseaddr",
        &two_hop_target,
    ])?;
    let caller = format!("bench{}-caller", ctx.pid);
    let socat_caller = format!("bench{}-caller-socat", ctx.pid);
    for (name, net) in [(&caller, &network), (&socat_caller, &socat_net)] {
        docker_ok(&[
            "run",
            "-d",
            "--name",
            name,
            "--label",
            &label,
            "--network",
            net,
            &lg_image,
            "idle",
        ])?;
    }
    let paths = [
        NetPath {
            name: "no relay",
            caller: caller.clone(),
            addr: format!("{}:{port}", gateway(&network)?),
        },
        NetPath {
            name: "socat relay",
            caller: socat_caller.clone(),
            addr: "api:8000".into(),
        },
        NetPath {
            name: "devloop intercept",
            caller: caller.clone(),
            addr: "api:8000".into(),
        },
        NetPath {
            name: "two socat relays (container, then host)",
            caller: socat_caller.clone(),
            addr: "api2:8000".into(),
        },
        NetPath {
            name: "devloop intercept --tunnel",
            caller: caller.clone(),
            addr: "api2:8000".into(),
        },
    ];
    // Sanity: the floor and the socat path reach the laptop server before anything is timed.
    for path in [&paths[0], &paths[1], &paths[3]] {
        loadgen(&path.caller, &["latency", &path.addr, "10"])
            .with_context(|| format!("the {} path does not work", path.name))?;
    }

    let spec = format!("8000:{port}");
    let (mut t_icpt, mut t_leave, mut t_leave_cmd) = (Vec::new(), Vec::new(), Vec::new());
    let mut p50: [Vec<f64>; 5] = Default::default();
    let mut p99: [Vec<f64>; 5] = Default::default();
    let mut mib_s: [Vec<f64>; 5] = Default::default();
    let mut bulk_s: [Vec<f64>; 5] = Default::default();
    let mut load_json = serde_json::Value::Null;
    let mut load_tunnel = serde_json::Value::Null;
    let mut tunnel_hwm_kib = 0u64;
    let mut load_socat = serde_json::Value::Null;
    let mut agent_hwm_kib = 0u64;
    for r in 0..rounds {
        // intercept -> first tunnelled request, seen by a caller polling the service's name.
        let mut w = waiter(ctx, &caller, "laptop", "in")?;
        let t0 = now_ns();
        let mut icpt = p.spawn(ctx, &["intercept", "api", "--port", &spec])?;
        let seen = seen_ns(&mut w, Duration::from_secs(40))?;
        t_icpt.push((seen - t0) as f64 / 1e6);
        icpt.wait_line(0, Duration::from_secs(30), |l| l.contains("intercepted in"))?;
        let mut icpt_tunnel = p.spawn(ctx, &["intercept", "api2", "--tunnel", "--port", &spec])?;
        icpt_tunnel.wait_line(0, Duration::from_secs(30), |l| l.contains("intercepted in"))?;

        for k in 0..5 {
            let i = (k + r) % 5;
            let path = &paths[i];
            let lat = loadgen(
                &path.caller,
                &["latency", &path.addr, &requests.to_string()],
            )?;
            p50[i].push(lat["p50_us"].as_f64().unwrap_or(f64::NAN));
            p99[i].push(lat["p99_us"].as_f64().unwrap_or(f64::NAN));
            let bulk = loadgen(&path.caller, &["fetch", &path.addr, &BULK.to_string()])?;
            mib_s[i].push(bulk["mib_s"].as_f64().unwrap_or(f64::NAN));
            bulk_s[i].push(bulk["seconds"].as_f64().unwrap_or(f64::NAN) * 1000.0);
        }
        eprintln!(
            "  intercept round {r}: intercept {} | p50 us floor/socat/devloop/2 socats/tunnel {}/{}/{}/{}/{} | 100 MiB ms {:.0}/{:.0}/{:.0}/{:.0}/{:.0}",
            fmt_ms(t_icpt[r]), p50[0][r], p50[1][r], p50[2][r], p50[3][r], p50[4][r],
            bulk_s[0][r], bulk_s[1][r], bulk_s[2][r], bulk_s[3][r], bulk_s[4][r]
        );

        if r == rounds - 1 {
            let conns = load_conns.to_string();
            let reqs = load_reqs.to_string();
            load_json = loadgen(&caller, &["load", "api:8000", &conns, &reqs])?;
            let agent = format!("{}-devloop-intercept", p.container("api"));
            let pid = crate::harness::agent_host_pid(&agent)?;
            agent_hwm_kib = crate::harness::rss_kib(pid)?.0;
            // socat forks a process per connection and listens with a backlog of 5: bounded,
            // or 1,000 connections take minutes.
            load_socat = loadgen(&socat_caller, &["load", "api:8000", &conns, &reqs, "30000"])?;
            load_tunnel = loadgen(&caller, &["load", "api2:8000", &conns, &reqs])?;
            let agent2 = format!("{}-devloop-intercept", p.container("api2"));
            tunnel_hwm_kib = crate::harness::rss_kib(crate::harness::agent_host_pid(&agent2)?)?.0;
            eprintln!(
                "  load through devloop: {load_json}\n  load through socat:   {load_socat}\n  load through the tunnel: {load_tunnel}\n  agent peak RSS {agent_hwm_kib} KiB (tunnelling: {tunnel_hwm_kib} KiB)"
            );
        }
        p.run(ctx, &["leave", "api2"])?;
        icpt_tunnel.wait_line(0, Duration::from_secs(15), |l| {
            l.contains("ended elsewhere")
        })?;

        // leave -> the original container serving again.
        let mut w = waiter(ctx, &caller, "\"service\": \"api\"", "out")?;
        let t0 = now_ns();
        let out = p.run(ctx, &["leave", "api"])?;
        t_leave_cmd.push((now_ns() - t0) as f64 / 1e6);
        if !String::from_utf8_lossy(&out.stdout).contains("restored") {
            bail!(
                "leave did not restore: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let seen = seen_ns(&mut w, Duration::from_secs(40))?;
        t_leave.push((seen - t0) as f64 / 1e6);
        icpt.wait_line(0, Duration::from_secs(15), |l| {
            l.contains("ended elsewhere")
        })?;
        eprintln!(
            "  leave round {r}: original serving after {}",
            fmt_ms(t_leave[r])
        );
    }
    drop(server);

    let med = |v: &[f64]| median(v);
    let (lat_ratio, p99_ratio) = (med(&p50[2]) / med(&p50[1]), med(&p99[2]) / med(&p99[1]));
    let bulk_ratio = med(&bulk_s[1]) / med(&bulk_s[2]);
    let errors = load_json["errors"].as_u64().unwrap_or(u64::MAX);
    let ok = load_json["ok"].as_u64().unwrap_or(0);
    let hwm_mb = agent_hwm_kib as f64 / 1024.0;
    let (m_in, m_out) = (med(&t_icpt), med(&t_leave));
    let us3 = |v: &[Vec<f64>; 5]| {
        format!(
            "{:.0} / {:.0} / {:.0} us",
            med(&v[0]),
            med(&v[1]),
            med(&v[2])
        )
    };
    let rows = vec![
        row("intercept", "intercept -> first tunnelled request (median)", fmt_ms(m_in), "<= 2000 ms", Some(m_in <= 2000.0)),
        row("intercept", "leave -> original serving (median; command alone)", format!("{} ({})", fmt_ms(m_out), fmt_ms(med(&t_leave_cmd))), "<= 2000 ms", Some(m_out <= 2000.0)),
        row("intercept", "keep-alive p50: no relay / socat / devloop", us3(&p50), "", None),
        row("intercept", "p50 devloop / socat", format!("{lat_ratio:.2}x"), "<= 1.5x", Some(lat_ratio <= 1.5)),
        row("intercept", "keep-alive p99: no relay / socat / devloop", us3(&p99), "", None),
        row("intercept", "p99 devloop / socat", format!("{p99_ratio:.2}x"), "<= 2x", Some(p99_ratio <= 2.0)),
        row(
            "intercept",
            "100 MiB: no relay / socat / devloop",
            format!("{:.0} / {:.0} / {:.0} MiB/s", med(&mib_s[0]), med(&mib_s[1]), med(&mib_s[2])),
            "",
            None,
        ),
        row("intercept", "100 MiB time socat / devloop", format!("{bulk_ratio:.2}x"), "> 1x", Some(bulk_ratio > 1.0)),
        row(
            "intercept",
            "diagnosis: two socat relays in a row (container, then host): p50 / p99 / 100 MiB",
            format!("{:.0} us / {:.0} us / {:.0} MiB/s", med(&p50[3]), med(&p99[3]), med(&mib_s[3])),
            "",
            None,
        ),
        row("intercept", "p50 devloop / two socat relays", format!("{:.2}x", med(&p50[2]) / med(&p50[3])), "", None),
        row(
            "intercept",
            "devloop --tunnel (every connection through the tunnel): p50 / p99 / 100 MiB",
            format!("{:.0} us / {:.0} us / {:.0} MiB/s", med(&p50[4]), med(&p99[4]), med(&mib_s[4])),
            "",
            None,
        ),
        row("intercept", "p50 devloop --tunnel / socat", format!("{:.2}x", med(&p50[4]) / med(&p50[1])), "", None),
        row(
            "intercept",
            format!("{load_conns} connections, {load_reqs} requests: errors (devloop; rps devloop / socat; socat errors, not done in 30 s)"),
            format!("{errors} ({} / {}; {}, {})", load_json["rps"], load_socat["rps"], load_socat["errors"], load_socat["not_done"]),
            "0",
            Some(errors == 0 && ok == load_reqs),
        ),
        row("intercept", "agent peak RSS under that load", format!("{hwm_mb:.1} MB"), "<= 30 MB", Some(hwm_mb <= 30.0)),
        row(
            "intercept",
            "the same load through devloop --tunnel: errors (rps); agent peak RSS",
            format!("{} ({}); {:.1} MB", load_tunnel["errors"], load_tunnel["rps"], tunnel_hwm_kib as f64 / 1024.0),
            "0; <= 30 MB",
            Some(load_tunnel["errors"].as_u64() == Some(0) && tunnel_hwm_kib as f64 / 1024.0 <= 30.0),
        ),
    ];
    let paths_json: Vec<_> = (0..5)
        .map(|i| {
            serde_json::json!({
                "path": paths[i].name, "p50_us": summary(&p50[i]), "p99_us": summary(&p99[i]),
                "bulk_mib_s": summary(&mib_s[i]), "bulk_ms": summary(&bulk_s[i]),
            })
        })
        .collect();
    Ok((
        rows,
        serde_json::json!({
            "rounds": rounds,
            "requests_per_latency_run": requests,
            "intercept_ms": summary(&t_icpt),
            "leave_ms": summary(&t_leave),
            "leave_command_ms": summary(&t_leave_cmd),
            "paths": paths_json,
            "p50_ratio": lat_ratio,
            "p99_ratio": p99_ratio,
            "bulk_ratio_socat_over_devloop": bulk_ratio,
            "p90_intercept_ms": pct(&t_icpt, 90.0),
            "load_devloop": load_json,
            "load_socat": load_socat,
            "load_tunnel": load_tunnel,
            "agent_peak_rss_kib": agent_hwm_kib,
            "tunnel_agent_peak_rss_kib": tunnel_hwm_kib,
        }),
    ))
}
