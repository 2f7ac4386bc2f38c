//! Reliability: launch bases that a power cut emptied are never booted,
//! and whole-store verify gives no false failure while gc runs.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde_json::Value;

use crate::common::*;

fn the_base(t: &T) -> PathBuf {
    let v: Vec<PathBuf> = std::fs::read_dir(t.depot().join("bases"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "raw"))
        .collect();
    assert_eq!(v.len(), 1, "{v:?}");
    v.into_iter().next().unwrap()
}

/// Two boots: one to make the base, one from the rebuilt base.
#[test]
fn zeroed_base_is_noticed_rebuilt_and_reported() {
    let t = depot_with_guest();
    // Make the base (the guest need not get far).
    t.ok(&[
        "instance", "run", "tiny", "--name", "a", "--disk", "overlay", "--accel", "tcg", "-q",
    ]);
    t.ok(&["instance", "delete", "a", "--force"]);
    let base = the_base(&t);
    t.assert_fsck_clean();
    assert!(problems(&t.json(&["fsck", "--bases", "--json"])).is_empty());
    t.ok(&["image", "verify", "tiny", "-q"]);

    lose_data(&base);
    // fsck: the launch's sampled check already sees it; --bases in full.
    for args in [&["fsck", "--json"][..], &["fsck", "--bases", "--json"][..]] {
        let o = t.run(args);
        assert_eq!(o.status.code(), Some(5), "{args:?}");
        let r: Value = serde_json::from_slice(&o.stdout).unwrap();
        let p = problems(&r);
        assert_eq!(p.len(), 1, "{args:?}: {p:?}");
        assert!(
            p[0].contains("launch base") && p[0].contains("tiny"),
            "{p:?}"
        );
    }
    t.refuses(&["image", "verify", "tiny", "-q"], 5, "launch base");

    // A launch notices (sampled check) and rebuilds it: the guest reads
    // its real disk.
    t.ok(&[
        "instance", "run", "tiny", "--name", "b", "--disk", "overlay", "--accel", "tcg", "-q",
    ]);
    assert!(allocated(&base) > 0);
    t.assert_fsck_clean();
    assert!(problems(&t.json(&["fsck", "--bases", "--json"])).is_empty());
    t.ok(&["image", "verify", "tiny", "-q"]);
    wait_serial(&t, "b", READY);
    assert!(serial(&t, "b").contains(DISK_MARKER));

    // Lost again while b runs from it: a launch refuses (b has it open)
    // and leaves nothing behind.
    lose_data(&base);
    let err = t.refuses(
        &[
            "instance", "run", "tiny", "--name", "c", "--disk", "overlay", "--accel", "tcg",
        ],
        5,
        "runs from it",
    );
    assert!(err.contains("b ("), "{err}");
    let names = strs_at(&t.json(&["instance", "list", "--json"]), "name");
    assert_eq!(names, ["b"]);

    // gc evicts the unused base and its record: fsck is clean again.
    t.ok(&["instance", "delete", "b", "--force"]);
    assert_eq!(t.json(&["gc", "--json"])["bases_evicted"], 1);
    assert!(!base.exists());
    t.assert_fsck_clean();
}

/// A raw file of `mib` MiB whose first quarter is `prev`'s (so deleting
/// `prev`'s image leaves its pack mostly dead: gc repacks it).
fn overlapping_raw(path: &Path, prev: Option<&Path>, mib: u64, seed: u64) {
    synthetic_raw(path, mib, seed);
    if let Some(prev) = prev {
        use std::os::unix::fs::FileExt;
        let head = std::fs::read(prev).unwrap();
        let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        f.write_all_at(&head[..((mib as usize) << 20) / 4], 0)
            .unwrap();
    }
}

#[test]
fn whole_store_verify_never_fails_while_gc_runs() {
    const ROUNDS: u64 = 12;
    let t = Arc::new(T::new());
    let file = |i: u64| t.path(&format!("v{i}.raw"));
    for i in 0..3u64 {
        let prev = i.checked_sub(1).map(file);
        overlapping_raw(&file(i), prev.as_deref(), 8, 100 + i);
        t.import(&file(i), &format!("v{i}"));
    }
    let done = Arc::new(AtomicBool::new(false));
    let verifier = {
        let (t, done) = (t.clone(), done.clone());
        std::thread::spawn(move || {
            let mut runs = 0;
            while !done.load(Ordering::SeqCst) {
                let o = t.run(&["image", "verify", "-q"]);
                assert!(
                    o.status.success(),
                    "verify run {runs} failed while gc ran: {}",
                    String::from_utf8_lossy(&o.stderr)
                );
                runs += 1;
            }
            runs
        })
    };
    let mut stats = (0, 0);
    for i in 3..3 + ROUNDS {
        overlapping_raw(&file(i), Some(&file(i - 1)), 8, 100 + i);
        t.import(&file(i), &format!("v{i}"));
        t.ok(&["image", "delete", &format!("v{}", i - 3), "--force"]);
        let g = t.json(&["gc", "--json"]);
        stats.0 += g["packs_removed"].as_u64().unwrap();
        stats.1 += g["packs_repacked"].as_u64().unwrap();
        let _ = std::fs::remove_file(file(i - 3));
    }
    done.store(true, Ordering::SeqCst);
    let runs = verifier.join().expect("no verify failed");
    assert!(runs >= ROUNDS / 2, "only {runs} verify runs overlapped gc");
    // Every round but the first (v0's pack keeps the shared first quarter)
    // frees its image's pack; gc counts each pack once.
    assert!(stats.0 >= ROUNDS - 1, "gc removed packs: {stats:?}");
    eprintln!("verify runs: {runs}; gc packs removed, repacked: {stats:?}");
    t.ok(&["image", "verify", "-q"]);
    t.assert_fsck_clean();
}
