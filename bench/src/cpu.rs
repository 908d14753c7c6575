//! Where the machine's CPU goes while a transfer runs: the time on CPU of every process,
//! summed over its threads (the first field of /proc/PID/task/TID/schedstat, in ns), taken
//! before and after, grouped by program name. On 2 cores a transfer through a chain of
//! relays is bound by the chain's CPU per byte, so this tells which relay costs what.

use std::collections::HashMap;

/// On-CPU time of each running process, by pid, with its program name.
pub struct CpuTimes(HashMap<u32, (String, u64)>);

impl CpuTimes {
    pub fn now() -> CpuTimes {
        let mut map = HashMap::new();
        let Ok(procs) = std::fs::read_dir("/proc") else {
            return CpuTimes(map);
        };
        for p in procs.flatten() {
            let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let Ok(comm) = std::fs::read_to_string(p.path().join("comm")) else {
                continue;
            };
            let Ok(tasks) = std::fs::read_dir(p.path().join("task")) else {
                continue;
            };
            let ns: u64 = tasks
                .flatten()
                .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
                .filter_map(|s| {
                    s.split_whitespace()
                        .next()
                        .and_then(|v| v.parse::<u64>().ok())
                })
                .sum();
            map.insert(pid, (program(comm.trim()), ns));
        }
        CpuTimes(map)
    }

    /// Milliseconds on CPU since `earlier`, by program, largest first; programs under 1 ms
    /// are left out.
    pub fn since(&self, earlier: &CpuTimes) -> Vec<(String, f64)> {
        let mut by_program: HashMap<&str, u64> = HashMap::new();
        for (pid, (name, ns)) in &self.0 {
            // By pid alone: a kernel worker renames itself after the work it runs.
            let before = earlier.0.get(pid).map_or(0, |(_, ns)| *ns);
            *by_program.entry(name.as_str()).or_default() += ns.saturating_sub(before);
        }
        let mut out: Vec<(String, f64)> = by_program
            .into_iter()
            .map(|(name, ns)| (name.to_string(), ns as f64 / 1e6))
            .filter(|(_, ms)| *ms >= 1.0)
            .collect();
        out.sort_by(|a, b| b.1.total_cmp(&a.1));
        out
    }
}

/// The name a process is reported under (its main thread's name): containerd's shims as
/// one, the load generator as one whether it runs on the laptop or in a pod, the kernel's
/// workers as one.
fn program(comm: &str) -> String {
    if comm.starts_with("containerd-shim") {
        "containerd-shim".into()
    } else if comm.starts_with("kworker") {
        // The kernel's workers (named after their current work item): network and memory
        // work done outside any process.
        "kworker".into()
    } else if comm == "devloop-loadgen" {
        "loadgen".into()
    } else {
        comm.to_string()
    }
}

/// The CPU milliseconds per MiB moved, by program, as JSON (`{"kubectl": 3.8, ...}`), and as
/// one line for the log ("kubectl 3.8, kube-apiserver 2.3, ...").
pub fn per_mib(used: &[(String, f64)], mib: f64) -> (serde_json::Value, String) {
    let map: serde_json::Map<String, serde_json::Value> = used
        .iter()
        .map(|(name, ms)| {
            (
                name.clone(),
                serde_json::json!((ms / mib * 100.0).round() / 100.0),
            )
        })
        .collect();
    let line = used
        .iter()
        .filter(|(_, ms)| ms / mib >= 0.1)
        .map(|(name, ms)| format!("{name} {:.1}", ms / mib))
        .collect::<Vec<_>>()
        .join(", ");
    (serde_json::Value::Object(map), line)
}
