//! The decoder and request-shape tier of the Kubernetes code: kube's client built on a mock
//! service (`tower_test::mock::pair`, as kube's own tests do), so each test says exactly which
//! requests devloop sends (method, path with query, Content-Type, JSON body), in order, and
//! what it makes of the answers. This is what a real cluster cannot easily show: the 403 of a
//! user without a permission, the 404 of a namespace, Service or Secret that is not there, a
//! 422 from a JSON-patch `test` op, a 500, and the exact shape of a request that a forgiving
//! API server would accept anyway. The responder is strict: a request out of order, a missing
//! one or an extra one fails the test.

use std::future::Future;
use std::time::Duration;

use http::{header::CONTENT_TYPE, Method, Request, Response, StatusCode};
use kube::client::Body;
use serde_json::{json, Value};
use tower_test::mock;

use super::intercept::{self, Record, RECORD, SECRET_LABEL, SESSION_LABEL};
use super::registry::{self, Registry};
use super::{Cluster, KubeError, PERMISSIONS};

const NS: &str = "team-a";
const JSON_PATCH: &str = "application/json-patch+json";
const JSON: &str = "application/json";

/// One request the code must send, and the answer the mock API server gives it.
struct Exchange {
    method: Method,
    /// Path and query, exactly.
    uri: String,
    /// The request's Content-Type; None: the request must have none.
    content_type: Option<&'static str>,
    /// The request's body as JSON; None: the body must be empty.
    body: Option<Value>,
    status: StatusCode,
    answer: String,
}

impl Exchange {
    fn new(
        method: Method,
        uri: &str,
        content_type: Option<&'static str>,
        body: Option<Value>,
    ) -> Exchange {
        Exchange {
            method,
            uri: uri.into(),
            content_type,
            body,
            status: StatusCode::OK,
            answer: "{}".into(),
        }
    }

    /// Answers with this status and JSON body.
    fn answer(self, status: u16, body: Value) -> Exchange {
        self.answer_text(status, &body.to_string())
    }

    /// Answers with this status and raw body (what a proxy in front of the API server sends).
    fn answer_text(self, status: u16, body: &str) -> Exchange {
        Exchange {
            status: StatusCode::from_u16(status).expect("a status code"),
            answer: body.into(),
            ..self
        }
    }
}

fn get(uri: &str) -> Exchange {
    Exchange::new(Method::GET, uri, None, None)
}

fn delete(uri: &str) -> Exchange {
    Exchange::new(Method::DELETE, uri, None, None)
}

fn post(uri: &str, body: Value) -> Exchange {
    Exchange::new(Method::POST, uri, Some(JSON), Some(body))
}

fn patch(uri: &str, ops: Value) -> Exchange {
    Exchange::new(Method::PATCH, uri, Some(JSON_PATCH), Some(ops))
}

/// The `Status` object the API server sends with an error.
fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message, "reason": reason, "code": code})
}

fn not_found(what: &str) -> Value {
    status(404, "NotFound", &format!("{what} not found"))
}

/// Runs `code` against a [`Cluster`] whose API server is the mock answering `expected` in
/// order; fails on a request that differs from the expected one, on one that never came and
/// on any request after the last expected one.
async fn exchange<T, Fut>(expected: Vec<Exchange>, code: impl FnOnce(Cluster) -> Fut) -> T
where
    Fut: Future<Output = T>,
{
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let cluster = Cluster {
        client: kube::Client::new(service, NS),
        namespace: NS.into(),
        context: "mock".into(),
    };
    let server = tokio::spawn(serve(handle, expected));
    // The cluster (the only client of the mock) is dropped when `code` is done, which ends
    // the server's wait for an unexpected extra request.
    let out = tokio::time::timeout(Duration::from_secs(20), code(cluster))
        .await
        .expect("the code under test hung");
    match tokio::time::timeout(Duration::from_secs(20), server)
        .await
        .expect("the mock server hung")
    {
        Ok(()) => out,
        // The responder's assertion is the useful message, not what the code made of it.
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

async fn serve(mut handle: mock::Handle<Request<Body>, Response<Body>>, expected: Vec<Exchange>) {
    for (i, x) in expected.into_iter().enumerate() {
        let want = format!("{} {}", x.method, x.uri);
        let Some((req, send)) = handle.next_request().await else {
            panic!("request {} never came: {want}", i + 1);
        };
        let (parts, body) = req.into_parts();
        let got = format!("{} {}", parts.method, parts.uri);
        assert_eq!(got, want, "request {}", i + 1);
        let content_type = parts
            .headers
            .get(CONTENT_TYPE)
            .map(|v| v.to_str().expect("an ASCII Content-Type"));
        assert_eq!(content_type, x.content_type, "Content-Type of {got}");
        let bytes = body.collect_bytes().await.expect("a request body");
        match &x.body {
            None => assert!(
                bytes.is_empty(),
                "{got} has a body: {}",
                String::from_utf8_lossy(&bytes)
            ),
            Some(expected) => {
                let sent: Value = serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                    panic!(
                        "{got}: the body is not JSON ({e}): {}",
                        String::from_utf8_lossy(&bytes)
                    )
                });
                assert_eq!(&sent, expected, "body of {got}");
            }
        }
        let answer = Response::builder()
            .status(x.status)
            .header(CONTENT_TYPE, JSON)
            .body(Body::from(x.answer.into_bytes()))
            .expect("a response");
        send.send_response(answer);
    }
    if let Some((req, _)) = handle.next_request().await {
        panic!(
            "unexpected request after the expected ones: {} {}",
            req.method(),
            req.uri()
        );
    }
}

fn deployments(name: &str) -> String {
    format!("/apis/apps/v1/namespaces/{NS}/deployments/{name}")
}

fn deployment(name: &str, labels: Value) -> Value {
    json!({"kind": "Deployment", "metadata": {"name": name, "resourceVersion": "7"},
           "spec": {"replicas": 2, "template": {"metadata": {"labels": labels}, "spec": {"containers": [{"name": "app", "image": "app:1"}]}}}})
}

fn record() -> Record {
    Record {
        deployment: "api".into(),
        service: "api".into(),
        container: "app".into(),
        template: deployment("api", json!({"app": "api"}))["spec"]["template"].clone(),
        replicas: json!(2),
        ports: vec![(8000, 3000)],
        session: "s1".into(),
        secret: "api-devloop-intercept-s1".into(),
        account: "api-devloop-lease-s1".into(),
        started_ms: 1,
        holder: "me@laptop pid 1".into(),
    }
}

/// The three deletions of a lease account, in the order devloop makes them.
fn lease_account_deletions(name: &str, status: u16, answer: Value) -> Vec<Exchange> {
    vec![
        delete(&format!(
            "/apis/rbac.authorization.k8s.io/v1/namespaces/{NS}/rolebindings/{name}"
        ))
        .answer(status, answer.clone()),
        delete(&format!(
            "/apis/rbac.authorization.k8s.io/v1/namespaces/{NS}/roles/{name}"
        ))
        .answer(status, answer.clone()),
        delete(&format!("/api/v1/namespaces/{NS}/serviceaccounts/{name}")).answer(status, answer),
    ]
}

fn kube_error(e: &anyhow::Error) -> &KubeError {
    e.downcast_ref::<KubeError>()
        .unwrap_or_else(|| panic!("not a KubeError: {e:#}"))
}

// ---- The responder itself: strict about order, missing and extra requests ----

#[tokio::test]
#[should_panic(
    expected = "unexpected request after the expected ones: GET /api/v1/namespaces/team-a/pods"
)]
async fn the_responder_fails_on_an_extra_request() {
    let path = format!("/api/v1/namespaces/{NS}/pods");
    let _ = exchange(vec![get(&path)], |c| async move {
        (c.get_json(&path).await, c.get_json(&path).await)
    })
    .await;
}

#[tokio::test]
#[should_panic(expected = "request 2 never came: DELETE /api/v1/namespaces/team-a/pods/p")]
async fn the_responder_fails_on_a_missing_request() {
    let path = format!("/api/v1/namespaces/{NS}/pods");
    let _ = exchange(
        vec![get(&path), delete(&format!("{path}/p"))],
        |c| async move { c.get_json(&path).await },
    )
    .await;
}

#[tokio::test]
#[should_panic(expected = "Content-Type of PATCH")]
async fn the_responder_checks_the_content_type() {
    let path = deployments("api");
    let ops = json!([]);
    // A merge patch where a JSON patch is expected.
    let mut x = patch(&path, ops.clone());
    x.content_type = Some("application/merge-patch+json");
    let _ = exchange(vec![x], |c| async move { c.json_patch(&path, &ops).await }).await;
}

// ---- Cluster: the request primitives and how they decode answers ----

#[tokio::test]
async fn json_patch_sends_the_ops_as_a_json_patch_and_decodes_the_answer() {
    let ops = json!([{"op": "test", "path": "/metadata/resourceVersion", "value": "7"}, {"op": "add", "path": "/spec/replicas", "value": 1}]);
    let patched =
        json!({"kind": "Deployment", "metadata": {"name": "api"}, "spec": {"replicas": 1}});
    let out = exchange(
        vec![patch(&deployments("api"), ops.clone()).answer(200, patched.clone())],
        |c| async move { c.json_patch(&deployments("api"), &ops).await },
    )
    .await;
    assert_eq!(out.unwrap(), patched);
}

#[tokio::test]
async fn post_json_sends_json_and_decodes_the_answer() {
    let path = format!("/api/v1/namespaces/{NS}/secrets");
    let body = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"}});
    let created = json!({"kind": "Secret", "metadata": {"name": "s", "uid": "u-1"}});
    let out = exchange(
        vec![post(&path, body.clone()).answer(201, created.clone())],
        |c| async move { c.post_json(&path, &body).await },
    )
    .await;
    assert_eq!(out.unwrap(), created);
}

#[tokio::test]
async fn delete_treats_a_404_as_done_and_surfaces_a_500() {
    let path = format!("/api/v1/namespaces/{NS}/secrets/gone");
    let expected = vec![
        delete(&path).answer(
            200,
            json!({"kind": "Status", "status": "Success", "code": 200}),
        ),
        delete(&path).answer(404, not_found("secrets \"gone\"")),
        delete(&path).answer(
            500,
            status(500, "InternalError", "etcdserver: request timed out"),
        ),
    ];
    let (ok, gone, failed) = exchange(expected, |c| async move {
        (
            c.delete(&path).await,
            c.delete(&path).await,
            c.delete(&path).await,
        )
    })
    .await;
    ok.unwrap();
    gone.expect("a 404 is already deleted");
    let e = failed.expect_err("a 500 is an error");
    assert_eq!(super::status_of(&e), Some(500));
    assert!(
        e.to_string().contains("etcdserver: request timed out"),
        "{e}"
    );
}

#[tokio::test]
async fn get_opt_maps_a_404_to_none_and_keeps_other_errors() {
    let path = format!("/api/v1/namespaces/{NS}/services/api");
    let svc = json!({"kind": "Service", "metadata": {"name": "api"}});
    let expected = vec![
        get(&path).answer(200, svc.clone()),
        get(&path).answer(404, not_found("services \"api\"")),
        // Not a Status (a proxy's page): kube takes the code from the HTTP status.
        get(&path).answer_text(404, "404 page not found"),
        get(&path).answer(
            403,
            status(403, "Forbidden", "services \"api\" is forbidden"),
        ),
    ];
    let out = exchange(expected, |c| async move {
        let mut out = Vec::new();
        for _ in 0..4 {
            out.push(c.get_opt(&path).await);
        }
        out
    })
    .await;
    let mut out = out.into_iter();
    assert_eq!(out.next().unwrap().unwrap(), Some(svc));
    assert_eq!(out.next().unwrap().unwrap(), None);
    assert_eq!(out.next().unwrap().unwrap(), None);
    assert_eq!(
        super::status_of(&out.next().unwrap().unwrap_err()),
        Some(403)
    );
}

#[tokio::test]
async fn err_names_the_verb_and_resource_of_a_403() {
    let ops = json!([]);
    let expected = vec![
        patch(&deployments("api"), ops.clone()).answer(
            403,
            status(
                403,
                "Forbidden",
                "deployments.apps \"api\" is forbidden: User \"dev\" cannot patch resource",
            ),
        ),
        patch(&deployments("api"), ops.clone()).answer(500, status(500, "InternalError", "boom")),
    ];
    let (forbidden, failed) = exchange(expected, |c| async move {
        let a = c
            .json_patch(&deployments("api"), &ops)
            .await
            .map_err(|e| c.err(e, "patch", "deployments", "swapping deployment api"));
        let b = c
            .json_patch(&deployments("api"), &ops)
            .await
            .map_err(|e| c.err(e, "patch", "deployments", "swapping deployment api"));
        (a, b)
    })
    .await;
    let forbidden = forbidden.unwrap_err();
    assert!(
        matches!(&forbidden, KubeError::Forbidden { verb, resource, namespace, .. } if verb == "patch" && resource == "deployments" && namespace == NS),
        "{forbidden:?}"
    );
    let text = forbidden.to_string();
    assert!(
        text.contains("`patch` on `deployments` in namespace `team-a`"),
        "{text}"
    );
    assert!(
        text.contains("User \"dev\" cannot patch resource"),
        "{text}"
    );
    let failed = failed.unwrap_err();
    assert!(matches!(&failed, KubeError::Api { .. }), "{failed:?}");
    assert_eq!(failed.to_string(), "swapping deployment api: boom");
}

#[tokio::test]
async fn check_namespace_names_only_a_missing_namespace() {
    let path = format!("/api/v1/namespaces/{NS}");
    let expected = vec![
        get(&path).answer(200, json!({"kind": "Namespace", "metadata": {"name": NS}})),
        get(&path).answer(404, not_found("namespaces \"team-a\"")),
        // A namespaced Role cannot read namespaces: not stopped here.
        get(&path).answer(
            403,
            status(403, "Forbidden", "namespaces \"team-a\" is forbidden"),
        ),
        // Refused credentials are said at once, not at the first real request.
        get(&path).answer(401, status(401, "Unauthorized", "Unauthorized")),
    ];
    let (exists, missing, forbidden, unauthorized) = exchange(expected, |c| async move {
        (
            c.check_namespace().await,
            c.check_namespace().await,
            c.check_namespace().await,
            c.check_namespace().await,
        )
    })
    .await;
    let unauthorized = unauthorized.unwrap_err().to_string();
    assert!(
        unauthorized.contains("refused the context's credentials"),
        "{unauthorized}"
    );
    exists.unwrap();
    let missing = missing.unwrap_err();
    assert!(
        matches!(&missing, KubeError::UnknownNamespace { namespace, context } if namespace == NS && context == "mock"),
        "{missing:?}"
    );
    forbidden.expect("a 403 on the namespace is not an error");
}

// ---- Permissions: SelfSubjectAccessReviews ----

const SSAR: &str = "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews";

fn review(group: &str, resource: &str, subresource: &str, verb: &str) -> Value {
    json!({
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SelfSubjectAccessReview",
        "spec": {"resourceAttributes": {"namespace": NS, "verb": verb, "group": group, "resource": resource, "subresource": subresource}},
    })
}

fn reviewed(request: &Value, allowed: bool) -> Value {
    let mut answer = request.clone();
    answer["status"] = json!({"allowed": allowed});
    answer
}

#[tokio::test]
async fn can_posts_a_self_subject_access_review_and_reads_allowed() {
    let portforward = review("", "pods", "portforward", "get");
    let patch_deployments = review("apps", "deployments", "", "patch");
    let expected = vec![
        post(SSAR, portforward.clone()).answer(201, reviewed(&portforward, true)),
        post(SSAR, patch_deployments.clone()).answer(201, reviewed(&patch_deployments, false)),
        // No status at all: not allowed.
        post(SSAR, patch_deployments.clone()).answer(201, patch_deployments.clone()),
    ];
    let out = exchange(expected, |c| async move {
        (
            c.can("", "pods", "portforward", "get").await.unwrap(),
            c.can("apps", "deployments", "", "patch").await.unwrap(),
            c.can("apps", "deployments", "", "patch").await.unwrap(),
        )
    })
    .await;
    assert_eq!(out, (true, false, false));
}

#[tokio::test]
async fn missing_permissions_reviews_every_permission_in_order() {
    let denied = [
        ("apps", "deployments", "", "patch"),
        ("", "pods", "portforward", "get"),
    ];
    let expected = PERMISSIONS
        .iter()
        .map(|&(group, resource, sub, verb)| {
            let r = review(group, resource, sub, verb);
            post(SSAR, r.clone()).answer(
                201,
                reviewed(&r, !denied.contains(&(group, resource, sub, verb))),
            )
        })
        .collect();
    let missing = exchange(expected, |c| async move { c.missing_permissions().await })
        .await
        .unwrap();
    assert_eq!(
        missing,
        vec![
            "patch deployments".to_string(),
            "get pods/portforward".to_string()
        ]
    );
}

// ---- registry::discover: the KEP-1755 ConfigMap ----

const HOSTING: &str = "/api/v1/namespaces/kube-public/configmaps/local-registry-hosting";

/// `discover` reads DEVLOOP_REGISTRY before anything else; the cluster cases need it unset.
fn registry_env_is_set() -> bool {
    let set = std::env::var_os("DEVLOOP_REGISTRY").is_some_and(|v| !v.is_empty());
    if set {
        eprintln!("DEVLOOP_REGISTRY is set: the cluster's registry is not consulted, skipping");
    }
    set
}

#[tokio::test]
async fn discover_reads_the_registry_the_cluster_advertises() {
    if registry_env_is_set() {
        return;
    }
    let cm = json!({"kind": "ConfigMap", "metadata": {"name": "local-registry-hosting", "namespace": "kube-public"},
                    "data": {"localRegistryHosting.v1": "host: \"localhost:5001\"\nhostFromContainerRuntime: \"kind-registry:5000\"\nhelp: \"https://kind.sigs.k8s.io/docs/user/local-registry/\"\n"}});
    let found = exchange(vec![get(HOSTING).answer(200, cm)], |c| async move {
        registry::discover(&c, None).await
    })
    .await
    .unwrap();
    assert_eq!(
        found,
        Some(Registry {
            push: "localhost:5001".into(),
            pull: "kind-registry:5000".into(),
            source: "ConfigMap kube-public/local-registry-hosting".into()
        })
    );
}

#[tokio::test]
async fn route_loads_with_the_local_tool_only_for_kind_k3d_and_minikube() {
    if registry_env_is_set() {
        return;
    }
    let cm = "/api/v1/namespaces/kube-public/configmaps/local-registry-hosting";
    for (context, want) in [
        ("kind-dev", Some("kind-dev")),
        ("k3d-x", Some("k3d-x")),
        ("minikube", Some("minikube")),
        ("prod", None),
    ] {
        let expected =
            vec![get(cm).answer(404, not_found("configmaps \"local-registry-hosting\""))];
        let got = exchange(expected, |mut c| async move {
            c.context = context.into();
            registry::route(&c, None).await
        })
        .await;
        match want {
            Some(ctx) => assert_eq!(
                got.unwrap(),
                registry::ImageRoute::Load {
                    context: ctx.into()
                }
            ),
            None => assert!(got
                .unwrap_err()
                .to_string()
                .contains("set `registry = \"HOST:PORT\"` under [target]")),
        }
    }
}

#[tokio::test]
async fn discover_prefers_the_configured_registry_without_a_request() {
    if registry_env_is_set() {
        return;
    }
    let found = exchange(vec![], |c| async move {
        registry::discover(&c, Some("reg.example.com:5000")).await
    })
    .await
    .unwrap();
    assert_eq!(
        found,
        Some(Registry {
            push: "reg.example.com:5000".into(),
            pull: "reg.example.com:5000".into(),
            source: "[target] registry in devloop.toml".into()
        })
    );
}

#[tokio::test]
async fn discover_finds_nothing_on_404_403_or_an_empty_configmap_and_names_other_errors() {
    if registry_env_is_set() {
        return;
    }
    let expected = vec![
        get(HOSTING).answer(404, not_found("configmaps \"local-registry-hosting\"")),
        get(HOSTING).answer(403, status(403, "Forbidden", "configmaps is forbidden")),
        get(HOSTING).answer(200, json!({"kind": "ConfigMap", "data": {"other": "x"}})),
        get(HOSTING).answer(500, status(500, "InternalError", "boom")),
    ];
    let out = exchange(expected, |c| async move {
        let mut out = Vec::new();
        for _ in 0..4 {
            out.push(registry::discover(&c, None).await);
        }
        out
    })
    .await;
    let mut out = out.into_iter();
    for case in ["404", "403", "no document"] {
        assert_eq!(
            out.next()
                .unwrap()
                .unwrap_or_else(|e| panic!("{case}: {e}")),
            None,
            "{case}"
        );
    }
    let e = out.next().unwrap().unwrap_err();
    assert_eq!(e.to_string(), "reading the advertised registry: boom");
}

// ---- intercept: finding the workload ----

#[tokio::test]
async fn find_deployment_by_the_deployment_name() {
    let d = deployment("api", json!({"app": "api"}));
    let expected = vec![
        get(&deployments("api")).answer(200, d.clone()),
        get(&format!("/api/v1/namespaces/{NS}/services/api"))
            .answer(404, not_found("services \"api\"")),
    ];
    let (found, svc) = exchange(expected, |c| async move {
        intercept::find_deployment(&c, "api").await
    })
    .await
    .unwrap();
    assert_eq!(found, d);
    assert_eq!(svc, None);
}

#[tokio::test]
async fn find_deployment_by_its_name_needs_no_permission_on_services() {
    let d = deployment("api", json!({"app": "api"}));
    let expected = vec![
        get(&deployments("api")).answer(200, d.clone()),
        get(&format!("/api/v1/namespaces/{NS}/services/api")).answer(
            403,
            status(403, "Forbidden", "services \"api\" is forbidden"),
        ),
    ];
    let (found, svc) = exchange(expected, |c| async move {
        intercept::find_deployment(&c, "api").await
    })
    .await
    .unwrap();
    assert_eq!((found, svc), (d, None));
}

#[tokio::test]
async fn find_deployment_by_a_service_selecting_its_pods() {
    let svc = json!({"kind": "Service", "metadata": {"name": "web"}, "spec": {"selector": {"app": "api", "tier": "be"}, "ports": [{"port": 80}]}});
    let other = deployment("frontend", json!({"app": "frontend", "tier": "be"}));
    let partial = deployment("api-canary", json!({"app": "api"}));
    let api = deployment("api", json!({"app": "api", "tier": "be", "extra": "x"}));
    let expected = vec![
        get(&deployments("web")).answer(404, not_found("deployments.apps \"web\"")),
        get(&format!("/api/v1/namespaces/{NS}/services/web")).answer(200, svc.clone()),
        get(&format!("/apis/apps/v1/namespaces/{NS}/deployments")).answer(
            200,
            json!({"kind": "DeploymentList", "items": [other, partial, api.clone()]}),
        ),
    ];
    let (found, found_svc) = exchange(expected, |c| async move {
        intercept::find_deployment(&c, "web").await
    })
    .await
    .unwrap();
    assert_eq!(found, api);
    assert_eq!(found_svc, Some(svc));
}

#[tokio::test]
async fn find_deployment_explains_ambiguous_selectorless_and_unknown_names() {
    let svc_path = format!("/api/v1/namespaces/{NS}/services/web");
    let with_selector = json!({"kind": "Service", "metadata": {"name": "web"}, "spec": {"selector": {"app": "web"}}});
    let headless =
        json!({"kind": "Service", "metadata": {"name": "web"}, "spec": {"clusterIP": "None"}});
    let expected = vec![
        // Two Deployments behind the Service.
        get(&deployments("web")).answer(404, not_found("deployments.apps \"web\"")),
        get(&svc_path).answer(200, with_selector),
        get(&format!("/apis/apps/v1/namespaces/{NS}/deployments")).answer(
            200,
            json!({"kind": "DeploymentList", "items": [deployment("web-blue", json!({"app": "web"})), deployment("web-green", json!({"app": "web"}))]}),
        ),
        // A Service without a selector: nothing is listed.
        get(&deployments("web")).answer(404, not_found("deployments.apps \"web\"")),
        get(&svc_path).answer(200, headless),
        // Neither a Service nor a Deployment.
        get(&deployments("web")).answer(404, not_found("deployments.apps \"web\"")),
        get(&svc_path).answer(404, not_found("services \"web\"")),
        // No Deployment of that name, and reading the Service is forbidden.
        get(&deployments("web")).answer(404, not_found("deployments.apps \"web\"")),
        get(&svc_path).answer(403, status(403, "Forbidden", "services \"web\" is forbidden")),
    ];
    let out = exchange(expected, |c| async move {
        let mut out = Vec::new();
        for _ in 0..4 {
            out.push(
                intercept::find_deployment(&c, "web")
                    .await
                    .map(|_| ())
                    .unwrap_err(),
            );
        }
        out
    })
    .await;
    let text: Vec<String> = out.iter().map(|e| e.to_string()).collect();
    assert!(
        text[0].contains("several Deployments (web-blue, web-green)"),
        "{}",
        text[0]
    );
    assert!(text[1].contains("has no selector"), "{}", text[1]);
    assert_eq!(
        text[2],
        "no Deployment or Service named `web` in namespace `team-a` (context `mock`)"
    );
    assert!(
        matches!(kube_error(&out[3]), KubeError::Forbidden { verb, resource, .. } if verb == "get" && resource == "services"),
        "{}",
        text[3]
    );
}

// ---- intercept: swap, restore and what they leave ----

#[tokio::test]
async fn swap_in_sends_the_swap_patch_and_names_a_concurrent_change() {
    let d = deployment("api", json!({"app": "api"}));
    let r = record();
    let template = json!({"metadata": {"labels": {"app": "api", SESSION_LABEL: "s1"}}, "spec": {"containers": []}});
    let ops = intercept::swap_patch(&d, &r, &template);
    // The patch guards on the resourceVersion read, so a concurrent change fails it.
    assert_eq!(
        ops[0],
        json!({"op": "test", "path": "/metadata/resourceVersion", "value": "7"})
    );
    let expected = vec![
        patch(&deployments("api"), ops.clone()).answer(200, d.clone()),
        patch(&deployments("api"), ops.clone()).answer(
            422,
            status(
                422,
                "Invalid",
                "the server rejected our request: test operation failed",
            ),
        ),
        patch(&deployments("api"), ops).answer(403, status(403, "Forbidden", "cannot patch")),
    ];
    let out = exchange(expected, |c| async move {
        let mut out = Vec::new();
        for _ in 0..3 {
            out.push(intercept::swap_in(&c, &d, &r, &template).await);
        }
        out
    })
    .await;
    let mut out = out.into_iter();
    out.next().unwrap().unwrap();
    let changed = out.next().unwrap().unwrap_err();
    assert_eq!(
        changed.to_string(),
        "deployment api changed while devloop was swapping it; try again"
    );
    let forbidden = out.next().unwrap().unwrap_err();
    assert!(
        forbidden.to_string().contains("`patch` on `deployments`"),
        "{forbidden}"
    );
}

#[tokio::test]
async fn restore_patches_the_original_back_then_removes_the_secret_and_lease_account() {
    let r = record();
    let ops = intercept::restore_patch(&r);
    // The patch is guarded by this session's label, then puts the template and replicas back.
    assert_eq!(
        ops[0],
        json!({"op": "test", "path": "/spec/template/metadata/labels/devloop.dev~1intercept-session", "value": "s1"})
    );
    assert_eq!(ops[1]["value"], r.template);
    let secret = format!("/api/v1/namespaces/{NS}/secrets/api-devloop-intercept-s1");
    let mut expected = vec![
        patch(&deployments("api"), ops.clone()).answer(200, json!({"kind": "Deployment"})),
        delete(&secret),
    ];
    expected.extend(lease_account_deletions(
        "api-devloop-lease-s1",
        200,
        json!({"kind": "Status", "status": "Success"}),
    ));
    // Restored already (the test op fails): still cleaned up, and said so.
    expected.push(
        patch(&deployments("api"), ops)
            .answer(422, status(422, "Invalid", "test operation failed")),
    );
    expected.push(delete(&secret).answer(404, not_found("secrets \"api-devloop-intercept-s1\"")));
    expected.extend(lease_account_deletions(
        "api-devloop-lease-s1",
        404,
        not_found("it"),
    ));
    let (first, second) = exchange(expected, |c| async move {
        let r = record();
        (
            intercept::restore(&c, &r).await.unwrap(),
            intercept::restore(&c, &r).await.unwrap(),
        )
    })
    .await;
    assert!(first, "the first restore applied");
    assert!(!second, "the second found nothing to restore");
}

#[tokio::test]
async fn restore_stops_on_a_forbidden_patch() {
    let r = record();
    let expected = vec![patch(&deployments("api"), intercept::restore_patch(&r))
        .answer(403, status(403, "Forbidden", "cannot patch"))];
    let e = exchange(expected, |c| async move {
        intercept::restore(&c, &record()).await
    })
    .await
    .unwrap_err();
    assert!(
        matches!(kube_error(&e), KubeError::Forbidden { verb, .. } if verb == "patch"),
        "{e}"
    );
}

fn token_secret_body() -> Value {
    let r = record();
    json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "api-devloop-intercept-s1", "labels": {SECRET_LABEL: "api", "app.kubernetes.io/managed-by": "devloop"}},
        "type": "Opaque",
        "stringData": {
            "token": "tok",
            "restore.json": serde_json::to_string(&intercept::lease_restore_patch(&r)).unwrap(),
            "restore-path": deployments("api"),
        },
    })
}

#[tokio::test]
async fn create_token_secret_holds_the_token_and_the_restore_under_the_sessions_name() {
    let secrets = format!("/api/v1/namespaces/{NS}/secrets");
    let body = token_secret_body();
    // Nothing is deleted first: the name is this session's alone, so another session's
    // Secret (a concurrent intercept's) is never touched.
    let expected = vec![post(&secrets, body).answer(201, json!({"kind": "Secret"}))];
    exchange(expected, |c| async move {
        intercept::create_token_secret(&c, "api-devloop-intercept-s1", &record(), "tok").await
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn create_token_secret_names_the_permission_it_lacks() {
    let expected = vec![post(
        &format!("/api/v1/namespaces/{NS}/secrets"),
        token_secret_body(),
    )
    .answer(403, status(403, "Forbidden", "secrets is forbidden"))];
    let e = exchange(expected, |c| async move {
        intercept::create_token_secret(&c, "api-devloop-intercept-s1", &record(), "tok").await
    })
    .await
    .unwrap_err();
    assert!(
        matches!(kube_error(&e), KubeError::Forbidden { verb, resource, .. } if verb == "create" && resource == "secrets"),
        "{e}"
    );
}

#[tokio::test]
async fn create_lease_account_creates_the_sessions_account_and_a_role_for_this_deployment_only() {
    let name = "api-devloop-lease-s1";
    let labels = json!({SECRET_LABEL: "api", intercept::SESSION_LABEL: "s1", "app.kubernetes.io/managed-by": "devloop"});
    let rbac = format!("/apis/rbac.authorization.k8s.io/v1/namespaces/{NS}");
    let mut expected = Vec::new();
    expected.push(
        post(&format!("/api/v1/namespaces/{NS}/serviceaccounts"), json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name, "labels": labels, "annotations": {intercept::ACCOUNT_SECRET: "api-devloop-intercept-s1"}}}))
            .answer(201, json!({})),
    );
    expected.push(
        post(
            &format!("{rbac}/roles"),
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": name, "labels": labels},
                   "rules": [{"apiGroups": ["apps"], "resources": ["deployments"], "resourceNames": ["api"], "verbs": ["patch"]}]}),
        )
        .answer(201, json!({})),
    );
    expected.push(
        post(
            &format!("{rbac}/rolebindings"),
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": name, "labels": labels},
                   "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
                   "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": NS}]}),
        )
        .answer(201, json!({})),
    );
    exchange(expected, |c| async move {
        intercept::create_lease_account(&c, &record()).await
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn sweep_removes_the_lease_leftovers_of_deployments_no_longer_intercepted() {
    let list =
        format!("/api/v1/namespaces/{NS}/serviceaccounts?labelSelector=devloop.dev%2Fintercept-of");
    let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    let account = |deployment: &str, created: &str| json!({"metadata": {"name": format!("{deployment}-devloop-lease"), "labels": {SECRET_LABEL: deployment}, "creationTimestamp": created}});
    let mut intercepted = deployment("busy", json!({"app": "busy"}));
    intercepted["metadata"]["annotations"] =
        json!({RECORD: serde_json::to_string(&record()).unwrap()});
    let mut by_lease = deployment("done", json!({"app": "done"}));
    by_lease["metadata"]["annotations"] = json!({intercept::RESTORED_BY_LEASE: "s1"});
    let mark = "/metadata/annotations/devloop.dev~1restored-by-lease";
    let mut expected = vec![
        get(&list).answer(
            200,
            json!({"kind": "ServiceAccountList", "items": [
                account("busy", "2020-01-01T00:00:00Z"), {"metadata": {"name": "unlabelled"}}, account("done", &now),
                account("setting-up", &now), account("stale", "2020-01-01T00:00:00Z"),
            ]}),
        ),
        // Still intercepted: left alone.
        get(&deployments("busy")).answer(200, intercepted),
        // Restored by its lease (the mark, however young): its account and Secret go, and the mark.
        get(&deployments("done")).answer(200, by_lease),
        patch(&deployments("done"), json!([{"op": "test", "path": mark, "value": "s1"}, {"op": "remove", "path": mark}])).answer(200, json!({})),
    ];
    expected.extend(lease_account_deletions(
        "done-devloop-lease",
        200,
        json!({}),
    ));
    expected.push(delete(&format!(
        "/api/v1/namespaces/{NS}/secrets/done-devloop-intercept"
    )));
    // No record and no mark, but just created: an intercept being set up, left alone.
    expected.push(
        get(&deployments("setting-up")).answer(200, deployment("setting-up", json!({"app": "s"}))),
    );
    // No record, no mark, old: a cli killed while setting up; cleaned.
    expected.push(get(&deployments("stale")).answer(200, deployment("stale", json!({"app": "t"}))));
    expected.extend(lease_account_deletions(
        "stale-devloop-lease",
        200,
        json!({}),
    ));
    expected.push(delete(&format!(
        "/api/v1/namespaces/{NS}/secrets/stale-devloop-intercept"
    )));
    let (cleaned, failed) = exchange(expected, |c| async move {
        intercept::sweep_lease_leftovers(&c).await
    })
    .await;
    assert_eq!(cleaned, vec!["done".to_string(), "stale".to_string()]);
    assert!(failed.is_empty(), "{failed:?}");
}

#[tokio::test]
async fn sweep_goes_on_past_a_leftover_it_cannot_remove() {
    let list =
        format!("/api/v1/namespaces/{NS}/serviceaccounts?labelSelector=devloop.dev%2Fintercept-of");
    let account = |d: &str| json!({"metadata": {"name": format!("{d}-devloop-lease"), "labels": {SECRET_LABEL: d}, "creationTimestamp": "2020-01-01T00:00:00Z"}});
    let mut expected = vec![
        get(&list).answer(
            200,
            json!({"kind": "ServiceAccountList", "items": [account("first"), account("second")]}),
        ),
        // The first one's Deployment cannot be read: reported, and the sweep goes on.
        get(&deployments("first")).answer(500, status(500, "InternalError", "etcd timed out")),
        get(&deployments("second")).answer(200, deployment("second", json!({"app": "s"}))),
    ];
    expected.extend(lease_account_deletions(
        "second-devloop-lease",
        200,
        json!({}),
    ));
    expected.push(delete(&format!(
        "/api/v1/namespaces/{NS}/secrets/second-devloop-intercept"
    )));
    let (cleaned, failed) = exchange(expected, |c| async move {
        intercept::sweep_lease_leftovers(&c).await
    })
    .await;
    assert_eq!(cleaned, vec!["second".to_string()]);
    assert_eq!(failed.len(), 1);
    let text = format!("{:#}", failed[0]);
    assert!(
        text.contains("deployment first") && text.contains("etcd timed out"),
        "{text}"
    );
}

#[tokio::test]
async fn sweep_does_nothing_when_listing_accounts_is_forbidden() {
    let list =
        format!("/api/v1/namespaces/{NS}/serviceaccounts?labelSelector=devloop.dev%2Fintercept-of");
    let expected = vec![get(&list).answer(
        403,
        status(403, "Forbidden", "serviceaccounts is forbidden"),
    )];
    let (cleaned, failed) = exchange(expected, |c| async move {
        intercept::sweep_lease_leftovers(&c).await
    })
    .await;
    assert!(cleaned.is_empty() && failed.is_empty());
}

#[tokio::test]
async fn wait_agent_pod_polls_until_ready_and_gives_up_on_a_pull_error() {
    let pods =
        format!("/api/v1/namespaces/{NS}/pods?labelSelector=devloop.dev/intercept-session%3Ds1");
    let pod = |name: &str, status: Value| json!({"metadata": {"name": name}, "status": status});
    let expected = vec![
        get(&pods).answer(200, json!({"items": []})),
        get(&pods).answer(
            200,
            json!({"items": [
                {"metadata": {"name": "old", "deletionTimestamp": "2024-01-01T00:00:00Z"}, "status": {"conditions": [{"type": "Ready", "status": "True"}]}},
                pod("new", json!({"phase": "Pending", "conditions": [{"type": "Ready", "status": "False"}]})),
            ]}),
        ),
        get(&pods).answer(200, json!({"items": [pod("new", json!({"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}))]})),
        get(&pods).answer(
            200,
            json!({"items": [pod("bad", json!({"containerStatuses": [{"name": "app", "state": {"waiting": {"reason": "ImagePullBackOff", "message": "no such image"}}}]}))]}),
        ),
    ];
    let (ready, stuck) = exchange(expected, |c| async move {
        let timeout = Duration::from_secs(10);
        (
            intercept::wait_agent_pod(&c, "s1", timeout).await,
            intercept::wait_agent_pod(&c, "s1", timeout).await,
        )
    })
    .await;
    assert_eq!(ready.unwrap(), "new");
    let stuck = stuck.unwrap_err().to_string();
    assert!(
        stuck.contains("pod bad cannot start: container app: ImagePullBackOff: no such image"),
        "{stuck}"
    );
}

// ---- Whether a watch's or a dev session's agent can come back ----

#[tokio::test]
async fn a_watch_waits_out_an_intercept_and_stops_when_its_version_is_replaced() {
    use super::connector::KubeConnector;
    use super::devpod::WATCH_LABEL;
    use crate::sync::engine::Gone;
    let watched = deployment("api", json!({"app": "api", WATCH_LABEL: "w1"}));
    let plain = deployment("api", json!({"app": "api"}));
    // Intercepted: the template is the agent's, and the record keeps the watched one.
    let mut intercepted = plain.clone();
    let held = Record {
        template: watched["spec"]["template"].clone(),
        ..record()
    };
    intercepted["metadata"]["annotations"] = json!({RECORD: serde_json::to_string(&held).unwrap()});
    let answers = vec![
        get(&deployments("api")).answer(200, watched),
        get(&deployments("api")).answer(200, intercepted),
        get(&deployments("api")).answer(200, plain),
        get(&deployments("api")).answer(404, not_found("deployments.apps \"api\"")),
    ];
    let results = exchange(answers, |cluster| async move {
        let c = KubeConnector {
            cluster,
            deployment: "api".into(),
            label: WATCH_LABEL,
            session: "w1".into(),
            token: "t".into(),
        };
        let mut out = Vec::new();
        for _ in 0..4 {
            out.push(c.still_there().await);
        }
        out
    })
    .await;
    assert!(results[0].is_ok(), "{:?}", results[0]);
    let waiting = results[1].as_ref().unwrap_err();
    assert!(
        waiting.downcast_ref::<Gone>().is_none()
            && waiting.to_string().contains("intercepted for now"),
        "{waiting:#}"
    );
    let replaced = results[2].as_ref().unwrap_err();
    assert!(
        replaced.downcast_ref::<Gone>().is_some()
            && replaced
                .to_string()
                .contains("no longer runs under this `devloop watch`"),
        "{replaced:#}"
    );
    let deleted = results[3].as_ref().unwrap_err();
    assert!(
        deleted.downcast_ref::<Gone>().is_some() && deleted.to_string().contains("was deleted"),
        "{deleted:#}"
    );
}
