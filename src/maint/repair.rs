//! `fsck --repair`: the catalog is an index that can be rebuilt.
//!
//! Main items: `rebuild` (a new, empty catalog filled from the pack
//! files, their indexes and the image manifests) and `complete` (a sound
//! catalog: write the manifests and pack indexes that are missing, e.g. in
//! a depot made before they existed).
//!
//! Rebuild: every `packs/XX/NAME.pack` becomes a sealed pack row; its
//! frames and chunks come from `NAME.idx` when that verifies, else from
//! walking the pack's zstd frames and hashing every slot (and the index is
//! written then). A content stored twice keeps the first chunk found. Then
//! every image whose newest verifiable manifest names only chunks that were
//! found becomes an available image again, with its metadata, tags and
//! shares; an image missing chunks is reported and left out (its manifest
//! is kept). Chunk ids are new; maps are re-encoded with them.
//!
//! Not rebuilt (they live only in the catalog): remembered input files
//! (`source_files`: the next import of a file reads it), the cached
//! zero-leaf values (recomputed), copies made into other depots
//! (`image_copies`, `image history` forgets them), chunks a killed copy
//! brought (`copy_chunks`: they are garbage now, a resumed copy sends them
//! again). Instances: see `rebuild_instances`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use rusqlite::Connection;
use serde::Serialize;

use crate::catalog::{self, ImageState};
use crate::error::Result;
use crate::format::{self, BlockMap, IndexFrame, Manifest, PackHeader, PackIndex, UNUSED_SLOT};
use crate::ids::{ChunkHash, ChunkId, ImageId};
use crate::repo::Repo;
use crate::store::{
    self, read_index, write_index, ObjectInfo, ObjectKind, ObjectStore, PackReader,
};

/// What `fsck --repair` did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RepairReport {
    /// Whether the catalog was rebuilt (it was missing, empty or damaged).
    pub rebuilt: bool,
    /// Why it was rebuilt (none if it was kept).
    pub reason: Option<String>,
    /// Where the damaged catalog's files were moved.
    pub set_aside: Vec<String>,
    /// Packs entered into the rebuilt catalog (0 when it was kept).
    pub packs: u64,
    /// Frames entered into the rebuilt catalog.
    pub frames: u64,
    /// Chunks entered into the rebuilt catalog.
    pub chunks: u64,
    /// Packs re-indexed by reading them (no index, or a damaged one).
    pub packs_reindexed: u64,
    /// Pack index files written (for packs that lacked a sound one).
    pub indexes_written: u64,
    /// Image manifests written (for images that lacked one).
    pub manifests_written: u64,
    /// `name (img-…)` of every image restored.
    pub images: Vec<String>,
    /// Instances whose rows were rebuilt from their directories.
    pub instances: Vec<String>,
    /// Damage found and mended (a damaged index replaced by reading its
    /// pack again).
    pub mended: Vec<String>,
    /// Launch bases read back in full, found complete and recorded again
    /// (a base that does not match stays unrecorded: the next launch
    /// rebuilds it).
    pub bases_recorded: Vec<String>,
    /// What could not be restored, and why.
    pub problems: Vec<String>,
}

/// A sound catalog: writes the manifests of available images that have
/// none and the index files of sealed packs that have none (from the
/// catalog).
pub(crate) fn complete(repo: &Repo) -> Result<RepairReport> {
    let mut rep = RepairReport::default();
    let root = repo.root();
    for row in catalog::list_images(&repo.conn)? {
        if row.state != Some(ImageState::Available)
            || crate::repo::manifest::check(root, &row).is_none()
        {
            continue;
        }
        if let Some(d) = &row.damage {
            rep.problems
                .push(format!("image {} ({}): {d}", row.name, row.id));
            continue;
        }
        let tx = catalog::begin_write(&repo.conn)?;
        match crate::repo::manifest::write_next(&tx, root, repo.perms(), &row.id) {
            Ok(m) => {
                tx.commit()?;
                m.committed();
                rep.manifests_written += 1;
            }
            Err(e) => rep
                .problems
                .push(format!("image {} ({}): {e}", row.name, row.id)),
        }
    }
    let store = repo.store();
    for (pid, name, size) in catalog::sealed_packs(&repo.conn)? {
        if !store::valid_pack_name(&name) || matches!(read_index(store, &name), Ok(Some(_))) {
            continue;
        }
        // Missing or damaged: written anew from the catalog.
        store.delete(ObjectKind::PackIndex, &name)?;
        let ix = index_from_catalog(&repo.conn, pid, &name, size as u64)?;
        write_index(store, &ix)?;
        rep.indexes_written += 1;
    }
    Ok(rep)
}

/// A sealed pack's index as the catalog has it.
fn index_from_catalog(conn: &Connection, pack: i64, name: &str, size: u64) -> Result<PackIndex> {
    let mut frames = Vec::new();
    for f in catalog::frames_of_pack(conn, pack)? {
        frames.push(IndexFrame {
            offset: f.offset,
            clen: f.clen,
            hashes: catalog::slot_hashes(conn, f.id, f.nchunks)?,
        });
    }
    Ok(PackIndex {
        pack: name.to_owned(),
        pack_len: size,
        frames,
    })
}

/// Fills a new, empty catalog from the packs, their indexes and the
/// manifests (the caller made the catalog and holds nothing else open).
pub(crate) fn rebuild(repo: &Repo, rep: &mut RepairReport) -> Result<()> {
    let _one_gc = repo.lock_gc()?;
    let root = repo.root();
    let mut packs = repo.store().list(ObjectKind::Pack)?;
    packs.sort_by(|a, b| a.name.cmp(&b.name));
    let tx = catalog::begin_write(&repo.conn)?;
    let mut by_hash: HashMap<ChunkHash, ChunkId> = HashMap::new();
    {
        let mut rows = catalog::Rebuild::new(&tx)?;
        for pack in &packs {
            rebuild_pack(repo.store(), &mut rows, pack, &mut by_hash, rep)?;
        }
    }
    for (id, versions) in crate::repo::manifest::list_all(root)? {
        rebuild_image(&tx, &id, &versions, &by_hash, rep)?;
    }
    rebuild_instances(&tx, root, rep)?;
    tx.commit()?;
    Ok(())
}

/// A pack's rows, from its index (read again from the pack, and written,
/// when it is missing or damaged). A content stored twice keeps the first
/// chunk found.
fn rebuild_pack(
    store: &dyn ObjectStore,
    rows: &mut catalog::Rebuild<'_>,
    pack: &ObjectInfo,
    by_hash: &mut HashMap<ChunkHash, ChunkId>,
    rep: &mut RepairReport,
) -> Result<()> {
    let (name, len) = (&pack.name, pack.size);
    let Some(ix) = index_of(store, name, rep)? else {
        return Ok(());
    };
    if len < ix.pack_len {
        rep.problems.push(format!(
            "{}: {len} bytes, its index says {}: frames past the end are lost",
            store.label(ObjectKind::Pack, name),
            ix.pack_len
        ));
    }
    let pid = rows.pack(name, len)?;
    rep.packs += 1;
    for f in &ix.frames {
        let inside = f.offset >= PackHeader::SIZE as u64
            && f.offset.checked_add(f.clen).is_some_and(|e| e <= len);
        let fresh: Vec<(usize, &ChunkHash)> = f
            .hashes
            .iter()
            .enumerate()
            .filter(|(_, h)| **h != UNUSED_SLOT && !by_hash.contains_key(*h))
            .collect();
        // A frame no chunk would use is left out: gc would never see it die.
        if !inside || fresh.is_empty() {
            continue;
        }
        let fid = rows.frame(pid, f.offset, f.clen, f.hashes.len())?;
        rep.frames += 1;
        for (slot, h) in fresh {
            if by_hash.contains_key(h) {
                continue; // twice in one frame
            }
            by_hash.insert(*h, rows.chunk(h, fid, slot)?);
            rep.chunks += 1;
        }
    }
    Ok(())
}

/// A pack's index: its index object if it verifies, else one made by
/// reading the pack (and written); `None` if the pack cannot be read.
fn index_of(
    store: &dyn ObjectStore,
    name: &str,
    rep: &mut RepairReport,
) -> Result<Option<PackIndex>> {
    match read_index(store, name) {
        Ok(Some(ix)) => return Ok(Some(ix)),
        Ok(None) => {}
        Err(e) => {
            rep.mended
                .push(format!("{e}; the pack was read again instead"));
            store.delete(ObjectKind::PackIndex, name)?;
        }
    }
    let read = PackReader::open(store, name).and_then(|r| r.reindex(name));
    let (ix, trouble) = match read {
        Ok(x) => x,
        Err(e) => {
            rep.problems.push(format!("{e}; the pack is ignored"));
            return Ok(None);
        }
    };
    rep.problems.extend(trouble);
    rep.packs_reindexed += 1;
    write_index(store, &ix)?;
    rep.indexes_written += 1;
    Ok(Some(ix))
}

/// An image from the newest of its manifests that verifies, if every chunk
/// it names was found; otherwise the reason goes to the report.
fn rebuild_image(
    tx: &Connection,
    id: &ImageId,
    versions: &[(u32, PathBuf)],
    by_hash: &HashMap<ChunkHash, ChunkId>,
    rep: &mut RepairReport,
) -> Result<()> {
    let Some(m) = newest_manifest(id, versions, rep) else {
        return Ok(());
    };
    let meta = &m.meta;
    let who = format!("{} ({id})", meta.name);
    let map = match map_by_ids(&m, by_hash) {
        Ok(map) => map,
        Err((missing, first)) => {
            rep.problems.push(format!(
                "image {who}: {missing} of its chunks are in no pack (first at byte offset {}); not restored",
                first * format::CHUNK
            ));
            return Ok(());
        }
    };
    if map.nblocks != format::blocks_for(meta.virtual_size) {
        rep.problems.push(format!(
            "image {who}: its manifest's map has {} blocks for {} bytes; not restored",
            map.nblocks, meta.virtual_size
        ));
        return Ok(());
    }
    let blob = format::encode_map(&map);
    if let Err(e) = catalog::insert_rebuilt_image(tx, id, meta, &blob) {
        rep.problems.push(format!(
            "image {who}: its row was refused ({e}); not restored"
        ));
        return Ok(());
    }
    catalog::insert_rebuilt_labels(tx, id, &meta.tags, &meta.shares)?;
    rep.images.push(who);
    Ok(())
}

/// The newest version of an image's manifest that verifies; the versions
/// that do not are mended (an older one was used: a crash while writing a
/// newer one) or, when none verifies, problems.
fn newest_manifest(
    id: &ImageId,
    versions: &[(u32, PathBuf)],
    rep: &mut RepairReport,
) -> Option<Manifest> {
    let mut bad = Vec::new();
    for (seq, p) in versions {
        match crate::repo::manifest::read(p) {
            Ok(m) if m.meta.id == id.as_str() && m.seq == *seq => {
                rep.mended.extend(
                    bad.into_iter()
                        .map(|b| format!("{b}; version {} used", m.seq)),
                );
                return Some(m);
            }
            Ok(_) => bad.push(format!(
                "{}: names another image or version; ignored",
                p.display()
            )),
            Err(e) => bad.push(format!("{e}; ignored")),
        }
    }
    rep.problems.extend(bad);
    rep.problems
        .push(format!("image {id}: no manifest verifies; not restored"));
    None
}

/// A manifest's map by the new chunk ids; `Err((missing, first block
/// missing))` if some chunk is in no pack.
fn map_by_ids(
    m: &Manifest,
    by_hash: &HashMap<ChunkHash, ChunkId>,
) -> std::result::Result<BlockMap, (u64, u64)> {
    let mut b = format::MapBuilder::default();
    let mut missing = 0u64;
    let mut first_missing = None;
    for (start, hashes) in &m.map.runs {
        b.push_zeros(start - b.len());
        for (i, h) in hashes.iter().enumerate() {
            match by_hash.get(h) {
                Some(&c) => b.push(c),
                None => {
                    missing += 1;
                    first_missing.get_or_insert(start + i as u64);
                    b.push_zeros(1);
                }
            }
        }
    }
    let tail = m.map.nblocks.saturating_sub(b.len());
    b.push_zeros(tail);
    match first_missing {
        Some(first) => Err((missing, first)),
        None => Ok(b.finish()),
    }
}

/// Instances: their rows live only in the catalog, but their directories
/// remain. Each `instances/ins-…/` with a disk becomes a `stopped` (or,
/// if its QEMU still runs, `running`) instance
/// named by its id, of the image its overlay's base names (or none), with
/// the hostname from its seed; its owner is the image's owner. Lost: its
/// name, CPUs and memory (1 CPU, 1024 MiB), port forwards, accelerator
/// choice (`auto`) and the launch-only origin of an image deleted since.
/// Without a row, gc would evict the base the overlay needs.
fn rebuild_instances(tx: &rusqlite::Connection, root: &Path, rep: &mut RepairReport) -> Result<()> {
    let Ok(rd) = std::fs::read_dir(root.join("instances")) else {
        return Ok(());
    };
    let mut dirs: Vec<_> = rd.flatten().map(|e| e.path()).collect();
    dirs.sort();
    for d in dirs {
        let Some(id) = d.file_name().and_then(|n| n.to_str()).map(str::to_owned) else {
            continue;
        };
        if !id.starts_with("ins-") {
            continue;
        }
        // A QEMU still running for it is adopted (by its pid file, checked
        // against its command line), never started twice.
        let pid = crate::proc::read_pidfile(&d.join("qemu.pid"))
            .filter(|&p| crate::proc::pid_alive(p, &id));
        let (disk, image) = if d.join("disk.qcow2").exists() {
            let image = overlay_base(&d.join("disk.qcow2"));
            // A lazy overlay names the base file too: a running one reads
            // its disk server (its QEMU's command line says so); a stopped
            // one is lazy unless the base file exists (an overlay on it
            // works either way).
            let served = pid.is_some_and(|p| {
                std::fs::read(format!("/proc/{p}/cmdline"))
                    .is_ok_and(|c| String::from_utf8_lossy(&c).contains("\"base-nbd\""))
            });
            let base_made = image
                .as_ref()
                .is_some_and(|i| crate::image::bases::base_path(root, i.as_str()).exists());
            let mode = if served || !base_made {
                "lazy"
            } else {
                "overlay"
            };
            (mode, image)
        } else if d.join("disk.raw").exists() {
            ("copy", None)
        } else {
            rep.problems.push(format!(
                "instance {id}: no disk in {}; not restored",
                d.display()
            ));
            continue;
        };
        let hostname = std::fs::read(d.join("seed.img"))
            .ok()
            .and_then(|b| seed_hostname(&b))
            .unwrap_or_else(|| id.clone());
        let (owner, image_name, restricted) = match &image {
            Some(img) => catalog::image_owner(tx, img),
            None => Default::default(),
        };
        let created_at = std::fs::metadata(&d)
            .ok()
            .and_then(|m| m.modified().ok())
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_secs() as i64);
        catalog::insert_rebuilt_instance(
            tx,
            &catalog::RebuiltInstance {
                id: id.clone(),
                image: image.as_ref().map(ImageId::as_str).unwrap_or("").to_owned(),
                image_name,
                owner,
                disk,
                hostname,
                created_at,
                restricted_from: restricted,
                pid,
                firmware: if d.join(crate::repo::orphans::EFIVARS_FILE).exists() {
                    "uefi"
                } else {
                    "bios"
                },
            },
        )?;
        rep.instances.push(id);
    }
    Ok(())
}

/// The image whose base a qcow2 overlay names (`…/bases/img-….raw`), read
/// from the qcow2 header (backing file offset at byte 8, size at 16).
fn overlay_base(p: &Path) -> Option<ImageId> {
    use std::io::Read;
    let mut head = vec![0u8; 4096];
    let n = std::fs::File::open(p).ok()?.read(&mut head).ok()?;
    head.truncate(n);
    if head.get(..4)? != b"QFI\xfb" {
        return None;
    }
    let off = u64::from_be_bytes(head.get(8..16)?.try_into().ok()?) as usize;
    let len = u32::from_be_bytes(head.get(16..20)?.try_into().ok()?) as usize;
    let name = std::str::from_utf8(head.get(off..off.checked_add(len)?)?).ok()?;
    let stem = Path::new(name).file_stem()?.to_str()?;
    ImageId::parse(stem)
}

/// `local-hostname` from a NoCloud seed (the meta-data text is stored
/// uncompressed in the FAT image).
fn seed_hostname(b: &[u8]) -> Option<String> {
    let key = b"local-hostname: ";
    let at = b.windows(key.len()).position(|w| w == key)? + key.len();
    let end = b[at..].iter().position(|&c| c == b'\n')?;
    let h = std::str::from_utf8(&b[at..at + end]).ok()?;
    (!h.is_empty() && h.len() <= 63).then(|| h.to_owned())
}
