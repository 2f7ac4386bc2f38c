//! `S3Store` against a real 3-node Garage cluster (`garage.rs`): objects
//! written whole and by multipart upload, ranged reads, listing with
//! times, deferred deletion (retire, revive, purge), the one-line errors
//! of wrong credentials, a missing bucket and an unreachable endpoint, and
//! a node lost while writing.

use std::time::{Duration, Instant};

use vmdepot::internals::store::{
    is_not_found, ObjectKind, ObjectStore, S3Credentials, S3Location, S3Store,
};
use vmdepot::Error;

use crate::garage::{Garage, REGION};

const PACK: &str = "00112233445566778899aabbccddeeff";
const PACK2: &str = "ff112233445566778899aabbccddeeff";
const MANIFEST: &str = "img-0123456789abcdef.0.manifest";

/// `n` bytes that do not repeat at any small period (`seed` varies them).
fn bytes(n: usize, seed: u32) -> Vec<u8> {
    (0..n as u32)
        .map(|i| (i.wrapping_add(seed).wrapping_mul(2654435761) >> 13) as u8)
        .collect()
}

fn names(store: &S3Store, kind: ObjectKind) -> Vec<String> {
    let mut v: Vec<String> = store
        .list(kind)
        .unwrap()
        .into_iter()
        .map(|o| o.name)
        .collect();
    v.sort();
    v
}

#[test]
fn s3_objects_put_get_stat_list() {
    let g = Garage::start();
    let s = g.store("depots/a");
    let before = std::time::SystemTime::now() - Duration::from_secs(60);
    s.put(ObjectKind::Meta, "VMDEPOT", b"marker").unwrap();
    s.put(ObjectKind::Manifest, MANIFEST, b"manifest").unwrap();
    s.put(ObjectKind::PackIndex, PACK, b"index").unwrap();
    let mut w = s.create(ObjectKind::Pack, PACK).unwrap();
    w.append(b"pack ").unwrap();
    w.append(b"bytes").unwrap();
    assert_eq!(w.len(), 10);
    assert_eq!(w.seal().unwrap(), 10);

    assert_eq!(
        s.get(ObjectKind::Meta, "VMDEPOT").unwrap().unwrap(),
        b"marker"
    );
    assert_eq!(
        s.get(ObjectKind::Pack, PACK).unwrap().unwrap(),
        b"pack bytes"
    );
    assert_eq!(s.stat(ObjectKind::PackIndex, PACK).unwrap(), Some(5));
    assert_eq!(s.stat(ObjectKind::Pack, PACK2).unwrap(), None);
    assert_eq!(
        s.get(ObjectKind::Manifest, "img-1.0.manifest").unwrap(),
        None
    );
    for kind in ObjectKind::ALL {
        let list = s.list(kind).unwrap();
        assert_eq!(list.len(), 1, "{kind:?}: {list:?}");
        let m = list[0].modified.unwrap();
        assert!(m > before && m < std::time::SystemTime::now() + Duration::from_secs(60));
    }
    assert_eq!(s.list(ObjectKind::Pack).unwrap()[0].size, 10);

    // Written once: a name in use is refused, by put and create alike.
    let e = s.put(ObjectKind::Meta, "VMDEPOT", b"again").unwrap_err();
    assert!(
        matches!(&e, Error::Io { error, .. } if error.kind() == std::io::ErrorKind::AlreadyExists),
        "{e}"
    );
    assert!(s.create(ObjectKind::Pack, PACK).is_err());
    // Names outside the layout's rules never become keys.
    let e = s.put(ObjectKind::Manifest, "../escape", b"x").unwrap_err();
    assert!(
        e.to_string()
            .starts_with("remote garage: refused an object name"),
        "{e}"
    );
    assert_eq!(e.exit_code(), 8);

    // Another prefix of the same bucket is another depot.
    let other = g.store("depots/b");
    assert!(other.list(ObjectKind::Pack).unwrap().is_empty());
    assert!(other.list(ObjectKind::Meta).unwrap().is_empty());
    assert_eq!(
        names(&g.store("depots"), ObjectKind::Meta),
        Vec::<String>::new()
    );
    other.probe().unwrap();
}

#[test]
fn s3_multipart_odd_appends_read_by_ranges() {
    let g = Garage::start();
    let s = g.store("");
    let data = bytes(20 << 20, 7);
    let mut w = s.create(ObjectKind::Pack, PACK).unwrap();
    let sizes = [1, 4095, 1_000_003, 7_777_777, 3, 9_000_001, 65_537];
    let mut at = 0;
    for n in sizes.iter().cycle() {
        let end = (at + n).min(data.len());
        w.append(&data[at..end]).unwrap();
        at = end;
        if at == data.len() {
            break;
        }
    }
    // Nothing is visible before the seal.
    assert_eq!(s.stat(ObjectKind::Pack, PACK).unwrap(), None);
    assert_eq!(w.seal().unwrap(), data.len() as u64);
    assert_eq!(
        s.stat(ObjectKind::Pack, PACK).unwrap(),
        Some(data.len() as u64)
    );

    let r = s.open(ObjectKind::Pack, PACK).unwrap();
    assert_eq!(r.len(), data.len() as u64);
    let part = 8 << 20;
    for (off, len) in [
        (0, 1),
        (part - 3, 7),
        (2 * part - 1, 2),
        (12_345, 3 << 20),
        (data.len() - 5, 5),
    ] {
        let got = r.read_range(off as u64, len as u64).unwrap();
        assert!(got[..] == data[off..off + len], "range {off}+{len}");
    }
    assert!(r.read_range(0, 0).unwrap().is_empty());
    let e = r.read_range(data.len() as u64 - 1, 2).err().unwrap();
    assert!(e.to_string().contains("past its end"), "{e}");
    // Several threads read through one reader at once.
    std::thread::scope(|sc| {
        for t in 0..4usize {
            let (r, data) = (&r, &data);
            sc.spawn(move || {
                let off = t * (5 << 20);
                let got = r.read_range(off as u64, 1 << 20).unwrap();
                assert!(got[..] == data[off..off + (1 << 20)]);
            });
        }
    });
    let whole = s.get(ObjectKind::Pack, PACK).unwrap().unwrap();
    assert!(whole == data);

    // A writer dropped unsealed (a part sent already) leaves nothing, and
    // the name stays free.
    let mut torn = s.create(ObjectKind::Pack, PACK2).unwrap();
    torn.append(&data[..9 << 20]).unwrap();
    drop(torn);
    assert_eq!(s.stat(ObjectKind::Pack, PACK2).unwrap(), None);
    assert_eq!(names(&s, ObjectKind::Pack), [PACK]);
    s.put(ObjectKind::Pack, PACK2, b"small").unwrap();
    assert_eq!(names(&s, ObjectKind::Pack), [PACK, PACK2]);
}

/// Writes a one-byte object at `key` by a raw signed PUT (curl), past the
/// client's key rules: what another tool, or an attacker, may write.
fn raw_put(g: &Garage, key: &str) {
    let (loc, c) = (g.location(""), g.credentials());
    let url = format!("{}/{}/{key}", g.endpoint(), loc.bucket);
    let status = std::process::Command::new("curl")
        .args(["-sSf", "--path-as-is", "--aws-sigv4"])
        .arg(format!("aws:amz:{REGION}:s3"))
        .arg("--user")
        .arg(format!("{}:{}", c.key_id, c.secret))
        .args(["-H", "x-amz-content-sha256: UNSIGNED-PAYLOAD"])
        .args(["-X", "PUT", "--data-binary", "x", &url])
        .status()
        .unwrap();
    assert!(status.success(), "curl PUT {key}");
}

/// Keys the S3 client cannot parse, where a listing meets them: under
/// every kind's prefix, the trash, and a root "directory".
const ODD_KEYS: [&str; 6] = [
    "p/packs/00/../b",
    "p/packs/a/../b",
    "p/manifests/img-0123456789abcdef.0.manifest%00",
    "p/trash/packs/x/../y",
    "p/ctl%01char",
    "p/ctl%01dir/x",
];

#[test]
fn s3_delete_retires_then_purge_frees() {
    let g = Garage::start();
    let s = g.store("p");
    // Odd keys are skipped by every listing: they hide nothing else.
    for key in ODD_KEYS {
        raw_put(&g, key);
    }
    s.put(ObjectKind::Manifest, MANIFEST, b"manifest").unwrap();
    s.put(ObjectKind::Meta, "VMDEPOT", b"marker").unwrap();
    assert_eq!(names(&s, ObjectKind::Manifest), [MANIFEST]);
    assert_eq!(names(&s, ObjectKind::Meta), ["VMDEPOT"]);
    s.probe().unwrap();
    s.put(ObjectKind::Pack, PACK, b"old pack").unwrap();
    s.put(ObjectKind::PackIndex, PACK, b"old index").unwrap();
    let reader = s.open(ObjectKind::Pack, PACK).unwrap();

    // A meta object (the gc lock) is deleted outright, tombstone-free.
    s.put(ObjectKind::Meta, "gc.lock", b"lock").unwrap();
    let lock = s.info(ObjectKind::Meta, "gc.lock").unwrap().unwrap();
    assert_eq!(lock.size, 4);
    assert!(lock.modified.is_some());
    s.delete(ObjectKind::Meta, "gc.lock").unwrap();
    assert_eq!(s.info(ObjectKind::Meta, "gc.lock").unwrap(), None);
    assert!(s.retired(ObjectKind::Meta).unwrap().is_empty());
    assert_eq!(names(&s, ObjectKind::Meta), ["VMDEPOT"]);
    s.put(ObjectKind::Meta, "gc.lock", b"again").unwrap();
    s.delete(ObjectKind::Meta, "gc.lock").unwrap();

    s.delete(ObjectKind::Pack, PACK).unwrap();
    s.delete(ObjectKind::Pack, PACK).unwrap(); // gone already is fine
    s.delete(ObjectKind::Pack, PACK2).unwrap(); // never was, too
    assert!(names(&s, ObjectKind::Pack).is_empty());
    assert_eq!(names(&s, ObjectKind::PackIndex), [PACK]);
    assert_eq!(s.stat(ObjectKind::Pack, PACK).unwrap(), None);
    assert_eq!(s.get(ObjectKind::Pack, PACK).unwrap(), None);
    // Readers keep reading a retired object, old and new ones.
    assert_eq!(&reader.read_range(0, 3).unwrap()[..], b"old");
    let again = s.open(ObjectKind::Pack, PACK).unwrap();
    assert_eq!(&again.read_range(4, 4).unwrap()[..], b"pack");
    let retired = s.retired(ObjectKind::Pack).unwrap();
    assert_eq!(retired.len(), 1);
    assert_eq!((retired[0].name.as_str(), retired[0].size), (PACK, 8));
    assert!(retired[0].modified.is_some());
    assert!(s.retired(ObjectKind::PackIndex).unwrap().is_empty());

    s.revive(ObjectKind::Pack, PACK).unwrap();
    assert_eq!(names(&s, ObjectKind::Pack), [PACK]);
    assert!(s.retired(ObjectKind::Pack).unwrap().is_empty());

    // A retired name may be written again: the new object replaces it.
    s.delete(ObjectKind::PackIndex, PACK).unwrap();
    s.put(ObjectKind::PackIndex, PACK, b"new index").unwrap();
    assert_eq!(
        s.get(ObjectKind::PackIndex, PACK).unwrap().unwrap(),
        b"new index"
    );
    assert!(s.retired(ObjectKind::PackIndex).unwrap().is_empty());

    s.delete(ObjectKind::Pack, PACK).unwrap();
    // Only tombstones retired by the time given are purged.
    let before = std::time::SystemTime::now() - Duration::from_secs(3600);
    let one = [PACK.to_owned()];
    assert!(s
        .purge_retired(ObjectKind::Pack, &one, before)
        .unwrap()
        .is_empty());
    s.purge(Duration::from_secs(3600)).unwrap();
    assert_eq!(
        s.retired(ObjectKind::Pack).unwrap().len(),
        1,
        "too young to purge"
    );
    s.purge(Duration::ZERO).unwrap();
    assert!(s.retired(ObjectKind::Pack).unwrap().is_empty());
    let e = s.open(ObjectKind::Pack, PACK).err().unwrap();
    assert!(is_not_found(&e), "{e}");
    let e = reader.read_range(0, 3).err().unwrap();
    assert!(is_not_found(&e), "{e}");
    let e = s.revive(ObjectKind::Pack, PACK).unwrap_err();
    assert!(e.to_string().contains("its bytes are gone"), "{e}");
    assert_eq!(names(&s, ObjectKind::PackIndex), [PACK]);
}

/// The one-line error of `f`, which must be an [`Error::Remote`].
fn remote_error(f: impl FnOnce() -> vmdepot::Result<()>) -> String {
    let e = f().unwrap_err();
    assert!(matches!(e, Error::Remote { .. }), "{e:?}");
    assert_eq!(e.exit_code(), 8, "{e}");
    let msg = e.to_string();
    assert_eq!(msg.lines().count(), 1, "{msg}");
    assert!(msg.len() < 1000, "{msg}");
    eprintln!("{msg}");
    msg
}

#[test]
fn s3_errors_name_remote_cause_and_fix() {
    let g = Garage::start();
    let loc = g.location("x");
    let wrong = S3Credentials {
        secret: "0".repeat(64),
        ..g.credentials()
    };
    let msg = remote_error(|| S3Store::open_with(&loc, "origin", &wrong)?.probe());
    assert!(
        msg.starts_with("remote origin: listing s3://vmdepot/x/: 403 Forbidden"),
        "{msg}"
    );
    assert!(msg.contains("AWS_SECRET_ACCESS_KEY"), "{msg}");
    assert!(
        !msg.contains(&wrong.secret) && !msg.contains(&g.secret),
        "{msg}"
    );
    let unknown = S3Credentials {
        key_id: "GK000000000000000000000000".into(),
        ..g.credentials()
    };
    let msg = remote_error(|| S3Store::open_with(&loc, "origin", &unknown)?.probe());
    assert!(
        msg.contains("403 Forbidden") && msg.contains("AWS_ACCESS_KEY_ID"),
        "{msg}"
    );

    let nobucket = S3Location {
        bucket: "no-such-bucket".into(),
        ..loc.clone()
    };
    let s = S3Store::open_with(&nobucket, "origin", &g.credentials()).unwrap();
    let msg = remote_error(|| s.probe());
    assert!(
        msg.contains("404 Not Found") && msg.contains("bucket no-such-bucket does not exist"),
        "{msg}"
    );
    let msg = remote_error(|| s.put(ObjectKind::Meta, "VMDEPOT", b"x"));
    assert!(
        msg.contains("writing s3://no-such-bucket/x/VMDEPOT"),
        "{msg}"
    );

    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let down = S3Location {
        endpoint: Some(format!("http://127.0.0.1:{port}")),
        ..loc
    };
    let s = S3Store::open_with(&down, "origin", &g.credentials()).unwrap();
    let t = Instant::now();
    let msg = remote_error(|| s.stat(ObjectKind::Meta, "VMDEPOT").map(drop));
    eprintln!("unreachable endpoint: failed after {:.1?}", t.elapsed());
    assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
    assert!(
        msg.contains(&format!(
            "cannot reach the endpoint http://127.0.0.1:{port}"
        )),
        "{msg}"
    );
    assert!(msg.contains("gave up after 6 retries"), "{msg}");
}

#[test]
fn s3_one_node_down_keeps_quorum() {
    let mut g = Garage::start();
    let s = g.store("q");
    s.put(ObjectKind::Meta, "VMDEPOT", b"before").unwrap();
    g.kill(2);
    let data = bytes(17 << 20, 3);
    let mut w = s.create(ObjectKind::Pack, PACK).unwrap();
    for piece in data.chunks(3 << 20) {
        w.append(piece).unwrap();
    }
    w.seal().unwrap();
    s.put(ObjectKind::PackIndex, PACK, b"index").unwrap();
    assert_eq!(
        s.get(ObjectKind::Meta, "VMDEPOT").unwrap().unwrap(),
        b"before"
    );
    let r = s.open(ObjectKind::Pack, PACK).unwrap();
    assert!(r.read_range(9 << 20, 1 << 20).unwrap()[..] == data[9 << 20..10 << 20]);
    assert_eq!(names(&s, ObjectKind::PackIndex), [PACK]);

    g.restart(2);
    // Through the restarted node itself, once it has caught up.
    let via2 = S3Location {
        endpoint: Some(g.endpoints()[2].clone()),
        ..g.location("q")
    };
    let s2 = S3Store::open_with(&via2, "garage", &g.credentials()).unwrap();
    assert!(s2.get(ObjectKind::Pack, PACK).unwrap().unwrap() == data);
    s2.put(ObjectKind::Pack, PACK2, b"after").unwrap();
    assert_eq!(names(&s, ObjectKind::Pack), [PACK, PACK2]);
}

/// The environment variable that hands a cluster to [`s3_upload_child`].
const CHILD_ENV: &str = "VMDEPOT_TEST_S3_CHILD";
/// The size of the object [`s3_upload_child`] writes.
const BIG: usize = 200 << 20;

/// Writing a 200 MiB object keeps the writer's process under 128 MiB of
/// peak RSS: measured in a process of its own (the test binary running
/// only [`s3_upload_child`]), so that no other test's memory counts.
#[test]
fn s3_upload_memory_is_bounded() {
    let g = Garage::start();
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "remote_s3::s3_upload_child",
            "--ignored",
            "--nocapture",
        ])
        .env(
            CHILD_ENV,
            [
                g.endpoint(),
                g.bucket.clone(),
                g.key_id.clone(),
                g.secret.clone(),
            ]
            .join(" "),
        )
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let kib: u64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("peak rss KiB: "))
        .unwrap_or_else(|| panic!("no peak in: {stdout}"))
        .trim()
        .parse()
        .unwrap();
    eprintln!(
        "writing {} MiB through S3Store: peak RSS {} MiB",
        BIG >> 20,
        kib >> 10
    );
    assert!(kib < 128 << 10, "peak RSS {kib} KiB");
    assert_eq!(
        g.store("big").stat(ObjectKind::Pack, PACK).unwrap(),
        Some(BIG as u64)
    );
}

/// Writes [`BIG`] bytes by 1 MiB appends and prints the process's peak RSS
/// (`VmHWM`); run by [`s3_upload_memory_is_bounded`] only.
#[test]
#[ignore = "run by s3_upload_memory_is_bounded, in a process of its own"]
fn s3_upload_child() {
    let v = std::env::var(CHILD_ENV).unwrap();
    let [endpoint, bucket, key_id, secret] = v.split(' ').collect::<Vec<_>>()[..] else {
        panic!("{CHILD_ENV}: {v}");
    };
    let loc = S3Location {
        bucket: bucket.into(),
        prefix: "big".into(),
        endpoint: Some(endpoint.into()),
        region: Some(crate::garage::REGION.into()),
    };
    let creds = S3Credentials {
        key_id: key_id.into(),
        secret: secret.into(),
        token: None,
    };
    let s = S3Store::open_with(&loc, "garage", &creds).unwrap();
    let mut w = s.create(ObjectKind::Pack, PACK).unwrap();
    for i in 0..(BIG >> 20) as u32 {
        w.append(&bytes(1 << 20, i)).unwrap();
    }
    assert_eq!(w.seal().unwrap(), BIG as u64);
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let hwm = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .unwrap();
    println!("peak rss KiB: {}", hwm.trim().trim_end_matches("kB").trim());
}
