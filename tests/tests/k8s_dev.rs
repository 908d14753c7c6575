//! Dev pods on the real cluster: `devloop up` switches the example's api Deployment to dev
//! mode (the agent supervising the original command, the sync root an emptyDir seeded from
//! the image), a saved file reaches the pod and restarts the service, which web then
//! serves; the service's output reaches the laptop; `down` puts back a spec equal to the
//! original's.

use devloop_tests::k8s::*;
use devloop_tests::*;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

/// The example as a Kubernetes project (the namespace comes from `-n`), with a file only the
/// laptop has: the first reconcile must send it.
fn laptop_shop(name: &str) -> Shop {
    let shop = kube_shop(name);
    std::fs::write(shop.path().join("api/laptop-only.txt"), "from the laptop").unwrap();
    shop
}

/// `devloop -n NS ARGS` on the cluster.
fn devloop(shop: &Shop, ns: &Namespace, args: &[&str]) -> Command {
    let mut c = shop.cmd(&["-n", &ns.name]);
    c.args(args).env("KUBECONFIG", kubeconfig().unwrap());
    c
}

/// Starts `devloop up api`, its output in `name` under the state folder, and waits until it
/// is in sync.
fn up_api(shop: &mut Shop, ns: &Namespace, name: &str, wait: Duration) -> PathBuf {
    let log = shop.state.path().join(name);
    let child = spawn_logged(devloop(shop, ns, &["up", "api"]), &log);
    shop.adopt(child);
    wait_for_log(&log, "in sync:", wait);
    log
}

/// `cmd` run in the api container of `pod`: its output, when it succeeded.
fn in_api(ns: &Namespace, pod: &str, cmd: &[&str]) -> Option<String> {
    let mut args = vec!["-n", &ns.name, "exec", pod, "-c", "api", "--"];
    args.extend_from_slice(cmd);
    let o = kubectl(&args);
    o.status
        .success()
        .then(|| String::from_utf8_lossy(&o.stdout).trim().to_string())
}

/// The api pod the laptop's file reached (the dev pod); None when it is in none of them.
fn dev_pod(ns: &Namespace) -> Option<String> {
    let pods = kubectl_ok(&[
        "-n",
        &ns.name,
        "get",
        "pods",
        "-l",
        "app.kubernetes.io/name=api",
        "-o",
        "jsonpath={.items[*].metadata.name}",
    ]);
    pods.split_whitespace()
        .find(|p| in_api(ns, p, &["cat", "/app/laptop-only.txt"]).is_some())
        .map(String::from)
}

#[test]
fn up_syncs_into_a_dev_pod_and_down_restores_the_spec() {
    if !require_cluster("k8s dev pods") {
        return;
    }
    let ns = Namespace::new("dev");
    deploy_shop(&ns);
    let before = deployment_spec(&ns, "api");
    let mut shop = laptop_shop("k8sdev");
    let log = up_api(&mut shop, &ns, "up.log", Duration::from_secs(240));
    let up_text = std::fs::read_to_string(&log).unwrap();
    assert!(up_text.contains("switched to dev mode"), "{up_text}");
    assert!(
        dev_pod(&ns).is_some(),
        "the laptop-only file is not in any api pod:\n{up_text}"
    );
    // The image's files were there before the sync (seeded), and the original command runs
    // under the agent: web gets the api's answer.
    assert!(
        poll(Duration::from_secs(60), || get_from_web(
            &ns,
            "http://api:8000/items"
        )
        .filter(|b| b.contains("\"version\": \"1\"")))
        .is_some(),
        "{}",
        std::fs::read_to_string(&log).unwrap()
    );

    // A save restarts the service with the new file (the example's rule for *.py).
    let app = shop.path().join("api/app.py");
    let src = std::fs::read_to_string(&app).unwrap();
    std::fs::write(
        &app,
        src.replace("VERSION = \"1\"", "VERSION = \"dev-pod\""),
    )
    .unwrap();
    let served = poll(Duration::from_secs(60), || {
        get_from_web(&ns, "http://api:8000/items")
            .filter(|b| b.contains("\"version\": \"dev-pod\""))
    });
    assert!(
        served.is_some(),
        "the edit is not served from the dev pod:\n{}",
        std::fs::read_to_string(&log).unwrap()
    );
    // The service's own output reaches the laptop (its request log line for /items).
    wait_for_log(&log, "GET /items", Duration::from_secs(30));

    // A deploy would change the dev pod's template under the sync: refused.
    let o = devloop(&shop, &ns, &["deploy", "api"]).output().unwrap();
    let refused =
        String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && refused.contains("is in dev mode"),
        "{refused}"
    );

    // status says what runs where: the dev pod, the agent's process, who syncs.
    let o = devloop(&shop, &ns, &["status"]).output().unwrap();
    let status = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        o.status.success(),
        "{status}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        status.contains("deployment/api (dev pod since")
            && status.contains("process    running (pid")
            && status.contains("sync       syncing (pid"),
        "{status}"
    );

    let statuses = shop.interrupt_all();
    assert!(
        statuses.iter().all(|s| s.success()),
        "{statuses:?}\n{}",
        std::fs::read_to_string(&log).unwrap()
    );

    // `up` again finds the dev pod and syncs into it; `down` from another shell while it runs
    // ends dev mode, and that `up` stops saying so rather than waiting for the pod.
    let log = up_api(&mut shop, &ns, "up-again.log", Duration::from_secs(120));
    assert!(
        std::fs::read_to_string(&log)
            .unwrap()
            .contains("already in dev mode"),
        "{}",
        std::fs::read_to_string(&log).unwrap()
    );
    let o = devloop(&shop, &ns, &["down"]).output().unwrap();
    let down = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success() && down.contains("deployment/api restored"),
        "{down}"
    );
    wait_for_log(&log, "left dev mode", Duration::from_secs(120));
    let statuses = shop.interrupt_all();
    assert!(
        statuses.iter().all(|s| !s.success()),
        "up did not fail when dev mode ended elsewhere: {statuses:?}"
    );
    let o = devloop(&shop, &ns, &["status"]).output().unwrap();
    let status = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        status.contains("deployment/api (image ") && !status.contains("dev pod"),
        "{status}"
    );
    assert_eq!(
        deployment_spec(&ns, "api"),
        before,
        "the spec after down differs from the original's"
    );
    assert_ne!(
        kubectl(&["-n", &ns.name, "get", "secret", "api-devloop-dev"])
            .status
            .code(),
        Some(0),
        "the token secret is left over"
    );
    kubectl_ok(&[
        "-n",
        &ns.name,
        "rollout",
        "status",
        "deployment/api",
        "--timeout=120s",
    ]);
    assert!(poll(Duration::from_secs(60), || get_from_web(
        &ns,
        "http://api:8000/items"
    )
    .filter(|b| b.contains("\"version\": \"1\"")))
    .is_some());
}

/// A Deployment whose container runs as uid 1000 (as many hardened images do): the dev pod's
/// agent, which runs as that user too, reads its token, the seeded files and the laptop's
/// are there, the service runs as 1000 and serves an edit.
#[test]
fn a_dev_pod_runs_as_the_containers_non_root_user() {
    if !require_cluster("k8s dev pods as a non-root user") {
        return;
    }
    let ns = Namespace::new("devuid");
    deploy_shop(&ns);
    kubectl_ok(&[
        "-n",
        &ns.name,
        "patch",
        "deployment",
        "api",
        "-p",
        r#"{"spec":{"template":{"spec":{"containers":[{"name":"api","securityContext":{"runAsUser":1000,"runAsGroup":1000}}]}}}}"#,
    ]);
    kubectl_ok(&[
        "-n",
        &ns.name,
        "rollout",
        "status",
        "deployment/api",
        "--timeout=120s",
    ]);
    let before = deployment_spec(&ns, "api");
    let mut shop = laptop_shop("k8suid");
    let log = up_api(&mut shop, &ns, "up.log", Duration::from_secs(240));
    let up_text = || std::fs::read_to_string(&log).unwrap();
    let pod = dev_pod(&ns)
        .unwrap_or_else(|| panic!("the laptop-only file is not in any api pod:\n{}", up_text()));
    assert_eq!(
        in_api(&ns, &pod, &["cat", "/app/laptop-only.txt"]).as_deref(),
        Some("from the laptop"),
        "{}",
        up_text()
    );
    // The agent and the service it supervises run as the container's user.
    let users = in_api(
        &ns,
        &pod,
        &[
            "sh",
            "-c",
            "for p in /proc/[0-9]*; do stat -c %u $p; done | sort -u",
        ],
    )
    .unwrap_or_default();
    assert_eq!(
        users, "1000",
        "processes of the dev container run as: {users}"
    );
    let app = shop.path().join("api/app.py");
    let src = std::fs::read_to_string(&app).unwrap();
    std::fs::write(
        &app,
        src.replace("VERSION = \"1\"", "VERSION = \"uid-1000\""),
    )
    .unwrap();
    assert!(
        poll(Duration::from_secs(60), || get_from_web(
            &ns,
            "http://api:8000/items"
        )
        .filter(|b| b.contains("\"version\": \"uid-1000\"")))
        .is_some(),
        "the edit is not served:\n{}",
        up_text()
    );
    let statuses = shop.interrupt_all();
    assert!(
        statuses.iter().all(|s| s.success()),
        "{statuses:?}\n{}",
        up_text()
    );
    let o = devloop(&shop, &ns, &["down"]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        deployment_spec(&ns, "api"),
        before,
        "the spec after down differs from the original's"
    );
}
