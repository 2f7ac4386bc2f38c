//! The store's own tests, each run through the [`ObjectStore`] trait on
//! both implementations: [`LocalDir`] in a temporary directory and the
//! in-memory store with a remote store's semantics.

use std::time::Duration;

use super::memory::MemoryStore;
use super::*;
use crate::format::{PackHeader, PACK_TARGET_BYTES};
use crate::ids::ChunkHash;
use crate::perms::Perms;

/// Runs `f` on a local directory store and on a memory store.
fn on_both(f: impl Fn(&dyn ObjectStore)) {
    let dir = tempfile::tempdir().unwrap();
    f(&LocalDir::new(dir.path(), Perms::PRIVATE));
    f(&MemoryStore::default());
}

fn names(store: &dyn ObjectStore, kind: ObjectKind) -> Vec<String> {
    let mut v: Vec<String> = store
        .list(kind)
        .unwrap()
        .into_iter()
        .map(|o| o.name)
        .collect();
    v.sort();
    v
}

/// Three chunks of a pattern, their hashes and their compressed frame.
fn frame() -> (Vec<u8>, Vec<ChunkHash>, Vec<u8>) {
    let data: Vec<u8> = (0..CHUNK_SIZE * 3).map(|i| (i % 7) as u8).collect();
    let hashes = data.chunks(CHUNK_SIZE).map(ChunkHash::of).collect();
    let c = compress_frame(&data, 3).unwrap();
    (data, hashes, c)
}

#[test]
fn objects_are_written_once_sealed_and_read_by_range() {
    on_both(|s| {
        let name = new_pack_name();
        let mut w = s.create(ObjectKind::Pack, &name).unwrap();
        assert!(w.is_empty());
        w.append(b"hello ").unwrap();
        w.append(b"world").unwrap();
        assert_eq!(w.len(), 11);
        assert_eq!(w.seal().unwrap(), 11);
        let r = s.open(ObjectKind::Pack, &name).unwrap();
        assert_eq!(r.len(), 11);
        assert!(!r.is_empty());
        assert_eq!(&**r.read_range(6, 5).unwrap(), b"world");
        assert_eq!(&**r.read_range(0, 0).unwrap(), b"");
        assert_eq!(s.stat(ObjectKind::Pack, &name).unwrap(), Some(11));
        assert_eq!(
            s.get(ObjectKind::Pack, &name).unwrap().unwrap(),
            b"hello world"
        );
        // write once: neither create nor put may replace it
        assert!(s.create(ObjectKind::Pack, &name).is_err());
        assert!(s.put(ObjectKind::Pack, &name, b"x").is_err());
        // kinds are apart
        assert_eq!(s.stat(ObjectKind::PackIndex, &name).unwrap(), None);
        s.put(ObjectKind::PackIndex, &name, b"ix").unwrap();
        assert_eq!(names(s, ObjectKind::Pack), vec![name.clone()]);
        assert_eq!(names(s, ObjectKind::PackIndex), vec![name.clone()]);
        let info = &s.list(ObjectKind::PackIndex).unwrap()[0];
        assert_eq!(info.size, 2);
    });
}

#[test]
fn a_range_past_the_end_is_an_error_naming_the_object() {
    on_both(|s| {
        let name = new_pack_name();
        s.put(ObjectKind::Pack, &name, &[1; 100]).unwrap();
        let r = s.open(ObjectKind::Pack, &name).unwrap();
        for (off, len) in [(90, 11), (101, 0), (u64::MAX, 2)] {
            let e = r.read_range(off, len).err().unwrap().to_string();
            assert!(e.contains(&name) && e.contains("past its end"), "{e}");
        }
        let missing = new_pack_name();
        let e = s.open(ObjectKind::Pack, &missing).err().unwrap();
        assert!(is_not_found(&e), "{e}");
        assert!(s.get(ObjectKind::Pack, &missing).unwrap().is_none());
    });
}

#[test]
fn deleted_objects_vanish_but_open_readers_keep_reading() {
    on_both(|s| {
        let name = new_pack_name();
        s.put(ObjectKind::Pack, &name, &[7; 8192]).unwrap();
        let r = s.open(ObjectKind::Pack, &name).unwrap();
        s.delete(ObjectKind::Pack, &name).unwrap();
        s.delete(ObjectKind::Pack, &name).unwrap(); // gone already is fine
        assert!(names(s, ObjectKind::Pack).is_empty());
        assert_eq!(s.stat(ObjectKind::Pack, &name).unwrap(), None);
        assert_eq!(s.get(ObjectKind::Pack, &name).unwrap(), None);
        s.purge(DELETE_GRACE).unwrap();
        assert_eq!(&**r.read_range(4000, 200).unwrap(), &[7; 200][..]);
        // the name may be written again once deleted (a replaced index)
        s.put(ObjectKind::Pack, &name, b"new").unwrap();
        assert_eq!(s.get(ObjectKind::Pack, &name).unwrap().unwrap(), b"new");
    });
}

#[test]
fn info_names_an_objects_size_and_time() {
    on_both(|s| {
        let name = new_pack_name();
        s.put(ObjectKind::Pack, &name, b"frames").unwrap();
        let i = s.info(ObjectKind::Pack, &name).unwrap().unwrap();
        assert_eq!((i.name.as_str(), i.size), (name.as_str(), 6));
        assert!(i.modified.is_some());
        s.delete(ObjectKind::Pack, &name).unwrap();
        assert_eq!(s.info(ObjectKind::Pack, &name).unwrap(), None);
    });
}

#[test]
fn a_remote_stores_meta_object_is_deleted_at_once() {
    let s = MemoryStore::default();
    s.put(ObjectKind::Meta, "gc.lock", b"token").unwrap();
    assert_eq!(s.stat(ObjectKind::Meta, "gc.lock").unwrap(), Some(5));
    s.delete(ObjectKind::Meta, "gc.lock").unwrap();
    assert_eq!(s.info(ObjectKind::Meta, "gc.lock").unwrap(), None);
    assert!(s.retired(ObjectKind::Meta).unwrap().is_empty(), "no grace");
    assert!(!s.holds(ObjectKind::Meta, "gc.lock"));
    s.put(ObjectKind::Meta, "gc.lock", b"next").unwrap();
    assert_eq!(s.stat(ObjectKind::Meta, "gc.lock").unwrap(), Some(4));
}

#[test]
fn a_remote_store_keeps_deleted_objects_for_the_grace_period() {
    let s = MemoryStore::default();
    let name = new_pack_name();
    s.put(ObjectKind::Pack, &name, b"frames").unwrap();
    s.delete(ObjectKind::Pack, &name).unwrap();
    // a reader holding a plan made before the delete can still open it
    s.advance(DELETE_GRACE - Duration::from_secs(1));
    s.purge(DELETE_GRACE).unwrap();
    let r = s.open(ObjectKind::Pack, &name).unwrap();
    assert!(s.holds(ObjectKind::Pack, &name));
    s.advance(Duration::from_secs(1));
    s.purge(DELETE_GRACE).unwrap();
    assert!(!s.holds(ObjectKind::Pack, &name));
    assert!(s.open(ObjectKind::Pack, &name).is_err());
    assert_eq!(&**r.read_range(0, 6).unwrap(), b"frames");
}

#[test]
fn a_torn_object_is_never_a_sealed_one() {
    on_both(|s| {
        let name = new_pack_name();
        let mut w = s.create(ObjectKind::Pack, &name).unwrap();
        w.append(&PackHeader::new().to_bytes()[..10]).unwrap();
        drop(w); // killed before seal
                 // LocalDir keeps the partial file (a pending row names it), a
                 // remote store shows nothing; either way no pack reads from it.
        match s.stat(ObjectKind::Pack, &name).unwrap() {
            Some(n) => assert_eq!(n, 10),
            None => assert!(names(s, ObjectKind::Pack).is_empty()),
        }
        let e = PackReader::open(s, &name).err().unwrap().to_string();
        assert!(e.contains(&name), "{e}");
    });
}

#[test]
fn a_short_or_foreign_pack_is_refused_by_name() {
    on_both(|s| {
        let (short, foreign) = (new_pack_name(), new_pack_name());
        s.put(ObjectKind::Pack, &short, &[]).unwrap();
        s.put(ObjectKind::Pack, &foreign, &[0; 64]).unwrap();
        let e = PackReader::open(s, &short).err().unwrap().to_string();
        assert!(
            e.contains(&short) && e.contains("shorter than its 16-byte header"),
            "{e}"
        );
        let e = PackReader::open(s, &foreign).err().unwrap().to_string();
        assert!(e.contains(&foreign) && e.contains("bad magic"), "{e}");
    });
}

#[test]
fn packs_write_seal_and_read_with_their_index() {
    on_both(|s| {
        let name = new_pack_name();
        let (data, hashes, c) = frame();
        let mut w = PackWriter::create(s, &name).unwrap();
        assert_eq!(w.len(), PackHeader::SIZE as u64); // the header, no frame yet
        let off = w.append(&c, &hashes).unwrap();
        assert_eq!(off, PackHeader::SIZE as u64);
        let len = w.seal().unwrap();
        let ix = read_index(s, &name).unwrap().unwrap();
        assert_eq!(ix.pack_len, len);
        assert_eq!(ix.frames.len(), 1);
        assert_eq!(ix.frames[0].offset, off);
        assert_eq!(ix.frames[0].hashes, hashes);
        let r = PackReader::open(s, &name).unwrap();
        let mut out = Vec::new();
        r.read_frame(off, c.len() as u64, 3, &mut out).unwrap();
        assert_eq!(out, data);
        // a wrong chunk count or range is an error naming the pack
        assert!(r.read_frame(off, c.len() as u64, 2, &mut out).is_err());
        let e = r
            .read_frame(off, c.len() as u64 + 1, 3, &mut out)
            .unwrap_err();
        assert!(e.to_string().contains(&name), "{e}");
        // a lost index is found again by walking the frames
        let (again, trouble) = r.reindex(&name).unwrap();
        assert_eq!((again, trouble), (ix, None));
        remove_pack(s, &name).unwrap();
        assert!(names(s, ObjectKind::Pack).is_empty());
        assert!(names(s, ObjectKind::PackIndex).is_empty());
    });
}

#[test]
fn reindex_stops_at_bytes_that_are_not_a_frame() {
    on_both(|s| {
        let name = new_pack_name();
        let (_, hashes, c) = frame();
        let mut w = PackWriter::create(s, &name).unwrap();
        w.append(&c, &hashes).unwrap();
        w.append(&c[..c.len() / 2], &hashes).unwrap(); // torn
        w.seal().unwrap();
        let (ix, trouble) = PackReader::open(s, &name).unwrap().reindex(&name).unwrap();
        assert_eq!(ix.frames.len(), 1);
        let t = trouble.unwrap();
        assert!(t.contains("not a complete zstd frame"), "{t}");
    });
}

#[test]
fn a_damaged_index_is_named_and_can_be_replaced() {
    on_both(|s| {
        let name = new_pack_name();
        s.put(ObjectKind::PackIndex, &name, b"junk").unwrap();
        let e = read_index(s, &name).unwrap_err().to_string();
        assert!(e.contains(&name) && e.contains("shorter than its"), "{e}");
        s.delete(ObjectKind::PackIndex, &name).unwrap();
        let ix = crate::format::PackIndex {
            pack: name.clone(),
            pack_len: 16,
            frames: Vec::new(),
        };
        write_index(s, &ix).unwrap();
        assert_eq!(read_index(s, &name).unwrap(), Some(ix));
    });
}

#[test]
fn the_rotator_registers_before_writing_and_seals_full_packs() {
    on_both(|s| {
        let registered = std::cell::RefCell::new(Vec::new());
        let mut rot = PackRotator::new(
            s,
            Box::new(|name: &str| {
                // registered before the pack exists
                assert_eq!(s.stat(ObjectKind::Pack, name).unwrap(), None);
                registered.borrow_mut().push(name.to_owned());
                Ok(registered.borrow().len())
            }),
        );
        // incompressible frames of 16 MiB: four fill a pack
        let big = vec![0x5au8; (PACK_TARGET_BYTES / 4) as usize];
        let mut sealed = Vec::new();
        for i in 0..5 {
            let p = rot.append(&big, &[]).unwrap();
            assert_eq!(p.pack, 1 + i / 4);
            sealed.extend(p.sealed);
        }
        sealed.extend(rot.finish().unwrap());
        let full = PACK_TARGET_BYTES + PackHeader::SIZE as u64;
        let small = big.len() as u64 + PackHeader::SIZE as u64;
        assert_eq!(
            sealed,
            vec![
                Sealed {
                    pack: 1,
                    size: full
                },
                Sealed {
                    pack: 2,
                    size: small
                }
            ]
        );
        let mut want = registered.borrow().clone();
        want.sort();
        assert_eq!(names(s, ObjectKind::Pack), want);
        assert_eq!(names(s, ObjectKind::PackIndex), want);
    });
}

#[test]
fn the_cache_opens_each_pack_once() {
    on_both(|s| {
        let name = new_pack_name();
        let (_, hashes, c) = frame();
        let mut w = PackWriter::create(s, &name).unwrap();
        w.append(&c, &hashes).unwrap();
        w.seal().unwrap();
        let cache = ReaderCache::new(s);
        let a = cache.get(7, &name).unwrap();
        remove_pack(s, &name).unwrap();
        // still open: the same reader, still readable
        let b = cache.get(7, &name).unwrap();
        assert!(std::sync::Arc::ptr_eq(&a, &b));
        let mut out = Vec::new();
        b.read_frame(PackHeader::SIZE as u64, c.len() as u64, 3, &mut out)
            .unwrap();
    });
}

#[test]
fn local_objects_are_files_of_the_documented_layout() {
    let dir = tempfile::tempdir().unwrap();
    let s = LocalDir::new(dir.path(), Perms::PRIVATE);
    let name = "0123456789abcdef0123456789abcdef";
    let p = s.path(ObjectKind::Pack, name).unwrap();
    assert_eq!(p, dir.path().join("packs/01").join(format!("{name}.pack")));
    let ix = s.path(ObjectKind::PackIndex, name).unwrap();
    assert_eq!(ix, p.with_extension("idx"));
    assert!(s.path(ObjectKind::Pack, "../x").is_err());
    // files elsewhere under packs/ are not objects
    std::fs::create_dir_all(dir.path().join("packs/zz")).unwrap();
    std::fs::write(
        dir.path().join("packs/zz").join(format!("{name}.pack")),
        b"",
    )
    .unwrap();
    assert!(s.list(ObjectKind::Pack).unwrap().is_empty());
}

#[test]
fn a_retired_object_is_listed_as_retired_and_can_be_revived() {
    let s = MemoryStore::default();
    let (a, b) = (new_pack_name(), new_pack_name());
    s.put(ObjectKind::Pack, &a, b"a").unwrap();
    s.put(ObjectKind::Pack, &b, b"b").unwrap();
    s.advance(Duration::from_secs(5));
    s.delete(ObjectKind::Pack, &a).unwrap();
    s.delete(ObjectKind::Pack, &b).unwrap();
    let retired = s.retired(ObjectKind::Pack).unwrap();
    assert_eq!(retired.len(), 2);
    assert!(retired
        .iter()
        .all(|o| o.modified == Some(std::time::UNIX_EPOCH + Duration::from_secs(5))));
    assert!(s.retired(ObjectKind::PackIndex).unwrap().is_empty());
    s.revive(ObjectKind::Pack, &a).unwrap();
    assert_eq!(names(&s, ObjectKind::Pack), vec![a.clone()]);
    s.advance(Duration::from_secs(10));
    s.purge(Duration::from_secs(10)).unwrap();
    assert!(s.holds(ObjectKind::Pack, &a));
    assert!(!s.holds(ObjectKind::Pack, &b));
    assert!(s.revive(ObjectKind::Pack, &b).is_err());
}
