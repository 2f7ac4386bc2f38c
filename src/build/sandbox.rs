//! The sandbox that a build `--from` an image runs the image's programs
//! in. Such an image is content from the depot, not from the signed
//! mirror: its apt, dpkg, maintainer scripts and shell run as root, so a
//! chroot alone would hand them the host (a chroot is left with
//! `CAP_SYS_CHROOT`, a host disk is written through `mknod`, a host
//! process is traced through `/proc`).
//!
//! Each command runs in new mount, PID, IPC and UTS namespaces: its own
//! `/proc` (its own processes only; `/proc/sys` and `/proc/sysrq-trigger`
//! read-only) and a read-only `/sys`, mounted in its namespace and gone
//! with it; the command is PID 1 there, so whatever it leaves running dies
//! when it ends. Its capability bounding set keeps only what installing
//! packages needs ([`KEPT_CAPS`]: file ownership and modes, setuid/setgid,
//! kill): no mount, chroot, mknod, raw I/O, module, ptrace, admin or
//! network-admin capability. `/dev` is a private tmpfs with the few
//! character devices a package install uses (`private_dev`), never the
//! host's. What it still reaches: the network (apt fetches from the
//! mirror), the work directory's root filesystem and package cache.

use std::ffi::{CStr, CString};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

use crate::error::{IoContext, Result};

/// The capabilities a sandboxed command keeps (numbers of
/// `linux/capability.h`): CHOWN, DAC_OVERRIDE, FOWNER, FSETID, KILL,
/// SETGID, SETUID, SETPCAP, NET_BIND_SERVICE, AUDIT_WRITE, SETFCAP.
const KEPT_CAPS: &[libc::c_int] = &[0, 1, 3, 4, 5, 6, 7, 8, 10, 29, 31];

/// The highest capability number that any kernel may know (dropping an
/// unknown one fails with EINVAL, ignored).
const LAST_CAP: libc::c_int = 63;

/// `program args…` run in the sandbox with `root` as its root directory.
#[allow(unsafe_code)]
pub fn command(root: &Path, program: &str) -> Command {
    let c = |p: &Path| CString::new(p.as_os_str().as_bytes()).expect("a path holds no NUL byte");
    let root_c = c(root);
    let proc_c = c(&root.join("proc"));
    let proc_sys = c(&root.join("proc/sys"));
    let sysrq = c(&root.join("proc/sysrq-trigger"));
    let sys_c = c(&root.join("sys"));
    let mut cmd = Command::new(program);
    // SAFETY: between fork and exec only system calls run, on memory
    // allocated before the fork (no allocation, no lock).
    unsafe {
        cmd.pre_exec(move || {
            enter(&root_c, &proc_c, &proc_sys, &sysrq, &sys_c)?;
            Ok(())
        });
    }
    cmd
}

/// In the forked child: new namespaces, then a second fork whose child (PID
/// 1 of the new PID namespace) mounts, chroots, drops capabilities and
/// returns to exec the command; the first child waits for it and exits
/// with its status.
#[allow(unsafe_code)]
fn enter(
    root: &CString,
    proc_dir: &CString,
    proc_sys: &CString,
    sysrq: &CString,
    sys_dir: &CString,
) -> std::io::Result<()> {
    let fail = |r: libc::c_int| {
        if r < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(())
        }
    };
    // SAFETY: plain system calls on valid NUL-terminated strings.
    unsafe {
        fail(libc::unshare(
            libc::CLONE_NEWNS | libc::CLONE_NEWPID | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS,
        ))?;
        // Mounts made here never reach the host.
        fail(libc::mount(
            c"none".as_ptr(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ))?;
        let pid = libc::fork();
        if pid < 0 {
            return Err(std::io::Error::last_os_error());
        }
        if pid > 0 {
            // The first child: not the command. Its copy of the spawn's
            // status pipe closed (the parent learns of the exec from the
            // second child's), it waits and exits as the command did.
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
            let mut status = 0;
            while libc::waitpid(pid, &mut status, 0) < 0 {
                if *libc::__errno_location() != libc::EINTR {
                    libc::_exit(127);
                }
            }
            let code = if libc::WIFEXITED(status) {
                libc::WEXITSTATUS(status)
            } else {
                128 + libc::WTERMSIG(status)
            };
            libc::_exit(code);
        }
        // PID 1 of the new namespace.
        fail(libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL))?;
        let flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
        fail(libc::mount(
            c"proc".as_ptr(),
            proc_dir.as_ptr(),
            c"proc".as_ptr(),
            flags,
            std::ptr::null(),
        ))?;
        // A read-only bind of `src` at `dst`.
        let ro_bind = |src: &CStr, dst: &CStr| {
            fail(libc::mount(
                src.as_ptr(),
                dst.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND,
                std::ptr::null(),
            ))?;
            fail(libc::mount(
                std::ptr::null(),
                dst.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | flags,
                std::ptr::null(),
            ))
        };
        for p in [proc_sys, sysrq] {
            if libc::access(p.as_ptr(), libc::F_OK) < 0 {
                continue; // (a kernel without magic SysRq)
            }
            ro_bind(p, p)?;
        }
        // The host's sysfs (not its submounts).
        ro_bind(c"/sys", sys_dir)?;
        fail(libc::chroot(root.as_ptr()))?;
        fail(libc::chdir(c"/".as_ptr()))?;
        for cap in 0..=LAST_CAP {
            if !KEPT_CAPS.contains(&cap) {
                libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0);
            }
        }
    }
    Ok(())
}

/// A private `/dev` at `dev` (a tmpfs the caller mounted): null, zero,
/// full, random, urandom and tty, the standard links, and `pts/` and
/// `shm/` for the caller to mount.
pub fn populate_dev(dev: &Path) -> Result<()> {
    use nix::sys::stat::{makedev, mknod, Mode, SFlag};
    for (name, major, minor) in [
        ("null", 1, 3),
        ("zero", 1, 5),
        ("full", 1, 7),
        ("random", 1, 8),
        ("urandom", 1, 9),
        ("tty", 5, 0),
    ] {
        let p = dev.join(name);
        mknod(
            &p,
            SFlag::S_IFCHR,
            Mode::from_bits_truncate(0o666),
            makedev(major, minor),
        )
        .map_err(std::io::Error::from)
        .at(&p)?;
        std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o666)).at(&p)?;
    }
    for (name, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
        ("ptmx", "pts/ptmx"),
    ] {
        let p = dev.join(name);
        std::os::unix::fs::symlink(target, &p).at(&p)?;
    }
    for d in ["pts", "shm"] {
        let p = dev.join(d);
        std::fs::create_dir(&p).at(&p)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With the host's own root as the sandbox's (as root: CI is): the
    /// command is PID 1 and sees no other process, its bounding set is
    /// [`KEPT_CAPS`], it can mount nothing, and /proc/sys is read-only.
    #[test]
    fn a_sandboxed_command_sees_only_itself_and_keeps_few_capabilities() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        let out = command(Path::new("/"), "/bin/sh")
            .arg("-c")
            .arg(
                "echo pid=$$; ls /proc | grep -c '^[0-9]'; grep CapBnd /proc/self/status; \
                 mount -t tmpfs none /mnt 2>/dev/null && echo mounted; \
                 echo 1 > /proc/sys/kernel/sysrq 2>/dev/null && echo sysctl; \
                 mknod /tmp/vmdepot-sandbox-node b 8 0 2>/dev/null && echo mknod; exit 3",
            )
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(3), "{out:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "pid=1", "{text}");
        // sh and ls, grep (a pipe's processes): a handful, none of the host's
        let procs: u32 = lines[1].parse().unwrap();
        assert!(procs <= 4, "{text}");
        let bnd = u64::from_str_radix(lines[2].split_whitespace().nth(1).unwrap(), 16).unwrap();
        let want = KEPT_CAPS.iter().fold(0u64, |m, &c| m | 1 << c);
        assert_eq!(bnd, want, "{text}");
        assert_eq!(lines.len(), 3, "mount, sysctl or mknod worked: {text}");
    }
}
