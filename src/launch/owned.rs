//! QEMUs that die with the process that launched them: the QEMU of an
//! ephemeral instance. It is not daemonized but a child of this process,
//! with `PR_SET_PDEATHSIG` = SIGKILL: when this process ends, however it
//! ends (a test runner's SIGKILL included), the kernel kills it.
//!
//! The kernel sends that signal when the *thread* that forked the child
//! ends, not the process: so every such QEMU is forked by one thread that
//! lives as long as the process (the spawner), and another thread per
//! QEMU waits for it (no zombie is left when it exits).

use std::io;
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitStatus};
use std::sync::mpsc::{channel, Receiver, Sender, TryRecvError};
use std::sync::{Mutex, OnceLock};

/// A QEMU that is a child of this process and dies with it.
pub(crate) struct OwnedChild {
    pid: u32,
    exited: Receiver<io::Result<ExitStatus>>,
}

impl OwnedChild {
    /// Its pid.
    pub(crate) fn pid(&self) -> u32 {
        self.pid
    }

    /// Whether it has exited (and been waited for).
    pub(crate) fn exited(&self) -> bool {
        !matches!(self.exited.try_recv(), Err(TryRecvError::Empty))
    }
}

type Request = (Command, Sender<io::Result<OwnedChild>>);

/// The spawner thread's queue, started at the first spawn and never
/// stopped.
fn spawner() -> &'static Mutex<Sender<Request>> {
    static SPAWNER: OnceLock<Mutex<Sender<Request>>> = OnceLock::new();
    SPAWNER.get_or_init(|| {
        let (tx, rx) = channel::<Request>();
        std::thread::Builder::new()
            .name("vmdepot-spawner".into())
            .spawn(move || {
                for (cmd, reply) in rx {
                    let _ = reply.send(spawn_here(cmd));
                }
            })
            .expect("the spawner thread starts");
        Mutex::new(tx)
    })
}

/// Forks `cmd` on this thread (the spawner) with its death signal set, and
/// starts its waiter.
fn spawn_here(mut cmd: Command) -> io::Result<OwnedChild> {
    let parent = nix::unistd::getpid();
    set_death_signal(&mut cmd, parent);
    let mut child = cmd.spawn()?;
    let pid = child.id();
    let (tx, exited) = channel();
    std::thread::Builder::new()
        .name(format!("vmdepot-wait-{pid}"))
        .spawn(move || {
            let _ = tx.send(child.wait());
        })?;
    Ok(OwnedChild { pid, exited })
}

/// Between fork and exec: SIGKILL when the forking thread ends, and an end
/// at once if the parent `parent` already did (the signal would never
/// come).
#[allow(unsafe_code)]
fn set_death_signal(cmd: &mut Command, parent: nix::unistd::Pid) {
    let hook = move || {
        nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
            .map_err(io::Error::from)?;
        if nix::unistd::getppid() != parent {
            return Err(io::Error::other("its owner is gone"));
        }
        Ok(())
    };
    // SAFETY: the hook runs in the forked child before exec and only makes
    // two system calls (prctl, getppid): async-signal-safe, no allocation
    // on success, no lock taken.
    unsafe {
        cmd.pre_exec(hook);
    }
}

/// Starts `cmd` as a child that dies with this process.
pub(crate) fn spawn_owned(cmd: Command) -> io::Result<OwnedChild> {
    let (tx, rx) = channel();
    spawner()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .send((cmd, tx))
        .map_err(|_| io::Error::other("the spawner thread is gone"))?;
    rx.recv()
        .map_err(|_| io::Error::other("the spawner thread is gone"))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn wait_until(mut f: impl FnMut() -> bool) -> bool {
        let end = Instant::now() + Duration::from_secs(10);
        while Instant::now() < end {
            if f() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    #[test]
    fn a_child_spawned_from_a_thread_that_ends_lives_on_and_is_waited_for() {
        // Spawned from a short-lived thread: the spawner forks it, so the
        // thread's end does not kill it.
        let child = std::thread::spawn(|| {
            let mut cmd = Command::new("sleep");
            cmd.arg("0.5");
            spawn_owned(cmd).unwrap()
        })
        .join()
        .unwrap();
        std::thread::sleep(Duration::from_millis(100));
        assert!(!child.exited(), "killed when the launching thread ended");
        assert!(wait_until(|| child.exited()), "never waited for");
        // Waited for: no zombie under its pid.
        assert!(!std::path::Path::new(&format!("/proc/{}", child.pid())).exists());
    }

    #[test]
    fn a_missing_program_is_an_error() {
        assert!(spawn_owned(Command::new("/nonexistent/qemu")).is_err());
    }
}
