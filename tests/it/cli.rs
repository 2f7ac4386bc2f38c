//! The command line itself, through the real binary: help for every
//! argument and examples for every command, the aliases (`ls`, `rm`,
//! `launch`), `instance stop|start|restart|delete` on several instances and
//! `--all`, and `instance logs -n`. One test boots guests (two), the others
//! boot none.

use std::process::{Command, Output};

use crate::common::*;

/// `vmdepot ARGS` without a depot (help needs none).
fn vmdepot(args: &[&str]) -> Output {
    let o = Command::new(bin()).args(args).output().unwrap();
    assert!(
        o.status.success(),
        "vmdepot {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

fn help(args: &[&str]) -> String {
    String::from_utf8(vmdepot(args).stdout).unwrap()
}

/// The lines of the help sections (`Arguments:`, `Options:`, `Global
/// options:`, `Commands:`) named `heading`, up to the blank line that ends
/// them (long help has blank lines between its entries: those sections end
/// at the next heading).
fn section<'a>(help: &'a str, heading: &str) -> Vec<&'a str> {
    let mut lines = help.lines().skip_while(|l| *l != heading).skip(1);
    let mut v = Vec::new();
    for l in lines.by_ref() {
        if !l.is_empty() && !l.starts_with(' ') {
            break; // the next heading
        }
        v.push(l);
    }
    v
}

fn indent(l: &str) -> usize {
    l.len() - l.trim_start().len()
}

/// The subcommands a help text lists (not `help`).
fn subcommands(help: &str) -> Vec<String> {
    section(help, "Commands:")
        .iter()
        .take_while(|l| !l.is_empty())
        .map(|l| l.split_whitespace().next().unwrap().to_owned())
        .filter(|c| c != "help")
        .collect()
}

/// What is wrong with the arguments of one command's long help (`--help`):
/// each argument line (indented less than 10) must be followed by its
/// description (indented 10).
fn long_help_problems(path: &str, help: &str) -> Vec<String> {
    let mut v = Vec::new();
    for heading in ["Arguments:", "Options:", "Global options:"] {
        let lines = section(help, heading);
        for (k, l) in lines.iter().enumerate() {
            if l.is_empty() || indent(l) >= 10 {
                continue;
            }
            let next = lines.get(k + 1).copied().unwrap_or("");
            if next.trim().is_empty() || indent(next) < 10 {
                v.push(format!("{path} --help: {:?} has no description", l.trim()));
            }
        }
    }
    v
}

/// What is wrong with one command's short help (`-h`): each argument line
/// holds its description after two spaces, or on the next line, further
/// indented.
fn short_help_problems(path: &str, help: &str) -> Vec<String> {
    let mut v = Vec::new();
    for heading in ["Arguments:", "Options:", "Global options:"] {
        let lines = section(help, heading);
        for (k, l) in lines.iter().enumerate() {
            if l.is_empty() || indent(l) >= 10 {
                continue;
            }
            let described = l
                .trim()
                .split_once("  ")
                .is_some_and(|(_, d)| !d.trim().is_empty());
            let next = lines.get(k + 1).copied().unwrap_or("");
            let below = indent(next) >= 10 && !next.trim().is_empty();
            if !described && !below {
                v.push(format!("{path} -h: {:?} has no description", l.trim()));
            }
        }
    }
    v
}

#[test]
fn every_argument_has_help_and_every_command_examples() {
    let top = help(&["help"]);
    assert!(top.contains("Examples:"), "{top}");
    let mut todo: Vec<Vec<String>> = subcommands(&top).into_iter().map(|c| vec![c]).collect();
    assert!(todo.len() >= 6, "{top}");
    let mut problems = Vec::new();
    let mut seen = 0;
    while let Some(path) = todo.pop() {
        seen += 1;
        let name = format!("vmdepot {}", path.join(" "));
        let mut args: Vec<&str> = path.iter().map(String::as_str).collect();
        args.push("--help");
        let long = help(&args);
        *args.last_mut().unwrap() = "-h";
        let short = help(&args);
        if !long.contains("\nExamples:\n  vmdepot ") {
            problems.push(format!("{name} --help: no examples"));
        }
        if short.contains("Examples:") {
            problems.push(format!("{name} -h: examples belong in --help"));
        }
        problems.extend(long_help_problems(&name, &long));
        problems.extend(short_help_problems(&name, &short));
        // `vmdepot help PATH` is the same long help
        let mut via_help = vec!["help"];
        via_help.extend(path.iter().map(String::as_str));
        assert_eq!(help(&via_help), long, "{name}");
        for sub in subcommands(&long) {
            let mut p = path.clone();
            p.push(sub);
            todo.push(p);
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");
    // the groups, gc, fsck, stats, and every subcommand of the groups
    assert!(seen >= 36, "only {seen} commands walked");
}

#[test]
fn the_help_checks_catch_a_missing_description() {
    let long = "Options:\n      --json\n\n      --name <NAME>\n          The name\n\n  -h, --help\n          Print help\n";
    assert_eq!(long_help_problems("x", long).len(), 1, "{long}");
    let short = "Arguments:\n  <FILE>  \n\nOptions:\n      --name <NAME>  The name\n      --json\n";
    assert_eq!(short_help_problems("x", short).len(), 2, "{short}");
}

#[test]
fn aliases_are_shown_and_work() {
    for (group, shown) in [
        ("image", &["list", "delete"][..]),
        ("instance", &["run", "list", "delete"]),
        ("remote", &["list", "remove"]),
    ] {
        let h = help(&[group, "--help"]);
        for cmd in shown {
            let alias = match *cmd {
                "run" => "launch",
                "list" => "ls",
                _ => "rm",
            };
            let line = section(&h, "Commands:")
                .into_iter()
                .find(|l| l.split_whitespace().next() == Some(cmd))
                .unwrap_or_else(|| panic!("{group} {cmd} not listed:\n{h}"));
            assert!(line.contains(&format!("[alias: {alias}]")), "{line}");
        }
    }

    let t = T::new();
    let raw = t.path("small.raw");
    synthetic_raw(&raw, 4, 7);
    let id = id_of(&t.import(&raw, "small"));
    assert_eq!(t.ok(&["image", "ls"]), t.ok(&["image", "list"]));
    assert!(t.ok(&["image", "ls"]).contains("small"));
    let listed = t.json(&["image", "ls", "--json"]);
    assert_eq!(strs_at(&listed, "id"), vec![id.clone()]);
    assert_eq!(
        t.json(&["instance", "ls", "--json"]),
        t.json(&["instance", "list", "--json"])
    );
    assert_eq!(items(&t.json(&["remote", "ls", "--json"])).len(), 0);
    t.refuses(&["remote", "rm", "eu"], 3, "no remote named \"eu\"");
    let out = t.ok(&["image", "rm", "small"]);
    assert!(out.contains(&format!("deleted small ({id})")), "{out}");
    assert_eq!(items(&t.json(&["image", "ls", "--json"])).len(), 0);
    t.refuses(&["image", "rm", "small"], 3, "small");
    // `instance launch` parses as `instance run` (the guest test launches with it)
    t.refuses(&["instance", "launch", "nothing-here"], 3, "nothing-here");
}

#[test]
fn several_instances_and_all_are_checked_before_anything_runs() {
    let t = T::new();
    for bad in [
        &["instance", "stop"][..],
        &["instance", "start"],
        &["instance", "restart"],
        &["instance", "delete"],
        &["instance", "stop", "a", "--all"],
        &["instance", "delete", "--all", "a"],
        &["instance", "start", "--all", "--foreground"],
        &["instance", "logs", "a", "-n", "many"],
    ] {
        let o = t.run(bad);
        assert_eq!(o.status.code(), Some(2), "{bad:?} should be a usage error");
    }
    t.refuses(
        &["instance", "start", "a", "b", "--foreground"],
        2,
        "--foreground",
    );
    // --all on no instances: nothing to do
    for cmd in ["stop", "start", "restart", "delete"] {
        assert_eq!(t.ok(&["instance", cmd, "--all"]), "");
    }
    // every name that fails is one line on stderr; the first failure's code
    let o = t.run(&["instance", "delete", "x", "y"]);
    assert_eq!(o.status.code(), Some(3));
    let err = String::from_utf8_lossy(&o.stderr);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 2, "{err}");
    assert!(
        lines[0].starts_with("vmdepot: ") && lines[0].contains("\"x\""),
        "{err}"
    );
    assert!(lines[1].contains("\"y\""), "{err}");
    assert!(o.stdout.is_empty());
}

/// Runs `vmdepot ARGS` on `t`'s depot; returns the exit code, the stdout
/// lines and the stderr lines.
fn outcome(t: &T, args: &[&str]) -> (i32, Vec<String>, Vec<String>) {
    let o = t.run(args);
    let lines = |b: &[u8]| -> Vec<String> {
        String::from_utf8_lossy(b)
            .lines()
            .map(str::to_owned)
            .collect()
    };
    (o.status.code().unwrap(), lines(&o.stdout), lines(&o.stderr))
}

fn state(t: &T, inst: &str) -> String {
    str_at(&show(t, inst), "state")
}

/// The last `n` lines of `log`, as `tail -n` gives them.
fn last_lines(log: &str, n: usize) -> String {
    let lines: Vec<&str> = log.split_inclusive('\n').collect();
    lines[lines.len().saturating_sub(n)..].concat()
}

/// The serial log of a guest that prints nothing more (the same twice,
/// 300 ms apart).
fn settled_log(t: &T, inst: &str) -> String {
    let mut log = serial(t, inst);
    wait_until("a settled serial log", BOOT, || {
        std::thread::sleep(std::time::Duration::from_millis(300));
        let now = serial(t, inst);
        std::mem::replace(&mut log, now) == log
    });
    log
}

#[test]
fn stop_start_restart_delete_several_and_all_and_logs_n() {
    let t = depot_with_guest();
    // `launch` is `run`
    t.ok(&["instance", "launch", "tiny", "--name", "a", "-q"]);
    boot(&t, "tiny", "b");
    wait_serial(&t, "a", READY);
    let ida = id_of(&show(&t, "a"));
    let idb = id_of(&show(&t, "b"));

    // show for people: sizes, times, forwards as text, - for absent
    let plain = t.ok(&["instance", "show", "a"]);
    let field = |k: &str| -> String {
        let l = plain
            .lines()
            .find(|l| l.split_whitespace().next() == Some(k))
            .unwrap_or_else(|| panic!("no {k} in {plain}"));
        l[k.len()..].trim().to_owned()
    };
    assert_eq!(field("memory_mib"), "512 MiB", "{plain}");
    assert_eq!(field("state"), "running", "{plain}");
    assert_eq!(field("error"), "-", "{plain}");
    let port = show(&t, "a")["ssh_port"].as_u64().unwrap();
    assert!(
        field("forwards").contains(&format!(":{port}->22")),
        "{plain}"
    );
    assert!(field("created_at").contains(" UTC ("), "{plain}");
    assert!(field("store_bytes_read").contains(" bytes"), "{plain}");
    assert!(!plain.contains('{') && !plain.contains('['), "{plain}");
    // the list's columns line up
    let list = t.ok(&["instance", "list"]);
    let header = list.lines().next().unwrap();
    let at = header.find("STATE").unwrap();
    for l in list.lines().skip(1) {
        assert!(l[at..].starts_with("running "), "{list}");
    }

    // logs -n N: the last N lines, as tail -n counts them
    let log = settled_log(&t, "a");
    assert!(log.lines().count() > 3, "{log}");
    assert_eq!(
        t.ok(&["instance", "logs", "a", "-n", "2"]),
        last_lines(&log, 2)
    );
    assert_eq!(
        t.ok(&["instance", "logs", "a", "--lines", "1"]),
        last_lines(&log, 1)
    );
    assert_eq!(t.ok(&["instance", "logs", "a", "-n", "0"]), "");
    assert_eq!(t.ok(&["instance", "logs", "a", "-n", "100000"]), log);

    // stop a nope b: both stopped, one error line, not found (3)
    let (code, out, err) = outcome(&t, &["instance", "stop", "a", "nope", "b"]);
    assert_eq!(code, 3, "{err:?}");
    assert_eq!(
        out,
        [format!("a ({ida}) stopped"), format!("b ({idb}) stopped")]
    );
    assert_eq!(err.len(), 1, "{err:?}");
    assert!(
        err[0].starts_with("vmdepot: ") && err[0].contains("\"nope\""),
        "{err:?}"
    );
    assert_eq!(
        (state(&t, "a"), state(&t, "b")),
        ("stopped".into(), "stopped".into())
    );

    // logs -n 2 --follow of a stopped instance: the last 2 lines, then its end
    let log = serial(&t, "a");
    assert_eq!(
        t.ok(&["instance", "logs", "a", "-n", "2", "-f"]),
        last_lines(&log, 2)
    );

    // start b nope a: in that order, both running
    let (code, out, err) = outcome(&t, &["instance", "start", "b", "nope", "a"]);
    assert_eq!(code, 3, "{err:?}");
    assert_eq!(out.len(), 2, "{out:?}");
    assert!(out[0].starts_with(&format!("b ({idb}) running")), "{out:?}");
    assert!(out[1].starts_with(&format!("a ({ida}) running")), "{out:?}");
    let errors: Vec<_> = err.iter().filter(|l| l.contains("nope")).collect();
    assert_eq!(errors.len(), 1, "{err:?}");
    // (a TCG notice, if any, once)
    assert!(err.len() <= 2, "{err:?}");

    // start --all starts those not running: b alone
    t.ok(&["instance", "stop", "b", "--force"]);
    let (code, out, err) = outcome(&t, &["instance", "start", "--all"]);
    assert_eq!(code, 0, "{err:?}");
    assert_eq!(out.len(), 1, "{out:?}");
    assert!(out[0].starts_with(&format!("b ({idb}) running")), "{out:?}");

    // restart a nope: a restarted (its guest may not have booted yet: killed after 1 s)
    let (code, out, err) = outcome(&t, &["instance", "restart", "a", "nope", "--timeout", "1"]);
    assert_eq!(code, 3, "{err:?}");
    assert_eq!(out, [format!("a ({ida}) running")]);
    assert_eq!(state(&t, "a"), "running");

    // stop --all: every instance, oldest first
    let (code, out, err) = outcome(&t, &["instance", "stop", "--all", "--force"]);
    assert_eq!(code, 0, "{err:?}");
    assert_eq!(
        out,
        [format!("a ({ida}) stopped"), format!("b ({idb}) stopped")]
    );
    assert!(err.is_empty(), "{err:?}");

    // delete: a running instance is refused without --force (1), the first
    // failure's code is the exit code, the others are deleted
    t.ok(&["instance", "start", "a"]);
    let (code, out, err) = outcome(&t, &["instance", "delete", "a", "nope"]);
    assert_eq!(code, 1, "{err:?}");
    assert!(out.is_empty(), "{out:?}");
    assert_eq!(err.len(), 2, "{err:?}");
    assert!(
        err[0].contains("is running") && err[0].contains("--force"),
        "{err:?}"
    );
    let (code, _, err) = outcome(&t, &["instance", "rm", "nope", "a"]);
    assert_eq!(code, 3, "{err:?}");
    assert_eq!(err.len(), 2, "{err:?}");

    // delete --all without --force: b (stopped) deleted, a (running) refused
    let (code, out, err) = outcome(&t, &["instance", "delete", "--all"]);
    assert_eq!(code, 1, "{err:?}");
    assert_eq!(out, [format!("deleted b ({idb})")]);
    assert_eq!(err.len(), 1, "{err:?}");
    assert!(
        err[0].contains(&ida) && err[0].contains("is running"),
        "{err:?}"
    );
    assert_eq!(
        strs_at(&t.json(&["instance", "ls", "--json"]), "id"),
        [ida.as_str()]
    );

    // delete --all --force: a killed and deleted
    let (code, out, err) = outcome(&t, &["instance", "delete", "--all", "--force"]);
    assert_eq!(code, 0, "{err:?}");
    assert_eq!(out, [format!("deleted a ({ida})")]);
    assert_eq!(items(&t.json(&["instance", "list", "--json"])).len(), 0);
}
