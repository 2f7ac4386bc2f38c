//! `fsck --repair`: the catalog is an index that can be rebuilt.
//!
//! Main items: [`rebuild`] (a new, empty catalog filled from the pack
//! files, their indexes and the image manifests) and [`complete`] (a sound
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
//! again). Instances: see [`rebuild_instances`].

use std::collections::HashMap;
use std::path::Path;

use rusqlite::params;
use serde::Serialize;

use crate::catalog;
use crate::error::{Error, IoContext, Result};
use crate::format::{self, IndexFrame, PackHeader, PackIndex, CHUNK_SIZE, UNUSED_SLOT};
use crate::ids::{ChunkHash, ChunkId, ImageId};
use crate::repo::Repo;
use crate::store;

/// What `fsck --repair` did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RepairReport {
    /// Whether the catalog was rebuilt (it was missing, empty or damaged).
    pub rebuilt: bool,
    /// Why it was rebuilt.
    pub reason: String,
    /// Where the damaged catalog's files were moved.
    pub set_aside: Vec<String>,
    pub packs: u64,
    pub frames: u64,
    pub chunks: u64,
    /// Packs re-indexed by reading them (no index, or a damaged one).
    pub packs_reindexed: u64,
    /// Index files and manifests written.
    pub indexes_written: u64,
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
        if row.state != "available" || crate::repo::manifest::check(root, &row).is_none() {
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
    let packs: Vec<(i64, String, i64)> = {
        let mut st = repo
            .conn
            .prepare("SELECT id, name, size FROM packs WHERE state = 'sealed'")?;
        let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
        rows.collect::<rusqlite::Result<_>>()?
    };
    for (pid, name, size) in packs {
        if !store::valid_pack_name(&name) || matches!(store::read_index(root, &name), Ok(Some(_))) {
            continue;
        }
        // Missing or damaged: written anew from the catalog.
        let p = store::index_path(root, &name)?;
        if p.exists() {
            std::fs::remove_file(&p).at(&p)?;
        }
        let mut frames = Vec::new();
        let mut st = repo.conn.prepare_cached(
            "SELECT id, offset, clen, nchunks FROM frames WHERE pack = ?1 ORDER BY offset",
        )?;
        let fr: Vec<(i64, i64, i64, i64)> = st
            .query_map([pid], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
            .collect::<rusqlite::Result<_>>()?;
        let mut ch = repo
            .conn
            .prepare_cached("SELECT slot, hash FROM chunks WHERE frame = ?1")?;
        for (fid, off, clen, n) in fr {
            let mut hashes = vec![UNUSED_SLOT; n.clamp(0, format::FRAME_CHUNKS as i64) as usize];
            let mut rows = ch.query([fid])?;
            while let Some(r) = rows.next()? {
                let (slot, h): (i64, Vec<u8>) = (r.get(0)?, r.get(1)?);
                if let (Some(s), Ok(h)) = (hashes.get_mut(slot as usize), h.try_into()) {
                    *s = ChunkHash(h);
                }
            }
            frames.push(IndexFrame {
                offset: off as u64,
                clen: clen as u64,
                hashes,
            });
        }
        let ix = PackIndex {
            pack: name.clone(),
            pack_len: size as u64,
            frames,
        };
        store::write_index(root, &ix, repo.perms())?;
        store::sync_dir(&store::index_path(root, &name)?.with_file_name(""))?;
        rep.indexes_written += 1;
    }
    Ok(rep)
}

/// Reads a pack whose index is missing or damaged: walks its zstd frames
/// and hashes every 4 KiB slot.
fn reindex(path: &Path, name: &str) -> Result<(PackIndex, Option<String>)> {
    let bytes = std::fs::read(path).at(path)?;
    PackHeader::parse(&bytes)
        .map_err(|e| Error::StoreDamaged(format!("{}: {e}", path.display())))?;
    let mut frames = Vec::new();
    let mut off = PackHeader::SIZE;
    let mut trouble = None;
    let mut buf = Vec::new();
    while off < bytes.len() {
        let rest = &bytes[off..];
        let clen = match zstd::zstd_safe::find_frame_compressed_size(rest) {
            Ok(n) if n > 0 && n <= rest.len() => n,
            _ => {
                trouble = Some(format!(
                    "{}: bytes from offset {off} are not a complete zstd frame; ignored",
                    path.display()
                ));
                break;
            }
        };
        let nchunks = match zstd::zstd_safe::get_frame_content_size(rest) {
            Ok(Some(n)) if n % CHUNK_SIZE as u64 == 0 && n / CHUNK_SIZE as u64 <= 256 => {
                (n / CHUNK_SIZE as u64) as usize
            }
            _ => {
                trouble = Some(format!(
                    "{}: the frame at offset {off} is not one of vmdepot's; the rest is ignored",
                    path.display()
                ));
                break;
            }
        };
        if let Err(e) = store::decompress_frame(&rest[..clen], nchunks, &mut buf) {
            trouble = Some(format!(
                "{}: the frame at offset {off}: {e}; the rest is ignored",
                path.display()
            ));
            break;
        }
        frames.push(IndexFrame {
            offset: off as u64,
            clen: clen as u64,
            hashes: buf.chunks_exact(CHUNK_SIZE).map(ChunkHash::of).collect(),
        });
        off += clen;
    }
    Ok((
        PackIndex {
            pack: name.to_owned(),
            pack_len: bytes.len() as u64,
            frames,
        },
        trouble,
    ))
}

/// Fills a new, empty catalog from the packs, their indexes and the
/// manifests (the caller made the catalog and holds nothing else open).
pub(crate) fn rebuild(repo: &Repo, rep: &mut RepairReport) -> Result<()> {
    let _one_gc = repo.lock_gc()?;
    let root = repo.root();
    let mut files: Vec<(String, std::path::PathBuf)> =
        crate::maint::pack_files(root)?.into_iter().collect();
    files.sort();
    let tx = catalog::begin_write(&repo.conn)?;
    let mut by_hash: HashMap<ChunkHash, ChunkId> = HashMap::new();
    {
        let mut ins_pack = tx.prepare(
            "INSERT INTO packs (name, state, image, size) VALUES (?1, 'sealed', NULL, ?2)",
        )?;
        let mut ins_frame =
            tx.prepare("INSERT INTO frames (pack, offset, clen, nchunks) VALUES (?1, ?2, ?3, ?4)")?;
        let mut ins_chunk =
            tx.prepare("INSERT INTO chunks (hkey, hash, frame, slot) VALUES (?1, ?2, ?3, ?4)")?;
        for (name, path) in &files {
            if !store::valid_pack_name(name) {
                rep.problems.push(format!(
                    "{}: not a pack name (32 lowercase hex digits); ignored",
                    path.display()
                ));
                continue;
            }
            let len = std::fs::metadata(path).at(path)?.len();
            let ix = match store::read_index(root, name) {
                Ok(Some(ix)) => ix,
                r => {
                    if let Err(e) = r {
                        rep.mended
                            .push(format!("{e}; the pack was read again instead"));
                        let p = store::index_path(root, name)?;
                        std::fs::remove_file(&p).at(&p)?;
                    }
                    let (ix, trouble) = match reindex(path, name) {
                        Ok(x) => x,
                        Err(e) => {
                            rep.problems.push(format!("{e}; the pack is ignored"));
                            continue;
                        }
                    };
                    rep.problems.extend(trouble);
                    rep.packs_reindexed += 1;
                    store::write_index(root, &ix, repo.perms())?;
                    rep.indexes_written += 1;
                    ix
                }
            };
            if len < ix.pack_len {
                rep.problems.push(format!(
                    "{}: {len} bytes, its index says {}: frames past the end are lost",
                    path.display(),
                    ix.pack_len
                ));
            }
            ins_pack.execute(params![name, len as i64])?;
            let pid = tx.last_insert_rowid();
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
                // A frame no chunk would use is left out: gc would never
                // see it die.
                if !inside || fresh.is_empty() {
                    continue;
                }
                ins_frame.execute(params![
                    pid,
                    f.offset as i64,
                    f.clen as i64,
                    f.hashes.len() as i64
                ])?;
                let fid = tx.last_insert_rowid();
                rep.frames += 1;
                for (slot, h) in fresh {
                    if by_hash.contains_key(h) {
                        continue; // twice in one frame
                    }
                    ins_chunk.execute(params![catalog::hkey(h), &h.0[..], fid, slot as i64])?;
                    by_hash.insert(*h, tx.last_insert_rowid());
                    rep.chunks += 1;
                }
            }
        }
    }
    // Images.
    for (id, versions) in crate::repo::manifest::list_all(root)? {
        let mut found = None;
        let mut bad = Vec::new();
        for (seq, p) in &versions {
            match crate::repo::manifest::read(p) {
                Ok(m) if m.meta.id == id.as_str() && m.seq == *seq => {
                    found = Some(m);
                    break;
                }
                Ok(_) => bad.push(format!(
                    "{}: names another image or version; ignored",
                    p.display()
                )),
                Err(e) => bad.push(format!("{e}; ignored")),
            }
        }
        let Some(m) = found else {
            rep.problems.extend(bad);
            rep.problems
                .push(format!("image {id}: no manifest verifies; not restored"));
            continue;
        };
        // An older version was used (a crash while writing a newer one).
        rep.mended.extend(
            bad.into_iter()
                .map(|b| format!("{b}; version {} used", m.seq)),
        );
        let meta = &m.meta;
        let who = format!("{} ({id})", meta.name);
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
        let map = b.finish();
        if missing > 0 {
            rep.problems.push(format!(
                "image {who}: {missing} of its chunks are in no pack (first at byte offset {}); not restored",
                first_missing.unwrap_or(0) * format::CHUNK
            ));
            continue;
        }
        if map.nblocks != format::blocks_for(meta.virtual_size) {
            rep.problems.push(format!(
                "image {who}: its manifest's map has {} blocks for {} bytes; not restored",
                map.nblocks, meta.virtual_size
            ));
            continue;
        }
        let blob = format::encode_map(&map);
        let r = tx.execute(
            "INSERT INTO images (id, name, type, state, owner, description, source_format,
                                 virtual_size, data_bytes, content_digest, created_at, map, map_digest,
                                 parent, parent_name, source_instance, copied_from, protected,
                                 deprecated, vendor, application, app_version, restricted_from)
             VALUES (?1, ?2, ?3, 'available', ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12,
                     ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21, ?22)",
            params![
                id.as_str(),
                meta.name,
                meta.kind,
                meta.owner,
                meta.description,
                meta.source_format,
                meta.virtual_size as i64,
                meta.data_bytes as i64,
                meta.content_digest,
                meta.created_at,
                blob,
                &blake3::hash(&blob).as_bytes()[..],
                meta.parent,
                meta.parent_name,
                meta.source_instance,
                meta.copied_from,
                meta.protected,
                meta.deprecated,
                meta.vendor,
                meta.application,
                meta.app_version,
                meta.restricted_from,
            ],
        );
        if let Err(e) = r {
            rep.problems.push(format!(
                "image {who}: its row was refused ({e}); not restored"
            ));
            continue;
        }
        for (k, v) in &meta.tags {
            tx.execute(
                "INSERT OR REPLACE INTO image_tags (image, key, value) VALUES (?1, ?2, ?3)",
                params![id.as_str(), k, v],
            )?;
        }
        for s in &meta.shares {
            tx.execute(
                "INSERT OR REPLACE INTO image_shares (image, account, created_at) VALUES (?1, ?2, ?3)",
                params![id.as_str(), s.account, s.created_at],
            )?;
        }
        rep.images.push(who);
    }
    rebuild_instances(&tx, root, rep)?;
    tx.commit()?;
    store::sync_dir(&root.join("packs"))?;
    Ok(())
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
        let (disk, image) = if d.join("disk.qcow2").exists() {
            ("overlay", overlay_base(&d.join("disk.qcow2")))
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
        let (owner, image_name, restricted): (String, String, String) = match &image {
            Some(img) => tx
                .query_row(
                    "SELECT owner, name, restricted_from FROM images WHERE id = ?1",
                    [img.as_str()],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )
                .unwrap_or_default(),
            None => Default::default(),
        };
        let created = std::fs::metadata(&d)
            .ok()
            .and_then(|m| m.modified().ok())
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_secs() as i64);
        // A QEMU still running for it is adopted (by its pid file, checked
        // against its command line), never started twice.
        let pid = crate::proc::read_pidfile(&d.join("qemu.pid"))
            .filter(|&p| crate::proc::pid_alive(p, &id));
        tx.execute(
            "INSERT OR IGNORE INTO instances (id, name, image, image_name, owner, state, disk, cpus,
                                    memory_mib, accel, hostname, created_at, restricted_from, pid)
             VALUES (?1, ?1, ?2, ?3, ?4, ?9, ?5, 1, 1024, 'auto', ?6, ?7, ?8, ?10)",
            params![
                id,
                image.as_ref().map(ImageId::as_str).unwrap_or(""),
                image_name,
                owner,
                disk,
                hostname,
                created,
                restricted,
                if pid.is_some() { "running" } else { "stopped" },
                pid
            ],
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
