//! Talking to QEMU: finding `qemu-system-x86_64`, building its command line
//! ([`VmConfig::args`]), the QMP client ([`Qmp`]), the accelerator choice
//! ([`choose_accel`], with the KVM probe and its cached verdict), process
//! liveness, and `sd_notify`.
//!
//! Knows nothing of the catalog: `instance` decides what to run, this module
//! runs it.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::error::{Error, IoContext, Result};

/// The emulator binary: `VMDEPOT_QEMU` if set, else `qemu-system-x86_64`
/// from `PATH`.
pub fn qemu_binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("VMDEPOT_QEMU") {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(Error::Tool {
                tool: "qemu-system-x86_64".into(),
                detail: format!("VMDEPOT_QEMU={} is not a file", p.display()),
            })
        };
    }
    find_in_path("qemu-system-x86_64").ok_or_else(|| Error::Tool {
        tool: "qemu-system-x86_64".into(),
        detail: "not found in PATH: install the Debian package qemu-system-x86 \
                 (apt-get install qemu-system-x86)"
            .into(),
    })
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Hardware acceleration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// KVM if it really runs a guest here, else TCG.
    Auto,
    Kvm,
    /// Software emulation.
    Tcg,
}

impl Accel {
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
        Accel::Kvm | Accel::Tcg => Ok((requested, None)),
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

fn kvm_verdict(qemu: &Path, cache_dir: &Path, file_mode: u32) -> Result<(bool, String)> {
    // Cheap checks first: they decide on most hosts without starting QEMU.
    if nix::unistd::access("/dev/kvm", nix::unistd::AccessFlags::W_OK).is_err() {
        return Ok((false, "/dev/kvm is missing or not writable".into()));
    }
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let flags = cpuinfo
        .lines()
        .find(|l| l.starts_with("flags"))
        .unwrap_or("");
    if !flags.split_whitespace().any(|f| f == "vmx" || f == "svm") {
        return Ok((false, "the CPU has no vmx/svm flag".into()));
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
        let deadline = Instant::now() + Duration::from_millis(1500);
        while Instant::now() < deadline {
            let st = qmp.run_state()?;
            if st == "internal-error" {
                return Ok((
                    false,
                    "a KVM test guest died with a KVM internal error".into(),
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
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

/// One host port forwarded to a guest port (TCP, user-mode networking).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Forward {
    /// Host address to listen on (default 127.0.0.1).
    pub addr: String,
    pub host: u16,
    pub guest: u16,
}

impl Forward {
    /// `[ADDR:]HOST:GUEST`.
    pub fn parse(s: &str) -> Result<Forward> {
        let bad = || {
            Error::Invalid(format!(
                "bad --forward {s:?}: use HOST:GUEST or ADDR:HOST:GUEST, e.g. 8080:80"
            ))
        };
        let parts: Vec<&str> = s.rsplitn(3, ':').collect();
        let (addr, host, guest) = match parts.as_slice() {
            [g, h] => ("127.0.0.1", *h, *g),
            [g, h, a] => (*a, *h, *g),
            _ => return Err(bad()),
        };
        let host: u16 = host.parse().map_err(|_| bad())?;
        let guest: u16 = guest.parse().map_err(|_| bad())?;
        let addr = addr.trim_matches(['[', ']']);
        // An IP address only: anything else would reach QEMU's -netdev
        // option string.
        if guest == 0 || addr.parse::<std::net::IpAddr>().is_err() {
            return Err(bad());
        }
        Ok(Forward {
            addr: addr.to_owned(),
            host,
            guest,
        })
    }

    /// Fails with a clear error if the host port is taken.
    pub fn check_free(&self) -> Result<()> {
        std::net::TcpListener::bind((self.addr.as_str(), self.host))
            .map(drop)
            .map_err(|e| {
                Error::Invalid(format!(
                    "host port {}:{} is not available ({e}): pick another with --forward",
                    self.addr, self.host
                ))
            })
    }
}

/// A free TCP port on 127.0.0.1 (the kernel's choice).
pub fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind(("127.0.0.1", 0)).at("127.0.0.1:0")?;
    Ok(l.local_addr().at("127.0.0.1:0")?.port())
}

/// Paths of one VM's files.
#[derive(Clone, Debug)]
pub struct VmFiles {
    pub qmp: PathBuf,
    pub console: PathBuf,
    pub serial_log: PathBuf,
    pub pidfile: PathBuf,
}

/// What QEMU is asked to run.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// Shown in `ps` and used to recognise the process (the instance id).
    pub tag: String,
    pub accel: Accel,
    pub cpus: u32,
    pub memory_mib: u64,
    /// The boot disk and its format (`qcow2` overlay or `raw`).
    pub disk: (PathBuf, &'static str),
    /// The NoCloud seed (raw, read-only), if any.
    pub seed: Option<PathBuf>,
    pub forwards: Vec<Forward>,
    pub files: VmFiles,
}

impl VmConfig {
    /// The command-line arguments (without `-daemonize`).
    pub fn args(&self) -> Vec<String> {
        let mut a: Vec<String> = Vec::new();
        let mut push = |s: &[&str]| a.extend(s.iter().map(|s| s.to_string()));
        push(&[
            "-name",
            &format!("{},process=vmdepot-{}", self.tag, self.tag),
        ]);
        push(&["-nodefaults", "-no-user-config", "-display", "none"]);
        push(&["-machine", "pc"]);
        match self.accel {
            Accel::Kvm => push(&["-accel", "kvm", "-cpu", "host"]),
            _ => push(&["-accel", "tcg", "-cpu", "max"]),
        }
        push(&["-smp", &self.cpus.to_string()]);
        push(&["-m", &format!("{}M", self.memory_mib)]);
        // Paths inside option strings have their commas doubled (QEMU's
        // option syntax); `-pidfile` takes a plain path.
        push(&[
            "-qmp",
            &format!("unix:{},server=on,wait=off", opt_value(&self.files.qmp)),
        ]);
        push(&[
            "-chardev",
            &format!(
                "socket,id=console,path={},server=on,wait=off,logfile={},logappend=on",
                opt_value(&self.files.console),
                opt_value(&self.files.serial_log)
            ),
        ]);
        push(&["-serial", "chardev:console"]);
        push(&["-pidfile", &self.files.pidfile.display().to_string()]);
        push(&[
            "-drive",
            &format!(
                "file={},format={},if=virtio,cache=writeback,discard=unmap",
                opt_value(&self.disk.0),
                self.disk.1
            ),
        ]);
        if let Some(seed) = &self.seed {
            push(&[
                "-drive",
                &format!("file={},format=raw,if=virtio,readonly=on", opt_value(seed)),
            ]);
        }
        let mut net = "user,id=net0".to_string();
        for f in &self.forwards {
            net.push_str(&format!(
                ",hostfwd=tcp:{}:{}-:{}",
                f.addr.replace(',', ",,"),
                f.host,
                f.guest
            ));
        }
        push(&["-netdev", &net]);
        push(&["-device", "virtio-net-pci,netdev=net0"]);
        a
    }
}

/// A path as the value of a QEMU option (`file=`, `path=`, …): commas are
/// doubled, since a single one would start the next option.
pub fn opt_value(p: &Path) -> String {
    p.display().to_string().replace(',', ",,")
}

/// Checks that a Unix socket path fits `sun_path` (108 bytes).
pub fn check_socket_path(p: &Path) -> Result<()> {
    if p.as_os_str().len() >= 108 {
        return Err(Error::Invalid(format!(
            "{}: socket path is longer than 107 bytes; use a depot with a shorter path",
            p.display()
        )));
    }
    Ok(())
}

/// A QMP connection (capabilities negotiated).
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    pub fn connect(sock: &Path) -> Result<Qmp> {
        Qmp::connect_timeout(sock, Duration::from_secs(10))
    }

    /// Connects, waiting at most `timeout` for each answer (QEMU serves one
    /// QMP client at a time: a second one waits, unanswered, until the
    /// first disconnects).
    pub fn connect_timeout(sock: &Path, timeout: Duration) -> Result<Qmp> {
        let s = UnixStream::connect(sock).at(sock)?;
        s.set_read_timeout(Some(timeout)).at(sock)?;
        let writer = s.try_clone().at(sock)?;
        let mut q = Qmp {
            reader: BufReader::new(s),
            writer,
        };
        let greeting = q.read_msg().map_err(|e| qmp_err(sock, e))?;
        if greeting.get("QMP").is_none() {
            return Err(qmp_err(sock, format!("unexpected greeting {greeting}")));
        }
        q.execute("qmp_capabilities", json!({}))
            .map_err(|e| qmp_err(sock, e))?;
        Ok(q)
    }

    /// Retries while the socket is not there yet (QEMU starting).
    pub fn connect_retry(sock: &Path, timeout: Duration) -> Result<Qmp> {
        let deadline = Instant::now() + timeout;
        loop {
            match Qmp::connect(sock) {
                Ok(q) => return Ok(q),
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    fn read_msg(&mut self) -> std::result::Result<Value, String> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("QEMU closed the QMP connection".into());
        }
        serde_json::from_str(&line).map_err(|e| format!("bad QMP message: {e}"))
    }

    /// Runs a command; returns its `return` value. Events are skipped.
    pub fn execute(&mut self, cmd: &str, args: Value) -> std::result::Result<Value, String> {
        let msg = json!({ "execute": cmd, "arguments": args });
        let mut line = serde_json::to_vec(&msg).map_err(|e| e.to_string())?;
        line.push(b'\n');
        self.writer.write_all(&line).map_err(|e| e.to_string())?;
        loop {
            let m = self.read_msg()?;
            if let Some(r) = m.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = m.get("error") {
                return Err(format!(
                    "{cmd}: {}",
                    e.get("desc").and_then(Value::as_str).unwrap_or("error")
                ));
            }
        }
    }

    /// The VM's run state (`running`, `paused`, `internal-error`, …).
    pub fn run_state(&mut self) -> Result<String> {
        let r = self
            .execute("query-status", json!({}))
            .map_err(|e| qmp_err(Path::new("QMP"), e))?;
        Ok(r.get("status")
            .and_then(Value::as_str)
            .unwrap_or("unknown")
            .to_owned())
    }

    /// Presses the ACPI power button.
    pub fn powerdown(&mut self) -> Result<()> {
        self.execute("system_powerdown", json!({}))
            .map(drop)
            .map_err(|e| qmp_err(Path::new("QMP"), e))
    }

    /// Pauses the guest's CPUs; QEMU drains and flushes its disks first, so
    /// the disk files are consistent until [`Qmp::resume`].
    pub fn pause(&mut self) -> Result<()> {
        self.execute("stop", json!({}))
            .map(drop)
            .map_err(|e| qmp_err(Path::new("QMP"), e))
    }

    pub fn resume(&mut self) -> Result<()> {
        self.execute("cont", json!({}))
            .map(drop)
            .map_err(|e| qmp_err(Path::new("QMP"), e))
    }

    /// Makes QEMU exit at once.
    pub fn quit(&mut self) {
        let _ = self.execute("quit", json!({}));
    }
}

fn qmp_err(sock: &Path, e: impl std::fmt::Display) -> Error {
    Error::Tool {
        tool: "qemu (QMP)".into(),
        detail: format!("{}: {e}", sock.display()),
    }
}

/// Tells systemd that the service is ready (`Type=notify` units): sends
/// `READY=1` to `$NOTIFY_SOCKET` when it is set. Returns whether it sent.
pub fn sd_notify_ready() -> Result<bool> {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(false);
    };
    let path = PathBuf::from(path);
    let sock = UnixDatagram::unbound().at(&path)?;
    let bytes = path.as_os_str().as_encoded_bytes();
    let addr = if let Some(abs) = bytes.strip_prefix(b"@") {
        SocketAddr::from_abstract_name(abs).at(&path)?
    } else {
        SocketAddr::from_pathname(&path).at(&path)?
    };
    sock.send_to_addr(b"READY=1\n", &addr).at(&path)?;
    Ok(true)
}

/// Parses a memory size for `--memory`: a number with an optional unit
/// suffix K, M, G or T (binary; default M). Returns MiB.
pub fn parse_memory(s: &str) -> Result<u64> {
    let bad = || {
        Error::Invalid(format!(
            "bad memory size {s:?}: use a number of MiB or a size like 512M or 2G"
        ))
    };
    let t = s.trim();
    let (num, unit) = match t.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => (&t[..i], t[i..].trim_end_matches(['i', 'B', 'b'])),
        None => (t, "M"),
    };
    let n: u64 = num.parse().map_err(|_| bad())?;
    let mib = match unit.to_ascii_uppercase().as_str() {
        "K" => n / 1024,
        "M" | "" => n,
        "G" => n.checked_mul(1024).ok_or_else(bad)?,
        "T" => n.checked_mul(1024 * 1024).ok_or_else(bad)?,
        _ => return Err(bad()),
    };
    if mib == 0 {
        return Err(bad());
    }
    Ok(mib)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_sizes() {
        assert_eq!(parse_memory("512").unwrap(), 512);
        assert_eq!(parse_memory("512M").unwrap(), 512);
        assert_eq!(parse_memory("2G").unwrap(), 2048);
        assert_eq!(parse_memory("1GiB").unwrap(), 1024);
        assert_eq!(parse_memory("1T").unwrap(), 1 << 20);
        assert!(parse_memory("0").is_err());
        assert!(parse_memory("12X").is_err());
        assert!(parse_memory("").is_err());
    }

    #[test]
    fn forwards() {
        let f = Forward::parse("8080:80").unwrap();
        assert_eq!((f.addr.as_str(), f.host, f.guest), ("127.0.0.1", 8080, 80));
        let f = Forward::parse("0.0.0.0:2222:22").unwrap();
        assert_eq!((f.addr.as_str(), f.host, f.guest), ("0.0.0.0", 2222, 22));
        assert!(Forward::parse("80").is_err());
        assert!(Forward::parse("x:80").is_err());
        assert!(Forward::parse("80:0").is_err());
        assert!(Forward::parse("127.0.0.1,smb=/:80:22").is_err());
        assert!(Forward::parse("localhost:80:22").is_err());
    }

    #[test]
    fn command_line_has_the_essentials() {
        let c = VmConfig {
            tag: "ins-0123456789abcdef".into(),
            accel: Accel::Tcg,
            cpus: 2,
            memory_mib: 256,
            disk: ("/d/disk.qcow2".into(), "qcow2"),
            seed: Some("/d/seed.img".into()),
            forwards: vec![Forward::parse("2222:22").unwrap()],
            files: VmFiles {
                qmp: "/d/qmp.sock".into(),
                console: "/d/console.sock".into(),
                serial_log: "/d/serial.log".into(),
                pidfile: "/d/qemu.pid".into(),
            },
        };
        let a = c.args().join(" ");
        for want in [
            "-accel tcg",
            "-smp 2",
            "-m 256M",
            "-qmp unix:/d/qmp.sock,server=on,wait=off",
            "logfile=/d/serial.log",
            "-pidfile /d/qemu.pid",
            "file=/d/disk.qcow2,format=qcow2,if=virtio",
            "file=/d/seed.img,format=raw,if=virtio,readonly=on",
            "hostfwd=tcp:127.0.0.1:2222-:22",
            "-display none",
        ] {
            assert!(a.contains(want), "{want} missing from {a}");
        }
    }

    #[test]
    fn commas_in_paths_are_doubled_in_options() {
        assert_eq!(opt_value(Path::new("/a,b/c,,d")), "/a,,b/c,,,,d");
        let d = PathBuf::from("/dep,ot x");
        let c = VmConfig {
            tag: "ins-0123456789abcdef".into(),
            accel: Accel::Tcg,
            cpus: 1,
            memory_mib: 256,
            disk: (d.join("disk.qcow2"), "qcow2"),
            seed: Some(d.join("seed.img")),
            forwards: vec![],
            files: VmFiles {
                qmp: d.join("qmp.sock"),
                console: d.join("console.sock"),
                serial_log: d.join("serial.log"),
                pidfile: d.join("qemu.pid"),
            },
        };
        let a = c.args();
        for want in [
            "unix:/dep,,ot x/qmp.sock,server=on,wait=off",
            "socket,id=console,path=/dep,,ot x/console.sock,server=on,wait=off,logfile=/dep,,ot x/serial.log,logappend=on",
            "file=/dep,,ot x/disk.qcow2,format=qcow2,if=virtio,cache=writeback,discard=unmap",
            "file=/dep,,ot x/seed.img,format=raw,if=virtio,readonly=on",
            // a plain path, not an option string
            "/dep,ot x/qemu.pid",
        ] {
            assert!(a.iter().any(|x| x == want), "{want} missing from {a:?}");
        }
    }
}
