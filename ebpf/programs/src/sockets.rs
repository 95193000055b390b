//! Causeway's socket programs: ClusterSetIPs translated where the application asks for them.
//!
//! Attached to a cgroup (every pod's processes, on each node, by the route agent), they run at
//! `connect()` and `sendmsg()`: a destination that is a ClusterSetIP port is replaced by one of
//! its backends before the kernel routes anything, so no packet to a ClusterSetIP exists, no
//! per-packet translation or flow table is needed, and a connection stays on its backend for
//! its whole life (the socket is the flow state). `recvmsg()` and `getpeername()` put the
//! ClusterSetIP back, so an application sees the address it asked for. Which backends a port
//! has is the route agent's choice (reachable clusters only; the local cluster alone when it
//! has ready backends and that is preferred), rewritten whole when health changes: new
//! connections follow at once, established ones are untouched.
//!
//! The backend is chosen from the socket's cookie: every datagram of one unconnected UDP
//! socket goes to the same backend while the backend list stays the same.
#![no_std]
#![no_main]

use aya_ebpf::{
    helpers::bpf_get_socket_cookie,
    macros::{cgroup_sock_addr, map},
    maps::{HashMap, LruHashMap, PerCpuArray},
    programs::SockAddrContext,
};
use causeway_datapath_common::{
    MAX_SERVICE_BACKENDS, MAX_SERVICE_PORTS, MAX_SERVICE_REVERSE, ReverseKey, ServiceAddr, ServiceBackends,
    ServiceKey, ServiceStat,
};

#[map]
static SERVICES_V4: HashMap<ServiceKey, ServiceBackends> = HashMap::with_max_entries(MAX_SERVICE_PORTS, 0);

#[map]
static SERVICE_REVERSE_V4: LruHashMap<ReverseKey, ServiceAddr> =
    LruHashMap::with_max_entries(MAX_SERVICE_REVERSE, 0);

#[map]
static SERVICE_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(ServiceStat::ALL.len() as u32, 0);

/// Let the call go on (1); 0 makes it fail with EPERM.
const PASS: i32 = 1;
const REFUSE: i32 = 0;

#[inline(always)]
fn bump(stat: ServiceStat) {
    if let Some(p) = SERVICE_STATS.get_ptr_mut(stat as u32) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *p += 1 };
    }
}

/// Replaces a ClusterSetIP destination with a backend; remembers it for the way back.
#[inline(always)]
fn translate(ctx: &SockAddrContext) -> i32 {
    // SAFETY: the kernel hands a valid bpf_sock_addr to cgroup/sock_addr programs.
    let sa = unsafe { &mut *ctx.sock_addr };
    let proto = sa.protocol;
    if proto != 6 && proto != 17 {
        return PASS;
    }
    #[expect(clippy::cast_possible_truncation, reason = "user_port holds a 16-bit port in network order")]
    let key = ServiceKey { addr: sa.user_ip4, port: sa.user_port as u16, proto: proto as u8, pad: 0 };
    // SAFETY: a plain lookup; the value is not kept past this call.
    let Some(svc) = (unsafe { SERVICES_V4.get(&key) }) else { return PASS };
    let count = u64::from(svc.count);
    if count == 0 {
        bump(ServiceStat::NoBackend);
        return REFUSE;
    }
    // SAFETY: the helper takes the context it was given.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    // Userspace writes count ≤ 32 (a power of two), so the mask changes nothing; it is what
    // bounds the index for the verifier, which does not follow the remainder. (Checking
    // count ≤ 32 here would let the compiler drop the mask.)
    let i = (cookie % count) as usize & (MAX_SERVICE_BACKENDS - 1);
    let b = &svc.backends[i];
    let original = ServiceAddr { addr: sa.user_ip4, port: key.port, pad: 0 };
    let backend = ServiceAddr { addr: b.addr, port: b.port, pad: 0 };
    let _ = SERVICE_REVERSE_V4.insert(&ReverseKey { cookie, backend }, &original, 0);
    sa.user_ip4 = b.addr;
    sa.user_port = u32::from(b.port);
    bump(ServiceStat::Translated);
    PASS
}

/// Gives the ClusterSetIP back as the peer of a socket whose destination was translated.
#[inline(always)]
fn reverse(ctx: &SockAddrContext) -> i32 {
    // SAFETY: as in `translate`.
    let sa = unsafe { &mut *ctx.sock_addr };
    // SAFETY: the helper takes the context it was given.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    #[expect(clippy::cast_possible_truncation, reason = "user_port holds a 16-bit port in network order")]
    let key =
        ReverseKey { cookie, backend: ServiceAddr { addr: sa.user_ip4, port: sa.user_port as u16, pad: 0 } };
    // SAFETY: a plain lookup; the value is copied out at once.
    if let Some(orig) = unsafe { SERVICE_REVERSE_V4.get(&key) } {
        sa.user_ip4 = orig.addr;
        sa.user_port = u32::from(orig.port);
        bump(ServiceStat::Reversed);
    }
    PASS
}

#[cgroup_sock_addr(connect4)]
pub fn service_connect4(ctx: SockAddrContext) -> i32 {
    translate(&ctx)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn service_sendmsg4(ctx: SockAddrContext) -> i32 {
    translate(&ctx)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn service_recvmsg4(ctx: SockAddrContext) -> i32 {
    reverse(&ctx)
}

#[cgroup_sock_addr(getpeername4)]
pub fn service_getpeername4(ctx: SockAddrContext) -> i32 {
    reverse(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
