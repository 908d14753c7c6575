//! Harness for the end-to-end tests: a copy of examples/shop under a unique project name per
//! test, the real `devloop` binary, the real Docker engine, and cleanup by label.
//!
//! The tests need a Docker engine and fail (never skip) without one. They need the cli
//! (`cargo build -p devloop`) and the static agent (`scripts/build-agent.sh`) built first;
//! `scripts/test.sh` does both.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub mod k8s;

pub const TEST_RUN_LABEL: &str = "dev.devloop.test-run";

pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The `devloop` binary of this build.
pub fn devloop_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/debug/deps/e2e-xxxx -> target/debug/devloop
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .join("devloop");
    assert!(
        bin.is_file(),
        "{} is missing: run `cargo build -p devloop` first (scripts/test.sh does)",
        bin.display()
    );
    bin
}

pub fn agent_bin() -> PathBuf {
    let p = workspace().join("target/x86_64-unknown-linux-gnu/release/devloop-agent");
    assert!(
        p.is_file(),
        "{} is missing: run scripts/build-agent.sh first (scripts/test.sh does)",
        p.display()
    );
    p
}

/// Fails the test (never skips it) when the engine cannot be reached.
pub fn require_docker() {
    let out = Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .output();
    match out {
        Ok(o) if o.status.success() => {}
        Ok(o) => panic!(
            "these tests need a Docker engine and `docker info` failed: {}",
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => panic!("these tests need a Docker engine and the docker CLI: {e}"),
    }
}

pub fn docker(args: &[&str]) -> Output {
    Command::new("docker")
        .args(args)
        .output()
        .expect("run docker")
}

pub fn docker_ok(args: &[&str]) -> String {
    let o = docker(args);
    assert!(
        o.status.success(),
        "docker {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// The example's base image, built once per machine (under a lock, since test binaries run
/// as separate processes): devloop would build it on first use too, but two tests racing
/// to debootstrap the same image would only waste minutes.
pub fn ensure_base_image() {
    let lock_path = std::env::temp_dir().join("devloop-test-base.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .expect("lock file");
    let _lock = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive).expect("flock");
    if docker(&["image", "inspect", "python:3.11-slim-bookworm"])
        .status
        .success()
    {
        return;
    }
    let status = Command::new("bash")
        .arg(workspace().join("images/base/build-base.sh"))
        .arg("python:3.11-slim-bookworm")
        .status()
        .expect("run build-base.sh");
    assert!(status.success(), "building the offline base image failed");
}

/// Held by tests that intercept: `leave --all` (rightly) ends every intercept on the
/// engine, so such tests must not overlap with one another, in any test binary.
pub fn intercept_lock() -> nix::fcntl::Flock<std::fs::File> {
    let path = std::env::temp_dir().join("devloop-test-intercepts.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .expect("lock file");
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive).expect("flock")
}

/// A copy of examples/shop with its own project name; everything devloop makes for it is
/// removed when this is dropped.
pub struct Shop {
    pub dir: tempfile::TempDir,
    pub project: String,
    pub state: tempfile::TempDir,
    children: Vec<Child>,
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), &target).unwrap();
        }
    }
}

impl Shop {
    /// `ports`: whether to keep the published host ports (only one test at a time can).
    pub fn new(name: &str, keep_ports: bool) -> Shop {
        require_docker();
        ensure_base_image();
        let dir = tempfile::tempdir().unwrap();
        copy_dir(&workspace().join("examples/shop"), dir.path());
        let project = format!("t{}-{name}", std::process::id());
        let cfg = dir.path().join("devloop.toml");
        let text = std::fs::read_to_string(&cfg).unwrap();
        std::fs::write(&cfg, format!("project = \"{project}\"\n{text}")).unwrap();
        if !keep_ports {
            // Published ports would collide between tests running side by side.
            let compose = dir.path().join("docker-compose.yml");
            let text = std::fs::read_to_string(&compose).unwrap();
            let text: String = text
                .lines()
                .filter(|l| {
                    !l.trim_start().starts_with("ports:")
                        && !l.trim_start().starts_with("- \"8080:8080\"")
                })
                .map(|l| format!("{l}\n"))
                .collect();
            std::fs::write(&compose, text).unwrap();
        }
        let state = tempfile::tempdir().unwrap();
        Shop {
            dir,
            project,
            state,
            children: Vec::new(),
        }
    }

    /// Publishes web's port 8080 on 127.0.0.1 at a free host port instead of 8080, so
    /// tests that need the published port can run side by side. Returns the port.
    pub fn publish_web_on_free_port(&self) -> u16 {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let compose = self.path().join("docker-compose.yml");
        let text = std::fs::read_to_string(&compose).unwrap();
        let text = text.replace(
            "    build: ./web\n",
            &format!("    build: ./web\n    ports: [\"127.0.0.1:{port}:8080\"]\n"),
        );
        std::fs::write(&compose, text).unwrap();
        port
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(devloop_bin());
        c.args(args)
            .current_dir(self.path())
            .env("DEVLOOP_STATE_DIR", self.state.path())
            .env("DEVLOOP_AGENT_BIN", agent_bin())
            .env("DEVLOOP_TEST_RUN", &self.project)
            .env("NO_COLOR", "1");
        c
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().expect("run devloop")
    }

    pub fn run_ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(
            o.status.success(),
            "devloop {args:?} failed ({}):\nstdout:\n{}\nstderr:\n{}",
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Starts a long-running devloop command with its output in a file; returns the file.
    pub fn spawn(&mut self, args: &[&str]) -> PathBuf {
        let name: String = args
            .join("-")
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .take(80)
            .collect();
        let log = self.state.path().join(format!("{name}.log"));
        let f = std::fs::File::create(&log).unwrap();
        let child = self
            .cmd(args)
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn devloop");
        self.children.push(child);
        log
    }

    /// Takes a command started elsewhere (with its own environment) into the set that
    /// `interrupt_all` and drop stop.
    pub fn adopt(&mut self, child: Child) {
        self.children.push(child);
    }

    /// Sends SIGINT to the spawned commands and waits for them.
    pub fn interrupt_all(&mut self) -> Vec<std::process::ExitStatus> {
        let mut out = Vec::new();
        for mut c in self.children.drain(..) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGINT,
            );
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                if let Ok(Some(s)) = c.try_wait() {
                    out.push(s);
                    break;
                }
                if Instant::now() > deadline {
                    let _ = c.kill();
                    out.push(c.wait().unwrap());
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        out
    }

    pub fn container(&self, service: &str) -> String {
        format!("devloop-{}-{service}", self.project)
    }

    /// Runs a command in the service's dev container.
    pub fn exec(&self, service: &str, cmd: &[&str]) -> Output {
        let c = self.container(service);
        let mut args = vec!["exec", c.as_str()];
        args.extend_from_slice(cmd);
        docker(&args)
    }

    /// An HTTP GET from inside a container of the project (python's urllib; no curl needed).
    pub fn http_get(&self, from_service: &str, url: &str) -> Option<String> {
        let script = format!(
            "import urllib.request,sys\ntry:\n  print(urllib.request.urlopen('{url}', timeout=3).read().decode())\nexcept Exception as e:\n  print('ERR', e); sys.exit(1)"
        );
        let o = self.exec(from_service, &["python3", "-c", &script]);
        o.status
            .success()
            .then(|| String::from_utf8_lossy(&o.stdout).trim().to_string())
    }

    /// Objects (containers, volumes, networks) that carry this test's label.
    pub fn leftovers(&self) -> Vec<String> {
        let filter = format!("label={TEST_RUN_LABEL}={}", self.project);
        let mut all = Vec::new();
        for kind in [
            ["ps", "-a", "--format", "{{.Names}}"],
            ["volume", "ls", "-q", ""],
            ["network", "ls", "--format", "{{.Name}}"],
        ] {
            let mut args: Vec<&str> = kind.iter().copied().filter(|a| !a.is_empty()).collect();
            args.extend(["--filter", &filter]);
            let out = docker_ok(&args);
            all.extend(
                out.lines()
                    .filter(|l| !l.is_empty())
                    .map(|l| format!("{} {l}", kind[0])),
            );
        }
        all
    }
}

impl Drop for Shop {
    fn drop(&mut self) {
        for mut c in self.children.drain(..) {
            let _ = c.kill();
            let _ = c.wait();
        }
        let filter = format!("label={TEST_RUN_LABEL}={}", self.project);
        let ids = docker(&["ps", "-aq", "--filter", &filter]);
        for id in String::from_utf8_lossy(&ids.stdout).lines() {
            let _ = docker(&["rm", "-f", id]);
        }
        let vols = docker(&["volume", "ls", "-q", "--filter", &filter]);
        for v in String::from_utf8_lossy(&vols.stdout).lines() {
            let _ = docker(&["volume", "rm", "-f", v]);
        }
        let nets = docker(&["network", "ls", "-q", "--filter", &filter]);
        for n in String::from_utf8_lossy(&nets.stdout).lines() {
            let _ = docker(&["network", "rm", n]);
        }
        // Images devloop built or snapshotted for this project (dev images, bases, versions).
        let images = docker(&[
            "images",
            "--format",
            "{{.Repository}}:{{.Tag}}",
            "--filter",
            &format!("reference=devloop-{}-*", self.project),
        ]);
        for image in String::from_utf8_lossy(&images.stdout)
            .lines()
            .filter(|l| !l.is_empty())
        {
            // A base image is the classic builder's cache for every test's build of the
            // same Dockerfile steps: a test building at this moment may be on top of it
            // (removing it failed that build with "failed to get digest"). It keeps a tag
            // of its own, so removing this project's tag only untags it; --no-prune keeps
            // the untagged parents (cache too) likewise.
            if image.contains(":base-") {
                let id = docker(&["image", "inspect", "-f", "{{.Id}}", image]);
                let id = String::from_utf8_lossy(&id.stdout).to_string();
                let short = id.trim().trim_start_matches("sha256:");
                let keep = format!("devloop-test-cache:{}", &short[..12.min(short.len())]);
                let _ = docker(&["tag", image, &keep]);
            }
            let _ = docker(&["rmi", "-f", "--no-prune", image]);
        }
    }
}

/// An HTTP GET from the laptop (`http://HOST:PORT/PATH`); the body of a 200, else None.
pub fn laptop_get(url: &str) -> Option<String> {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://")?;
    let (authority, path) = rest
        .split_once('/')
        .map(|(a, p)| (a, format!("/{p}")))
        .unwrap_or((rest, "/".into()));
    let addr: std::net::SocketAddr = authority.parse().ok()?;
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {authority}\r\n\r\n").as_bytes())
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let (head, body) = out.split_once("\r\n\r\n")?;
    head.split_whitespace()
        .nth(1)
        .filter(|c| *c == "200")
        .map(|_| body.trim().to_string())
}

/// Polls `f` until it returns Some or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Starts `c` with its output (stdout and stderr) in the file `log`, stdin closed.
pub fn spawn_logged(mut c: Command, log: &Path) -> Child {
    let f = std::fs::File::create(log).unwrap();
    c.stdout(f.try_clone().unwrap())
        .stderr(f)
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn a logged command")
}

/// Waits until the log file contains `needle`; panics with the log otherwise.
pub fn wait_for_log(log: &Path, needle: &str, timeout: Duration) {
    let found = wait_for(timeout, || {
        std::fs::read_to_string(log)
            .ok()
            .filter(|t| t.contains(needle))
            .map(|_| ())
    });
    if found.is_none() {
        panic!(
            "`{needle}` did not appear in {} within {timeout:?}:\n{}",
            log.display(),
            std::fs::read_to_string(log).unwrap_or_default()
        );
    }
}

/// The session token devloop stored for a container.
pub fn token_of(shop: &Shop, service: &str) -> String {
    std::fs::read_to_string(
        shop.state
            .path()
            .join("tokens")
            .join(shop.container(service)),
    )
    .expect("token file")
    .trim()
    .to_string()
}

/// A container's address on one of its networks.
pub fn container_ip(container: &str, network: &str) -> String {
    let fmt = format!("{{{{(index .NetworkSettings.Networks \"{network}\").IPAddress}}}}");
    docker_ok(&["inspect", "-f", &fmt, container])
}

/// The agent's address on the project network.
pub fn agent_addr(shop: &Shop, service: &str) -> std::net::SocketAddr {
    let ip = container_ip(
        &shop.container(service),
        &format!("devloop-{}", shop.project),
    );
    format!("{ip}:7717").parse().expect("container address")
}

/// A port nothing listens on right now, on the laptop's loopback.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The laptop process of the intercept tests: an HTTP server on 127.0.0.1:ARGV[1] that
/// answers every GET with `{"version": "laptop", ...}` and the PORT it was started with.
pub const LAPTOP_API: &str = r#"
import http.server, json, os, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        b = json.dumps({"version": "laptop", "items": [], "port_env": os.environ.get("PORT")}).encode()
        self.send_response(200); self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(b))); self.end_headers(); self.wfile.write(b)
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"#;

/// Tree hashes of the laptop folder (as the sync filters it) and of the agent's root.
pub async fn tree_hashes(shop: &Shop, service: &str) -> ([u8; 32], [u8; 32]) {
    use devloop::sync::filter::{Filter, FilterSettings};
    let root = shop.path().join(service);
    let settings = FilterSettings {
        excludes: vec!["__pycache__/".into(), "*.pyc".into()],
        include_node_modules: false,
    };
    let mut filter = Filter::new(&root, settings).unwrap();
    let (laptop, _) = devloop::sync::scan::scan(&root, &mut filter);
    let stream = tokio::net::TcpStream::connect(agent_addr(shop, service))
        .await
        .unwrap();
    let c = devloop::agent_link::AgentLink::connect(stream, &token_of(shop, service))
        .await
        .unwrap();
    let agent: devloop_proxy::tree::Tree = c
        .link
        .index()
        .await
        .unwrap()
        .into_iter()
        .filter(|(p, e)| {
            !filter.is_ignored(
                Path::new(p.as_str()),
                matches!(e, devloop_proxy::tree::Entry::Dir { .. }),
            )
        })
        .collect();
    c.link.close();
    (
        devloop_proxy::tree::tree_hash(&laptop),
        devloop_proxy::tree::tree_hash(&agent),
    )
}
