//! Lazy instance disks (`--disk lazy`, the default): QEMU reads the image
//! through vmdepot's NBD disk server, straight from the chunk store, with
//! no base file; one server per image, gone when no instance runs.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::common::*;
use serde_json::Value;

/// The disk servers of the depot of `t` (pids).
fn disk_servers(t: &T) -> Vec<i32> {
    disk_servers_in(&t.depot())
}

fn base_files(t: &T) -> Vec<PathBuf> {
    std::fs::read_dir(t.depot().join("bases"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "raw"))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn lazy_instances_boot_from_the_store_and_share_one_server() {
    let t = depot_with_guest();
    let data = t.json(&["image", "show", "tiny", "--json"])["data_bytes"]
        .as_u64()
        .unwrap();
    boot(&t, "tiny", "a");
    // the guest read its own disk, and no base file was made
    assert!(serial(&t, "a").contains(DISK_MARKER));
    assert_eq!(base_files(&t), Vec::<PathBuf>::new());
    let a = show(&t, "a");
    assert_eq!(a["disk"], "lazy");
    let read = a["store_bytes_read"].as_u64().unwrap();
    assert!(
        read > 0 && read <= 4 * data,
        "read {read} of {data} data bytes"
    );
    assert_eq!(a["disk_error"], Value::Null);
    assert_eq!(disk_servers(&t).len(), 1);

    // two more instances (a batch) use the same server
    t.ok(&[
        "instance", "run", "tiny", "--name", "b", "--count", "2", "-q",
    ]);
    for n in ["b-1", "b-2"] {
        wait_serial(&t, n, READY);
        assert!(serial(&t, n).contains(DISK_MARKER));
    }
    assert_eq!(disk_servers(&t).len(), 1);

    // the server lives while any instance runs, and goes with the last
    t.ok(&["instance", "stop", "a", "--timeout", "5"]);
    t.ok(&["instance", "stop", "b-1", "--timeout", "5"]);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(disk_servers(&t).len(), 1);
    t.ok(&["instance", "stop", "b-2", "--timeout", "5"]);
    wait_until("the disk server exits", Duration::from_secs(10), || {
        disk_servers(&t).is_empty()
    });
    // it recorded the image's read profile: the blocks read, each once
    let img = t.json(&["image", "show", "tiny", "--json"])["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let profile = t.depot().join("profiles").join(format!("{img}.reads"));
    let bytes = std::fs::read(&profile).expect("a read profile");
    assert_eq!(&bytes[..8], b"VMDREAD1");
    let blocks = (bytes.len() as u64 - 8) / 8;
    assert!(
        blocks > 0 && blocks * 4096 <= data && (bytes.len() - 8) % 8 == 0,
        "{blocks} blocks in the profile, {data} data bytes"
    );
    let recorded = std::fs::metadata(&profile).unwrap().modified().unwrap();
    // `instance start` starts it again; what the guest wrote is kept
    let a_id = id_of(&show(&t, "a"));
    t.ok(&["instance", "start", "a"]);
    wait_serial_count(&t, "a", READY, 2);
    assert!(serial(&t, "a").contains(&format!("VMDEPOT-WRITTEN: written-by {a_id}")));
    assert_eq!(disk_servers(&t).len(), 1);
    assert_eq!(base_files(&t), Vec::<PathBuf>::new());
    // a profile is recorded once: the second run leaves it as it was
    assert_eq!(
        std::fs::metadata(&profile).unwrap().modified().unwrap(),
        recorded
    );
    // a base file is made only when asked for: --disk overlay
    t.ok(&[
        "instance", "run", "tiny", "--name", "o", "--disk", "overlay", "-q",
    ]);
    wait_serial(&t, "o", READY);
    assert_eq!(base_files(&t).len(), 1);
    for n in ["a", "b-1", "b-2", "o"] {
        t.ok(&["instance", "delete", n, "--force"]);
    }
    wait_until("the disk server exits", Duration::from_secs(10), || {
        disk_servers(&t).is_empty()
    });
    t.assert_fsck_clean();
    // the profile goes with its image; gc removes one a crash left
    t.ok(&["image", "delete", "tiny", "--force"]);
    assert!(!profile.exists());
    let stale = t
        .depot()
        .join("profiles")
        .join("img-00000000000000ff.reads");
    std::fs::write(&stale, b"VMDREAD1").unwrap();
    t.ok(&["gc"]);
    assert!(!stale.exists());
}

#[test]
fn a_killed_disk_server_is_started_again_and_the_guest_lives_on() {
    let t = depot_with_guest();
    t.ok(&["instance", "run", "tiny", "--name", "a", "-q"]);
    // kill the server while the guest boots (SeaBIOS and the kernel read
    // the disk), before it read its marker
    let servers = disk_servers(&t);
    assert_eq!(servers.len(), 1);
    for p in &servers {
        let _ = Command::new("kill").args(["-9", &p.to_string()]).status();
    }
    wait_until("the server is dead", Duration::from_secs(5), || {
        disk_servers(&t).is_empty()
    });
    std::thread::sleep(Duration::from_secs(2));
    // any look at the instance starts the server again; QEMU reconnects
    assert_eq!(show(&t, "a")["state"], "running");
    assert_eq!(disk_servers(&t).len(), 1);
    wait_serial(&t, "a", READY);
    assert!(serial(&t, "a").contains(DISK_MARKER));
    assert_eq!(show(&t, "a")["disk_error"], Value::Null);
    t.ok(&["instance", "stop", "a"]);
    assert!(serial(&t, "a").contains("VMDEPOT-GUEST: power button"));
}

use std::process::Command;

/// Where the chunk holding `block` (4 KiB at `off` of `raw`) is stored:
/// its pack file and the frame's byte range in it.
fn frame_of_block(t: &T, raw: &Path, off: u64) -> (PathBuf, u64, u64) {
    use std::os::unix::fs::FileExt;
    let mut block = vec![0u8; 4096];
    std::fs::File::open(raw)
        .unwrap()
        .read_exact_at(&mut block, off)
        .unwrap();
    let hash = blake3::hash(&block);
    let c = rusqlite::Connection::open(t.depot().join("catalog.db")).unwrap();
    let frame: i64 = c
        .query_row(
            "SELECT frame FROM chunks WHERE hash = ?1",
            [hash.as_bytes().as_slice()],
            |r| r.get(0),
        )
        .unwrap();
    let (pack, offset, clen): (i64, i64, i64) = c
        .query_row(
            "SELECT pack, offset, clen FROM frames WHERE id = ?1",
            [frame],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    let name: String = c
        .query_row("SELECT name FROM packs WHERE id = ?1", [pack], |r| r.get(0))
        .unwrap();
    let path = t.pack_files().into_iter().find(|p| {
        p.file_stem().is_some_and(|s| s.to_string_lossy() == name)
            && p.extension().is_some_and(|e| e == "pack")
    });
    (path.expect("the pack file"), offset as u64, clen as u64)
}

#[test]
fn a_flipped_byte_in_a_pack_is_an_io_error_in_the_guest_never_wrong_data() {
    let t = depot_with_guest();
    let raw = test_guest();
    let bytes = std::fs::read(raw).unwrap();
    let marker = b"vmdepot test guest disk marker";
    let at = bytes
        .windows(marker.len())
        .position(|w| w == marker)
        .expect("the marker in the guest disk") as u64;
    let block = at / 4096 * 4096;
    let (pack, off, clen) = frame_of_block(&t, raw, block);
    // One flipped byte in the frame holding the marker, where it changes
    // the marker's chunk but the frame still decompresses: only the hash
    // check can catch it (looked for near where the chunk's slot lies in
    // the frame, in proportion).
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&pack)
        .unwrap();
    let mut frame = vec![0u8; clen as usize];
    f.read_exact_at(&mut frame, off).unwrap();
    let want = &bytes[block as usize..block as usize + 4096];
    let plain = zstd::stream::decode_all(frame.as_slice()).unwrap();
    let slot = plain
        .chunks(4096)
        .position(|c| c == want)
        .expect("the frame holds the marker's chunk");
    let guess = frame.len() * slot / (plain.len() / 4096);
    let mut order: Vec<usize> = (0..frame.len()).collect();
    order.sort_by_key(|&i| i.abs_diff(guess));
    let at_frame = order
        .into_iter()
        .take(20_000)
        .find(|&i| {
            let mut fr = frame.clone();
            fr[i] ^= 0x10;
            zstd::stream::decode_all(fr.as_slice()).is_ok_and(|out| {
                out.len() == plain.len() && out[slot * 4096..(slot + 1) * 4096] != *want
            })
        })
        .expect("a byte whose flip changes the marker's chunk");
    f.write_all_at(&[frame[at_frame] ^ 0x10], off + at_frame as u64)
        .unwrap();
    drop(f);

    t.ok(&["instance", "run", "tiny", "--name", "a", "-q"]);
    wait_until("the server reports the bad read", BOOT, || {
        show(&t, "a")["disk_error"].is_string()
    });
    let err = show(&t, "a")["disk_error"].as_str().unwrap().to_owned();
    assert!(err.contains("disk read failed at byte offset"), "{err}");
    assert!(err.contains("does not match its hash"), "{err}");
    assert!(err.contains("tiny (img-"), "{err}");
    // it is in the instance's log too, and the guest never saw the marker
    wait_until("the guest moves on", BOOT, || {
        serial(&t, "a").contains(READY)
    });
    let log = serial(&t, "a");
    assert!(
        log.contains("vmdepot: disk read failed at byte offset"),
        "{log}"
    );
    assert!(!log.contains(DISK_MARKER), "{log}");
    t.ok(&["instance", "delete", "a", "--force"]);
}

#[test]
fn a_foreground_start_serves_its_lazy_disk_in_its_own_process() {
    let t = depot_with_guest();
    let mut fg = t
        .cmd(&[
            "instance",
            "run",
            "tiny",
            "--name",
            "a",
            "--foreground",
            "-q",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_until("the instance exists", BOOT, || {
        t.run(&["instance", "show", "a"]).status.success()
    });
    wait_serial(&t, "a", READY);
    assert!(serial(&t, "a").contains(DISK_MARKER));
    // no detached server: the foreground process serves the disk
    assert_eq!(disk_servers(&t), Vec::<i32>::new());
    assert!(show(&t, "a")["store_bytes_read"].as_u64().unwrap() > 0);
    let _ = Command::new("kill")
        .args(["-TERM", &fg.id().to_string()])
        .status();
    let st = fg.wait().unwrap();
    assert!(st.success(), "{st}");
    assert!(serial(&t, "a").contains("VMDEPOT-GUEST: power button"));
    assert_eq!(show(&t, "a")["state"], "stopped");
    assert!(!t
        .depot()
        .join("instances")
        .join(id_of(&show(&t, "a")))
        .join("disk.sock")
        .exists());
}

#[test]
fn a_forced_delete_gives_stopped_lazy_instances_a_base_and_refuses_running_ones() {
    let t = depot_with_guest();
    boot(&t, "tiny", "a");
    let a = id_of(&show(&t, "a"));
    let err = t.refuses(&["image", "delete", "tiny", "--force"], 1, "stop it first");
    assert!(err.contains("a (ins-"), "{err}");
    t.ok(&["instance", "stop", "a"]);
    t.ok(&["image", "delete", "tiny", "--force"]);
    // the instance kept its content: a base file, and its disk is an overlay on it
    assert_eq!(show(&t, "a")["disk"], "overlay");
    assert_eq!(base_files(&t).len(), 1);
    let gc = t.json(&["gc", "--json"]);
    assert!(gc["chunks_removed"].as_u64().unwrap() > 0, "{gc}");
    t.ok(&["instance", "start", "a", "-q"]);
    wait_serial_count(&t, "a", READY, 2);
    assert!(serial(&t, "a").contains(&format!("VMDEPOT-WRITTEN: written-by {a}")));
    t.ok(&["instance", "delete", "a", "--force"]);
    t.assert_fsck_clean();
}
