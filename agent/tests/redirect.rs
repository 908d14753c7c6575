//! The nftables redirect on real network namespaces: a caller in another namespace (over a
//! veth pair, as another container or Docker's published port reaches a container) is sent
//! to the agent's port; the service calling itself on loopback is not; and the redirect is
//! gone once the socket that made it closes. Needs root and iproute2, as CI has.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::sync::mpsc;
use std::time::Duration;

use devloop_agent::redirect::{PortRedirect, Redirect};
use nix::sched::{setns, unshare, CloneFlags};

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("ip (iproute2) runs");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Serves `name\n` to every caller of `port` on all addresses.
fn serve(port: u16, name: &'static str) {
    let l = TcpListener::bind(("0.0.0.0", port)).unwrap();
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            let mut c = c;
            let _ = c.write_all(format!("{name}\n").as_bytes());
        }
    });
}

fn who(addr: &str) -> String {
    let mut c = TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(3))
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    c.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let mut s = String::new();
    c.read_to_string(&mut s).unwrap();
    s
}

struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

enum Ask {
    Install,
    Loopback(mpsc::Sender<String>),
    Remove,
}

#[test]
fn outside_callers_reach_the_agent_until_the_socket_that_made_the_redirect_closes() {
    let name = format!("devloop-rd-{}", std::process::id());
    ip(&["netns", "add", &name]);
    let ns = Netns(name.clone());
    let (ask, asked) = mpsc::channel::<Ask>();
    let (done, finished) = mpsc::channel::<()>();

    // The service's namespace: the original on 8080, the agent on 9090.
    let path = format!("/run/netns/{name}");
    let service = std::thread::spawn(move || {
        let f = std::fs::File::open(&path).unwrap();
        setns(&f, CloneFlags::CLONE_NEWNET).unwrap();
        serve(8080, "original");
        serve(9090, "agent");
        let mut redirect = None;
        for a in asked {
            match a {
                Ask::Install => {
                    redirect = Some(
                        Redirect::install(
                            "devloop-test",
                            &[PortRedirect {
                                service: 8080,
                                agent: 9090,
                            }],
                        )
                        .unwrap(),
                    )
                }
                Ask::Loopback(tx) => tx.send(who("127.0.0.1:8080")).unwrap(),
                Ask::Remove => redirect = None,
            }
            done.send(()).unwrap();
        }
        drop(redirect);
    });

    // The caller's namespace: this thread's own, joined to the service's by a veth pair.
    let caller = std::thread::spawn({
        let name = name.clone();
        let ask = ask.clone();
        move || {
            unshare(CloneFlags::CLONE_NEWNET).unwrap();
            ip(&["link", "set", "lo", "up"]);
            ip(&[
                "link", "add", "rd-a", "type", "veth", "peer", "name", "rd-b", "netns", &name,
            ]);
            ip(&["addr", "add", "10.77.0.1/24", "dev", "rd-a"]);
            ip(&["link", "set", "rd-a", "up"]);
            ip(&["-n", &name, "addr", "add", "10.77.0.2/24", "dev", "rd-b"]);
            ip(&["-n", &name, "link", "set", "rd-b", "up"]);
            ip(&["-n", &name, "link", "set", "lo", "up"]);
            let step = |a: Ask| {
                ask.send(a).unwrap();
                finished.recv_timeout(Duration::from_secs(10)).unwrap();
            };
            assert_eq!(who("10.77.0.2:8080"), "original\n", "before the redirect");
            step(Ask::Install);
            assert_eq!(who("10.77.0.2:8080"), "agent\n", "from outside, redirected");
            assert_eq!(who("10.77.0.2:9090"), "agent\n");
            let (tx, rx) = mpsc::channel();
            step(Ask::Loopback(tx));
            assert_eq!(
                rx.recv().unwrap(),
                "original\n",
                "loopback inside is not redirected"
            );
            let listed = Command::new("ip")
                .args(["netns", "exec", &name, "nft", "list", "ruleset"])
                .output()
                .unwrap();
            let listed = String::from_utf8_lossy(&listed.stdout).into_owned();
            assert!(
                listed.contains("devloop-test") && listed.contains("redirect to :9090"),
                "{listed}"
            );
            step(Ask::Remove);
            assert_eq!(
                who("10.77.0.2:8080"),
                "original\n",
                "the socket closed: no redirect"
            );
            let listed = Command::new("ip")
                .args(["netns", "exec", &name, "nft", "list", "ruleset"])
                .output()
                .unwrap();
            let listed = String::from_utf8_lossy(&listed.stdout).into_owned();
            assert!(!listed.contains("devloop-test"), "{listed}");
        }
    });
    let result = caller.join();
    drop(ask);
    service.join().unwrap();
    drop(ns);
    result.unwrap();
}

/// A line server: answers each line with `original\n`, after 300 ms for `slow`, never for
/// `never`.
fn line_server(port: u16) {
    use std::io::BufRead;
    let l = TcpListener::bind(("127.0.0.1", port)).unwrap();
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut w = c.try_clone().unwrap();
                for line in std::io::BufReader::new(c).lines() {
                    let Ok(line) = line else { return };
                    match line.as_str() {
                        "slow" => std::thread::sleep(Duration::from_millis(300)),
                        "never" => std::thread::sleep(Duration::from_secs(30)),
                        _ => {}
                    }
                    if w.write_all(b"original\n").is_err() {
                        return;
                    }
                }
            });
        }
    });
}

fn ask(c: &mut TcpStream, line: &str) -> std::io::Result<String> {
    c.write_all(format!("{line}\n").as_bytes())?;
    let mut got = [0u8; 64];
    let n = c.read(&mut got)?;
    Ok(String::from_utf8_lossy(&got[..n]).into_owned())
}

#[test]
fn open_connections_are_ended_between_requests_and_busy_ones_at_the_deadline() {
    use devloop_agent::resets::{connections, reset, Resets};
    let t = std::thread::spawn(|| {
        unshare(CloneFlags::CLONE_NEWNET).unwrap();
        ip(&["link", "set", "lo", "up"]);
        line_server(8080);
        let connect = || {
            let c = TcpStream::connect("127.0.0.1:8080").unwrap();
            c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            c
        };
        let mut idle = connect();
        assert_eq!(ask(&mut idle, "hello").unwrap(), "original\n");
        let mut slow = connect();
        slow.write_all(b"slow\n").unwrap();
        let mut never = connect();
        never.write_all(b"never\n").unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let conns = connections(8080).unwrap();
        assert_eq!(conns.len(), 3, "{conns:?}");
        assert_eq!(conns.iter().filter(|c| c.idle).count(), 1, "{conns:?}");

        let started = std::time::Instant::now();
        let done = reset(8080, Duration::from_secs(1), Duration::from_millis(20)).unwrap();
        // The idle one at once, the slow one once it had answered, the other at the deadline.
        assert_eq!(done, Resets { idle: 2, busy: 1 });
        assert!(started.elapsed() >= Duration::from_secs(1));
        assert!(connections(8080).unwrap().is_empty());
        // The slow one got its whole answer before it was ended.
        let mut got = [0u8; 64];
        assert_eq!(slow.read(&mut got).unwrap(), 9);
        for c in [&mut idle, &mut slow, &mut never] {
            let err = ask(c, "again").err().or_else(|| {
                let mut b = [0u8; 8];
                c.read(&mut b).err()
            });
            let kind = err.map(|e| e.kind());
            assert!(
                matches!(
                    kind,
                    Some(std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe)
                ),
                "{kind:?}"
            );
        }
    });
    t.join().unwrap();
}
