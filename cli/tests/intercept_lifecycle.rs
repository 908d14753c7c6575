//! The in-process tier of the intercept: `hold`, the lifecycle every back end shares, against
//! the real agent (its `intercept` mode, in this process on loopback) behind a fake swap
//! that records what it was asked to do. Each way an intercept can end (the command's exit,
//! a signal at each step, a failed swap or restore, a dropped connection, `leave` from
//! elsewhere, a second cli) is checked for what it leaves behind.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::Duration;

use devloop::agent_link::{AgentLink, Connected};
use devloop::intercept::{hold, Expose, InterceptOptions, Swap};
use futures_util::future::BoxFuture;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

fn state_dir() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let dir = tempfile::tempdir().unwrap().keep();
        std::env::set_var("DEVLOOP_STATE_DIR", dir);
    });
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[derive(Default)]
struct Faults {
    fail_swap: bool,
    fail_restore: bool,
    /// Cancelled in the middle of the swap: a signal while the service is being changed.
    cancel_during_swap: Option<CancellationToken>,
    /// The agent never answers: a wait that only a signal ends.
    hang_connect: bool,
}

/// The agent runs on a runtime of its own thread, as in its own container: stopping it ends
/// the runtime, and with it every connection the agent held.
type Running = (
    tokio::sync::oneshot::Sender<()>,
    std::thread::JoinHandle<()>,
);

/// A swap that starts the real intercept agent in this process instead of changing a
/// container or a Deployment, and remembers every step.
struct FakeSwap {
    key: String,
    service_port: u16,
    control: SocketAddr,
    laptop_port: u16,
    faults: Faults,
    steps: Mutex<Vec<&'static str>>,
    token: Mutex<String>,
    agent: Mutex<Option<Running>>,
    left_elsewhere: AtomicBool,
    connects: AtomicUsize,
}

impl FakeSwap {
    fn new(key: &str, laptop_port: u16, faults: Faults) -> Arc<FakeSwap> {
        Arc::new(FakeSwap {
            key: key.to_string(),
            service_port: free_port(),
            control: SocketAddr::from(([127, 0, 0, 1], free_port())),
            laptop_port,
            faults,
            steps: Mutex::default(),
            token: Mutex::default(),
            agent: Mutex::default(),
            left_elsewhere: AtomicBool::new(false),
            connects: AtomicUsize::new(0),
        })
    }

    fn steps(&self) -> Vec<&'static str> {
        self.steps.lock().unwrap().clone()
    }

    fn step(&self, s: &'static str) {
        self.steps.lock().unwrap().push(s);
    }

    async fn start_agent(&self) {
        let config = devloop_agent::intercept::InterceptConfig {
            token: self.token.lock().unwrap().clone(),
            control: self.control,
            control_subnet: None,
            ports: vec![self.service_port],
            expose: Vec::new(),
            lease: None,
            handoff: None,
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let _ = runtime.block_on(devloop_agent::intercept::run(config, async move {
                let _ = stopped.await;
            }));
        });
        // Serving once the control port answers.
        for _ in 0..200 {
            if TcpStream::connect(self.control).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        *self.agent.lock().unwrap() = Some((stop, task));
    }

    async fn stop_agent(&self) {
        let running = self.agent.lock().unwrap().take();
        if let Some((stop, task)) = running {
            let _ = stop.send(());
            let _ = tokio::task::spawn_blocking(move || task.join()).await;
        }
    }

    fn agent_running(&self) -> bool {
        self.agent.lock().unwrap().is_some()
    }
}

struct Fake(Arc<FakeSwap>);

impl Swap for Fake {
    fn original(&self) -> String {
        format!("fake-{}", self.0.key)
    }
    fn service(&self) -> String {
        self.0.key.clone()
    }
    fn owner_key(&self) -> String {
        format!("fake/{}", self.0.key)
    }
    fn ports(&self) -> Vec<(u16, u16)> {
        vec![(self.0.service_port, self.0.laptop_port)]
    }
    fn env(&self) -> Vec<(String, String)> {
        vec![("PORT".into(), "8000".into())]
    }
    fn swap_in<'a>(
        &'a self,
        token: &'a str,
        _expose: &'a [Expose],
    ) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move {
            let s = &self.0;
            s.step("swap");
            *s.token.lock().unwrap() = token.to_string();
            if let Some(t) = &s.faults.cancel_during_swap {
                t.cancel();
            }
            if s.faults.fail_swap {
                anyhow::bail!("the engine refused the agent container");
            }
            s.start_agent().await;
            Ok(())
        })
    }
    fn connect<'a>(&'a self, token: &'a str) -> BoxFuture<'a, anyhow::Result<Connected>> {
        Box::pin(async move {
            let s = &self.0;
            s.step("connect");
            s.connects.fetch_add(1, Ordering::SeqCst);
            if s.faults.hang_connect {
                std::future::pending::<()>().await;
            }
            let mut last = None;
            for _ in 0..100 {
                match TcpStream::connect(s.control).await {
                    Ok(tcp) => return Ok(AgentLink::connect(tcp, token).await?),
                    Err(e) => last = Some(e),
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(anyhow::anyhow!("the agent does not answer: {last:?}"))
        })
    }
    fn ended_elsewhere(&self) -> BoxFuture<'_, bool> {
        Box::pin(async move { self.0.left_elsewhere.load(Ordering::SeqCst) })
    }
    fn restore(&self) -> BoxFuture<'_, anyhow::Result<()>> {
        Box::pin(async move {
            let s = &self.0;
            s.step("restore");
            s.stop_agent().await;
            if s.faults.fail_restore {
                anyhow::bail!("the original would not start");
            }
            Ok(())
        })
    }
}

fn options(command: &[&str]) -> InterceptOptions {
    InterceptOptions {
        target: "api".into(),
        lease: None,
        ports: Vec::new(),
        env_file: None,
        expose: Vec::new(),
        tunnel: true,
        command: command.iter().map(|s| s.to_string()).collect(),
        filter: None,
        mirror: false,
        key: None,
        quiet: false,
        session: None,
    }
}

async fn run(
    swap: &Arc<FakeSwap>,
    command: &[&str],
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    hold(&Fake(swap.clone()), &options(command), shutdown).await
}

/// A laptop process: answers every connection with `laptop`.
async fn laptop() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 64];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(b"laptop").await;
            });
        }
    });
    port
}

/// What a caller of the service's port gets back.
async fn call(port: u16) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    s.write_all(b"hello").await.ok()?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .ok()?
        .ok()?;
    Some(String::from_utf8_lossy(&out).to_string())
}

/// Calls the service's port until the laptop answers (the tunnel may still be starting).
async fn reaches_the_laptop(port: u16) -> bool {
    for _ in 0..200 {
        if call(port).await.as_deref() == Some("laptop") {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

async fn until(mut f: impl FnMut() -> bool) {
    for _ in 0..1000 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out");
}

fn spawn_hold(
    swap: &Arc<FakeSwap>,
    shutdown: &CancellationToken,
) -> tokio::task::JoinHandle<anyhow::Result<()>> {
    let (swap, shutdown) = (swap.clone(), shutdown.clone());
    tokio::spawn(async move { run(&swap, &[], shutdown).await })
}

#[tokio::test]
async fn callers_reach_the_laptop_and_a_signal_restores_and_frees_the_claim() {
    state_dir();
    let swap = FakeSwap::new("lc-serve", laptop().await, Faults::default());
    let shutdown = CancellationToken::new();
    let task = spawn_hold(&swap, &shutdown);
    until(|| swap.steps().contains(&"connect")).await;
    assert!(reaches_the_laptop(swap.service_port).await);
    shutdown.cancel();
    task.await.unwrap().unwrap();
    assert_eq!(swap.steps(), ["swap", "connect", "restore"]);
    assert!(!swap.agent_running());
    // Nothing holds the service any more: the next intercept takes it.
    let next = FakeSwap::new("lc-serve", laptop().await, Faults::default());
    run(&next, &["true"], CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(next.steps(), ["swap", "connect", "restore"]);
}

#[tokio::test]
async fn the_laptop_command_exiting_restores() {
    state_dir();
    let swap = FakeSwap::new("lc-exit", laptop().await, Faults::default());
    run(&swap, &["sh", "-c", "exit 3"], CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(swap.steps(), ["swap", "connect", "restore"]);
}

#[tokio::test]
async fn a_missing_command_or_env_file_changes_nothing() {
    state_dir();
    let swap = FakeSwap::new("lc-typo", laptop().await, Faults::default());
    let e = run(&swap, &["/nonexistent/cmd"], CancellationToken::new())
        .await
        .unwrap_err();
    assert!(
        format!("{e:#}").contains("cannot run `/nonexistent/cmd`"),
        "{e:#}"
    );
    let mut opts = options(&[]);
    opts.env_file = Some("/nonexistent/dir/x.env".into());
    let e = hold(&Fake(swap.clone()), &opts, CancellationToken::new())
        .await
        .unwrap_err();
    assert!(format!("{e:#}").contains("--env-file"), "{e:#}");
    assert!(swap.steps().is_empty(), "{:?}", swap.steps());
}

#[tokio::test]
async fn a_command_that_cannot_be_spawned_after_the_swap_is_restored() {
    state_dir();
    let dir = tempfile::tempdir().unwrap();
    let bogus = dir.path().join("bogus");
    std::fs::write(&bogus, "not a program\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&bogus, std::fs::Permissions::from_mode(0o755)).unwrap();
    let swap = FakeSwap::new("lc-spawn", laptop().await, Faults::default());
    let e = run(&swap, &[bogus.to_str().unwrap()], CancellationToken::new())
        .await
        .unwrap_err();
    assert!(format!("{e:#}").contains("starting `"), "{e:#}");
    assert_eq!(swap.steps(), ["swap", "connect", "restore"]);
    assert!(!swap.agent_running());
}

#[tokio::test]
async fn a_signal_during_the_swap_lets_it_finish_then_restores() {
    state_dir();
    let shutdown = CancellationToken::new();
    let faults = Faults {
        cancel_during_swap: Some(shutdown.clone()),
        ..Faults::default()
    };
    let swap = FakeSwap::new("lc-sigswap", laptop().await, faults);
    run(&swap, &[], shutdown).await.unwrap();
    assert_eq!(swap.steps(), ["swap", "restore"]);
    assert!(!swap.agent_running());
}

#[tokio::test]
async fn a_signal_before_the_swap_changes_nothing() {
    state_dir();
    let shutdown = CancellationToken::new();
    shutdown.cancel();
    let swap = FakeSwap::new("lc-sigfirst", laptop().await, Faults::default());
    run(&swap, &[], shutdown).await.unwrap();
    assert!(swap.steps().is_empty(), "{:?}", swap.steps());
}

#[tokio::test]
async fn a_signal_while_waiting_for_the_agent_restores() {
    state_dir();
    let faults = Faults {
        hang_connect: true,
        ..Faults::default()
    };
    let swap = FakeSwap::new("lc-sigwait", laptop().await, faults);
    let shutdown = CancellationToken::new();
    let cancel = shutdown.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        cancel.cancel();
    });
    tokio::time::timeout(Duration::from_secs(10), run(&swap, &[], shutdown))
        .await
        .expect("the wait ends on the signal")
        .unwrap();
    assert_eq!(swap.steps(), ["swap", "connect", "restore"]);
}

#[tokio::test]
async fn a_failed_swap_is_restored_and_a_failed_restore_is_reported_with_it() {
    state_dir();
    let faults = Faults {
        fail_swap: true,
        ..Faults::default()
    };
    let swap = FakeSwap::new("lc-failswap", laptop().await, faults);
    let e = run(&swap, &[], CancellationToken::new()).await.unwrap_err();
    let text = format!("{e:#}");
    assert!(text.contains("refused the agent container"), "{text}");
    assert_eq!(swap.steps(), ["swap", "restore"]);

    let faults = Faults {
        fail_swap: true,
        fail_restore: true,
        ..Faults::default()
    };
    let swap = FakeSwap::new("lc-failboth", laptop().await, faults);
    let e = run(&swap, &[], CancellationToken::new()).await.unwrap_err();
    let text = format!("{e:#}");
    assert!(
        text.contains("refused the agent container")
            && text.contains("would not start")
            && text.contains("devloop leave lc-failboth"),
        "both errors and the way out are named: {text}"
    );
}

#[tokio::test]
async fn a_second_cli_is_refused_and_changes_nothing() {
    state_dir();
    let first = FakeSwap::new("lc-two", laptop().await, Faults::default());
    let shutdown = CancellationToken::new();
    let task = spawn_hold(&first, &shutdown);
    until(|| first.steps().contains(&"connect")).await;
    let second = FakeSwap::new("lc-two", laptop().await, Faults::default());
    let e = run(&second, &[], CancellationToken::new())
        .await
        .unwrap_err();
    assert!(
        format!("{e:#}").contains("already intercepted (by"),
        "{e:#}"
    );
    assert!(second.steps().is_empty(), "the loser changed something");
    assert!(
        first.agent_running(),
        "the loser touched the winner's agent"
    );
    assert!(reaches_the_laptop(first.service_port).await);
    shutdown.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_dropped_agent_connection_is_reconnected_and_leave_elsewhere_ends_it() {
    state_dir();
    let swap = FakeSwap::new("lc-drop", laptop().await, Faults::default());
    let shutdown = CancellationToken::new();
    let task = spawn_hold(&swap, &shutdown);
    until(|| swap.steps().contains(&"connect")).await;
    assert!(reaches_the_laptop(swap.service_port).await);
    // The agent goes away and comes back (a restarted container): the cli reconnects.
    swap.stop_agent().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    swap.start_agent().await;
    until(|| swap.connects.load(Ordering::SeqCst) >= 2).await;
    assert!(
        reaches_the_laptop(swap.service_port).await,
        "not served after the reconnect"
    );
    // `leave` from another shell: the agent goes and the record says so; no second restore.
    swap.left_elsewhere.store(true, Ordering::SeqCst);
    swap.stop_agent().await;
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("the hold ends after leave elsewhere")
        .unwrap()
        .unwrap();
    assert!(!swap.steps().contains(&"restore"), "{:?}", swap.steps());
}
