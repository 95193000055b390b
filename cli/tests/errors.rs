//! What the binary says to bad invocations: clap's usage errors and the verbs' own refusals,
//! exactly as printed (stderr and exit code), checked against `tests/snapshots/errors.txt`
//! (`CAUSEWAY_BLESS=1 cargo test -p causeway --test errors` rewrites it). None of these touches
//! the network or the machine: each fails before it would.

use std::process::Command;

/// Each case: the arguments, and why it is here.
const CASES: &[(&[&str], &str)] = &[
    (&[], "no verb"),
    (&["stauts"], "a misspelt verb gets a suggestion"),
    (&["gateway"], "a required flag missing"),
    (&["status", "--timeout", "5"], "--timeout needs --wait"),
    (&["gateway", "--broker-credentials", "x", "--relay-over-https", "maybe"], "a value outside the enum"),
    (&["sandbox", "up", "--gateways", "3"], "a number out of range"),
    (&["completion", "tcsh"], "an unknown shell"),
    (&["policy", "apply", "web", "--action", "allow", "--port", "99999"], "a port that is not one"),
    (&["policy", "apply", "web", "--action", "allow", "--port", "90-80"], "a backwards port range"),
    (
        &["join", "/nonexistent/broker-info.json", "--cluster-id", "east", "--dry-run"],
        "--dry-run refused where it means nothing",
    ),
    (
        &["deploy-broker", "--local", "--address", "192.0.2.1", "--dry-run"],
        "--dry-run refused for a local broker",
    ),
    (&["join", "/nonexistent/broker-info.json", "--cluster-id", "east"], "no --pod-cidr without Kubernetes"),
    (
        &["join", "/nonexistent/broker-info.json", "--cluster-id", "east", "--pod-cidr", "10.0.0.0/16"],
        "an unreadable broker-info file",
    ),
    (&["status", "--credentials", "/nonexistent/credentials.json"], "unreadable credentials"),
    (
        &["show", "clusters", "--credentials", "/nonexistent/credentials.json"],
        "unreadable credentials (show)",
    ),
    (
        &[
            "export",
            "--credentials",
            "/nonexistent/credentials.json",
            "-n",
            "demo",
            "web",
            "--ip",
            "10.96.0.10",
        ],
        "unreadable credentials (export)",
    ),
    (&["policy", "apply", "web", "--action", "allow", "--port", "0"], "port 0"),
    (&["verify", "--context", "east"], "verify on Kubernetes needs two clusters"),
    (&["leave", "--cluster-id", "east"], "leave refuses without --yes off a terminal"),
    (
        &["credentials", "revoke-id", "--credentials", "/nonexistent/admin.json", "abc"],
        "revoke-id refuses without --yes",
    ),
    (&["uninstall", "--crds"], "uninstall refuses without --yes"),
    (&["gather", "--local", "--output", "/nonexistent/bundle.tar.gz"], "a bundle that cannot be written"),
];

fn run(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_causeway"))
        .args(args)
        // Nothing of the caller's environment (CAUSEWAY_* defaults, RUST_BACKTRACE, colour).
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .output()
        .expect("running causeway");
    format!(
        "exit: {}\n--- stdout\n{}--- stderr\n{}",
        out.status.code().map_or_else(|| "signal".to_owned(), |c| c.to_string()),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn bad_invocations_get_the_messages_on_record() {
    let mut text = String::new();
    for (args, why) in CASES {
        let got = run(args);
        assert!(!got.starts_with("exit: 0\n"), "causeway {args:?} ({why}) succeeded:\n{got}");
        text.push_str(&format!("==> causeway {} ({why})\n{got}\n", args.join(" ")));
    }
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/snapshots/errors.txt");
    if std::env::var_os("CAUSEWAY_BLESS").is_some() {
        std::fs::write(&path, &text).unwrap();
        return;
    }
    let have = std::fs::read_to_string(&path).unwrap_or_default();
    if have != text {
        let line = have.lines().zip(text.lines()).position(|(a, b)| a != b).unwrap_or(0);
        panic!(
            "{} differs at line {}:\n  checked in: {}\n  printed:    {}\nrun `CAUSEWAY_BLESS=1 cargo test -p causeway --test errors` and commit the result",
            path.display(),
            line + 1,
            have.lines().nth(line).unwrap_or("(end)"),
            text.lines().nth(line).unwrap_or("(end)")
        );
    }
}
