#!/usr/bin/env bash
# README command 1: install what is missing, build, and bring up a 3-cluster sandbox made of
# network namespaces, ending with its pod-to-pod connectivity matrix. Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "run as root (the sandbox creates network namespaces)" >&2; exit 1; }
CLUSTERS=${CLUSTERS:-3}

bash scripts/install-deps.sh
# shellcheck disable=SC1091
source scripts/env.sh
echo "==> building causeway" >&2
cargo build --locked -p causeway
if ./target/debug/causeway sandbox status | grep -q '^broker:'; then
    echo "==> a sandbox is already up: replacing it" >&2
    ./target/debug/causeway sandbox down
fi
./target/debug/causeway sandbox up --clusters "$CLUSTERS"
