//! The accelerator: [`Accel`] (what `--accel` asks for), [`choose_accel`]
//! (KVM when it really runs a guest here, with the probe's verdict cached
//! per host boot and QEMU binary), and [`kvm_internal_error`], the watch
//! of a guest's first moments under KVM that both the probe and every KVM
//! start keep.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};
use crate::launch::qmp::{Qmp, RunState};

/// Hardware acceleration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// KVM if it really runs a guest here, else TCG.
    Auto,
    /// KVM hardware virtualization (refused where it cannot work).
    Kvm,
    /// Software emulation.
    Tcg,
}

impl Accel {
    /// `auto`, `kvm` or `tcg` (`--accel`, and the catalog's text).
    pub fn parse(s: &str) -> Result<Accel> {
        match s {
            "auto" => Ok(Accel::Auto),
            "kvm" => Ok(Accel::Kvm),
            "tcg" => Ok(Accel::Tcg),
            _ => Err(Error::Invalid(format!(
                "unknown accelerator {s:?}: use auto, kvm or tcg"
            ))),
        }
    }

    /// The text `parse` takes.
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Auto => "auto",
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// The cached verdict of the KVM probe (`DEPOT/kvm-probe.json`), valid for
/// one boot of the host and one QEMU binary.
#[derive(Debug, Serialize, Deserialize)]
struct KvmVerdict {
    boot_id: String,
    qemu: String,
    qemu_mtime: i64,
    works: bool,
    reason: String,
}

/// Decides the accelerator for `requested`. For `auto`, returns TCG with a
/// one-line notice saying why when KVM cannot run a guest here. The probe's
/// verdict is cached in `cache_dir/kvm-probe.json`, a file of `file_mode`.
pub fn choose_accel(
    qemu: &Path,
    requested: Accel,
    cache_dir: &Path,
    file_mode: u32,
) -> Result<(Accel, Option<String>)> {
    match requested {
        // KVM asked for where it plainly cannot work: said so before QEMU
        // starts (a CPU without vmx/svm may still let QEMU open /dev/kvm,
        // and the guest then dies at some point after the start).
        Accel::Kvm => match kvm_cannot() {
            Some(reason) => Err(Error::Tool {
                tool: "qemu-system-x86_64".into(),
                detail: format!(
                    "--accel kvm: KVM cannot run guests here ({reason}); use --accel tcg (or auto)"
                ),
            }),
            None => Ok((requested, None)),
        },
        Accel::Tcg => Ok((requested, None)),
        Accel::Auto => {
            let (works, reason) = kvm_verdict(qemu, cache_dir, file_mode)?;
            if works {
                Ok((Accel::Kvm, None))
            } else {
                Ok((
                    Accel::Tcg,
                    Some(format!(
                        "KVM is not usable here ({reason}); using TCG software emulation (slower)"
                    )),
                ))
            }
        }
    }
}

/// Why KVM cannot work here by the cheap checks (no /dev/kvm to write, no
/// vmx/svm CPU flag), if it cannot.
fn kvm_cannot() -> Option<String> {
    if nix::unistd::access("/dev/kvm", nix::unistd::AccessFlags::W_OK).is_err() {
        return Some("/dev/kvm is missing or not writable".into());
    }
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let flags = cpuinfo
        .lines()
        .find(|l| l.starts_with("flags"))
        .unwrap_or("");
    if !flags.split_whitespace().any(|f| f == "vmx" || f == "svm") {
        return Some("the CPU has no vmx/svm flag".into());
    }
    None
}

fn kvm_verdict(qemu: &Path, cache_dir: &Path, file_mode: u32) -> Result<(bool, String)> {
    // Cheap checks first: they decide on most hosts without starting QEMU.
    if let Some(reason) = kvm_cannot() {
        return Ok((false, reason));
    }
    // Then a real guest, once per host boot and QEMU binary.
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .unwrap_or_default()
        .trim()
        .to_owned();
    let qemu_mtime = std::fs::metadata(qemu)
        .map(|m| std::os::unix::fs::MetadataExt::mtime(&m))
        .unwrap_or(0);
    let cache = cache_dir.join("kvm-probe.json");
    if let Ok(v) = std::fs::read(&cache)
        .map_err(|_| ())
        .and_then(|b| serde_json::from_slice::<KvmVerdict>(&b).map_err(|_| ()))
    {
        if v.boot_id == boot_id && v.qemu == qemu.to_string_lossy() && v.qemu_mtime == qemu_mtime {
            return Ok((v.works, v.reason));
        }
    }
    let (works, reason) = probe_kvm_guest(qemu, cache_dir)?;
    let v = KvmVerdict {
        boot_id,
        qemu: qemu.to_string_lossy().into_owned(),
        qemu_mtime,
        works,
        reason: reason.clone(),
    };
    let tmp = cache_dir.join(format!("kvm-probe.json.{}", std::process::id()));
    let written = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(file_mode)
            .open(&tmp)
            .and_then(|mut f| f.write_all(&serde_json::to_vec(&v).unwrap_or_default()))
    };
    if written.is_ok() {
        let _ = std::fs::rename(&tmp, &cache);
    }
    Ok((works, reason))
}

/// Starts an empty KVM guest (SeaBIOS enters protected mode at once, which
/// is where broken nested KVM fails) and watches its run state.
fn probe_kvm_guest(qemu: &Path, scratch: &Path) -> Result<(bool, String)> {
    let dir = tempfile::Builder::new()
        .prefix("kvm-probe")
        .tempdir_in(scratch)
        .at(scratch)?;
    let sock = dir.path().join("qmp.sock");
    let mut child = Command::new(qemu)
        .args([
            "-accel",
            "kvm",
            "-nodefaults",
            "-display",
            "none",
            "-m",
            "32",
        ])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", sock.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .at(qemu)?;
    let verdict = (|| -> Result<(bool, String)> {
        let mut qmp = Qmp::connect_retry(&sock, Duration::from_secs(5))?;
        if kvm_internal_error(&mut qmp)? {
            return Ok((
                false,
                "a KVM test guest died with a KVM internal error".into(),
            ));
        }
        Ok((true, String::new()))
    })();
    let _ = child.kill();
    let out = child.wait_with_output().at(qemu)?;
    match verdict {
        Ok(v) => Ok(v),
        Err(_) => {
            let err = String::from_utf8_lossy(&out.stderr);
            Ok((
                false,
                format!(
                    "a KVM test guest did not start: {}",
                    err.lines().next().unwrap_or("no message")
                ),
            ))
        }
    }
}

/// How long a guest under KVM is watched for a KVM internal error, once
/// QEMU is up.
const KVM_WATCH: Duration = Duration::from_millis(1500);

/// Watches the first moments of a guest under KVM: a host whose KVM cannot
/// run guests (broken nested KVM) leaves the VM in `internal-error`, and
/// QEMU does not exit. Polls QMP `query-status` for `KVM_WATCH` (1.5 s); true if
/// the guest died so.
pub fn kvm_internal_error(q: &mut Qmp) -> Result<bool> {
    let deadline = Instant::now() + KVM_WATCH;
    while Instant::now() < deadline {
        if q.run_state()? == RunState::InternalError {
            return Ok(true);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(false)
}
