//! Processes vmdepot started: whether one still lives, and its pid file.
//! Shared by the layers that start QEMU and those that must not disturb a
//! running one (launch bases, repair).

use std::path::Path;

/// Whether `pid` is a live QEMU started for `tag` (guards against pid reuse).
pub fn pid_alive(pid: i32, tag: &str) -> bool {
    if pid <= 0 {
        return false;
    }
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    // A zombie has an empty cmdline: dead for our purposes.
    let needle = format!("process=vmdepot-{tag}");
    cmdline
        .split(|&b| b == 0)
        .any(|arg| String::from_utf8_lossy(arg).contains(&needle))
}

/// Reads a pid file written by QEMU.
pub fn read_pidfile(p: &Path) -> Option<i32> {
    std::fs::read_to_string(p).ok()?.trim().parse().ok()
}
