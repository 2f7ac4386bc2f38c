//! The `vmdepot` command: a thin shell over the library. It parses the
//! arguments, sets up tracing and hands over to [`cli::run`].
//!
//! Errors are printed as one line (`vmdepot: …` with `{:#}`) and the exit
//! code comes from [`vmdepot::Error::exit_code`] (2 for usage errors, as
//! clap does). A closed stdout (`| head`) is not an error.

use clap::Parser;

mod cli;

fn main() {
    let args = cli::Cli::parse();
    init_tracing();
    let code = match cli::run(args) {
        Ok(code) => code,
        Err(e) => report(&e),
    };
    std::process::exit(code);
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
