//! The engine reached over tcp:// through a relay, from a network namespace that cannot
//! reach any container address: devloop must fall back to tunnelling through the engine's
//! API, and sync must work exactly as with a local engine.

use devloop_tests::*;
use std::process::{Command, Stdio};
use std::time::Duration;

/// Relays TCP connections on 127.0.0.1:2375 (inside the namespace) to the engine's unix
/// socket (sockets on the file system are not namespaced): the shape of a remote engine.
const RELAY: &str = r#"
import asyncio, sys
async def pipe(r, w):
    try:
        while True:
            b = await r.read(65536)
            if not b: break
            w.write(b); await w.drain()
    except Exception: pass
    finally:
        try: w.write_eof()
        except Exception: w.close()
async def handle(cr, cw):
    ur, uw = await asyncio.open_unix_connection('/var/run/docker.sock')
    await asyncio.gather(pipe(cr, uw), pipe(ur, cw))
    cw.close(); uw.close()
async def main():
    s = await asyncio.start_server(handle, '127.0.0.1', 2375)
    print('relay up', flush=True)
    async with s: await s.serve_forever()
asyncio.run(main())
"#;

struct Netns(String);

impl Netns {
    fn new(name: &str) -> Netns {
        let ok = Command::new("ip")
            .args(["netns", "add", name])
            .status()
            .expect("ip netns")
            .success();
        assert!(
            ok,
            "cannot create network namespace {name}: this test needs root and iproute2"
        );
        assert!(Command::new("ip")
            .args(["netns", "exec", name, "ip", "link", "set", "lo", "up"])
            .status()
            .unwrap()
            .success());
        Netns(name.to_string())
    }
    fn cmd(&self, program: &std::path::Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.0]).arg(program);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "pids", &self.0])
            .output()
            .map(|o| {
                for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                    let _ = Command::new("kill").arg(pid).status();
                }
            });
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

#[test]
fn sync_through_a_tcp_engine_with_unreachable_containers() {
    let shop = Shop::new("remote", false);
    let ns = Netns::new(&format!("devloop-{}", shop.project));
    let mut relay = ns
        .cmd(std::path::Path::new("python3"))
        .args(["-c", RELAY])
        .stdout(Stdio::piped())
        .spawn()
        .expect("relay");
    let mut first = [0u8; 8];
    std::io::Read::read_exact(relay.stdout.as_mut().unwrap(), &mut first).expect("relay started");

    // devloop itself runs inside the namespace, with the engine at tcp://127.0.0.1:2375.
    let log = shop.state.path().join("up.log");
    let f = std::fs::File::create(&log).unwrap();
    let base = shop.cmd(&["up", "api", "--no-logs"]);
    let mut c = ns.cmd(&devloop_bin());
    c.args(["up", "api", "--no-logs"])
        .current_dir(shop.path())
        .env("DOCKER_HOST", "tcp://127.0.0.1:2375");
    for (k, v) in base.get_envs() {
        if let Some(v) = v {
            c.env(k, v);
        }
    }
    let mut up = c
        .stdout(f.try_clone().unwrap())
        .stderr(f)
        .stdin(Stdio::null())
        .spawn()
        .expect("devloop up");
    wait_for_log(&log, "in sync", Duration::from_secs(240));

    // The namespace really cannot reach the container: the fast route is impossible.
    let addr = agent_addr(&shop, "api");
    let probe = ns
        .cmd(std::path::Path::new("python3"))
        .args([
            "-c",
            &format!(
                "import socket; socket.create_connection(('{}', {}), timeout=1)",
                addr.ip(),
                addr.port()
            ),
        ])
        .output()
        .unwrap();
    assert!(
        !probe.status.success(),
        "the namespace can reach {addr}; the test proves nothing"
    );

    std::fs::write(shop.path().join("api/remote.txt"), "through the engine").unwrap();
    let arrived = wait_for(Duration::from_secs(10), || {
        let o = shop.exec("api", &["cat", "/app/remote.txt"]);
        (String::from_utf8_lossy(&o.stdout) == "through the engine").then_some(())
    });
    assert!(
        arrived.is_some(),
        "edit not synced through the engine; log:\n{}",
        std::fs::read_to_string(&log).unwrap()
    );

    // status, from the same namespace, names the route.
    let mut st = ns.cmd(&devloop_bin());
    st.args(["status"])
        .current_dir(shop.path())
        .env("DOCKER_HOST", "tcp://127.0.0.1:2375");
    for (k, v) in base.get_envs() {
        if let Some(v) = v {
            st.env(k, v);
        }
    }
    let out = st.output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("connected (docker exec)"),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(up.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    );
    let status = up.wait().unwrap();
    assert!(status.success(), "devloop up exited with {status}");
    let _ = relay.kill();
    let _ = relay.wait();
}
