//! The supervised process: started as its own process group (so a restart can signal
//! everything it started), its output read line by line into the [`Hub`], restarted on request
//! at once and after a crash with a back-off.

use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use devloop_proxy::msg::{ExitInfo, LogStream, Outcome, ProcessState, ProcessStatus};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use std::os::unix::process::ExitStatusExt;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command as ProcessCommand};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::logs::{now_ms, Hub};

/// Longest line kept whole; longer output is cut into pieces of this size.
pub const MAX_LINE_BYTES: usize = 64 * 1024;
/// A run shorter than this counts as a quick exit (crash loop detection).
pub const QUICK_EXIT: Duration = Duration::from_secs(10);
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How long an exit waits for the process's last output before it is reported.
const DRAIN_OUTPUT: Duration = Duration::from_millis(300);

#[derive(Debug, Clone)]
pub struct SupervisorConfig {
    /// The command, no shell; empty: nothing to supervise.
    pub argv: Vec<String>,
    pub workdir: PathBuf,
    /// How long a stop waits after SIGTERM before SIGKILL.
    pub grace: Duration,
    /// Also write the process's lines to the agent's own stdout and stderr, so that the
    /// engine's log of the container (`docker logs`) shows them.
    pub mirror_output: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restarted {
    Spawned { pid: u32 },
    NoCommand,
}

enum Command {
    Restart {
        reason: String,
        done: oneshot::Sender<Result<Restarted, String>>,
    },
    Shutdown {
        done: oneshot::Sender<()>,
    },
}

/// A handle to the supervisor task.
#[derive(Clone)]
pub struct Supervisor {
    command_tx: mpsc::Sender<Command>,
}

impl Supervisor {
    /// Starts the process (if any) and the task that watches it.
    pub fn spawn(config: SupervisorConfig, hub: Arc<Hub>) -> (Supervisor, JoinHandle<()>) {
        let (command_tx, command_rx) = mpsc::channel(16);
        let status = ProcessStatus::initial(if config.argv.is_empty() {
            ProcessState::NoCommand
        } else {
            ProcessState::Stopped
        });
        hub.set_status(status.clone());
        let task = tokio::spawn(
            Runner {
                config,
                hub,
                status,
            }
            .run(command_rx),
        );
        (Supervisor { command_tx }, task)
    }

    /// Stops the process (SIGTERM, grace, SIGKILL) and starts it again at once. Answers when
    /// the new process has been spawned.
    pub async fn restart(&self, reason: &str) -> Result<Restarted, String> {
        let (done, done_rx) = oneshot::channel();
        self.command_tx
            .send(Command::Restart {
                reason: reason.to_string(),
                done,
            })
            .await
            .map_err(|_| "the supervisor has stopped".to_string())?;
        done_rx
            .await
            .map_err(|_| "the supervisor has stopped".to_string())?
    }

    /// Stops the process for good; the supervisor task ends after this.
    pub async fn shutdown(&self) {
        let (done, done_rx) = oneshot::channel();
        if self
            .command_tx
            .send(Command::Shutdown { done })
            .await
            .is_ok()
        {
            let _ = done_rx.await;
        }
    }
}

struct Running {
    child: Child,
    pid: u32,
    started: Instant,
    pumps: Vec<JoinHandle<()>>,
}

enum Phase {
    Running(Box<Running>),
    /// Waiting for the next start after an exit (or a failed start).
    WaitingUntil(Instant),
}

enum Wake {
    Exited(std::io::Result<ExitStatus>),
    Due,
    Command(Option<Command>),
}

struct Runner {
    config: SupervisorConfig,
    hub: Arc<Hub>,
    status: ProcessStatus,
}

impl Runner {
    async fn run(mut self, mut command_rx: mpsc::Receiver<Command>) {
        if self.config.argv.is_empty() {
            while let Some(command) = command_rx.recv().await {
                match command {
                    Command::Restart { done, .. } => {
                        let _ = done.send(Ok(Restarted::NoCommand));
                    }
                    Command::Shutdown { done } => {
                        let _ = done.send(());
                        return;
                    }
                }
            }
            return;
        }
        let mut phase = self.start_or_back_off();
        loop {
            let wake = match &mut phase {
                Phase::Running(running) => tokio::select! {
                    exit = running.child.wait() => Wake::Exited(exit),
                    command = command_rx.recv() => Wake::Command(command),
                },
                Phase::WaitingUntil(at) => tokio::select! {
                    () = tokio::time::sleep_until((*at).into()) => Wake::Due,
                    command = command_rx.recv() => Wake::Command(command),
                },
            };
            let running = match phase {
                Phase::Running(running) => Some(*running),
                Phase::WaitingUntil(_) => None,
            };
            phase = match wake {
                Wake::Exited(exit) => match running {
                    Some(running) => self.exited(running, exit).await,
                    None => self.after_exit(Duration::ZERO),
                },
                Wake::Due => self.start_or_back_off(),
                Wake::Command(Some(Command::Restart { reason, done })) => {
                    self.hub.agent_line(format!("restarting: {reason}"));
                    if let Some(running) = running {
                        self.stop(running).await;
                    }
                    self.status.quick_exits = 0;
                    match self.start() {
                        Ok(running) => {
                            let _ = done.send(Ok(Restarted::Spawned { pid: running.pid }));
                            Phase::Running(Box::new(running))
                        }
                        Err(e) => {
                            let _ = done.send(Err(e));
                            self.after_exit(Duration::ZERO)
                        }
                    }
                }
                Wake::Command(Some(Command::Shutdown { done })) => {
                    if let Some(running) = running {
                        self.stop(running).await;
                    }
                    self.status.state = ProcessState::Stopped;
                    self.hub.set_status(self.status.clone());
                    let _ = done.send(());
                    return;
                }
                Wake::Command(None) => {
                    if let Some(running) = running {
                        self.stop(running).await;
                    }
                    return;
                }
            };
        }
    }

    fn start_or_back_off(&mut self) -> Phase {
        match self.start() {
            Ok(running) => Phase::Running(Box::new(running)),
            Err(_) => self.after_exit(Duration::ZERO),
        }
    }

    fn start(&mut self) -> Result<Running, String> {
        let argv = &self.config.argv;
        let spawned = spawn_piped(
            argv,
            &self.config.workdir,
            &self.hub,
            self.config.mirror_output,
        );
        match spawned {
            Ok((child, pumps)) => {
                // A freshly spawned child that has not been waited for always has a pid.
                let pid = child.id().unwrap_or(0);
                self.status.starts += 1;
                self.status.state = ProcessState::Running { pid };
                self.hub
                    .agent_line(format!("started pid {pid} (start #{})", self.status.starts));
                self.hub.set_status(self.status.clone());
                Ok(Running {
                    child,
                    pid,
                    started: Instant::now(),
                    pumps,
                })
            }
            Err(e) => {
                let error = format!(
                    "cannot start {:?} in {}: {e}",
                    argv[0],
                    self.config.workdir.display()
                );
                self.hub.agent_line(error.clone());
                Err(error)
            }
        }
    }

    /// The process ended by itself: report it and schedule the next start.
    async fn exited(&mut self, running: Running, exit: std::io::Result<ExitStatus>) -> Phase {
        let ran = running.started.elapsed();
        // Whatever the process left running in its group goes too: it would hold ports and
        // pipes of the next start.
        kill_group(running.pid, Signal::SIGKILL);
        drain(running.pumps).await;
        let info = exit_info(exit.as_ref().ok(), ran);
        self.hub.agent_line(format!(
            "{} after {:.1}s",
            describe_exit(&info),
            ran.as_secs_f64()
        ));
        self.status.last_exit = Some(info);
        self.after_exit(ran)
    }

    /// Counts a quick exit (or resets the count after a long run) and enters the back-off.
    fn after_exit(&mut self, ran: Duration) -> Phase {
        let delay = if ran < QUICK_EXIT {
            self.status.quick_exits += 1;
            backoff(self.status.quick_exits)
        } else {
            self.status.quick_exits = 0;
            Duration::ZERO
        };
        if !delay.is_zero() {
            let n = self.status.quick_exits;
            if n >= 3 {
                self.hub.agent_line(format!(
                    "crash loop: {n} quick exits in a row, next start in {}",
                    seconds(delay)
                ));
            } else {
                self.hub
                    .agent_line(format!("next start in {}", seconds(delay)));
            }
        }
        self.status.state = ProcessState::BackingOff {
            retry_in_ms: delay.as_millis() as u64,
        };
        self.hub.set_status(self.status.clone());
        Phase::WaitingUntil(Instant::now() + delay)
    }

    /// SIGTERM to the group, up to the grace time, then SIGKILL; reaps the process.
    async fn stop(&mut self, mut running: Running) {
        let ran = running.started.elapsed();
        kill_group(running.pid, Signal::SIGTERM);
        let exit = match tokio::time::timeout(self.config.grace, running.child.wait()).await {
            Ok(exit) => exit,
            Err(_) => {
                self.hub.agent_line(format!(
                    "pid {} still running {} after SIGTERM, sending SIGKILL",
                    running.pid,
                    seconds(self.config.grace)
                ));
                kill_group(running.pid, Signal::SIGKILL);
                running.child.wait().await
            }
        };
        kill_group(running.pid, Signal::SIGKILL);
        let info = exit_info(exit.as_ref().ok(), ran);
        self.hub.agent_line(format!(
            "stopped pid {}: {} after {:.1}s",
            running.pid,
            describe_exit(&info),
            ran.as_secs_f64()
        ));
        self.status.last_exit = Some(info);
    }
}

/// Back-off before the next start after `quick_exits` quick exits in a row.
pub fn backoff(quick_exits: u32) -> Duration {
    if quick_exits == 0 {
        return Duration::ZERO;
    }
    let factor = 1u32 << (quick_exits - 1).min(16);
    (FIRST_BACKOFF * factor).min(MAX_BACKOFF)
}

fn seconds(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s.fract() == 0.0 {
        format!("{s:.0}s")
    } else {
        format!("{s:.1}s")
    }
}

fn exit_info(exit: Option<&ExitStatus>, ran: Duration) -> ExitInfo {
    ExitInfo {
        code: exit.and_then(|e| e.code()),
        signal: exit.and_then(|e| e.signal()),
        ran_ms: ran.as_millis() as u64,
        at_ms: now_ms(),
    }
}

fn describe_exit(info: &ExitInfo) -> String {
    match (info.code, info.signal) {
        (Some(code), _) => format!("exited with code {code}"),
        (None, Some(signal)) => match Signal::try_from(signal) {
            Ok(s) => format!("killed by signal {signal} ({})", s.as_str()),
            Err(_) => format!("killed by signal {signal}"),
        },
        (None, None) => "exited (status unknown)".to_string(),
    }
}

fn kill_group(pid: u32, signal: Signal) {
    let Ok(pid) = i32::try_from(pid) else { return };
    if pid <= 1 {
        return;
    }
    // ESRCH (the group is already gone) is the normal case after an exit.
    let _ = killpg(Pid::from_raw(pid), signal);
}

async fn drain(pumps: Vec<JoinHandle<()>>) {
    let all = async {
        for pump in pumps {
            let _ = pump.await;
        }
    };
    let _ = tokio::time::timeout(DRAIN_OUTPUT, all).await;
}

/// Spawns `argv` in `workdir` as a new process group with stdout and stderr read into the hub.
fn spawn_piped(
    argv: &[String],
    workdir: &std::path::Path,
    hub: &Arc<Hub>,
    mirror: bool,
) -> std::io::Result<(Child, Vec<JoinHandle<()>>)> {
    let Some((program, args)) = argv.split_first() else {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "empty command",
        ));
    };
    let mut child = ProcessCommand::new(program)
        .args(args)
        .current_dir(workdir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()?;
    let mut pumps = Vec::new();
    if let Some(out) = child.stdout.take() {
        pumps.push(tokio::spawn(pump_lines(
            out,
            LogStream::Stdout,
            hub.clone(),
            mirror,
        )));
    }
    if let Some(err) = child.stderr.take() {
        pumps.push(tokio::spawn(pump_lines(
            err,
            LogStream::Stderr,
            hub.clone(),
            mirror,
        )));
    }
    Ok((child, pumps))
}

/// Reads `reader` line by line (bytes, no UTF-8 requirement) into the hub; a line longer
/// than [`MAX_LINE_BYTES`] is cut into pieces.
async fn pump_lines(
    reader: impl AsyncRead + Unpin,
    stream: LogStream,
    hub: Arc<Hub>,
    mirror: bool,
) {
    let mut reader = BufReader::with_capacity(MAX_LINE_BYTES, reader);
    let mut line = Vec::new();
    loop {
        let buf = match reader.fill_buf().await {
            Ok(buf) => buf,
            Err(e) => {
                tracing::debug!(?stream, error = %e, "output pipe failed");
                break;
            }
        };
        if buf.is_empty() {
            break;
        }
        let room = MAX_LINE_BYTES - line.len();
        let window = &buf[..buf.len().min(room)];
        match window.iter().position(|&b| b == b'\n') {
            Some(i) => {
                line.extend_from_slice(&window[..i]);
                reader.consume(i + 1);
                emit(&hub, stream, &mut line, mirror);
            }
            None => {
                let n = window.len();
                line.extend_from_slice(window);
                reader.consume(n);
                if line.len() >= MAX_LINE_BYTES {
                    emit(&hub, stream, &mut line, mirror);
                }
            }
        }
    }
    if !line.is_empty() {
        emit(&hub, stream, &mut line, mirror);
    }
}

fn emit(hub: &Hub, stream: LogStream, line: &mut Vec<u8>, mirror: bool) {
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    if mirror {
        mirror_line(stream, line);
    }
    hub.log(stream, std::mem::take(line));
}

/// Writes one line to the agent's own stdout or stderr. Failures (a closed pipe) are ignored:
/// the copy in the hub is the one that matters.
fn mirror_line(stream: LogStream, line: &[u8]) {
    use std::io::Write;
    let _ = match stream {
        LogStream::Stdout => {
            let mut out = std::io::stdout().lock();
            out.write_all(line)
                .and_then(|()| out.write_all(b"\n"))
                .and_then(|()| out.flush())
        }
        LogStream::Stderr | LogStream::Agent => {
            let mut err = std::io::stderr().lock();
            err.write_all(line).and_then(|()| err.write_all(b"\n"))
        }
    };
}

/// Runs `argv` in `workdir` to completion (a `Run` request); its output goes to the hub.
pub async fn run_once(
    argv: &[String],
    workdir: &std::path::Path,
    hub: &Arc<Hub>,
    mirror: bool,
) -> Outcome {
    let shown = argv.join(" ");
    hub.agent_line(format!("run: {shown}"));
    let (mut child, pumps) = match spawn_piped(argv, workdir, hub, mirror) {
        Ok(spawned) => spawned,
        Err(e) => {
            let error = format!("cannot run {shown:?} in {}: {e}", workdir.display());
            hub.agent_line(error.clone());
            return Outcome::Failed { error };
        }
    };
    let started = Instant::now();
    let exit = child.wait().await;
    drain(pumps).await;
    let info = exit_info(exit.as_ref().ok(), started.elapsed());
    hub.agent_line(format!(
        "run {shown:?}: {} after {:.1}s",
        describe_exit(&info),
        started.elapsed().as_secs_f64()
    ));
    match exit {
        Ok(status) => Outcome::Exited {
            code: status.code(),
        },
        Err(e) => Outcome::Failed {
            error: format!("waiting for {shown:?}: {e}"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logs::Event;
    use devloop_proxy::msg::LogLine;
    use tokio::sync::broadcast;

    fn config(script: &str, grace_ms: u64) -> SupervisorConfig {
        SupervisorConfig {
            argv: vec!["sh".into(), "-c".into(), script.into()],
            workdir: std::env::temp_dir(),
            grace: Duration::from_millis(grace_ms),
            mirror_output: false,
        }
    }

    /// Collects events until `until` says stop (or 10 s pass, which fails the test).
    async fn collect_until(
        rx: &mut broadcast::Receiver<Event>,
        lines: &mut Vec<LogLine>,
        mut until: impl FnMut(&ProcessStatus) -> bool,
    ) -> ProcessStatus {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let event = tokio::time::timeout_at(deadline, rx.recv())
                .await
                .expect("timed out")
                .unwrap();
            match event {
                Event::Log(l) => lines.push(l),
                Event::Process(s) if until(&s) => return s,
                Event::Process(_) => {}
            }
        }
    }

    fn text(lines: &[LogLine], stream: LogStream) -> Vec<String> {
        lines
            .iter()
            .filter(|l| l.stream == stream)
            .map(|l| String::from_utf8_lossy(&l.line).into_owned())
            .collect()
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let ms: Vec<u128> = (0..10).map(|n| backoff(n).as_millis()).collect();
        assert_eq!(
            ms,
            vec![0, 500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000]
        );
        assert_eq!(backoff(u32::MAX), MAX_BACKOFF);
    }

    #[tokio::test]
    async fn output_lines_exit_code_and_backoff() {
        let hub = Arc::new(Hub::new());
        let mut rx = hub.subscribe().event_rx;
        let (sup, task) = Supervisor::spawn(
            config("echo out; printf 'no newline' >&2; exit 3", 1000),
            hub.clone(),
        );
        let mut lines = Vec::new();
        let first = collect_until(&mut rx, &mut lines, |s| {
            matches!(s.state, ProcessState::BackingOff { .. })
        })
        .await;
        assert_eq!(first.state, ProcessState::BackingOff { retry_in_ms: 500 });
        assert_eq!(first.quick_exits, 1);
        assert_eq!(first.starts, 1);
        assert_eq!(first.last_exit.as_ref().unwrap().code, Some(3));
        assert_eq!(text(&lines, LogStream::Stdout), vec!["out"]);
        assert_eq!(text(&lines, LogStream::Stderr), vec!["no newline"]);
        let agent = text(&lines, LogStream::Agent);
        assert!(
            agent
                .iter()
                .any(|l| l.starts_with("started pid ") && l.ends_with("(start #1)")),
            "{agent:?}"
        );
        assert!(
            agent
                .iter()
                .any(|l| l.starts_with("exited with code 3 after")),
            "{agent:?}"
        );

        let second = collect_until(&mut rx, &mut lines, |s| {
            matches!(s.state, ProcessState::BackingOff { .. })
        })
        .await;
        assert_eq!(second.state, ProcessState::BackingOff { retry_in_ms: 1000 });
        assert_eq!(second.quick_exits, 2);
        assert_eq!(second.starts, 2);

        // A restart request starts at once and resets the back-off.
        let restarted = sup.restart("test").await.unwrap();
        assert!(matches!(restarted, Restarted::Spawned { .. }));
        sup.shutdown().await;
        task.await.unwrap();
        assert_eq!(hub.status().state, ProcessState::Stopped);
    }

    #[tokio::test]
    async fn restart_replaces_a_long_running_process() {
        let hub = Arc::new(Hub::new());
        let mut rx = hub.subscribe().event_rx;
        let (sup, task) = Supervisor::spawn(
            SupervisorConfig {
                argv: vec!["sleep".into(), "1000".into()],
                workdir: std::env::temp_dir(),
                grace: Duration::from_secs(2),
                mirror_output: false,
            },
            hub.clone(),
        );
        let mut lines = Vec::new();
        let running = collect_until(&mut rx, &mut lines, |s| {
            matches!(s.state, ProcessState::Running { .. })
        })
        .await;
        let ProcessState::Running { pid: old } = running.state else {
            panic!()
        };
        let began = Instant::now();
        let Restarted::Spawned { pid: new } = sup.restart("files changed").await.unwrap() else {
            panic!()
        };
        assert!(
            began.elapsed() < Duration::from_secs(1),
            "sleep dies on SIGTERM, no grace wait"
        );
        assert_ne!(old, new);
        // The old process is gone (reaped, not a zombie).
        assert!(nix::sys::signal::kill(Pid::from_raw(old as i32), None).is_err());
        assert!(nix::sys::signal::kill(Pid::from_raw(new as i32), None).is_ok());
        let status = hub.status();
        assert_eq!(status.state, ProcessState::Running { pid: new });
        assert_eq!(status.starts, 2);
        assert_eq!(status.quick_exits, 0);
        sup.shutdown().await;
        task.await.unwrap();
        assert!(nix::sys::signal::kill(Pid::from_raw(new as i32), None).is_err());
    }

    #[tokio::test]
    async fn stop_escalates_to_sigkill_after_grace() {
        let hub = Arc::new(Hub::new());
        let mut rx = hub.subscribe().event_rx;
        let (sup, task) = Supervisor::spawn(
            config(
                "trap '' TERM; echo ready; while true; do sleep 0.05; done",
                300,
            ),
            hub.clone(),
        );
        // Wait until the trap is in place.
        loop {
            if let Event::Log(l) = rx.recv().await.unwrap() {
                if l.line == b"ready" {
                    break;
                }
            }
        }
        let began = Instant::now();
        sup.restart("test").await.unwrap();
        assert!(began.elapsed() >= Duration::from_millis(300));
        assert_eq!(hub.status().last_exit.unwrap().signal, Some(9));
        sup.shutdown().await;
        task.await.unwrap();
    }

    #[tokio::test]
    async fn no_command_restart_has_nothing_to_do() {
        let hub = Arc::new(Hub::new());
        let (sup, task) = Supervisor::spawn(
            SupervisorConfig {
                argv: vec![],
                workdir: std::env::temp_dir(),
                grace: Duration::from_secs(1),
                mirror_output: false,
            },
            hub.clone(),
        );
        assert_eq!(hub.status().state, ProcessState::NoCommand);
        assert_eq!(sup.restart("x").await.unwrap(), Restarted::NoCommand);
        sup.shutdown().await;
        task.await.unwrap();
    }

    #[tokio::test]
    async fn run_once_reports_exit_code_and_output() {
        let hub = Arc::new(Hub::new());
        let mut rx = hub.subscribe().event_rx;
        let argv: Vec<String> = vec!["sh".into(), "-c".into(), "echo built; exit 4".into()];
        assert_eq!(
            run_once(&argv, &std::env::temp_dir(), &hub, false).await,
            Outcome::Exited { code: Some(4) }
        );
        let mut seen = Vec::new();
        while let Ok(Event::Log(l)) = rx.try_recv() {
            seen.push(l);
        }
        assert_eq!(text(&seen, LogStream::Stdout), vec!["built"]);
        let missing = run_once(
            &["/nonexistent/prog".to_string()],
            &std::env::temp_dir(),
            &hub,
            false,
        )
        .await;
        assert!(matches!(missing, Outcome::Failed { .. }));
    }

    #[tokio::test]
    async fn long_lines_are_cut() {
        let hub = Arc::new(Hub::new());
        let mut rx = hub.subscribe().event_rx;
        let argv: Vec<String> = vec![
            "sh".into(),
            "-c".into(),
            format!(
                "head -c {} /dev/zero | tr '\\0' a; echo",
                MAX_LINE_BYTES + 10
            ),
        ];
        run_once(&argv, &std::env::temp_dir(), &hub, false).await;
        let mut out = Vec::new();
        while let Ok(event) = rx.try_recv() {
            if let Event::Log(l) = event {
                if l.stream == LogStream::Stdout {
                    out.push(l.line.len());
                }
            }
        }
        assert_eq!(out, vec![MAX_LINE_BYTES, 10]);
    }
}
