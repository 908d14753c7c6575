#!/usr/bin/env bash
# Builds the benchmarks' static HTTP server and load generator into
# target/x86_64-unknown-linux-gnu/release/devloop-loadgen (it runs in FROM-scratch images).
exec "$(dirname "$0")/build-static.sh" devloop-loadgen "$@"
