#!/usr/bin/env bash
# The peers `causeway benchmark dataplane` compares against that apt does not have:
# boringtun-cli (Cloudflare's userspace WireGuard), built from crates.io into /usr/local/bin.
# wireguard-go comes from apt (scripts/install-deps.sh). Not needed by the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
source scripts/env.sh
if command -v boringtun-cli >/dev/null; then
    echo "boringtun-cli is installed: $(command -v boringtun-cli)" >&2
    exit 0
fi
echo "==> cargo install boringtun-cli (a few minutes)" >&2
cargo install --locked --root /usr/local boringtun-cli
command -v boringtun-cli
