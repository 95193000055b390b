//! Prometheus exposition for Causeway's daemons, on `prometheus-client` (OpenMetrics text).
//!
//! The daemons keep their state in their own structures (a gateway's status snapshot, the
//! route agent's report, the broker's counters) and describe it at scrape time as
//! [`Family`]s; [`render`] encodes those with the process's own metrics and the build info.
//! This crate is the one place that knows the exposition format.

use std::fmt;

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, NoLabelSet},
    metrics::{MetricType, info::Info},
    registry::Registry,
};

/// The `Content-Type` of [`render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// One sample's value: whole numbers print as such, ratios and seconds as decimals.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Value {
    Int(u64),
    Float(f64),
}

impl From<u64> for Value {
    fn from(v: u64) -> Self {
        Value::Int(v)
    }
}

impl From<usize> for Value {
    fn from(v: usize) -> Self {
        Value::Int(v as u64)
    }
}

impl From<bool> for Value {
    fn from(v: bool) -> Self {
        Value::Int(u64::from(v))
    }
}

impl From<f64> for Value {
    fn from(v: f64) -> Self {
        Value::Float(v)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
}

/// A metric family read from a daemon's state: a name, a help text and labelled samples.
#[derive(Clone, Debug)]
pub struct Family {
    /// Without `_total`: the encoder adds it to counters' samples.
    name: String,
    help: String,
    kind: Kind,
    samples: Vec<(Vec<(String, String)>, Value)>,
}

impl Family {
    /// A counter; `name` may end in `_total` (the samples carry it either way).
    #[must_use]
    pub fn counter(name: &str, help: &str) -> Self {
        let name = name.strip_suffix("_total").unwrap_or(name);
        Self { name: name.into(), help: help.into(), kind: Kind::Counter, samples: Vec::new() }
    }

    #[must_use]
    pub fn gauge(name: &str, help: &str) -> Self {
        Self { name: name.into(), help: help.into(), kind: Kind::Gauge, samples: Vec::new() }
    }

    /// Adds a sample with these labels.
    #[must_use]
    pub fn with(mut self, labels: &[(&str, &str)], value: impl Into<Value>) -> Self {
        self.push(labels, value);
        self
    }

    /// Adds a sample. Label values are escaped here (prometheus-client writes them as given):
    /// a value from a record must not be able to forge a line of the exposition.
    pub fn push(&mut self, labels: &[(&str, &str)], value: impl Into<Value>) {
        let labels = labels.iter().map(|(k, v)| ((*k).to_owned(), escape(v))).collect();
        self.samples.push((labels, value.into()));
    }

    /// Adds one sample per item.
    #[must_use]
    pub fn each<T, V: Into<Value>>(
        mut self,
        items: impl IntoIterator<Item = T>,
        sample: impl Fn(&T) -> Option<(Vec<(&'static str, String)>, V)>,
    ) -> Self {
        for item in items {
            if let Some((labels, v)) = sample(&item) {
                let labels: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
                self.push(&labels, v);
            }
        }
        self
    }
}

/// OpenMetrics label-value escaping: backslash, double quote and line feed.
fn escape(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// The families of one scrape, as a collector.
#[derive(Debug)]
struct Snapshot(Vec<Family>);

impl Collector for Snapshot {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        for f in &self.0 {
            let kind = match f.kind {
                Kind::Counter => MetricType::Counter,
                Kind::Gauge => MetricType::Gauge,
            };
            let mut metric = encoder.encode_descriptor(&f.name, &f.help, None, kind)?;
            for (labels, value) in &f.samples {
                let mut sample = metric.encode_family(labels)?;
                match (f.kind, value) {
                    (Kind::Counter, Value::Int(v)) => sample.encode_counter::<NoLabelSet, _, u64>(v, None)?,
                    (Kind::Counter, Value::Float(v)) => {
                        sample.encode_counter::<NoLabelSet, _, f64>(v, None)?
                    }
                    (Kind::Gauge, Value::Int(v)) => sample.encode_gauge(v)?,
                    (Kind::Gauge, Value::Float(v)) => sample.encode_gauge(v)?,
                }
            }
        }
        Ok(())
    }
}

/// This process's CPU time, resident memory and start time (the standard `process_*`
/// families), read from /proc at each scrape.
#[derive(Debug)]
struct Process;

impl Collector for Process {
    fn encode(&self, encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let p = process_stats();
        let mut families = Vec::new();
        if let Some(v) = p.cpu_seconds {
            families
                .push(Family::counter("process_cpu_seconds", "User and system CPU time spent").with(&[], v));
        }
        if let Some(v) = p.resident_bytes {
            families
                .push(Family::gauge("process_resident_memory_bytes", "Resident memory size").with(&[], v));
        }
        if let Some(v) = p.start_time {
            families.push(
                Family::gauge("process_start_time_seconds", "Start time since the Unix epoch").with(&[], v),
            );
        }
        Snapshot(families).encode(encoder)
    }
}

/// `families`, the process's metrics and `causeway_build_info`, as OpenMetrics text.
#[must_use]
pub fn render(families: Vec<Family>) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Snapshot(families)));
    registry.register_collector(Box::new(Process));
    registry.register(
        "causeway_build",
        "Build information",
        Info::new(vec![("version".to_owned(), env!("CARGO_PKG_VERSION").to_owned())]),
    );
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
    out
}

/// What /proc says about this process.
#[derive(Debug, Default, PartialEq)]
pub struct ProcessStats {
    pub cpu_seconds: Option<f64>,
    pub resident_bytes: Option<u64>,
    pub start_time: Option<f64>,
}

/// Reads this process's CPU time, RSS and start time from /proc. Clock ticks in /proc are
/// USER_HZ, 100 on every Linux ABI; resident memory comes from `VmRSS` in kB, not from a page
/// count (pages are 64 KiB on some arm64 kernels).
#[must_use]
pub fn process_stats() -> ProcessStats {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let system = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    parse_process_stats(&stat, &status, &system)
}

/// [`process_stats`] on given /proc texts.
#[must_use]
pub fn parse_process_stats(stat: &str, status: &str, system: &str) -> ProcessStats {
    const TICKS: f64 = 100.0;
    // Fields after the parenthesised command name; utime is field 14, stime 15, starttime 22.
    let rest: Vec<&str> =
        stat.rsplit_once(')').map(|(_, r)| r.split_whitespace().collect()).unwrap_or_default();
    let field = |n: usize| rest.get(n - 3).and_then(|v| v.parse::<f64>().ok());
    let cpu_seconds = field(14).zip(field(15)).map(|(u, s)| (u + s) / TICKS);
    let resident_bytes = vm_rss_bytes(status);
    let boot =
        system.lines().find_map(|l| l.strip_prefix("btime ").and_then(|v| v.trim().parse::<f64>().ok()));
    let start_time = boot.zip(field(22)).map(|(b, t)| b + t / TICKS);
    ProcessStats { cpu_seconds, resident_bytes, start_time }
}

/// `VmRSS:   1234 kB` → bytes.
fn vm_rss_bytes(status: &str) -> Option<u64> {
    let line = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?;
    let mut parts = line.split_whitespace();
    let n: u64 = parts.next()?.parse().ok()?;
    (parts.next()? == "kB").then_some(n * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_render_as_openmetrics_with_process_and_build_info() {
        let text = render(vec![
            Family::counter("causeway_tx_bytes_total", "Bytes sent").with(&[("cluster", "b")], 12_345u64),
            Family::gauge("causeway_connection_up", "Up").with(&[("cluster", "b")], true),
            Family::gauge("causeway_rtt_seconds", "RTT").with(&[("cluster", "b")], 0.0002),
            Family::gauge("causeway_route_conflicts", "Conflicts").with(&[], 1usize),
            Family::gauge("causeway_empty", "Nothing yet"),
        ]);
        for line in [
            "# HELP causeway_tx_bytes Bytes sent\n# TYPE causeway_tx_bytes counter\n",
            "causeway_tx_bytes_total{cluster=\"b\"} 12345\n",
            "causeway_connection_up{cluster=\"b\"} 1\n",
            "causeway_rtt_seconds{cluster=\"b\"} 0.0002\n",
            "causeway_route_conflicts{} 1\n",
            "# TYPE causeway_empty gauge\n",
            "causeway_build_info{version=\"0.1.0\"} 1\n",
            "\nprocess_resident_memory_bytes{} ",
            "\nprocess_cpu_seconds_total{} ",
        ] {
            assert!(text.contains(line), "{line:?} missing from:\n{text}");
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn label_values_are_escaped() {
        let text = render(vec![Family::gauge("g", "h").with(&[("rule", "a\"b\\c\nd")], 1u64)]);
        assert!(text.contains("g{rule=\"a\\\"b\\\\c\\nd\"} 1\n"), "{text}");
    }

    #[test]
    fn process_stats_come_from_proc_and_rss_from_vmrss_not_pages() {
        let stat = "4242 (cause way) S 1 2 3 4 5 6 7 8 9 10 250 150 0 0 20 0 4 0 1000 1 2";
        let status = "Name:\tcauseway\nVmRSS:\t   2048 kB\nThreads: 4\n";
        let system = "cpu  1 2 3\nbtime 1700000000\n";
        let p = parse_process_stats(stat, status, system);
        assert_eq!(
            p,
            ProcessStats {
                cpu_seconds: Some(4.0),
                resident_bytes: Some(2_097_152),
                start_time: Some(1_700_000_010.0)
            }
        );
        assert_eq!(parse_process_stats("", "VmRSS: 5 MB\n", ""), ProcessStats::default());
        // What this process reads about itself is there and sane.
        let me = process_stats();
        assert!(me.resident_bytes.is_some_and(|b| b > 1 << 20), "{me:?}");
        assert!(me.cpu_seconds.is_some() && me.start_time.is_some_and(|t| t > 1.6e9), "{me:?}");
    }
}
