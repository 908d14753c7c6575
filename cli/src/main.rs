//! The `devloop` binary: parses the command line, sets up logging, runs one command.

use clap::{Parser, Subcommand};
use devloop::commands::{self, Global};
use devloop::config::file::OnExit;
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "devloop", version, about = "Sub-second inner loop for microservice development", long_about = None)]
struct Cli {
    /// Run as if started in this folder.
    #[arg(short = 'C', long = "dir", global = true, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// Kubernetes: the kubeconfig context to use (selects the Kubernetes target; default:
    /// devloop.toml's [target], else the current context).
    #[arg(long, global = true, value_name = "CONTEXT")]
    context: Option<String>,
    /// Kubernetes: the namespace (selects the Kubernetes target; default: the context's).
    #[arg(short = 'n', long, global = true, value_name = "NAMESPACE")]
    namespace: Option<String>,
    /// More logging (-v info, -vv debug); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

// Parsed once per run: `intercept`'s many flags make its variant the largest, and boxing
// it would only move clap's parse.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Start every service (or the named ones) in a dev container and sync files until Ctrl-C.
    Up {
        services: Vec<String>,
        /// Rebuild images from their Dockerfiles even when they exist.
        #[arg(long)]
        build: bool,
        /// On Ctrl-C stop the containers (default: keep them running, or `up.on_exit`).
        #[arg(long, conflicts_with = "keep_on_exit")]
        stop_on_exit: bool,
        /// On Ctrl-C keep the containers running.
        #[arg(long)]
        keep_on_exit: bool,
        /// Do not print the services' output.
        #[arg(long)]
        no_logs: bool,
    },
    /// Sync one service's files into its running dev container, in the foreground.
    Sync {
        service: String,
        #[arg(long)]
        no_logs: bool,
    },
    /// Snapshot each service's synced tree into an image (its base plus one layer) and roll it
    /// out (Kubernetes: pushed to the cluster's registry, then the Deployment's rollout).
    Deploy {
        services: Vec<String>,
        /// How long a new version may take to become healthy (default: 30s on Docker; 60s on
        /// Kubernetes, for the whole rollout). A version that does not is undone.
        #[arg(long, value_parser = humantime::parse_duration)]
        health_timeout: Option<std::time::Duration>,
    },
    /// On every save: sync, restart or redeploy, as each service's `on_change` rules say.
    Watch {
        services: Vec<String>,
        /// How long a new version may take to become healthy (default: 30s on Docker; 60s on
        /// Kubernetes, for the whole rollout). A version that does not is undone.
        #[arg(long, value_parser = humantime::parse_duration)]
        health_timeout: Option<std::time::Duration>,
        #[arg(long)]
        no_logs: bool,
    },
    /// Swap a running service's container for the agent and tunnel its traffic to the laptop
    /// (`intercept list` shows every active intercept).
    Intercept {
        /// Container name, or compose/devloop service name (Kubernetes: a Deployment's or a
        /// Service's name); `list` lists intercepts.
        #[arg(required_unless_present = "session")]
        target: Option<String>,
        /// Every service of devloop.toml's [sessions.NAME], filtered by the session's key, in
        /// this one process; one Ctrl-C ends them all.
        #[arg(long, conflicts_with_all = ["ports", "headers", "path", "path_prefix", "path_regex", "method", "key", "mirror", "command"])]
        session: Option<String>,
        /// REMOTE:LOCAL: the service's port in its container -> a port on the laptop (repeatable;
        /// Kubernetes: REMOTE may also be a container port's name or a Service port, by number or name).
        #[arg(long = "port", value_parser = devloop::intercept::parse_port)]
        ports: Vec<(devloop::intercept::PortRef, u16)>,
        /// Also write the service's environment to this file.
        #[arg(long)]
        env_file: Option<PathBuf>,
        /// NAME:PORT[:LOCAL]: make a service of the system reachable at 127.0.0.1:LOCAL.
        #[arg(long)]
        expose: Vec<devloop::intercept::Expose>,
        /// Kubernetes: if this cli vanishes (killed, laptop gone), the agent restores the
        /// workload itself after this long without it [default: 15m].
        #[arg(long, value_parser = humantime::parse_duration)]
        lease: Option<std::time::Duration>,
        /// Docker: carry every connection through the tunnel, even where the engine runs on
        /// this machine and the cli could hand connections to the agent directly (the default
        /// there: one relay instead of two). Kubernetes always tunnels.
        #[arg(long)]
        tunnel: bool,
        /// Only requests with this header: NAME=VALUE (exact) or NAME~REGEX (repeatable; all
        /// conditions must hold). The rest keep reaching the original, which keeps running.
        #[arg(long = "header", value_name = "NAME=VALUE|NAME~REGEX")]
        headers: Vec<String>,
        /// Only requests for exactly this path.
        #[arg(long, conflicts_with_all = ["path_prefix", "path_regex"])]
        path: Option<String>,
        /// Only requests whose path starts with this.
        #[arg(long, conflicts_with = "path_regex")]
        path_prefix: Option<String>,
        /// Only requests whose whole path matches this regex.
        #[arg(long)]
        path_regex: Option<String>,
        /// Only requests of this method (GET, POST...).
        #[arg(long)]
        method: Option<String>,
        /// Only requests carrying `baggage: devloop-session=KEY` (a W3C baggage entry that
        /// tracing libraries pass on between services); the laptop command gets KEY in
        /// $DEVLOOP_SESSION_KEY.
        #[arg(long)]
        key: Option<String>,
        /// Send the laptop a copy of each (matching) request; callers keep the answers of
        /// the route that takes it, and a slow or absent laptop never slows them.
        #[arg(long)]
        mirror: bool,
        /// No line per request that reaches the laptop.
        #[arg(long, short)]
        quiet: bool,
        /// `intercept list`: as JSON.
        #[arg(long)]
        json: bool,
        /// The laptop command to run with the service's environment; the intercept ends when it exits.
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// End an intercept: the original container (Kubernetes: pod template) back, exactly.
    Leave {
        target: Option<String>,
        /// End every intercept of yours (replace intercepts, and your filtered ones, also
        /// those of a cli that was killed).
        #[arg(long)]
        all: bool,
        /// End this one filtered intercept (the id `intercept list` shows), whoever holds it.
        #[arg(long)]
        holder: Option<u64>,
        /// End your intercepts of devloop.toml's [sessions.NAME].
        #[arg(long)]
        session: Option<String>,
    },
    /// A service's deployed versions: tag, time, what changed (Kubernetes: the Deployment's revisions).
    History { service: String },
    /// Roll a service back to its previous version, with the same health-checked rollout.
    Rollback {
        service: String,
        /// Kubernetes: the Deployment revision to go back to (`devloop history` lists them;
        /// default: the one before the running one).
        #[arg(long)]
        to_revision: Option<u64>,
        /// As for `deploy` (default: 30s on Docker, 60s on Kubernetes).
        #[arg(long, value_parser = humantime::parse_duration)]
        health_timeout: Option<std::time::Duration>,
    },
    /// Services, containers, agents, processes and sync state.
    Status {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Remove every container, volume and network devloop created for the project.
    Down {
        /// Keep the volumes holding the synced trees.
        #[arg(long)]
        keep_volumes: bool,
    },
    /// Check the engine, the agent binary, the config and ports, and say how to fix problems.
    Doctor,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let default = match cli.verbose {
        0 => "warn",
        1 => "info,devloop=info",
        _ => "debug,hyper=info,bollard=info",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();

    let global = Global {
        dir: cli
            .dir
            .clone()
            .unwrap_or_else(|| std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."))),
        context: cli.context.clone(),
        namespace: cli.namespace.clone(),
    };
    // An intercept hops every tunnelled byte between socket tasks and the WebSocket task: on
    // one thread those wake-ups stay in-thread (see docs/ARCHITECTURE.md, "Tunnel latency").
    let mut builder = if matches!(cli.command, Command::Intercept { .. }) {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    let rt = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("devloop: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        match cli.command {
            Command::Up {
                services,
                build,
                stop_on_exit,
                keep_on_exit,
                no_logs,
            } => {
                let on_exit = if stop_on_exit {
                    Some(OnExit::Stop)
                } else if keep_on_exit {
                    Some(OnExit::Keep)
                } else {
                    None
                };
                commands::up::up(
                    &global,
                    commands::up::UpOptions {
                        services,
                        build,
                        on_exit,
                        no_logs,
                    },
                )
                .await
            }
            Command::Sync { service, no_logs } => {
                commands::up::sync(&global, &service, no_logs).await
            }
            Command::Deploy {
                services,
                health_timeout,
            } => {
                commands::deploy::deploy(
                    &global,
                    commands::deploy::DeployOptions {
                        services,
                        health_timeout,
                    },
                )
                .await
            }
            Command::Watch {
                services,
                health_timeout,
                no_logs,
            } => commands::watch::watch(&global, services, health_timeout, no_logs).await,
            Command::Intercept {
                target,
                lease,
                ports,
                env_file,
                expose,
                tunnel,
                headers,
                path,
                path_prefix,
                path_regex,
                method,
                key,
                mirror,
                quiet,
                json,
                session,
                command,
            } => {
                if let Some(name) = session {
                    commands::intercept::session(&global, &name, quiet).await
                } else if target.as_deref() == Some("list") && ports.is_empty() {
                    commands::intercept::list(&global, json).await
                } else {
                    let target = target.unwrap_or_default();
                    let filter = commands::intercept::FilterArgs {
                        headers,
                        path,
                        path_prefix,
                        path_regex,
                        method,
                        key: key.clone(),
                    }
                    .build()?;
                    commands::intercept::intercept(
                        &global,
                        devloop::intercept::InterceptOptions {
                            target,
                            lease,
                            ports,
                            env_file,
                            expose,
                            tunnel,
                            command,
                            filter,
                            mirror,
                            key,
                            quiet,
                            session: None,
                        },
                    )
                    .await
                }
            }
            Command::Leave {
                target,
                all,
                holder,
                session,
            } => commands::intercept::leave(&global, target, all, holder, session).await,
            Command::History { service } => commands::deploy::history_cmd(&global, &service).await,
            Command::Rollback {
                service,
                to_revision,
                health_timeout,
            } => commands::deploy::rollback(&global, &service, to_revision, health_timeout).await,
            Command::Status { json } => commands::status::status(&global, json).await,
            Command::Down { keep_volumes } => commands::down::down(&global, keep_volumes).await,
            Command::Doctor => commands::doctor::doctor(&global).await,
        }
    });
    // Blocking tasks (a watcher, a file read) must not hold the exit.
    rt.shutdown_timeout(std::time::Duration::from_millis(200));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("devloop: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
