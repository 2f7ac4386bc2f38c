//! The image lifecycle: capture, backup and restore with real instances of
//! the test guest (TCG), accounts and sharing, copies between depots.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::common::*;

#[test]
fn captures_of_a_running_and_a_stopped_instance_boot_with_its_changes() {
    let t = depot_with_guest();
    let tiny = id_of(&t.json(&["image", "show", "tiny", "--json"]));
    // the guest writes "written-by <its id>" on its disk, then says ready
    boot(&t, "tiny", "src");
    let src = id_of(&show(&t, "src"));
    let chunks_before = t.stats()["chunks"].as_u64().unwrap();

    // a running instance needs --live
    let (_, err) = t.fails(&capture_args("src", "x", &[]));
    assert!(err.contains("--live"), "{err}");
    let live = t.json(&capture_args("src", "cap-live", &["--live", "--json"]));
    assert_eq!(live["parent"], tiny.as_str());
    assert_eq!(live["source_instance"], src.as_str());
    // only the changed blocks were stored (a few KiB of ext4 and a file)
    let added = t.stats()["chunks"].as_u64().unwrap() - chunks_before;
    assert!(added < 64, "capture stored {added} new chunks");
    // the guest was resumed: it is running and still answers the power button
    assert_eq!(show(&t, "src")["state"], "running");
    t.ok(&["instance", "stop", "src"]);
    assert!(serial(&t, "src").contains("VMDEPOT-GUEST: power button"));

    let stopped = t.json(&capture_args("src", "cap-stopped", &["--json"]));
    // (its digest is not the live capture's: powering off unmounted the
    // guest's filesystem, which changed the disk)
    assert_eq!(stopped["parent"], tiny.as_str());
    let hist = t.json(&["image", "history", "cap-stopped", "--json"]);
    let rel: Vec<(&str, &str)> = items(&hist)
        .iter()
        .map(|e| (e["relation"].as_str().unwrap(), e["id"].as_str().unwrap()))
        .collect();
    assert!(rel.contains(&("parent", tiny.as_str())), "{hist}");
    assert!(rel.contains(&("source-instance", src.as_str())), "{hist}");

    // Instances of the captures boot with what the source instance wrote.
    for img in ["cap-live", "cap-stopped"] {
        let name = format!("from-{img}");
        t.ok(&["instance", "run", img, "--name", &name, "-q"]);
    }
    for img in ["cap-live", "cap-stopped"] {
        let name = format!("from-{img}");
        wait_serial(&t, &name, &format!("VMDEPOT-WRITTEN: written-by {src}"));
        t.ok(&["instance", "delete", &name, "--force"]);
    }
    t.ok(&["image", "verify", "-q"]);
    t.assert_fsck_clean();
    t.ok(&["instance", "delete", "src"]);
}

#[test]
fn backup_break_restore_and_keep() {
    let t = depot_with_guest();
    boot(&t, "tiny", "app");
    let app = id_of(&show(&t, "app"));
    // an image that is no backup of it must survive every prune
    t.ok(&capture_args("app", "keepme", &["--live", "-q"]));
    let mut made = Vec::new();
    for _ in 0..4 {
        let r = t.json(&["instance", "backup", "app", "--keep", "2", "--json"]);
        assert_eq!(r["backup"]["tags"]["backup-of"], app.as_str());
        made.push(id_of(&r["backup"]));
    }
    let tag = format!("backup-of={app}");
    let mut left = strs_at(&t.json(&["image", "list", "--tag", &tag, "--json"]), "id");
    left.sort();
    let mut newest = made[2..].to_vec();
    newest.sort();
    assert_eq!(left, newest, "--keep 2 keeps exactly the two newest");
    let names = strs_at(&t.json(&["image", "list", "--json"]), "name");
    assert!(names.contains(&"tiny".to_string()) && names.contains(&"keepme".to_string()));

    // Break the instance's disk: zero its data partition (bytes 21..31 MiB).
    t.ok(&["instance", "stop", "app"]);
    let disk = PathBuf::from(show(&t, "app")["dir"].as_str().unwrap()).join("disk.qcow2");
    // (opened without its backing: a lazy overlay's header names a base
    // file that was never made)
    let spec = serde_json::json!({
        "driver": "qcow2",
        "file": {"driver": "file", "filename": disk},
        "backing": null,
    });
    let st = Command::new("qemu-io")
        .args(["-c", "write -z 21M 10M"])
        .arg(format!("json:{spec}"))
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    t.ok(&["instance", "start", "app", "-q"]);
    wait_serial(&t, "app", "VMDEPOT-DISK: cannot mount");
    // let it get as far as listening for the power button (second "ready")
    wait_serial_count(&t, "app", READY, 2);

    // Restore from the newest backup: the instance is stopped, gets the
    // backup's content, and runs again with its marker intact.
    let out = t.ok(&["instance", "restore", "app", "--from", &made[3]]);
    assert!(out.contains("running"), "{out}");
    assert_eq!(show(&t, "app")["image"], made[3].as_str());
    wait_serial(&t, "app", &format!("VMDEPOT-WRITTEN: written-by {app}"));
    let log = serial(&t, "app");
    assert_eq!(log.matches(DISK_MARKER).count(), 2, "{log}");
    t.ok(&["instance", "delete", "app", "--force"]);
    t.assert_fsck_clean();
}

fn names_as(t: &T, who: &str) -> Vec<(String, String)> {
    let v = json_as(t, who, &["image", "list", "--json"]);
    items(&v)
        .iter()
        .map(|i| (str_at(i, "name"), str_at(i, "type")))
        .collect()
}

#[test]
fn sharing_matrix_owner_receiver_stranger() {
    const NOT_FOUND: i32 = 3;
    const NOT_PERMITTED: i32 = 7;
    let t = T::new();
    let g = test_guest().to_str().unwrap();
    share_guest_with_bob(&t);
    assert_eq!(
        ok_as(&t, "alice", &["image", "shares", "secret"]).trim(),
        "bob"
    );
    let out = t.path("out.raw");
    let out = out.to_str().unwrap();
    let region = t.path("region2");
    let region = region.to_str().unwrap();

    // list
    assert_eq!(names_as(&t, "alice"), [("secret".into(), "custom".into())]);
    assert_eq!(names_as(&t, "bob"), [("secret".into(), "shared".into())]);
    assert!(names_as(&t, "eve").is_empty());
    // show: the stranger learns nothing (the same answer as for no image)
    let e1 = refused_as(&t, "eve", &["image", "show", "secret"], NOT_FOUND);
    let e2 = refused_as(&t, "eve", &["image", "show", "nothing"], NOT_FOUND);
    assert_eq!(e1.replace("secret", "X"), e2.replace("nothing", "X"));
    // a name is per owner: eve may use it too
    ok_as(&t, "eve", &["image", "import", g, "--name", "secret", "-q"]);
    ok_as(&t, "eve", &["image", "delete", "secret"]);

    // launch: owner and receiver yes, stranger no
    ok_as(
        &t,
        "bob",
        &["instance", "run", "secret", "--name", "bobvm", "-q"],
    );
    refused_as(
        &t,
        "eve",
        &["instance", "run", "secret", "--name", "evevm"],
        NOT_FOUND,
    );
    // instances are private to their account
    let bl = json_as(&t, "bob", &["instance", "list", "--json"]);
    assert_eq!(items(&bl).len(), 1);
    let al = json_as(&t, "alice", &["instance", "list", "--json"]);
    assert!(items(&al).is_empty());
    refused_as(&t, "alice", &["instance", "stop", "bobvm"], NOT_FOUND);

    // everything else: the receiver is refused (naming the rule), the
    // stranger finds nothing
    let cases: Vec<Vec<&str>> = vec![
        vec!["image", "export", "secret", out],
        vec!["image", "copy", "secret", "--to-depot", region],
        vec!["image", "share", "secret", "--with", "eve"],
        vec!["image", "unshare", "secret", "--with", "bob"],
        vec!["image", "update", "secret", "--description", "mine now"],
        vec!["image", "delete", "secret"],
        vec!["image", "delete", "secret", "--force"],
        vec!["image", "verify", "secret"],
    ];
    for c in &cases {
        let err = refused_as(&t, "bob", c, NOT_PERMITTED);
        assert!(
            err.contains("shared with you") && err.contains("can only be launched"),
            "{c:?}: {err}"
        );
        refused_as(&t, "eve", c, NOT_FOUND);
    }
    // capture over a shared image works, and makes a launch-only image
    // (security_access.rs has the rest)
    ok_as(
        &t,
        "bob",
        &capture_args("bobvm", "stolen", &["--live", "-q"]),
    );
    let err = refused_as(
        &t,
        "bob",
        &["image", "export", "stolen", out],
        NOT_PERMITTED,
    );
    assert!(err.contains("launch-only"), "{err}");
    ok_as(&t, "bob", &["image", "delete", "stolen"]);
    assert!(!std::path::Path::new(out).exists());
    assert!(names_as(&t, "bob").len() == 1);

    // the owner cannot delete it while shared or used, nor while protected
    // (the image's state refuses it, not the account: exit 1)
    let err = refused_as(&t, "alice", &["image", "delete", "secret"], 1);
    assert!(err.contains("shared with bob"), "{err}");
    ok_as(&t, "bob", &["instance", "delete", "bobvm", "--force"]);
    ok_as(&t, "alice", &["image", "update", "secret", "--protect"]);
    let err = refused_as(&t, "alice", &["image", "delete", "secret", "--force"], 1);
    assert!(err.contains("protected"), "{err}");
    ok_as(&t, "alice", &["image", "update", "secret", "--unprotect"]);
    // unshare: the receiver loses it
    ok_as(
        &t,
        "alice",
        &["image", "unshare", "secret", "--with", "bob"],
    );
    assert!(names_as(&t, "bob").is_empty());
    refused_as(&t, "bob", &["instance", "run", "secret"], NOT_FOUND);

    // a public image: everyone uses it, only its owner changes it
    ok_as(&t, "alice", &["image", "update", "secret", "--name", "pub"]);
    ok_as(
        &t,
        "alice",
        &[
            "image",
            "import",
            g,
            "--name",
            "market",
            "--type",
            "marketplace",
            "--vendor",
            "Acme",
            "--application",
            "tiny-app",
            "--app-version",
            "1.2",
            "-q",
        ],
    );
    let m = json_as(&t, "eve", &["image", "show", "market", "--json"]);
    assert_eq!(
        (
            m["type"].as_str(),
            m["vendor"].as_str(),
            m["application"].as_str(),
            m["app_version"].as_str()
        ),
        (
            Some("marketplace"),
            Some("Acme"),
            Some("tiny-app"),
            Some("1.2")
        )
    );
    ok_as(&t, "eve", &["image", "export", "market", out, "-q"]);
    for c in [
        vec!["image", "delete", "market"],
        vec!["image", "update", "market", "--deprecate"],
    ] {
        let err = refused_as(&t, "eve", &c, NOT_PERMITTED);
        assert!(err.contains("only its owner"), "{err}");
    }
    // deprecated: hidden from default listings, still launchable
    ok_as(&t, "alice", &["image", "update", "market", "--deprecate"]);
    assert!(!names_as(&t, "eve").iter().any(|(n, _)| n == "market"));
    let all = json_as(&t, "eve", &["image", "list", "--all", "--json"]);
    assert!(items(&all).iter().any(|i| i["state"] == "deprecated"));
    ok_as(
        &t,
        "eve",
        &["instance", "run", "market", "--name", "evevm", "-q"],
    );
    ok_as(&t, "eve", &["instance", "delete", "evevm", "--force"]);
    ok_as(&t, "alice", &["image", "delete", "pub"]);
    t.assert_fsck_clean();
}

#[test]
fn copy_to_another_depot_resumes_and_sends_only_missing_chunks() {
    let t = T::new();
    let f = fixtures();
    let a = t.import(&f.join("A.raw"), "a");
    let b = t.import(&f.join("B.raw"), "b");
    let region = t.path("region2");
    let r = region.to_str().unwrap();
    let in_region = |args: &[&str]| json_in(&region, args);

    // A big image of incompressible data, copy killed on the way.
    let big = slow_source(&t);
    t.import(&big, "big");
    let mut c = t
        .cmd(&["image", "copy", "big", "--to-depot", r, "-q"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    // Kill it once the first pack has arrived (sealed and entered there).
    let end = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        assert!(
            c.try_wait().unwrap().is_none(),
            "the copy finished before it could be killed"
        );
        assert!(
            std::time::Instant::now() < end,
            "nothing arrived in the target"
        );
        let o = run_in(&region, &["stats", "--json"]);
        if o.status.success() {
            let s: Value = serde_json::from_slice(&o.stdout).unwrap();
            if s["chunks"].as_u64().unwrap_or(0) > 0 {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = c.kill();
    assert!(!c.wait().unwrap().success());
    // no half image is visible in the target
    let l = in_region(&["image", "list", "--json"]);
    assert!(items(&l).is_empty(), "{l}");
    // a gc there meanwhile keeps what arrived (the copy may resume)
    let g = in_region(&["gc", "--json"]);
    assert_eq!(g["chunks_removed"], 0, "{g}");
    assert_eq!(g["abandoned_imports"], 1, "{g}");
    let fsck = in_region(&["fsck", "--json"]);
    assert_eq!(fsck["problems"], Value::Array(vec![]), "{fsck}");
    let rep = t.json(&["image", "copy", "big", "--to-depot", r, "--json", "-q"]);
    let (chunks, present, sent) = (
        rep["chunks"].as_u64().unwrap(),
        rep["chunks_present"].as_u64().unwrap(),
        rep["chunks_sent"].as_u64().unwrap(),
    );
    assert_eq!(present + sent, chunks);
    assert!(present > 0, "the resumed copy sent everything again: {rep}");
    ok_in(&region, &["image", "verify", "big", "-q"]);
    assert_eq!(
        in_region(&["image", "show", "big", "--json"])["content_digest"],
        t.json(&["image", "show", "big", "--json"])["content_digest"]
    );

    // A, then B (A changed in place): B's copy sends only what A lacks.
    let ra = t.json(&["image", "copy", "a", "--to-depot", r, "--json", "-q"]);
    assert_eq!(ra["chunks_present"], 0);
    let rb = t.json(&["image", "copy", "b", "--to-depot", r, "--json", "-q"]);
    let (bc, bp, bs) = (
        rb["chunks"].as_u64().unwrap(),
        rb["chunks_present"].as_u64().unwrap(),
        rb["chunks_sent"].as_u64().unwrap(),
    );
    assert_eq!(bp + bs, bc);
    assert!(bs * 10 < bc, "B sent {bs} of {bc} chunks");
    // the target's own store grew by what was sent
    let target_chunks = in_region(&["stats", "--json"])["chunks"].as_u64().unwrap();
    assert_eq!(
        target_chunks,
        rep["chunks"].as_u64().unwrap() + ra["chunks"].as_u64().unwrap() + bs
    );
    for (img, src) in [("a", &a), ("b", &b)] {
        let i = in_region(&["image", "show", img, "--json"]);
        assert_eq!(i["content_digest"], src["content_digest"]);
        assert_ne!(i["id"], src["id"], "an independent image with its own id");
        assert!(i["copied_from"]
            .as_str()
            .unwrap()
            .ends_with(src["id"].as_str().unwrap()));
    }
    ok_in(&region, &["image", "verify", "-q"]);
    let fsck = in_region(&["fsck", "--json"]);
    assert_eq!(fsck["problems"], Value::Array(vec![]));
    // the copy is an independent owner: deleting the source changes nothing there
    t.ok(&["image", "delete", "a"]);
    t.ok(&["gc"]);
    ok_in(&region, &["image", "verify", "a", "-q"]);
    let h = t.json(&["image", "history", "b", "--json"]);
    assert!(items(&h).iter().any(|e| e["relation"] == "copy"), "{h}");
}
