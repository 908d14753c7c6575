//! Filtered intercepts and mirrors, written once for every back end: the [`Router`] a back
//! end implements (find or install the routing agent beside the running original, reach
//! it), and [`hold_shared`], which owns one holder from its claim to its end: the filter
//! registered with the agent, the laptop's connections, the laptop command, a line per
//! request, reconnects, and on every way out the holder gone. The original keeps running
//! and serving throughout; the agent leaves by itself once its last holder is gone.

use anyhow::Context;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devloop_proxy::msg::{HoldSpec, HolderInfo, RequestLine};
use devloop_proxy::route::Filter;
use futures_util::future::BoxFuture;
use tokio_util::sync::CancellationToken;

use super::{find_program, rewrite_env, start_tunnel, write_env_file, InterceptOptions};
use crate::agent_link::{AgentEvent, Connected};
use crate::ownership;
use crate::ui::{ago, human_bytes, human_ms};

/// The laptop command's variable holding `--key`.
pub const KEY_ENV: &str = "DEVLOOP_SESSION_KEY";

/// A connection to a service's routing agent.
pub struct Joined {
    pub link: Connected,
    /// True when this call installed the agent (the first holder).
    pub installed: bool,
    /// A local engine: the name of the handoff socket the back end serves for this cli, as
    /// the agent finds it in its handoff folder.
    pub handoff: Option<String>,
}

/// One service's routing agent, on some back end. Docker puts it in the original
/// container's network namespace ([`crate::backend::docker::routing`]).
pub trait Router: Send + Sync {
    /// The original's name, for messages.
    fn original(&self) -> String;
    /// The name `leave` takes.
    fn service(&self) -> String;
    /// The resource's key in the ownership records.
    fn owner_key(&self) -> String;
    /// (service port, laptop port).
    fn ports(&self) -> Vec<(u16, u16)>;
    /// The original's environment, for the laptop command.
    fn env(&self) -> Vec<(String, String)>;
    /// Reaches the service's routing agent, installing it beside the original when none
    /// runs (two clis at the same moment: one installs, both join). Where the engine shares
    /// this machine, it also serves a handoff socket named after `session` that gives the
    /// agent connections to the laptop ports.
    fn join<'a>(&'a self, session: &'a str) -> BoxFuture<'a, anyhow::Result<Joined>>;
}

/// `user@host`, as holders are named: `DEVLOOP_USER` when set, else the login and host name.
pub fn who() -> String {
    if let Ok(u) = std::env::var("DEVLOOP_USER") {
        if !u.trim().is_empty() {
            return u.trim().to_string();
        }
    }
    format!(
        "{}@{}",
        crate::ownership::user_name(),
        crate::ownership::host_name()
    )
}

/// How a holder is shown: its filter, or "every request" for a mirror without one.
pub fn describe(filter: &Filter, mirror: bool) -> String {
    let f = filter.describe();
    match (*filter == Filter::default(), mirror) {
        (true, true) => "a copy of every request".into(),
        (true, false) => "every request".into(),
        (false, true) => format!("a copy of {f}"),
        (false, false) => f,
    }
}

/// What an intercept sends to the laptop, as a clause: "requests with x-dev=alice go".
fn what_goes(filter: &Filter, mirror: bool) -> String {
    let f = filter.describe();
    match (*filter == Filter::default(), mirror) {
        (true, true) => "a copy of every request goes".into(),
        (false, true) => format!("a copy of each request with {f} goes"),
        (true, false) => "every request goes".into(),
        (false, false) => format!("requests with {f} go"),
    }
}

/// One holder's line in `intercept list`.
pub fn holder_line(h: &HolderInfo) -> String {
    let ports: Vec<String> = h.ports.iter().map(u16::to_string).collect();
    let dropped = if h.dropped > 0 {
        format!(", {} copies dropped", h.dropped)
    } else {
        String::new()
    };
    format!(
        "holder {}  {}  port {}  {}  {} request{}{dropped}  since {}",
        h.id,
        h.who,
        ports.join(","),
        describe(&h.filter, h.mirror),
        h.requests,
        if h.requests == 1 { "" } else { "s" },
        ago(h.since_ms)
    )
}

/// A request's line: time, method, path, status, time to the laptop's answer, bytes.
pub fn request_line(r: &RequestLine) -> String {
    let secs = r.at_ms / 1000;
    let (h, m, s) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
    let status = if r.status == 0 {
        "---".to_string()
    } else {
        r.status.to_string()
    };
    let mut line = format!(
        "{h:02}:{m:02}:{s:02}.{:03} {} {} {status} {:.1} ms  in {} out {}",
        r.at_ms % 1000,
        r.method,
        r.path,
        r.answer_us as f64 / 1000.0,
        human_bytes(r.bytes_in),
        human_bytes(r.bytes_out),
    );
    if r.copy {
        line.push_str("  (copy)");
    }
    if let Some(e) = &r.error {
        line.push_str(&format!("  error: {e}"));
    }
    line
}

/// How a holder ended.
enum End {
    Interrupted,
    CommandExited,
    Released(String),
}

/// One filtered intercept (or mirror), from its claim to its end. `filter` is checked
/// already (it compiles); the agent checks it again.
pub async fn hold_shared(
    router: &dyn Router,
    opts: &InterceptOptions,
    filter: Filter,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let (orig_name, service) = (router.original(), router.service());
    let shown = describe(&filter, opts.mirror);
    let session = crate::state::new_token()[..16].to_string();
    let kind = ownership::Kind::Shared {
        filter: shown.clone(),
    };
    let claim = ownership::Claim::acquire(
        &router.owner_key(),
        &orig_name,
        ownership::Holder::new(&session, kind),
    )
    .map_err(|e| match e {
        ownership::ClaimError::Held { holder, .. } => anyhow::anyhow!(
            "{orig_name} is intercepted whole (by {}, {}): a filtered intercept needs it to end first (`devloop leave {service}`)",
            holder.who,
            ago(holder.started_ms)
        ),
        e => e.into(),
    })?;
    let mut env = rewrite_env(&router.env(), &opts.expose);
    if let Some(key) = &opts.key {
        env.push((KEY_ENV.to_string(), key.clone()));
    }
    if let Some(path) = &opts.env_file {
        write_env_file(path, &env)?;
        eprintln!(
            "devloop: wrote the environment of {orig_name} to {}",
            path.display()
        );
    }
    if let Some(program) = opts.command.first() {
        find_program(program)?;
    }
    let result = hold_joined(router, opts, &filter, &session, &env, &shutdown).await;
    if let Err(e) = claim.release() {
        tracing::warn!(error = %e, "cannot update the ownership record");
    }
    match result {
        Ok(End::Released(by)) => {
            eprintln!("devloop: {by} ended this intercept of {service} (`devloop leave`); the original serves its requests again");
            Ok(())
        }
        Ok(End::Interrupted) => {
            eprintln!("devloop: interrupted; {service}'s requests for this intercept reach the original again");
            Ok(())
        }
        Ok(End::CommandExited) => {
            eprintln!("devloop: the command exited; {service}'s requests for this intercept reach the original again");
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// What a holder keeps while it runs: its connection, and the laptop ends of it.
struct Held {
    joined: Joined,
    id: u64,
}

/// Joins the agent and registers the holder.
async fn register(
    router: &dyn Router,
    spec: &HoldSpec,
    session: &str,
    locals: &HashMap<u16, u16>,
) -> anyhow::Result<(Held, Vec<HolderInfo>)> {
    let joined = router.join(session).await?;
    let mut spec = spec.clone();
    spec.handoff = joined.handoff.clone();
    let slot: Arc<Mutex<Option<devloop_proxy::tunnel::Mux>>> = Arc::default();
    start_tunnel(&joined.link, locals, &slot, &router.service());
    let (id, overlaps) = joined.link.link.hold(spec).await.with_context(|| {
        format!(
            "the routing agent of {} refused the intercept",
            router.original()
        )
    })?;
    Ok((Held { joined, id }, overlaps))
}

#[allow(clippy::too_many_arguments)]
async fn hold_joined(
    router: &dyn Router,
    opts: &InterceptOptions,
    filter: &Filter,
    session: &str,
    env: &[(String, String)],
    shutdown: &CancellationToken,
) -> anyhow::Result<End> {
    use crate::signals::unless_cancelled;
    let (orig_name, service) = (router.original(), router.service());
    let started = Instant::now();
    let resolved = router.ports();
    let locals: HashMap<u16, u16> = resolved.iter().copied().collect();
    let spec = HoldSpec {
        ports: resolved.iter().map(|(r, _)| *r).collect(),
        filter: filter.clone(),
        mirror: opts.mirror,
        who: who(),
        handoff: None,
        lines: !opts.quiet,
        session: opts.session.clone(),
    };
    let (mut held, overlaps) =
        match unless_cancelled(shutdown, register(router, &spec, session, &locals)).await {
            Ok(r) => r?,
            Err(_) => return Ok(End::Interrupted),
        };
    let ports: Vec<String> = resolved
        .iter()
        .map(|(r, l)| format!("{r} -> laptop {l}"))
        .collect();
    eprintln!(
        "devloop: {service}: {} to the laptop ({}); the original {orig_name} {}. Intercepted in {}{} as holder {}; Ctrl-C or `devloop leave {service}` ends it",
        what_goes(filter, opts.mirror),
        ports.join(", "),
        if opts.mirror { "keeps answering every caller" } else { "serves the rest" },
        human_ms(started.elapsed().as_millis() as u64),
        if held.joined.installed { " (routing agent installed)" } else { "" },
        held.id,
    );
    for o in &overlaps {
        eprintln!(
            "devloop: note: holder {} ({}, {}) may take some of the same requests; a header filter beats a path-only one, else the earlier holder wins",
            o.id,
            o.who,
            describe(&o.filter, o.mirror)
        );
    }
    if let Some(key) = &opts.key {
        eprintln!("devloop: requests with the header `baggage: devloop-session={key}` are yours; the laptop command has it in ${KEY_ENV}");
    }

    let mut child = super::spawn_laptop_command(&opts.command, env)?;

    let end = loop {
        tokio::select! {
            _ = shutdown.cancelled() => break End::Interrupted,
            status = async { match child.as_mut() { Some(c) => c.wait().await.ok(), None => std::future::pending().await } } => {
                eprintln!("devloop: `{}` exited ({})", opts.command.join(" "), status.map(|s| s.to_string()).unwrap_or_default());
                break End::CommandExited;
            }
            event = held.joined.link.events.recv() => match event {
                Some(AgentEvent::Request(line)) => {
                    if !opts.quiet {
                        match &opts.session {
                            // Several services share the terminal: each line names its own.
                            Some(_) => eprintln!("{service}: {}", request_line(&line)),
                            None => eprintln!("{}", request_line(&line)),
                        }
                    }
                }
                Some(AgentEvent::Released { by }) => break End::Released(by),
                Some(_) => {}
                None => {
                    // The connection is gone: the holder with it. Join again (installing the
                    // agent again if it went) and hold again.
                    eprintln!("devloop: the connection to the routing agent is down; reconnecting (meanwhile the original serves every request)");
                    let again = loop {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        match unless_cancelled(shutdown, register(router, &spec, session, &locals)).await {
                            Err(_) => break None,
                            Ok(Ok((h, _))) => break Some(h),
                            Ok(Err(e)) => eprintln!("devloop: cannot reach the routing agent yet: {e:#}"),
                        }
                    };
                    match again {
                        Some(h) => {
                            held = h;
                            eprintln!("devloop: holding again, as holder {}", held.id);
                        }
                        None => break End::Interrupted,
                    }
                }
            },
        }
    };
    if let Some(c) = child.as_mut() {
        let _ = c.kill().await;
    }
    held.joined.link.link.close();
    Ok(end)
}

/// The socket file a cli's handoff listener takes in a routing agent's handoff folder.
pub fn handoff_socket(dir: &std::path::Path, session: &str) -> (PathBuf, String) {
    let name = format!("{session}.sock");
    (dir.join(&name), name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines_name_what_happened() {
        let line = RequestLine {
            holder: 1,
            port: 8000,
            at_ms: 3_723_004,
            method: "POST".into(),
            path: "/v2/orders".into(),
            status: 201,
            answer_us: 2_450,
            bytes_in: 12,
            bytes_out: 2048,
            error: None,
            copy: true,
        };
        let s = request_line(&line);
        assert!(
            s.starts_with("01:02:03.004 POST /v2/orders 201 2.5 ms"),
            "{s}"
        );
        assert!(s.ends_with("(copy)"), "{s}");
    }

    #[test]
    fn an_intercept_says_what_goes_to_the_laptop() {
        let every = Filter::default();
        let alice = Filter {
            headers: vec![devloop_proxy::route::HeaderMatch::parse("x-dev=alice").unwrap()],
            ..Filter::default()
        };
        assert_eq!(what_goes(&every, true), "a copy of every request goes");
        assert_eq!(
            what_goes(&alice, true),
            "a copy of each request with x-dev=alice goes"
        );
        assert_eq!(what_goes(&alice, false), "requests with x-dev=alice go");
        assert_eq!(describe(&every, true), "a copy of every request");
        assert_eq!(describe(&alice, false), "x-dev=alice");
    }
}
