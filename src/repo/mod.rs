//! The repository: the internal context every layer below the public
//! [`crate::Depot`] works on. A [`Repo`] is the depot's root directory, its
//! open catalog, the permissions it creates files with, the lock files and
//! paths of running work (imports, gc), and the [`ObjectStore`] its packs
//! are in ([`Repo::store`]). It knows nothing of accounts, which belong to
//! the depot layer above it.
//!
//! [`manifest`] writes and reads the per-image manifest files
//! (`manifests/`, docs/FORMAT.md) a lost catalog is rebuilt from.

pub mod manifest;
pub(crate) mod orphans;

use std::fs::{self, File};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use rusqlite::Connection;

use crate::error::{IoContext, Result};
use crate::ids::ImageId;
use crate::perms::Perms;
use crate::store::{LocalDir, ObjectStore};

/// An open repository: the depot directory below accounts.
pub struct Repo {
    pub(crate) root: PathBuf,
    pub(crate) conn: Connection,
    pub(crate) perms: Perms,
    /// Where the packs and their indexes are.
    store: Box<dyn ObjectStore>,
}

impl Repo {
    /// The repository of the depot at `root` (absolute) with its open
    /// catalog; its objects are in the depot directory.
    pub(crate) fn new(root: PathBuf, conn: Connection, perms: Perms) -> Repo {
        let store = Box::new(LocalDir::new(&root, perms));
        Repo {
            root,
            conn,
            perms,
            store,
        }
    }

    /// The store of packs and pack indexes.
    pub fn store(&self) -> &dyn ObjectStore {
        &*self.store
    }

    /// Another handle on the same store, owned (for threads that outlive a
    /// borrow of this repository: the lazy disk server's).
    pub(crate) fn own_store(&self) -> Box<dyn ObjectStore> {
        Box::new(LocalDir::new(&self.root, self.perms))
    }

    /// A second connection to this repository's catalog.
    pub(crate) fn connect(&self) -> Result<Connection> {
        crate::catalog::open(
            &self.root.join("catalog.db"),
            self.perms.file(),
            Some("it was open a moment ago"),
        )
    }

    /// The depot's root directory (absolute).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The modes of this depot's files and directories.
    pub fn perms(&self) -> Perms {
        self.perms
    }

    pub(crate) fn lock_path(&self, id: &ImageId) -> PathBuf {
        self.root.join("locks").join(format!("{id}.lock"))
    }

    pub(crate) fn tmp_path(&self, id: &ImageId) -> PathBuf {
        self.root.join("tmp").join(format!("{id}.raw"))
    }

    /// Takes the lock that marks a running import of `id` (held until drop).
    pub(crate) fn lock_import(&self, id: &ImageId) -> Result<Flock<File>> {
        use std::os::unix::fs::MetadataExt;
        let p = self.lock_path(id);
        loop {
            let lock = self.perms.flock(&p, FlockArg::LockExclusiveNonblock)?;
            // gc may have removed the file between open and flock: the lock
            // only counts if the path still names the file we locked.
            let ours = lock.metadata().at(&p)?.ino();
            if std::fs::metadata(&p).map(|m| m.ino()).ok() == Some(ours) {
                return Ok(lock);
            }
        }
    }

    /// Takes the lock that lets one gc run at a time (held until drop);
    /// waits for a gc that runs.
    pub(crate) fn lock_gc(&self) -> Result<Flock<File>> {
        self.perms
            .flock(&self.root.join("gc.lock"), FlockArg::LockExclusive)
    }

    /// Whether a gc is running (its lock is held).
    pub(crate) fn gc_running(&self) -> bool {
        held(&self.root.join("gc.lock"))
    }

    /// Whether the import of `id` is still running (its lock is held).
    pub(crate) fn import_alive(&self, id: &ImageId) -> bool {
        held(&self.lock_path(id))
    }
}

/// Whether some process holds an exclusive flock on the file at `p`.
pub(crate) fn held(p: &Path) -> bool {
    let Ok(f) = File::open(p) else {
        return false;
    };
    match Flock::lock(f, FlockArg::LockSharedNonblock) {
        Ok(_) => false,
        Err((_, e)) => e == nix::errno::Errno::EWOULDBLOCK,
    }
}

/// The space reserve: a file of a few MiB, allocated when the depot is
/// created or opened to write while space allows, and released when the
/// filesystem is full so that delete and gc (and a failed import's
/// cleanup) can still write the catalog.
pub(crate) const RESERVE: &str = "reserve";

/// Below this many free bytes the filesystem counts as full (SQLite needs
/// 32 KiB for `-shm` and room for its WAL).
const FULL_BYTES: u64 = 1 << 20;

/// Free bytes for unprivileged use on the filesystem holding `p`, and
/// whether it is mounted read-only.
fn fs_free(p: &Path) -> Option<(u64, bool, u64)> {
    let st = nix::sys::statvfs::statvfs(p).ok()?;
    let frsize = st.fragment_size() as u64;
    Some((
        st.blocks_available() as u64 * frsize,
        st.flags().contains(nix::sys::statvfs::FsFlags::ST_RDONLY),
        st.blocks() as u64 * frsize,
    ))
}

/// Whether nothing can be written on the filesystem holding `p`.
pub(crate) fn fs_full(p: &Path) -> bool {
    fs_free(p).is_some_and(|(free, ro, _)| ro || free < FULL_BYTES)
}

/// Removes the space reserve; true if there was one.
pub(crate) fn release_reserve(root: &Path) -> bool {
    let released = fs::remove_file(root.join(RESERVE)).is_ok();
    if released {
        tracing::info!(
            "released the depot's space reserve {}",
            root.join(RESERVE).display()
        );
    }
    released
}

/// Allocates the space reserve if it is missing and the filesystem has
/// room to spare (four times its size): 8 MiB, at most 1/16 of the
/// filesystem. Best effort: a filesystem without `fallocate` has none.
pub(crate) fn ensure_reserve(root: &Path, perms: Perms) {
    let path = root.join(RESERVE);
    if path.exists() {
        return;
    }
    let Some((free, false, total)) = fs_free(root) else {
        return;
    };
    let size = ((8u64 << 20).min(total / 16)) & !4095;
    if size == 0 || free < 4 * size {
        return;
    }
    let tmp = root.join("reserve.tmp");
    let made = perms
        .open_options()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .ok()
        .and_then(|f| {
            nix::fcntl::fallocate(
                &f,
                nix::fcntl::FallocateFlags::empty(),
                0,
                size as libc::off_t,
            )
            .ok()
        })
        .is_some()
        && fs::rename(&tmp, &path).is_ok();
    if !made {
        let _ = fs::remove_file(&tmp);
    }
}
