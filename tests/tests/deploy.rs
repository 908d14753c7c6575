//! `devloop deploy` on the real engine: snapshot, rollout, same tree same tag, deletions
//! reach the image, a failing version never takes over.

use devloop_tests::*;
use std::time::Duration;

fn image_of(shop: &Shop, service: &str) -> String {
    docker_ok(&[
        "inspect",
        "-f",
        "{{.Config.Image}}",
        &shop.container(service),
    ])
}

#[test]
fn deploy_change_deploy_and_same_tree_same_tag() {
    let shop = Shop::new("deploy", false);
    let port = shop.publish_web_on_free_port();
    let out = shop.run(&["deploy"]);
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("deployed devloop-"), "{text}");
    let served = wait_for(Duration::from_secs(10), || {
        shop.http_get("web", "http://localhost:8080/api-version")
    });
    assert_eq!(served.as_deref(), Some("1"), "{text}");
    let first = image_of(&shop, "api");

    // Unchanged tree: a no-op with the same tag.
    let text = shop.run_ok(&["deploy", "api"]) + "";
    let again = shop.run(&["deploy", "api"]);
    let again_text = String::from_utf8_lossy(&again.stdout).to_string()
        + &String::from_utf8_lossy(&again.stderr);
    assert!(again_text.contains("unchanged"), "{text}\n{again_text}");
    assert_eq!(image_of(&shop, "api"), first);

    // A change and a deleted file: a new tag, served, and the file is gone from the image.
    std::fs::write(shop.path().join("api/extra.txt"), "temporary").unwrap();
    shop.run_ok(&["deploy", "api"]);
    let with_extra = image_of(&shop, "api");
    assert_ne!(with_extra, first);
    assert!(shop
        .exec("api", &["test", "-f", "/app/extra.txt"])
        .status
        .success());
    std::fs::remove_file(shop.path().join("api/extra.txt")).unwrap();
    let app = shop.path().join("api/app.py");
    std::fs::write(
        &app,
        std::fs::read_to_string(&app)
            .unwrap()
            .replace("VERSION = \"1\"", "VERSION = \"2\""),
    )
    .unwrap();
    shop.run_ok(&["deploy", "api"]);
    let second = image_of(&shop, "api");
    assert_ne!(second, with_extra);
    let served = wait_for(Duration::from_secs(10), || {
        shop.http_get("web", "http://localhost:8080/api-version")
            .filter(|v| v == "2")
    });
    assert!(served.is_some(), "the new version is not served");
    // Through the host port, which the relay holds across rollouts.
    let url = format!("http://127.0.0.1:{port}/api-version");
    assert_eq!(
        wait_for(Duration::from_secs(5), || laptop_get(&url)).as_deref(),
        Some("2")
    );
    let listing = docker_ok(&["run", "--rm", "--entrypoint", "ls", &second, "/app"]);
    assert!(
        !listing.contains("extra.txt"),
        "a file deleted on the laptop is still in the image: {listing}"
    );
    assert!(listing.contains("app.py"), "{listing}");
    // The image holds nothing of devloop.
    let root = docker_ok(&["run", "--rm", "--entrypoint", "ls", &second, "-a", "/"]);
    assert!(!root.contains(".devloop"), "{root}");

    let status = shop.run_ok(&["status"]);
    assert!(status.contains("deployed version"), "{status}");

    // Going back to the first tree gives the first tag again.
    std::fs::write(
        &app,
        std::fs::read_to_string(&app)
            .unwrap()
            .replace("VERSION = \"2\"", "VERSION = \"1\""),
    )
    .unwrap();
    shop.run_ok(&["deploy", "api"]);
    assert_eq!(
        image_of(&shop, "api"),
        first,
        "the same tree must give the same tag"
    );
}

#[test]
fn a_version_that_fails_its_health_check_never_takes_over() {
    let shop = Shop::new("unhealthy", false);
    shop.run_ok(&["deploy", "api"]);
    let good = image_of(&shop, "api");
    // A version that crashes at start.
    let app = shop.path().join("api/app.py");
    std::fs::write(&app, "raise SystemExit('broken on purpose')\n").unwrap();
    let out = shop.run(&["deploy", "api", "--health-timeout", "5s"]);
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("did not become healthy") && text.contains("broken on purpose"),
        "{text}"
    );
    assert_eq!(
        image_of(&shop, "api"),
        good,
        "the old version must keep running"
    );
    let items = wait_for(Duration::from_secs(5), || {
        shop.http_get("api", "http://localhost:8000/items")
    });
    assert!(items.is_some(), "the old version stopped serving");
}

#[test]
fn history_and_rollback() {
    let shop = Shop::new("rollback", false);
    std::fs::write(
        shop.path().join("devloop.toml"),
        std::fs::read_to_string(shop.path().join("devloop.toml"))
            .unwrap()
            .replacen("\n", "\n[deploy]\nkeep = 2\n", 1),
    )
    .unwrap();
    let app = shop.path().join("api/app.py");
    let original = std::fs::read_to_string(&app).unwrap();
    let mut images = Vec::new();
    for v in ["1", "2", "3"] {
        std::fs::write(
            &app,
            original.replace("VERSION = \"1\"", &format!("VERSION = \"{v}\"")),
        )
        .unwrap();
        shop.run_ok(&["deploy", "api"]);
        images.push(image_of(&shop, "api"));
    }
    let history = shop.run_ok(&["history", "api"]);
    // A reader that stops early (`devloop history api | head -1`) ends the output, quietly.
    let mut piped = shop
        .cmd(&["history", "api"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(piped.stdout.take());
    let o = piped.wait_with_output().unwrap();
    assert!(
        o.status.success() && !String::from_utf8_lossy(&o.stderr).contains("panicked"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let lines: Vec<&str> = history
        .lines()
        .filter(|l| l.starts_with("* ") || l.starts_with("  "))
        .collect();
    assert_eq!(lines.len(), 2, "keep = 2 keeps two versions:\n{history}");
    assert!(
        lines[0].starts_with('*') && lines[0].contains("1 changed: app.py"),
        "{history}"
    );
    // The oldest version's image was pruned.
    assert!(
        !docker(&["image", "inspect", &images[0]]).status.success(),
        "version 1 was not pruned"
    );

    let out = shop.run_ok(&["rollback", "api"]);
    let _ = out;
    assert_eq!(image_of(&shop, "api"), images[1]);
    let served = wait_for(Duration::from_secs(10), || {
        shop.http_get("api", "http://localhost:8000/items")
            .filter(|t| t.contains("\"version\": \"2\"") || t.contains("\"version\":\"2\""))
    });
    assert!(
        served.is_some(),
        "version 2 is not served after the rollback"
    );
    let history = shop.run_ok(&["history", "api"]);
    // A reader that stops early (`devloop history api | head -1`) ends the output, quietly.
    let mut piped = shop
        .cmd(&["history", "api"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(piped.stdout.take());
    let o = piped.wait_with_output().unwrap();
    assert!(
        o.status.success() && !String::from_utf8_lossy(&o.stderr).contains("panicked"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        history
            .lines()
            .find(|l| l.starts_with('*'))
            .is_some_and(|l| l.contains("rollback")),
        "{history}"
    );
}

/// `watch`: a save redeploys (per the rule), a broken save leaves the last good version
/// serving and says why, and the fix goes out on the next save.
#[test]
fn watch_redeploys_on_save_and_survives_a_broken_one() {
    let mut shop = Shop::new("watch", false);
    std::fs::write(
        shop.path().join("devloop.toml"),
        format!(
            "project = \"{}\"\n[services.api]\nsync = {{ from = \"api\", to = \"/app\" }}\nexclude = [\"__pycache__/\"]\non_change = [{{ paths = [\"**/*.py\"], action = \"redeploy\" }}]\n",
            shop.project
        ),
    )
    .unwrap();
    let log = shop.spawn(&["watch", "api", "--no-logs", "--health-timeout", "5s"]);
    wait_for_log(&log, "deployed devloop-", Duration::from_secs(240));
    wait_for_log(&log, "in sync", Duration::from_secs(30));
    let first = image_of(&shop, "api");

    let app = shop.path().join("api/app.py");
    let original = std::fs::read_to_string(&app).unwrap();
    std::fs::write(&app, original.replace("VERSION = \"1\"", "VERSION = \"2\"")).unwrap();
    let new_image = wait_for(Duration::from_secs(30), || {
        let img = image_of(&shop, "api");
        (img != first).then_some(img)
    });
    assert!(
        new_image.is_some(),
        "no redeploy after a save:\n{}",
        std::fs::read_to_string(&log).unwrap()
    );
    let served = wait_for(Duration::from_secs(10), || {
        shop.http_get("api", "http://localhost:8000/items")
            .filter(|t| t.contains("\"2\""))
    });
    assert!(served.is_some(), "the redeployed version is not served");
    let good = image_of(&shop, "api");

    std::fs::write(&app, "raise SystemExit('broken on purpose')\n").unwrap();
    wait_for_log(&log, "redeploy failed", Duration::from_secs(60));
    assert_eq!(image_of(&shop, "api"), good, "a broken version took over");
    assert!(
        shop.http_get("api", "http://localhost:8000/items")
            .is_some(),
        "the last good version stopped serving"
    );

    std::fs::write(&app, original.replace("VERSION = \"1\"", "VERSION = \"3\"")).unwrap();
    let served = wait_for(Duration::from_secs(60), || {
        shop.http_get("api", "http://localhost:8000/items")
            .filter(|t| t.contains("\"3\""))
    });
    assert!(
        served.is_some(),
        "the fix did not go out:\n{}",
        std::fs::read_to_string(&log).unwrap()
    );
    let codes = shop.interrupt_all();
    assert!(codes.iter().all(|c| c.success()), "{codes:?}");
}

/// With a HEALTHCHECK in the image, that check decides, not the port: a version whose port
/// answers but whose health endpoint fails never takes over.
#[test]
fn the_image_healthcheck_decides() {
    let shop = Shop::new("healthcheck", false);
    let dockerfile = shop.path().join("api/Dockerfile");
    let text = std::fs::read_to_string(&dockerfile).unwrap();
    std::fs::write(
        &dockerfile,
        format!("{text}HEALTHCHECK CMD python3 -c \"import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=1)\"\n"),
    )
    .unwrap();
    shop.run_ok(&["deploy", "api"]);
    let good = image_of(&shop, "api");
    let app = shop.path().join("api/app.py");
    let original = std::fs::read_to_string(&app).unwrap();
    assert!(original.contains("if path == \"/health\":"));
    // The port still answers, but /health is now a 404.
    std::fs::write(
        &app,
        original.replace("if path == \"/health\":", "if path == \"/healthz\":"),
    )
    .unwrap();
    let out = shop.run(&["deploy", "api", "--health-timeout", "4s"]);
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("health check"), "{text}");
    assert_eq!(image_of(&shop, "api"), good);
}

/// The base is built again when the Dockerfile or a declared build input changes, and only
/// then; a RUN that needs the input runs before the COPY of the synced folder.
#[test]
fn a_changed_build_input_rebuilds_the_base() {
    let shop = Shop::new("inputs", false);
    std::fs::write(shop.path().join("api/deps.txt"), "one\n").unwrap();
    std::fs::write(
        shop.path().join("api/Dockerfile"),
        "FROM python:3.11-slim-bookworm\nWORKDIR /app\nCOPY deps.txt /deps.txt\nRUN cp /deps.txt /installed.txt\nCOPY . /app\nENV PYTHONUNBUFFERED=1\nCMD [\"python3\", \"app.py\"]\n",
    )
    .unwrap();
    let cfg = shop.path().join("devloop.toml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        text.replacen(
            "[services.api]\n",
            "[services.api]\nbuild_inputs = [\"deps.txt\"]\n",
            1,
        ),
    )
    .unwrap();

    let first = shop.run(&["deploy", "api"]);
    let out = String::from_utf8_lossy(&first.stdout).to_string()
        + &String::from_utf8_lossy(&first.stderr);
    assert!(
        first.status.success() && out.contains("building the snapshot base"),
        "{out}"
    );
    // A change of the app only: no base build.
    let app = shop.path().join("api/app.py");
    std::fs::write(
        &app,
        std::fs::read_to_string(&app)
            .unwrap()
            .replace("VERSION = \"1\"", "VERSION = \"2\""),
    )
    .unwrap();
    let out = shop.run_ok(&["deploy", "api"]);
    assert!(!out.contains("building the snapshot base"), "{out}");
    // A change of the declared input: the base is built again and the image holds its effect.
    std::fs::write(shop.path().join("api/deps.txt"), "two\n").unwrap();
    let out = shop.run_ok(&["deploy", "api"]);
    assert!(out.contains("building the snapshot base"), "{out}");
    assert_eq!(
        String::from_utf8_lossy(&shop.exec("api", &["cat", "/installed.txt"]).stdout),
        "two\n"
    );
}

/// Runs `deploy api` until it reaches the failpoint `point`, then kills it (SIGKILL).
fn deploy_killed_at(shop: &Shop, point: &str, log: &std::path::Path) {
    let mut c = shop.cmd(&["deploy", "api"]);
    c.env("DEVLOOP_FAILPOINT", point);
    let mut cli = spawn_logged(c, log);
    wait_for_log(log, &format!("failpoint {point}"), Duration::from_secs(120));
    cli.kill().unwrap();
    cli.wait().unwrap();
}

/// A deploy killed (SIGKILL) at each step of its switch is finished or undone by the next
/// command: `status` names what was left, the next `deploy` never answers "unchanged" while
/// the service does not serve under its own name, and `up` leaves no stale version beside
/// the dev container.
#[test]
fn a_deploy_killed_at_any_step_is_finished_or_undone_by_the_next_command() {
    let shop = Shop::new("deploykill", false);
    let port = shop.publish_web_on_free_port();
    shop.run_ok(&["deploy"]);
    let app = shop.path().join("api/app.py");
    let original = std::fs::read_to_string(&app).unwrap();
    let canonical = shop.container("api");
    for (i, point) in ["deploy:healthy", "deploy:old-removed", "deploy:renamed"]
        .iter()
        .enumerate()
    {
        let version = format!("{}", 10 + i);
        std::fs::write(
            &app,
            original.replace("VERSION = \"1\"", &format!("VERSION = \"{version}\"")),
        )
        .unwrap();
        deploy_killed_at(
            &shop,
            point,
            &shop.state.path().join(format!("kill{i}.log")),
        );
        let leftovers: Vec<String> = docker_ok(&[
            "ps",
            "-a",
            "--filter",
            &format!("label=dev.devloop.project={}", shop.project),
            "--filter",
            "label=dev.devloop.service=api",
            "--format",
            "{{.Names}}",
        ])
        .lines()
        .map(String::from)
        .filter(|n| n.starts_with(&canonical) && n != &canonical && !n.ends_with("-ports"))
        .collect();
        if *point != "deploy:renamed" {
            assert_eq!(leftovers.len(), 1, "{point}: {leftovers:?}");
            let status = shop.run_ok(&["status"]);
            assert!(
                status.contains("an interrupted deploy left"),
                "{point}: status does not say what it found:\n{status}"
            );
        }
        // The next deploy of the same tree finishes the job: the version serves under the
        // service's own name, through the published port too, with nothing beside it.
        let out = shop.run_ok(&["deploy", "api"]);
        let names = docker_ok(&["ps", "--format", "{{.Names}}"]);
        assert!(
            names.lines().any(|n| n == canonical),
            "{point}: {canonical} does not run:\n{out}\n{names}"
        );
        assert!(
            !names
                .lines()
                .any(|n| n.starts_with(&format!("{canonical}-")) && !n.ends_with("-ports")),
            "{point}: a staging container is left:\n{names}"
        );
        let url = format!("http://127.0.0.1:{port}/api-version");
        assert_eq!(
            wait_for(Duration::from_secs(20), || laptop_get(&url)
                .filter(|v| v == &version))
            .as_deref(),
            Some(version.as_str()),
            "{point}: the new version is not served after the next deploy:\n{out}"
        );
    }

    // Killed beside the running version, then `up`: the dev container serves alone.
    std::fs::write(
        &app,
        original.replace("VERSION = \"1\"", "VERSION = \"20\""),
    )
    .unwrap();
    deploy_killed_at(
        &shop,
        "deploy:healthy",
        &shop.state.path().join("kill-up.log"),
    );
    let mut shop = shop;
    let up = shop.spawn(&["up", "api", "--no-logs"]);
    wait_for_log(&up, "in sync", Duration::from_secs(120));
    let names = docker_ok(&["ps", "-a", "--format", "{{.Names}}"]);
    assert!(
        !names
            .lines()
            .any(|n| n.starts_with(&format!("{canonical}-")) && !n.ends_with("-ports")),
        "up left the interrupted deploy's version beside the dev container:\n{names}"
    );
    shop.interrupt_all();
}
