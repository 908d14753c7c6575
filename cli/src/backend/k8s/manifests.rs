//! Creating a service's Deployment from the project's manifests: read them, then create
//! what its pod template refers to (ConfigMaps, Secrets, ServiceAccounts, PVCs) before it.

use anyhow::Context;
use serde_json::{json, Value};
use std::path::Path;
use std::time::{Duration, Instant};

use super::rollout::*;
use super::Cluster;

/// Reads every Kubernetes object in the YAML files of `dir` (sorted by file name).
pub fn read_manifests(dir: &Path) -> anyhow::Result<Vec<Value>> {
    use serde::Deserialize;
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("reading the manifests folder {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
        .collect();
    files.sort();
    let mut out = Vec::new();
    for f in files {
        let text =
            std::fs::read_to_string(&f).with_context(|| format!("reading {}", f.display()))?;
        for doc in serde_yaml_ng::Deserializer::from_str(&text) {
            let v = Value::deserialize(doc)
                .with_context(|| format!("{}: not valid YAML", f.display()))?;
            if v.is_null() {
                continue;
            }
            if v["kind"].as_str().is_none() || v["metadata"]["name"].as_str().is_none() {
                anyhow::bail!("{}: a document without kind or metadata.name", f.display());
            }
            out.push(v);
        }
    }
    Ok(out)
}

/// The kinds of object a pod template refers to by name that `deploy` creates from the
/// manifests along with the service, with their API group/version and resource.
pub(crate) const DEPENDENCIES: [(&str, &str, &str); 4] = [
    ("ConfigMap", "v1", "configmaps"),
    ("Secret", "v1", "secrets"),
    ("PersistentVolumeClaim", "v1", "persistentvolumeclaims"),
    ("ServiceAccount", "v1", "serviceaccounts"),
];

/// The ConfigMaps, Secrets, PersistentVolumeClaims and ServiceAccount a pod template refers
/// to by name (volumes, projected volumes, `envFrom`, `valueFrom`, image pull secrets, the
/// service account), as (kind, name), each once.
pub fn template_refs(template: &Value) -> Vec<(&'static str, String)> {
    fn add(out: &mut Vec<(&'static str, String)>, kind: &'static str, v: &Value) {
        if let Some(name) = v.as_str() {
            if !out.iter().any(|(k, n)| *k == kind && n == name) {
                out.push((kind, name.to_string()));
            }
        }
    }
    let mut out = Vec::new();
    let spec = &template["spec"];
    for v in spec["volumes"].as_array().into_iter().flatten() {
        add(&mut out, "ConfigMap", &v["configMap"]["name"]);
        add(&mut out, "Secret", &v["secret"]["secretName"]);
        add(
            &mut out,
            "PersistentVolumeClaim",
            &v["persistentVolumeClaim"]["claimName"],
        );
        for source in v["projected"]["sources"].as_array().into_iter().flatten() {
            add(&mut out, "ConfigMap", &source["configMap"]["name"]);
            add(&mut out, "Secret", &source["secret"]["name"]);
        }
    }
    for c in spec["initContainers"]
        .as_array()
        .into_iter()
        .chain(spec["containers"].as_array())
        .flatten()
    {
        for e in c["envFrom"].as_array().into_iter().flatten() {
            add(&mut out, "ConfigMap", &e["configMapRef"]["name"]);
            add(&mut out, "Secret", &e["secretRef"]["name"]);
        }
        for e in c["env"].as_array().into_iter().flatten() {
            add(
                &mut out,
                "ConfigMap",
                &e["valueFrom"]["configMapKeyRef"]["name"],
            );
            add(&mut out, "Secret", &e["valueFrom"]["secretKeyRef"]["name"]);
        }
    }
    for s in spec["imagePullSecrets"].as_array().into_iter().flatten() {
        add(&mut out, "Secret", &s["name"]);
    }
    add(&mut out, "ServiceAccount", &spec["serviceAccountName"]);
    out
}

/// The service's objects among the manifests: its Deployment and its Service (both named
/// after it), with the snapshot as the container's image and the cluster's namespace, and
/// before them the ConfigMaps, Secrets, PersistentVolumeClaims and ServiceAccount its pod
/// template refers to that the manifests hold.
pub fn objects_for(
    manifests: &[Value],
    service: &str,
    image: &str,
    cause: &str,
) -> anyhow::Result<Vec<Value>> {
    let mut out = Vec::new();
    let local = |m: &Value| {
        let mut m = m.clone();
        if let Some(meta) = m["metadata"].as_object_mut() {
            // The target's namespace decides, as with `kubectl apply -n`.
            meta.remove("namespace");
        }
        m
    };
    for m in manifests {
        if m["metadata"]["name"].as_str() != Some(service) {
            continue;
        }
        let mut m = local(m);
        match m["kind"].as_str() {
            Some("Deployment") => {
                let index = service_container(&m["spec"]["template"], service)?;
                m["spec"]["template"]["spec"]["containers"][index]["image"] = json!(image);
                if !m["metadata"]["annotations"].is_object() {
                    m["metadata"]["annotations"] = json!({});
                }
                m["metadata"]["annotations"][CHANGE_CAUSE] = json!(cause);
                out.push(m);
            }
            Some("Service") => out.push(m),
            _ => {}
        }
    }
    let Some(deployment) = out.iter().find(|m| m["kind"] == "Deployment") else {
        anyhow::bail!("the manifests have no Deployment named `{service}`");
    };
    let refs = template_refs(&deployment["spec"]["template"]);
    for m in manifests {
        let (Some(kind), Some(name)) = (m["kind"].as_str(), m["metadata"]["name"].as_str()) else {
            continue;
        };
        if refs.iter().any(|(k, n)| *k == kind && n == name) {
            out.push(local(m));
        }
    }
    // What the pods refer to first, then the Service (so the name answers as soon as a pod
    // is ready), then the Deployment.
    out.sort_by_key(|m| match m["kind"].as_str() {
        Some("Deployment") => 2,
        Some("Service") => 1,
        _ => 0,
    });
    Ok(out)
}

/// Creates the service's missing objects from the manifests and waits for its rollout.
/// The Deployment and Service are looked up first; the objects they refer to are created
/// unless they exist (a 409: someone else's, or an earlier deploy's, left as they are).
pub(crate) async fn create_from_manifests(
    cluster: &Cluster,
    service: &str,
    image: &str,
    dir: &Path,
    timeout: Duration,
) -> anyhow::Result<RolledOut> {
    let manifests = read_manifests(dir)?;
    let objects = objects_for(
        &manifests,
        service,
        image,
        &format!("devloop deploy {image}"),
    )?;
    let started = Instant::now();
    let mut created = Vec::new();
    let mut deployment = None;
    for o in objects {
        let kind = o["kind"].as_str().unwrap_or_default();
        let (gv, resource) = match kind {
            "Deployment" => ("apps/v1", "deployments"),
            "Service" => ("v1", "services"),
            _ => DEPENDENCIES
                .iter()
                .find(|(k, _, _)| *k == kind)
                .map(|(_, gv, r)| (*gv, *r))
                .context("a kind objects_for does not give")?,
        };
        let name = o["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let workload = matches!(kind, "Deployment" | "Service");
        if workload
            && cluster
                .get_opt(&cluster.path(gv, resource, Some(&name)))
                .await
                .map_err(|e| cluster.err(e, "get", resource, format!("reading {resource}/{name}")))?
                .is_some()
        {
            continue;
        }
        let made = match cluster
            .post_json(&cluster.path(gv, resource, None), &o)
            .await
        {
            Ok(made) => made,
            Err(e) if !workload && super::status_of(&e) == Some(409) => continue,
            Err(e) => {
                return Err(cluster
                    .err(
                        e,
                        "create",
                        resource,
                        format!("creating {resource}/{name} from {}", dir.display()),
                    )
                    .into())
            }
        };
        created.push(format!("{}/{name}", kind.to_lowercase()));
        if kind == "Deployment" {
            deployment = Some(made);
        }
    }
    let d = deployment.context("the Deployment exists already")?;
    match wait_rollout(cluster, service, &d, timeout).await {
        Ok(revision) => Ok(RolledOut {
            ready_ms: started.elapsed().as_millis() as u64,
            revision,
            created,
        }),
        // Nothing ran before: there is nothing to undo to; the objects stay for inspection.
        Err(f) => Err(anyhow::anyhow!(
            "{f}\ncreated {} from {}; fix the cause and deploy again",
            created.join(", "),
            dir.display()
        )),
    }
}
