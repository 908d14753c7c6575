//! Getting each service's image onto the engine: pulled, built from its Dockerfile, or, for
//! the public base images that have an offline recipe (images/base/build-base.sh), built
//! locally from Debian's packages when no registry can be reached.

use bollard::query_parameters::{BuildImageOptionsBuilder, CreateImageOptionsBuilder};
use bollard::Docker;
use futures_util::StreamExt;
use std::path::Path;

use crate::config::{ImageSource, Project, Service};
use crate::engine::api;
use crate::ui::Ui;

/// The recipe, compiled in so an installed devloop needs no checkout.
const OFFLINE_BASE_SCRIPT: &str = include_str!("../../images/base/build-base.sh");

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error(transparent)]
    Docker(#[from] crate::engine::DockerError),
    #[error("building {image} failed: {message}")]
    Build { image: String, message: String },
    #[error("image {image} is not on the engine and cannot be pulled ({pull_error}); {hint}")]
    Unavailable {
        image: String,
        pull_error: String,
        hint: String,
    },
    #[error("{0}")]
    Io(String),
}

pub fn dev_image_tag(project: &str, service: &str) -> String {
    format!("devloop-{project}-{service}:dev")
}

/// Makes the service's image available; returns its reference.
pub async fn ensure_service_image(
    docker: &Docker,
    project: &Project,
    service: &Service,
    rebuild: bool,
    ui: &Ui,
) -> Result<String, ImageError> {
    match &service.image {
        ImageSource::Image(name) => {
            ensure_present(docker, name, ui, &service.name).await?;
            Ok(name.clone())
        }
        ImageSource::Build {
            context,
            dockerfile,
        } => {
            let tag = dev_image_tag(&project.name, &service.name);
            if !rebuild && docker.inspect_image(&tag).await.is_ok() {
                return Ok(tag);
            }
            let text = std::fs::read_to_string(dockerfile).map_err(|e| {
                ImageError::Io(format!("cannot read {}: {e}", dockerfile.display()))
            })?;
            for base in base_images(&text) {
                ensure_present(docker, &base, ui, &service.name).await?;
            }
            build(docker, context, dockerfile, &tag, ui, &service.name).await?;
            Ok(tag)
        }
    }
}

/// The images a Dockerfile starts from, leaving out `scratch` and earlier stages.
pub fn base_images(dockerfile: &str) -> Vec<String> {
    let mut stages: Vec<String> = Vec::new();
    let mut bases = Vec::new();
    for line in dockerfile.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        if words.first().map(|w| w.eq_ignore_ascii_case("FROM")) != Some(true) {
            continue;
        }
        let args: Vec<&str> = words[1..]
            .iter()
            .copied()
            .filter(|w| !w.starts_with("--"))
            .collect();
        let Some(image) = args.first() else { continue };
        let image = image.to_string();
        // Stages named before this line are not images.
        if image != "scratch" && !stages.contains(&image.to_lowercase()) && !bases.contains(&image)
        {
            bases.push(image);
        }
        if let (Some(as_kw), Some(name)) = (args.get(1), args.get(2)) {
            if as_kw.eq_ignore_ascii_case("AS") {
                stages.push(name.to_lowercase());
            }
        }
    }
    bases
}

/// Inspect, else pull, else build offline when a recipe exists.
pub async fn ensure_present(
    docker: &Docker,
    image: &str,
    ui: &Ui,
    service: &str,
) -> Result<(), ImageError> {
    if docker.inspect_image(image).await.is_ok() {
        return Ok(());
    }
    ui.info(service, format!("pulling {image}"));
    let pull_error = match pull(docker, image).await {
        Ok(()) => return Ok(()),
        Err(e) => e,
    };
    if has_offline_recipe(image) {
        ui.warn(service, format!("cannot pull {image} ({pull_error}); building an equivalent from Debian packages (about a minute, once)"));
        build_offline_base(image).await?;
        return Ok(());
    }
    Err(ImageError::Unavailable {
        image: image.into(),
        pull_error,
        hint: "log in to its registry (`docker login`), or load it with `docker load` / build it and tag it with that name".into(),
    })
}

async fn pull(docker: &Docker, image: &str) -> Result<(), String> {
    let mut stream = docker.create_image(
        Some(CreateImageOptionsBuilder::new().from_image(image).build()),
        None,
        None,
    );
    let pull = async {
        while let Some(item) = stream.next().await {
            match item {
                Ok(info) => {
                    if let Some(e) = info.error_detail.and_then(|d| d.message) {
                        return Err(e);
                    }
                }
                Err(e) => return Err(e.to_string()),
            }
        }
        Ok(())
    };
    match tokio::time::timeout(std::time::Duration::from_secs(600), pull).await {
        Ok(r) => r,
        Err(_) => Err("timed out after 10 minutes".into()),
    }
}

/// Whether images/base/build-base.sh knows how to make `image`.
pub fn has_offline_recipe(image: &str) -> bool {
    let name = image
        .strip_prefix("docker.io/")
        .unwrap_or(image)
        .strip_prefix("library/")
        .unwrap_or(image);
    (name.starts_with("python:3") && name.contains("bookworm"))
        || name.starts_with("debian:bookworm")
}

async fn build_offline_base(image: &str) -> Result<(), ImageError> {
    let status = tokio::process::Command::new("bash")
        .arg("-c")
        .arg(OFFLINE_BASE_SCRIPT)
        .arg("build-base.sh")
        .arg(image)
        .stdin(std::process::Stdio::null())
        .status()
        .await
        .map_err(|e| ImageError::Io(format!("cannot run bash for the offline base image: {e}")))?;
    if status.success() {
        Ok(())
    } else {
        Err(ImageError::Build {
            image: image.into(),
            message: format!("the offline recipe exited with {status} (its output is above)"),
        })
    }
}

async fn build(
    docker: &Docker,
    context: &Path,
    dockerfile: &Path,
    tag: &str,
    ui: &Ui,
    service: &str,
) -> Result<(), ImageError> {
    ui.info(
        service,
        format!("building {tag} from {}", dockerfile.display()),
    );
    let archive = pack_context(context, None).await?;
    let rel_dockerfile = dockerfile
        .strip_prefix(context)
        .unwrap_or(dockerfile)
        .to_string_lossy()
        .into_owned();
    run_build(docker, archive, &rel_dockerfile, tag, ui, service).await
}

/// Builds `context` with `dockerfile` as the Dockerfile's text (added to the context under
/// a name of its own).
pub async fn build_dockerfile_text(
    docker: &Docker,
    context: &Path,
    dockerfile: &str,
    tag: &str,
    ui: &Ui,
    service: &str,
) -> Result<(), ImageError> {
    let archive = pack_context(context, Some(dockerfile.to_string())).await?;
    run_build(docker, archive, GENERATED_DOCKERFILE, tag, ui, service).await
}

const GENERATED_DOCKERFILE: &str = ".devloop.Dockerfile";

/// The build context as a tar, off the async threads (it reads the whole folder).
async fn pack_context(
    context: &Path,
    extra_dockerfile: Option<String>,
) -> Result<Vec<u8>, ImageError> {
    let ctx = context.to_path_buf();
    tokio::task::spawn_blocking(move || context_tar(&ctx, extra_dockerfile.as_deref()))
        .await
        .map_err(|e| ImageError::Io(e.to_string()))?
        .map_err(|e| {
            ImageError::Io(format!(
                "packing the build context {}: {e}",
                context.display()
            ))
        })
}

async fn run_build(
    docker: &Docker,
    archive: Vec<u8>,
    dockerfile: &str,
    tag: &str,
    ui: &Ui,
    service: &str,
) -> Result<(), ImageError> {
    let started = std::time::Instant::now();
    let opts = BuildImageOptionsBuilder::new()
        .dockerfile(dockerfile)
        .t(tag)
        .rm(true)
        .build();
    let mut stream = docker.build_image(opts, None, Some(bollard::body_full(archive.into())));
    while let Some(item) = stream.next().await {
        let info = item.map_err(|e| ImageError::Build {
            image: tag.into(),
            message: e.to_string(),
        })?;
        if let Some(err) = info.error_detail.and_then(|d| d.message) {
            return Err(ImageError::Build {
                image: tag.into(),
                message: err,
            });
        }
        if let Some(line) = info.stream {
            let line = line.trim_end();
            if !line.is_empty() {
                ui.info(service, format!("build: {line}"));
            }
        }
    }
    // The engine reports some failures only by not producing the tag.
    docker
        .inspect_image(tag)
        .await
        .map_err(api(format!("inspecting the freshly built {tag}")))?;
    ui.info(
        service,
        format!("built {tag} in {:.1} s", started.elapsed().as_secs_f64()),
    );
    Ok(())
}

/// The build context as a tar, without what .dockerignore excludes.
fn context_tar(context: &Path, extra_dockerfile: Option<&str>) -> std::io::Result<Vec<u8>> {
    let mut ig = ignore::gitignore::GitignoreBuilder::new(context);
    let di = context.join(".dockerignore");
    if di.is_file() {
        if let Some(e) = ig.add(&di) {
            return Err(std::io::Error::other(e.to_string()));
        }
    }
    let ig = ig
        .build()
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let mut b = tar::Builder::new(Vec::new());
    b.follow_symlinks(false);
    let mut stack = vec![context.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let path = entry.path();
            let ft = entry.file_type()?;
            let rel = path.strip_prefix(context).map_err(std::io::Error::other)?;
            if ig.matched_path_or_any_parents(rel, ft.is_dir()).is_ignore() {
                continue;
            }
            b.append_path_with_name(&path, rel)?;
            if ft.is_dir() {
                stack.push(path);
            }
        }
    }
    if let Some(text) = extra_dockerfile {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(text.len() as u64);
        b.append_data(&mut h, GENERATED_DOCKERFILE, text.as_bytes())?;
    }
    b.into_inner()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_lines() {
        let df = "FROM --platform=linux/amd64 python:3.11-slim-bookworm AS build\nRUN x\nFROM build\nFROM scratch\nfrom debian:bookworm-slim\n";
        assert_eq!(
            base_images(df),
            ["python:3.11-slim-bookworm", "debian:bookworm-slim"]
        );
    }

    #[test]
    fn offline_recipes() {
        assert!(has_offline_recipe("python:3.11-slim-bookworm"));
        assert!(has_offline_recipe("docker.io/library/debian:bookworm-slim"));
        assert!(!has_offline_recipe("node:20"));
    }
}
