//! The guard on the guests a test boots. [`reap`] runs when a test's depot
//! helper `T` drops (also while a failed assert unwinds): it kills every
//! QEMU started in the test's directory, so no daemonized QEMU outlives its
//! test, and when the test failed it first prints, for each instance, its
//! serial console log and QEMU's own log (`qemu.log`, which only a
//! foreground QEMU has: a daemonized one's stderr ends at `-daemonize`).
//!
//! QEMUs are found by their instance's `qemu.pid`, killed only when
//! `/proc/PID/cmdline` names that instance (a reused pid is never killed),
//! then by a sweep of `/proc` for any other QEMU of an instance whose
//! command line names the test's directory (one whose pid file is gone).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::common::{alive, disk_servers_in, procs_naming};

/// How much of a log the guard prints (its end).
const LOG_TAIL: usize = 32 << 10;

/// One instance directory of a depot in the test's directory.
struct Guest {
    dir: PathBuf,
    /// The instance id (the directory's name, `ins-<16 hex>`).
    id: String,
}

impl Guest {
    /// The pid of this instance's QEMU, when its pid file names a live
    /// process whose command line names the instance.
    fn qemu(&self) -> Option<i32> {
        let pid: i32 = std::fs::read_to_string(self.dir.join("qemu.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let names_it = String::from_utf8_lossy(&cmdline).contains(&self.id);
        (names_it && alive(pid.into())).then_some(pid)
    }

    /// Prints what the guest and its QEMU said.
    fn dump(&self) {
        let qemu = match self.qemu() {
            Some(pid) => format!("QEMU pid {pid} still runs"),
            None => "no QEMU runs".to_owned(),
        };
        eprintln!("=== guard: instance {} ({qemu}) ===", self.id);
        print_tail(&self.dir.join("serial.log"));
        let log = self.dir.join("qemu.log");
        if log.exists() {
            print_tail(&log);
        } else {
            eprintln!("--- no qemu.log (QEMU ran daemonized: its stderr ends at -daemonize) ---");
        }
    }
}

/// Kills the QEMUs of every depot directly under `root` (a test's
/// directory); with `failed`, prints each instance's logs first.
pub fn reap(root: &Path, failed: bool) {
    let guests = guests(root);
    if failed {
        for g in &guests {
            g.dump();
        }
    }
    let mut pids: Vec<i32> = guests.iter().filter_map(Guest::qemu).collect();
    let strays = procs_naming(&format!("{}/", root.display()))
        .into_iter()
        .filter(|p| is_instance_qemu(*p) && !pids.contains(p))
        .collect::<Vec<_>>();
    pids.extend(strays);
    for pid in pids {
        kill(pid);
        if failed {
            eprintln!("=== guard: killed QEMU pid {pid} ===");
        }
    }
    // Lazy disk servers exit by themselves once their QEMUs are gone.
    let servers = || disk_servers_in(root);
    let end = Instant::now() + Duration::from_secs(5);
    while !servers().is_empty() && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(50));
    }
    for pid in servers() {
        eprintln!("=== guard: disk server pid {pid} outlived its QEMUs: killed ===");
        kill(pid);
    }
}

/// `ROOT/*/instances/*`: the instances of every depot in the test's
/// directory (`T::depot()`, and the depots a test makes beside it).
fn guests(root: &Path) -> Vec<Guest> {
    let mut v = Vec::new();
    for depot in read_dir(root) {
        for dir in read_dir(&depot.join("instances")) {
            let id = dir.file_name().unwrap().to_string_lossy().into_owned();
            if id.starts_with("ins-") {
                v.push(Guest { dir, id });
            }
        }
    }
    v.sort_by(|a, b| a.id.cmp(&b.id));
    v
}

fn read_dir(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

/// A QEMU the launcher started: its `-name` says `process=vmdepot-ins-…`.
fn is_instance_qemu(pid: i32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|c| String::from_utf8_lossy(&c).contains("process=vmdepot-ins-"))
}

/// SIGKILL, then waits (a few seconds at most) until it is gone.
fn kill(pid: i32) {
    use nix::sys::signal::{kill, Signal};
    let _ = kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
    let end = Instant::now() + Duration::from_secs(10);
    while alive(pid.into()) && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Prints the end of a log file, headed by its path.
pub fn print_tail(path: &Path) {
    match std::fs::read(path) {
        Ok(bytes) => {
            let from = bytes.len().saturating_sub(LOG_TAIL);
            eprintln!(
                "--- {} (last {} bytes) ---",
                path.display(),
                bytes.len() - from
            );
            eprintln!("{}", String::from_utf8_lossy(&bytes[from..]));
        }
        Err(e) => eprintln!("--- {}: {e} ---", path.display()),
    }
}
