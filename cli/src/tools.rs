//! Test tools shipped in the binary (hidden `causeway debug …`), so that the sandbox and the
//! end-to-end tests need nothing beyond iproute2 and ping inside pods.

use std::{
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream},
};

use anyhow::Context as _;
use sha2::{Digest as _, Sha256};

/// A recognisable plaintext, so a capture of the underlay can prove it never shows up there.
pub const MARKER: &[u8] = b"CAUSEWAY-PLAINTEXT-MARKER:";

fn report(bytes: u64, hash: Sha256) -> String {
    let digest: String = hash.finalize().iter().map(|b| format!("{b:02x}")).collect();
    serde_json::json!({ "bytes": bytes, "sha256": digest }).to_string()
}

/// Accepts one connection, reads it to the end, prints `{"bytes":…,"sha256":…}`.
pub fn tcp_sink(listen: &str) -> anyhow::Result<()> {
    let l = TcpListener::bind(listen).with_context(|| format!("binding {listen}"))?;
    // Tell the caller we are listening (stdout is line-buffered into the caller's pipe).
    eprintln!("listening on {listen}");
    let (mut s, _) = l.accept()?;
    let mut hash = Sha256::new();
    let mut total = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hash.update(&buf[..n]);
        total += n as u64;
    }
    println!("{}", report(total, hash));
    Ok(())
}

/// Connects, sends `bytes` bytes of marker-laden data, prints `{"bytes":…,"sha256":…}`.
pub fn tcp_source(connect: &str, bytes: u64) -> anyhow::Result<()> {
    let mut s = TcpStream::connect(connect).with_context(|| format!("connecting to {connect}"))?;
    let mut hash = Sha256::new();
    let mut sent = 0u64;
    let mut block = Vec::with_capacity(64 * 1024);
    let mut counter = 0u64;
    while sent < bytes {
        block.clear();
        while block.len() < 60 * 1024 {
            block.extend_from_slice(MARKER);
            block.extend_from_slice(format!("{counter:016}\n").as_bytes());
            counter += 1;
        }
        let take = usize::try_from((bytes - sent).min(block.len() as u64)).unwrap_or(block.len());
        s.write_all(&block[..take])?;
        hash.update(&block[..take]);
        sent += take as u64;
    }
    s.shutdown(std::net::Shutdown::Write)?;
    println!("{}", report(sent, hash));
    Ok(())
}
