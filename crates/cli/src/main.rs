//! `modelpack`: the command line. Parses arguments, calls one library function per subcommand,
//! renders the result and sets the exit code; the work lives in the library crates.

mod args;
mod cmd;
mod display;
mod hide_args;
mod remote;

use std::ffi::OsStr;
use std::io::IsTerminal as _;
use std::process::ExitCode;

use clap::Parser;

use crate::args::{Cli, Command};

/// Restores the default SIGPIPE action, so `modelpack ls | head` ends quietly like other Unix
/// tools instead of failing on a closed pipe.
#[allow(unsafe_code)]
fn reset_sigpipe() {
    // SAFETY: setting a signal's disposition to SIG_DFL at start-up, before any thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// Whether log lines get terminal colours: only when stderr is a terminal, and not when
/// `NO_COLOR` is set to anything but the empty string (<https://no-color.org>). Logs that go to a
/// file or a pipe (`mount --daemon`'s log, journald, `2>&1 | tee`) stay plain text.
fn colour_logs(stderr_is_terminal: bool, no_color: Option<&OsStr>) -> bool {
    stderr_is_terminal && no_color.is_none_or(OsStr::is_empty)
}

fn main() -> ExitCode {
    reset_sigpipe();
    let cli = Cli::parse();
    hide_args::hide_passwords();
    let default_level = if cli.global.quiet { "error" } else { "warn" };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(colour_logs(
            std::io::stderr().is_terminal(),
            std::env::var_os("NO_COLOR").as_deref(),
        ))
        .with_target(false)
        .without_time()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MODELPACK_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
        .init();
    display::install_interrupt_handler();
    let result = match cli.command {
        Command::Build(a) => cmd::build::run(&cli.global, a),
        Command::Modelfile(a) => cmd::modelfile::run(a),
        Command::Ls(a) => cmd::ls::run(&cli.global, a),
        Command::Inspect(a) => cmd::inspect::run(&cli.global, a),
        Command::Tag(a) => cmd::tag::run(&cli.global, a),
        Command::Rm(a) => cmd::rm::run(&cli.global, a),
        Command::Prune(a) => cmd::prune::run(&cli.global, a),
        Command::Validate(a) => cmd::validate::run(&cli.global, a),
        Command::Extract(a) => cmd::extract::run(&cli.global, a),
        Command::Store(a) => cmd::store::run(&cli.global, a),
        Command::Login(a) => cmd::login::login(&cli.global, a),
        Command::Logout(a) => cmd::login::logout(&cli.global, a),
        Command::Push(a) => cmd::push::run(&cli.global, a),
        Command::Pull(a) => cmd::pull::run(&cli.global, a),
        Command::Fetch(a) => cmd::pull::fetch(&cli.global, a),
        Command::Copy(a) => cmd::copy::run(&cli.global, a),
        Command::Resolve(a) => cmd::remote_ops::resolve(&cli.global, a),
        Command::Repo(a) => cmd::remote_ops::repo(&cli.global, a),
        Command::Manifest(a) => cmd::remote_ops::manifest(&cli.global, a),
        Command::Blob(a) => cmd::remote_ops::blob(&cli.global, a),
        Command::Attach(a) => cmd::attach::attach(&cli.global, a),
        Command::Discover(a) => cmd::attach::discover(&cli.global, a),
        Command::Mount(a) => cmd::mount::mount(&cli.global, a),
        Command::Umount(a) => cmd::mount::umount(&cli.global, a),
        Command::Index(a) => cmd::mount::index(&cli.global, a),
        Command::Containerd(a) => cmd::containerd::run(&cli.global, a),
        Command::Snapshotter(a) => cmd::containerd::snapshotter(&cli.global, a),
        Command::Completion(a) => cmd::completion::run(a),
        Command::Version(a) => cmd::version::run(&cli.global, a),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            // One line: the error and its causes.
            let chain: Vec<String> = err.chain().map(ToString::to_string).collect();
            let mut line = String::new();
            for part in chain {
                if !line.contains(&part) {
                    if !line.is_empty() {
                        line.push_str(": ");
                    }
                    line.push_str(&part);
                }
            }
            eprintln!("error: {line}");
            if display::cancelled() {
                ExitCode::from(130)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colours_only_on_a_terminal_without_no_color() {
        assert!(colour_logs(true, None));
        assert!(colour_logs(true, Some(OsStr::new(""))));
        assert!(!colour_logs(true, Some(OsStr::new("1"))));
        assert!(!colour_logs(false, None));
        assert!(!colour_logs(false, Some(OsStr::new(""))));
    }
}
