//! A snapshot pushed to a registry instead of loaded into the engine (the Kubernetes
//! target): the same layer, config and tag as [`super::snapshot`] makes, sent straight to the
//! registry's HTTP API. The base's layers go once per repository: a HEAD per layer tells
//! which the registry lacks, and only then does `docker save` read them from the engine.
//! Layers travel uncompressed (their digest is their diff id, so no hashing pass is needed
//! to ask the registry), which OCI allows and containerd and Docker pull.

use anyhow::Context;
use bollard::Docker;
use futures_util::StreamExt;
use std::collections::{BTreeSet, HashMap};
use std::io::Read;

use crate::oci::{sha256_digest, Descriptor, PushReport, Pusher};

/// The image a snapshot is made on: its name in the engine and its layers' diff ids.
pub struct Base<'a> {
    pub name: &'a str,
    pub layers: &'a [String],
}

/// Pushes the snapshot as REPO:TAG: base layers the registry lacks (read with `docker
/// save` of the base), the snapshot layer, the config, the manifest.
pub async fn push_snapshot(
    docker: &Docker,
    pusher: &Pusher,
    repo: &str,
    tag: &str,
    base: Base<'_>,
    layer: Vec<u8>,
    config: &serde_json::Value,
) -> anyhow::Result<PushReport> {
    let Base {
        name: base,
        layers: base_layers,
    } = base;
    let mut report = PushReport::default();
    let mut descriptors = Vec::with_capacity(base_layers.len() + 1);
    let mut missing = BTreeSet::new();
    for digest in base_layers {
        match pusher.blob_size(repo, digest).await? {
            Some(size) => {
                report.count(false, 0);
                descriptors.push(Descriptor {
                    digest: digest.clone(),
                    size,
                });
            }
            None => {
                missing.insert(digest.clone());
                descriptors.push(Descriptor {
                    digest: digest.clone(),
                    size: 0,
                });
            }
        }
    }
    if !missing.is_empty() {
        let mut found = saved_layers(docker, base, &missing).await?;
        for d in descriptors
            .iter_mut()
            .filter(|d| missing.contains(&d.digest))
        {
            let bytes = found.remove(&d.digest).with_context(|| {
                format!("`docker save {base}` did not hold its layer {}", d.digest)
            })?;
            d.size = bytes.len() as u64;
            pusher.upload_blob(repo, &d.digest, bytes.into()).await?;
            report.count(true, d.size as usize);
        }
    }
    let layer_desc = Descriptor {
        digest: sha256_digest(&layer),
        size: layer.len() as u64,
    };
    report.count(pusher.put_blob(repo, &layer).await?, layer.len());
    descriptors.push(layer_desc);
    let config_bytes = serde_json::to_vec(config)?;
    report.count(
        pusher.put_blob(repo, &config_bytes).await?,
        config_bytes.len(),
    );
    let config_desc = Descriptor {
        digest: sha256_digest(&config_bytes),
        size: config_bytes.len() as u64,
    };
    pusher
        .put_manifest(repo, tag, &config_desc, &descriptors)
        .await?;
    Ok(report)
}

/// The layers of `image` whose digests are in `wanted`, read from `docker save`: each layer
/// file of the archive is hashed, so both archive layouts (`ID/layer.tar`, and the OCI
/// `blobs/sha256/...` of newer engines) work.
async fn saved_layers(
    docker: &Docker,
    image: &str,
    wanted: &BTreeSet<String>,
) -> anyhow::Result<HashMap<String, Vec<u8>>> {
    let mut archive = Vec::new();
    let mut stream = docker.export_image(image);
    while let Some(chunk) = stream.next().await {
        archive.extend_from_slice(&chunk.with_context(|| format!("`docker save {image}`"))?);
    }
    let wanted = wanted.clone();
    tokio::task::spawn_blocking(move || layers_in_archive(&archive, &wanted))
        .await?
        .with_context(|| format!("reading the `docker save` archive of {image}"))
}

/// The files of a `docker save` archive whose sha256 is one of `wanted`, by digest.
pub fn layers_in_archive(
    archive: &[u8],
    wanted: &BTreeSet<String>,
) -> std::io::Result<HashMap<String, Vec<u8>>> {
    let mut found = HashMap::new();
    let mut tar = tar::Archive::new(archive);
    for entry in tar.entries()? {
        let mut entry = entry?;
        if entry.header().entry_type() != tar::EntryType::Regular {
            continue;
        }
        let path = entry.path()?.to_string_lossy().into_owned();
        // manifest.json, index.json, configs: small JSON files, never layers.
        if path.ends_with(".json") || path == "repositories" || path.ends_with("/VERSION") {
            continue;
        }
        let mut bytes = Vec::with_capacity(entry.size() as usize);
        entry.read_to_end(&mut bytes)?;
        let digest = sha256_digest(&bytes);
        if wanted.contains(&digest) {
            found.insert(digest, bytes);
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn archive(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, data) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            b.append_data(&mut h, name, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn finds_wanted_layers_in_both_save_layouts() {
        let a = b"layer a".as_slice();
        let b = b"layer b".as_slice();
        let c = b"layer c".as_slice();
        let wanted: BTreeSet<String> = [sha256_digest(a), sha256_digest(c)].into();
        let classic = archive(&[
            ("manifest.json", b"[]"),
            ("1111/layer.tar", a),
            ("2222/layer.tar", b),
            ("3333/layer.tar", c),
        ]);
        let found = layers_in_archive(&classic, &wanted).unwrap();
        assert_eq!(found.len(), 2);
        assert_eq!(found[&sha256_digest(a)], a);
        assert_eq!(found[&sha256_digest(c)], c);
        let oci = archive(&[
            ("index.json", b"{}"),
            (&format!("blobs/sha256/{}", &sha256_digest(c)[7..]), c),
        ]);
        let found = layers_in_archive(&oci, &wanted).unwrap();
        assert_eq!(found.keys().collect::<Vec<_>>(), vec![&sha256_digest(c)]);
    }
}
