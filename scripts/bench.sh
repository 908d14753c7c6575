#!/usr/bin/env bash
# Builds release binaries (the static agent and the cli) and runs devloop's benchmarks against
# the real Docker engine. Arguments go to devloop-bench: --quick, --scenario NAME (repeatable).
#
#   scripts/bench.sh                  # every scenario, full size (about 10 minutes here)
#   scripts/bench.sh --quick          # fewer rounds, smaller trees (< 2 minutes)
#   scripts/bench.sh --scenario latency
#
# Needs: docker, rsync and socat on the host (installed with apt-get if missing) and, for the rsync
# comparison inside containers, rsync's Debian packages (fetched with `apt-get download`
# into target/bench-debs once; the containers themselves need no network).
set -euo pipefail
cd "$(dirname "$0")/.."

# rsync (the initial-sync comparison), socat (the relay the intercept is compared with) and
# nginx (the header-routing proxy the filtered intercept is compared with).
for tool in rsync socat nginx; do
  if ! command -v $tool >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    echo "bench.sh: installing $tool (for the comparison)" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $tool >&2 \
      || { apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $tool >&2; } \
      || echo "bench.sh: warning: could not install $tool; its comparison fails" >&2
  fi
done

debs=target/bench-debs
if [ ! -f "$debs/.complete" ] && command -v apt-get >/dev/null 2>&1; then
  mkdir -p "$debs"
  # rsync plus the one library the base image (python:3.11-slim-bookworm) lacks.
  if (cd "$debs" && apt-get download rsync libpopt0 >&2 2>/dev/null); then
    touch "$debs/.complete"
  else
    echo "bench.sh: warning: apt-get download rsync failed; the rsync comparison is skipped" >&2
  fi
fi
[ -f "$debs/.complete" ] && export DEVLOOP_BENCH_DEBS="$PWD/$debs"

scripts/ensure-docker.sh
if ! docker image inspect python:3.11-slim-bookworm >/dev/null 2>&1; then
  bash images/base/build-base.sh python:3.11-slim-bookworm >&2
fi

scripts/build-agent.sh
scripts/build-loadgen.sh
cargo build --release -p devloop -p devloop-bench
exec target/release/devloop-bench "$@"
