//! What an import reads: `Input`, the guest bytes of an image to store.
//!
//! An input is an opened source file (`Input::opened`, read through its
//! [`Reader`]), a raw file (`Input::plain`, an instance's private disk),
//! or capture's overlay reader (`Input::overlay`): a raw base with the
//! clusters of a qcow2 overlay laid over it, so that only the overlay's own
//! clusters are read from it and every block outside them keeps the base
//! image's chunk without being hashed or compressed again.

use std::fs::File;
use std::path::{Path, PathBuf};

use crate::error::{Error, IoContext, Result};
use crate::format::{BlockMap, CHUNK};
use crate::image::source::{self, read_full_at, Opened, Reader};
use tracing::instrument;

/// The guest bytes an import reads: a raw view, or a raw base with a qcow2
/// overlay's clusters laid over it.
pub(crate) struct Input<'a> {
    /// The file read (for an overlay, the base).
    pub(crate) path: PathBuf,
    /// The guest size in bytes.
    pub(crate) size: u64,
    file: Reader,
    overlay: Option<Overlay>,
    /// The opened input file, checked to be unchanged before the commit.
    source: Option<&'a Opened>,
}

/// A qcow2 overlay's own clusters, laid over the base.
struct Overlay {
    path: PathBuf,
    file: File,
    /// Sorted, disjoint, 4 KiB-aligned.
    patches: Vec<Patch>,
    /// The base's image map, when that image still exists: blocks outside
    /// every patch are the base's, so they keep its chunks.
    parent: Option<BlockMap>,
}

/// Guest bytes `start..end` are the overlay file's bytes from `at`, or
/// zeros (`at` = `None`).
#[derive(Clone, Copy, Debug)]
struct Patch {
    start: u64,
    end: u64,
    at: Option<u64>,
}

impl<'a> Input<'a> {
    /// An opened, inspected input read through `reader`: a disk of `size`
    /// bytes. `opened` is checked to be unchanged before the commit.
    pub(crate) fn opened(opened: &'a Opened, reader: Reader, size: u64) -> Input<'a> {
        Input {
            path: opened.path.clone(),
            size,
            file: reader,
            overlay: None,
            source: Some(opened),
        }
    }
}

impl Input<'_> {
    /// A raw file (an instance's private disk copy).
    pub(crate) fn plain(path: &Path, size: u64) -> Result<Input<'static>> {
        Ok(Input {
            path: path.to_owned(),
            size,
            file: Reader::File(File::open(path).at(path)?),
            overlay: None,
            source: None,
        })
    }

    /// A raw base (the parent's content: a base file, or the image read in
    /// place for a lazy overlay) plus a qcow2 overlay on it. Only the
    /// overlay's own clusters are read from it (`qemu-img map` of the
    /// overlay opened without its backing, so a lazy overlay's absent base
    /// file is never opened; unallocated clusters are not "present");
    /// `--force-share` lets a paused QEMU keep the image open. `base_path`
    /// names the base in messages.
    #[instrument(skip_all, err(level = "debug"))]
    pub(crate) fn overlay(
        base_path: &Path,
        base: Reader,
        overlay: &Path,
        parent: Option<BlockMap>,
    ) -> Result<Input<'static>> {
        let file = overlay
            .to_str()
            .ok_or_else(|| Error::Invalid(format!("{}: path is not UTF-8", overlay.display())))?;
        let spec = serde_json::json!({
            "driver": "qcow2",
            "file": {"driver": "file", "filename": file},
            "backing": null,
        });
        let out = source::qemu_img(&[
            "map",
            "--force-share",
            "--output=json",
            &format!("json:{spec}"),
        ])?;
        let map: Vec<serde_json::Value> =
            serde_json::from_slice(&out).map_err(|e| Error::Tool {
                tool: "qemu-img map".into(),
                detail: format!("{}: {e}", overlay.display()),
            })?;
        let (size, patches) = overlay_patches(overlay, &map)?;
        Ok(Input {
            path: base_path.to_owned(),
            size,
            file: base,
            source: None,
            overlay: Some(Overlay {
                path: overlay.to_owned(),
                file: File::open(overlay).at(overlay)?,
                patches,
                parent,
            }),
        })
    }

    /// The opened input file, if the input is one (checked to be unchanged
    /// before the commit).
    pub(crate) fn source(&self) -> Option<&Opened> {
        self.source
    }

    /// Data ranges (holes and zero patches left out).
    pub(crate) fn extents(&self) -> Result<Vec<(u64, u64)>> {
        let base = self.file.data_extents(self.size).at(&self.path)?;
        let Some(ov) = &self.overlay else {
            return Ok(base);
        };
        // base minus every patch, plus the data patches
        let mut out = outside_patches(&base, &ov.patches);
        out.extend(
            ov.patches
                .iter()
                .filter(|p| p.at.is_some())
                .map(|p| (p.start, p.end)),
        );
        out.sort_unstable();
        Ok(merge_ranges(out))
    }

    /// Reads guest bytes at `off` (a short read only at the end).
    pub(crate) fn read_at_full(&self, buf: &mut [u8], off: u64) -> Result<usize> {
        let Some(ov) = &self.overlay else {
            return self.file.read_at(buf, off).at(&self.path);
        };
        let mut done = 0usize;
        while done < buf.len() {
            let pos = off + done as u64;
            if pos >= self.size {
                break;
            }
            let rest = &mut buf[done..];
            let i = ov.patches.partition_point(|p| p.end <= pos);
            done += match ov.patches.get(i) {
                Some(p) if p.start <= pos => ov.read_patch(p, rest, pos)?,
                next => {
                    let lim = next.map_or(self.size, |p| p.start).min(self.size);
                    self.read_base(rest, pos, lim)?
                }
            };
        }
        Ok(done)
    }

    /// Reads base bytes from `pos` up to `lim` (at most `buf.len()`);
    /// returns how many were filled. A base shorter than the overlay reads
    /// as zeros.
    fn read_base(&self, buf: &mut [u8], pos: u64, lim: u64) -> Result<usize> {
        let n = buf.len().min((lim - pos) as usize);
        let got = self.file.read_at(&mut buf[..n], pos).at(&self.path)?;
        if got < n {
            buf[got..n].fill(0);
        }
        Ok(n)
    }

    /// The map entry of a block the overlay did not change, when the base's
    /// map is known.
    pub(crate) fn known(&self, block: u64) -> Option<u64> {
        let ov = self.overlay.as_ref()?;
        let parent = ov.parent.as_ref()?;
        let off = block * CHUNK;
        let i = ov.patches.partition_point(|p| p.end <= off);
        if ov.patches.get(i).is_some_and(|p| p.start <= off) {
            return None;
        }
        if block >= parent.nblocks {
            return None;
        }
        Some(parent.get(block) as u64)
    }
}

impl Overlay {
    /// Reads guest bytes from `pos` inside patch `p` (up to its end, at
    /// most `buf.len()`); returns how many were filled.
    fn read_patch(&self, p: &Patch, buf: &mut [u8], pos: u64) -> Result<usize> {
        let n = buf.len().min((p.end - pos) as usize);
        let Some(at) = p.at else {
            buf[..n].fill(0);
            return Ok(n);
        };
        let from = at + (pos - p.start);
        let got = read_full_at(&self.file, &mut buf[..n], from).at(&self.path)?;
        if got < n {
            return Err(Error::BadInput {
                file: self.path.clone(),
                reason: format!("cluster data at byte {from} is missing"),
            });
        }
        Ok(n)
    }
}

/// The guest size and the overlay's own clusters (depth 0) from its
/// `qemu-img map` entries, sorted.
fn overlay_patches(overlay: &Path, map: &[serde_json::Value]) -> Result<(u64, Vec<Patch>)> {
    let mut size = 0u64;
    let mut patches = Vec::new();
    for m in map {
        let num = |k: &str| m.get(k).and_then(serde_json::Value::as_u64);
        let (Some(start), Some(len)) = (num("start"), num("length")) else {
            continue;
        };
        size = size.max(start + len);
        if num("depth") != Some(0) {
            continue; // the base's bytes
        }
        if start % CHUNK != 0 || (len % CHUNK != 0 && start + len != size) {
            return Err(Error::BadInput {
                file: overlay.to_owned(),
                reason: format!("cluster at byte {start} is not 4 KiB aligned"),
            });
        }
        patches.extend(own_cluster(overlay, m, start, len)?);
    }
    patches.sort_unstable_by_key(|p| p.start);
    Ok((size, patches))
}

/// The patch of the overlay's cluster of `len` bytes at guest byte
/// `start` (a depth-0 `qemu-img map` entry `m`): its data in the overlay
/// file, or zeros; `None` when it is unallocated (the base's bytes).
fn own_cluster(
    overlay: &Path,
    m: &serde_json::Value,
    start: u64,
    len: u64,
) -> Result<Option<Patch>> {
    let flag = |k: &str| {
        m.get(k)
            .and_then(serde_json::Value::as_bool)
            .unwrap_or(false)
    };
    // Opened without its backing: a cluster the overlay does not hold is
    // "present": false (qemu-img 6.1 and later), the base's bytes.
    match m.get("present").and_then(serde_json::Value::as_bool) {
        Some(false) => return Ok(None),
        Some(true) => {}
        None => {
            return Err(Error::Tool {
                tool: "qemu-img map".into(),
                detail: format!(
                    "{}: no \"present\" field in its output: qemu-img 6.1 or later is needed",
                    overlay.display()
                ),
            })
        }
    }
    let at = if flag("zero") && !flag("data") {
        None
    } else if flag("data") {
        let offset = m.get("offset").and_then(serde_json::Value::as_u64);
        Some(offset.ok_or_else(|| Error::BadInput {
            file: overlay.to_owned(),
            reason: format!(
                "cluster at byte {start} has no plain offset (compressed?): not supported"
            ),
        })?)
    } else {
        return Ok(None);
    };
    Ok(Some(Patch {
        start,
        end: start + len,
        at,
    }))
}

/// The parts of the sorted `ranges` that no patch covers.
fn outside_patches(ranges: &[(u64, u64)], patches: &[Patch]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut pi = 0;
    for &(s, e) in ranges {
        let mut pos = s;
        while pi < patches.len() && patches[pi].end <= pos {
            pi += 1;
        }
        let mut k = pi;
        while pos < e {
            match patches.get(k) {
                Some(p) if p.start < e => {
                    if p.start > pos {
                        out.push((pos, p.start));
                    }
                    pos = pos.max(p.end);
                    k += 1;
                }
                _ => {
                    out.push((pos, e));
                    pos = e;
                }
            }
        }
    }
    out
}

/// Sorted ranges with the overlapping and touching ones merged.
fn merge_ranges(sorted: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(sorted.len());
    for (s, e) in sorted {
        match merged.last_mut() {
            Some((_, pe)) if s <= *pe => *pe = (*pe).max(e),
            _ => merged.push((s, e)),
        }
    }
    merged
}

#[cfg(test)]
mod tests {
    use super::*;

    fn patch(start: u64, end: u64, at: Option<u64>) -> Patch {
        Patch { start, end, at }
    }

    #[test]
    fn patches_cut_the_base_ranges() {
        let patches = [patch(4096, 8192, Some(0)), patch(12288, 20480, None)];
        assert_eq!(
            outside_patches(&[(0, 16384), (20480, 24576)], &patches),
            vec![(0, 4096), (8192, 12288), (20480, 24576)]
        );
        assert_eq!(outside_patches(&[(4096, 8192)], &patches), vec![]);
    }

    #[test]
    fn ranges_merge_when_they_touch() {
        assert_eq!(
            merge_ranges(vec![(0, 10), (5, 20), (20, 30), (40, 50)]),
            vec![(0, 30), (40, 50)]
        );
    }

    #[test]
    fn clusters_of_the_overlay_only() {
        let map: Vec<serde_json::Value> = serde_json::from_str(
            r#"[{"start": 0, "length": 4096, "depth": 1, "present": true, "data": true},
                {"start": 4096, "length": 4096, "depth": 0, "present": true, "data": true, "offset": 327680},
                {"start": 8192, "length": 8192, "depth": 0, "present": true, "zero": true, "data": false},
                {"start": 16384, "length": 4096, "depth": 0, "present": false, "zero": true, "data": false}]"#,
        )
        .unwrap();
        let (size, p) = overlay_patches(Path::new("o.qcow2"), &map).unwrap();
        assert_eq!(size, 20480);
        assert_eq!(
            p.iter().map(|p| (p.start, p.end, p.at)).collect::<Vec<_>>(),
            vec![(4096, 8192, Some(327680)), (8192, 16384, None)]
        );
        let compressed: Vec<serde_json::Value> = serde_json::from_str(
            r#"[{"start": 0, "length": 4096, "depth": 0, "present": true, "data": true}]"#,
        )
        .unwrap();
        let e = overlay_patches(Path::new("o.qcow2"), &compressed).unwrap_err();
        assert!(e.to_string().contains("no plain offset"), "{e}");
    }
}
