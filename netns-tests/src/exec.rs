//! Running commands, on the host or inside a namespace, with errors that show what failed.

use std::{
    io::Write as _,
    process::{Child, Command, Output, Stdio},
};

use anyhow::{Context as _, bail};

/// Whether we run as root (reads /proc: no unsafe, no libc).
#[must_use]
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}

fn describe(args: &[&str]) -> String {
    args.join(" ")
}

/// Runs a command and returns its output; fails with stderr on a non-zero exit.
pub fn run(args: &[&str]) -> anyhow::Result<Output> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("spawning `{}`", describe(args)))?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            describe(args),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

/// `ip netns exec <ns> <args…>`.
pub fn in_ns(ns: &str, args: &[&str]) -> anyhow::Result<Output> {
    let mut full = vec!["ip", "netns", "exec", ns];
    full.extend_from_slice(args);
    run(&full)
}

/// Like [`in_ns`] with `stdin` fed to the command and extra environment.
pub fn in_ns_with_input(
    ns: &str,
    args: &[&str],
    env: &[(&str, &str)],
    stdin: &[u8],
) -> anyhow::Result<Output> {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().with_context(|| format!("spawning {args:?} in {ns}"))?;
    child.stdin.take().context("stdin")?.write_all(stdin)?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{args:?} in {ns} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

/// `ip -n <ns> <args…>` (fast path for iproute2 commands).
pub fn ip(ns: &str, args: &[&str]) -> anyhow::Result<()> {
    let mut full = vec!["ip", "-n", ns];
    full.extend_from_slice(args);
    run(&full).map(|_| ())
}

/// Sets a sysctl inside a namespace.
pub fn sysctl(ns: &str, key: &str, value: &str) -> anyhow::Result<()> {
    in_ns(ns, &["sysctl", "-q", "-w", &format!("{key}={value}")]).map(|_| ())
}

/// Pings `dst` from namespace `ns`; true if any reply came back.
#[must_use]
pub fn ping(ns: &str, dst: &str, count: u32) -> bool {
    let count = count.to_string();
    in_ns(ns, &["ping", "-n", "-q", "-c", &count, "-i", "0.2", "-W", "1", dst]).is_ok()
}

/// Namespaces currently present (`ip netns list`).
#[must_use]
pub fn namespaces() -> Vec<String> {
    run(&["ip", "netns", "list"])
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// PIDs of the processes living in namespace `ns`.
#[must_use]
pub fn ns_pids(ns: &str) -> Vec<String> {
    run(&["ip", "netns", "pids", ns])
        .map(|o| String::from_utf8_lossy(&o.stdout).split_whitespace().map(str::to_owned).collect())
        .unwrap_or_default()
}

/// A background process in a namespace, killed on drop.
pub struct Bg(Option<Child>);

impl Bg {
    /// Starts `args` in `ns`; stderr is discarded.
    #[must_use]
    pub fn start(ns: &str, args: &[&str], stdout: Stdio) -> Self {
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .args(args)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(Stdio::null())
            .spawn()
            .expect("spawning");
        Bg(Some(child))
    }

    /// The process id, while it runs.
    #[must_use]
    pub fn pid(&self) -> Option<u32> {
        self.0.as_ref().map(Child::id)
    }

    /// Waits for the process to exit and returns its stdout.
    #[must_use]
    pub fn output(mut self) -> String {
        let out = self.0.take().expect("running").wait_with_output().expect("waiting");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Stops a capture cleanly (SIGINT flushes the file) and waits for it.
    pub fn interrupt(mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = run(&["kill", "-INT", &child.id().to_string()]);
            let _ = child.wait();
        }
    }
}

impl Drop for Bg {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
