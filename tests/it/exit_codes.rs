//! README's exit-code table, row by row, each through real commands of the
//! binary (no guest boots); and what goes with it: usage errors clap and
//! vmdepot find are one line and exit 2, OS errors print once, inputs that
//! cannot be disks are refused, commands that only look create no depot,
//! tables fit their cells, plain `show` is for people and JSON says `null`
//! for what is absent.

use std::process::Stdio;

use serde_json::Value;

use crate::common::*;

/// A 1 MiB raw disk imported as `name` into `t` (as `account`, if any).
fn small_image(t: &T, name: &str, extra: &[&str]) -> String {
    let f = t.path(&format!("{name}.raw"));
    synthetic_raw(&f, 1, name.len() as u64);
    let mut args = vec!["image", "import", f.to_str().unwrap(), "--name", name, "-q"];
    args.extend_from_slice(extra);
    t.ok(&args).trim().to_owned()
}

#[test]
fn exit_0_success_and_1_errors_the_state_refuses() {
    let t = T::new();
    let id = small_image(&t, "one", &["--account", "alice"]);
    assert!(id.starts_with("img-"), "{id}");
    // 1: a name already taken
    let f = t.path("one.raw");
    t.refuses(
        &[
            "--account",
            "alice",
            "image",
            "import",
            f.to_str().unwrap(),
            "--name",
            "one",
        ],
        1,
        "already exists",
    );
    // 1, not 7 (no account is refused): a protected image, a shared one
    t.ok(&["--account", "alice", "image", "update", "one", "--protect"]);
    let err = t.refuses(
        &["--account", "alice", "image", "delete", "one", "--force"],
        1,
        "protected",
    );
    assert!(err.contains("--unprotect"), "{err}");
    t.ok(&[
        "--account",
        "alice",
        "image",
        "update",
        "one",
        "--unprotect",
    ]);
    t.ok(&[
        "--account",
        "alice",
        "image",
        "share",
        "one",
        "--with",
        "bob",
    ]);
    t.refuses(
        &["--account", "alice", "image", "delete", "one"],
        1,
        "shared with bob",
    );
    // 0
    t.ok(&["--account", "alice", "image", "delete", "one", "--force"]);
}

/// Usage errors: clap's (a bad value, a missing argument) and vmdepot's
/// own (flag combinations, account names), each one line, exit 2, nothing
/// created.
#[test]
fn exit_2_usage_errors_are_one_line() {
    // clap's errors are found before the depot is opened: none is created
    let fresh = T::new();
    fresh.refuses(&["instance", "run", "x", "--cpus", "0"], 2, "--cpus");
    fresh.refuses(
        &["--account=Bad", "image", "list"],
        2,
        "invalid account name",
    );
    assert!(
        !fresh.depot().exists(),
        "a refused command line created the depot"
    );
    let t = T::new();
    small_image(&t, "x", &[]);
    let bad: &[(&[&str], &str)] = &[
        (
            &["image", "import", "x.raw", "--name", "x", "--type", "bogus"],
            "--type",
        ),
        (
            &[
                "image", "import", "x.raw", "--name", "x", "--format", "bogus",
            ],
            "--format",
        ),
        (
            &[
                "image", "import", "x.raw", "--name", "x", "--tag", "novalue",
            ],
            "--tag",
        ),
        (
            &["image", "import", "x.raw", "--name", "x", "--tag", "k="],
            "--tag",
        ),
        (
            &["image", "import", "x.raw", "--name", "x", "--vendor", "v"],
            "--type marketplace",
        ),
        (&["image", "import", "x.raw"], "--name"),
        (&["image", "list", "--type", "bogus"], "--type"),
        (
            &["image", "export", "x", "out", "--format", "bogus"],
            "--format",
        ),
        (
            &["image", "export", "x", "-", "--format", "qcow2"],
            "qcow2 needs a file",
        ),
        (&["image", "frobnicate"], "frobnicate"),
        (&["instance", "run", "x", "--memory", "abc"], "--memory"),
        (
            &["instance", "run", "x", "--memory", "8M"],
            "at least 16 MiB",
        ),
        (
            &["instance", "run", "x", "--memory", "1"],
            "at least 16 MiB",
        ),
        (&["instance", "run", "x", "--cpus", "0"], "--cpus"),
        (&["instance", "run", "x", "--cpus", "256"], "--cpus"),
        (&["instance", "run", "x", "--count", "0"], "--count"),
        (&["instance", "run", "x", "--forward", "80"], "--forward"),
        (
            &["instance", "run", "x", "--forward", "host:8080:80"],
            "--forward",
        ),
        (&["instance", "run", "x", "--disk", "bogus"], "--disk"),
        (&["instance", "run", "x", "--accel", "bogus"], "--accel"),
        (
            &["instance", "run", "x", "--count", "2", "--foreground"],
            "--foreground",
        ),
        (&["instance", "logs", "x", "-n", "many"], "--lines"),
        (
            &[
                "--account=Bad Name",
                "image",
                "import",
                "x.raw",
                "--name",
                "x",
            ],
            "invalid account name",
        ),
    ];
    for (args, needle) in bad {
        let err = t.refuses(args, 2, needle);
        assert!(err.starts_with("vmdepot: "), "{args:?}: {err}");
    }
    // names vmdepot checks (the image exists: they are checked before a launch)
    let raw = t.path("x.raw");
    let raw = raw.to_str().unwrap();
    let me = str_at(&t.json(&["image", "show", "x", "--json"]), "owner");
    for (args, needle) in [
        (
            &["image", "import", raw, "--name", "a/b"][..],
            "invalid image name",
        ),
        (
            &["image", "update", "x", "--name", ""],
            "invalid image name",
        ),
        (
            &["instance", "run", "x", "--name", "bad name"],
            "bad instance name",
        ),
        (
            &["instance", "run", "x", "--hostname", "bad_host"],
            "--hostname",
        ),
        (&["image", "share", "x", "--with", &me], "yourself"),
    ] {
        t.refuses(args, 2, needle);
    }
    assert_eq!(items(&t.json(&["instance", "list", "--json"])).len(), 0);
    // clap's own errors point to the usage and --help
    let err = t.refuses(
        &["image", "import", "x.raw"],
        2,
        "(usage: vmdepot image import",
    );
    assert!(err.contains("see --help"), "{err}");
    // help and version still print as clap prints them, exit 0
    assert!(t
        .ok(&["instance", "run", "--help"])
        .contains("--memory <SIZE>"));
    assert!(t.ok(&["--version"]).starts_with("vmdepot "));
}

/// Not found: an image, an instance, a remote, and a depot that a command
/// which only looks does not create.
#[test]
fn exit_3_not_found_and_commands_that_only_look_create_no_depot() {
    let t = T::new();
    small_image(&t, "one", &[]);
    t.refuses(&["image", "show", "nope"], 3, "\"nope\"");
    t.refuses(&["instance", "show", "nope"], 3, "\"nope\"");
    t.refuses(&["instance", "run", "nope"], 3, "\"nope\"");
    t.refuses(
        &["remote", "remove", "unknown"],
        3,
        "no remote named \"unknown\"",
    );
    t.refuses(&["remote", "rm", "unknown"], 3, "remote add unknown");
    t.refuses(&["image", "push", "one", "unknown"], 3, "no remote named");

    let missing = t.path("typo/depot");
    let out = t.path("out.raw");
    for args in [
        &["image", "list"][..],
        &["image", "ls", "--json"],
        &["image", "show", "x"],
        &["image", "export", "x", out.to_str().unwrap()],
        &["image", "verify"],
        &["image", "history", "x"],
        &["image", "shares", "x"],
        &["instance", "list"],
        &["instance", "show", "x"],
        &["instance", "logs", "x"],
        &["instance", "unit", "x"],
        &["remote", "list"],
        &["fsck"],
        &["stats", "--json"],
        &["gc", "--dry-run"],
    ] {
        let err = refused(run_in(&missing, args), args, 3, "no depot at");
        assert!(err.contains(missing.to_str().unwrap()), "{err}");
        assert!(
            !t.path("typo").exists(),
            "{args:?} created {}",
            missing.display()
        );
    }
    assert!(!out.exists());
    // an empty directory is no depot either, and stays empty
    let empty = t.path("empty");
    std::fs::create_dir(&empty).unwrap();
    refused(run_in(&empty, &["image", "list"]), &[], 3, "no depot at");
    assert_eq!(std::fs::read_dir(&empty).unwrap().count(), 0);
    // a command that writes creates it
    let f = t.path("one.raw");
    ok_in(
        &missing,
        &["image", "import", f.to_str().unwrap(), "--name", "x", "-q"],
    );
    assert_eq!(
        items(&json_in(&missing, &["image", "list", "--json"])).len(),
        1
    );
}

/// Inputs that cannot be disks, and exit 4.
#[test]
fn exit_4_inputs_that_cannot_be_disks_are_refused() {
    let t = T::new();
    let text = t.path("notes.txt");
    std::fs::write(&text, b"hello world\n").unwrap();
    let small = t.path("small.raw");
    std::fs::write(&small, vec![7u8; 32 << 10]).unwrap();
    let odd = t.path("odd.raw");
    std::fs::write(&odd, vec![7u8; (1 << 20) + 100]).unwrap();
    let fifo = t.path("in.fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    for (file, needle) in [
        (&text, "not a multiple of 512"),
        (&odd, "not a multiple of 512"),
        (
            &small,
            "below the smallest disk vmdepot imports (65536 bytes",
        ),
        (&fifo, "FIFO"),
    ] {
        t.refuses(
            &["image", "import", file.to_str().unwrap(), "--name", "x"],
            4,
            needle,
        );
    }
    assert_eq!(items(&t.json(&["image", "list", "--json"])).len(), 0);
    // the smallest disk imports
    let least = t.path("least.raw");
    std::fs::write(&least, vec![7u8; 64 << 10]).unwrap();
    t.ok(&[
        "image",
        "import",
        least.to_str().unwrap(),
        "--name",
        "least",
        "-q",
    ]);
    let shown = t.json(&["image", "show", "least", "--json"]);
    assert_eq!(shown["virtual_size"], 64 << 10);
}

#[test]
fn exit_5_store_damaged() {
    let t = T::new();
    small_image(&t, "one", &[]);
    for ext in ["-wal", "-shm"] {
        let _ = std::fs::remove_file(t.depot().join(format!("catalog.db{ext}")));
    }
    std::fs::write(t.depot().join("catalog.db"), vec![0x5au8; 8192]).unwrap();
    t.refuses(&["image", "list"], 5, "catalog");
}

/// No space on an export's destination (stdout on /dev/full): exit 6, and
/// the message does not send the user to gc.
#[test]
fn exit_6_no_space() {
    let t = T::new();
    small_image(&t, "one", &[]);
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let o = t
        .cmd(&["image", "export", "one", "-", "-q"])
        .stdout(Stdio::from(full))
        .output()
        .unwrap();
    let err = refused(o, &["export", "-"], 6, "no space left");
    assert!(err.contains("not the depot's filesystem"), "{err}");
}

#[test]
fn exit_7_not_permitted_for_this_account() {
    let t = T::new();
    small_image(&t, "pub", &["--account", "alice", "--type", "public"]);
    t.refuses(
        &["--account", "bob", "image", "delete", "pub"],
        7,
        "only its owner",
    );
    t.refuses(
        &["--account", "bob", "image", "update", "pub", "--protect"],
        7,
        "only its owner",
    );
}

#[test]
fn exit_8_a_remote_failed() {
    let t = T::new();
    let o = t
        .cmd(&[
            "remote",
            "add",
            "eu",
            "s3://bucket/p",
            "--endpoint",
            "http://127.0.0.1:1",
            "--region",
            "garage",
        ])
        .env("AWS_ACCESS_KEY_ID", "GKexample")
        .env("AWS_SECRET_ACCESS_KEY", "secret-never-printed")
        .output()
        .unwrap();
    let err = refused(o, &["remote", "add"], 8, "remote eu");
    assert!(err.contains("127.0.0.1:1"), "{err}");
    assert!(!err.contains("secret-never-printed"), "{err}");
}

/// OS errors print once; an export into a missing directory names the
/// directory, not the temporary file export writes first.
#[test]
fn os_errors_print_once() {
    let t = T::new();
    small_image(&t, "one", &[]);
    let (code, err) = t.fails(&["image", "import", "/nonexistent.qcow2", "--name", "x"]);
    assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");
    assert_eq!(err.matches("os error 2").count(), 1, "{err}");
    assert!(err.contains("/nonexistent.qcow2"), "{err}");
    assert_eq!(code, 1, "{err}");
    for format in ["raw", "qcow2"] {
        let out = t.path("no/such/dir/out.img");
        let (_, err) = t.fails(&[
            "image",
            "export",
            "one",
            out.to_str().unwrap(),
            "--format",
            format,
            "-q",
        ]);
        assert_eq!(err.matches("os error 2").count(), 1, "{err}");
        assert!(!err.contains("vmdepot-partial"), "{err}");
        assert!(err.contains("no/such/dir"), "{err}");
    }
}

/// The strings that are empty anywhere in `v`, by their path.
fn empty_strings(v: &Value, path: &str, out: &mut Vec<String>) {
    match v {
        Value::String(s) if s.is_empty() => out.push(path.to_owned()),
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                empty_strings(x, &format!("{path}[{i}]"), out);
            }
        }
        Value::Object(o) => {
            for (k, x) in o {
                empty_strings(x, &format!("{path}.{k}"), out);
            }
        }
        _ => {}
    }
}

/// JSON: what is absent is null, never "" (README, "JSON").
#[test]
fn json_says_null_for_what_is_absent() {
    let t = T::new();
    small_image(&t, "one", &[]);
    let shown = t.json(&["image", "show", "one", "--json"]);
    for k in [
        "description",
        "parent",
        "parent_name",
        "source_instance",
        "copied_from",
        "vendor",
        "application",
        "app_version",
        "restricted_from",
        "damage",
    ] {
        assert_eq!(shown[k], Value::Null, "{k}: {shown}");
    }
    let mut empty = Vec::new();
    for args in [
        &["image", "show", "one", "--json"][..],
        &["image", "list", "--json"],
        &["image", "history", "one", "--json"],
        &["stats", "--json"],
        &["fsck", "--json"],
        &["gc", "--dry-run", "--json"],
        &["instance", "list", "--json"],
        &["remote", "list", "--json"],
    ] {
        empty_strings(&t.json(args), &args.join(" "), &mut empty);
    }
    assert!(empty.is_empty(), "empty strings instead of null: {empty:?}");
    // (a description that is given is there)
    t.ok(&["image", "update", "one", "--description", "the first"]);
    assert_eq!(
        t.json(&["image", "show", "one", "--json"])["description"],
        "the first"
    );
}

/// The column of every line of a table at which the header's `column`
/// starts, in characters.
fn column_starts(table: &str, column: &str) -> (usize, Vec<String>) {
    let mut lines = table.lines();
    let header = lines.next().unwrap();
    let at = header
        .find(column)
        .unwrap_or_else(|| panic!("{column} in {header}"));
    let at = header[..at].chars().count();
    let rest = lines
        .map(|l| l.chars().skip(at).collect::<String>())
        .collect();
    (at, rest)
}

#[test]
fn tables_fit_their_longest_cell_and_show_is_for_people() {
    let t = T::new();
    // a backup's name is 32 characters or more
    let long = "web-backup-20261202T073612-a1b2-and-more";
    small_image(&t, long, &["--tag", "os=debian", "--tag", "release=12"]);
    small_image(&t, "b", &[]);
    let list = t.ok(&["image", "list"]);
    let (_, cells) = column_starts(&list, "TYPE");
    assert!(cells.iter().all(|c| c.starts_with("custom ")), "{list}");
    let (_, cells) = column_starts(&list, "NAME");
    assert!(
        cells
            .iter()
            .any(|c| c.starts_with(&format!("{long}  custom"))),
        "{list}"
    );
    let stats = t.ok(&["stats"]);
    let table = &stats[stats.find("ID ").unwrap()..];
    let (_, cells) = column_starts(table, "NAME");
    assert!(cells.iter().any(|c| c.starts_with(long)), "{stats}");

    // show: sizes with their bytes, a time with its age, tags as text
    let show = t.ok(&["image", "show", long]);
    let field = |k: &str| -> String {
        let l = show
            .lines()
            .find(|l| l.split_whitespace().next() == Some(k))
            .unwrap_or_else(|| panic!("no {k} in {show}"));
        l[k.len()..].trim().to_owned()
    };
    let size = std::fs::metadata(t.path(&format!("{long}.raw")))
        .unwrap()
        .len();
    assert_eq!(
        field("virtual_size"),
        format!("1.0 MiB ({size} bytes)"),
        "{show}"
    );
    assert!(
        field("created_at").ends_with(" ago)") && field("created_at").contains(" UTC ("),
        "{show}"
    );
    assert_eq!(field("tags"), "os=debian, release=12", "{show}");
    assert_eq!(field("parent"), "-", "{show}");
    assert_eq!(field("description"), "-", "{show}");
    assert_eq!(field("protected"), "no", "{show}");
    assert!(
        !show.contains('{') && !show.contains('['),
        "JSON fragments in: {show}"
    );
}
