//! The lazy disk server: QEMU's NBD client reads an instance's image
//! straight from the chunk store through it (instance disk mode `lazy`).
//!
//! One server per image serves every lazy instance of it, each on its own
//! export named by the instance id (only an instance of this image whose
//! disk is lazy is served). Its files are in `DEPOT/serve/`:
//! `IMAGE.sock` (the socket, in the depot's private directory),
//! `IMAGE.lock` (flocked exclusively for the server's whole life: whether a
//! server runs), `IMAGE.users` (flocked *shared* by a launch from before
//! it checks for a server until its QEMU is up and connected) and
//! `IMAGE.log` (the server's own messages).
//!
//! **Lifetime**: the server exits once no client is connected, it can
//! take `IMAGE.users` exclusively (no launch is starting a QEMU of it) and
//! the catalog has no running lazy instance of the image whose QEMU lives
//! (one that reconnects to a restarted server keeps it). It then removes
//! its socket and gives up `IMAGE.lock` before `IMAGE.users`, so a launch
//! that got its shared lock after that sees no server and starts one. See
//! `launch::disk` for the launcher's side.
//!
//! Per instance, the bytes of stored data served and the last read error
//! go to `instances/ID/disk.json` (at most once a second, and when the
//! connection ends); a failed read is an I/O error to the guest and a line
//! in the instance's serial log (what `instance logs` shows).

use std::fs::File;
use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};
use rusqlite::Connection;
use serde::{Deserialize, Serialize};

use crate::catalog::{self, DiskMode, ImageState};
use crate::error::{Error, IoContext, Result};
use crate::image::lazy::{LazyImage, RemoteChunks};
use crate::image::nbd_server::{serve_connection, Export, READ_FAILED};
use crate::perms::Perms;
use crate::repo::Repo;

/// The files of the disk server of one image.
pub(crate) struct ServerFiles {
    pub(crate) sock: PathBuf,
    pub(crate) lock: PathBuf,
    pub(crate) users: PathBuf,
    pub(crate) log: PathBuf,
}

/// `DEPOT/serve/`.
pub(crate) fn serve_dir(root: &Path) -> PathBuf {
    root.join("serve")
}

/// The server files of `image` in the depot at `root`.
pub(crate) fn server_files(root: &Path, image: &str) -> ServerFiles {
    let d = serve_dir(root);
    ServerFiles {
        sock: d.join(format!("{image}.sock")),
        lock: d.join(format!("{image}.lock")),
        users: d.join(format!("{image}.users")),
        log: d.join(format!("{image}.log")),
    }
}

/// What `instances/ID/disk.json` holds.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct DiskStats {
    /// Bytes of stored image data served to this instance (zero blocks
    /// not counted), over all its runs from this server.
    pub store_bytes_read: u64,
    /// Bytes of image data fetched from a remote depot for it.
    pub remote_bytes_fetched: u64,
    /// The last read that failed, if any (empty: none). A failure to
    /// reach the remote is cleared by the next read fetched from it.
    pub error: String,
    /// Whether `error` is a failure to reach the remote.
    #[serde(default)]
    pub error_remote: bool,
}

/// The stats file of the instance whose directory is `dir`.
pub(crate) fn stats_path(dir: &Path) -> PathBuf {
    dir.join("disk.json")
}

/// The stats of an instance (defaults when there are none yet).
pub(crate) fn read_stats(dir: &Path) -> DiskStats {
    std::fs::read(stats_path(dir))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// Appends `line` to the serial log of the instance whose directory is
/// `dir`, where `instance logs` shows it beside the guest's own lines.
pub(crate) fn log_to_instance(perms: Perms, dir: &Path, line: &str) {
    let p = dir.join("serial.log");
    let r = perms
        .open_options()
        .create(true)
        .append(true)
        .open(&p)
        .and_then(|mut f| f.write_all(format!("\r\n{line}\r\n").as_bytes()));
    if let Err(e) = r {
        tracing::warn!("{}: {e}", p.display());
    }
}

/// One instance's export: the image, and what is counted for it.
struct InstanceExport {
    image: Arc<LazyImage>,
    dir: PathBuf,
    perms: Perms,
    stats: Mutex<(DiskStats, Instant)>,
    /// When a failed read was last logged, and how many since were not.
    logged: Mutex<(Option<Instant>, u64)>,
}

/// Failed reads are logged at most this often per instance (a guest may
/// retry a bad block forever).
const FAILURE_LOG_EVERY: Duration = Duration::from_secs(10);

impl InstanceExport {
    fn save(&self, stats: &DiskStats) {
        let p = stats_path(&self.dir);
        let tmp = self.dir.join("disk.json.tmp");
        let body = serde_json::to_vec(stats).unwrap_or_default();
        let written = self.perms.replace_file(&p, &tmp, &body);
        if let Err(e) = written {
            // The instance was deleted meanwhile, most likely.
            tracing::debug!("{}: {e}", p.display());
        }
    }

    fn flush(&self) {
        let st = self.stats.lock().unwrap();
        self.save(&st.0);
    }
}

impl Export for InstanceExport {
    fn size(&self) -> u64 {
        self.image.size
    }

    fn read(&self, buf: &mut [u8], off: u64) -> std::result::Result<(), u32> {
        let r = self.image.read(buf, off);
        let mut st = self.stats.lock().unwrap();
        match r {
            Ok(n) => {
                st.0.store_bytes_read += n.data;
                st.0.remote_bytes_fetched += n.fetched;
                if n.fetched > 0 && st.0.error_remote {
                    // the remote is back
                    st.0.error.clear();
                    st.0.error_remote = false;
                }
                // (a fetch from a remote costs far more than this write)
                if n.fetched > 0 || st.1.elapsed() >= Duration::from_secs(1) {
                    st.1 = Instant::now();
                    self.save(&st.0);
                }
                Ok(())
            }
            Err(f) => {
                let hint = if f.remote {
                    "the remote is tried again at the guest's next read"
                } else {
                    "`vmdepot image verify` checks the image"
                };
                let line = format!(
                    "vmdepot: disk read failed at byte offset {} of image {}: {}; the guest got \
                     an I/O error ({hint})",
                    f.offset, self.image.label, f.detail
                );
                st.0.error = line.clone();
                st.0.error_remote = f.remote;
                st.1 = Instant::now();
                self.save(&st.0);
                drop(st);
                let mut logged = self.logged.lock().unwrap();
                if logged.0.is_none_or(|t| t.elapsed() >= FAILURE_LOG_EVERY) {
                    let line = match logged.1 {
                        0 => line,
                        n => format!("{line} ({n} more failed reads not logged)"),
                    };
                    *logged = (Some(Instant::now()), 0);
                    drop(logged);
                    tracing::error!("{line}");
                    log_to_instance(self.perms, &self.dir, &line);
                } else {
                    logged.1 += 1;
                }
                Err(READ_FAILED)
            }
        }
    }
}

/// The exports of one image's server.
pub(crate) struct Exports {
    root: PathBuf,
    perms: Perms,
    image_id: String,
    image: Arc<LazyImage>,
    /// The connection and the inode of the catalog it opened (one replaced
    /// by `fsck --repair` is opened again).
    db: Mutex<(Connection, u64)>,
    /// Only this instance (a foreground start's private server), if set.
    only: Option<String>,
}

impl Exports {
    /// The exports of the available or partial image `image_id` of `repo`
    /// (every lazy instance of it, or with `only` that one instance).
    pub(crate) fn new(
        repo: &Repo,
        image_id: &str,
        only: Option<String>,
        partial: Option<PartialSource<'_>>,
    ) -> Result<Exports> {
        let row = catalog::find_images(&repo.conn, image_id)?
            .into_iter()
            .find(|r| {
                r.id.as_str() == image_id
                    && matches!(r.state, Some(ImageState::Available | ImageState::Partial))
            })
            .ok_or_else(|| Error::ImageNotFound(image_id.to_owned()))?;
        let image = match row.state {
            Some(ImageState::Partial) => {
                let source = partial.ok_or_else(|| Error::ImageNotAvailable {
                    image: format!("{} ({})", row.name, row.id),
                    state: "partial (a --foreground start serves only complete images: \
                                start it without --foreground, or complete the image with \
                                `vmdepot image pull`)"
                        .into(),
                })?;
                LazyImage::partial(&row, repo, source(repo, &row)?)?
            }
            _ => LazyImage::new(&row, repo)?,
        }
        .recording_reads(repo);
        Ok(Exports {
            root: repo.root().to_owned(),
            perms: repo.perms(),
            image_id: image_id.to_owned(),
            image: Arc::new(image),
            db: Mutex::new((
                repo.connect()?,
                crate::image::lazy::inode(&repo.root().join("catalog.db")),
            )),
            only,
        })
    }

    /// The export of instance `name`, if it is a lazy instance of this image.
    fn resolve(&self, name: &str) -> Option<Arc<InstanceExport>> {
        if self.only.as_deref().is_some_and(|o| o != name) {
            return None;
        }
        let row = {
            let mut db = self.db.lock().unwrap();
            let path = self.root.join("catalog.db");
            let ino = crate::image::lazy::inode(&path);
            if ino != db.1 {
                match catalog::open(&path, self.perms.file(), Some("the depot is in use")) {
                    Ok(c) => *db = (c, ino),
                    Err(e) => tracing::warn!("{e}"),
                }
            }
            catalog::instances::image_and_disk(&db.0, name)
        };
        match row {
            Ok(Some(r)) if r == (self.image_id.clone(), DiskMode::Lazy) => {}
            other => {
                let shown: String = name.chars().take(64).collect();
                tracing::warn!(
                    "refused NBD export {shown:?}: not a lazy instance of image {} ({other:?})",
                    self.image_id
                );
                return None;
            }
        }
        if let Some(r) = self.image.remote() {
            let db = self.db.lock().unwrap();
            match catalog::partial::partial(&db.0, &self.image_id) {
                Ok(Some(p)) if p.prefetch => r.prefetch(),
                Ok(_) => {}
                Err(e) => tracing::warn!("{e}"),
            }
        }
        let dir = self.root.join("instances").join(name);
        let stats = read_stats(&dir);
        Some(Arc::new(InstanceExport {
            image: self.image.clone(),
            dir,
            perms: self.perms,
            stats: Mutex::new((stats, Instant::now())),
            logged: Mutex::new((None, 0)),
        }))
    }
}

/// Makes the remote side of a partial image (the remote layer's: see
/// `remote::ondemand`); a server without one refuses partial images.
pub(crate) type PartialSource<'a> =
    &'a (dyn Fn(&Repo, &catalog::ImageRow) -> Result<Arc<dyn RemoteChunks>> + Sync);

/// Connections served at once (QEMU opens one per lazy instance).
const MAX_CONNECTIONS: usize = 128;

/// Serves `exports` on `listener` until `stop` says so (checked every
/// 200 ms while no client connects); one thread per connection.
pub(crate) fn serve(listener: UnixListener, exports: Arc<Exports>, stop: &dyn Fn(usize) -> bool) {
    use std::os::fd::AsFd;
    let open = Arc::new(AtomicUsize::new(0));
    loop {
        let mut fds = [nix::poll::PollFd::new(
            listener.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        let ready = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(200u16)).unwrap_or(0);
        if ready == 0 {
            if stop(open.load(Ordering::SeqCst)) {
                return;
            }
            continue;
        }
        let Ok((conn, _)) = listener.accept() else {
            continue;
        };
        if open.load(Ordering::SeqCst) >= MAX_CONNECTIONS {
            tracing::warn!("{MAX_CONNECTIONS} connections open: one more refused");
            continue;
        }
        open.fetch_add(1, Ordering::SeqCst);
        let (exports, open) = (exports.clone(), open.clone());
        std::thread::spawn(move || {
            connection(conn, &exports);
            open.fetch_sub(1, Ordering::SeqCst);
        });
    }
}

fn connection(conn: UnixStream, exports: &Exports) {
    let current: Mutex<Option<Arc<InstanceExport>>> = Mutex::new(None);
    let resolve = |name: &str| -> Option<Arc<dyn Export>> {
        let e = exports.resolve(name)?;
        *current.lock().unwrap() = Some(e.clone());
        Some(e)
    };
    let r = serve_connection(conn, &resolve);
    // The last counts reach the file.
    if let Some(e) = current.lock().unwrap().take() {
        e.flush();
    }
    match r {
        Ok(Some(name)) => tracing::info!("instance {name} disconnected"),
        Ok(None) => {}
        // A probe that connected and left, or QEMU killed mid-request.
        Err(e) => tracing::debug!("connection ended: {e}"),
    }
}

/// A server whose socket is bound: `serve` it.
pub(crate) struct Bound {
    pub(crate) listener: UnixListener,
    pub(crate) exports: Arc<Exports>,
}

/// Binds `sock` (a stale socket file is replaced: the caller holds the
/// lock that makes it the only server there) with the depot's file mode.
pub(crate) fn bind(repo: &Repo, sock: &Path, exports: Exports) -> Result<Bound> {
    let _ = std::fs::remove_file(sock);
    let listener = UnixListener::bind(sock).at(sock)?;
    repo.perms().fix(sock)?;
    Ok(Bound {
        listener,
        exports: Arc::new(exports),
    })
}

/// The body of a detached disk server process for `image` (the `vmdepot`
/// binary's hidden `disk-server` command): returns at once when another
/// server of it runs; otherwise serves until no QEMU uses it.
pub(crate) fn run_detached(repo: &Repo, image: &str, partial: PartialSource<'_>) -> Result<()> {
    if crate::ids::ImageId::parse(image).is_none() {
        return Err(Error::Invalid(format!(
            "disk-server {image:?}: not an image id (img-<16 hex>)"
        )));
    }
    let f = server_files(repo.root(), image);
    repo.perms().mkdir_all(&serve_dir(repo.root()))?;
    let lock = match repo.perms().flock(&f.lock, FlockArg::LockExclusiveNonblock) {
        Ok(l) => l,
        Err(_) => return Ok(()), // another server runs
    };
    let exports = Exports::new(repo, image, None, Some(partial))?;
    let bound = bind(repo, &f.sock, exports)?;
    // The map is read while QEMU starts, not before the socket listens.
    let img = bound.exports.image.clone();
    std::thread::spawn(move || {
        if let Err(e) = img.warm() {
            tracing::error!("{e}");
        }
    });
    tracing::info!("serving image {image} on {}", f.sock.display());
    let exiting: Mutex<Option<Flock<File>>> = Mutex::new(None);
    serve(bound.listener, bound.exports, &|open| {
        if open > 0 {
            return false;
        }
        // No client: exit unless a launch holds the users lock or a QEMU
        // of a lazy instance of this image lives (one reconnecting to a
        // restarted server, say).
        if !f.users.exists() {
            // The depot was removed under us: nobody can use this server.
            return true;
        }
        let Ok(users) = repo
            .perms()
            .flock(&f.users, FlockArg::LockExclusiveNonblock)
        else {
            return false;
        };
        let running = catalog::instances::running_of(&repo.conn, image, DiskMode::Lazy);
        let alive = match running {
            // (a foreground start serves its own disk: its socket exists)
            Ok(rows) => rows.iter().any(|(id, _, pid)| {
                pid.is_some_and(|p| crate::proc::pid_alive(p, id))
                    && !repo
                        .root()
                        .join("instances")
                        .join(id)
                        .join("disk.sock")
                        .exists()
            }),
            Err(e) => {
                tracing::warn!("{e}");
                true
            }
        };
        if alive {
            return false;
        }
        *exiting.lock().unwrap() = Some(users);
        true
    });
    // Holding the users lock: no launcher is between its check and its
    // QEMU. Remove the socket, then give up the server lock, then users.
    let _ = std::fs::remove_file(&f.sock);
    drop(lock);
    drop(exiting);
    tracing::info!("no instance uses image {image} any more: exiting");
    Ok(())
}

/// Removes the server files of images the catalog no longer has and no
/// server holds (gc).
pub(crate) fn remove_stale(repo: &Repo) -> Result<usize> {
    let dir = serve_dir(repo.root());
    let Ok(rd) = std::fs::read_dir(&dir) else {
        return Ok(0);
    };
    let mut images: Vec<String> = rd
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            let id = n.split('.').next()?.to_owned();
            crate::ids::ImageId::parse(&id).map(|_| id)
        })
        .collect();
    images.sort();
    images.dedup();
    let mut removed = 0;
    for id in images {
        let known = catalog::find_images(&repo.conn, &id)?
            .iter()
            .any(|r| r.id.as_str() == id);
        let f = server_files(repo.root(), &id);
        if known || crate::repo::held(&f.lock) {
            continue;
        }
        for p in [&f.sock, &f.users, &f.log, &f.lock] {
            if std::fs::remove_file(p).is_ok() {
                removed += 1;
            }
        }
    }
    Ok(removed)
}

/// Makes sure no disk server of `image` runs and none starts until the
/// returned lock drops: waits a moment for one that is exiting, then takes
/// `IMAGE.users` exclusively (a launch that is starting one holds it
/// shared; a server does not exit while anyone holds it, hence the order).
/// `what` names the image in the refusal.
pub(crate) fn hold_no_server(repo: &Repo, image: &str, what: &str) -> Result<Flock<File>> {
    let f = server_files(repo.root(), image);
    repo.perms().mkdir_all(&serve_dir(repo.root()))?;
    let busy = || {
        Error::Conflict(format!(
            "{what} is being read by a lazy instance (its disk server runs): stop its lazy \
             instances first"
        ))
    };
    let end = Instant::now() + Duration::from_secs(3);
    while crate::repo::held(&f.lock) {
        if Instant::now() > end {
            return Err(busy());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let users = repo
        .perms()
        .flock(&f.users, FlockArg::LockExclusiveNonblock)
        .map_err(|_| busy())?;
    if crate::repo::held(&f.lock) {
        return Err(busy());
    }
    Ok(users)
}
