#!/usr/bin/env bash
# The data-plane benchmark outside CI, in one command: installs what is missing (the build
# dependencies and boringtun-cli), builds the release binary, measures raw veth, Causeway,
# wireguard-go and boringtun-cli on the same topology, and writes the table, the JSON and the
# plot. Needs root. Takes ~15 minutes with the defaults.
#
#   scripts/bench-dataplane.sh [OUT_DIR] [ROUNDS] [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "run as root (the benchmark creates network namespaces)" >&2; exit 1; }
out=${1:-bench-out}
rounds=${2:-3}
seconds=${3:-3}
mkdir -p "$out"
bash scripts/install-deps.sh
bash scripts/install-bench-peers.sh || echo "==> boringtun-cli unavailable: that column is skipped" >&2
# shellcheck disable=SC1091
source scripts/env.sh
echo "==> building causeway (release)" >&2
cargo build --locked --release -p causeway
bin=./target/release/causeway
"$bin" benchmark dataplane --rounds "$rounds" --seconds "$seconds" --output json >"$out/dataplane.json"
"$bin" benchmark dataplane --from-json "$out/dataplane.json" --plot "$out/dataplane.svg" | tee "$out/dataplane.txt"
echo "==> $out/dataplane.{json,txt,svg}" >&2
