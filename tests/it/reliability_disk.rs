//! Reliability on a full disk, wrong exit codes and advice (issue 10,
//! items 3 and 6): every case through the real binary.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use crate::common::*;

/// A loop-mounted ext4 filesystem (no reserved blocks), unmounted on drop.
struct LoopFs {
    mnt: PathBuf,
}

impl LoopFs {
    fn new(t: &T, mib: u64) -> LoopFs {
        let img = t.path("fs.img");
        let f = std::fs::File::create(&img).unwrap();
        f.set_len(mib << 20).unwrap();
        drop(f);
        let o = Command::new("mkfs.ext4")
            .args(["-q", "-F", "-m", "0"])
            .arg(&img)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let mnt = t.path("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let st = Command::new("mount")
            .args(["-o", "loop"])
            .arg(&img)
            .arg(&mnt)
            .status()
            .unwrap();
        assert!(st.success());
        LoopFs { mnt }
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mnt).status();
    }
}

/// Bytes available to a user on the filesystem holding `p` (statvfs
/// f_bavail * f_frsize, through stat -f).
fn avail(p: &Path) -> u64 {
    let o = Command::new("stat")
        .args(["-f", "-c", "%a %S"])
        .arg(p)
        .output()
        .unwrap();
    let s = String::from_utf8(o.stdout).unwrap();
    let v: Vec<u64> = s.split_whitespace().map(|x| x.parse().unwrap()).collect();
    v[0] * v[1]
}

/// Fills the filesystem holding `dir` until not one byte is available.
fn fill(dir: &Path) {
    let mut n = 0;
    let a = avail(dir);
    if a > 1 << 20 {
        let st = Command::new("fallocate")
            .args(["-l", &(a - (1 << 20)).to_string()])
            .arg(dir.join("fill0"))
            .status()
            .unwrap();
        assert!(st.success());
    }
    // Squeeze the rest out, in ever smaller writes.
    for bs in ["64k", "4k", "1k", "512"] {
        n += 1;
        let _ = Command::new("dd")
            .args(["if=/dev/zero", &format!("bs={bs}")])
            .arg(format!("of={}", dir.join(format!("fill{n}")).display()))
            .output()
            .unwrap();
    }
    assert_eq!(avail(dir), 0, "the filesystem should be full");
}

#[test]
fn a_full_disk_still_lists_shows_exports_verifies_checks_deletes_and_collects() {
    if !nix_is_root() {
        eprintln!("needs root to mount a loop filesystem; CI runs as root");
        return;
    }
    let t = T::new();
    let fs = LoopFs::new(&t, 64);
    let depot = fs.mnt.join("depot");
    let mut files = Vec::new();
    for (i, name) in ["a", "b", "c"].iter().enumerate() {
        let f = t.path(&format!("{name}.raw"));
        synthetic_raw(&f, 3, 10 + i as u64);
        ok_in(
            &depot,
            &["image", "import", f.to_str().unwrap(), "--name", name, "-q"],
        );
        files.push(f);
    }
    fill(&fs.mnt);
    let list = json_in(&depot, &["image", "list", "--json"]);
    assert_eq!(items(&list).len(), 3, "{list}");
    let show = json_in(&depot, &["image", "show", "a", "--json"]);
    assert_eq!(show["state"], "available");
    let out = t.path("a.out");
    ok_in(&depot, &["image", "export", "a", out.to_str().unwrap()]);
    assert!(same_content(&files[0], &out));
    ok_in(&depot, &["image", "verify", "-q"]);
    let f = json_in(&depot, &["fsck", "--json"]);
    assert_eq!(f["problems"], Value::Array(vec![]), "{f}");
    ok_in(&depot, &["stats"]);
    assert_eq!(avail(&fs.mnt), 0, "read-only commands wrote");
    ok_in(&depot, &["image", "delete", "a"]);
    ok_in(&depot, &["image", "delete", "b"]);
    ok_in(&depot, &["gc"]);
    assert!(
        avail(&fs.mnt) >= 4 << 20,
        "gc gave back only {} bytes",
        avail(&fs.mnt)
    );
    let list = json_in(&depot, &["image", "list", "--json"]);
    assert_eq!(items(&list).len(), 1, "{list}");
    ok_in(&depot, &["image", "verify", "c", "-q"]);
}

#[test]
fn a_damaged_catalog_file_is_store_damaged_exit_5() {
    // Not a database at all (SQLITE_NOTADB).
    let t = T::new();
    t.ok(&["gc"]); // creates the depot
    let cat = t.depot().join("catalog.db");
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&cat).unwrap();
        f.write_all_at(b"this is no SQLite", 0).unwrap();
    }
    t.refuses(&["image", "list"], 5, "backup");
    // A damaged b-tree page (SQLITE_CORRUPT: "database disk image is malformed").
    let t = T::new();
    let f = t.path("a.raw");
    synthetic_raw(&f, 2, 1);
    t.import(&f, "a");
    let cat = t.depot().join("catalog.db");
    let len = std::fs::metadata(&cat).unwrap().len();
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&cat).unwrap();
        for page in 1..len / 4096 {
            f.write_all_at(&[0xff; 64], page * 4096).unwrap();
        }
    }
    let err = t.refuses(&["image", "list"], 5, "malformed");
    assert!(err.contains("backup"), "{err}");
}

#[test]
fn a_non_utf8_catalog_value_is_store_damaged_exit_5() {
    let t = T::new();
    let f = t.path("a.raw");
    synthetic_raw(&f, 2, 1);
    t.import(&f, "a");
    t.ok(&["image", "update", "a", "--tag", "k=v"]);
    let st = Command::new("sqlite3")
        .arg(t.depot().join("catalog.db"))
        .arg("UPDATE image_tags SET value = CAST(X'fffe' AS TEXT)")
        .status()
        .unwrap();
    assert!(st.success());
    t.refuses(&["image", "show", "a"], 5, "UTF-8");
}

#[test]
fn a_full_export_target_is_exit_6_and_names_that_filesystem() {
    if !nix_is_root() {
        eprintln!("needs root to mount a tmpfs; CI runs as root");
        return;
    }
    let t = T::new();
    let f = t.path("a.raw");
    synthetic_raw(&f, 8, 1);
    t.import(&f, "a");
    let small = Tmpfs::new(&t, "small", "1m");
    for format in ["qcow2", "raw"] {
        let out = small.0.join(format!("a.{format}"));
        let (code, err) = t.fails(&[
            "image",
            "export",
            "a",
            out.to_str().unwrap(),
            "--format",
            format,
        ]);
        assert_eq!(code, 6, "{format}: {err}");
        assert!(err.contains(small.0.to_str().unwrap()), "{format}: {err}");
        assert!(
            !err.contains("vmdepot gc"),
            "{format}: gc cannot help: {err}"
        );
        assert!(err.contains("free space there"), "{format}: {err}");
    }
    assert_eq!(std::fs::read_dir(&small.0).unwrap().count(), 0);
}

#[test]
fn damaged_pack_data_advises_image_verify_not_fsck() {
    let t = T::new();
    let f = t.path("a.raw");
    synthetic_raw(&f, 4, 1);
    t.import(&f, "a");
    let pack = t.pack_files()[0].clone();
    {
        use std::os::unix::fs::FileExt;
        let len = std::fs::metadata(&pack).unwrap().len();
        let f = std::fs::OpenOptions::new().write(true).open(&pack).unwrap();
        f.write_all_at(&[0x5a; 16], len / 2).unwrap();
    }
    let out = t.path("a.out");
    let (code, err) = t.fails(&["image", "export", "a", out.to_str().unwrap()]);
    assert_eq!(code, 5, "{err}");
    assert!(!err.contains("vmdepot fsck"), "fsck reads no data: {err}");
    assert!(err.contains("vmdepot image verify"), "{err}");
}

#[test]
fn log_lines_are_plain_off_a_terminal() {
    let t = T::new();
    let o = t
        .cmd(&["image", "list"])
        .env("VMDEPOT_LOG", "debug")
        .env("VMDEPOT_ACCOUNT", "Not Valid")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("DEBUG"), "a debug record expected: {err}");
    assert!(
        !err.contains('\x1b'),
        "colour codes off a terminal: {err:?}"
    );
}
