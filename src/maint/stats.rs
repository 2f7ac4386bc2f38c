//! Usage (who refers to which stored bytes) and stats.

use std::collections::HashMap;

use super::*;
use crate::catalog;
use crate::error::Result;
use crate::format::{self, CHUNK};
use crate::ids::ImageId;
use crate::repo::Repo;

/// Per image: stored bytes no other image uses, and stored bytes shared.
/// A chunk's stored size is its frame's compressed size shared equally by
/// the frame's chunks. Memory: 16 bytes per (image, distinct chunk).
pub(crate) fn usage(repo: &Repo) -> Result<Usage> {
    let conn = &repo.conn;
    // Distinct chunk ids of each image, sorted; maps decoded one at a time.
    let mut per: Vec<(ImageId, Vec<i64>)> = Vec::new();
    let mut damaged = HashMap::new();
    for r in catalog::list_images(conn)? {
        if let Some(d) = r.damage {
            damaged.insert(r.id, d);
            continue;
        }
        if r.state != "available" {
            continue;
        }
        let map = match catalog::image_map(conn, &r.id) {
            Ok(m) => m,
            Err(e) => {
                damaged.insert(r.id, e.to_string());
                continue;
            }
        };
        let mut ids: Vec<i64> = map.data().map(|(_, c)| c).collect();
        ids.sort_unstable();
        ids.dedup();
        per.push((r.id, ids));
    }
    // Every image's ids together: a chunk is shared if it appears twice.
    let mut all: Vec<i64> = per.iter().flat_map(|(_, v)| v.iter().copied()).collect();
    all.sort_unstable();
    let users = |c: i64| all.partition_point(|&x| x <= c) - all.partition_point(|&x| x < c);
    let frame_size: HashMap<i64, f64> = {
        let mut st = conn.prepare("SELECT id, clen, nchunks FROM frames")?;
        let rows = st.query_map([], |r| {
            let clen: i64 = r.get(1)?;
            let n: i64 = r.get(2)?;
            Ok((r.get::<_, i64>(0)?, clen as f64 / n.max(1) as f64))
        })?;
        rows.collect::<rusqlite::Result<_>>()?
    };
    let mut st = conn.prepare_cached("SELECT id, frame FROM chunks WHERE id BETWEEN ?1 AND ?2")?;
    let mut per_image = HashMap::new();
    for (img, ids) in &per {
        let (mut unique, mut shared) = (0f64, 0f64);
        for (first, last) in format::id_runs(ids) {
            let mut rows = st.query([first, last])?;
            while let Some(r) = rows.next()? {
                let (c, f): (i64, i64) = (r.get(0)?, r.get(1)?);
                let sz = frame_size.get(&f).copied().unwrap_or(0.0);
                if users(c) == 1 {
                    unique += sz;
                } else {
                    shared += sz;
                }
            }
        }
        per_image.insert(img.clone(), (unique.round() as u64, shared.round() as u64));
    }
    Ok(Usage { per_image, damaged })
}

/// Logical vs stored bytes, dedup and compression ratios, per image.
pub(crate) fn stats(repo: &Repo) -> Result<Stats> {
    let conn = &repo.conn;
    let usage = usage(repo)?;
    let rows: Vec<_> = catalog::list_images(conn)?
        .into_iter()
        .filter(|r| r.state == "available" && !usage.damaged.contains_key(&r.id))
        .collect();
    let mut damaged: Vec<String> = usage.damaged.values().cloned().collect();
    damaged.sort();
    let chunks: i64 = conn.query_row(
        "SELECT COUNT(*) FROM chunks WHERE id NOT IN (SELECT id FROM pending_chunks)",
        [],
        |r| r.get(0),
    )?;
    let stored: i64 = conn.query_row(
        "SELECT COALESCE(SUM(size), 0) FROM packs WHERE state = 'sealed'",
        [],
        |r| r.get(0),
    )?;
    let catalog_bytes: u64 = ["catalog.db", "catalog.db-wal"]
        .iter()
        .filter_map(|f| std::fs::metadata(repo.root().join(f)).ok())
        .map(|m| m.len())
        .sum();
    let index_bytes: u64 = pack_files(repo.root())?
        .values()
        .filter_map(|p| std::fs::metadata(p.with_extension("idx")).ok())
        .map(|m| m.len())
        .sum();
    let manifest_bytes: u64 = crate::repo::manifest::sizes(repo.root())?.values().sum();
    let overhead = catalog_bytes + index_bytes + manifest_bytes;
    let logical: u64 = rows.iter().map(|r| r.virtual_size).sum();
    let data: u64 = rows.iter().map(|r| r.data_bytes).sum();
    let uniq = chunks as u64 * CHUNK;
    let ratio = |a: u64, b: u64| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    Ok(Stats {
        images: rows.len() as u64,
        logical_bytes: logical,
        data_bytes: data,
        unique_chunk_bytes: uniq,
        chunks: chunks as u64,
        stored_bytes: stored as u64,
        catalog_bytes,
        index_bytes,
        manifest_bytes,
        dedup_ratio: ratio(data, uniq),
        compression_ratio: ratio(uniq, stored as u64),
        overall_ratio: ratio(logical, stored as u64 + overhead),
        damaged_images: damaged,
        per_image: rows
            .into_iter()
            .map(|r| {
                let (u, s) = usage.per_image.get(&r.id).copied().unwrap_or((0, 0));
                ImageStats {
                    id: r.id.to_string(),
                    name: r.name,
                    virtual_size: r.virtual_size,
                    data_bytes: r.data_bytes,
                    unique_stored_bytes: u,
                    shared_stored_bytes: s,
                }
            })
            .collect(),
    })
}
