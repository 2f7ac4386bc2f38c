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

/// The owner lease of this process: `BOOT_ID PIDNS PID START_TICKS`, what
/// an ephemeral instance records of the process it must not outlive (the
/// boot id and start time guard against pid reuse; PIDNS, the inode of
/// `/proc/self/ns/pid`, says which pid namespace the pid is of). `None`
/// where `/proc` does not say.
pub fn own_lease() -> Option<String> {
    let pid = std::process::id() as i32;
    Some(format!(
        "{} {} {pid} {}",
        boot_id()?,
        pid_ns()?,
        start_ticks(pid)?
    ))
}

/// Whether the process an owner lease names is surely gone: the lease is
/// of another boot, or of this boot and of this process's pid namespace
/// and no process of that pid and start time lives. A lease of another
/// pid namespace (a container sharing the depot) is never taken as gone:
/// its pid means nothing here. One that does not parse is gone.
pub fn lease_gone(lease: &str) -> bool {
    let f: Vec<&str> = lease.split(' ').collect();
    let [boot, ns, pid, start] = f[..] else {
        return true;
    };
    let (Ok(pid), Ok(start)) = (pid.parse::<i32>(), start.parse::<u64>()) else {
        return true;
    };
    if boot_id().as_deref() != Some(boot) {
        return true;
    }
    if pid_ns().as_deref() != Some(ns) {
        return false;
    }
    pid <= 0 || start_ticks(pid) != Some(start)
}

/// This process's pid namespace: the inode in `/proc/self/ns/pid`'s link
/// (`pid:[4026531836]`).
fn pid_ns() -> Option<String> {
    let link = std::fs::read_link("/proc/self/ns/pid").ok()?;
    let link = link.to_str()?;
    let ino = link.strip_prefix("pid:[")?.strip_suffix(']')?;
    ino.bytes()
        .all(|b| b.is_ascii_digit())
        .then(|| ino.to_owned())
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
        assert!(!lease_gone(&mine), "{mine}");
        let parts: Vec<&str> = mine.split(' ').collect();
        let with = |i: usize, v: &str| {
            let mut p = parts.clone();
            p[i] = v;
            p.join(" ")
        };
        // Another start time of this pid: a reused pid.
        let later = (parts[3].parse::<u64>().unwrap() + 1).to_string();
        assert!(lease_gone(&with(3, &later)));
        // Another boot.
        assert!(lease_gone(&with(0, "00000000-0000-0000-0000-000000000000")));
        // Another pid namespace: its pid means nothing here, never gone.
        assert!(!lease_gone(&with(1, "1")));
        assert!(!lease_gone(&with(3, &later).replacen(parts[1], "1", 1)));
        // A child that exited (and was reaped).
        let mut child = std::process::Command::new("sleep")
            .arg("0.2")
            .spawn()
            .unwrap();
        let lease = format!(
            "{} {} {} {}",
            parts[0],
            parts[1],
            child.id(),
            start_ticks(child.id() as i32).unwrap()
        );
        assert!(!lease_gone(&lease), "{lease}");
        child.wait().unwrap();
        assert!(lease_gone(&lease), "{lease}");
        for bad in ["", "x", "a b c d e", "a b -1 3", "a b 1 x"] {
            assert!(lease_gone(bad), "{bad:?}");
        }
    }
}
