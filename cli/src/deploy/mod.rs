//! Snapshot and deploy: a service's synced tree becomes an immutable image (its base plus one
//! layer, no `docker build` when only files changed) and replaces the running version.
//! [`base`] derives the base, [`snapshot`] makes the layer and the load archive; the rollout
//! is the back end's, behind [`Deployer`]; [`run`] is one deploy of one service, the same on
//! every back end.

pub mod base;
pub mod history;
pub mod push;
mod run;
pub mod snapshot;

pub use run::{run, run_waves};

use anyhow::Context;
use bollard::Docker;
use futures_util::future::BoxFuture;
use futures_util::StreamExt;
use std::sync::Arc;
use std::time::Instant;

use crate::config::{ImageSource, Project, Service};
use crate::sync::engine::Connector;
use crate::sync::filter::{Filter, FilterSettings};
use crate::ui::Ui;

/// What a rollout did.
#[derive(Debug)]
pub enum Rollout {
    /// That version already runs.
    Unchanged,
    Replaced {
        healthy_ms: u64,
        switch_ms: u64,
        /// How long published host ports were not served, when they had to move.
        port_gap_ms: Option<u64>,
    },
    /// Kubernetes: the Deployment rolled out to the snapshot and every new pod is ready.
    Ready {
        ready_ms: u64,
        revision: Option<u64>,
        /// Objects created from the manifests (`deployment/api`).
        created: Vec<String>,
    },
}

/// A back end's side of `deploy`, `watch`, `history` and `rollback`: make a snapshot run in
/// place of the service's current version, safely (the old one serves until the new one is
/// healthy), tell which version runs, and go back. Docker implements it in
/// `backend::docker::deploy`, Kubernetes in `backend::k8s::deployer`; the snapshot, the
/// waves and the report are the same for every back end ([`run`]).
pub trait Deployer: Send + Sync {
    /// The local engine: every back end builds bases and snapshots in it. An error when it
    /// cannot be reached (reading versions on a cluster does not need it).
    fn engine(&self) -> anyhow::Result<&Docker>;

    /// Where snapshots go; an error when the back end has nowhere to put them.
    fn destination(&self) -> anyhow::Result<Destination<'_>>;

    /// Brings a snapshot made in the engine where the rollout can use it (a cluster with no
    /// registry loads it with its tool). Nothing to do by default.
    fn deliver<'a>(&'a self, _snapshot: &'a Snapshot) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async { Ok(()) })
    }

    fn roll_out<'a>(
        &'a self,
        project: &'a Project,
        service: &'a Service,
        snapshot: &'a Snapshot,
    ) -> BoxFuture<'a, anyhow::Result<Rollout>>;

    /// The snapshot tag of the version that runs now, if a deployed one does.
    fn running_version<'a>(
        &'a self,
        project: &'a str,
        service: &'a str,
    ) -> BoxFuture<'a, anyhow::Result<Option<String>>>;

    /// Records the version rolled out in the local history (and prunes what the back end
    /// does not keep itself).
    fn remember<'a>(
        &'a self,
        project: &'a Project,
        service: &'a Service,
        snapshot: &'a Snapshot,
    ) -> BoxFuture<'a, ()>;

    /// `history SERVICE`: the versions, newest first, as printed.
    fn history<'a>(
        &'a self,
        project: &'a Project,
        service: &'a str,
    ) -> BoxFuture<'a, anyhow::Result<String>>;

    /// `rollback SERVICE`: back to the version before the running one (or `to_revision`
    /// where the back end numbers its revisions); the line that reports it.
    fn rollback<'a>(
        &'a self,
        project: &'a Project,
        service: &'a Service,
        to_revision: Option<u64>,
    ) -> BoxFuture<'a, anyhow::Result<String>>;

    /// `watch`: the running version of `service` to sync into, deployed first (with
    /// `deploy`) when the back end needs that; None when something else holds the service
    /// (an intercept, a dev mode), said on `ui`.
    fn watched<'a>(
        &'a self,
        project: &'a Project,
        service: &'a Service,
        ui: &'a Ui,
        deploy: &'a (dyn Fn() -> BoxFuture<'a, anyhow::Result<String>> + Send + Sync),
    ) -> BoxFuture<'a, anyhow::Result<Option<Arc<dyn Connector>>>>;
}

/// A snapshot made (or found) for a service.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// `devloop-PROJECT-SERVICE:TAG`.
    pub image: String,
    pub tag: String,
    /// True when an image with this tag already existed: nothing was built or loaded.
    pub reused: bool,
    pub files: usize,
    pub millis: u64,
    /// Digest of the tree, for the history's "what changed".
    pub digest: std::collections::BTreeMap<String, String>,
    /// What went to the registry, when the snapshot was pushed.
    pub pushed: Option<crate::oci::PushReport>,
    /// What the image runs (its base's), when known.
    pub command: Option<ImageCommand>,
}

/// What an image runs: its entry point, cmd and working directory.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ImageCommand {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub workdir: Option<String>,
}

/// Where a snapshot goes.
pub enum Destination<'a> {
    /// Loaded into the engine (`docker load`): the Docker target.
    Engine,
    /// Pushed to a registry the cluster pulls from (`pull` is the registry's name for the
    /// nodes): the Kubernetes target.
    Registry {
        pusher: &'a crate::oci::Pusher,
        pull: &'a str,
    },
}

pub fn snapshot_repo(project: &str, service: &str) -> String {
    format!("devloop-{project}-{service}")
}

/// Label keys on snapshot images, for `history`.
pub const LABEL_SNAPSHOT_OF: &str = "dev.devloop.snapshot-of";

/// The image the snapshot layer goes on; built from the derived Dockerfile when the
/// service has one (cached by the hash of the derived Dockerfile and the declared
/// `build_inputs`).
pub async fn ensure_base(
    docker: &Docker,
    project: &Project,
    service: &Service,
    ui: &Ui,
) -> anyhow::Result<String> {
    let sync = service.sync.as_ref().context("deploy needs the service's `sync` (from, to) in devloop.toml: it names the tree to snapshot")?;
    match &service.image {
        ImageSource::Image(name) => {
            crate::image::ensure_present(docker, name, ui, &service.name).await?;
            Ok(name.clone())
        }
        ImageSource::Build {
            context,
            dockerfile,
        } => {
            let text = std::fs::read_to_string(dockerfile)
                .with_context(|| format!("reading {}", dockerfile.display()))?;
            let derived = base::derive(&text, &sync.container_dir)
                .with_context(|| format!("{}", dockerfile.display()))?;
            // The derived Dockerfile and the declared build inputs decide when the base is
            // built again; anything else in the context is the snapshot's business.
            let mut key = derived.clone();
            for input in &service.build_inputs {
                let content = std::fs::read(context.join(input)).with_context(|| {
                    format!(
                        "reading build input {input} of `{}` (build_inputs in devloop.toml)",
                        service.name
                    )
                })?;
                key.push_str(&format!(
                    "\0{input}\0{}",
                    devloop_proxy::tree::hex(&devloop_proxy::tree::hash_bytes(&content))
                ));
            }
            let hash = devloop_proxy::tree::hex(&devloop_proxy::tree::hash_bytes(key.as_bytes()));
            let tag = format!(
                "{}:base-{}",
                snapshot_repo(&project.name, &service.name),
                &hash[..12]
            );
            if docker.inspect_image(&tag).await.is_ok() {
                return Ok(tag);
            }
            for from in crate::image::base_images(&derived) {
                crate::image::ensure_present(docker, &from, ui, &service.name).await?;
            }
            ui.info(
                &service.name,
                format!(
                    "building the snapshot base {tag} (the Dockerfile without `COPY` of {})",
                    sync.container_dir
                ),
            );
            crate::image::build_dockerfile_text(docker, context, &derived, &tag, ui, &service.name)
                .await?;
            Ok(tag)
        }
    }
}

/// Makes the snapshot image of the service's laptop tree on `base`.
pub async fn snapshot(
    docker: &Docker,
    project: &Project,
    service: &Service,
    base: &str,
    dest: &Destination<'_>,
) -> anyhow::Result<Snapshot> {
    let started = Instant::now();
    let sync = service
        .sync
        .as_ref()
        .context("deploy needs `sync` in devloop.toml")?;
    let base_info = docker
        .inspect_image(base)
        .await
        .with_context(|| format!("inspecting {base}"))?;
    let base_id = base_info.id.clone().unwrap_or_default();
    let command = base_info.config.as_ref().map(|c| ImageCommand {
        entrypoint: c.entrypoint.clone().unwrap_or_default(),
        cmd: c.cmd.clone().unwrap_or_default(),
        workdir: c.working_dir.clone().filter(|w| !w.is_empty()),
    });
    let base_json = serde_json::to_value(&base_info)?;
    let root = sync.laptop_dir.clone();
    let settings = FilterSettings {
        excludes: service.excludes.clone(),
        include_node_modules: service.include_node_modules,
    };
    let (tree, errors) = tokio::task::spawn_blocking({
        let root = root.clone();
        move || -> anyhow::Result<_> {
            let mut filter = Filter::new(&root, settings)?;
            Ok(crate::sync::scan::scan(&root, &mut filter))
        }
    })
    .await??;
    if let Some(e) = errors.first() {
        anyhow::bail!("cannot read the tree to snapshot: {e}");
    }
    let labels = vec![
        (crate::labels::PROJECT.to_string(), project.name.clone()),
        (crate::labels::SERVICE.to_string(), service.name.clone()),
        (LABEL_SNAPSHOT_OF.to_string(), base.to_string()),
    ];
    let tag = snapshot::content_tag(&base_id, &tree, &sync.container_dir, &labels);
    let repo = snapshot_repo(&project.name, &service.name);
    let image = match dest {
        Destination::Engine => format!("{repo}:{tag}"),
        Destination::Registry { pull, .. } => format!("{pull}/{repo}:{tag}"),
    };
    let files = tree.len();
    let digest = history::digest(&tree);
    let exists = match dest {
        Destination::Engine => docker.inspect_image(&image).await.is_ok(),
        Destination::Registry { pusher, .. } => pusher.has_manifest(&repo, &tag).await?,
    };
    let pushed = if exists {
        None
    } else {
        let parts = Parts {
            base_id,
            base: base_json,
            root,
            tree,
            container_dir: sync.container_dir.clone(),
            labels,
        };
        make(docker, dest, base, parts, &repo, &tag, &image).await?
    };
    Ok(Snapshot {
        image,
        tag,
        reused: exists,
        files,
        millis: started.elapsed().as_millis() as u64,
        digest,
        pushed,
        command,
    })
}

/// What a snapshot is made of, owned, so the tar work can run on a blocking thread.
struct Parts {
    base_id: String,
    base: serde_json::Value,
    root: std::path::PathBuf,
    tree: devloop_proxy::tree::Tree,
    container_dir: String,
    labels: Vec<(String, String)>,
}

impl Parts {
    fn input(&self) -> snapshot::SnapshotInput<'_> {
        snapshot::SnapshotInput {
            base_id: &self.base_id,
            base: &self.base,
            laptop_root: &self.root,
            tree: &self.tree,
            container_dir: &self.container_dir,
            labels: self.labels.clone(),
        }
    }
}

/// Makes the snapshot at its destination: pushed to the registry (Some(what was sent)), or
/// loaded into the engine with `docker load`.
async fn make(
    docker: &Docker,
    dest: &Destination<'_>,
    base: &str,
    parts: Parts,
    repo: &str,
    tag: &str,
    image: &str,
) -> anyhow::Result<Option<crate::oci::PushReport>> {
    if let Destination::Registry { pusher, .. } = dest {
        let base_layers = snapshot::base_layers(&parts.base);
        let (layer, config) = tokio::task::spawn_blocking(move || -> std::io::Result<_> {
            let input = parts.input();
            let layer = snapshot::layer_tar(input.laptop_root, input.tree, input.container_dir)?;
            let config = snapshot::image_config(&input, &snapshot::hex_sha256(&layer));
            Ok((layer, config))
        })
        .await??;
        let report = push::push_snapshot(
            docker,
            pusher,
            repo,
            tag,
            push::Base {
                name: base,
                layers: &base_layers,
            },
            layer,
            &config,
        )
        .await
        .with_context(|| format!("pushing the snapshot {image}"))?;
        return Ok(Some(report));
    }
    let image_ref = image.to_string();
    let archive =
        tokio::task::spawn_blocking(move || snapshot::archive(&parts.input(), &image_ref))
            .await??;
    let mut stream = docker.import_image(
        bollard::query_parameters::ImportImageOptionsBuilder::new()
            .quiet(true)
            .build(),
        bollard::body_full(archive.bytes.into()),
        None,
    );
    while let Some(item) = stream.next().await {
        item.with_context(|| {
            format!("loading the snapshot {image} (the engine refused the archive)")
        })?;
    }
    docker
        .inspect_image(image)
        .await
        .with_context(|| format!("the engine did not keep the snapshot {image}"))?;
    Ok(None)
}
