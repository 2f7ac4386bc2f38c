//! Reliability, item 5: the catalog is an index that can be rebuilt. Every
//! image has a manifest beside the packs and every pack an index, so a lost
//! (deleted, emptied, truncated) catalog is rebuilt by `fsck --repair`:
//! every image comes back with its metadata and exports byte-identical.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::common::*;

fn b3(p: &Path) -> String {
    blake3::hash(&std::fs::read(p).unwrap())
        .to_hex()
        .to_string()
}

/// The fields of `image list --json` that must survive a rebuild.
fn listing(t: &T) -> Vec<Value> {
    let mut v: Vec<Value> = items(&t.json(&["image", "list", "--all", "--json"]))
        .iter()
        .map(|i| {
            let keep = [
                "id",
                "name",
                "type",
                "owner",
                "description",
                "state",
                "source_format",
                "virtual_size",
                "data_bytes",
                "content_digest",
                "created_at",
                "parent",
                "parent_name",
                "protected",
                "deprecated",
                "vendor",
                "application",
                "app_version",
                "restricted_from",
                "tags",
                "shared_with",
            ];
            Value::Object(
                keep.iter()
                    .map(|k| (k.to_string(), i[*k].clone()))
                    .collect(),
            )
        })
        .collect();
    v.sort_by_key(id_of);
    v
}

/// BLAKE3 of every image's raw export, by id.
fn exports(t: &T, tag: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for i in items(&t.json(&["image", "list", "--all", "--json"])) {
        let id = id_of(i);
        let p = t.path(&format!("{id}.{tag}.raw"));
        t.ok(&["image", "export", &id, p.to_str().unwrap(), "-q"]);
        out.push((id, b3(&p)));
        std::fs::remove_file(&p).unwrap();
    }
    out.sort();
    out
}

fn files_with(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut v = Vec::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                todo.push(p);
            } else if p.extension().is_some_and(|x| x == ext) {
                v.push(p);
            }
        }
    }
    v.sort();
    v
}

/// Every pack has its index, every image one manifest, nothing else.
fn assert_sidecars(t: &T, images: usize) {
    let packs = t.pack_files();
    let idx = files_with(&t.depot().join("packs"), "idx");
    assert_eq!(
        idx,
        packs
            .iter()
            .map(|p| p.with_extension("idx"))
            .collect::<Vec<_>>(),
        "one index per pack"
    );
    assert_eq!(
        files_with(&t.depot().join("manifests"), "manifest").len(),
        images,
        "one manifest per image"
    );
}

fn remove_catalog(t: &T) {
    for ext in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(t.depot().join(format!("catalog.db{ext}")));
    }
}

/// The depot refuses (exit 5, naming the way out) until it is repaired;
/// then the images, their metadata and their bytes are back.
fn repair_and_compare(t: &T, list: &[Value], sums: &[(String, String)]) -> Value {
    for args in [&["image", "list"][..], &["gc"], &["stats"], &["fsck"]] {
        let (code, err) = t.fails(args);
        assert_eq!(code, 5, "{args:?}: {err}");
        assert!(err.contains("fsck --repair"), "{err}");
    }
    let rep = t.json(&["fsck", "--repair", "--json"]);
    assert_eq!(rep["rebuilt"], true, "{rep}");
    assert_eq!(rep["problems"], Value::Array(vec![]), "{rep}");
    assert_eq!(listing(t), list, "metadata after the rebuild");
    assert_eq!(exports(t, "after"), sums, "content after the rebuild");
    t.ok(&["image", "verify", "-q"]);
    let f = t.assert_fsck_clean();
    assert_eq!(f["warnings"], Value::Array(vec![]), "{f}");
    // gc would free nothing: every chunk found is one an image uses
    let gc = t.json(&["gc", "--dry-run", "--json"]);
    assert_eq!(gc["chunks_removed"], 0, "{gc}");
    assert_eq!(gc["packs_removed"], 0, "{gc}");
    rep
}

#[test]
fn a_deleted_catalog_is_rebuilt_with_every_image_and_its_metadata() {
    let t = T::new();
    let fx = fixtures();
    t.import(&fx.join("A.raw"), "A");
    t.import(&fx.join("B.raw"), "B");
    let q = t.path("b2.qcow2");
    to_qcow2(&fx.join("B2.raw"), &q);
    t.import(&q, "B2-qcow2");
    let small = t.path("small.raw");
    synthetic_raw(&small, 8, 3);
    t.ok(&[
        "image",
        "import",
        small.to_str().unwrap(),
        "--name",
        "tools",
        "--description",
        "build tools",
        "--tag",
        "team=infra",
        "-q",
    ]);
    // metadata changes after creation: each writes a new manifest version
    t.ok(&[
        "image",
        "update",
        "tools",
        "--name",
        "tools-v2",
        "--tag",
        "tier=gold",
        "--protect",
    ]);
    t.ok(&["image", "share", "tools-v2", "--with", "bob"]);
    t.ok(&["image", "share", "tools-v2", "--with", "carol"]);
    t.ok(&["image", "unshare", "tools-v2", "--with", "carol"]);
    t.ok(&["image", "update", "B", "--deprecate"]);
    // a deleted image's manifest goes with it
    t.import(&small, "gone");
    t.ok(&["image", "delete", "gone"]);
    t.ok(&["gc"]);
    assert_sidecars(&t, 4);
    let m = files_with(&t.depot().join("manifests"), "manifest");
    assert!(
        m.iter()
            .any(|p| p.to_str().unwrap().ends_with(".4.manifest")),
        "four metadata changes of tools: version 4 {m:?}"
    );
    let list = listing(&t);
    assert_eq!(list.len(), 4);
    let tools = list.iter().find(|i| i["name"] == "tools-v2").unwrap();
    assert_eq!(tools["tags"]["team"], "infra");
    assert_eq!(tools["tags"]["tier"], "gold");
    assert_eq!(tools["protected"], true);
    assert_eq!(tools["shared_with"], serde_json::json!(["bob"]));
    let sums = exports(&t, "before");
    remove_catalog(&t);
    let rep = repair_and_compare(&t, &list, &sums);
    assert_eq!(items(&rep["images"]).len(), 4, "{rep}");
    assert_eq!(rep["packs_reindexed"], 0, "{rep}");
    // and the depot works on: gc keeps everything, a new import dedups
    t.ok(&["gc"]);
    assert_eq!(exports(&t, "gc"), sums);
    let again = t.import(&fx.join("A.raw"), "A-again");
    assert_eq!(
        again["content_digest"],
        list.iter().find(|i| i["name"] == "A").unwrap()["content_digest"]
    );
    // shared: bob sees it as before
    let bob = ok_as(&t, "bob", &["image", "list", "--json"]);
    assert!(bob.contains("tools-v2"), "{bob}");
}

#[test]
fn an_emptied_or_truncated_catalog_is_rebuilt() {
    let t = T::new();
    let a = t.path("a.raw");
    let b = t.path("b.raw");
    synthetic_raw(&a, 24, 1);
    synthetic_raw(&b, 24, 2);
    t.import(&a, "a");
    t.import(&b, "b");
    t.ok(&[
        "image",
        "update",
        "b",
        "--description",
        "second",
        "--tag",
        "k=v",
    ]);
    let list = listing(&t);
    let sums = exports(&t, "before");
    // truncated: half of the file (and no WAL)
    let cat = t.depot().join("catalog.db");
    let len = std::fs::metadata(&cat).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&cat)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let rep = t.json(&["fsck", "--repair", "--json"]);
    assert_eq!(rep["rebuilt"], true, "{rep}");
    assert_eq!(items(&rep["set_aside"]).len(), 1, "{rep}");
    assert_eq!(listing(&t), list);
    assert_eq!(exports(&t, "after"), sums);
    t.ok(&["image", "verify", "-q"]);
    t.assert_fsck_clean();
    // emptied (`: > catalog.db`)
    remove_catalog(&t);
    std::fs::File::create(&cat).unwrap();
    repair_and_compare(&t, &list, &sums);
    // a sound catalog is kept, and what an older depot lacks is written
    for f in files_with(&t.depot().join("manifests"), "manifest")
        .into_iter()
        .chain(files_with(&t.depot().join("packs"), "idx"))
    {
        std::fs::remove_file(f).unwrap();
    }
    let f = t.json(&["fsck", "--json"]);
    assert_eq!(items(&f["warnings"]).len(), 4, "2 images, 2 packs: {f}");
    let rep = t.json(&["fsck", "--repair", "--json"]);
    assert_eq!(rep["rebuilt"], false, "{rep}");
    assert_eq!(rep["manifests_written"], 2, "{rep}");
    assert_eq!(rep["indexes_written"], 2, "{rep}");
    let f = t.assert_fsck_clean();
    assert_eq!(f["warnings"], Value::Array(vec![]), "{f}");
    // a damaged manifest and a damaged index in a sound depot: fsck warns,
    // repair writes them anew
    let flip = |p: &Path| {
        let mut b = std::fs::read(p).unwrap();
        b[60] ^= 0x40;
        std::fs::write(p, b).unwrap();
    };
    let a_id = t.json(&["image", "show", "a", "--json"])["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let b_id = t.json(&["image", "show", "b", "--json"])["id"]
        .as_str()
        .unwrap()
        .to_owned();
    flip(
        &t.depot()
            .join("manifests")
            .join(format!("{a_id}.0.manifest")),
    );
    flip(&files_with(&t.depot().join("packs"), "idx")[0]);
    let f = t.json(&["fsck", "--json"]);
    assert_eq!(items(&f["warnings"]).len(), 2, "{f}");
    let rep = t.json(&["fsck", "--repair", "--json"]);
    assert_eq!(rep["manifests_written"], 1, "{rep}");
    assert_eq!(rep["indexes_written"], 1, "{rep}");
    let f = t.assert_fsck_clean();
    assert_eq!(f["warnings"], Value::Array(vec![]), "{f}");
    // now version 1 of b's manifest is damaged half-way through a write
    t.ok(&["image", "update", "b", "--description", "third"]);
    let list = listing(&t);
    let m = files_with(&t.depot().join("manifests"), "manifest");
    let v1 = m
        .iter()
        .find(|p| p.to_str().unwrap().ends_with(&format!("{b_id}.1.manifest")))
        .unwrap();
    let good = std::fs::read(v1).unwrap();
    let v2 = v1.with_file_name(
        v1.file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .replace(".1.", ".2."),
    );
    std::fs::write(&v2, &good[..good.len() / 2]).unwrap();
    remove_catalog(&t);
    let rep = t.json(&["fsck", "--repair", "--json"]);
    assert_eq!(rep["problems"], Value::Array(vec![]), "{rep}");
    assert!(
        rep["mended"].to_string().contains("version 1 used"),
        "{rep}"
    );
    assert_eq!(listing(&t), list);
    assert_eq!(exports(&t, "last"), sums);
}

#[test]
fn a_repair_after_gc_repacked_packs_and_without_indexes() {
    let t = T::new();
    // "old" shares a quarter of its content with "new"; deleting it leaves
    // its pack less than half live, so gc repacks it.
    let mut x: u64 = 0x9e3779b97f4a7c15;
    let mut noise = |mib: usize| -> Vec<u8> {
        let mut v = vec![0u8; mib << 20];
        for c in v.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            c.copy_from_slice(&(x & 0x0f0f0f0f0f0f0f0f).to_le_bytes());
        }
        v
    };
    let old = noise(16);
    let mut new = old[..4 << 20].to_vec();
    new.extend(noise(4));
    let (po, pn) = (t.path("old.raw"), t.path("new.raw"));
    std::fs::write(&po, &old).unwrap();
    std::fs::write(&pn, &new).unwrap();
    t.import(&po, "old");
    t.import(&pn, "new");
    t.ok(&["image", "delete", "old"]);
    let gc = t.json(&["gc", "--json"]);
    assert!(gc["packs_repacked"].as_u64().unwrap() >= 1, "{gc}");
    assert_sidecars(&t, 1);
    let list = listing(&t);
    let sums = exports(&t, "before");
    assert_eq!(sums[0].1, blake3::hash(&new).to_hex().to_string());
    // a pack whose index is lost, another whose index is damaged: both are
    // read again
    let idx = files_with(&t.depot().join("packs"), "idx");
    assert!(idx.len() >= 2, "{idx:?}");
    std::fs::remove_file(&idx[0]).unwrap();
    let mut b = std::fs::read(&idx[1]).unwrap();
    let n = b.len();
    b[n - 1] ^= 0xff;
    std::fs::write(&idx[1], &b).unwrap();
    remove_catalog(&t);
    let (code, err) = t.fails(&["image", "list"]);
    assert_eq!(code, 5, "{err}");
    let rep = t.json(&["fsck", "--repair", "--json"]);
    assert_eq!(rep["packs_reindexed"], 2, "{rep}");
    assert_eq!(rep["problems"], Value::Array(vec![]), "{rep}");
    let mended = items(&rep["mended"]);
    assert!(
        mended.len() == 1 && mended[0].as_str().unwrap().contains("read again"),
        "the damaged index is reported: {rep}"
    );
    assert_eq!(listing(&t), list);
    assert_eq!(exports(&t, "after"), sums);
    t.ok(&["image", "verify", "-q"]);
    let f = t.assert_fsck_clean();
    assert_eq!(
        f["warnings"],
        Value::Array(vec![]),
        "indexes rewritten: {f}"
    );
    assert_sidecars(&t, 1);
    let gc = t.json(&["gc", "--json"]);
    assert_eq!(gc["chunks_removed"], 0, "{gc}");
    assert_eq!(exports(&t, "gc"), sums);
}

#[test]
fn instances_are_rebuilt_from_their_directories() {
    let t = depot_with_guest();
    let tiny = t.json(&["image", "show", "tiny", "--json"]);
    let launched = t.json(&[
        "instance",
        "run",
        "tiny",
        "--name",
        "web",
        "--hostname",
        "web-host",
        "--json",
    ]);
    let id = id_of(&launched[0]);
    let pid = t.json(&["instance", "show", "web", "--json"])["pid"].clone();
    assert!(pid.is_i64(), "{pid}");
    remove_catalog(&t);
    let rep = t.json(&["fsck", "--repair", "--json"]);
    assert_eq!(rep["instances"], serde_json::json!([id]), "{rep}");
    let i = t.json(&["instance", "show", &id, "--json"]);
    assert_eq!(i["state"], "running", "its QEMU is adopted: {i}");
    assert_eq!(i["pid"], pid);
    assert_eq!(i["image"], tiny["id"]);
    assert_eq!(i["hostname"], "web-host");
    // gc keeps the base its overlay runs on
    let gc = t.json(&["gc", "--dry-run", "--json"]);
    assert_eq!(gc["bases_evicted"], 0, "{gc}");
    t.ok(&["instance", "delete", &id, "--force"]);
    // (killed and waited for until its /proc entry says it is gone; its
    // exit may still be finishing at that moment)
    wait_until(
        "the adopted QEMU is killed by the delete",
        std::time::Duration::from_secs(10),
        || !alive(pid.as_i64().unwrap()),
    );
}
