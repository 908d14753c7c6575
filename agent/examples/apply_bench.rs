//! How long the agent takes to apply a first sync's tar stream, with the folder of the last
//! put kept for the next put (what `apply_tar` does) against resolving every parent afresh
//! (what it did before: one `Root::put_with` per file). Interleaved rounds into a scratch
//! folder, on tmpfs by default so that the disk does not drown the difference.
//!
//! ```sh
//! cargo run --release -p devloop-agent --example apply_bench -- [DIR] [ROUNDS]
//! ```

use std::io::{self, Read};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use devloop_agent::apply::Root;
use devloop_agent::tarstream::apply_tar;
use devloop_proxy::RelPath;

const FOLDERS: usize = 100;
const PER_FOLDER: usize = 20;
const FILE_BYTES: usize = 20 * 1024;

fn archive() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let data = vec![b'x'; FILE_BYTES];
    for d in 0..FOLDERS {
        for f in 0..PER_FOLDER {
            let mut h = tar::Header::new_gnu();
            h.set_size(FILE_BYTES as u64);
            h.set_mode(0o644);
            h.set_entry_type(tar::EntryType::Regular);
            b.append_data(&mut h, format!("src/d{d}/f{f}.txt"), &data[..])
                .unwrap();
        }
    }
    b.into_inner().unwrap()
}

/// The earlier way: every file's parent resolved on its own.
fn apply_fresh(root: &Root, bytes: &[u8]) -> io::Result<()> {
    let mut a = tar::Archive::new(bytes);
    for entry in a.entries()? {
        let mut entry = entry?;
        let path = RelPath::new(entry.path()?.to_string_lossy().into_owned()).unwrap();
        let mode = entry.header().mode()?;
        root.put_with(&path, mode, |f| io::copy(&mut entry, f).map(|_| ()))
            .map_err(io::Error::other)?;
    }
    Ok(())
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(
        args.next()
            .unwrap_or_else(|| "/dev/shm/devloop-apply-bench".into()),
    );
    let rounds: usize = args.next().map(|r| r.parse().unwrap()).unwrap_or(15);
    let bytes = archive();
    let files = FOLDERS * PER_FOLDER;
    let (mut kept, mut fresh) = (Vec::new(), Vec::new());
    for round in 0..rounds * 2 {
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let root = Root::open(dir.canonicalize().unwrap()).unwrap();
        let t = Instant::now();
        if round % 2 == 0 {
            let n = apply_tar(&root, &bytes[..]).unwrap();
            assert_eq!(n as usize, files);
            kept.push(t.elapsed());
        } else {
            apply_fresh(&root, &bytes[..]).unwrap();
            fresh.push(t.elapsed());
        }
        let mut check = Vec::new();
        std::fs::File::open(dir.join("src/d7/f3.txt"))
            .unwrap()
            .read_to_end(&mut check)
            .unwrap();
        assert_eq!(check.len(), FILE_BYTES);
    }
    let _ = std::fs::remove_dir_all(&dir);
    let (k, f) = (median(kept), median(fresh));
    println!(
        "{files} files of {} KiB into {}, median of {rounds} interleaved rounds each:",
        FILE_BYTES / 1024,
        dir.display()
    );
    println!(
        "  parent kept (apply_tar):      {:>8.1} ms",
        k.as_secs_f64() * 1e3
    );
    println!(
        "  parent resolved per file:     {:>8.1} ms",
        f.as_secs_f64() * 1e3
    );
    println!(
        "  kept / per file:              {:>8.3}",
        k.as_secs_f64() / f.as_secs_f64()
    );
}
