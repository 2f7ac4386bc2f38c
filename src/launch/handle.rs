//! [`Instance`]: the handle on a launched instance that a test harness
//! holds. It reads the guest's serial console, waits for a line on it, and
//! stops or destroys the instance; an ephemeral instance is destroyed when
//! its handle drops.

use std::fs;
use std::path::PathBuf;
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
}

impl Instance {
    /// A handle on the instance `info` that `depot`'s account launched.
    pub(crate) fn new(depot: &Depot, info: InstanceInfo, ephemeral: bool) -> Instance {
        Instance {
            root: depot.root().to_owned(),
            account: depot.account().to_owned(),
            info,
            ephemeral,
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

    /// Whether the instance's QEMU still lives.
    fn alive(&self) -> bool {
        self.info
            .pid
            .is_some_and(|p| crate::proc::pid_alive(p, &self.info.id))
    }

    /// Waits until a serial console line contains `needle`; returns that
    /// line. Fails with [`Error::Timeout`] at the timeout, or with
    /// [`Error::GuestExited`] at once if QEMU is gone, quoting the end of
    /// the console log.
    #[tracing::instrument(skip_all, err(level = "debug"), fields(instance = %self.info.id))]
    pub fn wait_for_serial(&self, needle: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let log = self.serial()?;
            if let Some(l) = log.lines().find(|l| l.contains(needle)) {
                return Ok(l.trim_end_matches('\r').to_owned());
            }
            let instance = format!("{} ({})", self.info.name, self.info.id);
            if !self.alive() {
                return Err(Error::GuestExited {
                    instance,
                    needle: needle.to_owned(),
                    last: last_lines(&log, 5),
                });
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    instance,
                    needle: needle.to_owned(),
                    waited: timeout,
                    last: last_lines(&log, 5),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
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

/// The last `n` lines of `log`, joined by ` | `.
fn last_lines(log: &str, n: usize) -> String {
    let tail: Vec<&str> = log.lines().rev().take(n).collect();
    let tail: Vec<&str> = tail.into_iter().rev().collect();
    tail.join(" | ")
}

impl Drop for Instance {
    fn drop(&mut self) {
        if self.ephemeral {
            if let Ok(d) = self.depot() {
                let _ = d.delete_instance(&self.info.id, true);
            }
        }
    }
}
