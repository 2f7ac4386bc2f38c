//! Input disk images: format detection, refusal of hostile images, and the
//! raw view that import reads.
//!
//! Main items: [`inspect`] (detect the format from the content, never from
//! the name, and check the headers), [`RawSource`] (a raw file to read,
//! either the input itself or a `qemu-img convert` of it) and
//! [`data_extents`] (SEEK_DATA / SEEK_HOLE, so holes are never read).
//!
//! **Invariant**: no file is handed to qemu-img before [`inspect`] has
//! refused every header that refers to another file (qcow2 backing or
//! external data files, vmdk descriptors with extents, differencing VHDs):
//! the attack behind OSSA-2024-001 / CVE-2024-32498.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::{Error, IoContext, Result};

/// Disk image formats vmdepot imports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceFormat {
    Raw,
    Qcow2,
    Vmdk,
    Vhdx,
    /// VHD (Virtual PC), qemu's `vpc`.
    Vhd,
}

impl SourceFormat {
    pub fn name(self) -> &'static str {
        match self {
            SourceFormat::Raw => "raw",
            SourceFormat::Qcow2 => "qcow2",
            SourceFormat::Vmdk => "vmdk",
            SourceFormat::Vhdx => "vhdx",
            SourceFormat::Vhd => "vhd",
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
            other => {
                return Err(Error::Invalid(format!(
                    "unknown format {other:?}: use auto, raw, qcow2, vmdk, vhdx or vhd"
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

/// Largest virtual size accepted (64 TiB): anything bigger is a lie.
const MAX_VIRTUAL_SIZE: u64 = 64 << 40;

fn refused(path: &Path, reason: impl Into<String>) -> Error {
    Error::Refused {
        file: path.to_owned(),
        reason: reason.into(),
    }
}

fn bad(path: &Path, reason: impl Into<String>) -> Error {
    Error::BadInput {
        file: path.to_owned(),
        reason: reason.into(),
    }
}

/// Detects the format of `path` from its content and checks its headers.
/// `expected` is the user's `--format`, which must agree with the content.
pub fn inspect(path: &Path, expected: Option<SourceFormat>) -> Result<Inspected> {
    inspect_with(path, expected, true)
}

/// [`inspect`] without qemu-img: detection from the content and vmdepot's
/// own header checks only, reading nothing but `path` (the fuzz targets in
/// fuzz/ call it). For Vhdx the virtual size is 0 (qemu-img gives it).
pub fn inspect_headers(path: &Path, expected: Option<SourceFormat>) -> Result<Inspected> {
    inspect_with(path, expected, false)
}

fn inspect_with(path: &Path, expected: Option<SourceFormat>, qemu: bool) -> Result<Inspected> {
    let mut file = File::open(path).at(path)?;
    let meta = file.metadata().at(path)?;
    let file_size = if meta.file_type().is_block_device() {
        block_device_size(&file).at(path)?
    } else if meta.is_file() {
        meta.len()
    } else {
        return Err(bad(path, "not a regular file or block device"));
    };
    let mut head = vec![0u8; 4096];
    let n = read_full(&mut file, &mut head).at(path)?;
    head.truncate(n);
    let mut tail = [0u8; 512];
    let has_tail = file_size >= 512 && file.read_exact_at(&mut tail, file_size - 512).is_ok();

    let format = if head.starts_with(b"QFI\xfb") {
        SourceFormat::Qcow2
    } else if head.starts_with(b"KDMV") || head.starts_with(b"# Disk DescriptorFile") {
        SourceFormat::Vmdk
    } else if head.starts_with(b"vhdxfile") {
        SourceFormat::Vhdx
    } else if head.starts_with(b"conectix") || (has_tail && tail.starts_with(b"conectix")) {
        SourceFormat::Vhd
    } else if head.starts_with(b"COWD") {
        return Err(refused(path, "VMware ESX sparse (COWD) images are not supported: convert it to raw or qcow2 with qemu-img first"));
    } else if head.starts_with(b"QED\0") {
        return Err(refused(path, "QED images are not supported (they may refer to a backing file): convert it with qemu-img first"));
    } else if head.len() >= 68 && head[64..68] == [0x7f, 0x10, 0xda, 0xbe] {
        return Err(refused(
            path,
            "VDI images are not supported: convert it to raw or qcow2 with qemu-img first",
        ));
    } else {
        SourceFormat::Raw
    };
    if let Some(want) = expected {
        if want != format {
            return Err(refused(
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
    let virtual_size = match format {
        SourceFormat::Raw => file_size,
        SourceFormat::Qcow2 => check_qcow2(path, &file, file_size)?,
        SourceFormat::Vmdk => check_vmdk(path, &file, &head, file_size)?,
        SourceFormat::Vhd => check_vhd(path, &head, &tail)?,
        SourceFormat::Vhdx => 0, // checked by qemu-img info below
    };
    let mut ins = Inspected {
        path: path.to_owned(),
        format,
        virtual_size,
        file_size,
    };
    if qemu && format != SourceFormat::Raw {
        let qsize = qemu_img_info_check(&ins)?;
        if format == SourceFormat::Vhdx {
            ins.virtual_size = qsize;
        } else if format != SourceFormat::Vhd && qsize != virtual_size {
            return Err(bad(
                path,
                format!("header says {virtual_size} bytes but qemu-img reads {qsize}: refused"),
            ));
        } else if format == SourceFormat::Vhd {
            ins.virtual_size = qsize;
        }
        if ins.virtual_size > MAX_VIRTUAL_SIZE {
            return Err(refused(
                path,
                format!("virtual size {} is larger than 64 TiB", ins.virtual_size),
            ));
        }
    }
    Ok(ins)
}

fn read_full(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes(b[o..o + 4].try_into().unwrap())
}
fn be64(b: &[u8], o: usize) -> u64 {
    u64::from_be_bytes(b[o..o + 8].try_into().unwrap())
}
fn le64(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}

/// Checks a qcow2 header; returns the virtual size.
fn check_qcow2(path: &Path, file: &File, file_size: u64) -> Result<u64> {
    let mut h = vec![0u8; 4096];
    let n = file.read_at(&mut h, 0).at(path)?;
    if n < 72 {
        return Err(bad(
            path,
            format!("truncated qcow2: the file has {n} bytes, shorter than a qcow2 header"),
        ));
    }
    let version = be32(&h, 4);
    if version != 2 && version != 3 {
        return Err(refused(
            path,
            format!("unsupported qcow2 version {version}"),
        ));
    }
    let backing_off = be64(&h, 8);
    let backing_len = be32(&h, 16) as usize;
    if backing_off != 0 {
        let name = if (backing_off as usize)
            .checked_add(backing_len)
            .is_some_and(|end| end <= n)
            && backing_len <= 1023
        {
            String::from_utf8_lossy(&h[backing_off as usize..backing_off as usize + backing_len])
                .into_owned()
        } else {
            "<unreadable>".into()
        };
        return Err(refused(path, format!("qcow2 image has a backing file ({name:?}): an image must be self-contained; flatten it with `qemu-img convert -O qcow2` on a trusted copy")));
    }
    let cluster_bits = be32(&h, 20);
    if !(9..=21).contains(&cluster_bits) {
        return Err(bad(
            path,
            format!("qcow2 cluster_bits {cluster_bits} out of range"),
        ));
    }
    let cluster = 1u64 << cluster_bits;
    let size = be64(&h, 24);
    if size > MAX_VIRTUAL_SIZE {
        return Err(refused(
            path,
            format!("qcow2 header claims a virtual size of {size} bytes (over 64 TiB)"),
        ));
    }
    if be32(&h, 32) != 0 {
        return Err(refused(path, "encrypted qcow2 images are not supported"));
    }
    let l1_size = be32(&h, 36) as u64;
    let l1_off = be64(&h, 40);
    let rt_off = be64(&h, 48);
    let rt_clusters = be32(&h, 56) as u64;
    let per_l2 = cluster / 8;
    let needed_l1 = size.div_ceil(cluster * per_l2);
    if l1_size < needed_l1 {
        return Err(bad(path, format!("qcow2 header lies about its size: {size} bytes need {needed_l1} L1 entries, the table has {l1_size}")));
    }
    let within = |off: u64, len: u64| off.checked_add(len).is_some_and(|e| e <= file_size);
    if l1_size > 0 && !within(l1_off, l1_size * 8) {
        return Err(bad(path, format!("truncated qcow2: the L1 table at offset {l1_off} ({} bytes) ends past the end of the file ({file_size} bytes)", l1_size * 8)));
    }
    if !within(rt_off, rt_clusters * cluster) {
        return Err(bad(path, format!("truncated qcow2: the refcount table at offset {rt_off} ends past the end of the file ({file_size} bytes)")));
    }
    let mut ext_start = 72usize;
    if version == 3 {
        if n < 104 {
            return Err(bad(path, "truncated qcow2 v3 header"));
        }
        let incompat = be64(&h, 72);
        if incompat & 0b100 != 0 {
            return Err(refused(
                path,
                "qcow2 image uses an external data file: an image must be self-contained",
            ));
        }
        if incompat & 0b10 != 0 {
            return Err(bad(path, "qcow2 image is marked corrupt; repair it with `qemu-img check -r all` on a copy first"));
        }
        if incompat & !0b11011 != 0 {
            return Err(refused(
                path,
                format!("qcow2 image has unknown incompatible features {incompat:#x}"),
            ));
        }
        ext_start = be32(&h, 100) as usize;
    }
    // Header extensions: refuse an external data file name however it is flagged.
    let mut p = ext_start;
    while p + 8 <= n {
        let typ = be32(&h, p);
        let len = be32(&h, p + 4) as usize;
        if typ == 0 {
            break;
        }
        if typ == 0x4441_5441 {
            return Err(refused(
                path,
                "qcow2 image names an external data file: an image must be self-contained",
            ));
        }
        p += 8 + len.div_ceil(8) * 8;
    }
    Ok(size)
}

/// Checks a VMDK: only a self-contained sparse file with one extent.
fn check_vmdk(path: &Path, file: &File, head: &[u8], file_size: u64) -> Result<u64> {
    if head.starts_with(b"# Disk DescriptorFile") {
        return Err(refused(path, "this is a VMDK descriptor file: it refers to other files (extents) on the host; import the monolithic image instead"));
    }
    if head.len() < 80 {
        return Err(bad(path, "truncated VMDK header"));
    }
    let capacity = le64(head, 12);
    let desc_off = le64(head, 28);
    let desc_len = le64(head, 36);
    let gd_off = le64(head, 56);
    let size = capacity
        .checked_mul(512)
        .filter(|&s| s <= MAX_VIRTUAL_SIZE)
        .ok_or_else(|| {
            refused(
                path,
                format!("VMDK header claims {capacity} sectors (over 64 TiB)"),
            )
        })?;
    if gd_off != u64::MAX && gd_off.saturating_mul(512) >= file_size {
        return Err(bad(path, format!("truncated VMDK: the grain directory (sector {gd_off}) is past the end of the file ({file_size} bytes)")));
    }
    if desc_off == 0 || desc_len == 0 {
        return Err(refused(path, "VMDK has no embedded descriptor"));
    }
    if desc_len > 2048
        || desc_off
            .checked_add(desc_len)
            .is_none_or(|end| end.saturating_mul(512) > file_size)
    {
        return Err(bad(path, "VMDK embedded descriptor lies outside the file"));
    }
    let mut desc = vec![0u8; (desc_len * 512) as usize];
    file.read_exact_at(&mut desc, desc_off * 512).at(path)?;
    let text = String::from_utf8_lossy(&desc);
    let text = text.trim_end_matches('\0');
    let mut extents = 0;
    for line in text.lines().map(str::trim) {
        if let Some(v) = line.strip_prefix("createType") {
            let v = v.trim_start_matches([' ', '=']).trim_matches('"');
            if v != "monolithicSparse" && v != "streamOptimized" {
                return Err(refused(path, format!("VMDK createType {v:?} refers to other files; only monolithicSparse and streamOptimized are accepted")));
            }
        } else if line.starts_with("parentFileNameHint") {
            return Err(refused(
                path,
                "VMDK is a delta disk with a parent file: an image must be self-contained",
            ));
        } else if let Some(v) = line.strip_prefix("parentCID") {
            let v = v.trim_start_matches([' ', '=']);
            if !v.eq_ignore_ascii_case("ffffffff") {
                return Err(refused(path, "VMDK is a delta disk with a parent (parentCID set): an image must be self-contained"));
            }
        } else if line.starts_with("RW ")
            || line.starts_with("RDONLY ")
            || line.starts_with("NOACCESS ")
        {
            extents += 1;
            let typ = line.split_whitespace().nth(2).unwrap_or("");
            if typ != "SPARSE" {
                return Err(refused(
                    path,
                    format!("VMDK extent {line:?} refers to another file on the host"),
                ));
            }
        }
    }
    if extents != 1 {
        return Err(refused(path, format!("VMDK descriptor lists {extents} extents; exactly one (the file itself) is accepted")));
    }
    Ok(size)
}

/// Checks a VHD footer: differencing disks are refused.
fn check_vhd(path: &Path, head: &[u8], tail: &[u8]) -> Result<u64> {
    let footer = if tail.starts_with(b"conectix") {
        tail
    } else {
        head
    };
    if footer.len() < 64 {
        return Err(bad(path, "truncated VHD footer"));
    }
    match be32(footer, 60) {
        2 | 3 => Ok(be64(footer, 48)),
        4 => Err(refused(
            path,
            "VHD is a differencing disk with a parent file: an image must be self-contained",
        )),
        t => Err(bad(path, format!("unknown VHD disk type {t}"))),
    }
}

/// Runs `qemu-img info` (which does not open backing files) and
/// `qemu-img check`, refusing anything that refers to another file.
/// Returns qemu's virtual size.
fn qemu_img_info_check(ins: &Inspected) -> Result<u64> {
    let fmt = ins.format.qemu_name();
    let out = qemu_img(&["info", "--output=json", "-f", fmt, path_arg(&ins.path)?])?;
    let v: serde_json::Value = serde_json::from_slice(&out).map_err(|e| Error::Tool {
        tool: "qemu-img info".into(),
        detail: e.to_string(),
    })?;
    if let Some(b) = v.get("backing-filename").and_then(|b| b.as_str()) {
        return Err(refused(
            &ins.path,
            format!("image has a backing file ({b:?}): an image must be self-contained"),
        ));
    }
    if let Some(d) = v
        .pointer("/format-specific/data/data-file")
        .and_then(|d| d.as_str())
    {
        return Err(refused(
            &ins.path,
            format!("image uses an external data file ({d:?}): an image must be self-contained"),
        ));
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
        SourceFormat::Qcow2 | SourceFormat::Vhdx | SourceFormat::Vmdk
    ) {
        let st = Command::new("qemu-img")
            .args(["check", "-q", "-f", fmt])
            .arg(&ins.path)
            .output()
            .map_err(qemu_img_missing)?;
        // 0 clean, 3 leaked clusters only, 63 check unsupported for this format.
        if !matches!(st.status.code(), Some(0 | 3 | 63)) {
            let err = String::from_utf8_lossy(&st.stderr);
            let first = err.lines().next().unwrap_or("corrupt image");
            return Err(bad(
                &ins.path,
                format!("`qemu-img check` found it damaged: {first}"),
            ));
        }
    }
    Ok(size)
}

fn path_arg(p: &Path) -> Result<&str> {
    p.to_str()
        .ok_or_else(|| Error::Invalid(format!("{}: path is not UTF-8", p.display())))
}

fn qemu_img_missing(e: std::io::Error) -> Error {
    Error::Tool {
        tool: "qemu-img".into(),
        detail: format!("{e}: install the Debian package qemu-utils"),
    }
}

/// Runs qemu-img and returns its stdout, or an error with its stderr.
pub fn qemu_img(args: &[&str]) -> Result<Vec<u8>> {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .map_err(qemu_img_missing)?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(Error::Tool {
            tool: format!("qemu-img {}", args.first().unwrap_or(&"")),
            detail: err.trim().lines().last().unwrap_or("failed").to_owned(),
        });
    }
    Ok(out.stdout)
}

/// A raw view of the image to read: the input itself, or a sparse temporary
/// conversion (deleted on drop).
pub struct RawSource {
    pub path: PathBuf,
    pub size: u64,
    temp: bool,
}

impl RawSource {
    /// Gives the raw view of an inspected image; foreign formats are
    /// converted by qemu-img into `tmp_path` (sparse: zero clusters are holes).
    pub fn prepare(ins: &Inspected, tmp_path: &Path) -> Result<RawSource> {
        if ins.format == SourceFormat::Raw {
            return Ok(RawSource {
                path: ins.path.clone(),
                size: ins.virtual_size,
                temp: false,
            });
        }
        let src = RawSource {
            path: tmp_path.to_owned(),
            size: ins.virtual_size,
            temp: true,
        };
        let res = qemu_img(&[
            "convert",
            "-q",
            "-f",
            ins.format.qemu_name(),
            "-O",
            "raw",
            "-S",
            "4k",
            path_arg(&ins.path)?,
            path_arg(tmp_path)?,
        ]);
        match res {
            Ok(_) => Ok(src),
            Err(Error::Tool { detail, .. }) if detail.contains("No space left") => {
                Err(Error::NoSpace {
                    path: tmp_path.to_owned(),
                })
            }
            Err(Error::Tool { tool, detail }) => Err(bad(
                &ins.path,
                format!(
                    "{tool} could not read it as {}: {detail}",
                    ins.format.name()
                ),
            )),
            Err(e) => Err(e),
        }
    }
}

impl Drop for RawSource {
    fn drop(&mut self) {
        if self.temp {
            let _ = std::fs::remove_file(&self.path);
        }
    }
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
        inspect_headers(f.path(), None)
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
        let e = headers(&h).unwrap_err().to_string();
        assert!(e.contains("descriptor lies outside"), "{e}");
    }
}
