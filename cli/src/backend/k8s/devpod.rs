//! Dev pods: `devloop up` on Kubernetes switches a service's Deployment to dev mode and
//! `devloop down` switches it back. In dev mode the service's container runs the agent as
//! its entry point, supervising the original command, with the sync root in an emptyDir
//! seeded from the image (so the service starts on the image's files and the first
//! reconcile sends only what differs); the cli reaches the agent over a port-forward.
//! As for intercepts, the original template and replicas are saved on the Deployment
//! itself (an annotation written by the same patch), so `down` restores it exactly from any
//! machine.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::intercept::{
    apply_restore, apply_swap, records_on_deployments, template_restore_patch, template_swap_patch,
};
use super::Cluster;

/// The annotation holding a dev-mode Deployment's restore record.
pub const RECORD: &str = "devloop.dev/dev";
/// The label on the dev pod's template (value: the session id).
pub const SESSION_LABEL: &str = "devloop.dev/dev-session";
const AGENT_DIR: &str = "/.devloop/bin";
const TOKEN_DIR: &str = "/.devloop/token";
/// Where the seeding init container mounts the sync root's emptyDir.
const SEED_DIR: &str = "/.devloop/seed";
const AGENT_VOLUME: &str = "devloop-agent";
const SYNC_VOLUME: &str = "devloop-sync";
const TOKEN_VOLUME: &str = "devloop-dev-token";

/// The restore record of a dev-mode Deployment.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DevRecord {
    pub deployment: String,
    pub service: String,
    pub container: String,
    pub template: Value,
    pub replicas: Value,
    pub session: String,
    /// The Secret holding the agent's token.
    pub secret: String,
    pub started_ms: u64,
    pub holder: String,
    /// The devloop project that switched it (empty in records of older versions, which
    /// `down` matches by service name instead).
    #[serde(default)]
    pub project: String,
}

impl DevRecord {
    /// Whether this dev mode is the project's: switched by it, or (an older record without
    /// a project) one of its services.
    pub fn belongs_to(&self, project: &str, services: &[&str]) -> bool {
        if self.project.is_empty() {
            services.contains(&self.service.as_str())
        } else {
            self.project == project
        }
    }
}

pub fn record_of(deployment: &Value) -> Option<DevRecord> {
    serde_json::from_str(deployment["metadata"]["annotations"][RECORD].as_str()?).ok()
}

pub fn secret_name(deployment: &str) -> String {
    format!("{deployment}-devloop-dev")
}

/// What the dev container runs.
pub struct DevSpec<'a> {
    pub agent_image: &'a str,
    /// The container folder synced from the laptop.
    pub sync_to: &'a str,
    /// The original command, entry point included.
    pub command: &'a [String],
    /// The original working directory, when known.
    pub workdir: Option<&'a str>,
    pub session: &'a str,
    pub secret: &'a str,
}

/// The pod template in dev mode: container `index` runs the agent (from an emptyDir the
/// `devloop-install` init container fills) supervising the original command; its sync
/// folder is an emptyDir the `devloop-seed` init container (the service's own image) fills
/// with the image's files. Everything else of the pod stays.
pub fn dev_template(original: &Value, index: usize, s: &DevSpec) -> Value {
    let mut t = original.clone();
    if !t["metadata"]["labels"].is_object() {
        t["metadata"]["labels"] = json!({});
    }
    t["metadata"]["labels"][SESSION_LABEL] = json!(s.session);
    let container = &t["spec"]["containers"][index];
    let image = container["image"].clone();
    let security = container["securityContext"].clone();
    let agent = format!("{AGENT_DIR}/devloop-agent");
    let mut command = vec![
        agent.clone(),
        "dev".into(),
        "--root".into(),
        s.sync_to.into(),
        "--token-file".into(),
        format!("{TOKEN_DIR}/token"),
        // The pod's loopback only: the cli's port-forward reaches it there, and nothing
        // else in the cluster (another pod on the pod network) can reach the agent.
        "--listen".into(),
        format!("127.0.0.1:{}", devloop_proxy::AGENT_PORT),
    ];
    if let Some(w) = s.workdir.filter(|w| !w.is_empty()) {
        command.push("--workdir".into());
        command.push(w.into());
    }
    command.push("--".into());
    command.extend(s.command.iter().cloned());
    let c = t["spec"]["containers"][index]
        .as_object_mut()
        .expect("a container is an object");
    c.insert("command".into(), json!(command));
    c.remove("args");
    let mounts = c.entry("volumeMounts").or_insert_with(|| json!([]));
    if let Some(m) = mounts.as_array_mut() {
        m.push(json!({"name": AGENT_VOLUME, "mountPath": AGENT_DIR, "readOnly": true}));
        m.push(json!({"name": SYNC_VOLUME, "mountPath": s.sync_to}));
        m.push(json!({"name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": true}));
    }
    let spec = t["spec"].as_object_mut().expect("a pod spec is an object");
    let mut seed = json!({
        "name": "devloop-seed",
        "image": image,
        "command": [agent, "copy-tree", s.sync_to, SEED_DIR],
        "volumeMounts": [
            {"name": AGENT_VOLUME, "mountPath": AGENT_DIR, "readOnly": true},
            {"name": SYNC_VOLUME, "mountPath": SEED_DIR},
        ],
    });
    // The seeded files belong to the user the service runs as.
    if !security.is_null() {
        seed["securityContext"] = security;
    }
    let inits = spec.entry("initContainers").or_insert_with(|| json!([]));
    if let Some(i) = inits.as_array_mut() {
        i.push(json!({
            "name": "devloop-install",
            "image": s.agent_image,
            "imagePullPolicy": "IfNotPresent",
            "command": ["/devloop-agent", "install", format!("{AGENT_DIR}/devloop-agent")],
            "volumeMounts": [{"name": AGENT_VOLUME, "mountPath": AGENT_DIR}],
        }));
        i.push(seed);
    }
    let volumes = spec.entry("volumes").or_insert_with(|| json!([]));
    if let Some(v) = volumes.as_array_mut() {
        v.push(json!({"name": AGENT_VOLUME, "emptyDir": {}}));
        v.push(json!({"name": SYNC_VOLUME, "emptyDir": {}}));
        // 0444: the agent may run as any user the original ran as.
        v.push(
            json!({"name": TOKEN_VOLUME, "secret": {"secretName": s.secret, "defaultMode": 0o444}}),
        );
    }
    t
}

pub fn swap_patch(deployment: &Value, record: &DevRecord, template: &Value) -> Value {
    template_swap_patch(
        deployment,
        RECORD,
        serde_json::to_string(record).expect("a record serializes"),
        template,
    )
}

pub fn restore_patch(record: &DevRecord) -> Value {
    template_restore_patch(
        RECORD,
        SESSION_LABEL,
        &record.session,
        &record.template,
        &record.replicas,
    )
}

/// Creates (or replaces) the Secret `name` holding the agent's token.
pub async fn create_token_secret(cluster: &Cluster, name: &str, token: &str) -> anyhow::Result<()> {
    let _ = cluster
        .delete(&cluster.path("v1", "secrets", Some(name)))
        .await;
    let body = json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/managed-by": "devloop"}},
        "type": "Opaque",
        "stringData": {"token": token},
    });
    cluster
        .post_json(&cluster.path("v1", "secrets", None), &body)
        .await
        .map_err(|e| cluster.err(e, "create", "secrets", format!("creating secret {name}")))?;
    Ok(())
}

/// The agent's token from the Secret `name`; None when the Secret does not exist.
pub async fn read_token_opt(cluster: &Cluster, name: &str) -> anyhow::Result<Option<String>> {
    use base64::Engine;
    let Some(s) = cluster
        .get_opt(&cluster.path("v1", "secrets", Some(name)))
        .await
        .map_err(|e| cluster.err(e, "get", "secrets", format!("reading secret {name}")))?
    else {
        return Ok(None);
    };
    let b64 = s["data"]["token"].as_str().unwrap_or_default();
    let bytes = base64::engine::general_purpose::STANDARD.decode(b64)?;
    Ok(Some(String::from_utf8(bytes)?.trim().to_string()))
}

/// The token of a Deployment already in dev mode (from its Secret).
pub async fn read_token(cluster: &Cluster, record: &DevRecord) -> anyhow::Result<String> {
    read_token_opt(cluster, &record.secret).await?.ok_or_else(|| {
        anyhow::anyhow!("deployment/{} is in dev mode but its token Secret {} is gone; `devloop down` then `devloop up`", record.deployment, record.secret)
    })
}

/// Switches the Deployment to dev mode in one patch (the record with it).
pub async fn swap_in(
    cluster: &Cluster,
    deployment: &Value,
    record: &DevRecord,
    template: &Value,
) -> anyhow::Result<()> {
    let name = &record.deployment;
    apply_swap(
        cluster,
        name,
        &swap_patch(deployment, record, template),
        "switching it to dev mode",
        format!("switching deployment {name} to dev mode"),
    )
    .await
}

/// Switches the Deployment back and removes the token Secret. Ok(false) when it was no
/// longer in this session's dev mode.
pub async fn restore(cluster: &Cluster, record: &DevRecord) -> anyhow::Result<bool> {
    apply_restore(
        cluster,
        &record.deployment,
        &restore_patch(record),
        &record.secret,
    )
    .await
}

/// The label on a watched version's pod template (value: the watch session).
pub const WATCH_LABEL: &str = "devloop.dev/watch-session";
/// The annotation on a watched version's pod template: the wrapped container's own
/// `command` and `args` (null when unset), which [`unwatched`] puts back, and the
/// Deployment's replicas before it was watched (a watched version runs one pod, the one
/// the saves are synced into; the next plain version gets them back).
pub const WATCHED: &str = "devloop.dev/watched";

/// The Secret holding the token of a watched Deployment's agent.
pub fn watch_secret_name(deployment: &str) -> String {
    format!("{deployment}-devloop-watch")
}

/// A deployed version under `devloop watch`: the dev pod's shape (the agent supervising the
/// original command, the sync root seeded from the version's own image), labelled with the
/// watch session, so that saves can be synced into it and the process restarted. Unlike dev
/// mode it is a version of its own (no restore record): [`unwatched`] gives the plain
/// template back, which `deploy`, `up` and `intercept` start from.
pub fn watch_template(original: &Value, index: usize, s: &DevSpec, replicas: &Value) -> Value {
    let c = &original["spec"]["containers"][index];
    let own =
        json!({"index": index, "command": c["command"], "args": c["args"], "replicas": replicas});
    let mut t = dev_template(original, index, s);
    let labels = t["metadata"]["labels"]
        .as_object_mut()
        .expect("dev_template makes labels");
    labels.remove(SESSION_LABEL);
    labels.insert(WATCH_LABEL.into(), json!(s.session));
    if !t["metadata"]["annotations"].is_object() {
        t["metadata"]["annotations"] = json!({});
    }
    t["metadata"]["annotations"][WATCHED] = json!(own.to_string());
    t
}

/// The [`WATCHED`] annotation of a watched version's template, parsed.
fn watched_own(t: &Value) -> Option<Value> {
    serde_json::from_str(t["metadata"]["annotations"][WATCHED].as_str()?).ok()
}

/// True when `t` is a watched version's template.
pub fn is_watched(t: &Value) -> bool {
    watched_own(t).is_some()
}

/// The replicas the Deployment had before it was watched, when `t` is a watched version's
/// template (null: unset).
pub fn watched_replicas(t: &Value) -> Option<Value> {
    Some(watched_own(t)?["replicas"].clone())
}

/// The plain template of a watched version (see [`watch_template`]); None when `t` is not
/// one.
pub fn unwatched(t: &Value) -> Option<Value> {
    let own = watched_own(t)?;
    let index = own["index"].as_u64()? as usize;
    let mut u = t.clone();
    let meta = u["metadata"].as_object_mut()?;
    for (key, name) in [("annotations", WATCHED), ("labels", WATCH_LABEL)] {
        if let Some(m) = meta.get_mut(key).and_then(Value::as_object_mut) {
            m.remove(name);
            if m.is_empty() {
                meta.remove(key);
            }
        }
    }
    // Drops the named entries the wrap added, and the list when it is left empty.
    fn drop_named(obj: &mut serde_json::Map<String, Value>, key: &str, names: &[&str]) {
        if let Some(list) = obj.get_mut(key).and_then(Value::as_array_mut) {
            list.retain(|x| !names.contains(&x["name"].as_str().unwrap_or_default()));
            if list.is_empty() {
                obj.remove(key);
            }
        }
    }
    let ours = [AGENT_VOLUME, SYNC_VOLUME, TOKEN_VOLUME];
    let spec = u["spec"].as_object_mut()?;
    drop_named(spec, "initContainers", &["devloop-install", "devloop-seed"]);
    drop_named(spec, "volumes", &ours);
    let c = spec
        .get_mut("containers")?
        .get_mut(index)?
        .as_object_mut()?;
    drop_named(c, "volumeMounts", &ours);
    for key in ["command", "args"] {
        match &own[key] {
            Value::Null => c.remove(key),
            v => c.insert(key.into(), v.clone()),
        };
    }
    Some(u)
}

/// Every Deployment of the namespace in dev mode, with its record.
pub async fn in_dev_mode(cluster: &Cluster) -> anyhow::Result<Vec<DevRecord>> {
    records_on_deployments(cluster, record_of).await
}

/// The command the container runs: its `command` (else the image's entry point) followed
/// by its `args` (else, when `command` is unset, the image's cmd), as the kubelet builds it.
pub fn effective_command(
    container: &Value,
    image_entrypoint: &[String],
    image_cmd: &[String],
) -> Vec<String> {
    let list = |v: &Value| -> Option<Vec<String>> {
        v.as_array().map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(String::from))
                .collect()
        })
    };
    match (list(&container["command"]), list(&container["args"])) {
        (Some(c), Some(a)) => c.into_iter().chain(a).collect(),
        (Some(c), None) => c,
        (None, Some(a)) => image_entrypoint.iter().cloned().chain(a).collect(),
        (None, None) => image_entrypoint.iter().chain(image_cmd).cloned().collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deployment() -> Value {
        json!({
            "metadata": {"name": "api", "resourceVersion": "7", "annotations": {"keep": "me"}},
            "spec": {"replicas": 2, "template": {
                "metadata": {"labels": {"app": "api"}},
                "spec": {
                    "containers": [
                        {"name": "api", "image": "reg/shop-api:1", "args": ["--fast"], "ports": [{"containerPort": 8000}],
                         "volumeMounts": [{"name": "cfg", "mountPath": "/etc/cfg"}], "securityContext": {"runAsUser": 1000}},
                        {"name": "sidecar", "image": "envoy"}],
                    "volumes": [{"name": "cfg", "configMap": {"name": "c"}}],
                }}}
        })
    }

    fn record(d: &Value) -> DevRecord {
        DevRecord {
            deployment: "api".into(),
            service: "api".into(),
            container: "api".into(),
            template: d["spec"]["template"].clone(),
            replicas: d["spec"]["replicas"].clone(),
            session: "s1".into(),
            secret: secret_name("api"),
            started_ms: 1,
            holder: "me".into(),
            project: "shop".into(),
        }
    }

    #[test]
    fn the_dev_template_runs_the_agent_around_the_original_command() {
        let d = deployment();
        let cmd = effective_command(
            &d["spec"]["template"]["spec"]["containers"][0],
            &["python3".into()],
            &["app.py".into()],
        );
        assert_eq!(cmd, vec!["python3", "--fast"]);
        let spec = DevSpec {
            agent_image: "reg/devloop-agent:v",
            sync_to: "/app",
            command: &cmd,
            workdir: Some("/app"),
            session: "s1",
            secret: "api-devloop-dev",
        };
        let t = dev_template(&d["spec"]["template"], 0, &spec);
        let c = &t["spec"]["containers"][0];
        let command: Vec<&str> = c["command"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_str().unwrap())
            .collect();
        assert_eq!(command[..2], ["/.devloop/bin/devloop-agent", "dev"]);
        assert_eq!(command[command.len() - 3..], ["--", "python3", "--fast"]);
        assert!(command.windows(2).any(|w| w == ["--workdir", "/app"]));
        assert!(command
            .windows(2)
            .any(|w| w == ["--listen", "127.0.0.1:7717"]));
        assert!(c["args"].is_null());
        // Same image, ports and the original mount, plus the agent's three.
        assert_eq!(c["image"], "reg/shop-api:1");
        assert_eq!(
            c["ports"],
            d["spec"]["template"]["spec"]["containers"][0]["ports"]
        );
        assert_eq!(c["volumeMounts"].as_array().unwrap().len(), 4);
        let inits = t["spec"]["initContainers"].as_array().unwrap();
        assert_eq!(inits[0]["image"], "reg/devloop-agent:v");
        assert_eq!(inits[1]["image"], "reg/shop-api:1");
        assert_eq!(inits[1]["securityContext"]["runAsUser"], 1000);
        assert_eq!(t["spec"]["volumes"].as_array().unwrap().len(), 4);
        assert_eq!(
            t["spec"]["containers"][1],
            d["spec"]["template"]["spec"]["containers"][1]
        );
        assert_eq!(t["metadata"]["labels"][SESSION_LABEL], "s1");
    }

    #[test]
    fn swap_then_restore_gives_back_the_same_spec() {
        let d = deployment();
        let r = record(&d);
        let t = dev_template(
            &d["spec"]["template"],
            0,
            &DevSpec {
                agent_image: "a",
                sync_to: "/app",
                command: &["x".into()],
                workdir: None,
                session: "s1",
                secret: "s",
            },
        );
        let swap = swap_patch(&d, &r, &t);
        assert_eq!(
            swap[0],
            json!({"op": "test", "path": "/metadata/resourceVersion", "value": "7"})
        );
        let mut after = d.clone();
        after["metadata"]["annotations"][RECORD] = json!(serde_json::to_string(&r).unwrap());
        after["spec"]["template"] = t;
        after["spec"]["replicas"] = json!(1);
        assert_eq!(record_of(&after), Some(r.clone()));
        let restore = restore_patch(&r);
        assert_eq!(
            restore[0]["path"],
            "/spec/template/metadata/labels/devloop.dev~1dev-session"
        );
        // Applying the restore ops by hand gives back the original.
        after["spec"]["template"] = restore[1]["value"].clone();
        after["spec"]["replicas"] = restore[2]["value"].clone();
        after["metadata"]["annotations"]
            .as_object_mut()
            .unwrap()
            .remove(RECORD);
        assert_eq!(after, d);
    }

    #[test]
    fn a_watched_version_unwraps_to_the_plain_template() {
        let plain = deployment()["spec"]["template"].clone();
        let spec = DevSpec {
            agent_image: "a",
            sync_to: "/app",
            command: &["python3".into(), "--fast".into()],
            workdir: Some("/app"),
            session: "w1",
            secret: "api-devloop-watch",
        };
        let w = watch_template(&plain, 0, &spec, &json!(2));
        assert_eq!(watched_replicas(&w), Some(json!(2)));
        assert_eq!(watched_replicas(&plain), None);
        assert_eq!(w["metadata"]["labels"][WATCH_LABEL], "w1");
        assert!(w["metadata"]["labels"][SESSION_LABEL].is_null());
        assert_eq!(w["spec"]["containers"][0]["command"][1], "dev");
        assert_eq!(w["spec"]["initContainers"].as_array().unwrap().len(), 2);
        assert_eq!(unwatched(&w), Some(plain.clone()));
        assert_eq!(unwatched(&plain), None);
        // A bare template: no volumes, mounts, annotations or args of its own.
        let bare = json!({"metadata": {"labels": {"app": "x"}}, "spec": {"containers": [
            {"name": "side", "image": "envoy"},
            {"name": "x", "image": "reg/x:1", "command": ["/bin/x"]}]}});
        let w = watch_template(&bare, 1, &spec, &Value::Null);
        assert_eq!(w["spec"]["containers"][0], bare["spec"]["containers"][0]);
        assert_eq!(unwatched(&w), Some(bare));
    }

    #[test]
    fn the_kubelet_command_rules() {
        let img_ep = vec!["/entry".to_string()];
        let img_cmd = vec!["serve".to_string()];
        let c = |v: Value| effective_command(&v, &img_ep, &img_cmd);
        assert_eq!(c(json!({})), vec!["/entry", "serve"]);
        assert_eq!(c(json!({"args": ["a"]})), vec!["/entry", "a"]);
        assert_eq!(c(json!({"command": ["/bin/x"]})), vec!["/bin/x"]);
        assert_eq!(
            c(json!({"command": ["/bin/x"], "args": ["y"]})),
            vec!["/bin/x", "y"]
        );
    }
}
