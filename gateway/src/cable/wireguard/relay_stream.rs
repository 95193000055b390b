//! The relay's stream transport, for sites whose UDP to the relay is blocked: a proxy on
//! loopback between the cable's WireGuard socket and a stream on the broker's HTTPS port. The
//! lanes send relay frames to the proxy's address exactly as they send them to the relay's
//! (the core picks which, [`super::relay_client::Transport`]), and frames from the stream
//! reach the WireGuard socket from the proxy's address, so the packet path is the same for
//! both transports. The stream opens when the first frame arrives and closes after
//! [`IDLE`] without one (the relay client renews every 20 s while it uses the stream).

use std::{net::SocketAddr, time::Duration};

use causeway_broker_api::relay;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::UdpSocket,
};
use tracing::{debug, info, warn};

use super::relay_client::StreamOpener;

/// A stream with no frame from the cable for this long is closed.
pub const IDLE: Duration = Duration::from_secs(60);
/// How long opening a stream may take.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes gathered from the cable into one write on the stream.
const WRITE_BATCH: usize = 64 * 1024;

/// Binds the proxy's socket on loopback, answering only the WireGuard socket on
/// `127.0.0.1:wg_port` (in the calling thread's network namespace, the cable's).
pub fn bind(wg_port: u16) -> std::io::Result<std::net::UdpSocket> {
    let udp = std::net::UdpSocket::bind("127.0.0.1:0")?;
    udp.connect(SocketAddr::from(([127, 0, 0, 1], wg_port)))?;
    udp.set_nonblocking(true)?;
    Ok(udp)
}

/// Runs the proxy on `udp` (from [`bind`]) until the task is dropped.
pub async fn run(udp: std::net::UdpSocket, open: StreamOpener) {
    let udp = match UdpSocket::from_std(udp) {
        Ok(u) => u,
        Err(e) => {
            warn!(error = %e, "relay stream proxy not started");
            return;
        }
    };
    let mut buf = vec![0u8; 65_536];
    loop {
        // Idle until the cable sends the relay something through us.
        let n = match udp.recv(&mut buf).await {
            Ok(n) => n,
            Err(e) => {
                debug!(error = %e, "relay proxy receive failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let first = buf[..n].to_vec();
        let io = match tokio::time::timeout(OPEN_TIMEOUT, open()).await {
            Ok(Ok(io)) => io,
            Ok(Err(e)) => {
                // The frame is lost, as a datagram would be; the relay client retries.
                warn!(error = %e, "relay stream could not be opened");
                continue;
            }
            Err(_) => {
                warn!("relay stream could not be opened in time");
                continue;
            }
        };
        info!("relay stream open (UDP to the relay gets no answer)");
        let why = pump(&udp, io, &first, &mut buf).await;
        info!(why, "relay stream closed");
    }
}

/// Moves frames between the cable and the stream until either side ends or the cable sends
/// nothing for [`IDLE`]; says why it stopped.
async fn pump(
    udp: &UdpSocket,
    io: Box<dyn super::relay_client::RelayIo>,
    first: &[u8],
    buf: &mut [u8],
) -> &'static str {
    let (mut reader, mut writer) = tokio::io::split(io);
    let mut out = Vec::with_capacity(WRITE_BATCH + 2 + relay::MAX_FRAME);
    out.extend(relay::stream_frame(first).unwrap_or_default());
    if writer.write_all(&out).await.is_err() {
        return "write failed";
    }
    let mut decoder = relay::StreamDecoder::default();
    let mut incoming = vec![0u8; 64 * 1024];
    loop {
        tokio::select! {
            got = udp.recv(buf) => {
                let Ok(n) = got else { continue };
                out.clear();
                out.extend(relay::stream_frame(&buf[..n]).unwrap_or_default());
                // Whatever else the cable queued goes in the same write.
                while out.len() < WRITE_BATCH {
                    match udp.try_recv(buf) {
                        Ok(n) => out.extend(relay::stream_frame(&buf[..n]).unwrap_or_default()),
                        Err(_) => break,
                    }
                }
                if writer.write_all(&out).await.is_err() || writer.flush().await.is_err() {
                    return "write failed";
                }
            }
            read = reader.read(&mut incoming) => {
                let n = match read {
                    Ok(0) => return "closed by the relay",
                    Ok(n) => n,
                    Err(_) => return "read failed",
                };
                decoder.push(&incoming[..n]);
                loop {
                    match decoder.next_frame() {
                        Ok(Some(frame)) => {
                            // Lost like a datagram when the socket is full; the tunnel recovers.
                            let _ = udp.send(frame).await;
                        }
                        Ok(None) => break,
                        Err(_) => return "the relay broke the framing",
                    }
                }
            }
            () = tokio::time::sleep(IDLE) => return "idle",
        }
    }
}
