//! `devloop deploy`, `history` and `rollback` on the real cluster: the first deploy creates
//! the example's Deployments and Services from examples/shop/k8s with snapshot images pushed
//! to the cluster's registry; a change rolls out and is served; a version that crashes is
//! undone with its logs shown while the old pods keep serving; `rollback` goes back through
//! the Deployment's revisions.

use devloop_tests::k8s::*;
use devloop_tests::*;
use std::time::Duration;

fn run(shop: &Shop, ns: &Namespace, args: &[&str]) -> (bool, String) {
    let mut c = shop.cmd(&["-n", &ns.name]);
    c.args(args);
    if let Some(k) = kubeconfig() {
        c.env("KUBECONFIG", k);
    }
    let o = c.output().unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr),
    )
}

fn run_ok(shop: &Shop, ns: &Namespace, args: &[&str]) -> String {
    let (ok, out) = run(shop, ns, args);
    assert!(ok, "devloop {args:?} failed:\n{out}");
    out
}

fn api_image(ns: &Namespace) -> String {
    kubectl_ok(&[
        "-n",
        &ns.name,
        "get",
        "deployment",
        "api",
        "-o",
        "jsonpath={.spec.template.spec.containers[0].image}",
    ])
}

fn served_version(ns: &Namespace, want: &str) -> Option<String> {
    poll(Duration::from_secs(30), || {
        get_from_web(ns, "http://api:8000/items")
            .filter(|b| b.contains(&format!("\"version\": \"{want}\"")))
    })
}

fn set_version(shop: &Shop, from: &str, to: &str) {
    let app = shop.path().join("api/app.py");
    let text = std::fs::read_to_string(&app).unwrap();
    assert!(text.contains(&format!("VERSION = \"{from}\"")));
    std::fs::write(
        &app,
        text.replace(
            &format!("VERSION = \"{from}\""),
            &format!("VERSION = \"{to}\""),
        ),
    )
    .unwrap();
}

#[test]
fn deploy_creates_rolls_out_undoes_a_crash_and_rolls_back() {
    if !require_cluster("k8s deploy") {
        return;
    }
    let ns = Namespace::new("dep");
    let shop = kube_shop("k8sdeploy");

    // First deploy: nothing exists, so both services are created from the manifests.
    let out = run_ok(&shop, &ns, &["deploy"]);
    // The ConfigMap the api's environment comes from is created with it, first.
    assert!(
        out.contains("created configmap/api-config, service/api, deployment/api"),
        "{out}"
    );
    assert_eq!(
        kubectl_ok(&[
            "-n",
            &ns.name,
            "get",
            "configmap",
            "api-config",
            "-o",
            "jsonpath={.data.PORT}"
        ]),
        "8000"
    );
    assert!(out.contains("rollout to ready"), "{out}");
    let first = api_image(&ns);
    assert!(
        first.starts_with(&format!("{REGISTRY}/devloop-{}-api:", shop.project)),
        "{first}"
    );
    assert!(
        served_version(&ns, "1").is_some(),
        "web does not reach the deployed api:\n{out}"
    );

    // The same tree again: nothing to do.
    let out = run_ok(&shop, &ns, &["deploy", "api"]);
    assert!(out.contains("unchanged"), "{out}");

    // A one-file change: a new snapshot (only its layer is sent), rolled out and served.
    set_version(&shop, "1", "2");
    let out = run_ok(&shop, &ns, &["deploy", "api"]);
    assert!(out.contains("revision 2"), "{out}");
    assert!(
        out.contains("snapshot pushed") && out.contains("already there"),
        "{out}"
    );
    let second = api_image(&ns);
    assert_ne!(second, first);
    assert!(
        served_version(&ns, "2").is_some(),
        "the new version is not served:\n{out}"
    );

    // A version that crashes on start: the rollout fails fast, is undone, and says why.
    let app = shop.path().join("api/app.py");
    let good = std::fs::read_to_string(&app).unwrap();
    std::fs::write(
        &app,
        format!("import sys\nsys.exit('boom: broken on purpose')\n{good}"),
    )
    .unwrap();
    let (ok, out) = run(&shop, &ns, &["deploy", "api"]);
    assert!(!ok, "a crashing version was reported deployed:\n{out}");
    assert!(out.contains("did not become ready"), "{out}");
    assert!(
        out.contains("boom: broken on purpose"),
        "the failing pod's log lines are not shown:\n{out}"
    );
    assert!(out.contains("undone"), "{out}");
    assert_eq!(
        api_image(&ns),
        second,
        "the Deployment is not back on the previous image"
    );
    kubectl_ok(&[
        "-n",
        &ns.name,
        "rollout",
        "status",
        "deployment/api",
        "--timeout=120s",
    ]);
    assert!(
        served_version(&ns, "2").is_some(),
        "the previous version does not serve after the undo"
    );
    std::fs::write(&app, good).unwrap();

    // history lists the Deployment's revisions, the running one marked.
    let out = run_ok(&shop, &ns, &["history", "api"]);
    let tag = |image: &str| image.rsplit_once(':').unwrap().1.to_string();
    let running: Vec<&str> = out.lines().filter(|l| l.starts_with('*')).collect();
    assert_eq!(running.len(), 1, "{out}");
    assert!(running[0].contains(&tag(&second)), "{out}");
    assert!(out.contains(&tag(&first)), "{out}");
    assert_eq!(
        out.matches("[rollout failed, undone]").count(),
        1,
        "the failed rollout is not marked:\n{out}"
    );
    let reported = kubectl_ok(&["-n", &ns.name, "rollout", "history", "deployment/api"]);
    assert!(
        reported.contains("devloop deploy"),
        "the change cause is not on the revisions:\n{reported}"
    );

    // An intercept and its leave add two revisions of devloop's own (the agent's template,
    // then the original's again): history does not list them, rollback skips them.
    let spec = format!("8000:{}", free_port());
    let log = shop.state.path().join("intercept.log");
    let mut c = shop.cmd(&["-n", &ns.name, "intercept", "api", "--port", &spec]);
    if let Some(k) = kubeconfig() {
        c.env("KUBECONFIG", k);
    }
    let mut intercept = spawn_logged(c, &log);
    wait_for_log(&log, "intercepted in", Duration::from_secs(120));
    let out = run_ok(&shop, &ns, &["leave", "api"]);
    assert!(out.contains("restored"), "{out}");
    let _ = intercept.wait();
    kubectl_ok(&[
        "-n",
        &ns.name,
        "rollout",
        "status",
        "deployment/api",
        "--timeout=120s",
    ]);
    let out = run_ok(&shop, &ns, &["history", "api"]);
    assert!(
        !out.contains("devloop-agent"),
        "history lists the intercept's agent as a version:\n{out}"
    );

    // rollback goes to the newest earlier revision that ran (not the failed one, not the
    // intercept's): version 1.
    let out = run_ok(&shop, &ns, &["rollback", "api"]);
    assert!(out.contains("rolled back"), "{out}");
    assert_eq!(api_image(&ns), first);
    assert!(
        served_version(&ns, "1").is_some(),
        "the rolled-back version is not served:\n{out}"
    );
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
    std::fs::write(
        &cfg,
        text.replace(
            "[target]\nmanifests = \"k8s\"\n",
            "[target]\nkind = \"kubernetes\"\n",
        ),
    )
    .unwrap();
    let (ok, out) = run(&shop, &ns, &["deploy", "api"]);
    assert!(!ok);
    assert!(
        out.contains("no Deployment or Service named `api`") && out.contains("manifests"),
        "{out}"
    );
}

/// `watch` on the cluster: the deployed api is switched to a version that runs under the
/// agent; a save restarts the service in that pod with no rollout, a `redeploy` rule rolls out
/// the next snapshot (still under the agent), and saves keep reaching the new pod; a plain
/// `deploy` afterwards gives back the plain template and the replicas.
#[test]
fn watch_syncs_into_the_deployed_pod_and_redeploys_by_rule() {
    if !require_cluster("k8s watch") {
        return;
    }
    let ns = Namespace::new("watch");
    let mut shop = kube_shop("k8sdeploy");
    let cfg = shop.path().join("devloop.toml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    let rule = "{ paths = [\"**/*.py\"], action = \"restart\" },\n";
    assert!(text.contains(rule));
    std::fs::write(
        &cfg,
        text.replacen(
            rule,
            &format!("{rule}  {{ paths = [\"release.txt\"], action = \"redeploy\" }},\n"),
            1,
        ),
    )
    .unwrap();
    run_ok(&shop, &ns, &["deploy"]);
    let plain = deployment_spec(&ns, "api")["template"].clone();
    let first = api_image(&ns);

    let mut c = shop.cmd(&["-n", &ns.name, "watch", "api"]);
    if let Some(k) = kubeconfig() {
        c.env("KUBECONFIG", k);
    }
    let log = shop.state.path().join("watch.log");
    let f = std::fs::File::create(&log).unwrap();
    shop.adopt(c.stdout(f.try_clone().unwrap()).stderr(f).spawn().unwrap());
    let text = || std::fs::read_to_string(&log).unwrap();
    wait_for_log(&log, "in sync", Duration::from_secs(240));
    // The same snapshot, now run by the agent (one more revision), and still served.
    assert_eq!(api_image(&ns), first, "{}", text());
    let watched = deployment_spec(&ns, "api")["template"].clone();
    assert!(
        watched["metadata"]["labels"]["devloop.dev/watch-session"].is_string(),
        "{watched}"
    );
    assert_eq!(
        watched["spec"]["containers"][0]["command"][1], "dev",
        "{watched}"
    );
    // One pod, the one the saves go to: no replica serves a stale tree.
    assert_eq!(deployment_spec(&ns, "api")["replicas"], 1);
    assert!(served_version(&ns, "1").is_some(), "{}", text());
    let revision = || {
        kubectl_ok(&[
            "-n",
            &ns.name,
            "get",
            "deployment",
            "api",
            "-o",
            "jsonpath={.metadata.annotations.deployment\\.kubernetes\\.io/revision}",
        ])
    };
    let watched_revision = revision();

    // A save of a *.py file: synced into the running pod and the service restarted, no rollout.
    set_version(&shop, "1", "watched");
    assert!(
        served_version(&ns, "watched").is_some(),
        "the save is not served:\n{}",
        text()
    );
    // Every answer, not one of several replicas. (A request that fails outright, an exec
    // under CI load, is no answer: six answers are needed, within twelve tries.)
    let answers: Vec<String> = (0..12)
        .filter_map(|_| get_from_web(&ns, "http://api:8000/items"))
        .take(6)
        .collect();
    assert_eq!(
        answers.len(),
        6,
        "fewer than six answers in twelve tries: {answers:?}\n{}",
        text()
    );
    for body in &answers {
        assert!(
            body.contains("\"version\": \"watched\""),
            "a stale answer after the save: {body}\n{}",
            text()
        );
    }
    assert_eq!(
        revision(),
        watched_revision,
        "a restart rule rolled out a new version:\n{}",
        text()
    );

    // The redeploy rule: a new snapshot rolled out, under the agent again.
    std::fs::write(shop.path().join("api/release.txt"), "2\n").unwrap();
    let second = poll(Duration::from_secs(90), || {
        Some(api_image(&ns)).filter(|i| i != &first)
    });
    assert!(
        second.is_some(),
        "no redeploy after the rule's file changed:\n{}",
        text()
    );
    kubectl_ok(&[
        "-n",
        &ns.name,
        "rollout",
        "status",
        "deployment/api",
        "--timeout=120s",
    ]);
    assert!(
        deployment_spec(&ns, "api")["template"]["metadata"]["labels"]["devloop.dev/watch-session"]
            .is_string()
    );
    assert!(
        served_version(&ns, "watched").is_some(),
        "the redeployed snapshot lacks the saved file:\n{}",
        text()
    );
    // Saves reach the new pod (the sync reconnected to it).
    set_version(&shop, "watched", "after-redeploy");
    assert!(
        poll(Duration::from_secs(90), || get_from_web(
            &ns,
            "http://api:8000/items"
        )
        .filter(|b| b.contains("\"version\": \"after-redeploy\"")))
        .is_some(),
        "a save after the redeploy is not served:\n{}",
        text()
    );
    // status names the watched version, its process and the sync.
    let (_, status) = run(&shop, &ns, &["status"]);
    assert!(
        status.contains("under the agent (devloop watch)")
            && status.contains("process    running (pid")
            && status.contains("sync       syncing (pid"),
        "{status}"
    );

    // A plain deploy from another shell while watch runs: the plain template again, with the
    // new snapshot, and the manifest's two replicas; the token Secret goes, and the watch
    // stops saying why rather than waiting for an agent that will not come back.
    let out = run_ok(&shop, &ns, &["deploy", "api"]);
    wait_for_log(
        &log,
        "no longer runs under this `devloop watch`",
        Duration::from_secs(120),
    );
    let codes = shop.interrupt_all();
    assert!(
        codes.iter().all(|c| !c.success()),
        "watch did not fail when its version was replaced: {codes:?}\n{}",
        text()
    );
    assert_eq!(deployment_spec(&ns, "api")["replicas"], 2, "{out}");
    let mut expected = plain.clone();
    expected["spec"]["containers"][0]["image"] = serde_json::json!(api_image(&ns));
    assert_ne!(api_image(&ns), first, "{out}");
    assert_eq!(deployment_spec(&ns, "api")["template"], expected, "{out}");
    assert_ne!(
        kubectl(&["-n", &ns.name, "get", "secret", "api-devloop-watch"])
            .status
            .code(),
        Some(0),
        "the watch token Secret is left over"
    );
    assert!(served_version(&ns, "after-redeploy").is_some(), "{out}");
}
