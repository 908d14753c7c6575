//! `devloop status`: each service's container, agent, process and sync, told honestly: a
//! service nobody syncs says since when its files may be stale.

use super::{load_project, Global};
use crate::status::ServiceReport;

pub async fn status(global: &Global, json: bool) -> anyhow::Result<()> {
    let project = load_project(global)?;
    let reports = super::backend(global, Some(&project))
        .status(&project)
        .await?;
    print(&project, &reports, json)
}

fn print(
    project: &crate::config::Project,
    reports: &[ServiceReport],
    json: bool,
) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(reports)?);
        return Ok(());
    }
    println!("project {} ({})", project.name, project.dir.display());
    for r in reports {
        println!("{}", r.service);
        if r.intercepted {
            println!(
                "  INTERCEPTED: traffic goes to a laptop process; `devloop leave {}` restores it",
                r.service
            );
        }
        match &r.container {
            Some(c) => println!(
                "  container  {c} ({}), agent {}",
                r.state,
                r.agent_version.as_deref().unwrap_or("?")
            ),
            None => println!("  container  none (start it with `devloop up`)"),
        }
        if let Some(p) = &r.process {
            println!("  process    {p}");
        }
        println!("  sync       {}", r.sync);
        for e in r.errors.iter().take(3) {
            println!("  error      {e}");
        }
    }
    Ok(())
}
