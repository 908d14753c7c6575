#!/usr/bin/env bash
# Builds the static agent (glibc, static-pie; no musl target is needed) into
# target/x86_64-unknown-linux-gnu/release/devloop-agent, where the cli looks for it.
# The explicit --target keeps build scripts and proc-macros dynamic, as they must be.
set -euo pipefail
cd "$(dirname "$0")/.."
RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --target x86_64-unknown-linux-gnu -p devloop-agent "$@"
bin=target/x86_64-unknown-linux-gnu/release/devloop-agent
if ldd "$bin" 2>&1 | grep -Eq 'statically linked|not a dynamic executable'; then
  echo "static agent: $bin ($(du -h "$bin" | cut -f1))" >&2
else
  echo "error: $bin is not static:" >&2
  ldd "$bin" >&2
  exit 1
fi
