//! Security issue 8, accounts: launch-only content stays launch-only
//! (through captures, backups and unsharing), and public names can be
//! neither squatted nor silently resolved to someone else's image.

use std::path::Path;

use serde_json::Value;

use crate::common::*;

const NAME_TAKEN: i32 = 1;
const AMBIGUOUS: i32 = 2;
const NOT_PERMITTED: i32 = 7;

fn show_as(t: &T, who: &str, image: &str) -> Value {
    json_as(t, who, &["image", "show", image, "--json"])
}

fn id_as(t: &T, who: &str, image: &str) -> String {
    id_of(&show_as(t, who, image))
}

/// Runs the guest's QEMU just long enough to exist, then kills it: a
/// capture needs an instance, not a booted guest.
fn run_and_kill(t: &T, who: &str, image: &str, name: &str) {
    ok_as(t, who, &["instance", "run", image, "--name", name, "-q"]);
    ok_as(t, who, &["instance", "stop", name, "--force"]);
}

/// Export, copy to another depot and share are refused for `image`,
/// naming the rule; nothing is written.
fn assert_launch_only(t: &T, who: &str, image: &str) {
    let out = t.path("leak.raw");
    let region = t.path("region2");
    let v = show_as(t, who, image);
    assert_eq!(v["launch_only"], true, "{v}");
    for c in [
        vec!["image", "export", image, out.to_str().unwrap()],
        vec![
            "image",
            "export",
            image,
            out.to_str().unwrap(),
            "--format",
            "qcow2",
        ],
        vec![
            "image",
            "copy",
            image,
            "--to-depot",
            region.to_str().unwrap(),
        ],
        vec!["image", "share", image, "--with", "carol"],
    ] {
        let err = refused_as(t, who, &c, NOT_PERMITTED);
        assert!(err.contains("launch-only"), "{c:?}: {err}");
    }
    assert!(!out.exists());
    assert!(
        !region.join("catalog.db").exists() || {
            let o = run_in(&region, &["--account", who, "image", "list", "--json"]);
            serde_json::from_slice::<Value>(&o.stdout).unwrap() == Value::Array(vec![])
        }
    );
    assert!(as_(t, "carol", &["image", "show", image]).status.code() == Some(3));
}

#[test]
fn captures_and_backups_of_a_shared_image_stay_launch_only_after_unshare() {
    let t = T::new();
    share_guest_with_bob(&t);
    let secret = id_as(&t, "alice", "secret");
    run_and_kill(&t, "bob", "secret", "bobvm");

    // While shared: capture and backup work, and make launch-only images.
    ok_as(&t, "bob", &capture_args("bobvm", "cap-shared", &["-q"]));
    let b = json_as(&t, "bob", &["instance", "backup", "bobvm", "--json", "-q"]);
    let backup1 = id_of(&b["backup"]);
    assert_eq!(
        show_as(&t, "bob", "cap-shared")["restricted_from"],
        format!("alice {secret}").as_str()
    );
    assert_launch_only(&t, "bob", "cap-shared");
    assert_launch_only(&t, "bob", &backup1);

    // The owner unshares: the receiver loses the image, not the rule.
    ok_as(
        &t,
        "alice",
        &["image", "unshare", "secret", "--with", "bob"],
    );
    ok_as(&t, "bob", &capture_args("bobvm", "cap-after", &["-q"]));
    assert_launch_only(&t, "bob", "cap-after");
    // Backups keep working, pruning included (the owner deletes its own
    // launch-only images).
    let b = json_as(
        &t,
        "bob",
        &["instance", "backup", "bobvm", "--keep", "1", "--json", "-q"],
    );
    let backup2 = id_of(&b["backup"]);
    assert_eq!(b["pruned"], serde_json::json!([backup1]), "{b}");
    assert_launch_only(&t, "bob", &backup2);
    // ... and so does restoring from one.
    ok_as(
        &t,
        "bob",
        &["instance", "restore", "bobvm", "--from", &backup2],
    );
    ok_as(&t, "bob", &capture_args("bobvm", "cap-restored", &["-q"]));
    assert_launch_only(&t, "bob", "cap-restored");

    // Even the origin deleted, the content remembers where it came from.
    ok_as(&t, "alice", &["image", "delete", "secret", "--force"]);
    ok_as(&t, "bob", &capture_args("bobvm", "cap-orphan", &["-q"]));
    assert_launch_only(&t, "bob", "cap-orphan");
    // The receiver still owns everything else about them.
    ok_as(
        &t,
        "bob",
        &[
            "image",
            "update",
            "cap-orphan",
            "--name",
            "mine",
            "--protect",
        ],
    );
    ok_as(&t, "bob", &["image", "verify", "mine", "-q"]);
    t.assert_fsck_clean();
}

#[test]
fn a_capture_of_an_instance_of_a_launch_only_image_is_launch_only() {
    let t = T::new();
    share_guest_with_bob(&t);
    run_and_kill(&t, "bob", "secret", "bobvm");
    ok_as(&t, "bob", &capture_args("bobvm", "gen1", &["-q"]));
    ok_as(
        &t,
        "alice",
        &["image", "unshare", "secret", "--with", "bob"],
    );
    // instances of a launch-only image work; their captures inherit it
    run_and_kill(&t, "bob", "gen1", "bobvm2");
    ok_as(&t, "bob", &capture_args("bobvm2", "gen2", &["-q"]));
    assert_launch_only(&t, "bob", "gen2");
    let origin = show_as(&t, "bob", "gen1")["restricted_from"].clone();
    assert_eq!(show_as(&t, "bob", "gen2")["restricted_from"], origin);
    // and so do its backups
    let b = json_as(&t, "bob", &["instance", "backup", "bobvm2", "--json", "-q"]);
    assert_launch_only(&t, "bob", &id_of(&b["backup"]));
    // the owner's own captures are free
    run_and_kill(&t, "alice", "secret", "alicevm");
    ok_as(&t, "alice", &capture_args("alicevm", "a2", &["-q"]));
    assert_eq!(show_as(&t, "alice", "a2")["launch_only"], false);
    ok_as(
        &t,
        "alice",
        &[
            "image",
            "export",
            "a2",
            t.path("a2.raw").to_str().unwrap(),
            "-q",
        ],
    );
}

fn small_disk(t: &T) -> String {
    let p = t.path("small.raw");
    if !p.exists() {
        synthetic_raw(&p, 2, 7);
    }
    p.to_str().unwrap().to_owned()
}

fn import_as(t: &T, who: &str, name: &str, kind: &str) -> std::process::Output {
    let disk = small_disk(t);
    let mut a = vec![
        "image", "import", &disk, "--name", name, "--type", kind, "-q",
    ];
    if kind == "marketplace" {
        a.extend(["--vendor", "V", "--application", "app"]);
    }
    as_(t, who, &a)
}

#[test]
fn a_public_name_of_another_account_cannot_be_squatted() {
    let t = T::new();
    assert!(import_as(&t, "alice", "debian", "public").status.success());
    let debian = id_as(&t, "alice", "debian");
    for kind in ["public", "marketplace"] {
        let o = import_as(&t, "mallory", "debian", kind);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(NAME_TAKEN), "{kind}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(err.contains(&debian) && err.contains("alice"), "{err}");
    }
    // nor by renaming one
    assert!(import_as(&t, "mallory", "debian-12", "public")
        .status
        .success());
    let err = refused_as(
        &t,
        "mallory",
        &["image", "update", "debian-12", "--name", "debian"],
        NAME_TAKEN,
    );
    assert!(err.contains(&debian), "{err}");
    // nor by copying one into a depot where the name is someone else's
    let region = t.path("region2");
    let r = region.to_str().unwrap();
    let disk = small_disk(&t);
    ok_in(
        &region,
        &[
            "--account",
            "mallory",
            "image",
            "import",
            &disk,
            "--name",
            "debian",
            "--type",
            "public",
            "-q",
        ],
    );
    let err = refused_as(
        &t,
        "alice",
        &["image", "copy", "debian", "--to-depot", r],
        NAME_TAKEN,
    );
    assert!(err.contains("mallory"), "{err}");
    // everyone still gets alice's image by its name
    assert_eq!(id_as(&t, "eve", "debian"), debian);
    t.assert_fsck_clean();
}

#[test]
fn a_name_that_matches_several_visible_images_is_an_error_listing_them() {
    let t = T::new();
    assert!(import_as(&t, "alice", "debian", "public").status.success());
    let public = id_as(&t, "alice", "debian");
    // a custom name is the owner's own business
    assert!(import_as(&t, "bob", "debian", "custom").status.success());
    let err = refused_as(&t, "bob", &["image", "show", "debian"], AMBIGUOUS);
    let own = id_of(&json_as(&t, "bob", &["image", "list", "--type", "custom", "--json"])[0]);
    for needle in [
        public.as_str(),
        own.as_str(),
        "owner alice",
        "yours",
        "use the id",
    ] {
        assert!(err.contains(needle), "{needle}: {err}");
    }
    // by id it is unambiguous; others see one image only
    assert_eq!(id_as(&t, "bob", &own), own);
    assert_eq!(id_as(&t, "eve", "debian"), public);
    assert_eq!(id_as(&t, "alice", "debian"), public);

    // two images of one name shared by two accounts: no silent pick either
    let mut shared = Vec::new();
    for who in ["alice", "carol"] {
        assert!(import_as(&t, who, "tools", "custom").status.success());
        ok_as(&t, who, &["image", "share", "tools", "--with", "bob"]);
        shared.push(id_as(&t, who, "tools"));
    }
    for c in [
        vec!["image", "show", "tools"],
        vec!["instance", "run", "tools", "--name", "x"],
    ] {
        let err = refused_as(&t, "bob", &c, AMBIGUOUS);
        for needle in [shared[0].as_str(), &shared[1], "owner alice", "owner carol"] {
            assert!(err.contains(needle), "{c:?}: {err}");
        }
    }
    assert!(
        !Path::new(&t.depot().join("instances")).exists() || {
            json_as(&t, "bob", &["instance", "list", "--json"]) == Value::Array(vec![])
        }
    );
}
