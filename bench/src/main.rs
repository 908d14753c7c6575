//! devloop's benchmarks: each scenario compares devloop side by side, in one run, with the
//! tool a user would otherwise reach for (docker cp, rsync over docker exec, cp -r, docker
//! restart), on the same path, with interleaved rounds. Prints a table and writes
//! bench/results/latest.json. See bench/README.md.
#![forbid(unsafe_code)]

mod cpu;
mod deploy;
mod filtered;
mod harness;
mod intercept;
mod k8s_deploy;
mod k8s_intercept;
mod k8s_sync;
mod scenarios;

use anyhow::{bail, Result};
use harness::{Cleanup, Ctx, Row};
use std::time::Instant;

const SCENARIOS: [&str; 11] = [
    "latency",
    "burst",
    "initial",
    "restart",
    "index100k",
    "deploy",
    "intercept",
    "filtered",
    "k8s-intercept",
    "k8s-deploy",
    "k8s-sync",
];

struct Args {
    quick: bool,
    scenarios: Vec<String>,
}

fn parse_args() -> Result<Args> {
    let mut quick = false;
    let mut scenarios = Vec::new();
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quick" => quick = true,
            "--scenario" => match it.next() {
                Some(s) if SCENARIOS.contains(&s.as_str()) => scenarios.push(s),
                Some(s) => bail!("unknown scenario `{s}`; one of: {}", SCENARIOS.join(", ")),
                None => bail!("--scenario needs a name: one of {}", SCENARIOS.join(", ")),
            },
            "-h" | "--help" => {
                println!(
                    "usage: devloop-bench [--quick] [--scenario NAME]...\n  scenarios: {}",
                    SCENARIOS.join(", ")
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument `{other}` (try --help)"),
        }
    }
    if scenarios.is_empty() {
        scenarios = SCENARIOS.iter().map(|s| s.to_string()).collect();
    }
    Ok(Args { quick, scenarios })
}

fn main() -> std::process::ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("devloop-bench: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    match run(args) {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::from(1),
        Err(e) => {
            eprintln!("devloop-bench: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Ok(true) when every scenario ran (targets may still fail: that is a result, not an error).
fn run(args: Args) -> Result<bool> {
    let ctx = Ctx::new(args.quick)?;
    let cleanup = Cleanup {
        run: ctx.run.clone(),
        images: Default::default(),
    };
    let started = Instant::now();
    let mut rows: Vec<Row> = Vec::new();
    let mut results = serde_json::Map::new();
    let mut all_ran = true;
    for s in &args.scenarios {
        eprintln!("bench: {s} ...");
        let t = Instant::now();
        let out = match s.as_str() {
            "latency" => scenarios::latency(&ctx),
            "burst" => scenarios::burst(&ctx),
            "initial" => scenarios::initial(&ctx),
            "restart" => scenarios::restart(&ctx, &cleanup),
            "index100k" => scenarios::index100k(&ctx),
            "deploy" => deploy::deploy(&ctx, &cleanup),
            "intercept" => intercept::intercept(&ctx, &cleanup),
            "filtered" => filtered::filtered(&ctx, &cleanup),
            "k8s-intercept" => k8s_intercept::k8s_intercept(&ctx),
            "k8s-deploy" => k8s_deploy::k8s_deploy(&ctx, &cleanup),
            "k8s-sync" => k8s_sync::k8s_sync(&ctx),
            _ => unreachable!("parse_args checks the names"),
        };
        // Between scenarios, so each starts on a quiet engine.
        cleanup.sweep();
        let secs = t.elapsed().as_secs_f64();
        match out {
            Ok((r, json)) => {
                eprintln!("bench: {s} done in {secs:.1} s");
                rows.extend(r);
                results.insert(
                    s.clone(),
                    serde_json::json!({ "ok": true, "seconds": secs, "result": json }),
                );
            }
            Err(e) => {
                eprintln!("bench: {s} FAILED after {secs:.1} s: {e:#}");
                all_ran = false;
                rows.push(harness::row(
                    s,
                    "scenario failed",
                    format!("{e}").lines().next().unwrap_or("").to_string(),
                    "",
                    Some(false),
                ));
                results.insert(
                    s.clone(),
                    serde_json::json!({ "ok": false, "seconds": secs, "error": format!("{e:#}") }),
                );
            }
        }
    }
    let total = started.elapsed().as_secs_f64();
    print_table(&rows, total, ctx.quick);
    let leftovers = cleanup.leftovers();
    if !leftovers.is_empty() {
        eprintln!("bench: warning: left over after cleanup: {leftovers:?}");
    }
    let json = serde_json::json!({
        "quick": ctx.quick,
        "total_seconds": total,
        "machine": machine(),
        "scenarios": results,
        "table": rows.iter().map(|r| serde_json::json!({
            "scenario": r.scenario, "metric": r.metric, "value": r.value, "target": r.target, "pass": r.pass,
        })).collect::<Vec<_>>(),
    });
    let dir = ctx.workspace.join("bench/results");
    std::fs::create_dir_all(&dir)?;
    let tmp = dir.join("latest.json.tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(&json)?)?;
    std::fs::rename(&tmp, dir.join("latest.json"))?;
    eprintln!("bench: wrote {}", dir.join("latest.json").display());
    if std::env::var_os("DEVLOOP_BENCH_KEEP").is_some() {
        let kept = ctx.tmp.keep();
        eprintln!(
            "bench: kept the projects and devloop's logs in {}",
            kept.display()
        );
    }
    Ok(all_ran)
}

fn machine() -> serde_json::Value {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let docker = harness::docker_out(&["version", "--format", "{{.Server.Version}}"]);
    let driver = harness::docker_out(&["info", "--format", "{{.Driver}}"]);
    serde_json::json!({ "cpus": cpus, "docker": docker, "storage_driver": driver })
}

fn print_table(rows: &[Row], total: f64, quick: bool) {
    let w_s = rows
        .iter()
        .map(|r| r.scenario.len())
        .max()
        .unwrap_or(8)
        .max(8);
    let w_m = rows
        .iter()
        .map(|r| r.metric.len())
        .max()
        .unwrap_or(6)
        .max(6);
    let w_v = rows.iter().map(|r| r.value.len()).max().unwrap_or(5).max(5);
    let w_t = rows
        .iter()
        .map(|r| r.target.len())
        .max()
        .unwrap_or(6)
        .max(6);
    println!();
    println!(
        "{:<w_s$}  {:<w_m$}  {:>w_v$}  {:<w_t$}  result",
        "scenario", "metric", "value", "target"
    );
    println!("{}", "-".repeat(w_s + w_m + w_v + w_t + 14));
    for r in rows {
        let verdict = match r.pass {
            Some(true) => "PASS",
            Some(false) => "FAIL",
            None => "",
        };
        println!(
            "{:<w_s$}  {:<w_m$}  {:>w_v$}  {:<w_t$}  {verdict}",
            r.scenario, r.metric, r.value, r.target
        );
    }
    println!(
        "\ntotal {total:.1} s{}",
        if quick { " (--quick)" } else { "" }
    );
}
