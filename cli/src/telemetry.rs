//! Logging, set up once: `RUST_LOG`-style filter (default given per command), JSON lines with
//! `--log-format json` (or `CAUSEWAY_LOG_FORMAT=json`), and `log` records (aya, aya-log,
//! netlink) bridged into tracing. Colour only on a terminal (and never with `NO_COLOR`): pod
//! logs and files get plain text.

use std::io::IsTerminal as _;

use tracing_subscriber::{EnvFilter, fmt};

/// `--log-format`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

pub fn init(default: &str, format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let ansi = colour(std::io::stderr().is_terminal(), std::env::var_os("NO_COLOR").is_some());
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    // try_init also installs the log → tracing bridge (tracing-log feature).
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// Whether log lines carry ANSI colour codes: on a terminal, unless `NO_COLOR` is set.
fn colour(terminal: bool, no_color: bool) -> bool {
    terminal && !no_color
}

#[cfg(test)]
mod tests {
    use super::colour;

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(colour(true, false));
        assert!(!colour(false, false), "a pod's log or a file gets plain text");
        assert!(!colour(true, true), "NO_COLOR wins");
    }
}
