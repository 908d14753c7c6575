//! `devloop intercept`, `intercept list` and `leave`: a service's traffic to a process on the
//! laptop, for as long as `intercept` runs; the original back, exactly, when it ends. The
//! lifecycle is [`crate::intercept::hold`], the same on every back end; the back end gives
//! the swap and knows its intercepts.

use crate::intercept::hold;
pub use crate::intercept::InterceptOptions;

pub async fn intercept(global: &super::Global, opts: InterceptOptions) -> anyhow::Result<()> {
    devloop_proxy::tunnel::raise_open_files_limit();
    if opts.ports.is_empty() {
        anyhow::bail!("say which port to intercept: --port REMOTE:LOCAL (REMOTE is the port the service listens on in its container)");
    }
    let project = super::load_project(global).ok();
    let backend = super::backend(global, project.as_ref());
    let swap = backend.swap(&opts, project.as_ref()).await?;
    hold(swap.as_ref(), &opts, crate::signals::shutdown()).await
}

pub async fn list(global: &super::Global) -> anyhow::Result<()> {
    let project = super::load_project(global).ok();
    let backend = super::backend(global, project.as_ref());
    let lines = backend.intercepts().await?;
    if lines.is_empty() {
        let place = backend.words().place;
        if place.is_empty() {
            println!("no active intercepts");
        } else {
            println!("no active intercepts {place}");
        }
    }
    for line in lines {
        println!("{line}");
    }
    Ok(())
}

pub async fn leave(
    global: &super::Global,
    target: Option<String>,
    all: bool,
) -> anyhow::Result<()> {
    let project = super::load_project(global).ok();
    super::backend(global, project.as_ref())
        .leave(
            target.as_deref(),
            all,
            project.as_ref().map(|p| p.name.as_str()),
        )
        .await
}
