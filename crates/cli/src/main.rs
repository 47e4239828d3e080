//! `modelpack`: the command line. Parses arguments, calls one library function per subcommand,
//! renders the result and sets the exit code; the work lives in the library crates.

mod args;
mod cmd;
mod display;

use std::process::ExitCode;

use clap::Parser;

use crate::args::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_level = if cli.global.quiet { "error" } else { "warn" };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
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
