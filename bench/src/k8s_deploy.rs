//! `k8s-deploy`: on a real cluster, a one-file change -> a new pod serving it, with
//! `devloop deploy` (snapshot pushed to the cluster's registry, the Deployment rolled out)
//! against `docker build` (classic builder, warm cache) + `docker push` + `kubectl set image`
//! of the same Dockerfile to an identical Deployment, in the same run, interleaved. Both are
//! observed on the same path: a caller pod polling its Service's ClusterIP until the new
//! version answers. Also the image part alone (devloop's snapshot + push against docker
//! build + push) and the rollout's share. Then `devloop watch` on the same service: a save
//! under a restart rule (synced into the watched pod), and under a redeploy rule (the next
//! version rolled out), observed the same way.

use anyhow::{bail, Context, Result};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::deploy::copy_dir;
use crate::harness::{
    fmt_ms, median, ms, now_ns, row, run_ok, summary, Cleanup, Ctx, Proc, Project, Row,
};
use crate::k8s_intercept::{caller, kubeconfig, kubectl, kubectl_cmd, push_loadgen, Namespace};

/// `... snapshot pushed in 85 ms: ...` / `rollout to ready 2.1 s` -> milliseconds.
fn figure_after(text: &str, marker: &str) -> Option<f64> {
    let rest = text.split(marker).nth(1)?;
    let mut words = rest.split_whitespace();
    let n: f64 = words.next()?.trim_end_matches(':').parse().ok()?;
    match words.next()?.trim_end_matches([':', ',', ';']) {
        "ms" => Some(n),
        "s" => Some(n * 1000.0),
        _ => None,
    }
}

pub fn k8s_deploy(ctx: &Ctx, cleanup: &Cleanup) -> Result<(Vec<Row>, serde_json::Value)> {
    let rounds = if ctx.quick { 2 } else { 5 };
    let Some(kubeconfig) = kubeconfig() else {
        bail!(
            "no cluster: set KUBECONFIG, or start this machine's with ../shared/k8s/cluster.sh up"
        );
    };
    kubectl(&["get", "--raw", "/readyz"]).context("the cluster does not answer")?;
    let ns = Namespace(format!("bench{}-deploy", ctx.pid));
    kubectl(&["create", "namespace", &ns.0])?;
    let registry = "127.0.0.1:5000";

    // devloop's project: the example's api and its manifests, on this namespace.
    let p = Project::new(
        ctx,
        "k8s-deploy",
        &format!(
            "[services.api]\nbuild = {{ context = \"api\" }}\nsync = {{ from = \"api\", to = \"/app\" }}\nexclude = [\"__pycache__/\", \"*.pyc\"]\n\n[target]\nkind = \"kubernetes\"\nnamespace = \"{}\"\nmanifests = \"k8s\"\n",
            ns.0
        ),
    )?;
    copy_dir(&ctx.workspace.join("examples/shop/api"), &p.dir.join("api"))?;
    std::fs::create_dir_all(p.dir.join("k8s"))?;
    let manifest = std::fs::read_to_string(ctx.workspace.join("examples/shop/k8s/api.yaml"))?;
    std::fs::write(p.dir.join("k8s/api.yaml"), &manifest)?;
    let devloop = |args: &[&str]| {
        let mut c = p.cmd(ctx, args);
        c.env("KUBECONFIG", &kubeconfig);
        c
    };
    let first = run_ok(&mut devloop(&["deploy", "api"]))
        .context("first devloop deploy (creates api from the manifests)")?;
    eprintln!("    {}", String::from_utf8_lossy(&first.stdout).trim());

    // The alternative: the same manifest as `api-alt`, its image built and pushed by Docker.
    let alt_repo = format!("{registry}/bench{}-deploy-alt", ctx.pid);
    cleanup
        .images
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(alt_repo.clone());
    let alt_dir = ctx.tmp.path().join("k8s-deploy-alt");
    copy_dir(&ctx.workspace.join("examples/shop/api"), &alt_dir)?;
    let warm = format!("{alt_repo}:warm");
    run_ok(
        Command::new("docker")
            .env("DOCKER_BUILDKIT", "0")
            .args(["build", "-q", "-t", &warm])
            .arg(&alt_dir),
    )?;
    run_ok(Command::new("docker").args(["push", &warm]))?;
    let alt_manifest = manifest
        .replace("name: api\n", "name: api-alt\n")
        .replace(
            "app.kubernetes.io/name: api\n",
            "app.kubernetes.io/name: api-alt\n",
        )
        .replace("image: shop-api", &format!("image: {warm}"))
        .replace("- name: api\n", "- name: api-alt\n");
    let alt_file = ctx.tmp.path().join("k8s-deploy-alt.yaml");
    std::fs::write(&alt_file, &alt_manifest)?;
    kubectl(&[
        "-n",
        &ns.0,
        "apply",
        "-f",
        alt_file.to_str().context("utf-8 path")?,
    ])?;

    // The caller: a loadgen pod polling a Service's ClusterIP (not its name: this cluster's
    // DNS fails a lookup now and then).
    let image = push_loadgen(ctx, &ns.0, &kubeconfig)?;
    let caller_file = ctx.tmp.path().join("k8s-deploy-caller.json");
    std::fs::write(&caller_file, serde_json::to_vec(&caller(&image))?)?;
    kubectl(&[
        "-n",
        &ns.0,
        "apply",
        "-f",
        caller_file.to_str().context("utf-8 path")?,
    ])?;
    for d in ["api", "api-alt", "caller"] {
        kubectl(&[
            "-n",
            &ns.0,
            "rollout",
            "status",
            &format!("deployment/{d}"),
            "--timeout=180s",
        ])?;
    }
    let caller_pod = kubectl(&[
        "-n",
        &ns.0,
        "get",
        "pods",
        "-l",
        "app=caller",
        "-o",
        "jsonpath={.items[0].metadata.name}",
    ])?;
    let ip = |svc: &str| {
        kubectl(&[
            "-n",
            &ns.0,
            "get",
            "service",
            svc,
            "-o",
            "jsonpath={.spec.clusterIP}",
        ])
        .map(|ip| format!("{ip}:8000"))
    };
    let (svc, alt_svc) = (ip("api")?, ip("api-alt")?);
    let waiter = |addr: &str, text: &str| -> Result<Proc> {
        let mut c = kubectl_cmd();
        c.args([
            "-n",
            &ns.0,
            "exec",
            &caller_pod,
            "--",
            "/loadgen",
            "wait-for",
            addr,
            text,
            "120000",
        ]);
        let mut w = Proc::spawn(
            c,
            ctx.tmp
                .path()
                .join(format!("k8s-deploy-waiter-{}.log", now_ns())),
        )?;
        w.wait_line(0, Duration::from_secs(30), |l| l == "ready")?;
        Ok(w)
    };
    let seen = |w: &mut Proc| crate::intercept::seen_ns(w, Duration::from_secs(130));

    let original = std::fs::read_to_string(p.dir.join("api/app.py"))?;
    let with_version = |v: &str| original.replace("VERSION = \"1\"", &format!("VERSION = \"{v}\""));
    if with_version("x") == original {
        bail!("examples/shop/api/app.py has no `VERSION = \"1\"` line to edit");
    }
    let (mut dl, mut dl_image, mut dl_rollout, mut dl_cmd) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut alt, mut alt_image, mut alt_build) = (Vec::new(), Vec::new(), Vec::new());
    for r in 0..rounds {
        let devloop_round = |dl: &mut Vec<f64>,
                             dl_image: &mut Vec<f64>,
                             dl_rollout: &mut Vec<f64>,
                             dl_cmd: &mut Vec<f64>|
         -> Result<()> {
            // Unique per run: a version seen before would be a reused snapshot and a cached
            // docker build, and measure nothing.
            let v = format!("d{r}-{}", ctx.pid);
            std::fs::write(p.dir.join("api/app.py"), with_version(&v))?;
            let mut w = waiter(&svc, &format!("\"version\": \"{v}\""))?;
            let t0 = now_ns();
            let started = Instant::now();
            let out = devloop(&["deploy", "api"]).output()?;
            dl_cmd.push(ms(started.elapsed()));
            let text = String::from_utf8_lossy(&out.stdout).to_string()
                + &String::from_utf8_lossy(&out.stderr);
            if !out.status.success() {
                bail!("devloop deploy failed: {text}");
            }
            dl.push((seen(&mut w)? - t0) as f64 / 1e6);
            dl_image.push(
                figure_after(&text, "snapshot pushed in ")
                    .with_context(|| format!("no push time in `{text}`"))?,
            );
            dl_rollout.push(
                figure_after(&text, "rollout to ready ")
                    .with_context(|| format!("no rollout time in `{text}`"))?,
            );
            eprintln!("    {}", text.trim());
            Ok(())
        };
        let alt_round = |alt: &mut Vec<f64>,
                         alt_image: &mut Vec<f64>,
                         alt_build: &mut Vec<f64>|
         -> Result<()> {
            let v = format!("a{r}-{}", ctx.pid);
            std::fs::write(alt_dir.join("app.py"), with_version(&v))?;
            let mut w = waiter(&alt_svc, &format!("\"version\": \"{v}\""))?;
            let image = format!("{alt_repo}:{v}");
            let t0 = now_ns();
            let started = Instant::now();
            run_ok(
                Command::new("docker")
                    .env("DOCKER_BUILDKIT", "0")
                    .args(["build", "-q", "-t", &image])
                    .arg(&alt_dir),
            )?;
            alt_build.push(ms(started.elapsed()));
            run_ok(Command::new("docker").args(["push", &image]))?;
            alt_image.push(ms(started.elapsed()));
            kubectl(&[
                "-n",
                &ns.0,
                "set",
                "image",
                "deployment/api-alt",
                &format!("api-alt={image}"),
            ])?;
            alt.push((seen(&mut w)? - t0) as f64 / 1e6);
            kubectl(&[
                "-n",
                &ns.0,
                "rollout",
                "status",
                "deployment/api-alt",
                "--timeout=120s",
            ])?;
            Ok(())
        };
        if r % 2 == 0 {
            devloop_round(&mut dl, &mut dl_image, &mut dl_rollout, &mut dl_cmd)?;
            alt_round(&mut alt, &mut alt_image, &mut alt_build)?;
        } else {
            alt_round(&mut alt, &mut alt_image, &mut alt_build)?;
            devloop_round(&mut dl, &mut dl_image, &mut dl_rollout, &mut dl_cmd)?;
        }
        eprintln!(
            "  k8s-deploy round {r}: devloop serving {} (image {}, command {}), docker build + push + set image serving {} (image {})",
            fmt_ms(dl[r]),
            fmt_ms(dl_image[r]),
            fmt_ms(dl_cmd[r]),
            fmt_ms(alt[r]),
            fmt_ms(alt_image[r])
        );
    }

    // `watch`: the same service, watched. Phase 1 with `**/*.py` -> restart: the save is
    // synced into the watched pod and the process restarted in place. Phase 2 with
    // `**/*.py` -> redeploy: the save becomes a snapshot rolled out as the next watched
    // version. Both observed like the deploys: the caller polling the Service.
    let toml = std::fs::read_to_string(p.dir.join("devloop.toml"))?;
    let with_rule = |action: &str| {
        toml.replace(
            "exclude = [",
            &format!(
                "on_change = [{{ paths = [\"**/*.py\"], action = \"{action}\" }}]\nexclude = ["
            ),
        )
    };
    let watch_phase = |action: &str, tag: &str| -> Result<(Vec<f64>, Vec<f64>)> {
        std::fs::write(p.dir.join("devloop.toml"), with_rule(action))?;
        let mut watch = Proc::spawn(
            devloop(&["watch", "api"]),
            ctx.tmp
                .path()
                .join(format!("k8s-deploy-watch-{action}.log")),
        )?;
        watch.wait_line(0, Duration::from_secs(240), |l| l.contains("in sync"))?;
        let (mut serving, mut rollout) = (Vec::new(), Vec::new());
        for r in 0..rounds {
            let v = format!("{tag}{r}-{}", ctx.pid);
            let mut w = waiter(&svc, &format!("\"version\": \"{v}\""))?;
            let from = watch.len();
            let t0 = now_ns();
            std::fs::write(p.dir.join("api/app.py"), with_version(&v))?;
            serving.push((seen(&mut w)? - t0) as f64 / 1e6);
            if action == "redeploy" {
                let (_, _, line) = watch.wait_line(from, Duration::from_secs(120), |l| {
                    l.contains("deployed ") || l.contains("redeploy failed")
                })?;
                rollout.push(
                    figure_after(&line, "rollout to ready ")
                        .with_context(|| format!("no rollout time in `{line}`"))?,
                );
            }
            eprintln!(
                "  k8s-deploy watch ({action}) round {r}: serving {}",
                fmt_ms(serving[r])
            );
        }
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(watch.child.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        );
        let _ = watch.child.wait();
        Ok((serving, rollout))
    };
    let (w_restart, _) = watch_phase("restart", "r")?;
    let (w_redeploy, w_rollout) = watch_phase("redeploy", "p")?;
    std::fs::write(p.dir.join("devloop.toml"), &toml)?;

    let (m_dl, m_alt) = (median(&dl), median(&alt));
    let (m_img, m_alt_img) = (median(&dl_image), median(&alt_image));
    let img_ratio = m_alt_img / m_img;
    let m_cmd = median(&dl_cmd);
    let share = median(&dl_rollout) / m_cmd * 100.0;
    let rows = vec![
        row(
            "k8s-deploy",
            "one-file change -> new pod serving, devloop deploy (median)",
            fmt_ms(m_dl),
            "<= 3000 ms",
            Some(m_dl <= 3000.0),
        ),
        row(
            "k8s-deploy",
            "same, docker build + push + kubectl set image",
            fmt_ms(m_alt),
            "slower",
            Some(m_alt > m_dl),
        ),
        row(
            "k8s-deploy",
            "image part: devloop snapshot + push / docker build + push",
            format!("{} / {}", fmt_ms(m_img), fmt_ms(m_alt_img)),
            "",
            None,
        ),
        row(
            "k8s-deploy",
            "image part, docker build + push / devloop",
            format!("{img_ratio:.1}x"),
            ">= 3x",
            Some(img_ratio >= 3.0),
        ),
        row(
            "k8s-deploy",
            "devloop deploy command, whole / its rollout to ready (share)",
            format!(
                "{} / {} ({share:.0}%)",
                fmt_ms(m_cmd),
                fmt_ms(median(&dl_rollout))
            ),
            "",
            None,
        ),
        row(
            "k8s-deploy",
            "watch, restart rule: save -> served by the watched pod (median)",
            fmt_ms(median(&w_restart)),
            "",
            None,
        ),
        row(
            "k8s-deploy",
            "watch, redeploy rule: save -> next version serving (median; its rollout to ready)",
            format!(
                "{} ({})",
                fmt_ms(median(&w_redeploy)),
                fmt_ms(median(&w_rollout))
            ),
            "",
            None,
        ),
        row(
            "k8s-deploy",
            "docker build + push + set image / watch's redeploy",
            format!("{:.1}x", m_alt / median(&w_redeploy)),
            "",
            None,
        ),
    ];
    Ok((
        rows,
        serde_json::json!({
            "rounds": rounds,
            "devloop_serving_ms": summary(&dl),
            "devloop_image_ms": summary(&dl_image),
            "devloop_rollout_ready_ms": summary(&dl_rollout),
            "devloop_command_ms": summary(&dl_cmd),
            "docker_serving_ms": summary(&alt),
            "docker_build_and_push_ms": summary(&alt_image),
            "docker_build_ms": summary(&alt_build),
            "image_ratio": img_ratio,
            "rollout_share_pct": share,
            "watch_restart_serving_ms": summary(&w_restart),
            "watch_redeploy_serving_ms": summary(&w_redeploy),
            "watch_redeploy_rollout_ready_ms": summary(&w_rollout),
        }),
    ))
}

#[cfg(test)]
mod tests {
    #[test]
    fn figures_are_read_from_the_deploy_line() {
        let line = "api  | deployed r/devloop-p-api:0a in 2.4 s (snapshot pushed in 85 ms: 2 blobs, 3.1 KiB, 5 already there, 3 paths; rollout to ready 2.1 s = 88% of it, revision 2)";
        assert_eq!(super::figure_after(line, "snapshot pushed in "), Some(85.0));
        assert_eq!(super::figure_after(line, "rollout to ready "), Some(2100.0));
        assert_eq!(super::figure_after(line, "nothing "), None);
    }
}
