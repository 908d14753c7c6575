//! Writes the seed inputs of the agent's fuzz targets: real tar archives (the kinds the cli
//! sends, and the escapes a hostile peer would try) and API server answers, one file each
//! under `DIR/<target>/seed-*` (DIR defaults to `fuzz/corpus`). Run from the repository root:
//!
//! ```text
//! cargo run -p devloop-agent --example agent_fuzz_seeds -- fuzz/corpus
//! ```

use std::io;
use std::path::{Path, PathBuf};

use devloop_agent::fuzzing::TAR_SCRATCH;

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h
}

/// Builds an archive; `raw` entries get their name written straight into the header, past
/// tar's own checks (for `..` and absolute names).
struct Tar(tar::Builder<Vec<u8>>);

impl Tar {
    fn new() -> Tar {
        Tar(tar::Builder::new(Vec::new()))
    }

    fn ok<T>(r: io::Result<T>) -> T {
        r.unwrap_or_else(|e| panic!("building a seed archive: {e}"))
    }

    fn dir(mut self, name: &str, mode: u32) -> Tar {
        let mut h = header(tar::EntryType::Directory, mode, 0);
        Self::ok(self.0.append_data(&mut h, name, io::empty()));
        self
    }

    fn file(mut self, name: &str, mode: u32, data: &[u8]) -> Tar {
        let mut h = header(tar::EntryType::Regular, mode, data.len() as u64);
        Self::ok(self.0.append_data(&mut h, name, data));
        self
    }

    fn symlink(mut self, name: &str, target: &str) -> Tar {
        let mut h = header(tar::EntryType::Symlink, 0o777, 0);
        Self::ok(self.0.append_link(&mut h, name, target));
        self
    }

    fn hardlink(mut self, name: &str, target: &str) -> Tar {
        let mut h = header(tar::EntryType::Link, 0o644, 0);
        Self::ok(self.0.append_link(&mut h, name, target));
        self
    }

    fn raw(mut self, kind: tar::EntryType, name: &[u8], link: &[u8], data: &[u8]) -> Tar {
        let mut h = header(kind, 0o644, data.len() as u64);
        let old = h.as_old_mut();
        old.name = [0; 100];
        old.name[..name.len()].copy_from_slice(name);
        old.linkname = [0; 100];
        old.linkname[..link.len()].copy_from_slice(link);
        h.set_cksum();
        Self::ok(self.0.append(&h, data));
        self
    }

    fn done(self) -> Vec<u8> {
        Self::ok(self.0.into_inner())
    }
}

fn tar_seeds() -> Vec<Vec<u8>> {
    let canary = format!("{TAR_SCRATCH}/canary");
    let long = format!("{}/file.txt", "deep".repeat(40));
    let mut pax = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_ustar();
    h.set_size(3);
    h.set_mode(0o644);
    Tar::ok(pax.append_pax_extensions([("path", b"pax/named.txt".as_slice())]));
    Tar::ok(pax.append_data(&mut h, "short", &b"pax"[..]));
    let pax = Tar::ok(pax.into_inner());
    vec![
        // What the cli sends: the root, folders, files with modes, a symlink, a fifo.
        Tar::new()
            .dir("./", 0o755)
            .dir("bin", 0o750)
            .file("bin/run.sh", 0o755, b"#!/bin/sh\necho hi\n")
            .file("api/app.py", 0o644, b"print('hi')\n")
            .symlink("run", "bin/run.sh")
            .raw(tar::EntryType::Fifo, b"fifo", b"", b"")
            .done(),
        // A name longer than 100 bytes (a GNU long name entry) and a pax path.
        Tar::new().file(&long, 0o600, b"long").done(),
        pax,
        // Escapes: `..`, absolute, through a symlink pointing out (relative and absolute),
        // a file replacing a symlink, a hard link to outside.
        Tar::new()
            .raw(tar::EntryType::Regular, b"../canary/keep", b"", b"pwned")
            .done(),
        Tar::new()
            .raw(tar::EntryType::Regular, canary.as_bytes(), b"", b"pwned")
            .done(),
        Tar::new()
            .symlink("out", "../canary")
            .file("out/keep", 0o644, b"pwned")
            .done(),
        Tar::new()
            .symlink("abs", &canary)
            .file("abs/new", 0o644, b"pwned")
            .dir("abs/newdir", 0o755)
            .done(),
        Tar::new()
            .symlink("keep", &format!("{canary}/keep"))
            .file("keep", 0o600, b"replaced, not followed")
            .done(),
        Tar::new()
            .hardlink("hl", &format!("{canary}/keep"))
            .file("hl", 0o644, b"pwned")
            .done(),
        // Cut inside an entry.
        {
            let t = Tar::new().file("big", 0o644, &[7; 5000]).done();
            t[..2048].to_vec()
        },
    ]
}

fn lease_seeds() -> Vec<Vec<u8>> {
    [
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n{\"kind\":\"Deployment\"}",
        "HTTP/1.1 422 Unprocessable Entity\r\n\r\n{\"message\":\"test operation failed\"}",
        "HTTP/1.1 403 Forbidden\r\n\r\n{\"message\":\"forbidden\"}",
        "HTTP/1.1 500\r\n",
        "",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect()
}

fn write(dir: &Path, target: &str, seeds: Vec<Vec<u8>>) {
    match devloop_proxy::fuzzing::write_seeds(dir, target, seeds) {
        Ok(n) => println!("{target}: {n} seeds in {}", dir.join(target).display()),
        Err(e) => panic!("{}: {e}", dir.join(target).display()),
    }
}

fn main() {
    let dir = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("fuzz/corpus"));
    write(&dir, "tar_stream", tar_seeds());
    write(&dir, "lease_answer", lease_seeds());
    write(
        &dir,
        "http_detect",
        [
            &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
            b"POST /v2/orders HTTP/1.1\r\n",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x12\x04",
            b"PRI * HTTP/2",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
            b"*1\r\n$4\r\nPING\r\n",
            b"OPTIONS * HTTP/1.1\r\n",
            b"CONNECT db:5432 HTTP/1.1\r\n",
        ]
        .iter()
        .map(|s| s.to_vec())
        .collect(),
    );
}
