//! [`Remote::verify_image`]: a remote image's data re-read and re-hashed,
//! as `image verify` does locally. Every chunk its manifest names is first
//! located through the remote's pack indexes (a chunk no pack holds is an
//! error naming its block); then the blocks are walked in map order, each
//! frame fetched by a ranged read and decompressed, each chunk re-hashed
//! and fed, zero blocks included, to the content digest, which must be the
//! manifest's. Memory is bounded: a few decompressed frames
//! ([`FRAME_WINDOW`]), reused while consecutive blocks stay in them.

use std::collections::{HashMap, VecDeque};

use super::{ChunkLoc, ChunkMap, Remote, RemoteImage};
use crate::error::{Error, Result};
use crate::format::CHUNK_SIZE;
use crate::ids::ChunkHash;
use crate::image::export::VerifyReport;
use crate::progress::Progress;
use crate::store::PackReader;

/// Decompressed frames kept at once (each at most 1 MiB).
pub const FRAME_WINDOW: usize = 8;

/// The frames of one verify: packs opened once, a window of frames.
struct Frames<'r> {
    remote: &'r Remote,
    packs: HashMap<String, PackReader>,
    window: VecDeque<((String, u64), Vec<u8>)>,
}

impl Frames<'_> {
    /// The decompressed frame holding `loc`'s chunk.
    fn frame(&mut self, loc: &ChunkLoc) -> Result<&[u8]> {
        let key = (loc.pack.clone(), loc.offset);
        if let Some(i) = self.window.iter().position(|(k, _)| *k == key) {
            return Ok(&self.window[i].1);
        }
        if !self.packs.contains_key(&loc.pack) {
            let r = PackReader::open(self.remote.store().as_ref(), &loc.pack)?;
            self.packs.insert(loc.pack.clone(), r);
        }
        let mut buf = if self.window.len() >= FRAME_WINDOW {
            self.window.pop_front().map(|w| w.1).unwrap_or_default()
        } else {
            Vec::new()
        };
        self.packs[&loc.pack].read_frame(loc.offset, loc.clen, loc.nchunks as usize, &mut buf)?;
        self.window.push_back((key, buf));
        Ok(&self.window.back().expect("pushed above").1)
    }
}

impl Remote {
    /// Re-reads and re-hashes every chunk of a remote image and checks its
    /// content digest (the caller has checked the account may verify it).
    pub fn verify_image(
        &self,
        image: &RemoteImage,
        progress: &dyn Progress,
    ) -> Result<VerifyReport> {
        let what = format!("{}:{} ({})", self.name(), image.id(), image.name());
        let m = &image.manifest;
        let size = m.meta.virtual_size;
        if size.div_ceil(CHUNK_SIZE as u64) != m.map.nblocks {
            return Err(self.damaged(
                &what,
                &format!(
                    "its manifest says {size} bytes but maps {} blocks",
                    m.map.nblocks
                ),
            ));
        }
        let map = self.chunk_map()?;
        let locs = self.locate(&what, image, &map)?;
        progress.begin("verify", size);
        let r = self.walk(&what, image, &locs, progress);
        progress.end();
        r
    }

    /// Where each stored block's chunk is, in map order; a chunk no pack
    /// holds is an error naming its block.
    fn locate<'m>(
        &self,
        what: &str,
        image: &RemoteImage,
        map: &'m ChunkMap,
    ) -> Result<Vec<&'m ChunkLoc>> {
        let mut out = Vec::new();
        for (start, hashes) in &image.manifest.map.runs {
            for (i, h) in hashes.iter().enumerate() {
                let Some(loc) = map.get(h) else {
                    return Err(Error::Corrupt {
                        image: what.to_owned(),
                        offset: (start + i as u64) * CHUNK_SIZE as u64,
                        detail: format!(
                            "its chunk {h:?} is in no pack of remote {} (a pack or its index is missing); push the image again from a host that has it",
                            self.name()
                        ),
                    });
                };
                out.push(loc);
            }
        }
        Ok(out)
    }

    /// Hashes the content in block order: every stored chunk re-hashed
    /// against its name, zero runs as zeros, the last block cut to the
    /// image's size.
    fn walk(
        &self,
        what: &str,
        image: &RemoteImage,
        locs: &[&ChunkLoc],
        progress: &dyn Progress,
    ) -> Result<VerifyReport> {
        let m = &image.manifest;
        let size = m.meta.virtual_size;
        let mut frames = Frames {
            remote: self,
            packs: HashMap::new(),
            window: VecDeque::new(),
        };
        let mut digest = blake3::Hasher::new();
        let mut pos = 0u64; // bytes hashed
        let mut locs = locs.iter();
        let mut chunks = 0u64;
        for (start, hashes) in &m.map.runs {
            let at = start * CHUNK_SIZE as u64;
            crate::digest::update_zeros(&mut digest, at - pos);
            progress.advance(at - pos);
            pos = at;
            for h in hashes {
                let loc = locs.next().expect("one location per stored block");
                let bytes = frames.frame(loc)?;
                let slot = &bytes[loc.slot as usize * CHUNK_SIZE..][..CHUNK_SIZE];
                check_chunk(what, pos, loc, slot, h)?;
                let n = (size - pos).min(CHUNK_SIZE as u64);
                digest.update(&slot[..n as usize]);
                progress.advance(n);
                pos += n;
                chunks += 1;
            }
        }
        crate::digest::update_zeros(&mut digest, size - pos);
        progress.advance(size - pos);
        let got = digest.finalize().to_hex();
        if got.as_str() != m.meta.content_digest {
            return Err(Error::Corrupt {
                image: what.to_owned(),
                offset: 0,
                detail: format!(
                    "its content hashes to {got}, its manifest says {:?}: the manifest does not describe this content",
                    m.meta.content_digest
                ),
            });
        }
        Ok(VerifyReport {
            images: 1,
            chunks,
            bytes: size,
        })
    }
}

/// Checks one chunk's bytes against the hash that names it.
fn check_chunk(what: &str, pos: u64, loc: &ChunkLoc, bytes: &[u8], want: &ChunkHash) -> Result<()> {
    let got = ChunkHash::of(bytes);
    if &got == want {
        return Ok(());
    }
    Err(Error::Corrupt {
        image: what.to_owned(),
        offset: pos,
        detail: format!(
            "pack {} frame at offset {} slot {}: the chunk hashes to {got:?}, not {want:?}: the pack is damaged; push the image again from a host that has it",
            loc.pack, loc.offset, loc.slot
        ),
    })
}
