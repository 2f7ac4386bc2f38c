//! [`ChunkMap`]: where each chunk a remote holds is, read from its pack
//! indexes. Indexes never change once written (a pack and its index are
//! immutable; only gc removes them), so each is fetched once and kept in
//! the local depot's cache (`DEPOT/remotes/NAME/indexes/NAME.idx`, 0600
//! like the depot's files); a cached index whose pack the remote no longer
//! lists is dropped from the cache.
//!
//! Only packs that are listed (not retired by a remote gc) and have an
//! index count: a pack without one is a push that died between the two
//! uploads, and is sent again rather than trusted.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};

use super::Remote;
use crate::error::{IoContext, Result};
use crate::format::{self, PackIndex, UNUSED_SLOT};
use crate::ids::ChunkHash;
use crate::store::{valid_pack_name, ObjectKind};

/// Where one chunk is on the remote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkLoc {
    /// The pack's name.
    pub pack: String,
    /// Byte offset of its zstd frame in the pack.
    pub offset: u64,
    /// The frame's compressed length.
    pub clen: u64,
    /// Chunks in the frame.
    pub nchunks: u32,
    /// The chunk's slot in the frame.
    pub slot: u32,
}

/// The remote's chunks by hash, and its packs' indexes.
#[derive(Debug, Default)]
pub struct ChunkMap {
    chunks: HashMap<ChunkHash, ChunkLoc>,
    /// Every pack counted, with its sealed length.
    pub packs: HashMap<String, u64>,
}

impl ChunkMap {
    /// Where a chunk is, if the remote holds it.
    pub fn get(&self, hash: &ChunkHash) -> Option<&ChunkLoc> {
        self.chunks.get(hash)
    }

    /// Whether the remote holds a chunk.
    pub fn contains(&self, hash: &ChunkHash) -> bool {
        self.chunks.contains_key(hash)
    }

    /// Chunks held.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.chunks.len()
    }

    /// Adds the chunks of one pack's index (the first location found for
    /// a content wins, as locally).
    pub fn add(&mut self, ix: &PackIndex) {
        for f in &ix.frames {
            for (slot, h) in f.hashes.iter().enumerate() {
                if *h == UNUSED_SLOT {
                    continue;
                }
                self.chunks.entry(*h).or_insert_with(|| ChunkLoc {
                    pack: ix.pack.clone(),
                    offset: f.offset,
                    clen: f.clen,
                    nchunks: f.hashes.len() as u32,
                    slot: slot as u32,
                });
            }
        }
        self.packs.insert(ix.pack.clone(), ix.pack_len);
    }
}

impl Remote {
    /// The chunks the remote holds now: one listing of packs and one of
    /// indexes, then every index not cached yet fetched (and cached).
    pub(crate) fn chunk_map(&self) -> Result<ChunkMap> {
        let packs: HashMap<String, u64> = self
            .store
            .list(ObjectKind::Pack)?
            .into_iter()
            .filter(|o| valid_pack_name(&o.name))
            .map(|o| (o.name, o.size))
            .collect();
        let indexed: HashSet<String> = self
            .store
            .list(ObjectKind::PackIndex)?
            .into_iter()
            .map(|o| o.name)
            .filter(|n| packs.contains_key(n))
            .collect();
        let dir = self.index_cache();
        self.prune_cache(&dir, &indexed);
        let mut map = ChunkMap::default();
        for name in &indexed {
            let Some(ix) = self.fetch_index(&dir, name)? else {
                continue; // retired since the listing (a gc): its chunks are not there
            };
            if packs.get(name) != Some(&ix.pack_len) {
                continue; // a pack of another size than its index says: not trusted
            }
            map.add(&ix);
        }
        Ok(map)
    }

    /// The directory of cached indexes.
    pub(super) fn index_cache(&self) -> PathBuf {
        self.cache.join("indexes")
    }

    /// One pack's index (see [`Remote::fetch_index`]); one gone since the
    /// listing is an error.
    pub(super) fn index(&self, dir: &Path, name: &str) -> Result<PackIndex> {
        self.fetch_index(dir, name)?.ok_or_else(|| {
            let label = self.store.label(ObjectKind::PackIndex, name);
            self.damaged(
                &label,
                "listed but gone: a gc removed it meanwhile; run again",
            )
        })
    }

    /// One pack's index: from the cache, else fetched, checked and cached
    /// (`None`: it was listed, but is gone or retired now).
    fn fetch_index(&self, dir: &Path, name: &str) -> Result<Option<PackIndex>> {
        let path = dir.join(format!("{name}.idx"));
        if let Ok(b) = std::fs::read(&path) {
            match format::decode_index(&b) {
                Ok(ix) if ix.pack == name => return Ok(Some(ix)),
                // a damaged cache entry: fetched again below
                _ => drop(std::fs::remove_file(&path)),
            }
        }
        let label = self.store.label(ObjectKind::PackIndex, name);
        let Some(b) = self.store.get(ObjectKind::PackIndex, name)? else {
            return Ok(None);
        };
        let ix = format::decode_index(&b).map_err(|e| self.damaged(&label, &e.to_string()))?;
        if ix.pack != name {
            return Err(self.damaged(&label, &format!("it indexes pack {}", ix.pack)));
        }
        self.cache_index(dir, &path, &b)?;
        Ok(Some(ix))
    }

    /// Keeps a fetched index (written whole under a temporary name, then
    /// renamed: a reader never sees half of one).
    fn cache_index(&self, dir: &Path, path: &Path, bytes: &[u8]) -> Result<()> {
        self.perms.mkdir_all(dir)?;
        let tmp = path.with_extension("idx.part");
        let mut f = self
            .perms
            .open_options()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .at(&tmp)?;
        f.write_all(bytes).at(&tmp)?;
        drop(f);
        std::fs::rename(&tmp, path).at(path)
    }

    /// Drops cached indexes of packs the remote no longer has.
    fn prune_cache(&self, dir: &Path, indexed: &HashSet<String>) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for f in rd.flatten() {
            let name = f.file_name();
            let keep = name
                .to_str()
                .and_then(|n| n.strip_suffix(".idx"))
                .is_some_and(|n| indexed.contains(n));
            if !keep {
                drop(std::fs::remove_file(f.path()));
            }
        }
    }
}
