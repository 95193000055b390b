//! The cross-platform WireGuard UAPI on `/var/run/wireguard/<device>.sock`, so that stock
//! tools (`wg show`, `wg showconf`) work on the userspace device.
//!
//! `get=1` is answered from the cable's live state. `set=1` is refused with `errno=-1`
//! (-EPERM, the UAPI sends negative errnos): peers are owned by the reconcile loop, which would undo any manual change on its
//! next pass, so accepting it would only make a lie of `wg show` for a while.
//! The socket is root-only (0600 in a 0700 directory), like the kernel's netlink interface,
//! because a `get` includes the private key, as the protocol requires.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader},
    net::UnixListener,
};
use tracing::{debug, warn};

use super::core::PeerStats;

/// Where stock tools look for the socket of `device`.
#[must_use]
pub fn socket_path(device: &str) -> PathBuf {
    PathBuf::from("/var/run/wireguard").join(format!("{device}.sock"))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The answer to `get=1` (without the final blank line), from a snapshot taken at `now`.
#[must_use]
pub fn format_get(
    private_key: &[u8; 32],
    listen_port: u16,
    keepalive_secs: u16,
    peers: &[PeerStats],
    now: SystemTime,
) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "private_key={}", hex(private_key));
    let _ = writeln!(s, "listen_port={listen_port}");
    for p in peers {
        let _ = writeln!(s, "public_key={}", hex(&p.config.public_key.0));
        let _ = writeln!(s, "endpoint={}", p.config.endpoint);
        // Absolute time of the last handshake: "now minus its age" (boringtun's own UAPI
        // reports the age itself, which `wg` then shows as a date in 1970).
        let (sec, nsec) = p
            .last_handshake
            .and_then(|age| now.checked_sub(age))
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or((0, 0), |d| (d.as_secs(), d.subsec_nanos()));
        let _ = writeln!(s, "last_handshake_time_sec={sec}");
        let _ = writeln!(s, "last_handshake_time_nsec={nsec}");
        let _ = writeln!(s, "tx_bytes={}", p.tx_bytes);
        let _ = writeln!(s, "rx_bytes={}", p.rx_bytes);
        let _ = writeln!(s, "persistent_keepalive_interval={keepalive_secs}");
        for net in &p.config.allowed {
            let _ = writeln!(s, "allowed_ip={net}");
        }
        let _ = writeln!(s, "protocol_version=1");
    }
    s.push_str("errno=0\n");
    s
}

/// Serves the UAPI socket; `snapshot` returns the current peers (None once the cable stopped).
pub fn serve<F, Fut>(
    device: &str,
    private_key: [u8; 32],
    listen_port: u16,
    keepalive_secs: u16,
    snapshot: F,
) -> std::io::Result<(PathBuf, tokio::task::JoinHandle<()>)>
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Option<Vec<PeerStats>>> + Send,
{
    let path = socket_path(device);
    bind(&path).map(|listener| {
        let snapshot = std::sync::Arc::new(snapshot);
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let snapshot = snapshot.clone();
                tokio::spawn(async move {
                    let (r, mut w) = stream.into_split();
                    let mut lines = BufReader::new(r).lines();
                    let Ok(Some(op)) = lines.next_line().await else { return };
                    // Consume the request up to its blank line.
                    while let Ok(Some(l)) = lines.next_line().await {
                        if l.is_empty() {
                            break;
                        }
                    }
                    let reply = match op.as_str() {
                        "get=1" => match snapshot().await {
                            Some(peers) => format_get(
                                &private_key,
                                listen_port,
                                keepalive_secs,
                                &peers,
                                SystemTime::now(),
                            ),
                            None => "errno=-5\n".to_owned(),
                        },
                        "set=1" => {
                            warn!("refused a UAPI set: peers are managed by the gateway's reconcile loop");
                            "errno=-1\n".to_owned()
                        }
                        other => {
                            debug!(op = other, "unknown UAPI operation");
                            "errno=-22\n".to_owned()
                        }
                    };
                    let _ = w.write_all(reply.as_bytes()).await;
                    let _ = w.write_all(b"\n").await;
                });
            }
        });
        (path, task)
    })
}

fn bind(path: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt as _;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let l = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

/// Age of a UAPI timestamp, for tests and tools.
#[must_use]
pub fn age(sec: u64, nsec: u32, now: SystemTime) -> Option<Duration> {
    now.duration_since(UNIX_EPOCH + Duration::new(sec, nsec)).ok()
}

#[cfg(test)]
mod tests {
    use causeway_broker_api::WireGuardKey;

    use super::*;
    use crate::cable::wireguard::core::PeerConfig;

    #[test]
    fn get_reports_absolute_handshake_time_and_every_field() {
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let peer = PeerStats {
            index: 1,
            config: PeerConfig {
                cluster_id: "b".into(),
                public_key: WireGuardKey([0xab; 32]),
                endpoint: "172.31.0.12:51820".parse().unwrap(),
                candidates: Vec::new(),
                allowed: vec!["10.2.0.0/16".parse().unwrap(), "10.102.0.0/16".parse().unwrap()],
                health_ip: None,
            },
            path: crate::cable::paths::PathKind::DirectPrivate,
            last_handshake: Some(Duration::from_secs(7)),
            tx_bytes: 10,
            rx_bytes: 20,
            tx_packets: 1,
            rx_packets: 2,
            health: crate::cable::wireguard::probe::Health::Unknown,
            rtt: None,
            loss: 0.0,
            probed: false,
            evidence: Default::default(),
        };
        let out = format_get(&[1; 32], 51820, 25, &[peer], now);
        let expected = format!(
            "private_key={}\nlisten_port=51820\npublic_key={}\nendpoint=172.31.0.12:51820\n\
             last_handshake_time_sec=1799999993\nlast_handshake_time_nsec=0\ntx_bytes=10\nrx_bytes=20\n\
             persistent_keepalive_interval=25\nallowed_ip=10.2.0.0/16\nallowed_ip=10.102.0.0/16\n\
             protocol_version=1\nerrno=0\n",
            "01".repeat(32),
            "ab".repeat(32)
        );
        assert_eq!(out, expected);
        assert_eq!(age(1_799_999_993, 0, now), Some(Duration::from_secs(7)));
    }

    #[test]
    fn never_handshaken_peer_reports_zero() {
        let peer = PeerStats {
            index: 1,
            config: PeerConfig {
                cluster_id: "b".into(),
                public_key: WireGuardKey([2; 32]),
                endpoint: "172.31.0.12:51820".parse().unwrap(),
                candidates: Vec::new(),
                allowed: vec![],
                health_ip: None,
            },
            path: crate::cable::paths::PathKind::DirectPrivate,
            last_handshake: None,
            tx_bytes: 0,
            rx_bytes: 0,
            tx_packets: 0,
            rx_packets: 0,
            health: crate::cable::wireguard::probe::Health::Unknown,
            rtt: None,
            loss: 0.0,
            probed: false,
            evidence: Default::default(),
        };
        let out = format_get(&[1; 32], 1, 0, &[peer], SystemTime::now());
        assert!(out.contains("last_handshake_time_sec=0\nlast_handshake_time_nsec=0\n"));
    }
}
