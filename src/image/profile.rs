//! An image's read profile: the stored blocks that its first lazily served
//! run read in its first [`WINDOW`], in the order they were first read
//! (a boot, mostly). `image push` sends the chunks of these blocks first,
//! so that the remote's frames hold what a boot reads together, and a lazy
//! boot from the remote fetches little that it does not read.
//!
//! File `DEPOT/profiles/<img-id>.reads` (the depot's file mode): the 8
//! bytes `VMDREAD1`, then block numbers, u64 little-endian each. Written
//! whole (a temporary file renamed over it) every [`EVERY`] while
//! recording, at the end of the window, and when the disk server ends. A
//! file that exists is never recorded again; one that is malformed, or is
//! not a regular file (a symlink, a FIFO, a device), is ignored (with a
//! warning) and block numbers past the image's end are
//! skipped: it only ever orders a push, never what is served. Only a disk
//! server records (not a capture, which reads the whole image).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::ids::ImageId;
use crate::perms::Perms;

/// How long after its first read a run's reads are recorded.
pub(crate) const WINDOW: Duration = Duration::from_secs(120);
/// How often the file is written while recording.
const EVERY: Duration = Duration::from_secs(5);
/// The most blocks a profile holds (16 GiB of 4 KiB blocks; 32 MiB).
const MAX_BLOCKS: usize = 1 << 22;
const MAGIC: &[u8; 8] = b"VMDREAD1";

/// Where the read profile of image `id` of the depot at `root` is.
pub(crate) fn path(root: &Path, id: &str) -> PathBuf {
    root.join("profiles").join(format!("{id}.reads"))
}

/// The read profile of image `id` of the depot at `root`: block numbers
/// below `nblocks`, each once, in the order first read (empty when there
/// is none, or a malformed one).
pub(crate) fn read(root: &Path, id: &str, nblocks: u64) -> Vec<u64> {
    let p = path(root, id);
    let limit = 8 + 8 * MAX_BLOCKS as u64;
    // Never a symlink, a FIFO or a device: only a regular file, read up
    // to the longest a profile can be.
    let opened = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&p)
    };
    let f = match opened {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
        Err(e) => {
            tracing::warn!("{}: {e} (ignored)", p.display());
            return Vec::new();
        }
    };
    match f.metadata() {
        Ok(m) if !m.is_file() => {
            tracing::warn!("{}: not a regular file (ignored)", p.display());
            return Vec::new();
        }
        Ok(m) if m.len() > limit => {
            tracing::warn!(
                "{}: longer than a read profile can be (ignored)",
                p.display()
            );
            return Vec::new();
        }
        Ok(_) => {}
        Err(e) => {
            tracing::warn!("{}: {e} (ignored)", p.display());
            return Vec::new();
        }
    }
    let mut bytes = Vec::new();
    if let Err(e) = std::io::Read::read_to_end(&mut std::io::Read::take(f, limit), &mut bytes) {
        tracing::warn!("{}: {e} (ignored)", p.display());
        return Vec::new();
    }
    if bytes.get(..8) != Some(MAGIC) || bytes.len() % 8 != 0 {
        tracing::warn!("{}: not a read profile (ignored)", p.display());
        return Vec::new();
    }
    let mut seen = HashSet::new();
    bytes[8..]
        .chunks_exact(8)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
        .filter(|&b| b < nblocks && seen.insert(b))
        .take(MAX_BLOCKS)
        .collect()
}

/// Removes the read profiles (and their temporary files) of images the
/// catalog no longer has: what a crash between an image's deletion and
/// its profile's left (gc).
pub(crate) fn remove_stale(repo: &crate::repo::Repo) -> crate::error::Result<usize> {
    let Ok(rd) = std::fs::read_dir(repo.root().join("profiles")) else {
        return Ok(0);
    };
    let mut removed = 0;
    for e in rd.flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        let Some(id) = n.split('.').next().and_then(ImageId::parse) else {
            continue;
        };
        let known = crate::catalog::find_images(&repo.conn, id.as_str())?
            .iter()
            .any(|r| r.id == id);
        if !known && std::fs::remove_file(e.path()).is_ok() {
            removed += 1;
        }
    }
    Ok(removed)
}

/// Records a run's first reads (see the module docs).
pub(crate) struct Recorder {
    path: PathBuf,
    perms: Perms,
    started: Option<Instant>,
    written_at: Instant,
    seen: HashSet<u64>,
    order: Vec<u64>,
    written: usize,
    done: bool,
}

impl Recorder {
    /// A recorder for image `id` of the depot at `root`, unless it has a
    /// profile already.
    pub(crate) fn new(root: &Path, id: &ImageId, perms: Perms) -> Option<Recorder> {
        let path = path(root, id.as_str());
        if std::fs::symlink_metadata(&path).is_ok() {
            return None; // a profile, or whatever is in its place
        }
        Some(Recorder {
            path,
            perms,
            started: None,
            written_at: Instant::now(),
            seen: HashSet::new(),
            order: Vec::new(),
            written: 0,
            done: false,
        })
    }

    /// Notes stored blocks just read, in order.
    pub(crate) fn note(&mut self, blocks: impl IntoIterator<Item = u64>) {
        if self.done {
            return;
        }
        let started = *self.started.get_or_insert_with(Instant::now);
        if started.elapsed() >= WINDOW || self.order.len() >= MAX_BLOCKS {
            self.done = true;
            self.write();
            return;
        }
        for b in blocks {
            if self.seen.insert(b) {
                self.order.push(b);
            }
        }
        if self.written_at.elapsed() >= EVERY {
            self.write();
        }
    }

    /// Writes what is recorded, if anything is new.
    fn write(&mut self) {
        self.written_at = Instant::now();
        if self.order.len() == self.written {
            return;
        }
        let mut body = Vec::with_capacity(8 + 8 * self.order.len());
        body.extend_from_slice(MAGIC);
        for b in &self.order {
            body.extend_from_slice(&b.to_le_bytes());
        }
        let tmp = self.path.with_extension("reads.tmp");
        let r = self
            .path
            .parent()
            .map_or(Ok(()), |d| {
                self.perms.mkdir_all(d).map_err(std::io::Error::other)
            })
            .and_then(|_| self.perms.replace_file(&self.path, &tmp, &body));
        match r {
            Ok(()) => self.written = self.order.len(),
            Err(e) => {
                tracing::debug!("{}: {e}", self.path.display());
                self.done = true;
            }
        }
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        if !self.done {
            self.write();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_profile_keeps_first_reads_in_order_and_a_bad_one_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let id = ImageId::generate();
        let perms = Perms::PRIVATE;
        {
            let mut r = Recorder::new(dir.path(), &id, perms).unwrap();
            r.note([7, 3, 7]);
            r.note([900, 3, 1]);
        }
        assert_eq!(read(dir.path(), id.as_str(), 1000), [7, 3, 900, 1]);
        // blocks past the image's end are skipped
        assert_eq!(read(dir.path(), id.as_str(), 100), [7, 3, 1]);
        // an image with a profile records no other
        assert!(Recorder::new(dir.path(), &id, perms).is_none());
        std::fs::write(path(dir.path(), id.as_str()), b"VMDREAD1\x01\x02").unwrap();
        assert!(read(dir.path(), id.as_str(), 1000).is_empty());
        std::fs::write(path(dir.path(), id.as_str()), b"not one at all!!").unwrap();
        assert!(read(dir.path(), id.as_str(), 1000).is_empty());
        // never a symlink (to a device that never ends, say) nor a FIFO
        let p = path(dir.path(), id.as_str());
        std::fs::remove_file(&p).unwrap();
        std::os::unix::fs::symlink("/dev/zero", &p).unwrap();
        assert!(read(dir.path(), id.as_str(), 1000).is_empty());
        std::fs::remove_file(&p).unwrap();
        nix::unistd::mkfifo(&p, nix::sys::stat::Mode::S_IRWXU).unwrap();
        assert!(read(dir.path(), id.as_str(), 1000).is_empty());
    }
}
