//! What every scenario needs: the binaries, projects in temp folders, devloop processes whose
//! output lines are time-stamped as they arrive, the Docker CLI, statistics, and the cleanup
//! guard that removes everything labelled with this run.

use anyhow::{anyhow, bail, Context, Result};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub const TEST_RUN_LABEL: &str = "dev.devloop.test-run";

/// Settings shared by all scenarios of one run.
pub struct Ctx {
    pub quick: bool,
    /// `bench-<pid>`: the value of the test-run label on everything this run creates.
    pub run: String,
    pub pid: u32,
    pub workspace: PathBuf,
    pub devloop: PathBuf,
    pub agent: PathBuf,
    /// Debian packages (rsync and what it needs beyond the base image) for the containers.
    pub debs: Option<PathBuf>,
    pub tmp: tempfile::TempDir,
    pub rt: tokio::runtime::Runtime,
}

impl Ctx {
    pub fn new(quick: bool) -> Result<Ctx> {
        let pid = std::process::id();
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .context("bench/ has a parent")?
            .to_path_buf();
        let exe = std::env::current_exe()?;
        let devloop = exe.parent().context("exe dir")?.join("devloop");
        if !devloop.is_file() {
            bail!("{} is missing: build it with `cargo build --release -p devloop` (scripts/bench.sh does)", devloop.display());
        }
        let agent = std::env::var_os("DEVLOOP_AGENT_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                workspace.join("target/x86_64-unknown-linux-gnu/release/devloop-agent")
            });
        if !agent.is_file() {
            bail!(
                "{} is missing: run scripts/build-agent.sh (scripts/bench.sh does)",
                agent.display()
            );
        }
        let debs = std::env::var_os("DEVLOOP_BENCH_DEBS")
            .map(PathBuf::from)
            .filter(|p| p.is_dir());
        let tmp = tempfile::Builder::new()
            .prefix("devloop-bench-")
            .tempdir()?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        Ok(Ctx {
            quick,
            run: format!("bench-{pid}"),
            pid,
            workspace,
            devloop,
            agent,
            debs,
            tmp,
            rt,
        })
    }

    pub fn project_name(&self, scenario: &str) -> String {
        format!("bench{}-{scenario}", self.pid)
    }
}

/// Removes every container, volume and network carrying this run's label, and the images
/// named in `images`, when dropped (also when a scenario fails or panics).
pub struct Cleanup {
    pub run: String,
    pub images: Mutex<Vec<String>>,
}

impl Cleanup {
    pub fn sweep(&self) {
        let filter = format!("label={TEST_RUN_LABEL}={}", self.run);
        let ids = docker_out(&["ps", "-aq", "--filter", &filter]);
        let ids: Vec<&str> = ids.lines().filter(|l| !l.is_empty()).collect();
        if !ids.is_empty() {
            let mut args = vec!["rm", "-f", "-v"];
            args.extend(ids);
            let _ = docker(&args);
        }
        for v in docker_out(&["volume", "ls", "-q", "--filter", &filter])
            .lines()
            .filter(|l| !l.is_empty())
        {
            let _ = docker(&["volume", "rm", "-f", v]);
        }
        for n in docker_out(&["network", "ls", "-q", "--filter", &filter])
            .lines()
            .filter(|l| !l.is_empty())
        {
            let _ = docker(&["network", "rm", n]);
        }
        for i in self
            .images
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            let _ = docker(&["rmi", "-f", &i]);
        }
    }

    /// What still carries the label (empty after a clean sweep).
    pub fn leftovers(&self) -> Vec<String> {
        let filter = format!("label={TEST_RUN_LABEL}={}", self.run);
        let mut all = Vec::new();
        for args in [
            vec!["ps", "-aq"],
            vec!["volume", "ls", "-q"],
            vec!["network", "ls", "-q"],
        ] {
            let mut a = args.clone();
            a.extend(["--filter", &filter]);
            all.extend(
                docker_out(&a)
                    .lines()
                    .filter(|l| !l.is_empty())
                    .map(|l| format!("{} {l}", args[0])),
            );
        }
        all
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        self.sweep();
    }
}

pub fn docker(args: &[&str]) -> Result<Output> {
    Command::new("docker")
        .args(args)
        .output()
        .context("running the docker CLI")
}

pub fn docker_out(args: &[&str]) -> String {
    docker(args)
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

pub fn docker_ok(args: &[&str]) -> Result<String> {
    let o = docker(args)?;
    if !o.status.success() {
        bail!(
            "docker {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&o.stdout).trim().to_string())
}

pub fn run_ok(cmd: &mut Command) -> Result<Output> {
    let o = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !o.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}{}",
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    Ok(o)
}

pub fn now_ns() -> i128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i128)
        .unwrap_or(0)
}

/// A devloop project in a temp folder, with its own state folder.
pub struct Project {
    pub name: String,
    pub dir: PathBuf,
    pub state: PathBuf,
}

impl Project {
    /// `toml` is the body of devloop.toml without the `project =` line.
    pub fn new(ctx: &Ctx, scenario: &str, toml: &str) -> Result<Project> {
        let name = ctx.project_name(scenario);
        let dir = ctx.tmp.path().join(scenario);
        let state = ctx.tmp.path().join(format!("{scenario}-state"));
        std::fs::create_dir_all(&dir)?;
        std::fs::create_dir_all(&state)?;
        std::fs::write(
            dir.join("devloop.toml"),
            format!("project = \"{name}\"\n{toml}"),
        )?;
        Ok(Project { name, dir, state })
    }

    pub fn cmd(&self, ctx: &Ctx, args: &[&str]) -> Command {
        let mut c = Command::new(&ctx.devloop);
        c.args(args)
            .current_dir(&self.dir)
            .env("DEVLOOP_STATE_DIR", &self.state)
            .env("DEVLOOP_AGENT_BIN", &ctx.agent)
            .env("DEVLOOP_TEST_RUN", &ctx.run)
            .env("NO_COLOR", "1");
        c
    }

    pub fn spawn(&self, ctx: &Ctx, args: &[&str]) -> Result<Proc> {
        let log = self.state.join(format!(
            "{}-{}.log",
            args.join("-").replace('/', "_"),
            now_ns()
        ));
        Proc::spawn(self.cmd(ctx, args), log)
    }

    pub fn run(&self, ctx: &Ctx, args: &[&str]) -> Result<Output> {
        run_ok(&mut self.cmd(ctx, args))
    }

    pub fn container(&self, service: &str) -> String {
        format!("devloop-{}-{service}", self.name)
    }

    pub fn ip(&self, service: &str) -> Result<String> {
        let fmt = format!(
            "{{{{(index .NetworkSettings.Networks \"devloop-{}\").IPAddress}}}}",
            self.name
        );
        docker_ok(&["inspect", "-f", &fmt, &self.container(service)])
    }

    pub fn token(&self, service: &str) -> Result<String> {
        let p = self.state.join("tokens").join(self.container(service));
        Ok(std::fs::read_to_string(&p)
            .with_context(|| format!("reading {}", p.display()))?
            .trim()
            .to_string())
    }
}

type Lines = Arc<Mutex<Vec<(Instant, String)>>>;

/// A child process whose stdout and stderr lines are stamped with their arrival time (and
/// copied to a log file for diagnosis). Killed when dropped.
pub struct Proc {
    pub child: Child,
    pub started: Instant,
    lines: Lines,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(mut cmd: Command, log: PathBuf) -> Result<Proc> {
        let file = Arc::new(Mutex::new(std::fs::File::create(&log)?));
        let lines: Lines = Arc::default();
        let started = Instant::now();
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("spawning {cmd:?}"))?;
        let out = child.stdout.take().context("stdout")?;
        let err = child.stderr.take().context("stderr")?;
        for (reader, tag) in [
            (Box::new(out) as Box<dyn std::io::Read + Send>, "out"),
            (Box::new(err), "err"),
        ] {
            let (lines, file) = (lines.clone(), file.clone());
            std::thread::spawn(move || {
                for line in BufReader::new(reader).lines() {
                    let Ok(line) = line else { break };
                    let at = Instant::now();
                    if let Ok(mut f) = file.lock() {
                        let _ = writeln!(
                            f,
                            "{:>9.3} {tag} {line}",
                            at.duration_since(started).as_secs_f64()
                        );
                    }
                    lines
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push((at, line));
                }
            });
        }
        Ok(Proc {
            child,
            started,
            lines,
            log,
        })
    }

    pub fn len(&self) -> usize {
        self.lines.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// The first line at index >= `from` matching `pred`: (index, arrival, text).
    pub fn wait_line(
        &mut self,
        from: usize,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Result<(usize, Instant, String)> {
        let deadline = Instant::now() + timeout;
        let mut next = from;
        loop {
            {
                let lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
                while next < lines.len() {
                    if pred(&lines[next].1) {
                        return Ok((next, lines[next].0, lines[next].1.clone()));
                    }
                    next += 1;
                }
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                // Let the reader threads drain what is left, then look once more.
                std::thread::sleep(Duration::from_millis(50));
                let lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
                if let Some((i, (at, l))) = lines
                    .iter()
                    .enumerate()
                    .skip(next)
                    .find(|(_, (_, l))| pred(l))
                {
                    return Ok((i, *at, l.clone()));
                }
                bail!(
                    "devloop exited ({status}) before the expected line; its output is in {}:\n{}",
                    self.log.display(),
                    self.tail(30)
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "the expected line did not come within {timeout:?}; output in {}:\n{}",
                    self.log.display(),
                    self.tail(30)
                );
            }
            std::thread::sleep(Duration::from_micros(300));
        }
    }

    pub fn tail(&self, n: usize) -> String {
        let lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        lines
            .iter()
            .rev()
            .take(n)
            .rev()
            .map(|(_, l)| format!("    {l}\n"))
            .collect()
    }

    pub fn all_lines(&self) -> Vec<String> {
        self.lines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(_, l)| l.clone())
            .collect()
    }

    /// SIGINT (as Ctrl-C), then waits up to 15 s before killing.
    pub fn interrupt(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        );
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Installs rsync into a running container from the Debian packages in DEVLOOP_BENCH_DEBS
/// (nothing is downloaded in the container: this engine has no registry and containers no
/// network to a mirror). Ok(false) when no packages were given.
pub fn install_rsync(ctx: &Ctx, container: &str) -> Result<bool> {
    if docker(&["exec", container, "sh", "-c", "command -v rsync"])?
        .status
        .success()
    {
        return Ok(true);
    }
    let Some(debs) = &ctx.debs else {
        return Ok(false);
    };
    docker_ok(&["exec", container, "mkdir", "-p", "/tmp/bench-debs"])?;
    docker_ok(&[
        "cp",
        &format!("{}/.", debs.display()),
        &format!("{container}:/tmp/bench-debs"),
    ])?;
    docker_ok(&["exec", container, "sh", "-c", "dpkg -i /tmp/bench-debs/*.deb >/dev/null && rm -rf /tmp/bench-debs && rsync --version | head -1"])?;
    Ok(true)
}

/// Deterministic pseudo-random bytes (xorshift64*): incompressible, reproducible trees.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// Writes `files` files of `total_bytes` in all (sizes vary from 0 to 2x the mean) into
/// `dirs` folders two levels deep under `root`. Returns the bytes written.
pub fn gen_tree(
    root: &Path,
    files: usize,
    total_bytes: u64,
    dirs: usize,
    seed: u64,
) -> Result<u64> {
    let mut rng = Rng::new(seed);
    let mean = total_bytes / files as u64;
    let per_top = (dirs as f64).sqrt().ceil() as usize;
    let mut buf = vec![0u8; (mean * 2 + 1) as usize];
    let mut written = 0u64;
    for i in 0..files {
        let d = i % dirs;
        let dir = root
            .join(format!("d{:03}", d / per_top))
            .join(format!("s{:03}", d % per_top));
        if i < dirs {
            std::fs::create_dir_all(&dir)?;
        }
        let size = if i + 1 == files {
            total_bytes.saturating_sub(written).min(mean * 2)
        } else {
            rng.next_u64() % (mean * 2 + 1)
        };
        let data = &mut buf[..size as usize];
        rng.fill(data);
        std::fs::write(dir.join(format!("f{i:06}.bin")), &*data)?;
        written += size;
    }
    Ok(written)
}

/// Nearest-rank percentile of `v` (any order), p in 0..=100.
pub fn pct(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let rank = ((p / 100.0) * s.len() as f64).ceil().max(1.0) as usize;
    s[rank.min(s.len()) - 1]
}

pub fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

pub fn summary(v: &[f64]) -> serde_json::Value {
    serde_json::json!({
        "n": v.len(),
        "median": median(v),
        "p90": pct(v, 90.0),
        "min": pct(v, 0.0),
        "max": pct(v, 100.0),
        "samples": v,
    })
}

/// One line of the printed table.
#[derive(Debug, Clone)]
pub struct Row {
    pub scenario: String,
    pub metric: String,
    pub value: String,
    pub target: String,
    pub pass: Option<bool>,
}

pub fn row(
    scenario: &str,
    metric: impl Into<String>,
    value: impl Into<String>,
    target: impl Into<String>,
    pass: Option<bool>,
) -> Row {
    Row {
        scenario: scenario.into(),
        metric: metric.into(),
        value: value.into(),
        target: target.into(),
        pass,
    }
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

pub fn fmt_ms(v: f64) -> String {
    if v.is_nan() {
        "n/a".into()
    } else if v < 10.0 {
        format!("{v:.2} ms")
    } else if v < 10_000.0 {
        format!("{v:.0} ms")
    } else {
        format!("{:.1} s", v / 1000.0)
    }
}

/// Reads `VmHWM` and `VmRSS` (KiB) of a process from /proc.
pub fn rss_kib(pid: u32) -> Result<(u64, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> Result<u64> {
        s.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| anyhow!("no {name} in /proc/{pid}/status"))
    };
    Ok((field("VmHWM:")?, field("VmRSS:")?))
}

/// The host pid of the agent in a container (`docker top`).
pub fn agent_host_pid(container: &str) -> Result<u32> {
    let out = docker_ok(&["top", container, "-eo", "pid,args"])?;
    out.lines()
        .skip(1)
        // Not docker-init (tini), whose arguments name the agent too.
        .find(|l| {
            l.split_whitespace()
                .nth(1)
                .is_some_and(|a| a.ends_with("devloop-agent"))
        })
        .and_then(|l| l.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| anyhow!("no devloop-agent process in `docker top {container}`:\n{out}"))
}

/// Copies a folder tree (files and folders only).
pub fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let target = to.join(e.file_name());
        if e.file_type()?.is_dir() {
            copy_dir(&e.path(), &target)?;
        } else {
            std::fs::copy(e.path(), &target)?;
        }
    }
    Ok(())
}

/// User + system CPU time of a process so far, in ms (from /proc/PID/stat; 100 ticks/s).
pub fn cpu_ms(pid: u32) -> Result<f64> {
    let (u, s) = cpu_split_ms(pid)?;
    Ok(u + s)
}

/// (user, system) CPU time of a process so far, in ms.
pub fn cpu_split_ms(pid: u32) -> Result<(f64, f64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = s.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 after the ')'.
    Ok((ticks(11) as f64 * 10.0, ticks(12) as f64 * 10.0))
}
