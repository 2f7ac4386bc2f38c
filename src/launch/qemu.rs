//! QEMU's command line: finding `qemu-system-x86_64` ([`qemu_binary`]),
//! the options of one VM ([`VmConfig::args`], with its [`VmFiles`] and port
//! [`Forward`]s), and the values the CLI hands over (`--memory`:
//! [`parse_memory`]; [`sd_notify_ready`] for systemd units). The QMP client is in
//! [`super::qmp`], the accelerator choice in [`super::accel`] ([`Accel`] is
//! re-exported here).
//!
//! Knows nothing of the catalog: the instance modules decide what to run,
//! this module says how.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use super::accel::Accel;
use super::firmware::OVMF_CODE;
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

/// One host port forwarded to a guest port (TCP, user-mode networking).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Forward {
    /// Host address to listen on (default 127.0.0.1).
    pub addr: String,
    /// The host's TCP port.
    pub host: u16,
    /// The guest's TCP port it reaches.
    pub guest: u16,
}

impl Forward {
    /// `[ADDR:]HOST:GUEST`.
    pub fn parse(s: &str) -> Result<Forward> {
        let bad = || {
            Error::Usage(format!(
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
    pub(crate) fn check_free(&self) -> Result<()> {
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

/// How long QEMU's NBD client keeps a lazy disk's requests waiting for
/// its server to come back (then they fail: I/O errors in the guest).
pub const RECONNECT_DELAY_SECS: u32 = 30;

/// The id of the chardev of the serial console (its socket and log).
pub const CONSOLE_CHARDEV: &str = "console";

/// The boot disk of a VM.
#[derive(Clone, Debug)]
pub enum DiskSpec {
    /// A file QEMU opens itself: a qcow2 overlay (its backing file named in
    /// its header) or a raw disk.
    File {
        path: PathBuf,
        /// `qcow2` or `raw`.
        format: &'static str,
    },
    /// A qcow2 overlay whose backing is read over NBD from vmdepot's disk
    /// server on `socket`, export `export` (the instance id); whatever
    /// backing file the overlay's header names is not opened.
    Lazy {
        overlay: PathBuf,
        socket: PathBuf,
        export: String,
    },
}

impl DiskSpec {
    /// The `-blockdev` options (JSON) of a lazy disk: the NBD client
    /// (`base-nbd`), the raw image on it (`base`), and the overlay `disk0`
    /// backed by that node (a node reference: the file name in the
    /// overlay's header is not used).
    fn lazy_blockdevs(overlay: &Path, socket: &Path, export: &str) -> [String; 3] {
        [
            serde_json::json!({
                "driver": "nbd",
                "node-name": "base-nbd",
                "read-only": true,
                "server": {"type": "unix", "path": socket.display().to_string()},
                "export": export,
                "reconnect-delay": RECONNECT_DELAY_SECS,
            }),
            serde_json::json!({
                "driver": "raw",
                "node-name": "base",
                "read-only": true,
                "file": "base-nbd",
            }),
            serde_json::json!({
                "driver": "qcow2",
                "node-name": "disk0",
                "discard": "unmap",
                "file": {"driver": "file", "filename": overlay.display().to_string()},
                "backing": "base",
            }),
        ]
        .map(|j| j.to_string())
    }
}

/// What QEMU is asked to run.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// Shown in `ps` and used to recognise the process (the instance id).
    pub tag: String,
    pub accel: Accel,
    pub cpus: u32,
    pub memory_mib: u64,
    /// The boot disk.
    pub disk: DiskSpec,
    /// The NoCloud seed (raw, read-only), if any.
    pub seed: Option<PathBuf>,
    pub forwards: Vec<Forward>,
    pub files: VmFiles,
    /// UEFI: the instance's variable store (OVMF's code is
    /// [`OVMF_CODE`]); `None`: BIOS.
    pub efivars: Option<PathBuf>,
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
        if let Some(vars) = &self.efivars {
            push(&[
                "-drive",
                &format!(
                    "if=pflash,format=raw,unit=0,readonly=on,file={}",
                    opt_value(Path::new(OVMF_CODE))
                ),
            ]);
            push(&[
                "-drive",
                &format!("if=pflash,format=raw,unit=1,file={}", opt_value(vars)),
            ]);
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
                "socket,id={CONSOLE_CHARDEV},path={},server=on,wait=off,logfile={},logappend=on",
                opt_value(&self.files.console),
                opt_value(&self.files.serial_log)
            ),
        ]);
        push(&["-serial", &format!("chardev:{CONSOLE_CHARDEV}")]);
        push(&["-pidfile", &self.files.pidfile.display().to_string()]);
        match &self.disk {
            DiskSpec::File { path, format } => push(&[
                "-drive",
                &format!(
                    "file={},format={format},if=virtio,cache=writeback,discard=unmap",
                    opt_value(path),
                ),
            ]),
            DiskSpec::Lazy {
                overlay,
                socket,
                export,
            } => {
                for b in DiskSpec::lazy_blockdevs(overlay, socket, export) {
                    push(&["-blockdev", &b]);
                }
                push(&["-device", "virtio-blk-pci,drive=disk0"]);
            }
        }
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

/// The most instances one launch makes (`--count`).
pub const MAX_COUNT: u32 = 1000;

/// The most virtual CPUs of an instance (`--cpus`).
pub const MAX_CPUS: u32 = 255;

/// The least guest memory, in MiB (`--memory`): below it no firmware and
/// kernel boot, and QEMU would start a guest that never prints a line.
pub const MIN_MEMORY_MIB: u64 = 16;

/// Refuses guest memory below [`MIN_MEMORY_MIB`] (a usage error).
pub fn check_memory(mib: u64) -> Result<()> {
    if mib < MIN_MEMORY_MIB {
        return Err(Error::Usage(format!(
            "--memory {mib}M: a guest needs at least {MIN_MEMORY_MIB} MiB (e.g. 512M or 2G)"
        )));
    }
    Ok(())
}

/// Parses a memory size for `--memory`: a number with an optional unit
/// suffix K, M, G or T (binary; default M). Returns MiB; refuses less than
/// [`MIN_MEMORY_MIB`]. Errors are usage errors (exit code 2).
pub fn parse_memory(s: &str) -> Result<u64> {
    let bad = || {
        Error::Usage(format!(
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
    check_memory(mib)?;
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
        assert_eq!(parse_memory("16").unwrap(), MIN_MEMORY_MIB);
        for small in ["1", "15M", "8192K"] {
            let e = parse_memory(small).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{small}: {e}");
            assert!(e.to_string().contains("at least 16 MiB"), "{e}");
        }
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
            disk: DiskSpec::File {
                path: "/d/disk.qcow2".into(),
                format: "qcow2",
            },
            seed: Some("/d/seed.img".into()),
            forwards: vec![Forward::parse("2222:22").unwrap()],
            files: VmFiles {
                qmp: "/d/qmp.sock".into(),
                console: "/d/console.sock".into(),
                serial_log: "/d/serial.log".into(),
                pidfile: "/d/qemu.pid".into(),
            },
            efivars: None,
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
        assert!(!a.contains("pflash"), "BIOS: no flash drives in {a}");
        let uefi = VmConfig {
            efivars: Some("/d/efivars.fd".into()),
            ..c
        };
        let a = uefi.args().join(" ");
        for want in [
            "-drive if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd",
            "-drive if=pflash,format=raw,unit=1,file=/d/efivars.fd",
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
            disk: DiskSpec::File {
                path: d.join("disk.qcow2"),
                format: "qcow2",
            },
            seed: Some(d.join("seed.img")),
            forwards: vec![],
            files: VmFiles {
                qmp: d.join("qmp.sock"),
                console: d.join("console.sock"),
                serial_log: d.join("serial.log"),
                pidfile: d.join("qemu.pid"),
            },
            efivars: Some(d.join("efivars.fd")),
        };
        let a = c.args();
        for want in [
            "unix:/dep,,ot x/qmp.sock,server=on,wait=off",
            "socket,id=console,path=/dep,,ot x/console.sock,server=on,wait=off,logfile=/dep,,ot x/serial.log,logappend=on",
            "file=/dep,,ot x/disk.qcow2,format=qcow2,if=virtio,cache=writeback,discard=unmap",
            "file=/dep,,ot x/seed.img,format=raw,if=virtio,readonly=on",
            "if=pflash,format=raw,unit=1,file=/dep,,ot x/efivars.fd",
            // a plain path, not an option string
            "/dep,ot x/qemu.pid",
        ] {
            assert!(a.iter().any(|x| x == want), "{want} missing from {a:?}");
        }
    }
}
