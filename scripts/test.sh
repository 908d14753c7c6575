#!/usr/bin/env bash
# The test command: installs what the tests need, builds the static agent and the cli, and
# runs every test. Tests that need Docker fail (never skip) when no engine answers.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v debootstrap >/dev/null 2>&1 || need+=(debootstrap)
command -v docker >/dev/null 2>&1 || need+=(docker.io)
# Real HTTP clients for the agent's HTTP engine tests: curl (HTTP/1.1) and nghttp (h2c).
command -v curl >/dev/null 2>&1 || need+=(curl)
command -v nghttp >/dev/null 2>&1 || need+=(nghttp2-client)
# Network namespaces and nftables for the agent's redirect test.
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v nft >/dev/null 2>&1 || need+=(nftables)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing ${need[*]}" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >&2
fi
scripts/ensure-docker.sh
# A real gRPC client and server for the filtered intercept's gRPC test: grpcio from PyPI,
# in a folder of its own that the test mounts into the original's container.
if [ ! -d target/grpc-site/grpc ]; then
  echo "installing grpcio into target/grpc-site" >&2
  python3 -m pip install --quiet --disable-pip-version-check --target target/grpc-site grpcio >&2
fi

# The Kubernetes tests run against KUBECONFIG's cluster, else the single-node cluster that
# ../shared/k8s/cluster.sh builds (once, cached) and starts on this machine. With CI=true a
# cluster that cannot be started fails the run here; elsewhere the Kubernetes tests say that
# they did not run.
if [ -z "${KUBECONFIG:-}" ]; then
  cluster_sh="${DEVLOOP_CLUSTER_SH:-}"
  if [ -z "$cluster_sh" ]; then
    for c in "$PWD/../shared/k8s/cluster.sh" /work/shared/k8s/cluster.sh; do
      if [ -f "$c" ]; then cluster_sh="$c"; break; fi
    done
  fi
  if [ -n "$cluster_sh" ]; then
    echo "test.sh: starting the Kubernetes cluster with $cluster_sh" >&2
    # A cluster stopped without `down` (a machine cut off mid-session) leaves its pod bridge
    # behind, and `up` can then fail on it now and then (its `ip addr show | grep -q` under
    # pipefail loses to SIGPIPE about once in 20 runs here). `down` undoes exactly what `up`
    # made, so one clean retry tells a leftover from a cluster that really cannot start.
    started_cluster=false
    if bash "$cluster_sh" build >&2; then
      for try in 1 2; do
        if bash "$cluster_sh" up >&2; then started_cluster=true; break; fi
        if [ "$try" = 1 ]; then
          echo "test.sh: the cluster did not start; undoing what is left of an earlier one and trying once more" >&2
          bash "$cluster_sh" down >&2 || true
        fi
      done
    fi
    if [ "$started_cluster" != true ]; then
      echo "test.sh: the Kubernetes cluster did not start" >&2
      [ "${CI:-}" = true ] && exit 1
    fi
  elif [ "${CI:-}" = true ]; then
    echo "test.sh: CI=true but there is no Kubernetes cluster: set KUBECONFIG or DEVLOOP_CLUSTER_SH (../shared/k8s/cluster.sh)" >&2
    exit 1
  fi
fi

# Each tier says how long it took, and the run ends with all of them.
timings=()
tier() {
  local name=$1; shift
  local t0; t0=$(date +%s)
  "$@"
  timings+=("$(printf '%-34s %5d s' "$name" $(( $(date +%s) - t0 )))")
  echo "test.sh: $name took $(( $(date +%s) - t0 )) s" >&2
}

# The ecosystem's habits first: formatted by rustfmt, clean under clippy.
tier "format (cargo fmt --check)" cargo fmt --all -- --check
tier "build (agent, cli)" bash -c 'scripts/build-agent.sh && cargo build -p devloop'
tier "lint (cargo clippy -D warnings)" cargo clippy --workspace --all-targets -- -D warnings

# Unit and protocol tiers first (cheap, and they replay the fuzz corpora), then the
# end-to-end tests against the engine with at most two at a time, so they do not fight
# over this machine's two cores.
tier "unit, protocol, in-process" cargo test --workspace --exclude devloop-tests
tier "end to end (Docker, Kubernetes)" cargo test -p devloop-tests --no-fail-fast -- --test-threads=2

echo "test.sh: time per tier" >&2
printf '  %s\n' "${timings[@]}" >&2
