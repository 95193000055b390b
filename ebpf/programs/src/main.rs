//! Causeway's TC programs on the gateway's tunnel device.
//!
//! The tunnel device is a layer-3 TUN: packets start at the IP header. `tunnel_egress` sees
//! what the gateway sends to remote clusters, `tunnel_ingress` what it received from them
//! (already decrypted). Both first check the cluster-set policy (IPv4: two LPM lookups give the
//! source and destination classes, then at most three hash lookups give the verdict — the cost
//! does not grow with the number of rules; replies of allowed flows pass), then look the
//! remote address up in the remote-prefix tries and count packets and bytes per remote
//! cluster, and clamp the MSS of SYNs.
//!
//! `cluster_redirect` sits on the gateway's cluster-facing interfaces (TC ingress, Ethernet):
//! a packet for a remote cluster's prefix is handed straight to that prefix's tunnel device
//! (`bpf_redirect`), past the kernel's forwarding path (route lookup, netfilter, conntrack),
//! with its TTL lowered as a router would; the tunnel device's egress program then applies the
//! policy and counts it as it does for routed packets. Whatever it cannot do exactly as the
//! stack would (TTL expiring, larger than the tunnel MTU, not plain IPv4/IPv6) it leaves to
//! the stack.
//!
//! `uplink_guard` (XDP, or `uplink_guard_tc` at TC ingress where XDP costs more than it saves)
//! lets only well-formed WireGuard messages from known peers, and rate-limited handshakes,
//! reach the WireGuard port.
//!
//! No logging on the fast path: only the rare "no remote prefix matched" event is logged
//! (aya-log), and counted.
//!
//! In overlap mode `translate` rewrites the local cluster's real prefixes to their global ones
//! (and back) on the tunnel device, statelessly, before the policy on the way out and after
//! it on the way in.
//!
//! One program family per module: `guard`, `tunnel`, `redirect`, `policy`, `translate`; the maps they
//! share in `maps`, frame access in `frame`.
#![no_std]
#![no_main]

mod frame;
mod guard;
mod maps;
mod policy;
mod redirect;
mod translate;
mod tunnel;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
