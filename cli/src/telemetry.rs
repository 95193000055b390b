//! Logging, set up once: `RUST_LOG`-style filter (default given per command), JSON lines when
//! `CAUSEWAY_LOG_FORMAT=json`, and `log` records (aya, aya-log, netlink) bridged into tracing.

use tracing_subscriber::{EnvFilter, fmt};

pub fn init(default: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let json = std::env::var("CAUSEWAY_LOG_FORMAT").is_ok_and(|v| v == "json");
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr);
    // try_init also installs the log → tracing bridge (tracing-log feature).
    let _ = if json { builder.json().try_init() } else { builder.try_init() };
}
