//! Generated from the CLI's clap definition, and checked: `docs/configuration.md` (every verb's
//! flags, environment variables and defaults) and `cli/tests/snapshots/help.txt` (every verb's
//! `--help` as printed). Tests fail when a checked-in file differs from what the definition
//! gives; `CAUSEWAY_BLESS=1 cargo test -p causeway reference` rewrites them.

use clap::Command;

/// Environment variables the CLI reads that are not bound to a flag.
const OTHER_ENVIRONMENT: &[(&str, &str)] = &[
    (
        "RUST_LOG",
        "Log filter (`tracing` syntax, e.g. `info,causeway_gateway=debug`); each verb has its own default.",
    ),
    (
        "NO_COLOR",
        "Set (to anything): no colour in log lines even on a terminal (there is none off a terminal anyway).",
    ),
];

/// Every visible command, depth first, with its path (`causeway sandbox up`).
pub fn commands(root: &Command) -> Vec<(String, &Command)> {
    fn walk<'a>(cmd: &'a Command, path: String, out: &mut Vec<(String, &'a Command)>) {
        out.push((path.clone(), cmd));
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set() && s.get_name() != "help") {
            walk(sub, format!("{path} {}", sub.get_name()), out);
        }
    }
    let mut out = Vec::new();
    walk(root, root.get_name().to_owned(), &mut out);
    out
}

fn cell(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ").replace('|', "\\|")
}

/// The configuration reference, as Markdown.
pub fn markdown(root: &Command) -> String {
    let mut out = String::from(
        "# Configuration reference\n\n\
         Generated from the CLI's definition (`cli/src/reference.rs`; a test fails when this file \
         differs: `CAUSEWAY_BLESS=1 cargo test -p causeway reference` rewrites it). Every flag \
         with an environment variable can be set through it instead (the DaemonSets use the \
         variables); a flag on the command line wins.\n\n",
    );
    out.push_str("## Environment variables without a flag\n\n| variable | meaning |\n|---|---|\n");
    for (name, meaning) in OTHER_ENVIRONMENT {
        out.push_str(&format!("| `{name}` | {meaning} |\n"));
    }
    for (path, cmd) in commands(root) {
        let args: Vec<_> = cmd
            .get_arguments()
            .filter(|a| !a.is_hide_set() && !matches!(a.get_id().as_str(), "help" | "version"))
            .filter(|a| path == root.get_name() || !a.is_global_set())
            .collect();
        let subs = cmd.get_subcommands().filter(|s| !s.is_hide_set() && s.get_name() != "help").count();
        if args.is_empty() && subs > 0 {
            continue;
        }
        out.push_str(&format!("\n## `{path}`\n\n"));
        if let Some(about) = cmd.get_long_about().or_else(|| cmd.get_about()) {
            out.push_str(&format!("{}\n\n", cell(&about.to_string())));
        }
        if args.is_empty() {
            out.push_str("No flags.\n");
            continue;
        }
        out.push_str("| flag | environment | default | meaning |\n|---|---|---|---|\n");
        for a in args {
            let name = match (a.get_long(), a.is_positional()) {
                (_, true) => format!(
                    "`<{}>`",
                    a.get_value_names()
                        .and_then(|v| v.first())
                        .map_or_else(|| a.get_id().to_string().to_uppercase(), ToString::to_string)
                ),
                (Some(long), false) => format!("`--{long}`"),
                (None, false) => format!("`-{}`", a.get_short().unwrap_or('?')),
            };
            let env = a.get_env().map_or_else(String::new, |e| format!("`{}`", e.to_string_lossy()));
            let default = if !a.get_action().takes_values() {
                String::new()
            } else {
                a.get_default_values()
                    .iter()
                    .map(|v| format!("`{}`", v.to_string_lossy()))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let mut meaning =
                a.get_long_help().or_else(|| a.get_help()).map(|h| cell(&h.to_string())).unwrap_or_default();
            let values: Vec<String> = a
                .get_possible_values()
                .iter()
                .filter(|v| !v.is_hide_set())
                .map(|v| format!("`{}`", v.get_name()))
                .collect();
            if !meaning.is_empty() && !meaning.ends_with('.') {
                meaning.push('.');
            }
            if !values.is_empty() && a.get_action().takes_values() {
                meaning.push_str(&format!(" One of {}.", values.join(", ")));
            }
            if a.is_required_set() {
                meaning.push_str(" Required.");
            }
            out.push_str(&format!("| {name} | {env} | {default} | {} |\n", meaning.trim()));
        }
    }
    out
}

/// Every visible command's `--help`, as `causeway … --help` prints it.
pub fn help_snapshots(root: &Command) -> String {
    // Values of variables set where the test runs are not part of the definition.
    fn hide_env(cmd: Command) -> Command {
        cmd.mut_args(|a| a.hide_env_values(true)).mut_subcommands(hide_env)
    }
    let root = &hide_env(root.clone());
    let mut out = String::new();
    for (path, _) in commands(root) {
        let mut argv: Vec<&str> = path.split(' ').collect();
        argv.push("--help");
        let text = match root.clone().try_get_matches_from(&argv) {
            Err(e) => e.to_string(),
            Ok(_) => "(no help printed)\n".to_owned(),
        };
        out.push_str(&format!("==> {}\n{text}\n", argv.join(" ")));
    }
    out
}

/// Compares a checked-in file with what the definition gives (or rewrites it when blessing).
#[cfg(test)]
pub fn check_file(relative: &str, want: &str) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(relative);
    if std::env::var_os("CAUSEWAY_BLESS").is_some() {
        std::fs::write(&path, want).unwrap();
        return;
    }
    let have = std::fs::read_to_string(&path).unwrap_or_default();
    if have != want {
        let line = have
            .lines()
            .zip(want.lines())
            .position(|(a, b)| a != b)
            .map_or_else(|| have.lines().count().min(want.lines().count()) + 1, |i| i + 1);
        let shown = |t: &str| t.lines().nth(line - 1).unwrap_or("(end of file)").to_owned();
        panic!(
            "{} differs from the CLI's definition at line {line}:\n  checked in: {}\n  generated:  {}\nrun `CAUSEWAY_BLESS=1 cargo test -p causeway reference` and commit the result",
            path.display(),
            shown(&have),
            shown(want)
        );
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::*;

    #[test]
    fn reference_the_configuration_reference_is_current() {
        let text = markdown(&crate::Cli::command());
        // What an operator looks up most: the gateway's settings, with their variables.
        assert!(text.contains("## `causeway gateway`"));
        assert!(text.contains("| `--underlay-mtu` | `CAUSEWAY_UNDERLAY_MTU` |"), "underlay MTU row");
        assert!(!text.contains("## `causeway debug"), "hidden commands stay out");
        check_file("../docs/configuration.md", &text);
    }

    #[test]
    fn reference_every_verbs_help_is_snapshot() {
        let root = crate::Cli::command();
        let text = help_snapshots(&root);
        for (path, _) in commands(&root) {
            assert!(text.contains(&format!("==> {path} --help\n")), "{path}");
        }
        assert!(!text.contains("(no help printed)"));
        check_file("tests/snapshots/help.txt", &text);
    }

    #[test]
    fn reference_the_definition_is_consistent_and_every_flag_says_what_it_does() {
        let root = crate::Cli::command();
        root.clone().debug_assert();
        let mut silent = Vec::new();
        for (path, cmd) in commands(&root) {
            for a in cmd.get_arguments().filter(|a| !a.is_hide_set()) {
                if a.get_help().is_none() && !matches!(a.get_id().as_str(), "help" | "version") {
                    silent.push(format!("{path} {}", a.get_id()));
                }
            }
        }
        assert!(silent.is_empty(), "flags without a help text: {silent:?}");
    }
}
