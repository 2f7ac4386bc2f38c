//! The remote layer's unit tests of what is not push or pull, on a [`MemoryStore`] (a remote store's
//! semantics, a clock the test moves) and depots in temporary
//! directories: configuration, the access rules, listings, delete,
//! verify and every step of the gc protocol. [`Fixture`] writes remote
//! images the way a push leaves them: a pack with its index, then the
//! manifest.

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::Duration;

use super::config::{check_remote_name, REMOTE_MARKER};
use super::*;
use crate::depot::access::Op;
use crate::depot::Depot;
use crate::format::{HashBlockMap, ManifestMeta, ManifestShare, CHUNK_SIZE};
use crate::ids::ChunkHash;
use crate::progress::NoProgress;
use crate::store::{compress_frame, new_pack_name, MemoryStore, PackWriter};

const GRACE: Duration = Duration::from_secs(24 * 3600);
const HOUR: Duration = Duration::from_secs(3600);

/// A temporary depot, a memory remote `r` configured in it.
struct Fixture {
    _dir: tempfile::TempDir,
    root: std::path::PathBuf,
    store: MemoryStore,
    remote: Remote,
}

/// One image to write on the remote.
struct Img<'a> {
    name: &'a str,
    owner: &'a str,
    kind: &'a str,
    shares: &'a [&'a str],
    /// Block contents (`None`: a zero block).
    blocks: Vec<Option<Vec<u8>>>,
    /// Store the first stored block's bytes with one byte flipped (its
    /// hash still of the original).
    flip: bool,
    protected: bool,
}

impl<'a> Img<'a> {
    fn new(name: &'a str, owner: &'a str, kind: &'a str, seed: u8) -> Img<'a> {
        Img {
            name,
            owner,
            kind,
            shares: &[],
            blocks: vec![Some(block(seed)), None, Some(block(seed.wrapping_add(1)))],
            flip: false,
            protected: false,
        }
    }
}

/// A 4 KiB block of a pattern.
fn block(seed: u8) -> Vec<u8> {
    (0..CHUNK_SIZE)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Writes an image's manifest (version 0) on `store`; returns its id.
fn put_manifest(store: &MemoryStore, img: &Img) -> String {
    let id = crate::ids::ImageId::generate();
    let mut content = Vec::new();
    let mut runs: Vec<(u64, Vec<ChunkHash>)> = Vec::new();
    for (i, b) in img.blocks.iter().enumerate() {
        let Some(b) = b else {
            content.extend_from_slice(&[0; CHUNK_SIZE]);
            continue;
        };
        content.extend_from_slice(b);
        match runs.last_mut() {
            Some((s, h)) if *s + h.len() as u64 == i as u64 => h.push(ChunkHash::of(b)),
            _ => runs.push((i as u64, vec![ChunkHash::of(b)])),
        }
    }
    let meta = ManifestMeta {
        id: id.to_string(),
        name: img.name.into(),
        kind: img.kind.into(),
        owner: img.owner.into(),
        virtual_size: content.len() as u64,
        content_digest: blake3::hash(&content).to_hex().to_string(),
        protected: img.protected,
        shares: img
            .shares
            .iter()
            .map(|a| ManifestShare {
                account: (*a).into(),
                created_at: 0,
            })
            .collect(),
        ..Default::default()
    };
    let m = crate::format::Manifest {
        seq: 0,
        meta,
        map: HashBlockMap {
            nblocks: img.blocks.len() as u64,
            runs,
        },
    };
    let bytes = crate::format::encode_manifest(&m);
    store
        .put(ObjectKind::Manifest, &Remote::manifest_name(&id, 0), &bytes)
        .unwrap();
    id.to_string()
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("depot");
        let store = MemoryStore::default();
        let depot = Depot::open(&root).unwrap();
        depot
            .add_remote_on("r", "s3://bucket/p", Some("http://x"), None, &store)
            .unwrap();
        let remote = depot.remote_on("r", Arc::new(store.clone()));
        Fixture {
            _dir: dir,
            root,
            store,
            remote,
        }
    }

    fn depot(&self, account: &str) -> Depot {
        Depot::open(&self.root)
            .unwrap()
            .with_account(account)
            .unwrap()
    }

    /// Writes a pack (and its index) holding the image's stored blocks;
    /// returns the pack's name.
    fn pack(&self, img: &Img) -> String {
        let name = new_pack_name();
        let mut data = Vec::new();
        let mut hashes = Vec::new();
        for b in img.blocks.iter().flatten() {
            hashes.push(ChunkHash::of(b));
            data.extend_from_slice(b);
        }
        if img.flip {
            data[100] ^= 1;
        }
        let mut w = PackWriter::create(&self.store, &name).unwrap();
        w.append(&compress_frame(&data, 3).unwrap(), &hashes)
            .unwrap();
        w.seal().unwrap();
        name
    }

    /// Writes the image's manifest (version 0); returns its id.
    fn manifest(&self, img: &Img) -> String {
        put_manifest(&self.store, img)
    }

    /// A pushed image: its pack, then its manifest; returns (id, pack).
    fn push(&self, img: &Img) -> (String, String) {
        let pack = self.pack(img);
        (self.manifest(img), pack)
    }

    /// A manifest object of a new image id that does not decode.
    fn garbage_manifest(&self) -> crate::ids::ImageId {
        let id = crate::ids::ImageId::generate();
        let name = Remote::manifest_name(&id, 0);
        self.store
            .put(ObjectKind::Manifest, &name, b"garbage")
            .unwrap();
        id
    }

    fn gc(&self, dry_run: bool) -> RemoteGcReport {
        self.remote.gc(dry_run, false, GRACE).unwrap()
    }

    fn listed(&self, kind: ObjectKind, name: &str) -> bool {
        self.store
            .list(kind)
            .unwrap()
            .iter()
            .any(|o| o.name == name)
    }
}

// ---- config ----

#[test]
fn remote_names_are_checked() {
    for ok in ["a", "r1", "eu-west_2", &"x".repeat(63)] {
        assert!(check_remote_name(ok).is_ok(), "{ok}");
    }
    for bad in ["", "R", "-a", "_a", "a:b", "a/b", "a.b", &"x".repeat(64)] {
        assert!(check_remote_name(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn config_is_private_listed_and_removed() {
    let f = Fixture::new();
    let depot = f.depot("alice");
    let path = f.root.join("remotes/r.json");
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let list = depot.remotes().unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].url, "s3://bucket/p");
    assert_eq!(list[0].endpoint.as_deref(), Some("http://x"));
    // the marker was written on the empty prefix
    assert!(f.listed(ObjectKind::Meta, REMOTE_MARKER));
    // the name is taken; another name over the same prefix is fine (marker valid)
    let e = depot
        .add_remote_on("r", "s3://bucket/p", None, None, &f.store)
        .unwrap_err();
    assert!(e.to_string().contains("exists already"), "{e}");
    depot
        .add_remote_on("r2", "s3://bucket/p", None, None, &f.store)
        .unwrap();
    assert_eq!(depot.remote_reference("r2:img"), Some(("r2", "img")));
    assert_eq!(depot.remote_reference("nope:img"), None);
    assert_eq!(depot.remote_reference("img"), None);
    // removing forgets the config and the cache, not the remote
    std::fs::create_dir_all(f.root.join("remotes/r2/indexes")).unwrap();
    depot.remove_remote("r2").unwrap();
    assert!(!f.root.join("remotes/r2").exists());
    assert!(!f.root.join("remotes/r2.json").exists());
    assert!(f.listed(ObjectKind::Meta, REMOTE_MARKER));
    assert!(depot.remove_remote("r2").is_err());
}

#[test]
fn a_bad_config_file_is_named() {
    let f = Fixture::new();
    let path = f.root.join("remotes/bad.json");
    std::fs::write(&path, b"{not json").unwrap();
    let e = f.depot("alice").remotes().unwrap_err().to_string();
    assert!(e.contains("remotes/bad.json"), "{e}");
    std::fs::write(
        &path,
        br#"{"name":"other","url":"s3://b","endpoint":null,"region":null,"added_at":0}"#,
    )
    .unwrap();
    let e = f.depot("alice").remote_info("bad").unwrap_err().to_string();
    assert!(e.contains("it names remote \"other\""), "{e}");
}

#[test]
fn a_prefix_of_something_else_is_refused() {
    let f = Fixture::new();
    let depot = f.depot("alice");
    let other = MemoryStore::default();
    other.put(ObjectKind::Pack, "somefile", b"x").unwrap();
    let e = depot
        .add_remote_on("o", "s3://b/x", None, None, &other)
        .unwrap_err();
    assert_eq!(e.exit_code(), 8);
    assert!(e.to_string().contains("no VMDEPOT marker"), "{e}");
    let foreign = MemoryStore::default();
    foreign
        .put(
            ObjectKind::Meta,
            REMOTE_MARKER,
            br#"{"format":"restic","version":1}"#,
        )
        .unwrap();
    let e = depot
        .add_remote_on("o", "s3://b/x", None, None, &foreign)
        .unwrap_err();
    assert!(e.to_string().contains("format \"restic\""), "{e}");
    let newer = MemoryStore::default();
    newer
        .put(
            ObjectKind::Meta,
            REMOTE_MARKER,
            br#"{"format":"vmdepot remote","version":2}"#,
        )
        .unwrap();
    let e = depot
        .add_remote_on("o", "s3://b/x", None, None, &newer)
        .unwrap_err();
    assert!(e.to_string().contains("newer vmdepot"), "{e}");
    assert!(!f.root.join("remotes/o.json").exists());
}

// ---- access ----

#[test]
fn the_local_rules_apply_to_remote_images() {
    let f = Fixture::new();
    let mut shared = Img::new("mine", "alice", "custom", 1);
    shared.shares = &["bob"];
    f.push(&shared);
    f.push(&Img::new("pub", "alice", "public", 20));
    f.push(&Img::new("carols", "carol", "custom", 30));
    let l = f.remote.images().unwrap();
    let r = &f.remote;
    // the owner may do anything
    r.find(&l, "mine", "alice", Op::Delete).unwrap();
    // everyone sees a public image, only its owner deletes it
    r.find(&l, "pub", "bob", Op::Copy).unwrap();
    let e = r.find(&l, "pub", "bob", Op::Delete).unwrap_err();
    assert_eq!(e.exit_code(), 7);
    assert!(e.to_string().contains("on remote r"), "{e}");
    // a shared image: launch only
    r.find(&l, "mine", "bob", Op::Launch).unwrap();
    let e = r.find(&l, "mine", "bob", Op::Copy).unwrap_err().to_string();
    assert!(e.contains("shared with you by alice"), "{e}");
    // another's custom image does not exist for bob
    let e = r.find(&l, "carols", "bob", Op::Show).unwrap_err();
    assert!(
        matches!(&e, crate::Error::RemoteImageNotFound { remote, image } if remote == "r" && image == "carols"),
        "{e}"
    );
    // a name two visible images have is ambiguous
    f.push(&Img::new("pub", "bob", "custom", 40));
    let l = f.remote.images().unwrap();
    let e = r.find(&l, "pub", "bob", Op::Show).unwrap_err();
    assert!(matches!(e, crate::Error::AmbiguousName { .. }), "{e}");
    // alice does not see bob's custom image of that name
    r.find(&l, "pub", "alice", Op::Show).unwrap();
}

// ---- listing, delete ----

#[test]
fn a_damaged_manifest_is_named_and_hides_nothing_else() {
    let f = Fixture::new();
    let (id, _) = f.push(&Img::new("a", "alice", "custom", 1));
    f.push(&Img::new("b", "alice", "custom", 20));
    let bad = f.garbage_manifest();
    let (list, damaged) = f.remote.list_images("alice").unwrap();
    let names: Vec<&str> = list.iter().map(|i| i.name.as_str()).collect();
    assert_eq!(names.len(), 2);
    assert!(names.contains(&"a") && names.contains(&"b"));
    assert_eq!(damaged.len(), 1);
    let hint = format!("`vmdepot image delete r:{bad}`");
    assert!(damaged[0].contains(&hint), "{}", damaged[0]);
    // its id names the damage; a name no image has says where to look
    let e = f.remote.show(bad.as_str(), "alice").unwrap_err();
    assert_eq!(e.exit_code(), 5);
    assert!(
        e.to_string().contains(&format!("{bad}.0.manifest")) && e.to_string().contains(&hint),
        "{e}"
    );
    let e = f.remote.show("nope", "alice").unwrap_err();
    assert_eq!(e.exit_code(), 3);
    assert!(
        e.to_string().contains("`vmdepot image list --remote r`"),
        "{e}"
    );
    let a = list.iter().find(|i| i.id == id).unwrap();
    assert_eq!(a.state, crate::depot::ImageState::Available);
    assert_eq!(a.virtual_size, 3 * CHUNK_SIZE as u64);
    assert!(a.unique_stored_bytes > 0);
    assert_eq!(f.remote.show("a", "alice").unwrap().id, id);
    assert!(f.remote.list_images("bob").unwrap().0.is_empty());
}

#[test]
fn delete_retires_every_version_for_its_owner_only() {
    let f = Fixture::new();
    let (id, _) = f.push(&Img::new("a", "alice", "public", 1));
    let mut p = Img::new("p", "alice", "custom", 20);
    p.protected = true;
    f.push(&p);
    let e = f
        .depot("bob")
        .delete_remote_image(&f.remote, "a")
        .unwrap_err();
    assert_eq!(e.exit_code(), 7);
    let e = f
        .depot("alice")
        .delete_remote_image(&f.remote, "p")
        .unwrap_err();
    assert!(e.to_string().contains("protected"), "{e}");
    let info = f
        .depot("alice")
        .delete_remote_image(&f.remote, "a")
        .unwrap();
    assert_eq!(info.id, id);
    let l = f.remote.images().unwrap();
    assert!(!l.images.contains_key(&id));
    let obj = format!("{id}.0.manifest");
    assert!(
        f.store.holds(ObjectKind::Manifest, &obj),
        "retired, not purged"
    );
    // an image no version of which verifies: deleted by its id
    let bad = f.garbage_manifest();
    let name = Remote::manifest_name(&bad, 0);
    let info = f
        .depot("bob")
        .delete_remote_image(&f.remote, bad.as_str())
        .unwrap();
    assert_eq!(info.state, crate::depot::ImageState::Damaged);
    assert!(!f.listed(ObjectKind::Manifest, &name));
}

// ---- verify ----

#[test]
fn verify_rehashes_every_chunk_and_the_digest() {
    let f = Fixture::new();
    f.push(&Img::new("a", "alice", "custom", 1));
    let l = f.remote.images().unwrap();
    let img = f.remote.find(&l, "a", "alice", Op::Verify).unwrap();
    let rep = f.remote.verify_image(&img, &NoProgress).unwrap();
    assert_eq!((rep.images, rep.chunks), (1, 2));
}

#[test]
fn verify_names_the_pack_and_offset_of_a_flipped_byte() {
    let f = Fixture::new();
    let mut bad = Img::new("a", "alice", "custom", 1);
    bad.flip = true;
    let (_, pack) = f.push(&bad);
    let l = f.remote.images().unwrap();
    let img = f.remote.find(&l, "a", "alice", Op::Verify).unwrap();
    let e = f.remote.verify_image(&img, &NoProgress).unwrap_err();
    assert_eq!(e.exit_code(), 5);
    let e = e.to_string();
    assert!(e.contains(&pack) && e.contains("offset 16"), "{e}");
}

#[test]
fn verify_names_the_block_of_a_missing_pack() {
    let f = Fixture::new();
    let (_, pack) = f.push(&Img::new("a", "alice", "custom", 1));
    f.store.delete(ObjectKind::Pack, &pack).unwrap();
    let l = f.remote.images().unwrap();
    let img = f.remote.find(&l, "a", "alice", Op::Verify).unwrap();
    let e = f
        .remote
        .verify_image(&img, &NoProgress)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("byte offset 0") && e.contains("in no pack"),
        "{e}"
    );
}

// ---- gc ----

#[test]
fn gc_retires_old_dead_packs_then_purges_them_after_grace() {
    let f = Fixture::new();
    let (id, pack) = f.push(&Img::new("a", "alice", "custom", 1));
    let (_, kept) = f.push(&Img::new("b", "alice", "custom", 20));
    f.depot("alice")
        .delete_remote_image(&f.remote, &id)
        .unwrap();
    // young: kept
    let r = f.gc(false);
    assert_eq!(r.packs_retired, 0);
    assert!(f.listed(ObjectKind::Pack, &pack));
    f.store.advance(GRACE + HOUR);
    let r = f.gc(false);
    assert_eq!((r.packs_retired, r.indexes_retired), (1, 1));
    assert!(!f.listed(ObjectKind::Pack, &pack) && f.store.holds(ObjectKind::Pack, &pack));
    assert!(f.listed(ObjectKind::Pack, &kept), "a live pack stays");
    // the manifest's tombstone is older than grace: purged now
    assert_eq!(r.manifests_purged, 1);
    // the pack's tombstone is young: its bytes stay for readers
    assert_eq!(r.packs_purged, 0);
    f.store.advance(GRACE + HOUR);
    let r = f.gc(false);
    assert_eq!((r.packs_purged, r.indexes_purged), (1, 1));
    assert!(r.bytes_freed > 0);
    assert!(!f.store.holds(ObjectKind::Pack, &pack));
    assert!(!f.store.holds(ObjectKind::PackIndex, &pack));
    assert!(!f.listed(ObjectKind::Meta, GC_LOCK), "the lock is released");
    let l = f.remote.images().unwrap();
    let img = f.remote.find(&l, "b", "alice", Op::Verify).unwrap();
    f.remote.verify_image(&img, &NoProgress).unwrap();
}

#[test]
fn gc_revives_a_retired_pack_a_later_manifest_names() {
    let f = Fixture::new();
    let a = Img::new("a", "alice", "custom", 1);
    let (id, pack) = f.push(&a);
    f.depot("alice")
        .delete_remote_image(&f.remote, &id)
        .unwrap();
    f.store.advance(GRACE + HOUR);
    assert_eq!(f.gc(false).packs_retired, 1);
    // a push that planned before the retirement writes its manifest now
    f.manifest(&Img::new("a2", "alice", "custom", 1));
    let r = f.gc(false);
    assert_eq!((r.packs_revived, r.indexes_revived), (1, 1));
    assert!(f.listed(ObjectKind::Pack, &pack) && f.listed(ObjectKind::PackIndex, &pack));
    f.store.advance(GRACE + HOUR);
    let r = f.gc(false);
    assert_eq!((r.packs_retired, r.packs_purged), (0, 0));
    let l = f.remote.images().unwrap();
    let img = f.remote.find(&l, "a2", "alice", Op::Verify).unwrap();
    f.remote.verify_image(&img, &NoProgress).unwrap();
}

#[test]
fn gc_retires_a_pack_without_index_and_an_index_without_pack_after_grace() {
    let f = Fixture::new();
    let torn = new_pack_name();
    f.store
        .put(ObjectKind::Pack, &torn, b"half a push")
        .unwrap();
    let (id, lone) = f.push(&Img::new("a", "alice", "custom", 1));
    f.depot("alice")
        .delete_remote_image(&f.remote, &id)
        .unwrap();
    f.store.delete(ObjectKind::Pack, &lone).unwrap();
    f.store.purge(Duration::ZERO).unwrap();
    assert!(f.listed(ObjectKind::PackIndex, &lone));
    let r = f.gc(false);
    assert_eq!((r.packs_retired, r.indexes_retired), (0, 0));
    f.store.advance(GRACE + HOUR);
    let r = f.gc(false);
    assert_eq!((r.packs_retired, r.indexes_retired), (1, 1));
    assert!(!f.listed(ObjectKind::Pack, &torn));
    assert!(!f.listed(ObjectKind::PackIndex, &lone));
}

#[test]
fn gc_refuses_a_held_lock_unless_broken_and_takes_a_stale_one() {
    let f = Fixture::new();
    let lock = br#"{"host":"h1","pid":42,"started_at":0,"token":"t"}"#;
    f.store.put(ObjectKind::Meta, GC_LOCK, lock).unwrap();
    let e = f.remote.gc(false, false, GRACE).unwrap_err();
    assert_eq!(e.exit_code(), 4);
    let e = e.to_string();
    assert!(
        e.contains("\"h1\"") && e.contains("pid 42") && e.contains("--break-lock"),
        "{e}"
    );
    let r = f.remote.gc(false, true, GRACE).unwrap();
    assert!(r.lock_broken);
    assert!(!f.listed(ObjectKind::Meta, GC_LOCK));
    // a lock older than an hour is a dead gc's
    f.store.put(ObjectKind::Meta, GC_LOCK, lock).unwrap();
    f.store.advance(2 * HOUR);
    assert!(f.remote.gc(false, false, GRACE).unwrap().lock_broken);
    // a dry run takes no lock and ignores one
    f.store.put(ObjectKind::Meta, GC_LOCK, lock).unwrap();
    f.remote.gc(true, false, GRACE).unwrap();
}

#[test]
fn gc_dry_run_changes_nothing() {
    let f = Fixture::new();
    let (id, _) = f.push(&Img::new("a", "alice", "custom", 1));
    f.push(&Img::new("b", "alice", "custom", 20));
    f.depot("alice")
        .delete_remote_image(&f.remote, &id)
        .unwrap();
    f.store.advance(GRACE + HOUR);
    let state = |s: &MemoryStore| {
        let mut v = Vec::new();
        for k in ObjectKind::ALL {
            let mut l = s.list(k).unwrap();
            l.extend(s.retired(k).unwrap());
            l.sort_by(|a, b| a.name.cmp(&b.name));
            v.push(l);
        }
        v
    };
    let before = state(&f.store);
    let r = f.gc(true);
    assert!(r.dry_run);
    assert_eq!((r.packs_retired, r.manifests_purged), (1, 1));
    assert_eq!(state(&f.store), before);
    let real = f.gc(false);
    assert_eq!((real.packs_retired, real.manifests_purged), (1, 1));
}

#[test]
fn gc_refuses_while_a_manifest_does_not_verify() {
    let f = Fixture::new();
    let (id, pack) = f.push(&Img::new("a", "alice", "custom", 1));
    f.depot("alice")
        .delete_remote_image(&f.remote, &id)
        .unwrap();
    let bad = f.garbage_manifest();
    f.store.advance(GRACE + HOUR);
    let e = f.remote.gc(false, false, GRACE).unwrap_err();
    assert_eq!(e.exit_code(), 5, "damage");
    assert!(
        e.to_string().contains(&format!("image delete r:{bad}")),
        "{e}"
    );
    assert!(f.listed(ObjectKind::Pack, &pack));
    assert!(!f.listed(ObjectKind::Meta, GC_LOCK), "released on error");
}

/// The stranger's interleaving: gc C lists (step 2), then stalls past
/// `grace`;
/// meanwhile gc B retires y's packs (y was deleted) and a push that
/// planned before that retirement writes combo, which names y's chunks.
/// C then purges only what its own listing showed retired before
/// `t0 - grace` (x's old pack), never B's young tombstones.
#[test]
fn a_stalled_gc_purges_only_what_it_listed() {
    let f = Fixture::new();
    let alice = f.depot("alice");
    let (x, x_pack) = f.push(&Img::new("x", "alice", "custom", 1));
    alice.delete_remote_image(&f.remote, &x).unwrap();
    f.store.advance(GRACE + HOUR);
    assert_eq!(f.gc(false).packs_retired, 1);
    let (y, y_pack) = f.push(&Img::new("y", "alice", "custom", 20));
    f.store.advance(GRACE + HOUR);
    alice.delete_remote_image(&f.remote, &y).unwrap();

    let (store, remote_b) = (
        f.store.clone(),
        alice.remote_on("r", Arc::new(f.store.clone())),
    );
    // gc C stops right after listing the manifests (C is the next to list)
    f.store.after_first_list(ObjectKind::Manifest, move || {
        let b = remote_b.gc(false, true, GRACE).unwrap();
        assert_eq!((b.packs_retired, b.packs_purged), (1, 1), "y's; x's");
        // the push that planned before that, reusing y's pack
        put_manifest(&store, &Img::new("combo", "alice", "custom", 20));
        store.advance(GRACE + HOUR);
    });
    let c = alice
        .remote_on("r", Arc::new(f.store.clone()))
        .gc(false, true, GRACE)
        .unwrap();
    // C listed x's pack as due, but B purged it first: C counts only what
    // it really purged
    assert_eq!((c.packs_purged, c.indexes_purged), (0, 0), "{c:?}");
    assert!(!f.store.holds(ObjectKind::Pack, &x_pack));
    assert!(
        f.store.holds(ObjectKind::Pack, &y_pack),
        "B's tombstone is not C's to purge"
    );

    // the next gc sees combo's manifest and revives y's pack
    assert_eq!(f.gc(false).packs_revived, 1);
    let l = f.remote.images().unwrap();
    let img = f.remote.find(&l, "combo", "alice", Op::Verify).unwrap();
    f.remote.verify_image(&img, &NoProgress).unwrap();
}

#[test]
fn every_open_checks_the_marker() {
    let f = Fixture::new();
    let url = "s3://bucket/p";
    super::config::check_opened(&f.store, "r", url).unwrap();
    let replace = |bytes: &[u8]| {
        f.store.delete(ObjectKind::Meta, REMOTE_MARKER).unwrap();
        f.store.purge(Duration::ZERO).unwrap();
        f.store.put(ObjectKind::Meta, REMOTE_MARKER, bytes).unwrap();
    };
    replace(br#"{"format":"restic","version":1}"#);
    let e = super::config::check_opened(&f.store, "r", url).unwrap_err();
    assert_eq!(e.exit_code(), 8);
    assert!(e.to_string().contains("\"restic\""), "{e}");
    replace(br#"{"format":"vmdepot remote","version":2,"created_at":0}"#);
    let e = super::config::check_opened(&f.store, "r", url).unwrap_err();
    assert!(e.to_string().contains("use a newer vmdepot"), "{e}");
    replace(b"garbage");
    let e = super::config::check_opened(&f.store, "r", url).unwrap_err();
    assert!(e.to_string().contains("not a vmdepot remote"), "{e}");
    f.store.delete(ObjectKind::Meta, REMOTE_MARKER).unwrap();
    let e = super::config::check_opened(&f.store, "r", url).unwrap_err();
    assert!(e.to_string().contains("no marker"), "{e}");
}

#[test]
fn an_index_retired_since_the_listing_counts_as_absent() {
    let f = Fixture::new();
    let (_, pack) = f.push(&Img::new("a", "alice", "custom", 1));
    f.push(&Img::new("b", "alice", "custom", 20));
    let mem = f.store.clone();
    let gone = pack.clone();
    let remote = f.depot("alice").remote_on("r", Arc::new(f.store.clone()));
    f.store.after_first_list(ObjectKind::PackIndex, move || {
        mem.delete(ObjectKind::PackIndex, &gone).unwrap();
    });
    let map = remote.chunk_map().unwrap();
    assert_eq!(map.len(), 2, "b's chunks only");
    assert!(!map.packs.contains_key(&pack));
}
