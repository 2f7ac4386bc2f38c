//! The header checks behind [`super::inspect`]: the format of an input
//! from its content ([`detect`]) and, per format ([`check`]), the rules that
//! refuse what qemu would follow out of the file (backing and external data
//! files, descriptors, extents, parents) or would read past its end (tables
//! larger than the file). Each check returns the virtual size its header
//! claims; nothing here runs qemu.

use std::fs::File;
use std::path::Path;

use super::{bad, read_full_at, too_big, SourceFormat, MAX_VIRTUAL_SIZE};
use crate::error::{Error, IoContext, Result};

/// The format of an input from its first bytes (`head`, up to 4 KiB) and,
/// for VHD, its last 512 (`tail`, when the file has them): from the
/// content, never from the name. Formats that may name other files and that
/// vmdepot does not check (COWD, QED) are refused.
pub(super) fn detect(path: &Path, head: &[u8], tail: Option<&[u8]>) -> Result<SourceFormat> {
    Ok(if head.starts_with(b"QFI\xfb") {
        SourceFormat::Qcow2
    } else if head.starts_with(b"KDMV") || head.starts_with(b"# Disk DescriptorFile") {
        SourceFormat::Vmdk
    } else if head.starts_with(b"vhdxfile") {
        SourceFormat::Vhdx
    } else if head.starts_with(b"conectix") || tail.is_some_and(|t| t.starts_with(b"conectix")) {
        SourceFormat::Vhd
    } else if head.len() >= 68 && head[64..68] == VDI_SIGNATURE {
        SourceFormat::Vdi
    } else if head.starts_with(b"COWD") {
        return Err(Error::refused(path, "VMware ESX sparse (COWD) images are not supported: convert it to raw or qcow2 with qemu-img first"));
    } else if head.starts_with(b"QED\0") {
        return Err(Error::refused(path, "QED images are not supported (they may refer to a backing file): convert it with qemu-img first"));
    } else {
        SourceFormat::Raw
    })
}

/// Checks the headers of an input of `format` (`file`, `file_size` bytes;
/// `head` and `tail` as for [`detect`], `tail` zeros when the file has
/// none); returns the virtual size they claim (the file's size for raw, 0
/// for VHDX, whose size only qemu reads).
pub(super) fn check(
    format: SourceFormat,
    path: &Path,
    file: &File,
    head: &[u8],
    tail: &[u8],
    file_size: u64,
) -> Result<u64> {
    match format {
        SourceFormat::Raw => Ok(file_size),
        SourceFormat::Qcow2 => check_qcow2(path, file, file_size),
        SourceFormat::Vmdk => check_vmdk(path, file, head, file_size),
        SourceFormat::Vhd => check_vhd(path, file, head, tail, file_size),
        SourceFormat::Vhdx => check_vhdx(path, file, file_size),
        SourceFormat::Vdi => check_vdi(path, head, file_size),
    }
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

/// Checks a qcow2 header (and its extensions, which qemu reads up to the
/// end of the first cluster); returns the virtual size.
fn check_qcow2(path: &Path, file: &File, file_size: u64) -> Result<u64> {
    let mut h = vec![0u8; 4096];
    let n = read_full_at(file, &mut h, 0).at(path)?;
    if n < 72 {
        return Err(bad(
            path,
            format!("truncated qcow2: the file has {n} bytes, shorter than a qcow2 header"),
        ));
    }
    let version = be32(&h, 4);
    if version != 2 && version != 3 {
        return Err(Error::refused(
            path,
            format!("unsupported qcow2 version {version}"),
        ));
    }
    qcow2_no_backing(path, &h[..n])?;
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
        return Err(too_big(path, size));
    }
    if be32(&h, 32) != 0 {
        return Err(Error::refused(
            path,
            "encrypted qcow2 images are not supported",
        ));
    }
    qcow2_tables_within(path, &h, cluster, size, file_size)?;
    if cluster as usize > h.len() {
        h.resize(cluster as usize, 0);
        let more = read_full_at(file, &mut h[4096..], 4096).at(path)?;
        h.truncate(4096 + more);
    }
    let ext_start = if version == 3 {
        qcow2_v3_features(path, &h)?
    } else {
        72
    };
    qcow2_extensions(path, &h, ext_start)?;
    Ok(size)
}

/// Refuses a qcow2 header (`h`: the bytes read of it) that names a backing
/// file, quoting the name when it lies within them.
fn qcow2_no_backing(path: &Path, h: &[u8]) -> Result<()> {
    let backing_off = be64(h, 8);
    let backing_len = be32(h, 16) as usize;
    if backing_off == 0 {
        return Ok(());
    }
    let name = match usize::try_from(backing_off)
        .ok()
        .and_then(|o| o.checked_add(backing_len).map(|e| (o, e)))
    {
        Some((o, e)) if e <= h.len() && backing_len <= 1023 => {
            String::from_utf8_lossy(&h[o..e]).into_owned()
        }
        _ => "<unreadable>".into(),
    };
    Err(Error::refused(path, format!("qcow2 image has a backing file ({name:?}): an image must be self-contained; flatten it with `qemu-img convert -O qcow2` on a trusted copy")))
}

/// The L1 table must cover the virtual `size`, and it and the refcount
/// table must lie inside the file (qemu allocates and reads them whole).
fn qcow2_tables_within(
    path: &Path,
    h: &[u8],
    cluster: u64,
    size: u64,
    file_size: u64,
) -> Result<()> {
    let l1_size = be32(h, 36) as u64;
    let l1_off = be64(h, 40);
    let rt_off = be64(h, 48);
    let rt_clusters = be32(h, 56) as u64;
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
    Ok(())
}

/// Checks a qcow2 v3 header's incompatible features (`h`: its first
/// cluster): an external data file, a corrupt mark and unknown features are
/// refused. Returns where the header extensions start.
fn qcow2_v3_features(path: &Path, h: &[u8]) -> Result<usize> {
    if h.len() < 104 {
        return Err(bad(path, "truncated qcow2 v3 header"));
    }
    let incompat = be64(h, 72);
    if incompat & 0b100 != 0 {
        return Err(Error::refused(
            path,
            "qcow2 image uses an external data file: an image must be self-contained",
        ));
    }
    if incompat & 0b10 != 0 {
        return Err(bad(
            path,
            "qcow2 image is marked corrupt; repair it with `qemu-img check -r all` on a copy first",
        ));
    }
    if incompat & !0b11011 != 0 {
        return Err(Error::refused(
            path,
            format!("qcow2 image has unknown incompatible features {incompat:#x}"),
        ));
    }
    Ok(be32(h, 100) as usize)
}

/// Walks the qcow2 header extensions from `start` to the end of the first
/// cluster (`h`): an external data file name is refused however it is
/// flagged.
fn qcow2_extensions(path: &Path, h: &[u8], start: usize) -> Result<()> {
    let mut p = start;
    while p + 8 <= h.len() {
        let typ = be32(h, p);
        let len = be32(h, p + 4) as usize;
        if typ == 0 {
            break;
        }
        if typ == 0x4441_5441 {
            return Err(Error::refused(
                path,
                "qcow2 image names an external data file: an image must be self-contained",
            ));
        }
        p += 8 + len.div_ceil(8) * 8;
    }
    Ok(())
}

/// Checks a VMDK by the rules of qemu's vmdk driver. A file that does
/// not start with the sparse magic is a descriptor naming extent files:
/// refused. A sparse (`KDMV`) file is one self-contained extent, except
/// that qemu (a) reads an embedded descriptor as a descriptor file, opening
/// the extents it names, when the header's capacity is 0, and (b) takes a
/// parent from the first `parentFileNameHint` anywhere in the 10 KiB after
/// the first sector (a C `strstr`, comments and tabs included): both refused.
fn check_vmdk(path: &Path, file: &File, head: &[u8], file_size: u64) -> Result<u64> {
    if !head.starts_with(b"KDMV") {
        return Err(Error::refused(path, "this is a VMDK descriptor file: it refers to other files (extents) on the host; import the monolithic image instead"));
    }
    if head.len() < 80 {
        return Err(bad(path, "truncated VMDK header"));
    }
    let capacity = le64(head, 12);
    let gd_off = le64(head, 56);
    if capacity == 0 {
        return Err(Error::refused(path, "VMDK sparse header with a capacity of 0: qemu would read its embedded descriptor and open the extent files it names"));
    }
    let size = capacity
        .checked_mul(512)
        .filter(|&s| s <= MAX_VIRTUAL_SIZE)
        .ok_or_else(|| too_big(path, capacity.saturating_mul(512)))?;
    if gd_off != u64::MAX && gd_off.saturating_mul(512) >= file_size {
        return Err(bad(path, format!("truncated VMDK: the grain directory (sector {gd_off}) is past the end of the file ({file_size} bytes)")));
    }
    let mut desc = vec![0u8; VMDK_DESC_SIZE];
    let n = read_full_at(file, &mut desc, 512).at(path)?;
    desc.truncate(n);
    if find(&desc, b"parentFileNameHint").is_some() {
        return Err(Error::refused(
            path,
            "VMDK is a delta disk with a parent file (parentFileNameHint): an image must be self-contained",
        ));
    }
    Ok(size)
}

/// What qemu's vmdk driver reads as the descriptor of a sparse file
/// (`DESC_SIZE`: 20 sectors from byte 512).
const VMDK_DESC_SIZE: usize = 20 * 512;

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Bytes 64..68 of a VDI header (`0xbeda107f`, little-endian).
const VDI_SIGNATURE: [u8; 4] = [0x7f, 0x10, 0xda, 0xbe];

/// Checks a VDI header as qemu's vdi driver does: version 1.1, dynamic or
/// fixed (a differencing or undo image names a parent: refused).
fn check_vdi(path: &Path, head: &[u8], file_size: u64) -> Result<u64> {
    if head.len() < 512 {
        return Err(bad(path, "truncated VDI header"));
    }
    let le32 = |o: usize| u32::from_le_bytes(head[o..o + 4].try_into().unwrap());
    if le32(68) != 0x0001_0001 {
        return Err(Error::refused(
            path,
            format!("unsupported VDI version {:#x}", le32(68)),
        ));
    }
    // The block map (4 bytes a block; qemu allocates and reads it whole)
    // must lie inside the file.
    let (bmap, blocks) = (le32(340) as u64, le32(384) as u64);
    if bmap + blocks * 4 > file_size {
        return Err(bad(
            path,
            format!("VDI block map ({blocks} blocks at byte {bmap}) ends past the end of the file ({file_size} bytes)"),
        ));
    }
    match le32(76) {
        1 | 2 => Ok(le64(head, 368)),
        t @ (3 | 4) => Err(Error::refused(
            path,
            format!("VDI image of type {t} (undo/differencing) has a parent: an image must be self-contained"),
        )),
        t => Err(bad(path, format!("unknown VDI image type {t}"))),
    }
}

/// VHDX GUIDs as stored (the first three fields little-endian).
const VHDX_METADATA_REGION: [u8; 16] = guid(
    0x8B7C_A206,
    0x4790,
    0x4B9A,
    [0xB8, 0xFE, 0x57, 0x5F, 0x05, 0x0F, 0x88, 0x6E],
);
const VHDX_FILE_PARAMETERS: [u8; 16] = guid(
    0xCAA1_6737,
    0xFA36,
    0x4D43,
    [0xB3, 0xB6, 0x33, 0xF0, 0xAA, 0x44, 0xE7, 0x6B],
);
const VHDX_PARENT_LOCATOR: [u8; 16] = guid(
    0xA8D3_5F2D,
    0xB30B,
    0x454D,
    [0xAB, 0xF7, 0xD3, 0xD8, 0x48, 0x34, 0xAB, 0x0C],
);

const fn guid(a: u32, b: u16, c: u16, d: [u8; 8]) -> [u8; 16] {
    let a = a.to_le_bytes();
    let b = b.to_le_bytes();
    let c = c.to_le_bytes();
    [
        a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d[0], d[1], d[2], d[3], d[4], d[5], d[6],
        d[7],
    ]
}

/// Checks a VHDX: a differencing disk (the file parameters' HasParent bit,
/// or a parent locator in the metadata) names a parent file: refused (qemu
/// refuses it too, but the reason is ours to give). Walks the region table
/// at 192 KiB to the metadata table. Returns 0: the size is qemu's.
fn check_vhdx(path: &Path, file: &File, file_size: u64) -> Result<u64> {
    let mut rt = vec![0u8; 64 << 10];
    if read_full_at(file, &mut rt, 192 << 10).at(path)? < 16 || &rt[0..4] != b"regi" {
        return Err(bad(path, "truncated VHDX: no region table at 192 KiB"));
    }
    let count = (u32::from_le_bytes(rt[8..12].try_into().unwrap()) as usize).min(2047);
    for i in 0..count {
        let e = &rt[16 + i * 32..16 + (i + 1) * 32];
        if e[0..16] != VHDX_METADATA_REGION {
            continue;
        }
        let off = le64(e, 16);
        let len = u32::from_le_bytes(e[24..28].try_into().unwrap()) as u64;
        if off.checked_add(len).is_none_or(|end| end > file_size) || len < 32 {
            return Err(bad(path, "VHDX metadata region lies outside the file"));
        }
        check_vhdx_metadata(path, file, off, len)?;
        return Ok(0);
    }
    Err(bad(path, "VHDX has no metadata region"))
}

/// Checks the VHDX metadata table of `len` bytes at `off`: a parent
/// locator, or file parameters with HasParent, is refused.
fn check_vhdx_metadata(path: &Path, file: &File, off: u64, len: u64) -> Result<()> {
    let mut md = vec![0u8; len.min(64 << 10) as usize];
    read_full_at(file, &mut md, off).at(path)?;
    if &md[0..8] != b"metadata" {
        return Err(bad(path, "VHDX metadata table has a bad signature"));
    }
    let entries = (u16::from_le_bytes([md[10], md[11]]) as usize).min(md.len() / 32 - 1);
    for k in 0..entries {
        let m = &md[32 + k * 32..32 + (k + 1) * 32];
        if m[0..16] == VHDX_PARENT_LOCATOR {
            return Err(Error::refused(path, "VHDX is a differencing disk with a parent locator: an image must be self-contained"));
        }
        if m[0..16] == VHDX_FILE_PARAMETERS {
            let item = u32::from_le_bytes(m[16..20].try_into().unwrap()) as u64;
            check_vhdx_file_parameters(path, file, off + item)?;
        }
    }
    Ok(())
}

/// The VHDX file parameters at `at` must not have the HasParent bit.
fn check_vhdx_file_parameters(path: &Path, file: &File, at: u64) -> Result<()> {
    let mut fp = [0u8; 8];
    if read_full_at(file, &mut fp, at).at(path)? < 8 {
        return Err(bad(path, "VHDX file parameters lie outside the file"));
    }
    if u32::from_le_bytes(fp[4..8].try_into().unwrap()) & 2 != 0 {
        return Err(Error::refused(
            path,
            "VHDX is a differencing disk (HasParent): an image must be self-contained",
        ));
    }
    Ok(())
}

/// Checks a VHD footer: differencing disks are refused.
fn check_vhd(path: &Path, file: &File, head: &[u8], tail: &[u8], file_size: u64) -> Result<u64> {
    // qemu reads the copy at offset 0 when it has the magic, else the
    // footer at the end: both copies are checked, so neither can hide a
    // differencing disk.
    let copies: Vec<&[u8]> = [head, tail]
        .into_iter()
        .filter(|c| c.starts_with(b"conectix"))
        .collect();
    let mut size = None;
    for footer in copies {
        if footer.len() < 64 {
            return Err(bad(path, "truncated VHD footer"));
        }
        match be32(footer, 60) {
            2 => {}
            3 => check_vhd_dynamic(path, file, be64(footer, 16), file_size)?,
            4 => return Err(Error::refused(
                path,
                "VHD is a differencing disk with a parent file: an image must be self-contained",
            )),
            t => return Err(bad(path, format!("unknown VHD disk type {t}"))),
        }
        size.get_or_insert(be64(footer, 48));
    }
    size.ok_or_else(|| bad(path, "truncated VHD footer"))
}

/// A dynamic VHD's block table (4 bytes per entry, which qemu allocates
/// and reads whole) must lie inside the file.
fn check_vhd_dynamic(path: &Path, file: &File, off: u64, file_size: u64) -> Result<()> {
    let mut h = [0u8; 40];
    if off.checked_add(40).is_none_or(|e| e > file_size)
        || read_full_at(file, &mut h, off).at(path)? < 40
        || &h[0..8] != b"cxsparse"
    {
        return Err(bad(
            path,
            "VHD dynamic disk header missing or outside the file",
        ));
    }
    let table = be64(&h, 16);
    let entries = be32(&h, 28) as u64;
    if table.checked_add(entries * 4).is_none_or(|e| e > file_size) {
        return Err(bad(
            path,
            format!("VHD block table ({entries} entries at byte {table}) ends past the end of the file ({file_size} bytes)"),
        ));
    }
    Ok(())
}
