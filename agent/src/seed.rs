//! Kubernetes dev pods start from two init containers, both this binary: `install` copies
//! the agent into an emptyDir the service's container runs it from (the agent image is
//! `FROM scratch`, with no `cp`), and `copy-tree`, run in the service's own image, copies the
//! image's sync folder into the emptyDir that becomes the sync root, so the service starts
//! on the image's files and the first reconcile sends only what differs on the laptop.

use std::io;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;

/// Copies the running binary to `dest` (mode 0755), through a temporary name.
pub fn install(dest: &Path) -> io::Result<()> {
    let me = std::env::current_exe()?;
    if let Some(dir) = dest.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = dest.with_extension("tmp");
    std::fs::copy(&me, &tmp)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))?;
    std::fs::rename(&tmp, dest)
}

/// Copies the content of `from` into `to`: folders, files and symlinks (not followed),
/// with their modes. A missing `from` copies nothing. Returns the number of entries copied.
pub fn copy_tree(from: &Path, to: &Path) -> io::Result<u64> {
    std::fs::create_dir_all(to)?;
    let meta = match std::fs::symlink_metadata(from) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    if !meta.is_dir() {
        return Err(io::Error::other(format!(
            "{} is not a folder",
            from.display()
        )));
    }
    let mut n = 0;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let src = entry.path();
        let dst = to.join(entry.file_name());
        let meta = std::fs::symlink_metadata(&src)?;
        let kind = meta.file_type();
        if kind.is_symlink() {
            symlink(std::fs::read_link(&src)?, &dst)?;
        } else if kind.is_dir() {
            n += copy_tree(&src, &dst)?;
            std::fs::set_permissions(
                &dst,
                std::fs::Permissions::from_mode(meta.permissions().mode() & 0o7777),
            )?;
        } else if kind.is_file() {
            std::fs::copy(&src, &dst)?;
        } else {
            // Sockets, fifos, devices: nothing a sync root holds.
            continue;
        }
        n += 1;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_files_folders_symlinks_and_modes() {
        let src = tempfile::tempdir().unwrap();
        let dst = tempfile::tempdir().unwrap();
        std::fs::create_dir(src.path().join("lib")).unwrap();
        std::fs::write(src.path().join("lib/a.py"), "a").unwrap();
        std::fs::write(src.path().join("run.sh"), "#!/bin/sh").unwrap();
        std::fs::set_permissions(
            src.path().join("run.sh"),
            std::fs::Permissions::from_mode(0o750),
        )
        .unwrap();
        symlink("lib/a.py", src.path().join("link")).unwrap();
        let n = copy_tree(src.path(), &dst.path().join("root")).unwrap();
        assert_eq!(n, 4);
        let root = dst.path().join("root");
        assert_eq!(std::fs::read_to_string(root.join("lib/a.py")).unwrap(), "a");
        assert_eq!(
            std::fs::metadata(root.join("run.sh"))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o750
        );
        assert_eq!(
            std::fs::read_link(root.join("link")).unwrap(),
            Path::new("lib/a.py")
        );
        assert_eq!(
            copy_tree(&src.path().join("missing"), &dst.path().join("x")).unwrap(),
            0
        );
    }
}
