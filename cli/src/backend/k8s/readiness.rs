//! Waiting for a rollout like `kubectl rollout status`, and saying why one cannot become
//! ready (the new pods' problems, events and last log lines).

use serde_json::Value;
use std::time::{Duration, Instant};

use super::intercept::{is_fatal, pod_problem};
use super::rollout::*;
use super::Cluster;

/// Why a rollout failed: a one-line reason and what the failing pod said.
#[derive(Debug)]
pub struct Failure {
    pub reason: String,
    pub details: String,
    /// The failed template's `pod-template-hash`, when a pod of it was made.
    pub template_hash: Option<String>,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the rollout did not become ready: {}", self.reason)?;
        if !self.details.is_empty() {
            write!(f, "\n{}", self.details.trim_end())?;
        }
        Ok(())
    }
}

/// What the Deployment's status says about its rollout, as `kubectl rollout status` reads it.
#[derive(Debug, PartialEq, Eq)]
pub enum Progress {
    Done,
    Waiting(String),
    /// The progress deadline passed (the Deployment's own `progressDeadlineSeconds`).
    Stalled(String),
}

pub fn progress(d: &Value) -> Progress {
    let generation = d["metadata"]["generation"].as_u64().unwrap_or(0);
    let status = &d["status"];
    if status["observedGeneration"].as_u64().unwrap_or(0) < generation {
        return Progress::Waiting("the controller has not seen the change yet".into());
    }
    if let Some(c) = status["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["type"] == "Progressing" && c["reason"] == "ProgressDeadlineExceeded")
    {
        return Progress::Stalled(
            c["message"]
                .as_str()
                .unwrap_or("progress deadline exceeded")
                .to_string(),
        );
    }
    let want = d["spec"]["replicas"].as_u64().unwrap_or(1);
    let updated = status["updatedReplicas"].as_u64().unwrap_or(0);
    let total = status["replicas"].as_u64().unwrap_or(0);
    let available = status["availableReplicas"].as_u64().unwrap_or(0);
    if updated < want {
        Progress::Waiting(format!("{updated} of {want} new pods"))
    } else if total > updated {
        Progress::Waiting(format!("{} old pods still terminating", total - updated))
    } else if available < updated {
        Progress::Waiting(format!("{available} of {updated} new pods ready"))
    } else {
        Progress::Done
    }
}

/// Waits until the rollout of `patched` (the Deployment as the patch left it) is done; fails
/// early when a new pod cannot start (image pull, crash loop) or the progress deadline passes.
pub(crate) async fn wait_rollout(
    cluster: &Cluster,
    name: &str,
    patched: &Value,
    timeout: Duration,
) -> Result<Option<u64>, Failure> {
    let path = cluster.path("apps/v1", "deployments", Some(name));
    let image_of = |t: &Value| -> Vec<Value> {
        t["spec"]["containers"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    };
    let want_containers = image_of(&patched["spec"]["template"]);
    let deadline = Instant::now() + timeout;
    loop {
        let d = cluster.get_json(&path).await.map_err(|e| Failure {
            reason: format!("reading deployment/{name}: {e}"),
            details: String::new(),
            template_hash: None,
        })?;
        let last = match progress(&d) {
            Progress::Done => {
                return Ok(d["metadata"]["annotations"][REVISION]
                    .as_str()
                    .and_then(|r| r.parse().ok()))
            }
            Progress::Stalled(m) => return Err(diagnose(cluster, &d, &want_containers, m).await),
            Progress::Waiting(w) => w,
        };
        // A new pod that cannot start will not get better by waiting.
        for pod in new_pods(cluster, &d, &want_containers).await {
            if let Some(problem) = pod_problem(&pod).filter(|p| is_fatal(p)) {
                return Err(diagnose(
                    cluster,
                    &d,
                    &want_containers,
                    format!(
                        "pod {}: {problem}",
                        pod["metadata"]["name"].as_str().unwrap_or("?")
                    ),
                )
                .await);
            }
        }
        if Instant::now() > deadline {
            let reason = format!(
                "not ready within {} ({last})",
                crate::ui::human_ms(timeout.as_millis() as u64)
            );
            return Err(diagnose(cluster, &d, &want_containers, reason).await);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The Deployment's pods that run the new template (its containers' images).
pub(crate) async fn new_pods(cluster: &Cluster, d: &Value, containers: &[Value]) -> Vec<Value> {
    let path = selected_by(cluster, d, "v1", "pods");
    let Ok(list) = cluster.get_json(&path).await else {
        return Vec::new();
    };
    let images: Vec<&str> = containers
        .iter()
        .filter_map(|c| c["image"].as_str())
        .collect();
    list["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| {
            let have: Vec<&str> = p["spec"]["containers"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|c| c["image"].as_str())
                .collect();
            have == images
        })
        .cloned()
        .collect()
}

/// The failure with what the new pods said: their recent events and last log lines.
pub(crate) async fn diagnose(
    cluster: &Cluster,
    d: &Value,
    containers: &[Value],
    reason: String,
) -> Failure {
    let mut details = String::new();
    let pods = new_pods(cluster, d, containers).await;
    let template_hash = pods.iter().find_map(|p| {
        p["metadata"]["labels"][TEMPLATE_HASH]
            .as_str()
            .map(String::from)
    });
    for pod in pods.iter().take(2) {
        let pod_name = pod["metadata"]["name"].as_str().unwrap_or_default();
        let events_path = format!(
            "{}?fieldSelector={}",
            cluster.path("v1", "events", None),
            url_escape(&format!("involvedObject.name={pod_name}"))
        );
        if let Ok(ev) = cluster.get_json(&events_path).await {
            let mut items: Vec<&Value> = ev["items"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|e| e["type"] == "Warning")
                .collect();
            items.sort_by_key(|e| e["lastTimestamp"].as_str().unwrap_or_default().to_string());
            if !items.is_empty() {
                details.push_str(&format!("events of pod {pod_name}:\n"));
                for e in items.iter().rev().take(4).rev() {
                    details.push_str(&format!(
                        "  {}: {}\n",
                        e["reason"].as_str().unwrap_or("?"),
                        e["message"].as_str().unwrap_or("").trim()
                    ));
                }
            }
        }
        for status in pod["status"]["containerStatuses"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let container = status["name"].as_str().unwrap_or_default();
            // A crashed container's own output is in its previous instance.
            let previous = status["lastState"]["terminated"].is_object();
            let log_path = format!(
                "{}/log?container={container}&tailLines=10{}",
                cluster.path("v1", "pods", Some(pod_name)),
                if previous { "&previous=true" } else { "" }
            );
            let req = match http::Request::get(&log_path).body(Vec::new()) {
                Ok(r) => r,
                Err(_) => continue,
            };
            if let Ok(text) = cluster.client.request_text(req).await {
                if !text.trim().is_empty() {
                    details.push_str(&format!(
                        "last log lines of pod {pod_name}, container {container}{}:\n",
                        if previous {
                            " (before its last exit)"
                        } else {
                            ""
                        }
                    ));
                    for line in text.lines() {
                        details.push_str(&format!("  {line}\n"));
                    }
                }
            }
        }
    }
    Failure {
        reason,
        details,
        template_hash,
    }
}
