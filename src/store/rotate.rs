//! [`PackRotator`]: frames appended to one pack after another, a pack
//! sealed once it reaches [`PACK_TARGET_BYTES`]; each new pack is
//! registered by the caller (in the catalog, as pending) before it exists.
//! Import, gc's repack and copy write packs through it.

use super::new_pack_name;
use super::object::ObjectStore;
use super::pack::PackWriter;
use crate::error::Result;
use crate::format::PACK_TARGET_BYTES;
use crate::ids::ChunkHash;

/// Registers a new pack by name before its object is created, returning
/// the caller's key for it (the catalog's pack row id): a pack object
/// without a record would be garbage nobody knows of.
pub type Register<'a, K> = Box<dyn FnMut(&str) -> Result<K> + 'a>;

/// A pack the rotator sealed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sealed<K> {
    /// The caller's key of the pack.
    pub pack: K,
    /// Its size in bytes.
    pub size: u64,
}

/// Where [`PackRotator::append`] put a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Placed<K> {
    /// The pack (the caller's key).
    pub pack: K,
    /// The frame's offset in it.
    pub offset: u64,
    /// The pack, if this frame filled it and it was sealed.
    pub sealed: Option<Sealed<K>>,
}

/// Writes frames into packs of about [`PACK_TARGET_BYTES`].
pub struct PackRotator<'a, K> {
    store: &'a dyn ObjectStore,
    register: Register<'a, K>,
    current: Option<(K, PackWriter<'a>)>,
}

impl<'a, K: Copy> PackRotator<'a, K> {
    /// A rotator writing to `store`, registering packs with `register`.
    pub fn new(store: &'a dyn ObjectStore, register: Register<'a, K>) -> PackRotator<'a, K> {
        PackRotator {
            store,
            register,
            current: None,
        }
    }

    /// Appends a compressed frame (its slots' hashes for the index),
    /// starting a pack if none is open, and seals the pack the frame fills.
    pub fn append(&mut self, frame: &[u8], hashes: &[ChunkHash]) -> Result<Placed<K>> {
        let (pack, w) = match &mut self.current {
            Some((k, w)) => (*k, w),
            None => {
                let name = new_pack_name();
                let k = (self.register)(&name)?;
                let w = PackWriter::create(self.store, &name)?;
                let (k, w) = self.current.insert((k, w));
                (*k, w)
            }
        };
        let offset = w.append(frame, hashes)?;
        let sealed = if w.len() >= PACK_TARGET_BYTES {
            self.finish()?
        } else {
            None
        };
        Ok(Placed {
            pack,
            offset,
            sealed,
        })
    }

    /// Seals the open pack, if any (the next frame starts a new one).
    pub fn finish(&mut self) -> Result<Option<Sealed<K>>> {
        let Some((pack, w)) = self.current.take() else {
            return Ok(None);
        };
        let size = w.seal()?;
        Ok(Some(Sealed { pack, size }))
    }
}
