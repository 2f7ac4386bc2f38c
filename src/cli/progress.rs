//! [`CliProgress`]: how the CLI shows the library's [`Progress`] reports.
//! An indicatif bar on a terminal; a plain line every 5 s otherwise (for
//! journald and logs); nothing with `--quiet`.

use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use vmdepot::Progress;

use super::output::human;

/// How often the plain form prints a line.
const PLAIN_EVERY: Duration = Duration::from_secs(5);

/// The CLI's [`Progress`]: a bar, plain lines or nothing (see the module).
pub struct CliProgress {
    mode: Mode,
}

enum Mode {
    Quiet,
    Bar(Mutex<Option<ProgressBar>>),
    Plain(Mutex<PlainState>),
}

/// The operation the plain form reports on.
struct PlainState {
    what: String,
    total: u64,
    done: u64,
    last: Instant,
}

impl CliProgress {
    /// Nothing if `quiet`, else a bar if stderr is a terminal, else plain
    /// lines.
    pub fn new(quiet: bool) -> CliProgress {
        let mode = if quiet {
            Mode::Quiet
        } else if std::io::stderr().is_terminal() {
            Mode::Bar(Mutex::new(None))
        } else {
            Mode::Plain(Mutex::new(PlainState {
                what: String::new(),
                total: 0,
                done: 0,
                last: Instant::now(),
            }))
        };
        CliProgress { mode }
    }
}

/// A bar of `total` bytes, or a spinner if the total is unknown (0).
fn new_bar(what: &str, total: u64) -> ProgressBar {
    let bar = if total > 0 {
        ProgressBar::new(total).with_style(
            ProgressStyle::with_template(
                "{msg:>12} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .unwrap()
            .progress_chars("=> "),
        )
    } else {
        ProgressBar::new_spinner()
    };
    bar.set_message(what.to_owned());
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

impl PlainState {
    /// Counts `n` more bytes; prints a line if the last is 5 s old.
    fn advance(&mut self, n: u64) {
        self.done += n;
        if self.last.elapsed() < PLAIN_EVERY {
            return;
        }
        self.last = Instant::now();
        let pct = if self.total > 0 {
            self.done as f64 * 100.0 / self.total as f64
        } else {
            0.0
        };
        eprintln!(
            "vmdepot: {}: {:.0}% ({} of {})",
            self.what,
            pct,
            human(self.done),
            human(self.total)
        );
    }
}

impl Progress for CliProgress {
    fn begin(&self, what: &str, total: u64) {
        match &self.mode {
            Mode::Quiet => {}
            Mode::Bar(b) => *b.lock().unwrap() = Some(new_bar(what, total)),
            Mode::Plain(s) => {
                let mut s = s.lock().unwrap();
                s.what = what.to_owned();
                s.total = total;
                s.done = 0;
                s.last = Instant::now();
            }
        }
    }

    fn advance(&self, n: u64) {
        match &self.mode {
            Mode::Quiet => {}
            Mode::Bar(b) => {
                if let Some(bar) = b.lock().unwrap().as_ref() {
                    bar.inc(n);
                }
            }
            Mode::Plain(s) => s.lock().unwrap().advance(n),
        }
    }

    fn end(&self) {
        if let Mode::Bar(b) = &self.mode {
            if let Some(bar) = b.lock().unwrap().take() {
                bar.finish_and_clear();
            }
        }
    }
}
