//! `k8s-intercept`: on a real cluster, a caller pod -> the intercepted Service -> the
//! laptop server, against the reverse path through `kubectl port-forward` (the laptop ->
//! the same server in a pod), with the same client and server (devloop-loadgen, pushed to
//! the cluster's registry as a FROM-scratch image) on both, in the same run. Also
//! `intercept` until the first tunnelled request (and the agent rollout's share of it),
//! and `leave` until the original serves again.

use anyhow::{bail, Context, Result};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::cpu::CpuTimes;
use crate::harness::{fmt_ms, median, now_ns, row, summary, Ctx, Proc, Row};

const BULK: u64 = 100 << 20;

pub(crate) fn kubeconfig() -> Option<PathBuf> {
    match std::env::var_os("KUBECONFIG") {
        Some(k) if !k.is_empty() => Some(PathBuf::from(k)),
        _ => Some(PathBuf::from("/var/lib/devloop-k8s/admin.kubeconfig")).filter(|p| p.is_file()),
    }
}

pub(crate) fn kubectl_cmd() -> Command {
    let local = "/var/cache/devloop-k8s/bin/kubectl";
    let mut c = Command::new(if std::path::Path::new(local).is_file() {
        local
    } else {
        "kubectl"
    });
    if let Some(k) = kubeconfig() {
        c.env("KUBECONFIG", k);
    }
    c
}

pub(crate) fn kubectl(args: &[&str]) -> Result<String> {
    let o = kubectl_cmd()
        .args(args)
        .output()
        .context("running kubectl")?;
    if !o.status.success() {
        bail!(
            "kubectl {args:?}: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&o.stdout).trim().to_string())
}

/// Deletes the benchmark's namespace when dropped.
pub(crate) struct Namespace(pub(crate) String);

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = kubectl_cmd()
            .args(["delete", "namespace", &self.0, "--wait=false"])
            .output();
    }
}

fn loadgen_in(ns: &str, pod: &str, args: &[&str]) -> Result<serde_json::Value> {
    let mut full = vec!["-n", ns, "exec", pod, "--", "/loadgen"];
    full.extend_from_slice(args);
    let out = kubectl(&full)?;
    serde_json::from_str(out.lines().last().unwrap_or(""))
        .with_context(|| format!("loadgen printed `{out}`"))
}

fn loadgen_here(bin: &std::path::Path, args: &[&str]) -> Result<serde_json::Value> {
    let o = Command::new(bin).args(args).output()?;
    if !o.status.success() {
        bail!("loadgen {args:?}: {}", String::from_utf8_lossy(&o.stderr));
    }
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    serde_json::from_str(out.lines().last().unwrap_or(""))
        .with_context(|| format!("loadgen printed `{out}`"))
}

pub(crate) fn deployment(name: &str, image: &str, args: &[&str]) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "terminationGracePeriodSeconds": 1,
                    "containers": [{
                        "name": name, "image": image, "args": args,
                        "ports": [{"containerPort": 8000}],
                        "readinessProbe": {"tcpSocket": {"port": 8000}, "periodSeconds": 1},
                    }],
                },
            },
        },
    })
}

/// The loadgen image, pushed to the cluster's registry the way devloop pushes its agent;
/// returns the reference the nodes pull.
pub(crate) fn push_loadgen(ctx: &Ctx, ns: &str, kubeconfig: &std::path::Path) -> Result<String> {
    use devloop::backend::k8s::{registry, Cluster, KubeSettings};
    let lg = crate::intercept::loadgen_bin(ctx)?;
    let binary = std::fs::read(&lg).with_context(|| format!("reading {}", lg.display()))?;
    let settings = KubeSettings {
        context: None,
        namespace: Some(ns.to_string()),
    };
    ctx.rt.block_on(async {
        std::env::set_var("KUBECONFIG", kubeconfig);
        let cluster = Cluster::connect(&settings).await?;
        let reg = registry::discover(&cluster, None)
            .await?
            .context("the cluster advertises no registry")?;
        let layer = devloop::oci::one_file_layer("loadgen", 0o755, &binary)?;
        let config = devloop::oci::image_config(std::slice::from_ref(&layer), &["/loadgen"]);
        let tag = devloop::backend::agent_image_tag(&binary);
        devloop::oci::Pusher::new(&reg.push)?
            .push_image("devloop-loadgen", &tag, &[layer], &config)
            .await?;
        anyhow::Ok(format!("{}/devloop-loadgen:{tag}", reg.pull))
    })
}

/// A caller: a loadgen pod that idles until `kubectl exec` runs it.
pub(crate) fn caller(image: &str) -> serde_json::Value {
    let mut c = deployment("caller", image, &["idle"]);
    c["spec"]["template"]["spec"]["containers"][0]
        .as_object_mut()
        .expect("object")
        .remove("readinessProbe");
    c
}

/// Waits until the Deployment `api` has one pod, ready (the agent's), and no other.
fn wait_single_pod(ns: &str) -> Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let out = kubectl(&["-n", ns, "get", "pods", "-l", "app=api", "-o", "jsonpath={range .items[*]}{.metadata.name} {.status.containerStatuses[0].ready}{\"\\n\"}{end}"])?;
        let pods: Vec<&str> = out.lines().filter(|l| !l.trim().is_empty()).collect();
        if pods.len() == 1 && pods[0].ends_with(" true") {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            bail!("the original api pods did not go away within 60 s: {out}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

pub fn k8s_intercept(ctx: &Ctx) -> Result<(Vec<Row>, serde_json::Value)> {
    let rounds = if ctx.quick { 2 } else { 5 };
    let requests = if ctx.quick { 1000 } else { 3000 };
    let Some(kubeconfig) = kubeconfig() else {
        bail!(
            "no cluster: set KUBECONFIG, or start this machine's with ../shared/k8s/cluster.sh up"
        );
    };
    kubectl(&["get", "--raw", "/readyz"]).context("the cluster does not answer")?;
    let ns = Namespace(format!("bench{}", ctx.pid));
    kubectl(&["create", "namespace", &ns.0])?;

    let lg = crate::intercept::loadgen_bin(ctx)?;
    let image = push_loadgen(ctx, &ns.0, &kubeconfig)?;

    // The service to intercept, a server for the port-forward path, a caller; all loadgen.
    let mut manifests = Vec::new();
    manifests.push(deployment("api", &image, &["serve", "8000", "original"]));
    manifests.push(serde_json::json!({
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "api"},
        "spec": {"selector": {"app": "api"}, "ports": [{"port": 8000, "targetPort": 8000}]},
    }));
    manifests.push(deployment("server", &image, &["serve", "8000", "laptop"]));
    manifests.push(caller(&image));
    let list = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": manifests});
    let file = ctx.tmp.path().join("k8s-bench.json");
    std::fs::write(&file, serde_json::to_vec(&list)?)?;
    kubectl(&[
        "-n",
        &ns.0,
        "apply",
        "-f",
        file.to_str().context("utf-8 path")?,
    ])?;
    for d in ["api", "server", "caller"] {
        kubectl(&[
            "-n",
            &ns.0,
            "rollout",
            "status",
            &format!("deployment/{d}"),
            "--timeout=120s",
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
    // The Service's address, not its name: the same path for callers, without this
    // cluster's DNS (dnsmasq) failing a lookup now and then in the middle of a run.
    let svc = format!(
        "{}:8000",
        kubectl(&[
            "-n",
            &ns.0,
            "get",
            "service",
            "api",
            "-o",
            "jsonpath={.spec.clusterIP}"
        ])?
    );

    // The laptop server, and kubectl port-forward to the same server in a pod.
    let (server, port) = crate::intercept::laptop_server(ctx, &lg, "k8s-laptop-server.log")?;
    let pf_port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut pf = Proc::spawn(
        {
            let mut c = kubectl_cmd();
            c.args([
                "-n",
                &ns.0,
                "port-forward",
                "deployment/server",
                &format!("{pf_port}:8000"),
            ]);
            c
        },
        ctx.tmp.path().join("k8s-port-forward.log"),
    )?;
    pf.wait_line(0, Duration::from_secs(30), |l| {
        l.contains("Forwarding from")
    })?;
    let pf_addr = format!("127.0.0.1:{pf_port}");
    loadgen_here(&lg, &["latency", &pf_addr, "10"])
        .context("the port-forward path does not work")?;

    let devloop = |args: &[&str]| {
        let mut c = Command::new(&ctx.devloop);
        c.arg("-n")
            .arg(&ns.0)
            .args(args)
            .env("KUBECONFIG", &kubeconfig)
            .env("DEVLOOP_AGENT_BIN", &ctx.agent)
            .current_dir(ctx.tmp.path());
        c
    };
    let waiter = |text: &str, tag: &str| -> Result<Proc> {
        let mut c = kubectl_cmd();
        c.args([
            "-n",
            &ns.0,
            "exec",
            &caller_pod,
            "--",
            "/loadgen",
            "wait-for",
            &svc,
            text,
            "60000",
        ]);
        let mut p = Proc::spawn(
            c,
            ctx.tmp
                .path()
                .join(format!("k8s-waiter-{tag}-{}.log", now_ns())),
        )?;
        p.wait_line(0, Duration::from_secs(30), |l| l == "ready")?;
        Ok(p)
    };
    let seen = |p: &mut Proc| crate::intercept::seen_ns(p, Duration::from_secs(70));

    let spec = format!("8000:{port}");
    let (mut t_in, mut t_rollout, mut t_out) = (Vec::new(), Vec::new(), Vec::new());
    let mut pf_upload = Vec::new();
    // CPU by program during each 100 MiB transfer: intercept, port-forward download, upload.
    let mut cpu: [Vec<Vec<(String, f64)>>; 3] = Default::default();
    let (mut p50, mut p99, mut mib) = (
        <[Vec<f64>; 2]>::default(),
        <[Vec<f64>; 2]>::default(),
        <[Vec<f64>; 2]>::default(),
    );
    for r in 0..rounds {
        let mut w = waiter("laptop", "in")?;
        let t0 = now_ns();
        let mut icpt = Proc::spawn(
            devloop(&["intercept", "api", "--port", &spec]),
            ctx.tmp.path().join(format!("k8s-intercept-{r}.log")),
        )?;
        t_in.push((seen(&mut w)? - t0) as f64 / 1e6);
        let (_, _, line) =
            icpt.wait_line(0, Duration::from_secs(60), |l| l.contains("intercepted in"))?;
        // "... (agent pod ready after N ms) ..."
        if let Some(ms) = line
            .split("agent pod ready after ")
            .nth(1)
            .and_then(|s| s.split(' ').next())
            .and_then(|s| s.parse::<f64>().ok())
        {
            t_rollout.push(ms);
        }
        // The Service must reach the agent alone: wait until the original pods are gone,
        // then give kube-proxy a moment (the README of ../shared/k8s: 10-700 ms).
        wait_single_pod(&ns.0)?;
        std::thread::sleep(Duration::from_secs(1));
        for k in 0..2 {
            let i = (k + r) % 2;
            let lat = if i == 0 {
                loadgen_in(
                    &ns.0,
                    &caller_pod,
                    &["latency", &svc, &requests.to_string()],
                )?
            } else {
                loadgen_here(&lg, &["latency", &pf_addr, &requests.to_string()])?
            };
            let before = CpuTimes::now();
            let bulk = if i == 0 {
                loadgen_in(&ns.0, &caller_pod, &["fetch", &svc, &BULK.to_string()])?
            } else {
                loadgen_here(&lg, &["fetch", &pf_addr, &BULK.to_string()])?
            };
            cpu[i].push(CpuTimes::now().since(&before));
            p50[i].push(lat["p50_us"].as_f64().unwrap_or(f64::NAN));
            p99[i].push(lat["p99_us"].as_f64().unwrap_or(f64::NAN));
            mib[i].push(bulk["mib_s"].as_f64().unwrap_or(f64::NAN));
        }
        // Diagnosis: the same 100 MiB in the intercept's direction (laptop -> pod) through
        // kubectl port-forward, as an upload to the pod's server.
        let before = CpuTimes::now();
        let up = loadgen_here(&lg, &["upload", &pf_addr, &BULK.to_string()])?;
        cpu[2].push(CpuTimes::now().since(&before));
        pf_upload.push(up["mib_s"].as_f64().unwrap_or(f64::NAN));
        let mut w = waiter("original", "out")?;
        let t0 = now_ns();
        let out = devloop(&["leave", "api"]).output()?;
        if !out.status.success() {
            bail!("leave failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        t_out.push((seen(&mut w)? - t0) as f64 / 1e6);
        let _ = icpt.wait_line(0, Duration::from_secs(30), |l| {
            l.contains("ended elsewhere")
        });
        eprintln!(
            "  k8s round {r}: intercept {} (agent pod ready {}) | p50 us intercept/port-forward {}/{} | 100 MiB MiB/s {:.0}/{:.0} | leave {}",
            fmt_ms(t_in[r]),
            t_rollout.last().map(|v| fmt_ms(*v)).unwrap_or_default(),
            p50[0][r], p50[1][r], mib[0][r], mib[1][r], fmt_ms(t_out[r])
        );
        // The next round's intercept needs the original's pod ready again.
        kubectl(&[
            "-n",
            &ns.0,
            "rollout",
            "status",
            "deployment/api",
            "--timeout=120s",
        ])?;
    }
    drop(pf);
    drop(server);

    // CPU per MiB by program, from the round with the median throughput of each path.
    let bulk_mib = (BULK >> 20) as f64;
    let cpu_of = |k: usize, speeds: &[f64]| {
        let m = median(speeds);
        let r = (0..speeds.len())
            .min_by(|a, b| (speeds[*a] - m).abs().total_cmp(&(speeds[*b] - m).abs()))
            .unwrap_or(0);
        crate::cpu::per_mib(cpu[k].get(r).map(Vec::as_slice).unwrap_or(&[]), bulk_mib)
    };
    let (cpu_intercept, cpu_intercept_line) = cpu_of(0, &mib[0]);
    let (cpu_download, cpu_download_line) = cpu_of(1, &mib[1]);
    let (cpu_upload, cpu_upload_line) = cpu_of(2, &pf_upload);
    eprintln!("  CPU ms per MiB, intercept: {cpu_intercept_line}");
    eprintln!("  CPU ms per MiB, port-forward download: {cpu_download_line}");
    eprintln!("  CPU ms per MiB, port-forward upload: {cpu_upload_line}");
    let (m_in, m_out) = (median(&t_in), median(&t_out));
    let share = if t_rollout.is_empty() {
        f64::NAN
    } else {
        median(&t_rollout) / m_in * 100.0
    };
    let (lat_ratio, bulk_ratio) = (
        median(&p50[0]) / median(&p50[1]),
        median(&mib[0]) / median(&mib[1]),
    );
    let upload_ratio = median(&mib[0]) / median(&pf_upload);
    let rows = vec![
        row("k8s-intercept", "intercept -> first tunnelled request (median)", fmt_ms(m_in), "<= 5000 ms", Some(m_in <= 5000.0)),
        row("k8s-intercept", "of which the agent pod's rollout until Ready (median, share)", format!("{} ({share:.0} %)", fmt_ms(median(&t_rollout))), "", None),
        row("k8s-intercept", "leave -> original serving (median)", fmt_ms(m_out), "<= 5000 ms", Some(m_out <= 5000.0)),
        row(
            "k8s-intercept",
            "keep-alive p50 / p99: intercept (caller pod -> Service -> laptop) | kubectl port-forward (laptop -> pod)",
            format!("{:.0} / {:.0} us | {:.0} / {:.0} us", median(&p50[0]), median(&p99[0]), median(&p50[1]), median(&p99[1])),
            "",
            None,
        ),
        row("k8s-intercept", "p50 intercept / port-forward", format!("{lat_ratio:.2}x"), "<= 1x", Some(lat_ratio <= 1.0)),
        row(
            "k8s-intercept",
            "100 MiB: intercept / port-forward download (pod -> laptop: the issue's comparison)",
            format!("{:.0} / {:.0} MiB/s ({bulk_ratio:.2}x)", median(&mib[0]), median(&mib[1])),
            ">= 1x",
            Some(bulk_ratio >= 1.0),
        ),
        row(
            "k8s-intercept",
            "100 MiB: intercept / port-forward upload (laptop -> pod: the intercept's data direction)",
            format!("{:.0} / {:.0} MiB/s ({upload_ratio:.2}x)", median(&mib[0]), median(&pf_upload)),
            "",
            None,
        ),
        row("k8s-intercept", "CPU ms per MiB, intercept", cpu_intercept_line, "", None),
        row("k8s-intercept", "CPU ms per MiB, port-forward download", cpu_download_line, "", None),
        row("k8s-intercept", "CPU ms per MiB, port-forward upload", cpu_upload_line, "", None),
    ];
    Ok((
        rows,
        serde_json::json!({
            "rounds": rounds,
            "intercept_ms": summary(&t_in),
            "agent_rollout_ms": summary(&t_rollout),
            "leave_ms": summary(&t_out),
            "intercept_p50_us": summary(&p50[0]), "intercept_p99_us": summary(&p99[0]), "intercept_mib_s": summary(&mib[0]),
            "port_forward_upload_mib_s": summary(&pf_upload),
            "port_forward_p50_us": summary(&p50[1]), "port_forward_p99_us": summary(&p99[1]), "port_forward_mib_s": summary(&mib[1]),
            "cpu_ms_per_mib": {"intercept": cpu_intercept, "port_forward_download": cpu_download, "port_forward_upload": cpu_upload},
        }),
    ))
}
