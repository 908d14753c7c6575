//! Filtered intercepts on the real engine with the example system: two developers hold one
//! service by header at once, each request goes to the laptop whose filter names it, and a
//! caller that matches neither keeps reaching the original, which keeps running untouched,
//! with zero errors while the intercepts start, run and end.

use devloop_tests::*;
use std::process::Child;
use std::time::{Duration, Instant};

/// A laptop process: answers every GET with NAME (and the path).
const LAPTOP: &str = r#"
import http.server, sys
name = sys.argv[2]
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        b = ("laptop-" + name + " " + self.path + "\n").encode()
        self.send_response(200); self.send_header("Content-Length", str(len(b))); self.end_headers(); self.wfile.write(b)
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"#;

/// A caller in the web container, on one keep-alive connection, as HTTP client libraries
/// reuse one (urllib3, Go's net/http, curl): a pooled connection the server has closed
/// while idle is replaced before the next request, and a request that finds its reused
/// connection reset before any answer is sent again on a new one. Anything else counts as an
/// error, and so does an answer that is not the original's. It runs until /tmp/stop-NAME
/// exists and writes its counts to /tmp/caller-NAME.json.
const CALLER: &str = r#"
import http.client, json, os, select, sys, time
name, header = sys.argv[1], sys.argv[2]
headers = {"x-dev": header} if header else {}
conn, stats = None, {"requests": 0, "errors": 0, "wrong": 0, "reconnects": 0, "last_error": ""}
def fresh():
    stats["reconnects"] += 1
    return http.client.HTTPConnection("api", 8000, timeout=5)
def dropped(c):
    if c is None or c.sock is None:
        return c is None
    r, _, _ = select.select([c.sock], [], [], 0)
    return bool(r)
while not os.path.exists("/tmp/stop-" + name):
    if dropped(conn):
        if conn: conn.close()
        conn = fresh()
    for attempt in (0, 1):
        try:
            reused = conn.sock is not None
            conn.request("GET", "/items", headers=headers)
            resp = conn.getresponse()
            body = resp.read().decode()
            stats["requests"] += 1
            if resp.status != 200 or '"items"' not in body:
                stats["wrong"] += 1; stats["last_error"] = body[:200]
            break
        except (ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected) as e:
            conn.close(); conn = fresh()
            if attempt == 1 or not reused:
                stats["errors"] += 1; stats["last_error"] = repr(e); break
        except Exception as e:
            stats["errors"] += 1; stats["last_error"] = repr(e)
            conn.close(); conn = fresh(); break
    with open("/tmp/caller-" + name + ".json.tmp", "w") as f: json.dump(stats, f)
    os.replace("/tmp/caller-" + name + ".json.tmp", "/tmp/caller-" + name + ".json")
    time.sleep(0.01)
"#;

/// What an intercept beside the original must leave exactly as it was: the original is not
/// recreated, restarted or reconfigured.
fn original_state(container: &str) -> serde_json::Value {
    let out = docker_ok(&["inspect", container]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let c = &v[0];
    serde_json::json!({
        "id": c["Id"], "started": c["State"]["StartedAt"], "restarts": c["RestartCount"],
        "config": c["Config"], "host": c["HostConfig"], "networks": c["NetworkSettings"]["Networks"],
    })
}

fn get(shop: &Shop, header: Option<&str>) -> Option<String> {
    let headers = header
        .map(|h| format!("{{'x-dev': '{h}'}}"))
        .unwrap_or_else(|| "{}".into());
    let script = format!(
        "import urllib.request\nr=urllib.request.Request('http://api:8000/items', headers={headers})\nprint(urllib.request.urlopen(r, timeout=5).read().decode())"
    );
    let o = shop.exec("web", &["python3", "-c", &script]);
    o.status
        .success()
        .then(|| String::from_utf8_lossy(&o.stdout).trim().to_string())
}

fn caller_stats(shop: &Shop, name: &str) -> serde_json::Value {
    let o = shop.exec("web", &["cat", &format!("/tmp/caller-{name}.json")]);
    serde_json::from_slice(&o.stdout).unwrap_or(serde_json::Value::Null)
}

fn intercept_as(shop: &Shop, user: &str, header: &str, port: u16, log: &std::path::Path) -> Child {
    let script = shop.state.path().join("laptop.py");
    std::fs::write(&script, LAPTOP).unwrap();
    let spec = format!("8000:{port}");
    let filter = format!("x-dev={header}");
    let mut c = shop.cmd(&[
        "intercept",
        "api",
        "--port",
        &spec,
        "--header",
        &filter,
        "--",
        "python3",
        script.to_str().unwrap(),
        &port.to_string(),
        header,
    ]);
    c.env("DEVLOOP_USER", user);
    spawn_logged(c, log)
}

fn wait_exit(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(s)) = child.try_wait() {
            return Some(s);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn two_developers_share_a_service_by_header_and_other_callers_never_notice() {
    let _serial = intercept_lock();
    let mut shop = Shop::new("flt", false);
    let up = shop.spawn(&["up", "--no-logs"]);
    wait_for_log(&up, "in sync", Duration::from_secs(240));
    let original = wait_for(Duration::from_secs(30), || {
        get(&shop, None).filter(|b| b.contains("\"items\""))
    });
    assert!(original.is_some(), "the api does not answer");
    let api = shop.container("api");
    let before = original_state(&api);

    // A caller that matches no filter, and one with alice's header, each on its keep-alive
    // connection from before the intercepts.
    for (name, header) in [("plain", ""), ("early", "alice")] {
        let o = docker(&[
            "exec",
            "-d",
            &shop.container("web"),
            "python3",
            "-c",
            CALLER,
            name,
            header,
        ]);
        assert!(o.status.success());
    }
    let started = wait_for(Duration::from_secs(10), || {
        (caller_stats(&shop, "plain")["requests"].as_u64()? > 5).then_some(())
    });
    assert!(started.is_some(), "the caller does not run");

    // Two developers, two users, started at the same moment: one installs the routing agent,
    // both hold.
    let (pa, pb) = (free_port(), free_port());
    let (la, lb) = (
        shop.state.path().join("alice.log"),
        shop.state.path().join("bob.log"),
    );
    let mut alice = intercept_as(&shop, "alice@laptop1", "alice", pa, &la);
    let mut bob = intercept_as(&shop, "bob@laptop2", "bob", pb, &lb);
    wait_for_log(&la, "Intercepted in", Duration::from_secs(60));
    wait_for_log(&lb, "Intercepted in", Duration::from_secs(60));
    let logs = std::fs::read_to_string(&la).unwrap() + &std::fs::read_to_string(&lb).unwrap();
    assert_eq!(
        logs.matches("routing agent installed").count(),
        1,
        "exactly one of the two installs the agent:\n{logs}"
    );

    // Each request goes where its header says.
    let to_alice = wait_for(Duration::from_secs(10), || {
        get(&shop, Some("alice")).filter(|b| b.starts_with("laptop-alice"))
    });
    assert!(
        to_alice.is_some(),
        "alice's requests do not reach her laptop:\n{logs}"
    );
    for _ in 0..3 {
        assert_eq!(
            get(&shop, Some("bob")).as_deref(),
            Some("laptop-bob /items")
        );
        assert_eq!(
            get(&shop, Some("alice")).as_deref(),
            Some("laptop-alice /items")
        );
        assert!(get(&shop, None).unwrap().contains("\"items\""));
        assert!(get(&shop, Some("carol")).unwrap().contains("\"items\""));
    }
    // The keep-alive connection alice's caller opened before the intercept reaches her laptop
    // now: its old connection was ended between two requests.
    let early = wait_for(Duration::from_secs(2), || {
        let s = caller_stats(&shop, "early");
        (s["wrong"].as_u64()? > 0).then_some(s)
    });
    assert!(
        early.is_some(),
        "the connection opened before the intercept never reached the laptop: {}",
        caller_stats(&shop, "early")
    );
    // A line per request in the intercept's output.
    wait_for_log(&la, "GET /items 200", Duration::from_secs(5));

    // Every holder, with its filter and counts.
    let listed: serde_json::Value =
        serde_json::from_str(&shop.run_ok(&["intercept", "list", "--json"])).unwrap();
    let holders = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["kind"] == "filtered")
        .map(|l| l["holders"].as_array().unwrap().clone())
        .unwrap_or_default();
    assert_eq!(holders.len(), 2, "{listed}");
    for (who, header) in [("alice@laptop1", "alice"), ("bob@laptop2", "bob")] {
        let h = holders.iter().find(|h| h["who"] == who).unwrap();
        assert!(h["requests"].as_u64().unwrap() >= 3, "{h}");
        assert!(h["describe"].as_str().unwrap().contains(header), "{h}");
    }
    let text = shop.run_ok(&["intercept", "list"]);
    assert!(
        text.contains("2 holders") && text.contains("x-dev=bob"),
        "{text}"
    );

    // A replace intercept of the same service is refused while they hold, naming them.
    let refused = shop.run(&["intercept", "api", "--port", "8000:1"]);
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && said.contains("filtered intercepts"),
        "{said}"
    );

    // Bob's `leave api` ends bob's intercept only.
    let mut leave = shop.cmd(&["leave", "api"]);
    leave.env("DEVLOOP_USER", "bob@laptop2");
    let left = leave.output().unwrap();
    assert!(
        left.status.success(),
        "{}",
        String::from_utf8_lossy(&left.stderr)
    );
    assert!(
        wait_exit(&mut bob, Duration::from_secs(10)).is_some(),
        "bob's cli still runs"
    );
    wait_for_log(&lb, "ended this intercept", Duration::from_secs(1));
    assert!(get(&shop, Some("bob")).unwrap().contains("\"items\""));
    assert_eq!(
        get(&shop, Some("alice")).as_deref(),
        Some("laptop-alice /items")
    );

    // Alice's cli is killed: her holder goes with its connection, and `leave --all` finds
    // nothing of hers left to end; the routing agent leaves by itself.
    alice.kill().unwrap();
    alice.wait().unwrap();
    let _ = std::process::Command::new("pkill")
        .args(["-f", &format!("laptop.py {pa}")])
        .status();
    let back = wait_for(Duration::from_secs(3), || {
        get(&shop, Some("alice")).filter(|b| b.contains("\"items\""))
    });
    assert!(
        back.is_some(),
        "alice's requests do not reach the original after her cli died"
    );
    let mut all = shop.cmd(&["leave", "--all"]);
    all.env("DEVLOOP_USER", "alice@laptop1");
    assert!(all.output().unwrap().status.success());
    let route = format!("{api}-devloop-route");
    let gone = wait_for(Duration::from_secs(10), || {
        (!docker(&["inspect", &route]).status.success()).then_some(())
    });
    assert!(gone.is_some(), "the routing agent is still there");

    // The caller that matched nothing saw only the original's answers, and no error.
    let stop = docker(&[
        "exec",
        &shop.container("web"),
        "touch",
        "/tmp/stop-plain",
        "/tmp/stop-early",
    ]);
    assert!(stop.status.success());
    std::thread::sleep(Duration::from_millis(300));
    let plain = caller_stats(&shop, "plain");
    assert!(plain["requests"].as_u64().unwrap() > 100, "{plain}");
    assert_eq!(plain["errors"], 0, "{plain}");
    assert_eq!(plain["wrong"], 0, "{plain}");
    assert_eq!(
        original_state(&api),
        before,
        "the original container was changed, restarted or recreated"
    );
    assert_eq!(
        shop.run_ok(&["intercept", "list"]).trim(),
        "no active intercepts"
    );
    shop.interrupt_all();
}

/// A process killed when the test ends, also by a failed assertion.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A laptop process that records each request's path in a file, then answers.
const RECORDER: &str = r#"
import http.server, sys
log = open(sys.argv[2], "a", buffering=1)
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        log.write(self.path + "\n")
        b = b"laptop-copy\n"
        self.send_response(200); self.send_header("Content-Length", str(len(b))); self.end_headers(); self.wfile.write(b)
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"#;

#[test]
fn a_mirror_gets_copies_and_callers_keep_the_originals_answers_even_with_the_laptop_gone() {
    let _serial = intercept_lock();
    let mut shop = Shop::new("mirror", false);
    let up = shop.spawn(&["up", "--no-logs"]);
    wait_for_log(&up, "in sync", Duration::from_secs(240));
    assert!(wait_for(Duration::from_secs(30), || get(&shop, None)
        .filter(|b| b.contains("\"items\"")))
    .is_some());
    let port = free_port();
    let script = shop.state.path().join("recorder.py");
    std::fs::write(&script, RECORDER).unwrap();
    let seen = shop.state.path().join("seen.txt");
    let mut laptop = KillOnDrop(
        std::process::Command::new("python3")
            .args([
                script.to_str().unwrap(),
                &port.to_string(),
                seen.to_str().unwrap(),
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let log = shop.spawn(&[
        "intercept",
        "api",
        "--port",
        &format!("8000:{port}"),
        "--mirror",
    ]);
    wait_for_log(&log, "Intercepted in", Duration::from_secs(60));
    wait_for_log(&log, "a copy of every request goes", Duration::from_secs(1));

    // Callers get the original's answers; the laptop gets a copy of each request.
    for i in 0..5 {
        let body = get(&shop, Some(&format!("m{i}"))).unwrap();
        assert!(
            body.contains("\"items\""),
            "a caller got the laptop's answer: {body}"
        );
    }
    let copies = wait_for(Duration::from_secs(5), || {
        let n = std::fs::read_to_string(&seen)
            .unwrap_or_default()
            .lines()
            .filter(|l| *l == "/items")
            .count();
        (n >= 5).then_some(n)
    });
    assert!(copies.is_some(), "the laptop did not get the copies");
    wait_for_log(&log, "(copy)", Duration::from_secs(5));

    // The laptop process goes: callers see nothing of it; the copies are dropped and counted.
    laptop.0.kill().unwrap();
    laptop.0.wait().unwrap();
    let started = Instant::now();
    for i in 0..10 {
        let body = get(&shop, Some(&format!("gone{i}"))).unwrap();
        assert!(body.contains("\"items\""), "{body}");
    }
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "callers were slowed by the absent laptop: {:?}",
        started.elapsed()
    );
    let listed: serde_json::Value =
        serde_json::from_str(&shop.run_ok(&["intercept", "list", "--json"])).unwrap();
    let h = &listed
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["kind"] == "filtered")
        .unwrap()["holders"][0];
    assert_eq!(h["mirror"], true, "{h}");
    assert!(
        h["dropped"].as_u64().unwrap() >= 10,
        "the dropped copies are counted: {h}"
    );
    assert!(h["requests"].as_u64().unwrap() >= 15, "{h}");
    shop.run_ok(&["leave", "api"]);
    shop.interrupt_all();
}

fn get_from(shop: &Shop, url: &str, baggage: Option<&str>) -> Option<String> {
    get_from_in(shop, "web", url, baggage)
}

fn get_from_in(shop: &Shop, from: &str, url: &str, baggage: Option<&str>) -> Option<String> {
    let headers = baggage
        .map(|b| format!("{{'baggage': '{b}'}}"))
        .unwrap_or_else(|| "{}".into());
    let script = format!(
        "import urllib.request\nr=urllib.request.Request('{url}', headers={headers})\nprint(urllib.request.urlopen(r, timeout=5).read().decode())"
    );
    let o = shop.exec(from, &["python3", "-c", &script]);
    o.status
        .success()
        .then(|| String::from_utf8_lossy(&o.stdout).trim().to_string())
}

#[test]
fn a_session_intercepts_several_services_by_one_key_and_ends_them_together() {
    let _serial = intercept_lock();
    let mut shop = Shop::new("session", false);
    let (pa, pw) = (free_port(), free_port());
    let script = shop.state.path().join("laptop.py");
    std::fs::write(&script, LAPTOP).unwrap();
    let s = script.to_str().unwrap();
    let cfg = shop.path().join("devloop.toml");
    let mut text = std::fs::read_to_string(&cfg).unwrap();
    text.push_str(&format!(
        r#"
[sessions.checkout]
key = "k42"
services = [
  {{ service = "api", ports = ["8000:{pa}"], command = ["python3", "{s}", "{pa}", "api"] }},
  {{ service = "web", ports = ["8080:{pw}"], command = ["python3", "{s}", "{pw}", "web"] }},
]
[sessions.broken]
services = [
  {{ service = "api", ports = ["8000:{pa}"] }},
  {{ service = "nope", ports = ["1:2"] }},
]
"#
    ));
    std::fs::write(&cfg, text).unwrap();
    let up = shop.spawn(&["up", "--no-logs"]);
    wait_for_log(&up, "in sync", Duration::from_secs(240));
    assert!(wait_for(Duration::from_secs(30), || get(&shop, None)
        .filter(|b| b.contains("\"items\"")))
    .is_some());

    // A session naming a service that does not run changes nothing.
    let broken = shop.run(&["intercept", "--session", "broken"]);
    assert!(!broken.status.success());
    assert!(
        String::from_utf8_lossy(&broken.stderr).contains("nope"),
        "{}",
        String::from_utf8_lossy(&broken.stderr)
    );
    let route = format!("{}-devloop-route", shop.container("api"));
    assert!(
        !docker(&["inspect", &route]).status.success(),
        "a broken session installed an agent"
    );

    let log = shop.spawn(&["intercept", "--session", "checkout"]);
    wait_for_log(
        &log,
        "session checkout: 2 services",
        Duration::from_secs(30),
    );
    let held = wait_for(Duration::from_secs(60), || {
        let t = std::fs::read_to_string(&log).unwrap_or_default();
        (t.matches("Intercepted in").count() == 2).then_some(())
    });
    assert!(held.is_some(), "{}", std::fs::read_to_string(&log).unwrap());

    let key = Some("devloop-session=k42");
    // The laptop commands start with the intercepts: the first answers wait for them.
    let api = wait_for(Duration::from_secs(10), || {
        get_from(&shop, "http://api:8000/items", key).filter(|b| b.starts_with("laptop"))
    });
    assert_eq!(api.as_deref(), Some("laptop-api /items"));
    // From the api container: a container calling its own name does not leave its network
    // namespace, so nothing routes it (a service's callers are other containers).
    let web = wait_for(Duration::from_secs(10), || {
        get_from_in(
            &shop,
            "api",
            "http://web:8080/health",
            Some("other=1, devloop-session=k42"),
        )
        .filter(|b| b.starts_with("laptop"))
    });
    assert_eq!(web.as_deref(), Some("laptop-web /health"));
    assert!(get_from(&shop, "http://api:8000/items", None)
        .unwrap()
        .contains("\"items\""));
    assert!(
        get_from(&shop, "http://api:8000/items", Some("devloop-session=k43"))
            .unwrap()
            .contains("\"items\"")
    );
    // Each service's request line names it.
    wait_for_log(&log, "api: ", Duration::from_secs(5));

    let listed: serde_json::Value =
        serde_json::from_str(&shop.run_ok(&["intercept", "list", "--json"])).unwrap();
    let sessions: Vec<&serde_json::Value> = listed
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["kind"] == "filtered")
        .flat_map(|l| l["holders"].as_array().unwrap())
        .filter(|h| h["session"] == "checkout")
        .collect();
    assert_eq!(sessions.len(), 2, "{listed}");

    // One leave ends the whole session, and the process with it.
    shop.run_ok(&["leave", "--session", "checkout"]);
    wait_for_log(&log, "session checkout ended", Duration::from_secs(15));
    let back = wait_for(Duration::from_secs(5), || {
        get_from(&shop, "http://api:8000/items", key).filter(|b| b.contains("\"items\""))
    });
    assert!(
        back.is_some(),
        "the session's requests do not reach the original again"
    );
    assert!(get_from_in(&shop, "api", "http://web:8080/health", key)
        .unwrap()
        .contains("ok"));
    shop.interrupt_all();
}

#[test]
fn callers_through_a_published_host_port_are_routed_alike() {
    let _serial = intercept_lock();
    let mut shop = Shop::new("published", false);
    let published = shop.publish_web_on_free_port();
    let up = shop.spawn(&["up", "--no-logs"]);
    wait_for_log(&up, "in sync", Duration::from_secs(240));
    let curl = |header: Option<&str>| -> Option<String> {
        let mut c = std::process::Command::new("curl");
        c.args(["-s", "--max-time", "5"]);
        if let Some(h) = header {
            c.args(["-H", h]);
        }
        let o = c
            .arg(format!("http://127.0.0.1:{published}/health"))
            .output()
            .ok()?;
        o.status
            .success()
            .then(|| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    assert!(wait_for(Duration::from_secs(30), || curl(None).filter(|b| b == "ok")).is_some());
    let port = free_port();
    let script = shop.state.path().join("laptop.py");
    std::fs::write(&script, LAPTOP).unwrap();
    let log = shop.spawn(&[
        "intercept",
        "web",
        "--port",
        &format!("8080:{port}"),
        "--header",
        "x-dev=alice",
        "--",
        "python3",
        script.to_str().unwrap(),
        &port.to_string(),
        "alice",
    ]);
    wait_for_log(&log, "Intercepted in", Duration::from_secs(60));
    let to_laptop = wait_for(Duration::from_secs(10), || {
        curl(Some("x-dev: alice")).filter(|b| b.starts_with("laptop"))
    });
    assert_eq!(to_laptop.as_deref(), Some("laptop-alice /health"));
    assert_eq!(curl(None).as_deref(), Some("ok"));
    assert_eq!(curl(Some("x-dev: bob")).as_deref(), Some("ok"));
    shop.interrupt_all();
}
