//! `filtered`: a filtered intercept (`--header x-dev=bench`) against nginx configured as a
//! header-routing reverse proxy, each placed where the routing agent sits: in the service
//! container's network namespace, behind the same nftables redirect of the service port.
//! Beside them the no-relay floor (the same original, reached directly) and a socat relay in
//! that same place. Every path: the same caller container, the same load generator, the same
//! original (devloop-loadgen serve in a container), rounds interleaved.
//!
//! Also: requests that match (to the laptop) against a replace intercept of the same kind of
//! service over the same transport (the handoff), intercept to first routed request, and
//! 1,000 connections sharing 100,000 requests, half of them matching, with the routing
//! agent's peak RSS.

use anyhow::{Context, Result};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::harness::{
    docker_ok, fmt_ms, median, now_ns, row, summary, Cleanup, Ctx, Proc, Project, Row,
    TEST_RUN_LABEL,
};
use crate::intercept::{laptop_server, loadgen_bin, scratch_image, seen_ns, which};

const BULK: u64 = 100 << 20;
const HEADER: &str = "x-dev: bench";

/// nginx and what it loads, for a FROM-scratch image (no registry to pull one from).
fn nginx_files(ctx: &Ctx) -> Result<Vec<(PathBuf, String)>> {
    let nginx = which("nginx")
        .or_else(|| Some(PathBuf::from("/usr/sbin/nginx")).filter(|p| p.is_file()))
        .context("nginx is not installed on the host (apt-get install nginx-light; scripts/bench.sh does)")?;
    let mut files = crate::intercept::binary_with_libs(&nginx, "/nginx")?;
    // nginx resolves its `user` by name, and needs folders for its temp files.
    let etc = ctx.tmp.path().join("nginx-etc");
    std::fs::create_dir_all(&etc)?;
    std::fs::write(etc.join("passwd"), "root:x:0:0:root:/:/nginx\n")?;
    std::fs::write(etc.join("group"), "root:x:0:\n")?;
    files.push((etc.join("passwd"), "/etc/passwd".into()));
    files.push((etc.join("group"), "/etc/group".into()));
    Ok(files)
}

/// nginx as a streaming header-routing proxy: `map` on the header, keep-alive upstream
/// connections, no buffering either way, and no cap on a caller connection's requests (its
/// default closes one after 1,000, which a latency run's keep-alive connection exceeds).
fn nginx_conf(listen: u16, laptop: &str) -> String {
    format!(
        r#"worker_processes auto;
daemon off;
user root root;
pid /tmp/nginx.pid;
error_log stderr warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path /tmp/cb; proxy_temp_path /tmp/pt; fastcgi_temp_path /tmp/ft;
  uwsgi_temp_path /tmp/ut; scgi_temp_path /tmp/st;
  map $http_x_dev $dest {{ default original; bench laptop; }}
  upstream original {{ server 127.0.0.1:8000; keepalive 128; }}
  upstream laptop {{ server {laptop}; keepalive 128; }}
  keepalive_requests 1000000;
  keepalive_timeout 300s;
  server {{
    listen {listen};
    location / {{
      proxy_pass http://$dest;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
      proxy_request_buffering off;
    }}
  }}
}}
"#
    )
}

/// Runs the loadgen in `caller`, with the header when `matching`.
fn loadgen(caller: &str, matching: bool, args: &[&str]) -> Result<serde_json::Value> {
    let mut full = vec!["exec"];
    if matching {
        full.extend(["-e", "LOADGEN_HEADER=x-dev: bench"]);
    }
    full.extend([caller, "/loadgen"]);
    full.extend_from_slice(args);
    let out = docker_ok(&full).with_context(|| format!("loadgen {args:?} in {caller}"))?;
    let line = out.lines().last().unwrap_or("");
    serde_json::from_str(line).with_context(|| format!("loadgen printed `{out}`"))
}

struct Path {
    name: &'static str,
    target: String,
    matching: bool,
}

pub fn filtered(ctx: &Ctx, cleanup: &Cleanup) -> Result<(Vec<Row>, serde_json::Value)> {
    let rounds = if ctx.quick { 2 } else { 5 };
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
    scratch_image(
        ctx,
        cleanup,
        &socat_image,
        &crate::intercept::socat_files()?,
        &["/socat"],
    )?;
    let nginx_image = format!("bench{}-nginx:latest", ctx.pid);
    let mut nginx = nginx_files(ctx)?;
    let conf_dir = ctx.tmp.path().join("nginx-conf");
    std::fs::create_dir_all(&conf_dir)?;
    // A folder for /tmp: nginx writes its pid and temp files there.
    std::fs::write(conf_dir.join("keep"), "")?;
    nginx.push((conf_dir.join("keep"), "/tmp/keep".into()));
    scratch_image(ctx, cleanup, &nginx_image, &nginx, &["/nginx"])?;
    let redirect_image = format!("bench{}-redirect:latest", ctx.pid);
    scratch_image(
        ctx,
        cleanup,
        &redirect_image,
        &[(ctx.agent.clone(), "/devloop-agent".into())],
        &["/devloop-agent"],
    )?;

    let label = format!("{TEST_RUN_LABEL}={}", ctx.run);
    let net = format!("bench{}-filtered", ctx.pid);
    docker_ok(&["network", "create", "--label", &label, &net])?;
    let gateway = docker_ok(&[
        "network",
        "inspect",
        "-f",
        "{{(index .IPAM.Config 0).Gateway}}",
        &net,
    ])?;
    let (server, laptop_port) = laptop_server(ctx, &lg, "filtered-laptop.log")?;
    let laptop = format!("{gateway}:{laptop_port}");
    let name = |s: &str| format!("bench{}-f-{s}", ctx.pid);
    let run = |args: &[&str]| -> Result<String> {
        let mut full = vec!["run", "-d", "--label", label.as_str()];
        full.extend_from_slice(args);
        docker_ok(&full)
    };
    // The same original four times: reached directly, behind socat, behind nginx, behind
    // devloop; and a fifth that a replace intercept takes whole.
    for s in ["floor", "socat", "nginx", "devloop", "replace"] {
        run(&[
            "--name",
            &name(s),
            "--network",
            &net,
            &lg_image,
            "serve",
            "8000",
            "original",
        ])?;
    }
    let caller = name("caller");
    run(&["--name", &caller, "--network", &net, &lg_image, "idle"])?;
    // socat and nginx in the original's namespace on 8081, the service port redirected to it.
    let ns = |s: &str| format!("container:{}", name(s));
    run(&[
        "--name",
        &name("socat-relay"),
        "--network",
        &ns("socat"),
        &socat_image,
        "TCP-LISTEN:8081,fork,reuseaddr,backlog=1024",
        "TCP:127.0.0.1:8000",
    ])?;
    let conf = conf_dir.join("nginx.conf");
    std::fs::write(&conf, nginx_conf(8081, &laptop))?;
    run(&[
        "--name",
        &name("nginx-proxy"),
        "--network",
        &ns("nginx"),
        "-v",
        &format!("{}:/nginx.conf:ro", conf.display()),
        &nginx_image,
        "-c",
        "/nginx.conf",
        "-e",
        "stderr",
    ])?;
    for s in ["socat", "nginx"] {
        run(&[
            "--name",
            &name(&format!("{s}-redirect")),
            "--network",
            &ns(s),
            "--cap-add",
            "NET_ADMIN",
            &redirect_image,
            "redirect-hold",
            "--map",
            "8000=8081",
        ])?;
    }

    let p = Project::new(ctx, "filtered", "")?;
    let spec = format!("8000:{laptop_port}");
    // The replace intercept of its own original, over the same transport (the handoff).
    let mut replace = p.spawn(ctx, &["intercept", &name("replace"), "--port", &spec])?;
    replace.wait_line(0, Duration::from_secs(60), |l| l.contains("intercepted in"))?;

    let paths = [
        Path {
            name: "no relay",
            target: format!("{}:8000", name("floor")),
            matching: false,
        },
        Path {
            name: "socat (redirected)",
            target: format!("{}:8000", name("socat")),
            matching: false,
        },
        Path {
            name: "nginx header routing (redirected)",
            target: format!("{}:8000", name("nginx")),
            matching: false,
        },
        Path {
            name: "devloop filtered, not matching",
            target: format!("{}:8000", name("devloop")),
            matching: false,
        },
        Path {
            name: "devloop filtered, matching (to the laptop)",
            target: format!("{}:8000", name("devloop")),
            matching: true,
        },
        Path {
            name: "devloop replace intercept (to the laptop)",
            target: format!("{}:8000", name("replace")),
            matching: false,
        },
        Path {
            name: "nginx, matching (to the laptop)",
            target: format!("{}:8000", name("nginx")),
            matching: true,
        },
    ];
    let n = paths.len();
    // Sanity: every path answers, and from where it should.
    let mut icpt = p.spawn(
        ctx,
        &[
            "intercept",
            &name("devloop"),
            "--port",
            &spec,
            "--header",
            "x-dev=bench",
            "--quiet",
        ],
    )?;
    icpt.wait_line(0, Duration::from_secs(60), |l| l.contains("Intercepted in"))?;
    for path in &paths {
        loadgen(&caller, path.matching, &["latency", &path.target, "10"])
            .with_context(|| format!("the path `{}` does not work", path.name))?;
    }
    let mut t_first = Vec::new();
    let mut p50: Vec<Vec<f64>> = vec![Vec::new(); n];
    let mut p99: Vec<Vec<f64>> = vec![Vec::new(); n];
    let mut bulk_ms: Vec<Vec<f64>> = vec![Vec::new(); n];
    let (mut load_json, mut load_matching, mut agent_hwm_kib) =
        (serde_json::Value::Null, serde_json::Value::Null, 0u64);
    for r in 0..rounds {
        if r > 0 {
            // A fresh install each round: intercept -> the first request routed to the laptop.
            let mut w = {
                let mut c = Command::new("docker");
                c.args([
                    "exec",
                    "-e",
                    "LOADGEN_HEADER=x-dev: bench",
                    &caller,
                    "/loadgen",
                    "wait-for",
                    &format!("{}:8000", name("devloop")),
                    "laptop",
                    "30000",
                ]);
                Proc::spawn(c, ctx.tmp.path().join(format!("filtered-wait-{r}.log")))?
            };
            w.wait_line(0, Duration::from_secs(20), |l| l == "ready")?;
            let t0 = now_ns();
            icpt = p.spawn(
                ctx,
                &[
                    "intercept",
                    &name("devloop"),
                    "--port",
                    &spec,
                    "--header",
                    "x-dev=bench",
                    "--quiet",
                ],
            )?;
            let seen = seen_ns(&mut w, Duration::from_secs(40))?;
            t_first.push((seen - t0) as f64 / 1e6);
            icpt.wait_line(0, Duration::from_secs(30), |l| l.contains("Intercepted in"))?;
        }
        for k in 0..n {
            let i = (k + r) % n;
            let path = &paths[i];
            let lat = loadgen(
                &caller,
                path.matching,
                &["latency", &path.target, &requests.to_string()],
            )?;
            p50[i].push(lat["p50_us"].as_f64().unwrap_or(f64::NAN));
            p99[i].push(lat["p99_us"].as_f64().unwrap_or(f64::NAN));
            let bulk = loadgen(
                &caller,
                path.matching,
                &["fetch", &path.target, &BULK.to_string()],
            )?;
            bulk_ms[i].push(bulk["seconds"].as_f64().unwrap_or(f64::NAN) * 1000.0);
        }
        eprintln!(
            "  filtered round {r}: p50 us {} | 100 MiB ms {}",
            p50.iter()
                .map(|v| format!("{:.0}", v[r]))
                .collect::<Vec<_>>()
                .join("/"),
            bulk_ms
                .iter()
                .map(|v| format!("{:.0}", v[r]))
                .collect::<Vec<_>>()
                .join("/"),
        );
        if r == rounds - 1 {
            // Half the connections match, half do not, all at once.
            let half = (load_conns / 2).to_string();
            let reqs = (load_reqs / 2).to_string();
            let target = format!("{}:8000", name("devloop"));
            let matching = {
                let mut c = Command::new("docker");
                c.args([
                    "exec",
                    "-e",
                    "LOADGEN_HEADER=x-dev: bench",
                    &caller,
                    "/loadgen",
                    "load",
                    &target,
                    &half,
                    &reqs,
                ]);
                Proc::spawn(c, ctx.tmp.path().join("filtered-load-matching.log"))?
            };
            load_json = loadgen(&caller, false, &["load", &target, &half, &reqs])?;
            let mut matching = matching;
            let (_, _, line) =
                matching.wait_line(0, Duration::from_secs(120), |l| l.starts_with('{'))?;
            load_matching = serde_json::from_str(&line).unwrap_or(serde_json::Value::Null);
            let agent = format!("{}-devloop-route", name("devloop"));
            agent_hwm_kib = crate::harness::rss_kib(crate::harness::agent_host_pid(&agent)?)?.0;
            eprintln!("  load not matching: {load_json}\n  load matching: {load_matching}\n  routing agent peak RSS {agent_hwm_kib} KiB");
        }
        icpt.interrupt();
        icpt.wait_line(0, Duration::from_secs(15), |l| l.contains("interrupted"))?;
        // The agent leaves by itself; the next round installs it again.
        let route = format!("{}-devloop-route", name("devloop"));
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        while crate::harness::docker(&["inspect", &route])?
            .status
            .success()
        {
            if std::time::Instant::now() > deadline {
                anyhow::bail!("the routing agent did not leave within 15 s of its last holder");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    replace.interrupt();
    let _ = replace.wait_line(0, Duration::from_secs(15), |l| l.contains("restored"));
    drop(server);

    let med = |v: &[f64]| median(v);
    let (floor, socat, nginx, dl, dl_match, repl, nginx_match) = (0, 1, 2, 3, 4, 5, 6);
    let p50_ratio = med(&p50[dl]) / med(&p50[nginx]);
    let p99_ratio = med(&p99[dl]) / med(&p99[nginx]);
    let bulk_ratio = med(&bulk_ms[nginx]) / med(&bulk_ms[dl]);
    let match_ratio = med(&p50[dl_match]) / med(&p50[repl]);
    let mib_s = |i: usize| (BULK as f64 / 1048576.0) / (med(&bulk_ms[i]) / 1000.0);
    let first = med(&t_first);
    let errors = load_json["errors"].as_u64().unwrap_or(u64::MAX)
        + load_matching["errors"].as_u64().unwrap_or(u64::MAX);
    let ok = load_json["ok"].as_u64().unwrap_or(0) + load_matching["ok"].as_u64().unwrap_or(0);
    let hwm_mb = agent_hwm_kib as f64 / 1024.0;
    let rows = vec![
        row("filtered", "not matching, keep-alive p50: no relay / socat / nginx / devloop", format!("{:.0} / {:.0} / {:.0} / {:.0} us", med(&p50[floor]), med(&p50[socat]), med(&p50[nginx]), med(&p50[dl])), "", None),
        row("filtered", "p50 devloop / nginx (not matching)", format!("{p50_ratio:.2}x"), "<= 1.3x", Some(p50_ratio <= 1.3)),
        row("filtered", "not matching, keep-alive p99: no relay / socat / nginx / devloop", format!("{:.0} / {:.0} / {:.0} / {:.0} us", med(&p99[floor]), med(&p99[socat]), med(&p99[nginx]), med(&p99[dl])), "", None),
        row("filtered", "p99 devloop / nginx (not matching)", format!("{p99_ratio:.2}x"), "<= 1.3x", Some(p99_ratio <= 1.3)),
        row("filtered", "100 MiB: no relay / socat / nginx / devloop", format!("{:.0} / {:.0} / {:.0} / {:.0} MiB/s", mib_s(floor), mib_s(socat), mib_s(nginx), mib_s(dl)), "", None),
        row("filtered", "100 MiB time nginx / devloop", format!("{bulk_ratio:.2}x"), ">= 1x", Some(bulk_ratio >= 1.0)),
        row("filtered", "matching p50: devloop filtered / replace intercept / nginx", format!("{:.0} / {:.0} / {:.0} us", med(&p50[dl_match]), med(&p50[repl]), med(&p50[nginx_match])), "", None),
        row("filtered", "matching p50 devloop filtered / replace intercept", format!("{match_ratio:.2}x"), "<= 1.5x", Some(match_ratio <= 1.5)),
        row("filtered", "intercept -> first routed request (median; Docker)", fmt_ms(first), "<= 2000 ms", Some(first <= 2000.0)),
        row(
            "filtered",
            format!("{load_conns} connections, {load_reqs} requests (half matching): errors (rps not matching / matching)"),
            format!("{errors} ({} / {})", load_json["rps"], load_matching["rps"]),
            "0",
            Some(errors == 0 && ok == load_reqs as u64),
        ),
        row("filtered", "routing agent peak RSS under that load", format!("{hwm_mb:.1} MB"), "<= 40 MB", Some(hwm_mb <= 40.0)),
    ];
    let paths_json: Vec<_> = (0..n)
        .map(|i| serde_json::json!({
            "path": paths[i].name, "p50_us": summary(&p50[i]), "p99_us": summary(&p99[i]), "bulk_ms": summary(&bulk_ms[i]),
        }))
        .collect();
    Ok((
        rows,
        serde_json::json!({
            "rounds": rounds,
            "requests_per_latency_run": requests,
            "header": HEADER,
            "paths": paths_json,
            "first_routed_ms": summary(&t_first),
            "p50_ratio_devloop_over_nginx": p50_ratio,
            "p99_ratio_devloop_over_nginx": p99_ratio,
            "bulk_ratio_nginx_over_devloop": bulk_ratio,
            "matching_ratio_filtered_over_replace": match_ratio,
            "load_not_matching": load_json,
            "load_matching": load_matching,
            "agent_peak_rss_kib": agent_hwm_kib,
        }),
    ))
}
