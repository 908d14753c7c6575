//! `k8s-sync`: on a real cluster, one small file saved on the laptop -> readable in the dev
//! pod, with `devloop up` (dev mode, the sync over a port-forward) against `kubectl cp` of
//! the same file into the same pod, interleaved in the same run. The reader is the latency
//! scenario's observer, running in the pod as the service: it polls the file and prints
//! when a new token appears, with the node's clock (this machine's); its output reaches the
//! bench through devloop's log stream.

use anyhow::{bail, Context, Result};
use std::process::Command;
use std::time::Duration;

use crate::harness::{fmt_ms, median, now_ns, pct, row, run_ok, summary, Ctx, Project, Row};
use crate::k8s_intercept::{kubeconfig, kubectl, kubectl_cmd, Namespace};
use crate::scenarios::{in_sync, OBSERVER};

pub fn k8s_sync(ctx: &Ctx) -> Result<(Vec<Row>, serde_json::Value)> {
    let rounds = if ctx.quick { 10 } else { 30 };
    let Some(kubeconfig) = kubeconfig() else {
        bail!(
            "no cluster: set KUBECONFIG, or start this machine's with ../shared/k8s/cluster.sh up"
        );
    };
    kubectl(&["get", "--raw", "/readyz"]).context("the cluster does not answer")?;
    let ns = Namespace(format!("bench{}-sync", ctx.pid));
    kubectl(&["create", "namespace", &ns.0])?;

    // The observer's image: the example's Python base, in the cluster's registry.
    let image = "127.0.0.1:5000/devloop-bench-python:3.11";
    run_ok(Command::new("docker").args(["tag", "python:3.11-slim-bookworm", image]))?;
    run_ok(Command::new("docker").args(["push", image]))?;
    let nap = std::env::var("DEVLOOP_BENCH_OBSERVER_NAP_US").unwrap_or_else(|_| "100".into());
    let deployment = serde_json::json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "obs"},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": "obs"}},
            "template": {
                "metadata": {"labels": {"app": "obs"}},
                "spec": {
                    "terminationGracePeriodSeconds": 1,
                    "containers": [{"name": "obs", "image": image, "workingDir": "/",
                        "command": ["python3", "-u", "-c", OBSERVER, nap]}],
                },
            },
        },
    });
    let file = ctx.tmp.path().join("k8s-sync-obs.json");
    std::fs::write(&file, serde_json::to_vec(&deployment)?)?;
    kubectl(&[
        "-n",
        &ns.0,
        "apply",
        "-f",
        file.to_str().context("utf-8 path")?,
    ])?;
    kubectl(&[
        "-n",
        &ns.0,
        "rollout",
        "status",
        "deployment/obs",
        "--timeout=180s",
    ])?;

    let p = Project::new(
        ctx,
        "k8s-sync",
        &format!("[services.obs]\nimage = \"{image}\"\nsync = {{ from = \"app\", to = \"/app\" }}\n\n[target]\nkind = \"kubernetes\"\nnamespace = \"{}\"\n", ns.0),
    )?;
    std::fs::create_dir_all(p.dir.join("app"))?;
    std::fs::write(p.dir.join("app/readme.txt"), "latency probe\n")?;
    let mut up = {
        let mut c = p.cmd(ctx, &["up"]);
        c.env("KUBECONFIG", &kubeconfig);
        crate::harness::Proc::spawn(c, ctx.tmp.path().join("k8s-sync-up.log"))?
    };
    up.wait_line(0, Duration::from_secs(240), in_sync)?;
    up.wait_line(0, Duration::from_secs(30), |l| l.contains("observer ready"))?;
    // The dev pod (the original may still be terminating).
    let pod = kubectl(&[
        "-n",
        &ns.0,
        "get",
        "pods",
        "-l",
        "app=obs,devloop.dev/dev-session",
        "--field-selector=status.phase=Running",
        "-o",
        "jsonpath={.items[0].metadata.name}",
    ])?;
    let laptop_file = p.dir.join("app/probe.txt");
    let cp_dir = ctx.tmp.path().join("k8s-sync-cp");
    std::fs::create_dir_all(&cp_dir)?;
    let cp_file = cp_dir.join("probe.txt");
    let pad = "x".repeat(180);
    let target = format!("{}/{pod}:/app/probe.txt", ns.0);

    let mut measure = |kind: char, round: usize| -> Result<f64> {
        let token = format!("T{round:04}{kind}");
        let content = format!("{token} {pad}\n");
        let from = up.len();
        let start_ns = if kind == 'd' {
            let t = now_ns();
            std::fs::write(&laptop_file, &content)?;
            t
        } else {
            std::fs::write(&cp_file, &content)?;
            let t = now_ns();
            let mut c = kubectl_cmd();
            c.args(["cp", "-c", "obs", &cp_file.to_string_lossy(), &target]);
            run_ok(&mut c)?;
            t
        };
        let needle = format!(" {token}");
        let (_, _, line) = up.wait_line(from, Duration::from_secs(10), |l| {
            l.contains("SEEN ") && l.ends_with(&needle)
        })?;
        let seen: i128 = line
            .split_whitespace()
            .rev()
            .nth(1)
            .and_then(|v| v.parse().ok())
            .context("parsing the observer's line")?;
        std::thread::sleep(Duration::from_millis(30));
        Ok((seen - start_ns) as f64 / 1e6)
    };
    // Warm-ups: the first write creates the file; the first kubectl cp warms its caches.
    measure('d', 9999)?;
    measure('c', 9998)?;
    let (mut dl, mut cp) = (Vec::new(), Vec::new());
    for r in 0..rounds {
        if r % 2 == 0 {
            dl.push(measure('d', r)?);
            cp.push(measure('c', r)?);
        } else {
            cp.push(measure('c', r)?);
            dl.push(measure('d', r)?);
        }
    }
    up.interrupt();
    let down = {
        let mut c = p.cmd(ctx, &["down"]);
        c.env("KUBECONFIG", &kubeconfig);
        c.output()?
    };
    if !down.status.success() {
        bail!("devloop down: {}", String::from_utf8_lossy(&down.stderr));
    }
    let (m_d, m_c) = (median(&dl), median(&cp));
    let ratio = m_c / m_d;
    let rows = vec![
        row(
            "k8s-sync",
            format!(
                "devloop save -> readable in the dev pod (median of {rounds}, p90 {})",
                fmt_ms(pct(&dl, 90.0))
            ),
            fmt_ms(m_d),
            "<= 10 ms",
            Some(m_d <= 10.0),
        ),
        row(
            "k8s-sync",
            format!(
                "kubectl cp per change (median, p90 {})",
                fmt_ms(pct(&cp, 90.0))
            ),
            fmt_ms(m_c),
            "",
            None,
        ),
        row(
            "k8s-sync",
            "kubectl cp / devloop",
            format!("{ratio:.1}x"),
            ">= 10x",
            Some(ratio >= 10.0),
        ),
    ];
    Ok((
        rows,
        serde_json::json!({
            "rounds": rounds,
            "devloop_ms": summary(&dl),
            "kubectl_cp_ms": summary(&cp),
            "ratio": ratio,
        }),
    ))
}
