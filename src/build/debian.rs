//! The steps of a Debian build: the disk (MBR, an EFI system partition, an
//! ext4 root), debootstrap, the packages in a chroot, the configuration
//! of a cloud guest, the two boot loaders; or, on a copy of a built image,
//! the packages and the script only. The facts these steps rest on are in
//! shared/REAL-GUEST.md; the layout they make is in docs/FORMAT.md.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use super::host::{SystemUmask, Work};
use super::sandbox;
use super::Plan;
use crate::error::{Error, IoContext, Result};
use crate::progress::Progress;

/// First sector of the EFI system partition (1 MiB).
const ESP_START: u64 = 2048;
/// Sectors of the EFI system partition (32 MiB).
const ESP_SECTORS: u64 = 65536;
/// First sector of the root partition.
const ROOT_START: u64 = ESP_START + ESP_SECTORS;
/// MBR partition types.
const TYPE_ESP: u8 = 0xef;
const TYPE_LINUX: u8 = 0x83;
/// The kernel's command line after `root=UUID=…`.
const CMDLINE: &str = "ro console=tty0 console=ttyS0,115200n8";

/// The packages of every base build, but the last transaction's.
const BASE_PACKAGES: &[&str] = &[
    "initramfs-tools",
    "zstd",
    "systemd-sysv",
    "udev",
    "dbus",
    "kmod",
    "cloud-init",
    "cloud-guest-utils",
    "openssh-server",
    "sudo",
    "iproute2",
    "netbase",
    "extlinux",
    "syslinux-common",
    "grub-efi-amd64-bin",
];
/// The last transaction: systemd-resolved turns /etc/resolv.conf into a
/// link into /run; the kernel comes after every initramfs hook, so the
/// initramfs is made once.
const LAST_PACKAGES: &[&str] = &["linux-image-amd64", "systemd-resolved"];

/// What a build made: the disk file and what the recipe records of it.
pub struct Built {
    pub disk: PathBuf,
    pub kernel: String,
    pub package_set: String,
    pub source_date: i64,
}

/// The keys the mirror's release files are checked with.
const KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

/// The chroot: where the root filesystem is mounted in the work directory.
struct Root {
    dir: PathBuf,
    source_date: i64,
    /// Its programs are the image's (a build `--from`), not the mirror's:
    /// they run in the sandbox ([`sandbox`]), with a private /dev.
    sandboxed: bool,
    /// The root filesystem's device (`st_dev`).
    dev: u64,
    /// The disk file the root filesystem is on.
    disk: PathBuf,
    /// What errors name: `image NAME` (the `--from` image) or the new
    /// disk (the work directory is gone when they are read).
    label: PathBuf,
}

impl Root {
    /// A command run in the chroot (or the sandbox) with a clean
    /// environment.
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = if self.sandboxed {
            sandbox::command(&self.dir, "/usr/bin/env")
        } else {
            let mut c = Command::new("chroot");
            c.arg(&self.dir).arg("/usr/bin/env");
            c
        };
        c.arg("-i")
            .arg("PATH=/usr/sbin:/usr/bin:/sbin:/bin")
            .arg("DEBIAN_FRONTEND=noninteractive")
            .arg("LANG=C.UTF-8")
            .arg("HOME=/root")
            .arg(format!("SOURCE_DATE_EPOCH={}", self.source_date))
            .args(args);
        c
    }

    /// `rel` (an absolute path in the image) on the host, its symbolic
    /// links read as the image's own: relative to the image's root, never
    /// out of it, never into another filesystem mounted in it (a link or
    /// a mount that the image or a package planted cannot send a host-side
    /// read, write, removal or mount elsewhere). A link as the last
    /// component is followed only if `follow_last` (else it is what the
    /// caller removes or replaces).
    fn resolve(&self, rel: &str, follow_last: bool) -> Result<PathBuf> {
        use std::os::unix::fs::MetadataExt;
        use std::path::Component;
        let refuse = |at: &Path, why: &str| Error::BadInput {
            file: self.label.clone(),
            reason: format!(
                "{rel} (/{}): {why}; refused (the image is damaged or hostile)",
                at.display()
            ),
        };
        let mut todo: Vec<std::ffi::OsString> = Vec::new();
        let push = |todo: &mut Vec<std::ffi::OsString>, p: &Path| {
            for c in p.components().rev() {
                match c {
                    Component::Normal(n) => todo.push(n.to_owned()),
                    Component::ParentDir => todo.push("..".into()),
                    _ => {}
                }
            }
        };
        push(&mut todo, Path::new(rel));
        let mut cur = PathBuf::new();
        let mut links = 0;
        while let Some(c) = todo.pop() {
            if c == ".." {
                cur.pop();
                continue;
            }
            let next = cur.join(&c);
            let host = self.dir.join(&next);
            match fs::symlink_metadata(&host) {
                Ok(m) if m.file_type().is_symlink() && (follow_last || !todo.is_empty()) => {
                    links += 1;
                    if links > 40 {
                        return Err(refuse(&next, "more than 40 symbolic links"));
                    }
                    let target = fs::read_link(&host).at(&host)?;
                    if target.is_absolute() {
                        cur = PathBuf::new();
                    }
                    push(&mut todo, &target);
                }
                Ok(m) if m.dev() != self.dev => {
                    return Err(refuse(&next, "another filesystem is mounted there"))
                }
                Ok(_) => cur = next,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => cur = next,
                Err(e) => return Err(e).at(&host),
            }
        }
        Ok(self.dir.join(cur))
    }

    /// `rel` to remove, rename or create (a link there is not followed).
    fn path(&self, rel: &str) -> Result<PathBuf> {
        self.resolve(rel, false)
    }

    /// `rel` to read (a link there is followed, in the image).
    fn file(&self, rel: &str) -> Result<PathBuf> {
        self.resolve(rel, true)
    }

    /// The directory `rel`, made if missing: a real directory of the root
    /// filesystem (a mount point).
    fn dir_at(&self, rel: &str) -> Result<PathBuf> {
        let p = self.file(rel)?;
        fs::create_dir_all(&p).at(&p)?;
        // (made just now through resolved components only)
        let p = self.file(rel)?;
        if !fs::symlink_metadata(&p).at(&p)?.is_dir() {
            return Err(Error::BadInput {
                file: self.label.clone(),
                reason: format!("{rel} is not a directory; refused"),
            });
        }
        Ok(p)
    }

    fn write(&self, rel: &str, body: &str) -> Result<()> {
        let p = self.path(rel)?;
        if let Some(d) = p.parent() {
            fs::create_dir_all(d).at(d)?;
        }
        // A link planted by a package would send the write elsewhere.
        let _ = fs::remove_file(&p);
        create_new(&p, 0o644)?.write_all(body.as_bytes()).at(&p)
    }
}

/// `apt-get update` in the root, then the build's source date from the
/// lists it fetched (0: unknown).
fn apt_update(work: &mut Work, root: &mut Root, suite: &str) -> Result<()> {
    work.run(
        "apt-get update",
        &mut root.cmd(&["apt-get", "-q", "update"]),
    )?;
    root.source_date = mirror_date(root, suite).unwrap_or(0);
    Ok(())
}

/// A base build: a new disk from nothing.
pub fn build_base(work: &mut Work, plan: &Plan, progress: &dyn Progress) -> Result<Built> {
    let _umask = SystemUmask::set();
    for t in [
        "debootstrap",
        "mkfs.ext4",
        "mount",
        "umount",
        "chroot",
        "fstrim",
        "tune2fs",
    ] {
        which(t)?;
    }
    if !Path::new(KEYRING).is_file() {
        return Err(Error::Tool {
            tool: "debootstrap".into(),
            detail: format!("{KEYRING} is missing: apt-get install debian-archive-keyring"),
        });
    }
    let disk = work.dir.join("disk.raw");
    let uuid = recipe_uuid(plan);
    let f = OpenOptions::new()
        .create_new(true)
        .write(true)
        .read(true)
        .mode(0o600)
        .open(&disk)
        .at(&disk)?;
    f.set_len(plan.size).at(&disk)?;
    let total = plan.size / 512;
    write_mbr(&f, &disk, total, &uuid)?;
    drop(f);
    let root_bytes = (total - ROOT_START) * 512;
    let mut mkfs = Command::new("mkfs.ext4");
    mkfs.args(["-q", "-F", "-O", "^64bit", "-L", "debian-root", "-U", &uuid])
        .arg("-E")
        .arg(format!("offset={},hash_seed={uuid}", ROOT_START * 512))
        .arg(&disk)
        .arg(format!("{}k", root_bytes / 1024));
    work.run("mkfs.ext4", &mut mkfs)?;
    let root = mount_root(work, &disk, root_bytes, false, disk.clone())?;

    progress.begin(
        &format!("debootstrap {} from {}", plan.suite, plan.mirror),
        0,
    );
    let boot_cache = plan.debs.join("debootstrap");
    fs::create_dir_all(&boot_cache).at(&boot_cache)?;
    let mut ds = Command::new("debootstrap");
    ds.arg("--variant=minbase")
        .arg(format!("--cache-dir={}", boot_cache.display()))
        .arg(format!("--keyring={KEYRING}"))
        .arg(plan.suite)
        .arg(&root.dir)
        .arg(&plan.mirror);
    work.run("debootstrap", &mut ds)?;
    progress.end();

    let mut root = root;
    chroot_mounts(work, &root, plan)?;
    configure_apt(&root, plan)?;
    configure_before_packages(&root, &uuid)?;
    progress.begin("packages", 0);
    let resolv = borrow_resolv(&root)?;
    apt_update(work, &mut root, plan.suite)?;
    work.run(
        "apt-get dist-upgrade",
        &mut root.cmd(&["apt-get", "-y", "-q", "dist-upgrade"]),
    )?;
    let mut first: Vec<&str> = vec!["apt-get", "-y", "-q", "install"];
    first.extend(BASE_PACKAGES);
    first.extend(plan.packages.iter().map(String::as_str));
    work.run("apt-get install", &mut root.cmd(&first))?;
    append(
        &root.file("/etc/initramfs-tools/modules")?,
        "virtio_pci\nvirtio_blk\nvirtio_scsi\nvirtio_net\nsd_mod\nsr_mod\nata_piix\nahci\nnvme\next4\ncrc32c_generic\n",
    )?;
    let mut last: Vec<&str> = vec!["apt-get", "-y", "-q", "install"];
    last.extend(LAST_PACKAGES);
    work.run("apt-get install (kernel)", &mut root.cmd(&last))?;
    drop(resolv); // systemd-resolved owns /etc/resolv.conf now
    check_installed(work, &root)?;
    progress.end();

    let kernel = kernel_of(&root)?;
    configure_system(work, &root)?;
    write_boot_configs(&root, &kernel, &uuid)?;
    work.run(
        "extlinux --install",
        &mut root.cmd(&["extlinux", "--install", "/boot/extlinux"]),
    )?;
    let efi = grub_efi_image(work, &root, &uuid)?;
    let mbr = root.file("/usr/lib/syslinux/mbr/mbr.bin")?;
    let mbr_code = fs::read(&mbr).at(&mbr)?;
    if let Some((p, body)) = &plan.script {
        run_script(work, &root, p, body)?;
    }
    let package_set = package_set(&root)?;
    finish(work, &root)?;

    // After the unmount: the MBR's boot code, the VBR's hidden-sectors
    // field (extlinux on a loop device cannot know the partition's offset),
    // the EFI system partition.
    let f = OpenOptions::new().write(true).open(&disk).at(&disk)?;
    let code = mbr_code.get(..440).ok_or_else(|| Error::Tool {
        tool: "image build".into(),
        detail: "syslinux's mbr.bin is shorter than 440 bytes".into(),
    })?;
    write_at(&f, code, 0, &disk)?;
    let hidden = (ROOT_START as u32).to_le_bytes();
    write_at(&f, &hidden, ROOT_START * 512 + 0x1c, &disk)?;
    write_esp(&f, &disk, &efi, &uuid)?;
    f.sync_all().at(&disk)?;
    Ok(Built {
        disk,
        kernel,
        package_set,
        source_date: root.source_date,
    })
}

/// A build on `disk`, a copy of an image that a base build made: the
/// packages, the script, the clean-up; the layout stays.
pub fn build_on(
    work: &mut Work,
    plan: &Plan,
    disk: PathBuf,
    label: PathBuf,
    progress: &dyn Progress,
) -> Result<Built> {
    let _umask = SystemUmask::set();
    for t in ["mount", "umount", "fstrim", "tune2fs"] {
        which(t)?;
    }
    let (start, sectors) = root_partition(&disk).map_err(|e| match e {
        Error::BadInput { reason, .. } => Error::BadInput {
            file: label.clone(),
            reason,
        },
        e => e,
    })?;
    if start != ROOT_START {
        return Err(Error::BadInput {
            file: label,
            reason: format!(
                "its root partition starts at sector {start}, not {ROOT_START}: not a layout that image build made"
            ),
        });
    }
    let mut root = mount_root(work, &disk, sectors * 512, true, label)?;
    chroot_mounts(work, &root, plan)?;
    let uuid = fstab_uuid(&root)?;
    let before = kernel_of(&root)?;
    progress.begin("packages", 0);
    write_policy_rc_d(&root)?;
    let resolv = borrow_resolv(&root)?;
    apt_update(work, &mut root, plan.suite)?;
    if !plan.packages.is_empty() {
        let mut install: Vec<&str> = vec!["apt-get", "-y", "-q", "install"];
        install.extend(plan.packages.iter().map(String::as_str));
        work.run("apt-get install", &mut root.cmd(&install))?;
    }
    drop(resolv);
    check_installed(work, &root)?;
    progress.end();
    let kernel = kernel_of(&root)?;
    if kernel != before {
        write_boot_configs(&root, &kernel, &uuid)?;
    }
    if let Some((p, body)) = &plan.script {
        run_script(work, &root, p, body)?;
    }
    let package_set = package_set(&root)?;
    finish(work, &root)?;
    Ok(Built {
        disk,
        kernel,
        package_set,
        source_date: root.source_date,
    })
}

fn which(tool: &str) -> Result<()> {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    match found {
        true => Ok(()),
        false => Err(Error::Tool {
            tool: tool.to_owned(),
            detail: "not found on PATH: install it (apt-get install debootstrap e2fsprogs mount util-linux debian-archive-keyring)".into(),
        }),
    }
}

/// The filesystem UUID: from the recipe (system, mirror, packages), so two
/// builds of one recipe differ in no identifier.
fn recipe_uuid(plan: &Plan) -> String {
    let mut h = blake3::Hasher::new();
    h.update(plan.system.as_bytes());
    h.update(b"\0");
    h.update(plan.mirror.as_bytes());
    for p in &plan.packages {
        h.update(b"\0");
        h.update(p.as_bytes());
    }
    let mut b = [0u8; 16];
    b.copy_from_slice(&h.finalize().as_bytes()[..16]);
    b[6] = (b[6] & 0x0f) | 0x40; // version 4 layout, variant 1
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

/// The MBR: a disk id from the UUID, p1 the EFI system partition, p2 the
/// root (bootable, to the end of the disk).
fn write_mbr(f: &File, path: &Path, total: u64, uuid: &str) -> Result<()> {
    let mut mbr = [0u8; 512];
    let id = u32::from_str_radix(&uuid[..8], 16).unwrap_or(0x766d_6470);
    mbr[440..444].copy_from_slice(&id.to_le_bytes());
    let entry = |boot: bool, kind: u8, start: u64, sectors: u64| {
        let mut e = [0u8; 16];
        e[0] = if boot { 0x80 } else { 0 };
        e[1..4].copy_from_slice(&[0xfe, 0xff, 0xff]); // CHS: use LBA
        e[4] = kind;
        e[5..8].copy_from_slice(&[0xfe, 0xff, 0xff]);
        e[8..12].copy_from_slice(&(start as u32).to_le_bytes());
        e[12..16].copy_from_slice(&(sectors as u32).to_le_bytes());
        e
    };
    mbr[446..462].copy_from_slice(&entry(false, TYPE_ESP, ESP_START, ESP_SECTORS));
    mbr[462..478].copy_from_slice(&entry(true, TYPE_LINUX, ROOT_START, total - ROOT_START));
    mbr[510] = 0x55;
    mbr[511] = 0xaa;
    write_at(f, &mbr, 0, path)
}

/// The bootable Linux partition of a disk that image build made: (first
/// sector, sectors).
fn root_partition(disk: &Path) -> Result<(u64, u64)> {
    let mut mbr = [0u8; 512];
    File::open(disk)
        .and_then(|mut f| f.read_exact(&mut mbr))
        .at(disk)?;
    if mbr[510..] != [0x55, 0xaa] {
        return Err(Error::BadInput {
            file: disk.to_owned(),
            reason: "no MBR partition table (sector 0 lacks 55 aa)".into(),
        });
    }
    for e in mbr[446..510].chunks(16) {
        let start = u32::from_le_bytes(e[8..12].try_into().unwrap()) as u64;
        let sectors = u32::from_le_bytes(e[12..16].try_into().unwrap()) as u64;
        if e[0] == 0x80 && e[4] == TYPE_LINUX && sectors > 0 {
            return Ok((start, sectors));
        }
    }
    Err(Error::BadInput {
        file: disk.to_owned(),
        reason: "no bootable Linux partition (type 83, active) in its MBR".into(),
    })
}

/// Mounts the root partition of `disk` (a loop device the kernel frees at
/// the unmount) at `WORK/root`.
fn mount_root(
    work: &mut Work,
    disk: &Path,
    bytes: u64,
    sandboxed: bool,
    label: PathBuf,
) -> Result<Root> {
    let dir = work.dir.join("root");
    fs::create_dir_all(&dir).at(&dir)?;
    let opts = format!("loop,offset={},sizelimit={bytes}", ROOT_START * 512);
    work.mount(
        &["-t", "ext4", "-o", &opts, &disk.display().to_string()],
        &dir,
    )?;
    let dev = std::os::unix::fs::MetadataExt::dev(&fs::metadata(&dir).at(&dir)?);
    Ok(Root {
        dir,
        source_date: 0,
        sandboxed,
        dev,
        disk: disk.to_owned(),
        label,
    })
}

/// proc, sys, dev, dev/pts, a tmpfs on run, and the package cache on
/// /var/cache/apt/archives. A sandboxed root gets a private /dev instead
/// of the host's, and its proc and sys are mounted by each command in its
/// own namespace ([`sandbox`]).
fn chroot_mounts(work: &mut Work, root: &Root, plan: &Plan) -> Result<()> {
    let apt = plan.debs.join("apt");
    fs::create_dir_all(apt.join("partial")).at(&apt)?;
    let apt_s = apt.display().to_string();
    let mut mounts = vec![];
    if root.sandboxed {
        for at in ["/proc", "/sys"] {
            root.dir_at(at)?;
        }
        mounts.push((
            vec!["-t", "tmpfs", "-o", "mode=755,nosuid,size=16m", "tmpfs"],
            "/dev",
        ));
    } else {
        mounts.extend([
            (vec!["-t", "proc", "proc"], "/proc"),
            (vec!["-t", "sysfs", "sysfs"], "/sys"),
            (vec!["--bind", "/dev"], "/dev"),
        ]);
    }
    mounts.extend([
        (vec!["-t", "tmpfs", "tmpfs"], "/run"),
        (vec!["--bind", apt_s.as_str()], "/var/cache/apt/archives"),
    ]);
    for (args, at) in mounts {
        let target = root.dir_at(at)?;
        work.mount(&args, &target)?;
        // (inside the /dev just mounted: resolved there, not in the image)
        let pts = target.join("pts");
        if at == "/dev" && root.sandboxed {
            sandbox::populate_dev(&target)?;
            work.mount(
                &[
                    "-t",
                    "devpts",
                    "-o",
                    "newinstance,ptmxmode=0666,mode=620",
                    "devpts",
                ],
                &pts,
            )?;
        } else if at == "/dev" {
            work.mount(&["--bind", "/dev/pts"], &pts)?;
        }
    }
    Ok(())
}

/// While it lives, /etc/resolv.conf in the chroot is the host's (so apt
/// reaches the mirror); dropped, what the image had is back.
struct BorrowedResolv {
    path: PathBuf,
    saved: Option<PathBuf>,
}

fn borrow_resolv(root: &Root) -> Result<BorrowedResolv> {
    let path = root.path("/etc/resolv.conf")?;
    let saved = path.with_extension("vmdepot-saved");
    let had = fs::symlink_metadata(&path).is_ok();
    if had {
        fs::rename(&path, &saved).at(&path)?;
    }
    let host = fs::read("/etc/resolv.conf").unwrap_or_default();
    fs::write(&path, host).at(&path)?;
    Ok(BorrowedResolv {
        path,
        saved: had.then_some(saved),
    })
}

impl Drop for BorrowedResolv {
    fn drop(&mut self) {
        // A package that made its own (systemd-resolved's link) keeps it.
        let ours = fs::symlink_metadata(&self.path).is_ok_and(|m| m.file_type().is_file());
        if let Some(saved) = &self.saved {
            if ours {
                let _ = fs::rename(saved, &self.path);
            } else {
                let _ = fs::remove_file(saved);
            }
        } else if ours {
            let _ = fs::remove_file(&self.path);
        }
    }
}

fn write_policy_rc_d(root: &Root) -> Result<()> {
    let p = root.path("/usr/sbin/policy-rc.d")?;
    root.write("/usr/sbin/policy-rc.d", "#!/bin/sh\nexit 101\n")?;
    fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).at(&p)
}

/// apt's sources (the suite, its updates, its security suite), no
/// recommends, no translations; dpkg leaves out documentation and the
/// kernel modules of hardware no QEMU guest has; no daemon starts.
fn configure_apt(root: &Root, plan: &Plan) -> Result<()> {
    write_policy_rc_d(root)?;
    let mut slim = String::from(
        "path-exclude=/usr/share/doc/*\npath-include=/usr/share/doc/*/copyright\n\
         path-exclude=/usr/share/man/*\npath-exclude=/usr/share/info/*\n\
         path-exclude=/usr/share/locale/*\npath-include=/usr/share/locale/locale.alias\n\
         path-exclude=/usr/share/lintian/*\n",
    );
    for m in [
        "kernel/sound",
        "kernel/drivers/media",
        "kernel/drivers/staging",
        "kernel/drivers/infiniband",
        "kernel/drivers/bluetooth",
        "kernel/drivers/net/wireless",
        "kernel/net/wireless",
        "kernel/net/mac80211",
        "kernel/net/bluetooth",
        "kernel/drivers/gpu/drm/amd",
        "kernel/drivers/gpu/drm/radeon",
        "kernel/drivers/gpu/drm/nouveau",
        "kernel/drivers/gpu/drm/i915",
    ] {
        slim.push_str(&format!("path-exclude=/lib/modules/*/{m}/*\n"));
    }
    root.write("/etc/dpkg/dpkg.cfg.d/90-vmdepot-slim", &slim)?;
    root.write(
        "/etc/apt/apt.conf.d/90-vmdepot",
        "APT::Install-Recommends \"false\";\nAPT::Install-Suggests \"false\";\nAcquire::Languages \"none\";\n",
    )?;
    let _ = fs::remove_file(root.path("/etc/apt/sources.list")?);
    let suite = plan.suite;
    root.write(
        "/etc/apt/sources.list.d/debian.sources",
        &format!(
            "Types: deb\nURIs: {}\nSuites: {suite} {suite}-updates\nComponents: main\n\
             Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n\
             Types: deb\nURIs: {}\nSuites: {suite}-security\nComponents: main\n\
             Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n",
            plan.mirror, plan.security
        ),
    )
}

/// What maintainer scripts read at install time: the initramfs's module
/// list, no floppy, the host name, fstab, the locale.
fn configure_before_packages(root: &Root, uuid: &str) -> Result<()> {
    // MODULES=dep cannot see the guest's disk from a chroot; MODULES=most
    // makes 30 MB that the boot loader reads whole.
    root.write("/etc/initramfs-tools/conf.d/vmdepot", "MODULES=list\n")?;
    root.write(
        "/etc/modprobe.d/blacklist-floppy.conf",
        "blacklist floppy\n",
    )?;
    root.write("/etc/hostname", "debian\n")?;
    root.write(
        "/etc/hosts",
        "127.0.0.1\tlocalhost\n127.0.1.1\tdebian\n::1\tlocalhost ip6-localhost ip6-loopback\n",
    )?;
    root.write(
        "/etc/fstab",
        &format!("UUID={uuid} / ext4 errors=remount-ro 0 1\n"),
    )?;
    root.write("/etc/default/locale", "LANG=C.UTF-8\n")
}

/// Networking (systemd-networkd DHCP on en*/eth*, one link enough), the
/// serial getty, cloud-init's NoCloud configuration.
fn configure_system(work: &mut Work, root: &Root) -> Result<()> {
    root.write(
        "/etc/systemd/network/10-dhcp.network",
        "[Match]\nName=en* eth*\n\n[Network]\nDHCP=yes\n",
    )?;
    root.write(
        "/etc/systemd/system/systemd-networkd-wait-online.service.d/any.conf",
        "[Service]\nExecStart=\nExecStart=/lib/systemd/systemd-networkd-wait-online --any\n",
    )?;
    work.run(
        "systemctl enable",
        &mut root.cmd(&[
            "systemctl",
            "enable",
            "systemd-networkd.service",
            "systemd-resolved.service",
            "serial-getty@ttyS0.service",
        ]),
    )?;
    root.write(
        "/etc/cloud/cloud.cfg.d/90-vmdepot.cfg",
        "# vmdepot: the seed is a NoCloud volume (label cidata); probing other\n\
         # datasources costs minutes. The network is systemd-networkd's DHCP.\n\
         datasource_list: [ NoCloud, None ]\nmanage_etc_hosts: true\n\
         network: {config: disabled}\n\
         # RSA 3072 host keys cost 11 s of a boot under TCG.\n\
         ssh_genkeytypes: [ ed25519, ecdsa ]\n\
         # The boot loaders are extlinux and a GRUB EFI image, not Debian's GRUB.\n\
         grub_dpkg: {enabled: false}\n",
    )?;
    let cfg = fs::read_to_string(root.file("/etc/cloud/cloud.cfg")?).unwrap_or_default();
    if !cfg.contains("name: debian") {
        work.note("warning: cloud.cfg's default user is not debian");
    }
    Ok(())
}

/// extlinux's and GRUB's configuration: the kernel `kver` of the root
/// filesystem `uuid`.
fn write_boot_configs(root: &Root, kver: &str, uuid: &str) -> Result<()> {
    root.write(
        "/boot/extlinux/extlinux.conf",
        &format!(
            "DEFAULT debian\nPROMPT 0\nTIMEOUT 0\nLABEL debian\n  LINUX /boot/vmlinuz-{kver}\n  \
             INITRD /boot/initrd.img-{kver}\n  APPEND root=UUID={uuid} {CMDLINE}\n"
        ),
    )?;
    root.write(
        "/boot/grub/grub.cfg",
        &format!(
            "# Read by the GRUB EFI image on the EFI system partition (vmdepot image build).\n\
             set timeout=0\nlinux /boot/vmlinuz-{kver} root=UUID={uuid} {CMDLINE}\n\
             initrd /boot/initrd.img-{kver}\nboot\n"
        ),
    )
}

/// A standalone GRUB EFI image (made by the guest's own grub-mkstandalone)
/// that finds the root filesystem by UUID and reads its /boot/grub/grub.cfg.
fn grub_efi_image(work: &mut Work, root: &Root, uuid: &str) -> Result<Vec<u8>> {
    root.write(
        "/tmp/vmdepot-grub.cfg",
        &format!(
            "search --no-floppy --fs-uuid --set=root {uuid}\nset prefix=($root)/boot/grub\n\
             configfile ($root)/boot/grub/grub.cfg\n"
        ),
    )?;
    work.run(
        "grub-mkstandalone",
        &mut root.cmd(&[
            "grub-mkstandalone",
            "-O",
            "x86_64-efi",
            "-o",
            "/tmp/vmdepot-BOOTX64.EFI",
            "--modules=part_msdos ext2 search search_fs_uuid configfile normal linux echo",
            "--locales=",
            "--fonts=",
            "--themes=",
            "boot/grub/grub.cfg=/tmp/vmdepot-grub.cfg",
        ]),
    )?;
    let p = root.path("/tmp/vmdepot-BOOTX64.EFI")?;
    let efi = fs::read(&p).at(&p)?;
    let _ = fs::remove_file(&p);
    let _ = fs::remove_file(root.path("/tmp/vmdepot-grub.cfg")?);
    Ok(efi)
}

/// The EFI system partition: FAT, the volume id from the UUID,
/// EFI/BOOT/BOOTX64.EFI (the removable-media path, so no boot entry is
/// needed).
fn write_esp(disk: &File, path: &Path, efi: &[u8], uuid: &str) -> Result<()> {
    let mut img = std::io::Cursor::new(vec![0u8; (ESP_SECTORS * 512) as usize]);
    let id = u32::from_str_radix(&uuid[28..36], 16).unwrap_or(0x766d_6470);
    let fat = |e: std::io::Error| Error::Tool {
        tool: "image build".into(),
        detail: format!("the EFI system partition: {e}"),
    };
    fatfs::format_volume(
        &mut img,
        fatfs::FormatVolumeOptions::new()
            .volume_label(*b"EFI        ")
            .volume_id(id),
    )
    .map_err(fat)?;
    img.rewind().map_err(fat)?;
    {
        let fs = fatfs::FileSystem::new(&mut img, fatfs::FsOptions::new()).map_err(fat)?;
        let boot = fs
            .root_dir()
            .create_dir("EFI")
            .and_then(|d| d.create_dir("BOOT"))
            .map_err(fat)?;
        let mut f = boot.create_file("BOOTX64.EFI").map_err(fat)?;
        f.write_all(efi).map_err(fat)?;
        f.flush().map_err(fat)?;
        drop(f);
        drop(boot);
        fs.unmount().map_err(fat)?;
    }
    write_at(disk, img.get_ref(), ESP_START * 512, path)
}

/// Runs the `--run` script in the chroot (`/bin/sh`, the working
/// directory /), then removes it.
fn run_script(work: &mut Work, root: &Root, p: &Path, body: &[u8]) -> Result<()> {
    let inside = "/root/.vmdepot-run";
    let at = root.path(inside)?;
    if let Some(d) = at.parent() {
        fs::create_dir_all(d).at(d)?;
    }
    let _ = fs::remove_file(&at);
    let mut f = create_new(&at, 0o700)?;
    f.write_all(body).at(&at)?;
    drop(f);
    let r = work.run(
        &format!("--run {}", p.display()),
        &mut root.cmd(&["/bin/sh", "-e", inside]),
    );
    let _ = fs::remove_file(&at);
    r
}

/// dpkg --audit is empty, and the guest has what it boots with.
fn check_installed(work: &mut Work, root: &Root) -> Result<()> {
    let out = root
        .cmd(&["dpkg", "--audit"])
        .output()
        .at("chroot dpkg --audit")?;
    if !out.stdout.is_empty() {
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        work.note(&text);
        return Err(Error::Tool {
            tool: "dpkg --audit".into(),
            detail: format!(
                "packages not fully installed: {}",
                crate::error::one_line(&text)
            ),
        });
    }
    for f in [
        "usr/sbin/sshd",
        "usr/bin/cloud-init",
        "lib/systemd/systemd-networkd",
        "usr/bin/sudo",
    ] {
        if !root.file(f)?.exists() {
            return Err(Error::Tool {
                tool: "image build".into(),
                detail: format!("/{f} is missing in the image after the packages"),
            });
        }
    }
    Ok(())
}

/// The newest kernel in the root, with its initrd.
fn kernel_of(root: &Root) -> Result<String> {
    let dir = root.file("/lib/modules")?;
    let mut v: Vec<String> = fs::read_dir(&dir)
        .at(&dir)?
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    v.sort_by(|a, b| version_cmp(a, b));
    let k = v.pop().ok_or_else(|| Error::Tool {
        tool: "image build".into(),
        detail: "no kernel in /lib/modules".into(),
    })?;
    for f in [
        format!("/boot/vmlinuz-{k}"),
        format!("/boot/initrd.img-{k}"),
    ] {
        if !root.file(&f)?.is_file() {
            return Err(Error::Tool {
                tool: "image build".into(),
                detail: format!("kernel {k}: {f} is missing"),
            });
        }
    }
    Ok(k)
}

/// Orders `6.1.0-10-amd64` after `6.1.0-9-amd64`: digit runs by value.
fn version_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    let split = |s: &str| -> Vec<(bool, String)> {
        let mut out: Vec<(bool, String)> = Vec::new();
        for c in s.chars() {
            let d = c.is_ascii_digit();
            match out.last_mut() {
                Some((ld, run)) if *ld == d => run.push(c),
                _ => out.push((d, c.to_string())),
            }
        }
        out
    };
    let (x, y) = (split(a), split(b));
    for (p, q) in x.iter().zip(&y) {
        let o = match (p.0 && q.0, p.1.parse::<u64>(), q.1.parse::<u64>()) {
            (true, Ok(m), Ok(n)) => m.cmp(&n),
            _ => p.1.cmp(&q.1),
        };
        if o != std::cmp::Ordering::Equal {
            return o;
        }
    }
    x.len().cmp(&y.len())
}

/// The root filesystem's UUID as /etc/fstab names it.
fn fstab_uuid(root: &Root) -> Result<String> {
    let p = root.file("/etc/fstab")?;
    let t = fs::read_to_string(&p).at(&p)?;
    t.lines()
        .filter_map(|l| l.split_whitespace().collect::<Vec<_>>().into())
        .find(|w: &Vec<&str>| w.get(1) == Some(&"/"))
        .and_then(|w| w[0].strip_prefix("UUID=").map(str::to_owned))
        .filter(|u| u.len() == 36 && u.chars().all(|c| c.is_ascii_hexdigit() || c == '-'))
        .ok_or_else(|| Error::BadInput {
            file: root.label.clone(),
            reason: "/etc/fstab has no UUID= line for / (not an image that image build made)"
                .into(),
        })
}

/// The `Date:` of the suite's release file that apt fetched (the mirror
/// state the build saw; not its -updates or -security, which change
/// daily), as seconds since the epoch.
fn mirror_date(root: &Root, suite: &str) -> Option<i64> {
    let dir = root.file("/var/lib/apt/lists").ok()?;
    let want = format!("_dists_{suite}_InRelease");
    let mut best = None;
    for e in fs::read_dir(dir).ok()?.flatten() {
        if !e.file_name().to_string_lossy().ends_with(&want) {
            continue;
        }
        let mut head = String::new();
        let read = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(e.path())
            .and_then(|f| f.take(64 << 10).read_to_string(&mut head));
        if read.is_err() {
            continue; // (another entry may do)
        }
        if let Some(d) = head
            .lines()
            .find_map(|l| l.strip_prefix("Date: "))
            .and_then(parse_rfc2822)
        {
            best = best.max(Some(d));
        }
    }
    best
}

/// `Sat, 08 Nov 2025 09:14:50 UTC` → seconds since the epoch.
fn parse_rfc2822(s: &str) -> Option<i64> {
    let w: Vec<&str> = s.split_whitespace().collect();
    let (day, mon, year, hms) = (w.get(1)?, w.get(2)?, w.get(3)?, w.get(4)?);
    let months = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let m = months.iter().position(|x| x == mon)? as i64 + 1;
    let (d, y): (i64, i64) = (day.parse().ok()?, year.parse().ok()?);
    let t: Vec<i64> = hms
        .split(':')
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    if t.len() != 3 {
        return None;
    }
    // days from civil (Howard Hinnant's algorithm)
    let (y2, m2) = if m <= 2 { (y - 1, m + 9) } else { (y, m - 3) };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let doy = (153 * m2 + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146097 + doe - 719468;
    Some(days * 86400 + t[0] * 3600 + t[1] * 60 + t[2])
}

/// BLAKE3 of the installed packages, architectures and versions
/// (`dpkg-query -W`, packages whose status is `installed` only, sorted):
/// equal for two builds that installed the same.
fn package_set(root: &Root) -> Result<String> {
    let out = root
        .cmd(&[
            "dpkg-query",
            "-W",
            "-f",
            "${db:Status-Status} ${Package} ${Architecture} ${Version}\\n",
        ])
        .output()
        .at("chroot dpkg-query")?;
    if !out.status.success() {
        return Err(Error::Tool {
            tool: "dpkg-query".into(),
            detail: format!(
                "{}: {}",
                out.status,
                crate::error::one_line(&String::from_utf8_lossy(&out.stderr))
            ),
        });
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("installed "))
        .collect();
    lines.sort_unstable();
    Ok(format!(
        "blake3:{}",
        &blake3::hash(lines.join("\n").as_bytes()).to_hex()[..32]
    ))
}

/// Per-instance identity, caches and logs out; file times clamped to the
/// mirror's date; the chroot's processes killed, everything unmounted,
/// the free blocks trimmed (sparse in the file).
fn finish(work: &mut Work, root: &Root) -> Result<()> {
    let r = &root.dir;
    // Nothing runs in the root and nothing is mounted in it (but the root)
    // while it is cleaned from the host.
    work.unmount_to(r, 1)?;
    let _ = fs::remove_file(root.path("/usr/sbin/policy-rc.d")?);
    root.write("/etc/machine-id", "")?;
    let _ = fs::remove_file(root.path("/var/lib/dbus/machine-id")?);
    // (ldconfig's cache of inode numbers and times: differs every build,
    // remade when needed)
    let _ = fs::remove_file(root.path("/var/cache/ldconfig/aux-cache")?);
    for dir in [
        "/var/lib/cloud",
        "/var/lib/apt/lists",
        "/tmp",
        "/var/tmp",
        "/usr/share/man",
        "/usr/share/info",
    ] {
        clear_dir(&root.file(dir)?);
    }
    for e in fs::read_dir(root.file("/etc/ssh")?)
        .into_iter()
        .flatten()
        .flatten()
    {
        if e.file_name().to_string_lossy().starts_with("ssh_host_") {
            let _ = fs::remove_file(e.path());
        }
    }
    for d in ["/var/cache/apt", "/var/cache/debconf", "/var/lib/dpkg"] {
        for e in fs::read_dir(root.file(d)?).into_iter().flatten().flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.ends_with(".bin") || n.ends_with("-old") {
                let _ = fs::remove_file(e.path());
            }
        }
    }
    truncate_logs(&root.file("/var/log")?);
    if root.source_date > 0 {
        clamp_times(r, root.source_date);
    }
    // Then trim, then the root.
    work.run("sync", &mut Command::new("sync"))?;
    let mut trim = Command::new("fstrim");
    trim.arg(r);
    work.run("fstrim", &mut trim)?;
    work.unmount_to(r, 0)?;
    reset_journal(work, &root.disk)
}

/// Replaces the root filesystem's journal by a zeroed one: what the
/// build's transactions left there would be stored (and, on a build
/// `--from`, differ from its base) for nothing; zeros are not stored.
fn reset_journal(work: &mut Work, disk: &Path) -> Result<()> {
    let name = disk.file_name().unwrap_or_default().to_string_lossy();
    // (e2fsprogs' `FILE?offset=N`; the name relative to the work
    // directory: the depot's path might hold a `?`)
    let spec = format!("{name}?offset={}", ROOT_START * 512);
    for feature in ["^has_journal", "has_journal"] {
        let mut c = Command::new("tune2fs");
        c.current_dir(disk.parent().unwrap_or(Path::new("/")))
            .args(["-O", feature])
            .arg(&spec);
        work.run(&format!("tune2fs -O {feature}"), &mut c)?;
    }
    Ok(())
}

/// Removes what `dir` holds (nothing is mounted under it by then; links
/// are removed, never followed).
fn clear_dir(dir: &Path) {
    for e in fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        match e.file_type() {
            Ok(t) if t.is_dir() => {
                let _ = fs::remove_dir_all(&p);
            }
            _ => {
                let _ = fs::remove_file(&p);
            }
        }
    }
}

/// Empties every regular file under /var/log (the directories stay: the
/// services expect them).
fn truncate_logs(dir: &Path) {
    for e in fs::read_dir(dir).into_iter().flatten().flatten() {
        match e.file_type() {
            Ok(t) if t.is_dir() => truncate_logs(&e.path()),
            Ok(t) if t.is_file() => {
                let _ = OpenOptions::new()
                    .write(true)
                    .truncate(true)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(e.path());
            }
            _ => {}
        }
    }
}

/// Sets every file's modification and access time that is newer than
/// `epoch` to `epoch` (symbolic links themselves, not their targets), on
/// the root filesystem only.
fn clamp_times(root: &Path, epoch: i64) {
    use nix::sys::stat::{utimensat, UtimensatFlags};
    use nix::sys::time::TimeSpec;
    use std::os::unix::fs::MetadataExt;
    let dev = match fs::symlink_metadata(root) {
        Ok(m) => m.dev(),
        Err(_) => return,
    };
    let t = TimeSpec::new(epoch, 0);
    let mut stack = vec![root.to_owned()];
    while let Some(p) = stack.pop() {
        let Ok(m) = fs::symlink_metadata(&p) else {
            continue;
        };
        if m.dev() != dev {
            continue;
        }
        if m.is_dir() {
            stack.extend(
                fs::read_dir(&p)
                    .into_iter()
                    .flatten()
                    .flatten()
                    .map(|e| e.path()),
            );
        }
        if m.mtime() > epoch || m.atime() > epoch {
            let _ = utimensat(
                nix::fcntl::AT_FDCWD,
                &p,
                &t,
                &t,
                UtimensatFlags::NoFollowSymlink,
            );
        }
    }
}

/// Writes all of `buf` at byte `offset` of the file at `path`.
fn write_at(f: &File, buf: &[u8], offset: u64, path: &Path) -> Result<()> {
    use std::os::unix::fs::FileExt;
    f.write_all_at(buf, offset).at(path)
}

/// Appends to the file at `p` (a link there is refused, not followed).
fn append(p: &Path, text: &str) -> Result<()> {
    let mut f = OpenOptions::new()
        .append(true)
        .create(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(p)
        .at(p)?;
    f.write_all(text.as_bytes()).at(p)
}

/// A new file at `p` (nothing may be there, not even a link).
fn create_new(p: &Path, mode: u32) -> Result<File> {
    OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(mode)
        .open(p)
        .at(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_versions_by_number() {
        let mut v = vec!["6.1.0-9-amd64", "6.1.0-10-amd64", "5.10.0-28-amd64"];
        v.sort_by(|a, b| version_cmp(a, b));
        assert_eq!(v, ["5.10.0-28-amd64", "6.1.0-9-amd64", "6.1.0-10-amd64"]);
    }

    #[test]
    fn release_dates() {
        assert_eq!(
            parse_rfc2822("Sat, 01 Jan 2000 00:00:00 UTC"),
            Some(946_684_800)
        );
        assert_eq!(
            parse_rfc2822("Sat, 08 Nov 2025 09:14:50 UTC"),
            Some(1_762_593_290)
        );
        assert_eq!(parse_rfc2822("garbage"), None);
    }

    #[test]
    fn an_mbr_written_is_read_back() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("d.raw");
        let f = File::create(&p).unwrap();
        f.set_len(2 << 30).unwrap();
        write_mbr(
            &f,
            &p,
            (2u64 << 30) / 512,
            "0123abcd-0000-4000-8000-000000000000",
        )
        .unwrap();
        assert_eq!(
            root_partition(&p).unwrap(),
            (ROOT_START, (2u64 << 30) / 512 - ROOT_START)
        );
        let mut b = [0u8; 512];
        File::open(&p).unwrap().read_exact(&mut b).unwrap();
        assert_eq!(b[446 + 4], TYPE_ESP);
        assert_eq!(&b[440..444], &0x0123abcdu32.to_le_bytes());
        std::fs::write(&p, [0u8; 512]).unwrap();
        assert!(root_partition(&p)
            .unwrap_err()
            .to_string()
            .contains("no MBR"));
    }
}
