//! The agent's supervision as a user sees it: exit codes and crash loops are shown, and a
//! service that is intercepted is left alone by `up`.

use devloop_tests::*;
use std::time::Duration;

#[test]
fn crash_loop_is_shown_in_logs_and_status() {
    let mut shop = Shop::new("crash", false);
    let cfg = shop.path().join("devloop.toml");
    std::fs::write(
        &cfg,
        format!(
            "project = \"{}\"\n[services.api]\nsync = {{ from = \"api\", to = \"/app\" }}\ncommand = [\"python3\", \"-c\", \"print('boom', flush=True); raise SystemExit(3)\"]\n",
            shop.project
        ),
    )
    .unwrap();
    let log = shop.spawn(&["up", "api"]);
    wait_for_log(&log, "boom", Duration::from_secs(240));
    wait_for_log(&log, "exited with code 3", Duration::from_secs(20));
    wait_for_log(&log, "crash loop", Duration::from_secs(20));
    let status = shop.run_ok(&["status"]);
    assert!(status.contains("CRASH LOOP") || status.contains("quick exits"), "{status}");
    assert!(status.contains("last exit code 3"), "{status}");
    shop.interrupt_all();
}

#[test]
fn intercepted_service_is_left_alone() {
    let mut shop = Shop::new("icpt", false);
    // Stand in for an active intercept: a container carrying the intercept labels.
    let labels = [
        "dev.devloop.managed=true".to_string(),
        format!("dev.devloop.project={}", shop.project),
        "dev.devloop.service=api".to_string(),
        "dev.devloop.kind=intercept".to_string(),
        format!("{TEST_RUN_LABEL}={}", shop.project),
    ];
    let mut args = vec!["run", "-d", "--name"];
    let name = format!("{}-icpt", shop.container("api"));
    args.push(&name);
    for l in &labels {
        args.push("--label");
        args.push(l);
    }
    args.extend(["python:3.11-slim-bookworm", "sleep", "600"]);
    docker_ok(&args);

    let log = shop.spawn(&["up", "--no-logs"]);
    wait_for_log(&log, "intercepted: left alone", Duration::from_secs(240));
    wait_for_log(&log, "in sync", Duration::from_secs(60));
    assert!(!docker(&["inspect", &shop.container("api")]).status.success(), "up created a dev container for an intercepted service");
    let status = shop.run_ok(&["status"]);
    assert!(status.contains("INTERCEPTED"), "{status}");
    shop.interrupt_all();
}
