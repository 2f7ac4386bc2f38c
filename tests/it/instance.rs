//! Instances: real QEMU boots (TCG here) of the tiny test guest from
//! fixtures/build-test-guest.sh, checked by reading the guest's serial
//! console. The guest prints what it read from its own disk and from its
//! NoCloud seed, writes a file on its disk, and powers off on the ACPI power
//! button.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::*;

fn instance_dirs(t: &T) -> Vec<PathBuf> {
    match std::fs::read_dir(t.depot().join("instances")) {
        Ok(rd) => rd.flatten().map(|e| e.path()).collect(),
        Err(_) => Vec::new(),
    }
}

fn no_kvm_cpu() -> bool {
    let cpu = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    !cpu.split_whitespace().any(|f| f == "vmx" || f == "svm")
}

#[test]
fn instance_boots_from_the_stored_image_and_reads_its_seed() {
    let t = depot_with_guest();
    let ud = t.path("user-data");
    std::fs::write(&ud, "#!/bin/sh user-data marker 51c\necho hi\n").unwrap();
    let o = t
        .cmd(&[
            "instance",
            "run",
            "tiny",
            "--name",
            "web",
            "--hostname",
            "web-host",
            "--user-data",
            ud.to_str().unwrap(),
            "--json",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let err = String::from_utf8_lossy(&o.stderr);
    if no_kvm_cpu() {
        // the one-line notice of the fallback
        assert!(err.contains("using TCG"), "{err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
    let launched: Value = serde_json::from_slice(&o.stdout).unwrap();
    let id = id_of(&launched[0]);
    assert!(id.starts_with("ins-"));

    // It booted from the stored image and read its own disk and its seed.
    wait_serial(&t, "web", READY);
    let log = serial(&t, "web");
    assert!(log.contains(DISK_MARKER), "{log}");
    assert!(log.contains("VMDEPOT-WRITTEN: none"), "{log}");
    assert!(log.contains(&format!("VMDEPOT-INSTANCE-ID: {id}")), "{log}");
    assert!(log.contains("VMDEPOT-HOSTNAME: web-host"), "{log}");
    assert!(
        log.contains("VMDEPOT-USER-DATA: #!/bin/sh user-data marker 51c"),
        "{log}"
    );

    // The interactive console reaches the guest's serial port both ways.
    let mut con = t
        .cmd(&["instance", "console", "web"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let stdin = con.stdin.as_mut().unwrap();
        std::thread::sleep(Duration::from_millis(300));
        stdin.write_all(b"hello console\n").unwrap();
        stdin.flush().unwrap();
        wait_serial(&t, "web", "VMDEPOT-ECHO: hello console");
        // QEMU serves one console client: a second one is told it is busy
        // (one line, exit 1), never "Connected" and dead.
        let err = t.refuses(&["instance", "console", "web"], 1, "is busy");
        assert!(err.contains("console of instance web (ins-"), "{err}");
        assert!(!err.contains("Connected"), "{err}");
        std::thread::sleep(Duration::from_millis(300));
        stdin.write_all(&[0x1d]).unwrap(); // Ctrl-]
    }
    let o = con.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("VMDEPOT-ECHO: hello console"),
        "console output: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    // detached: the console is free again (stdin at its end: detaches)
    wait_until("the console is free", Duration::from_secs(10), || {
        t.run(&["instance", "console", "web"]).status.success()
    });

    // What `list` and `show` say.
    let list = t.json(&["instance", "list", "--json"]);
    let i = &list[0];
    for k in ["id", "name", "image", "state", "accel", "pid", "ssh_port"] {
        assert!(i.get(k).is_some(), "{k} missing: {i}");
    }
    assert_eq!(i["name"], "web");
    assert_eq!(i["state"], "running");
    let img = t.json(&["image", "show", "tiny", "--json"]);
    assert_eq!(i["image"], img["id"]);
    let pid = i["pid"].as_i64().unwrap();
    assert!(alive(pid));
    let ssh = i["ssh_port"].as_u64().unwrap() as u16;
    // the SSH forward listens on the host
    assert!(std::net::TcpStream::connect(("127.0.0.1", ssh)).is_ok());
    assert_eq!(show(&t, &id)["name"], "web");

    // stop = ACPI power button: the guest sees it and powers off.
    t.ok(&["instance", "stop", "web"]);
    assert!(serial(&t, "web").contains("VMDEPOT-GUEST: power button"));
    assert_eq!(show(&t, "web")["state"], "stopped");
    assert!(!alive(pid));

    // start again: its own write from the first boot is on its disk.
    t.ok(&["instance", "start", "web"]);
    wait_serial(&t, "web", &format!("VMDEPOT-WRITTEN: written-by {id}"));
    // a QEMU killed behind our back is never shown as running
    let pid = show(&t, "web")["pid"].as_i64().unwrap();
    nix_kill9(pid);
    let end = Instant::now() + Duration::from_secs(10);
    while alive(pid) && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(show(&t, "web")["state"], "stopped");
    let list = t.json(&["instance", "list", "--json"]);
    assert_eq!(list[0]["state"], "stopped");
    assert_eq!(list[0]["pid"], Value::Null);

    // delete removes its files and nothing else; the image is untouched
    let dir = PathBuf::from(show(&t, "web")["dir"].as_str().unwrap());
    assert!(dir.join("disk.qcow2").exists() && dir.join("seed.img").exists());
    t.ok(&["instance", "delete", "web"]);
    assert!(!dir.exists());
    assert_eq!(
        t.json(&["instance", "list", "--json"]),
        Value::Array(vec![])
    );
    t.ok(&["image", "verify", "tiny", "-q"]);
    // a lazy disk made no base to evict
    assert_eq!(t.json(&["gc", "--json"])["bases_evicted"], 0);
    t.assert_fsck_clean();
}

fn nix_kill9(pid: i64) {
    let st = Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success());
}

#[test]
fn batch_of_three_shares_one_base_and_keeps_writes_apart() {
    let t = depot_with_guest();
    // Two launches of the same image at once, on a depot without its base:
    // the base is made once and both work.
    let other = t
        .cmd(&[
            "instance", "run", "tiny", "--name", "c", "--disk", "overlay", "-q",
        ])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let out: Value = t.json(&[
        "instance", "run", "tiny", "--count", "3", "--name", "b", "--disk", "overlay", "--json",
    ]);
    assert!(other.wait_with_output().unwrap().status.success());
    t.ok(&["instance", "delete", "c", "--force"]);
    let names = strs_at(&out, "name");
    assert_eq!(names, ["b-1", "b-2", "b-3"]);
    // one base, shared; each instance adds little at launch
    let bases: Vec<_> = std::fs::read_dir(t.depot().join("bases"))
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "raw"))
        .collect();
    assert_eq!(bases.len(), 1);
    let mut ports = Vec::new();
    for n in &names {
        let i = show(&t, n);
        let overlay = PathBuf::from(i["dir"].as_str().unwrap()).join("disk.qcow2");
        assert!(
            allocated(&overlay) < 1 << 20,
            "{n}: {}",
            allocated(&overlay)
        );
        ports.push(i["ssh_port"].as_u64().unwrap());
    }
    ports.sort();
    ports.dedup();
    assert_eq!(ports.len(), 3, "distinct ssh ports");
    for n in &names {
        wait_serial(&t, n, READY);
        assert!(serial(&t, n).contains(DISK_MARKER));
    }
    // Each wrote to its own disk. A new instance sees none of it, nor does
    // the image.
    t.ok(&["instance", "run", "tiny", "--name", "late"]);
    wait_serial(&t, "late", READY);
    assert!(serial(&t, "late").contains("VMDEPOT-WRITTEN: none"));
    let digest = t.json(&["image", "show", "tiny", "--json"])["content_digest"].clone();
    t.ok(&["image", "verify", "tiny", "-q"]);
    assert_eq!(
        t.json(&["image", "show", "tiny", "--json"])["content_digest"],
        digest
    );
    // gc keeps a base that instances use
    assert_eq!(t.json(&["gc", "--json"])["bases_evicted"], 0);
    // a running instance needs --force to be deleted
    let (_, err) = t.fails(&["instance", "delete", "b-1"]);
    assert!(err.contains("is running"), "{err}");
    // deleting one touches nothing of the others
    let b2 = show(&t, "b-2");
    t.ok(&["instance", "delete", "b-1", "--force"]);
    let b2_dir = PathBuf::from(b2["dir"].as_str().unwrap());
    for f in ["disk.qcow2", "seed.img", "qmp.sock", "serial.log"] {
        assert!(b2_dir.join(f).exists(), "{f}");
    }
    assert_eq!(show(&t, "b-2")["state"], "running");
    assert!(alive(b2["pid"].as_i64().unwrap()));
    for n in ["b-2", "b-3", "late"] {
        t.ok(&["instance", "delete", n, "--force"]);
    }
    assert!(instance_dirs(&t).is_empty());
    assert_eq!(t.json(&["gc", "--json"])["bases_evicted"], 1);
}

#[test]
fn bad_launches_are_refused_and_leave_nothing() {
    let t = depot_with_guest();
    t.ok(&[
        "instance", "run", "tiny", "--name", "taken", "--accel", "tcg",
    ]);
    let before = t.json(&["instance", "list", "--json"]);
    let dirs_before = instance_dirs(&t).len();
    let check_unchanged = |what: &str| {
        assert_eq!(
            items(&t.json(&["instance", "list", "--json"])).len(),
            1,
            "{what}"
        );
        assert_eq!(instance_dirs(&t).len(), dirs_before, "{what}");
    };
    // unknown image
    let (code, err) = t.fails(&["instance", "run", "nope"]);
    assert_eq!(code, 3);
    assert!(err.contains("nope"), "{err}");
    check_unchanged("unknown image");
    // name collision
    let (_, err) = t.fails(&["instance", "run", "tiny", "--name", "taken"]);
    assert!(err.contains("already exists"), "{err}");
    check_unchanged("name collision");
    // a memory size QEMU refuses
    let (_, err) = t.fails(&[
        "instance",
        "run",
        "tiny",
        "--name",
        "m",
        "--memory",
        "100000000G",
    ]);
    assert!(err.contains("memory"), "{err}");
    check_unchanged("memory");
    // the same in the foreground (systemd's way): nothing is left either
    let (_, err) = t.fails(&[
        "instance",
        "run",
        "tiny",
        "--name",
        "mf",
        "--memory",
        "100000000G",
        "--foreground",
        "--accel",
        "tcg",
    ]);
    assert!(err.contains("memory"), "{err}");
    check_unchanged("memory, foreground");
    let (_, err) = t.fails(&["instance", "run", "tiny", "--name", "m", "--memory", "lots"]);
    assert!(err.contains("memory size"), "{err}");
    // a host port already in use
    let l = std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap();
    let port = l.local_addr().unwrap().port();
    let (_, err) = t.fails(&[
        "instance",
        "run",
        "tiny",
        "--name",
        "p",
        "--forward",
        &format!("{port}:80"),
    ]);
    assert!(
        err.contains(&port.to_string()) && err.contains("not available"),
        "{err}"
    );
    check_unchanged("port");
    // no qemu-system binary: the error names the Debian package
    let o = t
        .cmd(&["instance", "run", "tiny", "--name", "q"])
        .env("PATH", "/nonexistent")
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("qemu-system-x86"));
    check_unchanged("no qemu");
    // an image still importing cannot be launched
    let slow = slow_source(&t);
    let mut child = t
        .cmd(&[
            "image",
            "import",
            slow.to_str().unwrap(),
            "--name",
            "busy",
            "-q",
        ])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let end = Instant::now() + Duration::from_secs(20);
    let mut saw = false;
    while Instant::now() < end && child.try_wait().unwrap().is_none() {
        let o = t.run(&["instance", "run", "busy", "--name", "early"]);
        if !o.status.success() {
            let err = String::from_utf8_lossy(&o.stderr);
            if err.contains("is creating, not available") {
                saw = true;
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait().unwrap();
    assert!(saw, "never saw the importing image refused");
    check_unchanged("importing image");
    // forced KVM where KVM cannot run guests: a clear error, no hang
    if no_kvm_cpu() {
        let (_, err) = t.fails(&["instance", "run", "tiny", "--name", "k", "--accel", "kvm"]);
        assert!(err.contains("KVM"), "{err}");
        check_unchanged("kvm");
    }
    // (what its disk server served grows while the guest runs)
    let steady = |mut v: Value| {
        for i in v.as_array_mut().unwrap() {
            i.as_object_mut().unwrap().remove("store_bytes_read");
        }
        v
    };
    assert_eq!(
        steady(t.json(&["instance", "list", "--json"])),
        steady(before)
    );
    t.ok(&["instance", "delete", "taken", "--force"]);
}

#[test]
fn foreground_notifies_systemd_and_powers_off_on_sigterm() {
    use std::os::unix::net::UnixDatagram;
    let t = depot_with_guest();
    let sock_path = t.path("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut child = t
        .cmd(&[
            "instance",
            "run",
            "tiny",
            "--name",
            "fg",
            "--foreground",
            "-q",
        ])
        .env("NOTIFY_SOCKET", &sock_path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 256];
    let n = sock.recv(&mut buf).expect("READY=1 from vmdepot");
    assert_eq!(&buf[..n], b"READY=1\n");
    let i = show(&t, "fg");
    assert_eq!(i["state"], "running");
    wait_serial(&t, "fg", READY);
    // systemd stops a unit with SIGTERM: the guest gets the power button
    // and vmdepot exits with QEMU.
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let end = Instant::now() + Duration::from_secs(60);
    let st = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < end, "vmdepot --foreground did not exit");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(st.success(), "{st:?}");
    assert!(serial(&t, "fg").contains("VMDEPOT-GUEST: power button"));
    assert_eq!(show(&t, "fg")["state"], "stopped");
    // the unit that does the same under systemd
    let unit = t.ok(&["instance", "unit", "fg"]);
    assert!(unit.contains("Type=notify"), "{unit}");
    assert!(
        unit.contains(&format!(
            "\"instance\" \"start\" \"{}\" \"--foreground\"",
            i["id"].as_str().unwrap()
        )),
        "{unit}"
    );
    t.ok(&["instance", "delete", "fg"]);
}

/// After `image update --name`, instances name their image as it is
/// called now: list (JSON and table), show and the unit.
#[test]
fn instances_show_the_current_name_of_their_image() {
    let t = depot_with_guest();
    t.ok(&["instance", "run", "tiny", "--name", "vm", "-q"]);
    t.ok(&["image", "update", "tiny", "--name", "renamed"]);
    assert_eq!(show(&t, "vm")["image_name"], "renamed");
    let list = t.json(&["instance", "list", "--json"]);
    assert_eq!(list[0]["image_name"], "renamed");
    let table = t.ok(&["instance", "list"]);
    assert!(
        table.contains("renamed") && !table.contains("tiny"),
        "{table}"
    );
    let human = t.ok(&["instance", "show", "vm"]);
    assert!(
        human.contains("renamed") && !human.contains("tiny"),
        "{human}"
    );
    let unit = t.ok(&["instance", "unit", "vm"]);
    assert!(unit.contains("image renamed ("), "{unit}");
    t.ok(&["instance", "delete", "vm", "--force"]);
}

/// A guest that did not power off in time is killed, and the user is told
/// so on stderr with a non-zero exit: `stop --timeout` on a guest still
/// booting, and SIGTERM to `start --foreground` (a unit's stop) before the
/// guest listens to its power button (killed after 60 s).
#[test]
fn a_guest_killed_after_ignoring_the_power_button_is_said_so() {
    let t = depot_with_guest();
    // TCG takes seconds to boot the guest: 1 s after QEMU started, it does
    // not listen to its power button yet.
    t.ok(&[
        "instance", "run", "tiny", "--name", "early", "--accel", "tcg", "-q",
    ]);
    let o = t.run(&["instance", "stop", "early", "--timeout", "1"]);
    assert!(
        o.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    let err = refused(o, &["instance", "stop"], 1, "instance early (ins-");
    assert!(
        err.contains("ignored the power button for 1 s and was killed (it is stopped)"),
        "{err}"
    );
    assert_eq!(show(&t, "early")["state"], "stopped");
    assert!(!serial(&t, "early").contains("VMDEPOT-GUEST: power button"));
    // ... and a guest that listens powers off, said as before
    t.ok(&["instance", "start", "early", "-q"]);
    wait_serial(&t, "early", READY);
    let out = t.ok(&["instance", "stop", "early", "--timeout", "60"]);
    assert!(out.contains("stopped"), "{out}");

    let fg = t
        .cmd(&["instance", "start", "early", "--foreground", "-q"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until("the foreground QEMU runs", Duration::from_secs(30), || {
        show(&t, "early")["state"] == "running"
    });
    Command::new("kill")
        .args(["-TERM", &fg.id().to_string()])
        .status()
        .unwrap();
    let o = fg.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    let said: Vec<_> = err.lines().filter(|l| l.contains("power button")).collect();
    assert_eq!(said.len(), 1, "{err}");
    assert!(
        said[0].starts_with("vmdepot: instance ins-")
            && said[0].contains("ignored the power button for 60 s and was killed"),
        "{err}"
    );
    assert_eq!(show(&t, "early")["state"], "stopped");
    t.ok(&["instance", "delete", "early"]);
}

#[test]
fn library_harness_launches_waits_and_drops() {
    use vmdepot::{Depot, DiskMode, ImportOptions, LaunchOptions, NoProgress};
    let t = T::new();
    // an account other than the default: the handle keeps it, so its drop
    // (which reopens the depot) deletes the instance as that account
    let depot = Depot::open(t.depot())
        .unwrap()
        .with_account("harness")
        .unwrap();
    depot
        .import(test_guest(), &ImportOptions::new("tiny"), &NoProgress)
        .unwrap();
    let mut opts = LaunchOptions::new("tiny");
    opts.ephemeral = true;
    opts.disk = DiskMode::Copy;
    let pid;
    let inst_dir;
    {
        let launched = depot.launch(&opts, &NoProgress).unwrap();
        let vm = &launched.instances[0];
        pid = vm.info().pid.unwrap();
        inst_dir = vm.info().dir.clone();
        // a private sparse copy, not an overlay
        let disk = inst_dir.join("disk.raw");
        assert!(disk.exists());
        assert!(allocated(&disk) < std::fs::metadata(&disk).unwrap().len());
        let line = vm.wait_for_serial("VMDEPOT-DISK:", BOOT).unwrap();
        assert!(line.contains("marker 7f3a"), "{line}");
        vm.wait_for_serial("VMDEPOT-GUEST: ready", BOOT).unwrap();
        // a timeout is a typed error naming the instance, not a hang
        let e = vm
            .wait_for_serial("never printed", Duration::from_millis(200))
            .unwrap_err();
        assert!(matches!(e, vmdepot::Error::Timeout { .. }), "{e:?}");
        let e = e.to_string();
        assert!(e.contains(vm.id()) && e.contains("timed out"), "{e}");
        // QEMU gone: told at once, apart from a timeout
        kill_qemu(pid);
        let e = vm.wait_for_serial("never printed", BOOT).unwrap_err();
        assert!(matches!(e, vmdepot::Error::GuestExited { .. }), "{e:?}");
    } // dropped: QEMU killed, instance deleted
    wait_until(
        "the dropped instance's QEMU exits",
        Duration::from_secs(10),
        || !alive(pid as i64),
    );
    assert!(!inst_dir.exists());
    assert!(depot.list_instances().unwrap().is_empty());
}

/// `--firmware uefi` boots OVMF with a variable store of the instance's
/// own (the depot's file mode, kept across restarts, named on QEMU's
/// command line); `auto` follows the image's `firmware` tag (BIOS first,
/// BIOS untagged), and a firmware the tag excludes is refused before
/// anything is made.
#[test]
fn uefi_instances_boot_ovmf_with_their_own_variable_store() {
    use std::os::unix::fs::MetadataExt;
    let t = depot_with_guest();
    t.ok(&["instance", "run", "tiny", "--name", "plain", "-q"]);
    assert_eq!(
        show(&t, "plain")["firmware"],
        "bios",
        "untagged: auto is BIOS"
    );
    t.ok(&["instance", "delete", "plain", "--force"]);

    t.ok(&["image", "update", "tiny", "--tag", "firmware=bios"]);
    t.refuses(
        &[
            "instance",
            "run",
            "tiny",
            "--name",
            "u",
            "--firmware",
            "uefi",
        ],
        2,
        "image tiny boots with bios only",
    );
    t.refuses(
        &[
            "instance",
            "run",
            "tiny",
            "--name",
            "u",
            "--firmware",
            "efi",
        ],
        2,
        "use auto, bios or uefi",
    );
    assert!(
        instance_dirs(&t).is_empty(),
        "a refused launch leaves nothing"
    );
    assert_eq!(
        t.json(&["instance", "list", "--json"]),
        serde_json::json!([])
    );

    t.ok(&["image", "update", "tiny", "--tag", "firmware=bios,uefi"]);
    t.ok(&[
        "instance",
        "run",
        "tiny",
        "--name",
        "u",
        "--firmware",
        "uefi",
        "-q",
    ]);
    let info = show(&t, "u");
    assert_eq!(info["firmware"], "uefi");
    assert!(t
        .ok(&["instance", "show", "u"])
        .contains("firmware             uefi"));
    // OVMF's boot manager speaks on the serial console (the tiny guest has
    // no EFI system partition: it says what it could not boot).
    wait_serial(&t, "u", "BdsDxe:");
    let vars = Path::new(info["dir"].as_str().unwrap()).join("efivars.fd");
    let meta = std::fs::metadata(&vars).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o600, "{}", vars.display());
    assert_eq!(
        meta.len(),
        std::fs::metadata("/usr/share/OVMF/OVMF_VARS_4M.fd")
            .unwrap()
            .len()
    );
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", info["pid"])).unwrap();
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    assert!(
        cmdline.contains(
            "if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd"
        ) && cmdline.contains(&format!("unit=1,file={}", vars.display())),
        "{cmdline}"
    );
    t.ok(&["instance", "stop", "u", "--force"]);
    t.ok(&["instance", "start", "u"]);
    assert_eq!(
        show(&t, "u")["firmware"],
        "uefi",
        "every start boots the same"
    );
    wait_serial_count(&t, "u", "BdsDxe:", 2);
    assert_eq!(std::fs::metadata(&vars).unwrap().ino(), meta.ino(), "kept");
    // A store that is a link is never handed to QEMU (it writes there).
    t.ok(&["instance", "stop", "u", "--force"]);
    let victim = t.path("victim");
    std::fs::write(&victim, b"host file").unwrap();
    std::fs::remove_file(&vars).unwrap();
    std::os::unix::fs::symlink(&victim, &vars).unwrap();
    t.refuses(
        &["instance", "start", "u"],
        5,
        "efivars.fd is not a regular file",
    );
    assert_eq!(std::fs::read(&victim).unwrap(), b"host file");

    t.ok(&["instance", "run", "tiny", "--name", "b", "-q"]);
    assert_eq!(show(&t, "b")["firmware"], "bios", "auto: the tag's first");
    wait_serial(&t, "b", READY);
    assert!(!Path::new(show(&t, "b")["dir"].as_str().unwrap())
        .join("efivars.fd")
        .exists());
    // A capture boots as its instance did: a UEFI instance of an image
    // without a firmware tag gives a capture tagged firmware=uefi.
    t.ok(&["image", "update", "tiny", "--tag", "firmware="]);
    t.ok(&capture_args("u", "ucap", &["-q"]));
    let cap = t.json(&["image", "show", "ucap", "--json"]);
    assert_eq!(cap["tags"]["firmware"], "uefi", "{cap}");
    t.ok(&["instance", "delete", "u", "--force"]);
    t.ok(&["instance", "delete", "b", "--force"]);
}
