//! The host side of a build: its work directory (under the depot's `tmp/`,
//! locked while the build runs), the mounts made for the chroot (undone in
//! reverse, also when the build fails or is interrupted), the external
//! commands (their output into the build's log, a signal stops them), and
//! the sweep of what a killed build left (mounts, processes, files).

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use nix::fcntl::{Flock, FlockArg};

use crate::error::{one_line, Error, IoContext, Result};

/// The prefix of a build's work directory under the depot's `tmp/`.
const PREFIX: &str = "build-";

/// How long a failed build's log is kept (the sweep of a later build
/// removes it).
const LOG_KEPT: Duration = Duration::from_secs(7 * 24 * 3600);

/// A build's work directory, its log, the mounts made and the signal
/// watch; dropping it undoes the mounts and removes the directory.
pub struct Work {
    /// `DEPOT/tmp/build-HEX`.
    pub dir: PathBuf,
    /// The build's log: `DEPOT/tmp/build-HEX.log`, kept when the build fails.
    pub log_path: PathBuf,
    log: File,
    _lock: Flock<File>,
    /// The package cache's lock, while the build uses it.
    cache_lock: Option<Flock<File>>,
    mounts: Vec<PathBuf>,
    catching: Option<Catching>,
    /// Keep the log when the build is dropped (it failed).
    pub keep_log: bool,
}

impl Work {
    /// Sweeps what killed builds left in `tmp`, then makes a new work
    /// directory there.
    pub fn create(tmp: &Path) -> Result<Work> {
        sweep(tmp);
        let hex = crate::ids::random_hex(8);
        // Made and locked under a name a sweep skips, then renamed: a
        // concurrent sweep never finds it unlocked.
        let new = tmp.join(format!(".new-{PREFIX}{hex}"));
        fs::DirBuilder::new().mode(0o700).create(&new).at(&new)?;
        let lock = File::create(new.join(".lock")).at(&new)?;
        let lock = Flock::lock(lock, FlockArg::LockExclusiveNonblock)
            .map_err(|(_, e)| Error::io(&new, e.into()))?;
        let dir = tmp.join(format!("{PREFIX}{hex}"));
        fs::rename(&new, &dir).at(&dir)?;
        let log_path = dir.with_extension("log");
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&log_path)
            .at(&log_path)?;
        Ok(Work {
            dir,
            log_path,
            log,
            _lock: lock,
            cache_lock: None,
            mounts: Vec::new(),
            catching: Some(Catching::start(true)?),
            keep_log: true,
        })
    }

    /// Whether SIGINT, SIGTERM and SIGHUP stop the build (while commands
    /// run and mounts exist) or end the process (while a copy or the
    /// import runs: nothing of them is mounted or committed before the
    /// end, and the next build sweeps the directory). A signal caught
    /// meanwhile fails the build when it catches them again.
    pub fn catch_signals(&mut self, on: bool) -> Result<()> {
        match (on, self.catching.is_some()) {
            (true, false) => {
                self.catching = Some(Catching::start(false)?);
                self.check_stop()
            }
            (false, true) => {
                self.check_stop()?;
                self.catching = None;
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Takes the package cache `dir` (made if missing) for this build:
    /// another build that uses it is waited for, and named.
    pub fn lock_cache(&mut self, dir: &Path) -> Result<()> {
        fs::create_dir_all(dir).at(dir)?;
        let p = dir.join(".lock");
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&p)
            .at(&p)?;
        let lock = match Flock::lock(f, FlockArg::LockExclusiveNonblock) {
            Ok(l) => l,
            Err((f, _)) => {
                tracing::warn!(
                    "waiting for the other build that uses the package cache {}",
                    dir.display()
                );
                loop {
                    self.check_stop()?;
                    match Flock::lock(f.try_clone().at(&p)?, FlockArg::LockExclusiveNonblock) {
                        Ok(l) => break l,
                        Err(_) => std::thread::sleep(Duration::from_millis(200)),
                    }
                }
            }
        };
        self.cache_lock = Some(lock);
        Ok(())
    }

    /// A line in the build's log.
    pub fn note(&mut self, line: &str) {
        let _ = writeln!(self.log, "vmdepot: {line}");
    }

    /// Fails when a signal asked the build to stop.
    pub fn check_stop(&self) -> Result<()> {
        match stopped() {
            true => Err(interrupted()),
            false => Ok(()),
        }
    }

    /// Runs `cmd` (named `what` in errors), its output into the log, in
    /// its own process group; a signal to vmdepot kills that group. Fails
    /// with the command's last lines of output when it exits non-zero.
    pub fn run(&mut self, what: &str, cmd: &mut Command) -> Result<()> {
        self.check_stop()?;
        self.note(&format!("$ {what}"));
        let start = self.log.metadata().map(|m| m.len()).unwrap_or(0);
        let out = self.log.try_clone().at(&self.log_path)?;
        let err = self.log.try_clone().at(&self.log_path)?;
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0)
            .spawn()
            .map_err(|e| Error::Tool {
                tool: what.to_owned(),
                detail: format!(
                    "cannot run it: {e} (image build needs: apt-get install debootstrap \
                     e2fsprogs mount util-linux debian-archive-keyring)"
                ),
            })?;
        let status = loop {
            if let Some(s) = child.try_wait().at(&self.log_path)? {
                break s;
            }
            if stopped() {
                let pg = nix::unistd::Pid::from_raw(-(child.id() as i32));
                let _ = nix::sys::signal::kill(pg, nix::sys::signal::SIGKILL);
                let _ = child.wait();
                return Err(interrupted());
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        if status.success() {
            return Ok(());
        }
        Err(Error::Tool {
            tool: what.to_owned(),
            detail: format!(
                "{status}: {} (the build's log: {})",
                self.tail(start),
                self.log_path.display()
            ),
        })
    }

    /// The last lines the log received since byte `start`, on one line.
    fn tail(&self, start: u64) -> String {
        let text = fs::read(&self.log_path).unwrap_or_default();
        let text = String::from_utf8_lossy(&text[(start as usize).min(text.len())..]).into_owned();
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        one_line(&lines[lines.len().saturating_sub(3)..].join(" / "))
    }

    /// `mount ARGS… TARGET`, undone when the work is dropped.
    pub fn mount(&mut self, args: &[&str], target: &Path) -> Result<()> {
        let mut cmd = Command::new("mount");
        cmd.args(args).arg(target);
        self.run(&format!("mount {}", target.display()), &mut cmd)?;
        self.mounts.push(target.to_owned());
        Ok(())
    }

    /// Unmounts what was mounted after the first `keep` mounts, in
    /// reverse order, the processes in the chroot `root` killed first.
    pub fn unmount_to(&mut self, root: &Path, keep: usize) -> Result<()> {
        kill_rooted_under(root);
        while self.mounts.len() > keep {
            let m = self.mounts.pop().expect("len > keep");
            let mut cmd = Command::new("umount");
            cmd.arg(&m);
            if let Err(e) = self.run(&format!("umount {}", m.display()), &mut cmd) {
                std::thread::sleep(Duration::from_millis(500));
                kill_rooted_under(root);
                let mut again = Command::new("umount");
                again.arg(&m);
                if self
                    .run(&format!("umount {}", m.display()), &mut again)
                    .is_err()
                {
                    self.mounts.push(m);
                    return Err(e);
                }
            }
        }
        Ok(())
    }
}

impl Drop for Work {
    fn drop(&mut self) {
        let dir = self.dir.clone();
        kill_rooted_under(&dir);
        for m in self.mounts.drain(..).rev() {
            unmount(&m);
        }
        // (and one a signal interrupted after mount(2), before it was
        // recorded)
        for m in mounts_under(&dir).into_iter().rev() {
            unmount(&m);
        }
        if mounts_under(&dir).is_empty() {
            let _ = fs::remove_dir_all(&dir);
        } else {
            tracing::warn!(dir = %dir.display(), "mounts remain under a build's work directory; the next build removes it");
        }
        if !self.keep_log {
            let _ = fs::remove_file(&self.log_path);
        }
    }
}

/// The signal hooks, installed by the first build of the process.
struct Hooks {
    /// Set by SIGINT, SIGTERM or SIGHUP while a build catches them.
    stop: Arc<AtomicBool>,
    /// Per signal: take its default action (the end of the process). True
    /// while no build catches the signals, unless the process had its own
    /// handler before the first build (that one is called instead).
    default: Vec<Arc<AtomicBool>>,
}

static HOOKS: OnceLock<Hooks> = OnceLock::new();
/// Builds that catch the signals now.
static CATCHING: AtomicUsize = AtomicUsize::new(0);

fn hooks() -> Result<&'static Hooks> {
    static INIT: Mutex<()> = Mutex::new(());
    if let Some(h) = HOOKS.get() {
        return Ok(h);
    }
    let _once = INIT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(h) = HOOKS.get() {
        return Ok(h);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let mut default = Vec::new();
    for s in SIGNALS {
        let own = had_handler(s);
        let d = Arc::new(AtomicBool::new(true));
        if !own {
            signal_hook::flag::register_conditional_default(s, d.clone()).at("signal handler")?;
        }
        signal_hook::flag::register(s, stop.clone()).at("signal handler")?;
        default.push(d);
    }
    Ok(HOOKS.get_or_init(|| Hooks { stop, default }))
}

/// Whether a signal asked the builds to stop.
fn stopped() -> bool {
    HOOKS.get().is_some_and(|h| h.stop.load(Ordering::SeqCst))
}

/// While it lives, SIGINT, SIGTERM and SIGHUP stop the build (its commands
/// killed, its mounts undone) instead of ending the process; afterwards
/// they do what they did before (signal-hook's handlers stay installed and
/// take the default action: unregistering would leave them swallowing
/// the signals).
struct Catching;

impl Catching {
    /// `fresh`: a new build (a signal before it, when no other build
    /// caught it, is forgotten); else a build catching them again (one
    /// caught meanwhile fails it).
    fn start(fresh: bool) -> Result<Catching> {
        let h = hooks()?;
        if CATCHING.fetch_add(1, Ordering::SeqCst) == 0 && fresh {
            h.stop.store(false, Ordering::SeqCst);
        }
        for d in &h.default {
            d.store(false, Ordering::SeqCst);
        }
        Ok(Catching)
    }
}

impl Drop for Catching {
    fn drop(&mut self) {
        if CATCHING.fetch_sub(1, Ordering::SeqCst) == 1 {
            for d in HOOKS.get().map(|h| &h.default[..]).unwrap_or_default() {
                d.store(true, Ordering::SeqCst);
            }
        }
    }
}

const SIGNALS: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

/// Whether the process handles (or ignores) signal `s` itself.
#[allow(unsafe_code)]
fn had_handler(s: libc::c_int) -> bool {
    // SAFETY: reads the disposition only (a null new action).
    unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        libc::sigaction(s, std::ptr::null(), &mut old) == 0 && old.sa_sigaction != libc::SIG_DFL
    }
}

fn interrupted() -> Error {
    Error::Tool {
        tool: "image build".into(),
        detail: "interrupted by a signal: nothing was imported, and the build's mounts and files are removed".into(),
    }
}

/// `umount TARGET`, lazily if it is busy.
fn unmount(target: &Path) {
    let quiet = |lazy: bool| {
        let mut c = Command::new("umount");
        if lazy {
            c.arg("-l");
        }
        c.arg(target)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !quiet(false) {
        std::thread::sleep(Duration::from_millis(300));
        if !quiet(false) {
            quiet(true);
        }
    }
}

/// Kills (SIGKILL) every process whose root directory is `dir` or under
/// it: daemons that maintainer scripts started in the chroot despite
/// policy-rc.d.
pub fn kill_rooted_under(dir: &Path) {
    let Ok(rd) = fs::read_dir("/proc") else {
        return;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if let Ok(root) = fs::read_link(e.path().join("root")) {
            if root.starts_with(dir) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::SIGKILL,
                );
            }
        }
    }
}

/// The mount points at or under `dir`, deepest last.
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let text = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut v: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape_mount(p)))
        .filter(|p| p.starts_with(dir))
        .collect();
    v.sort_by_key(|p| p.components().count());
    v
}

/// A mountinfo path: `\040` and the other octal escapes decoded.
fn unescape_mount(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        if let (b'\\', Some(d)) = (b[i], octal) {
            let v = d.iter().fold(0u32, |v, c| v * 8 + u32::from(c - b'0'));
            if let Ok(v) = u8::try_from(v) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Removes the work directories of builds that no process runs any more
/// (killed with -9, or the host lost power): their processes killed, their
/// mounts undone, their files removed. A directory whose mounts do not go
/// is left for the next sweep.
pub fn sweep(tmp: &Path) {
    let Ok(rd) = fs::read_dir(tmp) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name();
        let Some(n) = name.to_str() else { continue };
        if !n.starts_with(PREFIX) {
            continue;
        }
        if n.ends_with(".log") {
            // A failed build's log, a week on (its directory gone).
            let old = e
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t.elapsed().unwrap_or_default() > LOG_KEPT);
            if old && !e.path().with_extension("").exists() {
                let _ = fs::remove_file(e.path());
            }
            continue;
        }
        let dir = e.path();
        let Ok(lock) = File::open(dir.join(".lock")) else {
            continue;
        };
        if Flock::lock(lock, FlockArg::LockExclusiveNonblock).is_err() {
            continue; // a running build's
        }
        kill_rooted_under(&dir);
        for m in mounts_under(&dir).into_iter().rev() {
            unmount(&m);
        }
        if mounts_under(&dir).is_empty() {
            tracing::info!(dir = %dir.display(), "removed what an interrupted build left");
            let _ = fs::remove_dir_all(&dir);
        }
    }
}

/// The umask a system's files are made with (0022, as a distribution's
/// installer runs), for as long as it lives; the depot's own (0077, see
/// `perms`) comes back when it drops. Under the depot's, dpkg's
/// maintainer scripts and our own writes would leave files that the
/// guest's services, which do not run as root, cannot read (networkd's
/// .network file). A build is single-threaded until its import.
pub struct SystemUmask(nix::sys::stat::Mode);

impl SystemUmask {
    /// Sets 0022.
    pub fn set() -> SystemUmask {
        use nix::sys::stat::{umask, Mode};
        SystemUmask(umask(Mode::from_bits_truncate(0o022)))
    }
}

impl Drop for SystemUmask {
    fn drop(&mut self) {
        nix::sys::stat::umask(self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape_mount(r"/tmp/a\040b"), "/tmp/a b");
        assert_eq!(unescape_mount(r"/x\134y"), r"/x\y");
        assert_eq!(unescape_mount(r"/plain"), "/plain");
        assert_eq!(unescape_mount(r"/end\04"), r"/end\04");
    }

    #[test]
    fn a_failing_command_names_itself_and_its_last_lines() {
        let tmp = tempfile::tempdir().unwrap();
        let mut w = Work::create(tmp.path()).unwrap();
        let mut ok = Command::new("sh");
        ok.args(["-c", "echo fine"]);
        w.run("sh ok", &mut ok).unwrap();
        let mut bad = Command::new("sh");
        bad.args(["-c", "echo one; echo two >&2; exit 3"]);
        let e = w.run("sh bad", &mut bad).unwrap_err().to_string();
        assert!(e.starts_with("sh bad: exit status: 3: one / two"), "{e}");
        assert!(e.contains(&w.log_path.display().to_string()), "{e}");
        let missing = w
            .run("nope", &mut Command::new("/nonexistent/tool"))
            .unwrap_err();
        assert!(missing.to_string().contains("cannot run it"), "{missing}");
        let (dir, log) = (w.dir.clone(), w.log_path.clone());
        w.keep_log = false;
        drop(w);
        assert!(!dir.exists() && !log.exists());
    }

    #[test]
    fn sweep_removes_an_unlocked_work_dir_only() {
        let tmp = tempfile::tempdir().unwrap();
        let live = Work::create(tmp.path()).unwrap();
        let dead = tmp.path().join("build-0123abcd");
        fs::create_dir_all(dead.join("root/etc")).unwrap();
        File::create(dead.join(".lock")).unwrap();
        sweep(tmp.path());
        assert!(!dead.exists());
        assert!(live.dir.exists(), "a running build's directory stays");
    }
}
