//! `devloop up` / `sync` / `status` / `down` against the real engine with examples/shop.

use devloop_tests::*;
use std::time::{Duration, Instant};

/// up -> the system serves -> an edit is served -> status -> down removes everything (a
/// network a foreign container holds only once that container is gone).
#[test]
fn up_edit_serve_down() {
    let mut shop = Shop::new("loop", false);
    let log = shop.spawn(&["up"]);
    wait_for_log(&log, "in sync", Duration::from_secs(240));
    // web calls api over the project network by its service name.
    let page = wait_for(Duration::from_secs(20), || {
        shop.http_get("web", "http://localhost:8080/api-version")
    });
    assert_eq!(
        page.as_deref(),
        Some("1"),
        "log:\n{}",
        std::fs::read_to_string(&log).unwrap()
    );

    // Save a new version of the api: the restart rule restarts it with the new code.
    let app = shop.path().join("api/app.py");
    let text = std::fs::read_to_string(&app).unwrap();
    assert!(text.contains("VERSION = \"1\""));
    let saved = Instant::now();
    std::fs::write(&app, text.replace("VERSION = \"1\"", "VERSION = \"2\"")).unwrap();
    let served = wait_for(Duration::from_secs(20), || {
        shop.http_get("web", "http://localhost:8080/api-version")
            .filter(|v| v == "2")
    });
    assert!(
        served.is_some(),
        "new version not served; log:\n{}",
        std::fs::read_to_string(&log).unwrap()
    );
    eprintln!(
        "save -> new api version served through web: {:?}",
        saved.elapsed()
    );

    let status = shop.run_ok(&["status"]);
    assert!(status.contains("syncing (pid"), "{status}");
    assert!(status.contains("running (pid"), "{status}");

    // Ctrl-C: sync stops, containers keep running, status says the tree may be stale.
    let codes = shop.interrupt_all();
    assert!(codes.iter().all(|c| c.success()), "{codes:?}");
    let status = shop.run_ok(&["status"]);
    assert!(
        status.contains("NOT SYNCING: the container's files may be stale since"),
        "{status}"
    );
    assert_eq!(
        docker_ok(&[
            "inspect",
            "-f",
            "{{.State.Running}}",
            &shop.container("api")
        ]),
        "true"
    );

    // A container of the user's own on the project network: down removes devloop's and
    // keeps the network, naming what holds it, instead of failing half-way.
    let network = format!("devloop-{}", shop.project);
    let foreign = format!("{}-foreign", shop.project);
    docker_ok(&[
        "run",
        "-d",
        "--name",
        &foreign,
        "--network",
        &network,
        "python:3.11-slim-bookworm",
        "sleep",
        "300",
    ]);
    let down = shop.run(&["down"]);
    docker_ok(&["rm", "-f", &foreign]);
    let text =
        String::from_utf8_lossy(&down.stdout).to_string() + &String::from_utf8_lossy(&down.stderr);
    assert!(down.status.success(), "{text}");
    assert!(
        text.contains("removed container")
            && text.contains(&format!(
                "kept network {network}: {foreign} not made by devloop"
            )),
        "{text}"
    );
    let down = shop.run_ok(&["down"]);
    assert!(
        down.contains(&format!("removed network {network}")),
        "{down}"
    );
    assert_eq!(shop.leftovers(), Vec::<String>::new());
}

/// Deletes, renames, symlinks, the exec bit, empty folders and ignored files, as a user
/// would make them on the laptop, all arrive (or, for ignored files, do not).
#[test]
fn file_kinds_arrive() {
    let mut shop = Shop::new("kinds", false);
    let log = shop.spawn(&["up", "api", "--no-logs"]);
    wait_for_log(&log, "in sync", Duration::from_secs(240));
    let root = shop.path().join("api");
    std::fs::create_dir_all(root.join("pkg/empty")).unwrap();
    std::fs::write(root.join("pkg/mod.txt"), "hello").unwrap();
    std::fs::write(root.join("run.sh"), "#!/bin/sh\necho ran\n").unwrap();
    std::fs::set_permissions(
        root.join("run.sh"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    std::os::unix::fs::symlink("pkg/mod.txt", root.join("link")).unwrap();
    std::fs::write(root.join("gone.txt"), "x").unwrap();
    std::fs::write(root.join("ignored.pyc"), "x").unwrap();

    let check = |cmd: &str| shop.exec("api", &["sh", "-c", cmd]).status.success();
    let arrived = wait_for(Duration::from_secs(10), || {
        (check("test -d /app/pkg/empty")
            && check("test \"$(cat /app/pkg/mod.txt)\" = hello")
            && check("test -x /app/run.sh")
            && check("test \"$(readlink /app/link)\" = pkg/mod.txt")
            && check("test -f /app/gone.txt"))
        .then_some(())
    });
    assert!(
        arrived.is_some(),
        "creates did not arrive; log:\n{}",
        std::fs::read_to_string(&log).unwrap()
    );
    assert!(
        !check("test -e /app/ignored.pyc"),
        "an excluded file was synced"
    );

    std::fs::remove_file(root.join("gone.txt")).unwrap();
    std::fs::rename(root.join("pkg"), root.join("pkg2")).unwrap();
    std::fs::set_permissions(
        root.join("run.sh"),
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .unwrap();
    let arrived = wait_for(Duration::from_secs(10), || {
        (!check("test -e /app/gone.txt")
            && !check("test -e /app/pkg")
            && check("test \"$(cat /app/pkg2/mod.txt)\" = hello")
            && check("test -d /app/pkg2/empty")
            && !check("test -x /app/run.sh"))
        .then_some(())
    });
    assert!(
        arrived.is_some(),
        "deletes/renames/chmod did not arrive; log:\n{}",
        std::fs::read_to_string(&log).unwrap()
    );
    shop.interrupt_all();
}

/// Editors' atomic saves: write a temp file, rename it over the original.
#[test]
fn atomic_rename_save_arrives() {
    let mut shop = Shop::new("atomic", false);
    let log = shop.spawn(&["up", "api", "--no-logs"]);
    wait_for_log(&log, "in sync", Duration::from_secs(240));
    let root = shop.path().join("api");
    for i in 0..5 {
        let tmp = root.join(format!(".notes.txt.swp{i}"));
        std::fs::write(&tmp, format!("version {i}")).unwrap();
        std::fs::rename(&tmp, root.join("notes.txt")).unwrap();
        std::thread::sleep(Duration::from_millis(30));
    }
    let ok = wait_for(Duration::from_secs(10), || {
        let o = shop.exec("api", &["cat", "/app/notes.txt"]);
        (String::from_utf8_lossy(&o.stdout) == "version 4").then_some(())
    });
    assert!(
        ok.is_some(),
        "log:\n{}",
        std::fs::read_to_string(&log).unwrap()
    );
    let o = shop.exec("api", &["sh", "-c", "ls -a /app | grep -c swp || true"]);
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        "0",
        "editor temp files must not be synced"
    );
    shop.interrupt_all();

    // A laptop that lost its copy of the token (another shell user, a wiped state folder)
    // reads it back from the container through the engine and reaches the agent again.
    std::fs::remove_dir_all(shop.state.path().join("tokens")).unwrap();
    let status = shop.run_ok(&["status"]);
    assert!(status.contains("running (pid"), "{status}");
    assert!(shop
        .state
        .path()
        .join("tokens")
        .join(shop.container("api"))
        .is_file());
}

/// `devloop sync SVC` after `up` has ended: the container is reused and the sync resumes,
/// and status tells syncing from stale.
#[test]
fn sync_command_resumes_a_stopped_sync() {
    let mut shop = Shop::new("resume", false);
    let log = shop.spawn(&["up", "api", "--no-logs"]);
    wait_for_log(&log, "in sync", Duration::from_secs(240));
    shop.interrupt_all();
    // Edited while nobody syncs: the container cannot know yet.
    std::fs::write(
        shop.path().join("api/offline.txt"),
        "edited while not syncing",
    )
    .unwrap();
    let status = shop.run_ok(&["status"]);
    assert!(status.contains("NOT SYNCING"), "{status}");

    let log = shop.spawn(&["sync", "api", "--no-logs"]);
    wait_for_log(&log, "in sync", Duration::from_secs(30));
    let o = shop.exec("api", &["cat", "/app/offline.txt"]);
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "edited while not syncing",
        "the reconcile missed an offline edit"
    );
    let status = shop.run_ok(&["status"]);
    assert!(status.contains("syncing (pid"), "{status}");
    // A second sync of the same service is refused while one runs.
    let second = shop.run(&["sync", "api"]);
    assert!(!second.status.success());
    assert!(
        String::from_utf8_lossy(&second.stderr).contains("already syncing"),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
    shop.interrupt_all();

    // `up` again reuses the running container.
    let log = shop.spawn(&["up", "api", "--no-logs"]);
    wait_for_log(&log, "in sync", Duration::from_secs(60));
    assert!(
        std::fs::read_to_string(&log).unwrap().contains("devloop-")
            && std::fs::read_to_string(&log)
                .unwrap()
                .contains(" running (")
    );
    shop.interrupt_all();
}

/// `doctor` passes on a healthy project and, for each problem, fails naming the fix.
#[test]
fn doctor_names_problems_and_fixes() {
    let shop = Shop::new("doctor", false);
    let out = shop.run_ok(&["doctor"]);
    assert!(out.contains("ok    docker engine"), "{out}");
    assert!(out.contains("ok    agent binary"), "{out}");
    assert!(out.contains("all checks passed"), "{out}");

    // A typo in devloop.toml: named with file, line and key.
    let cfg = shop.path().join("devloop.toml");
    let good = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        format!(
            "{good}\n[services.extra]\nimage = \"python:3.11-slim-bookworm\"\nexlcude = [\"x\"]\n"
        ),
    )
    .unwrap();
    let o = shop.run(&["doctor"]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(!o.status.success());
    assert!(
        text.contains("FAIL  config")
            && text.contains("devloop.toml")
            && text.contains("exlcude")
            && text.contains("line"),
        "{text}"
    );
    std::fs::write(&cfg, &good).unwrap();

    // A port in use by something else.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let compose = shop.path().join("docker-compose.yml");
    let text = std::fs::read_to_string(&compose).unwrap();
    std::fs::write(
        &compose,
        text.replace(
            "    build: ./web\n",
            &format!("    build: ./web\n    ports: [\"127.0.0.1:{port}:8080\"]\n"),
        ),
    )
    .unwrap();
    let o = shop.run(&["doctor"]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(!o.status.success(), "{text}");
    assert!(
        text.contains(&format!("FAIL  web port {port}")) && text.contains("fix:"),
        "{text}"
    );

    // No agent binary.
    let o = shop
        .cmd(&["doctor"])
        .env("DEVLOOP_AGENT_BIN", "/nonexistent/devloop-agent")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(!o.status.success());
    assert!(text.contains("agent binary"), "{text}");
}

/// A Dockerfile whose base image cannot be pulled (no registry here) and is not on the
/// engine: `devloop up` builds an equivalent from Debian's packages by itself, then the
/// service runs on it.
#[test]
fn a_missing_public_base_is_built_offline() {
    let mut shop = Shop::new("offline", false);
    // debian:bookworm-slim is used by no other test; remove it so the path is taken.
    let _ = docker(&["rmi", "-f", "debian:bookworm-slim"]);
    std::fs::create_dir_all(shop.path().join("plain")).unwrap();
    std::fs::write(
        shop.path().join("plain/Dockerfile"),
        "FROM debian:bookworm-slim\nWORKDIR /srv\nCOPY . /srv\nCMD [\"sleep\", \"infinity\"]\n",
    )
    .unwrap();
    std::fs::write(shop.path().join("plain/hello.txt"), "hi").unwrap();
    std::fs::write(
        shop.path().join("devloop.toml"),
        format!("project = \"{}\"\n[services.plain]\nbuild = {{ context = \"plain\" }}\nsync = {{ from = \"plain\", to = \"/srv\" }}\n", shop.project),
    )
    .unwrap();
    std::fs::remove_file(shop.path().join("docker-compose.yml")).unwrap();
    let log = shop.spawn(&["up", "--no-logs"]);
    wait_for_log(&log, "in sync", Duration::from_secs(600));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("building an equivalent from Debian packages"),
        "{text}"
    );
    let label = docker_ok(&[
        "image",
        "inspect",
        "-f",
        "{{index .Config.Labels \"dev.devloop.offline-base\"}}",
        "debian:bookworm-slim",
    ]);
    assert_eq!(label, "true");
    assert_eq!(
        String::from_utf8_lossy(&shop.exec("plain", &["cat", "/srv/hello.txt"]).stdout),
        "hi"
    );
    shop.interrupt_all();
}

/// An image whose `USER` is not root: the agent runs as that user, reads its token, writes
/// the synced tree into the volume, and the service serves and follows edits.
#[test]
fn an_image_running_as_a_non_root_user_serves_and_syncs() {
    let mut shop = Shop::new("nonroot", false);
    let dockerfile = shop.path().join("api/Dockerfile");
    let text = std::fs::read_to_string(&dockerfile).unwrap();
    std::fs::write(&dockerfile, format!("{text}USER 1000:1000\n")).unwrap();
    let log = shop.spawn(&["up", "--no-logs"]);
    wait_for_log(&log, "in sync", Duration::from_secs(240));
    let page = wait_for(Duration::from_secs(20), || {
        shop.http_get("web", "http://localhost:8080/api-version")
    });
    assert_eq!(
        page.as_deref(),
        Some("1"),
        "log:\n{}",
        std::fs::read_to_string(&log).unwrap()
    );
    let uid = shop.exec("api", &["python3", "-c", "import os; print(os.getuid())"]);
    assert_eq!(String::from_utf8_lossy(&uid.stdout).trim(), "1000");

    let app = shop.path().join("api/app.py");
    let text = std::fs::read_to_string(&app).unwrap();
    std::fs::write(&app, text.replace("VERSION = \"1\"", "VERSION = \"2\"")).unwrap();
    let served = wait_for(Duration::from_secs(20), || {
        shop.http_get("web", "http://localhost:8080/api-version")
            .filter(|v| v == "2")
    });
    assert!(
        served.is_some(),
        "the edit is not served; log:\n{}",
        std::fs::read_to_string(&log).unwrap()
    );
    shop.interrupt_all();
}

/// A sync volume that fills up: the edit that does not fit is reported as failed, nothing
/// half-written is left in the container, and the sync goes on once space is freed.
#[test]
fn a_full_sync_volume_fails_the_edit_cleanly_and_the_sync_goes_on() {
    let mut shop = Shop::new("fullvol", false);
    // The tree's volume, made beforehand as a 2 MiB tmpfs under the name devloop uses.
    let volume = format!("devloop-{}-api-tree", shop.project);
    docker_ok(&[
        "volume",
        "create",
        "--label",
        "dev.devloop.managed=true",
        "--label",
        &format!("dev.devloop.project={}", shop.project),
        "--label",
        &format!("dev.devloop.test-run={}", shop.project),
        "--opt",
        "type=tmpfs",
        "--opt",
        "device=tmpfs",
        "--opt",
        "o=size=2m",
        &volume,
    ]);
    let log = shop.spawn(&["up", "api", "--no-logs"]);
    wait_for_log(&log, "in sync", Duration::from_secs(240));

    // 3 MiB cannot fit.
    let big = shop.path().join("api/big.bin");
    std::fs::write(&big, vec![7u8; 3 * 1024 * 1024]).unwrap();
    wait_for_log(&log, "refused part of the sync", Duration::from_secs(20));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("big.bin") && text.to_lowercase().contains("space"),
        "the failure does not name the file and the cause:\n{text}"
    );
    // Nothing half-written: no part of big.bin and no temporary file in the container.
    let listing = shop.exec("api", &["ls", "-a", "/app"]);
    let listing = String::from_utf8_lossy(&listing.stdout).to_string();
    assert!(
        !listing.contains("big.bin") && !listing.contains(".devloop-tmp"),
        "a partial file is left: {listing}"
    );
    let status = shop.run_ok(&["status"]);
    assert!(
        status.contains("big.bin"),
        "status does not say what failed:\n{status}"
    );

    // Space freed on the laptop side: the next edit arrives.
    std::fs::remove_file(&big).unwrap();
    std::fs::write(shop.path().join("api/after.txt"), "fits").unwrap();
    let arrived = wait_for(Duration::from_secs(20), || {
        let o = shop.exec("api", &["cat", "/app/after.txt"]);
        (String::from_utf8_lossy(&o.stdout).trim() == "fits").then_some(())
    });
    assert!(
        arrived.is_some(),
        "the sync did not go on after space was freed:\n{}",
        std::fs::read_to_string(&log).unwrap()
    );
    shop.interrupt_all();
}
