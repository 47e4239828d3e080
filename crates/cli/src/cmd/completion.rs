//! `modelpack completion SHELL`: prints a completion script for bash, zsh, fish (also elvish
//! and PowerShell) on stdout, generated from the same clap types that parse the arguments.

use std::io::Write as _;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, CommandFactory as _};
use clap_complete::Shell;

use crate::args::Cli;

#[derive(Debug, Args)]
pub struct CompletionArgs {
    /// The shell to complete for
    #[arg(value_enum)]
    pub shell: Shell,
}

/// The completion script for `shell`.
pub fn script(shell: Shell) -> Vec<u8> {
    let mut command = Cli::command();
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut command, "modelpack", &mut out);
    out
}

/// Writes the script to stdout.
pub fn run(args: CompletionArgs) -> anyhow::Result<ExitCode> {
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(&script(args.shell))
        .and_then(|()| stdout.flush())
        .context("cannot write the completion script")?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shell_gets_a_script_naming_the_subcommands() {
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let text = String::from_utf8(script(shell)).expect("utf-8 script");
            assert!(text.contains("modelpack"), "{shell}: {text}");
            for sub in ["pull", "mount", "completion", "version"] {
                assert!(text.contains(sub), "{shell} script lacks {sub}");
            }
        }
    }
}
