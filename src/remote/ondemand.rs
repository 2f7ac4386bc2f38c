//! The remote side of a partial image's disk server (`image::lazy`): the
//! chunks its instances read that the depot lacks are fetched here, one
//! ranged read per miss: the remote frame that holds the chunk (its
//! location checked against the pack's listed size) and, when the miss
//! starts where the last read of that pack ended, the frames right after
//! it, twice as many as that read took, up to [`MAX_WINDOW`] (read-ahead
//! of a guest that reads in order). Each frame is decompressed and every
//! chunk of it that the image needs checked against its hash before any
//! of it is served. The frame's needed chunks are then
//! entered in the depot by a writer thread, batch by batch (one small
//! pack per batch, under the pull's job, as a pull enters them), and
//! served from memory until they are. A prefetch thread fetches the rest
//! ([`Depot::complete_partial`]: the pull itself), when asked.
//!
//! The remote's chunk map (its pack indexes, cached under the depot) is
//! read on the first miss, not before: a launch does not wait for it.
//! Its requests have [`Patience::Interactive`]: a remote that went away
//! is an error within seconds, which the guest sees as an I/O error.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender as Tx};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::fetch::check_loc;
use super::{ChunkLoc, Remote};
use crate::depot::Depot;
use crate::error::{Error, Result};
use crate::format::{HashBlockMap, CHUNK_SIZE, FRAME_CHUNKS};
use crate::ids::{ChunkHash, ImageId};
use crate::image::lazy::{FetchedChunk, RemoteChunks};
use crate::lifecycle::transfer::{check_frame, Checked, FrameWant, LocalSink, Sender};
use crate::progress::NoProgress;
use crate::store::{ObjectKind, ObjectReader, Patience};

/// A remote frame: its pack and offset there.
type FrameKey = (String, u64);

/// Where the image's chunks are on the remote, by hash, and which of
/// them each remote frame holds.
struct Needs {
    locs: HashMap<ChunkHash, ChunkLoc>,
    frames: HashMap<FrameKey, FrameWant>,
    /// Each pack's frames the image needs, `(offset, clen)` by offset.
    order: HashMap<String, Vec<(u64, u64)>>,
}

impl Needs {
    /// The frames of one ranged read that starts with the frame at `key`:
    /// it and up to `window - 1` frames right after it in its pack (no
    /// gap between them) that the image needs and `skip` does not rule
    /// out. `(offset, clen)` each, in pack order.
    fn span(&self, key: &FrameKey, window: usize, skip: impl Fn(u64) -> bool) -> Vec<(u64, u64)> {
        let order = &self.order[&key.0];
        let Ok(i) = order.binary_search_by_key(&key.1, |f| f.0) else {
            unreachable!("a needed frame is in its pack's order");
        };
        let mut span = vec![order[i]];
        for &(off, clen) in order[i + 1..].iter().take(window.saturating_sub(1)) {
            let (last_off, last_len) = span[span.len() - 1];
            if off != last_off + last_len || skip(off) {
                break;
            }
            span.push((off, clen));
        }
        span
    }
}

/// The most frames one miss reads ahead of a guest that reads a pack's
/// frames in order (the window doubles from 1 with each miss that starts
/// where the last read of the pack ended): 8 frames of
/// [`crate::format::REMOTE_FRAME_CHUNKS`] chunks, 2 MiB of image data.
const MAX_WINDOW: usize = 8;

/// The remote side of one partial image (see the module docs).
pub(crate) struct OnDemand {
    /// `NAME (img-…)`, for messages.
    label: String,
    /// The remote image's id (its manifest's), for hints.
    remote_id: String,
    image: ImageId,
    root: PathBuf,
    /// The remote, or why it could not be opened (no credentials, say)
    /// and when: a miss opens it again once that is [`REOPEN_AFTER`] old.
    remote: Mutex<std::result::Result<Remote, (String, Instant)>>,
    open: Opener,
    /// The image's map by hash (the manifest's).
    map: HashBlockMap,
    needs: Mutex<Option<Arc<Needs>>>,
    readers: Mutex<HashMap<String, Arc<dyn ObjectReader>>>,
    /// Chunks fetched and not entered yet.
    fetched: Arc<Mutex<HashMap<ChunkHash, FetchedChunk>>>,
    /// One fetch of a frame at a time (readers of the same frame wait).
    inflight: Mutex<HashMap<FrameKey, Arc<Mutex<()>>>>,
    /// Per pack: where its last read ended, and that read's window.
    ahead: Mutex<HashMap<String, (u64, usize)>>,
    writer: Mutex<Tx<Checked>>,
    prefetching: AtomicBool,
}

/// Takes a frame out of the fetches in flight when it drops.
struct InFlight<'a>(&'a Mutex<HashMap<FrameKey, Arc<Mutex<()>>>>, FrameKey);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.lock().unwrap().remove(&self.1);
    }
}

/// Opens the remote (again).
type Opener = Arc<dyn Fn() -> Result<Remote> + Send + Sync>;

/// How long a failure to open the remote is the answer to every miss
/// before one opens it again (credentials put in place meanwhile).
const REOPEN_AFTER: Duration = Duration::from_secs(5);

impl OnDemand {
    /// The remote side of the partial image `image` (`label` names it) of
    /// the depot at `root`, run from `manifest` of the remote
    /// `remote_name` (which `open` opens); starts its writer.
    pub(crate) fn new(
        root: PathBuf,
        image: ImageId,
        label: String,
        remote_name: &str,
        open: Opener,
        manifest: crate::format::Manifest,
    ) -> OnDemand {
        let map = manifest.map;
        let (tx, rx) = channel();
        let fetched = Arc::new(Mutex::new(HashMap::new()));
        let remote = open().map_err(|e| {
            let e = crate::error::one_line(&e.to_string());
            tracing::error!("{e}");
            (e, Instant::now())
        });
        let job = super::pull::origin_of(remote_name, &manifest.meta.id);
        {
            let (root, id, fetched) = (root.clone(), image.clone(), fetched.clone());
            std::thread::spawn(move || write_fetched(&root, &id, &job, &rx, &fetched));
        }
        OnDemand {
            label,
            remote_id: manifest.meta.id.clone(),
            image,
            root,
            remote: Mutex::new(remote),
            open,
            map,
            needs: Mutex::new(None),
            readers: Mutex::new(HashMap::new()),
            fetched,
            inflight: Mutex::new(HashMap::new()),
            ahead: Mutex::new(HashMap::new()),
            writer: Mutex::new(tx),
            prefetching: AtomicBool::new(false),
        }
    }

    /// The chunk `hash` from a frame fetched for it (or for a neighbour),
    /// and the compressed bytes fetched from the remote for it now (0: it
    /// was in memory). Errors name the remote, the object and what was wrong.
    fn fetch(&self, hash: &ChunkHash) -> Result<(FetchedChunk, u64)> {
        if let Some(c) = self.fetched.lock().unwrap().get(hash) {
            return Ok((c.clone(), 0));
        }
        let remote = &self.remote()?;
        let needs = self.needs(remote)?;
        let id = &self.remote_id;
        let loc = needs.locs.get(hash).ok_or_else(|| {
            remote.damaged_of(
                &format!("image {}", self.label),
                &format!(
                    "its chunk {} is in no pack the remote lists (a pack lost or retired)",
                    crate::ids::hex(&hash.0)
                ),
                id,
            )
        })?;
        let key = (loc.pack.clone(), loc.offset);
        let gate = self
            .inflight
            .lock()
            .unwrap()
            .entry(key.clone())
            .or_default()
            .clone();
        let _one = gate.lock().unwrap();
        // However this ends (an error included), the frame is no longer
        // in flight: later misses fetch it, and read-ahead may take it.
        let _done = InFlight(&self.inflight, key.clone());
        if let Some(c) = self.fetched.lock().unwrap().get(hash) {
            return Ok((c.clone(), 0));
        }
        // A miss where the last read of the pack ended reads ahead, with
        // twice the window of that read; any other starts over with 1.
        let window = {
            let ahead = self.ahead.lock().unwrap();
            match ahead.get(&loc.pack) {
                Some(&(end, w)) if end == loc.offset => (w * 2).min(MAX_WINDOW),
                _ => 1,
            }
        };
        let span = {
            let (fetched, inflight) = (self.fetched.lock().unwrap(), self.inflight.lock().unwrap());
            needs.span(&key, window, |off| {
                let k = (key.0.clone(), off);
                let first = needs.frames[&k].slots.first().map(|s| s.1);
                inflight.contains_key(&k) || first.is_some_and(|h| fetched.contains_key(&h))
            })
        };
        let (start, last) = (span[0], span[span.len() - 1]);
        let len = last.0 + last.1 - start.0;
        let t0 = Instant::now();
        let reader = self.reader(remote, &loc.pack)?;
        let bytes = reader.read_range(start.0, len)?;
        let got = t0.elapsed();
        if bytes.len() as u64 != len {
            return Err(remote.damaged_of(
                reader.label(),
                &format!(
                    "a read of {len} bytes at offset {} returned {}",
                    start.0,
                    bytes.len()
                ),
                id,
            ));
        }
        self.ahead
            .lock()
            .unwrap()
            .insert(loc.pack.clone(), (start.0 + len, span.len()));
        let mut mine = None;
        let mut buf = Vec::new();
        for (i, &(off, clen)) in span.iter().enumerate() {
            let k = (key.0.clone(), off);
            let want = &needs.frames[&k];
            let at = (off - start.0) as usize;
            let checked =
                match check_frame(&bytes[at..at + clen as usize], want, FRAME_CHUNKS, &mut buf) {
                    Ok(c) => c,
                    // A frame read ahead is fetched again (and reported) when read.
                    Err(_) if i > 0 => break,
                    Err(bad) => {
                        return Err(remote.damaged_of(
                            reader.label(),
                            &format!(
                                "frame at offset {off}: {bad}; not served to image {}",
                                self.label
                            ),
                            id,
                        ))
                    }
                };
            let frame = Arc::new(std::mem::take(&mut buf));
            {
                let mut f = self.fetched.lock().unwrap();
                for &(slot, h) in &want.slots {
                    let c = (frame.clone(), slot as usize * CHUNK_SIZE);
                    if h == *hash {
                        mine = Some(c.clone());
                    }
                    f.insert(h, c);
                }
            }
            // The writer enters them (a closed writer: they stay in memory).
            let _ = self.writer.lock().unwrap().send(checked);
        }
        tracing::debug!(
            "image {}: {} frame(s) of pack {} at {} ({len} bytes, window {window}) fetched in {} ms, checked in {} ms",
            self.label,
            span.len(),
            loc.pack,
            start.0,
            got.as_millis(),
            (t0.elapsed() - got).as_millis()
        );
        let mine = mine.expect("the frame of a chunk holds it");
        Ok((mine, len))
    }

    /// The remote, opened again if opening it failed long enough ago.
    fn remote(&self) -> Result<Remote> {
        let mut g = self.remote.lock().unwrap();
        match &*g {
            Ok(r) => return Ok(r.clone()),
            Err((e, at)) if at.elapsed() < REOPEN_AFTER => return Err(Error::Invalid(e.clone())),
            Err(_) => {}
        }
        match (self.open)() {
            Ok(r) => {
                tracing::info!("image {}: remote {} opened", self.label, r.name());
                *g = Ok(r.clone());
                Ok(r)
            }
            Err(e) => {
                let e = crate::error::one_line(&e.to_string());
                *g = Err((e.clone(), Instant::now()));
                Err(Error::Invalid(e))
            }
        }
    }

    /// Where the image's chunks are on the remote: read on first use (the
    /// remote's listing and its pack indexes, cached under the depot).
    fn needs(&self, remote: &Remote) -> Result<Arc<Needs>> {
        let mut g = self.needs.lock().unwrap();
        if let Some(n) = &*g {
            return Ok(n.clone());
        }
        let all = remote.chunk_map()?;
        let mut locs = HashMap::new();
        let mut frames: HashMap<FrameKey, FrameWant> = HashMap::new();
        for h in self.map.runs.iter().flat_map(|r| r.1.iter()) {
            if locs.contains_key(h) {
                continue;
            }
            let Some(loc) = all.get(h) else {
                continue; // an error when a guest reads it
            };
            check_loc(remote, &all, loc)?;
            let want = frames
                .entry((loc.pack.clone(), loc.offset))
                .or_insert_with(|| FrameWant {
                    nchunks: loc.nchunks,
                    slots: Vec::new(),
                });
            want.slots.push((loc.slot, *h));
            locs.insert(*h, loc.clone());
        }
        tracing::info!(
            "image {}: {} chunks at remote {}, in {} frames",
            self.label,
            locs.len(),
            remote.name(),
            frames.len()
        );
        let mut order: HashMap<String, Vec<(u64, u64)>> = HashMap::new();
        for loc in locs.values() {
            order
                .entry(loc.pack.clone())
                .or_default()
                .push((loc.offset, loc.clen));
        }
        for o in order.values_mut() {
            o.sort_unstable();
            o.dedup();
        }
        let n = Arc::new(Needs {
            locs,
            frames,
            order,
        });
        *g = Some(n.clone());
        Ok(n)
    }

    /// The reader of a remote pack, opened once.
    fn reader(&self, remote: &Remote, pack: &str) -> Result<Arc<dyn ObjectReader>> {
        if let Some(r) = self.readers.lock().unwrap().get(pack) {
            return Ok(r.clone());
        }
        let r = remote.store().open(ObjectKind::Pack, pack)?;
        self.readers
            .lock()
            .unwrap()
            .insert(pack.to_owned(), r.clone());
        Ok(r)
    }

    /// Starts fetching the rest of the image in the background (once per
    /// server): the pull itself, retried every 15 s while it fails.
    fn start_prefetch(&self) {
        if self.prefetching.swap(true, Ordering::SeqCst) {
            return;
        }
        let (root, id, label) = (self.root.clone(), self.image.clone(), self.label.clone());
        let open = self.open.clone();
        std::thread::spawn(move || loop {
            let r = Depot::open(&root).and_then(|d| {
                let remote = open()?;
                d.complete_partial(&remote, id.as_str(), &NoProgress)
            });
            match r {
                Ok(p) => {
                    tracing::info!(
                        "image {label}: prefetched ({} chunks, {} bytes fetched): it is complete",
                        p.chunks_fetched,
                        p.bytes_fetched
                    );
                    return;
                }
                Err(Error::ImageNotAvailable { .. }) => return, // completed by another
                Err(e) => {
                    tracing::warn!("image {label}: prefetch failed, tried again in 15 s: {e}");
                    std::thread::sleep(Duration::from_secs(15));
                }
            }
        });
    }
}

impl RemoteChunks for OnDemand {
    fn map(&self) -> &HashBlockMap {
        &self.map
    }

    fn chunk(&self, hash: &ChunkHash) -> Result<(FetchedChunk, u64)> {
        self.fetch(hash)
    }

    fn prefetch(&self) {
        self.start_prefetch()
    }
}

/// The remote side of the partial image `row` of `repo` (the disk
/// server's [`crate::image::serve::PartialSource`]): its remote opened with
/// [`Patience::Interactive`]; when that fails (this process has no
/// credentials, say) reads of chunks the depot lacks fail with why, and
/// open it again once [`REOPEN_AFTER`] has passed.
fn on_demand(
    repo: &crate::repo::Repo,
    row: &crate::catalog::ImageRow,
) -> Result<Arc<dyn RemoteChunks>> {
    let depot = Depot::open(repo.root())?;
    let (name, manifest) = depot
        .partial_source(row.id.as_str())?
        .ok_or_else(|| Error::ImageNotFound(row.id.to_string()))?;
    let (root, remote) = (repo.root().to_owned(), name.clone());
    let open: Opener =
        Arc::new(move || Depot::open(&root)?.remote_patient(&remote, Patience::Interactive));
    Ok(Arc::new(OnDemand::new(
        repo.root().to_owned(),
        row.id.clone(),
        format!("{} ({})", row.name, row.id),
        &name,
        open,
        manifest,
    )))
}

/// The hidden `vmdepot disk-server IMAGE`: the detached server of one
/// image of `depot` (see `image::serve`), partial images included. Not for
/// users.
#[doc(hidden)]
pub fn serve_lazy_disks(depot: &Depot, image: &str) -> Result<()> {
    crate::image::serve::run_detached(&depot.repo, image, &on_demand)
}

/// The writer: enters fetched frames in the depot at `root` as the
/// image's (`id`) pull job `job` does, a batch at a time (what arrived
/// within 2 s, or 256 frames), then forgets them in `fetched` (they are
/// found in the depot from then on). Ends when the server does.
fn write_fetched(
    root: &std::path::Path,
    id: &ImageId,
    job: &str,
    rx: &Receiver<Checked>,
    fetched: &Mutex<HashMap<ChunkHash, FetchedChunk>>,
) {
    let depot = match Depot::open(root) {
        Ok(d) => d,
        Err(e) => {
            tracing::error!("fetched chunks are kept in memory only: {e}");
            return;
        }
    };
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        let start = Instant::now();
        while batch.len() < 256 && start.elapsed() < Duration::from_secs(2) {
            match rx.recv_timeout(Duration::from_millis(300)) {
                Ok(c) => batch.push(c),
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        let hashes: Vec<ChunkHash> = batch
            .iter()
            .flat_map(|c| match c {
                Checked::Whole { hashes, .. } | Checked::Chunks { hashes, .. } => hashes.clone(),
            })
            .collect();
        let entered = (|| {
            let mut sink = LocalSink::new(&depot, id, job);
            let mut sender = Sender::new(&mut sink, &NoProgress);
            for c in batch {
                sender.take(c)?;
            }
            sender.finish()
        })();
        match entered {
            Ok(s) => tracing::debug!("{} fetched chunks entered", s.chunks),
            Err(e) => tracing::warn!("fetched chunks not entered (fetched again if read): {e}"),
        }
        let mut f = fetched.lock().unwrap();
        for h in &hashes {
            f.remove(h);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Needs of frames `(offset, clen)` in pack "p" (one chunk each).
    fn needs(frames: &[(u64, u64)]) -> Needs {
        let mut n = Needs {
            locs: HashMap::new(),
            frames: HashMap::new(),
            order: HashMap::new(),
        };
        for (i, &(off, _)) in frames.iter().enumerate() {
            let want = FrameWant {
                nchunks: 1,
                slots: vec![(0, ChunkHash([i as u8; 32]))],
            };
            n.frames.insert(("p".into(), off), want);
        }
        n.order.insert("p".into(), frames.to_vec());
        n
    }

    #[test]
    fn a_read_spans_the_adjacent_frames_that_follow_up_to_its_window() {
        let n = needs(&[(16, 10), (26, 5), (31, 7), (38, 2), (50, 4), (54, 4)]);
        let at = |off: u64| ("p".to_string(), off);
        let none = |_: u64| false;
        assert_eq!(n.span(&at(16), 1, none), [(16, 10)]);
        assert_eq!(n.span(&at(16), 3, none), [(16, 10), (26, 5), (31, 7)]);
        // A gap (38 + 2 < 50: another image's frames) ends it.
        assert_eq!(n.span(&at(31), 8, none), [(31, 7), (38, 2)]);
        assert_eq!(n.span(&at(50), 8, none), [(50, 4), (54, 4)]);
        // So does a frame fetched already (or being fetched).
        assert_eq!(n.span(&at(16), 8, |off| off == 31), [(16, 10), (26, 5)]);
        // The frame asked for is always read.
        assert_eq!(n.span(&at(26), 0, |_| true), [(26, 5)]);
    }
}
