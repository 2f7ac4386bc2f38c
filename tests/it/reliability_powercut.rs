//! Reliability: a power cut during a launch never leaves a base that is
//! booted zeroed. The depot lives on a loop-mounted ext4; vmdepot (and its
//! QEMU) are SIGSTOPped at some moment of `instance run` and the loop's
//! backing file is copied unsynced: what the disk holds after a power cut
//! (dirty page-cache data of the mounted fs may be missing). The copy is
//! fsck'd, mounted and its depot opened. And: `instance start`/`restart`
//! of a stopped instance checks its base like a launch.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::*;

fn sh(cmd: &str, args: &[&str]) -> String {
    let o = Command::new(cmd).args(args).output().unwrap();
    assert!(
        o.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap().trim().to_owned()
}

fn signal_all(needle: &str, sig: &str) -> Vec<i32> {
    let pids = procs_naming(needle);
    for p in &pids {
        let _ = Command::new("kill")
            .args([sig, &p.to_string()])
            .stderr(Stdio::null())
            .status();
    }
    pids
}

/// Kills every process using the mount and waits until they are gone.
fn kill_all(needle: &str) {
    let end = Instant::now() + Duration::from_secs(20);
    while !signal_all(needle, "-KILL").is_empty() && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A loop-mounted ext4 image; unmounted (its processes killed first) and
/// detached on drop, also on panic.
struct Loop {
    dev: String,
    mnt: PathBuf,
}

impl Loop {
    fn mount(img: &Path, mnt: PathBuf) -> Loop {
        std::fs::create_dir_all(&mnt).unwrap();
        let dev = sh("losetup", &["-f", "--show", img.to_str().unwrap()]);
        let l = Loop { dev, mnt };
        sh("mount", &[&l.dev, l.mnt.to_str().unwrap()]);
        l
    }
    fn needle(&self) -> String {
        format!("{}/", self.mnt.display())
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        kill_all(&self.needle());
        let m = self.mnt.to_str().unwrap();
        // A killed process may still be letting go of its files.
        let umounted = (0..20).any(|_| {
            let ok = Command::new("umount")
                .arg(m)
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                std::thread::sleep(Duration::from_millis(250));
            }
            ok
        });
        if !umounted {
            let _ = Command::new("umount").args(["-l", m]).status();
        }
        let _ = Command::new("losetup").args(["-d", &self.dev]).status();
    }
}

/// A fresh 256 MiB ext4 at `work/NAME.img`, mounted on `work/NAME`.
fn new_fs(work: &Path, name: &str) -> (PathBuf, Loop) {
    let img = work.join(format!("{name}.img"));
    let f = std::fs::File::create(&img).unwrap();
    f.set_len(256 << 20).unwrap();
    sh("mkfs.ext4", &["-q", "-F", img.to_str().unwrap()]);
    let l = Loop::mount(&img, work.join(name));
    (img, l)
}

fn bases_dir_names(depot: &Path) -> Vec<String> {
    std::fs::read_dir(depot.join("bases"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn base_file(depot: &Path) -> Option<PathBuf> {
    bases_dir_names(depot)
        .into_iter()
        .find(|n| n.ends_with(".raw") && !n.starts_with('.'))
        .map(|n| depot.join("bases").join(n))
}

fn any_overlay(depot: &Path) -> bool {
    std::fs::read_dir(depot.join("instances"))
        .map(|rd| rd.flatten().any(|e| e.path().join("disk.qcow2").exists()))
        .unwrap_or(false)
}

/// The export's temporary is anonymous (O_TMPFILE) on ext4: it shows as
/// an open file of `pid` in `bases/` named `#INODE (deleted)`.
fn writing_anonymous_base(pid: u32, depot: &Path) -> bool {
    let bases = format!("{}/", depot.join("bases").display());
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|rd| {
            rd.flatten().any(|e| {
                std::fs::read_link(e.path()).is_ok_and(|l| {
                    let l = l.to_string_lossy();
                    l.starts_with(&bases) && l.contains('#')
                })
            })
        })
        .unwrap_or(false)
}

#[derive(Clone, Copy, Debug)]
enum Moment {
    /// The base's temporary is being written (anonymous or named).
    PartialBase,
    /// The base has its name (renamed into place; maybe not recorded yet).
    BaseNamed,
    /// The instance's overlay exists.
    Overlay,
    /// The guest booted from the new base.
    Booted,
}

fn reached(m: Moment, depot: &Path, run: &mut Child, t: &T) -> bool {
    match m {
        Moment::PartialBase => {
            bases_dir_names(depot)
                .iter()
                .any(|n| n.contains(".vmdepot-partial-"))
                || writing_anonymous_base(run.id(), depot)
        }
        Moment::BaseNamed => base_file(depot).is_some(),
        Moment::Overlay => any_overlay(depot),
        Moment::Booted => {
            if run.try_wait().unwrap().is_none() {
                return false;
            }
            wait_serial(t, "a", READY);
            true
        }
    }
}

fn launch_problems(r: &Value) -> Vec<String> {
    problems(r)
        .into_iter()
        .filter(|p| p.contains("launch base"))
        .collect()
}

/// One power cut at `m`, then the checks on the copy.
fn power_cut_at(m: Moment) {
    if !nix_is_root() {
        eprintln!("power-cut test needs root (losetup, mount); CI runs as root");
        return;
    }
    let guest = test_guest();
    let work = tempfile::tempdir_in(scratch()).unwrap();
    let (img, orig) = new_fs(work.path(), "a");
    let t = T::in_dir(tempfile::tempdir_in(&orig.mnt).unwrap(), "depot");
    let rel = t.dir.path().strip_prefix(&orig.mnt).unwrap().to_owned();
    t.import(guest, "tiny");

    let mut run = t
        .cmd(&[
            "instance", "run", "tiny", "--name", "a", "--disk", "overlay", "--accel", "tcg", "-q",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let end = Instant::now() + BOOT;
    let mut hit = false;
    while Instant::now() < end {
        if reached(m, &t.depot(), &mut run, &t) {
            hit = true;
            break;
        }
        if run.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    // The power cut: everything writing to the fs stops, the disk is what
    // the backing file holds now (no sync).
    let stopped = signal_all(&orig.needle(), "-STOP");
    let copy = work.path().join("b.img");
    std::fs::copy(&img, &copy).unwrap();
    let at = bases_dir_names(&t.depot());
    kill_all(&orig.needle());
    let _ = run.wait();
    eprintln!(
        "power cut at {m:?} (reached: {hit}), {} processes stopped, bases/: {at:?}",
        stopped.len()
    );

    // Like a boot after an unclean shutdown.
    let o = Command::new("fsck.ext4")
        .args(["-f", "-y", copy.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        o.status.code().is_some_and(|c| c < 4),
        "fsck.ext4 of the copy: {:?}\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout)
    );
    let cut = Loop::mount(&copy, work.path().join("b"));
    let t2 = T::in_dir(tempfile::tempdir_in(&cut.mnt).unwrap(), "depot");
    std::fs::rename(cut.mnt.join(&rel).join("depot"), t2.depot()).unwrap();
    let depot = t2.depot();

    // fsck names a base that is not whole (or there is none / it is whole).
    let o = t2.run(&["fsck", "--json"]);
    let r: Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "fsck of the copy: {e}: {:?}\n{}",
            o.status,
            String::from_utf8_lossy(&o.stderr)
        )
    });
    let lp = launch_problems(&r);
    let base = base_file(&depot);
    let whole = base.as_deref().map(|b| same_content(b, guest));
    eprintln!(
        "after the cut: base {base:?} whole: {whole:?}; fsck problems: {}",
        r["problems"]
    );
    if whole == Some(false) {
        assert_eq!(lp.len(), 1, "an incomplete base fsck does not name: {r}");
    }
    if lp.is_empty() {
        assert_ne!(whole, Some(false));
    }

    // A launch from the copy boots the guest from its real disk.
    t2.ok(&[
        "instance", "run", "tiny", "--name", "b", "--disk", "overlay", "--accel", "tcg", "-q",
    ]);
    let base = base_file(&depot).expect("a base");
    assert!(same_content(&base, guest), "the launch's base is not whole");
    wait_serial(&t2, "b", READY);
    assert!(serial(&t2, "b").contains(DISK_MARKER));
    assert!(launch_problems(&t2.json(&["fsck", "--bases", "--json"])).is_empty());
    t2.ok(&["instance", "delete", "b", "--force"]);
    drop(t2);
    drop(cut);
    drop(t);
    drop(orig);
}

#[test]
fn power_cut_while_base_is_written() {
    power_cut_at(Moment::PartialBase);
}

#[test]
fn power_cut_right_after_base_is_named() {
    power_cut_at(Moment::BaseNamed);
}

#[test]
fn power_cut_once_overlay_exists() {
    power_cut_at(Moment::Overlay);
}

#[test]
fn power_cut_after_boot() {
    power_cut_at(Moment::Booted);
}

#[test]
fn start_and_restart_rebuild_a_zeroed_base() {
    let t = depot_with_guest();
    t.ok(&[
        "instance", "run", "tiny", "--name", "a", "--disk", "overlay", "--accel", "tcg", "-q",
    ]);
    wait_serial_count(&t, "a", DISK_MARKER, 1);
    t.ok(&["instance", "stop", "a", "--force"]);
    let base = base_file(&t.depot()).unwrap();

    // start: the base a power cut emptied is rebuilt, the guest reads its disk.
    lose_data(&base);
    // (the first boot may or may not have reached "ready" before the stop)
    let ready_before = serial(&t, "a").matches(READY).count();
    t.ok(&["instance", "start", "a"]);
    assert!(same_content(&base, test_guest()), "start booted a bad base");
    wait_serial_count(&t, "a", DISK_MARKER, 2);

    // restart: emptied while a runs (nothing checks then); the restart
    // stops a first, so the base is rebuilt before it starts again. The
    // guest must be ready first: it writes and syncs /data/written before
    // that, and a write that reads a zeroed bitmap would put a corrupt one
    // into the overlay, which no base rebuild can undo.
    wait_serial_count(&t, "a", READY, ready_before + 1);
    lose_data(&base);
    t.ok(&["instance", "restart", "a", "--timeout", "0"]);
    assert!(
        same_content(&base, test_guest()),
        "restart booted a bad base"
    );
    wait_serial_count(&t, "a", DISK_MARKER, 3);
    t.assert_fsck_clean();
    t.ok(&["instance", "delete", "a", "--force"]);
}
