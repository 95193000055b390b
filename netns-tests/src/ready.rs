//! Readiness, not sleeps: wait for the thing a test step needs (a listener, a running
//! capture) with a deadline, and fail saying what never became ready. A test that sleeps
//! instead can pass for the wrong reason: a "refused" transfer whose sink was not listening
//! yet looks the same as one the policy dropped.

use std::{path::Path, time::Duration};

use crate::{exec, topology::wait_for};

/// How long a local process may take to bind or to start capturing.
const DEADLINE: Duration = Duration::from_secs(10);

/// The transport of a listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
}

/// Whether a socket in `ns` listens on (TCP) or is bound to (UDP) exactly `addr` (`ip:port`).
pub fn listening(ns: &str, addr: &str, proto: Proto) -> bool {
    let flags = match proto {
        Proto::Tcp => "-Hltn",
        Proto::Udp => "-Hlun",
    };
    exec::in_ns(ns, &["ss", flags]).is_ok_and(|out| {
        String::from_utf8_lossy(&out.stdout).lines().any(|l| l.split_whitespace().any(|field| field == addr))
    })
}

/// Waits until something in `ns` listens on `addr`.
pub fn wait_listening(ns: &str, addr: &str, proto: Proto) -> anyhow::Result<()> {
    wait_for(DEADLINE, &format!("a {proto:?} listener on {addr} in {ns}"), || listening(ns, addr, proto))
}

/// Waits until a `tcpdump -w file` is capturing: it writes the savefile's 24-byte header only
/// once the capture is active, so a packet sent after this is seen.
pub fn wait_capturing(file: &Path) -> anyhow::Result<()> {
    wait_for(DEADLINE, &format!("tcpdump to start writing {}", file.display()), || {
        std::fs::metadata(file).is_ok_and(|m| m.len() >= 24)
    })
}
