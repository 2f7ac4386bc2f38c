//! The transfer core shared by `image copy` (depot to depot), `image push`
//! (depot to remote) and `image pull` (remote to depot): only chunks the
//! target lacks travel, a source frame whose slots are all needed travels
//! as its compressed bytes, other chunks are recompressed into new frames,
//! and every chunk is checked against its hash before it is sent.
//!
//! Main items: [`FrameWant`] (the slots of one source frame that travel),
//! [`check_frame`] (a source frame's bytes decompressed and its needed
//! chunks checked, giving a [`Checked`]), [`FrameSink`] (where frames go:
//! [`LocalSink`], packs of a local depot entered in its catalog batch by
//! batch, or a remote's packs), [`Sender`] (checked frames into a sink,
//! recompressing partial ones, counting into [`Sent`]), [`send_plan`] (the
//! frames of a local image's [`Plan`] as the source), [`present_in`] and
//! [`make_available`] (the target depot's side: what it holds already, and
//! the new image made available in one transaction).

use std::collections::{HashMap, HashSet};
use std::hash::Hash;

use rusqlite::Connection;

use crate::catalog::{self, ImageRow};
use crate::depot::Depot;
use crate::error::{Error, Result};
use crate::format::{BlockMap, CHUNK, CHUNK_SIZE, FRAME_CHUNKS, UNUSED_SLOT, ZSTD_LEVEL};
use crate::ids::{ChunkHash, ChunkId, ImageId};
use crate::image::export::Plan;
use crate::progress::Progress;
use crate::store::{self, FrameError, PackRotator, ReaderCache, Sealed};

/// The slots of one source frame of `nchunks` chunks that travel: distinct
/// slots, each with the hash its chunk must have.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct FrameWant {
    /// Chunks in the source frame.
    pub(crate) nchunks: u32,
    /// `(slot, hash)` of each chunk that travels.
    pub(crate) slots: Vec<(u32, ChunkHash)>,
}

impl FrameWant {
    /// Whether the frame goes as it is: every slot of it travels, and it
    /// holds at most `max` chunks (the target's frame size).
    fn whole(&self, max: usize) -> bool {
        self.slots.len() == self.nchunks as usize && self.nchunks as usize <= max
    }
}

/// What is wrong with a source frame ([`check_frame`]).
#[derive(Debug)]
pub(crate) enum Bad {
    /// It does not decompress to its chunk count's bytes.
    Frame(FrameError),
    /// The chunk at `slot` does not match its hash.
    Chunk {
        /// The slot.
        slot: u32,
        /// The hash it should have.
        hash: ChunkHash,
    },
}

impl std::fmt::Display for Bad {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Bad::Frame(e) => write!(f, "{e}"),
            Bad::Chunk { slot, hash } => {
                write!(
                    f,
                    "the chunk in slot {slot} does not match its hash {}",
                    crate::ids::hex(&hash.0)
                )
            }
        }
    }
}

/// A source frame checked: what of it travels.
#[derive(Debug)]
pub(crate) enum Checked {
    /// The frame as it is: its compressed bytes and its slots' hashes.
    Whole {
        /// The compressed frame.
        bytes: Vec<u8>,
        /// Every slot's hash.
        hashes: Vec<ChunkHash>,
    },
    /// The needed chunks only, to be recompressed.
    Chunks {
        /// Their bytes, one [`CHUNK_SIZE`] after another.
        data: Vec<u8>,
        /// Their hashes, in the same order.
        hashes: Vec<ChunkHash>,
    },
}

/// Decompresses a source frame (`buf`: scratch space, reused) and checks
/// each wanted chunk against its hash; the frame travels whole when all
/// of it is wanted and it has at most `max` chunks (the sender's
/// [`Sender::frame_chunks`]).
pub(crate) fn check_frame(
    compressed: &[u8],
    want: &FrameWant,
    max: usize,
    buf: &mut Vec<u8>,
) -> std::result::Result<Checked, Bad> {
    store::decompress_frame(compressed, want.nchunks as usize, buf).map_err(Bad::Frame)?;
    let chunk = |slot: u32| &buf[slot as usize * CHUNK_SIZE..(slot as usize + 1) * CHUNK_SIZE];
    for &(slot, hash) in &want.slots {
        if slot >= want.nchunks || ChunkHash::of(chunk(slot)) != hash {
            return Err(Bad::Chunk { slot, hash });
        }
    }
    if want.whole(max) {
        let mut hashes = vec![UNUSED_SLOT; want.nchunks as usize];
        for &(slot, hash) in &want.slots {
            hashes[slot as usize] = hash;
        }
        return Ok(Checked::Whole {
            bytes: compressed.to_vec(),
            hashes,
        });
    }
    let mut data = Vec::with_capacity(want.slots.len() * CHUNK_SIZE);
    for &(slot, _) in &want.slots {
        data.extend_from_slice(chunk(slot));
    }
    Ok(Checked::Chunks {
        data,
        hashes: want.slots.iter().map(|s| s.1).collect(),
    })
}

/// Where frames go: packs of a local depot or of a remote.
pub(crate) trait FrameSink {
    /// Appends one compressed frame whose slots hold chunks of `hashes`.
    fn push(&mut self, frame: &[u8], hashes: Vec<ChunkHash>) -> Result<()>;

    /// Seals (and records) what is still open.
    fn finish(&mut self) -> Result<()>;
}

/// What a [`Sender`] sent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Sent {
    /// Chunks sent.
    pub(crate) chunks: u64,
    /// Compressed bytes written to the sink.
    pub(crate) bytes: u64,
    /// Frames sent as they were (no recompression).
    pub(crate) frames_whole: u64,
}

/// Checked frames into a sink: whole ones as they are, the chunks of the
/// others gathered and recompressed into frames of up to its
/// `frame_chunks` chunks.
pub(crate) struct Sender<'s> {
    sink: &'s mut dyn FrameSink,
    progress: &'s dyn Progress,
    frame_chunks: usize,
    level: i32,
    data: Vec<u8>,
    hashes: Vec<ChunkHash>,
    sent: Sent,
}

impl<'s> Sender<'s> {
    /// A sender into `sink`, advancing `progress` by each chunk's bytes,
    /// making frames of up to [`FRAME_CHUNKS`] chunks at [`ZSTD_LEVEL`]
    /// (see [`Sender::next_frames`]).
    pub(crate) fn new(sink: &'s mut dyn FrameSink, progress: &'s dyn Progress) -> Sender<'s> {
        Sender {
            sink,
            progress,
            frame_chunks: FRAME_CHUNKS,
            level: ZSTD_LEVEL,
            data: Vec::new(),
            hashes: Vec::new(),
            sent: Sent::default(),
        }
    }

    /// Sends one checked frame.
    pub(crate) fn take(&mut self, c: Checked) -> Result<()> {
        let n = match c {
            Checked::Whole { bytes, hashes } => {
                let n = hashes.iter().filter(|h| **h != UNUSED_SLOT).count();
                self.sent.bytes += bytes.len() as u64;
                self.sent.frames_whole += 1;
                self.sink.push(&bytes, hashes)?;
                n
            }
            Checked::Chunks { data, hashes } => {
                let n = hashes.len();
                for (d, h) in data.chunks_exact(CHUNK_SIZE).zip(hashes) {
                    self.data.extend_from_slice(d);
                    self.hashes.push(h);
                    if self.hashes.len() >= self.frame_chunks {
                        self.flush()?;
                    }
                }
                n
            }
        };
        self.sent.chunks += n as u64;
        self.progress.advance(n as u64 * CHUNK);
        Ok(())
    }

    /// Sends the chunks gathered so far as a frame now; the chunks taken
    /// next go into frames of up to `frame_chunks` chunks (1 to
    /// [`FRAME_CHUNKS`]) compressed at zstd level `level`.
    pub(crate) fn next_frames(&mut self, frame_chunks: usize, level: i32) -> Result<()> {
        self.flush()?;
        self.frame_chunks = frame_chunks.clamp(1, FRAME_CHUNKS);
        self.level = level;
        Ok(())
    }

    /// The most chunks a frame it sends holds.
    pub(crate) fn frame_chunks(&self) -> usize {
        self.frame_chunks
    }

    /// Compresses and sends the gathered chunks as one frame.
    fn flush(&mut self) -> Result<()> {
        if self.hashes.is_empty() {
            return Ok(());
        }
        let c = store::compress_frame(&self.data, self.level)
            .map_err(|e| Error::Invalid(format!("zstd could not compress a frame: {e}")))?;
        self.sent.bytes += c.len() as u64;
        self.sink.push(&c, std::mem::take(&mut self.hashes))?;
        self.data.clear();
        Ok(())
    }

    /// Sends what is gathered and seals the sink; returns what was sent.
    pub(crate) fn finish(mut self) -> Result<Sent> {
        self.flush()?;
        self.sink.finish()?;
        Ok(self.sent)
    }
}

/// Items grouped by key, groups in the order their first item comes.
pub(crate) fn group_by<K: Hash + Eq + Copy, T>(
    items: impl IntoIterator<Item = (K, T)>,
) -> Vec<(K, Vec<T>)> {
    let mut out: Vec<(K, Vec<T>)> = Vec::new();
    let mut idx: HashMap<K, usize> = HashMap::new();
    for (k, t) in items {
        let i = *idx.entry(k).or_insert_with(|| {
            out.push((k, Vec::new()));
            out.len() - 1
        });
        out[i].1.push(t);
    }
    out
}

/// The distinct chunks of a plan in map order (the order frames were
/// written in).
pub(crate) fn plan_order(plan: &Plan) -> Vec<ChunkId> {
    let mut seen = HashSet::new();
    plan.map
        .data()
        .map(|(_, c)| c)
        .filter(|c| seen.insert(*c))
        .collect()
}

/// Sends the `missing` chunks of a local image (`plan` of `row` in `src`),
/// frame by frame of the source.
pub(crate) fn send_plan(
    src: &Depot,
    row: &ImageRow,
    plan: &Plan,
    missing: &[ChunkId],
    sender: &mut Sender<'_>,
) -> Result<()> {
    let readers = ReaderCache::new(src.repo.store());
    let mut buf = Vec::new();
    let frames = group_by(missing.iter().map(|&c| (plan.chunks[&c].frame, c)));
    for (frame, chunks) in &frames {
        let f = &plan.frames[frame];
        let want = FrameWant {
            nchunks: f.nchunks,
            slots: chunks
                .iter()
                .map(|c| (plan.chunks[c].slot, plan.chunks[c].hash))
                .collect(),
        };
        let reader = readers.get(f.pack, &plan.packs[&f.pack])?;
        let bytes = reader.frame_bytes(f.offset, f.clen)?;
        let max = sender.frame_chunks();
        let checked = check_frame(&bytes, &want, max, &mut buf).map_err(|bad| match bad {
            Bad::Frame(e) => Error::StoreDamaged(format!(
                "image {} ({}): pack {}: frame at offset {}: {e}; not sent; `vmdepot image verify` checks every image's data",
                row.name, row.id, plan.packs[&f.pack], f.offset
            )),
            Bad::Chunk { slot, .. } => corrupt(row, plan, chunks, slot),
        })?;
        sender.take(checked)?;
    }
    Ok(())
}

/// The error for a local chunk (of `chunks`, in `slot` of their frame)
/// that does not match its hash.
fn corrupt(row: &ImageRow, plan: &Plan, chunks: &[ChunkId], slot: u32) -> Error {
    let c = chunks
        .iter()
        .copied()
        .find(|c| plan.chunks[c].slot == slot)
        .unwrap_or_default();
    Error::Corrupt {
        image: format!("{} ({})", row.name, row.id),
        offset: plan.map.data().find(|&(_, x)| x == c).map_or(0, |(b, _)| b) * CHUNK,
        detail: format!("stored chunk {c} does not match its hash; not sent"),
    }
}

/// The chunks of `hashes` the depot `dst` already has (committed, or
/// brought by an earlier run of the same transfer into image `id`), in one
/// read transaction.
pub(crate) fn present_in(
    dst: &Depot,
    hashes: &[ChunkHash],
    id: &ImageId,
) -> Result<HashSet<ChunkHash>> {
    catalog::read(&dst.repo.conn, |tx| {
        let mut p = HashSet::new();
        for h in hashes {
            if catalog::chunk_by_hash(tx, h, id)?.is_some() {
                p.insert(*h);
            }
        }
        Ok(p)
    })
}

/// The content a new image is made available with.
pub(crate) struct Content<'a> {
    /// Its virtual size in bytes.
    pub(crate) virtual_size: u64,
    /// Its stored (non-zero) bytes.
    pub(crate) data_bytes: u64,
    /// Its content digest (hex).
    pub(crate) digest: &'a str,
    /// Its distinct chunks.
    pub(crate) hashes: &'a [ChunkHash],
}

/// The image `id` made available in `dst`, in one transaction, if every
/// chunk of `content` is there: its map (built by `map` from the target's
/// chunk id of each hash), the transfer `job`'s `copy_chunks` names
/// dropped, `extra` rows written (shares), its manifest written. `what`
/// names the transfer in the error for a chunk gone meanwhile.
pub(crate) fn make_available(
    dst: &Depot,
    id: &ImageId,
    job: &str,
    what: &str,
    content: &Content<'_>,
    map: impl FnOnce(&HashMap<ChunkHash, ChunkId>) -> BlockMap,
    extra: impl FnOnce(&Connection) -> Result<()>,
) -> Result<()> {
    let tx = catalog::begin_write(&dst.repo.conn)?;
    let mut ids: HashMap<ChunkHash, ChunkId> = HashMap::with_capacity(content.hashes.len());
    for h in content.hashes {
        let Some(t) = catalog::chunk_by_hash(&tx, h, id)? else {
            return Err(Error::Invalid(format!(
                "{what}: a chunk vanished from {} meanwhile (a gc there?): run it again",
                dst.root().display()
            )));
        };
        ids.insert(*h, t);
    }
    let map = map(&ids);
    // The image holds them now; gc needs no reminder.
    catalog::delete_copy_chunks(&tx, job)?;
    catalog::set_available(
        &tx,
        id,
        content.virtual_size,
        content.data_bytes,
        content.digest,
        &map,
    )?;
    extra(&tx)?;
    let manifest = crate::repo::manifest::write_next(&tx, dst.root(), dst.perms(), id)?;
    tx.commit()?;
    manifest.committed();
    Ok(())
}

/// Frames on their way into a local depot: one pack at a time (registered
/// pending), entered (as committed chunks named in `copy_chunks` under the
/// transfer's job) when it is full and sealed, and at the end.
pub(crate) struct LocalSink<'a> {
    depot: &'a Depot,
    id: &'a ImageId,
    job: &'a str,
    packs: PackRotator<'a, i64>,
    frames: Vec<(u64, u64, Vec<ChunkHash>)>,
}

impl<'a> LocalSink<'a> {
    /// A sink into `depot` for its new image `id`, the transfer named `job`.
    pub(crate) fn new(depot: &'a Depot, id: &'a ImageId, job: &'a str) -> LocalSink<'a> {
        let conn = &depot.repo.conn;
        LocalSink {
            depot,
            id,
            job,
            packs: PackRotator::new(
                depot.repo.store(),
                Box::new(move |name: &str| catalog::insert_pending_pack(conn, name, id)),
            ),
            frames: Vec::new(),
        }
    }

    /// One transaction once a pack is sealed: its frames, their chunks
    /// (committed; content that arrived meanwhile is skipped), the pack
    /// sealed.
    fn enter(&mut self, sealed: Sealed<i64>) -> Result<()> {
        let Sealed { pack: pid, size } = sealed;
        let frames = std::mem::take(&mut self.frames);
        catalog::write(&self.depot.repo.conn, |tx| {
            let mut ins = catalog::CopyInserter::new(tx, self.job)?;
            for (off, clen, hashes) in &frames {
                let fid = ins.frame(pid, *off, *clen, hashes.len())?;
                for (slot, h) in hashes.iter().enumerate() {
                    if *h == UNUSED_SLOT || catalog::chunk_by_hash(tx, h, self.id)?.is_some() {
                        continue; // a slot this transfer does not need, or already there
                    }
                    ins.chunk(h, fid, slot)?;
                }
            }
            catalog::seal_copied_pack(tx, pid, size)
        })
    }
}

impl FrameSink for LocalSink<'_> {
    fn push(&mut self, frame: &[u8], hashes: Vec<ChunkHash>) -> Result<()> {
        let placed = self.packs.append(frame, &hashes)?;
        self.frames
            .push((placed.offset, frame.len() as u64, hashes));
        match placed.sealed {
            Some(s) => self.enter(s),
            None => Ok(()),
        }
    }

    fn finish(&mut self) -> Result<()> {
        match self.packs.finish()? {
            Some(s) => self.enter(s),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(chunks: &[u8]) -> (Vec<u8>, Vec<ChunkHash>) {
        let data: Vec<u8> = chunks.iter().flat_map(|&b| [b; CHUNK_SIZE]).collect();
        let hashes = data.chunks_exact(CHUNK_SIZE).map(ChunkHash::of).collect();
        (store::compress_frame(&data, ZSTD_LEVEL).unwrap(), hashes)
    }

    #[test]
    fn a_frame_travels_whole_only_when_every_slot_is_wanted() {
        let (c, h) = frame(&[1, 2, 3]);
        let mut buf = Vec::new();
        let all = FrameWant {
            nchunks: 3,
            slots: (0..3).map(|s| (s, h[s as usize])).collect(),
        };
        assert!(
            matches!(check_frame(&c, &all, FRAME_CHUNKS, &mut buf), Ok(Checked::Whole { bytes, .. }) if bytes == c)
        );
        let some = FrameWant {
            nchunks: 3,
            slots: vec![(2, h[2])],
        };
        match check_frame(&c, &some, FRAME_CHUNKS, &mut buf).unwrap() {
            Checked::Chunks { data, hashes } => {
                assert_eq!(data, vec![3; CHUNK_SIZE]);
                assert_eq!(hashes, vec![h[2]]);
            }
            w => panic!("{w:?}"),
        }
    }

    #[test]
    fn a_bad_frame_or_chunk_is_named() {
        let (c, h) = frame(&[1, 2]);
        let mut buf = Vec::new();
        let wrong = FrameWant {
            nchunks: 2,
            slots: vec![(1, h[0])],
        };
        assert!(matches!(
            check_frame(&c, &wrong, FRAME_CHUNKS, &mut buf),
            Err(Bad::Chunk { slot: 1, .. })
        ));
        let past = FrameWant {
            nchunks: 2,
            slots: vec![(7, h[0])],
        };
        assert!(matches!(
            check_frame(&c, &past, FRAME_CHUNKS, &mut buf),
            Err(Bad::Chunk { slot: 7, .. })
        ));
        let short = FrameWant {
            nchunks: 3,
            slots: vec![(0, h[0])],
        };
        assert!(matches!(
            check_frame(&c, &short, FRAME_CHUNKS, &mut buf),
            Err(Bad::Frame(_))
        ));
        assert!(matches!(
            check_frame(&c[..5], &short, FRAME_CHUNKS, &mut buf),
            Err(Bad::Frame(_))
        ));
    }

    /// Collects what a sender sends: each frame's chunk count and bytes.
    #[derive(Default)]
    struct Frames(Vec<(usize, Vec<u8>)>);

    impl FrameSink for Frames {
        fn push(&mut self, frame: &[u8], hashes: Vec<ChunkHash>) -> Result<()> {
            self.0.push((hashes.len(), frame.to_vec()));
            Ok(())
        }

        fn finish(&mut self) -> Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_sender_with_smaller_frames_splits_whole_frames_and_keeps_the_order() {
        let bytes: Vec<u8> = (1..=10).collect();
        let (c, h) = frame(&bytes);
        let all = FrameWant {
            nchunks: 10,
            slots: (0..10).map(|s| (s, h[s as usize])).collect(),
        };
        let mut sink = Frames::default();
        let mut sender = Sender::new(&mut sink, &crate::progress::NoProgress);
        sender.next_frames(4, ZSTD_LEVEL).unwrap();
        let mut buf = Vec::new();
        let checked = check_frame(&c, &all, sender.frame_chunks(), &mut buf).unwrap();
        assert!(
            matches!(checked, Checked::Chunks { .. }),
            "10 chunks do not go whole into frames of 4"
        );
        sender.take(checked).unwrap();
        let sent = sender.finish().unwrap();
        assert_eq!((sent.chunks, sent.frames_whole), (10, 0));
        let counts: Vec<usize> = sink.0.iter().map(|f| f.0).collect();
        assert_eq!(counts, [4, 4, 2]);
        let mut back = Vec::new();
        for (n, f) in &sink.0 {
            store::decompress_frame(f, *n, &mut buf).unwrap();
            back.extend(buf.chunks_exact(CHUNK_SIZE).map(|d| d[0]));
        }
        assert_eq!(
            back, bytes,
            "the chunks keep their order across the new frames"
        );
        // A frame within the size goes as it is.
        let (c3, h3) = frame(&[7, 8, 9]);
        let small = FrameWant {
            nchunks: 3,
            slots: (0..3).map(|s| (s, h3[s as usize])).collect(),
        };
        assert!(
            matches!(check_frame(&c3, &small, 4, &mut buf), Ok(Checked::Whole { bytes, .. }) if bytes == c3)
        );
    }

    #[test]
    fn groups_keep_first_come_order() {
        let g = group_by([(3, 'a'), (1, 'b'), (3, 'c')]);
        assert_eq!(g, vec![(3, vec!['a', 'c']), (1, vec!['b'])]);
    }
}
