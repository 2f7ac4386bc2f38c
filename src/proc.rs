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

/// The owner lease of this process: `BOOT_ID PID START_TICKS`, what an
/// ephemeral instance records of the process it must not outlive (the
/// start time and boot id guard against pid reuse). `None` where `/proc`
/// does not say.
pub fn own_lease() -> Option<String> {
    let pid = std::process::id() as i32;
    Some(format!("{} {pid} {}", boot_id()?, start_ticks(pid)?))
}

/// Whether the process an owner lease names still lives. A lease of
/// another boot, or one that does not parse, is not held.
pub fn lease_held(lease: &str) -> bool {
    let mut it = lease.split(' ');
    let (Some(boot), Some(pid), Some(start), None) = (it.next(), it.next(), it.next(), it.next())
    else {
        return false;
    };
    let (Ok(pid), Ok(start)) = (pid.parse::<i32>(), start.parse::<u64>()) else {
        return false;
    };
    pid > 0 && boot_id().as_deref() == Some(boot) && start_ticks(pid) == Some(start)
}

/// This boot's id (`/proc/sys/kernel/random/boot_id`).
fn boot_id() -> Option<String> {
    let id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    Some(id.trim().to_owned()).filter(|s| !s.is_empty() && !s.contains(' '))
}

/// When `pid` started, in clock ticks after boot (`/proc/PID/stat`'s 22nd
/// field); `None` for a process that is gone or a zombie.
fn start_ticks(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: the
    // fields after it start after its last ')', with field 3 (the state).
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    if fields.first() == Some(&"Z") {
        return None;
    }
    fields.get(22 - 3)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_lease_is_held_and_others_are_not() {
        let mine = own_lease().expect("a lease from /proc");
        assert!(lease_held(&mine), "{mine}");
        let mut parts: Vec<String> = mine.split(' ').map(str::to_owned).collect();
        // Another start time of this pid: a reused pid.
        parts[2] = (parts[2].parse::<u64>().unwrap() + 1).to_string();
        assert!(!lease_held(&parts.join(" ")));
        // Another boot.
        let other_boot = format!(
            "00000000-0000-0000-0000-000000000000 {}",
            std::process::id()
        );
        assert!(!lease_held(&format!("{other_boot} 1")));
        // A child that exited (and was reaped).
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let lease = format!("{} {} {}", boot_id().unwrap(), child.id(), {
            start_ticks(child.id() as i32).unwrap_or(0)
        });
        child.wait().unwrap();
        assert!(!lease_held(&lease), "{lease}");
        for bad in ["", "x", "a b c d", "a -1 3", "a 1 x"] {
            assert!(!lease_held(bad), "{bad:?}");
        }
    }
}
