//! [`Remote::gc`]: the remote's garbage collection, exactly the protocol
//! of docs/FORMAT.md ("Remote gc"), and [`RemoteGcReport`], what it did.
//! Only gc deletes packs, and only one gc runs at a time: it holds the
//! [`GC_LOCK`] object (a token written, then read back); pushes take no
//! lock. Times are the store's clock ([`ObjectStore::now`] and the
//! objects' `modified` times), never this host's.
//!
//! 1. take the lock (refused if one younger than [`LOCK_FRESH`] exists,
//!    unless `break_lock`); note `t0`;
//! 2. list tombstones, then read every manifest: the live chunks;
//! 3. retire each pack none of whose indexed chunks is live and written
//!    more than `grace` before `t0` (with its index), each pack without an
//!    index and each index without a pack older than `grace`;
//! 4. revive each retired pack that holds a live chunk;
//! 5. purge what step 2 listed as retired `grace` or longer before `t0`
//!    (and is not live): never a tombstone listed later;
//! 6. release the lock (also when a step failed).
//!
//! A manifest that does not verify stops gc before anything is retired:
//! the chunks it names cannot be known, so nothing could be collected
//! safely. A pack whose index does not verify is kept and reported.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use super::Remote;
use crate::error::{Error, Result};
use crate::format::{self, PackIndex, UNUSED_SLOT};
use crate::ids::{random_hex, ChunkHash};
use crate::store::{valid_pack_name, ObjectInfo, ObjectKind};

/// The name of the remote gc's lock object (kind [`ObjectKind::Meta`]).
pub const GC_LOCK: &str = "gc.lock";
/// A lock younger than this is a gc running: another gc is refused.
pub const LOCK_FRESH: Duration = Duration::from_secs(3600);
/// The largest lock object or pack index read.
const MAX_LOCK_BYTES: u64 = 64 * 1024;
const MAX_INDEX_BYTES: u64 = 256 << 20;

/// What a remote gc did (or, with `dry_run`, would do).
#[derive(Clone, Debug, Default, Serialize)]
pub struct RemoteGcReport {
    /// The remote's name.
    pub remote: String,
    /// Whether this is the plan only (`gc --dry-run`): nothing was changed.
    pub dry_run: bool,
    /// An old lock, or one `--break-lock` named, was removed first.
    pub lock_broken: bool,
    /// Manifest objects read (every version of every image).
    pub manifests: u64,
    /// Distinct chunks they name.
    pub live_chunks: u64,
    /// Packs retired (tombstoned): none of their chunks is live.
    pub packs_retired: u64,
    /// Pack indexes retired (with their packs, or without a pack of theirs).
    pub indexes_retired: u64,
    /// Bytes of the packs retired (freed when they are purged).
    pub bytes_retired: u64,
    /// Retired packs taken back because a push made one of their chunks
    /// live again.
    pub packs_revived: u64,
    /// Retired pack indexes taken back with their packs.
    pub indexes_revived: u64,
    /// Packs removed for good: retired longer ago than the grace period.
    pub packs_purged: u64,
    /// Pack indexes removed for good with their packs.
    pub indexes_purged: u64,
    /// Manifest objects removed for good (retired by `image delete
    /// REMOTE:IMAGE` longer ago than the grace period).
    pub manifests_purged: u64,
    /// Bytes of the objects purged.
    pub bytes_freed: u64,
    /// Packs kept because their index does not verify (one line each).
    pub damaged: Vec<String>,
}

/// The lock object's content.
#[derive(Serialize, Deserialize)]
struct LockFile {
    host: String,
    pid: u32,
    /// Unix seconds (the taking host's clock).
    started_at: i64,
    token: String,
}

/// The objects of one kind by name.
type Objects = HashMap<String, ObjectInfo>;

/// Whether `o` was written (or retired) `grace` or longer before `t0`.
fn older(o: &ObjectInfo, t0: SystemTime, grace: Duration) -> bool {
    o.modified
        .and_then(|m| t0.duration_since(m).ok())
        .is_some_and(|age| age >= grace)
}

fn by_name(list: Vec<ObjectInfo>) -> Objects {
    list.into_iter().map(|o| (o.name.clone(), o)).collect()
}

/// Tombstones listed in step 2.
struct Retired {
    packs: Objects,
    indexes: Objects,
    manifests: Objects,
}

impl Remote {
    /// Collects the remote's garbage (see the module doc). `dry_run`
    /// decides and reports without changing anything (no lock either);
    /// `break_lock` removes a lock however young (its gc must be dead).
    pub fn gc(&self, dry_run: bool, break_lock: bool, grace: Duration) -> Result<RemoteGcReport> {
        let mut report = RemoteGcReport {
            remote: self.name().to_owned(),
            dry_run,
            ..Default::default()
        };
        if dry_run {
            self.collect(&mut report, self.store().now(), grace)?;
            return Ok(report);
        }
        report.lock_broken = self.take_lock(break_lock)?;
        let t0 = self.store().now();
        let done = self.collect(&mut report, t0, grace);
        let released = self.store().delete(ObjectKind::Meta, GC_LOCK);
        done?;
        released?;
        Ok(report)
    }

    /// Steps 2-5.
    fn collect(&self, r: &mut RemoteGcReport, t0: SystemTime, grace: Duration) -> Result<()> {
        let store = self.store().as_ref();
        let retired = Retired {
            packs: by_name(store.retired(ObjectKind::Pack)?),
            indexes: by_name(store.retired(ObjectKind::PackIndex)?),
            manifests: by_name(store.retired(ObjectKind::Manifest)?),
        };
        let live = self.live_chunks(r)?;
        self.retire_dead(r, &live, t0, grace)?;
        let revived = self.revive_live(r, &retired, &live)?;
        self.purge(r, &retired, &revived, t0, grace)
    }

    /// Step 2: every chunk any version of any manifest names.
    fn live_chunks(&self, r: &mut RemoteGcReport) -> Result<HashSet<ChunkHash>> {
        let mut live = HashSet::new();
        for o in self.store().list(ObjectKind::Manifest)? {
            let Some((id, seq)) = crate::repo::manifest::parse_name(&o.name) else {
                continue; // not a manifest's name: never read as one
            };
            let Some(bytes) = self.store().get(ObjectKind::Manifest, &o.name)? else {
                continue; // deleted since the listing
            };
            // the map streamed into `live`, never held whole
            self.check_listed(&id, seq, &o.name, &bytes, |h| {
                live.insert(h);
            })
            .map_err(|e| match e {
                Error::StoreDamaged(why) => Error::StoreDamaged(format!(
                    "gc refused (the chunks a damaged manifest names cannot be known, so nothing can be collected safely): {why}"
                )),
                e => e,
            })?;
            r.manifests += 1;
        }
        r.live_chunks = live.len() as u64;
        Ok(live)
    }

    /// Step 3: retires dead packs (with their indexes), packs without an
    /// index and indexes without a pack, all older than `grace`.
    fn retire_dead(
        &self,
        r: &mut RemoteGcReport,
        live: &HashSet<ChunkHash>,
        t0: SystemTime,
        grace: Duration,
    ) -> Result<()> {
        let store = self.store().as_ref();
        let packs = by_name(store.list(ObjectKind::Pack)?);
        let indexes = by_name(store.list(ObjectKind::PackIndex)?);
        for (name, p) in &packs {
            if !valid_pack_name(name) || !older(p, t0, grace) {
                continue;
            }
            let dead = !indexes.contains_key(name)
                || match self.index(&self.index_cache(), name) {
                    Ok(ix) => !holds_live(&ix, live),
                    Err(e) => {
                        r.damaged.push(e.to_string());
                        false
                    }
                };
            if dead {
                self.retire(r, ObjectKind::Pack, name)?;
                r.bytes_retired += p.size;
                if indexes.contains_key(name) {
                    self.retire(r, ObjectKind::PackIndex, name)?;
                }
            }
        }
        for (name, ix) in &indexes {
            if !packs.contains_key(name) && older(ix, t0, grace) {
                self.retire(r, ObjectKind::PackIndex, name)?;
            }
        }
        Ok(())
    }

    /// Retires one object (counted; nothing changes in a dry run).
    fn retire(&self, r: &mut RemoteGcReport, kind: ObjectKind, name: &str) -> Result<()> {
        match kind {
            ObjectKind::Pack => r.packs_retired += 1,
            _ => r.indexes_retired += 1,
        }
        if r.dry_run {
            return Ok(());
        }
        self.store().delete(kind, name)
    }

    /// Step 4: revives each retired pack (and its index) that holds a live
    /// chunk; returns their names.
    fn revive_live(
        &self,
        r: &mut RemoteGcReport,
        retired: &Retired,
        live: &HashSet<ChunkHash>,
    ) -> Result<HashSet<String>> {
        let mut revived = HashSet::new();
        for name in retired.packs.keys().filter(|n| valid_pack_name(n)) {
            // An index that cannot be read: its pack serves nobody.
            let Ok(ix) = self.retired_index(name, retired) else {
                continue;
            };
            if !holds_live(&ix, live) {
                continue;
            }
            r.packs_revived += 1;
            let index_retired = retired.indexes.contains_key(name);
            r.indexes_revived += u64::from(index_retired);
            if !r.dry_run {
                self.store().revive(ObjectKind::Pack, name)?;
                if index_retired {
                    self.store().revive(ObjectKind::PackIndex, name)?;
                }
            }
            revived.insert(name.clone());
        }
        Ok(revived)
    }

    /// The index of a retired pack: retired with it (read through a
    /// reader: its bytes stay until purged), or live.
    fn retired_index(&self, name: &str, retired: &Retired) -> Result<PackIndex> {
        if !retired.indexes.contains_key(name) {
            return self.index(&self.index_cache(), name);
        }
        let label = self.store().label(ObjectKind::PackIndex, name);
        let reader = self.store().open(ObjectKind::PackIndex, name)?;
        if reader.len() > MAX_INDEX_BYTES {
            return Err(self.damaged(
                &label,
                &format!("{} bytes: too large for an index", reader.len()),
            ));
        }
        let bytes = reader.read_range(0, reader.len())?;
        let ix = format::decode_index(&bytes).map_err(|e| self.damaged(&label, &e.to_string()))?;
        if ix.pack != name {
            return Err(self.damaged(&label, &format!("it indexes pack {}", ix.pack)));
        }
        Ok(ix)
    }

    /// Step 5: purges what step 2 listed as retired at or before
    /// `t0 - grace` and step 4 did not revive; only what it listed (a
    /// tombstone written since, by another gc, is not this gc's to purge)
    /// and only if its tombstone is still that old (see
    /// [`crate::store::ObjectStore::purge_retired`]). Counts what it
    /// really purged (in a dry run: what it would).
    fn purge(
        &self,
        r: &mut RemoteGcReport,
        retired: &Retired,
        revived: &HashSet<String>,
        t0: SystemTime,
        grace: Duration,
    ) -> Result<()> {
        let retired_by = t0.checked_sub(grace).unwrap_or(SystemTime::UNIX_EPOCH);
        let kinds = [
            (ObjectKind::Pack, &retired.packs),
            (ObjectKind::PackIndex, &retired.indexes),
            (ObjectKind::Manifest, &retired.manifests),
        ];
        for (kind, objects) in kinds {
            let due: Vec<String> = (objects.values())
                .filter(|o| !revived.contains(&o.name) && older(o, t0, grace))
                .map(|o| o.name.clone())
                .collect();
            let purged = if r.dry_run || due.is_empty() {
                due
            } else {
                self.store().purge_retired(kind, &due, retired_by)?
            };
            let bytes: u64 = (purged.iter().filter_map(|n| objects.get(n)))
                .map(|o| o.size)
                .sum();
            r.bytes_freed += bytes;
            *match kind {
                ObjectKind::Pack => &mut r.packs_purged,
                ObjectKind::PackIndex => &mut r.indexes_purged,
                _ => &mut r.manifests_purged,
            } += purged.len() as u64;
        }
        Ok(())
    }

    /// Step 1: writes the lock and reads it back. An existing lock younger
    /// than [`LOCK_FRESH`] is refused unless `break_lock`; an older one is
    /// a dead gc's and removed. Returns whether a lock was removed.
    fn take_lock(&self, break_lock: bool) -> Result<bool> {
        let store = self.store().as_ref();
        let broken = match self.current_lock()? {
            None => false,
            Some((holder, age)) if !break_lock && age.is_none_or(|a| a < LOCK_FRESH) => {
                return Err(self.locked(&holder));
            }
            Some(_) => {
                store.delete(ObjectKind::Meta, GC_LOCK)?;
                true
            }
        };
        let token = random_hex(16);
        let lock = LockFile {
            host: hostname(),
            pid: std::process::id(),
            started_at: crate::catalog::now(),
            token: token.clone(),
        };
        let bytes = serde_json::to_vec(&lock).expect("a lock is serialisable");
        store
            .put(ObjectKind::Meta, GC_LOCK, &bytes)
            .map_err(|e| self.locked(&format!("(another gc took it at the same time: {e})")))?;
        match self.current_lock()? {
            Some((holder, _)) if holder.contains(&token) => Ok(broken),
            Some((holder, _)) => Err(self.locked(&holder)),
            None => Err(self.locked("(it vanished: another gc broke it)")),
        }
    }

    /// The lock object, if there is one: who holds it (one line, its
    /// token included) and its age by the store's clock. Asked of the
    /// object itself, never of a listing (which a store may serve stale).
    fn current_lock(&self) -> Result<Option<(String, Option<Duration>)>> {
        let store = self.store().as_ref();
        let Some(info) = store.info(ObjectKind::Meta, GC_LOCK)? else {
            return Ok(None);
        };
        let age = info
            .modified
            .map(|m| store.now().duration_since(m).unwrap_or_default());
        if info.size > MAX_LOCK_BYTES {
            return Ok(Some((format!("(a lock of {} bytes)", info.size), age)));
        }
        let Some(bytes) = store.get(ObjectKind::Meta, GC_LOCK)? else {
            return Ok(None);
        };
        let holder = match serde_json::from_slice::<LockFile>(&bytes) {
            Ok(l) => format!(
                "host {:?} pid {} started at {} (token {})",
                l.host,
                l.pid,
                crate::depot::rfc3339(l.started_at),
                l.token
            ),
            Err(e) => format!("(a lock that does not parse: {e})"),
        };
        Ok(Some((holder, age)))
    }

    /// The refusal for a lock another gc holds.
    fn locked(&self, holder: &str) -> Error {
        Error::refused(
            std::path::Path::new(&self.store().label(ObjectKind::Meta, GC_LOCK)),
            format!(
                "another gc of remote {} holds the lock: {}; wait for it to end, or if it is dead run `vmdepot gc --remote {} --break-lock`",
                self.name(),
                crate::error::one_line(holder),
                self.name()
            ),
        )
    }
}

/// Whether a pack's index names a live chunk.
fn holds_live(ix: &PackIndex, live: &HashSet<ChunkHash>) -> bool {
    ix.frames
        .iter()
        .flat_map(|f| f.hashes.iter())
        .any(|h| *h != UNUSED_SLOT && live.contains(h))
}

/// This host's name (for the lock's holder).
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into())
}
