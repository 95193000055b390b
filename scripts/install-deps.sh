#!/usr/bin/env bash
# Installs everything Causeway needs on a fresh Debian 12 machine (run as root):
# apt packages for the netns harness, the eBPF compiler (pinned nightly + rust-src, or the
# Debian fallback when rustup downloads fail) and bpf-linker built for the same LLVM major.
# Idempotent: a second run only checks. Prints `export` lines for the build to a file that
# scripts/env.sh sources.
set -euo pipefail
cd "$(dirname "$0")/.."

EBPF_NIGHTLY=${EBPF_NIGHTLY:-nightly-2026-05-20}   # rustc 1.97.0-nightly, LLVM 22
BPF_LINKER_VERSION=${BPF_LINKER_VERSION:-0.13.0}
CARGO_HOME=${CARGO_HOME:-$HOME/.cargo}
ENV_FILE=${CAUSEWAY_ENV_FILE:-$CARGO_HOME/causeway-ebpf.env}
export PATH="$CARGO_HOME/bin:$PATH"
export DEBIAN_FRONTEND=noninteractive

step() { echo "==> $*" >&2; }

APT_PKGS=(iproute2 iputils-ping iperf3 tcpdump nftables conntrack bpftool dnsutils curl
    containernetworking-plugins wireguard-tools wireguard-go
    etcd-server protobuf-compiler libprotobuf-dev pkg-config)
missing=()
for p in "${APT_PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
apt_updated=0
apt_install() {
    if [ "$apt_updated" = 0 ]; then apt-get update -q >&2; apt_updated=1; fi
    apt-get install -y -q --no-install-recommends "$@" >&2
}
if [ "${#missing[@]}" -gt 0 ]; then
    step "apt: installing ${missing[*]}"
    apt_install "${missing[@]}"
fi

# eBPF compiler. Primary: the pinned nightly + rust-src (aya-build adds -Z build-std=core).
# Fallback: Debian's rustc-web (LLVM 22) with a prebuilt `core` for bpfel, exposed to rustup
# under the name debian-rust; RUSTC_BOOTSTRAP is scoped to the one crate that needs it.
bootstrap=""
if [ "${FORCE_DEBIAN_FALLBACK:-0}" != 1 ] && {
    rustup run "$EBPF_NIGHTLY" rustc --print sysroot >/dev/null 2>&1 &&
        [ -d "$(rustup run "$EBPF_NIGHTLY" rustc --print sysroot)/lib/rustlib/src/rust/library" ] ||
        timeout 600 rustup toolchain install "$EBPF_NIGHTLY" --profile minimal \
            --component rust-src --no-self-update >&2
}; then
    toolchain=$EBPF_NIGHTLY
else
    step "rustup download unavailable: using Debian rustc-web for the eBPF crate"
    apt_install rustc-web cargo-web libstd-rust-web-dev-bpf
    rustup toolchain list | grep -q '^debian-rust' || rustup toolchain link debian-rust /usr
    toolchain=debian-rust
    bootstrap=aya_ebpf
fi

# bpf-linker must use the LLVM major of the eBPF rustc ("Invalid record" otherwise).
llvm_major=$(rustup run "$toolchain" rustc -vV | sed -n 's/^LLVM version: \([0-9]*\)\..*/\1/p')
dpkg-query -W -f='${Status}' "llvm-$llvm_major-dev" 2>/dev/null | grep -q "ok installed" ||
    { step "apt: installing llvm-$llvm_major-dev"; apt_install "llvm-$llvm_major-dev"; }
linker_root="$CARGO_HOME/bpf-linker-llvm$llvm_major"
if ! "$linker_root/bin/bpf-linker" --version 2>/dev/null | grep -qx "bpf-linker $BPF_LINKER_VERSION"; then
    step "building bpf-linker $BPF_LINKER_VERSION for LLVM $llvm_major (about 90 s)"
    LLVM_PREFIX="/usr/lib/llvm-$llvm_major" cargo install --locked --root "$linker_root" \
        "bpf-linker@$BPF_LINKER_VERSION" --no-default-features --features "llvm-$llvm_major" >&2
fi

{
    echo "export CAUSEWAY_EBPF_TOOLCHAIN=$toolchain"
    echo "export PATH=\"$linker_root/bin:\$PATH\""
    if [ -n "$bootstrap" ]; then echo "export RUSTC_BOOTSTRAP=$bootstrap"; fi
} >"$ENV_FILE"
step "eBPF toolchain: $toolchain (LLVM $llvm_major), bpf-linker in $linker_root/bin; env in $ENV_FILE"
