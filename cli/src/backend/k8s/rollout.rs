//! `deploy`, `history` and `rollback` on Kubernetes: a snapshot (already in the cluster's
//! registry) becomes the image of the service's container in its Deployment, and the
//! Deployment's own rollout replaces the pods; devloop waits for it like `kubectl rollout
//! status`, and undoes a rollout that cannot become ready, showing why (the pod's events
//! and last log lines). The Deployment's ReplicaSets are its revisions, so `history` and
//! `rollback` read and reuse them, and `kubectl rollout history` shows the same list.
//! A service without a Deployment yet is created from the project's manifests.

use serde_json::{json, Value};
use std::path::Path;
use std::time::{Duration, Instant};

use super::intercept::record_of;
pub use super::manifests::*;
pub use super::readiness::*;
pub use super::revisions::*;
use super::{pointer_token, Cluster};

pub const CHANGE_CAUSE: &str = "kubernetes.io/change-cause";
pub const REVISION: &str = "deployment.kubernetes.io/revision";
pub(crate) const TEMPLATE_HASH: &str = "pod-template-hash";
/// On the Deployment: the `pod-template-hash`es (JSON list) of rollouts devloop undid.
pub const FAILED: &str = "devloop.dev/failed-rollouts";

/// A rollout that became ready.
#[derive(Debug, Clone)]
pub struct RolledOut {
    pub ready_ms: u64,
    pub revision: Option<u64>,
    /// Objects created from the manifests (`deployment/api`, `service/api`).
    pub created: Vec<String>,
}

/// The Deployment that runs `service`: named so, or selected by the Service named so.
/// None when neither exists.
pub async fn deployment_of(cluster: &Cluster, service: &str) -> anyhow::Result<Option<Value>> {
    let path = cluster.path("apps/v1", "deployments", Some(service));
    if let Some(d) = cluster.get_opt(&path).await.map_err(|e| {
        cluster.err(
            e,
            "get",
            "deployments",
            format!("reading deployment {service}"),
        )
    })? {
        return Ok(Some(d));
    }
    let svc_path = cluster.path("v1", "services", Some(service));
    if cluster
        .get_opt(&svc_path)
        .await
        .map_err(|e| cluster.err(e, "get", "services", format!("reading service {service}")))?
        .is_none()
    {
        return Ok(None);
    }
    Ok(Some(
        super::intercept::find_deployment(cluster, service).await?.0,
    ))
}

/// The index of the service's container: the one named like the service, else the only one.
pub fn service_container(template: &Value, service: &str) -> anyhow::Result<usize> {
    let containers = template["spec"]["containers"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if let Some(i) = containers
        .iter()
        .position(|c| c["name"].as_str() == Some(service))
    {
        return Ok(i);
    }
    match containers.len() {
        1 => Ok(0),
        0 => anyhow::bail!("the pod template has no containers"),
        _ => anyhow::bail!(
            "the pod has several containers ({}) and none is named `{service}`: name the service's container after the service",
            containers.iter().map(|c| c["name"].as_str().unwrap_or("?")).collect::<Vec<_>>().join(", ")
        ),
    }
}

/// The snapshot tag a container image carries when it is one of devloop's snapshots of
/// `repo` (`devloop-PROJECT-SERVICE`), pulled from any registry.
pub fn snapshot_tag(image: &str, repo: &str) -> Option<String> {
    let (name, tag) = image.rsplit_once(':')?;
    let last = name.rsplit('/').next()?;
    (last == repo && !tag.contains('/')).then(|| tag.to_string())
}

/// Refuses to touch a Deployment that an intercept or a dev pod holds: its template is
/// devloop's, and the original comes back with `leave` or `down`.
pub(crate) fn refuse_intercepted(d: &Value) -> anyhow::Result<()> {
    if let Some(r) = record_of(d) {
        anyhow::bail!(
            "deployment/{} is intercepted (by {}); `devloop leave {}` first",
            r.deployment,
            r.holder,
            r.deployment
        );
    }
    if let Some(r) = super::devpod::record_of(d) {
        anyhow::bail!(
            "deployment/{} is in dev mode (by {}); `devloop down` switches it back first",
            r.deployment,
            r.holder
        );
    }
    Ok(())
}

/// How a version under `devloop watch` is wrapped: the agent image, and the service's sync
/// folder (the agent's root).
#[derive(Debug, Clone)]
pub struct WatchWrap {
    pub agent_image: String,
    pub sync_to: String,
}

/// Rolls `image` out as the service's container image and waits until it is ready. With
/// `watch`, the version runs under the agent (see [`super::devpod::watch_template`]), so
/// that saves can be synced into it; without, a watched version becomes a plain one again.
pub async fn deploy_image(
    cluster: &Cluster,
    service: &str,
    image: &str,
    command: Option<&crate::deploy::ImageCommand>,
    watch: Option<&WatchWrap>,
    manifests: Option<&Path>,
    timeout: Duration,
) -> anyhow::Result<Option<RolledOut>> {
    let Some(d) = deployment_of(cluster, service).await? else {
        let Some(dir) = manifests else {
            anyhow::bail!(
                "no Deployment or Service named `{service}` in namespace `{}` (context `{}`); create it, or set `manifests = \"DIR\"` under [target] in devloop.toml so that `devloop deploy` creates it",
                cluster.namespace,
                cluster.context
            );
        };
        let created = create_from_manifests(cluster, service, image, dir, timeout).await?;
        if watch.is_none() {
            return Ok(Some(created));
        }
        // Created plain; the watched version follows as the next revision.
        let wrapped = Box::pin(deploy_image(
            cluster, service, image, command, watch, None, timeout,
        ))
        .await?;
        return Ok(Some(
            wrapped
                .map(|w| RolledOut {
                    created: created.created.clone(),
                    ready_ms: created.ready_ms + w.ready_ms,
                    ..w
                })
                .unwrap_or(created),
        ));
    };
    refuse_intercepted(&d)?;
    let current = &d["spec"]["template"];
    let was_watched = super::devpod::unwatched(current);
    let mut template = was_watched.clone().unwrap_or_else(|| current.clone());
    let index = service_container(&template, service)?;
    template["spec"]["containers"][index]["image"] = json!(image);
    let name = name_of(&d).to_string();
    let cause = match watch {
        Some(w) => {
            template = watched(cluster, &d, template, index, w, command).await?;
            format!("devloop watch {image}")
        }
        None => format!("devloop deploy {image}"),
    };
    if &template == current {
        return Ok(None);
    }
    let done = switch_template(cluster, &d, template, &cause, timeout).await?;
    if watch.is_none() && was_watched.is_some() {
        // No longer watched: its agent's token goes too (best effort: a leftover Secret holds
        // only a token no pod uses).
        let _ = cluster
            .delete(&cluster.path(
                "v1",
                "secrets",
                Some(&super::devpod::watch_secret_name(&name)),
            ))
            .await;
    }
    Ok(Some(done))
}

/// The watched form of `plain` (Deployment `d`'s template in its plain form, with the new
/// image): the session and token of the version running now when it is watched too, so an
/// unchanged tree rolls nothing out.
pub(crate) async fn watched(
    cluster: &Cluster,
    d: &Value,
    plain: Value,
    index: usize,
    w: &WatchWrap,
    command: Option<&crate::deploy::ImageCommand>,
) -> anyhow::Result<Value> {
    use super::devpod;
    let deployment = name_of(d);
    let current = &d["spec"]["template"];
    // The replicas to give back later: from the version watched now, else the current.
    let replicas =
        devpod::watched_replicas(current).unwrap_or_else(|| d["spec"]["replicas"].clone());
    let secret = devpod::watch_secret_name(deployment);
    let running = current["metadata"]["labels"][devpod::WATCH_LABEL]
        .as_str()
        .map(String::from);
    let session = match (running, devpod::read_token_opt(cluster, &secret).await?) {
        (Some(session), Some(_)) => session,
        // A new token: new pods must mount it, so a new session label makes them.
        _ => {
            devpod::create_token_secret(cluster, &secret, &crate::state::new_token()).await?;
            crate::state::new_token()[..12].to_string()
        }
    };
    let container = &plain["spec"]["containers"][index];
    let declared = command.cloned().unwrap_or_default();
    let argv = devpod::effective_command(container, &declared.entrypoint, &declared.cmd);
    if argv.is_empty() {
        anyhow::bail!("the container of deployment/{deployment} has no command and its image declares none: nothing for the agent to run under watch");
    }
    let workdir = container["workingDir"]
        .as_str()
        .map(String::from)
        .or(declared.workdir);
    let spec = devpod::DevSpec {
        agent_image: &w.agent_image,
        sync_to: &w.sync_to,
        command: &argv,
        workdir: workdir.as_deref(),
        session: &session,
        secret: &secret,
    };
    Ok(devpod::watch_template(&plain, index, &spec, &replicas))
}

pub(crate) fn name_of(d: &Value) -> &str {
    d["metadata"]["name"].as_str().unwrap_or("?")
}

/// The list path of `resource` filtered by the Deployment's selector (its matchLabels).
pub(crate) fn selected_by(
    cluster: &Cluster,
    d: &Value,
    group_version: &str,
    resource: &str,
) -> String {
    let selector: Vec<String> = d["spec"]["selector"]["matchLabels"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
        .collect();
    format!(
        "{}?labelSelector={}",
        cluster.path(group_version, resource, None),
        url_escape(&selector.join(","))
    )
}

/// Percent-escapes a label selector for a query string.
pub(crate) fn url_escape(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The JSON patch that puts `template` and the change cause on the Deployment, guarded by
/// the resourceVersion read (a concurrent change fails the patch instead of being lost).
pub fn template_patch(d: &Value, template: &Value, cause: &str) -> Value {
    use super::devpod::watched_replicas;
    let mut ops = vec![
        json!({"op": "test", "path": "/metadata/resourceVersion", "value": d["metadata"]["resourceVersion"]}),
        json!({"op": "replace", "path": "/spec/template", "value": template}),
    ];
    // A watched version runs one pod (the one saves are synced into); the next plain
    // version gets the replicas back.
    match (
        watched_replicas(template),
        watched_replicas(&d["spec"]["template"]),
    ) {
        (Some(_), _) => ops.push(json!({"op": "replace", "path": "/spec/replicas", "value": 1})),
        (None, Some(before)) if !before.is_null() => {
            ops.push(json!({"op": "replace", "path": "/spec/replicas", "value": before}))
        }
        _ => {}
    }
    if d["metadata"]["annotations"].is_object() {
        ops.push(json!({"op": "add", "path": format!("/metadata/annotations/{}", pointer_token(CHANGE_CAUSE)), "value": cause}));
    } else {
        ops.push(
            json!({"op": "add", "path": "/metadata/annotations", "value": {CHANGE_CAUSE: cause}}),
        );
    }
    json!(ops)
}

/// The patch that puts the Deployment's template and change cause back as they were in
/// `before` (no resourceVersion test: it follows our own change), and adds the failed
/// template's hash to the Deployment's list of failed rollouts, which `history` marks and
/// `rollback` skips.
pub fn undo_patch(before: &Value, failed_hash: Option<&str>) -> Value {
    let mut ops = vec![
        json!({"op": "replace", "path": "/spec/template", "value": before["spec"]["template"]}),
    ];
    if !before["spec"]["replicas"].is_null() {
        ops.push(
            json!({"op": "replace", "path": "/spec/replicas", "value": before["spec"]["replicas"]}),
        );
    }
    let key = format!("/metadata/annotations/{}", pointer_token(CHANGE_CAUSE));
    match before["metadata"]["annotations"][CHANGE_CAUSE].as_str() {
        Some(c) => ops.push(json!({"op": "add", "path": key, "value": c})),
        None => ops.push(json!({"op": "remove", "path": key})),
    }
    if let Some(hash) = failed_hash {
        let mut failed = failed_hashes(before);
        failed.retain(|h| h != hash);
        failed.push(hash.to_string());
        // The cluster keeps 10 old revisions by default; older failures do not matter.
        let keep = failed.len().saturating_sub(20);
        let list = serde_json::to_string(&failed[keep..]).expect("strings serialize");
        ops.push(json!({"op": "add", "path": format!("/metadata/annotations/{}", pointer_token(FAILED)), "value": list}));
    }
    json!(ops)
}

/// The `pod-template-hash`es of rollouts devloop undid, from the Deployment's annotation.
pub fn failed_hashes(d: &Value) -> Vec<String> {
    d["metadata"]["annotations"][FAILED]
        .as_str()
        .and_then(|s| serde_json::from_str(s).ok())
        .unwrap_or_default()
}

/// Puts `template` on the Deployment and waits for the rollout; undoes it when it cannot
/// become ready, with the reason.
pub(crate) async fn switch_template(
    cluster: &Cluster,
    d: &Value,
    template: Value,
    cause: &str,
    timeout: Duration,
) -> anyhow::Result<RolledOut> {
    let name = name_of(d).to_string();
    let path = cluster.path("apps/v1", "deployments", Some(&name));
    let started = Instant::now();
    let patched = cluster
        .json_patch(&path, &template_patch(d, &template, cause))
        .await
        .map_err(|e| {
            cluster.err(
                e,
                "patch",
                "deployments",
                format!("updating deployment/{name} (changed meanwhile? run deploy again)"),
            )
        })?;
    match wait_rollout(cluster, &name, &patched, timeout).await {
        Ok(revision) => Ok(RolledOut {
            ready_ms: started.elapsed().as_millis() as u64,
            revision,
            created: Vec::new(),
        }),
        Err(failure) => {
            let undo = cluster
                .json_patch(&path, &undo_patch(d, failure.template_hash.as_deref()))
                .await;
            let undone = match undo {
                Ok(_) => format!("undone: deployment/{name} is back on its previous template, whose pods kept serving"),
                Err(e) => format!("and undoing it failed too ({}); `devloop rollback {name}` or `kubectl rollout undo deployment/{name}`", cluster.err(e, "patch", "deployments", "undo")),
            };
            anyhow::bail!("{failure}\n{undone}")
        }
    }
}

/// What a rollout on Kubernetes needs: the snapshot (in the cluster's registry) becomes the
/// Deployment's image ([`super::deployer::KubeDeployer`] uses it).
pub struct KubeRollout {
    pub cluster: Cluster,
    /// `[target] manifests`, resolved against the project folder.
    pub manifests: Option<std::path::PathBuf>,
    pub timeout: Duration,
    /// Set under `devloop watch` (the agent's image): versions run under the agent.
    pub watch_agent: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deployment() -> Value {
        json!({
            "metadata": {"name": "api", "resourceVersion": "42", "generation": 3, "annotations": {REVISION: "2"}},
            "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "api"}},
                "template": {"metadata": {"labels": {"app": "api"}}, "spec": {"containers": [
                    {"name": "sidecar", "image": "envoy"}, {"name": "api", "image": "reg/devloop-shop-api:aaaa"}]}}},
            "status": {"observedGeneration": 3, "replicas": 2, "updatedReplicas": 2, "availableReplicas": 2}
        })
    }

    #[test]
    fn the_service_container_is_found_by_name_or_alone() {
        let d = deployment();
        assert_eq!(service_container(&d["spec"]["template"], "api").unwrap(), 1);
        let err = service_container(&d["spec"]["template"], "web")
            .unwrap_err()
            .to_string();
        assert!(err.contains("sidecar, api"), "{err}");
        let one = json!({"spec": {"containers": [{"name": "main"}]}});
        assert_eq!(service_container(&one, "web").unwrap(), 0);
    }

    #[test]
    fn snapshot_tags_are_read_from_any_registry() {
        assert_eq!(
            snapshot_tag(
                "127.0.0.1:5000/devloop-shop-api:0123abcd",
                "devloop-shop-api"
            )
            .as_deref(),
            Some("0123abcd")
        );
        assert_eq!(
            snapshot_tag("devloop-shop-api:0123", "devloop-shop-api").as_deref(),
            Some("0123")
        );
        assert_eq!(
            snapshot_tag("127.0.0.1:5000/shop-api:1", "devloop-shop-api"),
            None
        );
        assert_eq!(
            snapshot_tag("127.0.0.1:5000/devloop-shop-api", "devloop-shop-api"),
            None
        );
    }

    #[test]
    fn progress_reads_the_status_like_rollout_status() {
        let mut d = deployment();
        assert_eq!(progress(&d), Progress::Done);
        d["metadata"]["generation"] = json!(4);
        assert!(matches!(progress(&d), Progress::Waiting(_)));
        d["status"] = json!({"observedGeneration": 4, "replicas": 3, "updatedReplicas": 1, "availableReplicas": 2});
        assert_eq!(progress(&d), Progress::Waiting("1 of 2 new pods".into()));
        d["status"] = json!({"observedGeneration": 4, "replicas": 3, "updatedReplicas": 2, "availableReplicas": 2});
        assert_eq!(
            progress(&d),
            Progress::Waiting("1 old pods still terminating".into())
        );
        d["status"] = json!({"observedGeneration": 4, "replicas": 2, "updatedReplicas": 2, "availableReplicas": 1});
        assert_eq!(
            progress(&d),
            Progress::Waiting("1 of 2 new pods ready".into())
        );
        d["status"]["conditions"] = json!([{"type": "Progressing", "reason": "ProgressDeadlineExceeded", "message": "took too long"}]);
        assert_eq!(progress(&d), Progress::Stalled("took too long".into()));
    }

    #[test]
    fn the_template_patch_is_guarded_and_the_undo_restores_the_cause() {
        let d = deployment();
        let mut t = d["spec"]["template"].clone();
        t["spec"]["containers"][1]["image"] = json!("new");
        let p = template_patch(&d, &t, "devloop deploy new");
        assert_eq!(
            p[0],
            json!({"op": "test", "path": "/metadata/resourceVersion", "value": "42"})
        );
        assert_eq!(p[1]["value"], t);
        assert_eq!(
            p[2]["path"],
            "/metadata/annotations/kubernetes.io~1change-cause"
        );
        assert_eq!(
            p.as_array().unwrap().len(),
            3,
            "a plain version leaves the replicas alone"
        );
        let u = undo_patch(&d, None);
        assert_eq!(u[0]["value"], d["spec"]["template"]);
        assert_eq!(
            u[1],
            json!({"op": "replace", "path": "/spec/replicas", "value": 2})
        );
        assert_eq!(
            u[2],
            json!({"op": "remove", "path": "/metadata/annotations/kubernetes.io~1change-cause"})
        );
        assert_eq!(u.as_array().unwrap().len(), 3);
        // A failure is added to the Deployment's list, once.
        let mut failed_before = d.clone();
        failed_before["metadata"]["annotations"][FAILED] = json!("[\"aaa\",\"bbb\"]");
        let u = undo_patch(&failed_before, Some("aaa"));
        assert_eq!(
            u[3],
            json!({"op": "add", "path": "/metadata/annotations/devloop.dev~1failed-rollouts", "value": "[\"bbb\",\"aaa\"]"})
        );
        failed_before["metadata"]["annotations"][FAILED] = u[3]["value"].clone();
        assert_eq!(failed_hashes(&failed_before), vec!["bbb", "aaa"]);
        let mut bare = d.clone();
        bare["metadata"]
            .as_object_mut()
            .unwrap()
            .remove("annotations");
        let p = template_patch(&bare, &t, "c");
        assert_eq!(
            p[2],
            json!({"op": "add", "path": "/metadata/annotations", "value": {CHANGE_CAUSE: "c"}})
        );
    }

    #[test]
    fn a_watched_version_runs_one_pod_and_the_next_plain_one_gets_the_replicas_back() {
        use crate::backend::k8s::devpod::{unwatched, watch_template, DevSpec};
        let d = deployment();
        let spec = DevSpec {
            agent_image: "a",
            sync_to: "/app",
            command: &["x".into()],
            workdir: None,
            session: "w",
            secret: "s",
        };
        let w = watch_template(&d["spec"]["template"], 1, &spec, &json!(2));
        let p = template_patch(&d, &w, "devloop watch");
        assert!(
            p.as_array()
                .unwrap()
                .contains(&json!({"op": "replace", "path": "/spec/replicas", "value": 1})),
            "{p}"
        );
        let mut watched = d.clone();
        watched["spec"]["template"] = w.clone();
        watched["spec"]["replicas"] = json!(1);
        let p = template_patch(&watched, &unwatched(&w).unwrap(), "devloop deploy");
        assert!(
            p.as_array()
                .unwrap()
                .contains(&json!({"op": "replace", "path": "/spec/replicas", "value": 2})),
            "{p}"
        );
        // Undoing a failed watched version puts back one replica, as it ran.
        assert_eq!(
            undo_patch(&watched, None)[1],
            json!({"op": "replace", "path": "/spec/replicas", "value": 1})
        );
    }

    /// The manifests read back from a folder holding `files` (name, text).
    fn manifests(files: &[(&str, &str)]) -> Vec<Value> {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        read_manifests(dir.path()).unwrap()
    }

    #[test]
    fn manifests_give_the_services_objects_with_the_snapshot_image() {
        let all = manifests(&[
            ("api.yaml", "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: api, namespace: prod}\nspec:\n  template:\n    spec:\n      containers: [{name: api, image: placeholder}]\n---\napiVersion: v1\nkind: Service\nmetadata: {name: api}\nspec: {ports: [{port: 8000}]}\n---\n"),
            ("web.yml", "kind: Deployment\nmetadata: {name: web}\nspec: {template: {spec: {containers: [{name: web, image: x}]}}}\n"),
            ("notes.txt", "not a manifest"),
        ]);
        assert_eq!(all.len(), 3);
        let objs = objects_for(&all, "api", "reg/devloop-shop-api:t", "devloop deploy t").unwrap();
        assert_eq!(
            objs.iter()
                .map(|o| o["kind"].as_str().unwrap())
                .collect::<Vec<_>>(),
            vec!["Service", "Deployment"]
        );
        let d = &objs[1];
        assert_eq!(
            d["spec"]["template"]["spec"]["containers"][0]["image"],
            "reg/devloop-shop-api:t"
        );
        assert!(d["metadata"]["namespace"].is_null());
        assert_eq!(
            d["metadata"]["annotations"][CHANGE_CAUSE],
            "devloop deploy t"
        );
        assert!(objects_for(&all, "db", "i", "c")
            .unwrap_err()
            .to_string()
            .contains("no Deployment named `db`"));
    }

    #[test]
    fn the_objects_a_pod_refers_to_come_first_and_only_those() {
        let all = manifests(&[(
            "api.yaml",
            "kind: Deployment\nmetadata: {name: api}\nspec:\n  template:\n    spec:\n      serviceAccountName: api-sa\n      imagePullSecrets: [{name: pull}]\n      volumes:\n        - {name: cfg, configMap: {name: api-files}}\n        - {name: data, persistentVolumeClaim: {claimName: api-data}}\n        - {name: p, projected: {sources: [{secret: {name: api-tls}}]}}\n      containers:\n        - name: api\n          image: x\n          envFrom: [{configMapRef: {name: api-env}}]\n          env: [{name: K, valueFrom: {secretKeyRef: {name: api-key, key: k}}}, {name: L, valueFrom: {configMapKeyRef: {name: api-env, key: l}}}]\n---\nkind: ConfigMap\nmetadata: {name: api-env, namespace: prod}\n---\nkind: ConfigMap\nmetadata: {name: web-env}\n---\nkind: Secret\nmetadata: {name: api-key}\n---\nkind: ServiceAccount\nmetadata: {name: api-sa}\n---\nkind: PersistentVolumeClaim\nmetadata: {name: api-data}\n---\nkind: Service\nmetadata: {name: api}\n",
        )]);
        let refs = template_refs(&all[0]["spec"]["template"]);
        assert_eq!(
            refs.len(),
            7,
            "api-env is named twice and counted once: {refs:?}"
        );
        assert!(
            refs.contains(&("Secret", "api-tls".into()))
                && refs.contains(&("Secret", "pull".into()))
        );
        let objs = objects_for(&all, "api", "i", "c").unwrap();
        let names: Vec<&str> = objs
            .iter()
            .map(|o| o["metadata"]["name"].as_str().unwrap())
            .collect();
        // web-env is not the api's; api-files and the rest are not in the manifests.
        assert_eq!(
            names,
            vec!["api-env", "api-key", "api-sa", "api-data", "api", "api"]
        );
        assert_eq!(objs[4]["kind"], "Service");
        assert_eq!(objs[5]["kind"], "Deployment");
        assert!(objs[0]["metadata"]["namespace"].is_null());
    }

    #[test]
    fn devloops_own_templates_are_told_from_versions() {
        let mut t = deployment()["spec"]["template"].clone();
        assert!(!is_devloop_own(&t));
        for label in [
            super::super::intercept::SESSION_LABEL,
            super::super::devpod::SESSION_LABEL,
            super::super::devpod::WATCH_LABEL,
        ] {
            let mut own = t.clone();
            own["metadata"]["labels"][label] = json!("s1");
            assert!(is_devloop_own(&own), "{label}");
        }
        t["metadata"]["labels"]["app"] = json!("other");
        assert!(!is_devloop_own(&t));
    }

    #[test]
    fn selectors_are_escaped_for_the_query() {
        assert_eq!(
            url_escape("app.kubernetes.io/name=api,tier=x"),
            "app.kubernetes.io%2Fname%3Dapi%2Ctier%3Dx"
        );
    }
}
