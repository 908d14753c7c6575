//! Intercept on the real cluster with the example deployed to it: the web pod's calls to the
//! `api` Service reach a process on the laptop through the agent pod and a port-forward, and
//! `leave` (also after the cli was killed) puts back a Deployment whose spec equals the
//! original's.

use devloop_tests::k8s::*;
use devloop_tests::*;
use std::process::Command;
use std::time::Duration;

fn devloop(ns: &Namespace, state: &std::path::Path, args: &[&str]) -> Command {
    let mut c = Command::new(devloop_bin());
    c.arg("-n")
        .arg(&ns.name)
        .args(args)
        .env("DEVLOOP_STATE_DIR", state)
        .env("DEVLOOP_AGENT_BIN", agent_bin())
        .env("NO_COLOR", "1");
    if let Some(k) = kubeconfig() {
        c.env("KUBECONFIG", k);
    }
    // Not a project folder: intercept and leave need no devloop.toml.
    c.current_dir(state);
    c
}

fn run_ok(mut c: Command) -> String {
    let o = c.output().unwrap();
    assert!(
        o.status.success(),
        "{c:?} failed:\n{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr)
}

#[test]
fn web_reaches_the_laptop_through_the_cluster_and_leave_restores_the_spec() {
    if !require_cluster("k8s intercept") {
        return;
    }
    let ns = Namespace::new("icpt");
    deploy_shop(&ns);
    let before = deployment_spec(&ns, "api");
    assert!(poll(Duration::from_secs(30), || get_from_web(
        &ns,
        "http://api:8000/items"
    )
    .filter(|b| b.contains("teapot")))
    .is_some());

    let state = tempfile::tempdir().unwrap();
    let port = free_port();
    let script = state.path().join("laptop_api.py");
    std::fs::write(&script, LAPTOP_API).unwrap();
    // The container port by its name (`http`), as a user of the manifests would say it.
    let spec = format!("http:{port}");
    let log = state.path().join("intercept.log");
    let mut cli = spawn_logged(
        devloop(
            &ns,
            state.path(),
            &[
                "intercept",
                "api",
                "--port",
                &spec,
                "--",
                "python3",
                script.to_str().unwrap(),
                &port.to_string(),
            ],
        ),
        &log,
    );
    wait_for_log(&log, "intercepted in", Duration::from_secs(180));
    let got = poll(Duration::from_secs(30), || {
        get_from_web(&ns, "http://api:8000/items").filter(|b| b.contains("laptop"))
    });
    assert!(
        got.is_some(),
        "web does not reach the laptop process:\n{}",
        std::fs::read_to_string(&log).unwrap()
    );
    // The laptop process runs with the service's environment.
    assert!(got.unwrap().contains("\"port_env\": \"8000\""));

    let list = run_ok(devloop(&ns, state.path(), &["intercept", "list"]));
    assert!(list.contains("api") && list.contains("8000->"), "{list}");
    let again = devloop(&ns, state.path(), &["intercept", "api", "--port", &spec])
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("already intercepted"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );

    let left = run_ok(devloop(&ns, state.path(), &["leave", "api"]));
    assert!(left.contains("restored"), "{left}");
    wait_for_log(&log, "ended elsewhere", Duration::from_secs(30));
    let _ = cli.wait();
    assert_eq!(
        deployment_spec(&ns, "api"),
        before,
        "the spec after leave differs from the original's"
    );
    kubectl_ok(&[
        "-n",
        &ns.name,
        "rollout",
        "status",
        "deployment/api",
        "--timeout=120s",
    ]);
    let back = poll(Duration::from_secs(30), || {
        get_from_web(&ns, "http://api:8000/items").filter(|b| b.contains("teapot"))
    });
    assert!(
        back.is_some(),
        "the original api does not answer after leave"
    );
    let left = intercept_objects(&ns);
    assert!(
        left.is_empty(),
        "the intercept's token secret or lease account is left over: {left:?}"
    );
}

/// The Secrets, ServiceAccounts, Roles and RoleBindings an intercept of `api` made (named
/// per session, labelled with the Deployment).
fn intercept_objects(ns: &Namespace) -> Vec<String> {
    kubectl_ok(&[
        "-n",
        &ns.name,
        "get",
        "secrets,serviceaccounts,roles,rolebindings",
        "-l",
        "devloop.dev/intercept-of=api",
        "-o",
        "name",
    ])
    .lines()
    .map(String::from)
    .filter(|l| !l.is_empty())
    .collect()
}

#[test]
fn a_killed_cli_leaves_an_intercept_that_leave_all_restores() {
    if !require_cluster("k8s intercept after SIGKILL") {
        return;
    }
    let ns = Namespace::new("icptkill");
    deploy_shop(&ns);
    // The container's environment also comes from a Secret and a ConfigMap.
    kubectl_ok(&[
        "-n",
        &ns.name,
        "create",
        "secret",
        "generic",
        "api-db",
        "--from-literal=password=s3cret",
    ]);
    kubectl_ok(&[
        "-n",
        &ns.name,
        "create",
        "configmap",
        "api-settings",
        "--from-literal=LEVEL=debug",
    ]);
    // (PORT comes from the example's own ConfigMap, api-config.)
    let env_patch = r#"[{"op": "add", "path": "/spec/template/spec/containers/0/envFrom/-", "value": {"configMapRef": {"name": "api-settings"}, "prefix": "APP_"}},
        {"op": "add", "path": "/spec/template/spec/containers/0/env", "value": [
            {"name": "DB_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "api-db", "key": "password"}}},
            {"name": "DB_URL", "value": "postgres://shop:$(DB_PASSWORD)@db:5432"}]}]"#;
    kubectl_ok(&[
        "-n",
        &ns.name,
        "patch",
        "deployment",
        "api",
        "--type=json",
        "-p",
        env_patch,
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
    let state = tempfile::tempdir().unwrap();
    let spec = format!("8000:{}", free_port());
    let log = state.path().join("intercept.log");
    let env_file = state.path().join("api.env");
    let mut cli = spawn_logged(
        devloop(
            &ns,
            state.path(),
            &[
                "intercept",
                "api",
                "--port",
                &spec,
                "--env-file",
                env_file.to_str().unwrap(),
            ],
        ),
        &log,
    );
    // The environment is written before anything changes, the swap comes after it.
    wait_for_log(&log, "wrote the environment", Duration::from_secs(180));
    wait_for_log(&log, "intercepted in", Duration::from_secs(180));
    let env = std::fs::read_to_string(&env_file).unwrap();
    for line in [
        "PORT=8000",
        "APP_LEVEL=debug",
        "DB_PASSWORD=s3cret",
        "DB_URL=postgres://shop:s3cret@db:5432",
    ] {
        assert!(
            env.lines().any(|l| l == line),
            "`{line}` missing from the laptop's environment:\n{env}"
        );
    }
    cli.kill().unwrap();
    cli.wait().unwrap();
    assert_ne!(
        deployment_spec(&ns, "api"),
        before,
        "the intercept changed nothing"
    );

    // A fresh state folder: the record is on the Deployment, not on this machine.
    let elsewhere = tempfile::tempdir().unwrap();
    let list = run_ok(devloop(&ns, elsewhere.path(), &["intercept", "list"]));
    assert!(list.contains("api"), "{list}");
    let out = run_ok(devloop(&ns, elsewhere.path(), &["leave", "--all"]));
    assert!(out.contains("api restored"), "{out}");
    assert_eq!(
        deployment_spec(&ns, "api"),
        before,
        "the spec after leave differs from the original's"
    );
    let none = run_ok(devloop(&ns, elsewhere.path(), &["intercept", "list"]));
    assert!(
        none.contains(&format!("no active intercepts in namespace {}", ns.name)),
        "{none}"
    );
}

#[test]
fn unknown_context_namespace_and_service_are_named() {
    if !require_cluster("k8s errors") {
        return;
    }
    let state = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let mut c = Command::new(devloop_bin());
        c.args(args)
            .env("DEVLOOP_STATE_DIR", state.path())
            .env("DEVLOOP_AGENT_BIN", agent_bin())
            .current_dir(state.path());
        if let Some(k) = kubeconfig() {
            c.env("KUBECONFIG", k);
        }
        let o = c.output().unwrap();
        assert!(!o.status.success());
        String::from_utf8_lossy(&o.stderr).to_string()
    };
    let e = run(&["--context", "nope", "intercept", "api", "--port", "8000:1"]);
    assert!(e.contains("no context `nope`"), "{e}");
    let e = run(&["-n", "no-such-ns", "intercept", "api", "--port", "8000:1"]);
    assert!(e.contains("no namespace `no-such-ns`"), "{e}");
    let ns = Namespace::new("errs");
    let e = run(&["-n", &ns.name, "intercept", "nothing", "--port", "8000:1"]);
    assert!(
        e.contains("no Deployment or Service named `nothing`"),
        "{e}"
    );
}

/// A user limited by RBAC is told which permission is missing; the Role in
/// docs/kubernetes-role.yaml (plus the registry reader) is enough for intercept and leave.
#[test]
fn rbac_errors_name_the_permission_and_the_documented_role_is_enough() {
    if !require_cluster("k8s RBAC") {
        return;
    }
    let ns = Namespace::new("rbac");
    deploy_shop(&ns);
    let before = deployment_spec(&ns, "api");
    let state = tempfile::tempdir().unwrap();
    let kubeconfig = service_account_kubeconfig(&ns, "limited", state.path());
    let as_user = |args: &[&str]| {
        let mut c = Command::new(devloop_bin());
        c.args(args)
            .env("KUBECONFIG", &kubeconfig)
            .env("DEVLOOP_STATE_DIR", state.path())
            .env("DEVLOOP_AGENT_BIN", agent_bin())
            .env("NO_COLOR", "1")
            .current_dir(state.path());
        c
    };
    let spec = format!("8000:{}", free_port());
    let o = as_user(&["-n", &ns.name, "intercept", "api", "--port", &spec])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    // The Deployment is read first (a Service adds only port names, and a user without
    // `get services` may still intercept a Deployment by its name).
    assert!(err.contains("needs `get` on `deployments`"), "{err}");
    let doctor = as_user(&["-n", &ns.name, "doctor"]).output().unwrap();
    let text = String::from_utf8_lossy(&doctor.stdout);
    assert!(
        text.contains("FAIL  permissions")
            && text.contains("patch deployments")
            && text.contains("get pods/portforward"),
        "{text}"
    );

    let role = workspace().join("docs/kubernetes-role.yaml");
    kubectl_ok(&["-n", &ns.name, "apply", "-f", role.to_str().unwrap()]);
    let subject = format!("{}:limited", ns.name);
    kubectl_ok(&[
        "-n",
        &ns.name,
        "create",
        "rolebinding",
        "devloop",
        "--role=devloop",
        &format!("--serviceaccount={subject}"),
    ]);
    let reader = workspace().join("docs/kubernetes-registry-reader.yaml");
    kubectl_ok(&["apply", "-f", reader.to_str().unwrap()]);
    let binding = format!("devloop-registry-reader-{}", ns.name);
    kubectl_ok(&[
        "-n",
        "kube-public",
        "create",
        "rolebinding",
        &binding,
        "--role=devloop-registry-reader",
        &format!("--serviceaccount={subject}"),
    ]);
    struct Unbind(String);
    impl Drop for Unbind {
        fn drop(&mut self) {
            let _ = kubectl(&["-n", "kube-public", "delete", "rolebinding", &self.0]);
        }
    }
    let _unbind = Unbind(binding);

    let doctor = as_user(&["-n", &ns.name, "doctor"]).output().unwrap();
    let text = String::from_utf8_lossy(&doctor.stdout);
    assert!(
        text.contains("ok    permissions") && text.contains("ok    registry"),
        "{text}"
    );
    let log = state.path().join("intercept.log");
    let mut cli = spawn_logged(
        as_user(&["-n", &ns.name, "intercept", "api", "--port", &spec]),
        &log,
    );
    wait_for_log(&log, "intercepted in", Duration::from_secs(180));
    let list = run_ok(as_user(&["-n", &ns.name, "intercept", "list"]));
    assert!(list.contains("api"), "{list}");
    let out = run_ok(as_user(&["-n", &ns.name, "leave", "api"]));
    assert!(out.contains("restored"), "{out}");
    wait_for_log(&log, "ended elsewhere", Duration::from_secs(30));
    let _ = cli.wait();
    assert_eq!(deployment_spec(&ns, "api"), before);

    // The same Role is enough for the other workflows: dev pods (up, down) and deploy,
    // history and rollback, run as this user from a copy of the example.
    let shop = kube_shop("k8srbac");
    let in_shop = |args: &[&str]| {
        let mut c = shop.cmd(&["-n", &ns.name]);
        c.args(args).env("KUBECONFIG", &kubeconfig);
        c
    };
    let mut up = spawn_logged(in_shop(&["up", "api"]), &state.path().join("up.log"));
    wait_for_log(
        &state.path().join("up.log"),
        "in sync:",
        Duration::from_secs(240),
    );
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(up.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    );
    let _ = up.wait();
    let out = run_ok(in_shop(&["down"]));
    assert!(out.contains("deployment/api restored"), "{out}");
    let out = run_ok(in_shop(&["deploy", "api"]));
    assert!(out.contains("rollout to ready"), "{out}");
    let out = run_ok(in_shop(&["history", "api"]));
    assert!(
        out.lines().filter(|l| l.starts_with('*')).count() == 1,
        "{out}"
    );
    let out = run_ok(in_shop(&["rollback", "api"]));
    assert!(out.contains("rolled back"), "{out}");
    assert_eq!(
        deployment_spec(&ns, "api")["template"]["spec"]["containers"][0]["image"],
        before["template"]["spec"]["containers"][0]["image"]
    );
}

/// The lease: the cli is killed and nobody runs `leave`; the agent restores the Deployment
/// itself once no cli has been connected for the lease (shortened to 5 s here), and the next
/// devloop command removes the lease's ServiceAccount, Role, RoleBinding and Secret.
#[test]
fn the_lease_restores_a_workload_whose_cli_vanished() {
    if !require_cluster("k8s lease") {
        return;
    }
    let ns = Namespace::new("lease");
    deploy_shop(&ns);
    let before = deployment_spec(&ns, "api");
    let state = tempfile::tempdir().unwrap();
    let spec = format!("8000:{}", free_port());
    let log = state.path().join("intercept.log");
    let mut cli = spawn_logged(
        devloop(
            &ns,
            state.path(),
            &["intercept", "api", "--port", &spec, "--lease", "5s"],
        ),
        &log,
    );
    wait_for_log(&log, "intercepted in", Duration::from_secs(180));
    let made = intercept_objects(&ns);
    for kind in ["secret/", "serviceaccount/", "role.", "rolebinding."] {
        assert!(
            made.iter()
                .any(|o| o.starts_with(kind) && o.contains("api-devloop-")),
            "no {kind} of the intercept: {made:?}"
        );
    }
    cli.kill().unwrap();
    cli.wait().unwrap();

    let restored = poll(Duration::from_secs(90), || {
        (deployment_spec(&ns, "api") == before).then_some(())
    });
    assert!(
        restored.is_some(),
        "the agent did not restore the Deployment within 90 s; agent log:\n{}",
        String::from_utf8_lossy(
            &kubectl(&[
                "-n",
                &ns.name,
                "logs",
                "-l",
                "devloop.dev/intercept-session",
                "--tail=20"
            ])
            .stdout
        )
    );
    let out = run_ok(devloop(&ns, state.path(), &["intercept", "list"]));
    assert!(out.contains("restored by its agent's lease"), "{out}");
    let left = intercept_objects(&ns);
    assert!(
        left.is_empty(),
        "the lease's leftovers were not removed: {left:?}"
    );
}
