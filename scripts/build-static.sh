#!/usr/bin/env bash
# Builds one package of the workspace as a static binary (glibc, static-pie; no musl target
# is needed) into target/x86_64-unknown-linux-gnu/release/PACKAGE, and checks that it is
# static. The explicit --target keeps build scripts and proc-macros dynamic, as they must be.
#   scripts/build-static.sh devloop-agent [cargo args...]
set -euo pipefail
cd "$(dirname "$0")/.."
pkg="$1"; shift
RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --target x86_64-unknown-linux-gnu -p "$pkg" "$@"
bin=target/x86_64-unknown-linux-gnu/release/$pkg
if ldd "$bin" 2>&1 | grep -Eq 'statically linked|not a dynamic executable'; then
  echo "static $pkg: $bin ($(du -h "$bin" | cut -f1))" >&2
else
  echo "error: $bin is not static:" >&2
  ldd "$bin" >&2
  exit 1
fi
