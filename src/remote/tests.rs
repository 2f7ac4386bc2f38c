//! Push and pull between real depots in a temporary directory through a
//! [`MemoryStore`] remote: round trips, dedup both ways, a push killed
//! midway and resumed, damaged remote bytes, retired packs, access rules,
//! hostile manifests and index locations.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::fetch::plan_reads;
use super::pull::check_pulled;
use super::push::PushLimits;
use super::{Remote, RemoteImage};
use crate::depot::{Depot, ImageKind, ImportOptions};
use crate::error::Error;
use crate::format::{IndexFrame, PackIndex, CHUNK_SIZE, PACK_TARGET_BYTES};
use crate::ids::ChunkHash;
use crate::image::export::ExportFormat;
use crate::progress::{NoProgress, Progress};
use crate::store::{MemoryStore, ObjectKind, ObjectStore};

/// MiB of incompressible data, from `seed`.
fn noise(seed: &str, mib: usize) -> Vec<u8> {
    let mut v = vec![0; mib << 20];
    blake3::Hasher::new()
        .update(seed.as_bytes())
        .finalize_xof()
        .fill(&mut v);
    v
}

/// 4 MiB of data then 1 MiB of zeros (1024 chunks, 4 frames).
fn base_disk() -> Vec<u8> {
    let mut v = noise("base", 4);
    v.resize(5 << 20, 0);
    v
}

/// The base disk with `n` of its chunks changed.
fn related_disk(n: usize) -> Vec<u8> {
    let mut v = base_disk();
    for i in 0..n {
        v[i * 97 * CHUNK_SIZE] ^= 0x5a;
    }
    v
}

struct Env {
    dir: tempfile::TempDir,
    mem: MemoryStore,
}

impl Env {
    fn new() -> Env {
        Env {
            dir: tempfile::tempdir().unwrap(),
            mem: MemoryStore::default(),
        }
    }

    fn depot(&self, name: &str, account: &str) -> Depot {
        Depot::open(self.dir.path().join(name))
            .unwrap()
            .with_account(account)
            .unwrap()
    }

    /// The remote as `depot` sees it, over `store`.
    fn remote_over(&self, depot: &Depot, store: Arc<dyn ObjectStore>) -> Remote {
        let cache = depot.root().join("remotes/r");
        Remote::new("r", store, cache, depot.perms())
    }

    fn remote(&self, depot: &Depot) -> Remote {
        self.remote_over(depot, Arc::new(self.mem.clone()))
    }

    fn import(&self, depot: &Depot, name: &str, content: &[u8]) -> String {
        let f = self.dir.path().join(format!("{name}.raw"));
        std::fs::write(&f, content).unwrap();
        depot
            .import(&f, &ImportOptions::new(name), &NoProgress)
            .unwrap()
            .id
    }

    fn export(&self, depot: &Depot, image: &str) -> Vec<u8> {
        let out: PathBuf = self.dir.path().join("out.raw");
        depot
            .export(image, &out, ExportFormat::Raw, &NoProgress)
            .unwrap();
        std::fs::read(&out).unwrap()
    }
}

/// Small packs, so that an image spans several.
fn small_packs() -> PushLimits {
    PushLimits {
        grace: Duration::from_secs(3600),
        pack_target: 256 << 10,
    }
}

fn listed(remote: &Remote, id: &str) -> RemoteImage {
    let listing = remote.images().unwrap();
    remote.load(&listing.images[id]).unwrap()
}

/// Counts what a transfer (phase push or pull) announces and what it
/// reports done; other phases (a pull's verify) are not counted.
#[derive(Default)]
struct Counted {
    total: AtomicUsize,
    done: AtomicUsize,
    counting: std::sync::atomic::AtomicBool,
}

impl Progress for Counted {
    fn begin(&self, phase: &str, total: u64) {
        let transfer = phase == "push" || phase == "pull";
        self.counting.store(transfer, Ordering::SeqCst);
        if transfer {
            self.total.store(total as usize, Ordering::SeqCst);
        }
    }
    fn advance(&self, n: u64) {
        if self.counting.load(Ordering::SeqCst) {
            self.done.fetch_add(n as usize, Ordering::SeqCst);
        }
    }
    fn end(&self) {}
}

impl Counted {
    fn both(&self) -> (usize, usize) {
        (
            self.total.load(Ordering::SeqCst),
            self.done.load(Ordering::SeqCst),
        )
    }
}

#[test]
fn push_then_pull_into_an_empty_depot_gives_the_same_bytes() {
    let env = Env::new();
    let a = env.depot("a", "alice");
    let content = base_disk();
    let id = env.import(&a, "base", &content);
    let ra = env.remote(&a);
    let push = a.push_image(&ra, "base", None, &NoProgress).unwrap();
    assert_eq!(
        (push.chunks, push.chunks_sent, push.chunks_present),
        (1024, 1024, 0)
    );
    // The 4 local frames of 256 chunks are recompressed into remote
    // frames of REMOTE_FRAME_CHUNKS (64), which the pull takes whole.
    assert_eq!(push.frames_whole, 0);
    assert!(push.bytes_sent >= 4 << 20 && push.packs == 1 && !push.already);

    let b = env.depot("b", "alice");
    let rb = env.remote(&b);
    let img = listed(&rb, &id);
    let progress = Counted::default();
    let pull = b.pull_image(&rb, &img, None, &progress).unwrap();
    assert_eq!(progress.both(), (4 << 20, 4 << 20));
    assert_eq!((pull.chunks_fetched, pull.chunks_present), (1024, 0));
    assert_eq!(
        pull.frames_whole,
        1024 / crate::format::REMOTE_FRAME_CHUNKS as u64
    );
    assert!(pull.gets >= 1 && pull.bytes_fetched >= 4 << 20);
    let local = &pull.image;
    assert_ne!(local.id, id);
    assert_eq!(
        local.content_digest,
        a.image("base").unwrap().content_digest
    );
    assert_eq!(local.parent.as_deref(), Some(id.as_str()));
    assert_eq!(local.copied_from, Some(format!("remote:r {id}")));
    assert_eq!(env.export(&b, &local.id), content);
    b.verify(Some(&local.id), &NoProgress).unwrap();
    assert_eq!(b.local_copy(&rb, &img).unwrap().unwrap().id, local.id);
    // on the pushing host: the original itself
    assert_eq!(a.local_copy(&ra, &img).unwrap().unwrap().id, id);
}

#[test]
fn only_missing_chunks_travel_both_ways() {
    let env = Env::new();
    let a = env.depot("a", "alice");
    env.import(&a, "base", &base_disk());
    let b2 = related_disk(10);
    let id2 = env.import(&a, "b2", &b2);
    let ra = env.remote(&a);
    a.push_image(&ra, "base", None, &NoProgress).unwrap();
    let push = a.push_image(&ra, "b2", None, &NoProgress).unwrap();
    assert!(push.chunks_sent * 10 < push.chunks, "{push:?}");
    assert_eq!(push.chunks_sent, 10);
    let again = a.push_image(&ra, "b2", None, &NoProgress).unwrap();
    assert!(again.already && again.chunks_sent == 0 && again.bytes_sent == 0);

    // a host that holds the base fetches only what b2 adds
    let b = env.depot("b", "alice");
    env.import(&b, "base", &base_disk());
    let rb = env.remote(&b);
    let pull = b
        .pull_image(&rb, &listed(&rb, &id2), Some("mine"), &NoProgress)
        .unwrap();
    assert_eq!((pull.chunks_fetched, pull.chunks_present), (10, 1014));
    assert_eq!(pull.image.name, "mine");
    assert_eq!(env.export(&b, "mine"), b2);
}

#[test]
fn a_push_sends_what_the_first_lazy_run_read_first_in_frames_of_its_own() {
    let env = Env::new();
    let a = env.depot("a", "alice");
    let content = base_disk();
    let id = env.import(&a, "base", &content);
    // The read profile a lazy run of it records (image::profile).
    let read = [900u64, 10, 500, 11, 10];
    {
        let id = crate::ids::ImageId::parse(&id).unwrap();
        let mut r = crate::image::profile::Recorder::new(a.root(), &id, a.perms()).unwrap();
        r.note(read);
    }
    let ra = env.remote(&a);
    let push = a.push_image(&ra, "base", None, &NoProgress).unwrap();
    assert_eq!((push.chunks_sent, push.chunks_read_first), (1024, 4));
    let map = ra.chunk_map().unwrap();
    let loc = |b: u64| {
        let b = b as usize * CHUNK_SIZE;
        map.get(&ChunkHash::of(&content[b..b + CHUNK_SIZE]))
            .unwrap()
            .clone()
    };
    let first = loc(900);
    assert_eq!(
        (first.nchunks, first.slot),
        (4, 0),
        "one frame of the 4 read first"
    );
    for (b, slot) in [(10, 1), (11, 2), (500, 3)] {
        let l = loc(b);
        assert_eq!(
            (&l.pack, l.offset, l.slot),
            (&first.pack, first.offset, slot),
            "block {b}"
        );
    }
    // the others follow, in frames of up to 64, map order
    let (l0, l1) = (loc(0), loc(1));
    assert_eq!((l0.offset, l0.slot, l1.slot), (l1.offset, 0, 1));
    assert_ne!(l0.offset, first.offset);
    let b = env.depot("b", "alice");
    let rb = env.remote(&b);
    let pull = b
        .pull_image(&rb, &listed(&rb, &id), None, &NoProgress)
        .unwrap();
    assert_eq!(env.export(&b, &pull.image.id), content);
}

#[test]
fn a_push_that_dies_midway_leaves_no_image_and_resumes() {
    let env = Env::new();
    let a = env.depot("a", "alice");
    let id = env.import(&a, "base", &base_disk());
    env.mem.fail_nth_put(ObjectKind::PackIndex, 3);
    let ra = env.remote(&a);
    let err = a
        .push_within(&ra, "base", None, &NoProgress, &small_packs())
        .unwrap_err();
    assert!(err.to_string().contains("injected"), "{err}");
    let ra = env.remote(&a);
    let listing = ra.images().unwrap();
    assert!(listing.images.is_empty() && listing.damaged.is_empty());
    assert_eq!(ra.store().list(ObjectKind::Pack).unwrap().len(), 3);

    // two packs and their indexes count; the third (no index) is sent again
    let held = ra.chunk_map().unwrap().len() as u64;
    assert!(held > 0 && held < 1024, "{held}");
    let push = a
        .push_within(&ra, "base", None, &NoProgress, &small_packs())
        .unwrap();
    assert_eq!((push.chunks_present, push.chunks_sent), (held, 1024 - held));
    assert!(push.packs >= 1);
    let b = env.depot("b", "alice");
    let rb = env.remote(&b);
    let pull = b
        .pull_image(&rb, &listed(&rb, &id), None, &NoProgress)
        .unwrap();
    assert_eq!(env.export(&b, &pull.image.id), base_disk());
}

#[test]
fn a_push_past_half_the_grace_writes_no_manifest() {
    let env = Env::new();
    let a = env.depot("a", "alice");
    env.import(&a, "base", &base_disk());
    let ra = env.remote(&a);
    let limits = PushLimits {
        grace: Duration::ZERO,
        pack_target: PACK_TARGET_BYTES,
    };
    let err = a
        .push_within(&ra, "base", None, &NoProgress, &limits)
        .unwrap_err();
    assert!(err.to_string().contains("run the push again"), "{err}");
    assert!(ra.images().unwrap().images.is_empty());
    let push = a.push_image(&ra, "base", None, &NoProgress).unwrap();
    assert_eq!((push.chunks_present, push.chunks_sent), (1024, 0));
}

/// Flips one byte of every pack on the remote (its index left as it was).
fn damage_packs(mem: &MemoryStore) {
    for o in mem.list(ObjectKind::Pack).unwrap() {
        let mut bytes = mem.get(ObjectKind::Pack, &o.name).unwrap().unwrap();
        bytes[o.size as usize / 2] ^= 0x01;
        mem.delete(ObjectKind::Pack, &o.name).unwrap();
        mem.purge(Duration::ZERO).unwrap();
        mem.put(ObjectKind::Pack, &o.name, &bytes).unwrap();
    }
}

#[test]
fn altered_remote_bytes_fail_the_pull_and_leave_no_image() {
    let env = Env::new();
    let a = env.depot("a", "alice");
    let id = env.import(&a, "base", &base_disk());
    let ra = env.remote(&a);
    a.push_image(&ra, "base", None, &NoProgress).unwrap();
    damage_packs(&env.mem);
    let b = env.depot("b", "alice");
    let rb = env.remote(&b);
    let err = b
        .pull_image(&rb, &listed(&rb, &id), None, &NoProgress)
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::StoreDamaged(_)), "{msg}");
    assert!(
        msg.contains("remote r")
            && msg.contains("memory:Pack/")
            && msg.contains("offset")
            && msg.contains(&id),
        "{msg}"
    );
    assert!(b.list_images().unwrap().is_empty());
}

#[test]
fn chunks_of_retired_packs_are_sent_again() {
    let env = Env::new();
    let a = env.depot("a", "alice");
    env.import(&a, "base", &base_disk());
    env.import(&a, "b2", &related_disk(10));
    let ra = env.remote(&a);
    a.push_image(&ra, "base", None, &NoProgress).unwrap();
    for o in env.mem.list(ObjectKind::Pack).unwrap() {
        env.mem.delete(ObjectKind::Pack, &o.name).unwrap();
    }
    let push = a.push_image(&ra, "b2", None, &NoProgress).unwrap();
    assert_eq!((push.chunks_present, push.chunks_sent), (0, 1024));
}

#[test]
fn push_needs_the_right_to_copy() {
    let env = Env::new();
    let a = env.depot("a", "alice");
    let id = env.import(&a, "base", &base_disk());
    a.share_image("base", "bob").unwrap();
    let bob = env.depot("a", "bob");
    let rbob = env.remote(&bob);
    let shared = bob.push_image(&rbob, &id, None, &NoProgress).unwrap_err();
    assert!(matches!(shared, Error::NotPermitted(_)), "{shared}");
    let carol = env.depot("a", "carol");
    let unseen = carol
        .push_image(&env.remote(&carol), &id, None, &NoProgress)
        .unwrap_err();
    assert!(matches!(unseen, Error::ImageNotFound(_)), "{unseen}");
    a.repo
        .conn
        .execute(
            "UPDATE images SET restricted_from = 'dave img-0' WHERE id = ?1",
            [&id],
        )
        .unwrap();
    let launch_only = a
        .push_image(&env.remote(&a), &id, None, &NoProgress)
        .unwrap_err();
    assert!(
        matches!(launch_only, Error::NotPermitted(_)),
        "{launch_only}"
    );
    assert!(env.mem.list(ObjectKind::Pack).unwrap().is_empty());
}

#[test]
fn a_pulled_image_keeps_owner_type_shares_and_tags() {
    let env = Env::new();
    let a = env.depot("a", "alice");
    let f = env.dir.path().join("pub.raw");
    std::fs::write(&f, base_disk()).unwrap();
    let mut opts = ImportOptions::new("pub");
    opts.kind = crate::depot::ImageType::Public;
    opts.description = "a public image".into();
    opts.tags = vec![("os".into(), "linux".into())];
    let id = a.import(&f, &opts, &NoProgress).unwrap().id;
    env.import(&a, "own", &related_disk(3));
    a.share_image("own", "bob").unwrap();
    let ra = env.remote(&a);
    a.push_image(&ra, "pub", None, &NoProgress).unwrap();
    let own = a.push_image(&ra, "own", None, &NoProgress).unwrap();

    let b = env.depot("b", "bob");
    let rb = env.remote(&b);
    let p = b
        .pull_image(&rb, &listed(&rb, &id), None, &NoProgress)
        .unwrap()
        .image;
    assert_eq!(
        (p.owner.as_str(), p.kind),
        ("alice", Some(ImageKind::Public))
    );
    assert_eq!(p.description.as_deref(), Some("a public image"));
    assert_eq!(p.tags.get("os").map(String::as_str), Some("linux"));
    let s = b
        .pull_image(&rb, &listed(&rb, &own.image.id), None, &NoProgress)
        .unwrap()
        .image;
    // bob, its receiver, sees it as shared with him; alice as her custom image
    assert_eq!(
        (s.owner.as_str(), s.kind),
        ("alice", Some(ImageKind::Shared))
    );
    let mine = env.depot("b", "alice").image(&s.id).unwrap();
    assert_eq!(
        (mine.kind, mine.shared_with),
        (Some(ImageKind::Custom), vec!["bob".to_owned()])
    );
}

#[test]
fn a_name_the_owner_has_on_the_remote_is_refused() {
    let env = Env::new();
    let a = env.depot("a", "alice");
    let id = env.import(&a, "base", &base_disk());
    env.import(&a, "other", &related_disk(2));
    let ra = env.remote(&a);
    a.push_image(&ra, "base", None, &NoProgress).unwrap();
    let err = a
        .push_image(&ra, "other", Some("base"), &NoProgress)
        .unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains(&id) && msg.contains("--name"), "{msg}");
    let ok = a
        .push_image(&ra, "other", Some("other2"), &NoProgress)
        .unwrap();
    assert_eq!(ok.image.name, "other2");
    // pushed again under another name: nothing changes, the report says
    // what the remote calls it
    let again = a
        .push_image(&ra, "other", Some("other3"), &NoProgress)
        .unwrap();
    assert!(
        again.already && again.image.name == "other2",
        "{:?}",
        again.image.name
    );
}

#[test]
fn a_hostile_manifest_is_refused_before_anything_is_fetched() {
    let env = Env::new();
    let a = env.depot("a", "alice");
    let id = env.import(&a, "base", &base_disk());
    let ra = env.remote(&a);
    a.push_image(&ra, "base", None, &NoProgress).unwrap();
    let good = listed(&ra, &id).manifest;
    check_pulled(&ra, &good).unwrap();
    let mut cases = Vec::new();
    let mut m = good.clone();
    m.meta.virtual_size = 1 << 50;
    cases.push(m);
    let mut m = good.clone();
    m.meta.owner = "../root".into();
    cases.push(m);
    let mut m = good.clone();
    m.meta.content_digest = "zz".into();
    cases.push(m);
    let mut m = good.clone();
    m.meta.kind = "root".into();
    cases.push(m);
    let mut m = good;
    m.meta.description = "x".repeat(1 << 20);
    cases.push(m);
    for m in cases {
        let e = check_pulled(&ra, &m).unwrap_err();
        assert!(e.to_string().contains("remote r"), "{e}");
    }
}

fn index(pack: &str, pack_len: u64, frames: &[(u64, u64, u8)]) -> PackIndex {
    PackIndex {
        pack: pack.to_owned(),
        pack_len,
        frames: frames
            .iter()
            .map(|&(offset, clen, b)| IndexFrame {
                offset,
                clen,
                hashes: vec![ChunkHash([b; 32]), ChunkHash([b + 100; 32])],
            })
            .collect(),
    }
}

fn remote_in(dir: &Path) -> Remote {
    Remote::new(
        "r",
        Arc::new(MemoryStore::default()),
        dir.join("c"),
        crate::perms::Perms::PRIVATE,
    )
}

#[test]
fn reads_merge_adjacent_frames_and_refuse_bad_locations() {
    let dir = tempfile::tempdir().unwrap();
    let r = remote_in(dir.path());
    let p = "a".repeat(32);
    let mut map = super::ChunkMap::default();
    map.add(&index(
        &p,
        1000,
        &[(16, 100, 1), (116, 50, 2), (300, 10, 3)],
    ));
    let want = [ChunkHash([3; 32]), ChunkHash([1; 32]), ChunkHash([102; 32])];
    let reads = plan_reads(&r, &map, &want, "img").unwrap();
    let spans: Vec<(u64, u64)> = reads.iter().map(|r| (r.offset, r.len)).collect();
    assert_eq!(spans, [(16, 150), (300, 10)]);

    let q = "b".repeat(32);
    for bad in [(8, 10), (990, 20), (16, u64::MAX - 8), (16, 0)] {
        let mut map = super::ChunkMap::default();
        map.add(&index(&q, 1000, &[(bad.0, bad.1, 7)]));
        let e = plan_reads(&r, &map, &[ChunkHash([7; 32])], "img").unwrap_err();
        assert!(e.to_string().contains("remote r"), "{bad:?}: {e}");
    }
    let e = plan_reads(&r, &map, &[ChunkHash([9; 32])], "img").unwrap_err();
    assert!(e.to_string().contains("in no pack"), "{e}");
}

/// Writes `m` to the remote as version 0 of a new image named `name`.
fn forge(remote: &Remote, mut m: crate::format::Manifest, name: &str) -> String {
    let id = crate::ids::ImageId::generate();
    m.seq = 0;
    m.meta.id = id.to_string();
    m.meta.name = name.into();
    let obj = Remote::manifest_name(&id, 0);
    let bytes = crate::format::encode_manifest(&m);
    remote
        .store()
        .put(ObjectKind::Manifest, &obj, &bytes)
        .unwrap();
    id.to_string()
}

/// Depot "a" of alice with the base disk pushed to the remote: the depot,
/// the remote, the image's id and its manifest as the remote has it.
fn base_pushed(env: &Env) -> (Depot, Remote, String, crate::format::Manifest) {
    let a = env.depot("a", "alice");
    let id = env.import(&a, "base", &base_disk());
    let ra = env.remote(&a);
    a.push_image(&ra, "base", None, &NoProgress).unwrap();
    let m = listed(&ra, &id).manifest;
    (a, ra, id, m)
}

#[test]
fn an_image_over_the_import_limit_is_refused_as_import_refuses_it() {
    let env = Env::new();
    let (a, ra, _, mut m) = base_pushed(&env);
    m.meta.virtual_size = 1 << 50;
    m.map = crate::format::HashBlockMap {
        nblocks: 1 << 38,
        runs: Vec::new(),
    };
    let huge = forge(&ra, m, "huge");
    let l = ra.images().unwrap();
    for op in [
        crate::depot::access::Op::Copy,
        crate::depot::access::Op::Show,
    ] {
        let e = ra.find(&l, "huge", "alice", op).unwrap_err();
        assert_eq!(e.exit_code(), 4, "{e}");
        let e = e.to_string();
        assert!(
            e.contains("over the limit of 4398046511104 bytes") && e.contains(&huge),
            "{e}"
        );
    }
    // it can still be deleted
    a.delete_remote_image(&ra, "huge").unwrap();
}

#[test]
fn a_pull_whose_content_does_not_match_the_digest_enters_nothing() {
    let env = Env::new();
    let (_, ra, id, mut m) = base_pushed(&env);
    m.meta.content_digest = "ab".repeat(32);
    let bad = forge(&ra, m, "liar");
    let b = env.depot("b", "alice");
    let rb = env.remote(&b);
    let e = b
        .pull_image(&rb, &listed(&rb, &bad), None, &NoProgress)
        .unwrap_err();
    assert_eq!(e.exit_code(), 5, "{e}");
    assert!(e.to_string().contains("its manifest says abab"), "{e}");
    assert!(b.list_images().unwrap().is_empty());
    // the honest image pulls (and reuses what the failed pull fetched)
    b.pull_image(&rb, &listed(&rb, &id), None, &NoProgress)
        .unwrap();
}

#[test]
fn an_endpoint_with_user_info_is_refused_without_echoing_it() {
    let env = Env::new();
    let a = env.depot("a", "alice");
    for ep in ["http://key:s3cr3t@127.0.0.1:9", "https://s3cr3t@h/x"] {
        let e = a.add_remote("cr", "s3://b/p", Some(ep), None).unwrap_err();
        assert_eq!(e.exit_code(), 2, "{e}");
        let e = e.to_string();
        assert!(e.contains("user info") && !e.contains("s3cr3t"), "{e}");
    }
    assert!(a.remotes().unwrap().is_empty());
}

#[test]
fn local_names_starting_with_a_remote_name_are_refused_both_ways() {
    let env = Env::new();
    let a = env.depot("a", "alice");
    env.import(&a, "zz:web", &base_disk());
    let store = env.mem.clone();
    let e = a
        .add_remote_on("zz", "s3://b/zz", None, None, &store)
        .unwrap_err();
    assert_eq!(e.exit_code(), 2, "{e}");
    assert!(e.to_string().contains("\"zz:web\""), "{e}");
    a.add_remote_on("r", "s3://b/r", None, None, &store)
        .unwrap();
    let e = a.check_local_name("r:web").unwrap_err();
    assert_eq!(e.exit_code(), 2, "{e}");
    a.check_local_name("rr:web").unwrap();
    a.check_local_name("web").unwrap();
    // a pull may not make one either
    let ra = env.remote(&a);
    a.push_image(&ra, "zz:web", None, &NoProgress).unwrap();
    let l = ra.images().unwrap();
    let img = ra.load(l.images.values().next().unwrap()).unwrap();
    let e = a
        .pull_image(&ra, &img, Some("r:copy"), &NoProgress)
        .unwrap_err();
    assert_eq!(e.exit_code(), 2, "{e}");
}
