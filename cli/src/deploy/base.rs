//! The base of a service's snapshot: its image minus its synced tree. With a Dockerfile,
//! that is the Dockerfile without the instruction that copies the synced folder in; every
//! instruction after it must only set metadata (ENV, CMD, EXPOSE...), because a snapshot
//! adds its layer on top of the base and cannot replay a RUN that needed the files.

/// Instructions that change the image's config but not its files.
const METADATA_ONLY: &[&str] = &[
    "ENV",
    "CMD",
    "ENTRYPOINT",
    "EXPOSE",
    "LABEL",
    "USER",
    "WORKDIR",
    "HEALTHCHECK",
    "STOPSIGNAL",
    "ARG",
    "VOLUME",
    "SHELL",
    "MAINTAINER",
    "ONBUILD",
];

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BaseError {
    #[error("the Dockerfile has no FROM")]
    NoFrom,
    #[error("no COPY or ADD in the Dockerfile's last stage puts files into {0}; a snapshot replaces that folder, so the Dockerfile must copy it (e.g. `COPY . {0}`)")]
    NoSyncCopy(String),
    #[error("line {line}: `{instruction}` comes after the COPY of the synced folder and changes files; move it before that COPY so the snapshot can be layered on top")]
    FilesystemStepAfterCopy { line: usize, instruction: String },
}

/// One logical instruction (continuations joined), with its first line number.
#[derive(Debug)]
struct Instruction {
    line: usize,
    keyword: String,
    args: String,
    text: String,
}

impl Instruction {
    /// `text` as written (continuation lines included) starting at line `line`.
    fn new(line: usize, text: String) -> Self {
        let joined = text.replace("\\\n", " ");
        let mut parts = joined.trim().splitn(2, char::is_whitespace);
        let keyword = parts.next().unwrap_or_default().to_uppercase();
        let args = parts.next().unwrap_or_default().trim().to_string();
        Instruction {
            line,
            keyword,
            args,
            text,
        }
    }
}

fn instructions(dockerfile: &str) -> Vec<Instruction> {
    let mut out = Vec::new();
    let mut pending: Option<(usize, String)> = None;
    for (i, raw) in dockerfile.lines().enumerate() {
        let trimmed = raw.trim();
        if pending.is_none() && (trimmed.is_empty() || trimmed.starts_with('#')) {
            continue;
        }
        let (start, mut text) = pending.take().unwrap_or((i + 1, String::new()));
        if raw.trim_end().ends_with('\\') {
            text.push_str(raw.trim_end());
            text.push('\n');
            pending = Some((start, text));
            continue;
        }
        text.push_str(raw);
        out.push(Instruction::new(start, text));
    }
    // A continuation on the last line: the instruction ends with the file.
    if let Some((start, text)) = pending {
        out.push(Instruction::new(start, text));
    }
    out
}

/// The destination of a COPY/ADD, resolved against the current WORKDIR.
fn destination(args: &str, workdir: &str) -> Option<String> {
    let dest = if args.trim_start().starts_with('[') {
        let v: Vec<String> = serde_json::from_str(args.trim()).ok()?;
        v.last()?.clone()
    } else {
        args.split_whitespace()
            .rfind(|w| !w.starts_with("--"))?
            .to_string()
    };
    Some(resolve(workdir, &dest))
}

fn resolve(workdir: &str, path: &str) -> String {
    let joined = if path.starts_with('/') {
        path.to_string()
    } else {
        format!("{}/{}", workdir.trim_end_matches('/'), path)
    };
    let mut parts: Vec<&str> = Vec::new();
    for c in joined.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    format!("/{}", parts.join("/"))
}

/// The Dockerfile of the base: the original without the COPY of `sync_to`.
pub fn derive(dockerfile: &str, sync_to: &str) -> Result<String, BaseError> {
    let all = instructions(dockerfile);
    let last_from = all
        .iter()
        .rposition(|i| i.keyword == "FROM")
        .ok_or(BaseError::NoFrom)?;
    let target = resolve("/", sync_to);
    let mut workdir = "/".to_string();
    let mut copy_at = None;
    for (idx, ins) in all.iter().enumerate().skip(last_from) {
        match ins.keyword.as_str() {
            "WORKDIR" => workdir = resolve(&workdir, ins.args.trim_matches('"')),
            "COPY" | "ADD"
                if !ins.args.contains("--from")
                    && destination(&ins.args, &workdir).as_deref() == Some(target.as_str()) =>
            {
                copy_at = Some(idx);
            }
            _ => {}
        }
    }
    let copy_at = copy_at.ok_or_else(|| BaseError::NoSyncCopy(target.clone()))?;
    for ins in &all[copy_at + 1..] {
        if !METADATA_ONLY.contains(&ins.keyword.as_str()) {
            return Err(BaseError::FilesystemStepAfterCopy {
                line: ins.line,
                instruction: ins.text.trim().to_string(),
            });
        }
    }
    let mut out = String::new();
    for (idx, ins) in all.iter().enumerate() {
        if idx != copy_at {
            out.push_str(&ins.text);
            out.push('\n');
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drops_the_copy_of_the_synced_folder() {
        let df = "FROM python:3.11-slim-bookworm\nWORKDIR /app\nCOPY . /app\nEXPOSE 8000\nENV PYTHONUNBUFFERED=1\nCMD [\"python3\", \"app.py\"]\n";
        let base = derive(df, "/app").unwrap();
        assert!(!base.contains("COPY"), "{base}");
        assert!(
            base.contains("WORKDIR /app") && base.contains("CMD [\"python3\", \"app.py\"]"),
            "{base}"
        );
    }

    #[test]
    fn relative_destinations_and_continuations() {
        let df = "FROM x AS build\nRUN make\nFROM debian\nWORKDIR /srv\nCOPY --from=build /out /bin/\nRUN apt-get install \\\n  -y curl\nCOPY --chown=1:1 . .\nUSER 1\n";
        let base = derive(df, "/srv").unwrap();
        assert!(base.contains("COPY --from=build"), "{base}");
        assert!(!base.contains("COPY --chown"), "{base}");
        assert!(base.contains("apt-get install \\\n  -y curl"), "{base}");
    }

    #[test]
    fn a_run_after_the_copy_is_refused_with_its_line() {
        let df = "FROM x\nWORKDIR /app\nCOPY . .\nRUN pip install -r requirements.txt\n";
        assert_eq!(
            derive(df, "/app"),
            Err(BaseError::FilesystemStepAfterCopy {
                line: 4,
                instruction: "RUN pip install -r requirements.txt".into()
            })
        );
    }

    #[test]
    fn no_copy_of_the_folder() {
        assert_eq!(
            derive("FROM x\nCOPY a /elsewhere\n", "/app"),
            Err(BaseError::NoSyncCopy("/app".into()))
        );
        assert_eq!(derive("# nothing\n", "/app"), Err(BaseError::NoFrom));
    }
}
