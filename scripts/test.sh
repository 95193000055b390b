#!/usr/bin/env bash
# README command 2: the whole test suite. Installs what is missing, checks formatting and
# lints, runs the unit tier, then the privileged tier (real namespaces, CNI plugins, broker
# and gateway processes). Needs root; privileged tests are enabled here on purpose.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "run as root: the privileged tier builds network namespaces" >&2; exit 1; }
start=$SECONDS

bash scripts/install-deps.sh
# shellcheck disable=SC1091
source scripts/env.sh

echo "==> cargo fmt --check" >&2
cargo fmt --all -- --check
echo "==> cargo clippy -D warnings" >&2
cargo clippy --locked --all-targets -- -D warnings
cargo clippy --locked -p causeway-gateway-timer-tests --all-targets -- -D warnings
echo "==> building causeway" >&2
cargo build --locked -p causeway
export CAUSEWAY_BIN="$PWD/target/debug/causeway"

# The privileged tier needs the machine's sandbox names free.
if "$CAUSEWAY_BIN" sandbox status | grep -q '^broker:'; then
    echo "==> taking the demo sandbox down first (the tests need its names free)" >&2
    "$CAUSEWAY_BIN" sandbox down
fi

if command -v cargo-nextest >/dev/null; then
    run_tests() { cargo nextest run --locked --no-fail-fast "$@"; }
else
    echo "==> cargo-nextest not found: using cargo test" >&2
    run_tests() { cargo test --locked --no-fail-fast "$@"; }
fi
echo "==> unit tier" >&2
# `--workspace` would include ebpf/programs, which only builds for bpfel-unknown-none.
run_tests --workspace --exclude causeway-netns --exclude causeway-datapath-ebpf \
    --exclude causeway-gateway-timer-tests
echo "==> WireGuard timer tier (mocked clock, its own build)" >&2
run_tests -p causeway-gateway-timer-tests
echo "==> privileged tier (network namespaces)" >&2
CAUSEWAY_PRIVILEGED_TESTS=1 run_tests -p causeway-netns
echo "==> all tests passed in $((SECONDS - start)) s" >&2
