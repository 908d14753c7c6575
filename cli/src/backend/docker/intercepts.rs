//! `intercept list` and `leave` on Docker: the intercepts this machine's records and the
//! engine's agent containers know of, and their restore (from the agent's labels when the
//! record is gone).

use bollard::Docker;
use std::time::Instant;

use super::intercept::{self as di, Record};
use crate::backend::docker;
use crate::ownership;
use crate::ui::{ago, human_ms};

/// One line per intercept, and per agent container with no record.
pub async fn list(docker: &Docker) -> anyhow::Result<Vec<String>> {
    let docker = docker.clone();
    let agents = di::agents(&docker).await?;
    let records = di::load_records();
    if agents.is_empty() && records.is_empty() {
        return Ok(Vec::new());
    }
    let mut lines = Vec::new();
    let mut seen = Vec::new();
    for r in &records {
        let agent = agents
            .iter()
            .find(|a| docker::label(a, di::INTERCEPT_OF) == Some(r.original_id.as_str()));
        let alive =
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(r.cli_pid as i32), None).is_ok();
        let state = match (agent.map(docker::is_running), alive) {
            (Some(true), true) => format!("active, held by pid {}", r.cli_pid),
            (Some(true), false) => {
                "ORPHANED: its cli is gone; `devloop leave` restores the original".to_string()
            }
            _ => {
                "BROKEN: the agent is missing and the original stopped; `devloop leave` restores it"
                    .to_string()
            }
        };
        let ports: Vec<String> = r.ports.iter().map(|(a, b)| format!("{a}->{b}")).collect();
        // The agent's command says how connections travel (`--handoff`: handed over).
        let path = match agent.and_then(|a| a.command.as_deref()) {
            Some(c) if c.contains("--handoff") => " (handed over)",
            Some(_) => " (tunnelled)",
            None => "",
        };
        lines.push(format!(
            "{}  ({})  ports {}{path}  since {}  {state}",
            r.service,
            r.original_name,
            ports.join(","),
            ago(r.started_ms)
        ));
        seen.push(r.original_id.clone());
    }
    for a in agents.iter().filter(|a| {
        !seen
            .iter()
            .any(|s| Some(s.as_str()) == docker::label(a, di::INTERCEPT_OF))
    }) {
        lines.push(format!(
            "{}  ({})  ORPHANED: no restore record on this machine; `devloop leave {}` restores it from the agent's labels",
            docker::label(a, crate::labels::SERVICE).unwrap_or("?"),
            docker::label(a, di::INTERCEPT_OF_NAME).unwrap_or("?"),
            docker::label(a, crate::labels::SERVICE).unwrap_or("?")
        ));
    }
    Ok(lines)
}

/// Ends `target`'s intercept (or all of them); `here` is the current folder's project.
/// `routed`: filtered intercepts were ended already (then finding no replace one is fine).
pub async fn leave(
    docker: &Docker,
    target: Option<&str>,
    all: bool,
    here: Option<&str>,
    routed: bool,
) -> anyhow::Result<()> {
    let docker = docker.clone();
    let mut records = di::load_records();
    // Intercepts known only from an agent container's labels (another machine's, or a lost
    // state folder) are restored from those labels.
    for a in di::agents(&docker).await? {
        let (Some(id), Some(name)) = (
            docker::label(&a, di::INTERCEPT_OF),
            docker::label(&a, di::INTERCEPT_OF_NAME),
        ) else {
            continue;
        };
        if !records.iter().any(|r| r.original_id == id) {
            records.push(Record {
                original_id: id.to_string(),
                original_name: name.to_string(),
                service: docker::label(&a, crate::labels::SERVICE)
                    .unwrap_or(name)
                    .to_string(),
                project: docker::label(&a, crate::labels::PROJECT)
                    .unwrap_or_default()
                    .to_string(),
                agent_container: docker::name_of(&a),
                ports: Vec::new(),
                started_ms: 0,
                cli_pid: 0,
            });
        }
    }
    let chosen: Vec<Record> = match (target, all) {
        (_, true) => records,
        (Some(t), false) => {
            let named: Vec<Record> = records
                .into_iter()
                .filter(|r| r.service == t || r.original_name == t)
                .collect();
            // Several projects' `api`: the current folder's project is meant.
            let here = here.map(String::from);
            match here {
                Some(h) if named.len() > 1 && named.iter().any(|r| r.project == h) => {
                    named.into_iter().filter(|r| r.project == h).collect()
                }
                _ if named.len() > 1 => anyhow::bail!(
                    "`{t}` names several intercepts ({}); name the container instead",
                    named
                        .iter()
                        .map(|r| r.original_name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                _ => named,
            }
        }
        (None, false) => {
            anyhow::bail!("say which intercept to end (`devloop leave SERVICE`), or --all")
        }
    };
    if chosen.is_empty() {
        if routed {
            return Ok(());
        }
        match target {
            Some(t) if !all => {
                anyhow::bail!("`{t}` is not intercepted (`devloop intercept list` shows what is)")
            }
            _ => {
                println!("no active intercepts");
                return Ok(());
            }
        }
    }
    for r in chosen {
        let t = Instant::now();
        di::restore(&docker, &r).await?;
        ownership::clear(&di::owner_key(&r.original_name));
        println!(
            "{} restored ({}) in {}",
            r.service,
            r.original_name,
            human_ms(t.elapsed().as_millis() as u64)
        );
    }
    Ok(())
}
