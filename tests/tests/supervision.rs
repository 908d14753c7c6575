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
    assert!(
        status.contains("CRASH LOOP") || status.contains("quick exits"),
        "{status}"
    );
    assert!(status.contains("last exit code 3"), "{status}");
    shop.interrupt_all();
}

#[test]
fn intercepted_service_is_left_alone() {
    let _serial = intercept_lock();
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
    assert!(
        !docker(&["inspect", &shop.container("api")])
            .status
            .success(),
        "up created a dev container for an intercepted service"
    );
    let status = shop.run_ok(&["status"]);
    assert!(status.contains("INTERCEPTED"), "{status}");
    shop.interrupt_all();
}

/// A `run` rule whose command cannot start is reported, and the sync goes on: it is not
/// mistaken for a lost connection.
#[test]
fn failing_run_rule_is_reported_and_sync_continues() {
    let mut shop = Shop::new("runfail", false);
    std::fs::write(
        shop.path().join("devloop.toml"),
        format!(
            "project = \"{}\"\n[services.api]\nsync = {{ from = \"api\", to = \"/app\" }}\non_change = [{{ paths = [\"*.txt\"], action = \"run\", run = [\"/no/such/command\"] }}, {{ paths = [\"*.md\"], action = \"sync\" }}]\n",
            shop.project
        ),
    )
    .unwrap();
    let log = shop.spawn(&["up", "api", "--no-logs"]);
    wait_for_log(&log, "in sync", Duration::from_secs(240));
    std::fs::write(shop.path().join("api/trigger.txt"), "x").unwrap();
    wait_for_log(&log, "/no/such/command", Duration::from_secs(10));
    std::fs::write(shop.path().join("api/after.md"), "still syncing").unwrap();
    let ok = wait_for(Duration::from_secs(10), || {
        let o = shop.exec("api", &["cat", "/app/after.md"]);
        (String::from_utf8_lossy(&o.stdout) == "still syncing").then_some(())
    });
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        ok.is_some(),
        "sync stopped after a failed run rule:\n{text}"
    );
    assert!(
        !text.contains("connection to the agent lost"),
        "a refusal was taken for a lost connection:\n{text}"
    );
    shop.interrupt_all();
}
