//! The in-process tier of the sync: the real sync engine (`run_all`, what `up`, `sync` and
//! `watch` run) against the real dev agent, both in this process on loopback, through a
//! connector whose route the test can cut, make refuse, or declare gone. Checked: an edit
//! arrives; an edit made while the connection is down arrives after the reconnect; a refusing
//! agent is retried until it accepts; a connector that says the agent is gone stops the sync
//! with its reason; shutdown stops every sync promptly and releases its lock.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

use devloop::agent_link::{AgentLink, Connected};
use devloop::config::Rules;
use devloop::state::SyncLock;
use devloop::sync::engine::{run_all, Connector, Gone, SyncSettings};
use devloop::sync::filter::FilterSettings;
use devloop::ui::Ui;
use devloop_agent::{DevAgent, DevConfig};
use futures_util::future::BoxFuture;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "sync-engine-token";

fn state_dir() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let dir = tempfile::tempdir().unwrap().keep();
        std::env::set_var("DEVLOOP_STATE_DIR", dir);
    });
}

/// The dev agent on its own runtime thread, as in its own container.
fn start_agent(root: &Path) -> SocketAddr {
    let root = root.to_path_buf();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let agent = DevAgent::start(DevConfig {
                root,
                listen: "127.0.0.1:0".parse().unwrap(),
                token: TOKEN.into(),
                workdir: None,
                grace: Duration::from_millis(200),
                command: Vec::new(),
                mirror_output: false,
            })
            .await
            .unwrap();
            tx.send(agent.local_addr().unwrap()).unwrap();
            let _ = agent.serve(std::future::pending::<()>()).await;
        });
    });
    rx.recv().unwrap()
}

/// A route to the agent through a relay the test controls: `down` closes every relayed
/// connection and refuses new ones (a network cut), `refuse_first` presents a wrong token to
/// that many attempts, `gone` answers with [`Gone`].
struct Route {
    agent: SocketAddr,
    relay: SocketAddr,
    down: AtomicBool,
    cut: Mutex<CancellationToken>,
    refuse_first: AtomicUsize,
    gone: AtomicBool,
    attempts: AtomicUsize,
}

impl Route {
    async fn new(agent: SocketAddr) -> Arc<Route> {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let route = Arc::new(Route {
            agent,
            relay: listener.local_addr().unwrap(),
            down: AtomicBool::new(false),
            cut: Mutex::new(CancellationToken::new()),
            refuse_first: AtomicUsize::new(0),
            gone: AtomicBool::new(false),
            attempts: AtomicUsize::new(0),
        });
        let r = route.clone();
        tokio::spawn(async move {
            while let Ok((mut laptop, _)) = listener.accept().await {
                if r.down.load(Ordering::SeqCst) {
                    continue; // dropped: the connection closes at once
                }
                let cut = r.cut.lock().unwrap().clone();
                let agent = r.agent;
                tokio::spawn(async move {
                    let Ok(mut upstream) = TcpStream::connect(agent).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut laptop, &mut upstream) => {}
                        _ = cut.cancelled() => {}
                    }
                });
            }
        });
        route
    }

    /// Cuts every connection and refuses new ones until [`Route::restore`].
    fn cut(&self) {
        self.down.store(true, Ordering::SeqCst);
        let mut cut = self.cut.lock().unwrap();
        cut.cancel();
        *cut = CancellationToken::new();
    }

    fn restore(&self) {
        self.down.store(false, Ordering::SeqCst);
    }
}

struct Via(Arc<Route>);

impl Connector for Via {
    fn connect(&self) -> BoxFuture<'_, anyhow::Result<(Connected, String)>> {
        Box::pin(async move {
            let r = &self.0;
            r.attempts.fetch_add(1, Ordering::SeqCst);
            if r.gone.load(Ordering::SeqCst) {
                return Err(
                    Gone("the version this session synced into was replaced".into()).into(),
                );
            }
            let token = match r
                .refuse_first
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            {
                Ok(_) => "a-wrong-token",
                Err(_) => TOKEN,
            };
            let tcp = TcpStream::connect(r.relay).await?;
            let c = AgentLink::connect(tcp, token).await?;
            Ok((c, format!("relay {}", r.relay)))
        })
    }
}

struct Service {
    laptop: tempfile::TempDir,
    agent_root: tempfile::TempDir,
    route: Arc<Route>,
    project: String,
    name: String,
}

async fn service(name: &str) -> Service {
    state_dir();
    let laptop = tempfile::tempdir().unwrap();
    let agent_root = tempfile::tempdir().unwrap();
    std::fs::write(laptop.path().join("main.txt"), "v1").unwrap();
    let route = Route::new(start_agent(agent_root.path())).await;
    static N: AtomicUsize = AtomicUsize::new(0);
    Service {
        laptop,
        agent_root,
        route,
        project: format!("inproc{}", N.fetch_add(1, Ordering::SeqCst)),
        name: name.to_string(),
    }
}

impl Service {
    fn sync(&self) -> (SyncSettings, Arc<dyn Connector>) {
        (
            SyncSettings {
                project: self.project.clone(),
                service: self.name.clone(),
                laptop_dir: Some(self.laptop.path().to_path_buf()),
                filter: FilterSettings {
                    excludes: Vec::new(),
                    include_node_modules: false,
                },
                rules: Rules::default(),
                show_logs: false,
                redeploy: None,
            },
            Arc::new(Via(self.route.clone())),
        )
    }

    fn remote(&self, rel: &str) -> PathBuf {
        self.agent_root.path().join(rel)
    }
}

/// Waits until `path` holds `content` (or panics after `limit`).
async fn arrives(path: &Path, content: &str, limit: Duration) {
    let t = Instant::now();
    loop {
        if std::fs::read_to_string(path).ok().as_deref() == Some(content) {
            return;
        }
        assert!(
            t.elapsed() < limit,
            "{} did not get {content:?} within {limit:?}",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

type Running = tokio::task::JoinHandle<anyhow::Result<()>>;

fn run(
    syncs: Vec<(SyncSettings, Arc<dyn Connector>)>,
    names: &[&str],
) -> (Running, CancellationToken) {
    let stop = CancellationToken::new();
    let ui = Ui::new(names.iter().copied());
    let task = tokio::spawn(run_all(syncs, ui, "sync", stop.clone()));
    (task, stop)
}

async fn stops(task: Running, stop: CancellationToken) -> anyhow::Result<()> {
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("the sync did not stop within 5 s of shutdown")
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edit_made_while_the_connection_is_down_arrives_after_the_reconnect() {
    let s = service("api").await;
    let (task, stop) = run(vec![s.sync()], &["api"]);
    arrives(&s.remote("main.txt"), "v1", Duration::from_secs(10)).await;

    std::fs::write(s.laptop.path().join("main.txt"), "v2").unwrap();
    arrives(&s.remote("main.txt"), "v2", Duration::from_secs(5)).await;

    // The network goes: the edits made now cannot be sent.
    s.route.cut();
    let before = s.route.attempts.load(Ordering::SeqCst);
    std::fs::write(s.laptop.path().join("main.txt"), "v3").unwrap();
    std::fs::write(s.laptop.path().join("new.txt"), "made offline").unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(std::fs::read_to_string(s.remote("main.txt")).unwrap(), "v2");
    assert!(
        s.route.attempts.load(Ordering::SeqCst) > before,
        "the engine did not try to reconnect"
    );

    // It comes back: the full reconcile after the reconnect sends both.
    s.route.restore();
    arrives(&s.remote("main.txt"), "v3", Duration::from_secs(10)).await;
    arrives(&s.remote("new.txt"), "made offline", Duration::from_secs(5)).await;
    stops(task, stop).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusing_agent_is_retried_until_it_accepts() {
    let s = service("api").await;
    s.route.refuse_first.store(3, Ordering::SeqCst);
    let (task, stop) = run(vec![s.sync()], &["api"]);
    arrives(&s.remote("main.txt"), "v1", Duration::from_secs(15)).await;
    assert!(s.route.attempts.load(Ordering::SeqCst) >= 4);
    assert!(!task.is_finished(), "a refusal ended the sync");
    stops(task, stop).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connector_that_says_gone_stops_the_sync_with_its_reason() {
    let s = service("api").await;
    let (task, _stop) = run(vec![s.sync()], &["api"]);
    arrives(&s.remote("main.txt"), "v1", Duration::from_secs(10)).await;
    // The version is replaced elsewhere: the next connect says so, and the sync ends.
    s.route.gone.store(true, Ordering::SeqCst);
    s.route.cut();
    let err = tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("a gone agent was waited for")
        .unwrap()
        .unwrap_err();
    let text = format!("{err:#}");
    assert!(text.contains("was replaced"), "{text}");
    assert!(text.contains("sync of `api` stopped"), "{text}");
    assert!(!SyncLock::is_held(&s.project, "api"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_stops_every_sync_and_releases_its_lock() {
    let a = service("api").await;
    let b = service("web").await;
    let (task, stop) = run(vec![a.sync(), b.sync()], &["api", "web"]);
    arrives(&a.remote("main.txt"), "v1", Duration::from_secs(10)).await;
    arrives(&b.remote("main.txt"), "v1", Duration::from_secs(10)).await;
    assert!(SyncLock::is_held(&a.project, "api"));
    // One of them is reconnecting when the shutdown comes: that wait ends too.
    b.route.cut();
    tokio::time::sleep(Duration::from_millis(300)).await;
    stops(task, stop).await.unwrap();
    assert!(!SyncLock::is_held(&a.project, "api"));
    assert!(!SyncLock::is_held(&b.project, "web"));
}
