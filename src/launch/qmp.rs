//! The QMP client: [`Qmp`] (a connection, capabilities negotiated, and the
//! few commands vmdepot runs), [`QmpError`] (what goes wrong on one) and
//! [`RunState`] (the guest's state as `query-status` names it).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::error::{Error, IoContext, Result};

/// What went wrong talking QMP (on a connection that was made: failing to
/// connect is an I/O error on the socket).
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// Reading or writing the socket failed (a timeout included).
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// QEMU closed the connection.
    #[error("QEMU closed the QMP connection")]
    Closed,
    /// A line that is not a JSON message.
    #[error("bad QMP message: {0}")]
    BadMessage(#[from] serde_json::Error),
    /// The first message is not QMP's greeting.
    #[error("unexpected greeting {0}")]
    Greeting(Value),
    /// QEMU refused a command.
    #[error("{cmd}: {desc}")]
    Command { cmd: String, desc: String },
}

impl QmpError {
    /// The crate's error for this one, naming the QMP socket `sock`.
    pub fn at(self, sock: &Path) -> Error {
        Error::Tool {
            tool: "qemu (QMP)".into(),
            detail: format!("{}: {self}", sock.display()),
        }
    }
}

impl From<QmpError> for Error {
    /// An error of a QMP command, once connected (named `QMP`).
    fn from(e: QmpError) -> Error {
        e.at(Path::new("QMP"))
    }
}

/// The guest's run state as QMP `query-status` reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RunState {
    /// The guest's CPUs run.
    Running,
    /// The guest's CPUs are stopped (QMP `stop`).
    Paused,
    /// KVM could not run the guest (QEMU does not exit).
    InternalError,
    /// Any other state QEMU names (`io-error`, `shutdown`, …).
    Other(String),
}

impl RunState {
    fn parse(s: &str) -> RunState {
        match s {
            "running" => RunState::Running,
            "paused" => RunState::Paused,
            "internal-error" => RunState::InternalError,
            s => RunState::Other(s.to_owned()),
        }
    }

    /// QEMU's name of the state.
    pub fn as_str(&self) -> &str {
        match self {
            RunState::Running => "running",
            RunState::Paused => "paused",
            RunState::InternalError => "internal-error",
            RunState::Other(s) => s,
        }
    }
}

/// A QMP connection (capabilities negotiated).
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Connects, waiting at most 10 s for each answer.
    pub fn connect(sock: &Path) -> Result<Qmp> {
        Qmp::connect_timeout(sock, Duration::from_secs(10))
    }

    /// Connects, waiting at most `timeout` for each answer (QEMU serves one
    /// QMP client at a time: a second one waits, unanswered, until the
    /// first disconnects).
    pub fn connect_timeout(sock: &Path, timeout: Duration) -> Result<Qmp> {
        let s = UnixStream::connect(sock).at(sock)?;
        s.set_read_timeout(Some(timeout)).at(sock)?;
        let writer = s.try_clone().at(sock)?;
        let mut q = Qmp {
            reader: BufReader::new(s),
            writer,
        };
        q.negotiate().map_err(|e| e.at(sock))?;
        Ok(q)
    }

    /// Reads QMP's greeting and leaves capabilities negotiation mode.
    fn negotiate(&mut self) -> std::result::Result<(), QmpError> {
        let greeting = self.read_msg()?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Greeting(greeting));
        }
        self.execute("qmp_capabilities", json!({}))?;
        Ok(())
    }

    /// Retries while the socket is not there yet (QEMU starting).
    pub fn connect_retry(sock: &Path, timeout: Duration) -> Result<Qmp> {
        Qmp::connect_until(sock, timeout, || false)
    }

    /// [`Qmp::connect_retry`] that gives up at once when `gone()` says
    /// QEMU exited.
    pub(crate) fn connect_until(
        sock: &Path,
        timeout: Duration,
        gone: impl Fn() -> bool,
    ) -> Result<Qmp> {
        let deadline = Instant::now() + timeout;
        loop {
            match Qmp::connect(sock) {
                Ok(q) => return Ok(q),
                Err(e) if gone() || Instant::now() >= deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    fn read_msg(&mut self) -> std::result::Result<Value, QmpError> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(QmpError::Closed);
        }
        Ok(serde_json::from_str(&line)?)
    }

    /// Runs a command; returns its `return` value. Events are skipped.
    pub fn execute(&mut self, cmd: &str, args: Value) -> std::result::Result<Value, QmpError> {
        let msg = json!({ "execute": cmd, "arguments": args });
        let mut line = serde_json::to_vec(&msg)?;
        line.push(b'\n');
        self.writer.write_all(&line)?;
        loop {
            let m = self.read_msg()?;
            if let Some(r) = m.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = m.get("error") {
                return Err(QmpError::Command {
                    cmd: cmd.to_owned(),
                    desc: e
                        .get("desc")
                        .and_then(Value::as_str)
                        .unwrap_or("error")
                        .to_owned(),
                });
            }
        }
    }

    /// The guest's run state.
    pub fn run_state(&mut self) -> Result<RunState> {
        let r = self.execute("query-status", json!({}))?;
        Ok(RunState::parse(
            r.get("status").and_then(Value::as_str).unwrap_or("unknown"),
        ))
    }

    /// Whether a client is connected to the socket chardev `label` (QEMU
    /// serves one at a time and names a free one `disconnected:…`); `None`
    /// if there is no such chardev.
    pub fn chardev_connected(&mut self, label: &str) -> Result<Option<bool>> {
        let r = self.execute("query-chardev", json!({}))?;
        Ok(r.as_array().and_then(|devs| {
            devs.iter()
                .find(|d| d.get("label").and_then(Value::as_str) == Some(label))
                .and_then(|d| d.get("filename").and_then(Value::as_str))
                .map(|f| !f.starts_with("disconnected:"))
        }))
    }

    /// Presses the ACPI power button.
    pub fn powerdown(&mut self) -> Result<()> {
        self.execute("system_powerdown", json!({}))?;
        Ok(())
    }

    /// Pauses the guest's CPUs; QEMU drains and flushes its disks first, so
    /// the disk files are consistent until [`Qmp::resume`].
    pub fn pause(&mut self) -> Result<()> {
        self.execute("stop", json!({}))?;
        Ok(())
    }

    /// Lets the guest's CPUs run again.
    pub fn resume(&mut self) -> Result<()> {
        self.execute("cont", json!({}))?;
        Ok(())
    }
}
