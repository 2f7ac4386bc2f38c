//! The launcher's side of lazy disks (`--disk lazy`, the default): making
//! sure the image's disk server (`image::serve`) runs before QEMU starts,
//! the users lease QEMU inherits, the server of a `--foreground` start
//! (a thread of that process, on the instance's own socket), and the
//! restart of a server that died under running instances.
//!
//! A detached server is the `vmdepot` binary (hidden command `disk-server`),
//! started in a process group of its own. The binary is `VMDEPOT_BIN` if set,
//! else this process when it is `vmdepot`, else a `vmdepot` beside this
//! executable or one directory up (cargo's `target/*/deps/` layout), else
//! from `PATH`.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};

use crate::error::{Error, IoContext, Result};
use crate::image::serve::{self, server_files, Exports};
use crate::repo::{held, Repo};

/// How long a launch waits for a new disk server to listen.
const SERVER_START: Duration = Duration::from_secs(15);

/// The `vmdepot` binary that serves lazy disks.
pub(crate) fn server_binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("VMDEPOT_BIN").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(Error::Tool {
                tool: "lazy disk server".into(),
                detail: format!("VMDEPOT_BIN={} is not a file", p.display()),
            })
        };
    }
    let exe = std::env::current_exe().ok();
    if let Some(e) = &exe {
        if e.file_name().is_some_and(|n| n == "vmdepot") {
            return Ok(e.clone());
        }
        for dir in e.ancestors().skip(1).take(2) {
            let c = dir.join("vmdepot");
            if c.is_file() {
                return Ok(c);
            }
        }
    }
    let in_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|d| d.join("vmdepot"))
            .find(|p| p.is_file())
    });
    in_path.ok_or_else(|| Error::Tool {
        tool: "lazy disk server".into(),
        detail: "a lazy disk is served by the vmdepot binary, which is not beside this program \
                 or in PATH: set VMDEPOT_BIN, or launch with --disk overlay"
            .into(),
    })
}

/// A launch's hold on an image's disk server: a shared flock on
/// `serve/IMAGE.users`, kept until the QEMU it starts is up and connected
/// (the server does not exit while anyone holds it; after that, the
/// connection and the instance's row keep it).
pub(crate) struct UsersLease {
    _lock: Flock<File>,
}

/// Makes sure the disk server of `image` runs, for a QEMU about to start:
/// takes the users lease (waiting out a server that is exiting), starts a
/// server if none holds its lock, and waits until it listens.
pub(crate) fn ensure_server(repo: &Repo, image: &str) -> Result<UsersLease> {
    let f = server_files(repo.root(), image);
    repo.perms().mkdir_all(&serve::serve_dir(repo.root()))?;
    crate::launch::qemu::check_socket_path(&f.sock)?;
    let lock = repo.perms().flock(&f.users, FlockArg::LockShared)?;
    // An exiting server gave up its lock before the users lock we now
    // hold: a held lock is a server that stays.
    if !held(&f.lock) {
        let child = spawn_server(repo, image)?;
        wait_listening(&f, child)?;
    }
    Ok(UsersLease { _lock: lock })
}

/// Starts a detached server of `image` (it exits at once if another one
/// won a race to its lock).
fn spawn_server(repo: &Repo, image: &str) -> Result<Child> {
    let bin = server_binary()?;
    let f = server_files(repo.root(), image);
    let log = repo
        .perms()
        .open_options()
        .create(true)
        .append(true)
        .open(&f.log)
        .at(&f.log)?;
    let mut cmd = Command::new(&bin);
    cmd.env(
        "VMDEPOT_LOG",
        std::env::var("VMDEPOT_LOG").unwrap_or_else(|_| "info".into()),
    )
    .arg("--depot")
    .arg(repo.root())
    // The server acts for no account; a fixed valid label keeps a
    // caller's unusual user name or VMDEPOT_ACCOUNT from mattering.
    .arg("--account")
    .arg("disk-server")
    .arg("disk-server")
    .arg(image)
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(log);
    // A process group of its own: a Ctrl-C meant for the launcher does
    // not reach it.
    cmd.process_group(0);
    cmd.spawn().at(&bin)
}

/// Waits until the server on `f.sock` accepts connections. A child that
/// exits first either lost the race to another server (which then
/// listens) or failed: its log's last line is the error.
fn wait_listening(f: &serve::ServerFiles, mut child: Child) -> Result<()> {
    let deadline = Instant::now() + SERVER_START;
    let mut exited = false;
    loop {
        if std::os::unix::net::UnixStream::connect(&f.sock).is_ok() {
            // Reap it later: a detached server is its own session.
            std::thread::spawn(move || child.wait());
            return Ok(());
        }
        if !exited {
            if let Some(st) = child.try_wait().at(&f.log)? {
                exited = true;
                if !st.success() || !held(&f.lock) {
                    return Err(server_failed(f, &format!("it exited ({st})")));
                }
            }
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(server_failed(
                f,
                &format!(
                    "no server on {} after {} s",
                    f.sock.display(),
                    SERVER_START.as_secs()
                ),
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn server_failed(f: &serve::ServerFiles, what: &str) -> Error {
    let log = std::fs::read_to_string(&f.log).unwrap_or_default();
    let last = log
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    Error::Tool {
        tool: "vmdepot disk-server".into(),
        detail: format!(
            "the lazy disk server did not start: {what}; its log {} says: {}",
            f.log.display(),
            last.trim()
        ),
    }
}

/// Starts the server of `image` again if instances run from it and none
/// runs (it died): they reconnect (QEMU's `reconnect-delay`).
pub(crate) fn restart_if_gone(repo: &Repo, image: &str, instance_dir: &Path) {
    let f = server_files(repo.root(), image);
    // A foreground start serves its own disk (its socket exists while it
    // runs).
    if held(&f.lock) || instance_dir.join("disk.sock").exists() {
        return;
    }
    tracing::warn!("the disk server of image {image} is gone: starting it again");
    let line = match spawn_server(repo, image).and_then(|c| wait_listening(&f, c)) {
        Ok(()) => format!(
            "vmdepot: the disk server of image {image} was gone and is started again; the \
             guest's disk reads waited meanwhile, and failed if that took over {} s",
            crate::launch::qemu::RECONNECT_DELAY_SECS
        ),
        Err(e) => {
            tracing::warn!("{e}");
            format!("vmdepot: the disk server of image {image} is gone: {e}")
        }
    };
    serve::log_to_instance(repo.perms(), instance_dir, &line);
}

/// A foreground start's own disk server: a thread of this process serving
/// only that instance on `sock`, until dropped.
pub(crate) struct InProcess {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    sock: PathBuf,
}

impl InProcess {
    /// Serves instance `instance` of `image` on `sock`.
    pub(crate) fn start(
        repo: &Repo,
        image: &str,
        instance: &str,
        sock: &Path,
    ) -> Result<InProcess> {
        crate::launch::qemu::check_socket_path(sock)?;
        let exports = Exports::new(repo, image, Some(instance.to_owned()), None)?;
        let bound = serve::bind(repo, sock, exports)?;
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            serve::serve(bound.listener, bound.exports, &|_| s.load(Ordering::SeqCst));
        });
        Ok(InProcess {
            stop,
            thread: Some(thread),
            sock: sock.to_owned(),
        })
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.sock);
    }
}
