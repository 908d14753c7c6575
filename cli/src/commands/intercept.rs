//! `devloop intercept`, `intercept list` and `leave`: a service's traffic to a process on the
//! laptop, for as long as `intercept` runs; the original back, exactly, when it ends. A
//! replace intercept's lifecycle is [`crate::intercept::hold`], a filtered one's (or a
//! mirror's) [`crate::intercept::shared::hold_shared`], each the same on every back end;
//! the back end gives the swap or the router and knows its intercepts.

use devloop_proxy::route::{Filter, HeaderMatch, PathMatch};

use crate::intercept::hold;
use crate::intercept::shared::hold_shared;
pub use crate::intercept::InterceptOptions;

/// The filter flags of `intercept`, as given.
#[derive(Debug, Default)]
pub struct FilterArgs {
    pub headers: Vec<String>,
    pub path: Option<String>,
    pub path_prefix: Option<String>,
    pub path_regex: Option<String>,
    pub method: Option<String>,
    pub key: Option<String>,
}

impl FilterArgs {
    /// The filter the flags name (`None`: no flag, the whole service). A filter that cannot
    /// work (a bad regex, a header without a value) is refused here, before anything changes.
    pub fn build(self) -> anyhow::Result<Option<Filter>> {
        let mut filter = Filter::default();
        for h in &self.headers {
            filter
                .headers
                .push(HeaderMatch::parse(h).map_err(|e| anyhow::anyhow!("--header {e}"))?);
        }
        if let Some(key) = &self.key {
            filter
                .headers
                .push(HeaderMatch::session_key(key).map_err(|e| anyhow::anyhow!("--key {e}"))?);
        }
        filter.path = match (self.path, self.path_prefix, self.path_regex) {
            (Some(p), _, _) => Some(PathMatch::Exact(p)),
            (_, Some(p), _) => Some(PathMatch::Prefix(p)),
            (_, _, Some(p)) => Some(PathMatch::Regex(p)),
            _ => None,
        };
        filter.method = self.method;
        if filter == Filter::default() {
            return Ok(None);
        }
        filter
            .compile()
            .map_err(|e| anyhow::anyhow!("{e}; nothing was changed"))?;
        Ok(Some(filter))
    }
}

pub async fn intercept(global: &super::Global, opts: InterceptOptions) -> anyhow::Result<()> {
    devloop_proxy::tunnel::raise_open_files_limit();
    if opts.ports.is_empty() {
        anyhow::bail!("say which port to intercept: --port REMOTE:LOCAL (REMOTE is the port the service listens on in its container)");
    }
    let project = super::load_project(global).ok();
    let backend = super::backend(global, project.as_ref());
    if opts.is_shared() {
        if !opts.expose.is_empty() {
            anyhow::bail!("--expose is not available with a filter or --mirror yet: the original keeps its place on the service's networks; nothing was changed");
        }
        let filter = opts.filter.clone().unwrap_or_default();
        let router = backend.router(&opts, project.as_ref()).await?;
        return hold_shared(router.as_ref(), &opts, filter, crate::signals::shutdown()).await;
    }
    let swap = backend.swap(&opts, project.as_ref()).await?;
    hold(swap.as_ref(), &opts, crate::signals::shutdown()).await
}

/// The key a session's requests carry when devloop.toml names none: NAME-USER, made of the
/// characters a key may hold.
pub fn default_session_key(name: &str) -> String {
    let user = crate::ownership::user_name();
    format!("{name}-{user}")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-._~".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect()
}

/// `devloop intercept --session NAME`: every service of `[sessions.NAME]`, filtered by the
/// session's key, in this one process. All are checked and found before any is held; one
/// that fails to hold ends those already held; Ctrl-C, or any of them ending, ends them all.
pub async fn session(global: &super::Global, name: &str, quiet: bool) -> anyhow::Result<()> {
    devloop_proxy::tunnel::raise_open_files_limit();
    let project = super::load_project(global)?;
    let Some(section) = project.sessions.get(name) else {
        let known: Vec<&str> = project.sessions.keys().map(String::as_str).collect();
        anyhow::bail!(
            "devloop.toml has no [sessions.{name}]{}",
            if known.is_empty() {
                String::new()
            } else {
                format!(" (it has: {})", known.join(", "))
            }
        );
    };
    if section.services.is_empty() {
        anyhow::bail!("[sessions.{name}] lists no services");
    }
    let key = section
        .key
        .clone()
        .unwrap_or_else(|| default_session_key(name));
    let mut plans = Vec::new();
    for s in &section.services {
        let what = format!("[sessions.{name}] service {}", s.service);
        let ports = s
            .ports
            .iter()
            .map(|p| crate::intercept::parse_port(p))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| anyhow::anyhow!("{what}: {e}"))?;
        if ports.is_empty() {
            anyhow::bail!("{what}: say which port to intercept: ports = [\"REMOTE:LOCAL\"]");
        }
        let filter = FilterArgs {
            headers: s.headers.clone(),
            path_prefix: s.path_prefix.clone(),
            method: s.method.clone(),
            key: Some(key.clone()),
            ..FilterArgs::default()
        }
        .build()
        .map_err(|e| anyhow::anyhow!("{what}: {e:#}"))?
        .unwrap_or_default();
        let command = match &s.command {
            Some(c) => c.to_argv().map_err(|e| anyhow::anyhow!("{what}: {e}"))?,
            None => Vec::new(),
        };
        plans.push(InterceptOptions {
            target: s.service.clone(),
            lease: None,
            ports,
            env_file: None,
            expose: Vec::new(),
            tunnel: false,
            command,
            filter: Some(filter),
            mirror: false,
            key: Some(key.clone()),
            quiet,
            session: Some(name.to_string()),
        });
    }
    let backend = super::backend(global, Some(&project));
    // Every service found before any is held: a typo changes nothing.
    let mut routers = Vec::new();
    for opts in &plans {
        let router = backend
            .router(opts, Some(&project))
            .await
            .map_err(|e| e.context(format!("session {name}: {}", opts.target)))?;
        routers.push(router);
    }
    eprintln!(
        "devloop: session {name}: {} services, requests with `baggage: devloop-session={key}`",
        plans.len()
    );
    let all = crate::signals::shutdown().child_token();
    let holds = routers.iter().zip(&plans).map(|(router, opts)| {
        let all = all.clone();
        async move {
            let filter = opts.filter.clone().unwrap_or_default();
            let held = hold_shared(router.as_ref(), opts, filter, all.clone()).await;
            // One ends, all end: a session is one unit.
            all.cancel();
            held.map_err(|e| e.context(format!("session {name}: {}", opts.target)))
        }
    });
    let results = futures_util::future::join_all(holds).await;
    results.into_iter().collect::<anyhow::Result<Vec<()>>>()?;
    eprintln!("devloop: session {name} ended");
    Ok(())
}

pub async fn list(global: &super::Global, json: bool) -> anyhow::Result<()> {
    let project = super::load_project(global).ok();
    let backend = super::backend(global, project.as_ref());
    let listing = backend.intercepts().await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&listing)?);
        return Ok(());
    }
    if listing.is_empty() {
        let place = backend.words().place;
        if place.is_empty() {
            println!("no active intercepts");
        } else {
            println!("no active intercepts {place}");
        }
    }
    for item in listing {
        println!("{}", item.line);
        for h in &item.holders {
            println!("  {}", crate::intercept::shared::holder_line(&h.info));
        }
    }
    Ok(())
}

pub async fn leave(
    global: &super::Global,
    target: Option<String>,
    all: bool,
    holder: Option<u64>,
    session: Option<String>,
) -> anyhow::Result<()> {
    if target.is_none() && !all && holder.is_none() && session.is_none() {
        anyhow::bail!(
            "say which intercept to end: `devloop leave SERVICE`, `--holder ID`, `--session NAME` or `--all`"
        );
    }
    let project = super::load_project(global).ok();
    super::backend(global, project.as_ref())
        .leave(crate::intercept::Leave {
            target: target.as_deref(),
            all,
            holder,
            session: session.as_deref(),
            project: project.as_ref().map(|p| p.name.as_str()),
        })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_flags_build_one_filter_or_none() {
        assert_eq!(FilterArgs::default().build().unwrap(), None);
        let f = FilterArgs {
            headers: vec!["X-Dev=alice".into()],
            path_prefix: Some("/v2/".into()),
            method: Some("POST".into()),
            key: Some("k1".into()),
            ..FilterArgs::default()
        }
        .build()
        .unwrap()
        .unwrap();
        assert_eq!(f.headers.len(), 2);
        assert_eq!(f.headers[0].name, "x-dev");
        assert_eq!(f.path, Some(PathMatch::Prefix("/v2/".into())));
        assert_eq!(f.method.as_deref(), Some("POST"));
    }

    #[test]
    fn a_filter_that_cannot_work_is_refused_before_anything_changes() {
        let bad_regex = FilterArgs {
            path_regex: Some("/v[".into()),
            ..FilterArgs::default()
        }
        .build()
        .unwrap_err()
        .to_string();
        assert!(bad_regex.contains("nothing was changed"), "{bad_regex}");
        assert!(FilterArgs {
            headers: vec!["x-dev".into()],
            ..FilterArgs::default()
        }
        .build()
        .is_err());
        assert!(FilterArgs {
            key: Some("a b".into()),
            ..FilterArgs::default()
        }
        .build()
        .is_err());
        assert!(FilterArgs {
            method: Some("get".into()),
            ..FilterArgs::default()
        }
        .build()
        .is_err());
    }
}
