//! The remote frame source of a pull: the frames that hold the chunks a
//! depot lacks, planned as ranged reads ([`plan_reads`]: the needed frames
//! of each pack, adjacent ones merged into one read of at most
//! [`MAX_READ`] bytes) and fetched by [`fetch`] on [`WORKERS`] threads.
//! Each worker decompresses every frame it fetched and checks each needed
//! chunk against its hash ([`check_frame`]) before handing it, over a
//! bounded channel, to the caller's [`Sender`] on the calling thread (the
//! catalog's connection stays there). Memory is bounded by the workers'
//! reads and the channel's frames, whatever the image's size.
//!
//! Every location comes from a remote pack index and is hostile until
//! checked: [`plan_reads`] refuses a frame outside its pack's listed size,
//! longer than a frame can be, or of more than [`FRAME_CHUNKS`] chunks.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::{Arc, Mutex};

use super::{ChunkMap, Remote};
use crate::error::Result;
use crate::format::{PackHeader, CHUNK_SIZE, FRAME_CHUNKS};
use crate::ids::ChunkHash;
use crate::lifecycle::transfer::{check_frame, group_by, Checked, FrameWant, Sender};
use crate::store::{ObjectKind, ObjectReader};

/// The most bytes one ranged read fetches (adjacent frames merged).
pub(crate) const MAX_READ: u64 = 8 << 20;

/// Reads in flight at once.
pub(crate) const WORKERS: usize = 4;

/// Checked frames waiting for the sender, at most.
const QUEUED: usize = 8;

/// One ranged read: `len` bytes at `offset` of `pack`, covering `frames`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Read {
    pack: String,
    pub(crate) offset: u64,
    pub(crate) len: u64,
    frames: Vec<Frame>,
}

/// One needed frame of a read.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Frame {
    offset: u64,
    clen: u64,
    want: FrameWant,
}

/// What [`fetch`] moved.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Fetched {
    /// Ranged reads made.
    pub(crate) gets: u64,
    /// Bytes they fetched.
    pub(crate) bytes: u64,
}

/// The longest a frame of [`FRAME_CHUNKS`] chunks can compress to.
fn max_frame_len() -> u64 {
    zstd::zstd_safe::compress_bound(FRAME_CHUNKS * CHUNK_SIZE) as u64
}

/// The reads that fetch the frames holding `missing` (each in `map`, else
/// an error: no pack holds it), each location checked against its pack's
/// listed size. `image` names the image in errors.
pub(crate) fn plan_reads(
    remote: &Remote,
    map: &ChunkMap,
    missing: &[ChunkHash],
    image: &str,
) -> Result<Vec<Read>> {
    let mut located = Vec::with_capacity(missing.len());
    for h in missing {
        let loc = map.get(h).ok_or_else(|| {
            remote.damaged(
                &format!("image {image}"),
                &format!(
                    "its chunk {} is in no pack the remote lists (a pack lost or retired)",
                    crate::ids::hex(&h.0)
                ),
            )
        })?;
        check_loc(remote, map, loc)?;
        let key = (loc.pack.as_str(), loc.offset, loc.clen, loc.nchunks);
        located.push((key, (loc.slot, *h)));
    }
    let mut by_pack: BTreeMap<&str, Vec<Frame>> = BTreeMap::new();
    for ((pack, offset, clen, nchunks), slots) in group_by(located) {
        let want = FrameWant { nchunks, slots };
        by_pack
            .entry(pack)
            .or_default()
            .push(Frame { offset, clen, want });
    }
    let mut reads = Vec::new();
    for (pack, mut frames) in by_pack {
        frames.sort_unstable_by_key(|f| f.offset);
        merge(pack, frames, &mut reads);
    }
    Ok(reads)
}

/// Refuses a location no honest index gives.
pub(super) fn check_loc(remote: &Remote, map: &ChunkMap, loc: &super::ChunkLoc) -> Result<()> {
    let size = map.packs.get(&loc.pack).copied().unwrap_or(0);
    let end = loc.offset.checked_add(loc.clen);
    let ok = loc.offset >= PackHeader::SIZE as u64
        && end.is_some_and(|e| e <= size)
        && (1..=max_frame_len()).contains(&loc.clen)
        && (1..=FRAME_CHUNKS as u32).contains(&loc.nchunks)
        && loc.slot < loc.nchunks;
    if ok {
        return Ok(());
    }
    Err(remote.damaged(
        &remote.store.label(ObjectKind::PackIndex, &loc.pack),
        &format!(
            "it places a frame of {} chunks at offset {} (+{} bytes) of a pack of {size} bytes",
            loc.nchunks, loc.offset, loc.clen
        ),
    ))
}

/// Adjacent frames of one pack (sorted by offset) merged into reads.
fn merge(pack: &str, frames: Vec<Frame>, reads: &mut Vec<Read>) {
    let mut cur: Option<Read> = None;
    for f in frames {
        if let Some(r) = &mut cur {
            if r.offset + r.len == f.offset && r.len + f.clen <= MAX_READ {
                r.len += f.clen;
                r.frames.push(f);
                continue;
            }
        }
        reads.extend(cur.take());
        cur = Some(Read {
            pack: pack.to_owned(),
            offset: f.offset,
            len: f.clen,
            frames: vec![f],
        });
    }
    reads.extend(cur);
}

/// Fetches `reads` on [`WORKERS`] threads and hands every checked frame
/// to `sender`; the first error stops the others. `image` names the image
/// in errors.
pub(crate) fn fetch(
    remote: &Remote,
    reads: &[Read],
    image: &str,
    sender: &mut Sender<'_>,
) -> Result<Fetched> {
    let work = Work {
        remote,
        reads,
        image,
        next: AtomicUsize::new(0),
        stop: AtomicBool::new(false),
        gets: AtomicU64::new(0),
        bytes: AtomicU64::new(0),
        open: Mutex::new(HashMap::new()),
    };
    std::thread::scope(|s| {
        let (tx, rx) = sync_channel(QUEUED);
        for _ in 0..WORKERS.min(reads.len()) {
            let tx = tx.clone();
            let work = &work;
            s.spawn(move || work.run(&tx));
        }
        drop(tx);
        let r = rx.iter().try_for_each(|c| sender.take(c?));
        // On an error, the workers stop at their next read (and their
        // next send fails once `rx` is dropped).
        work.stop.store(r.is_err(), Ordering::Relaxed);
        drop(rx);
        r
    })?;
    Ok(Fetched {
        gets: work.gets.into_inner(),
        bytes: work.bytes.into_inner(),
    })
}

/// What the workers share.
struct Work<'a> {
    remote: &'a Remote,
    reads: &'a [Read],
    image: &'a str,
    next: AtomicUsize,
    stop: AtomicBool,
    gets: AtomicU64,
    bytes: AtomicU64,
    /// Packs opened, by name (opened once, by the first worker that needs
    /// one).
    open: Mutex<HashMap<String, Arc<dyn ObjectReader>>>,
}

impl Work<'_> {
    /// One worker: reads until none is left, an error, or the caller
    /// stops listening.
    fn run(&self, tx: &SyncSender<Result<Checked>>) {
        let mut buf = Vec::new();
        while !self.stop.load(Ordering::Relaxed) {
            let Some(read) = self.reads.get(self.next.fetch_add(1, Ordering::Relaxed)) else {
                return;
            };
            if let Err(e) = self.read(read, &mut buf, tx) {
                self.stop.store(true, Ordering::Relaxed);
                let _ = tx.send(Err(e));
                return;
            }
        }
    }

    /// Fetches one read and sends its frames, checked. `Ok` also when the
    /// caller stopped listening.
    fn read(&self, read: &Read, buf: &mut Vec<u8>, tx: &SyncSender<Result<Checked>>) -> Result<()> {
        let reader = self.reader(&read.pack)?;
        let bytes = reader.read_range(read.offset, read.len)?;
        if bytes.len() as u64 != read.len {
            return Err(self.remote.damaged(
                reader.label(),
                &format!(
                    "a read of {} bytes at offset {} returned {}",
                    read.len,
                    read.offset,
                    bytes.len()
                ),
            ));
        }
        self.gets.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(read.len, Ordering::Relaxed);
        for f in &read.frames {
            let at = (f.offset - read.offset) as usize;
            let src = &bytes[at..at + f.clen as usize];
            let checked = check_frame(src, &f.want, FRAME_CHUNKS, buf).map_err(|bad| {
                self.remote.damaged(
                    reader.label(),
                    &format!(
                        "frame at offset {}: {bad}; nothing of it was entered for image {}",
                        f.offset, self.image
                    ),
                )
            })?;
            if tx.send(Ok(checked)).is_err() {
                return Ok(());
            }
        }
        Ok(())
    }

    /// The reader of a pack, opened on first use.
    fn reader(&self, pack: &str) -> Result<Arc<dyn ObjectReader>> {
        if let Some(r) = self.open.lock().unwrap().get(pack) {
            return Ok(r.clone());
        }
        let r = self.remote.store.open(ObjectKind::Pack, pack)?;
        self.open.lock().unwrap().insert(pack.to_owned(), r.clone());
        Ok(r)
    }
}
