//! Input disk images: format detection, refusal of hostile images, and the
//! raw view that import reads.
//!
//! Main items: [`open_input`] (the input opened once: a regular file or a
//! block device), [`inspect`] (detect the format from the content, never
//! from the name, and check the headers by qemu's rules, which
//! `source/headers.rs` holds per format), [`Reader`] (the raw view: the
//! file itself, or the disk `qemu-nbd` decodes from it, read block by
//! block) and [`data_extents`] (SEEK_DATA / SEEK_HOLE, so holes are never
//! read).
//!
//! **Invariant**: no file is handed to qemu before [`inspect`] has refused
//! every header that refers to another file (qcow2 backing or external data
//! files, vmdk descriptors, extents and parents, differencing VHD, VHDX and
//! VDI): the attack behind OSSA-2024-001 / CVE-2024-32498; and qemu reads
//! nothing but the file vmdepot opened ([`Opened::qemu_spec`]).

use std::fs::File;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use tracing::instrument;

use crate::catalog::FileIdent;
use crate::error::{Error, IoContext, Result};

mod headers;

/// Disk image formats vmdepot imports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceFormat {
    /// A raw disk: the file is the disk, byte for byte.
    Raw,
    /// QEMU's copy-on-write format (versions 2 and 3).
    Qcow2,
    /// VMware's virtual disk (monolithic sparse, stream-optimized or flat).
    Vmdk,
    /// Hyper-V's virtual hard disk v2.
    Vhdx,
    /// VHD (Virtual PC), qemu's `vpc`.
    Vhd,
    /// VirtualBox disk image (dynamic or fixed; differencing ones refused).
    Vdi,
}

impl SourceFormat {
    /// `raw`, `qcow2`, `vmdk`, `vhdx`, `vhd` or `vdi` (`--format`, and an
    /// image's `source_format`).
    pub fn name(self) -> &'static str {
        match self {
            SourceFormat::Raw => "raw",
            SourceFormat::Qcow2 => "qcow2",
            SourceFormat::Vmdk => "vmdk",
            SourceFormat::Vhdx => "vhdx",
            SourceFormat::Vhd => "vhd",
            SourceFormat::Vdi => "vdi",
        }
    }

    fn qemu_name(self) -> &'static str {
        match self {
            SourceFormat::Vhd => "vpc",
            f => f.name(),
        }
    }

    /// Parses a user's `--format` value (`auto` is `None`).
    pub fn parse(s: &str) -> Result<Option<SourceFormat>> {
        Ok(Some(match s {
            "auto" => return Ok(None),
            "raw" => SourceFormat::Raw,
            "qcow2" => SourceFormat::Qcow2,
            "vmdk" => SourceFormat::Vmdk,
            "vhdx" => SourceFormat::Vhdx,
            "vhd" | "vpc" => SourceFormat::Vhd,
            "vdi" => SourceFormat::Vdi,
            other => {
                return Err(Error::Invalid(format!(
                    "unknown format {other:?}: use auto, raw, qcow2, vmdk, vhdx, vhd or vdi"
                )))
            }
        }))
    }
}

/// What [`inspect`] found out about an input file.
#[derive(Clone, Debug)]
pub struct Inspected {
    pub path: PathBuf,
    pub format: SourceFormat,
    /// Size of the disk the image describes, in bytes.
    pub virtual_size: u64,
    /// Size of the file itself.
    pub file_size: u64,
}

/// Largest virtual size accepted (4 TiB). Every byte of a disk is hashed
/// once for its content id, zeros too (BLAKE3 values depend on the offset):
/// about 60 s per TiB of zeros on two cores, shown as progress, and only
/// once per depot and size (the values of zero regions are kept). A bigger
/// claim is refused before anything is hashed.
pub const MAX_VIRTUAL_SIZE: u64 = 4 << 40;

/// Smallest virtual size accepted (64 KiB: a partition table and a boot
/// loader's first stage need more than a few sectors). With sizes that are
/// not a multiple of [`SECTOR`] this keeps files that cannot be disks (a
/// text file taken for raw) out of the depot.
pub const MIN_VIRTUAL_SIZE: u64 = 64 << 10;

/// A disk's size is a whole number of sectors of this many bytes.
pub const SECTOR: u64 = 512;

/// The identity of the file `m` describes (see [`FileIdent`]).
fn file_ident(m: &std::fs::Metadata) -> FileIdent {
    use std::os::unix::fs::MetadataExt;
    FileIdent {
        dev: m.dev(),
        ino: m.ino(),
        size: m.size(),
        mtime_ns: m.mtime() * 1_000_000_000 + m.mtime_nsec(),
        ctime_ns: m.ctime() * 1_000_000_000 + m.ctime_nsec(),
    }
}

/// An input opened once, by vmdepot: every check and every qemu tool reads
/// this same open file (qemu through `/proc/PID/fd/N` with its drivers
/// fixed), so no name, prefix or rename can change what is read.
#[derive(Debug)]
pub struct Opened {
    /// The name the user gave (for messages only; never reopened).
    pub path: PathBuf,
    pub file: File,
    /// Size of the file or block device.
    pub size: u64,
    /// `None` for a block device (its times do not move when it is written).
    pub ident: Option<FileIdent>,
}

/// Opens an input: a regular file or a block device. FIFOs, sockets,
/// character devices and directories are refused at once, without
/// blocking on them.
#[instrument(skip_all, err(level = "debug"))]
pub fn open_input(path: &Path) -> Result<Opened> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            // what open(2) says for a Unix socket
            Some(libc::ENXIO) => Error::refused(
                path,
                "a socket: an image is imported from a regular file or a block device",
            ),
            _ => Error::io(path, e),
        })?;
    let meta = file.metadata().at(path)?;
    let ft = meta.file_type();
    let (size, ident) = if ft.is_file() {
        (meta.len(), Some(file_ident(&meta)))
    } else if ft.is_block_device() {
        (block_device_size(&file).at(path)?, None)
    } else {
        let what = if ft.is_dir() {
            "a directory"
        } else if ft.is_fifo() {
            "a FIFO"
        } else if ft.is_socket() {
            "a socket"
        } else if ft.is_char_device() {
            "a character device"
        } else {
            "not a regular file"
        };
        return Err(Error::refused(
            path,
            format!("{what}: an image is imported from a regular file or a block device"),
        ));
    };
    // Reads block normally from here on.
    nix::fcntl::fcntl(
        &file,
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::empty()),
    )
    .map_err(|e| Error::io(path, e.into()))?;
    Ok(Opened {
        path: path.to_owned(),
        file,
        size,
        ident,
    })
}

impl Opened {
    /// The path by which a child process (qemu-img, qemu-nbd) opens this
    /// very file: our own descriptor, through /proc.
    fn proc_path(&self) -> String {
        use std::os::fd::AsRawFd;
        format!("/proc/{}/fd/{}", std::process::id(), self.file.as_raw_fd())
    }

    /// A `json:` description of this file as `format` for qemu tools:
    /// every driver is fixed (no protocol prefix, no format probing), and
    /// backing files are disabled for the formats that have them.
    pub fn qemu_spec(&self, format: SourceFormat) -> String {
        let mut v = serde_json::json!({
            "driver": format.qemu_name(),
            "file": { "driver": "file", "filename": self.proc_path() },
        });
        if matches!(format, SourceFormat::Qcow2 | SourceFormat::Vmdk) {
            v["backing"] = serde_json::Value::Null;
        }
        format!("json:{v}")
    }

    /// Refuses the input if it changed since it was opened.
    pub fn check_unchanged(&self) -> Result<()> {
        let Some(before) = &self.ident else {
            return Ok(());
        };
        let now = file_ident(&self.file.metadata().at(&self.path)?);
        if &now != before {
            return Err(Error::refused(
                &self.path,
                "the file changed while it was imported: nothing was stored; import it again once it is complete",
            ));
        }
        Ok(())
    }
}

fn bad(path: &Path, reason: impl Into<String>) -> Error {
    Error::BadInput {
        file: path.to_owned(),
        reason: reason.into(),
    }
}

/// Detects the format of an opened input from its content and checks its
/// headers by the rules qemu applies when it opens them. `expected` is the
/// user's `--format`, which must agree with the content.
#[instrument(skip_all, err(level = "debug"))]
pub fn inspect(input: &Opened, expected: Option<SourceFormat>) -> Result<Inspected> {
    inspect_with(input, expected, true)
}

/// What `inspect` does before it calls qemu-img: detection and header
/// checks only (for fuzzing; never a reason to skip qemu's checks).
pub fn inspect_headers(input: &Opened, expected: Option<SourceFormat>) -> Result<Inspected> {
    inspect_with(input, expected, false)
}

fn inspect_with(input: &Opened, expected: Option<SourceFormat>, qemu: bool) -> Result<Inspected> {
    let path = input.path.as_path();
    let file = &input.file;
    let file_size = input.size;
    let mut head = vec![0u8; 4096];
    let n = read_full_at(file, &mut head, 0).at(path)?;
    head.truncate(n);
    let mut tail = [0u8; 512];
    let has_tail = file_size >= 512 && file.read_exact_at(&mut tail, file_size - 512).is_ok();

    let format = headers::detect(path, &head, has_tail.then_some(&tail[..]))?;
    if let Some(want) = expected {
        if want != format {
            return Err(Error::refused(
                path,
                format!(
                    "--format {} was given but the content is {}: importing it as {} would store the container, not the disk (use --format auto)",
                    want.name(),
                    format.name(),
                    want.name()
                ),
            ));
        }
    }
    let virtual_size = headers::check(format, path, file, &head, &tail, file_size)?;
    if virtual_size > MAX_VIRTUAL_SIZE {
        return Err(too_big(path, virtual_size));
    }
    let mut ins = Inspected {
        path: path.to_owned(),
        format,
        virtual_size,
        file_size,
    };
    if qemu && format != SourceFormat::Raw {
        let qsize = qemu_img_info_check(input, &ins)?;
        match format {
            // qemu rounds a VHD's size to its CHS geometry; a VHDX's size
            // lives in its metadata region, which qemu reads.
            SourceFormat::Vhd | SourceFormat::Vhdx => ins.virtual_size = qsize,
            _ if qsize != virtual_size => {
                return Err(bad(
                    path,
                    format!("header says {virtual_size} bytes but qemu-img reads {qsize}: refused"),
                ))
            }
            _ => {}
        }
        if ins.virtual_size > MAX_VIRTUAL_SIZE {
            return Err(too_big(path, ins.virtual_size));
        }
    }
    check_disk_size(path, ins.virtual_size)?;
    Ok(ins)
}

/// Refuses a virtual size that no disk has: not a whole number of
/// [`SECTOR`]s, or below [`MIN_VIRTUAL_SIZE`].
fn check_disk_size(path: &Path, size: u64) -> Result<()> {
    if size % SECTOR != 0 {
        return Err(Error::refused(
            path,
            format!(
                "its size, {size} bytes, is not a multiple of {SECTOR} (a disk is a whole number \
                 of sectors): not a disk image"
            ),
        ));
    }
    if size < MIN_VIRTUAL_SIZE {
        return Err(Error::refused(
            path,
            format!(
                "its size, {size} bytes, is below the smallest disk vmdepot imports \
                 ({MIN_VIRTUAL_SIZE} bytes, 64 KiB): not a disk image"
            ),
        ));
    }
    Ok(())
}

/// The refusal of a disk (`path`: a file, or a remote image's label) of
/// `size` bytes, over [`MAX_VIRTUAL_SIZE`].
pub(crate) fn too_big(path: &Path, size: u64) -> Error {
    Error::refused(
        path,
        format!(
            "virtual size {size} bytes is over the limit of {} bytes (4 TiB)",
            MAX_VIRTUAL_SIZE
        ),
    )
}

/// Reads `buf.len()` bytes at `off` (fewer only at the end of the file),
/// retrying interrupted reads.
pub(crate) fn read_full_at(f: &File, buf: &mut [u8], off: u64) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read_at(&mut buf[n..], off + n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Runs `qemu-img info` and `qemu-img check` on the opened input (its
/// drivers fixed, backing files disabled), refusing anything that still
/// names another file. Returns qemu's virtual size.
fn qemu_img_info_check(input: &Opened, ins: &Inspected) -> Result<u64> {
    let spec = input.qemu_spec(ins.format);
    let out = qemu_img(&["info", "--output=json", &spec])
        .map_err(|e| unreadable(&ins.path, ins.format, &spec, e))?;
    let v: serde_json::Value = serde_json::from_slice(&out).map_err(|e| Error::Tool {
        tool: "qemu-img info".into(),
        detail: e.to_string(),
    })?;
    if let Some(b) = v.get("backing-filename").and_then(|b| b.as_str()) {
        return Err(Error::refused(
            &ins.path,
            format!("image has a backing file ({b:?}): an image must be self-contained"),
        ));
    }
    if let Some(d) = v
        .pointer("/format-specific/data/data-file")
        .and_then(|d| d.as_str())
    {
        return Err(Error::refused(
            &ins.path,
            format!("image uses an external data file ({d:?}): an image must be self-contained"),
        ));
    }
    if let Some(children) = v.get("children").and_then(|c| c.as_array()) {
        // A self-contained image has one child: the file itself.
        if children.len() > 1 {
            return Err(Error::refused(
                &ins.path,
                "image refers to other files (extents): an image must be self-contained",
            ));
        }
    }
    let size = v
        .get("virtual-size")
        .and_then(|s| s.as_u64())
        .ok_or_else(|| Error::Tool {
            tool: "qemu-img info".into(),
            detail: "no virtual-size in its output".into(),
        })?;
    if matches!(
        ins.format,
        SourceFormat::Qcow2 | SourceFormat::Vhdx | SourceFormat::Vmdk | SourceFormat::Vdi
    ) {
        let st = run_bounded(&["check", "-q", &spec])?;
        // 0 clean, 3 leaked clusters only, 63 check unsupported for this format.
        if !matches!(st.status.code(), Some(0 | 3 | 63)) {
            let first = tidy(&st.first_err_line(), &spec, &ins.path);
            return Err(bad(
                &ins.path,
                format!("`qemu-img check` found it damaged: {first}"),
            ));
        }
    }
    Ok(size)
}

fn unreadable(path: &Path, format: SourceFormat, spec: &str, e: Error) -> Error {
    match e {
        Error::Tool { tool, detail } => bad(
            path,
            format!(
                "{tool} could not read it as {}: {}",
                format.name(),
                tidy(&detail, spec, path)
            ),
        ),
        e => e,
    }
}

/// A qemu message with our internal `json:` spec replaced by the input's
/// name.
fn tidy(detail: &str, spec: &str, path: &Path) -> String {
    detail
        .replace(&format!("'{spec}'"), &format!("'{}'", path.display()))
        .replace(spec, &path.display().to_string())
}

fn qemu_img_missing(e: std::io::Error) -> Error {
    Error::Tool {
        tool: "qemu-img".into(),
        detail: format!("{e}: install the Debian package qemu-utils"),
    }
}

/// Runs qemu-img and returns its stdout, or an error with its stderr.
#[instrument(skip_all, err(level = "debug"))]
pub fn qemu_img(args: &[&str]) -> Result<Vec<u8>> {
    let out = run_bounded(args)?;
    if !out.status.success() {
        return Err(Error::Tool {
            tool: format!("qemu-img {}", args.first().unwrap_or(&"")),
            detail: out.last_err_line(),
        });
    }
    Ok(out.stdout)
}

/// How much of a qemu tool's stdout and stderr is kept (the rest is read
/// and dropped): a hostile image can make `qemu-img check` print a line
/// per block.
const TOOL_OUTPUT_CAP: usize = 1 << 20;
/// A qemu-img run on an input that takes longer than this is killed.
const TOOL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);

struct ToolOutput {
    status: std::process::ExitStatus,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
}

impl ToolOutput {
    fn last_err_line(&self) -> String {
        String::from_utf8_lossy(&self.stderr)
            .trim()
            .lines()
            .last()
            .unwrap_or("failed")
            .to_owned()
    }
    fn first_err_line(&self) -> String {
        String::from_utf8_lossy(&self.stderr)
            .lines()
            .next()
            .unwrap_or("failed")
            .to_owned()
    }
}

/// Runs qemu-img with its output capped at [`TOOL_OUTPUT_CAP`] each and
/// its time at [`TOOL_TIMEOUT`].
fn run_bounded(args: &[&str]) -> Result<ToolOutput> {
    let mut child = Command::new("qemu-img")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(qemu_img_missing)?;
    fn drain(mut r: impl std::io::Read) -> Vec<u8> {
        let mut kept = Vec::new();
        let mut buf = [0u8; 64 << 10];
        while let Ok(n) = r.read(&mut buf) {
            if n == 0 {
                break;
            }
            let room = TOOL_OUTPUT_CAP.saturating_sub(kept.len()).min(n);
            kept.extend_from_slice(&buf[..room]);
        }
        kept
    }
    let out = child.stdout.take().expect("piped");
    let err = child.stderr.take().expect("piped");
    let out = std::thread::spawn(move || drain(out));
    let err = std::thread::spawn(move || drain(err));
    let deadline = std::time::Instant::now() + TOOL_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) if std::time::Instant::now() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(Error::Tool {
                    tool: format!("qemu-img {}", args.first().unwrap_or(&"")),
                    detail: format!("still running after {} s: killed", TOOL_TIMEOUT.as_secs()),
                });
            }
            Ok(None) => std::thread::sleep(std::time::Duration::from_millis(5)),
            Err(e) => return Err(qemu_img_missing(e)),
        }
    };
    Ok(ToolOutput {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    })
}

/// The raw view of an input that import reads: the opened file itself, or
/// for a foreign format the disk qemu decodes from it, served by `qemu-nbd`
/// and read block by block (no temporary copy, whatever its size).
pub enum Reader {
    File(File),
    Nbd {
        served: crate::image::nbd::Served,
        /// Ranges that may hold data (from `qemu-img map`); the rest reads
        /// as zeros and is never read.
        extents: Vec<(u64, u64)>,
    },
    /// An image of the depot read in place (a lazy instance's base).
    Image(std::sync::Arc<crate::image::lazy::LazyImage>),
}

/// Gaps of zeros shorter than this between data ranges are read rather
/// than skipped: the range list stays at most one entry per MiB.
const EXTENT_GAP: u64 = 1 << 20;

impl Reader {
    /// The raw view of an inspected input; `tmp` is a private directory for
    /// the server's socket.
    #[instrument(skip_all, err(level = "debug"))]
    pub fn open(input: &Opened, ins: &Inspected, tmp: &Path) -> Result<Reader> {
        if ins.format == SourceFormat::Raw {
            return Ok(Reader::File(input.file.try_clone().at(&input.path)?));
        }
        let spec = input.qemu_spec(ins.format);
        let extents = qemu_data_extents(&spec, ins)?;
        let served = crate::image::nbd::Served::serve(&spec, tmp, &ins.path)?;
        if served.client.size() != ins.virtual_size {
            return Err(bad(
                &ins.path,
                format!(
                    "qemu-nbd serves {} bytes, qemu-img info said {}: refused",
                    served.client.size(),
                    ins.virtual_size
                ),
            ));
        }
        Ok(Reader::Nbd { served, extents })
    }

    /// Reads `buf.len()` bytes at `off` (fewer only at the end).
    pub fn read_at(&self, buf: &mut [u8], off: u64) -> std::io::Result<usize> {
        match self {
            Reader::File(f) => read_full_at(f, buf, off),
            Reader::Nbd { served, .. } => served.client.read_at(buf, off),
            Reader::Image(img) => {
                let n = (buf.len() as u64).min(img.size.saturating_sub(off)) as usize;
                img.read(&mut buf[..n], off).map_err(|f| {
                    std::io::Error::other(format!(
                        "image {} at byte offset {}: {}",
                        img.label, f.offset, f.detail
                    ))
                })?;
                Ok(n)
            }
        }
    }

    /// The ranges of `[0, size)` that may hold data, in order.
    pub fn data_extents(&self, size: u64) -> std::io::Result<Vec<(u64, u64)>> {
        match self {
            Reader::File(f) => data_extents(f, size),
            Reader::Nbd { extents, .. } => Ok(extents.clone()),
            Reader::Image(img) => img
                .data_ranges(size)
                .map_err(|e| std::io::Error::other(e.to_string())),
        }
    }
}

/// `qemu-img map` of the image, read line by line: the ranges holding
/// data, with gaps under [`EXTENT_GAP`] merged.
fn qemu_data_extents(spec: &str, ins: &Inspected) -> Result<Vec<(u64, u64)>> {
    use std::io::BufRead;
    let mut child = Command::new("qemu-img")
        .args(["map", "--output=json", spec])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(qemu_img_missing)?;
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut parse_err = None;
    for line in std::io::BufReader::new(child.stdout.take().expect("piped")).lines() {
        let line = line.at(&ins.path)?;
        let line = line
            .trim()
            .trim_start_matches('[')
            .trim_end_matches([',', ']']);
        if line.is_empty() {
            continue;
        }
        let m: serde_json::Value = match serde_json::from_str(line) {
            Ok(m) => m,
            Err(e) => {
                parse_err.get_or_insert(e.to_string());
                continue;
            }
        };
        let num = |k: &str| m.get(k).and_then(serde_json::Value::as_u64);
        let flag = |k: &str| m.get(k).and_then(serde_json::Value::as_bool);
        let (Some(start), Some(len)) = (num("start"), num("length")) else {
            continue;
        };
        // Reads as zeros (with backing files disabled, unallocated is zero).
        if flag("zero") == Some(true) {
            continue;
        }
        let end = start.saturating_add(len).min(ins.virtual_size);
        match out.last_mut() {
            Some((_, e)) if start <= e.saturating_add(EXTENT_GAP) => *e = (*e).max(end),
            _ => out.push((start, end)),
        }
    }
    let st = child.wait().at(&ins.path)?;
    if !st.success() || parse_err.is_some() {
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut err);
        }
        let detail = err
            .trim()
            .lines()
            .last()
            .map(str::to_owned)
            .or(parse_err)
            .unwrap_or_else(|| "failed".into());
        return Err(bad(
            &ins.path,
            format!(
                "qemu-img map could not read it as {}: {detail}",
                ins.format.name()
            ),
        ));
    }
    Ok(out)
}

/// The byte ranges of `file` (of `size` bytes) that hold data, in order;
/// holes are skipped without being read. Falls back to one range covering
/// everything where SEEK_DATA is not supported (block devices, old kernels).
pub fn data_extents(file: &File, size: u64) -> std::io::Result<Vec<(u64, u64)>> {
    use nix::unistd::{lseek, Whence};
    let mut out = Vec::new();
    let mut pos: u64 = 0;
    while pos < size {
        let start = match lseek(file, pos as i64, Whence::SeekData) {
            Ok(s) => s as u64,
            Err(nix::errno::Errno::ENXIO) => break, // no data after pos
            Err(nix::errno::Errno::EINVAL) if pos == 0 => return Ok(vec![(0, size)]),
            Err(e) => return Err(e.into()),
        };
        if start >= size {
            break;
        }
        let end = (lseek(file, start as i64, Whence::SeekHole)? as u64).min(size);
        out.push((start, end));
        pos = end;
    }
    Ok(out)
}

fn block_device_size(file: &File) -> std::io::Result<u64> {
    use std::io::{Seek, SeekFrom};
    let mut f = file;
    let end = f.seek(SeekFrom::End(0))?;
    f.seek(SeekFrom::Start(0))?;
    Ok(end)
}

/// Inputs found by fuzz/ (`fuzz/run.sh`), reduced.
#[cfg(test)]
mod fuzz_found {
    use super::*;

    fn headers(bytes: &[u8]) -> Result<Inspected> {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), bytes).unwrap();
        inspect_headers(&open_input(f.path())?, None)
    }

    /// source_qcow2: a backing file offset near u64::MAX overflowed the
    /// bounds check of its name (a panic: with overflow checks at the add,
    /// without them at the slice).
    #[test]
    fn qcow2_backing_offset_at_the_end_of_u64() {
        let mut h = vec![0u8; 104];
        h[..4].copy_from_slice(b"QFI\xfb");
        h[4..8].copy_from_slice(&3u32.to_be_bytes());
        h[8..16].copy_from_slice(&u64::MAX.to_be_bytes());
        h[16..20].copy_from_slice(&16u32.to_be_bytes());
        let e = headers(&h).unwrap_err().to_string();
        assert!(
            e.contains("backing file") && e.contains("<unreadable>"),
            "{e}"
        );
    }

    /// Found by review while writing source_vmdk: an embedded descriptor
    /// offset near u64::MAX overflowed its bounds check (a panic with
    /// overflow checks; without them the check wrapped and passed).
    #[test]
    fn vmdk_descriptor_offset_at_the_end_of_u64() {
        let mut h = vec![0u8; 4096];
        h[..4].copy_from_slice(b"KDMV");
        h[28..36].copy_from_slice(&u64::MAX.to_le_bytes());
        h[36..44].copy_from_slice(&1u64.to_le_bytes());
        // (The descriptor offset is no longer read: qemu reads the
        // descriptor at byte 512; this header has capacity 0.)
        let e = headers(&h).unwrap_err().to_string();
        assert!(e.contains("capacity of 0"), "{e}");
    }
}
