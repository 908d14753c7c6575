//! Intercept on the real engine with the example system: the service's callers reach a
//! process on the laptop, and `leave` (also after the cli was killed) brings the very same
//! container back with the same configuration.

use devloop_tests::*;
use std::process::{Command, Stdio};
use std::time::Duration;

/// The parts of `docker inspect` that an intercept must leave exactly as they were.
fn config_of(container: &str) -> serde_json::Value {
    let out = docker_ok(&["inspect", container]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let c = &v[0];
    let mut networks = serde_json::Map::new();
    for (name, ep) in c["NetworkSettings"]["Networks"].as_object().unwrap() {
        let mut aliases: Vec<String> = ep["Aliases"]
            .as_array()
            .map(|a| a.iter().map(|x| x.as_str().unwrap().to_string()).collect())
            .unwrap_or_default();
        aliases.sort();
        networks.insert(name.clone(), serde_json::json!(aliases));
    }
    // The engine lists mounts in no fixed order: compare them sorted.
    let mut mounts: Vec<serde_json::Value> = c["Mounts"].as_array().cloned().unwrap_or_default();
    mounts.sort_by_key(|m| m["Destination"].as_str().unwrap_or_default().to_string());
    serde_json::json!({
        "id": c["Id"], "name": c["Name"], "image": c["Config"]["Image"], "cmd": c["Config"]["Cmd"],
        "entrypoint": c["Config"]["Entrypoint"], "env": c["Config"]["Env"], "labels": c["Config"]["Labels"],
        "workdir": c["Config"]["WorkingDir"], "user": c["Config"]["User"], "exposed": c["Config"]["ExposedPorts"],
        "bindings": c["HostConfig"]["PortBindings"], "mounts": mounts, "restart": c["HostConfig"]["RestartPolicy"],
        "networks": networks,
    })
}

#[test]
fn web_reaches_the_laptop_and_leave_restores() {
    let _serial = intercept_lock();
    let mut shop = Shop::new("icpt", false);
    let up = shop.spawn(&["up", "--no-logs"]);
    wait_for_log(&up, "in sync", Duration::from_secs(240));
    assert_eq!(
        wait_for(Duration::from_secs(20), || shop
            .http_get("web", "http://localhost:8080/api-version"))
        .as_deref(),
        Some("1")
    );
    let before = config_of(&shop.container("api"));

    let port = free_port();
    let script = shop.state.path().join("laptop_api.py");
    std::fs::write(&script, LAPTOP_API).unwrap();
    let spec = format!("8000:{port}");
    let log = shop.spawn(&[
        "intercept",
        "api",
        "--port",
        &spec,
        "--",
        "python3",
        script.to_str().unwrap(),
        &port.to_string(),
    ]);
    wait_for_log(&log, "intercepted in", Duration::from_secs(60));
    let got = wait_for(Duration::from_secs(20), || {
        shop.http_get("web", "http://localhost:8080/api-version")
            .filter(|v| v == "laptop")
    });
    assert!(
        got.is_some(),
        "web does not reach the laptop process:\n{}",
        std::fs::read_to_string(&log).unwrap()
    );
    // The engine runs on this machine: the cli hands the agent its connections to the
    // laptop, rather than tunnelling them.
    wait_for_log(&log, "reach the laptop directly", Duration::from_secs(10));
    assert!(std::fs::read_to_string(&log)
        .unwrap()
        .contains("connections handed to the laptop directly"));
    // With the handoff socket gone, the agent tunnels connections instead: callers still
    // reach the laptop.
    let handoffs = shop.state.path().join("handoff");
    for dir in std::fs::read_dir(&handoffs).unwrap().flatten() {
        std::fs::remove_file(dir.path().join("handoff.sock")).unwrap();
    }
    for _ in 0..3 {
        assert_eq!(
            shop.http_get("web", "http://localhost:8080/api-version")
                .as_deref(),
            Some("laptop"),
            "no fallback to the tunnel"
        );
    }
    let agent_logs = String::from_utf8_lossy(
        &docker(&[
            "logs",
            &format!("{}-devloop-intercept", shop.container("api")),
        ])
        .stderr,
    )
    .to_string();
    assert!(agent_logs.contains("tunnelling them"), "{agent_logs}");

    let list = shop.run_ok(&["intercept", "list"]);
    assert!(
        list.contains("api") && list.contains("active") && list.contains("(handed over)"),
        "{list}"
    );

    // A caller on the service's network reaches the service's port and nothing else: the
    // agent's control port does not answer there.
    let probe = "import socket\ns=socket.create_connection(('api',7717),timeout=2)\ns.sendall(b'GET /devloop HTTP/1.1\\r\\nHost: x\\r\\nUpgrade: websocket\\r\\nConnection: Upgrade\\r\\nSec-WebSocket-Version: 13\\r\\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\\r\\n\\r\\n')\ns.settimeout(2)\nprint(repr(s.recv(100)))";
    let out = shop.exec("web", &["python3", "-c", probe]);
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        !text.contains("101"),
        "the control port answered a caller on the service network: {text}"
    );
    // And on the control network, a wrong token is refused.
    let agent = format!("{}-devloop-intercept", shop.container("api"));
    let ip = container_ip(&agent, "devloop-control");
    let refused = tokio::runtime::Runtime::new().unwrap().block_on(async {
        let s = tokio::net::TcpStream::connect(format!("{ip}:7717"))
            .await
            .unwrap();
        devloop::agent_link::AgentLink::connect(s, "wrong")
            .await
            .err()
            .map(|e| e.to_string())
    });
    assert!(
        refused.as_deref().is_some_and(|r| r.contains("token")),
        "{refused:?}"
    );
    let status = shop.run_ok(&["status"]);
    assert!(status.contains("INTERCEPTED"), "{status}");

    let left = shop.run_ok(&["leave", "api"]);
    assert!(left.contains("restored"), "{left}");
    wait_for_log(&log, "ended elsewhere", Duration::from_secs(15));
    let back = wait_for(Duration::from_secs(20), || {
        shop.http_get("web", "http://localhost:8080/api-version")
            .filter(|v| v == "1")
    });
    assert!(
        back.is_some(),
        "the original api does not answer after leave"
    );
    assert_eq!(
        config_of(&shop.container("api")),
        before,
        "the restored container differs from the original"
    );
    assert_eq!(
        shop.run_ok(&["intercept", "list"]).trim(),
        "no active intercepts"
    );
    assert!(
        std::fs::read_dir(&handoffs)
            .map(|d| d.count() == 0)
            .unwrap_or(true),
        "leave left the handoff socket's folder behind"
    );
    shop.interrupt_all();
}

#[test]
fn a_killed_cli_leaves_an_intercept_that_leave_restores() {
    let _serial = intercept_lock();
    let mut shop = Shop::new("icptkill", false);
    let up = shop.spawn(&["up", "api", "--no-logs"]);
    wait_for_log(&up, "in sync", Duration::from_secs(240));
    shop.interrupt_all();
    let before = config_of(&shop.container("api"));

    let port = free_port();
    let spec = format!("8000:{port}");
    let log = shop.state.path().join("icpt.log");
    let f = std::fs::File::create(&log).unwrap();
    let mut cli = shop
        .cmd(&["intercept", "api", "--port", &spec])
        .stdout(f.try_clone().unwrap())
        .stderr(f)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_log(&log, "intercepted in", Duration::from_secs(60));
    // Nothing listens on the laptop port: twenty callers (this process, at the agent's
    // address on the service's network) get closed connections, and the terminal a line or
    // two about them, not twenty.
    let agent = format!("{}-devloop-intercept", shop.container("api"));
    let ip = container_ip(&agent, &format!("devloop-{}", shop.project));
    for _ in 0..20 {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect_timeout(
            &format!("{ip}:8000").parse().unwrap(),
            Duration::from_secs(10),
        )
        .unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let _ = s.write_all(b"GET / HTTP/1.0\r\n\r\n");
        let mut back = Vec::new();
        let _ = s.read_to_end(&mut back);
        assert!(
            back.is_empty(),
            "an answer with nothing on the laptop port: {back:?}"
        );
    }
    wait_for_log(
        &log,
        "found nothing on laptop port",
        Duration::from_secs(10),
    );
    let lines = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .filter(|l| l.contains("found nothing on"))
        .count();
    assert!(
        (1..=2).contains(&lines),
        "{lines} lines for 20 refused calls:\n{}",
        std::fs::read_to_string(&log).unwrap()
    );
    cli.kill().unwrap();
    cli.wait().unwrap();

    let list = shop.run_ok(&["intercept", "list"]);
    assert!(list.contains("ORPHANED"), "{list}");
    let again = shop.run(&["intercept", "api", "--port", &spec]);
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("already intercepted"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );

    let out = shop.run_ok(&["leave", "--all"]);
    assert!(out.contains("api restored"), "{out}");
    assert_eq!(
        config_of(&shop.container("api")),
        before,
        "the restored container differs from the original"
    );
    assert!(Command::new("docker")
        .args([
            "inspect",
            &format!("{}-devloop-intercept", shop.container("api"))
        ])
        .output()
        .map(|o| !o.status.success())
        .unwrap());
}

/// Any TCP protocol passes the tunnel unchanged: a 32 MiB upload echoed back with a
/// half-close, and 200 concurrent connections, checked by hash from a caller container.
#[test]
fn large_and_concurrent_streams_arrive_intact() {
    let _serial = intercept_lock();
    let mut shop = Shop::new("icptbulk", false);
    let up = shop.spawn(&["up", "--no-logs"]);
    wait_for_log(&up, "in sync", Duration::from_secs(240));
    shop.interrupt_all();

    // The laptop side: a TCP echo server that echoes until the peer half-closes.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut reader = conn.try_clone().unwrap();
                let mut writer = conn;
                let _ = std::io::copy(&mut reader, &mut writer);
                let _ = writer.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    let spec = format!("8000:{port}");
    let client = r#"
import hashlib, os, socket, sys, threading
def roundtrip(n):
    data = os.urandom(n)
    s = socket.create_connection(('api', 8000), timeout=30)
    def send():
        s.sendall(data); s.shutdown(socket.SHUT_WR)
    t = threading.Thread(target=send); t.start()
    got = bytearray()
    while True:
        b = s.recv(1 << 16)
        if not b: break
        got += b
    t.join(); s.close()
    return hashlib.sha256(data).digest() == hashlib.sha256(got).digest(), len(got)
ok, n = roundtrip(32 << 20)
print('big', ok, n, flush=True)
results = []
def one():
    results.append(roundtrip(64 << 10)[0])
ts = [threading.Thread(target=one) for _ in range(200)]
[t.start() for t in ts]; [t.join() for t in ts]
print('many', sum(results), len(results), flush=True)
"#;
    // Both ways a connection can reach the laptop: handed over (the default with a local
    // engine), and through the tunnel.
    for (mode, extra) in [("handed over", None), ("tunnelled", Some("--tunnel"))] {
        let mut args = vec!["intercept", "api", "--port", &spec];
        args.extend(extra);
        let log = shop.spawn(&args);
        wait_for_log(&log, "intercepted in", Duration::from_secs(60));
        let out = shop.exec("web", &["python3", "-c", client]);
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        let cli_log = std::fs::read_to_string(&log).unwrap();
        assert!(
            text.contains(&format!("big True {}", 32 << 20)),
            "{mode}: {text}\n{cli_log}"
        );
        assert!(text.contains("many 200 200"), "{mode}: {text}");
        assert_eq!(
            cli_log.contains("reach the laptop directly"),
            extra.is_none(),
            "{mode}:\n{cli_log}"
        );
        shop.run_ok(&["leave", "api"]);
        wait_for_log(&log, "ended elsewhere", Duration::from_secs(15));
    }
    shop.interrupt_all();
}

/// The tunnel's connection cut (the agent taken off the control network and put back):
/// the cli says so, reconnects, and new connections reach the laptop again.
#[test]
fn a_cut_tunnel_reconnects() {
    let _serial = intercept_lock();
    let mut shop = Shop::new("icptcut", false);
    let up = shop.spawn(&["up", "--no-logs"]);
    wait_for_log(&up, "in sync", Duration::from_secs(240));
    shop.interrupt_all();
    let port = free_port();
    let script = shop.state.path().join("laptop_api.py");
    std::fs::write(&script, LAPTOP_API).unwrap();
    let spec = format!("8000:{port}");
    // Tunnelled: connections handed over directly do not depend on the tunnel.
    let log = shop.spawn(&[
        "intercept",
        "api",
        "--tunnel",
        "--port",
        &spec,
        "--",
        "python3",
        script.to_str().unwrap(),
        &port.to_string(),
    ]);
    wait_for_log(&log, "intercepted in", Duration::from_secs(60));
    assert!(wait_for(Duration::from_secs(20), || shop
        .http_get("web", "http://localhost:8080/api-version")
        .filter(|v| v == "laptop"))
    .is_some());

    let list = shop.run_ok(&["intercept", "list"]);
    assert!(list.contains("(tunnelled)"), "{list}");
    let agent = format!("{}-devloop-intercept", shop.container("api"));
    docker_ok(&["network", "disconnect", "devloop-control", &agent]);
    wait_for_log(&log, "tunnel to the agent is down", Duration::from_secs(15));
    docker_ok(&["network", "connect", "devloop-control", &agent]);
    wait_for_log(&log, "tunnel back up", Duration::from_secs(30));
    let again = wait_for(Duration::from_secs(20), || {
        shop.http_get("web", "http://localhost:8080/api-version")
            .filter(|v| v == "laptop")
    });
    assert!(
        again.is_some(),
        "no traffic after the reconnect:\n{}",
        std::fs::read_to_string(&log).unwrap()
    );
    shop.run_ok(&["leave", "api"]);
    shop.interrupt_all();
}
