//! [`LocalDir`]: the [`ObjectStore`] of a depot directory, exactly the
//! layout of docs/FORMAT.md: `packs/XX/NAME.pack` and, beside it,
//! `packs/XX/NAME.idx` (XX: the name's first two hex digits). Readers map
//! one frame at a time: the only mmap in vmdepot is here.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::object::{ObjectInfo, ObjectKind, ObjectReader, ObjectStore, ObjectWriter, RangeBytes};
use super::{sync_dir, valid_pack_name};
use crate::error::{Error, IoContext, Result};
use crate::perms::Perms;

/// Reads up to this many bytes are copied (`pread`) rather than mapped.
const COPY_BELOW: u64 = 4096;

/// The objects of a depot directory, in files under `packs/`.
///
/// Deletion unlinks at once (see [`ObjectStore`] on deferred deletion): a
/// reader opened before holds the file's descriptor, and its frame
/// mappings are made from it, so the bytes stay readable for it.
#[derive(Clone, Debug)]
pub struct LocalDir {
    packs: PathBuf,
    perms: Perms,
}

impl LocalDir {
    /// The store of the depot at `root`, creating files with `perms`.
    pub fn new(root: &Path, perms: Perms) -> LocalDir {
        LocalDir {
            packs: root.join("packs"),
            perms,
        }
    }

    /// The directory the objects are in (`packs/`).
    pub fn dir(&self) -> &Path {
        &self.packs
    }

    /// Creates the directory the objects are in, if it is missing.
    pub fn create_dir(&self) -> Result<()> {
        self.perms.mkdir_all(&self.packs)
    }

    /// The file of an object; its name must be 32 lowercase hex digits
    /// (anything else is a damaged catalog).
    pub fn path(&self, kind: ObjectKind, name: &str) -> Result<PathBuf> {
        if matches!(kind, ObjectKind::Manifest | ObjectKind::Meta) {
            return Err(Error::Invalid(format!(
                "a local depot's store holds packs and indexes only, not {kind:?} objects ({name:?}): \
                 its manifests are files under manifests/"
            )));
        }
        if !valid_pack_name(name) {
            return Err(Error::StoreDamaged(format!(
                "pack name {name:?} in the catalog is not 32 lowercase hex digits; run `vmdepot fsck`"
            )));
        }
        Ok(self
            .packs
            .join(&name[..2])
            .join(format!("{name}.{}", suffix(kind))))
    }

    /// The objects of `kind` in one fan-out directory.
    fn list_dir(&self, dir: &Path, kind: ObjectKind, out: &mut Vec<ObjectInfo>) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for f in rd.flatten() {
            let p = f.path();
            if p.extension().is_none_or(|e| e != suffix(kind)) {
                continue;
            }
            let Some(name) = p.file_stem().and_then(|s| s.to_str()) else {
                continue;
            };
            // Only files where the layout puts them; a file removed since
            // the directory was read is not listed.
            if self.path(kind, name).ok().as_deref() != Some(p.as_path()) {
                continue;
            }
            if let Ok(m) = f.metadata() {
                out.push(ObjectInfo {
                    name: name.to_owned(),
                    size: m.len(),
                    modified: m.modified().ok(),
                });
            }
        }
    }
}

/// File name extension of a kind.
fn suffix(kind: ObjectKind) -> &'static str {
    match kind {
        ObjectKind::Pack => "pack",
        ObjectKind::PackIndex => "idx",
        ObjectKind::Manifest => "manifest",
        ObjectKind::Meta => "meta",
    }
}

impl ObjectStore for LocalDir {
    fn create(&self, kind: ObjectKind, name: &str) -> Result<Box<dyn ObjectWriter>> {
        let path = self.path(kind, name)?;
        let dir = path.parent().expect("object path has a parent");
        if !dir.exists() {
            self.perms.mkdir_all(dir)?;
            sync_dir(&self.packs)?;
        }
        let file = self
            .perms
            .open_options()
            .write(true)
            .create_new(true)
            .open(&path)
            .at(&path)?;
        Ok(Box::new(LocalWriter { file, path, len: 0 }))
    }

    fn put(&self, kind: ObjectKind, name: &str, bytes: &[u8]) -> Result<()> {
        let mut w = self.create(kind, name)?;
        w.append(bytes)?;
        w.seal().map(|_| ())
    }

    fn open(&self, kind: ObjectKind, name: &str) -> Result<Arc<dyn ObjectReader>> {
        let path = self.path(kind, name)?;
        let file = File::open(&path).at(&path)?;
        let len = file.metadata().at(&path)?.len();
        Ok(Arc::new(LocalReader {
            file,
            len,
            label: path.display().to_string(),
        }))
    }

    fn get(&self, kind: ObjectKind, name: &str) -> Result<Option<Vec<u8>>> {
        let path = self.path(kind, name)?;
        match std::fs::read(&path) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(&path, e)),
        }
    }

    fn info(&self, kind: ObjectKind, name: &str) -> Result<Option<ObjectInfo>> {
        let path = self.path(kind, name)?;
        match std::fs::metadata(&path) {
            Ok(m) => Ok(Some(ObjectInfo {
                name: name.to_owned(),
                size: m.len(),
                modified: m.modified().ok(),
            })),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(&path, e)),
        }
    }

    fn list(&self, kind: ObjectKind) -> Result<Vec<ObjectInfo>> {
        let rd = match std::fs::read_dir(&self.packs) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::io(&self.packs, e)),
        };
        let mut out = Vec::new();
        for sub in rd.flatten() {
            self.list_dir(&sub.path(), kind, &mut out);
        }
        Ok(out)
    }

    fn delete(&self, kind: ObjectKind, name: &str) -> Result<()> {
        let path = self.path(kind, name)?;
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io(&path, e)),
            _ => Ok(()),
        }
    }

    /// Nothing is ever retired here: an object that exists is live.
    fn revive(&self, kind: ObjectKind, name: &str) -> Result<()> {
        let path = self.path(kind, name)?;
        std::fs::metadata(&path).at(&path).map(|_| ())
    }

    fn label(&self, kind: ObjectKind, name: &str) -> String {
        match self.path(kind, name) {
            Ok(p) => p.display().to_string(),
            Err(_) => format!("{} {name:?}", suffix(kind)),
        }
    }
}

/// A new file being appended to.
struct LocalWriter {
    file: File,
    path: PathBuf,
    len: u64,
}

impl ObjectWriter for LocalWriter {
    fn append(&mut self, bytes: &[u8]) -> Result<()> {
        self.file.write_all(bytes).at(&self.path)?;
        self.len += bytes.len() as u64;
        Ok(())
    }

    fn len(&self) -> u64 {
        self.len
    }

    /// The file's data, then its directory entry.
    fn seal(self: Box<Self>) -> Result<u64> {
        self.file.sync_all().at(&self.path)?;
        sync_dir(self.path.parent().expect("object path has a parent"))?;
        Ok(self.len)
    }
}

/// An open file of a sealed object.
struct LocalReader {
    file: File,
    len: u64,
    label: String,
}

impl ObjectReader for LocalReader {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_range(&self, offset: u64, len: u64) -> Result<RangeBytes> {
        if offset.checked_add(len).is_none_or(|end| end > self.len) {
            return Err(Error::StoreDamaged(format!(
                "{}: bytes at offset {offset} (+{len}) lie past its end ({} bytes): the object is torn or truncated; `vmdepot fsck` checks the store",
                self.label, self.len
            )));
        }
        if len < COPY_BELOW {
            let mut b = vec![0u8; len as usize];
            self.file.read_exact_at(&mut b, offset).at(&self.label)?;
            return Ok(Box::new(b));
        }
        let m = Mapped::map(&self.file, offset, len).at(&self.label)?;
        Ok(Box::new(m))
    }

    fn label(&self) -> &str {
        &self.label
    }
}

/// A byte range of a sealed file, mapped (from its page boundary).
struct Mapped {
    map: memmap2::Mmap,
    skip: usize,
}

impl Mapped {
    fn map(file: &File, offset: u64, len: u64) -> std::io::Result<Mapped> {
        let page = 4096u64;
        let start = offset / page * page;
        let skip = (offset - start) as usize;
        let map = map_sealed(file, start, skip + len as usize)?;
        Ok(Mapped { map, skip })
    }
}

impl std::ops::Deref for Mapped {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.map[self.skip..]
    }
}

/// The only mmap in vmdepot.
///
/// # Safety (the promise this relies on)
/// Sealed objects are never modified in place: they are written once by a
/// writer, fsynced, and afterwards only deleted whole (unlink keeps an
/// existing mapping valid). So the mapped bytes cannot change under a reader.
#[allow(unsafe_code)]
fn map_sealed(file: &File, offset: u64, len: usize) -> std::io::Result<memmap2::Mmap> {
    // SAFETY: see the function's doc: sealed objects are immutable once written.
    unsafe {
        memmap2::MmapOptions::new()
            .offset(offset)
            .len(len)
            .map(file)
    }
}
