#!/usr/bin/env bash
# Builds the static agent into target/x86_64-unknown-linux-gnu/release/devloop-agent, where
# the cli looks for it.
exec "$(dirname "$0")/build-static.sh" devloop-agent "$@"
