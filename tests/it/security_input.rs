//! Hostile inputs (issue: untrusted images): a name, a prefix, a swap of the
//! file or the content of its headers never makes vmdepot or qemu read
//! another host file; inputs that are not files, or too big, are refused at
//! once; foreign formats convert without a temporary raw copy.

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::common::{items, qemu_img, slow_source, T};

fn qemu_io_write(img: &Path, fmt: &str, pattern: u8, off: u64, len: u64) {
    let o = Command::new("qemu-io")
        .args(["-f", fmt, "-c"])
        .arg(format!("write -P {pattern} {off} {len}"))
        .arg(img)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// blake3 of what qemu-img reads from `img` as raw.
fn raw_digest(t: &T, img: &Path, fmt: &str) -> String {
    let out = t.path("digest.raw");
    qemu_img(&[
        "convert",
        "-f",
        fmt,
        "-O",
        "raw",
        img.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    let d = blake3::hash(&std::fs::read(&out).unwrap())
        .to_hex()
        .to_string();
    std::fs::remove_file(out).unwrap();
    d
}

fn small_qcow2(t: &T, name: &str, pattern: u8) -> PathBuf {
    let p = t.path(name);
    qemu_img(&["create", "-q", "-f", "qcow2", p.to_str().unwrap(), "4M"]);
    qemu_io_write(&p, "qcow2", pattern, 1 << 20, 64 << 10);
    p
}

fn secret(t: &T) -> PathBuf {
    let p = t.path("secret.txt");
    let mut s = b"TOP SECRET host file ".repeat(200);
    s.resize(64 << 10, b'!');
    std::fs::write(&p, s).unwrap();
    p
}

/// `image import FILE --name NAME` in the background, stderr captured.
fn import_child(t: &T, file: &Path, name: &str) -> std::process::Child {
    t.import_cmd(file, name)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Overwrites `bytes` of `file` at `off` (a header field).
fn patch(file: &Path, off: u64, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(file).unwrap();
    f.write_all_at(bytes, off).unwrap();
}

fn image_count(t: &T) -> usize {
    items(&t.json(&["image", "list", "--json"])).len()
}

#[test]
fn a_file_named_like_a_qemu_protocol_is_read_as_the_file_it_is() {
    let t = T::new();
    secret(&t);
    let benign = small_qcow2(&t, "x.qcow2", 0x5a);
    let want = raw_digest(&t, &benign, "qcow2");
    let names = [
        r#"json:{"driver":"qcow2","file":{"driver":"file","filename":"x.qcow2"},"data-file":{"driver":"file","filename":"secret.txt"}}"#,
        "nbd:127.0.0.1:10809",
        "file:secret.txt",
    ];
    for (i, name) in names.iter().enumerate() {
        std::fs::copy(&benign, t.path(name)).unwrap();
        let o = t
            .cmd(&[
                "image",
                "import",
                name,
                "--name",
                &format!("p{i}"),
                "--json",
                "-q",
            ])
            .current_dir(t.dir.path())
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let img: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(
            img["content_digest"],
            want.as_str(),
            "{name} read another file"
        );
    }
}

#[test]
fn swapping_the_file_during_an_import_never_reads_a_host_file() {
    let t = T::new();
    let secret = secret(&t);
    let benign = small_qcow2(&t, "benign.qcow2", 0x5a);
    let want = raw_digest(&t, &benign, "qcow2");
    // A hostile qcow2: its backing file is the secret, read as raw.
    let hostile = t.path("hostile.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        secret.to_str().unwrap(),
        "-F",
        "raw",
        hostile.to_str().unwrap(),
        "4M",
    ]);
    let target = t.path("in.qcow2");
    std::fs::copy(&benign, &target).unwrap();
    let stop = AtomicBool::new(false);
    /// Stops the swapper even when an assertion fails (the scope joins it).
    struct Stop<'a>(&'a AtomicBool);
    impl Drop for Stop<'_> {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Relaxed);
        }
    }
    let mut outcomes = std::collections::BTreeMap::new();
    std::thread::scope(|s| {
        let _stop = Stop(&stop);
        s.spawn(|| {
            let tmp = t.path("swap.tmp");
            let mut k = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let from = if k % 2 == 0 { &hostile } else { &benign };
                std::fs::copy(from, &tmp).unwrap();
                std::fs::rename(&tmp, &target).unwrap();
                k += 1;
                std::thread::sleep(Duration::from_millis(3));
            }
        });
        for i in 0..30 {
            let o = t
                .cmd(&[
                    "image",
                    "import",
                    target.to_str().unwrap(),
                    "--name",
                    &format!("s{i}"),
                    "--json",
                    "-q",
                ])
                .output()
                .unwrap();
            let outcome = if o.status.success() {
                let img: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
                assert_eq!(
                    img["content_digest"],
                    want.as_str(),
                    "import {i} stored another file's bytes"
                );
                "stored the benign image"
            } else {
                let err = String::from_utf8_lossy(&o.stderr);
                assert_eq!(o.status.code(), Some(4), "import {i}: {err}");
                if err.contains("backing file") {
                    "refused: backing file"
                } else if err.contains("changed while it was imported") {
                    "refused: changed (renamed over) while imported"
                } else {
                    panic!("import {i}: {err}");
                }
            };
            *outcomes.entry(outcome).or_insert(0) += 1;
        }
    });
    eprintln!("30 imports under a swapping file: {outcomes:?}");
    // Without the swapper the same path imports as the benign image.
    std::fs::copy(&benign, &target).unwrap();
    assert_eq!(t.import(&target, "calm")["content_digest"], want.as_str());
    t.assert_fsck_clean();
}

/// A monolithicSparse VMDK made by qemu-img, its embedded descriptor
/// replaced by `desc` (and its capacity by `capacity`, in sectors).
fn vmdk_with(t: &T, name: &str, capacity: Option<u64>, desc: &str) -> PathBuf {
    let p = t.path(name);
    qemu_img(&["create", "-q", "-f", "vmdk", p.to_str().unwrap(), "4M"]);
    if let Some(c) = capacity {
        patch(&p, 12, &c.to_le_bytes());
    }
    let mut d = desc.as_bytes().to_vec();
    d.resize(512, 0);
    patch(&p, 512, &d);
    p
}

#[test]
fn vmdk_descriptors_that_qemu_would_follow_are_refused_without_hanging() {
    let t = T::new();
    let fifo = t.path("extent.fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let secret = secret(&t);
    let cases = [
        // capacity 0: qemu reads the embedded descriptor as a descriptor
        // file and opens its extents (tabs and a comment fool a line parser)
        (
            vmdk_with(
                &t,
                "cap0.vmdk",
                Some(0),
                &format!("# Disk DescriptorFile\nversion=1\n#createType=\"monolithicSparse\"\ncreateType=\"monolithicFlat\"\nRW\t8192\tFLAT\t\"{}\" 0\n", fifo.display()),
            ),
            "capacity of 0",
        ),
        // a parent named in a comment: qemu's strstr still finds it
        (
            vmdk_with(
                &t,
                "parent.vmdk",
                None,
                &format!("# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType=\"monolithicSparse\"\n# parentFileNameHint=\"{}\"\nRW 8192 SPARSE \"parent.vmdk\"\n", secret.display()),
            ),
            "parentFileNameHint",
        ),
    ];
    for (img, why) in cases {
        let start = Instant::now();
        let mut child = import_child(&t, &img, "v");
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            if start.elapsed() > Duration::from_secs(30) {
                let _ = child.kill();
                panic!("{}: import hangs", img.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut err = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
        assert_eq!(status.code(), Some(4), "{}: {err}", img.display());
        assert!(err.contains(why), "{}: {err}", img.display());
    }
    assert_eq!(image_count(&t), 0);
}

#[test]
fn vdi_imports_and_a_differencing_vdi_is_refused() {
    let t = T::new();
    let p = t.path("d.vdi");
    qemu_img(&["create", "-q", "-f", "vdi", p.to_str().unwrap(), "8M"]);
    qemu_io_write(&p, "vdi", 0x33, 3 << 20, 256 << 10);
    let want = raw_digest(&t, &p, "vdi");
    let img = t.import(&p, "vdi");
    assert_eq!(img["content_digest"], want.as_str());
    assert_eq!(img["source_format"], "vdi");
    let diff = t.path("diff.vdi");
    std::fs::copy(&p, &diff).unwrap();
    patch(&diff, 76, &4u32.to_le_bytes());
    t.refuses(
        &["image", "import", diff.to_str().unwrap(), "--name", "d"],
        4,
        "parent",
    );
}

#[test]
fn inputs_that_are_not_files_are_refused_at_once() {
    let t = T::new();
    let fifo = t.path("in.fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    for (p, what) in [
        (fifo.as_path(), "a FIFO"),
        (Path::new("/dev/zero"), "a character device"),
        (t.dir.path(), "a directory"),
    ] {
        let start = Instant::now();
        let (code, err) = t.fails(&["image", "import", p.to_str().unwrap(), "--name", "x"]);
        assert!(start.elapsed() < Duration::from_secs(10), "{what}: slow");
        assert_eq!(code, 4, "{err}");
        assert!(err.contains(what), "{err}");
    }
    assert_eq!(image_count(&t), 0);
}

#[test]
fn a_virtual_size_over_the_limit_is_refused_before_any_hashing() {
    let t = T::new();
    let p = t.path("huge.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", p.to_str().unwrap(), "15T"]);
    let start = Instant::now();
    let (code, err) = t.fails(&["image", "import", p.to_str().unwrap(), "--name", "huge"]);
    assert!(start.elapsed() < Duration::from_secs(10));
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("over the limit"), "{err}");
    // a thin raw file too
    let r = t.path("huge.raw");
    std::fs::File::create(&r).unwrap().set_len(5 << 40).unwrap();
    let (code, err) = t.fails(&["image", "import", r.to_str().unwrap(), "--name", "huge"]);
    assert_eq!(code, 4, "{err}");
}

#[test]
fn a_compressed_qcow2_converts_without_a_temporary_raw_copy() {
    let t = T::new();
    // 768 MiB of non-zero, highly compressible data: a few MiB as qcow2 -c.
    let raw = t.path("fill.raw");
    {
        let mut f = std::fs::File::create(&raw).unwrap();
        let block: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8 + 1).collect();
        for _ in 0..768 {
            f.write_all(&block).unwrap();
        }
    }
    let q = t.path("fill.qcow2");
    qemu_img(&[
        "convert",
        "-q",
        "-c",
        "-O",
        "qcow2",
        raw.to_str().unwrap(),
        q.to_str().unwrap(),
    ]);
    let want = blake3::hash(&std::fs::read(&raw).unwrap())
        .to_hex()
        .to_string();
    std::fs::remove_file(&raw).unwrap();
    assert!(std::fs::metadata(&q).unwrap().len() < 64 << 20);
    t.ok(&["gc"]); // creates the depot (a command that only looks would not)
    let mut child = t.spawn_import(&q, "fill");
    let mut peak = 0u64;
    let st = loop {
        peak = peak.max(dir_bytes(&t.depot().join("tmp")));
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(st.success());
    assert!(peak < 16 << 20, "temporary files reached {peak} bytes");
    let img = t.json(&["image", "show", "fill", "--json"]);
    assert_eq!(img["content_digest"], want.as_str());
    // only distinct chunks are stored: 251-byte period over 4 KiB blocks
    assert!(t.stats()["stored_bytes"].as_u64().unwrap() < 64 << 20);
}

fn dir_bytes(d: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(rd) = std::fs::read_dir(d) else {
        return 0;
    };
    rd.flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.blocks() * 512,
            Err(_) => 0,
        })
        .sum()
}

#[test]
fn a_file_that_changes_while_it_is_imported_is_refused() {
    let t = T::new();
    let p = slow_source(&t);
    t.ok(&["gc"]); // creates the depot
    let mut child = import_child(&t, &p, "busy");
    std::thread::sleep(Duration::from_millis(300));
    let still_running = child.try_wait().unwrap().is_none();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .write_all_at(b"changed", 300 << 20)
        .unwrap();
    let out = child.wait_with_output().unwrap();
    if still_running {
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(4), "{err}");
        assert!(err.contains("changed while it was imported"), "{err}");
        assert_eq!(image_count(&t), 0);
        t.ok(&["gc"]);
        assert_eq!(t.stats()["stored_bytes"], 0);
    } else {
        eprintln!("the import ended before the file was changed: nothing to check");
    }
}

#[test]
fn user_data_and_keys_are_capped() {
    let t = T::new();
    let disk = t.path("d.raw");
    std::fs::write(&disk, vec![1u8; 1 << 20]).unwrap();
    t.import(&disk, "d");
    let big = t.path("big.yaml");
    std::fs::write(&big, vec![b'#'; 2 << 20]).unwrap();
    for (flag, file) in [
        ("--user-data", Path::new("/dev/zero")),
        ("--user-data", big.as_path()),
        ("--ssh-key", big.as_path()),
    ] {
        let start = Instant::now();
        let (code, err) = t.fails(&["instance", "run", "d", flag, file.to_str().unwrap()]);
        assert!(start.elapsed() < Duration::from_secs(10));
        assert_eq!(code, 4, "{err}");
        assert!(err.contains(&file.display().to_string()), "{err}");
    }
    let ins = t.json(&["instance", "list", "--json"]);
    assert_eq!(items(&ins).len(), 0);
}

/// Found by a stranger's attack: headers whose tables qemu allocates and
/// reads whole (a VDI block map, a VHD block table) claimed gigabytes from
/// a 1 KiB file: qemu-img check printed a line per block (9.7 GB) into an
/// unbounded buffer, and a VHD made qemu-img take 2 GiB.
#[test]
fn tables_larger_than_the_file_are_refused_before_qemu_reads_them() {
    let t = T::new();
    let vdi = t.path("v.vdi");
    qemu_img(&["create", "-q", "-f", "vdi", vdi.to_str().unwrap(), "4M"]);
    patch(&vdi, 384, &0x1000_0000u32.to_le_bytes());
    let vhd = t.path("v.vhd");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vpc",
        "-o",
        "subformat=dynamic",
        vhd.to_str().unwrap(),
        "4M",
    ]);
    patch(&vhd, 512 + 28, &0x1fe0_0000u32.to_be_bytes());
    for (img, what) in [(&vdi, "VDI block map"), (&vhd, "VHD block table")] {
        let start = Instant::now();
        let (code, err) = t.fails(&["image", "import", img.to_str().unwrap(), "--name", "x"]);
        assert!(start.elapsed() < Duration::from_secs(10));
        assert_eq!(code, 4, "{err}");
        assert!(err.contains(what), "{err}");
    }
}

/// Found by a stranger's attack: qemu reads a VHD's footer copy at offset 0
/// first, vmdepot read the one at the end: a differencing type at offset 0
/// passed.
#[test]
fn a_differencing_vhd_in_either_footer_copy_is_refused() {
    let t = T::new();
    let vhd = t.path("mix.vhd");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vpc",
        "-o",
        "subformat=dynamic",
        vhd.to_str().unwrap(),
        "4M",
    ]);
    patch(&vhd, 60, &4u32.to_be_bytes());
    t.refuses(
        &["image", "import", vhd.to_str().unwrap(), "--name", "x"],
        4,
        "differencing",
    );
}

/// Found by a stranger's attack: a socket gave a doubled OS error (exit 1);
/// user-data from a FIFO whose writer never finishes hung.
#[test]
fn sockets_and_stalled_pipes_are_refused() {
    let t = T::new();
    let sock = t.path("s.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    t.refuses(
        &["image", "import", sock.to_str().unwrap(), "--name", "x"],
        4,
        "a socket",
    );
    let (code, err) = t.fails(&["image", "import", "/nonexistent.qcow2", "--name", "x"]);
    assert_eq!(err.matches("os error 2").count(), 1, "{err}");
    assert_ne!(code, 0);
    let disk = t.path("d.raw");
    std::fs::write(&disk, vec![1u8; 1 << 20]).unwrap();
    t.import(&disk, "d");
    let fifo = t.path("ud.fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    // a writer that holds the FIFO open and never writes
    let mut writer = Command::new("sh")
        .arg("-c")
        .arg(format!("exec 3>'{}'; sleep 30", fifo.display()))
        .spawn()
        .unwrap();
    let start = Instant::now();
    let (code, err) = t.fails(&[
        "instance",
        "run",
        "d",
        "--user-data",
        fifo.to_str().unwrap(),
    ]);
    let took = start.elapsed();
    let _ = writer.kill();
    let _ = writer.wait();
    assert!(took < Duration::from_secs(20), "took {took:?}");
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("within 10 s"), "{err}");
}
