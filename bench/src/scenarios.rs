//! The five scenarios. Each returns its rows for the table and a JSON object with every
//! sample, and leaves nothing behind (its processes are killed on drop; the run's cleanup
//! guard removes the Docker objects).

use anyhow::{bail, Context, Result};
use serde_json::json;
use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::harness::*;

const IMAGE: &str = "python:3.11-slim-bookworm";

pub(crate) fn in_sync(l: &str) -> bool {
    l.contains("[devloop] in sync:")
}

/// The python observer: polls the file as fast as it can and prints when a new complete
/// token appears, with the container's clock (which is the host's).
pub(crate) const OBSERVER: &str = r#"
import sys, time
p = '/app/probe.txt'
nap = float(sys.argv[1]) / 1e6 if len(sys.argv) > 1 else 0.0
last = None
print('observer ready', flush=True)
while True:
    if nap:
        time.sleep(nap)
    try:
        with open(p, 'rb') as f:
            d = f.read()
    except OSError:
        continue
    if d != last and d.endswith(b'\n') and d.startswith(b'T'):
        t = time.time_ns()
        last = d
        print('SEEN %d %s' % (t, d.split()[0].decode()), flush=True)
"#;

// ------------------------------------------------------------------ 1. latency

pub fn latency(ctx: &Ctx) -> Result<(Vec<Row>, serde_json::Value)> {
    let rounds = if ctx.quick { 30 } else { 60 };
    // DEVLOOP_BENCH_OBSERVER_NAP_US: the observer's pause per poll. Default 100 µs: a truly
    // tight loop (0) keeps a core busy, so on this 2-core machine the scheduler makes the
    // observer wait its turn (measured: median 12-20 ms instead of 5 ms, all of it the
    // observer's scheduling delay, not devloop's). 100 µs costs at most ~0.2 ms resolution.
    let nap = std::env::var("DEVLOOP_BENCH_OBSERVER_NAP_US").unwrap_or_else(|_| "100".into());
    let toml = format!(
        "[services.obs]\nimage = \"{IMAGE}\"\nsync = {{ from = \"app\", to = \"/app\" }}\ncommand = [\"python3\", \"-u\", \"-c\", '''{OBSERVER}''', \"{nap}\"]\n"
    );
    let p = Project::new(ctx, "latency", &toml)?;
    std::fs::create_dir_all(p.dir.join("app"))?;
    std::fs::write(p.dir.join("app/readme.txt"), "latency probe\n")?;
    let mut up = p.spawn(ctx, &["up"])?;
    up.wait_line(0, Duration::from_secs(120), in_sync)?;
    up.wait_line(0, Duration::from_secs(20), |l| l.contains("observer ready"))?;
    let container = p.container("obs");
    let laptop_file = p.dir.join("app/probe.txt");
    let dcp_dir = ctx.tmp.path().join("latency-dcp");
    std::fs::create_dir_all(&dcp_dir)?;
    let dcp_file = dcp_dir.join("probe.txt");
    let pad = "x".repeat(180);
    // Diagnosis: the same write sent by the bench's own connection straight to the agent (one
    // Put in a batch, as devloop sends it), without the watcher and the burst coalescing.
    let probe = AgentProbe::connect(ctx, &p, "obs", &p.dir.join("app"), &[])?;
    let probe_path = devloop_proxy::RelPath::new("probe.txt")?;

    // One warm-up of each (first write creates the file; first docker cp warms the CLI).
    let mut measure = |kind: char, round: usize| -> Result<f64> {
        let token = format!("T{round:04}{kind}");
        let content = format!("{token} {pad}\n");
        let from = up.len();
        let start_ns;
        if kind == 'd' {
            start_ns = now_ns();
            std::fs::write(&laptop_file, &content)?;
        } else if kind == 'r' {
            // How editors with "safe write" save: a new file beside it, renamed over it.
            let tmp = laptop_file.with_file_name("probe.txt.save-tmp");
            start_ns = now_ns();
            std::fs::write(&tmp, &content)?;
            std::fs::rename(&tmp, &laptop_file)?;
        } else if kind == 'l' {
            let op = devloop_proxy::msg::FileOp::Put {
                path: probe_path.clone(),
                mode: 0o644,
                data: content.clone().into_bytes(),
            };
            start_ns = now_ns();
            ctx.rt.block_on(probe.link.batch(vec![op]))?;
        } else {
            std::fs::write(&dcp_file, &content)?;
            start_ns = now_ns();
            run_ok(Command::new("docker").args([
                "cp",
                &dcp_file.to_string_lossy(),
                &format!("{container}:/app/probe.txt"),
            ]))?;
        }
        let needle = format!(" {token}");
        let (_, _, line) = up.wait_line(from, Duration::from_secs(10), |l| {
            l.contains("SEEN ") && l.ends_with(&needle)
        })?;
        let seen: i128 = line
            .split_whitespace()
            .rev()
            .nth(1)
            .and_then(|v| v.parse().ok())
            .context("parsing the observer's line")?;
        std::thread::sleep(Duration::from_millis(30));
        Ok((seen - start_ns) as f64 / 1e6)
    };
    measure('d', 9999)?;
    measure('c', 9998)?;
    let (mut dl, mut dc, mut dlink, mut drename) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for r in 0..rounds {
        if r % 2 == 0 {
            dl.push(measure('d', r)?);
            dc.push(measure('c', r)?);
        } else {
            dc.push(measure('c', r)?);
            dl.push(measure('d', r)?);
        }
        dlink.push(measure('l', r)?);
        drename.push(measure('r', r)?);
    }
    drop(probe);
    up.interrupt();
    let (m_d, m_c) = (median(&dl), median(&dc));
    let ratio = m_c / m_d;
    let rows = vec![
        row(
            "latency",
            format!(
                "devloop save->visible (median of {rounds}, p90 {})",
                fmt_ms(pct(&dl, 90.0))
            ),
            fmt_ms(m_d),
            "<= 5 ms",
            Some(m_d <= 5.0),
        ),
        row(
            "latency",
            format!(
                "docker cp per change (median, p90 {})",
                fmt_ms(pct(&dc, 90.0))
            ),
            fmt_ms(m_c),
            "",
            None,
        ),
        row(
            "latency",
            "docker cp / devloop",
            format!("{ratio:.1}x"),
            ">= 10x",
            Some(ratio >= 10.0),
        ),
        row(
            "latency",
            "  diagnosis: same Put straight over the agent protocol (no watcher)",
            fmt_ms(median(&dlink)),
            "",
            None,
        ),
        row(
            "latency",
            format!(
                "devloop, saved by write+rename like a safe-write editor (p90 {})",
                fmt_ms(pct(&drename, 90.0))
            ),
            fmt_ms(median(&drename)),
            "<= 5 ms",
            Some(median(&drename) <= 5.0),
        ),
    ];
    Ok((
        rows,
        json!({ "rounds": rounds, "observer_nap_us": nap, "devloop_ms": summary(&dl), "docker_cp_ms": summary(&dc), "direct_put_ms": summary(&dlink), "devloop_rename_save_ms": summary(&drename), "ratio_docker_cp_over_devloop": ratio }),
    ))
}

// ------------------------------------------------------------------ 2. burst

fn laptop_hash(root: &Path, excludes: &[&str]) -> Result<[u8; 32]> {
    use devloop::sync::filter::{Filter, FilterSettings};
    let settings = FilterSettings {
        excludes: excludes.iter().map(|s| s.to_string()).collect(),
        include_node_modules: false,
    };
    let mut filter = Filter::new(root, settings)?;
    let (tree, errors) = devloop::sync::scan::scan(root, &mut filter);
    if !errors.is_empty() {
        bail!("scanning {}: {errors:?}", root.display());
    }
    Ok(devloop_proxy::tree::tree_hash(&tree))
}

/// A connection of the bench's own to the agent, for the tree hash of what it holds.
struct AgentProbe {
    link: devloop::agent_link::AgentLink,
    filter: devloop::sync::filter::Filter,
}

impl AgentProbe {
    fn connect(
        ctx: &Ctx,
        p: &Project,
        service: &str,
        root: &Path,
        excludes: &[&str],
    ) -> Result<AgentProbe> {
        use devloop::sync::filter::{Filter, FilterSettings};
        let addr = format!("{}:7717", p.ip(service)?);
        let token = p.token(service)?;
        let c = ctx.rt.block_on(async {
            let stream = tokio::net::TcpStream::connect(&addr).await?;
            anyhow::Ok(devloop::agent_link::AgentLink::connect(stream, &token).await?)
        })?;
        let settings = FilterSettings {
            excludes: excludes.iter().map(|s| s.to_string()).collect(),
            include_node_modules: false,
        };
        Ok(AgentProbe {
            link: c.link,
            filter: Filter::new(root, settings)?,
        })
    }

    fn hash(&self, ctx: &Ctx) -> Result<[u8; 32]> {
        let tree = ctx.rt.block_on(self.link.index())?;
        let tree: devloop_proxy::tree::Tree = tree
            .into_iter()
            .filter(|(p, e)| {
                !self.filter.is_ignored(
                    Path::new(p.as_str()),
                    matches!(e, devloop_proxy::tree::Entry::Dir { .. }),
                )
            })
            .collect();
        Ok(devloop_proxy::tree::tree_hash(&tree))
    }
}

impl Drop for AgentProbe {
    fn drop(&mut self) {
        self.link.close();
    }
}

pub fn burst(ctx: &Ctx) -> Result<(Vec<Row>, serde_json::Value)> {
    let rounds = if ctx.quick { 2 } else { 7 };
    let toml = format!("[services.burst]\nimage = \"{IMAGE}\"\nsync = {{ from = \"src\", to = \"/app\" }}\ncommand = [\"sleep\", \"infinity\"]\n");
    let p = Project::new(ctx, "burst", &toml)?;
    let src = p.dir.join("src");
    std::fs::create_dir_all(&src)?;
    for i in 0..100 {
        std::fs::write(src.join(format!("f{i:03}.txt")), format!("initial {i}\n"))?;
    }
    let mut up = p.spawn(ctx, &["up", "--no-logs"])?;
    up.wait_line(0, Duration::from_secs(120), in_sync)?;
    let container = p.container("burst");
    let probe = AgentProbe::connect(ctx, &p, "burst", &src, &[])?;
    let (mut conv, mut dcp, mut write_ms, mut batches) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut rng = Rng::new(7);
    for r in 0..rounds {
        let from = up.len();
        let t0 = Instant::now();
        for i in 0..1000 {
            let mut body = vec![0u8; 200 + (rng.next_u64() % 1800) as usize];
            rng.fill(&mut body);
            let mut f = std::fs::File::create(src.join(format!("f{:03}.txt", i % 100)))?;
            writeln!(f, "round {r} edit {i}")?;
            f.write_all(&body)?;
        }
        let last = Instant::now();
        write_ms.push(ms(last - t0));
        let want = laptop_hash(&src, &[])?;
        let deadline = last + Duration::from_secs(30);
        let converged = loop {
            if probe.hash(ctx)? == want {
                break Instant::now();
            }
            if Instant::now() > deadline {
                bail!("burst round {r}: the agent's tree did not match the laptop's within 30 s; devloop's output: {}", up.log.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        conv.push(ms(converged - last));
        std::thread::sleep(Duration::from_millis(300));
        batches.push(
            up.all_lines()[from..]
                .iter()
                .filter(|l| l.contains("[devloop] synced"))
                .count() as f64,
        );
        // The alternative after a burst: copy the folder over once it is done.
        let t = Instant::now();
        run_ok(Command::new("docker").args([
            "cp",
            &format!("{}/.", src.display()),
            &format!("{container}:/app"),
        ]))?;
        dcp.push(ms(t.elapsed()));
    }
    drop(probe);
    up.interrupt();
    let m = median(&conv);
    let rows = vec![
        row(
            "burst",
            format!(
                "1000 edits/100 files: last edit->tree equal (median of {rounds}, max {})",
                fmt_ms(pct(&conv, 100.0))
            ),
            fmt_ms(m),
            "<= 2 s",
            Some(pct(&conv, 100.0) <= 2000.0),
        ),
        row(
            "burst",
            "  writing the 1000 edits took (median)",
            fmt_ms(median(&write_ms)),
            "",
            None,
        ),
        row(
            "burst",
            "  docker cp of the 100 files after the burst (median)",
            fmt_ms(median(&dcp)),
            "",
            None,
        ),
    ];
    Ok((
        rows,
        json!({ "rounds": rounds, "converge_ms": summary(&conv), "write_ms": summary(&write_ms), "docker_cp_folder_ms": summary(&dcp), "devloop_sends_per_burst": summary(&batches) }),
    ))
}

// ------------------------------------------------------------------ 3. initial

fn parse_in_sync(line: &str) -> serde_json::Value {
    // "in sync: N files, X MiB (C changes sent; T total, scan S)"
    json!({ "line": line.split("[devloop] ").nth(1).unwrap_or(line) })
}

pub fn initial(ctx: &Ctx) -> Result<(Vec<Row>, serde_json::Value)> {
    let (rounds, files, bytes, dirs) = if ctx.quick {
        (1, 2_000, 40u64 << 20, 100)
    } else {
        (5, 10_000, 200u64 << 20, 500)
    };
    let toml = format!(
        "[services.init]\nimage = \"{IMAGE}\"\nsync = {{ from = \"tree\", to = \"/app\" }}\nexclude = [\"/dst-*/\"]\ncommand = [\"sleep\", \"infinity\"]\n"
    );
    let p = Project::new(ctx, "initial", &toml)?;
    let tree_dir = p.dir.join("tree");
    let parked = ctx.tmp.path().join("initial-tree");
    let t = Instant::now();
    let written = gen_tree(&parked, files, bytes, dirs, 42)?;
    eprintln!(
        "bench: initial: generated {files} files, {} MiB in {:.1} s",
        written >> 20,
        t.elapsed().as_secs_f64()
    );
    let container = p.container("init");
    let has_rsync_host = Command::new("rsync")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    let mut res: std::collections::BTreeMap<&str, Vec<f64>> = Default::default();
    let mut lines = Vec::new();
    let mut rsync_missing = None;
    for r in 0..rounds {
        // A new dev container with an empty volume (not timed).
        std::fs::create_dir_all(&tree_dir)?;
        let mut up = p.spawn(ctx, &["up", "--no-logs"])?;
        up.wait_line(0, Duration::from_secs(120), in_sync)?;
        up.interrupt();
        std::fs::remove_dir(&tree_dir)?;
        std::fs::rename(&parked, &tree_dir)?;
        let rsync_ok = has_rsync_host && install_rsync(ctx, &container)?;
        if !rsync_ok {
            rsync_missing = Some(if has_rsync_host {
                "no rsync in the container (set DEVLOOP_BENCH_DEBS)"
            } else {
                "no rsync on the host"
            });
        }
        let order = ["cp", "devloop", "docker cp", "rsync"];
        for k in 0..order.len() {
            let tool = order[(k + r) % order.len()];
            // Write back what the previous tool left dirty, so no tool pays for another's writes.
            run_ok(&mut Command::new("sync"))?;
            std::thread::sleep(Duration::from_millis(500));
            let t0 = Instant::now();
            match tool {
                "cp" => {
                    let dst = ctx.tmp.path().join(format!("initial-cp-{r}"));
                    run_ok(Command::new("cp").arg("-r").arg(&tree_dir).arg(&dst))?;
                    res.entry("cp -r (laptop disk)")
                        .or_default()
                        .push(ms(t0.elapsed()));
                    std::fs::remove_dir_all(&dst)?;
                }
                "devloop" => {
                    let agent = agent_host_pid(&container)?;
                    let agent_cpu0 = cpu_split_ms(agent)?;
                    let mut sync = p.spawn(ctx, &["sync", "init", "--no-logs"])?;
                    let (_, at, line) = sync.wait_line(0, Duration::from_secs(300), in_sync)?;
                    res.entry("devloop")
                        .or_default()
                        .push(ms(at - sync.started));
                    res.entry("devloop cli cpu")
                        .or_default()
                        .push(cpu_ms(sync.child.id())?);
                    let agent_cpu1 = cpu_split_ms(agent)?;
                    res.entry("devloop agent cpu")
                        .or_default()
                        .push(agent_cpu1.0 + agent_cpu1.1 - agent_cpu0.0 - agent_cpu0.1);
                    res.entry("devloop agent sys cpu")
                        .or_default()
                        .push(agent_cpu1.1 - agent_cpu0.1);
                    res.entry("devloop cli sys cpu")
                        .or_default()
                        .push(cpu_split_ms(sync.child.id())?.1);
                    lines.push(parse_in_sync(&line));
                    sync.interrupt();
                }
                "docker cp" => {
                    run_ok(Command::new("docker").args([
                        "cp",
                        &tree_dir.to_string_lossy(),
                        &format!("{container}:/app/dst-dcp-{r}"),
                    ]))?;
                    res.entry("docker cp").or_default().push(ms(t0.elapsed()));
                }
                _ if rsync_ok => {
                    run_ok(Command::new("rsync").args([
                        "-a",
                        "--blocking-io",
                        "-e",
                        "docker exec -i",
                        &format!("{}/", tree_dir.display()),
                        &format!("{container}:/app/dst-rsync-{r}/"),
                    ]))?;
                    res.entry("rsync over docker exec")
                        .or_default()
                        .push(ms(t0.elapsed()));
                }
                _ => {}
            }
        }
        // Check what devloop and docker cp wrote (not timed).
        let count = docker_ok(&["exec", &container, "sh", "-c", &format!("find /app -path /app/dst-dcp-{r} -prune -o -path '/app/dst-rsync-*' -prune -o -type f -print | wc -l; find /app/dst-dcp-{r} -type f | wc -l")])?;
        let counts: Vec<usize> = count
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect();
        if counts != [files, files] {
            bail!("initial round {r}: expected {files} files from devloop and from docker cp in the container, found {counts:?}");
        }
        std::fs::rename(&tree_dir, &parked)?;
        p.run(ctx, &["down"])?;
    }
    let get = |k: &str| res.get(k).cloned().unwrap_or_default();
    let (dl, cp, dcp, rs) = (
        get("devloop"),
        get("cp -r (laptop disk)"),
        get("docker cp"),
        get("rsync over docker exec"),
    );
    let per_round =
        |other: &[f64]| -> Vec<f64> { dl.iter().zip(other).map(|(d, o)| d / o).collect() };
    let (r_cp, r_dcp, r_rs) = (per_round(&cp), per_round(&dcp), per_round(&rs));
    let what = format!("{files} files, {} MiB, {dirs} folders", written >> 20);
    let mut rows = vec![
        row(
            "initial",
            format!("devloop sync to \"in sync\" ({what}; median of {rounds})"),
            fmt_ms(median(&dl)),
            "",
            None,
        ),
        row(
            "initial",
            "cp -r on the laptop disk (median)",
            fmt_ms(median(&cp)),
            "",
            None,
        ),
        row(
            "initial",
            "docker cp into /app/dst-N (median)",
            fmt_ms(median(&dcp)),
            "",
            None,
        ),
    ];
    if !rs.is_empty() {
        rows.push(row(
            "initial",
            "rsync -e 'docker exec -i' into /app/dst-N (median)",
            fmt_ms(median(&rs)),
            "",
            None,
        ));
    }
    // Ratios are taken per round (the disk's speed drifts between rounds); the verdict is on
    // their median, and the worst round is shown beside it.
    let ratio = |r: &[f64]| format!("{:.2}x (worst {:.2}x)", median(r), pct(r, 100.0));
    rows.push(row(
        "initial",
        "devloop / cp -r (median of per-round ratios)",
        ratio(&r_cp),
        "<= 2x",
        Some(median(&r_cp) <= 2.0),
    ));
    rows.push(row(
        "initial",
        "devloop / docker cp (median of per-round ratios)",
        ratio(&r_dcp),
        "< 1x",
        Some(median(&r_dcp) < 1.0),
    ));
    rows.push(row(
        "initial",
        "  diagnosis: devloop CPU time (of it in the kernel), cli / agent (median)",
        format!(
            "{} ({}) / {} ({})",
            fmt_ms(median(&get("devloop cli cpu"))),
            fmt_ms(median(&get("devloop cli sys cpu"))),
            fmt_ms(median(&get("devloop agent cpu"))),
            fmt_ms(median(&get("devloop agent sys cpu")))
        ),
        "",
        None,
    ));
    if rs.is_empty() {
        rows.push(row(
            "initial",
            "devloop / rsync",
            rsync_missing.unwrap_or("not run"),
            "< 1x",
            None,
        ));
    } else {
        rows.push(row(
            "initial",
            "devloop / rsync (median of per-round ratios)",
            ratio(&r_rs),
            "< 1x",
            Some(median(&r_rs) < 1.0),
        ));
    }
    Ok((
        rows,
        json!({
            "rounds": rounds, "files": files, "bytes": written, "dirs": dirs,
            "devloop_ms": summary(&dl), "cp_r_ms": summary(&cp), "docker_cp_ms": summary(&dcp), "rsync_ms": summary(&rs),
            "ratio_devloop_over_cp": r_cp, "ratio_devloop_over_docker_cp": r_dcp, "ratio_devloop_over_rsync": r_rs,
            "devloop_lines": lines, "rsync_missing": rsync_missing,
            "devloop_cli_cpu_ms": get("devloop cli cpu"), "devloop_agent_cpu_ms": get("devloop agent cpu"),
            "devloop_cli_sys_cpu_ms": get("devloop cli sys cpu"), "devloop_agent_sys_cpu_ms": get("devloop agent sys cpu"),
        }),
    ))
}

// ------------------------------------------------------------------ 4. restart

/// One HTTP/1.0 GET; the body on success.
fn http_get(addr: &str, path: &str) -> Option<String> {
    let sock: std::net::SocketAddr = addr.parse().ok()?;
    let mut s = std::net::TcpStream::connect_timeout(&sock, Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: bench\r\n\r\n").as_bytes())
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.starts_with("HTTP/1.0 200").then_some(out)
}

fn wait_version(addr: &str, version: &str, timeout: Duration) -> Result<Instant> {
    let needle = format!("\"version\": \"{version}\"");
    let deadline = Instant::now() + timeout;
    loop {
        if http_get(addr, "/items").is_some_and(|b| b.contains(&needle)) {
            return Ok(Instant::now());
        }
        if Instant::now() > deadline {
            bail!("{addr} did not serve version {version} within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

const START_PROBE: &str = r#"
import os, socket, subprocess, sys, time
n = int(sys.argv[1])
out = []
for i in range(n):
    env = dict(os.environ, PORT='8011')
    t0 = time.time()
    p = subprocess.Popen(['python3', '/app/app.py'], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd='/app')
    while True:
        try:
            socket.create_connection(('127.0.0.1', 8011), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.001)
    out.append((time.time() - t0) * 1000)
    p.terminate(); p.wait()
print(' '.join('%.2f' % x for x in out))
"#;

pub fn restart(ctx: &Ctx, cleanup: &Cleanup) -> Result<(Vec<Row>, serde_json::Value)> {
    let rounds = if ctx.quick { 5 } else { 20 };
    let name = ctx.project_name("restart");
    let dir = ctx.tmp.path().join("restart");
    copy_dir(&ctx.workspace.join("examples/shop"), &dir)?;
    let text = std::fs::read_to_string(dir.join("devloop.toml"))?;
    std::fs::write(
        dir.join("devloop.toml"),
        format!("project = \"{name}\"\n{text}"),
    )?;
    // Published host ports would collide with anything else on this machine.
    let compose = std::fs::read_to_string(dir.join("docker-compose.yml"))?;
    let compose: String = compose
        .lines()
        .filter(|l| {
            !l.trim_start().starts_with("ports:") && !l.trim_start().starts_with("- \"8080:8080\"")
        })
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(dir.join("docker-compose.yml"), compose)?;
    let state = ctx.tmp.path().join("restart-state");
    std::fs::create_dir_all(&state)?;
    let p = Project {
        name: name.clone(),
        dir,
        state,
    };
    cleanup
        .images
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(devloop::image::dev_image_tag(&name, "api"));
    let mut up = p.spawn(ctx, &["up", "api", "--no-logs"])?;
    up.wait_line(0, Duration::from_secs(300), in_sync)?;
    let addr = format!("{}:8000", p.ip("api")?);
    wait_version(&addr, "1", Duration::from_secs(30))?;
    let app = p.dir.join("api/app.py");
    let original = std::fs::read_to_string(&app)?;
    let with_version = |v: &str| original.replace("VERSION = \"1\"", &format!("VERSION = \"{v}\""));
    if with_version("x") == original {
        bail!("examples/shop/api/app.py has no `VERSION = \"1\"` line to edit");
    }

    // The alternative: the same image run plainly on the same network; docker cp + docker restart.
    let plain = format!("bench{}-restart-plain", ctx.pid);
    let image = devloop::image::dev_image_tag(&name, "api");
    docker_ok(&[
        "run",
        "-d",
        "--name",
        &plain,
        "--label",
        &format!("{TEST_RUN_LABEL}={}", ctx.run),
        "--network",
        &format!("devloop-{name}"),
        "-e",
        "PORT=8000",
        "-e",
        "PYTHONUNBUFFERED=1",
        &image,
    ])?;
    let plain_ip = docker_ok(&[
        "inspect",
        "-f",
        &format!("{{{{(index .NetworkSettings.Networks \"devloop-{name}\").IPAddress}}}}"),
        &plain,
    ])?;
    let plain_addr = format!("{plain_ip}:8000");
    wait_version(&plain_addr, "1", Duration::from_secs(30))?;
    let plain_file = ctx.tmp.path().join("restart-plain-app.py");

    // The app's own start time, measured inside the dev container (no exec in the loop),
    // half before the rounds and half after, so a busy spell of the machine hits both sides.
    let start_probe = |n: usize| -> Result<Vec<f64>> {
        let out = docker_ok(&[
            "exec",
            &p.container("api"),
            "python3",
            "-c",
            START_PROBE,
            &n.to_string(),
        ])?;
        Ok(out
            .split_whitespace()
            .filter_map(|v| v.parse().ok())
            .collect())
    };
    let n = if ctx.quick { 6 } else { 16 };
    let mut start = start_probe(n / 2)?;

    let (mut dl, mut alt) = (Vec::new(), Vec::new());
    for r in 0..rounds {
        let v_d = format!("d{r}");
        let v_a = format!("a{r}");
        let mut run_devloop = || -> Result<()> {
            let t0 = Instant::now();
            std::fs::write(&app, with_version(&v_d))?;
            dl.push(ms(wait_version(&addr, &v_d, Duration::from_secs(30))? - t0));
            Ok(())
        };
        let mut run_alt = || -> Result<()> {
            std::fs::write(&plain_file, with_version(&v_a))?;
            let t0 = Instant::now();
            run_ok(Command::new("docker").args([
                "cp",
                &plain_file.to_string_lossy(),
                &format!("{plain}:/app/app.py"),
            ]))?;
            run_ok(Command::new("docker").args(["restart", "-t", "5", &plain]))?;
            alt.push(ms(wait_version(
                &plain_addr,
                &v_a,
                Duration::from_secs(30),
            )? - t0));
            Ok(())
        };
        if r % 2 == 0 {
            run_devloop()?;
            run_alt()?;
        } else {
            run_alt()?;
            run_devloop()?;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    start.extend(start_probe(n / 2)?);
    up.interrupt();

    let (m_d, m_s, m_a) = (median(&dl), median(&start), median(&alt));
    let overhead = m_d - m_s;
    let rows = vec![
        row(
            "restart",
            format!(
                "devloop save->new version answers (median of {rounds}, p90 {})",
                fmt_ms(pct(&dl, 90.0))
            ),
            fmt_ms(m_d),
            "<= 150 ms + app start",
            Some(overhead <= 150.0),
        ),
        row(
            "restart",
            format!("  app's own start time (python3 app.py -> port answers, median of {n})"),
            fmt_ms(m_s),
            "",
            None,
        ),
        row(
            "restart",
            "  devloop overhead (median - app start)",
            fmt_ms(overhead),
            "<= 150 ms",
            Some(overhead <= 150.0),
        ),
        row(
            "restart",
            format!(
                "docker cp + docker restart (median, p90 {})",
                fmt_ms(pct(&alt, 90.0))
            ),
            fmt_ms(m_a),
            "",
            None,
        ),
        row(
            "restart",
            "docker cp+restart / devloop",
            format!("{:.1}x", m_a / m_d),
            "",
            None,
        ),
    ];
    Ok((
        rows,
        json!({ "rounds": rounds, "devloop_ms": summary(&dl), "app_start_ms": summary(&start), "overhead_ms": overhead, "docker_cp_restart_ms": summary(&alt) }),
    ))
}

// ------------------------------------------------------------------ 5. index100k

pub fn index100k(ctx: &Ctx) -> Result<(Vec<Row>, serde_json::Value)> {
    let (files, bytes, dirs) = if ctx.quick {
        (10_000, 20_000_000u64, 500)
    } else {
        (100_000, 200_000_000u64, 5_000)
    };
    let rounds = if ctx.quick { 1 } else { 3 };
    let toml = format!("[services.big]\nimage = \"{IMAGE}\"\nsync = {{ from = \"tree\", to = \"/app\" }}\ncommand = [\"sleep\", \"infinity\"]\n");
    let p = Project::new(ctx, "index", &toml)?;
    let tree = p.dir.join("tree");
    let t = Instant::now();
    let written = gen_tree(&tree, files, bytes, dirs, 100)?;
    eprintln!(
        "bench: index100k: generated {files} files, {} MB in {:.1} s",
        written / 1_000_000,
        t.elapsed().as_secs_f64()
    );
    let mut up = p.spawn(ctx, &["up", "--no-logs"])?;
    let (_, at, first_line) = up.wait_line(0, Duration::from_secs(600), in_sync)?;
    let first_sync = ms(at - up.started);
    up.interrupt();
    let container = p.container("big");
    let agent_pid = agent_host_pid(&container)?;
    let (_, agent_rss_after_first) = rss_kib(agent_pid)?;

    let (mut idx, mut edit, mut cli_hwm, mut lines) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for r in 0..rounds {
        let mut sync = p.spawn(ctx, &["sync", "big", "--no-logs"])?;
        let (i, at, line) = sync.wait_line(0, Duration::from_secs(300), in_sync)?;
        idx.push(ms(at - sync.started));
        lines.push(parse_in_sync(&line));
        // An edit right then must be synced.
        let token = format!("edit {r} {}\n", now_ns());
        let t0 = Instant::now();
        std::fs::write(tree.join("probe-edit.txt"), &token)?;
        let (_, at, _) = sync.wait_line(i + 1, Duration::from_secs(30), |l| {
            l.contains("[devloop] synced") && l.contains("probe-edit.txt")
        })?;
        edit.push(ms(at - t0));
        let inside = docker_ok(&["exec", &container, "cat", "/app/probe-edit.txt"])?;
        if inside.trim() != token.trim() {
            bail!("index100k: the edit made right after the index did not arrive (container has {inside:?})");
        }
        let (hwm, _) = rss_kib(sync.child.id())?;
        cli_hwm.push(hwm as f64 / 1024.0);
        sync.interrupt();
    }
    let (a_hwm, a_rss) = rss_kib(agent_pid)?;
    let (a_hwm, a_rss) = (a_hwm as f64 / 1024.0, a_rss as f64 / 1024.0);
    let m = median(&idx);
    let what = format!("{files} files, {} MB, {dirs} folders", written / 1_000_000);
    let cli_peak = pct(&cli_hwm, 100.0);
    let rows = vec![
        row("index100k", format!("devloop sync start->\"in sync\", nothing to send ({what}; median of {rounds})"), fmt_ms(m), "<= 3 s", Some(pct(&idx, 100.0) <= 3000.0)),
        row("index100k", "  edit right after -> devloop reports it synced (median)", fmt_ms(median(&edit)), "", None),
        row("index100k", "  first sync of that tree into the empty volume (devloop up)", fmt_ms(first_sync), "", None),
        row("index100k", "cli peak RSS (VmHWM, max over rounds)", format!("{cli_peak:.0} MiB"), "<= 150 MB", Some(cli_peak * 1.048_576 <= 150.0)),
        row("index100k", format!("agent RSS after {rounds} index requests (VmHWM {a_hwm:.0} MiB; {:.1} MiB before them)", agent_rss_after_first as f64 / 1024.0), format!("{a_rss:.1} MiB"), "<= 20 MB", Some(a_rss * 1.048_576 <= 20.0)),
    ];
    Ok((
        rows,
        json!({
            "files": files, "bytes": written, "dirs": dirs, "rounds": rounds,
            "index_ms": summary(&idx), "edit_after_index_ms": summary(&edit), "first_sync_ms": first_sync, "first_sync_line": parse_in_sync(&first_line),
            "cli_vmhwm_mib": summary(&cli_hwm), "agent_vmrss_after_first_sync_mib": agent_rss_after_first as f64 / 1024.0, "agent_vmrss_mib": a_rss, "agent_vmhwm_mib": a_hwm, "devloop_lines": lines,
        }),
    ))
}
