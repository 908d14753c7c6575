#!/usr/bin/env bash
# The main job: the example system (examples/shop) in dev mode, serving on
# http://127.0.0.1:8080, with every save under examples/shop/{api,web} synced into the
# running containers. Ctrl-C stops syncing; `devloop down` (in examples/shop) removes it all.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v debootstrap >/dev/null 2>&1 || {
  echo "installing debootstrap (for the offline base image, if no registry answers)" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >&2
}
scripts/ensure-docker.sh
scripts/build-agent.sh
cargo build -p devloop
cd examples/shop
exec ../../target/debug/devloop up "$@"
