//! The `devloop-agent` binary: argument parsing and the three modes. The work is in the
//! library (`devloop_agent`).
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use devloop_agent::{bridge, dev, relay, DevAgent, DevConfig};
use tokio::signal::unix::{signal, SignalKind};
use tracing_subscriber::EnvFilter;

#[derive(Debug, Parser)]
#[command(
    name = "devloop-agent",
    about = "The devloop agent: runs inside a container, applies synced files and supervises the service"
)]
struct Args {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Debug, Subcommand)]
enum Mode {
    /// Apply file operations under --root, supervise CMD, serve the cli on --listen.
    Dev(DevArgs),
    /// Copy stdin to a TCP connection and the connection to stdout (used through `docker exec`).
    Bridge {
        /// The agent's address inside the container.
        #[arg(long, default_value_t = SocketAddr::from(([127, 0, 0, 1], devloop_proxy::AGENT_PORT)))]
        to: SocketAddr,
    },
    /// Hold published ports: forward each LISTEN=HOST:PORT mapping, resolving HOST per connection.
    Relay {
        /// LISTEN_ADDR=HOST:PORT, e.g. 0.0.0.0:8080=web:8080 (repeatable).
        #[arg(long = "map", required = true)]
        maps: Vec<relay::Mapping>,
    },
    /// Stand in for a service: tunnel the connections on its ports to the cli that holds the intercept.
    Intercept {
        /// File holding the session token the cli created.
        #[arg(long)]
        token_file: PathBuf,
        /// Address of the control WebSocket (path /devloop).
        #[arg(long, default_value_t = SocketAddr::from(([0, 0, 0, 0], devloop_proxy::AGENT_PORT)))]
        control: SocketAddr,
        /// Accept control connections only on this network (A.B.C.D/LEN) or loopback.
        #[arg(long)]
        control_subnet: Option<devloop_agent::intercept::Subnet>,
        /// A port of the service (repeatable).
        #[arg(long = "port", required = true)]
        ports: Vec<u16>,
        /// HOST:PORT a laptop-opened stream may reach, by position (repeatable).
        #[arg(long = "expose")]
        expose: Vec<String>,
        /// Kubernetes: restore the workload after this many seconds without a cli (needs --restore-dir).
        #[arg(long, requires = "restore_dir")]
        lease_secs: Option<u64>,
        /// Kubernetes: the folder holding restore.json and restore-path (the token Secret).
        #[arg(long)]
        restore_dir: Option<PathBuf>,
        /// A local engine: the cli's Unix socket that hands over connections to the laptop.
        #[arg(long)]
        handoff: Option<PathBuf>,
    },
    /// Beside a running original (in its network namespace, with NET_ADMIN): route each
    /// request of its ports to the original or to the laptop whose filter takes it.
    Route {
        /// File holding the session token the first cli created.
        #[arg(long)]
        token_file: PathBuf,
        /// Address of the control WebSocket (path /devloop); the cli arrives over `bridge`.
        #[arg(long, default_value_t = SocketAddr::from(([127, 0, 0, 1], devloop_proxy::ROUTE_CONTROL_PORT)))]
        control: SocketAddr,
        /// A port of the service (repeatable).
        #[arg(long = "port", required = true)]
        ports: Vec<u16>,
        /// An address of the original besides 127.0.0.1 (repeatable).
        #[arg(long = "original-host")]
        original_hosts: Vec<std::net::IpAddr>,
        /// The folder of the clis' handoff sockets (a local engine).
        #[arg(long)]
        handoff_dir: Option<PathBuf>,
        /// Exit after this many milliseconds with no holder and no cli.
        #[arg(long, default_value_t = 1000)]
        linger_ms: u64,
        /// Do not exit for lack of a cli before this many milliseconds after the start.
        #[arg(long, default_value_t = 30_000)]
        first_wait_ms: u64,
        /// Tests: do not redirect; write "SERVICE=AGENT" port lines to this file.
        #[arg(long, hide = true)]
        no_redirect_ports_file: Option<PathBuf>,
    },
    /// Benchmarks: hold the same redirect a routing agent installs (SERVICE=TO, repeatable)
    /// until SIGTERM, for another proxy placed where the agent is.
    #[command(hide = true)]
    RedirectHold {
        #[arg(long = "map", required = true)]
        maps: Vec<String>,
    },
    /// Exit 0 once ADDR accepts a TCP connection, 1 after the timeout.
    Probe {
        addr: String,
        #[arg(long, default_value_t = 10_000)]
        timeout_ms: u64,
    },
    /// Kubernetes dev pods: copy this binary to DEST (an init container of the agent image).
    Install { dest: PathBuf },
    /// Kubernetes dev pods: copy the content of FROM into TO (an init container of the
    /// service's image seeds the sync root with the image's files).
    CopyTree { from: PathBuf, to: PathBuf },
    /// Print the agent's version and protocol version.
    Version,
}

#[derive(Debug, clap::Args)]
struct DevArgs {
    /// The sync root (created if missing).
    #[arg(long)]
    root: PathBuf,
    /// Address of the WebSocket endpoint (path /devloop).
    #[arg(long, default_value_t = SocketAddr::from(([0, 0, 0, 0], devloop_proxy::AGENT_PORT)))]
    listen: SocketAddr,
    /// File holding the session token the cli created.
    #[arg(long)]
    token_file: PathBuf,
    /// Working directory of CMD [default: the root].
    #[arg(long)]
    workdir: Option<PathBuf>,
    /// Milliseconds between SIGTERM and SIGKILL when the process is stopped or restarted.
    #[arg(long, default_value_t = 2000)]
    grace_ms: u64,
    /// The command to supervise, without a shell.
    #[arg(last = true, value_name = "CMD")]
    command: Vec<String>,
}

fn main() {
    let args = Args::parse();
    match &args.mode {
        Mode::Install { dest } => {
            if let Err(e) = devloop_agent::seed::install(dest) {
                eprintln!(
                    "devloop-agent: error: installing to {}: {e}",
                    dest.display()
                );
                std::process::exit(1);
            }
            return;
        }
        Mode::CopyTree { from, to } => match devloop_agent::seed::copy_tree(from, to) {
            Ok(n) => {
                println!(
                    "devloop-agent: copied {n} entries of {} to {}",
                    from.display(),
                    to.display()
                );
                return;
            }
            Err(e) => {
                eprintln!(
                    "devloop-agent: error: copying {} to {}: {e}",
                    from.display(),
                    to.display()
                );
                std::process::exit(1);
            }
        },
        _ => {}
    }
    if let Mode::Version = args.mode {
        println!(
            "devloop-agent {} (protocol {})",
            devloop_proxy::CRATE_VERSION,
            devloop_proxy::PROTOCOL_VERSION
        );
        return;
    }
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // Colours only on a terminal: `docker logs` and the cli's captures stay plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
    devloop_proxy::tunnel::raise_open_files_limit();
    // The tunnel modes hop every byte between a socket task and the WebSocket task: on one
    // thread those wake-ups stay in-thread, which takes a quarter of the round trip off.
    let mut builder = if matches!(args.mode, Mode::Intercept { .. } | Mode::Route { .. }) {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    let runtime = match builder.enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("devloop-agent: error: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    let result = runtime.block_on(async {
        match args.mode {
            Mode::Dev(dev_args) => run_dev(dev_args).await,
            Mode::Bridge { to } => bridge::run(to).await,
            Mode::Relay { maps } => {
                let mut terminate =
                    signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
                relay::run(maps, async move {
                    terminate.recv().await;
                })
                .await
            }
            Mode::Intercept {
                token_file,
                control,
                control_subnet,
                ports,
                expose,
                lease_secs,
                restore_dir,
                handoff,
            } => {
                let token = dev::read_token(&token_file)?;
                let mut terminate =
                    signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
                let config = devloop_agent::intercept::InterceptConfig {
                    token,
                    control,
                    control_subnet,
                    ports,
                    expose,
                    lease: lease_secs.zip(restore_dir).map(|(secs, restore_dir)| {
                        devloop_agent::lease::LeaseConfig {
                            after: Duration::from_secs(secs),
                            restore_dir,
                        }
                    }),
                    handoff,
                };
                devloop_agent::intercept::run(config, async move {
                    terminate.recv().await;
                })
                .await
            }
            Mode::Route {
                token_file,
                control,
                ports,
                original_hosts,
                handoff_dir,
                linger_ms,
                first_wait_ms,
                no_redirect_ports_file,
            } => {
                let token = dev::read_token(&token_file)?;
                let mut terminate =
                    signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
                let config = devloop_agent::routing::RouteConfig {
                    token,
                    control,
                    ports,
                    original_hosts,
                    handoff_dir,
                    linger: Duration::from_millis(linger_ms),
                    first_wait: Duration::from_millis(first_wait_ms),
                    redirect: no_redirect_ports_file.is_none(),
                    ports_file: no_redirect_ports_file,
                };
                devloop_agent::routing::run(config, async move {
                    terminate.recv().await;
                })
                .await
            }
            Mode::RedirectHold { maps } => {
                let mut ports = Vec::new();
                for m in &maps {
                    let (s, a) = m
                        .split_once('=')
                        .context("--map takes SERVICE=TO, e.g. 8000=8081")?;
                    ports.push(devloop_agent::redirect::PortRedirect {
                        service: s.parse().context("SERVICE is a port")?,
                        agent: a.parse().context("TO is a port")?,
                    });
                }
                let mut terminate =
                    signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
                let _held = devloop_agent::redirect::Redirect::install(
                    devloop_agent::routing::TABLE,
                    &ports,
                )?;
                println!("redirecting {maps:?}");
                terminate.recv().await;
                Ok(())
            }
            Mode::Probe { addr, timeout_ms } => {
                relay::probe(&addr, Duration::from_millis(timeout_ms)).await
            }
            Mode::Version | Mode::Install { .. } | Mode::CopyTree { .. } => Ok(()),
        }
    });
    // Do not wait for blocking tasks such as a stdin read that will never end.
    runtime.shutdown_timeout(Duration::from_millis(100));
    if let Err(e) = result {
        eprintln!("devloop-agent: error: {e:#}");
        std::process::exit(1);
    }
}

async fn run_dev(args: DevArgs) -> anyhow::Result<()> {
    let token = dev::read_token(&args.token_file)?;
    let mut terminate = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?;
    let agent = DevAgent::start(DevConfig {
        root: args.root,
        listen: args.listen,
        token,
        workdir: args.workdir,
        grace: Duration::from_millis(args.grace_ms),
        command: args.command,
        mirror_output: true,
    })
    .await?;
    agent
        .serve(async move {
            tokio::select! {
                _ = terminate.recv() => tracing::info!("SIGTERM received"),
                _ = interrupt.recv() => tracing::info!("SIGINT received"),
            }
        })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_dev_command_line() {
        let args = Args::try_parse_from([
            "devloop-agent",
            "dev",
            "--root",
            "/app",
            "--listen",
            "0.0.0.0:7717",
            "--token-file",
            "/.devloop/token",
            "--grace-ms",
            "500",
            "--",
            "python3",
            "-m",
            "http.server",
            "--bind",
            "0.0.0.0",
        ])
        .unwrap();
        let Mode::Dev(dev) = args.mode else { panic!() };
        assert_eq!(dev.root, PathBuf::from("/app"));
        assert_eq!(dev.grace_ms, 500);
        assert_eq!(dev.workdir, None);
        assert_eq!(
            dev.command,
            ["python3", "-m", "http.server", "--bind", "0.0.0.0"]
        );
        let args = Args::try_parse_from(["devloop-agent", "bridge"]).unwrap();
        assert!(matches!(args.mode, Mode::Bridge { to } if to.port() == 7717));
        assert!(Args::try_parse_from(["devloop-agent", "dev", "--root", "/app"]).is_err());
    }
}
