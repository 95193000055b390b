//! Confirmation for destructive verbs: asked on a terminal, `--yes` to skip; without a
//! terminal and without `--yes` the verb refuses, so a script never destroys by accident.

use std::io::{BufRead, IsTerminal as _, Write};

use anyhow::bail;

/// Asks before `what` (a phrase: "revoke credential X"), unless `yes`.
pub fn confirm(yes: bool, what: &str) -> anyhow::Result<()> {
    let stdin = std::io::stdin();
    confirm_with(yes, what, stdin.is_terminal(), &mut stdin.lock(), &mut std::io::stderr())
}

pub fn confirm_with(
    yes: bool,
    what: &str,
    terminal: bool,
    input: &mut dyn BufRead,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    if yes {
        return Ok(());
    }
    if !terminal {
        bail!(
            "this would {what}: pass --yes to confirm (there is no terminal to ask on); nothing was changed"
        );
    }
    write!(out, "This will {what}. Go ahead? [y/N] ")?;
    out.flush()?;
    let mut answer = String::new();
    input.read_line(&mut answer)?;
    match answer.trim().to_ascii_lowercase().as_str() {
        "y" | "yes" => Ok(()),
        _ => bail!("not confirmed; nothing was changed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ask(yes: bool, terminal: bool, typed: &str) -> (anyhow::Result<()>, String) {
        let mut out = Vec::new();
        let r = confirm_with(yes, "revoke credential abc", terminal, &mut typed.as_bytes(), &mut out);
        (r, String::from_utf8(out).unwrap())
    }

    #[test]
    fn only_a_yes_goes_ahead() {
        let (r, out) = ask(false, true, "y\n");
        assert!(r.is_ok());
        assert_eq!(out, "This will revoke credential abc. Go ahead? [y/N] ");
        assert!(ask(false, true, " YES \n").0.is_ok());
        for no in ["\n", "n\n", "yep\n", ""] {
            let e = ask(false, true, no).0.unwrap_err().to_string();
            assert_eq!(e, "not confirmed; nothing was changed", "{no:?}");
        }
    }

    #[test]
    fn without_a_terminal_only_the_flag_goes_ahead() {
        let (r, out) = ask(false, false, "y\n");
        assert_eq!(
            r.unwrap_err().to_string(),
            "this would revoke credential abc: pass --yes to confirm (there is no terminal to ask on); nothing was changed"
        );
        assert!(out.is_empty(), "nothing asked");
        let (r, out) = ask(true, false, "");
        assert!(r.is_ok() && out.is_empty());
    }
}
