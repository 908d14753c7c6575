//! `devloop up` / `sync` / `status` / `down` against the real engine with examples/shop.

use devloop_tests::*;
use std::time::{Duration, Instant};

/// up -> the system serves -> an edit is served -> status -> down removes everything.
#[test]
fn up_edit_serve_down() {
    let mut shop = Shop::new("loop", false);
    let log = shop.spawn(&["up"]);
    wait_for_log(&log, "in sync", Duration::from_secs(240));
    // web calls api over the project network by its service name.
    let page = wait_for(Duration::from_secs(20), || shop.http_get("web", "http://localhost:8080/api-version"));
    assert_eq!(page.as_deref(), Some("1"), "log:\n{}", std::fs::read_to_string(&log).unwrap());

    // Save a new version of the api: the restart rule restarts it with the new code.
    let app = shop.path().join("api/app.py");
    let text = std::fs::read_to_string(&app).unwrap();
    assert!(text.contains("VERSION = \"1\""));
    let saved = Instant::now();
    std::fs::write(&app, text.replace("VERSION = \"1\"", "VERSION = \"2\"")).unwrap();
    let served = wait_for(Duration::from_secs(20), || shop.http_get("web", "http://localhost:8080/api-version").filter(|v| v == "2"));
    assert!(served.is_some(), "new version not served; log:\n{}", std::fs::read_to_string(&log).unwrap());
    eprintln!("save -> new api version served through web: {:?}", saved.elapsed());

    let status = shop.run_ok(&["status"]);
    assert!(status.contains("syncing (pid"), "{status}");
    assert!(status.contains("running (pid"), "{status}");

    // Ctrl-C: sync stops, containers keep running, status says the tree may be stale.
    let codes = shop.interrupt_all();
    assert!(codes.iter().all(|c| c.success()), "{codes:?}");
    let status = shop.run_ok(&["status"]);
    assert!(status.contains("NOT SYNCING: the container's files may be stale since"), "{status}");
    assert_eq!(docker_ok(&["inspect", "-f", "{{.State.Running}}", &shop.container("api")]), "true");

    let down = shop.run_ok(&["down"]);
    assert!(down.contains("removed container"), "{down}");
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
    std::fs::set_permissions(root.join("run.sh"), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
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
    assert!(arrived.is_some(), "creates did not arrive; log:\n{}", std::fs::read_to_string(&log).unwrap());
    assert!(!check("test -e /app/ignored.pyc"), "an excluded file was synced");

    std::fs::remove_file(root.join("gone.txt")).unwrap();
    std::fs::rename(root.join("pkg"), root.join("pkg2")).unwrap();
    std::fs::set_permissions(root.join("run.sh"), std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let arrived = wait_for(Duration::from_secs(10), || {
        (!check("test -e /app/gone.txt")
            && !check("test -e /app/pkg")
            && check("test \"$(cat /app/pkg2/mod.txt)\" = hello")
            && check("test -d /app/pkg2/empty")
            && !check("test -x /app/run.sh"))
        .then_some(())
    });
    assert!(arrived.is_some(), "deletes/renames/chmod did not arrive; log:\n{}", std::fs::read_to_string(&log).unwrap());
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
    assert!(ok.is_some(), "log:\n{}", std::fs::read_to_string(&log).unwrap());
    let o = shop.exec("api", &["sh", "-c", "ls -a /app | grep -c swp || true"]);
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "0", "editor temp files must not be synced");
    shop.interrupt_all();

    // A laptop that lost its copy of the token (another shell user, a wiped state folder)
    // reads it back from the container through the engine and reaches the agent again.
    std::fs::remove_dir_all(shop.state.path().join("tokens")).unwrap();
    let status = shop.run_ok(&["status"]);
    assert!(status.contains("running (pid"), "{status}");
    assert!(shop.state.path().join("tokens").join(shop.container("api")).is_file());
}
