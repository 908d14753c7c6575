//! Files and users inside a container: single-file uploads (the token), a directory given
//! to the image's user, and that user read as Docker reads it.

use bollard::query_parameters::UploadToContainerOptionsBuilder;
use bollard::Docker;
use std::path::Path;

use super::*;

/// Copies the session token to [`TOKEN_PATH`] in a created container, readable by its root
/// only.
pub async fn upload_token(
    docker: &Docker,
    id: &str,
    name: &str,
    token: &str,
    owner: (u32, u32),
) -> Result<(), DockerError> {
    let mut b = tar::Builder::new(Vec::new());
    let mut dir = tar::Header::new_gnu();
    dir.set_entry_type(tar::EntryType::Directory);
    dir.set_mode(0o711);
    dir.set_size(0);
    let mut file = tar::Header::new_gnu();
    file.set_mode(0o600);
    file.set_size(token.len() as u64);
    // The agent runs as the container's user: the token is that user's, readable by no one
    // else (a root-owned 0600 file would stop an agent of an image with a non-root USER).
    file.set_uid(owner.0 as u64);
    file.set_gid(owner.1 as u64);
    let archive = b
        .append_data(&mut dir, ".devloop/", std::io::empty())
        .and_then(|()| b.append_data(&mut file, ".devloop/token", token.as_bytes()))
        .and_then(|()| b.into_inner())
        .map_err(|e| DockerError::Other(format!("packing the token: {e}")))?;
    docker
        .upload_to_container(
            id,
            Some(UploadToContainerOptionsBuilder::new().path("/").build()),
            bollard::body_full(archive.into()),
        )
        .await
        .map_err(api(format!("copying the token into {name}")))
}

/// Makes `dir` (a volume's mount point in a created container) belong to `owner`, so an
/// agent running as the image's non-root user can write the synced tree into it. Docker
/// creates a new volume owned by root unless the image has that folder.
pub async fn give_dir_to(
    docker: &Docker,
    id: &str,
    dir: &str,
    owner: (u32, u32),
) -> Result<(), DockerError> {
    let mut b = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::Directory);
    header.set_mode(0o755);
    header.set_size(0);
    header.set_uid(owner.0 as u64);
    header.set_gid(owner.1 as u64);
    // The engine leaves a `./` entry's owner alone, but applies a named entry's to the
    // folder that exists already: the folder goes in under its own name, into its parent.
    let path = Path::new(dir);
    let (parent, name) = match (path.parent(), path.file_name()) {
        (Some(p), Some(n)) => (
            p.to_string_lossy().into_owned(),
            n.to_string_lossy().into_owned(),
        ),
        _ => return Ok(()),
    };
    let archive = b
        .append_data(&mut header, format!("{name}/"), std::io::empty())
        .and_then(|()| b.into_inner())
        .map_err(|e| DockerError::Other(format!("packing {dir}: {e}")))?;
    docker
        .upload_to_container(
            id,
            Some(UploadToContainerOptionsBuilder::new().path(&parent).build()),
            bollard::body_full(archive.into()),
        )
        .await
        .map_err(api(format!("giving {dir} to uid {}", owner.0)))
}

/// The uid and gid a created container's process runs as: its `User` (the image's, or
/// one compose set), numbers as they are, names looked up in the container's own
/// `/etc/passwd` and `/etc/group`.
pub async fn container_user(docker: &Docker, id: &str) -> Result<(u32, u32), DockerError> {
    let info = docker
        .inspect_container(id, None)
        .await
        .map_err(api(format!("inspecting {id}")))?;
    let spec = info.config.and_then(|c| c.user).unwrap_or_default();
    if spec.is_empty() || spec == "root" || spec == "0" || spec == "0:0" {
        return Ok((0, 0));
    }
    let needs_names = spec.split(':').any(|p| p.parse::<u32>().is_err());
    let (passwd, group) = if needs_names {
        (
            read_container_file(docker, id, "/etc/passwd").await.ok(),
            read_container_file(docker, id, "/etc/group").await.ok(),
        )
    } else {
        (None, None)
    };
    resolve_user(&spec, passwd.as_deref(), group.as_deref()).map_err(DockerError::Other)
}

/// `USER` as Docker reads it: `user[:group]`, each a number or a name. A user given alone
/// takes its primary group from passwd (gid = uid when passwd does not list a number).
pub fn resolve_user(
    spec: &str,
    passwd: Option<&str>,
    group: Option<&str>,
) -> Result<(u32, u32), String> {
    let (user, grp) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let passwd_line = |name: &str| {
        passwd.and_then(|p| {
            p.lines()
                .map(|l| l.split(':').collect::<Vec<_>>())
                .find(|f| f.len() >= 4 && f[0] == name)
                .and_then(|f| Some((f[2].parse::<u32>().ok()?, f[3].parse::<u32>().ok()?)))
        })
    };
    let (uid, primary) = match user.parse::<u32>() {
        Ok(n) => (
            n,
            passwd.and_then(|p| {
                p.lines()
                    .map(|l| l.split(':').collect::<Vec<_>>())
                    .find(|f| f.len() >= 4 && f[2] == user)
                    .and_then(|f| f[3].parse::<u32>().ok())
            }),
        ),
        Err(_) => {
            let (u, g) = passwd_line(user)
                .ok_or_else(|| format!("the image's USER `{user}` is not in its /etc/passwd"))?;
            (u, Some(g))
        }
    };
    let gid = match grp {
        None | Some("") => primary.unwrap_or(uid),
        Some(g) => match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => group
                .and_then(|gr| {
                    gr.lines()
                        .map(|l| l.split(':').collect::<Vec<_>>())
                        .find(|f| f.len() >= 3 && f[0] == g)
                        .and_then(|f| f[2].parse::<u32>().ok())
                })
                .ok_or_else(|| format!("the image's USER group `{g}` is not in its /etc/group"))?,
        },
    };
    Ok((uid, gid))
}
