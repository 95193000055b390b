#!/usr/bin/env bash
# README command 2: the whole test suite. Installs what is missing, checks formatting and
# lints, runs the unit tier, then the privileged tier (real namespaces, CNI plugins, broker
# and gateway processes), then the attack benchmark's bar. Needs root; privileged tests are
# enabled here on purpose.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "run as root: the privileged tier builds network namespaces" >&2; exit 1; }
start=$SECONDS

bash scripts/install-deps.sh
# shellcheck disable=SC1091
source scripts/env.sh

# Disk: the suite links ~40 test binaries against the whole dependency tree. With full debug
# info and incremental state that came to ~10 GB of target/, and a CI machine with less free
# disk killed the linker mid-write (SIGBUS). Line tables keep panics' backtraces readable at a
# fraction of the size; incremental state only pays off on rebuilds, which CI never does.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
export CARGO_PROFILE_DEV_DEBUG="${CARGO_PROFILE_DEV_DEBUG:-line-tables-only}"
export CARGO_PROFILE_TEST_DEBUG="${CARGO_PROFILE_TEST_DEBUG:-line-tables-only}"
report_disk() { echo "==> disk: $(df -h --output=avail,target . | tail -1 | awk '{print $1" free on "$2}'), target/ $(du -sh target 2>/dev/null | cut -f1 || echo 0)" >&2; }
report_disk
# A full run leaves ~5 GB in target/ (4.6 GB measured on a fresh clone): say so up front
# rather than let a linker die mid-write later.
avail_kb=$(df -Pk . | awk 'NR == 2 {print $4}')
if [ "${avail_kb:-0}" -lt $((6 * 1024 * 1024)) ]; then
    echo "==> warning: only $((avail_kb / 1024)) MiB free here; the suite needs ~5 GiB for target/" >&2
fi

echo "==> cargo fmt --check" >&2
cargo fmt --all -- --check
echo "==> cargo clippy -D warnings" >&2
cargo clippy --locked --all-targets -- -D warnings
cargo clippy --locked -p causeway-gateway-timer-tests --all-targets -- -D warnings
# The operator build: no sandbox, no benchmarks, no test harness linked.
cargo clippy --locked -p causeway --no-default-features -- -D warnings
if linked=$(cargo tree --locked -p causeway --no-default-features -e normal,build --prefix none \
    | grep -E '^(causeway-lab|causeway-netns|tower-test) '); then
    echo "the operator build links test or lab code:" >&2
    echo "$linked" >&2
    exit 1
fi
echo "==> building causeway" >&2
cargo build --locked -p causeway
export CAUSEWAY_BIN="$PWD/target/debug/causeway"

# The privileged tier needs the machine's sandbox names free.
if "$CAUSEWAY_BIN" sandbox status | grep -q '^broker:'; then
    echo "==> taking the demo sandbox down first (the tests need its names free)" >&2
    "$CAUSEWAY_BIN" sandbox down
fi

# Tests that need root are `#[ignore]`d (a plain `cargo test` reports them as skipped); this
# script runs as root and asks for them, so every tier runs in full, in CI or not.
if command -v cargo-nextest >/dev/null; then
    run_tests() { cargo nextest run --locked --no-fail-fast --run-ignored all "$@"; }
else
    echo "==> cargo-nextest not found: using cargo test" >&2
    run_tests() {
        [ "${1:-}" = --profile ] && shift 2  # a nextest profile; cargo test has none
        cargo test --locked --no-fail-fast "$@" -- --include-ignored
    }
fi
echo "==> unit tier" >&2
# `--workspace` would include ebpf/programs, which only builds for bpfel-unknown-none.
run_tests --workspace --exclude causeway-netns --exclude causeway-datapath-ebpf \
    --exclude causeway-gateway-timer-tests
echo "==> WireGuard timer tier (mocked clock, its own build)" >&2
run_tests -p causeway-gateway-timer-tests
report_disk
echo "==> privileged tier (network namespaces; .config/nextest.toml sets its parallelism)" >&2
run_tests --profile privileged -p causeway-netns
report_disk
# The trust issue's bar, a figure and not a test: it runs alone, after everything else, so
# nothing but the attacker shares the two cores with the stream (docs/security.md).
echo "==> attack benchmark: a flooded gateway keeps >= 80 % of its stream's rate" >&2
"$CAUSEWAY_BIN" benchmark attack --min-ratio 0.8
echo "==> all tests passed in $((SECONDS - start)) s" >&2
