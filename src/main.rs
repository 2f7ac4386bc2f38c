//! The `vmdepot` command: a thin shell over the library. It parses the
//! arguments, sets up tracing and hands over to [`cli::run`].
//!
//! Errors are printed as one line (`vmdepot: …` with `{:#}`) and the exit
//! code comes from [`vmdepot::Error::exit_code`] (2 for usage errors, as
//! clap does; clap's own usage errors are made one line too). A closed
//! stdout (`| head`) is not an error.

use clap::error::ErrorKind;
use clap::Parser;

mod cli;

fn main() {
    let args = match cli::Cli::try_parse() {
        Ok(args) => args,
        Err(e) => usage_error(e),
    };
    init_tracing();
    let code = match cli::run(args) {
        Ok(code) => code,
        Err(e) => report(&e),
    };
    std::process::exit(code);
}

/// A command line clap refuses, as one line on stderr (`vmdepot: …`, its
/// usage line, a pointer to `--help`) and exit code 2. Help and version
/// requests, and a group without its subcommand (which shows the group's
/// help), print as clap prints them.
fn usage_error(e: clap::Error) -> ! {
    if !e.use_stderr() || e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
        e.exit();
    }
    eprintln!("{}", cli::output::usage_line(&e.render().to_string()));
    std::process::exit(2);
}

/// Log records at the level of `VMDEPOT_LOG` (default `warn`) on stderr:
/// plain one-line records (no colour codes) unless stderr is a terminal.
fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("VMDEPOT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .without_time()
        .init();
}

/// Prints a failure on stderr; returns its exit code (0 for a closed
/// stdout, which is not printed).
fn report(e: &anyhow::Error) -> i32 {
    if is_broken_pipe(e) {
        return 0;
    }
    eprintln!("{}", cli::output::error_line(e));
    cli::output::exit_code(e)
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
