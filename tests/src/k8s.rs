//! The Kubernetes side of the harness: the cluster the tests run against (KUBECONFIG, else
//! the one `../shared/k8s/cluster.sh up` makes on this machine), a namespace per test that is
//! deleted afterwards, and the example's images in the cluster's registry.
//!
//! In CI (`CI=true`) a missing or unreachable cluster fails the test. Elsewhere the test
//! says plainly that it did not run and how to point it at a cluster, and returns.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::Duration;

use crate::{docker_ok, ensure_base_image, workspace, Shop};

const LOCAL_KUBECONFIG: &str = "/var/lib/devloop-k8s/admin.kubeconfig";
const LOCAL_KUBECTL: &str = "/var/cache/devloop-k8s/bin/kubectl";
/// The registry the cluster pulls from, as this machine pushes to it.
pub const REGISTRY: &str = "127.0.0.1:5000";

/// A copy of the example as a Kubernetes project: devloop.toml's `[target]`, which already
/// names the manifests, gains `kind = "kubernetes"`; the namespace comes from `-n`.
pub fn kube_shop(name: &str) -> Shop {
    let shop = Shop::new(name, false);
    let cfg = shop.path().join("devloop.toml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    assert!(
        text.contains("[target]\nmanifests = \"k8s\""),
        "the example names its manifests"
    );
    std::fs::write(
        &cfg,
        text.replace("[target]\n", "[target]\nkind = \"kubernetes\"\n"),
    )
    .unwrap();
    shop
}

/// The kubeconfig the tests use: KUBECONFIG, else the local cluster's.
pub fn kubeconfig() -> Option<PathBuf> {
    match std::env::var_os("KUBECONFIG") {
        Some(k) if !k.is_empty() => Some(PathBuf::from(k)),
        _ => Some(PathBuf::from(LOCAL_KUBECONFIG)).filter(|p| p.is_file()),
    }
}

/// kubectl matching the server when the local cluster's is there, else the one on PATH.
pub fn kubectl_cmd() -> Command {
    let bin = if std::path::Path::new(LOCAL_KUBECTL).is_file() {
        LOCAL_KUBECTL
    } else {
        "kubectl"
    };
    let mut c = Command::new(bin);
    if let Some(k) = kubeconfig() {
        c.env("KUBECONFIG", k);
    }
    c
}

pub fn kubectl(args: &[&str]) -> Output {
    kubectl_cmd().args(args).output().expect("run kubectl")
}

pub fn kubectl_ok(args: &[&str]) -> String {
    let o = kubectl(args);
    assert!(
        o.status.success(),
        "kubectl {args:?} failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// True when a cluster answers. In CI a missing cluster panics; elsewhere the caller returns
/// early after this has said why the test did not run.
pub fn require_cluster(test: &str) -> bool {
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    let problem = match kubeconfig() {
        None => Some(format!(
            "no kubeconfig: KUBECONFIG is unset and {LOCAL_KUBECONFIG} does not exist"
        )),
        Some(_) => {
            let o = kubectl_cmd()
                .args(["get", "--raw", "/readyz", "--request-timeout=10s"])
                .output();
            match o {
                Ok(o) if o.status.success() => None,
                Ok(o) => Some(format!(
                    "the cluster does not answer: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                )),
                Err(e) => Some(format!("kubectl cannot run: {e}")),
            }
        }
    };
    match problem {
        None => true,
        Some(p) if ci => panic!("{test} needs a Kubernetes cluster and CI=true: {p}. Start one with ../shared/k8s/cluster.sh up (scripts/test.sh does)"),
        Some(p) => {
            eprintln!(
                "NOT RUN: {test} needs a Kubernetes cluster ({p}). Point KUBECONFIG at one whose nodes pull from a registry it advertises (ConfigMap kube-public/local-registry-hosting), or start this machine's with ../shared/k8s/cluster.sh build && ../shared/k8s/cluster.sh up"
            );
            false
        }
    }
}

/// A namespace of its own per test, deleted (without waiting) when dropped.
pub struct Namespace {
    pub name: String,
}

impl Namespace {
    pub fn new(test: &str) -> Namespace {
        let name = format!("dl-t{}-{test}", std::process::id());
        kubectl_ok(&["create", "namespace", &name]);
        Namespace { name }
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = kubectl(&["delete", "namespace", &self.name, "--wait=false"]);
    }
}

/// The example's api and web images, built from examples/shop and pushed to the cluster's
/// registry once per test process: (api, web) references the cluster pulls.
pub fn shop_images() -> &'static (String, String) {
    static IMAGES: OnceLock<(String, String)> = OnceLock::new();
    IMAGES.get_or_init(|| {
        ensure_base_image();
        let build = |svc: &str| {
            let image = format!("{REGISTRY}/devloop-test-shop-{svc}:1");
            let dir = workspace().join("examples/shop").join(svc);
            let o = Command::new("docker")
                .env("DOCKER_BUILDKIT", "0")
                .args(["build", "-q", "-t", &image])
                .arg(&dir)
                .output()
                .expect("docker build");
            assert!(
                o.status.success(),
                "docker build {svc}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            docker_ok(&["push", &image]);
            image
        };
        (build("api"), build("web"))
    })
}

/// Applies the example's manifests with the test images and waits for both rollouts.
pub fn deploy_shop(ns: &Namespace) {
    let (api, web) = shop_images();
    for (file, placeholder, image) in [
        ("api.yaml", "image: shop-api", api),
        ("web.yaml", "image: shop-web", web),
    ] {
        let text = std::fs::read_to_string(workspace().join("examples/shop/k8s").join(file))
            .expect("manifest");
        assert!(text.contains(placeholder), "{file} has no `{placeholder}`");
        let text = text.replace(placeholder, &format!("image: {image}"));
        let path = std::env::temp_dir().join(format!("{}-{file}", ns.name));
        std::fs::write(&path, text).expect("write manifest");
        kubectl_ok(&[
            "-n",
            &ns.name,
            "apply",
            "-f",
            path.to_str().expect("utf-8 path"),
        ]);
    }
    for d in ["api", "web"] {
        kubectl_ok(&[
            "-n",
            &ns.name,
            "rollout",
            "status",
            &format!("deployment/{d}"),
            "--timeout=180s",
        ]);
    }
}

/// GET from inside the web pod (a caller in the cluster), with the pod's own python.
pub fn get_from_web(ns: &Namespace, url: &str) -> Option<String> {
    let script = format!(
        "import urllib.request\ntry:\n    print(urllib.request.urlopen('{url}', timeout=3).read().decode())\nexcept Exception as e:\n    print('ERR', e)"
    );
    let o = kubectl(&[
        "-n",
        &ns.name,
        "exec",
        "deploy/web",
        "--",
        "python3",
        "-c",
        &script,
    ]);
    let out = String::from_utf8_lossy(&o.stdout).trim().to_string();
    (o.status.success() && !out.starts_with("ERR")).then_some(out)
}

/// The spec of a Deployment as the API server holds it.
pub fn deployment_spec(ns: &Namespace, name: &str) -> serde_json::Value {
    let out = kubectl_ok(&["-n", &ns.name, "get", "deployment", name, "-o", "json"]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("deployment json");
    v["spec"].clone()
}

/// Polls until `f` gives Some or the timeout passes.
pub fn poll<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if std::time::Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A kubeconfig for a ServiceAccount of `ns` (its token; the cluster and CA of the admin's
/// kubeconfig): a user whom RBAC allows nothing until a RoleBinding grants it something.
/// Works on any cluster, unlike client certificates.
pub fn service_account_kubeconfig(ns: &Namespace, name: &str, dir: &std::path::Path) -> PathBuf {
    kubectl_ok(&["-n", &ns.name, "create", "serviceaccount", name]);
    // Kubernetes 1.20 makes the token Secret a moment after the account.
    let secret = poll(Duration::from_secs(30), || {
        let out = kubectl(&[
            "-n",
            &ns.name,
            "get",
            "serviceaccount",
            name,
            "-o",
            "jsonpath={.secrets[0].name}",
        ]);
        let s = String::from_utf8_lossy(&out.stdout).trim().to_string();
        (!s.is_empty()).then_some(s)
    })
    .expect("the service account's token secret");
    let token_b64 = kubectl_ok(&[
        "-n",
        &ns.name,
        "get",
        "secret",
        &secret,
        "-o",
        "jsonpath={.data.token}",
    ]);
    let token = String::from_utf8(
        Command::new("base64")
            .arg("-d")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                use std::io::Write;
                c.stdin
                    .take()
                    .expect("stdin")
                    .write_all(token_b64.as_bytes())?;
                c.wait_with_output()
            })
            .expect("base64 -d")
            .stdout,
    )
    .expect("utf-8 token");
    let view: serde_json::Value = serde_json::from_str(&kubectl_ok(&[
        "config", "view", "--raw", "--minify", "-o", "json",
    ]))
    .expect("kubeconfig json");
    let cluster = &view["clusters"][0]["cluster"];
    let config = serde_json::json!({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "c", "cluster": cluster}],
        "users": [{"name": name, "user": {"token": token.trim()}}],
        "contexts": [{"name": name, "context": {"cluster": "c", "user": name, "namespace": ns.name}}],
        "current-context": name,
    });
    let path = dir.join(format!("{name}.kubeconfig"));
    std::fs::write(&path, serde_json::to_string(&config).expect("json")).expect("write kubeconfig");
    path
}
