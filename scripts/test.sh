#!/usr/bin/env bash
# The test command: installs what the tests need, builds the static agent and the cli, and
# runs every test. Tests that need Docker fail (never skip) when no engine answers.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v debootstrap >/dev/null 2>&1 || need+=(debootstrap)
command -v docker >/dev/null 2>&1 || need+=(docker.io)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing ${need[*]}" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >&2
fi
scripts/ensure-docker.sh

scripts/build-agent.sh
cargo build -p devloop

# Unit and protocol tiers first (cheap), then the end-to-end tests against the engine with
# at most two at a time, so they do not fight over this machine's two cores.
cargo test --workspace --exclude devloop-tests
cargo test -p devloop-tests -- --test-threads=2
