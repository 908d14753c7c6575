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
) -> anyhow::Result<()> {
    if target.is_none() && !all && holder.is_none() {
        anyhow::bail!(
            "say which intercept to end: `devloop leave SERVICE`, `--holder ID` or `--all`"
        );
    }
    let project = super::load_project(global).ok();
    super::backend(global, project.as_ref())
        .leave(crate::intercept::Leave {
            target: target.as_deref(),
            all,
            holder,
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
