//! Security issue 8, parts 7 and 9: export never writes through planted
//! links, over devices or onto the depot; a lost catalog is not a new depot;
//! damaged catalog rows are named, never a panic, and one damaged image does
//! not block the others.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use crate::common::*;

/// A small raw image (1 MiB data, holes, short tail) imported as `name`.
fn small(t: &T, name: &str, seed: u64) -> PathBuf {
    let src = t.path(&format!("{name}.raw"));
    synthetic_raw(&src, 3, seed);
    t.import(&src, name);
    src
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn sql(t: &T, stmt: &str) {
    let c = rusqlite::Connection::open(t.depot().join("catalog.db")).unwrap();
    c.execute_batch(stmt).unwrap();
}

fn no_panic(err: &str) {
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn symlinks_at_the_old_partial_names_are_not_followed() {
    let t = T::new();
    let src = small(&t, "s", 1);
    let victim = t.path("victim");
    std::fs::write(&victim, b"precious").unwrap();
    let out = t.path("out.raw");
    std::os::unix::fs::symlink(&victim, t.path("out.raw.vmdepot-partial")).unwrap();
    t.ok(&["image", "export", "s", s(&out), "-q"]);
    assert!(same_content(&src, &out));
    let q = t.path("out.qcow2");
    std::os::unix::fs::symlink(&victim, t.path("out.qcow2.vmdepot-partial")).unwrap();
    std::os::unix::fs::symlink(&victim, t.path("out.qcow2.vmdepot-raw")).unwrap();
    t.ok(&["image", "export", "s", s(&q), "--format", "qcow2", "-q"]);
    qemu_img(&["compare", "-q", s(&q), s(&src)]);
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    // Nothing of ours left beside the output (only the planted links).
    let left: Vec<_> = std::fs::read_dir(t.dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("vmdepot-partial-"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn symlink_destination_is_refused_and_its_target_untouched() {
    let t = T::new();
    small(&t, "s", 2);
    let victim = t.path("victim");
    std::fs::write(&victim, b"precious").unwrap();
    let link = t.path("link.raw");
    std::os::unix::fs::symlink(&victim, &link).unwrap();
    t.refuses(
        &["image", "export", "s", s(&link), "-q"],
        4,
        "symbolic link",
    );
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
}

#[test]
fn export_onto_the_depot_catalog_is_refused() {
    let t = T::new();
    let src = small(&t, "s", 3);
    let cat = t.depot().join("catalog.db");
    t.refuses(
        &["image", "export", "s", s(&cat), "-q"],
        4,
        "inside the depot",
    );
    // The same through another name of the depot directory.
    let alias = t.path("alias");
    std::os::unix::fs::symlink(t.depot(), &alias).unwrap();
    let (code, err) = t.fails(&[
        "image",
        "export",
        "s",
        s(&alias.join("packs").join("x.pack")),
        "-q",
    ]);
    assert_eq!(code, 4, "{err}");
    t.assert_fsck_clean();
    let out = t.path("back.raw");
    t.ok(&["image", "export", "s", s(&out), "-q"]);
    assert!(same_content(&src, &out));
}

/// Detaches a loop device on drop.
struct Loop(String);

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

#[test]
fn export_to_a_loop_device_writes_every_block_in_place() {
    if !nix_is_root() {
        eprintln!("skipped: needs root for losetup");
        return;
    }
    let t = T::new();
    let src = small(&t, "s", 4);
    let size = std::fs::metadata(&src).unwrap().len();
    // The device starts full of 0xff: the image's zeros must be written.
    let back = t.path("back.img");
    std::fs::write(&back, vec![0xffu8; 4 << 20]).unwrap();
    let o = Command::new("losetup")
        .args(["--find", "--show", s(&back)])
        .output()
        .unwrap();
    if !o.status.success() {
        eprintln!(
            "skipped: losetup: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        );
        return;
    }
    let dev = Loop(String::from_utf8(o.stdout).unwrap().trim().to_owned());
    t.ok(&["image", "export", "s", &dev.0, "-q"]);
    let m = std::fs::symlink_metadata(&dev.0).unwrap();
    assert!(m.file_type().is_block_device(), "still a block device");
    let got = std::fs::read(&back).unwrap();
    assert_eq!(&got[..size as usize], &std::fs::read(&src).unwrap()[..]);
    assert!(
        got[size as usize..].iter().all(|&b| b == 0xff),
        "beyond the image untouched"
    );
    // Too small a device is refused before anything is written.
    let tiny = t.path("tiny.img");
    std::fs::write(&tiny, vec![0xeeu8; 1 << 20]).unwrap();
    let o = Command::new("losetup")
        .args(["--find", "--show", s(&tiny)])
        .output()
        .unwrap();
    let dev2 = Loop(String::from_utf8(o.stdout).unwrap().trim().to_owned());
    let (code, err) = t.fails(&["image", "export", "s", &dev2.0, "-q"]);
    assert_eq!(code, 4, "{err}");
    assert!(std::fs::read(&tiny).unwrap().iter().all(|&b| b == 0xee));
}

#[test]
fn export_to_a_fifo_is_refused() {
    let t = T::new();
    small(&t, "s", 5);
    let fifo = t.path("fifo");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    t.refuses(&["image", "export", "s", s(&fifo), "-q"], 4, "FIFO");
    assert!(std::fs::symlink_metadata(&fifo)
        .unwrap()
        .file_type()
        .is_fifo());
}

#[test]
fn export_dash_streams_the_raw_image_to_stdout() {
    let t = T::new();
    let src = small(&t, "s", 6);
    let o = t
        .cmd(&["image", "export", "s", "-", "-q"])
        .current_dir(t.dir.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(o.stdout, std::fs::read(&src).unwrap());
    let info = t.json(&["image", "show", "s", "--json"]);
    assert_eq!(
        info["content_digest"],
        blake3::hash(&o.stdout).to_hex().as_str()
    );
    assert!(!t.path("-").exists(), "no file named `-`");
    let (code, _) = t.fails(&["image", "export", "s", "-", "--format", "qcow2"]);
    assert_ne!(code, 0);
}

#[test]
fn leftover_of_a_killed_export_is_cleaned_by_the_next_export() {
    let t = T::new();
    let src = small(&t, "s", 7);
    // A killed export's temporary, one a running export holds (flock), and
    // a planted symlink with such a name.
    let dead = t.path(".out.raw.vmdepot-partial-00112233aabbccdd");
    std::fs::write(&dead, b"partial").unwrap();
    let busy = t.path(".other.raw.vmdepot-partial-0123456789abcdef");
    std::fs::write(&busy, b"being written").unwrap();
    let held = nix::fcntl::Flock::lock(
        std::fs::File::open(&busy).unwrap(),
        nix::fcntl::FlockArg::LockExclusive,
    )
    .unwrap();
    let victim = t.path("victim");
    std::fs::write(&victim, b"precious").unwrap();
    let planted = t.path(".x.vmdepot-partial-ffffffffffffffff");
    std::os::unix::fs::symlink(&victim, &planted).unwrap();
    let out = t.path("out.raw");
    t.ok(&["image", "export", "s", s(&out), "-q"]);
    assert!(same_content(&src, &out));
    assert!(!dead.exists(), "the dead export's leftover is removed");
    assert!(busy.exists(), "a running export's temporary is kept");
    assert!(std::fs::symlink_metadata(&planted).is_ok());
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    drop(held);
}

#[test]
fn exported_file_gets_the_callers_umask() {
    let t = T::new();
    small(&t, "s", 8);
    for (umask, want) in [("022", 0o644), ("027", 0o640)] {
        let out = t.path(&format!("out-{umask}.raw"));
        let st = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "umask {umask}; exec \"$0\" --depot \"$1\" image export s \"$2\" -q"
            ))
            .arg(bin())
            .arg(t.depot())
            .arg(&out)
            .status()
            .unwrap();
        assert!(st.success());
        let mode = std::fs::metadata(&out).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, want, "umask {umask}");
    }
}

#[test]
fn emptied_or_missing_catalog_is_refused_and_gc_keeps_the_packs() {
    let t = T::new();
    small(&t, "s", 9);
    assert!(
        t.depot().join("VMDEPOT").exists(),
        "marker written at creation"
    );
    let packs = t.pack_files();
    assert!(!packs.is_empty());
    let cat = t.depot().join("catalog.db");
    std::fs::File::create(&cat).unwrap(); // `: > catalog.db`
    for args in [&["fsck"][..], &["gc"], &["image", "list"], &["stats"]] {
        let (code, err) = t.fails(args);
        assert_eq!(code, 5, "{args:?}: {err}");
        assert!(err.contains("restore catalog.db"), "{err}");
    }
    std::fs::remove_file(&cat).unwrap();
    let (code, _) = t.fails(&["gc"]);
    assert_eq!(code, 5);
    assert_eq!(t.pack_files(), packs, "packs still there");
    // Without the marker (a depot made before markers), the pack files
    // alone are enough to refuse.
    std::fs::remove_file(t.depot().join("VMDEPOT")).unwrap();
    t.refuses(&["gc"], 5, "pack files");
    assert_eq!(t.pack_files(), packs);
}

#[test]
fn depot_without_marker_gets_one_on_first_open() {
    let t = T::new();
    small(&t, "s", 10);
    let marker = t.depot().join("VMDEPOT");
    let first = std::fs::read_to_string(&marker).unwrap();
    let lines: Vec<&str> = first.lines().collect();
    assert_eq!(lines[0], "vmdepot-depot");
    assert_eq!(lines[1], "format=1");
    assert_eq!(lines[2].len(), 3 + 32);
    std::fs::remove_file(&marker).unwrap();
    t.ok(&["image", "list"]);
    let again = std::fs::read_to_string(&marker).unwrap();
    assert_ne!(again, first, "a fresh id");
    t.ok(&["image", "list"]);
    assert_eq!(std::fs::read_to_string(&marker).unwrap(), again, "kept");
}

#[test]
fn bad_pack_name_row_is_named_never_a_panic() {
    let t = T::new();
    small(&t, "s", 11);
    let packs = t.pack_files();
    sql(&t, "UPDATE packs SET name = 'a'");
    let out = t.path("out.raw");
    let (code, err) = t.fails(&["image", "export", "s", s(&out), "-q"]);
    no_panic(&err);
    assert_eq!(code, 5, "{err}");
    assert!(err.contains("catalog table packs, row"), "{err}");
    let o = t.run(&["fsck", "--json"]);
    no_panic(&String::from_utf8_lossy(&o.stderr));
    assert_eq!(o.status.code(), Some(5));
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(r["problems"].to_string().contains("packs, row"), "{r}");
    let (code, err) = t.fails(&["gc"]);
    no_panic(&err);
    assert_eq!(code, 5, "{err}");
    assert_eq!(t.pack_files(), packs, "gc deleted nothing");
    let (code, err) = t.fails(&["image", "verify"]);
    no_panic(&err);
    assert_eq!(code, 5, "{err}");
}

#[test]
fn damaged_image_map_does_not_block_the_other_images() {
    let t = T::new();
    let good_src = small(&t, "good", 12);
    let bad = t.import(&t.path("good.raw"), "bad");
    let bad_id = id_of(&bad);
    sql(
        &t,
        &format!("UPDATE images SET map = x'5a8397510011' WHERE id = '{bad_id}'"),
    );
    let list = t.json(&["image", "list", "--json"]);
    let list = items(&list);
    assert_eq!(list.len(), 2, "{list:?}");
    let b = list.iter().find(|i| i["id"] == bad_id.as_str()).unwrap();
    assert_eq!(b["state"], "damaged");
    assert!(b["damage"].as_str().unwrap().contains("block map"), "{b}");
    t.json(&["image", "show", "good", "--json"]);
    let st = t.stats();
    assert_eq!(st["images"], 1, "{st}");
    assert!(st["damaged_images"].to_string().contains(&bad_id), "{st}");
    let out = t.path("good.out");
    t.ok(&["image", "export", "good", s(&out), "-q"]);
    assert!(same_content(&good_src, &out));
    t.refuses(
        &["image", "export", &bad_id, s(&t.path("bad.out")), "-q"],
        5,
        &bad_id,
    );
    let o = t.run(&["fsck", "--json"]);
    assert_eq!(o.status.code(), Some(5));
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(r["problems"].to_string().contains(&bad_id), "{r}");
    // gc refuses rather than free what the damaged image may use.
    t.refuses(&["gc"], 5, &bad_id);
    t.ok(&["image", "delete", "good"]);
    t.ok(&["image", "delete", &bad_id]);
    assert_eq!(t.json(&["image", "list", "--json"]), Value::Array(vec![]));
}

#[test]
fn non_utf8_text_and_bad_state_rows_are_named() {
    let t = T::new();
    small(&t, "one", 13);
    let two = t.import(&t.path("one.raw"), "two");
    let three = t.import(&t.path("one.raw"), "three");
    let (two, three) = (id_of(&two), id_of(&three));
    sql(
        &t,
        &format!(
            "PRAGMA ignore_check_constraints = ON;
             UPDATE images SET name = CAST(x'ff41' AS TEXT) WHERE id = '{two}';
             UPDATE images SET state = 'bogus' WHERE id = '{three}';"
        ),
    );
    let o = t.run(&["image", "list", "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let list: Value = serde_json::from_slice(&o.stdout).unwrap();
    let damaged: Vec<_> = items(&list)
        .iter()
        .filter(|i| i["state"] == "damaged")
        .map(id_of)
        .collect();
    assert_eq!(damaged.len(), 2, "{list}");
    for (id, what) in [(&two, "not UTF-8"), (&three, "bogus")] {
        let (code, err) = t.fails(&["image", "export", id, s(&t.path("x.out")), "-q"]);
        no_panic(&err);
        assert_eq!(code, 5, "{err}");
        assert!(err.contains(id.as_str()) && err.contains(what), "{err}");
    }
    t.ok(&["image", "export", "one", s(&t.path("one.out")), "-q"]);
    t.ok(&["stats"]);
}
