//! Local security (issue 8): a depot is private whatever the caller's
//! umask (or shared by one group, by choice), account names are Unix user
//! names, and strings that reach a systemd unit, a QEMU command line or the
//! terminal are escaped. One QEMU boot in this module (the comma test).

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;

/// `vmdepot --depot DEPOT ARGS` under `umask MASK` (through sh, as a shell
/// user would run it).
fn umask_cmd(mask: &str, depot: &Path, args: &[&str]) -> Command {
    let mut c = Command::new("sh");
    c.arg("-c")
        .arg(format!("umask {mask}; exec \"$0\" \"$@\""))
        .arg(bin())
        .arg("--depot")
        .arg(depot)
        .args(args)
        .env_remove("VMDEPOT_DIR")
        .env_remove("VMDEPOT_ACCOUNT");
    c
}

/// Runs vmdepot on `depot` under umask `mask`; asserts success.
fn ok_umask(mask: &str, depot: &Path, args: &[&str]) -> String {
    ok_stdout(
        umask_cmd(mask, depot, args).output().unwrap(),
        &format!("umask {mask}; vmdepot {args:?}"),
    )
}

/// Every directory and file under `root` (itself included) with its mode
/// (the low 12 bits), gid and kind.
fn tree(root: &Path) -> Vec<(PathBuf, u32, u32, std::fs::FileType)> {
    let mut out = Vec::new();
    let mut todo = vec![root.to_owned()];
    while let Some(p) = todo.pop() {
        let m = std::fs::symlink_metadata(&p).unwrap();
        if m.is_dir() {
            for e in std::fs::read_dir(&p).unwrap().flatten() {
                todo.push(e.path());
            }
        }
        out.push((p, m.mode() & 0o7777, m.gid(), m.file_type()));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn is_base(p: &Path) -> bool {
    p.parent().and_then(Path::file_name) == Some("bases".as_ref())
        && p.extension() == Some("raw".as_ref())
}

/// Modes in `root` that differ from `dir`, `file` and `base`, one per line.
fn wrong_modes(root: &Path, dir: u32, file: u32, base: u32) -> String {
    tree(root)
        .into_iter()
        .filter(|(p, mode, _, ft)| {
            let want = if ft.is_dir() {
                dir
            } else if is_base(p) {
                base
            } else {
                file
            };
            *mode != want
        })
        .map(|(p, mode, _, _)| format!("{mode:o} {}\n", p.display()))
        .collect()
}

#[test]
fn depot_is_private_whatever_the_umask_after_import_and_run() {
    let t = T::new();
    let d = t.depot();
    let g = test_guest().to_str().unwrap();
    ok_umask("000", &d, &["image", "import", g, "--name", "tiny", "-q"]);
    ok_umask(
        "000",
        &d,
        &[
            "instance", "run", "tiny", "--name", "web", "--disk", "overlay", "-q",
        ],
    );
    // and a lazy one: its disk server's socket, lock and log
    ok_umask(
        "000",
        &d,
        &["instance", "run", "tiny", "--name", "lazy", "-q"],
    );
    // A reader keeps the catalog open, so its -wal and -shm exist.
    let mut logs = umask_cmd("000", &d, &["instance", "logs", "--follow", "web"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until("catalog.db-wal and -shm", Duration::from_secs(20), || {
        d.join("catalog.db-wal").exists() && d.join("catalog.db-shm").exists()
    });
    let inst = t.json(&["instance", "show", "web", "--json"]);
    let dir = PathBuf::from(inst["dir"].as_str().unwrap());
    let all = tree(&d);
    for f in [
        "qmp.sock",
        "console.sock",
        "serial.log",
        "qemu.pid",
        "disk.qcow2",
        "seed.img",
        "lock",
    ] {
        assert!(all.iter().any(|e| e.0 == dir.join(f)), "no {f} in {all:?}");
    }
    assert!(all.iter().any(|e| is_base(&e.0)), "no base in {all:?}");
    let served = all
        .iter()
        .filter(|e| e.0.starts_with(d.join("serve")))
        .count();
    assert!(served >= 4, "no disk server files in {all:?}");
    let wrong = wrong_modes(&d, 0o700, 0o600, 0o400);
    logs.kill().unwrap();
    logs.wait().unwrap();
    t.ok(&["instance", "delete", "web", "--force"]);
    t.ok(&["instance", "delete", "lazy", "--force"]);
    assert_eq!(wrong, "", "not 0700 (dirs), 0600 (files), 0400 (bases)");
}

#[test]
fn export_gets_the_callers_umask_not_the_depots() {
    let t = T::new();
    let src = t.path("src.raw");
    synthetic_raw(&src, 4, 1);
    t.import(&src, "img");
    for (fmt, name) in [("raw", "out.raw"), ("qcow2", "out.qcow2")] {
        let out = t.path(name);
        let o = out.to_str().unwrap();
        ok_umask(
            "027",
            &t.depot(),
            &["image", "export", "img", o, "--format", fmt],
        );
        let mode = std::fs::metadata(&out).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o640, "{name}: {mode:o}");
    }
    assert_eq!(wrong_modes(&t.depot(), 0o700, 0o600, 0o400), "");
}

#[test]
fn existing_depot_root_is_closed_when_its_owner_opens_it() {
    let t = T::new();
    t.ok(&["gc"]); // creates the depot
    let root = t.depot();
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).unwrap();
    t.ok(&["image", "list"]);
    let mode = std::fs::metadata(&root).unwrap().mode() & 0o7777;
    assert_eq!(mode, 0o700, "{mode:o}");
}

/// A group other than root's own (the test runs as root, who may chown).
fn some_group() -> (String, u32) {
    let groups = std::fs::read_to_string("/etc/group").unwrap();
    groups
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            Some((f.first()?.to_string(), f.get(2)?.parse().ok()?))
        })
        .find(|(_, gid)| *gid != 0 && *gid != nix_gid())
        .expect("a group in /etc/group")
}

fn nix_gid() -> u32 {
    std::fs::metadata("/proc/self").unwrap().gid()
}

#[test]
fn group_depot_is_shared_by_its_group_and_stays_so() {
    let t = T::new();
    let d = t.depot();
    let (group, gid) = some_group();
    let src = t.path("a.raw");
    synthetic_raw(&src, 4, 1);
    let s = src.to_str().unwrap();
    ok_umask(
        "000",
        &d,
        &["--group", &group, "image", "import", s, "--name", "a", "-q"],
    );
    let check = |when: &str| {
        assert_eq!(
            wrong_modes(&d, 0o2770, 0o660, 0o440),
            "",
            "{when}: not 2770 (dirs), 0660 (files)"
        );
        let other: Vec<_> = tree(&d).into_iter().filter(|e| e.2 != gid).collect();
        assert!(other.is_empty(), "{when}: not of group {group}: {other:?}");
    };
    check("created");
    // Later opens keep the choice, without --group and whatever the umask.
    let b = t.path("b.raw");
    synthetic_raw(&b, 4, 2);
    ok_umask(
        "077",
        &d,
        &["image", "import", b.to_str().unwrap(), "--name", "b", "-q"],
    );
    check("second import");
    // --group names the choice made at creation; anything else is refused.
    t.ok(&["--group", &group, "image", "list"]);
    t.refuses(
        &["--group", "root", "image", "list"],
        2,
        "only when a depot is created",
    );
    let private = T::new();
    private.ok(&["gc"]); // creates the depot
    private.refuses(&["--group", &group, "image", "list"], 2, "private");
    let fresh = T::new();
    fresh.refuses(
        &["--group", "no-such-group-x", "image", "list"],
        2,
        "no such group",
    );
}

#[test]
fn invalid_account_names_are_refused_with_usage_exit_code() {
    let t = T::new();
    let src = t.path("a.raw");
    synthetic_raw(&src, 4, 1);
    t.import(&src, "mine");
    let long = "a".repeat(33);
    let bad = [
        "",
        "m\nExecStartPre=/bin/touch /x",
        "Alice",
        "a/b",
        "a b",
        "-a",
        "1a",
        "a\x1b[31m",
        "a$b",
        long.as_str(),
    ];
    for a in bad {
        // (--x=VALUE: clap would take "-a" for a flag)
        let (code, err) = t.fails(&[&format!("--account={a}"), "image", "list"]);
        assert_eq!(code, 2, "{a:?}: {err}");
        assert!(err.contains("invalid account name"), "{a:?}: {err}");
        let (code, err) = t.fails(&["image", "share", "mine", &format!("--with={a}")]);
        assert_eq!(code, 2, "share --with {a:?}: {err}");
        let (code, _) = t.fails(&["image", "unshare", "mine", &format!("--with={a}")]);
        assert_eq!(code, 2, "unshare --with {a:?}");
        let o = t
            .cmd(&["image", "list"])
            .env("VMDEPOT_ACCOUNT", a)
            .output()
            .unwrap();
        // (an empty VMDEPOT_ACCOUNT means unset)
        if !a.is_empty() {
            assert_eq!(o.status.code(), Some(2), "VMDEPOT_ACCOUNT={a:?}");
        }
    }
    for good in ["alice", "_svc", "bob-2", "build_1$", &"a".repeat(32)] {
        t.ok(&["--account", good, "image", "list"]);
    }
    t.ok(&["image", "share", "mine", "--with", "bob-2"]);
}

fn unit_exec_start(unit: &str) -> &str {
    unit.lines()
        .find(|l| l.starts_with("ExecStart="))
        .expect("ExecStart= line")
}

#[test]
fn unit_quotes_a_depot_path_with_space_percent_and_dollar() {
    let t = T::new();
    let d = t.path("my depot %n $HOME");
    let g = test_guest().to_str().unwrap();
    ok_umask("022", &d, &["image", "import", g, "--name", "tiny", "-q"]);
    ok_umask("022", &d, &["instance", "run", "tiny", "--name", "u", "-q"]);
    let unit = ok_umask("022", &d, &["instance", "unit", "u"]);
    ok_umask("022", &d, &["instance", "delete", "u", "--force"]);
    let root = std::fs::canonicalize(&d).unwrap();
    let root = root.to_str().unwrap();
    assert!(root.ends_with("my depot %n $HOME"), "{root}");
    let id = unit
        .lines()
        .find_map(|l| l.strip_prefix("Description=vmdepot instance u ("))
        .and_then(|r| r.strip_suffix(')'))
        .expect("Description= line")
        .to_owned();
    let want = format!(
        "ExecStart=\"{}\" \"--depot\" \"{}\" \"--account\" \"root\" \"instance\" \"start\" \"{id}\" \"--foreground\"",
        bin(),
        root.replace('%', "%%").replace('$', "$$"),
    );
    assert_eq!(unit_exec_start(&unit), want, "{unit}");
    // systemd itself accepts it, where its tools are installed
    let f = t.path("vm-u.service");
    std::fs::write(&f, &unit).unwrap();
    if let Ok(o) = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&f)
        .output()
    {
        assert!(
            o.status.success() && o.stderr.is_empty(),
            "systemd-analyze verify: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
}

#[test]
fn instance_boots_from_a_depot_path_with_a_comma() {
    let t = T::new();
    let d = t.path("dep,ot,file=x");
    let g = test_guest().to_str().unwrap();
    ok_umask("022", &d, &["image", "import", g, "--name", "tiny", "-q"]);
    ok_umask("022", &d, &["instance", "run", "tiny", "--name", "c", "-q"]);
    let end = Instant::now() + BOOT;
    let log = loop {
        let log = ok_umask("022", &d, &["instance", "logs", "c"]);
        if log.contains(READY) {
            break log;
        }
        assert!(Instant::now() < end, "no ready line after {BOOT:?}:\n{log}");
        std::thread::sleep(Duration::from_millis(200));
    };
    ok_umask("022", &d, &["instance", "delete", "c", "--force"]);
    // its own disk (through the overlay on the base) and its seed
    assert!(log.contains(DISK_MARKER), "{log}");
    assert!(log.contains("VMDEPOT-HOSTNAME: c"), "{log}");
}

#[test]
fn descriptions_and_fields_are_printed_escaped() {
    let t = T::new();
    let src = t.path("a.raw");
    synthetic_raw(&src, 4, 1);
    let forged = "nice\nowner                alice\x1b[31m";
    t.ok(&[
        "image",
        "import",
        src.to_str().unwrap(),
        "--name",
        "app",
        "--type",
        "marketplace",
        "--description",
        forged,
        "--vendor",
        "V\x1b]0;pwned\x07",
        "--application",
        "shop\r",
        "--app-version",
        "1\u{202e}2",
        "--tag",
        "k=v\x1b[2J",
        "-q",
    ]);
    let clean = |what: &str, out: &str| {
        assert!(
            !out.chars()
                .any(|c| (c.is_control() && c != '\n') || c == '\u{202e}'),
            "{what}: raw control characters in {out:?}"
        );
    };
    let show = t.ok(&["image", "show", "app"]);
    clean("show", &show);
    let owners: Vec<&str> = show.lines().filter(|l| l.starts_with("owner")).collect();
    assert_eq!(owners.len(), 1, "a forged owner line: {show}");
    assert!(!owners[0].contains("alice"), "{show}");
    assert!(
        show.contains("nice\\nowner                alice\\x1b[31m"),
        "{show}"
    );
    assert!(show.contains("V\\x1b]0;pwned\\x07"), "{show}");
    assert!(show.contains("shop\\r"), "{show}");
    assert!(show.contains("1\\u{202e}2"), "{show}");
    assert!(show.contains("k=v\\x1b[2J"), "{show}");
    // update prints the same form
    let upd = t.ok(&["image", "update", "app", "--description", "a\x1b[2Jb\\c"]);
    clean("update", &upd);
    assert!(upd.contains("a\\x1b[2Jb\\\\c"), "{upd}");
    clean("list", &t.ok(&["image", "list"]));
    // JSON keeps the strings as they are
    let j = t.json(&["image", "show", "app", "--json"]);
    assert_eq!(j["description"], "a\x1b[2Jb\\c");
    assert_eq!(j["vendor"], "V\x1b]0;pwned\x07");
}
