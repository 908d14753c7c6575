//! One service's sync, for as long as it runs: watch the laptop folder, reconcile with the
//! agent after every (re)connect, then send each burst of edits and apply the service's
//! live-update rules. Never loses an edit: events that arrive while disconnected are covered
//! by the full reconcile after the reconnect, and a watcher overflow triggers one too.

use devloop_proxy::tree::{Entry, Tree};
use devloop_proxy::RelPath;
use futures_util::future::BoxFuture;
use notify::{RecursiveMode, Watcher};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::diff::{apply_to_model, diff, Change};
use super::filter::{Filter, FilterSettings};
use super::scan;
use super::send::send_changes;
use crate::agent_link::{AgentEvent, AgentLink, Connected};
use crate::config::{Reaction, Rules};
use crate::state::{now_ms, SyncLock, SyncStatus};
use crate::ui::{human_bytes, human_ms, Ui};

/// Opens a new authenticated connection to the service's agent; the string names the route
/// (`direct 172.18.0.2:7717`, `docker exec`) for status and logs.
pub trait Connector: Send + Sync {
    fn connect(&self) -> BoxFuture<'_, anyhow::Result<(Connected, String)>>;
}

/// A connector's error that retrying cannot fix: the version it reaches was replaced by one
/// without this session's agent (`devloop down`, a plain `deploy` or `rollback` from another
/// shell). The sync stops with it instead of waiting for an agent that will not come back.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Gone(pub String);

/// Makes and rolls out a new version of the service; Ok(a line saying what was done).
pub type Redeploy = Arc<dyn Fn() -> BoxFuture<'static, anyhow::Result<String>> + Send + Sync>;

pub struct SyncSettings {
    pub project: String,
    pub service: String,
    /// Laptop folder to mirror; None: no sync, only logs and process control.
    pub laptop_dir: Option<PathBuf>,
    pub filter: FilterSettings,
    pub rules: Rules,
    /// Whether to print the service's output.
    pub show_logs: bool,
    /// How `redeploy` rules are carried out (`devloop watch`); None: they restart instead.
    pub redeploy: Option<Redeploy>,
}

impl SyncSettings {
    /// The sync of `service` as the project's config describes it.
    pub fn for_service(
        project: &str,
        service: &crate::config::Service,
        show_logs: bool,
        redeploy: Option<Redeploy>,
    ) -> Self {
        SyncSettings {
            project: project.to_string(),
            service: service.name.clone(),
            laptop_dir: service.sync.as_ref().map(|s| s.laptop_dir.clone()),
            filter: FilterSettings {
                excludes: service.excludes.clone(),
                include_node_modules: service.include_node_modules,
            },
            rules: service.rules.clone(),
            show_logs,
            redeploy,
        }
    }
}

/// How long a burst of events must be quiet before it is sent, and the longest a burst is
/// held back. A lone save goes out about 0.3 ms after its last event.
const QUIET: Duration = Duration::from_micros(300);
/// When a burst deletes synced files, wait a little longer: editors that save by rename delete and
/// re-create within a few milliseconds, and sending the gap would restart the service twice.
const QUIET_AFTER_DELETE: Duration = Duration::from_millis(15);
const MAX_HOLD: Duration = Duration::from_millis(100);

/// Sleeps `d` with microsecond precision: tokio's timer rounds up to whole milliseconds,
/// which alone would double the latency of a save.
async fn pause(d: Duration) {
    if d >= Duration::from_millis(5) {
        tokio::time::sleep(d).await;
    } else {
        let _ = tokio::task::spawn_blocking(move || std::thread::sleep(d)).await;
    }
}

enum WatchMsg {
    Paths(Vec<PathBuf>),
    Rescan(String),
    Error(String),
}

/// Runs until `shutdown`. Errors only for what retrying cannot fix (the folder cannot be
/// watched, another process syncs the service).
/// Runs the sync of every service given, side by side, until `shutdown` (the cli passes its
/// signal token) or until one of them stops with an error; then stops the others and waits
/// for them. `what` names the work in messages ("sync", "watch"). The first error is
/// returned; the others are shown as they end.
pub async fn run_all(
    syncs: Vec<(SyncSettings, Arc<dyn Connector>)>,
    ui: Ui,
    what: &str,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let each = CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();
    for (settings, conn) in syncs {
        let (ui, each, name) = (ui.clone(), each.clone(), settings.service.clone());
        tasks.spawn(async move { (name, run(settings, conn, ui, each).await) });
    }
    let mut failed = None;
    tokio::select! {
        _ = shutdown.cancelled() => {}
        Some(res) = tasks.join_next() => {
            match res {
                Ok((name, Err(e))) => failed = Some(e.context(format!("{what} of `{name}` stopped"))),
                Ok((_, Ok(()))) => {}
                Err(e) => failed = Some(anyhow::anyhow!("a {what} task failed: {e}")),
            }
        }
    }
    each.cancel();
    while let Some(res) = tasks.join_next().await {
        match res {
            Ok((name, Err(e))) => ui.warn(&name, format!("{what} ended with an error: {e:#}")),
            Ok((_, Ok(()))) => {}
            Err(e) => tracing::warn!(error = %e, "a {what} task failed"),
        }
    }
    match failed {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

pub async fn run(
    settings: SyncSettings,
    connector: Arc<dyn Connector>,
    ui: Ui,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let _lock = SyncLock::acquire(&settings.project, &settings.service)?;
    let mut status = SyncStatus {
        pid: std::process::id(),
        started_at_ms: now_ms(),
        ..Default::default()
    };
    let svc = settings.service.clone();

    let (watch_tx, mut watch_rx) = mpsc::unbounded_channel::<WatchMsg>();
    let mut _watcher = None;
    if let Some(dir) = &settings.laptop_dir {
        if !dir.is_dir() {
            anyhow::bail!(
                "sync folder {} of `{svc}` does not exist; fix `sync.from` in devloop.toml",
                dir.display()
            );
        }
        let tx = watch_tx.clone();
        let mut w = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            let msg = match res {
                Ok(ev) if ev.need_rescan() => WatchMsg::Rescan("the watcher's event queue overflowed".into()),
                // Reads (ours included: the scan opens every file) change nothing; only a
                // close after writing says a write finished.
                Ok(ev) if is_read_only(&ev.kind) => return,
                Ok(ev) => WatchMsg::Paths(ev.paths),
                Err(e) => match e.kind {
                    notify::ErrorKind::MaxFilesWatch => WatchMsg::Error(
                        "out of inotify watches: raise fs.inotify.max_user_watches (sysctl) or exclude large folders".into(),
                    ),
                    _ => WatchMsg::Rescan(format!("watcher error: {e}")),
                },
            };
            let _ = tx.send(msg);
        })?;
        w.watch(dir, RecursiveMode::Recursive)
            .map_err(|e| anyhow::anyhow!("cannot watch {}: {e}", dir.display()))?;
        _watcher = Some(w);
    }
    let root = settings.laptop_dir.clone();

    let mut first = true;
    let mut backoff = Duration::from_millis(100);
    let mut announced_wait = false;
    loop {
        if shutdown.is_cancelled() {
            break;
        }
        let connected = tokio::select! {
            r = connector.connect() => r,
            _ = shutdown.cancelled() => break,
        };
        let (
            Connected {
                link,
                welcome,
                events,
            },
            route,
        ) = match connected {
            Ok(c) => c,
            Err(e) if e.downcast_ref::<Gone>().is_some() => {
                status.connected = false;
                status.errors = vec![format!("{e:#}")];
                status.stopped_at_ms = Some(now_ms());
                save(&settings, &status);
                return Err(e);
            }
            Err(e) => {
                if !announced_wait {
                    ui.warn(&svc, format!("cannot reach the agent ({e:#}); retrying"));
                    announced_wait = true;
                }
                status.connected = false;
                status.errors = vec![format!("{e:#}")];
                save(&settings, &status);
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.cancelled() => break,
                }
                backoff = (backoff * 2).min(Duration::from_secs(3));
                continue;
            }
        };
        backoff = Duration::from_millis(100);
        announced_wait = false;
        status.connected = true;
        status.route = route.clone();
        status.errors.clear();
        if !first {
            ui.info(&svc, format!("reconnected ({route}); reconciling"));
        }
        tracing::info!(service = %svc, %route, agent = %welcome.agent_version, "connected to agent");
        if first && settings.show_logs {
            for line in &welcome.recent_logs {
                ui.log(&svc, line);
            }
        }
        let log_task = tokio::spawn(forward_events(
            events,
            ui.clone(),
            svc.clone(),
            settings.show_logs,
        ));

        let result = match &root {
            Some(root) => {
                let mut session = Session {
                    settings: &settings,
                    root,
                    link: &link,
                    ui: &ui,
                    status: &mut status,
                    known: Tree::new(),
                };
                session.run(&mut watch_rx, first, &shutdown).await
            }
            None => {
                tokio::select! {
                    _ = link.closed() => Ok(()),
                    _ = shutdown.cancelled() => Ok(()),
                }
            }
        };
        link.close();
        log_task.abort();
        first = false;
        status.connected = false;
        match result {
            Ok(()) if shutdown.is_cancelled() => break,
            Ok(()) => ui.warn(&svc, "connection to the agent lost; reconnecting (edits are kept and sent after)"),
            Err(SessionEnd::Link(e)) => ui.warn(&svc, format!("connection to the agent lost ({e}); reconnecting (edits are kept and sent after)")),
            Err(SessionEnd::Redeployed) => {}
            Err(SessionEnd::Fatal(e)) => {
                status.errors.push(format!("{e:#}"));
                save(&settings, &status);
                return Err(e);
            }
        }
        save(&settings, &status);
    }
    status.connected = false;
    status.stopped_at_ms = Some(now_ms());
    save(&settings, &status);
    Ok(())
}

fn is_read_only(kind: &notify::EventKind) -> bool {
    use notify::event::{AccessKind, AccessMode, EventKind};
    matches!(kind, EventKind::Access(a) if !matches!(a, AccessKind::Close(AccessMode::Write)))
}

enum SessionEnd {
    /// A new version replaced the container: reconnect without alarm.
    Redeployed,
    Link(crate::agent_link::LinkError),
    Fatal(anyhow::Error),
}

impl From<crate::agent_link::LinkError> for SessionEnd {
    fn from(e: crate::agent_link::LinkError) -> Self {
        SessionEnd::Link(e)
    }
}

fn save(settings: &SyncSettings, status: &SyncStatus) {
    if let Err(e) = crate::state::write_sync_status(&settings.project, &settings.service, status) {
        tracing::warn!(error = %e, "cannot write sync status");
    }
}

async fn forward_events(mut events: mpsc::Receiver<AgentEvent>, ui: Ui, svc: String, show: bool) {
    while let Some(ev) = events.recv().await {
        match ev {
            AgentEvent::Log(line) if show => ui.log(&svc, &line),
            _ => {}
        }
    }
}

/// The laptop's tree and the filter that produced it, kept current by events.
struct Laptop {
    root: PathBuf,
    filter: Filter,
    tree: Tree,
}

impl Laptop {
    /// Walks the tree without reading files; [`Laptop::hash_against`] reads what must be
    /// compared.
    async fn full_scan(
        root: &Path,
        settings: FilterSettings,
    ) -> anyhow::Result<(Laptop, Vec<String>)> {
        let root = root.to_path_buf();
        tokio::task::spawn_blocking(move || {
            let mut filter = Filter::new(&root, settings)?;
            let (tree, errors) = scan::scan_meta(&root, &mut filter);
            Ok((Laptop { root, filter, tree }, errors))
        })
        .await?
    }

    /// Hashes the files the agent also holds at the same size: only for those can content
    /// decide. A file the agent lacks, or holds at another size, is sent without being read
    /// twice (sending hashes what it reads), which is what makes a first sync fast.
    async fn hash_against(
        mut self,
        agent: &Tree,
        errors: &mut Vec<String>,
    ) -> anyhow::Result<Laptop> {
        let sizes: std::collections::HashMap<RelPath, u64> = agent
            .iter()
            .filter_map(|(p, e)| match e {
                Entry::File { size, .. } => Some((p.clone(), *size)),
                _ => None,
            })
            .collect();
        let (laptop, new_errors) = tokio::task::spawn_blocking(move || {
            let mut errors = Vec::new();
            scan::hash_where(&self.root, &mut self.tree, &mut errors, |p, size| {
                sizes.get(p) == Some(&size)
            });
            (self, errors)
        })
        .await?;
        errors.extend(new_errors);
        Ok(laptop)
    }
}

/// One connection's worth of syncing: what it needs at hand, and the model of the agent's
/// tree (`known`) that every diff is taken against.
struct Session<'a> {
    settings: &'a SyncSettings,
    root: &'a Path,
    link: &'a AgentLink,
    ui: &'a Ui,
    status: &'a mut SyncStatus,
    known: Tree,
}

impl Session<'_> {
    /// Reconciles, then sends each burst of edits until the connection ends or `shutdown`.
    async fn run(
        &mut self,
        watch_rx: &mut mpsc::UnboundedReceiver<WatchMsg>,
        first: bool,
        shutdown: &CancellationToken,
    ) -> Result<(), SessionEnd> {
        let settings = self.settings;
        let ui = self.ui;
        let link = self.link;
        let root = self.root;
        let svc = &settings.service;
        // Everything queued so far is covered by the full reconcile below.
        while watch_rx.try_recv().is_ok() {}
        let s = self;
        let mut laptop = s.reconcile(first, true).await?;

        loop {
            let first_msg = tokio::select! {
                m = watch_rx.recv() => m,
                _ = link.closed() => return Ok(()),
                _ = shutdown.cancelled() => return Ok(()),
            };
            let Some(first_msg) = first_msg else {
                return Ok(());
            };
            let started = Instant::now();
            let mut paths: BTreeSet<PathBuf> = BTreeSet::new();
            let mut rescan: Option<String> = None;
            let take =
                |m: WatchMsg, paths: &mut BTreeSet<PathBuf>, rescan: &mut Option<String>| match m {
                    WatchMsg::Paths(p) => paths.extend(p),
                    WatchMsg::Rescan(why) => *rescan = Some(why),
                    WatchMsg::Error(e) => ui.warn(svc, e),
                };
            take(first_msg, &mut paths, &mut rescan);
            // Coalesce the burst. A synced file that is missing now may be an editor's
            // rename-save under way (vim moves the original aside, then writes anew): wait
            // longer then. A temp file that came and went is not synced and does not count.
            loop {
                let deleting = paths.iter().any(|p| {
                    !p.exists()
                        && p.strip_prefix(root)
                            .ok()
                            .and_then(|r| RelPath::from_path(r).ok())
                            .is_some_and(|r| laptop.tree.contains_key(&r))
                });
                let quiet = if deleting { QUIET_AFTER_DELETE } else { QUIET };
                pause(quiet).await;
                let mut got = false;
                while let Ok(m) = watch_rx.try_recv() {
                    take(m, &mut paths, &mut rescan);
                    got = true;
                }
                if !got || started.elapsed() > MAX_HOLD {
                    break;
                }
            }
            let rel: Vec<PathBuf> = paths
                .iter()
                .filter_map(|p| p.strip_prefix(root).ok().map(Path::to_path_buf))
                .collect();
            let rules_changed = rel.iter().any(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(Filter::is_rule_file)
            });
            if let Some(why) =
                rescan.or_else(|| rules_changed.then(|| "ignore rules changed".to_string()))
            {
                tracing::info!(service = %svc, reason = %why, "full rescan");
                laptop = s.reconcile(false, false).await?;
                continue;
            }
            // Update the laptop tree for each path, then diff only there.
            let placeholder = Laptop {
                root: PathBuf::new(),
                filter: laptop.filter.clone(),
                tree: Tree::new(),
            };
            let mut lt = std::mem::replace(&mut laptop, placeholder);
            let (lt_back, scope) = tokio::task::spawn_blocking(move || {
                let mut scope = Vec::new();
                for r in rel {
                    let Ok(path) = RelPath::from_path(&r) else {
                        continue;
                    };
                    remove_under(&mut lt.tree, &path);
                    match scan::read_entry(&lt.root, &r, &lt.filter) {
                        Ok(Some(entry)) => {
                            let is_dir = matches!(entry, Entry::Dir { .. });
                            lt.tree.insert(path.clone(), entry);
                            if is_dir {
                                let mut errors = Vec::new();
                                scan::scan_into(
                                    &lt.root.clone(),
                                    &r,
                                    &mut lt.filter,
                                    &mut lt.tree,
                                    &mut errors,
                                );
                            }
                        }
                        Ok(None) => {}
                        Err(e) => tracing::warn!(path = %r.display(), error = %e, "cannot read"),
                    }
                    scope.push(path);
                }
                (lt, scope)
            })
            .await
            .map_err(|e| SessionEnd::Fatal(e.into()))?;
            laptop = lt_back;
            let changes = diff(&laptop.tree, &s.known, Some(&scope));
            if changes.is_empty() {
                continue;
            }
            s.status.pending = changes.len() as u64;
            let result = s.send_and_react(changes, false).await;
            s.absorb_refusal(result, &laptop.filter).await?;
        }
    }

    /// The agent refused an operation (a path it will not write, a command it cannot
    /// start): that is not a broken connection, so say it, record it for `status`, learn what
    /// the agent holds now, and go on. Other errors pass through.
    async fn absorb_refusal(
        &mut self,
        result: Result<(), SessionEnd>,
        filter: &Filter,
    ) -> Result<(), SessionEnd> {
        match result {
            Err(SessionEnd::Link(crate::agent_link::LinkError::Failed(error))) => {
                self.ui.warn(
                    &self.settings.service,
                    format!("the agent refused part of the sync: {error}"),
                );
                self.status.errors.push(error);
                save(self.settings, self.status);
                self.known = filtered(self.link.index().await?, filter);
                Ok(())
            }
            other => other,
        }
    }
}

/// What the agent holds under ignored paths (a build output, node_modules installed in the
/// container) is none of the sync's business: it is left out, so it is never deleted.
fn filtered(agent_tree: Tree, filter: &Filter) -> Tree {
    agent_tree
        .into_iter()
        .filter(|(p, e)| !filter.is_ignored(Path::new(p.as_str()), matches!(e, Entry::Dir { .. })))
        .collect()
}

fn remove_under(tree: &mut Tree, path: &RelPath) {
    let doomed: Vec<RelPath> = tree
        .range(path.clone()..)
        .take_while(|(k, _)| k.starts_with(path))
        .map(|(k, _)| k.clone())
        .collect();
    for k in doomed {
        tree.remove(&k);
    }
}

impl Session<'_> {
    /// Full scan of both sides, then send the difference.
    async fn reconcile(&mut self, initial: bool, reindex: bool) -> Result<Laptop, SessionEnd> {
        let started = Instant::now();
        let scan_fut = Laptop::full_scan(self.root, self.settings.filter.clone());
        let (laptop, agent_tree) = if reindex || self.known.is_empty() {
            let (l, a) = tokio::join!(scan_fut, self.link.index());
            (l, Some(a?))
        } else {
            (scan_fut.await, None)
        };
        let (laptop, mut errors) = laptop.map_err(SessionEnd::Fatal)?;
        let reference = agent_tree.as_ref().unwrap_or(&self.known);
        let laptop = laptop
            .hash_against(reference, &mut errors)
            .await
            .map_err(SessionEnd::Fatal)?;
        for e in errors.iter().take(5) {
            self.ui
                .warn(&self.settings.service, format!("not synced: {e}"));
        }
        self.status.errors = errors;
        if let Some(agent_tree) = agent_tree {
            self.known = filtered(agent_tree, &laptop.filter);
        }
        let changes = diff(&laptop.tree, &self.known, None);
        let scanned_ms = started.elapsed().as_millis() as u64;
        self.status.pending = changes.len() as u64;
        let count = changes.len();
        if count > 0 {
            let result = self.send_and_react(changes, initial).await;
            self.absorb_refusal(result, &laptop.filter).await?;
        }
        let files = laptop
            .tree
            .values()
            .filter(|e| matches!(e, Entry::File { .. }))
            .count() as u64;
        let bytes: u64 = laptop
            .tree
            .values()
            .map(|e| {
                if let Entry::File { size, .. } = e {
                    *size
                } else {
                    0
                }
            })
            .sum();
        self.status.files = files;
        self.status.bytes = bytes;
        self.status.pending = 0;
        self.status.last_sync_ms = Some(now_ms());
        save(self.settings, self.status);
        if initial || count > 0 {
            self.ui.info(
                &self.settings.service,
                format!(
                    "in sync: {files} files, {} ({} changes sent; {} total, scan {})",
                    human_bytes(bytes),
                    count,
                    human_ms(started.elapsed().as_millis() as u64),
                    human_ms(scanned_ms)
                ),
            );
        }
        Ok(laptop)
    }

    async fn send_and_react(
        &mut self,
        changes: Vec<Change>,
        initial: bool,
    ) -> Result<(), SessionEnd> {
        let svc = &self.settings.service;
        let started = Instant::now();
        if let (Reaction::Redeploy, Some(redeploy)) = (
            self.settings
                .rules
                .reaction(changes.iter().map(|c| c.path().as_str())),
            &self.settings.redeploy,
        ) {
            // The running version is replaced as a whole: syncing into it first is wasted work.
            let what: Vec<&str> = changes.iter().take(3).map(|c| c.path().as_str()).collect();
            self.ui.info(
                svc,
                format!(
                    "redeploying for {}{}",
                    what.join(", "),
                    if changes.len() > 3 { ", ..." } else { "" }
                ),
            );
            return match redeploy().await {
                Ok(line) => {
                    self.ui.info(svc, line);
                    // The old container and this connection are gone; the next one reconciles.
                    Err(SessionEnd::Redeployed)
                }
                Err(e) => {
                    // The last good version keeps running; the next save tries again.
                    self.ui.warn(
                        svc,
                        format!("redeploy failed, the running version stays: {e:#}"),
                    );
                    self.status.errors.push(format!("redeploy failed: {e:#}"));
                    save(self.settings, self.status);
                    Ok(())
                }
            };
        }
        let total: u64 = changes
            .iter()
            .map(|c| if let Change::Put(_, _, s) = c { *s } else { 0 })
            .sum();
        let bar = (total > 8 * 1024 * 1024).then(|| {
            self.ui
                .bytes_bar(svc, if initial { "initial sync" } else { "sync" }, total)
        });
        let sent = send_changes(self.link, self.root, changes, |done, _| {
            if let Some(b) = &bar {
                b.set_position(done)
            }
        })
        .await;
        if let Some(b) = bar {
            b.finish_and_clear();
        }
        let sent = sent?;
        for (change, entry) in &sent.applied {
            apply_to_model(&mut self.known, change, entry.as_ref());
        }
        self.status.last_sync_ms = Some(now_ms());
        self.status.pending = 0;
        let changed: Vec<&str> = sent
            .applied
            .iter()
            .map(|(c, _)| c.path().as_str())
            .collect();
        tracing::debug!(service = %svc, changes = changed.len(), bytes = sent.bytes, took_us = started.elapsed().as_micros() as u64, "synced");
        if !initial && changed.len() <= 3 {
            self.ui.info(
                svc,
                format!(
                    "synced {} ({})",
                    changed.join(", "),
                    human_ms(started.elapsed().as_millis() as u64)
                ),
            );
        } else if !initial {
            self.ui.info(
                svc,
                format!(
                    "synced {} changes, {} ({})",
                    changed.len(),
                    human_bytes(sent.bytes),
                    human_ms(started.elapsed().as_millis() as u64)
                ),
            );
        }
        match self.settings.rules.reaction(changed.iter().copied()) {
            Reaction::None => {}
            Reaction::Restart => {
                self.link.restart().await?;
            }
            // Without a way to redeploy (`devloop up`), a redeploy rule restarts.
            Reaction::Redeploy => {
                self.link.restart().await?;
            }
            Reaction::RunThenRestart(cmds) => {
                for cmd in cmds {
                    self.ui.info(svc, format!("running {}", cmd.join(" ")));
                    match self.link.run(cmd.clone()).await? {
                        Some(0) => {}
                        code => self
                            .ui
                            .warn(svc, format!("`{}` exited with {code:?}", cmd.join(" "))),
                    }
                }
                self.link.restart().await?;
            }
        }
        save(self.settings, self.status);
        Ok(())
    }
}
