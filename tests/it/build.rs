//! `image build`: the base build the fixture made (fixtures/build-debian-
//! guest.sh runs `image build debian-12` into its own depot) and its
//! recipe; recipes refused before any work; a marketplace build in place on
//! a copy of the base that stores little over it, boots with BIOS, answers
//! HTTP through a forward and is captured with a change, the capture booting
//! with UEFI. Two boots of the full guest (about 40 s each to SSH under TCG).

use std::io::{Read, Write};

use serde_json::Value;

use crate::common::*;

fn tag(v: &Value, key: &str) -> String {
    match &v["tags"] {
        Value::Object(m) => m.get(key).and_then(Value::as_str).unwrap_or("").to_owned(),
        other => panic!("tags is not an object: {other}"),
    }
}

fn num(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("{key} in {v}"))
}

#[test]
fn the_base_build_records_its_recipe_and_bad_recipes_are_refused() {
    let v = json_in(&debian_depot(), &["image", "show", "debian-12", "--json"]);
    assert_eq!(str_at(&v, "type"), "public");
    for (k, want) in [
        ("os", "debian"),
        ("release", "12"),
        ("ssh-user", "debian"),
        ("firmware", "bios,uefi"),
        ("build.os", "debian-12"),
        ("build.suite", "bookworm"),
    ] {
        assert_eq!(tag(&v, k), want, "tag {k}");
    }
    assert!(tag(&v, "build.mirror").starts_with("http"), "{v}");
    assert!(tag(&v, "build.kernel").ends_with("-amd64"), "{v}");
    assert!(tag(&v, "build.package-set").starts_with("blake3:"), "{v}");
    let date: u64 = tag(&v, "build.source-date").parse().unwrap();
    assert!(date > 1_600_000_000, "source date {date}");
    assert_eq!(num(&v, "virtual_size"), 3 << 30);

    // Refusals: one line, the documented code, nothing made.
    let t = T::new();
    t.ok(&[
        "image",
        "import",
        test_guest().to_str().unwrap(),
        "--name",
        "tiny",
        "-q",
    ]);
    let script_dir = t.path("scripts");
    std::fs::create_dir_all(&script_dir).unwrap();
    fn b<'a>(extra: &[&'a str]) -> Vec<&'a str> {
        let mut a = vec!["image", "build"];
        a.extend_from_slice(extra);
        a
    }
    for (args, code, needle) in [
        (b(&["debian-11"]), 2, "unknown system"),
        (
            b(&["debian-12", "--package=-oAPT::Get::Trivial=1"]),
            2,
            "not a Debian package name",
        ),
        (
            b(&["debian-12", "--package", "nginx;reboot"]),
            2,
            "not a Debian package name",
        ),
        (
            b(&["debian-12", "--package", "nginx/../x"]),
            2,
            "not a Debian package name",
        ),
        (
            b(&["debian-12", "--from", "tiny", "--name", "x"]),
            2,
            "was not built by",
        ),
        (b(&["debian-12", "--from", "tiny"]), 2, "needs --name"),
        // The recipe's tags are build's alone: a forged one would make
        // any image a --from base.
        (
            vec!["image", "update", "tiny", "--tag", "build.suite=bookworm"],
            2,
            "not set by hand",
        ),
        (
            vec![
                "image",
                "import",
                test_guest().to_str().unwrap(),
                "--name",
                "forged",
                "--tag",
                "build.suite=bookworm",
            ],
            2,
            "not set by hand",
        ),
        (
            b(&["debian-12", "--tag", "build.from=x"]),
            2,
            "not set by hand",
        ),
        (
            b(&["debian-12", "--from", "nope", "--name", "x"]),
            3,
            "nope",
        ),
        (b(&["debian-12", "--size", "100M"]), 2, "from 1G"),
        (b(&["debian-12", "--mirror", "file:///etc"]), 2, "http://"),
        (
            b(&["debian-12", "--mirror", "http://me:secret@h/debian"]),
            2,
            "a user or password",
        ),
        (
            b(&[
                "debian-12",
                "--from",
                "tiny",
                "--name",
                "x",
                "--security-mirror",
                "http://h/s",
            ]),
            2,
            "leave --mirror and --security-mirror out",
        ),
        (
            b(&["debian-12", "--mirror", "http://h/x y"]),
            2,
            "only letters",
        ),
        (b(&["debian-12", "--vendor", "v"]), 2, "--type marketplace"),
        (b(&["debian-12", "--type", "marketplace"]), 2, "--vendor"),
        (b(&["debian-12", "--name", "tiny"]), 1, "tiny"),
        (
            b(&["debian-12", "--run", script_dir.to_str().unwrap()]),
            4,
            "regular file",
        ),
    ] {
        let line = t.refuses(&args, code, needle);
        assert_eq!(line.lines().count(), 1, "{args:?}: {line}");
    }
    let list = t.json(&["image", "list", "--json"]);
    assert_eq!(items(&list).len(), 1, "{list}");
    let tmp: Vec<_> = std::fs::read_dir(t.depot().join("tmp")).unwrap().collect();
    assert!(tmp.is_empty(), "{tmp:?}");
}

#[test]
fn a_marketplace_build_on_the_base_serves_http_and_its_capture_boots_uefi() {
    let t = T::new();
    let to = t.depot();
    ok_in(
        &debian_depot(),
        &[
            "image",
            "copy",
            "debian-12",
            "--to-depot",
            to.to_str().unwrap(),
            "-q",
        ],
    );
    let base = t.json(&["image", "show", "debian-12", "--json"]);
    assert_eq!(
        tag(&base, "build.suite"),
        "bookworm",
        "copy keeps the recipe"
    );

    // The script runs in the sandbox (the build fails if it can mount,
    // mknod, see a host disk or the host's processes, or write a sysctl),
    // and plants links to host files that the host-side clean-up after it
    // (logs emptied, caches and host keys removed) must not follow.
    let victim = t.path("victim");
    std::fs::create_dir_all(victim.join("dir")).unwrap();
    std::fs::write(victim.join("file"), "host file\n").unwrap();
    std::fs::write(victim.join("dir/kept"), "host file\n").unwrap();
    let v = victim.display();
    let up = "../".repeat(12);
    let script = t.path("setup.sh");
    std::fs::write(
        &script,
        format!(
            "set -e\necho 'vmdepot marketplace page' >/var/www/html/index.html\n\
             ! mount -t tmpfs none /mnt 2>/dev/null\n\
             ! mknod /root/disk b 8 0 2>/dev/null\n\
             ! ls /dev | grep -qE '^(sd|vd|loop|nvme|mem$|kmsg$)'\n\
             [ \"$(ls /proc | grep -c '^[0-9]')\" -lt 10 ]\n\
             ! echo 1 2>/dev/null >/proc/sys/kernel/sysrq\n\
             ln -s {v}/file /var/log/vmdepot-evil.log\n\
             ln -s {up}{v}/file /var/log/vmdepot-up.log\n\
             mkdir -p /var/lib/cloud && ln -s {v}/dir /var/lib/cloud/evil\n\
             ln -s {v}/file /etc/ssh/ssh_host_evil_key\n\
             rm -rf /usr/share/info && ln -s {v}/dir /usr/share/info\n"
        ),
    )
    .unwrap();
    let o = t
        .cmd(&[
            "image",
            "build",
            "debian-12",
            "--from",
            "debian-12",
            "--name",
            "web",
            "--package",
            "nginx-light",
            "--run",
            script.to_str().unwrap(),
            "--type",
            "marketplace",
            "--vendor",
            "nginx",
            "--application",
            "nginx",
            "--app-version",
            "1.22",
            "--tag",
            "team=web",
            "--json",
            "-q",
        ])
        .env("VMDEPOT_BUILD_CACHE", build_cache())
        .output()
        .unwrap();
    let web: Value = serde_json::from_str(&ok_stdout(o, "image build --from")).unwrap();
    assert_eq!(
        std::fs::read_to_string(victim.join("file")).unwrap(),
        "host file\n"
    );
    assert!(victim.join("dir/kept").exists(), "a link was followed");
    assert_eq!(
        tag(&web, "build.mirror"),
        tag(&base, "build.mirror"),
        "the base's sources"
    );
    assert_eq!(str_at(&web, "type"), "marketplace");
    assert_eq!(str_at(&web, "application"), "nginx");
    assert_eq!(str_at(&web, "parent"), str_at(&base, "id"));
    assert_eq!(tag(&web, "build.packages"), "nginx-light");
    assert!(
        tag(&web, "build.from").contains(&str_at(&base, "id")),
        "{web}"
    );
    let run = tag(&web, "build.run");
    assert!(run.starts_with("setup.sh blake3:"), "{run}");
    assert_eq!(tag(&web, "ssh-user"), "debian");
    assert_eq!(tag(&web, "team"), "web");
    assert_ne!(
        tag(&web, "build.package-set"),
        tag(&base, "build.package-set")
    );
    // Built in place on a copy of the base: it stores what the packages
    // changed, a small part of the base.
    let web = t.json(&["image", "show", "web", "--json"]);
    let (web_unique, base_stored) = (
        num(&web, "unique_stored_bytes"),
        num(&base, "unique_stored_bytes"),
    );
    assert!(
        web_unique * 5 < base_stored,
        "web stores {web_unique} bytes of its own over a base of {base_stored}"
    );
    assert!(t.depot().join("tmp").read_dir().unwrap().next().is_none());
    t.assert_fsck_clean();

    // BIOS (auto: the image boots both, BIOS first), HTTP through the forward.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let fwd = format!("{port}:80");
    t.ok(&[
        "instance",
        "run",
        "web",
        "--name",
        "w",
        "--hostname",
        "web-host",
        "--forward",
        &fwd,
        "--memory",
        "1024M",
        "--cpus",
        "2",
        "-q",
    ]);
    t.ok(&["instance", "wait", "w", "--ssh", "--timeout", "300"]);
    assert_eq!(
        t.ok(&["instance", "exec", "w", "--", "hostname"]).trim(),
        "web-host"
    );
    let page = http_get(port);
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    assert!(page.contains("vmdepot marketplace page"), "{page}");
    let o = t.run(&[
        "instance",
        "exec",
        "w",
        "--",
        "test",
        "-d",
        "/sys/firmware/efi",
    ]);
    assert_eq!(o.status.code(), Some(1), "booted BIOS: no EFI runtime");
    assert_eq!(str_at(&show(&t, "w"), "firmware"), "bios");
    t.ok(&[
        "instance",
        "exec",
        "w",
        "--",
        "sh",
        "-c",
        "echo captured-change | sudo tee /var/lib/vmdepot-mark >/dev/null && sync",
    ]);
    t.ok(&["instance", "stop", "w", "-q"]);
    t.ok(&capture_args("w", "web-2", &["-q"]));
    // It carries what the guest is and how it boots, not the recipe.
    let cap = t.json(&["image", "show", "web-2", "--json"]);
    assert_eq!(tag(&cap, "ssh-user"), "debian");
    assert_eq!(tag(&cap, "firmware"), "bios,uefi");
    assert_eq!(tag(&cap, "os"), "debian");
    assert!(cap["tags"].get("build.suite").is_none(), "{cap}");

    // The capture, with UEFI: the change is there.
    t.ok(&[
        "instance",
        "run",
        "web-2",
        "--name",
        "c",
        "--firmware",
        "uefi",
        "--memory",
        "1024M",
        "--cpus",
        "2",
        "-q",
    ]);
    assert_eq!(str_at(&show(&t, "c"), "firmware"), "uefi");
    t.ok(&["instance", "wait", "c", "--ssh", "--timeout", "300"]);
    let mark = t.ok(&[
        "instance",
        "exec",
        "c",
        "--",
        "cat",
        "/var/lib/vmdepot-mark",
    ]);
    assert_eq!(mark.trim(), "captured-change");
    t.ok(&[
        "instance",
        "exec",
        "c",
        "--",
        "test",
        "-d",
        "/sys/firmware/efi",
    ]);
    t.ok(&["instance", "delete", "c", "--force"]);
    t.ok(&["instance", "delete", "w", "--force"]);
}

/// `GET /` on 127.0.0.1:PORT, the whole answer.
fn http_get(port: u16) -> String {
    let mut last = String::new();
    for _ in 0..30 {
        match std::net::TcpStream::connect(("127.0.0.1", port)) {
            Ok(mut s) => {
                s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
                    .unwrap();
                s.write_all(b"GET / HTTP/1.0\r\nHost: web\r\n\r\n").unwrap();
                let mut out = String::new();
                let _ = s.read_to_string(&mut out);
                if !out.is_empty() {
                    return out;
                }
                last = "an empty answer".into();
            }
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(std::time::Duration::from_secs(2));
    }
    panic!("no HTTP answer on port {port}: {last}");
}
