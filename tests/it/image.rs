//! Images: import, export, verify, gc, fsck and stats through the real
//! binary, with real qemu-img and real Debian disk images.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::common::*;
#[test]
fn raw_round_trip_is_identical_and_sparse() {
    let t = T::new();
    let a = fixtures().join("A.raw");
    let img = t.import(&a, "debian-a");
    assert_eq!(img["state"], "available");
    assert_eq!(img["virtual_size"], 512 << 20);
    assert_eq!(img["source_format"], "raw");
    assert!(img["id"].as_str().unwrap().starts_with("img-"));
    let out = t.path("a.out");
    t.ok(&["image", "export", "debian-a", out.to_str().unwrap(), "-q"]);
    assert!(same_content(&a, &out), "export differs from the import");
    // Sparse: the export allocates no more than the source's data.
    assert!(
        allocated(&out) <= allocated(&a),
        "{} > {}",
        allocated(&out),
        allocated(&a)
    );
    assert!(allocated(&out) < (512 << 20) / 2);
    // id and name are interchangeable
    let by_id = t.json(&["image", "show", img["id"].as_str().unwrap(), "--json"]);
    assert_eq!(by_id["name"], "debian-a");
    assert_eq!(by_id["content_digest"], img["content_digest"]);
    t.assert_fsck_clean();
}

#[test]
fn synthetic_raw_with_short_tail_round_trips() {
    let t = T::new();
    let src = t.path("syn.raw");
    synthetic_raw(&src, 24, 7);
    let img = t.import(&src, "syn");
    let want = blake3::hash(&std::fs::read(&src).unwrap())
        .to_hex()
        .to_string();
    assert_eq!(
        img["content_digest"],
        want.as_str(),
        "digest is BLAKE3 of the raw content"
    );
    let out = t.path("syn.out");
    t.ok(&["image", "export", "syn", out.to_str().unwrap()]);
    assert!(same_content(&src, &out));
    t.ok(&["image", "verify", "syn"]);
}

#[test]
fn qcow2_import_has_the_raw_digest_and_adds_no_chunks() {
    let t = T::new();
    let a = fixtures().join("A.raw");
    let q = t.path("a.qcow2");
    to_qcow2(&a, &q);
    let raw = t.import(&a, "a-raw");
    let chunks_before = t.stats()["chunks"].clone();
    let packs_before = t.pack_files();
    let qc = t.import(&q, "a-qcow2");
    assert_eq!(qc["source_format"], "qcow2");
    assert_eq!(qc["content_digest"], raw["content_digest"]);
    assert_eq!(
        t.stats()["chunks"],
        chunks_before,
        "no new chunk for the same content"
    );
    assert_eq!(t.pack_files(), packs_before, "no new pack data");
    // export qcow2 round-trips through qemu-img compare
    let out = t.path("out.qcow2");
    t.ok(&[
        "image",
        "export",
        "a-qcow2",
        out.to_str().unwrap(),
        "--format",
        "qcow2",
    ]);
    qemu_img(&[
        "compare",
        "-f",
        "raw",
        "-F",
        "qcow2",
        a.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    // and the qcow2 export imports back to the same digest
    let back = t.import(&out, "back");
    assert_eq!(back["content_digest"], raw["content_digest"]);
}

#[test]
fn vmdk_and_vhdx_import_to_the_same_digest() {
    let t = T::new();
    let src = t.path("syn.raw");
    synthetic_raw(&src, 8, 3);
    // foreign formats round to whole sectors/MiB: compare with a qemu-made raw
    let base = t.path("base.raw");
    std::fs::copy(&src, &base).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&base)
        .unwrap()
        .set_len(9 << 20)
        .unwrap();
    let want = t.import(&base, "base")["content_digest"].clone();
    for (fmt, opts) in [
        ("vmdk", "subformat=monolithicSparse"),
        ("vmdk", "subformat=streamOptimized"),
        ("vhdx", "subformat=dynamic"),
    ] {
        let f = t.path(&format!("x-{}.{fmt}", opts.len()));
        qemu_img(&[
            "convert",
            "-f",
            "raw",
            "-O",
            fmt,
            "-o",
            opts,
            base.to_str().unwrap(),
            f.to_str().unwrap(),
        ]);
        let img = t.import(&f, &format!("{fmt}-{}", opts.len()));
        assert_eq!(img["source_format"], fmt);
        assert_eq!(img["content_digest"], want, "{fmt} {opts}");
    }
}

/// Every hostile or broken input is refused and leaves the depot as it was.
#[test]
fn hostile_images_are_refused_and_change_nothing() {
    let t = T::new();
    let secret = t.path("host-secret.raw");
    std::fs::write(&secret, vec![0x42u8; 1 << 20]).unwrap();
    let s = secret.to_str().unwrap();
    let mk = |name: &str, args: &[&str]| {
        let p = t.path(name);
        let mut a: Vec<&str> = args.to_vec();
        a.push(p.to_str().unwrap());
        if args[0] == "create" {
            a.push("1M");
        }
        let o = Command::new("qemu-img")
            .args(&a)
            .current_dir(t.dir.path())
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        p
    };
    let backing = mk(
        "backing.qcow2",
        &["create", "-f", "qcow2", "-b", s, "-F", "raw"],
    );
    let datafile = mk(
        "datafile.qcow2",
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            &format!("data_file={s},data_file_raw=on"),
        ],
    );
    let flat = mk(
        "flat.vmdk",
        &["create", "-f", "vmdk", "-o", "subformat=monolithicFlat"],
    );
    let split = mk(
        "split.vmdk",
        &[
            "create",
            "-f",
            "vmdk",
            "-o",
            "subformat=twoGbMaxExtentSparse",
        ],
    );
    // a header that lies about its size
    let liar = mk("liar.qcow2", &["create", "-f", "qcow2"]);
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&liar).unwrap();
        f.write_all_at(&(1u64 << 40).to_be_bytes(), 24).unwrap();
    }
    // a truncated file
    let full = t.path("full.raw");
    synthetic_raw(&full, 4, 1);
    let trunc = t.path("trunc.qcow2");
    to_qcow2(&full, &trunc);
    let len = std::fs::metadata(&trunc).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&trunc)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let tiny = t.path("tiny.qcow2");
    std::fs::write(&tiny, b"QFI\xfb\0\0\0\x03").unwrap();

    t.import(&full, "keep"); // something in the depot that must survive
    let before = (
        t.json(&["image", "list", "--json"]),
        t.pack_files(),
        t.stats()["stored_bytes"].clone(),
    );
    let cases: Vec<(&Path, &str)> = vec![
        (&backing, "backing file"),
        (&datafile, "external data file"),
        (&flat, "descriptor"),
        (&split, "descriptor"),
        (&liar, "lies about its size"),
        (&trunc, ""),
        (&tiny, "truncated"),
    ];
    for (file, why) in cases {
        let (code, err) = t.fails(&[
            "image",
            "import",
            file.to_str().unwrap(),
            "--name",
            "evil",
            "-q",
        ]);
        assert_eq!(code, 4, "{err}");
        assert!(
            err.contains(file.file_name().unwrap().to_str().unwrap()),
            "names the file: {err}"
        );
        assert!(err.contains(why), "{file:?}: {err}");
        let after = (
            t.json(&["image", "list", "--json"]),
            t.pack_files(),
            t.stats()["stored_bytes"].clone(),
        );
        assert_eq!(before, after, "{file:?} changed the depot");
    }
    // content decides, not the name or the flag
    let (code, err) = t.fails(&[
        "image",
        "import",
        backing.to_str().unwrap(),
        "--name",
        "x",
        "--format",
        "raw",
    ]);
    assert_eq!(code, 4);
    assert!(err.contains("content is qcow2"), "{err}");
    t.assert_fsck_clean();
    assert!(items(&t.json(&["fsck", "--json"])["garbage"]).is_empty());
}

/// Flip one byte in stored chunk data: verify and export both catch it.
#[test]
fn flipped_byte_is_caught_by_verify_and_export() {
    let t = T::new();
    let src = t.path("syn.raw");
    synthetic_raw(&src, 8, 11);
    t.import(&src, "victim");
    t.ok(&["image", "verify"]);
    t.ok(&["image", "verify", "victim"]);
    let packs = t.pack_files();
    assert_eq!(packs.len(), 1);
    let len = std::fs::metadata(&packs[0]).unwrap().len();
    flip_bits(&packs[0], len / 2, 0x10);
    let (code, err) = t.fails(&["image", "verify", "-q"]);
    assert_eq!(code, 5, "{err}");
    let (code, err) = t.fails(&["image", "verify", "victim", "-q"]);
    assert_eq!(code, 5, "{err}");
    assert!(
        err.contains("victim") && err.contains("byte offset"),
        "{err}"
    );
    let out = t.path("out.raw");
    let (code, err) = t.fails(&["image", "export", "victim", out.to_str().unwrap(), "-q"]);
    assert_eq!(code, 5);
    assert!(err.contains("corrupt data at byte offset"), "{err}");
    assert!(!out.exists(), "a failed export leaves no file");
}

#[test]
fn related_images_dedup_in_stats() {
    let t = T::new();
    let f = fixtures();
    t.import(&f.join("A.raw"), "A");
    let after_a = t.stats();
    t.import(&f.join("B.raw"), "B");
    t.import(&f.join("B2.raw"), "B2");
    let s = t.stats();
    let stored_a = after_a["stored_bytes"].as_u64().unwrap();
    let stored = s["stored_bytes"].as_u64().unwrap();
    // B (changed in place) and B2 (same files, fresh mkfs) add little.
    assert!(
        stored < stored_a * 13 / 10,
        "A {stored_a} -> A+B+B2 {stored}"
    );
    assert!(s["dedup_ratio"].as_f64().unwrap() > 2.5, "{s}");
    assert_eq!(s["logical_bytes"], 3 * (512u64 << 20));
    let per: Vec<&Value> = items(&s["per_image"]).iter().collect();
    assert_eq!(per.len(), 3);
    for p in &per {
        let u = p["unique_stored_bytes"].as_u64().unwrap();
        let sh = p["shared_stored_bytes"].as_u64().unwrap();
        assert!(sh > 10 * u, "most of every image is shared: {p}");
    }
    // deleting B2 and gc frees B2's unique bytes only; the rest still exports
    let b2_unique = per.iter().find(|p| p["name"] == "B2").unwrap()["unique_stored_bytes"]
        .as_u64()
        .unwrap();
    t.ok(&["image", "delete", "B2"]);
    let gc = t.json(&["gc", "--json"]);
    assert!(gc["chunks_removed"].as_u64().unwrap() > 0);
    let after = t.stats();
    assert_eq!(after["images"], 2);
    assert!(after["stored_bytes"].as_u64().unwrap() <= stored);
    let _ = b2_unique;
    t.assert_fsck_clean();
    let out = t.path("b.out");
    t.ok(&["image", "export", "B", out.to_str().unwrap(), "-q"]);
    assert!(same_content(&f.join("B.raw"), &out));
}

#[test]
fn names_ids_and_errors() {
    let t = T::new();
    let src = t.path("s.raw");
    synthetic_raw(&src, 2, 5);
    t.import(&src, "one");
    let (code, err) = t.fails(&["image", "import", src.to_str().unwrap(), "--name", "one"]);
    assert_eq!(code, 1);
    assert!(err.contains("already exists"), "{err}");
    let (code, err) = t.fails(&["image", "show", "nope"]);
    assert_eq!(code, 3);
    assert!(err.contains("nope"), "{err}");
    let (_, err) = t.fails(&["image", "import", "/nonexistent/x.raw", "--name", "x"]);
    assert!(err.contains("/nonexistent/x.raw"), "{err}");
    let list = t.json(&["image", "list", "--json"]);
    assert_eq!(items(&list).len(), 1);
    for k in [
        "id",
        "name",
        "type",
        "state",
        "virtual_size",
        "content_digest",
        "created_at",
        "unique_stored_bytes",
    ] {
        assert!(list[0].get(k).is_some(), "list --json lacks {k}");
    }
    // VMDEPOT_DIR is honoured
    let o = Command::new(bin())
        .args(["image", "list", "--json"])
        .env("VMDEPOT_DIR", t.depot())
        .output()
        .unwrap();
    assert_eq!(serde_json::from_slice::<Value>(&o.stdout).unwrap(), list);
    // `| head` is not an error
    let mut c = t
        .cmd(&["image", "list"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    drop(c.stdout.take());
    assert!(c.wait().unwrap().success() || cfg!(not(target_os = "linux")));
}

/// A big, poorly compressible raw file: imports take long enough to be killed
/// at different points.

#[test]
fn kill_9_during_import_leaves_nothing_visible_and_gc_cleans() {
    let t = T::new();
    let small = t.path("small.raw");
    synthetic_raw(&small, 4, 9);
    t.import(&small, "survivor");
    let base_stats = t.stats();
    let src = slow_source(&t);
    for (i, ms) in [5u64, 60, 250, 700, 1500].into_iter().enumerate() {
        let mut child = t.spawn_import(&src, "killed");
        std::thread::sleep(Duration::from_millis(ms));
        let _ = child.kill(); // SIGKILL
        let st = child.wait().unwrap();
        let list = t.json(&["image", "list", "--json"]);
        let names = strs_at(&list, "name");
        if st.success() || names.contains(&"killed".to_owned()) {
            // committed before the kill (the kill may land between the
            // commit and the exit): then it must be whole
            assert!(
                names.contains(&"killed".to_owned()),
                "kill {i} at {ms} ms: {names:?}"
            );
            t.ok(&["image", "verify", "killed", "-q"]);
            t.ok(&["image", "delete", "killed"]);
        } else {
            assert_eq!(
                names,
                vec!["survivor"],
                "kill {i} at {ms} ms left a visible image"
            );
        }
        t.assert_fsck_clean();
        t.ok(&["gc"]);
        let f = t.assert_fsck_clean();
        assert!(items(&f["garbage"]).is_empty(), "after gc: {f}");
        assert_eq!(
            t.stats()["stored_bytes"],
            base_stats["stored_bytes"],
            "kill {i} at {ms} ms"
        );
        assert!(std::fs::read_dir(t.depot().join("tmp"))
            .unwrap()
            .next()
            .is_none());
    }
    // the name is free again and a full import works
    t.import(&src, "killed");
    t.ok(&["image", "verify", "killed", "-q"]);
}

#[test]
fn concurrent_imports_list_and_gc() {
    let t = T::new();
    let f = fixtures();
    let q = t.path("a.qcow2");
    to_qcow2(&f.join("A.raw"), &q);
    let files = [
        f.join("A.raw"),
        f.join("B.raw"),
        f.join("B2.raw"),
        q.clone(),
    ];
    let mut children: Vec<_> = files
        .iter()
        .enumerate()
        .map(|(i, p)| t.spawn_import(p, &format!("c{i}")))
        .collect();
    // gc, list and fsck over and over while they run: none of them waits
    // long for the others, and the store is consistent at every moment.
    let mut rounds = 0;
    while rounds < 3 || children.iter_mut().any(|c| c.try_wait().unwrap().is_none()) {
        t.ok(&["gc"]);
        t.ok(&["image", "list"]);
        t.assert_fsck_clean();
        rounds += 1;
    }
    for mut c in children {
        assert!(c.wait().unwrap().success());
    }
    t.ok(&["gc"]);
    t.assert_fsck_clean();
    t.ok(&["image", "verify"]);
    let list = t.json(&["image", "list", "--json"]);
    assert_eq!(items(&list).len(), 4);
    // c3 is c0's file as qcow2: the same content. (By name: the list is
    // ordered by creation second, which the four racing imports may split.)
    let digest_of =
        |n: &str| items(&list).iter().find(|i| i["name"] == n).unwrap()["content_digest"].clone();
    assert_eq!(digest_of("c0"), digest_of("c3"));
    for (i, p) in files[..3].iter().enumerate() {
        let out = t.path(&format!("o{i}"));
        t.ok(&[
            "image",
            "export",
            &format!("c{i}"),
            out.to_str().unwrap(),
            "-q",
        ]);
        assert!(same_content(p, &out));
    }
}

#[test]
fn gc_racing_a_reusing_import_never_loses_chunks() {
    // Image x holds the chunks of `head`; an import of head+tail (a file
    // never imported, so it is read) reuses them while x is deleted and gc
    // runs over and over. gc collects them before the import commits (the
    // tail takes a while to store): the import notices, starts over (it
    // logs so), and ends complete and verifiable. Up to ROUNDS rounds, each
    // on a fresh depot, until that retry has been seen.
    const ROUNDS: usize = 3;
    let files = T::new();
    let head = files.path("head.raw");
    write_noise(&mut std::fs::File::create(&head).unwrap(), 64, 1);
    let both = files.path("both.raw");
    std::fs::copy(&head, &both).unwrap();
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&both)
        .unwrap();
    write_noise(&mut f, 128, 2);
    drop(f);
    let mut restarts = 0;
    for round in 1..=ROUNDS {
        restarts += race_gc_against_reuse(&head, &both);
        eprintln!("round {round}: {restarts} restarts so far");
        if restarts > 0 {
            break;
        }
    }
    assert!(
        restarts > 0,
        "in {ROUNDS} rounds gc never collected a chunk the import reused before it committed"
    );
}

/// One round of [`gc_racing_a_reusing_import_never_loses_chunks`]: returns
/// how often the import started over.
fn race_gc_against_reuse(head: &Path, both: &Path) -> usize {
    let t = T::new();
    t.import(head, "x");
    let mut child = t
        .import_cmd(both, "y")
        .env("VMDEPOT_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Once it has read a part of head, it has looked up (and reuses) x's
    // chunks of that part.
    let pid = child.id();
    wait_until(
        "the import reads its input",
        Duration::from_secs(60),
        || bytes_read(pid) >= 32 << 20 || child.try_wait().unwrap().is_some(),
    );
    t.ok(&["image", "delete", "x"]);
    while child.try_wait().unwrap().is_none() {
        t.ok(&["gc"]);
    }
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "import of head+tail: {err}");
    t.ok(&["gc"]);
    t.ok(&["image", "verify", "y", "-q"]);
    t.assert_fsck_clean();
    let out = t.path("y.out");
    t.ok(&["image", "export", "y", out.to_str().unwrap(), "-q"]);
    assert!(
        same_content(both, &out),
        "y exports other bytes than its file"
    );
    err.matches("collected reused chunks; starting over")
        .count()
}

/// Bytes process `pid` has read so far (`rchar` of `/proc/PID/io`); 0
/// once it is gone.
fn bytes_read(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/io"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("rchar: "))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[test]
fn enospc_during_import_leaves_the_depot_usable() {
    if !nix_is_root() {
        eprintln!("enospc test needs root to mount a tmpfs; CI runs as root");
        return;
    }
    let t = T::new();
    let fs = Tmpfs::new(&t, "small-fs", "48m");
    let depot = fs.0.join("depot");
    let run = |args: &[&str]| run_in(&depot, args);
    let small = t.path("small.raw");
    synthetic_raw(&small, 4, 2);
    ok_in(
        &depot,
        &[
            "image",
            "import",
            small.to_str().unwrap(),
            "--name",
            "small",
            "-q",
        ],
    );
    let big = slow_source(&t); // 384 MiB of noise: cannot fit in 48 MiB
    let o = run(&[
        "image",
        "import",
        big.to_str().unwrap(),
        "--name",
        "big",
        "-q",
    ]);
    assert_eq!(
        o.status.code(),
        Some(6),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("no space left"), "{err}");
    // usable: list, fsck, another import, export
    let list: Value = serde_json::from_slice(&run(&["image", "list", "--json"]).stdout).unwrap();
    assert_eq!(items(&list).len(), 1);
    let f: Value = serde_json::from_slice(&run(&["fsck", "--json"]).stdout).unwrap();
    assert!(
        items(&f["problems"]).is_empty() && items(&f["garbage"]).is_empty(),
        "{f}"
    );
    let small2 = t.path("small2.raw");
    synthetic_raw(&small2, 4, 3);
    ok_in(
        &depot,
        &[
            "image",
            "import",
            small2.to_str().unwrap(),
            "--name",
            "small2",
            "-q",
        ],
    );
    let out = t.path("small.out");
    assert!(run(&["image", "export", "small", out.to_str().unwrap()])
        .status
        .success());
    assert!(same_content(&small, &out));
}

#[test]
fn reimport_trusts_only_an_unchanged_file() {
    let t = T::new();
    let src = t.path("s.raw");
    synthetic_raw(&src, 6, 21);
    let one = t.import(&src, "one");
    // unchanged: same content (taken without reading), no new data
    let packs = t.pack_files();
    let two = t.import(&src, "two");
    assert_eq!(two["content_digest"], one["content_digest"]);
    assert_eq!(t.pack_files(), packs);
    // the same size, another content: must be read again
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&src).unwrap();
        f.write_all_at(b"changed!", 3 << 20).unwrap();
    }
    let three = t.import(&src, "three");
    let want = blake3::hash(&std::fs::read(&src).unwrap())
        .to_hex()
        .to_string();
    assert_eq!(three["content_digest"], want.as_str());
    assert_ne!(three["content_digest"], one["content_digest"]);
    // the image it was taken from is gone: read again, still right
    t.ok(&["image", "delete", "three"]);
    t.ok(&["gc"]);
    let four = t.import(&src, "four");
    assert_eq!(four["content_digest"], want.as_str());
    t.ok(&["image", "verify", "four"]);
    t.ok(&["image", "verify", "two"]);
    let out = t.path("four.out");
    t.ok(&["image", "export", "four", out.to_str().unwrap()]);
    assert!(same_content(&src, &out));
    // --reread reads even an unchanged file
    let five = t.json(&[
        "image",
        "import",
        src.to_str().unwrap(),
        "--name",
        "five",
        "--reread",
        "--json",
        "-q",
    ]);
    assert_eq!(five["content_digest"], want.as_str());
}

#[test]
fn thin_64_gib_image_round_trips_touching_only_its_data() {
    use std::os::unix::fs::FileExt;
    let t = T::new();
    let src = t.path("thin.raw");
    let size: u64 = 64 << 30;
    let f = std::fs::File::create(&src).unwrap();
    f.set_len(size).unwrap();
    let data: Vec<u8> = (0..3 << 20)
        .map(|i: u32| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    f.write_all_at(&data, (40 << 30) + 4096).unwrap();
    f.write_all_at(&[7u8; 1024], size - 1024).unwrap();
    drop(f);
    let img = t.import(&src, "thin");
    assert_eq!(img["virtual_size"], size);
    assert!(img["data_bytes"].as_u64().unwrap() <= (3 << 20) + 2 * 4096);
    let out = t.path("thin.out");
    t.ok(&["image", "export", "thin", out.to_str().unwrap(), "-q"]);
    assert_eq!(std::fs::metadata(&out).unwrap().len(), size);
    assert!(
        allocated(&out) < 8 << 20,
        "export is sparse: {}",
        allocated(&out)
    );
    let o = std::fs::File::open(&out).unwrap();
    let mut got = vec![0u8; data.len()];
    o.read_exact_at(&mut got, (40 << 30) + 4096).unwrap();
    assert!(got == data);
    let mut tail = [0u8; 2048];
    o.read_exact_at(&mut tail, size - 2048).unwrap();
    assert_eq!(&tail[..1024], &[0u8; 1024][..]);
    assert_eq!(&tail[1024..], &[7u8; 1024][..]);
    t.ok(&["image", "verify", "thin", "-q"]);
    // the digest is the BLAKE3 of the whole 64 GiB
    let mut h = blake3::Hasher::new();
    let z = vec![0u8; 1 << 20];
    let mut pos = 0u64;
    for (off, bytes) in [
        ((40u64 << 30) + 4096, &data[..]),
        (size - 1024, &[7u8; 1024][..]),
    ] {
        while pos < off {
            let n = (off - pos).min(z.len() as u64) as usize;
            h.update(&z[..n]);
            pos += n as u64;
        }
        h.update(bytes);
        pos += bytes.len() as u64;
    }
    assert_eq!(img["content_digest"], h.finalize().to_hex().as_str());
}

#[test]
fn gc_repacks_mostly_dead_packs() {
    use std::os::unix::fs::FileExt;
    let t = T::new();
    // P: 8 MiB of data; Q: the first 2 MiB of the same data, then zeros.
    let p = t.path("p.raw");
    synthetic_raw(&p, 8, 31);
    let q = t.path("q.raw");
    let f = std::fs::File::create(&q).unwrap();
    let mut head = vec![0u8; 2 << 20];
    std::fs::File::open(&p)
        .unwrap()
        .read_exact_at(&mut head, 0)
        .unwrap();
    f.write_all_at(&head, 0).unwrap();
    f.set_len(8 << 20).unwrap();
    drop(f);
    t.import(&p, "p");
    t.import(&q, "q");
    let before = t.stats()["stored_bytes"].as_u64().unwrap();
    t.ok(&["image", "delete", "p"]);
    let dry = t.json(&["gc", "--dry-run", "--json"]);
    assert_eq!(dry["packs_repacked"], 1, "{dry}");
    assert_eq!(
        t.stats()["stored_bytes"].as_u64().unwrap(),
        before,
        "dry run changes nothing"
    );
    let gc = t.json(&["gc", "--json"]);
    assert_eq!(gc["packs_repacked"], 1, "{gc}");
    let after = t.stats()["stored_bytes"].as_u64().unwrap();
    assert!(after * 2 < before, "repacked: {before} -> {after}");
    let f = t.assert_fsck_clean();
    assert!(items(&f["garbage"]).is_empty(), "{f}");
    t.ok(&["image", "verify"]);
    let out = t.path("q.out");
    t.ok(&["image", "export", "q", out.to_str().unwrap()]);
    assert!(same_content(&q, &out));
    // nothing left to do
    assert_eq!(t.json(&["gc", "--json"])["packs_repacked"], 0);
}

/// A flip that zstd cannot notice (in stored, incompressible data) is
/// caught by the digest and located to the exact 4 KiB block.
#[test]
fn silent_corruption_is_located_to_its_block() {
    let t = T::new();
    let src = t.path("noise.raw");
    let mut x: u64 = 0x9e3779b97f4a7c15;
    let data: Vec<u8> = (0..16 * 4096)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(&src, &data).unwrap();
    t.import(&src, "noise");
    let packs = t.pack_files();
    assert_eq!(packs.len(), 1);
    // the last byte of the last chunk
    let last = std::fs::metadata(&packs[0]).unwrap().len() - 1;
    flip_bits(&packs[0], last, 1);
    let out = t.path("noise.out");
    for args in [
        vec!["image", "export", "noise", out.to_str().unwrap()],
        vec!["image", "verify", "noise"],
    ] {
        let (code, err) = t.fails(&args);
        assert_eq!(code, 5, "{err}");
        assert!(
            err.contains("noise") && err.contains("byte offset 61440"),
            "{err}"
        );
    }
    assert!(!out.exists());
    let (code, _) = t.fails(&["image", "verify"]);
    assert_eq!(code, 5);
}

#[test]
fn content_repeated_after_a_catalog_batch_is_stored_once() {
    // 384 MiB of new data is more than one batch of frames entered as
    // pending rows; its first 8 MiB come again at the end, after that batch
    // left the importer's memory: they must be found in the catalog.
    let t = T::new();
    let src = slow_source(&t);
    let head = {
        use std::io::Read;
        let mut b = vec![0u8; 8 << 20];
        std::fs::File::open(&src)
            .unwrap()
            .read_exact(&mut b)
            .unwrap();
        b
    };
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().append(true).open(&src).unwrap();
        f.write_all(&head).unwrap();
    }
    let img = t.import(&src, "rep");
    assert_eq!(img["data_bytes"], 392u64 << 20);
    let s = t.stats();
    assert_eq!(s["chunks"], (384u64 << 20) / 4096, "{s}");
    t.ok(&["image", "verify", "rep", "-q"]);
}

#[test]
fn concurrent_imports_of_the_same_content_are_merged_by_gc() {
    // Two imports of one file at once: neither sees the other's chunks
    // before they commit, so both may store them; gc then keeps one of each.
    let t = T::new();
    let src = slow_source(&t);
    let a = t.spawn_import(&src, "one");
    let b = t.spawn_import(&src, "two");
    assert!(a.wait_with_output().unwrap().status.success());
    assert!(b.wait_with_output().unwrap().status.success());
    let before = t.stats();
    let r = t.json(&["gc", "--json"]);
    let s = t.stats();
    let unique = (384u64 << 20) / 4096;
    assert_eq!(s["chunks"], unique, "after gc: {s}");
    assert_eq!(
        r["chunks_merged"].as_u64().unwrap(),
        before["chunks"].as_u64().unwrap() - unique
    );
    // Whole dead packs are gone and mostly dead ones repacked; packs at
    // least half live keep their dead frames (gc's repack policy).
    let (b0, b1) = (
        before["stored_bytes"].as_u64().unwrap(),
        s["stored_bytes"].as_u64().unwrap(),
    );
    if r["chunks_merged"].as_u64().unwrap() > unique / 4 {
        assert!(b1 < b0 * 9 / 10, "{b0} -> {b1}");
    }
    assert!(b1 <= 2 * (384u64 << 20) + (1 << 20), "{s}");
    t.ok(&["image", "verify", "-q"]);
    let one = t.json(&["image", "show", "one", "--json"]);
    let two = t.json(&["image", "show", "two", "--json"]);
    assert_eq!(one["content_digest"], two["content_digest"]);
    let out = t.path("out.raw");
    t.ok(&["image", "export", "two", out.to_str().unwrap(), "-q"]);
    assert!(same_content(&src, &out));
    t.assert_fsck_clean();
}

/// Flips bits of the byte at `off` in `file` (corruption on disk).
fn flip_bits(file: &Path, off: u64, mask: u8) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(file)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, off).unwrap();
    f.write_all_at(&[b[0] ^ mask], off).unwrap();
}
