//! Every way an intercept can fail or be cut short, on the real engine: whatever happens,
//! the original ends up serving and nothing of the intercept is left behind, and a second
//! cli never breaks the first one's intercept.

use devloop_tests::*;
use std::process::Child;
use std::time::{Duration, Instant};

/// The original serves, no agent container is left, no intercept is listed.
fn assert_untouched(shop: &Shop, context: &str) {
    let api = shop.container("api");
    let running = docker_ok(&["inspect", "-f", "{{.State.Running}}", &api]);
    assert_eq!(
        running.trim(),
        "true",
        "{context}: the original is not running"
    );
    let agent = format!("{api}-devloop-intercept");
    assert!(
        !docker(&["inspect", &agent]).status.success(),
        "{context}: the agent container {agent} is left behind"
    );
    assert_eq!(
        shop.run_ok(&["intercept", "list"]).trim(),
        "no active intercepts",
        "{context}"
    );
    let answer = wait_for(Duration::from_secs(20), || {
        shop.http_get("web", "http://localhost:8080/api-version")
            .filter(|v| v == "1")
    });
    assert!(
        answer.is_some(),
        "{context}: the original api does not answer"
    );
}

fn wait_exit(child: &mut Child, timeout: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the cli did not exit within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn sigint(child: &Child) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    );
}

fn started_shop(name: &str) -> Shop {
    let mut shop = Shop::new(name, false);
    let up = shop.spawn(&["up", "--no-logs"]);
    wait_for_log(&up, "in sync", Duration::from_secs(240));
    shop.interrupt_all();
    assert!(
        wait_for(Duration::from_secs(20), || shop
            .http_get("web", "http://localhost:8080/api-version")
            .filter(|v| v == "1"))
        .is_some(),
        "the example does not serve"
    );
    shop
}

#[test]
fn a_laptop_command_or_env_file_that_fails_leaves_the_original_serving() {
    let _serial = intercept_lock();
    let shop = started_shop("icptfail");
    let spec = format!("8000:{}", free_port());

    // A typo: refused before anything changes.
    let out = shop.run(&[
        "intercept",
        "api",
        "--port",
        &spec,
        "--",
        "/nonexistent/cmd",
    ]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "a missing command succeeded: {err}");
    assert!(err.contains("cannot run `/nonexistent/cmd`"), "{err}");
    assert_untouched(&shop, "missing command");

    // A file that is executable but cannot be run (no interpreter line): the spawn fails
    // after the swap, and the guard restores.
    let bogus = shop.state.path().join("not-a-program");
    std::fs::write(&bogus, "this is not a program\n").unwrap();
    std::process::Command::new("chmod")
        .args(["755", bogus.to_str().unwrap()])
        .status()
        .unwrap();
    let out = shop.run(&[
        "intercept",
        "api",
        "--port",
        &spec,
        "--",
        bogus.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !out.status.success(),
        "an unrunnable command succeeded: {err}"
    );
    assert!(
        err.contains("starting `") && err.contains("restored"),
        "{err}"
    );
    assert_untouched(&shop, "unrunnable command");

    // An --env-file in a folder that does not exist.
    let out = shop.run(&[
        "intercept",
        "api",
        "--port",
        &spec,
        "--env-file",
        "/nonexistent/dir/api.env",
        "--",
        "sleep",
        "30",
    ]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("--env-file"), "{err}");
    assert_untouched(&shop, "env file");

    // A writable --env-file holds the original's environment, for the user only.
    let env_file = shop.state.path().join("api.env");
    let log = shop.state.path().join("envfile.log");
    let mut cli = spawn_logged(
        shop.cmd(&[
            "intercept",
            "api",
            "--port",
            &spec,
            "--env-file",
            env_file.to_str().unwrap(),
        ]),
        &log,
    );
    wait_for_log(&log, "intercepted in", Duration::from_secs(60));
    let text = std::fs::read_to_string(&env_file).unwrap();
    assert!(text.contains("PORT=8000"), "{text}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&env_file).unwrap().permissions().mode() & 0o777;
    assert_eq!(
        mode, 0o600,
        "the env file (it may hold Secret values) is {mode:o}"
    );
    sigint(&cli);
    assert!(wait_exit(&mut cli, Duration::from_secs(30)).success());
    assert_untouched(&shop, "after Ctrl-C");
}

#[test]
fn a_signal_at_any_moment_of_the_swap_restores_and_the_next_intercept_works() {
    let _serial = intercept_lock();
    let shop = started_shop("icptsig");
    let before = docker_ok(&["inspect", "-f", "{{.Id}}", &shop.container("api")]);
    let spec = format!("8000:{}", free_port());
    let agent = format!("{}-devloop-intercept", shop.container("api"));
    // Signals at several moments: before the swap starts, while the original stops, once
    // the agent container exists, and (SIGTERM) once it is in place.
    for (i, moment) in ["at once", "150 ms", "agent created", "intercepted"]
        .iter()
        .enumerate()
    {
        let log = shop.state.path().join(format!("sig{i}.log"));
        let mut cli = spawn_logged(shop.cmd(&["intercept", "api", "--port", &spec]), &log);
        match *moment {
            "at once" => std::thread::sleep(Duration::from_millis(20)),
            "150 ms" => std::thread::sleep(Duration::from_millis(150)),
            "agent created" => {
                wait_for(Duration::from_secs(30), || {
                    docker(&["inspect", &agent]).status.success().then_some(())
                })
                .expect("the agent container appears");
            }
            _ => wait_for_log(&log, "intercepted in", Duration::from_secs(60)),
        }
        if *moment == "intercepted" {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(cli.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        } else {
            sigint(&cli);
        }
        let status = wait_exit(&mut cli, Duration::from_secs(60));
        let text = std::fs::read_to_string(&log).unwrap();
        // A signal that comes before the cli has installed its handler (in the first few
        // milliseconds, before anything changed) ends it the default way; from then on it
        // restores and exits 0.
        use std::os::unix::process::ExitStatusExt;
        let early = status.signal() == Some(2) && !text.contains("devloop:");
        assert!(
            status.success() || (early && i < 2),
            "signal {moment}: exit {status}:\n{text}"
        );
        assert_untouched(&shop, &format!("signal {moment}:\n{text}"));
    }
    let after = docker_ok(&["inspect", "-f", "{{.Id}}", &shop.container("api")]);
    assert_eq!(before, after, "the original container was replaced");

    // Nothing refuses the next intercept.
    let log = shop.state.path().join("next.log");
    let mut cli = spawn_logged(shop.cmd(&["intercept", "api", "--port", &spec]), &log);
    wait_for_log(&log, "intercepted in", Duration::from_secs(60));
    sigint(&cli);
    assert!(wait_exit(&mut cli, Duration::from_secs(30)).success());
    assert_untouched(&shop, "after the last intercept");
}

#[test]
fn of_two_intercepts_started_together_exactly_one_wins_and_the_loser_breaks_nothing() {
    let _serial = intercept_lock();
    let shop = started_shop("icptrace");
    let port = free_port();
    let script = shop.state.path().join("laptop_api.py");
    std::fs::write(&script, LAPTOP_API).unwrap();
    let spec = format!("8000:{port}");
    let args = || -> Vec<String> {
        vec![
            "intercept".into(),
            "api".into(),
            "--port".into(),
            spec.clone(),
            "--".into(),
            "python3".into(),
            script.to_str().unwrap().into(),
            port.to_string(),
        ]
    };
    for round in 0..3 {
        let logs: Vec<_> = (0..2)
            .map(|i| shop.state.path().join(format!("race{round}-{i}.log")))
            .collect();
        let mut clis: Vec<Child> = (0..2)
            .map(|i| {
                let a = args();
                let a: Vec<&str> = a.iter().map(String::as_str).collect();
                spawn_logged(shop.cmd(&a), &logs[i])
            })
            .collect();
        // The loser exits on its own, non-zero, naming who holds the service.
        let deadline = Instant::now() + Duration::from_secs(60);
        let loser = loop {
            if let Some(i) = (0..2).find(|&i| clis[i].try_wait().unwrap().is_some()) {
                break i;
            }
            assert!(Instant::now() < deadline, "neither cli gave up");
            std::thread::sleep(Duration::from_millis(20));
        };
        let winner = 1 - loser;
        let status = clis[loser].wait().unwrap();
        let text = std::fs::read_to_string(&logs[loser]).unwrap();
        assert!(!status.success(), "the loser succeeded:\n{text}");
        assert!(text.contains("already intercepted (by"), "{text}");
        wait_for_log(&logs[winner], "intercepted in", Duration::from_secs(60));
        // The winner's intercept works after the loser is gone.
        let got = wait_for(Duration::from_secs(20), || {
            shop.http_get("web", "http://localhost:8080/api-version")
                .filter(|v| v == "laptop")
        });
        assert!(
            got.is_some(),
            "round {round}: the winner's intercept is broken:\n{}\nloser:\n{text}",
            std::fs::read_to_string(&logs[winner]).unwrap()
        );
        let list = shop.run_ok(&["intercept", "list"]);
        assert!(list.contains("active, held by pid"), "{list}");
        sigint(&clis[winner]);
        assert!(wait_exit(&mut clis[winner], Duration::from_secs(30)).success());
        assert_untouched(&shop, &format!("round {round}"));
    }
}
