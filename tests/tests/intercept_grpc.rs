//! gRPC through a filtered intercept, with real grpcio clients and servers (PyPI's grpcio,
//! installed by scripts/test.sh into target/grpc-site): the original serves gRPC in a
//! container, a laptop process serves the same methods, and a client on the host calls the
//! original's address over one channel (one HTTP/2 connection). Each call is one stream,
//! routed on its own by its metadata; unary and server-streaming answers keep their
//! trailers (the status and the trailing metadata) whichever way they went.

use devloop_tests::*;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A gRPC server with two methods and no protobuf (bytes in, bytes out): `Unary` answers
/// NAME:REQUEST, `Stream` sends REQUEST messages NAME:I of 1 KiB each; both set the trailing
/// metadata `x-served-by: NAME`.
const SERVER: &str = r#"
import grpc, sys
from concurrent import futures
name, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
def unary(req, ctx):
    ctx.set_trailing_metadata((("x-served-by", name),))
    return name.encode() + b":" + req
def stream(req, ctx):
    ctx.set_trailing_metadata((("x-served-by", name),))
    for i in range(int(req)):
        yield (name + ":" + str(i) + ":").encode().ljust(1024, b".")
h = grpc.method_handlers_generic_handler("test.Echo", {
    "Unary": grpc.unary_unary_rpc_method_handler(unary),
    "Stream": grpc.unary_stream_rpc_method_handler(stream),
})
s = grpc.server(futures.ThreadPoolExecutor(16))
s.add_generic_rpc_handlers((h,))
s.add_insecure_port(host + ":" + str(port))
s.start()
print("serving", flush=True)
s.wait_for_termination()
"#;

/// Calls over one channel, alternating alice's metadata and none, several at once; prints
/// one JSON line per call: who answered, the trailing metadata and the status.
const CLIENT: &str = r#"
import grpc, json, sys, threading
ch = grpc.insecure_channel(sys.argv[1])
grpc.channel_ready_future(ch).result(timeout=10)
unary = ch.unary_unary("/test.Echo/Unary")
stream = ch.unary_stream("/test.Echo/Stream")
out, lock = [], threading.Lock()
def call(i):
    md = (("x-dev", "alice"),) if i % 2 == 0 else ()
    want = "laptop" if md else "original"
    r, c = unary.with_call(b"hi", metadata=md, timeout=10)
    it = stream(b"300", metadata=md, timeout=20)
    items = list(it)
    res = {
        "want": want,
        "unary": r.decode(),
        "unary_trailers": dict(c.trailing_metadata() or ()),
        "unary_code": str(c.code()),
        "stream_count": len(items),
        "stream_first": items[0][:16].decode() if items else "",
        "stream_all_from": sorted(set(x.split(b":")[0].decode() for x in items)),
        "stream_trailers": dict(it.trailing_metadata() or ()),
        "stream_code": str(it.code()),
    }
    with lock: out.append(res)
ts = [threading.Thread(target=call, args=(i,)) for i in range(8)]
for t in ts: t.start()
for t in ts: t.join()
for r in out: print(json.dumps(r))
"#;

struct Killed(Child);

impl Drop for Killed {
    /// Ctrl-C first, as a user stops it (the laptop command goes with it); killed if it
    /// does not end.
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        );
        let _ = wait_for(Duration::from_secs(15), || self.0.try_wait().ok().flatten());
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn grpc_site() -> std::path::PathBuf {
    let site = workspace().join("target/grpc-site");
    assert!(
        site.join("grpc").is_dir(),
        "grpcio is not installed in {} (scripts/test.sh installs it: python3 -m pip install --target target/grpc-site grpcio)",
        site.display()
    );
    site
}

#[test]
fn grpc_calls_are_routed_per_stream_with_their_trailers() {
    let _serial = intercept_lock();
    let shop = Shop::new("grpc", false);
    let site = grpc_site();
    let site_s = site.to_str().unwrap();
    let dir = shop.state.path();
    let server = dir.join("server.py");
    let client = dir.join("client.py");
    std::fs::write(&server, SERVER).unwrap();
    std::fs::write(&client, CLIENT).unwrap();
    let label = format!("{TEST_RUN_LABEL}={}", shop.project);
    let net = format!("{}-grpc", shop.project);
    docker_ok(&["network", "create", "--label", &label, &net]);
    let original = format!("{}-grpc-api", shop.project);
    // The same path inside and out: the laptop command gets the container's PYTHONPATH.
    docker_ok(&[
        "run",
        "-d",
        "--name",
        &original,
        "--label",
        &label,
        "--network",
        &net,
        "-v",
        &format!("{site_s}:{site_s}:ro"),
        "-v",
        &format!("{}:/server.py:ro", server.display()),
        "-e",
        &format!("PYTHONPATH={site_s}"),
        "python:3.11-slim-bookworm",
        "python3",
        "/server.py",
        "original",
        "0.0.0.0",
        "50051",
    ]);
    let ip = container_ip(&original, &net);
    let target = format!("{ip}:50051");
    let run_client = || {
        let out = Command::new("python3")
            .arg(&client)
            .arg(&target)
            .env("PYTHONPATH", site_s)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "the gRPC client failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .collect::<Vec<_>>()
    };
    let ready = wait_for(Duration::from_secs(30), || {
        let out = Command::new("python3")
            .args(["-c", "import grpc,sys; grpc.channel_ready_future(grpc.insecure_channel(sys.argv[1])).result(timeout=1)", &target])
            .env("PYTHONPATH", site_s)
            .stderr(Stdio::null())
            .status()
            .unwrap();
        out.success().then_some(())
    });
    assert!(ready.is_some(), "the original gRPC server does not answer");

    let port = free_port();
    let spec = format!("50051:{port}");
    let mut intercept = Killed(
        shop.cmd(&[
            "intercept",
            &original,
            "--port",
            &spec,
            "--header",
            "x-dev=alice",
            "--",
            "python3",
            server.to_str().unwrap(),
            "laptop",
            "127.0.0.1",
            &port.to_string(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap(),
    );
    let log = dir.join("intercept.log");
    let (mut out, mut err) = (
        intercept.0.stdout.take().unwrap(),
        intercept.0.stderr.take().unwrap(),
    );
    let log_w = std::fs::File::create(&log).unwrap();
    let mut log_e = log_w.try_clone().unwrap();
    let mut log_o = log_w;
    std::thread::spawn(move || std::io::copy(&mut out, &mut log_o));
    std::thread::spawn(move || std::io::copy(&mut err, &mut log_e));
    wait_for_log(&log, "Intercepted in", Duration::from_secs(60));
    wait_for_log(&log, "serving", Duration::from_secs(30));

    let calls = run_client();
    assert_eq!(calls.len(), 8, "{calls:?}");
    for c in &calls {
        let want = c["want"].as_str().unwrap();
        assert_eq!(c["unary"], format!("{want}:hi"), "{c}");
        assert_eq!(c["unary_code"], "StatusCode.OK", "{c}");
        assert_eq!(
            c["unary_trailers"]["x-served-by"], want,
            "unary trailers lost: {c}"
        );
        assert_eq!(c["stream_count"], 300, "{c}");
        assert_eq!(c["stream_all_from"], serde_json::json!([want]), "{c}");
        assert_eq!(c["stream_code"], "StatusCode.OK", "{c}");
        assert_eq!(
            c["stream_trailers"]["x-served-by"], want,
            "stream trailers lost: {c}"
        );
    }
    // The laptop's calls are request lines.
    wait_for_log(&log, "POST /test.Echo/Unary 200", Duration::from_secs(5));
    drop(intercept);
    let route = format!("{original}-devloop-route");
    let gone = wait_for(Duration::from_secs(15), || {
        (!docker(&["inspect", &route]).status.success()).then_some(())
    });
    assert!(gone.is_some(), "the routing agent did not leave");
    // Back on the original alone: every call answered by it.
    let calls = run_client();
    assert!(
        calls.iter().all(|c| c["unary"] == "original:hi"),
        "{calls:?}"
    );
}
