#!/usr/bin/env bash
# Makes sure a Docker engine answers: starts the local one if it is installed but stopped.
# Exits non-zero, saying why, when no engine can be reached.
set -euo pipefail
if docker info >/dev/null 2>&1; then
  exit 0
fi
if [ -n "${DOCKER_HOST:-}" ]; then
  echo "error: the Docker engine at DOCKER_HOST=$DOCKER_HOST does not answer (docker info failed)" >&2
  exit 1
fi
echo "Docker engine not running; starting it" >&2
if [ -x /etc/init.d/docker ]; then
  /etc/init.d/docker start >&2 || true
elif command -v systemctl >/dev/null 2>&1; then
  systemctl start docker >&2 || true
elif command -v dockerd >/dev/null 2>&1; then
  (dockerd >/var/log/dockerd.log 2>&1 &)
fi
for _ in $(seq 1 60); do
  if docker info >/dev/null 2>&1; then
    echo "Docker engine is up" >&2
    exit 0
  fi
  sleep 1
done
echo "error: cannot reach or start a Docker engine; install Docker, start it, or set DOCKER_HOST" >&2
exit 1
