//! Intercept on Kubernetes: a Deployment's service container is replaced by the agent,
//! listening on the same ports with the same environment, so the Service and its callers are
//! unchanged; the cli reaches the agent through a port-forward (kube's WebSocket) to the
//! agent's control port on the pod's loopback, which nothing else in the cluster reaches.
//!
//! Crash safety: the original pod template and replica count are saved on the Deployment
//! itself (the annotation [`RECORD`]) in the same request that swaps the template, so a
//! `leave` from any shell or machine restores the spec exactly, also after the cli was
//! killed. The session token lives in a Secret the agent reads as a file.

use serde::{Deserialize, Serialize};
use std::time::{Duration, Instant};

use super::{pointer_token, status_of, Cluster};

/// The annotation holding the restore record (JSON of [`Record`]).
pub const RECORD: &str = "devloop.dev/intercept";
/// The label on the agent's pod template (value: the session id), to find the agent pod.
pub const SESSION_LABEL: &str = "devloop.dev/intercept-session";
/// The label on the token Secret, naming the Deployment.
pub const SECRET_LABEL: &str = "devloop.dev/intercept-of";
const TOKEN_DIR: &str = "/var/run/devloop";
const TOKEN_VOLUME: &str = "devloop-intercept-token";

/// What `leave` needs, stored on the Deployment before (atomically with) the swap.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Record {
    pub deployment: String,
    /// The name the user intercepted (a Service's or the Deployment's).
    pub service: String,
    pub container: String,
    /// The original `spec.template`, exactly as the API server returned it.
    pub template: serde_json::Value,
    /// The original `spec.replicas` (null when it was unset).
    pub replicas: serde_json::Value,
    /// (container port, laptop port).
    pub ports: Vec<(u16, u16)>,
    pub session: String,
    pub secret: String,
    /// The lease's ServiceAccount (also its Role and RoleBinding), named per session so a
    /// cli that loses a race for the Deployment never touches the winner's. Empty in
    /// records of older versions, whose account was named per Deployment.
    #[serde(default)]
    pub account: String,
    pub started_ms: u64,
    /// Who holds it: user, host and pid of the cli.
    pub holder: String,
}

impl Record {
    /// The lease account's name.
    pub fn account(&self) -> String {
        if self.account.is_empty() {
            format!("{}-devloop-lease", self.deployment)
        } else {
            self.account.clone()
        }
    }
}

/// The token Secret of one intercept session.
pub fn secret_name(deployment: &str, session: &str) -> String {
    format!("{deployment}-devloop-intercept-{session}")
}

/// The workload to intercept: a Deployment named so, else the one Deployment whose pods a
/// Service of that name selects; with the Service of that name, if there is one (its ports
/// may be named in `--port`).
pub async fn find_deployment(
    cluster: &Cluster,
    name: &str,
) -> anyhow::Result<(serde_json::Value, Option<serde_json::Value>)> {
    let path = cluster.path("apps/v1", "deployments", Some(name));
    let svc_path = cluster.path("v1", "services", Some(name));
    let deployment = cluster.get_opt(&path).await.map_err(|e| {
        cluster.err(
            e,
            "get",
            "deployments",
            format!("reading deployment {name}"),
        )
    })?;
    let svc = match cluster.get_opt(&svc_path).await {
        Ok(svc) => svc,
        // The Service only adds its port names and numbers to `--port`: a user who may not
        // read Services can still intercept a Deployment by its name, by container port.
        Err(e) if deployment.is_some() && status_of(&e) == Some(403) => {
            tracing::debug!(
                service = name,
                "reading the Service is forbidden; going on with the Deployment's container ports"
            );
            None
        }
        Err(e) => {
            return Err(cluster
                .err(e, "get", "services", format!("reading service {name}"))
                .into())
        }
    };
    if let Some(d) = deployment {
        return Ok((d, svc));
    }
    let Some(svc) = svc else {
        anyhow::bail!(
            "no Deployment or Service named `{name}` in namespace `{}` (context `{}`)",
            cluster.namespace,
            cluster.context
        );
    };
    let selector = svc["spec"]["selector"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    if selector.is_empty() {
        anyhow::bail!("Service `{name}` has no selector, so no workload behind it to intercept");
    }
    let list = cluster
        .get_json(&cluster.path("apps/v1", "deployments", None))
        .await
        .map_err(|e| cluster.err(e, "list", "deployments", "listing deployments"))?;
    let matching: Vec<serde_json::Value> = list["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|d| {
            let labels = &d["spec"]["template"]["metadata"]["labels"];
            selector.iter().all(|(k, v)| &labels[k] == v)
        })
        .cloned()
        .collect();
    match matching.len() {
        1 => Ok((matching.into_iter().next().expect("one"), Some(svc))),
        0 => anyhow::bail!("Service `{name}` selects no Deployment's pods in namespace `{}`: devloop intercepts Deployments", cluster.namespace),
        _ => anyhow::bail!(
            "Service `{name}` selects the pods of several Deployments ({}); intercept one by its name",
            matching.iter().map(|d| d["metadata"]["name"].as_str().unwrap_or("?")).collect::<Vec<_>>().join(", ")
        ),
    }
}

/// The record on a Deployment, if it is intercepted.
pub fn record_of(deployment: &serde_json::Value) -> Option<Record> {
    serde_json::from_str(deployment["metadata"]["annotations"][RECORD].as_str()?).ok()
}

/// The container port `--port REMOTE` means: a container port's number or name, else a
/// port of the Service (by number or name) and the container port its `targetPort` names.
pub fn resolve_port(
    template: &serde_json::Value,
    service: Option<&serde_json::Value>,
    remote: &crate::intercept::PortRef,
) -> anyhow::Result<u16> {
    use crate::intercept::PortRef;
    let container_ports: Vec<&serde_json::Value> = template["spec"]["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|c| c["ports"].as_array().into_iter().flatten())
        .collect();
    let by_name = |name: &str| {
        container_ports
            .iter()
            .find(|p| p["name"].as_str() == Some(name))
            .and_then(|p| p["containerPort"].as_u64())
            .map(|n| n as u16)
    };
    let declared = |n: u16| {
        container_ports
            .iter()
            .any(|p| p["containerPort"].as_u64() == Some(n as u64))
    };
    let service_ports: Vec<&serde_json::Value> = service
        .map(|s| {
            s["spec"]["ports"]
                .as_array()
                .into_iter()
                .flatten()
                .collect()
        })
        .unwrap_or_default();
    let via_service = |sp: &serde_json::Value| -> Option<u16> {
        match &sp["targetPort"] {
            serde_json::Value::Number(n) => n.as_u64().map(|n| n as u16),
            serde_json::Value::String(name) => by_name(name),
            // No targetPort: the same number as the Service port.
            _ => sp["port"].as_u64().map(|n| n as u16),
        }
    };
    match remote {
        PortRef::Number(n) if declared(*n) => Ok(*n),
        PortRef::Number(n) => match service_ports
            .iter()
            .find(|sp| sp["port"].as_u64() == Some(*n as u64))
        {
            Some(sp) => via_service(sp).ok_or_else(|| {
                anyhow::anyhow!(
                    "Service port {n} targets {}, which no container port is named",
                    sp["targetPort"]
                )
            }),
            // Undeclared ports are fine: containers need not list what they listen on.
            None => Ok(*n),
        },
        PortRef::Name(name) => {
            if let Some(n) = by_name(name) {
                return Ok(n);
            }
            match service_ports
                .iter()
                .find(|sp| sp["name"].as_str() == Some(name.as_str()))
            {
                Some(sp) => via_service(sp).ok_or_else(|| {
                    anyhow::anyhow!(
                        "Service port `{name}` targets {}, which no container port is named",
                        sp["targetPort"]
                    )
                }),
                None => anyhow::bail!("no container port or Service port is named `{name}`"),
            }
        }
    }
}

/// The index of the container serving `port` (a containerPort of it), else the only container.
pub fn container_for(template: &serde_json::Value, ports: &[u16]) -> anyhow::Result<usize> {
    let containers = template["spec"]["containers"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let has = |c: &serde_json::Value, p: u16| {
        c["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|x| x["containerPort"].as_u64() == Some(p as u64))
    };
    if let Some(i) = containers
        .iter()
        .position(|c| ports.iter().any(|p| has(c, *p)))
    {
        return Ok(i);
    }
    match containers.len() {
        1 => Ok(0),
        0 => anyhow::bail!("the pod template has no containers"),
        _ => anyhow::bail!(
            "no container of the pod declares port {}; the containers are {}",
            ports
                .iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
                .join(", "),
            containers
                .iter()
                .map(|c| c["name"].as_str().unwrap_or("?"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// The pod template with container `index` replaced by the agent: same name, environment,
/// ports, resources, mounts and security context; its probes check the agent itself, so
/// they pass whether or not a laptop process is connected.
/// What the agent container is made of.
pub struct AgentSpec<'a> {
    pub image: &'a str,
    pub ports: &'a [u16],
    /// `HOST:PORT` targets of `--expose`, by position.
    pub expose: &'a [String],
    pub session: &'a str,
    pub secret: &'a str,
    /// Seconds without a cli after which the agent restores the workload, and the
    /// ServiceAccount it does that as.
    pub lease: Option<(u64, &'a str)>,
}

pub fn agent_template(
    original: &serde_json::Value,
    index: usize,
    a: &AgentSpec,
) -> serde_json::Value {
    let (image, ports, expose, session, secret) = (a.image, a.ports, a.expose, a.session, a.secret);
    let mut t = original.clone();
    let labels = &mut t["metadata"]["labels"];
    if !labels.is_object() {
        *labels = serde_json::json!({});
    }
    labels[SESSION_LABEL] = serde_json::json!(session);
    let c = &mut t["spec"]["containers"][index];
    let mut args = vec![
        "intercept".to_string(),
        "--token-file".into(),
        format!("{TOKEN_DIR}/token"),
        "--control".into(),
        format!("127.0.0.1:{}", devloop_proxy::AGENT_PORT),
    ];
    for p in ports {
        args.push("--port".into());
        args.push(p.to_string());
    }
    for e in expose {
        args.push("--expose".into());
        args.push(e.clone());
    }
    if let Some((secs, _)) = a.lease {
        args.push("--lease-secs".into());
        args.push(secs.to_string());
        args.push("--restore-dir".into());
        args.push(TOKEN_DIR.into());
    }
    c["image"] = serde_json::json!(image);
    c["imagePullPolicy"] = serde_json::json!("IfNotPresent");
    c["command"] = serde_json::json!(["/devloop-agent"]);
    c["args"] = serde_json::json!(args);
    let probe = serde_json::json!({
        "exec": {"command": ["/devloop-agent", "probe", format!("127.0.0.1:{}", devloop_proxy::AGENT_PORT), "--timeout-ms", "1000"]},
        "periodSeconds": 1, "timeoutSeconds": 2, "failureThreshold": 3, "successThreshold": 1,
    });
    let obj = c.as_object_mut().expect("a container is an object");
    obj.insert("readinessProbe".into(), probe.clone());
    obj.insert("livenessProbe".into(), serde_json::json!({
        "exec": probe["exec"].clone(), "periodSeconds": 10, "timeoutSeconds": 2, "failureThreshold": 3,
    }));
    obj.remove("startupProbe");
    obj.remove("lifecycle");
    obj.remove("workingDir");
    let mounts = obj
        .entry("volumeMounts")
        .or_insert_with(|| serde_json::json!([]));
    if let Some(m) = mounts.as_array_mut() {
        m.push(serde_json::json!({"name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": true}));
    }
    let volumes = t["spec"]
        .as_object_mut()
        .expect("a pod spec is an object")
        .entry("volumes")
        .or_insert_with(|| serde_json::json!([]));
    if let Some(v) = volumes.as_array_mut() {
        // 0444: the agent may run as any user the original ran as.
        v.push(serde_json::json!({"name": TOKEN_VOLUME, "secret": {"secretName": secret, "defaultMode": 0o444}}));
    }
    if let Some((_, account)) = a.lease {
        let spec = &mut t["spec"];
        spec["serviceAccountName"] = serde_json::json!(account);
        // Deprecated alias of serviceAccountName: when set, it must agree.
        if spec.get("serviceAccount").is_some() {
            spec["serviceAccount"] = serde_json::json!(account);
        }
        spec["automountServiceAccountToken"] = serde_json::json!(true);
    }
    t
}

/// The ServiceAccount (and its Role and RoleBinding) the agent of one session restores the
/// workload as.
pub fn lease_account(deployment: &str, session: &str) -> String {
    format!("{deployment}-devloop-lease-{session}")
}

/// On a lease account: the token Secret of the same session, which the sweep removes with it.
pub const ACCOUNT_SECRET: &str = "devloop.dev/secret";

/// Creates the session's lease ServiceAccount, a Role that may patch only this Deployment,
/// and the binding between them.
pub async fn create_lease_account(cluster: &Cluster, record: &Record) -> anyhow::Result<()> {
    let (deployment, name) = (record.deployment.as_str(), record.account());
    let labels = serde_json::json!({SECRET_LABEL: deployment, SESSION_LABEL: record.session, "app.kubernetes.io/managed-by": "devloop"});
    let rbac = "rbac.authorization.k8s.io/v1";
    let objects = [
        (
            "v1",
            "serviceaccounts",
            serde_json::json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name, "labels": labels, "annotations": {ACCOUNT_SECRET: record.secret}}}),
        ),
        (
            rbac,
            "roles",
            serde_json::json!({
                "apiVersion": rbac, "kind": "Role", "metadata": {"name": name, "labels": labels},
                "rules": [{"apiGroups": ["apps"], "resources": ["deployments"], "resourceNames": [deployment], "verbs": ["patch"]}],
            }),
        ),
        (
            rbac,
            "rolebindings",
            serde_json::json!({
                "apiVersion": rbac, "kind": "RoleBinding", "metadata": {"name": name, "labels": labels},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
                "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": cluster.namespace}],
            }),
        ),
    ];
    for (gv, resource, body) in objects {
        cluster
            .post_json(&cluster.path(gv, resource, None), &body)
            .await
            .map_err(|e| {
                cluster.err(e, "create", resource, format!("creating {resource} {name}"))
            })?;
    }
    Ok(())
}

pub async fn delete_lease_account(cluster: &Cluster, name: &str) -> anyhow::Result<()> {
    for (gv, resource) in [
        ("rbac.authorization.k8s.io/v1", "rolebindings"),
        ("rbac.authorization.k8s.io/v1", "roles"),
        ("v1", "serviceaccounts"),
    ] {
        cluster
            .delete(&cluster.path(gv, resource, Some(name)))
            .await
            .map_err(|e| {
                cluster.err(e, "delete", resource, format!("removing {resource} {name}"))
            })?;
    }
    Ok(())
}

/// On a Deployment the agent restored by its lease (value: the session).
pub const RESTORED_BY_LEASE: &str = "devloop.dev/restored-by-lease";

/// How old a lease account without a record (and without the lease's mark) must be before
/// the sweep removes it.
pub const LEASE_SETUP_GRACE: Duration = Duration::from_secs(120);

/// After an agent restored its workload by the lease, its ServiceAccount, Role, RoleBinding
/// and Secret are left: removed here (by the next devloop command against the namespace)
/// for every Deployment that is no longer intercepted. Best effort: what it could not remove
/// is reported and the rest goes on (nothing else depends on it). Returns the Deployments
/// cleaned and what failed.
pub async fn sweep_lease_leftovers(cluster: &Cluster) -> (Vec<String>, Vec<anyhow::Error>) {
    let path = format!(
        "{}?labelSelector={}",
        cluster.path("v1", "serviceaccounts", None),
        SECRET_LABEL.replace('/', "%2F")
    );
    let accounts = match cluster.get_json(&path).await {
        Ok(v) => v,
        // A user who may not list ServiceAccounts cannot clean up.
        Err(e) if status_of(&e) == Some(403) => return (Vec::new(), Vec::new()),
        Err(e) => {
            return (
                Vec::new(),
                vec![cluster
                    .err(
                        e,
                        "list",
                        "serviceaccounts",
                        "listing devloop's lease accounts",
                    )
                    .into()],
            )
        }
    };
    let (mut cleaned, mut failed) = (Vec::new(), Vec::new());
    for a in accounts["items"].as_array().into_iter().flatten() {
        let Some(deployment) = a["metadata"]["labels"][SECRET_LABEL].as_str() else {
            continue;
        };
        match sweep_one(cluster, deployment, a).await {
            Ok(true) => cleaned.push(deployment.to_string()),
            Ok(false) => {}
            Err(e) => failed.push(e.context(format!(
                "removing the lease leftovers of deployment {deployment}"
            ))),
        }
    }
    (cleaned, failed)
}

/// Removes the lease account `account` of `deployment` (and its Secret) if it is a
/// leftover; whether it was.
async fn sweep_one(
    cluster: &Cluster,
    deployment: &str,
    account: &serde_json::Value,
) -> anyhow::Result<bool> {
    let d = cluster
        .get_opt(&cluster.path("apps/v1", "deployments", Some(deployment)))
        .await
        .map_err(|e| {
            cluster.err(
                e,
                "get",
                "deployments",
                format!("reading deployment {deployment}"),
            )
        })?;
    // In use while the Deployment's record is this account's session (an account of an
    // older version, without a session, while the Deployment is intercepted at all).
    let session = account["metadata"]["labels"][SESSION_LABEL].as_str();
    if let Some(r) = d.as_ref().and_then(record_of) {
        if session.is_none_or(|s| s == r.session) {
            return Ok(false);
        }
    }
    let by_lease = d
        .as_ref()
        .is_some_and(|d| d["metadata"]["annotations"][RESTORED_BY_LEASE].is_string());
    // An intercept that is being set up has its account a few seconds before its record:
    // without the lease's mark, only an old account is a leftover (of a cli killed while
    // setting up).
    let age = account["metadata"]["creationTimestamp"]
        .as_str()
        .and_then(|t| humantime::parse_rfc3339(t).ok())
        .and_then(|t| std::time::SystemTime::now().duration_since(t).ok());
    if !by_lease && age.is_none_or(|a| a < LEASE_SETUP_GRACE) {
        return Ok(false);
    }
    if by_lease {
        let mark = format!("/metadata/annotations/{}", pointer_token(RESTORED_BY_LEASE));
        let path = cluster.path("apps/v1", "deployments", Some(deployment));
        // Tested first, so a concurrent sweep's removal is no error.
        let ops = serde_json::json!([{"op": "test", "path": mark, "value": d.as_ref().map(|d| d["metadata"]["annotations"][RESTORED_BY_LEASE].clone())}, {"op": "remove", "path": mark}]);
        if let Err(e) = cluster.json_patch(&path, &ops).await {
            if !matches!(status_of(&e), Some(404) | Some(409) | Some(422)) {
                return Err(cluster
                    .err(
                        e,
                        "patch",
                        "deployments",
                        format!("removing the lease's mark from deployment {deployment}"),
                    )
                    .into());
            }
        }
    }
    let name = account["metadata"]["name"].as_str().unwrap_or_default();
    delete_lease_account(cluster, name).await?;
    let secret = account["metadata"]["annotations"][ACCOUNT_SECRET]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| format!("{deployment}-devloop-intercept"));
    cluster
        .delete(&cluster.path("v1", "secrets", Some(&secret)))
        .await
        .map_err(|e| cluster.err(e, "delete", "secrets", format!("removing secret {secret}")))?;
    Ok(true)
}

/// The JSON patch that swaps the template in: it fails (and changes nothing) if the
/// Deployment changed since it was read or is intercepted already.
pub fn swap_patch(
    deployment: &serde_json::Value,
    record: &Record,
    template: &serde_json::Value,
) -> serde_json::Value {
    let record_json = serde_json::to_string(record).expect("a record serializes");
    template_swap_patch(deployment, RECORD, record_json, template)
}

/// The JSON patch that puts the original back; it fails if the record is not (or no longer)
/// the one on the Deployment, so two `leave`s cannot both apply.
pub fn restore_patch(record: &Record) -> serde_json::Value {
    template_restore_patch(
        RECORD,
        SESSION_LABEL,
        &record.session,
        &record.template,
        &record.replicas,
    )
}

/// The restore the agent sends when the lease runs out: [`restore_patch`] plus a mark on the
/// Deployment (`devloop.dev/restored-by-lease`), which tells the next devloop command that
/// the lease's account and Secret are leftovers to remove.
pub fn lease_restore_patch(record: &Record) -> serde_json::Value {
    let mut ops = restore_patch(record);
    if let Some(list) = ops.as_array_mut() {
        list.push(serde_json::json!({"op": "add", "path": format!("/metadata/annotations/{}", pointer_token(RESTORED_BY_LEASE)), "value": record.session}));
    }
    ops
}

/// A swap of a Deployment's pod template for one of devloop's (the intercept's agent, a dev
/// pod), with the restore record in annotation `key`, in one patch: it tests the
/// resourceVersion read, so a concurrent change (or a concurrent swap) fails it whole.
/// The swapped Deployment runs one pod.
pub fn template_swap_patch(
    deployment: &serde_json::Value,
    key: &str,
    record_json: String,
    template: &serde_json::Value,
) -> serde_json::Value {
    let rv = deployment["metadata"]["resourceVersion"].clone();
    let annotation = if deployment["metadata"]["annotations"].is_object() {
        serde_json::json!({"op": "add", "path": format!("/metadata/annotations/{}", pointer_token(key)), "value": record_json})
    } else {
        serde_json::json!({"op": "add", "path": "/metadata/annotations", "value": {key: record_json}})
    };
    serde_json::json!([
        {"op": "test", "path": "/metadata/resourceVersion", "value": rv},
        annotation,
        {"op": "replace", "path": "/spec/template", "value": template},
        {"op": "add", "path": "/spec/replicas", "value": 1},
    ])
}

/// The patch that undoes [`template_swap_patch`]: the original template and replicas back,
/// the record removed; it tests that the template still carries `label: session`, so it
/// applies once.
pub fn template_restore_patch(
    key: &str,
    label: &str,
    session: &str,
    template: &serde_json::Value,
    replicas: &serde_json::Value,
) -> serde_json::Value {
    let pointer = format!("/metadata/annotations/{}", pointer_token(key));
    let mut ops = vec![
        serde_json::json!({"op": "test", "path": format!("/spec/template/metadata/labels/{}", pointer_token(label)), "value": session}),
        serde_json::json!({"op": "replace", "path": "/spec/template", "value": template}),
    ];
    if replicas.is_null() {
        ops.push(serde_json::json!({"op": "remove", "path": "/spec/replicas"}));
    } else {
        ops.push(serde_json::json!({"op": "replace", "path": "/spec/replicas", "value": replicas}));
    }
    ops.push(serde_json::json!({"op": "remove", "path": pointer}));
    serde_json::Value::Array(ops)
}

/// Creates the Secret holding the session token (named per session: nothing to replace).
pub async fn create_token_secret(
    cluster: &Cluster,
    name: &str,
    record: &Record,
    token: &str,
) -> anyhow::Result<()> {
    let deployment = record.deployment.as_str();
    let path = cluster.path("v1", "secrets", None);
    let body = serde_json::json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": name, "labels": {SECRET_LABEL: deployment, "app.kubernetes.io/managed-by": "devloop"}},
        "type": "Opaque",
        // The lease's restore: the patch and the path the agent sends it to.
        "stringData": {
            "token": token,
            "restore.json": serde_json::to_string(&lease_restore_patch(record)).expect("a patch serializes"),
            "restore-path": cluster.path("apps/v1", "deployments", Some(deployment)),
        },
    });
    cluster
        .post_json(&path, &body)
        .await
        .map_err(|e| cluster.err(e, "create", "secrets", format!("creating secret {name}")))?;
    Ok(())
}

/// Swaps the agent in: one request that saves the record and replaces the template.
pub async fn swap_in(
    cluster: &Cluster,
    deployment: &serde_json::Value,
    record: &Record,
    template: &serde_json::Value,
) -> anyhow::Result<()> {
    let name = &record.deployment;
    apply_swap(
        cluster,
        name,
        &swap_patch(deployment, record, template),
        "swapping it",
        format!("swapping deployment {name}"),
    )
    .await
}

/// Sends a [`template_swap_patch`]; a failed test (the Deployment changed meanwhile) says
/// so with `doing` ("deployment D changed while devloop was DOING; try again").
pub async fn apply_swap(
    cluster: &Cluster,
    name: &str,
    patch: &serde_json::Value,
    doing: &str,
    what: String,
) -> anyhow::Result<()> {
    let path = cluster.path("apps/v1", "deployments", Some(name));
    cluster
        .json_patch(&path, patch)
        .await
        .map_err(|e| match status_of(&e) {
            Some(422) | Some(409) => {
                anyhow::anyhow!("deployment {name} changed while devloop was {doing}; try again")
            }
            _ => cluster.err(e, "patch", "deployments", what).into(),
        })?;
    Ok(())
}

/// Restores the Deployment from its record and removes the token Secret. Ok(false) when the
/// Deployment carries no record of this session (already restored).
pub async fn restore(cluster: &Cluster, record: &Record) -> anyhow::Result<bool> {
    let restored = apply_restore(
        cluster,
        &record.deployment,
        &restore_patch(record),
        &record.secret,
    )
    .await?;
    delete_lease_account(cluster, &record.account()).await?;
    Ok(restored)
}

/// Sends a [`template_restore_patch`] and removes the swap's token Secret. Ok(false) when
/// the patch's test failed: no longer this session's swap (restored already).
pub async fn apply_restore(
    cluster: &Cluster,
    name: &str,
    patch: &serde_json::Value,
    secret: &str,
) -> anyhow::Result<bool> {
    let path = cluster.path("apps/v1", "deployments", Some(name));
    let restored = match cluster.json_patch(&path, patch).await {
        Ok(_) => true,
        Err(e) if matches!(status_of(&e), Some(422) | Some(409) | Some(404)) => false,
        Err(e) => {
            return Err(cluster
                .err(
                    e,
                    "patch",
                    "deployments",
                    format!("restoring deployment {name}"),
                )
                .into())
        }
    };
    cluster
        .delete(&cluster.path("v1", "secrets", Some(secret)))
        .await
        .map_err(|e| cluster.err(e, "delete", "secrets", format!("removing secret {secret}")))?;
    Ok(restored)
}

/// Intercepted Deployments of the namespace, with their records.
pub async fn intercepted(cluster: &Cluster) -> anyhow::Result<Vec<Record>> {
    records_on_deployments(cluster, record_of).await
}

/// The records `read` finds on the namespace's Deployments (intercepts, dev pods).
pub async fn records_on_deployments<T>(
    cluster: &Cluster,
    read: impl Fn(&serde_json::Value) -> Option<T>,
) -> anyhow::Result<Vec<T>> {
    let list = cluster
        .get_json(&cluster.path("apps/v1", "deployments", None))
        .await
        .map_err(|e| cluster.err(e, "list", "deployments", "listing deployments"))?;
    Ok(list["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(read)
        .collect())
}

/// The running, ready agent pod of this session.
pub async fn wait_agent_pod(
    cluster: &Cluster,
    session: &str,
    timeout: Duration,
) -> anyhow::Result<String> {
    wait_session_pod(cluster, SESSION_LABEL, session, timeout).await
}

/// The running, ready pod whose template carries `label: session`.
pub async fn wait_session_pod(
    cluster: &Cluster,
    label: &str,
    session: &str,
    timeout: Duration,
) -> anyhow::Result<String> {
    let deadline = Instant::now() + timeout;
    let path = format!(
        "{}?labelSelector={label}%3D{session}",
        cluster.path("v1", "pods", None)
    );
    let mut last = String::from("no pod yet");
    loop {
        let list = cluster
            .get_json(&path)
            .await
            .map_err(|e| cluster.err(e, "list", "pods", "listing pods"))?;
        for p in list["items"].as_array().into_iter().flatten() {
            if !p["metadata"]["deletionTimestamp"].is_null() {
                continue;
            }
            let name = p["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            let ready = p["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["type"] == "Ready" && c["status"] == "True");
            if ready {
                return Ok(name);
            }
            if let Some(problem) = pod_problem(p) {
                if is_fatal(&problem) {
                    anyhow::bail!("pod {name} cannot start: {problem}");
                }
                last = problem;
            } else {
                last = format!(
                    "pod {name} is {}",
                    p["status"]["phase"].as_str().unwrap_or("pending")
                );
            }
        }
        if Instant::now() > deadline {
            anyhow::bail!("the pod did not become ready within {timeout:?}: {last}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waiting reasons that do not go away by waiting.
const FATAL_REASONS: &[&str] = &[
    "ErrImagePull",
    "ImagePullBackOff",
    "CrashLoopBackOff",
    "CreateContainerConfigError",
    "InvalidImageName",
];

/// True for a [`pod_problem`] that waiting will not cure.
pub fn is_fatal(problem: &str) -> bool {
    FATAL_REASONS.iter().any(|r| problem.contains(r))
}

/// A waiting container's reason (ImagePullBackOff, CrashLoopBackOff, ...) and message, init
/// containers included.
pub fn pod_problem(pod: &serde_json::Value) -> Option<String> {
    let status = &pod["status"];
    ["initContainerStatuses", "containerStatuses"]
        .iter()
        .find_map(|key| {
            status[*key].as_array()?.iter().find_map(|s| {
                let w = &s["state"]["waiting"];
                let reason = w["reason"].as_str()?;
                (reason != "ContainerCreating" && reason != "PodInitializing").then(|| {
                    format!(
                        "container {}: {reason}: {}",
                        s["name"].as_str().unwrap_or("?"),
                        w["message"].as_str().unwrap_or("")
                    )
                })
            })
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deployment() -> serde_json::Value {
        serde_json::json!({
            "metadata": {"name": "api", "resourceVersion": "42", "annotations": {"keep": "me"}},
            "spec": {"replicas": 3, "template": {
                "metadata": {"labels": {"app": "api"}},
                "spec": {"containers": [
                    {"name": "side", "image": "side:1", "ports": [{"containerPort": 9000}]},
                    {"name": "api", "image": "api:1", "ports": [{"containerPort": 8000}], "env": [{"name": "A", "value": "1"}, {"name": "S", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}],
                     "readinessProbe": {"httpGet": {"path": "/health", "port": 8000}}, "startupProbe": {"httpGet": {"path": "/", "port": 8000}}}
                ]}
            }}
        })
    }

    fn record(d: &serde_json::Value) -> Record {
        Record {
            deployment: "api".into(),
            service: "api".into(),
            container: "api".into(),
            template: d["spec"]["template"].clone(),
            replicas: d["spec"]["replicas"].clone(),
            ports: vec![(8000, 3000)],
            session: "s1".into(),
            secret: "api-devloop-intercept".into(),
            started_ms: 1,
            holder: "me".into(),
            account: String::new(),
        }
    }

    fn c_args(t: &serde_json::Value) -> Vec<String> {
        t["spec"]["containers"][1]["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().to_string())
            .collect()
    }

    #[test]
    fn ports_by_number_name_or_service_port() {
        use crate::intercept::PortRef;
        let d = deployment();
        let mut t = d["spec"]["template"].clone();
        t["spec"]["containers"][1]["ports"][0]["name"] = serde_json::json!("http");
        let svc = serde_json::json!({"spec": {"ports": [
            {"name": "web", "port": 80, "targetPort": "http"},
            {"name": "side", "port": 9090, "targetPort": 9000},
            {"name": "same", "port": 7000},
        ]}});
        assert_eq!(
            resolve_port(&t, Some(&svc), &PortRef::Number(8000)).unwrap(),
            8000
        );
        assert_eq!(
            resolve_port(&t, Some(&svc), &PortRef::Name("http".into())).unwrap(),
            8000
        );
        assert_eq!(
            resolve_port(&t, Some(&svc), &PortRef::Number(80)).unwrap(),
            8000
        );
        assert_eq!(
            resolve_port(&t, Some(&svc), &PortRef::Name("web".into())).unwrap(),
            8000
        );
        assert_eq!(
            resolve_port(&t, Some(&svc), &PortRef::Number(9090)).unwrap(),
            9000
        );
        assert_eq!(
            resolve_port(&t, Some(&svc), &PortRef::Name("same".into())).unwrap(),
            7000
        );
        assert_eq!(
            resolve_port(&t, None, &PortRef::Number(1234)).unwrap(),
            1234
        );
        assert!(resolve_port(&t, None, &PortRef::Name("nope".into()))
            .unwrap_err()
            .to_string()
            .contains("`nope`"));
    }

    #[test]
    fn picks_the_container_with_the_port() {
        let d = deployment();
        assert_eq!(container_for(&d["spec"]["template"], &[8000]).unwrap(), 1);
        assert_eq!(container_for(&d["spec"]["template"], &[9000]).unwrap(), 0);
        assert!(container_for(&d["spec"]["template"], &[1])
            .unwrap_err()
            .to_string()
            .contains("side, api"));
    }

    #[test]
    fn the_agent_template_keeps_the_rest_of_the_pod() {
        let d = deployment();
        let spec = AgentSpec {
            image: "reg/devloop-agent:1",
            ports: &[8000],
            expose: &[],
            session: "s1",
            secret: "sec",
            lease: Some((900, "api-devloop-lease")),
        };
        let t = agent_template(&d["spec"]["template"], 1, &spec);
        assert_eq!(t["spec"]["serviceAccountName"], "api-devloop-lease");
        assert!(c_args(&t).contains(&"--lease-secs".to_string()));
        let c = &t["spec"]["containers"][1];
        assert_eq!(c["image"], "reg/devloop-agent:1");
        assert_eq!(c["name"], "api");
        assert_eq!(
            c["ports"],
            d["spec"]["template"]["spec"]["containers"][1]["ports"]
        );
        assert_eq!(
            c["env"],
            d["spec"]["template"]["spec"]["containers"][1]["env"]
        );
        assert!(c["readinessProbe"]["exec"]["command"][0]
            .as_str()
            .unwrap()
            .ends_with("devloop-agent"));
        assert!(c.get("startupProbe").is_none());
        assert_eq!(
            t["spec"]["containers"][0],
            d["spec"]["template"]["spec"]["containers"][0]
        );
        assert_eq!(t["metadata"]["labels"]["app"], "api");
        assert_eq!(t["metadata"]["labels"][SESSION_LABEL], "s1");
        assert_eq!(t["spec"]["volumes"][0]["secret"]["secretName"], "sec");
    }

    #[test]
    fn swap_then_restore_gives_back_the_same_spec() {
        let d = deployment();
        let r = record(&d);
        let spec = AgentSpec {
            image: "img",
            ports: &[8000],
            expose: &[],
            session: "s1",
            secret: "sec",
            lease: None,
        };
        let t = agent_template(&d["spec"]["template"], 1, &spec);
        let patch = swap_patch(&d, &r, &t);
        assert_eq!(patch[0]["op"], "test");
        assert_eq!(
            patch[1]["path"],
            "/metadata/annotations/devloop.dev~1intercept"
        );
        // Apply both patches by hand (the ops these functions emit) and compare.
        let mut swapped = d.clone();
        swapped["metadata"]["annotations"][RECORD] = patch[1]["value"].clone();
        swapped["spec"]["template"] = patch[2]["value"].clone();
        swapped["spec"]["replicas"] = patch[3]["value"].clone();
        assert_eq!(record_of(&swapped), Some(r.clone()));
        let restore = restore_patch(&r);
        assert_eq!(restore[0]["value"], "s1");
        let mut back = swapped.clone();
        back["spec"]["template"] = restore[1]["value"].clone();
        back["spec"]["replicas"] = restore[2]["value"].clone();
        back["metadata"]["annotations"]
            .as_object_mut()
            .unwrap()
            .remove(RECORD);
        assert_eq!(back, d);
    }

    #[test]
    fn annotations_are_created_when_missing_and_unset_replicas_stay_unset() {
        let mut d = deployment();
        d["metadata"].as_object_mut().unwrap().remove("annotations");
        d["spec"].as_object_mut().unwrap().remove("replicas");
        let r = Record {
            replicas: serde_json::Value::Null,
            ..record(&deployment())
        };
        let patch = swap_patch(&d, &r, &serde_json::json!({}));
        assert_eq!(patch[1]["path"], "/metadata/annotations");
        assert!(patch[1]["value"][RECORD].is_string());
        assert_eq!(restore_patch(&r)[2]["op"], "remove");
    }
}
