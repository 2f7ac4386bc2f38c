//! [`Instance`]: the handle on a launched instance that a test harness
//! holds. It reads the guest's serial console ([`Instance::serial`], line
//! by line as it comes with [`Instance::serial_lines`]), waits for a line
//! on it, writes to it, and stops or destroys the instance; an ephemeral
//! instance is destroyed when its handle drops.

use std::collections::VecDeque;
use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::depot::Depot;
use crate::error::{Error, Result};
use crate::launch::instance::InstanceInfo;

/// A handle on an instance. For an ephemeral launch, dropping it kills QEMU
/// and deletes the instance.
pub struct Instance {
    root: PathBuf,
    /// The account that launched it: stop and destroy act as it.
    account: String,
    info: InstanceInfo,
    ephemeral: bool,
    /// The serial console connection, once [`Instance::write_console`]
    /// opened it.
    console: Mutex<Option<UnixStream>>,
}

impl Instance {
    /// A handle on the instance `info` that `depot`'s account launched.
    pub(crate) fn new(depot: &Depot, info: InstanceInfo, ephemeral: bool) -> Instance {
        Instance {
            root: depot.root().to_owned(),
            account: depot.account().to_owned(),
            info,
            ephemeral,
            console: Mutex::new(None),
        }
    }

    /// The depot again, as the account that launched the instance.
    fn depot(&self) -> Result<Depot> {
        Depot::open(&self.root)?.with_account(self.account.as_str())
    }

    /// The instance as it was at launch (or at the last [`Instance::stop`]).
    pub fn info(&self) -> &InstanceInfo {
        &self.info
    }

    /// The instance's id (`ins-…`).
    pub fn id(&self) -> &str {
        &self.info.id
    }

    /// The instance's name.
    pub fn name(&self) -> &str {
        &self.info.name
    }

    /// Everything the guest wrote to its serial console so far.
    pub fn serial(&self) -> Result<String> {
        match fs::read(&self.info.serial_log) {
            Ok(b) => Ok(String::from_utf8_lossy(&b).into_owned()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
            Err(e) => Err(Error::io(&self.info.serial_log, e)),
        }
    }

    /// The lines the guest writes to its serial console in QEMU's current
    /// (or last) run, from the first, each as soon as it is complete (see
    /// [`SerialLines`]; [`Instance::serial`] has every run's).
    pub fn serial_lines(&self) -> SerialLines {
        SerialLines {
            path: self.info.serial_log.clone(),
            instance: format!("{} ({})", self.info.name, self.info.id),
            id: self.info.id.clone(),
            pid: self.info.pid,
            file: None,
            pending: Vec::new(),
            last: VecDeque::new(),
        }
    }

    /// Waits until a serial console line of the current run contains
    /// `needle` (a line still without its end too: a prompt); returns that
    /// line. Fails with [`Error::Timeout`] at the timeout, or with
    /// [`Error::GuestExited`] at once if QEMU is gone, quoting the end of
    /// the console log.
    #[tracing::instrument(skip_all, err(level = "debug"), fields(instance = %self.info.id))]
    pub fn wait_for_serial(&self, needle: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        let mut lines = self.serial_lines();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match lines.next_line(left.min(Duration::from_millis(100))) {
                Ok(l) if l.contains(needle) => return Ok(l),
                Ok(_) => {}
                Err(Error::Timeout { .. }) => {
                    // A prompt (`login: `) ends no line.
                    if let Some(p) = lines.partial().filter(|p| p.contains(needle)) {
                        return Ok(p);
                    }
                    if Instant::now() >= deadline {
                        return Err(lines.timeout(needle, timeout));
                    }
                }
                Err(Error::GuestExited { .. }) => return Err(lines.exited(needle)),
                Err(e) => return Err(e),
            }
        }
    }

    /// Writes `data` to the guest's serial console, as if typed there
    /// (end a command with `\n`). The handle keeps the console from then
    /// on, until it drops or [`Instance::release_console`]: QEMU serves one
    /// client at a time, so an `instance console` meanwhile is told it is
    /// busy. What the guest writes back is in its serial log as always.
    /// Fails with [`Error::ConsoleBusy`] if another client holds it.
    pub fn write_console(&self, data: &[u8]) -> Result<()> {
        let sock = &self.info.console_socket;
        let mut held = self.console.lock().unwrap_or_else(|e| e.into_inner());
        if held.is_none() {
            if crate::launch::process::console_attached(&self.info.qmp_socket) {
                return Err(Error::ConsoleBusy {
                    instance: format!("{} ({})", self.info.name, self.info.id),
                });
            }
            let stream = UnixStream::connect(sock).map_err(|e| Error::io(sock, e))?;
            // What QEMU sends this connection is the log's copy: read and
            // dropped, so that QEMU never waits for this client.
            let mut drain = stream.try_clone().map_err(|e| Error::io(sock, e))?;
            std::thread::spawn(move || std::io::copy(&mut drain, &mut std::io::sink()));
            *held = Some(stream);
        }
        let stream = held.as_mut().expect("connected above");
        if let Err(e) = stream.write_all(data).and_then(|_| stream.flush()) {
            *held = None;
            return Err(Error::io(sock, e));
        }
        Ok(())
    }

    /// Lets go of the serial console that [`Instance::write_console`] took.
    pub fn release_console(&self) {
        let mut held = self.console.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = held.take() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Stops the instance (power button, then kill after `timeout`: then
    /// [`Error::PowerButtonIgnored`], the instance stopped all the same).
    #[tracing::instrument(skip_all, err(level = "debug"), fields(instance = %self.info.id))]
    pub fn stop(&mut self, timeout: Duration) -> Result<()> {
        let depot = self.depot()?;
        let stopped = depot.stop_instance(&self.info.id, false, timeout);
        if let Err(Error::PowerButtonIgnored { .. }) = &stopped {
            self.info = depot.instance(&self.info.id)?;
        }
        self.info = stopped?;
        Ok(())
    }

    /// Kills QEMU and deletes the instance now.
    #[tracing::instrument(skip_all, err(level = "debug"), fields(instance = %self.info.id))]
    pub fn destroy(mut self) -> Result<()> {
        self.ephemeral = false;
        self.depot()?.delete_instance(&self.info.id, true)?;
        Ok(())
    }
}

/// How many of the last lines an error of [`SerialLines`] quotes.
const LAST_LINES: usize = 5;

/// The lines of an instance's serial console, read from its log as QEMU
/// writes them (from [`Instance::serial_lines`]). Each line comes without
/// its line end (`\n` or `\r\n`); bytes that are not UTF-8 are replaced.
///
/// As an [`Iterator`], it waits as long as it takes and ends once QEMU is
/// gone and every line is read (a last line without its end included);
/// [`SerialLines::next_line`] waits at most a given time.
pub struct SerialLines {
    path: PathBuf,
    /// `NAME (ID)`, for errors.
    instance: String,
    id: String,
    pid: Option<i32>,
    /// The log, once it exists, at the end of what was read.
    file: Option<File>,
    /// Bytes read after the last complete line.
    pending: Vec<u8>,
    /// The last lines returned, for errors.
    last: VecDeque<String>,
}

impl SerialLines {
    /// The next line, waiting up to `timeout` for it. Fails with
    /// [`Error::Timeout`] at the timeout (QEMU still runs), or with
    /// [`Error::GuestExited`] once QEMU is gone and no line is left.
    pub fn next_line(&mut self, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self.complete_line() {
                return Ok(line);
            }
            // Checked before the read, so that what QEMU wrote before it
            // went is still read.
            let alive = self
                .pid
                .is_some_and(|p| crate::proc::pid_alive(p, &self.id));
            if self.read_more()? {
                continue;
            }
            if !alive {
                if !self.pending.is_empty() {
                    let rest = std::mem::take(&mut self.pending);
                    return Ok(self.keep(&rest));
                }
                return Err(self.exited("a new line"));
            }
            if Instant::now() >= deadline {
                return Err(self.timeout("a new line", timeout));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// What was read after the last complete line (a prompt), if anything.
    fn partial(&self) -> Option<String> {
        (!self.pending.is_empty()).then(|| {
            String::from_utf8_lossy(&self.pending)
                .trim_end_matches(['\n', '\r'])
                .to_owned()
        })
    }

    /// A complete line from what was read, if there is one.
    fn complete_line(&mut self) -> Option<String> {
        let end = self.pending.iter().position(|&b| b == b'\n')?;
        let line: Vec<u8> = self.pending.drain(..=end).collect();
        Some(self.keep(&line))
    }

    /// `raw` as a line (its end trimmed), also kept for errors.
    fn keep(&mut self, raw: &[u8]) -> String {
        let line = String::from_utf8_lossy(raw)
            .trim_end_matches(['\n', '\r'])
            .to_owned();
        if self.last.len() == LAST_LINES {
            self.last.pop_front();
        }
        self.last.push_back(line.clone());
        line
    }

    /// Reads what the log gained; true if it gained something.
    fn read_more(&mut self) -> Result<bool> {
        if self.file.is_none() {
            match File::open(&self.path) {
                Ok(mut f) => {
                    // From where this run of QEMU began (the log is
                    // appended across runs).
                    let start = crate::launch::process::serial_start(&self.path);
                    let len = f.metadata().map_err(|e| Error::io(&self.path, e))?.len();
                    if start <= len {
                        f.seek(SeekFrom::Start(start))
                            .map_err(|e| Error::io(&self.path, e))?;
                    }
                    self.file = Some(f);
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
                Err(e) => return Err(Error::io(&self.path, e)),
            }
        }
        let f = self.file.as_mut().expect("opened above");
        let before = self.pending.len();
        f.read_to_end(&mut self.pending)
            .map_err(|e| Error::io(&self.path, e))?;
        if self.pending.len() == before {
            // A log that shrank (cleared by hand): read it from its start.
            let pos = f.stream_position().map_err(|e| Error::io(&self.path, e))?;
            let len = f.metadata().map_err(|e| Error::io(&self.path, e))?.len();
            if len < pos {
                f.seek(SeekFrom::Start(0))
                    .map_err(|e| Error::io(&self.path, e))?;
            }
        }
        Ok(self.pending.len() > before)
    }

    /// The last lines read, joined by ` | `.
    fn last_lines(&self) -> String {
        let last: Vec<&str> = self.last.iter().map(String::as_str).collect();
        last.join(" | ")
    }

    /// [`Error::Timeout`] for a wait of `waited` for `needle`.
    fn timeout(&self, needle: &str, waited: Duration) -> Error {
        Error::Timeout {
            instance: self.instance.clone(),
            needle: needle.to_owned(),
            waited,
            last: self.last_lines(),
        }
    }

    /// [`Error::GuestExited`] for a wait for `needle`.
    fn exited(&self, needle: &str) -> Error {
        Error::GuestExited {
            instance: self.instance.clone(),
            needle: needle.to_owned(),
            last: self.last_lines(),
        }
    }
}

impl Iterator for SerialLines {
    type Item = Result<String>;

    /// The next line, however long it takes; `None` once QEMU is gone and
    /// every line is read.
    fn next(&mut self) -> Option<Result<String>> {
        loop {
            match self.next_line(Duration::from_secs(3600)) {
                Err(Error::Timeout { .. }) => continue,
                Err(Error::GuestExited { .. }) => return None,
                r => return Some(r),
            }
        }
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.release_console();
        if self.ephemeral {
            if let Ok(d) = self.depot() {
                let _ = d.delete_instance(&self.info.id, true);
            }
        }
    }
}
