//! Pod, namespace and container names from the Kubernetes API: a watch of the pods scheduled
//! on this node (`spec.nodeName`), kept as an index from pod uid and container id to names.
//! Without API access the index stays empty and series keep the ids their cgroup path gives.

use std::collections::HashMap;
use std::sync::RwLock;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::watcher;

use crate::config::{Config, KubernetesMode};

/// Names of one pod and its containers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodNames {
    pub namespace: String,
    pub name: String,
    /// Container id (hex, no `containerd://` prefix) to container name, including the
    /// previous instance of a restarted container.
    pub containers: HashMap<String, String>,
    /// When the pod was deleted (or vanished from a relist): its names stay resolvable while
    /// its processes' series may still be exported (`--exit-grace`).
    pub deleted: Option<Instant>,
}

/// What the labels of one series get from the index.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Names<'a> {
    pub namespace: &'a str,
    pub pod: &'a str,
    pub container: &'a str,
}

#[derive(Debug, Default)]
pub struct PodIndex {
    by_uid: HashMap<String, PodNames>,
    /// Whether the watch is connected and its initial list complete.
    synced: bool,
    /// Watch errors so far (connection refused, 403, ...).
    errors: u64,
    last_error: Option<(Instant, String)>,
    /// How long a deleted pod's names stay.
    keep_deleted: Duration,
}

impl PodIndex {
    pub fn lookup(&self, pod_uid: &str, container_id: &str) -> Names<'_> {
        let Some(p) = self.by_uid.get(pod_uid) else {
            return Names::default();
        };
        Names {
            namespace: &p.namespace,
            pod: &p.name,
            container: p.containers.get(container_id).map_or("", String::as_str),
        }
    }

    /// Pods on the node now (not counting deleted ones kept for their names).
    pub fn pods(&self) -> usize {
        self.by_uid.values().filter(|p| p.deleted.is_none()).count()
    }

    pub fn synced(&self) -> bool {
        self.synced
    }

    pub fn errors(&self) -> u64 {
        self.errors
    }

    fn apply(&mut self, pod: &Pod) {
        for (uid, names) in names_of(pod) {
            self.by_uid.insert(uid, names);
        }
    }

    fn delete(&mut self, pod: &Pod, now: Instant) {
        for (uid, _) in names_of(pod) {
            if let Some(p) = self.by_uid.get_mut(&uid) {
                p.deleted.get_or_insert(now);
            }
        }
        self.purge(now);
    }

    /// A complete list: pods not in it were deleted while the watch was down.
    fn replace(&mut self, fresh: HashMap<String, PodNames>, now: Instant) {
        let mut old = std::mem::replace(&mut self.by_uid, fresh);
        for (uid, mut p) in old.drain() {
            if let std::collections::hash_map::Entry::Vacant(e) = self.by_uid.entry(uid) {
                p.deleted.get_or_insert(now);
                e.insert(p);
            }
        }
        self.purge(now);
    }

    fn purge(&mut self, now: Instant) {
        let keep = self.keep_deleted;
        self.by_uid.retain(|_, p| {
            p.deleted
                .is_none_or(|t| now.saturating_duration_since(t) < keep)
        });
    }
}

/// The index every series renderer reads. Empty until (unless) a watch fills it.
pub fn index() -> &'static RwLock<PodIndex> {
    static INDEX: std::sync::OnceLock<RwLock<PodIndex>> = std::sync::OnceLock::new();
    INDEX.get_or_init(|| RwLock::new(PodIndex::default()))
}

/// A container id as the API reports it ("containerd://<hex>", "cri-o://<hex>",
/// "docker://<hex>") to the bare id cgroup paths carry.
fn bare_container_id(id: &str) -> &str {
    id.split_once("://").map_or(id, |(_, hex)| hex)
}

/// The annotation a static pod's mirror pod carries: the uid the kubelet gave the static
/// pod (a hash of its manifest), which is what its cgroup path has.
const MIRROR_ANNOTATION: &str = "kubernetes.io/config.mirror";

/// The uids a pod's cgroups can carry (its own, and for a mirror pod the static pod's) and
/// its names. Empty for a pod without a uid (never from a real API server).
pub fn names_of(pod: &Pod) -> Vec<(String, PodNames)> {
    let Some(uid) = pod.metadata.uid.clone() else {
        return Vec::new();
    };
    let mut containers = HashMap::new();
    if let Some(status) = &pod.status {
        let all = [
            status.container_statuses.as_deref(),
            status.init_container_statuses.as_deref(),
            status.ephemeral_container_statuses.as_deref(),
        ];
        for s in all.into_iter().flatten().flatten() {
            let previous = s
                .last_state
                .as_ref()
                .and_then(|l| l.terminated.as_ref())
                .and_then(|t| t.container_id.as_deref());
            for id in [s.container_id.as_deref(), previous].into_iter().flatten() {
                containers.insert(bare_container_id(id).to_string(), s.name.clone());
            }
        }
    }
    let names = PodNames {
        namespace: pod.metadata.namespace.clone().unwrap_or_default(),
        name: pod.metadata.name.clone().unwrap_or_default(),
        containers,
        deleted: None,
    };
    let mirror = pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(MIRROR_ANNOTATION))
        .filter(|m| **m != uid)
        .cloned();
    let mut out = vec![(uid, names.clone())];
    out.extend(mirror.map(|m| (m, names)));
    out
}

/// Starts the pod watch if the configuration asks for one and an API is reachable by
/// configuration (in-cluster service account, or $KUBECONFIG / ~/.kube/config). Returns the
/// task that runs it, or `None` (with a log line saying why) when labels stay path-only.
pub async fn start(config: &Config) -> Option<crate::probes::Task> {
    if config.kubernetes == KubernetesMode::Off {
        return None;
    }
    let Some(node) = config.node_name.clone() else {
        log::info!(
            "Kubernetes: no --node-name (STALLWATCH_NODE_NAME); pod and container names off, \
             series carry the pod uid and container id from cgroup paths"
        );
        return None;
    };
    let client_config = match kube::Config::infer().await {
        Ok(c) => c,
        Err(e) => {
            log::info!(
                "Kubernetes: no API configuration ({e}); pod and container names off, series \
                 carry the pod uid and container id from cgroup paths"
            );
            return None;
        }
    };
    let client = match kube::Client::try_from(client_config) {
        Ok(c) => c,
        Err(e) => {
            log::warn!("Kubernetes: cannot build an API client: {e:#}; pod names off");
            return None;
        }
    };
    log::info!("Kubernetes: watching pods on node {node}");
    index()
        .write()
        .unwrap_or_else(|e| e.into_inner())
        .keep_deleted = config.exit_grace;
    Some(Box::pin(async move { watch(client, node).await }))
}

/// Runs the watch forever. A failure (connection refused, 403, a dropped stream) is counted
/// and logged (at most once a minute); the watch then starts over with a full list 5 s later,
/// so `synced` says whether the index is complete. The index keeps what it knew meanwhile.
async fn watch(client: kube::Client, node: String) -> anyhow::Result<()> {
    loop {
        watch_once(client.clone(), &node).await;
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}

async fn watch_once(client: kube::Client, node: &str) {
    let pods: kube::Api<Pod> = kube::Api::all(client);
    let cfg = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
    let mut stream = watcher(pods, cfg).map_err(anyhow::Error::from).boxed();
    // A relist builds a fresh index and swaps it in when complete.
    let mut relist: Option<HashMap<String, PodNames>> = None;
    while let Some(ev) = stream.next().await {
        let now = Instant::now();
        // A writer that panicked left a consistent map (each change is whole).
        let mut idx = index().write().unwrap_or_else(|e| e.into_inner());
        match ev {
            Ok(watcher::Event::Init) => relist = Some(HashMap::new()),
            Ok(watcher::Event::InitApply(pod)) => {
                if let Some(fresh) = relist.as_mut() {
                    fresh.extend(names_of(&pod));
                }
            }
            Ok(watcher::Event::InitDone) => {
                if let Some(fresh) = relist.take() {
                    idx.replace(fresh, now);
                }
                if !idx.synced {
                    log::info!("Kubernetes: {} pods on node {node}", idx.by_uid.len());
                }
                idx.synced = true;
            }
            Ok(watcher::Event::Apply(pod)) => idx.apply(&pod),
            Ok(watcher::Event::Delete(pod)) => idx.delete(&pod, now),
            Err(e) => {
                idx.errors += 1;
                idx.synced = false;
                let quiet = idx
                    .last_error
                    .as_ref()
                    .is_some_and(|(t, _)| t.elapsed() < Duration::from_secs(60));
                if !quiet {
                    log::warn!("Kubernetes: pod watch failed (listing again in 5 s): {e:#}");
                }
                idx.last_error = Some((now, format!("{e:#}")));
                return;
            }
        }
    }
    let mut idx = index().write().unwrap_or_else(|e| e.into_inner());
    idx.synced = false;
    log::warn!("Kubernetes: pod watch stream ended; listing again in 5 s");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod_json() -> serde_json::Value {
        serde_json::json!({
            "metadata": {"name": "web-0", "namespace": "shop", "uid": "0b4a7b3e-5d2f-4c4e-9a53-5b1f2c3d4e5f"},
            "spec": {"nodeName": "n1", "containers": [{"name": "app"}, {"name": "sidecar"}]},
            "status": {
                "containerStatuses": [
                    {"name": "app", "containerID": "containerd://aa11", "image": "x", "imageID": "", "ready": true, "restartCount": 0},
                    {"name": "sidecar", "containerID": "cri-o://bb22", "image": "x", "imageID": "", "ready": true, "restartCount": 0}
                ],
                "initContainerStatuses": [
                    {"name": "init", "containerID": "docker://cc33", "image": "x", "imageID": "", "ready": false, "restartCount": 0}
                ]
            }
        })
    }

    #[test]
    fn a_pod_names_its_containers_by_bare_id() {
        let pod: Pod = serde_json::from_value(pod_json()).unwrap();
        let uid = "0b4a7b3e-5d2f-4c4e-9a53-5b1f2c3d4e5f".to_string();
        let mut idx = PodIndex::default();
        idx.apply(&pod);
        let n = idx.lookup(&uid, "bb22");
        assert_eq!(
            (n.namespace, n.pod, n.container),
            ("shop", "web-0", "sidecar")
        );
        assert_eq!(idx.lookup(&uid, "cc33").container, "init");
        // The pause container (not in any status) and unknown pods: what is known, no more.
        assert_eq!(idx.lookup(&uid, "ffff").container, "");
        assert_eq!(idx.lookup(&uid, "ffff").pod, "web-0");
        assert_eq!(idx.lookup("other", "aa11"), Names::default());
        // Deleted: counted no more, names kept for the series that outlive it, then purged.
        let t0 = Instant::now();
        idx.keep_deleted = Duration::from_secs(300);
        idx.delete(&pod, t0);
        assert_eq!(idx.pods(), 0);
        assert_eq!(idx.lookup(&uid, "aa11").container, "app");
        idx.purge(t0 + Duration::from_secs(301));
        assert_eq!(idx.lookup(&uid, "aa11"), Names::default());
    }

    #[test]
    fn a_relist_keeps_vanished_pods_as_deleted_and_restarted_containers_keep_their_name() {
        let mut json = pod_json();
        json["status"]["containerStatuses"][0]["lastState"] = serde_json::json!(
            {"terminated": {"exitCode": 137, "containerID": "containerd://old1"}}
        );
        let pod: Pod = serde_json::from_value(json).unwrap();
        let uid = "0b4a7b3e-5d2f-4c4e-9a53-5b1f2c3d4e5f";
        let mut idx = PodIndex {
            keep_deleted: Duration::from_secs(300),
            ..PodIndex::default()
        };
        idx.apply(&pod);
        assert_eq!(idx.lookup(uid, "old1").container, "app");
        let t0 = Instant::now();
        idx.replace(HashMap::new(), t0);
        assert_eq!(idx.pods(), 0);
        assert_eq!(idx.lookup(uid, "aa11").pod, "web-0");
        idx.replace(HashMap::new(), t0 + Duration::from_secs(400));
        assert_eq!(idx.lookup(uid, "aa11"), Names::default());
    }

    #[test]
    fn a_static_pod_is_found_by_the_uid_its_cgroup_carries() {
        let mut json = pod_json();
        json["metadata"]["annotations"] =
            serde_json::json!({"kubernetes.io/config.mirror": "8daa50c3a64c9ff60bb9eab7b44b56fd"});
        let pod: Pod = serde_json::from_value(json).unwrap();
        let mut idx = PodIndex::default();
        idx.apply(&pod);
        assert_eq!(
            idx.lookup("8daa50c3a64c9ff60bb9eab7b44b56fd", "aa11")
                .container,
            "app"
        );
        idx.delete(&pod, Instant::now());
        assert_eq!(idx.pods(), 0);
    }
}
