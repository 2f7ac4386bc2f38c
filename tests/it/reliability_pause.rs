//! Reliability: a live capture killed while the guest is paused never
//! leaves it paused (issue 10, item 2). One boot of the test guest (TCG).
//! The moment is found with the test-only hook
//! `VMDEPOT_TEST_PAUSED_SLEEP_MS` (the capture sleeps right after QMP
//! `stop`) and checked through QMP `query-status` on the instance's socket.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::*;

/// QMP `query-status` from the test itself (QEMU serves one client at a
/// time: this connects, asks, and disconnects).
fn qmp_status(sock: &Path) -> String {
    let s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    let mut answer = |cmd: &str| -> Value {
        if !cmd.is_empty() {
            writeln!(w, "{{\"execute\":\"{cmd}\"}}").unwrap();
        }
        loop {
            let mut line = String::new();
            assert!(r.read_line(&mut line).unwrap() > 0, "QMP closed");
            let v: Value = serde_json::from_str(&line).unwrap();
            if cmd.is_empty() || v.get("return").is_some() || v.get("error").is_some() {
                return v;
            }
        }
    };
    answer(""); // greeting
    answer("qmp_capabilities");
    let v = answer("query-status");
    v["return"]["status"].as_str().unwrap_or("?").to_owned()
}

/// A live capture that sleeps `ms` in its paused window.
fn spawn_capture(t: &T, name: &str, ms: u64) -> Child {
    t.cmd(&capture_args("g", name, &["--live", "-q"]))
        .env("VMDEPOT_TEST_PAUSED_SLEEP_MS", ms.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// Waits until the capture has taken its lease and QEMU says `paused`.
fn wait_paused(dir: &Path, qmp: &Path) {
    wait_until(
        "the capture pauses the guest",
        Duration::from_secs(60),
        || dir.join("pause").exists() && qmp_status(qmp) == "paused",
    );
}

fn kill9(mut c: Child) {
    c.kill().unwrap(); // SIGKILL
    c.wait().unwrap();
}

#[test]
fn a_killed_live_capture_never_leaves_the_guest_paused() {
    let t = depot_with_guest();
    boot(&t, "tiny", "g");
    let info = show(&t, "g");
    let dir = PathBuf::from(info["dir"].as_str().unwrap());
    let qmp = PathBuf::from(info["qmp_socket"].as_str().unwrap());
    let console = PathBuf::from(info["console_socket"].as_str().unwrap());
    assert_eq!(info["state"], "running");
    assert_eq!(info["run_state"], "running");

    // How long an ordinary live capture pauses the guest (it says so at
    // log level info).
    let o = t
        .cmd(&capture_args("g", "cap-ok", &["--live", "-q"]))
        .env("VMDEPOT_LOG", "info")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    let ms: u64 = err
        .split("guest paused for ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no pause time logged: {err}"));
    eprintln!("live capture: guest paused for {ms} ms");
    assert_eq!(qmp_status(&qmp), "running");
    assert!(!dir.join("pause").exists());

    // A guest paused by a live capture is shown paused, and left paused.
    let cap = spawn_capture(&t, "cap-killed", 120_000);
    wait_paused(&dir, &qmp);
    let s = show(&t, "g");
    assert_eq!(s["state"], "paused", "{s}");
    assert_eq!(s["run_state"], "paused", "{s}");
    let list = t.json(&["instance", "list", "--json"]);
    assert_eq!(list[0]["state"], "paused", "{list}");
    let text = t.ok(&["instance", "list"]);
    assert!(text.contains(" paused "), "{text}");
    assert!(
        t.ok(&["instance", "show", "g"]).contains("paused"),
        "show (text)"
    );
    assert_eq!(
        qmp_status(&qmp),
        "paused",
        "show resumed a live owner's pause"
    );

    // Killed with -9 while the guest is paused: the next command resumes it.
    kill9(cap);
    assert_eq!(qmp_status(&qmp), "paused");
    let t0 = Instant::now();
    let s = show(&t, "g");
    let took = t0.elapsed();
    eprintln!("instance show resumed the orphaned pause in {took:?}");
    assert_eq!(s["state"], "running", "{s}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert_eq!(qmp_status(&qmp), "running");
    assert!(!dir.join("pause").exists(), "the dead lease stays");
    // ... and the guest answers on its serial console.
    {
        let mut c = UnixStream::connect(&console).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        c.write_all(b"after the kill\n").unwrap();
        wait_serial(&t, "g", "VMDEPOT-ECHO: after the kill");
    }
    // The killed capture left no image.
    let (code, _) = t.fails(&["image", "show", "cap-killed"]);
    assert_eq!(code, 3);

    // `instance stop` of a guest paused by a dead capture resumes it and
    // presses the power button: the guest powers off, no full timeout.
    let cap = spawn_capture(&t, "cap-killed-2", 120_000);
    wait_paused(&dir, &qmp);
    kill9(cap);
    let t0 = Instant::now();
    t.ok(&["instance", "stop", "g", "--timeout", "10"]);
    let took = t0.elapsed();
    eprintln!("instance stop of an orphaned pause took {took:?}");
    assert!(took < Duration::from_secs(9), "stop waited {took:?}");
    assert!(
        serial(&t, "g").contains("VMDEPOT-GUEST: power button"),
        "not a clean power-off"
    );
    assert_eq!(show(&t, "g")["state"], "stopped");
    assert!(!dir.join("pause").exists());
}
