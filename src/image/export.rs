//! Materialisation: rebuild an image's raw content from the store, checking
//! every chunk's hash and the image's content digest.
//!
//! Main items: `export` (raw, sparse, or qcow2 through qemu-img) and
//! `verify_image` (the same work without writing). Workers take BLAKE3
//! subtree pieces of the image ([`crate::digest`]), so the digest is
//! computed in parallel and in any order; zero blocks are holes and are
//! never written.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

use nix::errno::Errno;
use nix::fcntl::{
    fallocate, openat, renameat, AtFlags, FallocateFlags, Flock, FlockArg, OFlag, AT_FDCWD,
};
use nix::sys::stat::{fstatat, Mode};
use nix::unistd::{linkat, unlinkat, UnlinkatFlags};

use serde::Serialize;
use tracing::instrument;

use crate::catalog::{self, ChunkLoc, FrameLoc, ImageRow};
use crate::digest::{self, PieceHash};
use crate::error::{Error, IoContext, Result};
use crate::format::{CHUNK, CHUNK_SIZE, ZERO_BLOCK};
use crate::ids::{hex, ChunkHash, ChunkId};
use crate::progress::Progress;
use crate::repo::Repo;
use crate::store::ReaderCache;

/// Result of `verify`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct VerifyReport {
    /// Images whose content was checked against their digest.
    pub images: u64,
    /// Chunks (4 KiB blocks) re-read and re-hashed.
    pub chunks: u64,
    /// Bytes checked: one image's virtual size (its digest covers every
    /// byte, zeros too), or the chunks' bytes of a whole-store verify.
    pub bytes: u64,
}

/// Output formats of `image export`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExportFormat {
    /// The disk byte for byte (sparse where the image is zero).
    Raw,
    /// A qcow2 file written by `qemu-img convert` (only to a file, not a
    /// stream).
    Qcow2,
}

impl ExportFormat {
    /// `raw` or `qcow2` (`--format`); anything else is an error naming them.
    pub fn parse(s: &str) -> Result<ExportFormat> {
        match s {
            "raw" => Ok(ExportFormat::Raw),
            "qcow2" => Ok(ExportFormat::Qcow2),
            _ => Err(Error::Invalid(format!(
                "unknown export format {s:?}: use raw or qcow2"
            ))),
        }
    }
}

/// Mode of the files `image export` creates: 0666 less the umask the
/// process had before [`Depot::open`](crate::Depot::open) set the depot's
/// (exports are the caller's files, not the depot's).
pub fn export_file_mode() -> u32 {
    0o666 & !crate::perms::caller_umask()
}

/// The process umask now (from /proc, which does not change it).
fn current_umask() -> u32 {
    if let Ok(s) = std::fs::read_to_string("/proc/self/status") {
        if let Some(u) = s
            .lines()
            .find_map(|l| l.strip_prefix("Umask:"))
            .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
        {
            return u;
        }
    }
    let old = nix::sys::stat::umask(Mode::from_bits_truncate(0o077));
    nix::sys::stat::umask(old);
    old.bits()
}

/// Where a temporary's name starts and what marks it (`.OUT.vmdepot-partial-<random>`).
const PARTIAL_MARK: &str = ".vmdepot-partial-";

/// A unique hidden name beside `name` for a temporary.
fn temp_name(name: &OsStr) -> OsString {
    // Leave room for the mark and the random part within NAME_MAX (255).
    let b = name.as_bytes();
    let mut s = OsString::from(".");
    s.push(OsStr::from_bytes(&b[..b.len().min(200)]));
    s.push(PARTIAL_MARK);
    s.push(crate::ids::random_hex(8));
    s
}

fn errno_io(e: Errno) -> std::io::Error {
    std::io::Error::from_raw_os_error(e as i32)
}

/// A new file being written in a directory: anonymous (O_TMPFILE) where the
/// filesystem allows it, else under a unique hidden name created with
/// O_EXCL|O_NOFOLLOW. Held under an exclusive flock while it is written, so
/// that another export's clean-up ([`clean_leftovers`]) leaves it alone.
/// Removed on drop unless persisted.
struct Temp<'a> {
    dir: &'a File,
    dir_path: &'a Path,
    file: Option<Flock<File>>,
    /// Its name in `dir`, if it has one.
    named: Option<OsString>,
}

impl<'a> Temp<'a> {
    fn file(&self) -> &File {
        self.file.as_ref().expect("open until dropped")
    }

    fn create(dir: &'a File, dir_path: &'a Path, name: &OsStr) -> Result<Temp<'a>> {
        let flags = OFlag::O_RDWR | OFlag::O_CLOEXEC;
        let mode = Mode::from_bits_truncate(0o600);
        let (fd, named) = match openat(dir, ".", flags | OFlag::O_TMPFILE, mode) {
            Ok(fd) => (fd, None),
            Err(Errno::EOPNOTSUPP | Errno::EISDIR | Errno::EINVAL | Errno::ENOENT) => loop {
                let n = temp_name(name);
                let f = OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW;
                match openat(dir, n.as_os_str(), flags | f, mode) {
                    Ok(fd) => break (fd, Some(n)),
                    Err(Errno::EEXIST) => continue,
                    Err(e) => return Err(Error::io(dir_path.join(&n), errno_io(e))),
                }
            },
            Err(e) => return Err(Error::io(dir_path, errno_io(e))),
        };
        // A fresh inode: nobody else can hold its lock.
        let file = Flock::lock(File::from(fd), FlockArg::LockExclusiveNonblock)
            .map_err(|(_, e)| Error::io(dir_path, errno_io(e)));
        let mut t = Temp {
            dir,
            dir_path,
            file: None,
            named,
        };
        t.file = Some(file?);
        Ok(t)
    }

    /// How the file is named for messages and for child processes.
    fn proc_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.file().as_raw_fd()))
    }

    /// Gives the file `name` in its directory, replacing whatever had that
    /// name (a file, or a symlink itself: rename never follows the last
    /// component), then fsyncs the directory.
    fn persist(mut self, name: &OsStr) -> Result<()> {
        let out = self.dir_path.join(name);
        let tmp = match self.named.clone() {
            Some(n) => n,
            None => loop {
                // linkat cannot replace: link under a unique name, then rename.
                let n = temp_name(name);
                match linkat(
                    AT_FDCWD,
                    &self.proc_path(),
                    self.dir,
                    n.as_os_str(),
                    AtFlags::AT_SYMLINK_FOLLOW,
                ) {
                    Ok(()) => {
                        self.named = Some(n.clone());
                        break n;
                    }
                    Err(Errno::EEXIST) => continue,
                    Err(e) => return Err(Error::io(&out, errno_io(e))),
                }
            },
        };
        renameat(self.dir, tmp.as_os_str(), self.dir, name)
            .map_err(|e| Error::io(&out, errno_io(e)))?;
        self.named = None;
        self.dir.sync_all().at(self.dir_path)
    }
}

impl Drop for Temp<'_> {
    fn drop(&mut self) {
        if let Some(n) = self.named.take() {
            let _ = unlinkat(self.dir, n.as_os_str(), UnlinkatFlags::NoRemoveDir);
        }
    }
}

/// Removes the temporaries that killed exports left in `dir`: hidden files
/// named with [`PARTIAL_MARK`] that are regular files owned by us and that
/// no running export holds (flock).
fn clean_leftovers(dir: &File, dir_path: &Path) {
    let Ok(rd) = std::fs::read_dir(dir_path) else {
        return;
    };
    let me = nix::unistd::geteuid().as_raw();
    for e in rd.flatten() {
        let n = e.file_name();
        let b = n.as_bytes();
        if !b.starts_with(b".")
            || !b
                .windows(PARTIAL_MARK.len())
                .any(|w| w == PARTIAL_MARK.as_bytes())
        {
            continue;
        }
        let flags = OFlag::O_RDONLY
            | OFlag::O_NOFOLLOW
            | OFlag::O_NONBLOCK
            | OFlag::O_NOCTTY
            | OFlag::O_CLOEXEC;
        let Ok(fd) = openat(dir, n.as_os_str(), flags, Mode::empty()) else {
            continue;
        };
        let f = File::from(fd);
        let Ok(m) = f.metadata() else { continue };
        if !m.file_type().is_file() || m.uid() != me {
            continue;
        }
        let Ok(_lock) = Flock::lock(f, FlockArg::LockExclusiveNonblock) else {
            continue; // a running export's
        };
        // Still the same file under that name?
        let same = fstatat(dir, n.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW)
            .is_ok_and(|s| s.st_dev == m.dev() && s.st_ino == m.ino());
        if same {
            let _ = unlinkat(dir, n.as_os_str(), UnlinkatFlags::NoRemoveDir);
        }
    }
}

/// Opens a directory for the *at calls.
fn open_dir(p: &Path) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY)
        .open(p)
        .at(p)
}

/// Whether the open directory `dir` is the directory (`dev`, `ino`) or
/// lies below it, found by walking `..` from the descriptor up to `/`.
fn inside_dir(dir: &File, dev: u64, ino: u64) -> std::io::Result<bool> {
    let mut cur = dir.try_clone()?;
    loop {
        let m = cur.metadata()?;
        if m.dev() == dev && m.ino() == ino {
            return Ok(true);
        }
        let up = openat(
            &cur,
            "..",
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(errno_io)?;
        let up = File::from(up);
        let um = up.metadata()?;
        if um.dev() == m.dev() && um.ino() == m.ino() {
            return Ok(false); // `/`
        }
        cur = up;
    }
}

/// Where a user's export goes.
enum Dest {
    /// A new regular file `name` in `dir` (replacing a file of that name).
    File {
        dir: File,
        dir_path: PathBuf,
        name: OsString,
    },
    /// A block device, written in place.
    Block(File),
}

/// Splits `out` into its (canonical) directory and file name.
fn parent_and_name(out: &Path) -> Result<(PathBuf, OsString)> {
    let name = out
        .file_name()
        .ok_or_else(|| Error::refused(out, "it names no file: give the path of a file to write"))?;
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let dir = std::fs::canonicalize(parent).at(parent)?;
    Ok((dir, name.to_owned()))
}

/// Decides where a user's export goes, refusing the depot's own files,
/// symlinks, directories, FIFOs, sockets and character devices.
fn user_dest(repo: &Repo, out: &Path, format: ExportFormat) -> Result<Dest> {
    let (dir_path, name) = parent_and_name(out)?;
    let root = std::fs::metadata(repo.root()).at(repo.root())?;
    // The directory is opened once and everything below goes through that
    // descriptor: whether it lies inside the depot is decided by walking
    // up from it (`..`), not by its name, which a swap could redirect.
    let dir = open_dir(&dir_path)?;
    if inside_dir(&dir, root.dev(), root.ino()).at(&dir_path)? {
        return Err(Error::refused(
            out,
            format!(
                "it is inside the depot {}: an export there would overwrite the depot's own files; export to a path outside the depot",
                repo.root().display()
            ),
        ));
    }
    let st = match fstatat(&dir, name.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => Some(st),
        Err(Errno::ENOENT) => None,
        Err(e) => return Err(Error::io(out, errno_io(e))),
    };
    let kind = st.map(|s| s.st_mode & libc::S_IFMT);
    match kind {
        None | Some(libc::S_IFREG) => Ok(Dest::File {
            dir,
            dir_path,
            name,
        }),
        Some(libc::S_IFLNK) => {
            let to = std::fs::read_link(out).unwrap_or_default();
            Err(Error::refused(
                out,
                format!(
                    "it is a symbolic link (to {}): vmdepot does not write through links; export to the path it points to, or remove the link",
                    to.display()
                ),
            ))
        }
        Some(libc::S_IFDIR) => Err(Error::refused(
            out,
            "it is a directory: give the path of a file to write",
        )),
        Some(libc::S_IFBLK) => {
            if format != ExportFormat::Raw {
                return Err(Error::refused(
                    out,
                    "it is a block device: export to it with --format raw",
                ));
            }
            // O_EXCL on a block device: EBUSY if it is mounted or in use.
            let flags = OFlag::O_RDWR | OFlag::O_NOFOLLOW | OFlag::O_EXCL | OFlag::O_CLOEXEC;
            let fd = match openat(&dir, name.as_os_str(), flags, Mode::empty()) {
                Ok(fd) => fd,
                Err(Errno::EBUSY) => {
                    return Err(Error::refused(out, "the block device is in use (mounted, or held by another device): unmount it first"))
                }
                Err(e) => return Err(Error::io(out, errno_io(e))),
            };
            let f = File::from(fd);
            let m = f.metadata().at(out)?;
            if !m.file_type().is_block_device() {
                return Err(Error::refused(out, "it changed while it was opened"));
            }
            if m.rdev() == root.dev() {
                return Err(Error::refused(
                    out,
                    "it is the block device that holds the depot",
                ));
            }
            Ok(Dest::Block(f))
        }
        Some(libc::S_IFIFO) => Err(Error::refused(
            out,
            "it is a FIFO: use `-` to stream the raw image to stdout",
        )),
        Some(libc::S_IFCHR) => Err(Error::refused(
            out,
            "it is a character device: use `-` to stream the raw image to stdout",
        )),
        Some(_) => Err(Error::refused(
            out,
            "it is not a regular file or a block device",
        )),
    }
}

/// `image export`: checks the destination (see [`user_dest`]), writes a new
/// file with the caller's mode ([`export_file_mode`]) or a block device in
/// place.
#[instrument(skip_all, err(level = "debug"))]
pub(crate) fn export_user(
    repo: &Repo,
    row: &ImageRow,
    out: &Path,
    format: ExportFormat,
    progress: &dyn Progress,
) -> Result<()> {
    match user_dest(repo, out, format)? {
        Dest::File {
            dir,
            dir_path,
            name,
        } => write_new_file(
            repo,
            row,
            &dir,
            &dir_path,
            &name,
            format,
            export_file_mode(),
            progress,
        ),
        Dest::Block(dev) => write_block(repo, row, &dev, out, progress),
    }
}

/// Materialises an image into a file of the depot (a launch base, an
/// instance's private disk): no destination checks; the mode follows the
/// process umask.
#[instrument(skip_all, err(level = "debug"))]
pub(crate) fn export(
    repo: &Repo,
    row: &ImageRow,
    out: &Path,
    format: ExportFormat,
    progress: &dyn Progress,
) -> Result<()> {
    export_with_mode(repo, row, out, format, 0o666 & !current_umask(), progress)
}

/// [`export`] with the file's mode given, set before the file gets its
/// name (a launch base is read-only from the moment it exists).
#[instrument(skip_all, err(level = "debug"))]
pub(crate) fn export_with_mode(
    repo: &Repo,
    row: &ImageRow,
    out: &Path,
    format: ExportFormat,
    mode: u32,
    progress: &dyn Progress,
) -> Result<()> {
    let (dir_path, name) = parent_and_name(out)?;
    let dir = open_dir(&dir_path)?;
    write_new_file(repo, row, &dir, &dir_path, &name, format, mode, progress)
}

/// The BLAKE3 of every byte of `file` (`size` bytes), read back in
/// parallel leaves; holes are read too (nothing is assumed zero).
#[instrument(skip_all, err(level = "debug"))]
pub(crate) fn file_digest(
    repo: &Repo,
    file: &File,
    path: &Path,
    size: u64,
    progress: &dyn Progress,
) -> Result<String> {
    let zero_cvs = catalog::load_zero_cvs(&repo.conn, size)?;
    let pieces = digest::split_sparse(size, digest::LEAF_BYTES, |_, _| true);
    digest_pieces(pieces, file, path, size, &zero_cvs, progress)
}

/// Writes the image as a new file `name` in `dir`: into an anonymous (or
/// uniquely named) temporary, checked against the image digest, fsynced,
/// then renamed into place and the directory fsynced. A failed export
/// leaves nothing.
#[allow(clippy::too_many_arguments)]
fn write_new_file(
    repo: &Repo,
    row: &ImageRow,
    dir: &File,
    dir_path: &Path,
    name: &OsStr,
    format: ExportFormat,
    mode: u32,
    progress: &dyn Progress,
) -> Result<()> {
    let out = dir_path.join(name);
    clean_leftovers(dir, dir_path);
    let fin = Temp::create(dir, dir_path, name)?;
    match format {
        ExportFormat::Raw => {
            fin.file().set_len(row.virtual_size).at(&out)?;
            materialise(repo, row, Some((fin.file(), &out, false)), progress)?;
        }
        ExportFormat::Qcow2 => {
            // The raw temporary lives in the depot's private tmp/.
            let tmp_path = repo.root().join("tmp");
            let tmp_dir = open_dir(&tmp_path)?;
            clean_leftovers(&tmp_dir, &tmp_path);
            let raw = Temp::create(&tmp_dir, &tmp_path, OsStr::new("export.raw"))?;
            raw.file().set_len(row.virtual_size).at(&tmp_path)?;
            materialise(repo, row, Some((raw.file(), &tmp_path, false)), progress)?;
            // qemu-img reads and writes both through inherited descriptors
            // (dup: without close-on-exec), never by a name in a directory.
            let rfd =
                nix::unistd::dup(raw.file()).map_err(|e| Error::io(&tmp_path, errno_io(e)))?;
            let wfd = nix::unistd::dup(fin.file()).map_err(|e| Error::io(&out, errno_io(e)))?;
            let src = format!("/proc/self/fd/{}", rfd.as_raw_fd());
            let dst = format!("/proc/self/fd/{}", wfd.as_raw_fd());
            progress.begin("qcow2", 0);
            let r = crate::image::source::qemu_img(&[
                "convert", "-q", "-f", "raw", "-O", "qcow2", &src, &dst,
            ]);
            progress.end();
            r.map_err(|e| match e {
                // qemu-img writes only the destination (the raw temporary
                // is complete by now): its ENOSPC is the destination's.
                Error::Tool { detail, .. } if detail.contains("No space left on device") => {
                    Error::NoSpace { path: out.clone() }
                }
                e => e,
            })?;
        }
    }
    nix::sys::stat::fchmod(fin.file(), Mode::from_bits_truncate(mode))
        .map_err(|e| Error::io(&out, errno_io(e)))?;
    fin.file().sync_all().at(&out)?;
    fin.persist(name)
}

/// Writes the image onto a block device in place: every block, zeros
/// included; checks the digest of what the device then holds; fsyncs.
fn write_block(
    repo: &Repo,
    row: &ImageRow,
    dev: &File,
    out: &Path,
    progress: &dyn Progress,
) -> Result<()> {
    let size = (&*dev).seek(SeekFrom::End(0)).at(out)?;
    if size < row.virtual_size {
        return Err(Error::refused(
            out,
            format!(
                "the block device holds {size} bytes, image {} ({}) needs {}",
                row.name, row.id, row.virtual_size
            ),
        ));
    }
    materialise(repo, row, Some((dev, out, true)), progress)?;
    dev.sync_all().at(out)
}

/// Writes zeros over every block the map does not store.
fn zero_holes(
    map: &crate::format::BlockMap,
    dev: &File,
    path: &Path,
    size: u64,
    progress: &dyn Progress,
) -> Result<()> {
    let mut gaps = Vec::new();
    let mut at = 0u64;
    for r in &map.runs {
        let start = (r.start * CHUNK).min(size);
        if start > at {
            gaps.push((at, start - at));
        }
        at = ((r.start + r.ids.len() as u64) * CHUNK).min(size);
    }
    if size > at {
        gaps.push((at, size - at));
    }
    progress.begin("zero", gaps.iter().map(|g| g.1).sum());
    let zeros = vec![0u8; 1 << 20];
    for (off, len) in gaps {
        // The device zeroes the range itself where it can (ZERO_RANGE on a
        // block device: 512-byte aligned), else zeros are written.
        let fast = off % 512 == 0
            && len % 512 == 0
            && fallocate(
                dev,
                FallocateFlags::FALLOC_FL_ZERO_RANGE,
                off as i64,
                len as i64,
            )
            .is_ok();
        if !fast {
            let mut o = off;
            while o < off + len {
                let n = (off + len - o).min(zeros.len() as u64) as usize;
                dev.write_all_at(&zeros[..n], o).at(path)?;
                o += n as u64;
            }
        }
        progress.advance(len);
    }
    progress.end();
    Ok(())
}

/// Streams the raw image to `w` in order (zeros written as zeros), checking
/// its digest on the way; a mismatch is an error after the bytes went out.
#[instrument(skip_all, err(level = "debug"))]
pub(crate) fn export_stream(
    repo: &Repo,
    row: &ImageRow,
    w: &mut dyn Write,
    progress: &dyn Progress,
) -> Result<()> {
    let plan = plan(repo, row)?;
    let label = format!("{} ({})", row.name, row.id);
    let zero_cvs = catalog::load_zero_cvs(&repo.conn, row.virtual_size)?;
    let pieces = sparse_pieces(&plan.map, row.virtual_size);
    let readers = ReaderCache::new(repo.store());
    let mut wk = Worker {
        plan: &plan,
        label: &label,
        readers: &readers,
        cache: Vec::new(),
        check_chunks: false,
    };
    let stdout = Path::new("stdout");
    let zeros = vec![0u8; 1 << 20];
    let mut buf = Vec::new();
    let mut results = Vec::with_capacity(pieces.leaves.len());
    progress.begin("write", row.virtual_size);
    for leaf in &pieces.leaves {
        if leaf.zero {
            results.push(zero_cvs.leaf(&pieces, leaf));
            let mut left = leaf.len;
            while left > 0 {
                let n = left.min(zeros.len() as u64) as usize;
                w.write_all(&zeros[..n]).at(stdout)?;
                left -= n as u64;
            }
        } else {
            results.push(wk.leaf_bytes(leaf, &pieces, &mut buf)?);
            w.write_all(&buf).at(stdout)?;
        }
        progress.advance(leaf.len);
    }
    w.flush().at(stdout)?;
    progress.end();
    let digest = hex(pieces.root(&results).as_bytes());
    check_digest(repo, &plan, &label, row, zero_cvs, &digest, progress)
}

#[instrument(skip_all, err(level = "debug"))]
pub(crate) fn verify_image(
    repo: &Repo,
    row: &ImageRow,
    progress: &dyn Progress,
) -> Result<VerifyReport> {
    let chunks = materialise(repo, row, None, progress)?;
    Ok(VerifyReport {
        images: 1,
        chunks,
        bytes: row.virtual_size,
    })
}

/// Everything a worker needs to find a chunk's bytes.
pub(crate) struct Plan {
    pub(crate) map: crate::format::BlockMap,
    pub(crate) chunks: HashMap<ChunkId, ChunkLoc>,
    pub(crate) frames: HashMap<i64, FrameLoc>,
    pub(crate) packs: HashMap<i64, String>,
}

/// Where every chunk of the image `row` lives, read in one read
/// transaction (one snapshot, and SQLite's file locks taken once).
#[instrument(skip_all, err(level = "debug"))]
pub(crate) fn plan(repo: &Repo, row: &ImageRow) -> Result<Plan> {
    catalog::read(&repo.conn, |tx| plan_in(tx, row))
}

fn plan_in(tx: &rusqlite::Connection, row: &ImageRow) -> Result<Plan> {
    plan_map(tx, row, catalog::image_map(tx, &row.id)?)
}

/// The content digest of image `row` (of `row.virtual_size` bytes) with
/// the block map `map`, before the catalog holds that map (a pull checks
/// what it fetched before the image becomes available): taken as `image
/// verify` takes it, on parallel workers, zero leaves from the cache.
pub(crate) fn digest_unlisted(
    repo: &Repo,
    row: &ImageRow,
    map: crate::format::BlockMap,
    progress: &dyn Progress,
) -> Result<String> {
    let plan = catalog::read(&repo.conn, |tx| plan_map(tx, row, map))?;
    let label = format!("{} ({})", row.name, row.id);
    let zero_cvs = catalog::load_zero_cvs(&repo.conn, row.virtual_size)?;
    let (digest, _) = rebuild(repo, &plan, &label, row, &zero_cvs, false, progress)?;
    keep_zero_cvs(repo, zero_cvs);
    Ok(digest)
}

/// Keeps the zero-leaf values a digest computed anew (best effort: a
/// read-only depot still exports).
fn keep_zero_cvs(repo: &Repo, zero_cvs: digest::ZeroCvs) {
    let added = zero_cvs.into_added();
    if !added.is_empty() {
        let _ = catalog::write(&repo.conn, |c| catalog::save_zero_cvs(c, &added));
    }
}

fn plan_map(
    tx: &rusqlite::Connection,
    row: &ImageRow,
    map: crate::format::BlockMap,
) -> Result<Plan> {
    let mut ids: Vec<ChunkId> = map.data().map(|(_, c)| c).collect();
    ids.sort_unstable();
    ids.dedup();
    let chunks = catalog::chunk_locs(tx, &ids)?;
    let missing = |what: String, cid: ChunkId| Error::Corrupt {
        image: format!("{} ({})", row.name, row.id),
        offset: map.data().find(|&(_, c)| c == cid).map_or(0, |(b, _)| b) * CHUNK,
        detail: what,
    };
    if let Some(&cid) = ids.iter().find(|c| !chunks.contains_key(c)) {
        return Err(missing(
            format!("chunk {cid} is missing from the catalog"),
            cid,
        ));
    }
    let mut frames = HashMap::new();
    let mut packs = HashMap::new();
    for (&cid, loc) in &chunks {
        if let std::collections::hash_map::Entry::Vacant(v) = frames.entry(loc.frame) {
            let f = catalog::frame_loc(tx, loc.frame)?.ok_or_else(|| {
                missing(
                    format!("frame {} is missing from the catalog", loc.frame),
                    cid,
                )
            })?;
            if let std::collections::hash_map::Entry::Vacant(p) = packs.entry(f.pack) {
                let name = catalog::pack_name(tx, f.pack)?.ok_or_else(|| {
                    missing(format!("pack {} is missing from the catalog", f.pack), cid)
                })?;
                p.insert(name);
            }
            v.insert(f);
        }
    }
    Ok(Plan {
        map,
        chunks,
        frames,
        packs,
    })
}

/// Rebuilds the image into `out` (pre-sized, sparse) or just checks it.
/// Returns the number of data blocks read.
///
/// The content digest of what was rebuilt (for export: of the written file)
/// must equal the recorded one. BLAKE3's tree covers every byte, so this
/// proves every chunk right at once; hashing each 4 KiB chunk on its own as
/// well would cost a third of export's CPU (measured: 67 ms per 179 MB, as
/// much as decompressing it). Only when the digest does not match is a
/// second pass made that checks every chunk against its own hash, to name
/// the first bad byte offset.
fn materialise(
    repo: &Repo,
    row: &ImageRow,
    out: Option<(&File, &Path, bool)>,
    progress: &dyn Progress,
) -> Result<u64> {
    let plan = plan(repo, row)?;
    let label = format!("{} ({})", row.name, row.id);
    let zero_cvs = catalog::load_zero_cvs(&repo.conn, row.virtual_size)?;
    let (digest, blocks) = match out {
        // Writing a file: every frame is decompressed once and its chunks
        // scattered to their offsets; the digest is then taken of the file.
        // A block device (`dense`) gets its zeros written too, and the
        // digest reads every byte of it back.
        Some((file, path, dense)) => {
            let blocks = scatter(repo, &plan, &label, file, path, row.virtual_size, progress)?;
            if dense {
                zero_holes(&plan.map, file, path, row.virtual_size, progress)?;
            }
            let digest = digest_file(
                &plan,
                file,
                path,
                row.virtual_size,
                dense,
                &zero_cvs,
                progress,
            )?;
            (digest, blocks)
        }
        None => rebuild(repo, &plan, &label, row, &zero_cvs, false, progress)?,
    };
    check_digest(repo, &plan, &label, row, zero_cvs, &digest, progress)?;
    Ok(blocks)
}

/// Keeps new zero-leaf values; compares `digest` with the recorded one and,
/// when it differs, finds the first chunk that does not match its hash.
fn check_digest(
    repo: &Repo,
    plan: &Plan,
    label: &str,
    row: &ImageRow,
    zero_cvs: digest::ZeroCvs,
    digest: &str,
    progress: &dyn Progress,
) -> Result<()> {
    keep_zero_cvs(repo, zero_cvs);
    if row.content_digest.as_deref() == Some(digest) {
        return Ok(());
    }
    // Find the first chunk that does not match its hash.
    let zero_cvs = catalog::load_zero_cvs(&repo.conn, row.virtual_size)?;
    rebuild(repo, plan, label, row, &zero_cvs, true, progress)?;
    Err(Error::Corrupt {
        image: label.to_owned(),
        offset: 0,
        detail: format!(
            "content digest is {digest}, the catalog records {}",
            row.content_digest.as_deref().unwrap_or("none")
        ),
    })
}

/// Runs `f(state, i)` for every `i` in `0..n` on one thread per core (at
/// most 8), each thread with its own state from `init`; stops at the first
/// error.
fn par_for<S>(
    n: usize,
    init: impl Fn() -> S + Sync,
    f: impl Fn(&mut S, usize) -> Result<()> + Sync,
) -> Result<()> {
    let next = AtomicUsize::new(0);
    let abort = AtomicBool::new(false);
    let workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .clamp(1, 8);
    let errs: Vec<Error> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..workers)
            .map(|_| {
                s.spawn(|| -> Result<()> {
                    let mut st = init();
                    while !abort.load(Ordering::Relaxed) {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= n {
                            break;
                        }
                        if let Err(e) = f(&mut st, i) {
                            abort.store(true, Ordering::Relaxed);
                            return Err(e);
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        hs.into_iter()
            .filter_map(|h| h.join().expect("worker thread panicked").err())
            .collect()
    });
    match errs.into_iter().next() {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Writes every data block of the image into `file`, frame by frame (each
/// frame decompressed once). Returns the number of blocks written.
fn scatter(
    repo: &Repo,
    plan: &Plan,
    label: &str,
    file: &File,
    path: &Path,
    size: u64,
    progress: &dyn Progress,
) -> Result<u64> {
    // frame -> (slot, block) pairs, frames in pack order.
    let mut uses: HashMap<i64, Vec<(u32, u64)>> = HashMap::new();
    for (blk, cid) in plan.map.data() {
        let loc = &plan.chunks[&cid];
        uses.entry(loc.frame).or_default().push((loc.slot, blk));
    }
    let mut order: Vec<(i64, Vec<(u32, u64)>)> = uses.into_iter().collect();
    order.sort_by_key(|(f, _)| {
        let l = &plan.frames[f];
        (l.pack, l.offset)
    });
    let readers = ReaderCache::new(repo.store());
    progress.begin(
        "write",
        order.iter().map(|(_, u)| u.len() as u64 * CHUNK).sum(),
    );
    let r = par_for(order.len(), Vec::new, |buf: &mut Vec<u8>, i| {
        let (frame, blocks) = &order[i];
        let first_off = blocks.iter().map(|b| b.1).min().unwrap_or(0) * CHUNK;
        read_frame(plan, &readers, *frame, buf).map_err(|e| Error::Corrupt {
            image: label.to_owned(),
            offset: first_off,
            detail: e.to_string(),
        })?;
        let mut k = 0;
        while k < blocks.len() {
            // a run of consecutive blocks stored in consecutive slots
            let (slot0, blk0) = blocks[k];
            let mut n = 1;
            while k + n < blocks.len() && blocks[k + n] == (slot0 + n as u32, blk0 + n as u64) {
                n += 1;
            }
            let off = blk0 * CHUNK;
            let len = (n as u64 * CHUNK).min(size - off) as usize;
            let s = slot0 as usize * CHUNK_SIZE;
            let Some(data) = buf.get(s..s + n * CHUNK_SIZE) else {
                return Err(Error::Corrupt {
                    image: label.to_owned(),
                    offset: off,
                    detail: format!("frame {frame}: slot {slot0} outside the frame"),
                });
            };
            file.write_all_at(&data[..len], off).at(path)?;
            progress.advance(len as u64);
            k += n;
        }
        Ok(())
    });
    progress.end();
    r?;
    Ok(order.iter().map(|(_, u)| u.len() as u64).sum())
}

/// The content digest of what was written to `file`.
#[allow(clippy::too_many_arguments)]
fn digest_file(
    plan: &Plan,
    file: &File,
    path: &Path,
    size: u64,
    dense: bool,
    zero_cvs: &digest::ZeroCvs,
    progress: &dyn Progress,
) -> Result<String> {
    let pieces = if dense {
        digest::split_sparse(size, digest::LEAF_BYTES, |_, _| true)
    } else {
        sparse_pieces(&plan.map, size)
    };
    digest_pieces(pieces, file, path, size, zero_cvs, progress)
}

fn digest_pieces(
    pieces: digest::Pieces,
    file: &File,
    path: &Path,
    size: u64,
    zero_cvs: &digest::ZeroCvs,
    progress: &dyn Progress,
) -> Result<String> {
    let results: Mutex<Vec<Option<PieceHash>>> = Mutex::new(vec![None; pieces.leaves.len()]);
    progress.begin("digest", size);
    let r = par_for(
        pieces.leaves.len(),
        || vec![0u8; digest::LEAF_BYTES as usize],
        |buf, i| {
            let leaf = &pieces.leaves[i];
            let h = if leaf.zero {
                zero_cvs.leaf(&pieces, leaf)
            } else {
                let b = &mut buf[..leaf.len as usize];
                file.read_exact_at(b, leaf.offset).at(path)?;
                let mut h = digest::piece_hasher(leaf);
                h.update(b);
                pieces.finish(&h)
            };
            results.lock().unwrap()[i] = Some(h);
            progress.advance(leaf.len);
            Ok(())
        },
    );
    progress.end();
    r?;
    Ok(root_hex(&pieces, results))
}

/// The digest pieces of an image: zero regions as single pieces.
fn sparse_pieces(map: &crate::format::BlockMap, size: u64) -> digest::Pieces {
    digest::split_sparse(size, digest::LEAF_BYTES, |off, len| {
        map.has_data(off / CHUNK, (off + len).div_ceil(CHUNK))
    })
}

/// Decompresses `frame` into `out`, opening its pack once per export.
fn read_frame(
    plan: &Plan,
    readers: &ReaderCache<'_, i64>,
    frame: i64,
    out: &mut Vec<u8>,
) -> Result<()> {
    let f = &plan.frames[&frame];
    let reader = readers.get(f.pack, &plan.packs[&f.pack])?;
    reader.read_frame(f.offset, f.clen, f.nchunks as usize, out)
}

/// Rebuilds the image in memory, leaf by leaf, on parallel workers (verify:
/// nothing is written); returns the hex digest and the data blocks read.
/// With `check_chunks`, every chunk is also checked against its own hash.
fn rebuild(
    repo: &Repo,
    plan: &Plan,
    label: &str,
    row: &ImageRow,
    zero_cvs: &digest::ZeroCvs,
    check_chunks: bool,
    progress: &dyn Progress,
) -> Result<(String, u64)> {
    let pieces = sparse_pieces(&plan.map, row.virtual_size);
    let nleaves = pieces.leaves.len();
    let results: Mutex<Vec<Option<PieceHash>>> = Mutex::new(vec![None; nleaves]);
    let readers = ReaderCache::new(repo.store());
    let blocks = std::sync::atomic::AtomicU64::new(0);
    let phase = if check_chunks { "locate" } else { "verify" };
    progress.begin(phase, row.virtual_size);
    let r = par_for(
        nleaves.div_ceil(digest::LEAVES_PER_UNIT),
        || Worker {
            plan,
            label,
            readers: &readers,
            cache: Vec::new(),
            check_chunks,
        },
        |w, unit| {
            let first = unit * digest::LEAVES_PER_UNIT;
            for i in first..(first + digest::LEAVES_PER_UNIT).min(nleaves) {
                let leaf = &pieces.leaves[i];
                let (h, n) = w.leaf(leaf, &pieces, zero_cvs)?;
                progress.advance(leaf.len);
                blocks.fetch_add(n, Ordering::Relaxed);
                results.lock().unwrap()[i] = Some(h);
            }
            Ok(())
        },
    );
    progress.end();
    r?;
    Ok((root_hex(&pieces, results), blocks.into_inner()))
}

/// The digest from every piece's result, in hex.
fn root_hex(pieces: &digest::Pieces, results: Mutex<Vec<Option<PieceHash>>>) -> String {
    let results: Vec<PieceHash> = results
        .into_inner()
        .unwrap()
        .into_iter()
        .map(|r| r.expect("every piece done"))
        .collect();
    hex(pieces.root(&results).as_bytes())
}

/// Decompressed frames a worker keeps (most recent last).
const FRAME_CACHE: usize = 4;

struct Worker<'a> {
    plan: &'a Plan,
    label: &'a str,
    readers: &'a ReaderCache<'a, i64>,
    cache: Vec<(i64, Vec<u8>)>,
    check_chunks: bool,
}

impl Worker<'_> {
    /// Rebuilds one digest leaf; returns its hash and its data block count.
    fn leaf(
        &mut self,
        piece: &digest::Piece,
        pieces: &digest::Pieces,
        zero_cvs: &digest::ZeroCvs,
    ) -> Result<(PieceHash, u64)> {
        let end = piece.offset + piece.len;
        if piece.zero {
            return Ok((zero_cvs.leaf(pieces, piece), 0));
        }
        let mut h = digest::piece_hasher(piece);
        let mut blocks = 0;
        let mut off = piece.offset;
        let mut zeros = 0u64;
        while off < end {
            let len = (end - off).min(CHUNK) as usize;
            let cid = self.plan.map.get(off / CHUNK);
            if cid == ZERO_BLOCK {
                zeros += len as u64;
            } else {
                if zeros > 0 {
                    digest::update_zeros(&mut h, zeros);
                    zeros = 0;
                }
                let (fi, s) = self.chunk(cid, off)?;
                h.update(&self.cache[fi].1[s..s + len]);
                blocks += 1;
            }
            off += len as u64;
        }
        if zeros > 0 {
            digest::update_zeros(&mut h, zeros);
        }
        Ok((pieces.finish(&h), blocks))
    }

    /// Rebuilds one digest leaf into `out` (zeros included); returns its hash.
    fn leaf_bytes(
        &mut self,
        piece: &digest::Piece,
        pieces: &digest::Pieces,
        out: &mut Vec<u8>,
    ) -> Result<PieceHash> {
        out.clear();
        let end = piece.offset + piece.len;
        let mut off = piece.offset;
        while off < end {
            let len = (end - off).min(CHUNK) as usize;
            let cid = self.plan.map.get(off / CHUNK);
            if cid == ZERO_BLOCK {
                out.resize(out.len() + len, 0);
            } else {
                let (fi, s) = self.chunk(cid, off)?;
                out.extend_from_slice(&self.cache[fi].1[s..s + len]);
            }
            off += len as u64;
        }
        let mut h = digest::piece_hasher(piece);
        h.update(out);
        Ok(pieces.finish(&h))
    }

    /// Finds chunk `cid` (used at image offset `off`, for error messages):
    /// returns the index of its frame in the cache and its byte offset there.
    fn chunk(&mut self, cid: ChunkId, off: u64) -> Result<(usize, usize)> {
        let loc = self.plan.chunks[&cid];
        let corrupt = |detail: String| Error::Corrupt {
            image: self.label.to_owned(),
            offset: off,
            detail,
        };
        let pos = match self.cache.iter().position(|(f, _)| *f == loc.frame) {
            Some(p) => p,
            None => {
                let data = self
                    .read_frame(loc.frame)
                    .map_err(|e| corrupt(e.to_string()))?;
                if self.cache.len() >= FRAME_CACHE {
                    self.cache.remove(0);
                }
                self.cache.push((loc.frame, data));
                self.cache.len() - 1
            }
        };
        let s = loc.slot as usize * CHUNK_SIZE;
        let Some(data) = self.cache[pos].1.get(s..s + CHUNK_SIZE) else {
            return Err(corrupt(format!(
                "chunk {cid}: slot {} outside its frame",
                loc.slot
            )));
        };
        if self.check_chunks && ChunkHash::of(data) != loc.hash {
            return Err(corrupt(format!(
                "chunk {cid} (frame {}, slot {}) does not match its hash {:?}: the pack file was damaged; `vmdepot image verify` checks every image's data",
                loc.frame, loc.slot, loc.hash
            )));
        }
        Ok((pos, s))
    }

    fn read_frame(&self, frame: i64) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        read_frame(self.plan, self.readers, frame, &mut out)?;
        Ok(out)
    }
}
