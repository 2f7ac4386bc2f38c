//! The library as a test harness uses it: ephemeral instances that cannot
//! outlive their owner (killed with SIGKILL or SIGTERM), the idempotent
//! import of a fixture, serial lines as they come, writing to the console.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use vmdepot::{Depot, Error, ImportOptions, LaunchOptions, NoProgress};

use crate::common::*;

/// The depot the owner process (below) launches into.
const OWNER_DEPOT: &str = "VMDEPOT_TEST_OWNER_DEPOT";
/// How many ephemeral instances it launches.
const OWNER_COUNT: &str = "VMDEPOT_TEST_OWNER_COUNT";

/// Not a test of its own: the owner process that `owner_killed` runs (this
/// test binary again, with `--ignored --exact`). It launches ephemeral
/// instances of "tiny" in the depot `$VMDEPOT_TEST_OWNER_DEPOT`, prints
/// `READY <id> <pid>` for each once its guest is ready, then `ALL-READY`,
/// and waits to be killed.
#[test]
#[ignore = "run by owner_killed as its child process"]
fn owner_process() {
    let Some(dir) = std::env::var_os(OWNER_DEPOT) else {
        return;
    };
    let count = std::env::var(OWNER_COUNT).unwrap().parse().unwrap();
    let depot = Depot::open(dir).unwrap();
    let mut opts = LaunchOptions::new("tiny");
    opts.ephemeral = true;
    opts.count = count;
    opts.name = Some("eph".into());
    let vms = depot.launch(&opts, &NoProgress).unwrap().instances;
    // waited for on threads that end: a QEMU must not die with the thread
    // that launched or waited for it, only with this process
    std::thread::scope(|s| {
        for vm in &vms {
            s.spawn(|| vm.wait_for_serial(READY, BOOT).unwrap());
        }
    });
    for vm in &vms {
        println!("READY {} {}", vm.id(), vm.info().pid.unwrap());
    }
    println!("ALL-READY");
    std::thread::sleep(Duration::from_secs(600));
}

/// Starts the owner process on `depot` with `count` instances; returns it
/// and the (id, pid) of its instances once they are ready.
fn start_owner(depot: &Path, count: u32) -> (Child, Vec<(String, i32)>) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "harness::owner_process",
            "--exact",
            "--ignored",
            "--nocapture",
            "-q",
        ])
        .env(OWNER_DEPOT, depot)
        .env(OWNER_COUNT, count.to_string())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut vms = Vec::new();
    let mut seen = Vec::new();
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        seen.push(line.clone());
        if let Some(rest) = line.strip_prefix("READY ") {
            let (id, pid) = rest.split_once(' ').unwrap();
            vms.push((id.to_owned(), pid.parse().unwrap()));
        }
        if line == "ALL-READY" {
            return (child, vms);
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("the owner process ended before its guests were ready: {seen:?}");
}

fn owner_killed(signal: nix::sys::signal::Signal, count: u32) {
    let t = depot_with_guest();
    let (mut owner, vms) = start_owner(&t.depot(), count);
    assert_eq!(vms.len(), count as usize);
    let listed = t.json(&["instance", "list", "--json"]);
    assert_eq!(items(&listed).len(), count as usize);
    assert!(
        items(&listed).iter().all(|i| i["ephemeral"] == true),
        "{listed}"
    );
    // The first one restarted by another process (the CLI): a daemonized
    // QEMU, no child of the owner; it is found by its owner's lease.
    let (first, _) = &vms[0];
    t.ok(&["instance", "stop", first, "--force", "-q"]);
    t.ok(&["instance", "start", first, "-q"]);
    let restarted = show(&t, first)["pid"].as_i64().unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(owner.id() as i32), signal).unwrap();
    owner.wait().unwrap();
    // The owner's own QEMUs die with it, at once, nothing else running.
    for (id, pid) in &vms[1..] {
        wait_until(
            &format!("the QEMU of {id} dies with its owner"),
            Duration::from_secs(10),
            || !alive(*pid as i64),
        );
    }
    assert!(
        alive(restarted),
        "the restarted QEMU is not the owner's child"
    );
    // The next operation on the depot removes what is left: the restarted
    // QEMU, every row and directory.
    let listed = t.json(&["instance", "list", "--json"]);
    assert!(items(&listed).is_empty(), "{listed}");
    // killed by that look (init reaps the daemonized QEMU a moment later)
    wait_until(
        "the restarted QEMU is reaped",
        Duration::from_secs(10),
        || !alive(restarted),
    );
    for (id, _) in &vms {
        assert!(!t.depot().join("instances").join(id).exists(), "{id}");
    }
    // and their image's disk server, with no instance left, exits
    wait_until(
        "the disk server of their image exits",
        Duration::from_secs(60),
        || disk_servers_in(&t.depot()).is_empty(),
    );
}

#[test]
fn ephemeral_instances_die_with_an_owner_killed_by_sigkill() {
    owner_killed(nix::sys::signal::Signal::SIGKILL, 3);
}

#[test]
fn ephemeral_instances_die_with_an_owner_killed_by_sigterm() {
    owner_killed(nix::sys::signal::Signal::SIGTERM, 2);
}

#[test]
fn ensure_imported_is_idempotent_and_refuses_other_content() {
    let t = T::new();
    let depot = Depot::open(t.depot()).unwrap();
    let disk = t.path("fixture.raw");
    synthetic_raw(&disk, 8, 1);
    let opts = ImportOptions::new("fixture");
    let first = depot.ensure_imported(&disk, &opts, &NoProgress).unwrap();
    let again = depot.ensure_imported(&disk, &opts, &NoProgress).unwrap();
    assert_eq!(first.id, again.id);
    // The same content from another file: the same image too.
    let copy = t.path("copy.raw");
    std::fs::copy(&disk, &copy).unwrap();
    let from_copy = depot.ensure_imported(&copy, &opts, &NoProgress).unwrap();
    assert_eq!(from_copy.id, first.id);
    // Nothing else is left: the probes are gone, gc frees nothing.
    let names: Vec<String> = depot
        .list_images()
        .unwrap()
        .into_iter()
        .map(|i| i.name)
        .collect();
    assert_eq!(names, ["fixture"]);
    assert_eq!(depot.gc(false).unwrap().chunks_removed, 0);
    // Other content: a typed error naming image and file; the image is
    // unchanged.
    synthetic_raw(&copy, 8, 2);
    let e = depot
        .ensure_imported(&copy, &opts, &NoProgress)
        .unwrap_err();
    assert!(matches!(e, Error::ContentDiffers { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(msg.contains(&first.id) && msg.contains("copy.raw"), "{msg}");
    assert_eq!(e.exit_code(), 1);
    let now = depot.image("fixture").unwrap();
    assert_eq!(now.content_digest, first.content_digest);
    assert_eq!(depot.list_images().unwrap().len(), 1);
    // A name not taken: an import.
    let other = depot
        .ensure_imported(&copy, &ImportOptions::new("other"), &NoProgress)
        .unwrap();
    assert_ne!(other.content_digest, first.content_digest);
}

#[test]
fn serial_lines_come_as_written_and_the_console_takes_input() {
    let t = depot_with_guest();
    let depot = Depot::open(t.depot()).unwrap();
    let mut opts = LaunchOptions::new("tiny");
    opts.ephemeral = true;
    let vm = depot
        .launch(&opts, &NoProgress)
        .unwrap()
        .instances
        .remove(0);
    let mut lines = vm.serial_lines();
    let mut seen = Vec::new();
    while !seen.iter().any(|l: &String| l.contains(READY)) {
        seen.push(lines.next_line(BOOT).unwrap());
    }
    assert!(seen.iter().any(|l| l.contains(DISK_MARKER)), "{seen:?}");
    assert!(seen.iter().all(|l| !l.ends_with('\r')), "{seen:?}");
    // Nothing more for a while: a typed timeout, and the stream goes on.
    let e = lines.next_line(Duration::from_millis(300)).unwrap_err();
    assert!(matches!(e, Error::Timeout { .. }), "{e:?}");
    // Typed on the console: the guest echoes it.
    vm.write_console(b"hello from the harness\n").unwrap();
    let echo = loop {
        let l = lines.next_line(BOOT).unwrap();
        if l.contains("VMDEPOT-ECHO:") {
            break l;
        }
    };
    assert!(
        echo.ends_with("VMDEPOT-ECHO: hello from the harness"),
        "{echo}"
    );
    // A prompt ends no line: it is found all the same.
    vm.write_console(b"prompt-like:").unwrap();
    let p = vm.wait_for_serial("prompt-like:", BOOT).unwrap();
    assert!(p.ends_with("prompt-like:"), "{p}");
    vm.write_console(b"\n").unwrap();
    // The handle holds the console: another client is told it is busy.
    t.refuses(&["instance", "console", vm.id()], 1, "is busy");
    vm.write_console(b"twice\n").unwrap();
    vm.wait_for_serial("VMDEPOT-ECHO: twice", BOOT).unwrap();
    vm.release_console();
    // QEMU gone: the iterator reads what is left, then ends.
    let pid = vm.info().pid.unwrap();
    kill_qemu(pid);
    let rest: Vec<_> = vm.serial_lines().collect::<Result<_, _>>().unwrap();
    assert!(
        rest.iter().any(|l| l.contains("VMDEPOT-ECHO: twice")),
        "{rest:?}"
    );
    let e = loop {
        match lines.next_line(BOOT) {
            Ok(_) => continue,
            Err(e) => break e,
        }
    };
    assert!(matches!(e, Error::GuestExited { .. }), "{e:?}");
    // Started again: its serial lines are those of the new run only.
    depot.start_instance(vm.id()).unwrap();
    let again = depot.instance_handle(vm.id()).unwrap();
    let mut fresh = Vec::new();
    for l in again.serial_lines() {
        let l = l.unwrap();
        if l.contains(READY) {
            break;
        }
        fresh.push(l);
    }
    assert!(
        fresh.iter().all(|l| !l.contains("VMDEPOT-ECHO")),
        "{fresh:?}"
    );
    assert!(again.serial().unwrap().contains("VMDEPOT-ECHO: twice"));
}

#[test]
fn the_ssh_command_names_the_images_user() {
    let t = T::new();
    t.ok(&[
        "image",
        "import",
        test_guest().to_str().unwrap(),
        "--name",
        "tiny",
        "--tag",
        "ssh-user=debian",
        "-q",
    ]);
    let out = t.ok(&["instance", "run", "tiny", "--name", "a"]);
    let port = show(&t, "a")["ssh_port"].as_u64().unwrap();
    assert!(
        out.contains(&format!("ssh -p {port} debian@127.0.0.1")),
        "{out}"
    );
    assert_eq!(show(&t, "a")["ssh_user"], "debian");
    // Without the tag: no user, no placeholder.
    t.import(test_guest(), "plain");
    let out = t.ok(&["instance", "run", "plain", "--name", "b"]);
    assert!(
        out.contains("ssh -p ") && out.contains(" 127.0.0.1"),
        "{out}"
    );
    assert!(!out.contains('<') && !out.contains("@127"), "{out}");
    assert!(show(&t, "b")["ssh_user"].is_null());
    t.ok(&["instance", "delete", "a", "b", "--force"]);
}

#[test]
fn the_example_boots_three_guests_and_leaves_nothing() {
    let t = depot_with_guest();
    // `cargo test` builds the examples, `cargo test --test it` does not
    let built = Command::new(env!("CARGO"))
        .args(["build", "--release", "-q", "--example", "three_guests"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .unwrap();
    assert!(built.success());
    let exe = std::env::current_exe().unwrap();
    let example = exe
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples/three_guests");
    let out = Command::new(&example)
        .args([test_guest().to_str().unwrap(), READY])
        .env("VMDEPOT_DIR", t.depot())
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", example.display()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{stdout}");
    assert!(lines.iter().all(|l| l.ends_with(READY)), "{stdout}");
    // dropped on the way out: no instance, no QEMU of this depot
    assert!(items(&t.json(&["instance", "list", "--json"])).is_empty());
    let qemus = t.depot().join("instances").display().to_string();
    wait_until(
        "no QEMU of the depot is left",
        Duration::from_secs(10),
        || procs_naming(&qemus).is_empty(),
    );
    // it imported its disk once, under its own name
    let images = t.json(&["image", "list", "--json"]);
    let mut names: Vec<String> = items(&images).iter().map(|i| str_at(i, "name")).collect();
    names.sort();
    assert_eq!(names, ["example", "tiny"], "{images}");
}
