//! `devloop deploy`, `history` and `rollback` on the real cluster: the first deploy creates
//! the example's Deployments and Services from examples/shop/k8s with snapshot images pushed
//! to the cluster's registry; a change rolls out and is served; a version that crashes is
//! undone with its logs shown while the old pods keep serving; `rollback` goes back through
//! the Deployment's revisions.

use devloop_tests::k8s::*;
use devloop_tests::*;
use std::time::Duration;

/// The example as a Kubernetes project: devloop.toml's `[target]` names the cluster and the
/// manifests, the namespace comes from `-n`.
fn kube_shop() -> Shop {
    let shop = Shop::new("k8sdeploy", false);
    let cfg = shop.path().join("devloop.toml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    assert!(text.contains("[target]\nmanifests = \"k8s\""), "the example names its manifests");
    std::fs::write(&cfg, text.replace("[target]\n", "[target]\nkind = \"kubernetes\"\n")).unwrap();
    shop
}

fn run(shop: &Shop, ns: &Namespace, args: &[&str]) -> (bool, String) {
    let mut c = shop.cmd(&["-n", &ns.name]);
    c.args(args);
    if let Some(k) = kubeconfig() {
        c.env("KUBECONFIG", k);
    }
    let o = c.output().unwrap();
    (o.status.success(), String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr))
}

fn run_ok(shop: &Shop, ns: &Namespace, args: &[&str]) -> String {
    let (ok, out) = run(shop, ns, args);
    assert!(ok, "devloop {args:?} failed:\n{out}");
    out
}

fn api_image(ns: &Namespace) -> String {
    kubectl_ok(&["-n", &ns.name, "get", "deployment", "api", "-o", "jsonpath={.spec.template.spec.containers[0].image}"])
}

fn served_version(ns: &Namespace, want: &str) -> Option<String> {
    poll(Duration::from_secs(30), || get_from_web(ns, "http://api:8000/items").filter(|b| b.contains(&format!("\"version\": \"{want}\""))))
}

fn set_version(shop: &Shop, from: &str, to: &str) {
    let app = shop.path().join("api/app.py");
    let text = std::fs::read_to_string(&app).unwrap();
    assert!(text.contains(&format!("VERSION = \"{from}\"")));
    std::fs::write(&app, text.replace(&format!("VERSION = \"{from}\""), &format!("VERSION = \"{to}\""))).unwrap();
}

#[test]
fn deploy_creates_rolls_out_undoes_a_crash_and_rolls_back() {
    if !require_cluster("k8s deploy") {
        return;
    }
    let ns = Namespace::new("dep");
    let shop = kube_shop();

    // First deploy: nothing exists, so both services are created from the manifests.
    let out = run_ok(&shop, &ns, &["deploy"]);
    assert!(out.contains("created service/api, deployment/api"), "{out}");
    assert!(out.contains("rollout to ready"), "{out}");
    let first = api_image(&ns);
    assert!(first.starts_with(&format!("{REGISTRY}/devloop-{}-api:", shop.project)), "{first}");
    assert!(served_version(&ns, "1").is_some(), "web does not reach the deployed api:\n{out}");

    // The same tree again: nothing to do.
    let out = run_ok(&shop, &ns, &["deploy", "api"]);
    assert!(out.contains("unchanged"), "{out}");

    // A one-file change: a new snapshot (only its layer is sent), rolled out and served.
    set_version(&shop, "1", "2");
    let out = run_ok(&shop, &ns, &["deploy", "api"]);
    assert!(out.contains("revision 2"), "{out}");
    assert!(out.contains("snapshot pushed") && out.contains("already there"), "{out}");
    let second = api_image(&ns);
    assert_ne!(second, first);
    assert!(served_version(&ns, "2").is_some(), "the new version is not served:\n{out}");

    // A version that crashes on start: the rollout fails fast, is undone, and says why.
    let app = shop.path().join("api/app.py");
    let good = std::fs::read_to_string(&app).unwrap();
    std::fs::write(&app, format!("import sys\nsys.exit('boom: broken on purpose')\n{good}")).unwrap();
    let (ok, out) = run(&shop, &ns, &["deploy", "api"]);
    assert!(!ok, "a crashing version was reported deployed:\n{out}");
    assert!(out.contains("did not become ready"), "{out}");
    assert!(out.contains("boom: broken on purpose"), "the failing pod's log lines are not shown:\n{out}");
    assert!(out.contains("undone"), "{out}");
    assert_eq!(api_image(&ns), second, "the Deployment is not back on the previous image");
    kubectl_ok(&["-n", &ns.name, "rollout", "status", "deployment/api", "--timeout=120s"]);
    assert!(served_version(&ns, "2").is_some(), "the previous version does not serve after the undo");
    std::fs::write(&app, good).unwrap();

    // history lists the Deployment's revisions, the running one marked.
    let out = run_ok(&shop, &ns, &["history", "api"]);
    let tag = |image: &str| image.rsplit_once(':').unwrap().1.to_string();
    let running: Vec<&str> = out.lines().filter(|l| l.starts_with('*')).collect();
    assert_eq!(running.len(), 1, "{out}");
    assert!(running[0].contains(&tag(&second)), "{out}");
    assert!(out.contains(&tag(&first)), "{out}");
    assert_eq!(out.matches("[rollout failed, undone]").count(), 1, "the failed rollout is not marked:\n{out}");
    let reported = kubectl_ok(&["-n", &ns.name, "rollout", "history", "deployment/api"]);
    assert!(reported.contains("devloop deploy"), "the change cause is not on the revisions:\n{reported}");

    // rollback goes to the newest earlier revision that ran (not the failed one): version 1.
    let out = run_ok(&shop, &ns, &["rollback", "api"]);
    assert!(out.contains("rolled back"), "{out}");
    assert_eq!(api_image(&ns), first);
    assert!(served_version(&ns, "1").is_some(), "the rolled-back version is not served:\n{out}");
    let (ok, out) = run(&shop, &ns, &["rollback", "api", "--to-revision", "99"]);
    assert!(!ok && out.contains("no revision 99"), "{out}");
}

#[test]
fn deploy_without_a_workload_or_manifests_names_the_setting() {
    if !require_cluster("k8s deploy errors") {
        return;
    }
    let ns = Namespace::new("depx");
    let shop = Shop::new("k8sdeployx", false);
    let cfg = shop.path().join("devloop.toml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, text.replace("[target]\nmanifests = \"k8s\"\n", "[target]\nkind = \"kubernetes\"\n")).unwrap();
    let (ok, out) = run(&shop, &ns, &["deploy", "api"]);
    assert!(!ok);
    assert!(out.contains("no Deployment or Service named `api`") && out.contains("manifests"), "{out}");
}
